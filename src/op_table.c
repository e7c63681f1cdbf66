/*
 * The op table: one row per op with its name, operand count, shape/dtype inference and
 * gradient rule (the rules live in autodiff.c). Shape inference is the single place where
 * operand shapes are checked, for builders and for graphs read from JSON alike.
 */
#include "internal.h"

#include <assert.h>
#include <stdio.h>
#include <string.h>

/* Gradient rules, defined in autodiff.c. */
#define AP_GRAD(op) AP_INTERNAL ap_status ap_grad_##op(autopar_graph *g, const ap_node *n, int dy);
AP_GRAD(matmul)
AP_GRAD(batch_matmul)
AP_GRAD(add)
AP_GRAD(sub)
AP_GRAD(mul)
AP_GRAD(scale)
AP_GRAD(relu)
AP_GRAD(gelu)
AP_GRAD(layernorm)
AP_GRAD(softmax)
AP_GRAD(reshape)
AP_GRAD(permute)
AP_GRAD(slice)
AP_GRAD(concat)
AP_GRAD(embedding)
AP_GRAD(sum)
AP_GRAD(mean)
AP_GRAD(mse_loss)
AP_GRAD(cross_entropy)
#undef AP_GRAD

#define FAIL(st, ...) do { snprintf(msg, msg_len, __VA_ARGS__); return (st); } while (0)
#define SRC(k) (g->nodes[n->src[k]])
#define SHAPE_STR(s, buf) ap_shape_str((s), (buf), sizeof(buf))

static const char *dtype_name(ap_dtype t) { return t == AUTOPAR_I32 ? "i32" : "f32"; }

/* Every operand must be F32 (all differentiable ops). */
static ap_status require_f32(const autopar_graph *g, const ap_node *n, char *msg, size_t msg_len) {
    for (int k = 0; k < n->n_src; k++)
        if (SRC(k)->dtype != AUTOPAR_F32)
            FAIL(AUTOPAR_ERR_DTYPE, "operand %d '%s' has dtype %s, expected f32", k, SRC(k)->name,
                 dtype_name(SRC(k)->dtype));
    return AUTOPAR_OK;
}

static ap_status same_shape_as(const autopar_graph *g, const ap_node *n, int k, int ref, char *msg,
                               size_t msg_len) {
    if (!ap_shape_equal(&SRC(k)->shape, &SRC(ref)->shape)) {
        char a[96], b[96];
        FAIL(AUTOPAR_ERR_SHAPE, "operand %d '%s' %s must have the shape of operand %d '%s' %s", k,
             SRC(k)->name, SHAPE_STR(&SRC(k)->shape, a), ref, SRC(ref)->name,
             SHAPE_STR(&SRC(ref)->shape, b));
    }
    return AUTOPAR_OK;
}

/* true when `suffix` equals the trailing dims of `full`. */
static bool is_suffix(const ap_shape *suffix, const ap_shape *full) {
    if (suffix->ndim > full->ndim) return false;
    int off = full->ndim - suffix->ndim;
    for (int i = 0; i < suffix->ndim; i++)
        if (suffix->dim[i] != full->dim[off + i]) return false;
    return true;
}

static ap_status check_node_shape(const ap_node *n, char *msg, size_t msg_len) {
    if (n->shape.ndim < 0 || n->shape.ndim > AP_MAX_DIMS)
        FAIL(AUTOPAR_ERR_SHAPE, "rank %d outside 0..%d", n->shape.ndim, AP_MAX_DIMS);
    int64_t numel = 1;
    for (int i = 0; i < n->shape.ndim; i++) {
        if (n->shape.dim[i] <= 0)
            FAIL(AUTOPAR_ERR_SHAPE, "dim %d is %lld, dims must be positive", i,
                 (long long)n->shape.dim[i]);
        if (n->shape.dim[i] > AP_MAX_NUMEL / numel)
            FAIL(AUTOPAR_ERR_SHAPE, "more than 2^48 elements");
        numel *= n->shape.dim[i];
    }
    return AUTOPAR_OK;
}

/* ---- leaves -------------------------------------------------------------------------------- */

