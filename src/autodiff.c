/*
 * Reverse-mode autodiff as a graph pass: appends, for a scalar loss, the gradient of every
 * tensor on a path from a parameter to the loss. Each op's rule (ap_grad_<op>) expresses its
 * operands' gradients with other ops of the IR; contributions from several consumers are summed
 * by ap_grad_accumulate. Backward nodes inherit the layer of the forward node they differentiate.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Per-run state: which nodes need a gradient. Stored here rather than on the graph because it
 * only lives while autopar_backward runs. */
static _Thread_local const bool *grad_needed;

static bool needs_grad(int id) { return grad_needed && grad_needed[id]; }

ap_status ap_grad_accumulate(autopar_graph *g, int target, int contribution) {
    if (contribution < 0) return g->status ? g->status : AUTOPAR_ERR_GRAPH;
    ap_node *t = g->nodes[target];
    if (t->grad < 0) {
        t->grad = contribution;
        return AUTOPAR_OK;
    }
    int ops[2] = {t->grad, contribution};
    int sum = ap_emit(g, AP_OP_ADD, 2, ops, NULL, NULL);
    if (sum < 0) return g->status;
    t->grad = sum;
    return AUTOPAR_OK;
}

/* Emits `op` and accumulates the result into the gradient of `target`, when target needs one. */
static ap_status contribute(autopar_graph *g, int target, ap_op op, int n_src, const int *src,
                            const ap_attrs *attrs, const ap_shape *shape) {
    if (!needs_grad(target)) return AUTOPAR_OK;
    return ap_grad_accumulate(g, target, ap_emit(g, op, n_src, src, attrs, shape));
}

/* Reshapes id to the shape of node `like` when the shapes differ (same element count). */
static int reshape_like(autopar_graph *g, int id, int like) {
    if (id < 0) return -1;
    if (ap_shape_equal(&g->nodes[id]->shape, &g->nodes[like]->shape)) return id;
    return ap_emit(g, AP_OP_RESHAPE, 1, &id, NULL, &g->nodes[like]->shape);
}

static int emit_matmul(autopar_graph *g, ap_op op, int a, int b, int ta, int tb) {
    ap_attrs at = {0};
    at.i[0] = ta;
    at.i[1] = tb;
    int src[2] = {a, b};
    return ap_emit(g, op, 2, src, &at, NULL);
}

/* Shared by MATMUL and BATCH_MATMUL: C = op(A)·op(B) gives
 *   dA = dC·op(B)^T (or op(B)·dC^T when A is transposed),
 *   dB = op(A)^T·dC (or dC^T·op(A) when B is transposed). */
static ap_status grad_product(autopar_graph *g, const ap_node *n, int dy) {
    int a = n->src[0], b = n->src[1];
    int ta = n->attrs.i[0] != 0, tb = n->attrs.i[1] != 0;
    ap_op op = n->op;
    ap_status st;
    if (needs_grad(a)) {
        int da = !ta ? emit_matmul(g, op, dy, b, 0, !tb) : emit_matmul(g, op, b, dy, tb, 1);
        if ((st = ap_grad_accumulate(g, a, reshape_like(g, da, a)))) return st;
    }
    if (needs_grad(b)) {
        int db = !tb ? emit_matmul(g, op, a, dy, !ta, 0) : emit_matmul(g, op, dy, a, 1, ta);
        if ((st = ap_grad_accumulate(g, b, reshape_like(g, db, b)))) return st;
    }
    return AUTOPAR_OK;
}

ap_status ap_grad_matmul(autopar_graph *g, const ap_node *n, int dy) { return grad_product(g, n, dy); }
ap_status ap_grad_batch_matmul(autopar_graph *g, const ap_node *n, int dy) {
    return grad_product(g, n, dy);
}

/* Gradient of a broadcast operand: dy summed over the leading dims it was broadcast across. */
static int unbroadcast(autopar_graph *g, int dy, int operand) {
    if (dy < 0) return -1;
    if (ap_shape_equal(&g->nodes[dy]->shape, &g->nodes[operand]->shape)) return dy;
    return ap_emit(g, AP_OP_SUM_TO, 1, &dy, NULL, &g->nodes[operand]->shape);
}

