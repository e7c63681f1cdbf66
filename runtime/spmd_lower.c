/*
 * Lowering of one sharded stage to one rank's SPMD program (spmd.h, spmd_internal.h): per node
 * the operand reshardings, the local kernel with local shapes, the op's own collectives; then the
 * liveness-based memory plan of the transient values.
 *
 * Every rank runs the same lowering with its own mesh coordinate. Which instructions exist, and
 * every collective's size and communicator, depend only on specs and shapes, never on the
 * coordinate; only slice offsets and "zero this value" decisions do. So the collectives of all
 * ranks match one to one by construction.
 */
#include "spmd_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Spec helpers                                                                                */
/* ------------------------------------------------------------------------------------------ */

static unsigned dim_axes(uint8_t d) {
    return d == AP_DIM_S0 ? 1u : d == AP_DIM_S1 ? 2u : d == AP_DIM_S01 ? 3u : 0u;
}

static unsigned spec_axes(const ap_spec *s) {
    unsigned u = 0;
    for (int d = 0; d < s->ndim; d++) u |= dim_axes(s->dim[d]);
    return u;
}

static unsigned live_axes(const ap_mesh *m) {
    return (m->shape[0] > 1 ? 1u : 0u) | (m->shape[1] > 1 ? 2u : 0u);
}

static int dim_parts(const ap_mesh *m, uint8_t d) {
    return d == AP_DIM_S0 ? m->shape[0] : d == AP_DIM_S1 ? m->shape[1]
         : d == AP_DIM_S01 ? m->n_devices : 1;
}

static int64_t spec_tiles(const ap_mesh *m, const ap_spec *s) {
    int64_t t = 1;
    for (int d = 0; d < s->ndim; d++) t *= dim_parts(m, s->dim[d]);
    return t;
}

/* Valid spec (each axis used once, known values) that divides `shape`; sets no error. */
static bool spec_ok(const ap_mesh *m, const ap_spec *s, const ap_shape *shape) {
    if (s->ndim != shape->ndim || s->ndim < 0 || s->ndim > AP_MAX_DIMS) return false;
    if (s->partial & ~3u) return false;
    unsigned used = s->partial;
    for (int d = 0; d < s->ndim; d++) {
        if (s->dim[d] >= AP_DIM_SPEC_COUNT) return false;
        unsigned a = dim_axes(s->dim[d]);
        if (a & used) return false;
        used |= a;
        if (shape->dim[d] % dim_parts(m, s->dim[d]) != 0) return false;
    }
    return true;
}

/* s without dim `axis` (rank - 1). */
static ap_spec spec_drop_dim(const ap_spec *s, int axis) {
    ap_spec r = ap_spec_replicated(s->ndim - 1);
    for (int d = 0, o = 0; d < s->ndim; d++)
        if (d != axis) r.dim[o++] = s->dim[d];
    return r;
}

/* The trailing nd dims of s. */
static ap_spec spec_suffix(const ap_spec *s, int nd) {
    ap_spec r = ap_spec_replicated(nd);
    int off = s->ndim - nd;
    for (int d = 0; d < nd; d++) r.dim[d] = s->dim[off + d];
    return r;
}

/* Axes splitting dim spec d in split order (major first), without axes of size 1. */
static int dim_seq(const ap_mesh *m, uint8_t d, int seq[2]) {
    int n = 0;
    if ((d == AP_DIM_S0 || d == AP_DIM_S01) && m->shape[0] > 1) seq[n++] = 0;
    if ((d == AP_DIM_S1 || d == AP_DIM_S01) && m->shape[1] > 1) seq[n++] = 1;
    return n;
}

/* The layout change from -> to needs no communication on any rank: every dim's split axes in
 * `to` extend those in `from` (ignoring axes of size 1), no pending sum on an axis of size > 1
 * is dropped, and a pending sum that is added is on an axis `from` does not split (the value is
 * then kept on coordinate 0 of that axis and zeroed on the others). */
static bool local_reachable(const ap_mesh *m, const ap_spec *from, const ap_spec *to) {
    if (from->ndim != to->ndim) return false;
    unsigned live = live_axes(m);
    unsigned fp = from->partial & live, tp = to->partial & live;
    if (fp & ~tp) return false;
    if ((tp & ~fp) & spec_axes(from) & live) return false;
    for (int d = 0; d < from->ndim; d++) {
        int fs[2], ts[2];
        int nf = dim_seq(m, from->dim[d], fs), nt = dim_seq(m, to->dim[d], ts);
        if (nf > nt) return false;
        for (int i = 0; i < nf; i++)
            if (fs[i] != ts[i]) return false;
    }
    return true;
}

static const char *spec_s(const ap_spec *s, char *buf) {
    return ap_spec_str(s, buf, AP_SPEC_STR_MAX);
}

/* Name of the tensor an instruction of (node, operand) moves: operand k's tensor, or the node's
 * own result (operand < 0). */
static const char *moved_name(const sp_lower_ctx *c, int node, int operand) {
    const ap_node *v = c->g->nodes[node];
    if (operand >= 0 && operand < v->n_src) return ap_src(c->g, v, operand)->name;
    return v->name;
}

/* ------------------------------------------------------------------------------------------ */
/* Program construction                                                                        */
/* ------------------------------------------------------------------------------------------ */

void sp_prog_free(sp_prog *p) {
    if (!p) return;
    free(p->ins);
    free(p->val);
    free(p->note);
    memset(p, 0, sizeof *p);
}

int sp_value_new(sp_prog *p, size_t bytes, int node, bool persistent) {
    if (p->n_val == p->cap_val) {
        int cap = p->cap_val ? 2 * p->cap_val : 256;
        sp_value *nv = realloc(p->val, (size_t)cap * sizeof *nv);
        if (!nv) {
            (void)ap_error(AUTOPAR_ERR_NOMEM, "spmd lowering: out of memory (%d values)", cap);
            return -1;
        }
        p->val = nv;
        p->cap_val = cap;
    }
    sp_value *v = &p->val[p->n_val];
    memset(v, 0, sizeof *v);
    v->bytes = bytes;
    v->node = node;
    v->persistent = persistent;
    v->first = v->last = -1;
    return p->n_val++;
}

static sp_ins *ins_new(sp_prog *p, sp_ins_kind kind, int node, int operand) {
    if (p->n_ins == p->cap_ins) {
        int cap = p->cap_ins ? 2 * p->cap_ins : 256;
        sp_ins *ni = realloc(p->ins, (size_t)cap * sizeof *ni);
        if (!ni) {
            (void)ap_error(AUTOPAR_ERR_NOMEM, "spmd lowering: out of memory (%d instructions)",
                           cap);
            return NULL;
        }
        p->ins = ni;
        p->cap_ins = cap;
    }
    sp_ins *in = &p->ins[p->n_ins++];
    memset(in, 0, sizeof *in);
    in->kind = kind;
    in->node = node;
    in->operand = operand;
    in->out = in->send = in->recv = -1;
    for (int k = 0; k < AP_MAX_SRC; k++) in->src[k] = -1;
    return in;
}

static ap_status add_note(sp_prog *p, int node, int operand, const char *fmt, ...)
    AP_PRINTF(4, 5);
static ap_status add_note(sp_prog *p, int node, int operand, const char *fmt, ...) {
    if (p->n_note == p->cap_note) {
        int cap = p->cap_note ? 2 * p->cap_note : 16;
        sp_note *nn = realloc(p->note, (size_t)cap * sizeof *nn);
        if (!nn) return ap_error(AUTOPAR_ERR_NOMEM, "spmd lowering: out of memory");
        p->note = nn;
        p->cap_note = cap;
    }
    sp_note *n = &p->note[p->n_note++];
    n->node = node;
    n->operand = operand;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(n->text, sizeof n->text, fmt, ap);
    va_end(ap);
    return AUTOPAR_OK;
}

