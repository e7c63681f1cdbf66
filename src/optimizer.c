/*
 * Optimizer pass: appends, for every parameter with a gradient, its update ops (phase APPLY)
 * and its state tensors. Each update result names, in assign_to, the parameter or state it
 * replaces at the end of the step, so executors and later passes treat updates as ordinary
 * ops followed by a copy (or a buffer swap).
 */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

void autopar_optimizer_default(autopar_optimizer *o) {
    if (!o) return;
    o->kind = AUTOPAR_OPT_ADAMW;
    o->lr = 1e-3f;
    o->momentum = 0.9f;
    o->beta1 = 0.9f;
    o->beta2 = 0.999f;
    o->eps = 1e-8f;
    o->weight_decay = 0.0f;
}

static ap_status check_options(const autopar_optimizer *o) {
    if ((int)o->kind < 0 || o->kind >= AUTOPAR_OPT_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "optimizer kind %d is not valid",
                             (int)o->kind);
    if (!(o->lr >= 0.0f) || !isfinite(o->lr))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "optimizer lr %g must be >= 0", o->lr);
    if (!(o->weight_decay >= 0.0f))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "optimizer weight_decay %g must be >= 0",
                             o->weight_decay);
    if (o->kind == AUTOPAR_OPT_MOMENTUM && !(o->momentum >= 0.0f && o->momentum < 1.0f))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "momentum %g must be in [0, 1)",
                             o->momentum);
    if (o->kind == AUTOPAR_OPT_ADAMW &&
        !(o->beta1 >= 0.0f && o->beta1 < 1.0f && o->beta2 >= 0.0f && o->beta2 < 1.0f &&
          o->eps > 0.0f))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "AdamW needs 0 <= beta1, beta2 < 1 and "
                             "eps > 0 (got %g, %g, %g)", o->beta1, o->beta2, o->eps);
    return AUTOPAR_OK;
}

static int add_state(autopar_graph *g, const ap_node *p, const char *suffix) {
    char name[AP_MAX_NAME + 16];
    snprintf(name, sizeof name, "%s.%s", p->name, suffix);
    if (strlen(name) >= AP_MAX_NAME) snprintf(name, sizeof name, "opt%d.%s", p->id, suffix);
    ap_attrs a = {0};
    a.i[0] = p->id;
    ap_node *s = ap_graph_add(g, AP_OP_OPT_STATE, 0, NULL, &a, &p->shape, AUTOPAR_F32, name);
    return s ? s->id : -1;
}

/* Emits an APPLY op replacing `target` (a parameter or state). */
static int emit_update(autopar_graph *g, ap_op op, int n_src, const int *src, const ap_attrs *a,
                       int target) {
    int id = ap_emit(g, op, n_src, src, a, NULL);
    if (id >= 0) g->nodes[id]->assign_to = target;
    return id;
}

static ap_status update_param(autopar_graph *g, const ap_node *p, const autopar_optimizer *o) {
    int grad = p->grad;
    ap_attrs a = {0};
    switch (o->kind) {
    case AUTOPAR_OPT_SGD:
    case AUTOPAR_OPT_MOMENTUM: {
        int step_dir = grad;
        if (o->kind == AUTOPAR_OPT_MOMENTUM) {
            int vel = add_state(g, p, "velocity");
            if (vel < 0) return g->status;
            ap_attrs m = {0};
            m.f[0] = o->momentum;
            int src[2] = {vel, grad};
            step_dir = emit_update(g, AP_OP_MOMENTUM_UPDATE, 2, src, &m, vel);
            if (step_dir < 0) return g->status;
        }
        a.f[0] = o->lr;
        a.f[1] = o->weight_decay;
        int src[2] = {p->id, step_dir};
        return emit_update(g, AP_OP_SGD_UPDATE, 2, src, &a, p->id) < 0 ? g->status : AUTOPAR_OK;
    }
    case AUTOPAR_OPT_ADAMW: {
        int m = add_state(g, p, "adam_m"), v = m < 0 ? -1 : add_state(g, p, "adam_v");
        if (v < 0) return g->status;
        ap_attrs b1 = {0}, b2 = {0};
        b1.f[0] = o->beta1;
        b2.f[0] = o->beta2;
        int ms[2] = {m, grad}, vs[2] = {v, grad};
        int m_new = emit_update(g, AP_OP_ADAM_M, 2, ms, &b1, m);
        int v_new = m_new < 0 ? -1 : emit_update(g, AP_OP_ADAM_V, 2, vs, &b2, v);
        if (v_new < 0) return g->status;
        a.f[0] = o->lr;
        a.f[1] = o->beta1;
        a.f[2] = o->beta2;
        a.f[3] = o->eps;
        a.f[4] = o->weight_decay;
        int src[3] = {p->id, m_new, v_new};
        return emit_update(g, AP_OP_ADAMW_UPDATE, 3, src, &a, p->id) < 0 ? g->status : AUTOPAR_OK;
    }
    default:
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "optimizer kind %d", (int)o->kind);
    }
}

autopar_status autopar_apply_optimizer(autopar_graph *g, const autopar_optimizer *o) {
    if (!g || !o) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_apply_optimizer: NULL argument");
    if (g->status != AUTOPAR_OK) return ap_error(g->status, "%s", g->error);
    if (g->loss < 0)
        return ap_error(AUTOPAR_ERR_GRAPH, "autopar_apply_optimizer: call autopar_backward first");
    if (g->has_optimizer)
        return ap_error(AUTOPAR_ERR_GRAPH, "autopar_apply_optimizer: already applied");
    ap_status st = check_options(o);
    if (st) return st;
    g->current_phase = AUTOPAR_PHASE_APPLY;
    int n_params = g->n_nodes;
    for (int i = 0; i < n_params && st == AUTOPAR_OK; i++) {
        const ap_node *p = g->nodes[i];
        if (p->op != AP_OP_PARAM || p->grad < 0) continue;
        g->current_fwd = i;
        st = update_param(g, p, o);
    }
    g->current_fwd = -1;
    if (st) return st;
    g->has_optimizer = true;
    g->optimizer = *o;
    return AUTOPAR_OK;
}

autopar_status autopar_build_training(autopar_graph *g, autopar_tensor *loss,
                                      const autopar_optimizer *o) {
    ap_status st = autopar_backward(g, loss);
    return st ? st : autopar_apply_optimizer(g, o);
}
