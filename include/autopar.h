/*
 * libautopar: automatic data, operator and pipeline parallelism for C training programs.
 *
 * The whole public API lives in this header. Layers, top to bottom:
 *   1. status codes and the last-error message
 *   2. graph building (inputs, parameters, ops), pipeline boundaries
 *   3. training-graph construction: autodiff and optimizer updates
 *   4. graph serialisation (JSON)
 *   5. the single-process reference executor
 *   6. cluster descriptions
 *
 * Conventions (every function follows them):
 * - Fallible functions return autopar_status; AUTOPAR_OK is 0. Results are written through a
 *   pointer-to-pointer out argument, which is set to NULL on failure.
 * - On failure a message naming the op, tensor, shape or field at fault is stored for the calling
 *   thread and returned by autopar_last_error(). Nothing is printed.
 * - Op builders return a tensor handle, or NULL on error. The first error is sticky on the graph:
 *   once a builder fails, later builders return NULL too (NULL operands propagate), so model code
 *   may build a whole model and check autopar_graph_status() once.
 * - Tensor handles belong to their graph and are never freed alone. Every *_free accepts NULL.
 * - The library never calls exit() or abort() on user input.
 */
#ifndef AUTOPAR_H
#define AUTOPAR_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define AUTOPAR_API __attribute__((visibility("default")))
#else
#define AUTOPAR_API
#endif

/* ------------------------------------------------------------------------------------------ */
/* 1. Status codes and errors                                                                  */
/* ------------------------------------------------------------------------------------------ */

typedef enum autopar_status {
    AUTOPAR_OK = 0,
    AUTOPAR_ERR_INVALID_ARG,  /* NULL handle, bad enum value, out-of-range axis, bad option     */
    AUTOPAR_ERR_SHAPE,        /* operand shapes do not fit the op                                */
    AUTOPAR_ERR_DTYPE,        /* operand dtype not accepted by the op                            */
    AUTOPAR_ERR_NOMEM,        /* host allocation failed                                          */
    AUTOPAR_ERR_PARSE,        /* malformed JSON or a JSON document missing a required field      */
    AUTOPAR_ERR_UNKNOWN_OP,   /* an op name (in JSON) that this library does not know            */
    AUTOPAR_ERR_GRAPH,        /* graph-level error: not topological, no loss, missing gradient   */
    AUTOPAR_ERR_INFEASIBLE,   /* no plan fits the memory limit (message names the budget needed) */
    AUTOPAR_ERR_IO,           /* a file could not be opened, read or written                     */
    AUTOPAR_ERR_MPI,          /* an MPI call failed or ranks disagree                            */
    AUTOPAR_ERR_BACKEND,      /* a BLAS / CUDA / NCCL / GLPK call failed                         */
    AUTOPAR_ERR_UNSUPPORTED,  /* feature not compiled in, or op not supported by a backend       */
    AUTOPAR_ERR_NOT_FOUND,    /* no tensor/preset with that name                                 */
    AUTOPAR_STATUS_COUNT
} autopar_status;

/* A short constant description of a status ("shape mismatch", ...). Never NULL. */
AUTOPAR_API const char *autopar_status_str(autopar_status s);

/* The message of the last failure on the calling thread ("" when none). The text stays valid
 * until the next failing call on this thread. */
AUTOPAR_API const char *autopar_last_error(void);

/* Clears the calling thread's last-error message. */
AUTOPAR_API void autopar_clear_error(void);

/* ------------------------------------------------------------------------------------------ */
/* 2. Graph building                                                                           */
/* ------------------------------------------------------------------------------------------ */

/* Maximum tensor rank. Builders given more dims fail with AUTOPAR_ERR_SHAPE. */
#define AUTOPAR_MAX_DIMS 4
/* Maximum number of operands of one op (concat takes at most this many inputs). */
#define AUTOPAR_MAX_SRC 8
/* Maximum length of a tensor name, including the terminating NUL. Longer names are an error. */
#define AUTOPAR_MAX_NAME 64

typedef struct autopar_graph  autopar_graph;
typedef struct autopar_tensor autopar_tensor;

typedef enum autopar_dtype {
    AUTOPAR_F32 = 0,  /* float; all differentiable values                                     */
    AUTOPAR_I32 = 1,  /* int32_t; token ids and class labels only (embedding, cross-entropy)   */
    AUTOPAR_DTYPE_COUNT
} autopar_dtype;

/* How a parameter is initialised from the executor's seed (see autopar_executor_new). The value
 * of every element depends only on (seed, parameter name, element index), so any rank can
 * initialise any shard of a parameter and get the same numbers as a single-device run. */
typedef enum autopar_init {
    AUTOPAR_INIT_ZEROS = 0,
    AUTOPAR_INIT_ONES,
    AUTOPAR_INIT_NORMAL,   /* N(0, scale^2); scale 0 means 1/sqrt(fan_in), fan_in = shape[0]     */
    AUTOPAR_INIT_UNIFORM,  /* U(-scale, scale); scale 0 means 1/sqrt(fan_in)                     */
    AUTOPAR_INIT_COUNT
} autopar_init;

/* What a tensor is, for memory accounting and the passes. */
typedef enum autopar_kind {
    AUTOPAR_KIND_INPUT = 0,   /* fed by the user each step (a batch)                         */
    AUTOPAR_KIND_PARAM,       /* trainable parameter                                          */
    AUTOPAR_KIND_CONSTANT,    /* a constant fill (e.g. the seed gradient of the loss)         */
    AUTOPAR_KIND_ACTIVATION,  /* forward intermediate                                         */
    AUTOPAR_KIND_GRADIENT,    /* backward intermediate or a parameter's gradient              */
    AUTOPAR_KIND_OPT_STATE,   /* optimizer state (momentum, Adam moments)                     */
    AUTOPAR_KIND_UPDATE,      /* new value of a parameter or optimizer state                  */
    AUTOPAR_KIND_COUNT
} autopar_kind;

/* Which part of a training step a node belongs to. */
typedef enum autopar_phase {
    AUTOPAR_PHASE_FORWARD = 0,
    AUTOPAR_PHASE_BACKWARD,
    AUTOPAR_PHASE_APPLY,
    AUTOPAR_PHASE_COUNT
} autopar_phase;

/* Creates an empty graph. Errors: AUTOPAR_ERR_INVALID_ARG (out NULL), AUTOPAR_ERR_NOMEM. */
AUTOPAR_API autopar_status autopar_graph_new(autopar_graph **out);

