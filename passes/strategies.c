/*
 * Strategy generation for every op of the IR, and follower merging (reference/alpa-notes.md
 * §1.5, §1.6; docs/intra-op.md has the tables).
 *
 * Three kinds of nodes:
 *  - leaves (input, param, fill, external operands): their own list of output specs;
 *  - heavy ops (matmul, batch_matmul, embedding, embedding_back): every assignment of a "role"
 *    to each mesh axis of size > 1 (split a row / batch dim, a column dim, the contracted dim,
 *    or nothing); the contracted role leaves a pending sum that the op finishes itself with an
 *    all-reduce (or, for parameter gradients with prefer_reduce_scatter, a reduce-scatter);
 *  - light ops (everything else): followers. A light op follows one operand (the deepest one of
 *    its own shape, or its leaf for optimizer updates) in the same layer, and mirrors that
 *    operand's strategy list: its strategy j is derived from the operand's output spec under
 *    strategy j. When that spec cannot be used as is (a reshape that would need an unexpressible
 *    split, a slice along a split dim), the follower asks for a spec it can use and the
 *    resharding becomes part of the merged strategy's cost. A light op whose operand lies in
 *    another layer becomes a root that enumerates the operand's specs instead (so groups never
 *    span layers, which the per-layer reuse relies on).
 *  - expand (the adjoint of sum / mean) is a root of its own: every spec of its result, the
 *    operand read in that spec without the inserted dim (see gen_expand).
 */
#include "shard_internal.h"

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Spec helpers                                                                                */
/* ------------------------------------------------------------------------------------------ */

static unsigned dim_axes(uint8_t d) {
    return d == AP_DIM_S0 ? 1u : d == AP_DIM_S1 ? 2u : d == AP_DIM_S01 ? 3u : 0u;
}

/* The dim spec after splitting d further over `axis` as the minor axis; AP_DIM_SPEC_COUNT when
 * the result is not one of the four dim specs (S1 then axis 0). */
static uint8_t dim_push(uint8_t d, int axis) {
    if (d == AP_DIM_R) return axis == 0 ? AP_DIM_S0 : AP_DIM_S1;
    if (d == AP_DIM_S0 && axis == 1) return AP_DIM_S01;
    return AP_DIM_SPEC_COUNT;
}

static unsigned spec_axes(const ap_spec *s) {
    unsigned u = 0;
    for (int d = 0; d < s->ndim; d++) u |= dim_axes(s->dim[d]);
    return u;
}

static bool spec_all_r(const ap_spec *s) { return spec_axes(s) == 0 && s->partial == 0; }

static int dim_parts(const ap_mesh *m, uint8_t d) {
    return d == AP_DIM_S0 ? m->shape[0] : d == AP_DIM_S1 ? m->shape[1]
         : d == AP_DIM_S01 ? m->n_devices : 1;
}

static bool spec_divides(const ap_mesh *m, const ap_spec *s, const ap_shape *shape) {
    for (int d = 0; d < s->ndim; d++)
        if (shape->dim[d] % dim_parts(m, s->dim[d]) != 0) return false;
    return true;
}

static int64_t spec_tiles(const ap_mesh *m, const ap_spec *s) {
    int64_t t = 1;
    for (int d = 0; d < s->ndim; d++) t *= dim_parts(m, s->dim[d]);
    return t;
}

/* Axes of size 1 never carry a split or a pending sum in our specs. */
static unsigned live_axes(const ap_mesh *m) {
    return (m->shape[0] > 1 ? 1u : 0u) | (m->shape[1] > 1 ? 2u : 0u);
}

AP_INTERNAL int ap_shard_enum_specs(const ap_mesh *m, const ap_shape *shape, bool allow_s01,
                                    ap_spec *out) {
    int n = 0, nd = shape->ndim;
    int lo0 = m->shape[0] > 1 ? nd : 0, lo1 = m->shape[1] > 1 ? nd : 0;
    for (int a0 = -1; a0 < lo0; a0++) {
        for (int a1 = -1; a1 < lo1; a1++) {
            ap_spec s = ap_spec_replicated(nd);
            if (a0 >= 0) s.dim[a0] = AP_DIM_S0;
            if (a1 >= 0) {
                if (a1 == a0) {
                    if (!allow_s01) continue;
                    s.dim[a1] = AP_DIM_S01;
                } else {
                    s.dim[a1] = AP_DIM_S1;
                }
            }
            if (!spec_divides(m, &s, shape)) continue;
            out[n++] = s;
        }
    }
    return n;
}

AP_INTERNAL double ap_shard_local_bytes(const ap_mesh *m, const ap_spec *s, const ap_shape *shape,
                                        double elem) {
    return (double)ap_shape_numel(shape) / (double)spec_tiles(m, s) * elem;
}

AP_INTERNAL int ap_shard_own_push(ap_shard_problem *p, const ap_collective *c) {
    if (p->n_own == p->cap_own) {
        int cap = p->cap_own ? 2 * p->cap_own : 256;
        ap_collective *nc = realloc(p->own, (size_t)cap * sizeof *nc);
        if (!nc) return -1;
        p->own = nc;
        p->cap_own = cap;
    }
    p->own[p->n_own] = *c;
    return p->n_own++;
}