static ap_status infer_leaf(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = check_node_shape(n, msg, msg_len);
    if (st) return st;
    if (n->dtype != AUTOPAR_F32 && n->dtype != AUTOPAR_I32)
        FAIL(AUTOPAR_ERR_DTYPE, "dtype %d is not a valid autopar_dtype", (int)n->dtype);
    switch (n->op) {
    case AP_OP_INPUT:
        if (n->attrs.i[0] < -1 || n->attrs.i[0] >= n->shape.ndim)
            FAIL(AUTOPAR_ERR_INVALID_ARG, "batch_dim %lld outside -1..%d", (long long)n->attrs.i[0],
                 n->shape.ndim - 1);
        break;
    case AP_OP_PARAM:
        if (n->dtype != AUTOPAR_F32) FAIL(AUTOPAR_ERR_DTYPE, "parameters must be f32");
        if (n->attrs.i[0] < 0 || n->attrs.i[0] >= AUTOPAR_INIT_COUNT)
            FAIL(AUTOPAR_ERR_INVALID_ARG, "init kind %lld is not a valid autopar_init",
                 (long long)n->attrs.i[0]);
        if (!(n->attrs.f[0] >= 0.0)) FAIL(AUTOPAR_ERR_INVALID_ARG, "init scale must be >= 0");
        break;
    case AP_OP_OPT_STATE: {
        int64_t p = n->attrs.i[0];
        if (n->dtype != AUTOPAR_F32) FAIL(AUTOPAR_ERR_DTYPE, "optimizer state must be f32");
        if (p < 0 || p >= g->n_nodes || g->nodes[p]->op != AP_OP_PARAM)
            FAIL(AUTOPAR_ERR_GRAPH, "optimizer state refers to node %lld, which is not a parameter",
                 (long long)p);
        if (!ap_shape_equal(&g->nodes[p]->shape, &n->shape))
            FAIL(AUTOPAR_ERR_SHAPE, "optimizer state shape differs from parameter '%s'",
                 g->nodes[p]->name);
        break;
    }
    default: /* AP_OP_FILL */
        if (n->dtype != AUTOPAR_F32) FAIL(AUTOPAR_ERR_DTYPE, "fill must be f32");
        break;
    }
    return AUTOPAR_OK;
}

/* ---- matrix products ---------------------------------------------------------------------- */

/* The 2-D view used by MATMUL: rows = product of all dims but the last. */
static void matrix_view(const ap_shape *s, int trans, int64_t *rows, int64_t *cols) {
    int64_t r = 1;
    for (int i = 0; i + 1 < s->ndim; i++) r *= s->dim[i];
    int64_t c = s->dim[s->ndim - 1];
    *rows = trans ? c : r;
    *cols = trans ? r : c;
}

static ap_status infer_matmul(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    const ap_shape *a = &SRC(0)->shape, *b = &SRC(1)->shape;
    char sa[96], sb[96];
    if (a->ndim < 2 || b->ndim < 2)
        FAIL(AUTOPAR_ERR_SHAPE, "operands must have rank >= 2, got a '%s' %s and b '%s' %s",
             SRC(0)->name, SHAPE_STR(a, sa), SRC(1)->name, SHAPE_STR(b, sb));
    int ta = n->attrs.i[0] != 0, tb = n->attrs.i[1] != 0;
    int64_t m, k, k2, nn;
    matrix_view(a, ta, &m, &k);
    matrix_view(b, tb, &k2, &nn);
    if (k != k2)
        FAIL(AUTOPAR_ERR_SHAPE,
             "inner dims differ: a '%s' %s (trans_a=%d) gives k=%lld but b '%s' %s (trans_b=%d) "
             "gives k=%lld",
             SRC(0)->name, SHAPE_STR(a, sa), ta, (long long)k, SRC(1)->name, SHAPE_STR(b, sb), tb,
             (long long)k2);
    n->dtype = AUTOPAR_F32;
    if (!ta) {
        n->shape = *a;
        n->shape.dim[a->ndim - 1] = nn;
    } else {
        n->shape.ndim = 2;
        n->shape.dim[0] = m;
        n->shape.dim[1] = nn;
    }
    return AUTOPAR_OK;
}