int sp_comm_dtype(ap_dtype dt, autopar_precision p) {
    if (dt == AUTOPAR_I32) return AP_COMM_I32;
    return p == AUTOPAR_PRECISION_F64 ? AP_COMM_F64 : AP_COMM_F32;
}

static size_t numel_bytes(const sp_lower_ctx *c, const ap_shape *s, ap_dtype dt) {
    return (size_t)ap_shape_numel(s) * ap_elem_size(dt, c->precision);
}

static ap_status local_shape(const sp_lower_ctx *c, const ap_spec *s, const ap_shape *full,
                             const char *name, ap_shape *out) {
    ap_status st = ap_spec_local_shape(c->mesh, s, full, out);
    if (st) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", autopar_last_error());
        return ap_error(st, "spmd lowering: tensor '%s': %s", name, msg);
    }
    return AUTOPAR_OK;
}

/* One kernel on local shapes with an output of dtype out_dt, into a new value. operand: as
 * sp_ins. */
static ap_status emit_kernel(sp_lower_ctx *c, ap_op op, const ap_attrs *attrs,
                             const ap_shape *out_shape, ap_dtype out_dt, int n_src,
                             const int *src, const ap_shape *src_shape,
                             const ap_dtype *src_dtype, int node, int operand, int *out) {
    int v = sp_value_new(c->prog, numel_bytes(c, out_shape, out_dt), node, false);
    if (v < 0) return AUTOPAR_ERR_NOMEM;
    sp_ins *in = ins_new(c->prog, SP_KERNEL, node, operand);
    if (!in) return AUTOPAR_ERR_NOMEM;
    in->call.op = op;
    in->call.attrs = *attrs;
    in->call.precision = c->precision;
    in->call.out_shape = *out_shape;
    in->call.out_dtype = out_dt;
    in->call.n_src = n_src;
    for (int k = 0; k < n_src; k++) {
        in->call.src_shape[k] = src_shape[k];
        in->call.src_dtype[k] = src_dtype[k];
        in->src[k] = src[k];
    }
    in->call.name = c->g->nodes[node]->name;
    in->out = v;
    *out = v;
    return AUTOPAR_OK;
}

/* A data-movement kernel (PERMUTE / SLICE) on value `src` into a new value. */
static ap_status emit_move(sp_lower_ctx *c, ap_op op, const ap_attrs *attrs,
                           const ap_shape *in_shape, const ap_shape *out_shape, ap_dtype dt,
                           int src, int node, int operand, int *out) {
    return emit_kernel(c, op, attrs, out_shape, dt, 1, &src, in_shape, &dt, node, operand, out);
}

/* View value `src` as [a, b, rest] and transpose the first two dims (a no-op when a or b is 1,
 * which returns src itself). */
static ap_status emit_swap01(sp_lower_ctx *c, int src, int64_t a, int64_t b, int64_t rest,
                             ap_dtype dt, int node, int operand, int *out) {
    if (a == 1 || b == 1) {
        *out = src;
        return AUTOPAR_OK;
    }
    ap_shape is = {3, {a, b, rest, 0}}, os = {3, {b, a, rest, 0}};
    ap_attrs at;
    memset(&at, 0, sizeof at);
    at.i[0] = 1;
    at.i[1] = 0;
    at.i[2] = 2;
    return emit_move(c, AP_OP_PERMUTE, &at, &is, &os, dt, src, node, operand, out);
}

static int64_t prod(const ap_shape *s, int from, int to) {
    int64_t n = 1;
    for (int i = from; i < to; i++) n *= s->dim[i];
    return n;
}

/* Local layout change from -> to (local_reachable must hold): slices, then zeroing. */
static ap_status emit_local(sp_lower_ctx *c, int val, bool owned, const ap_spec *from,
                            const ap_spec *to, const ap_shape *full, ap_dtype dt, int node,
                            int operand, int *out, bool *out_owned) {
    const ap_mesh *m = c->mesh;
    int64_t fo[AP_MAX_DIMS] = {0}, fe[AP_MAX_DIMS] = {0}, to_[AP_MAX_DIMS] = {0},
            te[AP_MAX_DIMS] = {0};
    const char *name = moved_name(c, node, operand);
    ap_status st;
    if (full->ndim > 0) {
        if ((st = ap_spec_tile(m, from, full, c->coord[0], c->coord[1], fo, fe)) ||
            (st = ap_spec_tile(m, to, full, c->coord[0], c->coord[1], to_, te))) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", autopar_last_error());
            return ap_error(st, "spmd lowering: tensor '%s' read by '%s': %s", name,
                            c->g->nodes[node]->name, msg);
        }
    }
    ap_shape cur;
    cur.ndim = full->ndim;
    for (int d = 0; d < full->ndim; d++) cur.dim[d] = fe[d];
    for (int d = 0; d < full->ndim; d++) {
        if (te[d] == fe[d]) continue;
        ap_shape nx = cur;
        nx.dim[d] = te[d];
        ap_attrs at;
        memset(&at, 0, sizeof at);
        at.i[0] = d;
        at.i[1] = to_[d] - fo[d];
        at.i[2] = te[d];
        int nv;
        if ((st = emit_move(c, AP_OP_SLICE, &at, &cur, &nx, dt, val, node, operand, &nv)))
            return st;
        val = nv;
        owned = true;
        cur = nx;
    }
    unsigned live = live_axes(m);
    unsigned add = (to->partial & ~from->partial) & live;
    if (add) {
        /* The value is replicated over these axes: keep it on coordinate 0, zero elsewhere. */
        bool zero = ((add & 1u) && c->coord[0] != 0) || ((add & 2u) && c->coord[1] != 0);
        if (zero) {
            if (!owned) {
                int nv = sp_value_new(c->prog, numel_bytes(c, &cur, dt), node, false);
                if (nv < 0) return AUTOPAR_ERR_NOMEM;
                val = nv;
                owned = true;
            }
            sp_ins *in = ins_new(c->prog, SP_ZERO, node, operand);
            if (!in) return AUTOPAR_ERR_NOMEM;
            in->out = val;
        }
    }
    *out = val;
    *out_owned = owned;
    return AUTOPAR_OK;
}

/* The dim whose spec differs between a and b, the first one from `start`; -1 if none. */
static int diff_dim(const ap_spec *a, const ap_spec *b, int start) {
    for (int d = start; d < a->ndim; d++)
        if (a->dim[d] != b->dim[d]) return d;
    return -1;
}