/* ------------------------------------------------------------------------------------------ */
/* Following                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static bool is_heavy_or_leaf(ap_op op) {
    switch (op) {
    case AP_OP_INPUT: case AP_OP_PARAM: case AP_OP_FILL: case AP_OP_MATMUL:
    case AP_OP_BATCH_MATMUL: case AP_OP_EMBEDDING: case AP_OP_EMBEDDING_BACK:
        return true;
    default:
        return false;
    }
}

/* Ops whose strategy list is their own, not mirrored from an operand: leaves, heavy ops, and
 * expand, whose result may be split more than its operand (gen_expand). */
static bool is_root_op(ap_op op) { return is_heavy_or_leaf(op) || op == AP_OP_EXPAND; }

/* Operand index a light op follows (or derives from when it is a root). OPT_STATE: -1 (it
 * follows its parameter, which is not an operand). */
static int follow_operand(const autopar_graph *g, const ap_node *v) {
    if (v->op == AP_OP_OPT_STATE || v->n_src == 0) return -1;
    /* Optimizer updates follow the leaf they replace: the alias (update spec == leaf spec) then
     * holds by construction. */
    if (v->assign_to >= 0) return 0;
    switch (v->op) {
    case AP_OP_ADD: case AP_OP_SUB: case AP_OP_MUL: case AP_OP_RELU_BACK: case AP_OP_GELU_BACK:
    case AP_OP_SOFTMAX_BACK: case AP_OP_LAYERNORM_BACK: case AP_OP_MSE_LOSS_BACK:
    case AP_OP_CROSS_ENTROPY_BACK: {
        /* The deepest operand of the output's shape (Alpa: prefer the operand produced later). */
        int best = -1;
        for (int k = 0; k < v->n_src; k++) {
            const ap_node *u = ap_src(g, v, k);
            if (!ap_shape_equal(&u->shape, &v->shape)) continue;
            if (best < 0 || u->id > v->src[best]) best = k;
        }
        return best >= 0 ? best : 0;
    }
    case AP_OP_CONCAT: {
        int best = 0;
        for (int k = 1; k < v->n_src; k++)
            if (v->src[k] > v->src[best]) best = k;
        return best;
    }
    default:
        return 0;
    }
}