static ap_status infer_batch_matmul(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    const ap_shape *a = &SRC(0)->shape, *b = &SRC(1)->shape;
    char sa[96], sb[96];
    int r = a->ndim;
    if (r < 3 || b->ndim != r)
        FAIL(AUTOPAR_ERR_SHAPE, "operands must have equal rank 3 or 4, got a '%s' %s and b '%s' %s",
             SRC(0)->name, SHAPE_STR(a, sa), SRC(1)->name, SHAPE_STR(b, sb));
    for (int i = 0; i < r - 2; i++)
        if (a->dim[i] != b->dim[i])
            FAIL(AUTOPAR_ERR_SHAPE, "batch dim %d differs: a '%s' %s, b '%s' %s", i, SRC(0)->name,
                 SHAPE_STR(a, sa), SRC(1)->name, SHAPE_STR(b, sb));
    int ta = n->attrs.i[0] != 0, tb = n->attrs.i[1] != 0;
    int64_t m = ta ? a->dim[r - 1] : a->dim[r - 2], k = ta ? a->dim[r - 2] : a->dim[r - 1];
    int64_t k2 = tb ? b->dim[r - 1] : b->dim[r - 2], nn = tb ? b->dim[r - 2] : b->dim[r - 1];
    if (k != k2)
        FAIL(AUTOPAR_ERR_SHAPE, "inner dims differ: a '%s' %s (trans_a=%d) k=%lld, b '%s' %s "
             "(trans_b=%d) k=%lld", SRC(0)->name, SHAPE_STR(a, sa), ta, (long long)k,
             SRC(1)->name, SHAPE_STR(b, sb), tb, (long long)k2);
    n->dtype = AUTOPAR_F32;
    n->shape = *a;
    n->shape.dim[r - 2] = m;
    n->shape.dim[r - 1] = nn;
    return AUTOPAR_OK;
}

/* ---- elementwise --------------------------------------------------------------------------- */

static ap_status infer_broadcast_binary(const autopar_graph *g, ap_node *n, char *msg,
                                        size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    if (!is_suffix(&SRC(1)->shape, &SRC(0)->shape)) {
        char sa[96], sb[96];
        FAIL(AUTOPAR_ERR_SHAPE, "b '%s' %s must equal a '%s' %s or a suffix of it (bias broadcast)",
             SRC(1)->name, SHAPE_STR(&SRC(1)->shape, sb), SRC(0)->name,
             SHAPE_STR(&SRC(0)->shape, sa));
    }
    n->dtype = AUTOPAR_F32;
    n->shape = SRC(0)->shape;
    return AUTOPAR_OK;
}

/* Unary ops and ops whose operands all share the first operand's shape. */
static ap_status infer_same_shape(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    for (int k = 1; k < n->n_src; k++)
        if ((st = same_shape_as(g, n, k, 0, msg, msg_len))) return st;
    n->dtype = AUTOPAR_F32;
    n->shape = SRC(0)->shape;
    return AUTOPAR_OK;
}

static ap_status check_last_dim_vector(const autopar_graph *g, const ap_node *n, int k,
                                       int64_t c, char *msg, size_t msg_len) {
    const ap_shape *s = &SRC(k)->shape;
    if (s->ndim != 1 || s->dim[0] != c) {
        char b[96];
        FAIL(AUTOPAR_ERR_SHAPE, "operand %d '%s' %s must have shape [%lld] (the last dim of x)", k,
             SRC(k)->name, SHAPE_STR(s, b), (long long)c);
    }
    return AUTOPAR_OK;
}

static ap_status infer_layernorm(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    const ap_shape *x = &SRC(0)->shape;
    if (x->ndim < 1) FAIL(AUTOPAR_ERR_SHAPE, "x '%s' must have rank >= 1", SRC(0)->name);
    int64_t c = x->dim[x->ndim - 1];
    if ((st = check_last_dim_vector(g, n, 1, c, msg, msg_len))) return st;
    if ((st = check_last_dim_vector(g, n, 2, c, msg, msg_len))) return st;
    if (!(n->attrs.f[0] > 0.0)) FAIL(AUTOPAR_ERR_INVALID_ARG, "eps must be > 0");
    n->dtype = AUTOPAR_F32;
    n->shape = *x;
    return AUTOPAR_OK;
}

static ap_status infer_layernorm_back(const autopar_graph *g, ap_node *n, char *msg,
                                      size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    if ((st = same_shape_as(g, n, 1, 0, msg, msg_len))) return st;
    const ap_shape *x = &SRC(1)->shape;
    if (x->ndim < 1) FAIL(AUTOPAR_ERR_SHAPE, "x '%s' must have rank >= 1", SRC(1)->name);
    int64_t c = x->dim[x->ndim - 1];
    n->dtype = AUTOPAR_F32;
    if (n->op == AP_OP_LAYERNORM_BACK) {
        if ((st = check_last_dim_vector(g, n, 2, c, msg, msg_len))) return st;
        n->shape = *x;
    } else {
        n->shape.ndim = 1;
        n->shape.dim[0] = c;
    }
    return AUTOPAR_OK;
}

