/*
 * Backends: the interface through which the runtime allocates tensor memory, moves bytes and runs
 * one kernel per op on one device (DESIGN.md §7). Collectives are not here: they go through the
 * communicator (runtime/comm.h), which for CUDA borrows the backend's context and stream
 * (ap_backend_cuda_ctx).
 *
 * Two implementations sit behind one vtable (ggml-style: a struct of function pointers plus the
 * implementation's private state, optional slots with defaults in the wrappers of backend.c):
 *   - "cpu"  (runtime/cpu/backend_cpu.c, always built): host memory, ap_cpu_run; F32 and F64
 *            precision. Every operation is complete when it returns.
 *   - "cuda" (runtime/cuda/backend_cuda.cu, built when CMake finds CUDA + NCCL, which defines
 *            AUTOPAR_USE_CUDA): device memory of one GPU, ap_cuda_run; F32 precision only.
 *            Kernels, device-to-device copies and fills are *enqueued* on the context's single
 *            stream and run in order; uploads and downloads wait for the stream (so they see
 *            every kernel enqueued before them, and the host memory may be reused on return).
 *
 * Code above this layer never tests AUTOPAR_USE_CUDA: without CUDA the registry answers
 * AUTOPAR_ERR_UNSUPPORTED for a CUDA request and ap_backend_cuda_ctx returns NULL (SQLite-style
 * compile-out, the stubs live in backend.c).
 *
 * Buffers. A buffer is a value (ap_buffer: base address + size) owned by whoever allocated it; the
 * base address is in the backend's address space (a device pointer for CUDA) and is what kernel
 * calls (ap_kernel_call.out / .src) and communicators take. The runtime may point a kernel call
 * or a communicator at base + offset to use part of a buffer (a shard, a slot of an arena); the
 * copy functions below take byte offsets for the same reason and check them against the size.
 *
 * Errors: every wrapper returns an ap_status and records a message naming the tensor or op
 * (`what`, may be NULL) and the backend; AUTOPAR_ERR_INVALID_ARG for NULL arguments and ranges
 * outside a buffer, AUTOPAR_ERR_NOMEM / AUTOPAR_ERR_BACKEND for failed allocations and device
 * calls, AUTOPAR_ERR_UNSUPPORTED for ops or precisions a backend lacks. Nothing exits or aborts.
 * Not thread-safe: one backend is used by one thread at a time.
 */
#ifndef AUTOPAR_BACKEND_H
#define AUTOPAR_BACKEND_H