AP_INTERNAL void ap_shard_pick_follow(ap_shard_problem *p) {
    const autopar_graph *g = p->g;
    for (int id = 0; id < p->n; id++) {
        p->follow[id] = -1;
        if (p->role[id] != AP_ROLE_STAGE) continue;   /* externals are leaves */
        const ap_node *v = g->nodes[id];
        if (is_root_op(v->op)) continue;
        int u;
        if (v->op == AP_OP_OPT_STATE) {
            u = (int)v->attrs.i[0];
            if (u < 0 || u >= p->n || p->role[u] == AP_ROLE_NONE) continue;
            p->follow[id] = u;   /* co-sharded with its parameter, whatever the layers say */
            continue;
        }
        int k = follow_operand(g, v);
        if (k < 0) continue;
        u = v->src[k];
        if (p->role[u] == AP_ROLE_NONE) continue;
        if (v->assign_to < 0 && p->layer[u] != p->layer[id]) continue;   /* layer boundary */
        p->follow[id] = u;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Finishing a node strategy: own collectives, compute cost, memory                            */
/* ------------------------------------------------------------------------------------------ */

static ap_status own_allreduce(ap_shard_problem *p, ap_nstrat *ns, unsigned mask, double bytes) {
    const ap_mesh *m = p->mesh;
    mask &= live_axes(m);
    if (!mask || bytes <= 0) return AUTOPAR_OK;
    ap_collective c[2];
    int nc = 0;
    memset(c, 0, sizeof c);
    ap_spec from = ap_spec_replicated(0), to = ap_spec_replicated(0);
    from.partial = (uint8_t)mask;
    if (mask == 3u) {
        double t_flat = ap_mesh_collective_time(m, AP_COLL_ALL_REDUCE, AP_AXIS_FLAT, bytes);
        double t0 = ap_mesh_collective_time(m, AP_COLL_ALL_REDUCE, AP_AXIS_0, bytes);
        double t1 = ap_mesh_collective_time(m, AP_COLL_ALL_REDUCE, AP_AXIS_1, bytes);
        if (t_flat <= t0 + t1) {
            c[nc++] = (ap_collective){AP_COLL_ALL_REDUCE, AP_AXIS_FLAT, bytes, t_flat, from, to};
        } else {
            ap_spec mid = ap_spec_replicated(0);
            mid.partial = AP_PARTIAL_1;
            c[nc++] = (ap_collective){AP_COLL_ALL_REDUCE, AP_AXIS_0, bytes, t0, from, mid};
            c[nc++] = (ap_collective){AP_COLL_ALL_REDUCE, AP_AXIS_1, bytes, t1, mid, to};
        }
    } else {
        ap_mesh_axis ax = mask == 1u ? AP_AXIS_0 : AP_AXIS_1;
        c[nc++] = (ap_collective){AP_COLL_ALL_REDUCE, ax, bytes,
                                  ap_mesh_collective_time(m, AP_COLL_ALL_REDUCE, ax, bytes), from,
                                  to};
    }
    for (int i = 0; i < nc; i++) {
        int idx = ap_shard_own_push(p, &c[i]);
        if (idx < 0) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        if (ns->n_own == 0) ns->own_first = idx;
        ns->n_own++;
        ns->comm += c[i].time;
    }
    return AUTOPAR_OK;
}

/* Adds the collectives that turn the op's result from `pre` (maybe partial) into `fin`. */
static ap_status own_reshard(ap_shard_problem *p, const ap_node *v, ap_nstrat *ns,
                             const ap_spec *pre, const ap_spec *fin) {
    if (ap_spec_equal(pre, fin)) return AUTOPAR_OK;
    double t = 0;
    const ap_reshard *r = NULL;
    if (!ap_shard_reshard(p, v->id, pre, fin, &t, &r)) {
        ns->ok = false;
        return AUTOPAR_OK;
    }
    for (int i = 0; r && i < r->n_steps; i++) {
        int idx = ap_shard_own_push(p, &r->step[i]);
        if (idx < 0) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        if (ns->n_own == 0) ns->own_first = idx;
        ns->n_own++;
    }
    ns->comm += t;
    return AUTOPAR_OK;
}

/* Compute time of node v under ns: its FLOPs divided over `div` devices, its bytes from the
 * local shapes of its operands and result (roofline). */
static double node_compute(const ap_shard_problem *p, const ap_node *v, const ap_nstrat *ns,
                           int64_t div) {
    if (p->opt.communication_only || !p->cluster) return 0.0;
    if (v->n_src == 0) return 0.0;   /* leaves hold data, they do not compute */
    const autopar_graph *g = p->g;
    double bytes = ap_shard_local_bytes(p->mesh, &ns->out, &v->shape, 4.0);
    for (int k = 0; k < v->n_src; k++)
        bytes += ap_shard_local_bytes(p->mesh, &ns->in[k], &ap_src(g, v, k)->shape, 4.0);
    if (div < 1) div = 1;
    double flops = ap_node_flops(g, v) / (double)div;
    if (flops == 0.0 && bytes == 0.0) return 0.0;
    return ap_compute_time(p->cluster, flops, bytes, p->opt.flop_type, 1.0);
}

/* Common tail of a node strategy: own collectives (row statistics, then pre -> fin), compute
 * with the work divided max(tiles of any operand or result) ways unless div > 0, memory. */
static ap_status finish(ap_shard_problem *p, const ap_node *v, ap_nstrat *ns, const ap_spec *pre,
                        const ap_spec *fin, unsigned stats_axes, double stats_bytes,
                        int64_t div) {
    ap_status st = own_allreduce(p, ns, stats_axes, stats_bytes);
    if (st) return st;
    if ((st = own_reshard(p, v, ns, pre, fin))) return st;
    ns->out = *fin;
    ns->aux = *fin;
    if (div <= 0) {
        /* the operands' splits divide the work (a reduced split dim shows up there) */
        div = spec_tiles(p->mesh, pre);
        for (int k = 0; k < v->n_src; k++) {
            int64_t t = spec_tiles(p->mesh, &ns->in[k]);
            if (t > div) div = t;
        }
    }
    ns->compute = node_compute(p, v, ns, div);
    ns->mem = v->assign_to >= 0 ? 0.0 : ap_shard_local_bytes(p->mesh, fin, &v->shape, 4.0);
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Light ops: derive a node strategy from the followed operand's spec                          */
/* ------------------------------------------------------------------------------------------ */

/* s without dim `axis` (rank - 1); the axes that split it are returned in *removed. */
static ap_spec spec_drop_dim(const ap_spec *s, int axis, unsigned *removed) {
    ap_spec r = ap_spec_replicated(s->ndim - 1);
    *removed = dim_axes(s->dim[axis]);
    for (int d = 0, o = 0; d < s->ndim; d++)
        if (d != axis) r.dim[o++] = s->dim[d];
    return r;
}

/* The trailing `nd` dims of s; *removed gets the axes that split the leading ones. */
static ap_spec spec_suffix(const ap_spec *s, int nd, unsigned *removed) {
    ap_spec r = ap_spec_replicated(nd);
    int off = s->ndim - nd;
    unsigned rem = 0;
    for (int d = 0; d < s->ndim; d++) {
        if (d < off)
            rem |= dim_axes(s->dim[d]);
        else
            r.dim[d - off] = s->dim[d];
    }
    if (removed) *removed = rem;
    return r;
}

/* Derives node v's strategy ns from its followed operand (operand index fk, or -1 for an
 * optimizer state following its parameter) whose strategy is f. */
static ap_status derive(ap_shard_problem *p, const ap_node *v, int fk, const ap_nstrat *f,
                        ap_nstrat *ns) {
    const autopar_graph *g = p->g;
    const ap_mesh *m = p->mesh;
    const ap_spec s = f->out;
    memset(ns, 0, sizeof *ns);
    ns->ok = true;
    ap_spec pre = s;               /* result before the op's own reduction */
    unsigned stats_axes = 0;
    double stats_bytes = 0;
    const ap_shape *fshape = fk >= 0 ? &ap_src(g, v, fk)->shape : &v->shape;
    int last = s.ndim - 1;
    /* rows of the followed operand held per device (for row statistics) */
    double local_rows = 0;
    if (s.ndim > 0) {
        double loc = ap_shard_local_bytes(m, &s, fshape, 1.0);
        local_rows = loc / ((double)fshape->dim[last] / (double)dim_parts(m, s.dim[last]));
    }
    unsigned last_axes = s.ndim > 0 ? dim_axes(s.dim[last]) : 0;

    switch (v->op) {
    case AP_OP_OPT_STATE:
        pre = f->aux;
        ns->penalty = p->opt.communication_only && spec_all_r(&pre) && p->mesh->n_devices > 1
                          ? p->penalty_value : 0.0;
        break;
    case AP_OP_ADD: case AP_OP_SUB: case AP_OP_MUL: case AP_OP_SCALE: case AP_OP_RELU:
    case AP_OP_GELU: case AP_OP_RELU_BACK: case AP_OP_GELU_BACK: case AP_OP_MSE_LOSS_BACK:
    case AP_OP_SOFTMAX: case AP_OP_SOFTMAX_BACK: case AP_OP_LAYERNORM:
    case AP_OP_LAYERNORM_BACK: case AP_OP_CROSS_ENTROPY_BACK:
    case AP_OP_SGD_UPDATE: case AP_OP_MOMENTUM_UPDATE: case AP_OP_ADAM_M: case AP_OP_ADAM_V:
    case AP_OP_ADAMW_UPDATE: {
        ap_spec c = s;   /* spec the op computes in */
        bool param_update = v->assign_to >= 0 && g->nodes[v->assign_to]->op == AP_OP_PARAM &&
                            fk == 0 && v->src[0] == v->assign_to;
        if (param_update) c = f->aux;   /* ZeRO: compute sharded, gather the new parameter */
        for (int k = 0; k < v->n_src; k++) {
            const ap_node *u = ap_src(g, v, k);
            if (u->shape.ndim == v->shape.ndim && ap_shape_equal(&u->shape, &v->shape))
                ns->in[k] = c;
            else if (u->shape.ndim == 0)
                ns->in[k] = ap_spec_replicated(0);
            else
                ns->in[k] = spec_suffix(&c, u->shape.ndim, NULL);   /* broadcast operand */
        }
        if (v->op == AP_OP_CROSS_ENTROPY_BACK) {
            unsigned rem;
            ns->in[2] = spec_drop_dim(&c, last, &rem);
            stats_axes = last_axes;
            stats_bytes = 2.0 * 4.0 * local_rows;
        } else if (v->op == AP_OP_LAYERNORM || v->op == AP_OP_SOFTMAX) {
            stats_axes = last_axes;   /* mean and variance / max and sum per row */
            stats_bytes = 2.0 * 4.0 * local_rows;
        } else if (v->op == AP_OP_LAYERNORM_BACK) {
            stats_axes = last_axes;   /* statistics, then two row sums of the gradient */
            stats_bytes = 4.0 * 4.0 * local_rows;
        } else if (v->op == AP_OP_SOFTMAX_BACK) {
            stats_axes = last_axes;
            stats_bytes = 1.0 * 4.0 * local_rows;
        }
        pre = c;
        if (param_update) {
            ap_status st = finish(p, v, ns, &c, &f->out, 0, 0, 0);
            return st;
        }
        break;
    }
    case AP_OP_LAYERNORM_BACK_GAIN: {
        ns->in[0] = s;
        ns->in[1] = s;
        unsigned rem;
        pre = spec_suffix(&s, 1, &rem);
        pre.partial = (uint8_t)(rem & live_axes(m));
        stats_axes = last_axes;
        stats_bytes = 2.0 * 4.0 * local_rows;
        break;
    }
    case AP_OP_RESHAPE: {
        ap_spec in_ok, o;
        ap_spec_reshape(m, fshape, &s, &v->shape, &in_ok, &o);
        ns->in[0] = in_ok;
        pre = o;
        break;
    }
    case AP_OP_PERMUTE: {
        ns->in[0] = s;
        pre = ap_spec_replicated(v->shape.ndim);
        for (int d = 0; d < v->shape.ndim; d++) pre.dim[d] = s.dim[v->attrs.i[d]];
        break;
    }
    case AP_OP_SLICE: case AP_OP_SLICE_BACK: case AP_OP_CONCAT: {
        ap_spec c = s;
        c.dim[v->attrs.i[0]] = AP_DIM_R;   /* the sliced / concatenated axis stays whole */
        for (int k = 0; k < v->n_src; k++) ns->in[k] = c;
        pre = c;
        break;
    }
    case AP_OP_SUM: case AP_OP_MEAN: {
        ns->in[0] = s;
        unsigned rem;
        if (v->attrs.i[0] < 0) {
            rem = spec_axes(&s);
            pre = ap_spec_replicated(0);
        } else {
            pre = spec_drop_dim(&s, (int)v->attrs.i[0], &rem);
        }
        pre.partial = (uint8_t)(rem & live_axes(m));
        break;
    }
    case AP_OP_SUM_TO: {
        ns->in[0] = s;
        unsigned rem;
        pre = spec_suffix(&s, v->shape.ndim, &rem);
        pre.partial = (uint8_t)(rem & live_axes(m));
        break;
    }
    case AP_OP_MSE_LOSS: {
        ns->in[0] = s;
        ns->in[1] = s;
        pre = ap_spec_replicated(0);
        pre.partial = (uint8_t)(spec_axes(&s) & live_axes(m));
        break;
    }
    case AP_OP_CROSS_ENTROPY: {
        ns->in[0] = s;
        unsigned rem;
        ns->in[1] = spec_drop_dim(&s, last, &rem);
        stats_axes = last_axes;   /* max, sum of exponentials and the label's logit per row */
        stats_bytes = 3.0 * 4.0 * local_rows;
        pre = ap_spec_replicated(0);
        pre.partial = (uint8_t)(spec_axes(&ns->in[1]) & live_axes(m));
        break;
    }
    default:
        /* Every op of the IR is handled above or is a root op (leaf, heavy op, expand). */
        ns->ok = false;
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "sharding: no strategy rule for op %s ('%s')",
                        ap_op_name(v->op), v->name);
    }
    ap_spec fin = pre;
    /* A scalar nobody reads (the loss) keeps its pending sum: whoever fetches it sums over the
     * mesh; a training step does not need it reduced. */
    if (!(fin.ndim == 0 && !p->read[v->id])) fin.partial = 0;
    return finish(p, v, ns, &pre, &fin, stats_axes, stats_bytes, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Heavy ops: axis roles                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* A role splits dim d[0] of operand 0, d[1] of operand 1 and d[2] of the result (-1 = not
 * split). A role with d[2] < 0 that splits an operand contracts over the axis: a pending sum. */
typedef struct hrole {
    int8_t d[3];
    bool   batch;   /* a batch dim of batch_matmul */
} hrole;

#define MAX_ROLES 16

static int add_role(hrole *r, int n, int a, int b, int o, bool batch) {
    if (n >= MAX_ROLES) return n;
    r[n].d[0] = (int8_t)a;
    r[n].d[1] = (int8_t)b;
    r[n].d[2] = (int8_t)o;
    r[n].batch = batch;
    return n + 1;
}

static int heavy_roles(const autopar_graph *g, const ap_node *v, hrole *r) {
    int n = add_role(r, 0, -1, -1, -1, false);   /* role 0: the axis is not used */
    const ap_shape *A = &ap_src(g, v, 0)->shape, *B = &ap_src(g, v, 1)->shape;
    int ra = A->ndim, rb = B->ndim;
    switch (v->op) {
    case AP_OP_MATMUL: {
        int ta = v->attrs.i[0] != 0, tb = v->attrs.i[1] != 0;
        int am[AP_MAX_DIMS] = {0}, ak[AP_MAX_DIMS] = {0}, bk[AP_MAX_DIMS] = {0}, bn[AP_MAX_DIMS] = {0};
        int nam = 0, nak = 0, nbk = 0, nbn = 0;
        for (int d = 0; d < ra; d++) {
            bool lead = d < ra - 1;
            if (lead != (bool)ta) am[nam++] = d; else ak[nak++] = d;
        }
        for (int d = 0; d < rb; d++) {
            bool lead = d < rb - 1;
            if (lead != (bool)tb) bk[nbk++] = d; else bn[nbn++] = d;
        }
        /* rows: each dim of A's row group maps to one result dim */
        for (int i = 0; i < nam; i++) n = add_role(r, n, am[i], -1, ta ? 0 : am[i], false);
        /* columns: the major dim of B's column group */
        n = add_role(r, n, -1, bn[0], v->shape.ndim - 1, false);
        /* contraction: the major dims, or matching dims when both groups have one shape */
        n = add_role(r, n, ak[0], bk[0], -1, false);
        bool same = nak == nbk;
        for (int i = 0; same && i < nak; i++) same = A->dim[ak[i]] == B->dim[bk[i]];
        for (int i = 1; same && i < nak; i++) n = add_role(r, n, ak[i], bk[i], -1, false);
        break;
    }
    case AP_OP_BATCH_MATMUL: {
        int ta = v->attrs.i[0] != 0, tb = v->attrs.i[1] != 0;
        for (int d = 0; d < ra - 2; d++) n = add_role(r, n, d, d, d, true);
        n = add_role(r, n, ta ? ra - 1 : ra - 2, -1, ra - 2, false);   /* rows */
        n = add_role(r, n, -1, tb ? rb - 2 : rb - 1, ra - 1, false);   /* columns */
        n = add_role(r, n, ta ? ra - 2 : ra - 1, tb ? rb - 1 : rb - 2, -1, false);
        break;
    }
    case AP_OP_EMBEDDING: {   /* table [V, C], ids S -> S + [C] */
        for (int d = 0; d < rb; d++) n = add_role(r, n, -1, d, d, false);
        n = add_role(r, n, 0, -1, -1, false);             /* vocabulary: partial sum */
        n = add_role(r, n, 1, -1, v->shape.ndim - 1, false);
        break;
    }
    case AP_OP_EMBEDDING_BACK: {   /* dY [S.., C], ids S -> [V, C] */
        for (int d = 0; d < rb; d++) n = add_role(r, n, d, d, -1, false);
        n = add_role(r, n, -1, -1, 0, false);             /* each device its vocabulary rows */
        n = add_role(r, n, ra - 1, -1, 1, false);
        break;
    }
    default:
        break;
    }
    return n;
}

/* Appends strategies of a heavy op to list (capacity cap). */
static ap_status gen_heavy(ap_shard_problem *p, const ap_node *v, ap_nstrat **list, int *count,
                           bool param_grad) {
    const autopar_graph *g = p->g;
    const ap_mesh *m = p->mesh;
    hrole roles[MAX_ROLES];
    int nr = heavy_roles(g, v, roles);
    const ap_shape *sh[3] = {&ap_src(g, v, 0)->shape, &ap_src(g, v, 1)->shape, &v->shape};
    bool must_use = v->op == AP_OP_MATMUL || v->op == AP_OP_BATCH_MATMUL;
    bool two_d = m->shape[0] > 1 && m->shape[1] > 1;
    int cap = nr * nr * (1 + AP_MAX_DIMS) + 4, n = 0;
    ap_nstrat *out = calloc((size_t)cap, sizeof *out);
    if (!out) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");

    /* pass 0: strategies that use every axis of size > 1 (matmuls; Alpa's dot handler) and, for
     * batch_matmul on a 2-D mesh, split a batch dim; pass 1: drop the batch rule; pass 2: allow
     * unused axes. A pass runs only when the previous ones found nothing (tiny or indivisible
     * dims). Embeddings take every assignment in pass 0. */
    for (int pass = 0; pass < 3 && n == 0; pass++) {
        bool need_batch = v->op == AP_OP_BATCH_MATMUL && two_d &&
                          p->opt.batch_matmul_always_split_batch && pass == 0;
        for (int r0 = 0; r0 < (m->shape[0] > 1 ? nr : 1); r0++) {
            for (int r1 = 0; r1 < (m->shape[1] > 1 ? nr : 1); r1++) {
                int ra[2] = {r0, r1};
                bool uses_all = (m->shape[0] == 1 || r0 != 0) && (m->shape[1] == 1 || r1 != 0);
                if (must_use && pass < 2 && !uses_all) continue;
                if (must_use && pass == 2 && uses_all) continue;
                if (!must_use && pass > 0) continue;
                if (r0 == r1 && r0 != 0 && !p->opt.allow_mixed_mesh) continue;
                if (need_batch && !roles[r0].batch && !roles[r1].batch) continue;
                ap_spec sp[3] = {ap_spec_replicated(sh[0]->ndim), ap_spec_replicated(sh[1]->ndim),
                                 ap_spec_replicated(sh[2]->ndim)};
                bool valid = true;
                int64_t div = 1;
                for (int a = 0; a < 2 && valid; a++) {
                    if (m->shape[a] == 1 || ra[a] == 0) continue;
                    const hrole *R = &roles[ra[a]];
                    div *= m->shape[a];
                    for (int t = 0; t < 3 && valid; t++) {
                        if (R->d[t] < 0) continue;
                        uint8_t pushed = dim_push(sp[t].dim[R->d[t]], a);
                        if (pushed == AP_DIM_SPEC_COUNT) valid = false;
                        else sp[t].dim[R->d[t]] = pushed;
                    }
                    if (R->d[2] < 0) sp[2].partial |= (uint8_t)(1u << a);
                }
                for (int t = 0; t < 3 && valid; t++) valid = spec_divides(m, &sp[t], sh[t]);
                if (!valid) continue;
                /* the result: pending sums finished by an all-reduce, or for parameter
                 * gradients with prefer_reduce_scatter also scattered onto a free dim */
                ap_spec fins[1 + AP_MAX_DIMS];
                int nf = 0;
                fins[nf] = sp[2];
                fins[nf++].partial = 0;
                if (sp[2].partial && param_grad && p->opt.prefer_reduce_scatter) {
                    for (int d = 0; d < sh[2]->ndim; d++) {
                        if (sp[2].dim[d] != AP_DIM_R) continue;
                        ap_spec f = fins[0];
                        bool okp = true;
                        for (int a = 0; a < 2 && okp; a++) {
                            if (!(sp[2].partial & (1u << a))) continue;
                            uint8_t pushed = dim_push(f.dim[d], a);
                            if (pushed == AP_DIM_SPEC_COUNT) okp = false;
                            else f.dim[d] = pushed;
                        }
                        if (okp && spec_divides(m, &f, sh[2])) fins[nf++] = f;
                    }
                }
                for (int i = 0; i < nf; i++) {
                    if (n == cap) break;
                    ap_nstrat *ns = &out[n];
                    memset(ns, 0, sizeof *ns);
                    ns->ok = true;
                    ns->in[0] = sp[0];
                    ns->in[1] = sp[1];
                    ns->aux = fins[i];
                    ap_status st = finish(p, v, ns, &sp[2], &fins[i], 0, 0, div);
                    if (st) {
                        free(out);
                        return st;
                    }
                    if (ns->ok) n++;
                }
            }
        }
    }
    *list = out;
    *count = n;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Expand                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* EXPAND broadcasts its operand over an inserted axis (or a scalar over the whole shape). Every
 * device can fill its own tile of ANY layout of the result from the operand laid out as that
 * tile minus the inserted dim (a scalar: replicated), with no communication: the inserted axis,
 * and from a scalar every dim, may be split freely. So expand offers every spec of its result
 * and reads its operand in the spec with the inserted dim dropped; the edge from the operand
 * prices any resharding (none when the operand already has that spec, a free slice from R).
 * Following the operand instead would pin the result to the operand's splits: the loss
 * gradient broadcast from the replicated seed (mean_all / sum_all) would be replicated, and so
 * would every gradient following it, reading the batch-split activations whole; under
 * force_batch_dim_to_mesh_axis that all-gather over the batch axis is forbidden and no plan
 * existed. */
static ap_status gen_expand(ap_shard_problem *p, const ap_node *v, ap_nstrat **list,
                            int *count) {
    ap_spec specs[AP_SHARD_MAX_SPECS];
    int ns = ap_shard_enum_specs(p->mesh, &v->shape, p->opt.allow_mixed_mesh, specs);
    ap_nstrat *out = calloc((size_t)(ns > 0 ? ns : 1), sizeof *out);
    if (!out) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    int ax = (int)v->attrs.i[0];
    int n = 0;
    for (int i = 0; i < ns; i++) {
        ap_nstrat *st = &out[n];
        memset(st, 0, sizeof *st);
        st->ok = true;
        unsigned removed;
        st->in[0] = ax >= 0 ? spec_drop_dim(&specs[i], ax, &removed) : ap_spec_replicated(0);
        /* no own collective; the work is divided over the result's tiles */
        ap_status s = finish(p, v, st, &specs[i], &specs[i], 0, 0, 0);
        if (s) {
            free(out);
            return s;
        }
        if (st->ok) n++;
    }
    *list = out;
    *count = n;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Leaves                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static bool has_update_in_problem(const ap_shard_problem *p, int leaf) {
    for (int i = 0; i < p->n_order; i++) {
        const ap_node *u = p->g->nodes[p->order[i]];
        if (u->assign_to == leaf) return true;
    }
    return false;
}

static ap_status gen_leaf(ap_shard_problem *p, const ap_node *v, bool external,
                          ap_nstrat **list, int *count) {
    const ap_mesh *m = p->mesh;
    ap_spec specs[AP_SHARD_MAX_SPECS];
    int ns = 0;
    bool is_param = !external && (v->op == AP_OP_PARAM || v->op == AP_OP_OPT_STATE);
    bool zero = false;
    if (external) {
        ns = ap_shard_enum_specs(m, &v->shape, p->opt.allow_mixed_mesh, specs);
    } else if (v->op == AP_OP_INPUT) {
        int b = (int)v->attrs.i[0];
        ap_spec all[AP_SHARD_MAX_SPECS];
        int na = ap_shard_enum_specs(m, &v->shape, p->opt.allow_mixed_mesh, all);
        int fa = p->opt.force_batch_dim_to_mesh_axis;
        bool force = fa >= 0 && fa < 2 && m->shape[fa] > 1 && b >= 0;
        for (int i = 0; i < na; i++) {
            bool only_batch = true;
            for (int d = 0; d < all[i].ndim; d++)
                if (d != b && all[i].dim[d] != AP_DIM_R) only_batch = false;
            if (!only_batch) continue;
            if (force && !(dim_axes(all[i].dim[b]) & (1u << fa))) continue;
            specs[ns++] = all[i];
        }
        if (ns == 0) specs[ns++] = ap_spec_replicated(v->shape.ndim);
    } else if (is_param) {
        ns = ap_shard_enum_specs(m, &v->shape, p->opt.allow_mixed_mesh, specs);
        if (!p->opt.allow_replicated_params && ns > 1) {
            memmove(specs, specs + 1, (size_t)(ns - 1) * sizeof *specs);   /* R is first */
            ns--;
        }
        zero = v->op == AP_OP_PARAM && p->opt.prefer_reduce_scatter &&
               has_update_in_problem(p, v->id);
    } else {
        specs[ns++] = ap_spec_replicated(v->shape.ndim);   /* fill: a constant, replicated */
    }

    int cap = ns * (zero ? 1 + 3 * AP_MAX_DIMS : 1);
    ap_nstrat *out = calloc((size_t)(cap > 0 ? cap : 1), sizeof *out);
    if (!out) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    int n = 0;
    unsigned live = live_axes(m);
    for (int i = 0; i < ns; i++) {
        /* aux variants: the spec itself, and for ZeRO every way of putting the axes the
         * parameter is replicated on onto one of its unsplit dims */
        ap_spec aux[1 + 3 * AP_MAX_DIMS];
        int na = 0;
        aux[na++] = specs[i];
        unsigned freeax = live & ~spec_axes(&specs[i]);
        if (zero && freeax) {
            for (int d = 0; d < specs[i].ndim; d++) {
                if (specs[i].dim[d] != AP_DIM_R) continue;
                /* one free axis at a time; both at once (S01) only in mixed mode */
                for (unsigned sub = 1; sub <= 3u; sub++) {
                    if ((sub & freeax) != sub) continue;
                    if (sub == 3u && !p->opt.allow_mixed_mesh) continue;
                    ap_spec z = specs[i];
                    bool okp = true;
                    for (int a = 0; a < 2 && okp; a++) {
                        if (!(sub & (1u << a))) continue;
                        uint8_t pushed = dim_push(z.dim[d], a);
                        if (pushed == AP_DIM_SPEC_COUNT) okp = false;
                        else z.dim[d] = pushed;
                    }
                    if (okp && spec_divides(m, &z, &v->shape) && na < 1 + 3 * AP_MAX_DIMS)
                        aux[na++] = z;
                }
            }
        }
        for (int k = 0; k < na; k++) {
            ap_nstrat *st = &out[n++];
            memset(st, 0, sizeof *st);
            st->ok = true;
            st->out = specs[i];
            st->aux = aux[k];
            st->mem = ap_shard_local_bytes(m, &specs[i], &v->shape, 4.0);
            if (is_param && p->opt.communication_only && spec_all_r(&specs[i]) &&
                m->n_devices > 1)
                st->penalty = p->penalty_value;
        }
    }
    *list = out;
    *count = n;
    return AUTOPAR_OK;
}

/* A light op that does not follow (its operand is in another layer): every spec of the operand
 * it would follow that it can use as is. */
static ap_status gen_light_root(ap_shard_problem *p, const ap_node *v, ap_nstrat **list,
                                int *count) {
    const autopar_graph *g = p->g;
    int fk = follow_operand(g, v);
    if (fk < 0) {   /* an optimizer state whose parameter is not in the problem */
        return gen_leaf(p, v, true, list, count);
    }
    const ap_node *u = ap_src(g, v, fk);
    ap_spec specs[AP_SHARD_MAX_SPECS];
    int ns = ap_shard_enum_specs(p->mesh, &u->shape, p->opt.allow_mixed_mesh, specs);
    ap_nstrat *out = calloc((size_t)(ns > 0 ? ns : 1), sizeof *out);
    if (!out) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    int n = 0;
    for (int i = 0; i < ns; i++) {
        ap_nstrat f;
        memset(&f, 0, sizeof f);
        f.out = f.aux = specs[i];
        ap_status st = derive(p, v, fk, &f, &out[n]);
        if (st) {
            free(out);
            return st;
        }
        if (!out[n].ok || !ap_spec_equal(&out[n].in[fk], &specs[i])) continue;
        n++;
    }
    *list = out;
    *count = n;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Driver                                                                                      */
/* ------------------------------------------------------------------------------------------ */

AP_INTERNAL ap_status ap_shard_gen_strategies(ap_shard_problem *p) {
    const autopar_graph *g = p->g;
    int *count = calloc((size_t)p->n, sizeof *count);
    bool *param_grad = calloc((size_t)p->n, sizeof *param_grad);
    if (!count || !param_grad) {
        free(count);
        free(param_grad);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    for (int id = 0; id < p->n; id++) {
        const ap_node *v = g->nodes[id];
        if (v->op == AP_OP_PARAM && v->grad >= 0 && v->grad < p->n) param_grad[v->grad] = true;
    }
    ap_status st = AUTOPAR_OK;
    for (int id = 0; id < p->n && st == AUTOPAR_OK; id++) {
        if (p->role[id] == AP_ROLE_NONE) continue;
        const ap_node *v = g->nodes[id];
        int f = p->follow[id];
        if (f >= 0) {
            int k = count[f];
            ap_nstrat *list = calloc((size_t)(k > 0 ? k : 1), sizeof *list);
            if (!list) {
                st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
                break;
            }
            int fk = -1;
            if (v->op != AP_OP_OPT_STATE) {
                fk = follow_operand(g, v);
            }
            for (int j = 0; j < k && st == AUTOPAR_OK; j++)
                st = derive(p, v, fk, &p->st[f][j], &list[j]);
            p->st[id] = list;
            count[id] = k;
            continue;
        }
        ap_nstrat *list = NULL;
        int n = 0;
        if (p->role[id] == AP_ROLE_EXTERNAL)
            st = gen_leaf(p, v, true, &list, &n);
        else if (v->op == AP_OP_INPUT || v->op == AP_OP_PARAM || v->op == AP_OP_FILL)
            st = gen_leaf(p, v, false, &list, &n);
        else if (v->op == AP_OP_OPT_STATE)
            st = gen_leaf(p, v, false, &list, &n);
        else if (is_heavy_or_leaf(v->op))
            st = gen_heavy(p, v, &list, &n, param_grad[id]);
        else if (v->op == AP_OP_EXPAND)
            st = gen_expand(p, v, &list, &n);
        else
            st = gen_light_root(p, v, &list, &n);
        if (st) break;
        p->st[id] = list;
        count[id] = n;
        if (n == 0)
            st = ap_error(AUTOPAR_ERR_INFEASIBLE,
                          "sharding: node '%s' (%s) has no realisable strategy on mesh %d x %d "
                          "under the options",
                          v->name, ap_op_name(v->op), p->mesh->shape[0], p->mesh->shape[1]);
    }
    free(param_grad);
    if (st) {
        free(count);
        return st;
    }

    /* Groups: a root and, in id order, everything that follows it (followers come after). */
    int ng = 0;
    for (int id = 0; id < p->n; id++)
        if (p->role[id] != AP_ROLE_NONE && p->follow[id] < 0) ng++;
    p->groups = calloc((size_t)(ng > 0 ? ng : 1), sizeof *p->groups);
    p->members = malloc(sizeof(int) * (size_t)(p->n > 0 ? p->n : 1));
    p->group_off = malloc(sizeof(int) * (size_t)(ng + 1));
    int *fill = calloc((size_t)(ng > 0 ? ng : 1), sizeof *fill);
    if (!p->groups || !p->members || !p->group_off || !fill) {
        free(count);
        free(fill);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    p->n_groups = ng;
    int gi = 0;
    for (int id = 0; id < p->n; id++) {
        if (p->role[id] == AP_ROLE_NONE) continue;
        if (p->follow[id] < 0) {
            p->groups[gi].root = id;
            p->groups[gi].n_strat = count[id];
            p->groups[gi].fixed = -1;
            if (p->fixed_by_root && p->fixed_by_root[id] >= 0) {
                if (p->fixed_size_by_root[id] != count[id] || p->fixed_by_root[id] >= count[id]) {
                    int here = count[id];
                    free(count);
                    free(fill);
                    return ap_error(AUTOPAR_ERR_GRAPH, "sharding: layer reuse mismatch at '%s' "
                                    "(%d strategies here, %d in the solved layer)",
                                    g->nodes[id]->name, here, p->fixed_size_by_root[id]);
                }
                p->groups[gi].fixed = p->fixed_by_root[id];
            }
            p->group[id] = gi++;
        } else {
            p->group[id] = p->group[p->follow[id]];
        }
        p->groups[p->group[id]].n_members++;
    }
    int off = 0;
    for (int i = 0; i < ng; i++) {
        p->groups[i].first_member = off;
        off += p->groups[i].n_members;
    }
    for (int id = 0; id < p->n; id++) {
        if (p->role[id] == AP_ROLE_NONE) continue;
        ap_group *gr = &p->groups[p->group[id]];
        p->members[gr->first_member + fill[p->group[id]]++] = id;
    }
    int total = 0;
    for (int i = 0; i < ng; i++) {
        p->group_off[i] = total;
        total += p->groups[i].n_strat;
    }
    p->group_off[ng] = total;
    p->n_strat_total = total;
    free(fill);
    free(count);
    return AUTOPAR_OK;
}