static ap_status infer_softmax(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    const ap_shape *x = &SRC(0)->shape;
    if (x->ndim < 1) FAIL(AUTOPAR_ERR_SHAPE, "x '%s' must have rank >= 1", SRC(0)->name);
    if (n->attrs.i[0]) {
        char b[96];
        if (x->ndim < 2 || x->dim[x->ndim - 1] != x->dim[x->ndim - 2])
            FAIL(AUTOPAR_ERR_SHAPE, "causal softmax needs square last two dims, x '%s' is %s",
                 SRC(0)->name, SHAPE_STR(x, b));
    }
    if (n->attrs.i[1] != 0)
        FAIL(AUTOPAR_ERR_INVALID_ARG, "attribute ia[1] (a row offset) is set by the runtime's "
             "lowering; graphs leave it 0");
    n->dtype = AUTOPAR_F32;
    n->shape = *x;
    return AUTOPAR_OK;
}

static ap_status infer_softmax_back(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    return infer_same_shape(g, n, msg, msg_len);
}

/* ---- data movement ------------------------------------------------------------------------- */

static ap_status infer_reshape(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = check_node_shape(n, msg, msg_len);
    if (st) return st;
    const ap_shape *x = &SRC(0)->shape;
    if (ap_shape_numel(x) != ap_shape_numel(&n->shape)) {
        char a[96], b[96];
        FAIL(AUTOPAR_ERR_SHAPE, "cannot reshape '%s' %s (%lld elements) to %s (%lld elements)",
             SRC(0)->name, SHAPE_STR(x, a), (long long)ap_shape_numel(x), SHAPE_STR(&n->shape, b),
             (long long)ap_shape_numel(&n->shape));
    }
    n->dtype = SRC(0)->dtype;
    n->attrs.i[0] = n->shape.ndim;
    for (int i = 0; i < AP_MAX_DIMS; i++) n->attrs.i[1 + i] = i < n->shape.ndim ? n->shape.dim[i] : 0;
    return AUTOPAR_OK;
}

static ap_status infer_permute(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    const ap_shape *x = &SRC(0)->shape;
    bool seen[AP_MAX_DIMS] = {false};
    for (int i = 0; i < x->ndim; i++) {
        int64_t p = n->attrs.i[i];
        if (p < 0 || p >= x->ndim || seen[p])
            FAIL(AUTOPAR_ERR_INVALID_ARG, "perm is not a permutation of 0..%d (entry %d is %lld)",
                 x->ndim - 1, i, (long long)p);
        seen[p] = true;
    }
    n->dtype = SRC(0)->dtype;
    n->shape.ndim = x->ndim;
    for (int i = 0; i < x->ndim; i++) n->shape.dim[i] = x->dim[n->attrs.i[i]];
    return AUTOPAR_OK;
}

static ap_status infer_slice(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    const ap_shape *x = &SRC(0)->shape;
    int64_t axis = n->attrs.i[0], start = n->attrs.i[1], len = n->attrs.i[2];
    if (axis < 0 || axis >= x->ndim)
        FAIL(AUTOPAR_ERR_INVALID_ARG, "axis %lld outside 0..%d", (long long)axis, x->ndim - 1);
    if (start < 0 || len < 1 || start + len > x->dim[axis])
        FAIL(AUTOPAR_ERR_SHAPE, "range [%lld, %lld) outside axis %lld of '%s' (length %lld)",
             (long long)start, (long long)(start + len), (long long)axis, SRC(0)->name,
             (long long)x->dim[axis]);
    n->dtype = SRC(0)->dtype;
    n->shape = *x;
    n->shape.dim[axis] = len;
    return AUTOPAR_OK;
}

static ap_status infer_slice_back(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    const ap_shape *dy = &SRC(0)->shape;
    int64_t axis = n->attrs.i[0], start = n->attrs.i[1], full = n->attrs.i[2];
    if (axis < 0 || axis >= dy->ndim)
        FAIL(AUTOPAR_ERR_INVALID_ARG, "axis %lld outside 0..%d", (long long)axis, dy->ndim - 1);
    if (start < 0 || start + dy->dim[axis] > full)
        FAIL(AUTOPAR_ERR_SHAPE, "slice [%lld, %lld) does not fit a full length of %lld",
             (long long)start, (long long)(start + dy->dim[axis]), (long long)full);
    n->dtype = AUTOPAR_F32;
    n->shape = *dy;
    n->shape.dim[axis] = full;
    return AUTOPAR_OK;
}