/* One collective of a route: the value is laid out as step->from, the result as step->to. */
static ap_status emit_coll(sp_lower_ctx *c, int val, bool owned, const ap_collective *step,
                           const ap_shape *full, ap_dtype dt, int node, int operand, int *out,
                           bool *out_owned) {
    const ap_mesh *m = c->mesh;
    const char *name = moved_name(c, node, operand);
    int n = ap_mesh_axis_size(m, step->axis);
    char fb[AP_SPEC_STR_MAX], tb[AP_SPEC_STR_MAX];
    ap_shape L, T;
    ap_status st;
    if ((st = local_shape(c, &step->from, full, name, &L)) ||
        (st = local_shape(c, &step->to, full, name, &T)))
        return st;
    *out_owned = owned;
    if (n <= 1) {   /* nothing moves; the layouts coincide */
        *out = val;
        return AUTOPAR_OK;
    }
    *out_owned = true;   /* every collective below writes a new value or an owned one */
    int cdt = sp_comm_dtype(dt, c->precision);
    size_t esz = ap_elem_size(dt, c->precision);
    int64_t numel = ap_shape_numel(&L);
    sp_ins *in;
    switch (step->kind) {
    case AP_COLL_ALL_REDUCE: {
        int r = val;
        if (!owned && (r = sp_value_new(c->prog, (size_t)numel * esz, node, false)) < 0)
            return AUTOPAR_ERR_NOMEM;
        if (!(in = ins_new(c->prog, SP_COLL, node, operand))) return AUTOPAR_ERR_NOMEM;
        in->coll = AP_COLL_ALL_REDUCE;
        in->axis = step->axis;
        in->send = val;
        in->recv = r;
        in->count = (size_t)numel;
        in->comm_dtype = cdt;
        *out = r;
        return AUTOPAR_OK;
    }
    case AP_COLL_ALL_GATHER: {
        int d = diff_dim(&step->from, &step->to, 0);
        if (d < 0) break;
        int G = sp_value_new(c->prog, (size_t)numel * esz * (size_t)n, node, false);
        if (G < 0) return AUTOPAR_ERR_NOMEM;
        if (!(in = ins_new(c->prog, SP_COLL, node, operand))) return AUTOPAR_ERR_NOMEM;
        in->coll = AP_COLL_ALL_GATHER;
        in->axis = step->axis;
        in->send = val;
        in->recv = G;
        in->count = (size_t)numel;
        in->comm_dtype = cdt;
        /* G = [n][outer, l_d, inner]; the result is [outer, n * l_d, inner]. */
        return emit_swap01(c, G, n, prod(&L, 0, d), L.dim[d] * prod(&L, d + 1, L.ndim), dt, node,
                           operand, out);
    }
    case AP_COLL_ALL_TO_ALL: {
        /* d loses its minor split (gathered), d2 gains it. */
        int d = -1, d2 = -1;
        for (int i = 0; i < step->from.ndim; i++) {
            if (step->from.dim[i] == step->to.dim[i]) continue;
            if (dim_parts(m, step->to.dim[i]) < dim_parts(m, step->from.dim[i])) d = i;
            else d2 = i;
        }
        if (d < 0 || d2 < 0 || L.dim[d2] % n != 0) break;
        int64_t cl = L.dim[d2] / n;
        int S;
        if ((st = emit_swap01(c, val, prod(&L, 0, d2), n, cl * prod(&L, d2 + 1, L.ndim), dt, node,
                              operand, &S)))
            return st;
        int Rv = sp_value_new(c->prog, (size_t)numel * esz, node, false);
        if (Rv < 0) return AUTOPAR_ERR_NOMEM;
        if (!(in = ins_new(c->prog, SP_COLL, node, operand))) return AUTOPAR_ERR_NOMEM;
        in->coll = AP_COLL_ALL_TO_ALL;
        in->axis = step->axis;
        in->send = S;
        in->recv = Rv;
        in->count = (size_t)(numel / n);
        in->comm_dtype = cdt;
        ap_shape Bk = L;   /* one received block: d2 already cut, d still local */
        Bk.dim[d2] = cl;
        return emit_swap01(c, Rv, n, prod(&Bk, 0, d), Bk.dim[d] * prod(&Bk, d + 1, Bk.ndim), dt,
                           node, operand, out);
    }
    case AP_COLL_REDUCE_SCATTER: {
        int d = diff_dim(&step->from, &step->to, 0);
        if (d < 0 || L.dim[d] % n != 0) break;
        int64_t cl = L.dim[d] / n;
        int S;
        if ((st = emit_swap01(c, val, prod(&L, 0, d), n, cl * prod(&L, d + 1, L.ndim), dt, node,
                              operand, &S)))
            return st;
        int r = sp_value_new(c->prog, (size_t)(numel / n) * esz, node, false);
        if (r < 0) return AUTOPAR_ERR_NOMEM;
        if (!(in = ins_new(c->prog, SP_COLL, node, operand))) return AUTOPAR_ERR_NOMEM;
        in->coll = AP_COLL_REDUCE_SCATTER;
        in->axis = step->axis;
        in->send = S;
        in->recv = r;
        in->count = (size_t)(numel / n);
        in->comm_dtype = cdt;
        *out = r;
        return AUTOPAR_OK;
    }
    default:
        break;
    }
    return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                    "spmd lowering: tensor '%s': cannot execute %s on axis %d (%s -> %s)", name,
                    ap_coll_kind_name(step->kind), (int)step->axis, spec_s(&step->from, fb),
                    spec_s(&step->to, tb));
}

/* Whether a proposed route can be executed from `from` to `to`: every step starts at a layout
 * reachable locally from the previous one and the last reaches `to` locally. */
static bool route_ok(const ap_mesh *m, const ap_spec *from, const ap_spec *to,
                     const ap_collective *steps, int n) {
    const ap_spec *cur = from;
    for (int i = 0; i < n; i++) {
        if (steps[i].from.ndim != from->ndim || steps[i].to.ndim != from->ndim) return false;
        if (!local_reachable(m, cur, &steps[i].from)) return false;
        cur = &steps[i].to;
    }
    return local_reachable(m, cur, to);
}

ap_status sp_emit_reshard(sp_lower_ctx *c, int val, bool owned, const ap_spec *from,
                          const ap_spec *to, const ap_shape *full, ap_dtype dt,
                          const ap_collective *steps, int n_steps, int node, int operand,
                          int *out) {
    const ap_mesh *m = c->mesh;
    *out = val;
    if (ap_spec_equal(from, to)) return AUTOPAR_OK;
    char fb[AP_SPEC_STR_MAX], tb[AP_SPEC_STR_MAX];
    const char *name = moved_name(c, node, operand);
    const char *reader = c->g->nodes[node]->name;
    ap_reshard r;
    memset(&r, 0, sizeof r);
    ap_spec start = *from;
    unsigned live = live_axes(m);
    /* A pending sum the source lacks is created locally (zero off coordinate 0 of the axis).
     * That needs the value replicated over the axis: dims split over it are gathered first
     * (no plan of the sharding pass asks for this; the runtime accepts any layouts). */
    unsigned add = (to->partial & ~from->partial) & live;
    if (add & spec_axes(from) & live) {
        ap_spec g = *from;
        for (int d = 0; d < g.ndim; d++)
            if (dim_axes(g.dim[d]) & add) g.dim[d] = AP_DIM_R;
        int gv;
        ap_status st = sp_emit_reshard(c, val, owned, from, &g, full, dt, NULL, 0, node,
                                       operand, &gv);
        if (st) return st;
        return sp_emit_reshard(c, gv, gv != val || owned, &g, to, full, dt, NULL, 0, node,
                               operand, out);
    }
    if (add) start.partial |= (uint8_t)add;
    const ap_collective *route = NULL;
    int n = 0;
    if (steps && n_steps > 0 && route_ok(m, &start, to, steps, n_steps)) {
        route = steps;
        n = n_steps;
        c->prog->n_route_plan++;
    } else if (!local_reachable(m, &start, to)) {
        ap_status st = ap_reshard_cost(m, &start, to, full, 1.0, &r);
        if (st) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", autopar_last_error());
            return ap_error(st, "spmd lowering: tensor '%s' at '%s': %s", name, reader, msg);
        }
        route = r.step;
        n = r.n_steps;
        c->prog->n_route_fresh++;
        if (!route_ok(m, &start, to, route, n))
            return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                            "spmd lowering: tensor '%s' at '%s': the resharding route %s -> %s "
                            "is not executable", name, reader, spec_s(&start, fb), spec_s(to, tb));
    }
    ap_status st;
    ap_spec cur = *from;
    bool own = owned;
    for (int i = 0; i < n; i++) {
        int nv;
        if ((st = emit_local(c, val, own, &cur, &route[i].from, full, dt, node, operand, &nv,
                             &own)))
            return st;
        val = nv;
        if ((st = emit_coll(c, val, own, &route[i], full, dt, node, operand, &nv, &own)))
            return st;
        val = nv;
        cur = route[i].to;
    }
    int nv;
    if ((st = emit_local(c, val, own, &cur, to, full, dt, node, operand, &nv, &own))) return st;
    *out = nv;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Local semantics of each op                                                                  */
