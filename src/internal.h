/*
 * Private IR of libautopar, shared by src/, passes/ and runtime/. Never installed.
 *
 * A graph is an array of nodes in topological order (every operand id is smaller than the
 * node's own id). Each node produces exactly one tensor; "node" and "tensor" are the same
 * object (the public autopar_tensor handle is an ap_node pointer).
 */
#ifndef AUTOPAR_INTERNAL_H
#define AUTOPAR_INTERNAL_H

#include "autopar.h"

#include <stdbool.h>
#include <stdint.h>

#define AP_MAX_DIMS AUTOPAR_MAX_DIMS
#define AP_MAX_SRC  AUTOPAR_MAX_SRC
#define AP_MAX_NAME AUTOPAR_MAX_NAME
#define AP_MAX_IATTR 8
#define AP_MAX_FATTR 6
/* Largest element count of one tensor; keeps byte counts and products far from overflow. */
#define AP_MAX_NUMEL ((int64_t)1 << 48)

#if defined(__GNUC__)
#define AP_INTERNAL __attribute__((visibility("hidden")))
#define AP_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define AP_INTERNAL
#define AP_PRINTF(a, b)
#endif

typedef autopar_status ap_status;
typedef autopar_dtype  ap_dtype;

/* ------------------------------------------------------------------------------------------ */
/* Ops. One row per op in op_table.c; keep this list, the table and ap_op_names in sync       */
/* (AP_OP_COUNT is pinned by a static_assert there). Operand order and attribute slots are the */
/* contract every kernel (CPU and CUDA) implements. Shapes below: A = src[0], B = src[1], ...  */
/* "ia" = integer attributes (attrs.i), "fa" = float attributes (attrs.f).                     */
/* ------------------------------------------------------------------------------------------ */
typedef enum ap_op {
    /* Leaves (no operands). */
    AP_OP_INPUT = 0,      /* ia[0] = batch dim or -1                                           */
    AP_OP_PARAM,          /* ia[0] = autopar_init, fa[0] = scale                              */
    AP_OP_OPT_STATE,      /* zero-initialised optimizer state; ia[0] = id of its parameter    */
    AP_OP_FILL,           /* constant: every element = fa[0]; shape from the node             */

    /* Forward ops. */
    AP_OP_MATMUL,         /* C = op(A2) · op(B2); A2/B2 = operand viewed 2-D (all dims but the */
                          /* last flattened into rows); ia[0] = trans_a, ia[1] = trans_b.     */
                          /* Output keeps A's leading dims when !trans_a, else is [m, n].     */
    AP_OP_BATCH_MATMUL,   /* per batch index: C = op(A) · op(B) on the last two dims; leading */
                          /* dims equal; ia[0] = trans_a, ia[1] = trans_b                       */
    AP_OP_ADD,            /* A + B, B's shape equal to a suffix of A's (broadcast over the    */
    AP_OP_SUB,            /*   leading dims of A); out = A's shape                              */
    AP_OP_MUL,
    AP_OP_SCALE,          /* A * fa[0]                                                          */
    AP_OP_RELU,
    AP_OP_GELU,           /* tanh approximation                                                 */
    AP_OP_LAYERNORM,      /* A[..., C], gain B[C], bias C[C]; fa[0] = eps; over the last dim  */
    AP_OP_SOFTMAX,        /* over the last dim; ia[0] = causal (mask j > i on the last 2 dims)*/
                          /* ia[1]: the global index of local query row 0 (kernel calls of  */
                          /* the SPMD lowering for a query-split causal softmax; graphs: 0)  */
    AP_OP_RESHAPE,        /* out shape = node shape (also stored as ia[0] = ndim, ia[1..4])  */
    AP_OP_PERMUTE,        /* out dim i = A dim ia[i]                                           */
    AP_OP_SLICE,          /* ia[0] = axis, ia[1] = start, ia[2] = len                          */
    AP_OP_CONCAT,         /* n operands along ia[0] = axis                                     */
    AP_OP_EMBEDDING,      /* table A[V, C] (F32), ids B (I32, shape S) -> S + [C]. Kernel calls*/
                          /* of the SPMD lowering only (graphs have 0): ia[1] > 0, the table is */
                          /* rows [ia[0], ia[0] + V) of a vocabulary of ia[1]: ids are checked  */
                          /* against ia[1], ids outside the table's rows give zeros            */
    AP_OP_SUM,            /* ia[0] = axis removed, or -1 for all (rank-0 result)               */
    AP_OP_MEAN,           /* as SUM, divided by the number of summed elements                  */
    AP_OP_MSE_LOSS,       /* mean((A - B)^2), rank 0                                           */
    AP_OP_CROSS_ENTROPY,  /* logits A[..., V], labels B (I32, A's leading dims): mean over    */
                          /* positions of -log softmax(A)[label]; rank 0                        */

    /* Backward ops (created by autodiff; also valid in user graphs). dY = incoming gradient. */
    AP_OP_RELU_BACK,      /* (dY, X) -> dY * (X > 0)                                           */
    AP_OP_GELU_BACK,      /* (dY, X) -> dY * gelu'(X)                                          */
    AP_OP_LAYERNORM_BACK, /* (dY, X, gain) -> dX; fa[0] = eps                                  */
    AP_OP_LAYERNORM_BACK_GAIN, /* (dY, X) -> d gain [C] = sum over rows of dY * xhat; fa[0]=eps*/
    AP_OP_SOFTMAX_BACK,   /* (Y, dY) -> Y * (dY - sum_last(dY * Y))                            */
    AP_OP_SLICE_BACK,     /* (dY) -> zeros of the full shape with dY placed at [start, +len)  */
                          /* along the axis; ia[0] = axis, ia[1] = start, ia[2] = full length */
    AP_OP_EMBEDDING_BACK, /* (dY[S, C], ids S) -> dTable [V, C] (scatter-add); ia[0] = V       */
    AP_OP_SUM_TO,         /* A summed over its leading dims down to the node's shape, which is */
                          /* a suffix of A's shape (gradient of a broadcast operand)           */
    AP_OP_EXPAND,         /* A broadcast back over a reduced axis, times fa[0]:                */
                          /* ia[0] = axis inserted (size from the node's shape), or -1 when A */
                          /* is rank 0 and fills the whole node shape                          */
    AP_OP_MSE_LOSS_BACK,  /* (dL scalar, P, T) -> dL * 2 (P - T) / numel                       */
    AP_OP_CROSS_ENTROPY_BACK, /* (dL scalar, logits, labels) -> dL * (softmax - onehot) / rows*/

    /* Optimizer ops (phase APPLY). Each result replaces the leaf named by node.assign_to.    */
    AP_OP_SGD_UPDATE,     /* (P, G) -> P - fa[0]·(G + fa[1]·P); fa[0] = lr, fa[1] = wd        */
    AP_OP_MOMENTUM_UPDATE,/* (V, G) -> fa[0]·V + G                                             */
    AP_OP_ADAM_M,         /* (M, G) -> fa[0]·M + (1 - fa[0])·G                                 */
    AP_OP_ADAM_V,         /* (V, G) -> fa[0]·V + (1 - fa[0])·G²                                */
    AP_OP_ADAMW_UPDATE,   /* (P, M', V') -> P - lr·(mhat / (sqrt(vhat) + eps) + wd·P) with    */
                          /* mhat = M'/(1-b1^t), vhat = V'/(1-b2^t), t = the step (1-based);   */
                          /* fa[0] = lr, fa[1] = b1, fa[2] = b2, fa[3] = eps, fa[4] = wd       */

    /* Kernel-only ops (graphs reject them): the pieces of the vocabulary-parallel
     * cross-entropy that the SPMD lowering emits when the logits' last dim is split. A device
     * holds logits columns [ia[0], ia[0] + Vl) of a vocabulary of ia[1]; its row statistics
     * are all-gathered over the devices holding the other columns, then combined. */
    AP_OP_CE_PARTIAL,     /* (logits A[..., Vl], labels B) -> [..., 3]: per row the max m, the */
                          /* sum of exp(A - m), and A at the label when the label is in the    */
                          /* local columns (else 0); ia[0] = first column, ia[1] = vocabulary */
    AP_OP_CE_COMBINE,     /* (parts A[P, ..., 3]) -> per row m = max m_p, s = sum s_p e^(m_p-m),*/
                          /* xt = sum xt_p; ia[0] = 0: mean over rows of log s + m - xt (rank */
                          /* 0); ia[0] = 1: [..., 2] = (m, s)                                  */
    AP_OP_CE_BACK_PARTIAL,/* (dL scalar, logits [..., Vl], labels, stats [..., 2]) ->          */
                          /* dL * (exp(A - m) / s - onehot(label - ia[0])) / rows              */
    AP_OP_COUNT
} ap_op;