static ap_status infer_concat(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    const ap_shape *x0 = &SRC(0)->shape;
    int64_t axis = n->attrs.i[0];
    if (axis < 0 || axis >= x0->ndim)
        FAIL(AUTOPAR_ERR_INVALID_ARG, "axis %lld outside 0..%d", (long long)axis, x0->ndim - 1);
    n->shape = *x0;
    for (int k = 1; k < n->n_src; k++) {
        const ap_shape *xk = &SRC(k)->shape;
        if (SRC(k)->dtype != SRC(0)->dtype)
            FAIL(AUTOPAR_ERR_DTYPE, "operand %d '%s' has dtype %s, operand 0 has %s", k,
                 SRC(k)->name, dtype_name(SRC(k)->dtype), dtype_name(SRC(0)->dtype));
        bool ok = xk->ndim == x0->ndim;
        for (int i = 0; ok && i < x0->ndim; i++)
            if (i != axis && xk->dim[i] != x0->dim[i]) ok = false;
        if (!ok) {
            char a[96], b[96];
            FAIL(AUTOPAR_ERR_SHAPE, "operand %d '%s' %s does not match operand 0 '%s' %s off axis "
                 "%lld", k, SRC(k)->name, SHAPE_STR(xk, b), SRC(0)->name, SHAPE_STR(x0, a),
                 (long long)axis);
        }
        n->shape.dim[axis] += xk->dim[axis];
    }
    n->dtype = SRC(0)->dtype;
    return AUTOPAR_OK;
}

static ap_status infer_embedding(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    const ap_node *table = SRC(0), *ids = SRC(1);
    char b[96];
    if (table->dtype != AUTOPAR_F32)
        FAIL(AUTOPAR_ERR_DTYPE, "table '%s' must be f32", table->name);
    if (ids->dtype != AUTOPAR_I32)
        FAIL(AUTOPAR_ERR_DTYPE, "ids '%s' must be i32, got %s", ids->name, dtype_name(ids->dtype));
    if (table->shape.ndim != 2)
        FAIL(AUTOPAR_ERR_SHAPE, "table '%s' %s must be [vocab, dim]", table->name,
             SHAPE_STR(&table->shape, b));
    if (ids->shape.ndim >= AP_MAX_DIMS)
        FAIL(AUTOPAR_ERR_SHAPE, "ids '%s' has rank %d; at most %d", ids->name, ids->shape.ndim,
             AP_MAX_DIMS - 1);
    if (n->attrs.i[0] != 0 || n->attrs.i[1] != 0)
        FAIL(AUTOPAR_ERR_INVALID_ARG, "attributes ia[0], ia[1] (a partial table's rows) are set "
             "by the runtime's lowering; graphs leave them 0");
    n->dtype = AUTOPAR_F32;
    n->shape = ids->shape;
    n->shape.dim[n->shape.ndim++] = table->shape.dim[1];
    return AUTOPAR_OK;
}

static ap_status infer_embedding_back(const autopar_graph *g, ap_node *n, char *msg,
                                      size_t msg_len) {
    const ap_node *dy = SRC(0), *ids = SRC(1);
    char a[96], b[96];
    if (dy->dtype != AUTOPAR_F32) FAIL(AUTOPAR_ERR_DTYPE, "dy '%s' must be f32", dy->name);
    if (ids->dtype != AUTOPAR_I32) FAIL(AUTOPAR_ERR_DTYPE, "ids '%s' must be i32", ids->name);
    bool ok = dy->shape.ndim == ids->shape.ndim + 1;
    for (int i = 0; ok && i < ids->shape.ndim; i++) ok = dy->shape.dim[i] == ids->shape.dim[i];
    if (!ok)
        FAIL(AUTOPAR_ERR_SHAPE, "dy '%s' %s must be ids '%s' %s plus one dim", dy->name,
             SHAPE_STR(&dy->shape, a), ids->name, SHAPE_STR(&ids->shape, b));
    if (n->attrs.i[0] < 1) FAIL(AUTOPAR_ERR_INVALID_ARG, "vocabulary size must be >= 1");
    n->dtype = AUTOPAR_F32;
    n->shape.ndim = 2;
    n->shape.dim[0] = n->attrs.i[0];
    n->shape.dim[1] = dy->shape.dim[dy->shape.ndim - 1];
    return AUTOPAR_OK;
}

/* ---- reductions and their adjoints --------------------------------------------------------- */

static ap_status infer_reduce(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    const ap_shape *x = &SRC(0)->shape;
    int64_t axis = n->attrs.i[0];
    n->dtype = AUTOPAR_F32;
    if (axis == -1) {
        n->shape.ndim = 0;
        return AUTOPAR_OK;
    }
    if (axis < 0 || axis >= x->ndim)
        FAIL(AUTOPAR_ERR_INVALID_ARG, "axis %lld outside 0..%d of '%s'", (long long)axis,
             x->ndim - 1, SRC(0)->name);
    n->shape.ndim = 0;
    for (int i = 0; i < x->ndim; i++)
        if (i != axis) n->shape.dim[n->shape.ndim++] = x->dim[i];
    return AUTOPAR_OK;
}

