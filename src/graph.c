/*
 * Graph construction: node creation through the op table's checks, the public builders, the
 * sticky error, accessors, validation and printing.
 */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const kind_names[AUTOPAR_KIND_COUNT] = {
    "input", "param", "constant", "activation", "gradient", "opt_state", "update"};
static const char *const phase_names[AUTOPAR_PHASE_COUNT] = {"forward", "backward", "apply"};

autopar_status autopar_graph_new(autopar_graph **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_new: out is NULL");
    *out = NULL;
    autopar_graph *g = calloc(1, sizeof *g);
    if (!g) return ap_error(AUTOPAR_ERR_NOMEM, "autopar_graph_new: out of memory");
    g->loss = -1;
    g->current_fwd = -1;
    g->current_phase = AUTOPAR_PHASE_FORWARD;
    *out = g;
    return AUTOPAR_OK;
}

void autopar_graph_free(autopar_graph *g) {
    if (!g) return;
    for (int i = 0; i < g->n_nodes; i++) free(g->nodes[i]);
    free(g->nodes);
    free(g->name_index);
    free(g);
}

autopar_status autopar_graph_status(const autopar_graph *g) {
    return g ? g->status : AUTOPAR_ERR_INVALID_ARG;
}

const char *autopar_graph_error(const autopar_graph *g) { return g ? g->error : "graph is NULL"; }

autopar_status autopar_graph_fail(autopar_graph *g, autopar_status status, const char *fmt, ...) {
    char msg[sizeof g->error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt ? fmt : "(no message)", ap);
    va_end(ap);
    if (status == AUTOPAR_OK || (int)status < 0 || status >= AUTOPAR_STATUS_COUNT)
        status = AUTOPAR_ERR_INVALID_ARG;
    if (!g) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s", msg);
    ap_graph_fail(g, status, "%s", msg);
    return g->status;
}

/* ---- name index: names are looked up on every named node, so a linear scan would make graph
 * construction quadratic in the node count ---------------------------------------------------- */

static uint64_t name_hash(const char *name) { return ap_hash_name(name); }

static void index_insert(int *slots, int cap, const autopar_graph *g, int id) {
    size_t mask = (size_t)cap - 1, h = (size_t)name_hash(g->nodes[id]->name) & mask;
    while (slots[h] >= 0) h = (h + 1) & mask;
    slots[h] = id;
}

/* Rebuilds the index with room for `n_nodes` nodes. */
static bool index_rebuild(autopar_graph *g, int n_nodes) {
    int cap = 64;
    while (cap < 2 * n_nodes + 2) cap *= 2;
    int *slots = malloc((size_t)cap * sizeof *slots);
    if (!slots) return false;
    for (int i = 0; i < cap; i++) slots[i] = -1;
    for (int i = 0; i < g->n_nodes; i++) index_insert(slots, cap, g, i);
    free(g->name_index);
    g->name_index = slots;
    g->name_index_cap = cap;
    return true;
}

int ap_graph_lookup(const autopar_graph *g, const char *name) {
    if (!g->name_index) return -1;
    size_t mask = (size_t)g->name_index_cap - 1, h = (size_t)name_hash(name) & mask;
    for (; g->name_index[h] >= 0; h = (h + 1) & mask)
        if (strcmp(g->nodes[g->name_index[h]]->name, name) == 0) return g->name_index[h];
    return -1;
}

static bool name_taken(const autopar_graph *g, const char *name) {
    return ap_graph_lookup(g, name) >= 0;
}

ap_status ap_graph_rename(autopar_graph *g, int id, const char *name) {
    if (strlen(name) >= AP_MAX_NAME || name_taken(g, name))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "cannot rename '%s' to '%s'", g->nodes[id]->name,
                        name);
    memcpy(g->nodes[id]->name, name, strlen(name) + 1);
    return index_rebuild(g, g->cap_nodes) ? AUTOPAR_OK
                                          : ap_error(AUTOPAR_ERR_NOMEM, "rename: out of memory");
}

