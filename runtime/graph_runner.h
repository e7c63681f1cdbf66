/*
 * Graph runner: runs a whole (unpartitioned) training graph on one backend through the backend
 * interface (runtime/backend.h). It is the reference executor (runtime/cpu/executor_cpu.c)
 * generalised to any backend: every tensor gets its own backend buffer, ops run in topological
 * order, one kernel call per node, and at the end of a step each update result is swapped into
 * the parameter or optimizer state it replaces (assign_to). Parameters are initialised exactly as
 * the reference executor does (same seed -> same bits: ap_param_init_host), on the host, then
 * uploaded; inputs and optimizer state start at zero.
 *
 * On the CPU backend the results are bit-identical to autopar_executor_* (same kernels, same
 * order). On the CUDA backend a step enqueues every kernel on the device stream without host
 * round trips; the host waits once per step, when the step ends (which is also where deferred
 * device errors, such as an out-of-range token id, are reported) and reads back the loss (one
 * scalar download).
 *
 * Memory: the sum over nodes of numel x element size (ap_graph_runner_bytes_needed); no reuse.
 * The distributed runtime will replace this by per-rank programs with a memory plan; this runner
 * is the single-device path and the way to check a backend against the reference.
 */
#ifndef AUTOPAR_GRAPH_RUNNER_H
#define AUTOPAR_GRAPH_RUNNER_H

#ifdef __cplusplus
extern "C" {
#endif

#include "backend.h"
#include "internal.h"

#include <stddef.h>
#include <stdint.h>

typedef struct ap_graph_runner ap_graph_runner;

/* Bytes of backend memory a runner for g at precision p allocates (every node's tensor, at least
 * 4 bytes each). 0 for a NULL graph. */
AP_INTERNAL size_t ap_graph_runner_bytes_needed(const autopar_graph *g, autopar_precision p);

/* Allocates a buffer for every tensor of g on backend b, zeroes them and initialises parameters
 * from seed (see autopar_init). g and b are borrowed: both must outlive the runner, and g must
 * not be modified. Every computed op is checked against the backend first, so an unsupported
 * op or precision (e.g. F64 on CUDA) fails here, not in the middle of a step.
 * Output: *out (free with ap_graph_runner_free), NULL on failure.
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL, bad precision), AUTOPAR_ERR_GRAPH (sticky graph error),
 * AUTOPAR_ERR_UNSUPPORTED (op/precision the backend lacks: names the op, tensor and backend),
 * AUTOPAR_ERR_NOMEM / AUTOPAR_ERR_BACKEND (allocation or upload failed: names the tensor). */
AP_INTERNAL ap_status ap_graph_runner_new(const autopar_graph *g, ap_backend *b, uint64_t seed,
                                          autopar_precision p, ap_graph_runner **out);

/* Frees every buffer (after pending work) and the runner; the backend stays. NULL-safe. */
AP_INTERNAL void ap_graph_runner_free(ap_graph_runner *r);

/* Copies n elements of host data into tensor t, which must be a leaf (input, parameter or
 * optimizer state): float for F32 tensors (converted when the precision is F64), int32_t for
 * I32 tensors; n must equal the element count. Complete on return.
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL, not a tensor of the graph, not a leaf),
 * AUTOPAR_ERR_SHAPE (wrong n), AUTOPAR_ERR_NOMEM, AUTOPAR_ERR_BACKEND. */
AP_INTERNAL ap_status ap_graph_runner_write(ap_graph_runner *r, const autopar_tensor *t,
                                            const void *data, int64_t n);

/* Copies tensor t's current value (any tensor) into host memory: float for F32 (converted from
 * double in F64 precision), int32_t for I32; n as above. Waits for pending work. */
AP_INTERNAL ap_status ap_graph_runner_read(ap_graph_runner *r, const autopar_tensor *t,
                                           void *data, int64_t n);

/* Runs the forward phase; *loss (may be NULL) gets the loss when the graph has one, else 0. */
AP_INTERNAL ap_status ap_graph_runner_forward(ap_graph_runner *r, double *loss);

/* Runs forward and backward (gradients readable afterwards), no update. AUTOPAR_ERR_GRAPH
 * without a backward pass. */
AP_INTERNAL ap_status ap_graph_runner_forward_backward(ap_graph_runner *r, double *loss);

/* One training step: forward, backward, optimizer apply, then every parameter and optimizer
 * state takes its updated value and the step count grows by one. *loss (may be NULL) is the loss
 * before the update. Complete on return. On failure the parameters keep their old values and the
 * step count is unchanged. AUTOPAR_ERR_GRAPH without a backward pass or optimizer. */
AP_INTERNAL ap_status ap_graph_runner_step(ap_graph_runner *r, double *loss);

/* Number of completed optimizer steps (0 for NULL). */
AP_INTERNAL int64_t ap_graph_runner_steps(const ap_graph_runner *r);

/* The backend buffer currently holding tensor `id` (swaps move parameters between buffers, so
 * the answer may change after a step), or NULL when id is out of range. Borrowed. */
AP_INTERNAL const ap_buffer *ap_graph_runner_buffer(const ap_graph_runner *r, int id);

#ifdef __cplusplus
}
#endif

#endif /* AUTOPAR_GRAPH_RUNNER_H */