#ifdef __cplusplus
extern "C" {
#endif

#include "internal.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Which backend to create. AUTO = CUDA when it is compiled in and a device is visible, else CPU.
 * (Private until the public API exposes a backend choice; keep the order if it is mirrored.) */
typedef enum ap_backend_kind {
    AP_BACKEND_AUTO = 0,
    AP_BACKEND_CPU,
    AP_BACKEND_CUDA,
    AP_BACKEND_KIND_COUNT
} ap_backend_kind;

/* "auto", "cpu", "cuda" ("?" when out of range). */
AP_INTERNAL const char *ap_backend_kind_name(ap_backend_kind k);

/* A block of backend memory. { NULL, 0 } is the empty buffer (what a zero-byte allocation and
 * ap_backend_buffer_free give). */
typedef struct ap_buffer {
    void   *data;    /* base address in the backend's address space                           */
    size_t  bytes;   /* usable size                                                             */
} ap_buffer;

typedef struct ap_backend ap_backend;

/* ------------------------------------------------------------------------------------------ */
/* The vtable. Implementations fill every slot not marked (optional). The wrappers below have  */
/* checked the arguments before calling a slot: pointers are non-NULL, ranges lie inside their */
/* buffers and byte counts are > 0 (zero-byte operations never reach the implementation).      */
/* Every slot receives the implementation's state (ap_backend.ctx).                            */
/* ------------------------------------------------------------------------------------------ */
typedef struct ap_backend_i {
    /* Short constant name of this instance, e.g. "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)";
     * valid until the backend is freed. */
    const char *(*name)(void *ctx);
    /* Releases the implementation's state after pending work finished; the wrapper frees the
     * ap_backend struct. */
    void (*free)(void *ctx);
    /* Allocates `bytes` (> 0) of memory, aligned for any element type, contents undefined. */
    ap_status (*buffer_alloc)(void *ctx, size_t bytes, void **out);
    /* Frees memory from buffer_alloc (after any pending work that uses it). */
    void (*buffer_free)(void *ctx, void *data);
    /* Host -> backend and backend -> host copies of `bytes`; complete on return (the host memory
     * may be reused, downloaded data is valid) and ordered after all enqueued work. */
    ap_status (*upload)(void *ctx, void *dst, const void *host_src, size_t bytes);
    ap_status (*download)(void *ctx, void *host_dst, const void *src, size_t bytes);
    /* (optional) backend -> backend copy; the ranges do not overlap. May be enqueued.
     * Default: download into a temporary host block, then upload. */
    ap_status (*copy)(void *ctx, void *dst, const void *src, size_t bytes);
    /* (optional) sets `bytes` bytes to zero. May be enqueued. Default: uploads a zeroed host
     * block. */
    ap_status (*fill_zero)(void *ctx, void *dst, size_t bytes);
    /* Runs (or enqueues) one op on buffers of this backend: call->out and call->src[] are
     * addresses inside this backend's buffers; out must not alias a src. The wrapper has checked
     * that the op is not a leaf; everything else (shapes, dtypes, precision) is the kernel's to
     * check. Errors name call->name. */
    ap_status (*run)(void *ctx, const ap_kernel_call *call);
    /* (optional) whether run() has a kernel for op at precision p. Default: true for every
     * computed op (leaves are never run). */
    bool (*supports_op)(void *ctx, ap_op op, autopar_precision p);
    /* (optional) waits until every enqueued operation finished, and reports errors that devices
     * can only detect asynchronously (e.g. an out-of-range embedding id found by a CUDA kernel:
     * AUTOPAR_ERR_INVALID_ARG naming the op and tensor). Default: AUTOPAR_OK (synchronous). */
    ap_status (*synchronize)(void *ctx);
} ap_backend_i;

/* A backend instance. Fields are filled by the constructor; code above reads them through the
 * functions below. */
struct ap_backend {
    const ap_backend_i *iface;
    void               *ctx;       /* implementation state, owned                           */
    ap_backend_kind     kind;      /* AP_BACKEND_CPU or AP_BACKEND_CUDA, never AUTO          */
    int                 device;    /* device index (0 for the CPU)                           */
};

/* ------------------------------------------------------------------------------------------ */
/* Registry                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Creates a backend. kind AP_BACKEND_AUTO picks CUDA when this build has it and
 * ap_backend_cuda_device_count() > 0 (then on `device`), else the CPU. The CPU backend ignores
 * `device`. Output: *out (free with ap_backend_free), NULL on failure.
 * Errors: AUTOPAR_ERR_INVALID_ARG (out NULL, bad kind, CUDA device index out of range),
 * AUTOPAR_ERR_UNSUPPORTED ("CUDA backend requested but this build has no CUDA support", or
 * "... but no CUDA device is visible"), AUTOPAR_ERR_NOMEM, AUTOPAR_ERR_BACKEND (context
 * creation failed). */
AP_INTERNAL ap_status ap_backend_new(ap_backend_kind kind, int device, ap_backend **out);

/* Frees a backend after its pending work; buffers must have been freed before. NULL-safe. */
AP_INTERNAL void ap_backend_free(ap_backend *b);

/* True when this build contains the CUDA backend (AUTOPAR_USE_CUDA). */
AP_INTERNAL bool ap_backend_cuda_compiled(void);

/* Number of visible CUDA devices; 0 without CUDA support or without a driver. Never fails and
 * leaves autopar_last_error() alone. */
AP_INTERNAL int ap_backend_cuda_device_count(void);
/* Why the last ap_backend_cuda_device_count() returned 0, for messages; "" after it found
 * devices. */
AP_INTERNAL const char *ap_backend_cuda_no_device_reason(void);

/* The implementations' constructors (used by ap_backend_new; the CUDA one exists only in CUDA
 * builds, and backend.c replaces it with a stub otherwise). */
AP_INTERNAL ap_status ap_backend_cpu_new(ap_backend **out);
AP_INTERNAL ap_status ap_backend_cuda_new(int device, ap_backend **out);

/* ------------------------------------------------------------------------------------------ */
/* Queries                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* The instance's name (see ap_backend_i.name); "(null)" for NULL. */
AP_INTERNAL const char *ap_backend_name(const ap_backend *b);
/* AP_BACKEND_CPU or AP_BACKEND_CUDA (AP_BACKEND_AUTO for NULL). */
AP_INTERNAL ap_backend_kind ap_backend_get_kind(const ap_backend *b);
/* Whether ap_backend_run can run op at precision p. False for leaves (INPUT, PARAM, OPT_STATE:
 * the runtime fills them, no kernel exists) and for a NULL backend. */
AP_INTERNAL bool ap_backend_supports_op(const ap_backend *b, ap_op op, autopar_precision p);
/* The CUDA context (device, stream, cuBLAS handle) of a CUDA backend, borrowed: valid until the
 * backend is freed; communicators (ap_comm_nccl_new) enqueue on its stream so that collectives
 * and kernels are ordered. NULL for other backends and in builds without CUDA. */
struct ap_cuda_ctx;
AP_INTERNAL struct ap_cuda_ctx *ap_backend_cuda_ctx(const ap_backend *b);

/* ------------------------------------------------------------------------------------------ */
/* Memory and copies                                                                           */
/* ------------------------------------------------------------------------------------------ */

/* Allocates a buffer of `bytes` bytes (contents undefined; 0 bytes gives the empty buffer).
 * `what` names the tensor for the error message. Errors: AUTOPAR_ERR_INVALID_ARG,
 * AUTOPAR_ERR_NOMEM (CPU), AUTOPAR_ERR_BACKEND (device out of memory: the message gives the
 * size and the tensor). On failure *out is the empty buffer. */
AP_INTERNAL ap_status ap_backend_buffer_alloc(ap_backend *b, size_t bytes, const char *what,
                                              ap_buffer *out);

/* Frees a buffer and resets it to the empty buffer. NULL-safe (b or buf), empty-safe. */
AP_INTERNAL void ap_backend_buffer_free(ap_backend *b, ap_buffer *buf);

/* Copies `bytes` bytes from host memory into dst at byte offset dst_off. Complete on return. */
AP_INTERNAL ap_status ap_backend_upload(ap_backend *b, const ap_buffer *dst, size_t dst_off,
                                        const void *host_src, size_t bytes, const char *what);

/* Copies `bytes` bytes of src from byte offset src_off into host memory, after every operation
 * enqueued before. Complete on return. Does not report asynchronous device errors (use
 * ap_backend_synchronize for that). */
AP_INTERNAL ap_status ap_backend_download(ap_backend *b, void *host_dst, const ap_buffer *src,
                                          size_t src_off, size_t bytes, const char *what);

/* Copies `bytes` bytes from src + src_off to dst + dst_off (both buffers of b; the two ranges
 * must not overlap). Ordered after earlier operations; may be enqueued. */
AP_INTERNAL ap_status ap_backend_copy(ap_backend *b, const ap_buffer *dst, size_t dst_off,
                                      const ap_buffer *src, size_t src_off, size_t bytes,
                                      const char *what);

/* Zeroes `bytes` bytes of dst from byte offset off (all-zero bits: 0.0f, 0.0, 0). May be
 * enqueued. */
AP_INTERNAL ap_status ap_backend_fill_zero(ap_backend *b, const ap_buffer *dst, size_t off,
                                           size_t bytes, const char *what);

/* ------------------------------------------------------------------------------------------ */
/* Kernels and synchronisation                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Runs (CPU) or enqueues (CUDA) one op; the call's out/src are addresses inside b's buffers.
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL, a leaf op, an op out of range),
 * AUTOPAR_ERR_UNSUPPORTED (supports_op says no: the message names the op, the tensor, the
 * precision and the backend), and whatever the kernel reports. */
AP_INTERNAL ap_status ap_backend_run(ap_backend *b, const ap_kernel_call *call);

/* Waits for all enqueued work and reports deferred device errors (see ap_backend_i). */
AP_INTERNAL ap_status ap_backend_synchronize(ap_backend *b);

#ifdef __cplusplus
}
#endif

#endif /* AUTOPAR_BACKEND_H */