typedef struct ap_shape {
    int      ndim;                 /* 0 = scalar */
    int64_t  dim[AP_MAX_DIMS];
} ap_shape;

typedef struct ap_attrs {
    int64_t i[AP_MAX_IATTR];
    double  f[AP_MAX_FATTR];
} ap_attrs;

typedef struct ap_node {
    int          id;                /* index in graph->nodes                                    */
    ap_op        op;
    ap_dtype     dtype;
    ap_shape     shape;
    char         name[AP_MAX_NAME];
    autopar_kind kind;
    autopar_phase phase;
    int          layer;             /* pipeline layer (forward layer for backward/apply nodes)  */
    int          n_src;
    int          src[AP_MAX_SRC];   /* operand ids                                              */
    ap_attrs     attrs;
    int          grad;              /* id of this tensor's gradient, or -1                      */
    int          assign_to;         /* APPLY results: id of the leaf they replace, else -1      */
} ap_node;

struct autopar_graph {
    ap_node    **nodes;
    int          n_nodes, cap_nodes;
    int          current_layer;
    autopar_phase current_phase;    /* phase given to nodes being created                      */
    int          current_fwd;       /* while autodiff runs: id of the forward node whose       */
                                    /* gradient is being built (its layer is copied), else -1  */
    int          loss;              /* id of the loss, -1 until autopar_backward               */
    bool         has_optimizer;
    autopar_optimizer optimizer;
    int         *name_index;        /* open-addressing hash of node ids by name (-1 = empty)   */
    int          name_index_cap;    /* power of two, > 2 * n_nodes                             */
    ap_status    status;            /* sticky                                                   */
    char         error[1024];
};