static ap_status infer_sum_to(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    if ((st = check_node_shape(n, msg, msg_len))) return st;
    if (!is_suffix(&n->shape, &SRC(0)->shape)) {
        char a[96], b[96];
        FAIL(AUTOPAR_ERR_SHAPE, "target %s is not a suffix of '%s' %s", SHAPE_STR(&n->shape, b),
             SRC(0)->name, SHAPE_STR(&SRC(0)->shape, a));
    }
    n->dtype = AUTOPAR_F32;
    return AUTOPAR_OK;
}

static ap_status infer_expand(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    if ((st = check_node_shape(n, msg, msg_len))) return st;
    const ap_shape *x = &SRC(0)->shape;
    int64_t axis = n->attrs.i[0];
    char a[96], b[96];
    if (axis == -1) {
        if (x->ndim != 0)
            FAIL(AUTOPAR_ERR_SHAPE, "expanding to a whole shape needs a scalar, '%s' is %s",
                 SRC(0)->name, SHAPE_STR(x, a));
    } else {
        bool ok = axis >= 0 && axis < n->shape.ndim && x->ndim == n->shape.ndim - 1;
        for (int i = 0, j = 0; ok && i < n->shape.ndim; i++)
            if (i != axis) ok = x->dim[j++] == n->shape.dim[i];
        if (!ok)
            FAIL(AUTOPAR_ERR_SHAPE, "'%s' %s is not %s with axis %lld removed", SRC(0)->name,
                 SHAPE_STR(x, a), SHAPE_STR(&n->shape, b), (long long)axis);
    }
    n->dtype = AUTOPAR_F32;
    return AUTOPAR_OK;
}

/* ---- losses -------------------------------------------------------------------------------- */

static ap_status infer_mse(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    if ((st = same_shape_as(g, n, 1, 0, msg, msg_len))) return st;
    n->dtype = AUTOPAR_F32;
    n->shape.ndim = 0;
    return AUTOPAR_OK;
}

static ap_status check_scalar(const autopar_graph *g, const ap_node *n, int k, char *msg,
                              size_t msg_len) {
    if (SRC(k)->shape.ndim != 0 || SRC(k)->dtype != AUTOPAR_F32)
        FAIL(AUTOPAR_ERR_SHAPE, "operand %d '%s' must be an f32 scalar", k, SRC(k)->name);
    return AUTOPAR_OK;
}

static ap_status infer_mse_back(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    ap_status st = require_f32(g, n, msg, msg_len);
    if (st) return st;
    if ((st = check_scalar(g, n, 0, msg, msg_len))) return st;
    if ((st = same_shape_as(g, n, 2, 1, msg, msg_len))) return st;
    n->dtype = AUTOPAR_F32;
    n->shape = SRC(1)->shape;
    return AUTOPAR_OK;
}

/* logits at operand `lk`, labels at `lk + 1`. */
static ap_status check_logits_labels(const autopar_graph *g, const ap_node *n, int lk, char *msg,
                                     size_t msg_len) {
    const ap_node *logits = SRC(lk), *labels = SRC(lk + 1);
    char a[96], b[96];
    if (logits->dtype != AUTOPAR_F32)
        FAIL(AUTOPAR_ERR_DTYPE, "logits '%s' must be f32", logits->name);
    if (labels->dtype != AUTOPAR_I32)
        FAIL(AUTOPAR_ERR_DTYPE, "labels '%s' must be i32, got %s", labels->name,
             dtype_name(labels->dtype));
    bool ok = logits->shape.ndim >= 1 && labels->shape.ndim == logits->shape.ndim - 1;
    for (int i = 0; ok && i < labels->shape.ndim; i++)
        ok = labels->shape.dim[i] == logits->shape.dim[i];
    if (!ok)
        FAIL(AUTOPAR_ERR_SHAPE, "labels '%s' %s must be the leading dims of logits '%s' %s",
             labels->name, SHAPE_STR(&labels->shape, b), logits->name,
             SHAPE_STR(&logits->shape, a));
    return AUTOPAR_OK;
}

static ap_status infer_cross_entropy(const autopar_graph *g, ap_node *n, char *msg,
                                     size_t msg_len) {
    ap_status st = check_logits_labels(g, n, 0, msg, msg_len);
    if (st) return st;
    n->dtype = AUTOPAR_F32;
    n->shape.ndim = 0;
    return AUTOPAR_OK;
}