static autopar_kind kind_for(ap_op op, autopar_phase phase) {
    switch (op) {
    case AP_OP_INPUT: return AUTOPAR_KIND_INPUT;
    case AP_OP_PARAM: return AUTOPAR_KIND_PARAM;
    case AP_OP_OPT_STATE: return AUTOPAR_KIND_OPT_STATE;
    case AP_OP_FILL: return AUTOPAR_KIND_CONSTANT;
    default: break;
    }
    if (phase == AUTOPAR_PHASE_BACKWARD) return AUTOPAR_KIND_GRADIENT;
    if (phase == AUTOPAR_PHASE_APPLY) return AUTOPAR_KIND_UPDATE;
    return AUTOPAR_KIND_ACTIVATION;
}

ap_node *ap_graph_add(autopar_graph *g, ap_op op, int n_src, const int *src, const ap_attrs *attrs,
                      const ap_shape *shape, ap_dtype dtype, const char *name) {
    if (!g || g->status != AUTOPAR_OK) return NULL;
    const ap_op_info *info = ap_op_info_get(op);
    if (!info) {
        ap_graph_fail(g, AUTOPAR_ERR_UNKNOWN_OP, "op code %d is not a known op", (int)op);
        return NULL;
    }
    const char *label = name ? name : "(unnamed)";
    bool variadic = info->n_src < 0;
    if ((!variadic && n_src != info->n_src) || (variadic && (n_src < 1 || n_src > AP_MAX_SRC))) {
        ap_graph_fail(g, AUTOPAR_ERR_INVALID_ARG, "%s '%s': got %d operands, expected %s%d",
                      info->name, label, n_src, variadic ? "1.." : "",
                      variadic ? AP_MAX_SRC : info->n_src);
        return NULL;
    }
    for (int k = 0; k < n_src; k++)
        if (src[k] < 0 || src[k] >= g->n_nodes) {
            ap_graph_fail(g, AUTOPAR_ERR_GRAPH, "%s '%s': operand %d refers to node %d, which "
                          "does not exist yet (graph has %d nodes)", info->name, label, k, src[k],
                          g->n_nodes);
            return NULL;
        }
    if (name) {
        if (name[0] == '\0' || strlen(name) >= AP_MAX_NAME) {
            ap_graph_fail(g, AUTOPAR_ERR_INVALID_ARG, "%s: name '%.80s' must have 1..%d characters",
                          info->name, name, AP_MAX_NAME - 1);
            return NULL;
        }
        if (name_taken(g, name)) {
            ap_graph_fail(g, AUTOPAR_ERR_INVALID_ARG, "%s: a tensor named '%s' already exists",
                          info->name, name);
            return NULL;
        }
    }
    if (g->n_nodes == g->cap_nodes) {
        int cap = g->cap_nodes ? 2 * g->cap_nodes : 64;
        ap_node **nodes = realloc(g->nodes, (size_t)cap * sizeof *nodes);
        if (!nodes) {
            ap_graph_fail(g, AUTOPAR_ERR_NOMEM, "%s '%s': out of memory", info->name, label);
            return NULL;
        }
        g->nodes = nodes;
        g->cap_nodes = cap;
        if (!index_rebuild(g, cap)) {
            ap_graph_fail(g, AUTOPAR_ERR_NOMEM, "%s '%s': out of memory", info->name, label);
            return NULL;
        }
    }
    ap_node *n = calloc(1, sizeof *n);
    if (!n) {
        ap_graph_fail(g, AUTOPAR_ERR_NOMEM, "%s '%s': out of memory", info->name, label);
        return NULL;
    }
    n->id = g->n_nodes;
    n->op = op;
    n->dtype = dtype;
    n->n_src = n_src;
    for (int k = 0; k < n_src; k++) n->src[k] = src[k];
    if (attrs) n->attrs = *attrs;
    if (shape) n->shape = *shape;
    n->grad = -1;
    n->assign_to = -1;
    if (name) {
        snprintf(n->name, sizeof n->name, "%s", name);
    } else {
        /* "<op>_<id>", with a suffix in the rare case a user already took that name */
        snprintf(n->name, sizeof n->name, "%s_%d", info->name, n->id);
        for (int k = 1; name_taken(g, n->name); k++)
            snprintf(n->name, sizeof n->name, "%s_%d_%d", info->name, n->id, k);
    }

    char msg[400];
    msg[0] = '\0';
    ap_status st = info->infer(g, n, msg, sizeof msg);
    if (st != AUTOPAR_OK) {
        char ops[200] = "";
        size_t used = 0;
        for (int k = 0; k < n_src && used < sizeof ops; k++) {
            char sh[64];
            used += (size_t)snprintf(ops + used, sizeof ops - used, "%s'%s' %s", k ? ", " : "",
                                     g->nodes[src[k]]->name,
                                     ap_shape_str(&g->nodes[src[k]]->shape, sh, sizeof sh));
        }
        ap_graph_fail(g, st, "%s '%s'%s%s%s: %s", info->name, n->name, n_src ? " (operands " : "",
                      ops, n_src ? ")" : "", msg);
        free(n);
        return NULL;
    }
    n->phase = g->current_phase;
    n->kind = kind_for(op, n->phase);
    if (g->current_fwd >= 0)
        n->layer = g->nodes[g->current_fwd]->layer;
    else if (op == AP_OP_OPT_STATE)
        n->layer = g->nodes[n->attrs.i[0]]->layer;
    else
        n->layer = g->current_layer;
    g->nodes[g->n_nodes++] = n;
    index_insert(g->name_index, g->name_index_cap, g, n->id);
    return n;
}