/* ------------------------------------------------------------------------------------------ */

typedef struct op_rule {
    ap_spec E[AP_MAX_SRC];   /* layouts the local kernel reads its operands in               */
    ap_spec C;               /* layout of the local result (maybe a pending sum)             */
    int     pre_k;           /* operand (a scalar dL) scaled by pre before the kernel, or -1 */
    double  pre, post;       /* post: the result is scaled after the kernel                   */
    const char *why;         /* why operand layouts differ from the plan's, for the notes     */
} op_rule;

static void rule_matmul(const sp_lower_ctx *c, const ap_node *v, op_rule *r) {
    const ap_mesh *m = c->mesh;
    const ap_shape *A = &ap_src(c->g, v, 0)->shape, *B = &ap_src(c->g, v, 1)->shape;
    int ra = A->ndim, rb = B->ndim;
    bool ta = v->attrs.i[0] != 0, tb = v->attrs.i[1] != 0;
    /* contracted dims of A (its last dim, or all leading dims when transposed); B's contracted
     * and column dims likewise */
    int ak[AP_MAX_DIMS], bk[AP_MAX_DIMS], bn[AP_MAX_DIMS];
    int nak = 0, nbk = 0, nbn = 0;
    for (int d = 0; d < ra; d++) {
        bool lead = d < ra - 1;
        if (lead == ta) ak[nak++] = d;
    }
    for (int d = 0; d < rb; d++) {
        bool lead = d < rb - 1;
        if (lead != tb) bk[nbk++] = d; else bn[nbn++] = d;
    }
    ap_spec *EA = &r->E[0], *EB = &r->E[1];
    /* The result's column dim is B's flattened column group: only its major dim may split. */
    for (int i = 1; i < nbn; i++)
        if (EB->dim[bn[i]] != AP_DIM_R) {
            EB->dim[bn[i]] = AP_DIM_R;
            r->why = "a minor column dim cannot stay split";
        }
    /* The contracted groups must be cut into the same blocks on both sides. */
    bool same_shape = nak == nbk;
    for (int i = 0; same_shape && i < nak; i++) same_shape = A->dim[ak[i]] == B->dim[bk[i]];
    bool ok = same_shape;
    for (int i = 0; ok && i < nak; i++) ok = EA->dim[ak[i]] == EB->dim[bk[i]];
    if (!ok) {
        ok = EA->dim[ak[0]] == EB->dim[bk[0]];
        for (int i = 1; ok && i < nak; i++) ok = EA->dim[ak[i]] == AP_DIM_R;
        for (int i = 1; ok && i < nbk; i++) ok = EB->dim[bk[i]] == AP_DIM_R;
    }
    if (!ok) {
        for (int i = 0; i < nak; i++) EA->dim[ak[i]] = AP_DIM_R;
        for (int i = 0; i < nbk; i++) EB->dim[bk[i]] = AP_DIM_R;
        r->why = "the contracted dims of the operands are split differently";
    }
    unsigned kax = 0;
    for (int i = 0; i < nak; i++) kax |= dim_axes(EA->dim[ak[i]]);
    r->C = ap_spec_replicated(v->shape.ndim);
    if (!ta) {
        for (int d = 0; d < ra - 1 && d < v->shape.ndim; d++) r->C.dim[d] = EA->dim[d];
    } else {
        r->C.dim[0] = EA->dim[ra - 1];
    }
    r->C.dim[v->shape.ndim - 1] = EB->dim[bn[0]];
    r->C.partial = (uint8_t)(kax & live_axes(m));
}

static void rule_batch_matmul(const sp_lower_ctx *c, const ap_node *v, op_rule *r) {
    const ap_mesh *m = c->mesh;
    int ra = ap_src(c->g, v, 0)->shape.ndim, rb = ap_src(c->g, v, 1)->shape.ndim;
    bool ta = v->attrs.i[0] != 0, tb = v->attrs.i[1] != 0;
    ap_spec *EA = &r->E[0], *EB = &r->E[1];
    for (int d = 0; d < ra - 2; d++)
        if (EB->dim[d] != EA->dim[d]) {
            EB->dim[d] = EA->dim[d];
            r->why = "batch dims are split differently";
        }
    int ma = ta ? ra - 1 : ra - 2, ka = ta ? ra - 2 : ra - 1;
    int kb = tb ? rb - 1 : rb - 2, nb = tb ? rb - 2 : rb - 1;
    if (EA->dim[ka] != EB->dim[kb]) {
        EA->dim[ka] = EB->dim[kb] = AP_DIM_R;
        r->why = "the contracted dims are split differently";
    }
    r->C = ap_spec_replicated(v->shape.ndim);
    for (int d = 0; d < ra - 2; d++) r->C.dim[d] = EA->dim[d];
    r->C.dim[ra - 2] = EA->dim[ma];
    r->C.dim[ra - 1] = EB->dim[nb];
    r->C.partial = (uint8_t)(dim_axes(EA->dim[ka]) & live_axes(m));
}

/* Row-wise ops (normalisations, softmax, cross-entropy) need whole rows: a split of the last
 * dim is moved onto a row dim that is whole and divides (an all-to-all each way instead of
 * gathering: every device then computes its own rows), the innermost such dim first, never dim
 * `avoid`; with no such dim the last dim is gathered. */
static void whole_rows(const sp_lower_ctx *c, ap_spec *s, const ap_shape *shape, int avoid,
                       op_rule *r, const char *why) {
    int last = s->ndim - 1;
    if (last < 0 || s->dim[last] == AP_DIM_R) return;
    uint8_t ds = s->dim[last];
    s->dim[last] = AP_DIM_R;
    r->why = why;
    for (int d = last - 1; d >= 0; d--) {
        if (d == avoid || s->dim[d] != AP_DIM_R) continue;
        if (shape->dim[d] % dim_parts(c->mesh, ds) != 0) continue;
        s->dim[d] = ds;
        return;
    }
}