/* Frees a graph and every tensor handle in it. NULL-safe. */
AUTOPAR_API void autopar_graph_free(autopar_graph *g);

/* The graph's sticky status: AUTOPAR_OK, or the status of the first failed builder call. */
AUTOPAR_API autopar_status autopar_graph_status(const autopar_graph *g);

/* The message of the graph's first error ("" when none). Valid until the graph is freed. */
AUTOPAR_API const char *autopar_graph_error(const autopar_graph *g);

/* Records an error of the caller's own (e.g. a model builder's invalid configuration) as the
 * graph's sticky error, unless one is already set, and as the last error. Returns the graph's
 * status afterwards (AUTOPAR_ERR_INVALID_ARG when g is NULL). `status` must not be AUTOPAR_OK. */
AUTOPAR_API autopar_status autopar_graph_fail(autopar_graph *g, autopar_status status,
                                              const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* A per-step input (a batch). batch_dim is the dimension that indexes samples (the passes may
 * split it for data parallelism), or -1 when the input has none. Names must be unique. */
AUTOPAR_API autopar_tensor *autopar_input(autopar_graph *g, const char *name, autopar_dtype dtype,
                                          int ndim, const int64_t *shape, int batch_dim);

/* A trainable F32 parameter initialised as `init` says (scale: see autopar_init). */
AUTOPAR_API autopar_tensor *autopar_param(autopar_graph *g, const char *name, int ndim,
                                          const int64_t *shape, autopar_init init, float scale);

/* Matrix product. Each operand is viewed as a matrix by flattening all dims but the last into
 * rows, then optionally transposed: C = op(A) · op(B). When A is not transposed the result keeps
 * A's leading dims, otherwise it is 2-D. The usual dense layer is autopar_matmul(x[..., k], w[k, n]). */
AUTOPAR_API autopar_tensor *autopar_matmul(autopar_graph *g, autopar_tensor *a, autopar_tensor *b);
AUTOPAR_API autopar_tensor *autopar_matmul_ex(autopar_graph *g, autopar_tensor *a,
                                              autopar_tensor *b, int trans_a, int trans_b);

/* Batched matrix product over the last two dims; the leading (batch) dims of a and b must be
 * equal (rank 3 or 4). trans_a / trans_b transpose the last two dims of the operand. */
AUTOPAR_API autopar_tensor *autopar_batch_matmul(autopar_graph *g, autopar_tensor *a,
                                                 autopar_tensor *b, int trans_a, int trans_b);

/* Elementwise a+b, a-b, a*b. b has a's shape, or a suffix of it (a bias broadcast over a's
 * leading dims, e.g. a[B,T,C] + b[C] or a[B,T,C] + b[T,C]). The result has a's shape. */
AUTOPAR_API autopar_tensor *autopar_add(autopar_graph *g, autopar_tensor *a, autopar_tensor *b);
AUTOPAR_API autopar_tensor *autopar_sub(autopar_graph *g, autopar_tensor *a, autopar_tensor *b);
AUTOPAR_API autopar_tensor *autopar_mul(autopar_graph *g, autopar_tensor *a, autopar_tensor *b);

/* x * s. */
AUTOPAR_API autopar_tensor *autopar_scale(autopar_graph *g, autopar_tensor *x, float s);

/* max(x, 0). */
AUTOPAR_API autopar_tensor *autopar_relu(autopar_graph *g, autopar_tensor *x);

/* GELU, tanh form: 0.5·x·(1 + tanh(sqrt(2/pi)·(x + 0.044715·x^3))). */
AUTOPAR_API autopar_tensor *autopar_gelu(autopar_graph *g, autopar_tensor *x);

/* Layer normalisation over the last dim: (x - mean) / sqrt(var + eps) * gain + bias, with gain
 * and bias of shape [last dim]. */
AUTOPAR_API autopar_tensor *autopar_layernorm(autopar_graph *g, autopar_tensor *x,
                                              autopar_tensor *gain, autopar_tensor *bias,
                                              float eps);

/* Softmax over the last dim. With causal != 0 the input needs rank >= 2 and square last two dims
 * [.., T, T]; entry (i, j) with j > i is masked out (probability 0). */
AUTOPAR_API autopar_tensor *autopar_softmax(autopar_graph *g, autopar_tensor *x, int causal);

/* Same data, new shape (element counts must match). */
AUTOPAR_API autopar_tensor *autopar_reshape(autopar_graph *g, autopar_tensor *x, int ndim,
                                            const int64_t *shape);

/* Dimension permutation: result dim i is x's dim perm[i]. */
AUTOPAR_API autopar_tensor *autopar_permute(autopar_graph *g, autopar_tensor *x, const int *perm);

/* Swaps the last two dims. */
AUTOPAR_API autopar_tensor *autopar_transpose(autopar_graph *g, autopar_tensor *x);

/* The part [start, start+len) of x along axis. */
AUTOPAR_API autopar_tensor *autopar_slice(autopar_graph *g, autopar_tensor *x, int axis,
                                          int64_t start, int64_t len);

/* Splits x along axis into n equal parts written to out[0..n-1] (the axis length must be
 * divisible by n). On error every out[i] is NULL and the graph's sticky status is set. */
AUTOPAR_API autopar_status autopar_split(autopar_graph *g, autopar_tensor *x, int axis, int n,
                                         autopar_tensor **out);

/* Concatenation of n (1..AUTOPAR_MAX_SRC) tensors along axis; other dims must agree. */
AUTOPAR_API autopar_tensor *autopar_concat(autopar_graph *g, int n, autopar_tensor *const *xs,
                                           int axis);

/* Embedding lookup: table[V, C] (F32) indexed by ids (I32, any shape S) gives S + [C]. Ids
 * outside [0, V) are an execution error naming the tensor. */
AUTOPAR_API autopar_tensor *autopar_embedding(autopar_graph *g, autopar_tensor *table,
                                              autopar_tensor *ids);

/* Sum / mean over one axis (negative counts from the end; the axis is removed), or over all
 * elements (a scalar, rank 0). */
AUTOPAR_API autopar_tensor *autopar_sum(autopar_graph *g, autopar_tensor *x, int axis);
AUTOPAR_API autopar_tensor *autopar_mean(autopar_graph *g, autopar_tensor *x, int axis);
AUTOPAR_API autopar_tensor *autopar_sum_all(autopar_graph *g, autopar_tensor *x);
AUTOPAR_API autopar_tensor *autopar_mean_all(autopar_graph *g, autopar_tensor *x);

/* Mean squared error mean((pred - target)^2), a scalar. Shapes must be equal. */
AUTOPAR_API autopar_tensor *autopar_mse_loss(autopar_graph *g, autopar_tensor *pred,
                                             autopar_tensor *target);

/* Softmax cross-entropy averaged over all positions: logits[..., V] (F32) and integer labels
 * with logits' leading dims (I32). A scalar. */
AUTOPAR_API autopar_tensor *autopar_cross_entropy(autopar_graph *g, autopar_tensor *logits,
                                                  autopar_tensor *labels);

/* Ends the current pipeline layer: ops built after this call belong to the next layer. Layers
 * are numbered from 0. The inter-operator pass may use these as manual layer boundaries. */
AUTOPAR_API autopar_status autopar_mark_pipeline_boundary(autopar_graph *g);

/* Tensor inspection. Accessors on a NULL tensor return 0 / NULL / -1. */
AUTOPAR_API const char   *autopar_tensor_name(const autopar_tensor *t);
AUTOPAR_API int           autopar_tensor_ndim(const autopar_tensor *t);
AUTOPAR_API int64_t       autopar_tensor_dim(const autopar_tensor *t, int i);
AUTOPAR_API int64_t       autopar_tensor_numel(const autopar_tensor *t);
AUTOPAR_API autopar_dtype autopar_tensor_dtype(const autopar_tensor *t);
AUTOPAR_API autopar_kind  autopar_tensor_kind(const autopar_tensor *t);
AUTOPAR_API autopar_phase autopar_tensor_phase(const autopar_tensor *t);
AUTOPAR_API int           autopar_tensor_layer(const autopar_tensor *t);

/* Number of tensors (nodes) in the graph, and the i-th in topological order. */
AUTOPAR_API int             autopar_graph_size(const autopar_graph *g);
AUTOPAR_API autopar_tensor *autopar_graph_tensor(const autopar_graph *g, int i);

/* The tensor with this name, or NULL (AUTOPAR_ERR_NOT_FOUND recorded as last error). */
AUTOPAR_API autopar_tensor *autopar_graph_find(const autopar_graph *g, const char *name);

/* Checks the graph's invariants (topological order, every shape re-inferred from its operands,
 * dtypes, unique names, gradient links). Returns the first violation with a message. */
AUTOPAR_API autopar_status autopar_graph_validate(const autopar_graph *g);

/* Prints one line per tensor: id, name, op, operands, shape, kind, phase, layer. */
AUTOPAR_API void autopar_graph_print(const autopar_graph *g, FILE *f);

/* ------------------------------------------------------------------------------------------ */
/* 3. Training graph: autodiff and optimizer                                                   */
/* ------------------------------------------------------------------------------------------ */

/* Appends the backward pass of the scalar `loss` to g: for every parameter (and every
 * differentiable tensor on a path from a parameter to the loss) a gradient tensor, with
 * contributions from several consumers summed. Can be called once per graph.
 * Errors: AUTOPAR_ERR_SHAPE (loss not a scalar), AUTOPAR_ERR_GRAPH (already done, or no
 * parameter reaches the loss), the graph's sticky status if it is set. */
AUTOPAR_API autopar_status autopar_backward(autopar_graph *g, autopar_tensor *loss);

/* The gradient of t (after autopar_backward), or NULL when t gets none. */
AUTOPAR_API autopar_tensor *autopar_grad(const autopar_graph *g, const autopar_tensor *t);

/* The loss given to autopar_backward, or NULL. */
AUTOPAR_API autopar_tensor *autopar_graph_loss(const autopar_graph *g);

typedef enum autopar_optimizer_kind {
    AUTOPAR_OPT_SGD = 0,     /* p -= lr·(g + wd·p)                                             */
    AUTOPAR_OPT_MOMENTUM,    /* v = mu·v + g;  p -= lr·(v + wd·p)                              */
    AUTOPAR_OPT_ADAMW,       /* Adam with bias correction and decoupled weight decay:         */
                             /*   m = b1·m + (1-b1)·g,  v = b2·v + (1-b2)·g²                   */
                             /*   p -= lr·( (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps) + wd·p )   */
    AUTOPAR_OPT_COUNT
} autopar_optimizer_kind;

typedef struct autopar_optimizer {
    autopar_optimizer_kind kind;
    float lr;
    float momentum;       /* MOMENTUM only                                   */
    float beta1, beta2;   /* ADAMW only                                      */
    float eps;            /* ADAMW only                                      */
    float weight_decay;
} autopar_optimizer;

/* Fills o with defaults: AdamW, lr 1e-3, beta1 0.9, beta2 0.999, eps 1e-8, wd 0, momentum 0.9. */
AUTOPAR_API void autopar_optimizer_default(autopar_optimizer *o);

/* Appends the optimizer update of every parameter (phase APPLY) and its state tensors (kind
 * OPT_STATE, zero-initialised). Each update tensor is tied to the parameter or state it
 * replaces at the end of a step. Requires autopar_backward first (AUTOPAR_ERR_GRAPH). */
AUTOPAR_API autopar_status autopar_apply_optimizer(autopar_graph *g, const autopar_optimizer *o);

/* Both of the above: backward of loss, then the optimizer's updates. */
AUTOPAR_API autopar_status autopar_build_training(autopar_graph *g, autopar_tensor *loss,
                                                  const autopar_optimizer *o);

/* ------------------------------------------------------------------------------------------ */
/* 4. Serialisation                                                                            */
/* ------------------------------------------------------------------------------------------ */

/* Writes the graph as JSON text (malloc'ed, NUL-terminated; free with free()). */
AUTOPAR_API autopar_status autopar_graph_to_json(const autopar_graph *g, char **out);

/* Reads a graph from JSON text. Every node is rebuilt through the same checks as the builders,
 * so a document with an unknown op (AUTOPAR_ERR_UNKNOWN_OP), a stored shape that differs from
 * the inferred one (AUTOPAR_ERR_SHAPE), a wrong dtype (AUTOPAR_ERR_DTYPE) or malformed JSON
 * (AUTOPAR_ERR_PARSE) is rejected with a message naming the node. */
AUTOPAR_API autopar_status autopar_graph_from_json(const char *json, autopar_graph **out);

/* File forms of the two functions above (AUTOPAR_ERR_IO when the file cannot be used; load's
 * parse errors start with "plan file '<path>'"). */
AUTOPAR_API autopar_status autopar_graph_save(const autopar_graph *g, const char *path);
AUTOPAR_API autopar_status autopar_graph_load(const char *path, autopar_graph **out);

/* ------------------------------------------------------------------------------------------ */
/* 5. Single-process reference executor (CPU)                                                  */
/* ------------------------------------------------------------------------------------------ */

typedef struct autopar_executor autopar_executor;

/* Arithmetic used for F32 tensors. F64 runs every kernel in double precision (the reference
 * for gradient checks); the public read/write functions still take float / double as named. */
typedef enum autopar_precision {
    AUTOPAR_PRECISION_F32 = 0,
    AUTOPAR_PRECISION_F64,
    AUTOPAR_PRECISION_COUNT
} autopar_precision;

/* Allocates every tensor of g and initialises parameters from seed (see autopar_init) and
 * optimizer state to zero. The executor keeps a pointer to g, which must outlive it and must
 * not be modified. Errors: AUTOPAR_ERR_INVALID_ARG, AUTOPAR_ERR_GRAPH (sticky graph error),
 * AUTOPAR_ERR_NOMEM. */
AUTOPAR_API autopar_status autopar_executor_new(const autopar_graph *g, uint64_t seed,
                                                autopar_precision precision,
                                                autopar_executor **out);
AUTOPAR_API void autopar_executor_free(autopar_executor *ex);

/* Copies n elements into tensor t (an input, parameter or optimizer state): float for F32
 * tensors, int32_t for I32 tensors. n must equal the tensor's element count. */
AUTOPAR_API autopar_status autopar_executor_write(autopar_executor *ex, const autopar_tensor *t,
                                                  const void *data, int64_t n);

/* Copies tensor t's current value out (float for F32, int32_t for I32); n as above. */
AUTOPAR_API autopar_status autopar_executor_read(const autopar_executor *ex,
                                                 const autopar_tensor *t, void *data, int64_t n);

/* Double-precision forms for F32 tensors (exact in F64 precision; rounded in F32). */
AUTOPAR_API autopar_status autopar_executor_write_f64(autopar_executor *ex,
                                                      const autopar_tensor *t,
                                                      const double *data, int64_t n);
AUTOPAR_API autopar_status autopar_executor_read_f64(const autopar_executor *ex,
                                                     const autopar_tensor *t, double *data,
                                                     int64_t n);

/* Runs the forward phase only; *loss (may be NULL) receives the graph's loss when it has one. */
AUTOPAR_API autopar_status autopar_executor_forward(autopar_executor *ex, double *loss);

/* Runs forward and backward (gradients readable afterwards), no update. */
AUTOPAR_API autopar_status autopar_executor_forward_backward(autopar_executor *ex, double *loss);

/* One training step: forward, backward, optimizer apply, then every parameter and optimizer
 * state takes its updated value. *loss is the loss before the update. */
AUTOPAR_API autopar_status autopar_executor_step(autopar_executor *ex, double *loss);

/* Number of completed optimizer steps. */
AUTOPAR_API int64_t autopar_executor_steps(const autopar_executor *ex);

/* ------------------------------------------------------------------------------------------ */
/* 6. Cluster description                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct autopar_cluster autopar_cluster;

/* Reads a cluster from a JSON document (schema in docs/cluster.md). Errors: AUTOPAR_ERR_PARSE
 * for malformed JSON or a missing field, AUTOPAR_ERR_INVALID_ARG for a bad value (negative
 * bandwidth, zero devices, ...), each naming the field. */
AUTOPAR_API autopar_status autopar_cluster_from_json(const char *json, autopar_cluster **out);

/* Reads a cluster JSON file (AUTOPAR_ERR_IO when it cannot be read). */
AUTOPAR_API autopar_status autopar_cluster_load(const char *path, autopar_cluster **out);

/* A named preset: "p3.16xlarge" (hosts x 8 V100 16 GB, NVLink, 25 Gb/s), "dgx-h100"
 * (hosts x 8 H100 80 GB, NVLink4, 8x400 Gb/s IB), "cpu" (hosts x devices MPI ranks on CPU
 * cores). AUTOPAR_ERR_NOT_FOUND for an unknown name (the message lists the known ones). */
AUTOPAR_API autopar_status autopar_cluster_preset(const char *name, int hosts,
                                                  int devices_per_host, autopar_cluster **out);

/* The cluster as JSON text (malloc'ed; free with free()); autopar_cluster_from_json reads it
 * back to an identical cluster. */
AUTOPAR_API autopar_status autopar_cluster_to_json(const autopar_cluster *c, char **out);

AUTOPAR_API int  autopar_cluster_hosts(const autopar_cluster *c);
AUTOPAR_API int  autopar_cluster_devices_per_host(const autopar_cluster *c);
AUTOPAR_API void autopar_cluster_print(const autopar_cluster *c, FILE *f);
AUTOPAR_API void autopar_cluster_free(autopar_cluster *c);

/* ------------------------------------------------------------------------------------------ */
/* 7. Parallelisation: options, plans                                                          */
/* ------------------------------------------------------------------------------------------ */

/*
 * autopar_parallelize turns a training graph into a plan for a cluster: pipeline stages (each a
 * contiguous range of layers), a submesh of the cluster and a logical 2-D mesh per stage, and the
 * sharding of every tensor of a stage on its mesh (Alpa's inter- and intra-operator passes; the
 * method is described in docs/inter-op.md).
 *
 * Micro-batches. The graph is built at the MICRO-BATCH size: its inputs' batch dims are the
 * number of samples one micro-batch carries. A training step runs num_micro_batches (B)
 * micro-batches through the pipeline, accumulates their gradients and applies the optimizer
 * once, so the global batch of a step is B x the graph's batch size, and the loss the optimizer
 * sees is the mean over the B micro-batches' (mean) losses. To plan for a global batch G with B
 * micro-batches, build the graph with batch G / B.
 *
 * Plans are plain data. A plan owns a copy of the training graph (with the layer of every node
 * set by the layer pass) and of the cluster, so it can be saved, inspected and loaded elsewhere
 * (e.g. computed on a laptop for a cluster, then loaded on the cluster); node ids in a plan are
 * the ids of the graph given to autopar_parallelize, which the copy keeps.
 */

typedef struct autopar_plan autopar_plan;

/* What kind of plan to make. */
typedef enum autopar_method {
    /* Pipeline stages x submeshes x shardings, chosen as stage_option says (Alpa's
     * PipeshardParallel). The default. */
    AUTOPAR_METHOD_PIPESHARD = 0,
    /* One stage on the whole cluster; the intra-operator pass picks the sharding on the best
     * logical mesh of the cluster (Alpa's ShardParallel). */
    AUTOPAR_METHOD_SHARD,
    /* One stage on the whole cluster viewed as an (N*M) x 1 mesh, the batch dim of every input
     * split over all devices, gradients all-reduced (classic data parallelism). */
    AUTOPAR_METHOD_DATA_PARALLEL,
    /* As DATA_PARALLEL, but gradients may be reduce-scattered and the optimizer update and its
     * state sharded (ZeRO stage 2) wherever the cost model finds that cheaper. */
    AUTOPAR_METHOD_ZERO2,
    AUTOPAR_METHOD_COUNT
} autopar_method;

/* How AUTOPAR_METHOD_PIPESHARD forms stages. */
typedef enum autopar_stage_option {
    /* The stage DP chooses the layer ranges, the submeshes and the logical meshes that minimise
     * the estimated step time within the memory budget. */
    AUTOPAR_STAGE_AUTO = 0,
    /* uniform_num_stages stages of (nearly) equal layer counts on equal submeshes, all with the
     * same logical mesh (the cheapest one that fits); uniform_num_stages = 0 tries every stage
     * count whose equal submeshes tile the cluster and keeps the cheapest. */
    AUTOPAR_STAGE_UNIFORM,
    /* Exactly the stages of manual_stages. */
    AUTOPAR_STAGE_MANUAL,
    AUTOPAR_STAGE_OPTION_COUNT
} autopar_stage_option;

/* Pipeline schedule. Both run B forwards and B backwards per stage and one optimizer apply;
 * they differ in memory: under GPipe every stage holds the activations of all B micro-batches,
 * under 1F1B stage s of S holds those of min(S - s, B). */
typedef enum autopar_schedule {
    AUTOPAR_SCHEDULE_GPIPE = 0,
    AUTOPAR_SCHEDULE_1F1B = 1,
    AUTOPAR_SCHEDULE_COUNT
} autopar_schedule;

/* Which whole-host submesh shapes (h hosts x all their devices) the stage DP may use besides the
 * (1, 2^k) shapes inside a host (Alpa's submesh_physical_shape_space). */
typedef enum autopar_submesh_space {
    AUTOPAR_SUBMESH_POWER_OF_TWO = 0,    /* h a power of two (the default)                    */
    AUTOPAR_SUBMESH_ALL,                 /* every h                                            */
    AUTOPAR_SUBMESH_SMALL_POWER_OF_TWO,  /* h a power of two <= 4                              */
    AUTOPAR_SUBMESH_SPACE_COUNT
} autopar_submesh_space;

/* Which peak rate of the cluster's devices compute costs use. Memory is counted at 4 bytes per
 * element either way. */
typedef enum autopar_flop_rate {
    AUTOPAR_FLOPS_F32 = 0,   /* dense fp32 peak (what the CPU and CUDA backends run)          */
    AUTOPAR_FLOPS_F16,       /* bf16/fp16 tensor-core peak (mixed-precision what-if planning) */
    AUTOPAR_FLOPS_COUNT
} autopar_flop_rate;

/* One stage of AUTOPAR_STAGE_MANUAL (Alpa's ManualStageOption). Layers are the layers of the
 * layer pass (see num_layers); the stages must cover layers 0..L-1 in order without gaps or
 * overlaps, and their submeshes must tile the cluster. */
typedef struct autopar_manual_stage {
    int first_layer, last_layer;  /* inclusive                                                */
    /* Physical submesh: submesh_hosts hosts x submesh_devices devices on each. Either (1, w)
     * with w a power of two dividing the devices per host (M), or (h, M). */
    int submesh_hosts, submesh_devices;
    /* Logical mesh mesh_dp x mesh_mp over the submesh's devices (host-major order; the mp axis
     * is the minor one). mesh_dp * mesh_mp must equal the submesh size. 0, 0: the pass picks
     * the cheapest logical mesh of the automatic search space for this stage. */
    int mesh_dp, mesh_mp;
    /* 1: the batch dim of every input is split over mesh axis 0 (data parallel over dp, the ILP
     * then decides how to use the mp axis); 0: the ILP is free; -1: as
     * autopar_options.force_batch_dim_to_axis0. Ignored when mesh_dp = mesh_mp = 0. */
    int force_batch_dim_to_axis0;
} autopar_manual_stage;

typedef struct autopar_options {
    autopar_method method;            /* default AUTOPAR_METHOD_PIPESHARD                        */
    /* B >= 1: micro-batches per step (see "Micro-batches" above). Default 1. */
    int num_micro_batches;
    /* Number of layers L the layer pass makes (AUTOPAR_METHOD_PIPESHARD only; the other
     * methods use one layer). > 0: automatic clustering of the forward ops into that many
     * layers (Alpa's AutoLayerOption). 0 (default): the graph's own boundaries
     * (autopar_mark_pipeline_boundary) when it has any, else automatic clustering into
     * min(16, devices in the cluster, matmuls in the forward graph / 6) layers (about one
     * transformer block per layer at most), fewer if the clustering admits fewer. */
    int num_layers;
    /* FLOP-balance tolerance of automatic clustering: no layer above (1 + eps) x the average
     * (Alpa's eps). Default 0.5. */
    double layer_eps;
    autopar_stage_option stage_option;           /* default AUTOPAR_STAGE_AUTO               */
    int uniform_num_stages;                      /* AUTOPAR_STAGE_UNIFORM only (0 = best)     */
    int num_manual_stages;                       /* AUTOPAR_STAGE_MANUAL only                 */
    const autopar_manual_stage *manual_stages;   /* not owned; read during the call only      */
    autopar_schedule schedule;                   /* default AUTOPAR_SCHEDULE_1F1B             */
    autopar_submesh_space submesh_space;         /* default AUTOPAR_SUBMESH_POWER_OF_TWO      */
    /* Memory per device available to a stage, bytes: > 0 that figure, 0 (default) the
     * cluster's device memory, < 0 no limit. */
    double memory_budget;
    /* 1 (default): the logical meshes searched for a submesh of n devices are Alpa's
     * "single_node_model_parallel" space: (n/mp) x mp for every mp dividing n with
     * mp <= devices per host, each with the batch dim forced onto axis 0, plus one n x 1 mesh
     * where the ILP is free. 0: the same shapes, the ILP free on all of them. */
    int force_batch_dim_to_axis0;
    /* 1: gradients may be reduce-scattered and optimizer state sharded (ZeRO-2 style) where
     * that is cheaper (Alpa's prefer_reduce_scatter). Default 1. */
    int prefer_reduce_scatter;
    autopar_flop_rate flop_rate;                 /* default AUTOPAR_FLOPS_F32                 */
    /* Wall-clock limit of one ILP solve, seconds (> 0; default 10). A solve that runs out
     * keeps the best sharding found so far. */
    double ilp_time_limit;
    /* 1: progress and per-pass timings on stderr (also when the environment variable
     * AUTOPAR_VERBOSE=1). Default 0. */
    int verbose;
} autopar_options;

/* Fills o with the defaults given above. NULL-safe. */
AUTOPAR_API void autopar_options_default(autopar_options *o);

/* Computes a plan for training graph g on cluster c.
 * Inputs: g must be a training graph (autopar_build_training, or autopar_backward and
 * autopar_apply_optimizer, done) without a sticky error; it is not modified and may be freed
 * after the call. c is read only. o may be NULL for the defaults.
 * Output: *out, a new plan owned by the caller (free with autopar_plan_free); NULL on failure.
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL g, c or out; a bad option, naming it; manual stages that
 * overlap, leave a gap, name a layer that does not exist, use an invalid submesh or logical
 * mesh, or whose submeshes do not tile the cluster, each naming the stage), AUTOPAR_ERR_GRAPH
 * (no backward pass or no optimizer: the message says to call autopar_build_training; the
 * graph's sticky error; bad manual layer boundaries), AUTOPAR_ERR_INFEASIBLE (no plan fits the
 * memory budget: the message gives the budget and the smallest per-device budget that would
 * fit; or no sharding is realisable), AUTOPAR_ERR_BACKEND (the ILP solver failed),
 * AUTOPAR_ERR_NOMEM.
 * Progress and per-pass timings go to stderr when o->verbose or AUTOPAR_VERBOSE=1. */
AUTOPAR_API autopar_status autopar_parallelize(const autopar_graph *g, const autopar_cluster *c,
                                               const autopar_options *o, autopar_plan **out);

/* Frees a plan. NULL-safe. */
AUTOPAR_API void autopar_plan_free(autopar_plan *p);

/* Prints a readable summary: one block per stage (layer range, submesh and its devices, logical
 * mesh, estimated forward / backward / send time per micro-batch, gradient sync and apply time
 * per step, memory per device), the estimated step time with its breakdown (compute,
 * communication, gradient sync, optimizer apply, pipeline bubble) and the planning time per
 * pass. NULL-safe (prints nothing). */
AUTOPAR_API void autopar_plan_print(const autopar_plan *p, FILE *f);

/* The plan as JSON text (malloc'ed; free with free()). The document holds the graph, the
 * cluster, every stage (layers, submesh, placement, logical mesh, device ids, node ids, the
 * intra-operator plan of the stage, estimates) and the tensors that cross stages; format in
 * docs/inter-op.md. autopar_plan_from_json reads it back to a plan whose JSON is byte for byte
 * the same. Errors: AUTOPAR_ERR_INVALID_ARG (NULL), AUTOPAR_ERR_NOMEM. */
AUTOPAR_API autopar_status autopar_plan_to_json(const autopar_plan *p, char **out);

/* Reads a plan written by autopar_plan_to_json. Errors: AUTOPAR_ERR_INVALID_ARG (NULL),
 * AUTOPAR_ERR_PARSE (malformed JSON: the message gives offset, line and column; a missing or
 * wrong field, a stage inconsistent with the graph or cluster it carries: the message names
 * the field), the errors of
 * autopar_graph_from_json and autopar_cluster_from_json for the embedded graph and cluster,
 * AUTOPAR_ERR_NOMEM. */
AUTOPAR_API autopar_status autopar_plan_from_json(const char *json, autopar_plan **out);

/* File forms of the two functions above (AUTOPAR_ERR_IO when the file cannot be used; load's
 * parse errors start with "plan file '<path>'"). */
AUTOPAR_API autopar_status autopar_plan_save(const autopar_plan *p, const char *path);
AUTOPAR_API autopar_status autopar_plan_load(const char *path, autopar_plan **out);

/* Estimated time of one training step (B micro-batches and the optimizer apply) and its split.
 * step_time = compute + communication + grad_sync + apply + bubble: the first four are the
 * busy time of the critical (slowest) stage over the step, bubble is the rest (pipeline fill
 * and drain). See docs/inter-op.md for the model. */
typedef struct autopar_plan_estimate {
    double step_time;        /* seconds per step (the stage DP's objective)                */
    double compute;          /* critical stage: B x compute per micro-batch                */
    double communication;    /* critical stage: B x (intra-stage collectives + resharding  */
                             /* + sending boundary tensors to the neighbouring stage)      */
    double grad_sync;        /* critical stage: gradient synchronisation, once per step    */
    double apply;            /* critical stage: optimizer update, once per step            */
    double bubble;           /* pipeline fill and drain                                    */
    double simulated_step_time;  /* the same stage times run through the schedule's        */
                                 /* event simulation (passes/schedule.h)                   */
    int    critical_stage;
    double planning_seconds;     /* wall time autopar_parallelize took                    */
} autopar_plan_estimate;

/* Per-stage figures. */
typedef struct autopar_stage_info {
    int    first_layer, last_layer;          /* inclusive                                    */
    int    submesh_hosts, submesh_devices;   /* physical submesh (h, w)                      */
    int    host_begin, device_begin;         /* placement: hosts [host_begin, +h), local     */
                                             /* devices [device_begin, +w) on each           */
    int    mesh_shape[2];                    /* logical mesh (dp, mp)                        */
    int    force_batch_dim_to_axis0;         /* 1 or 0                                       */
    int    n_devices, n_nodes;
    double forward_time, backward_time;      /* per micro-batch, seconds                     */
    double send_time;                        /* per micro-batch: boundary tensors sent       */
    double grad_sync_time, apply_time;       /* per step, seconds                            */
    double memory_bytes;                     /* estimated peak per device                    */
    int    micro_batches_in_flight;          /* activations held at the peak                 */
} autopar_stage_info;

/* Plan accessors. Counts return 0 and pointers NULL for a NULL plan or a stage out of range;
 * returned pointers stay valid until the plan is freed. */
AUTOPAR_API int autopar_plan_num_stages(const autopar_plan *p);
AUTOPAR_API int autopar_plan_num_micro_batches(const autopar_plan *p);
AUTOPAR_API int autopar_plan_num_layers(const autopar_plan *p);
AUTOPAR_API autopar_schedule autopar_plan_schedule(const autopar_plan *p);
/* The plan's copy of the training graph (node layers as the layer pass set them) and cluster. */
AUTOPAR_API const autopar_graph *autopar_plan_graph(const autopar_plan *p);
AUTOPAR_API const autopar_cluster *autopar_plan_cluster(const autopar_plan *p);
/* Writes the estimate. Errors: AUTOPAR_ERR_INVALID_ARG (NULL). */
AUTOPAR_API autopar_status autopar_plan_get_estimate(const autopar_plan *p,
                                                     autopar_plan_estimate *out);
/* Writes stage s's figures. Errors: AUTOPAR_ERR_INVALID_ARG (NULL, s out of range). */
AUTOPAR_API autopar_status autopar_plan_stage_info(const autopar_plan *p, int s,
                                                   autopar_stage_info *out);
/* Global device ids of stage s's logical mesh, row-major over (dp, mp); *n gets the count. */
AUTOPAR_API const int *autopar_plan_stage_devices(const autopar_plan *p, int s, int *n);
/* Ids of the graph nodes stage s computes (forward, backward and apply nodes of its layers and
 * the leaves they own), ascending; *n gets the count. */
AUTOPAR_API const int *autopar_plan_stage_nodes(const autopar_plan *p, int s, int *n);
/* Stage s's intra-operator plan (every tensor's sharding spec, every op's strategy, the
 * collectives) as JSON text (malloc'ed; free with free()). Errors: AUTOPAR_ERR_INVALID_ARG,
 * AUTOPAR_ERR_NOMEM. */
AUTOPAR_API autopar_status autopar_plan_stage_sharding_json(const autopar_plan *p, int s,
                                                            char **out);

/* ------------------------------------------------------------------------------------------ */
/* 8. Sessions (distributed execution)                                                         */
/* ------------------------------------------------------------------------------------------ */

/*
 * A session runs a plan on the ranks of an MPI job (mpirun -np N, N = the plan's device count:
 * world rank r is device r of the plan's cluster). Every session function is COLLECTIVE over
 * MPI_COMM_WORLD (every rank calls it, in the same order, with the same arguments unless a
 * function says otherwise) and ends with an agreement: a failure on any rank is returned on
 * every rank with the same status and a message naming the failing rank ("rank R: ..."), never
 * a hang. Run without mpirun, a program is a world of one rank.
 *
 * MPI. The library initialises MPI when nobody has (MPI_Init_thread, FUNNELED) and finalises it
 * when its last use ends: autopar_finalize, or the last autopar_session_free when the program
 * never called autopar_world. A program that makes several sessions in sequence, or that wants
 * the world size before planning, calls autopar_world first and autopar_finalize at the end.
 * A program that initialises MPI itself keeps it: the library then never finalises it.
 *
 * Batches. The graph is built at the micro-batch size (section 7, "Micro-batches"). The data
 * of one step, the GLOBAL batch, is num_micro_batches (B) micro-batches: for an input of shape
 * S with batch dim d, the user passes B x numel(S) elements, the B micro-batches one after the
 * other (each row-major in S: i.e. the global batch stacked along a new leading axis; for
 * d = 0 this is simply the global batch of B x S[0] rows), and EVERY rank passes the whole
 * global batch: each keeps the part its shards need. Inputs without a batch dim (d = -1) take
 * numel(S) elements, the same for every micro-batch.
 *
 * Micro-batches (B > 1): a step runs forward and backward once per micro-batch, accumulates
 * the gradients and applies the optimizer once on their mean (the gradient of the mean loss
 * over the global batch); the loss returned is the mean of the B micro-batch losses. Gradient
 * sums the plan finishes in place are deferred to run once per step on the accumulated
 * gradients. With B > 1 every input takes B x numel(S) elements (inputs without a batch dim
 * too, for now).
 *
 * Pipelines (plans of several stages): rank r runs device r of the plan's cluster, hence one
 * stage, as an SPMD program over its stage's mesh, and follows its stage's instruction list of
 * the plan's schedule (GPipe or 1F1B): forward and backward of each micro-batch, boundary
 * tensors sent between the stages' meshes (each receiving device gets exactly its tile, by tile
 * intersection with the sending layout), activations of the micro-batches in flight kept until
 * their backward, the optimizer once per step. Parameters read by another stage (a tied
 * embedding) are sent at the start of each step, and their gradient contributions come back
 * with the micro-batch's gradients. Results equal the single-device run up to float summation
 * order (tests/mpi_test_pipeline.c). A plan whose stages send a forward value to an earlier
 * stage (or a gradient to a later one) is refused with AUTOPAR_ERR_UNSUPPORTED naming the
 * tensor.
 */

/* Backends (the same order as the runtime's). AUTO: CUDA when this build has it and the rank
 * sees a GPU, otherwise CPU. */
typedef enum autopar_backend_kind {
    AUTOPAR_BACKEND_AUTO = 0,
    AUTOPAR_BACKEND_CPU,
    AUTOPAR_BACKEND_CUDA,
    AUTOPAR_BACKEND_KIND_COUNT
} autopar_backend_kind;

typedef struct autopar_session autopar_session;

/* This process's rank and the world size (MPI_COMM_WORLD; 0 and 1 without mpirun). Initialises
 * MPI when needed and keeps the library's world open until autopar_finalize. Collective on the
 * first call. rank or size may be NULL. Errors: AUTOPAR_ERR_MPI (MPI already finalised, or a
 * call failed), AUTOPAR_ERR_NOMEM. */
AUTOPAR_API autopar_status autopar_world(int *rank, int *size);

/* Ends what autopar_world started: finalises MPI when the library initialised it and no
 * session is alive (otherwise when the last session is freed). Call once, at the end, on every
 * rank. NULL-safe in spirit: does nothing when autopar_world was never called. */
AUTOPAR_API void autopar_finalize(void);

/* Creates a session for `plan` on this job. Collective over MPI_COMM_WORLD.
 * plan: read during the call only (the session keeps its own copy). Rank 0's plan is the one
 * executed: it is broadcast to every rank, so ranks that each computed a plan cannot run
 * different ones. backend: see autopar_backend_kind (every rank must resolve it to the same
 * kind). seed: parameter initialisation seed: parameters start exactly as in
 * autopar_executor_new(graph, seed, ...), optimizer state at zero.
 * Output: *out (free with autopar_session_free); NULL on failure.
 * Errors (the same on every rank): AUTOPAR_ERR_INVALID_ARG (NULL plan or out, bad backend, on
 * any rank: a rank whose plan failed to load passes NULL and every rank gets the error naming
 * it, nobody waits; the world size differs from the plan's device count: the message gives
 * both and the mpirun command to use), AUTOPAR_ERR_UNSUPPORTED (a boundary tensor the pipeline schedule cannot
 * carry, see "Pipelines"; a backend not built, an op the backend lacks), AUTOPAR_ERR_MPI, AUTOPAR_ERR_BACKEND,
 * AUTOPAR_ERR_NOMEM, and the errors of the runtime's lowering (AUTOPAR_ERR_SHAPE for a
 * sharding that does not divide its tensor). */
AUTOPAR_API autopar_status autopar_session_new(const autopar_plan *plan,
                                               autopar_backend_kind backend, uint64_t seed,
                                               autopar_session **out);

/* Frees the session's buffers and communicators (local; every rank should call it). May
 * finalise MPI (see "MPI" above). NULL-safe. */
AUTOPAR_API void autopar_session_free(autopar_session *s);

/* Gives input `name` (an input tensor of the plan's graph) its data for the next steps: the
 * whole GLOBAL batch of a step (see "Batches"), float for F32 inputs, int32_t for I32 inputs,
 * n elements; every rank passes the same data. Collective. Errors (agreed): AUTOPAR_ERR_INVALID_ARG
 * (NULL, not an input), AUTOPAR_ERR_NOT_FOUND (no tensor with that name), AUTOPAR_ERR_SHAPE (n
 * is not the global batch's element count: the message gives the expected count and how it is
 * made), AUTOPAR_ERR_NOMEM, AUTOPAR_ERR_BACKEND. */
AUTOPAR_API autopar_status autopar_session_write_input(autopar_session *s, const char *name,
                                                       const void *data, int64_t n);

/* One training step on the inputs last written: forward and backward of every micro-batch,
 * gradient accumulation, one optimizer apply. *loss (may be NULL) gets the step's loss (the
 * mean of the micro-batches' losses, before the update), the same on every rank. Collective.
 * On failure no parameter or optimizer state changes. Errors (agreed, naming the rank, op and
 * tensor): those of the kernels and collectives; an id out of range is AUTOPAR_ERR_INVALID_ARG. */
AUTOPAR_API autopar_status autopar_session_step(autopar_session *s, double *loss);

/* Copies the WHOLE current value of parameter or optimizer state `name` (n elements, float)
 * into out on every rank, gathering its shards. Collective. Errors (agreed):
 * AUTOPAR_ERR_NOT_FOUND, AUTOPAR_ERR_INVALID_ARG (not a parameter or optimizer state, NULL),
 * AUTOPAR_ERR_SHAPE (n is not its element count), AUTOPAR_ERR_MPI, AUTOPAR_ERR_NOMEM. */
AUTOPAR_API autopar_status autopar_session_read_param(autopar_session *s, const char *name,
                                                      float *out, int64_t n);

/* Checkpoints. autopar_session_save writes every parameter and optimizer state WHOLE (gathered)
 * and the step count to `path` (rank 0 writes; the file format: "AUTOPARCKPT1" and 4 NUL
 * bytes, int64 steps, int64 tensor count, then per tensor uint32 name length, the name,
 * int64 element count and the float32 values, all little-endian as the host writes them).
 * autopar_session_load reads such a file on EVERY rank (a path every rank can read) into a
 * session of the same model under any plan: parameters, optimizer states and the step count
 * become bit-identical to the saved ones. Both collective. Errors (agreed): AUTOPAR_ERR_IO
 * (the file cannot be written / read, or is not a checkpoint), AUTOPAR_ERR_PARSE (a tensor of
 * the session missing from the file or of another size, naming it), AUTOPAR_ERR_NOMEM, and
 * those of autopar_session_read_param. */
AUTOPAR_API autopar_status autopar_session_save(autopar_session *s, const char *path);
AUTOPAR_API autopar_status autopar_session_load(autopar_session *s, const char *path);

/* This rank's world rank, and the world size (-1 / 0 for NULL). Local. */
AUTOPAR_API int autopar_session_rank(const autopar_session *s);
AUTOPAR_API int autopar_session_size(const autopar_session *s);

/* Completed steps (0 for NULL). Local. */
AUTOPAR_API int64_t autopar_session_steps(const autopar_session *s);

/* Model FLOPs of one step (the graph's forward and backward ops times the micro-batches, plus
 * the optimizer's once): divide by the step time for the achieved FLOP/s of the job. 0 for
 * NULL. Local. */
AUTOPAR_API double autopar_session_flops_per_step(const autopar_session *s);

/* ------------------------------------------------------------------------------------------ */
/* 9. Session statistics (timers)                                                              */
/* ------------------------------------------------------------------------------------------ */

/* This rank's cumulative timers over the successful autopar_session_step calls so far
 * (CLOCK_MONOTONIC, seconds). kernel_seconds: local kernels (and backend synchronisation);
 * comm_seconds: collective calls, including waiting for slower peers; overhead_seconds: the rest
 * of step_seconds (error agreements, loss download, update commits, dispatch). Write-input time
 * is not included. Local (not collective); costs two clock reads per program instruction. */
typedef struct autopar_session_stats {
    int64_t steps;               /* steps timed                                                */
    double  step_seconds;
    double  kernel_seconds;
    double  comm_seconds;
    double  overhead_seconds;    /* step - kernel - comm (>= 0)                                */
    double  predicted_peak_bytes;   /* this rank's memory plan                                */
    double  measured_peak_bytes;    /* this rank's live backend allocations, at most           */
    int     n_collectives;       /* per step                                                   */
    double  coll_bytes;          /* bytes this rank sends + receives per step                  */
    /* Pipelines: what this rank sends per step to devices of other stages (boundary tensors,
     * once per receiving tile), and to other devices of its own stage that hold the same
     * received tile (the all-gather completing it). Payload bytes. */
    int     n_cross_stage_messages;
    double  cross_stage_bytes;
    double  replica_gather_bytes;
} autopar_session_stats;

/* Writes s's statistics. Errors: AUTOPAR_ERR_INVALID_ARG (NULL). */
AUTOPAR_API autopar_status autopar_session_stats_get(const autopar_session *s,
                                                     autopar_session_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* AUTOPAR_H */