int ap_emit(autopar_graph *g, ap_op op, int n_src, const int *src, const ap_attrs *attrs,
            const ap_shape *shape) {
    ap_node *n = ap_graph_add(g, op, n_src, src, attrs, shape, AUTOPAR_F32, NULL);
    return n ? n->id : -1;
}

/* ---- public builders ------------------------------------------------------------------------ */

/* Converts handles to ids. Returns false (setting the sticky error unless one is already set)
 * when an operand is NULL or belongs to another graph. */
static bool operand_ids(autopar_graph *g, const char *op, int n, autopar_tensor *const *ts,
                        int *ids) {
    if (!g) {
        ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_%s: graph is NULL", op);
        return false;
    }
    if (g->status != AUTOPAR_OK) return false;
    for (int k = 0; k < n; k++) {
        const ap_node *t = (const ap_node *)ts[k];
        if (!t) {
            ap_graph_fail(g, AUTOPAR_ERR_INVALID_ARG, "autopar_%s: operand %d is NULL", op, k);
            return false;
        }
        if (t->id < 0 || t->id >= g->n_nodes || g->nodes[t->id] != t) {
            ap_graph_fail(g, AUTOPAR_ERR_INVALID_ARG,
                          "autopar_%s: operand %d does not belong to this graph", op, k);
            return false;
        }
        ids[k] = t->id;
    }
    return true;
}

static autopar_tensor *build(autopar_graph *g, ap_op op, int n, autopar_tensor *const *ts,
                             const ap_attrs *attrs, const ap_shape *shape) {
    int ids[AP_MAX_SRC];
    if (!operand_ids(g, ap_op_name(op), n, ts, ids)) return NULL;
    return (autopar_tensor *)ap_graph_add(g, op, n, ids, attrs, shape, AUTOPAR_F32, NULL);
}

static bool shape_from_user(autopar_graph *g, const char *op, int ndim, const int64_t *dims,
                            ap_shape *s) {
    if (ndim < 0 || ndim > AP_MAX_DIMS || (ndim > 0 && !dims)) {
        ap_graph_fail(g, AUTOPAR_ERR_SHAPE, "autopar_%s: rank %d outside 0..%d (or shape NULL)",
                      op, ndim, AP_MAX_DIMS);
        return false;
    }
    s->ndim = ndim;
    for (int i = 0; i < ndim; i++) s->dim[i] = dims[i];
    return true;
}