ap_status ap_grad_add(autopar_graph *g, const ap_node *n, int dy) {
    ap_status st;
    if (needs_grad(n->src[0]) && (st = ap_grad_accumulate(g, n->src[0], dy))) return st;
    if (needs_grad(n->src[1]))
        return ap_grad_accumulate(g, n->src[1], unbroadcast(g, dy, n->src[1]));
    return AUTOPAR_OK;
}

ap_status ap_grad_sub(autopar_graph *g, const ap_node *n, int dy) {
    ap_status st;
    if (needs_grad(n->src[0]) && (st = ap_grad_accumulate(g, n->src[0], dy))) return st;
    if (needs_grad(n->src[1])) {
        int r = unbroadcast(g, dy, n->src[1]);
        ap_attrs neg = {0};
        neg.f[0] = -1.0;
        return contribute(g, n->src[1], AP_OP_SCALE, 1, &r, &neg, NULL);
    }
    return AUTOPAR_OK;
}

ap_status ap_grad_mul(autopar_graph *g, const ap_node *n, int dy) {
    ap_status st;
    int da_src[2] = {dy, n->src[1]};
    if ((st = contribute(g, n->src[0], AP_OP_MUL, 2, da_src, NULL, NULL))) return st;
    if (needs_grad(n->src[1])) {
        int db_src[2] = {dy, n->src[0]};
        int full = ap_emit(g, AP_OP_MUL, 2, db_src, NULL, NULL);
        return ap_grad_accumulate(g, n->src[1], unbroadcast(g, full, n->src[1]));
    }
    return AUTOPAR_OK;
}

ap_status ap_grad_scale(autopar_graph *g, const ap_node *n, int dy) {
    return contribute(g, n->src[0], AP_OP_SCALE, 1, &dy, &n->attrs, NULL);
}

ap_status ap_grad_relu(autopar_graph *g, const ap_node *n, int dy) {
    int src[2] = {dy, n->src[0]};
    return contribute(g, n->src[0], AP_OP_RELU_BACK, 2, src, NULL, NULL);
}

ap_status ap_grad_gelu(autopar_graph *g, const ap_node *n, int dy) {
    int src[2] = {dy, n->src[0]};
    return contribute(g, n->src[0], AP_OP_GELU_BACK, 2, src, NULL, NULL);
}

ap_status ap_grad_layernorm(autopar_graph *g, const ap_node *n, int dy) {
    int x = n->src[0], gain = n->src[1], bias = n->src[2];
    ap_status st;
    int dx_src[3] = {dy, x, gain};
    if ((st = contribute(g, x, AP_OP_LAYERNORM_BACK, 3, dx_src, &n->attrs, NULL))) return st;
    int dg_src[2] = {dy, x};
    if ((st = contribute(g, gain, AP_OP_LAYERNORM_BACK_GAIN, 2, dg_src, &n->attrs, NULL))) return st;
    if (needs_grad(bias)) return ap_grad_accumulate(g, bias, unbroadcast(g, dy, bias));
    return AUTOPAR_OK;
}

ap_status ap_grad_softmax(autopar_graph *g, const ap_node *n, int dy) {
    int src[2] = {n->id, dy};
    return contribute(g, n->src[0], AP_OP_SOFTMAX_BACK, 2, src, NULL, NULL);
}

ap_status ap_grad_reshape(autopar_graph *g, const ap_node *n, int dy) {
    return contribute(g, n->src[0], AP_OP_RESHAPE, 1, &dy, NULL, &g->nodes[n->src[0]]->shape);
}

ap_status ap_grad_permute(autopar_graph *g, const ap_node *n, int dy) {
    ap_attrs inv = {0};
    for (int i = 0; i < n->shape.ndim; i++) inv.i[n->attrs.i[i]] = i;
    return contribute(g, n->src[0], AP_OP_PERMUTE, 1, &dy, &inv, NULL);
}

ap_status ap_grad_slice(autopar_graph *g, const ap_node *n, int dy) {
    ap_attrs a = {0};
    a.i[0] = n->attrs.i[0];
    a.i[1] = n->attrs.i[1];
    a.i[2] = g->nodes[n->src[0]]->shape.dim[n->attrs.i[0]];
    return contribute(g, n->src[0], AP_OP_SLICE_BACK, 1, &dy, &a, NULL);
}