static ap_status infer_cross_entropy_back(const autopar_graph *g, ap_node *n, char *msg,
                                          size_t msg_len) {
    ap_status st = check_scalar(g, n, 0, msg, msg_len);
    if (st) return st;
    if ((st = check_logits_labels(g, n, 1, msg, msg_len))) return st;
    n->dtype = AUTOPAR_F32;
    n->shape = SRC(1)->shape;
    return AUTOPAR_OK;
}

/* Ops only the runtime's lowering emits (internal.h): not accepted in graphs. */
static ap_status infer_kernel_only(const autopar_graph *g, ap_node *n, char *msg, size_t msg_len) {
    (void)g;
    (void)n;
    FAIL(AUTOPAR_ERR_UNSUPPORTED, "a kernel of the runtime's lowering, not an op of graphs");
}

/* ---- the table ----------------------------------------------------------------------------- */

static const ap_op_info op_table[AP_OP_COUNT] = {
    [AP_OP_INPUT]              = {"input", 0, infer_leaf, NULL},
    [AP_OP_PARAM]              = {"param", 0, infer_leaf, NULL},
    [AP_OP_OPT_STATE]          = {"opt_state", 0, infer_leaf, NULL},
    [AP_OP_FILL]               = {"fill", 0, infer_leaf, NULL},
    [AP_OP_MATMUL]             = {"matmul", 2, infer_matmul, ap_grad_matmul},
    [AP_OP_BATCH_MATMUL]       = {"batch_matmul", 2, infer_batch_matmul, ap_grad_batch_matmul},
    [AP_OP_ADD]                = {"add", 2, infer_broadcast_binary, ap_grad_add},
    [AP_OP_SUB]                = {"sub", 2, infer_broadcast_binary, ap_grad_sub},
    [AP_OP_MUL]                = {"mul", 2, infer_broadcast_binary, ap_grad_mul},
    [AP_OP_SCALE]              = {"scale", 1, infer_same_shape, ap_grad_scale},
    [AP_OP_RELU]               = {"relu", 1, infer_same_shape, ap_grad_relu},
    [AP_OP_GELU]               = {"gelu", 1, infer_same_shape, ap_grad_gelu},
    [AP_OP_LAYERNORM]          = {"layernorm", 3, infer_layernorm, ap_grad_layernorm},
    [AP_OP_SOFTMAX]            = {"softmax", 1, infer_softmax, ap_grad_softmax},
    [AP_OP_RESHAPE]            = {"reshape", 1, infer_reshape, ap_grad_reshape},
    [AP_OP_PERMUTE]            = {"permute", 1, infer_permute, ap_grad_permute},
    [AP_OP_SLICE]              = {"slice", 1, infer_slice, ap_grad_slice},
    [AP_OP_CONCAT]             = {"concat", -1, infer_concat, ap_grad_concat},
    [AP_OP_EMBEDDING]          = {"embedding", 2, infer_embedding, ap_grad_embedding},
    [AP_OP_SUM]                = {"sum", 1, infer_reduce, ap_grad_sum},
    [AP_OP_MEAN]               = {"mean", 1, infer_reduce, ap_grad_mean},
    [AP_OP_MSE_LOSS]           = {"mse_loss", 2, infer_mse, ap_grad_mse_loss},
    [AP_OP_CROSS_ENTROPY]      = {"cross_entropy", 2, infer_cross_entropy, ap_grad_cross_entropy},
    [AP_OP_RELU_BACK]          = {"relu_back", 2, infer_same_shape, NULL},
    [AP_OP_GELU_BACK]          = {"gelu_back", 2, infer_same_shape, NULL},
    [AP_OP_LAYERNORM_BACK]     = {"layernorm_back", 3, infer_layernorm_back, NULL},
    [AP_OP_LAYERNORM_BACK_GAIN] = {"layernorm_back_gain", 2, infer_layernorm_back, NULL},
    [AP_OP_SOFTMAX_BACK]       = {"softmax_back", 2, infer_softmax_back, NULL},
    [AP_OP_SLICE_BACK]         = {"slice_back", 1, infer_slice_back, NULL},
    [AP_OP_EMBEDDING_BACK]     = {"embedding_back", 2, infer_embedding_back, NULL},
    [AP_OP_SUM_TO]             = {"sum_to", 1, infer_sum_to, NULL},
    [AP_OP_EXPAND]             = {"expand", 1, infer_expand, NULL},
    [AP_OP_MSE_LOSS_BACK]      = {"mse_loss_back", 3, infer_mse_back, NULL},
    [AP_OP_CROSS_ENTROPY_BACK] = {"cross_entropy_back", 3, infer_cross_entropy_back, NULL},
    [AP_OP_SGD_UPDATE]         = {"sgd_update", 2, infer_same_shape, NULL},
    [AP_OP_MOMENTUM_UPDATE]    = {"momentum_update", 2, infer_same_shape, NULL},
    [AP_OP_ADAM_M]             = {"adam_m", 2, infer_same_shape, NULL},
    [AP_OP_ADAM_V]             = {"adam_v", 2, infer_same_shape, NULL},
    [AP_OP_ADAMW_UPDATE]       = {"adamw_update", 3, infer_same_shape, NULL},
    [AP_OP_CE_PARTIAL]         = {"ce_partial", 2, infer_kernel_only, NULL, true},
    [AP_OP_CE_COMBINE]         = {"ce_combine", 1, infer_kernel_only, NULL, true},
    [AP_OP_CE_BACK_PARTIAL]    = {"ce_back_partial", 4, infer_kernel_only, NULL, true},
};
_Static_assert(AP_OP_COUNT == 42, "a new op needs a row in op_table (and kernels, and a test)");