static autopar_tensor *leaf(autopar_graph *g, const char *opname, ap_op op, const char *name,
                            autopar_dtype dtype, int ndim, const int64_t *shape,
                            const ap_attrs *attrs) {
    if (!g) {
        ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_%s: graph is NULL", opname);
        return NULL;
    }
    if (g->status != AUTOPAR_OK) return NULL;
    if (!name) {
        ap_graph_fail(g, AUTOPAR_ERR_INVALID_ARG, "autopar_%s: name is NULL", opname);
        return NULL;
    }
    if ((int)dtype < 0 || dtype >= AUTOPAR_DTYPE_COUNT) {
        ap_graph_fail(g, AUTOPAR_ERR_DTYPE, "autopar_%s '%s': dtype %d is not valid", opname, name,
                      (int)dtype);
        return NULL;
    }
    ap_shape s;
    if (!shape_from_user(g, opname, ndim, shape, &s)) return NULL;
    return (autopar_tensor *)ap_graph_add(g, op, 0, NULL, attrs, &s, dtype, name);
}

autopar_tensor *autopar_input(autopar_graph *g, const char *name, autopar_dtype dtype, int ndim,
                              const int64_t *shape, int batch_dim) {
    ap_attrs a = {0};
    a.i[0] = batch_dim;
    return leaf(g, "input", AP_OP_INPUT, name, dtype, ndim, shape, &a);
}

autopar_tensor *autopar_param(autopar_graph *g, const char *name, int ndim, const int64_t *shape,
                              autopar_init init, float scale) {
    ap_attrs a = {0};
    a.i[0] = init;
    a.f[0] = scale;
    return leaf(g, "param", AP_OP_PARAM, name, AUTOPAR_F32, ndim, shape, &a);
}

autopar_tensor *autopar_matmul_ex(autopar_graph *g, autopar_tensor *a, autopar_tensor *b,
                                  int trans_a, int trans_b) {
    ap_attrs at = {0};
    at.i[0] = trans_a != 0;
    at.i[1] = trans_b != 0;
    autopar_tensor *ts[2] = {a, b};
    return build(g, AP_OP_MATMUL, 2, ts, &at, NULL);
}

autopar_tensor *autopar_matmul(autopar_graph *g, autopar_tensor *a, autopar_tensor *b) {
    return autopar_matmul_ex(g, a, b, 0, 0);
}

autopar_tensor *autopar_batch_matmul(autopar_graph *g, autopar_tensor *a, autopar_tensor *b,
                                     int trans_a, int trans_b) {
    ap_attrs at = {0};
    at.i[0] = trans_a != 0;
    at.i[1] = trans_b != 0;
    autopar_tensor *ts[2] = {a, b};
    return build(g, AP_OP_BATCH_MATMUL, 2, ts, &at, NULL);
}

#define BINARY(fn, OP)                                                                          \
    autopar_tensor *fn(autopar_graph *g, autopar_tensor *a, autopar_tensor *b) {                \
        autopar_tensor *ts[2] = {a, b};                                                         \
        return build(g, OP, 2, ts, NULL, NULL);                                                 \
    }
BINARY(autopar_add, AP_OP_ADD)
BINARY(autopar_sub, AP_OP_SUB)
BINARY(autopar_mul, AP_OP_MUL)
BINARY(autopar_mse_loss, AP_OP_MSE_LOSS)
BINARY(autopar_cross_entropy, AP_OP_CROSS_ENTROPY)
BINARY(autopar_embedding, AP_OP_EMBEDDING)
#undef BINARY

autopar_tensor *autopar_scale(autopar_graph *g, autopar_tensor *x, float s) {
    ap_attrs a = {0};
    a.f[0] = s;
    return build(g, AP_OP_SCALE, 1, &x, &a, NULL);
}

autopar_tensor *autopar_relu(autopar_graph *g, autopar_tensor *x) {
    return build(g, AP_OP_RELU, 1, &x, NULL, NULL);
}

autopar_tensor *autopar_gelu(autopar_graph *g, autopar_tensor *x) {
    return build(g, AP_OP_GELU, 1, &x, NULL, NULL);
}