ap_status ap_grad_concat(autopar_graph *g, const ap_node *n, int dy) {
    int64_t axis = n->attrs.i[0], offset = 0;
    for (int k = 0; k < n->n_src; k++) {
        int64_t len = g->nodes[n->src[k]]->shape.dim[axis];
        ap_attrs a = {0};
        a.i[0] = axis;
        a.i[1] = offset;
        a.i[2] = len;
        ap_status st = contribute(g, n->src[k], AP_OP_SLICE, 1, &dy, &a, NULL);
        if (st) return st;
        offset += len;
    }
    return AUTOPAR_OK;
}

ap_status ap_grad_embedding(autopar_graph *g, const ap_node *n, int dy) {
    ap_attrs a = {0};
    a.i[0] = g->nodes[n->src[0]]->shape.dim[0];
    int src[2] = {dy, n->src[1]};
    return contribute(g, n->src[0], AP_OP_EMBEDDING_BACK, 2, src, &a, NULL);
}

static ap_status grad_reduce(autopar_graph *g, const ap_node *n, int dy, bool mean) {
    const ap_node *x = g->nodes[n->src[0]];
    int64_t axis = n->attrs.i[0];
    int64_t count = axis == -1 ? ap_shape_numel(&x->shape) : x->shape.dim[axis];
    ap_attrs a = {0};
    a.i[0] = axis;
    a.f[0] = mean ? 1.0 / (double)count : 1.0;
    return contribute(g, x->id, AP_OP_EXPAND, 1, &dy, &a, &x->shape);
}

ap_status ap_grad_sum(autopar_graph *g, const ap_node *n, int dy) { return grad_reduce(g, n, dy, false); }
ap_status ap_grad_mean(autopar_graph *g, const ap_node *n, int dy) { return grad_reduce(g, n, dy, true); }

ap_status ap_grad_mse_loss(autopar_graph *g, const ap_node *n, int dy) {
    int src[3] = {dy, n->src[0], n->src[1]};
    bool dp = needs_grad(n->src[0]), dt = needs_grad(n->src[1]);
    if (!dp && !dt) return AUTOPAR_OK;
    int d = ap_emit(g, AP_OP_MSE_LOSS_BACK, 3, src, NULL, NULL);
    if (d < 0) return g->status;
    ap_status st;
    if (dp && (st = ap_grad_accumulate(g, n->src[0], d))) return st;
    if (dt) {
        ap_attrs neg = {0};
        neg.f[0] = -1.0;
        return contribute(g, n->src[1], AP_OP_SCALE, 1, &d, &neg, NULL);
    }
    return AUTOPAR_OK;
}

ap_status ap_grad_cross_entropy(autopar_graph *g, const ap_node *n, int dy) {
    int src[3] = {dy, n->src[0], n->src[1]};
    return contribute(g, n->src[0], AP_OP_CROSS_ENTROPY_BACK, 3, src, NULL, NULL);
}

/* Operands through which no gradient flows: integer ids and labels. */
static bool differentiable_operand(const autopar_graph *g, const ap_node *n, int k) {
    return g->nodes[n->src[k]]->dtype == AUTOPAR_F32;
}