/* One row of the op table. */
typedef struct ap_op_info {
    const char *name;               /* lower-case, used in JSON and messages                   */
    int         n_src;              /* operand count, or -1 for variadic (1..AP_MAX_SRC)        */
    /* Infers the node's dtype and shape from its operands and attrs; fills n->shape/n->dtype.
     * On failure writes a message (without the node name; the caller prefixes it) to msg. */
    ap_status (*infer)(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len);
    /* Appends the gradient contributions of node n given its output gradient dy (an id) by
     * calling ap_grad_accumulate for each differentiable operand. NULL = not differentiable. */
    ap_status (*backward)(autopar_graph *g, const ap_node *n, int dy);
    /* Emitted by the runtime's lowering only: graphs reject it (its infer fails). */
    bool        kernel_only;
} ap_op_info;

AP_INTERNAL const ap_op_info *ap_op_info_get(ap_op op);
AP_INTERNAL const char *ap_op_name(ap_op op);
/* Op from its name, or AP_OP_COUNT. */
AP_INTERNAL ap_op ap_op_from_name(const char *name);
/* Lower-case names of kinds and phases ("param", "backward", ...); "?" when out of range. */
AP_INTERNAL const char *ap_kind_name(autopar_kind k);
AP_INTERNAL const char *ap_phase_name(autopar_phase p);

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Records a message as the thread's last error and returns s. */
AP_INTERNAL ap_status ap_error(ap_status s, const char *fmt, ...) AP_PRINTF(2, 3);
/* Records the first error on the graph (sticky) and as the last error; returns s. */
AP_INTERNAL ap_status ap_graph_fail(autopar_graph *g, ap_status s, const char *fmt, ...)
    AP_PRINTF(3, 4);
/* Checks that t is a tensor of g (AUTOPAR_ERR_INVALID_ARG "<fn>: tensor is not part of the
 * <whose> graph" otherwise) holding n elements (n < 0: any count; else AUTOPAR_ERR_SHAPE
 * naming the tensor, its shape and both counts). t must not be NULL. */
AP_INTERNAL ap_status ap_graph_check_tensor(const autopar_graph *g, const autopar_tensor *t,
                                            int64_t n, const char *fn, const char *whose);
/* Formats a shape as "[2, 3, 4]" into buf (returns buf). */
AP_INTERNAL const char *ap_shape_str(const ap_shape *s, char *buf, size_t len);

/* Reads a whole text file into a malloc'ed NUL-terminated buffer (*out_len bytes, may be NULL).
 * Errors name `what` and the path: AUTOPAR_ERR_IO (cannot open/read, larger than max_bytes),
 * AUTOPAR_ERR_PARSE (the file contains a NUL byte), AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_read_text_file(const char *what, const char *path, size_t max_bytes,
                                        char **out, size_t *out_len);

/* The AUTOPAR_ERR_PARSE error for JSON text that cJSON could not parse, where it stopped (`at`:
 * the end cJSON_ParseWithOpts reports on failure; NULL: the end of the text): "<label>:
 * malformed JSON at offset O (line L, column C) near "..."", or "unexpected end of input". */
AP_INTERNAL ap_status ap_json_parse_error(const char *label, const char *text, const char *at);

/* ------------------------------------------------------------------------------------------ */
/* Graph helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */

static inline int64_t ap_shape_numel(const ap_shape *s) {
    int64_t n = 1;
    for (int i = 0; i < s->ndim; i++) n *= s->dim[i];
    return n;
}
static inline bool ap_shape_equal(const ap_shape *a, const ap_shape *b) {
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->dim[i] != b->dim[i]) return false;
    return true;
}
static inline ap_node *ap_node_get(const autopar_graph *g, int id) { return g->nodes[id]; }
static inline ap_node *ap_src(const autopar_graph *g, const ap_node *n, int k) {
    return g->nodes[n->src[k]];
}

/* Creates a node: checks operands, runs shape inference, assigns kind/phase/layer, appends it.
 * name may be NULL (a name "<op>_<id>" is generated). `shape` is used only by ops whose shape
 * comes from the node itself (leaves, FILL, RESHAPE, SUM_TO, EXPAND); else pass NULL.
 * Returns the new node or NULL (the graph's sticky error is set). */
AP_INTERNAL ap_node *ap_graph_add(autopar_graph *g, ap_op op, int n_src, const int *src,
                                  const ap_attrs *attrs, const ap_shape *shape, ap_dtype dtype,
                                  const char *name);

/* During autodiff: adds `contribution` (an id) to the gradient of node `target`, creating it
 * on first use and summing later ones. */
AP_INTERNAL ap_status ap_grad_accumulate(autopar_graph *g, int target, int contribution);

/* Id of the node named `name`, or -1. */
AP_INTERNAL int ap_graph_lookup(const autopar_graph *g, const char *name);
/* Renames node id (the new name must be free); keeps the name index consistent. */
AP_INTERNAL ap_status ap_graph_rename(autopar_graph *g, int id, const char *name);

/* Shorthand used by gradient rules: creates a node in the backward phase, returns its id or -1. */
AP_INTERNAL int ap_emit(autopar_graph *g, ap_op op, int n_src, const int *src,
                        const ap_attrs *attrs, const ap_shape *shape);

/* FLOPs of one node (multiply-add = 2 FLOPs), and bytes read + written by it. */
AP_INTERNAL double ap_node_flops(const autopar_graph *g, const ap_node *n);
AP_INTERNAL double ap_node_bytes(const autopar_graph *g, const ap_node *n);

/* Bytes per element as stored on devices (F32 and I32 are both 4 bytes). */
static inline size_t ap_dtype_size(ap_dtype t) { (void)t; return 4; }

/* ------------------------------------------------------------------------------------------ */
/* Kernel calls: the interface between the IR and every backend's kernels.                     */
/* A call describes one op on concrete buffers. Shapes may be local shard shapes (the runtime  */
/* builds calls with per-rank shapes); attrs are then adjusted by the caller.                  */
/* ------------------------------------------------------------------------------------------ */
typedef struct ap_kernel_call {
    ap_op            op;
    ap_attrs         attrs;
    autopar_precision precision;   /* element type of F32 tensors: float or double            */
    ap_shape         out_shape;
    ap_dtype         out_dtype;
    void            *out;
    int              n_src;
    ap_shape         src_shape[AP_MAX_SRC];
    ap_dtype         src_dtype[AP_MAX_SRC];
    const void      *src[AP_MAX_SRC];
    int64_t          step;          /* optimizer step, 1-based (ADAMW_UPDATE bias correction)  */
    const char      *name;          /* tensor name, for error messages                         */
} ap_kernel_call;

/* Fills a call's op, attrs, shapes and dtypes from a graph node (buffers left NULL). */
AP_INTERNAL void ap_kernel_call_from_node(const autopar_graph *g, const ap_node *n,
                                          autopar_precision p, ap_kernel_call *call);

/* Element size of a tensor of dtype t under precision p. */
static inline size_t ap_elem_size(ap_dtype t, autopar_precision p) {
    if (t == AUTOPAR_I32) return sizeof(int32_t);
    return p == AUTOPAR_PRECISION_F64 ? sizeof(double) : sizeof(float);
}

/* Counter-based random numbers for parameter initialisation: the value of element `index` of
 * the parameter named `name` depends only on (seed, name, index). */
AP_INTERNAL uint64_t ap_hash_name(const char *name);
AP_INTERNAL double ap_init_value(autopar_init init, double scale, int64_t fan_in, uint64_t seed,
                                 uint64_t name_hash, int64_t index);
/* Writes the initial values of elements [first, first + count) (flat row-major indices) of
 * parameter n into host memory dst, as float (F32 precision) or double (F64), from seed. Every
 * executor initialises through this, so any rank can initialise any contiguous part of a
 * parameter and match a single-device run bit for bit. n must be an AP_OP_PARAM node and the
 * range inside it (not checked: internal callers only). */
AP_INTERNAL void ap_param_init_host(const ap_node *n, uint64_t seed, autopar_precision p,
                                    int64_t first, int64_t count, void *dst);

#endif /* AUTOPAR_INTERNAL_H */