autopar_tensor *autopar_layernorm(autopar_graph *g, autopar_tensor *x, autopar_tensor *gain,
                                  autopar_tensor *bias, float eps) {
    ap_attrs a = {0};
    a.f[0] = eps;
    autopar_tensor *ts[3] = {x, gain, bias};
    return build(g, AP_OP_LAYERNORM, 3, ts, &a, NULL);
}

autopar_tensor *autopar_softmax(autopar_graph *g, autopar_tensor *x, int causal) {
    ap_attrs a = {0};
    a.i[0] = causal != 0;
    return build(g, AP_OP_SOFTMAX, 1, &x, &a, NULL);
}

autopar_tensor *autopar_reshape(autopar_graph *g, autopar_tensor *x, int ndim,
                                const int64_t *shape) {
    ap_shape s;
    if (g && g->status == AUTOPAR_OK && !shape_from_user(g, "reshape", ndim, shape, &s))
        return NULL;
    int id;
    if (!operand_ids(g, "reshape", 1, &x, &id)) return NULL;
    return (autopar_tensor *)ap_graph_add(g, AP_OP_RESHAPE, 1, &id, NULL, &s,
                                          ((ap_node *)x)->dtype, NULL);
}

autopar_tensor *autopar_permute(autopar_graph *g, autopar_tensor *x, const int *perm) {
    int id;
    if (!operand_ids(g, "permute", 1, &x, &id)) return NULL;
    if (!perm) {
        ap_graph_fail(g, AUTOPAR_ERR_INVALID_ARG, "autopar_permute: perm is NULL");
        return NULL;
    }
    ap_attrs a = {0};
    for (int i = 0; i < ((ap_node *)x)->shape.ndim; i++) a.i[i] = perm[i];
    return (autopar_tensor *)ap_graph_add(g, AP_OP_PERMUTE, 1, &id, &a, NULL,
                                          ((ap_node *)x)->dtype, NULL);
}

autopar_tensor *autopar_transpose(autopar_graph *g, autopar_tensor *x) {
    int id;
    if (!operand_ids(g, "transpose", 1, &x, &id)) return NULL;
    int r = ((ap_node *)x)->shape.ndim;
    if (r < 2) {
        ap_graph_fail(g, AUTOPAR_ERR_SHAPE, "autopar_transpose: '%s' has rank %d, needs >= 2",
                      ((ap_node *)x)->name, r);
        return NULL;
    }
    int perm[AP_MAX_DIMS];
    for (int i = 0; i < r; i++) perm[i] = i;
    perm[r - 2] = r - 1;
    perm[r - 1] = r - 2;
    return autopar_permute(g, x, perm);
}

/* Normalises a possibly negative axis; fails on the graph when out of range. */
static bool norm_axis(autopar_graph *g, const char *op, const autopar_tensor *x, int *axis) {
    int r = ((const ap_node *)x)->shape.ndim;
    int a = *axis < 0 ? *axis + r : *axis;
    if (a < 0 || a >= r) {
        ap_graph_fail(g, AUTOPAR_ERR_INVALID_ARG, "autopar_%s: axis %d outside -%d..%d of '%s'", op,
                      *axis, r, r - 1, ((const ap_node *)x)->name);
        return false;
    }
    *axis = a;
    return true;
}

autopar_tensor *autopar_slice(autopar_graph *g, autopar_tensor *x, int axis, int64_t start,
                              int64_t len) {
    int id;
    if (!operand_ids(g, "slice", 1, &x, &id) || !norm_axis(g, "slice", x, &axis)) return NULL;
    ap_attrs a = {0};
    a.i[0] = axis;
    a.i[1] = start;
    a.i[2] = len;
    return (autopar_tensor *)ap_graph_add(g, AP_OP_SLICE, 1, &id, &a, NULL, ((ap_node *)x)->dtype,
                                          NULL);
}