autopar_status autopar_backward(autopar_graph *g, autopar_tensor *loss_t) {
    if (!g) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_backward: graph is NULL");
    if (g->status != AUTOPAR_OK) return ap_error(g->status, "%s", g->error);
    const ap_node *loss = (const ap_node *)loss_t;
    if (!loss || loss->id < 0 || loss->id >= g->n_nodes || g->nodes[loss->id] != loss)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "autopar_backward: loss is NULL or not a tensor of this graph");
    if (g->loss >= 0)
        return ap_error(AUTOPAR_ERR_GRAPH, "autopar_backward: the backward pass was already built "
                        "(loss '%s')", g->nodes[g->loss]->name);
    if (loss->shape.ndim != 0 || loss->dtype != AUTOPAR_F32) {
        char sh[96];
        return ap_error(AUTOPAR_ERR_SHAPE, "autopar_backward: loss '%s' must be an f32 scalar, "
                        "it has shape %s", loss->name, ap_shape_str(&loss->shape, sh, sizeof sh));
    }

    int n_fwd = loss->id + 1;
    bool *need = calloc((size_t)g->n_nodes + 1, sizeof *need);
    bool *reaches = calloc((size_t)g->n_nodes + 1, sizeof *reaches);
    if (!need || !reaches) {
        free(need);
        free(reaches);
        return ap_graph_fail(g, AUTOPAR_ERR_NOMEM, "autopar_backward: out of memory");
    }
    /* Forward sweep: depends on a parameter. Backward sweep: feeds the loss. */
    for (int i = 0; i < n_fwd; i++) {
        const ap_node *n = g->nodes[i];
        need[i] = n->op == AP_OP_PARAM;
        for (int k = 0; k < n->n_src && !need[i]; k++)
            need[i] = need[n->src[k]] && differentiable_operand(g, n, k);
    }
    reaches[loss->id] = true;
    for (int i = n_fwd - 1; i >= 0; i--)
        if (reaches[i])
            for (int k = 0; k < g->nodes[i]->n_src; k++) reaches[g->nodes[i]->src[k]] = true;
    bool any_param = false;
    for (int i = 0; i < n_fwd; i++) {
        need[i] = need[i] && reaches[i];
        any_param |= need[i] && g->nodes[i]->op == AP_OP_PARAM;
    }
    free(reaches);
    if (!any_param) {
        free(need);
        return ap_error(AUTOPAR_ERR_GRAPH, "autopar_backward: no parameter reaches the loss '%s'",
                        loss->name);
    }
    for (int i = 0; i < n_fwd; i++) {
        const ap_node *n = g->nodes[i];
        if (need[i] && n->op != AP_OP_PARAM && !ap_op_info_get(n->op)->backward) {
            free(need);
            return ap_error(AUTOPAR_ERR_UNSUPPORTED, "autopar_backward: op %s ('%s') has no "
                            "gradient rule but lies between a parameter and the loss",
                            ap_op_name(n->op), n->name);
        }
    }

    grad_needed = need;
    g->current_phase = AUTOPAR_PHASE_BACKWARD;
    g->current_fwd = loss->id;
    ap_attrs one = {0};
    one.f[0] = 1.0;
    ap_shape scalar = {0};
    ap_node *seed = ap_graph_add(g, AP_OP_FILL, 0, NULL, &one, &scalar, AUTOPAR_F32, "loss.grad_seed");
    ap_status st = seed ? AUTOPAR_OK : g->status;
    if (seed) g->nodes[loss->id]->grad = seed->id;
    for (int i = loss->id; i >= 0 && st == AUTOPAR_OK; i--) {
        const ap_node *n = g->nodes[i];
        if (!need[i] || n->op == AP_OP_PARAM || n->grad < 0) continue;
        g->current_fwd = i;
        st = ap_op_info_get(n->op)->backward(g, n, n->grad);
    }
    grad_needed = NULL;
    g->current_fwd = -1;
    /* Give parameter gradients readable names ("w1.grad") when the name is free. */
    for (int i = 0; i < n_fwd && st == AUTOPAR_OK; i++) {
        ap_node *p = g->nodes[i];
        if (p->op != AP_OP_PARAM || p->grad < 0) continue;
        char name[AP_MAX_NAME + 8];
        snprintf(name, sizeof name, "%s.grad", p->name);
        /* a gradient node shared by two parameters keeps the first parameter's name */
        if (strlen(name) < AP_MAX_NAME && ap_graph_lookup(g, name) < 0 &&
            !strstr(g->nodes[p->grad]->name, ".grad"))
            st = ap_graph_rename(g, p->grad, name);
    }
    free(need);
    if (st != AUTOPAR_OK) return st;
    autopar_clear_error();
    g->loss = loss->id;
    return AUTOPAR_OK;
}

autopar_tensor *autopar_grad(const autopar_graph *g, const autopar_tensor *t) {
    const ap_node *n = (const ap_node *)t;
    if (!g || !n || n->id < 0 || n->id >= g->n_nodes || g->nodes[n->id] != n || n->grad < 0)
        return NULL;
    return (autopar_tensor *)g->nodes[n->grad];
}