const ap_op_info *ap_op_info_get(ap_op op) {
    if ((int)op < 0 || op >= AP_OP_COUNT) return NULL;
    return &op_table[op];
}

const char *ap_op_name(ap_op op) {
    const ap_op_info *info = ap_op_info_get(op);
    return info ? info->name : "?";
}

ap_op ap_op_from_name(const char *name) {
    if (!name) return AP_OP_COUNT;
    for (int i = 0; i < AP_OP_COUNT; i++)
        if (strcmp(op_table[i].name, name) == 0) return (ap_op)i;
    return AP_OP_COUNT;
}

/* ---- cost figures ---------------------------------------------------------------------------- */

double ap_node_flops(const autopar_graph *g, const ap_node *n) {
    double out = (double)ap_shape_numel(&n->shape);
    switch (n->op) {
    case AP_OP_MATMUL: {
        int64_t m, k, k2, nn;
        matrix_view(&SRC(0)->shape, n->attrs.i[0] != 0, &m, &k);
        matrix_view(&SRC(1)->shape, n->attrs.i[1] != 0, &k2, &nn);
        return 2.0 * (double)m * (double)k * (double)nn;
    }
    case AP_OP_BATCH_MATMUL: {
        const ap_shape *a = &SRC(0)->shape;
        int r = a->ndim;
        double k = (double)(n->attrs.i[0] ? a->dim[r - 2] : a->dim[r - 1]);
        return 2.0 * out * k;
    }
    case AP_OP_INPUT: case AP_OP_PARAM: case AP_OP_OPT_STATE: case AP_OP_RESHAPE:
    case AP_OP_PERMUTE: case AP_OP_SLICE: case AP_OP_CONCAT: case AP_OP_EMBEDDING:
    case AP_OP_SLICE_BACK:
        return 0.0;
    case AP_OP_FILL:
        return 0.0;
    case AP_OP_GELU: case AP_OP_GELU_BACK:
        return 12.0 * out;
    case AP_OP_LAYERNORM: case AP_OP_LAYERNORM_BACK:
        return 8.0 * out;
    case AP_OP_LAYERNORM_BACK_GAIN:
        return 4.0 * (double)ap_shape_numel(&SRC(0)->shape);
    case AP_OP_SOFTMAX: case AP_OP_SOFTMAX_BACK:
        return 5.0 * out;
    case AP_OP_SUM: case AP_OP_MEAN: case AP_OP_SUM_TO: case AP_OP_MSE_LOSS:
    case AP_OP_EMBEDDING_BACK:
        return (double)ap_shape_numel(&SRC(0)->shape) * (n->op == AP_OP_MSE_LOSS ? 3.0 : 1.0);
    case AP_OP_CROSS_ENTROPY: case AP_OP_CROSS_ENTROPY_BACK:
        return 4.0 * (double)ap_shape_numel(&SRC(n->op == AP_OP_CROSS_ENTROPY ? 0 : 1)->shape);
    case AP_OP_ADAMW_UPDATE:
        return 10.0 * out;
    case AP_OP_ADAM_M: case AP_OP_ADAM_V:
        return 3.0 * out;
    default:
        return out;
    }
}

double ap_node_bytes(const autopar_graph *g, const ap_node *n) {
    double bytes = (double)ap_shape_numel(&n->shape) * (double)ap_dtype_size(n->dtype);
    for (int k = 0; k < n->n_src; k++)
        bytes += (double)ap_shape_numel(&SRC(k)->shape) * (double)ap_dtype_size(SRC(k)->dtype);
    return bytes;
}