autopar_status autopar_split(autopar_graph *g, autopar_tensor *x, int axis, int n,
                             autopar_tensor **out) {
    if (!out) return ap_graph_fail(g, AUTOPAR_ERR_INVALID_ARG, "autopar_split: out is NULL");
    for (int i = 0; i < n; i++) out[i] = NULL;
    int id;
    if (!operand_ids(g, "split", 1, &x, &id)) return g ? g->status : AUTOPAR_ERR_INVALID_ARG;
    if (!norm_axis(g, "split", x, &axis)) return g->status;
    int64_t len = ((ap_node *)x)->shape.dim[axis];
    if (n < 1 || len % n != 0)
        return ap_graph_fail(g, AUTOPAR_ERR_SHAPE, "autopar_split: axis %d of '%s' (length %lld) "
                             "cannot be split into %d equal parts", axis, ((ap_node *)x)->name,
                             (long long)len, n);
    for (int i = 0; i < n; i++) {
        out[i] = autopar_slice(g, x, axis, i * (len / n), len / n);
        if (!out[i]) {
            for (int j = 0; j < i; j++) out[j] = NULL;
            return g->status;
        }
    }
    return AUTOPAR_OK;
}

autopar_tensor *autopar_concat(autopar_graph *g, int n, autopar_tensor *const *xs, int axis) {
    if (g && g->status == AUTOPAR_OK && (n < 1 || n > AP_MAX_SRC || !xs)) {
        ap_graph_fail(g, AUTOPAR_ERR_INVALID_ARG, "autopar_concat: %d inputs; 1..%d supported", n,
                      AP_MAX_SRC);
        return NULL;
    }
    int ids[AP_MAX_SRC];
    if (!operand_ids(g, "concat", n, xs, ids) || !norm_axis(g, "concat", xs[0], &axis))
        return NULL;
    ap_attrs a = {0};
    a.i[0] = axis;
    return (autopar_tensor *)ap_graph_add(g, AP_OP_CONCAT, n, ids, &a, NULL,
                                          ((ap_node *)xs[0])->dtype, NULL);
}

static autopar_tensor *reduce(autopar_graph *g, ap_op op, autopar_tensor *x, int axis, bool all) {
    int id;
    if (!operand_ids(g, ap_op_name(op), 1, &x, &id)) return NULL;
    if (!all && !norm_axis(g, ap_op_name(op), x, &axis)) return NULL;
    ap_attrs a = {0};
    a.i[0] = all ? -1 : axis;
    return (autopar_tensor *)ap_graph_add(g, op, 1, &id, &a, NULL, AUTOPAR_F32, NULL);
}

autopar_tensor *autopar_sum(autopar_graph *g, autopar_tensor *x, int axis) {
    return reduce(g, AP_OP_SUM, x, axis, false);
}
autopar_tensor *autopar_mean(autopar_graph *g, autopar_tensor *x, int axis) {
    return reduce(g, AP_OP_MEAN, x, axis, false);
}
autopar_tensor *autopar_sum_all(autopar_graph *g, autopar_tensor *x) {
    return reduce(g, AP_OP_SUM, x, 0, true);
}
autopar_tensor *autopar_mean_all(autopar_graph *g, autopar_tensor *x) {
    return reduce(g, AP_OP_MEAN, x, 0, true);
}

autopar_status autopar_mark_pipeline_boundary(autopar_graph *g) {
    if (!g) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_mark_pipeline_boundary: graph is NULL");
    if (g->status != AUTOPAR_OK) return g->status;
    if (g->loss >= 0)
        return ap_graph_fail(g, AUTOPAR_ERR_GRAPH, "autopar_mark_pipeline_boundary: the backward "
                             "pass was already built; boundaries belong to the forward graph");
    g->current_layer++;
    return AUTOPAR_OK;
}

/* ---- accessors ------------------------------------------------------------------------------ */