/* Fills r for node v from the plan's operand layouts. Returns false when the op is unknown. */
static bool op_rule_of(const sp_lower_ctx *c, const ap_node *v, op_rule *r) {
    const ap_mesh *m = c->mesh;
    const autopar_graph *g = c->g;
    unsigned live = live_axes(m);
    r->pre_k = -1;
    r->pre = r->post = 1.0;
    r->why = NULL;
    ap_spec *E = r->E;
    switch (v->op) {
    case AP_OP_FILL:
        r->C = c->plan->node[v->id].spec;
        r->C.partial = 0;
        return true;
    case AP_OP_ADD: case AP_OP_SUB: case AP_OP_MUL: case AP_OP_SCALE: case AP_OP_RELU:
    case AP_OP_GELU: case AP_OP_RELU_BACK: case AP_OP_GELU_BACK: case AP_OP_SGD_UPDATE:
    case AP_OP_MOMENTUM_UPDATE: case AP_OP_ADAM_M: case AP_OP_ADAM_V: case AP_OP_ADAMW_UPDATE: {
        ap_spec S = E[0];
        for (int k = 0; k < v->n_src; k++) {
            const ap_node *u = ap_src(g, v, k);
            if (ap_shape_equal(&u->shape, &v->shape)) E[k] = S;
            else if (u->shape.ndim == 0) E[k] = ap_spec_replicated(0);
            else E[k] = spec_suffix(&S, u->shape.ndim);
        }
        r->C = S;
        return true;
    }
    case AP_OP_MSE_LOSS_BACK: {
        ap_spec S = E[1];
        E[0] = ap_spec_replicated(0);
        E[1] = E[2] = S;
        r->C = S;
        r->pre_k = 0;   /* the kernel divides by the LOCAL element count */
        r->pre = 1.0 / (double)spec_tiles(m, &S);
        return true;
    }
    case AP_OP_CROSS_ENTROPY_BACK: {
        ap_spec S = E[1];
        whole_rows(c, &S, &ap_src(g, v, 1)->shape, -1, r,
                   "vocabulary-split cross-entropy needs whole rows of logits");
        E[0] = ap_spec_replicated(0);
        E[1] = S;
        E[2] = spec_drop_dim(&S, S.ndim - 1);
        r->C = S;
        r->pre_k = 0;   /* the kernel divides by the LOCAL row count */
        r->pre = 1.0 / (double)spec_tiles(m, &S);
        return true;
    }
    case AP_OP_LAYERNORM: {
        ap_spec S = E[0];
        whole_rows(c, &S, &v->shape, -1, r, "layernorm needs whole rows");
        E[0] = S;
        E[1] = E[2] = ap_spec_replicated(1);
        r->C = S;
        return true;
    }
    case AP_OP_LAYERNORM_BACK: {
        ap_spec S = E[1];
        whole_rows(c, &S, &v->shape, -1, r, "layernorm backward needs whole rows");
        E[0] = E[1] = S;
        E[2] = ap_spec_replicated(1);
        r->C = S;
        return true;
    }
    case AP_OP_LAYERNORM_BACK_GAIN: {
        ap_spec S = E[1];
        whole_rows(c, &S, &ap_src(g, v, 1)->shape, -1, r,
                   "layernorm gain gradient needs whole rows");
        E[0] = E[1] = S;
        r->C = ap_spec_replicated(1);
        r->C.partial = (uint8_t)(spec_axes(&S) & live);
        return true;
    }
    case AP_OP_SOFTMAX: {
        /* A causal softmax may have its query (second-to-last) dim split: the kernel's ia[1]
         * (set in lower_node) gives the global index of the device's first query row. */
        ap_spec S = E[0];
        bool causal = v->attrs.i[0] != 0 && S.ndim >= 2;
        whole_rows(c, &S, &v->shape, causal ? S.ndim - 2 : -1, r, "softmax needs whole rows");
        E[0] = S;
        r->C = S;
        return true;
    }
    case AP_OP_SOFTMAX_BACK: {
        ap_spec S = E[0];
        whole_rows(c, &S, &v->shape, -1, r, "softmax backward needs whole rows");
        E[0] = E[1] = S;
        r->C = S;
        return true;
    }
    case AP_OP_RESHAPE: {
        ap_spec in_ok;
        (void)ap_spec_reshape(m, &ap_src(g, v, 0)->shape, &E[0], &v->shape, &in_ok, &r->C);
        if (!ap_spec_equal(&in_ok, &E[0])) r->why = "the reshape cannot carry this split";
        E[0] = in_ok;
        return true;
    }
    case AP_OP_PERMUTE:
        r->C = ap_spec_replicated(v->shape.ndim);
        for (int d = 0; d < v->shape.ndim; d++) r->C.dim[d] = E[0].dim[v->attrs.i[d]];
        return true;
    case AP_OP_SLICE: case AP_OP_SLICE_BACK: case AP_OP_CONCAT: {
        ap_spec S = E[0];
        int ax = (int)v->attrs.i[0];
        if (S.dim[ax] != AP_DIM_R) {
            S.dim[ax] = AP_DIM_R;
            r->why = "the sliced / concatenated axis must be whole";
        }
        for (int k = 0; k < v->n_src; k++) {
            if (!ap_spec_equal(&E[k], &S)) r->why = r->why ? r->why : "operands must agree";
            E[k] = S;
        }
        r->C = S;
        return true;
    }
    case AP_OP_SUM: case AP_OP_MEAN: {
        ap_spec S = E[0];
        int ax = (int)v->attrs.i[0];
        unsigned rem;
        int64_t parts;
        if (ax < 0) {
            r->C = ap_spec_replicated(0);
            rem = spec_axes(&S);
            parts = spec_tiles(m, &S);
        } else {
            r->C = spec_drop_dim(&S, ax);
            rem = dim_axes(S.dim[ax]);
            parts = dim_parts(m, S.dim[ax]);
        }
        r->C.partial = (uint8_t)(rem & live);
        if (v->op == AP_OP_MEAN) r->post = 1.0 / (double)parts;   /* LOCAL count divides */
        return true;
    }
    case AP_OP_SUM_TO: {
        ap_spec S = E[0];
        int nd = v->shape.ndim;
        r->C = spec_suffix(&S, nd);
        unsigned rem = 0;
        for (int d = 0; d < S.ndim - nd; d++) rem |= dim_axes(S.dim[d]);
        r->C.partial = (uint8_t)(rem & live);
        return true;
    }
    case AP_OP_EXPAND: {
        /* Every device fills its own tile of the planned layout (the sharding pass may split
         * the inserted axis, or from a scalar any dim: no communication): the kernel sizes from
         * the local shapes and reads the operand in that layout without the inserted dim. */
        int ax = (int)v->attrs.i[0];
        r->C = c->plan->node[v->id].spec;
        r->C.partial = 0;
        ap_spec want = ax >= 0 ? spec_drop_dim(&r->C, ax) : ap_spec_replicated(0);
        if (ax >= 0 && !ap_spec_equal(&want, &E[0]))
            r->why = "the operand is read as the result's tiles without the inserted dim";
        E[0] = want;
        return true;
    }
    case AP_OP_MSE_LOSS: {
        ap_spec S = E[0];
        E[1] = S;
        r->C = ap_spec_replicated(0);
        r->C.partial = (uint8_t)(spec_axes(&S) & live);
        r->post = 1.0 / (double)spec_tiles(m, &S);
        return true;
    }
    case AP_OP_CROSS_ENTROPY: {
        ap_spec S = E[0];
        whole_rows(c, &S, &ap_src(g, v, 0)->shape, -1, r,
                   "vocabulary-split cross-entropy needs whole rows of logits");
        E[0] = S;
        E[1] = spec_drop_dim(&S, S.ndim - 1);
        r->C = ap_spec_replicated(0);
        r->C.partial = (uint8_t)(spec_axes(&S) & live);
        r->post = 1.0 / (double)spec_tiles(m, &S);
        return true;
    }
    case AP_OP_MATMUL:
        rule_matmul(c, v, r);
        return true;
    case AP_OP_BATCH_MATMUL:
        rule_batch_matmul(c, v, r);
        return true;
    case AP_OP_EMBEDDING: {   /* table [V, C], ids S -> S + [C] */
        /* A vocabulary-split table: each device looks up its rows (zeros for the others'
         * ids, the kernel's ia[0] / ia[1] set in lower_node) and the result is a pending sum
         * over the vocabulary axes (Megatron's parallel embedding). */
        int ni = E[1].ndim;
        r->C = ap_spec_replicated(v->shape.ndim);
        for (int d = 0; d < ni; d++) r->C.dim[d] = E[1].dim[d];
        r->C.dim[ni] = E[0].dim[1];
        r->C.partial = (uint8_t)(dim_axes(E[0].dim[0]) & live);
        return true;
    }
    case AP_OP_EMBEDDING_BACK: {   /* dY [S.., C], ids S -> [V, C] */
        int ni = E[1].ndim;
        for (int d = 0; d < ni; d++)
            if (E[0].dim[d] != E[1].dim[d]) {
                E[0].dim[d] = E[1].dim[d];
                r->why = "gradient and ids must be split alike";
            }
        r->C = ap_spec_replicated(2);
        r->C.dim[1] = E[0].dim[E[0].ndim - 1];
        r->C.partial = (uint8_t)(spec_axes(&E[1]) & live);
        return true;
    }
    default:
        return false;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Nodes                                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* The plan's collectives for (node, operand), in order. */
static int plan_steps(const ap_shard_plan *p, int node, int operand, ap_collective *out) {
    int n = 0;
    for (int i = 0; i < p->n_coll && n < AP_RESHARD_MAX_STEPS; i++) {
        const ap_shard_coll *sc = &p->coll[i];
        if (sc->node != node || sc->operand != operand) continue;
        out[n].kind = sc->kind;
        out[n].axis = sc->axis;
        out[n].bytes = sc->bytes;
        out[n].time = sc->time;
        out[n].from = sc->from;
        out[n].to = sc->to;
        n++;
    }
    return n;
}

static bool is_leaf(ap_op op) {
    return op == AP_OP_INPUT || op == AP_OP_PARAM || op == AP_OP_OPT_STATE;
}

/* A SCALE kernel: out value (new, shape s) = src * f. */
static ap_status emit_scale(sp_lower_ctx *c, int src, const ap_shape *s, double f, int node,
                            int operand, int *out) {
    ap_attrs a;
    memset(&a, 0, sizeof a);
    a.f[0] = f;
    const ap_dtype dt = AUTOPAR_F32;
    return emit_kernel(c, AP_OP_SCALE, &a, s, dt, 1, &src, s, &dt, node, operand, out);
}

/* Where this device's tile of a tensor of shape `full` under spec starts along dim d. */
static ap_status tile_start(const sp_lower_ctx *c, const ap_spec *spec, const ap_shape *full,
                            int d, int64_t *start) {
    int64_t off[AP_MAX_DIMS], ext[AP_MAX_DIMS];
    ap_status st = ap_spec_tile(c->mesh, spec, full, c->coord[0], c->coord[1], off, ext);
    if (!st) *start = off[d];
    return st;
}

/* Operand k of node id brought into `layout` (along the plan's route when the plan reads it in
 * that layout): *out gets the value. */
static ap_status read_operand(sp_lower_ctx *c, int id, int k, const ap_spec *layout, int *out) {
    const ap_node *v = c->g->nodes[id], *u = ap_src(c->g, v, k);
    const ap_shard_node *pn = &c->plan->node[id];
    ap_collective steps[AP_RESHARD_MAX_STEPS];
    int ns = 0;
    if (k < pn->n_src) {
        ap_spec want = pn->in[k];
        want.partial = 0;
        if (ap_spec_equal(&want, layout)) ns = plan_steps(c->plan, id, k, steps);
    }
    return sp_emit_reshard(c, c->node_val[u->id], false, &c->spec[u->id], layout, &u->shape,
                           u->dtype, ns ? steps : NULL, ns, id, k, out);
}

/* Node id's local result res (laid out as C) brought into the plan's layout by the node's own
 * collectives (an update also into its leaf's), as the node's value. */
static ap_status emit_result(sp_lower_ctx *c, int id, int res, const ap_spec *C) {
    const ap_node *v = c->g->nodes[id];
    ap_collective steps[AP_RESHARD_MAX_STEPS];
    int ns = plan_steps(c->plan, id, -1, steps);
    int fin;
    ap_status st = sp_emit_reshard(c, res, true, C, &c->spec[id], &v->shape, v->dtype,
                                   ns ? steps : NULL, ns, id, -1, &fin);
    if (st) return st;
    /* An update must land in its leaf's layout (the plan guarantees it; be safe). */
    if (v->assign_to >= 0 && !ap_spec_equal(&c->spec[id], &c->spec[v->assign_to])) {
        int f2;
        if ((st = sp_emit_reshard(c, fin, true, &c->spec[id], &c->spec[v->assign_to], &v->shape,
                                  v->dtype, NULL, 0, id, -1, &f2)))
            return st;
        fin = f2;
    }
    c->node_val[id] = fin;
    if (v->assign_to >= 0) c->prog->val[fin].to_end = true;
    return AUTOPAR_OK;
}

/* Cross-entropy (and its backward) on logits whose vocabulary (last) dim the plan splits over
 * mesh axes A, as the sharding pass prices it (Megatron's vocabulary-parallel loss): each
 * device computes the row statistics of its columns (CE_PARTIAL: max, sum of exponentials,
 * the label's logit when it is local), they are all-gathered over A (3 numbers per row and
 * device) and combined (CE_COMBINE) into the loss, or into the statistics from which
 * CE_BACK_PARTIAL computes the device's columns of the gradient. Rows may also be split (over
 * the other axes): means are then taken over local rows and scaled by local / global, as for
 * the whole-row kernels. Sets *done = false (nothing emitted) when the plan's logits layout
 * does not split the vocabulary. */
static ap_status lower_ce_parallel(sp_lower_ctx *c, int id, bool *done) {
    const autopar_graph *g = c->g;
    const ap_mesh *m = c->mesh;
    const ap_node *v = g->nodes[id];
    const ap_shard_node *pn = &c->plan->node[id];
    bool back = v->op == AP_OP_CROSS_ENTROPY_BACK;
    int kl = back ? 1 : 0, kt = kl + 1;   /* logits and labels operands */
    *done = false;
    if (pn->n_src <= kt) return AUTOPAR_OK;
    const ap_node *lg = ap_src(g, v, kl), *lb = ap_src(g, v, kt);
    ap_spec P = pn->in[kl];
    P.partial = 0;
    int last = P.ndim - 1;
    if (last < 0 || P.ndim != lg->shape.ndim || P.dim[last] == AP_DIM_R ||
        dim_parts(m, P.dim[last]) <= 1 || !spec_ok(m, &P, &lg->shape))
        return AUTOPAR_OK;
    *done = true;
    ap_spec T = spec_drop_dim(&P, last);
    ap_mesh_axis axis = P.dim[last] == AP_DIM_S0 ? AP_AXIS_0
                      : P.dim[last] == AP_DIM_S1 ? AP_AXIS_1 : AP_AXIS_FLAT;
    int n = dim_parts(m, P.dim[last]);
    double row_share = 1.0 / (double)spec_tiles(m, &T);   /* local rows / global rows */
    ap_status st;

    /* operands in the plan's layouts (its routes when they match) */
    int sv[AP_MAX_SRC];
    ap_spec want[3];
    want[kl] = P;
    want[kt] = T;
    if (back) want[0] = ap_spec_replicated(0);
    for (int k = 0; k < v->n_src; k++)
        if ((st = read_operand(c, id, k, &want[k], &sv[k]))) return st;
    ap_shape Ll, Tl;
    if ((st = local_shape(c, &P, &lg->shape, lg->name, &Ll)) ||
        (st = local_shape(c, &T, &lb->shape, lb->name, &Tl)))
        return st;
    int64_t v0;   /* this device's first column */
    if ((st = tile_start(c, &P, &lg->shape, last, &v0))) return st;

    /* statistics of this device's columns, all-gathered over the vocabulary axes */
    ap_attrs a;
    memset(&a, 0, sizeof a);
    a.i[0] = v0;
    a.i[1] = lg->shape.dim[last];
    ap_shape parts_shape = Tl;
    parts_shape.dim[parts_shape.ndim++] = 3;
    int parts, srcs[4] = {sv[kl], sv[kt], -1, -1};
    ap_shape sh[4] = {Ll, Tl};
    ap_dtype dts[4] = {AUTOPAR_F32, AUTOPAR_I32, AUTOPAR_F32, AUTOPAR_F32};
    if ((st = emit_kernel(c, AP_OP_CE_PARTIAL, &a, &parts_shape, AUTOPAR_F32, 2, srcs, sh, dts,
                          id, -1, &parts)))
        return st;
    ap_shape all_shape;
    memset(&all_shape, 0, sizeof all_shape);
    all_shape.ndim = parts_shape.ndim + 1;
    all_shape.dim[0] = n;
    for (int d = 0; d < parts_shape.ndim; d++) all_shape.dim[d + 1] = parts_shape.dim[d];
    int all = sp_value_new(c->prog, numel_bytes(c, &all_shape, AUTOPAR_F32), id, false);
    if (all < 0) return AUTOPAR_ERR_NOMEM;
    sp_ins *in = ins_new(c->prog, SP_COLL, id, -1);
    if (!in) return AUTOPAR_ERR_NOMEM;
    in->coll = AP_COLL_ALL_GATHER;
    in->axis = axis;
    in->send = parts;
    in->recv = all;
    in->count = (size_t)ap_shape_numel(&parts_shape);
    in->comm_dtype = sp_comm_dtype(AUTOPAR_F32, c->precision);

    memset(&a, 0, sizeof a);
    a.i[0] = back ? 1 : 0;
    ap_shape comb_shape = Tl;
    if (back) comb_shape.dim[comb_shape.ndim++] = 2;
    else comb_shape.ndim = 0;
    int comb;
    if ((st = emit_kernel(c, AP_OP_CE_COMBINE, &a, &comb_shape, AUTOPAR_F32, 1, &all,
                          &all_shape, dts, id, -1, &comb)))
        return st;

    int res;
    ap_spec C;
    if (!back) {   /* the loss: a mean over this device's rows, summed over the row tiles */
        if ((st = emit_scale(c, comb, &comb_shape, row_share, id, -1, &res))) return st;
        C = ap_spec_replicated(0);
        C.partial = (uint8_t)(spec_axes(&T) & live_axes(m));
    } else {       /* the device's gradient columns; dL scaled as the kernel divides locally */
        ap_shape scalar;
        memset(&scalar, 0, sizeof scalar);
        int dl;
        if ((st = emit_scale(c, sv[0], &scalar, row_share, id, 0, &dl))) return st;
        memset(&a, 0, sizeof a);
        a.i[0] = v0;
        int bs[4] = {dl, sv[kl], sv[kt], comb};
        ap_shape bsh[4] = {scalar, Ll, Tl, comb_shape};
        ap_dtype bdt[4] = {AUTOPAR_F32, AUTOPAR_F32, AUTOPAR_I32, AUTOPAR_F32};
        if ((st = emit_kernel(c, AP_OP_CE_BACK_PARTIAL, &a, &Ll, AUTOPAR_F32, 4, bs, bsh, bdt,
                              id, -1, &res)))
            return st;
        C = P;
    }
    return emit_result(c, id, res, &C);
}

static ap_status lower_node(sp_lower_ctx *c, int id) {
    const autopar_graph *g = c->g;
    const ap_mesh *m = c->mesh;
    const ap_node *v = g->nodes[id];
    const ap_shard_node *pn = &c->plan->node[id];
    char b1[AP_SPEC_STR_MAX], b2[AP_SPEC_STR_MAX];
    ap_status st;
    if (v->op == AP_OP_CROSS_ENTROPY || v->op == AP_OP_CROSS_ENTROPY_BACK) {
        bool done = false;
        if ((st = lower_ce_parallel(c, id, &done)) || done) return st;
    }

    op_rule r;
    memset(&r, 0, sizeof r);
    for (int k = 0; k < v->n_src; k++) {
        r.E[k] = k < pn->n_src ? pn->in[k] : c->spec[v->src[k]];
        if (r.E[k].ndim != ap_src(g, v, k)->shape.ndim) r.E[k] = c->spec[v->src[k]];
        r.E[k].partial = 0;   /* kernels read finished values */
    }
    if (!op_rule_of(c, v, &r))
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "spmd lowering: op %s ('%s') has no SPMD rule",
                        ap_op_name(v->op), v->name);
    /* A layout the local kernel cannot use (axis conflicts, indivisible): compute the op whole
     * on every device from replicated operands. */
    bool ok = spec_ok(m, &r.C, &v->shape);
    for (int k = 0; ok && k < v->n_src; k++) ok = spec_ok(m, &r.E[k], &ap_src(g, v, k)->shape);
    if (!ok) {
        for (int k = 0; k < v->n_src; k++) r.E[k] = ap_spec_replicated(ap_src(g, v, k)->shape.ndim);
        r.C = ap_spec_replicated(v->shape.ndim);
        r.pre_k = -1;
        r.pre = r.post = 1.0;
        r.why = "operand layouts do not combine into a local computation";
    }
    for (int k = 0; k < v->n_src && k < pn->n_src; k++) {
        ap_spec want = pn->in[k];
        want.partial = 0;
        if (!ap_spec_equal(&want, &r.E[k]) &&
            (st = add_note(c->prog, id, k, "%s reads '%s' as %s, plan %s: %s", ap_op_name(v->op),
                           ap_src(g, v, k)->name, spec_s(&r.E[k], b1), spec_s(&pn->in[k], b2),
                           r.why ? r.why : "layout adjusted")))
            return st;
    }

    /* Operands. */
    int sv[AP_MAX_SRC];
    for (int k = 0; k < v->n_src; k++) {
        const ap_node *u = ap_src(g, v, k);
        if ((st = read_operand(c, id, k, &r.E[k], &sv[k]))) return st;
        if (k == r.pre_k && r.pre != 1.0) {
            ap_shape ls;
            if ((st = local_shape(c, &r.E[k], &u->shape, u->name, &ls))) return st;
            if ((st = emit_scale(c, sv[k], &ls, r.pre, id, k, &sv[k]))) return st;
        }
    }

    /* The local kernel. */
    ap_shape out_local;
    if ((st = local_shape(c, &r.C, &v->shape, v->name, &out_local))) return st;
    int res = sp_value_new(c->prog, numel_bytes(c, &out_local, v->dtype), id, false);
    if (res < 0) return AUTOPAR_ERR_NOMEM;
    sp_ins *in = ins_new(c->prog, SP_KERNEL, id, -1);
    if (!in) return AUTOPAR_ERR_NOMEM;
    ap_kernel_call_from_node(g, v, c->precision, &in->call);
    in->call.name = v->name;
    in->call.out_shape = out_local;
    for (int k = 0; k < v->n_src; k++) {
        const ap_node *u = ap_src(g, v, k);
        if ((st = local_shape(c, &r.E[k], &u->shape, u->name, &in->call.src_shape[k])))
            return st;
        in->src[k] = sv[k];
    }
    if (v->op == AP_OP_RESHAPE)   /* kernels size from shapes; keep the attrs consistent */
        for (int d = 0; d < out_local.ndim; d++) in->call.attrs.i[1 + d] = out_local.dim[d];
    if (v->op == AP_OP_SOFTMAX && v->attrs.i[0] != 0 && r.C.ndim >= 2 &&
        r.C.dim[r.C.ndim - 2] != AP_DIM_R &&   /* the device's first query row */
        (st = tile_start(c, &r.C, &v->shape, r.C.ndim - 2, &in->call.attrs.i[1])))
        return st;
    if (v->op == AP_OP_EMBEDDING && r.E[0].dim[0] != AP_DIM_R) {   /* this device's rows */
        const ap_node *table = ap_src(g, v, 0);
        if ((st = tile_start(c, &r.E[0], &table->shape, 0, &in->call.attrs.i[0]))) return st;
        in->call.attrs.i[1] = table->shape.dim[0];
    }
    in->out = res;
    in->uses_step = v->op == AP_OP_ADAMW_UPDATE;
    if (r.post != 1.0 && (st = emit_scale(c, res, &out_local, r.post, id, -1, &res))) return st;

    /* Own collectives: the local result into the plan's layout. */
    return emit_result(c, id, res, &r.C);
}

ap_status sp_lower_step(sp_lower_ctx *c, int *loss_val) {
    const autopar_graph *g = c->g;
    ap_status st;
    *loss_val = -1;
    for (int id = 0; id < g->n_nodes; id++) {
        if (is_leaf(g->nodes[id]->op)) continue;
        /* a stage of a pipeline: other stages' nodes are skipped; external ones are persistent
         * values written from outside */
        if (c->plan && !c->plan->node[id].in_stage) continue;
        if ((st = lower_node(c, id))) return st;
    }
    if (g->loss >= 0 && (!c->plan || c->plan->node[g->loss].in_stage)) {
        const ap_node *l = g->nodes[g->loss];
        ap_spec rep = ap_spec_replicated(l->shape.ndim);
        int lv;
        if ((st = sp_emit_reshard(c, c->node_val[l->id], false, &c->spec[l->id], &rep, &l->shape,
                                  l->dtype, NULL, 0, l->id, -2, &lv)))
            return st;
        if (!c->prog->val[lv].persistent) c->prog->val[lv].to_end = true;
        *loss_val = lv;
    }
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Memory plan                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static size_t align_up(size_t x) { return (x + SP_ALIGN - 1) / SP_ALIGN * SP_ALIGN; }

static void touch(sp_prog *p, int v, int i) {
    if (v < 0) return;
    sp_value *x = &p->val[v];
    if (x->first < 0 || i < x->first) x->first = i;
    if (i > x->last) x->last = i;
}

/* qsort has no context argument: the comparator reads the values through this pointer, set
 * just before the sort (the lowering is single-threaded, see spmd.h). */
static const sp_value *g_sort_vals;

/* Larger (aligned) values first; ties by first use, then id, so the order is deterministic. */
static int cmp_size(const void *a, const void *b) {
    const sp_value *v = g_sort_vals;
    int x = *(const int *)a, y = *(const int *)b;
    size_t sx = align_up(v[x].bytes), sy = align_up(v[y].bytes);
    if (sx != sy) return sx > sy ? -1 : 1;
    if (v[x].first != v[y].first) return v[x].first < v[y].first ? -1 : 1;
    return x < y ? -1 : x > y;
}

static int by_offset(const void *a, const void *b) {
    const size_t *x = a, *y = b;   /* pairs (offset, end) */
    return x[0] < y[0] ? -1 : x[0] > y[0];
}

ap_status sp_plan_memory(sp_prog *p) {
    for (int v = 0; v < p->n_val; v++) p->val[v].first = p->val[v].last = -1;
    for (int i = 0; i < p->n_ins; i++) {
        const sp_ins *in = &p->ins[i];
        touch(p, in->out, i);
        touch(p, in->send, i);
        touch(p, in->recv, i);
        for (int k = 0; k < AP_MAX_SRC; k++) touch(p, in->src[k], i);
    }
    int end = p->n_ins > 0 ? p->n_ins - 1 : 0;
    int n_t = 0;
    for (int v = 0; v < p->n_val; v++) {
        sp_value *x = &p->val[v];
        if (x->persistent) continue;
        if (x->to_end) {
            if (x->first < 0) x->first = end;
            x->last = end;
        }
        if (x->first >= 0) n_t++;
    }
    int *order = malloc(sizeof(int) * (size_t)(n_t > 0 ? n_t : 1));
    size_t *placed = malloc(2 * sizeof(size_t) * (size_t)(n_t > 0 ? n_t : 1));
    int *placed_id = malloc(sizeof(int) * (size_t)(n_t > 0 ? n_t : 1));
    long long *delta = calloc((size_t)p->n_ins + 2, sizeof *delta);
    if (!order || !placed || !placed_id || !delta) {
        free(order);
        free(placed);
        free(placed_id);
        free(delta);
        return ap_error(AUTOPAR_ERR_NOMEM, "spmd memory plan: out of memory");
    }
    n_t = 0;
    for (int v = 0; v < p->n_val; v++)
        if (!p->val[v].persistent && p->val[v].first >= 0) order[n_t++] = v;

    /* Liveness peak. */
    for (int i = 0; i < n_t; i++) {
        const sp_value *x = &p->val[order[i]];
        delta[x->first] += (long long)align_up(x->bytes);
        delta[x->last + 1] -= (long long)align_up(x->bytes);
    }
    long long live = 0, peak = 0;
    int peak_at = 0;
    for (int i = 0; i < p->n_ins; i++) {
        live += delta[i];
        if (live > peak) {
            peak = live;
            peak_at = i;
        }
    }
    p->transient_peak = (size_t)peak;
    p->peak_ins = peak_at;

    /* Offsets: greedy by size (largest first, each at the lowest offset where it does not
     * overlap a value placed before it that is live at the same time). */
    g_sort_vals = p->val;
    qsort(order, (size_t)n_t, sizeof *order, cmp_size);
    size_t arena = 0;
    int n_placed = 0;
    size_t *conf = malloc(2 * sizeof(size_t) * (size_t)(n_t > 0 ? n_t : 1));
    if (!conf) {
        free(order);
        free(placed);
        free(placed_id);
        free(delta);
        return ap_error(AUTOPAR_ERR_NOMEM, "spmd memory plan: out of memory");
    }
    for (int i = 0; i < n_t; i++) {
        sp_value *x = &p->val[order[i]];
        size_t sz = align_up(x->bytes);
        int nc = 0;
        for (int j = 0; j < n_placed; j++) {
            const sp_value *y = &p->val[placed_id[j]];
            if (y->last < x->first || x->last < y->first) continue;
            conf[2 * nc] = placed[2 * j];
            conf[2 * nc + 1] = placed[2 * j + 1];
            nc++;
        }
        qsort(conf, (size_t)nc, 2 * sizeof(size_t), by_offset);
        size_t off = 0;
        for (int j = 0; j < nc; j++) {
            if (conf[2 * j] >= off + sz) break;
            if (conf[2 * j + 1] > off) off = conf[2 * j + 1];
        }
        x->offset = off;
        placed[2 * n_placed] = off;
        placed[2 * n_placed + 1] = off + sz;
        placed_id[n_placed++] = order[i];
        if (off + sz > arena) arena = off + sz;
    }
    p->arena_bytes = arena;
    free(conf);
    free(order);
    free(placed);
    free(placed_id);
    free(delta);
    return AUTOPAR_OK;
}