const char *autopar_tensor_name(const autopar_tensor *t) {
    return t ? ((const ap_node *)t)->name : NULL;
}
int autopar_tensor_ndim(const autopar_tensor *t) { return t ? ((const ap_node *)t)->shape.ndim : -1; }
int64_t autopar_tensor_dim(const autopar_tensor *t, int i) {
    const ap_node *n = (const ap_node *)t;
    if (!n || i < 0 || i >= n->shape.ndim) return -1;
    return n->shape.dim[i];
}
int64_t autopar_tensor_numel(const autopar_tensor *t) {
    return t ? ap_shape_numel(&((const ap_node *)t)->shape) : 0;
}
autopar_dtype autopar_tensor_dtype(const autopar_tensor *t) {
    return t ? ((const ap_node *)t)->dtype : AUTOPAR_F32;
}
autopar_kind autopar_tensor_kind(const autopar_tensor *t) {
    return t ? ((const ap_node *)t)->kind : AUTOPAR_KIND_COUNT;
}
autopar_phase autopar_tensor_phase(const autopar_tensor *t) {
    return t ? ((const ap_node *)t)->phase : AUTOPAR_PHASE_COUNT;
}
int autopar_tensor_layer(const autopar_tensor *t) { return t ? ((const ap_node *)t)->layer : -1; }

int autopar_graph_size(const autopar_graph *g) { return g ? g->n_nodes : 0; }

autopar_tensor *autopar_graph_tensor(const autopar_graph *g, int i) {
    if (!g || i < 0 || i >= g->n_nodes) return NULL;
    return (autopar_tensor *)g->nodes[i];
}

autopar_tensor *autopar_graph_find(const autopar_graph *g, const char *name) {
    if (!g || !name) {
        ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_find: graph or name is NULL");
        return NULL;
    }
    int id = ap_graph_lookup(g, name);
    if (id >= 0) return (autopar_tensor *)g->nodes[id];
    ap_error(AUTOPAR_ERR_NOT_FOUND, "no tensor named '%s' in the graph", name);
    return NULL;
}

autopar_tensor *autopar_graph_loss(const autopar_graph *g) {
    if (!g || g->loss < 0) return NULL;
    return (autopar_tensor *)g->nodes[g->loss];
}

const char *ap_kind_name(autopar_kind k) {
    return (int)k >= 0 && k < AUTOPAR_KIND_COUNT ? kind_names[k] : "?";
}
const char *ap_phase_name(autopar_phase p) {
    return (int)p >= 0 && p < AUTOPAR_PHASE_COUNT ? phase_names[p] : "?";
}

/* ---- validation and printing ---------------------------------------------------------------- */

autopar_status autopar_graph_validate(const autopar_graph *g) {
    if (!g) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_validate: graph is NULL");
    if (g->status != AUTOPAR_OK)
        return ap_error(g->status, "graph has a sticky error: %s", g->error);
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        const ap_op_info *info = ap_op_info_get(n->op);
        if (n->id != i) return ap_error(AUTOPAR_ERR_GRAPH, "node %d '%s' has id %d", i, n->name, n->id);
        if (!info) return ap_error(AUTOPAR_ERR_UNKNOWN_OP, "node %d '%s': op %d", i, n->name, n->op);
        for (int k = 0; k < n->n_src; k++)
            if (n->src[k] < 0 || n->src[k] >= i)
                return ap_error(AUTOPAR_ERR_GRAPH, "node %d '%s': operand %d is node %d; operands "
                                "must precede their consumer", i, n->name, k, n->src[k]);
        ap_node copy = *n;
        char msg[400] = "";
        ap_status st = info->infer(g, &copy, msg, sizeof msg);
        if (st) return ap_error(st, "node %d '%s' (%s): %s", i, n->name, info->name, msg);
        if (!ap_shape_equal(&copy.shape, &n->shape) || copy.dtype != n->dtype) {
            char a[96], b[96];
            return ap_error(copy.dtype != n->dtype ? AUTOPAR_ERR_DTYPE : AUTOPAR_ERR_SHAPE,
                            "node %d '%s' (%s): stored %s %s, inferred %s %s", i, n->name,
                            info->name, n->dtype == AUTOPAR_I32 ? "i32" : "f32",
                            ap_shape_str(&n->shape, a, sizeof a),
                            copy.dtype == AUTOPAR_I32 ? "i32" : "f32",
                            ap_shape_str(&copy.shape, b, sizeof b));
        }
        int same = ap_graph_lookup(g, n->name);
        if (same != i)
            return ap_error(AUTOPAR_ERR_GRAPH, "nodes %d and %d are both named '%s'", same, i,
                            n->name);
        if (n->grad >= g->n_nodes || n->grad < -1 || (n->grad >= 0 && n->grad <= i))
            return ap_error(AUTOPAR_ERR_GRAPH, "node %d '%s': gradient link %d is invalid", i,
                            n->name, n->grad);
        if (n->grad >= 0 && !ap_shape_equal(&g->nodes[n->grad]->shape, &n->shape))
            return ap_error(AUTOPAR_ERR_GRAPH, "node %d '%s': gradient '%s' has another shape", i,
                            n->name, g->nodes[n->grad]->name);
        if (n->assign_to >= 0) {
            const ap_node *t = n->assign_to < g->n_nodes ? g->nodes[n->assign_to] : NULL;
            if (!t || (t->op != AP_OP_PARAM && t->op != AP_OP_OPT_STATE) ||
                !ap_shape_equal(&t->shape, &n->shape))
                return ap_error(AUTOPAR_ERR_GRAPH, "node %d '%s': assign_to %d is not a parameter "
                                "or optimizer state of the same shape", i, n->name, n->assign_to);
        } else if (n->assign_to != -1) {
            return ap_error(AUTOPAR_ERR_GRAPH, "node %d '%s': assign_to %d is invalid", i, n->name,
                            n->assign_to);
        }
    }
    if (g->loss >= g->n_nodes || g->loss < -1)
        return ap_error(AUTOPAR_ERR_GRAPH, "loss id %d is out of range", g->loss);
    if (g->loss >= 0 && g->nodes[g->loss]->shape.ndim != 0)
        return ap_error(AUTOPAR_ERR_GRAPH, "loss '%s' is not a scalar", g->nodes[g->loss]->name);
    return AUTOPAR_OK;
}

void autopar_graph_print(const autopar_graph *g, FILE *f) {
    if (!g || !f) return;
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        char sh[96];
        fprintf(f, "%4d %-24s %-20s (", i, n->name, ap_op_name(n->op));
        for (int k = 0; k < n->n_src; k++) fprintf(f, k ? ", %d" : "%d", n->src[k]);
        fprintf(f, ") %s %s %s %s layer %d\n", n->dtype == AUTOPAR_I32 ? "i32" : "f32",
                ap_shape_str(&n->shape, sh, sizeof sh), ap_kind_name(n->kind),
                ap_phase_name(n->phase), n->layer);
    }
}

void ap_kernel_call_from_node(const autopar_graph *g, const ap_node *n, autopar_precision p,
                              ap_kernel_call *call) {
    memset(call, 0, sizeof *call);
    call->op = n->op;
    call->attrs = n->attrs;
    call->precision = p;
    call->out_shape = n->shape;
    call->out_dtype = n->dtype;
    call->n_src = n->n_src;
    for (int k = 0; k < n->n_src; k++) {
        call->src_shape[k] = g->nodes[n->src[k]]->shape;
        call->src_dtype[k] = g->nodes[n->src[k]]->dtype;
    }
    call->name = n->name;
}

ap_status ap_graph_check_tensor(const autopar_graph *g, const autopar_tensor *t, int64_t n,
                                const char *fn, const char *whose) {
    const ap_node *node = (const ap_node *)t;
    if (node->id < 0 || node->id >= g->n_nodes || g->nodes[node->id] != node)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: tensor is not part of the %s graph", fn,
                        whose);
    if (n >= 0 && n != ap_shape_numel(&node->shape)) {
        char sh[96];
        return ap_error(AUTOPAR_ERR_SHAPE, "%s: tensor '%s' %s has %lld elements, got %lld", fn,
                        node->name, ap_shape_str(&node->shape, sh, sizeof sh),
                        (long long)ap_shape_numel(&node->shape), (long long)n);
    }
    return AUTOPAR_OK;
}
