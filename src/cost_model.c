/*
 * Alpha-beta collective costs, roofline compute time and resharding costs. Contracts in
 * cost_model.h.
 */
#include "cost_model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

AP_INTERNAL const char *ap_coll_kind_name(ap_coll_kind k) {
    switch (k) {
    case AP_COLL_ALL_REDUCE: return "all-reduce";
    case AP_COLL_ALL_GATHER: return "all-gather";
    case AP_COLL_REDUCE_SCATTER: return "reduce-scatter";
    case AP_COLL_ALL_TO_ALL: return "all-to-all";
    case AP_COLL_SEND_RECV: return "send-recv";
    default: return "?";
    }
}

AP_INTERNAL double ap_collective_time(ap_coll_kind k, int n, double alpha, double beta,
                                      double bytes) {
    if (n <= 1) return 0.0;
    double nn = (double)n;
    switch (k) {
    case AP_COLL_ALL_REDUCE: return alpha + 2.0 * (nn - 1.0) / nn * bytes * beta;
    case AP_COLL_ALL_GATHER:
    case AP_COLL_REDUCE_SCATTER: return alpha + (nn - 1.0) / nn * bytes * beta;
    case AP_COLL_ALL_TO_ALL: return alpha + (nn - 1.0) / (nn * nn) * bytes * beta;
    case AP_COLL_SEND_RECV: return alpha + bytes * beta;
    default: return 0.0;
    }
}

AP_INTERNAL double ap_mesh_collective_time(const ap_mesh *m, ap_coll_kind k, ap_mesh_axis axis,
                                           double bytes) {
    if (!m || axis < 0 || axis >= AP_AXIS_COUNT) return 0.0;
    return ap_collective_time(k, ap_mesh_axis_size(m, axis), m->alpha[axis], m->beta[axis],
                              bytes);
}

AP_INTERNAL double ap_compute_time(const autopar_cluster *c, double flops, double bytes,
                                   ap_flop_type type, double efficiency) {
    double peak = type == AP_FLOPS_F16 ? c->peak_flops_f16 : c->peak_flops_f32;
    if (!(efficiency > 0.0 && efficiency <= 1.0)) efficiency = 1.0;
    double t_flops = flops / peak, t_bytes = bytes / c->memory_bandwidth;
    return (t_flops > t_bytes ? t_flops : t_bytes) / efficiency;
}

AP_INTERNAL ap_status ap_spec_device_bytes(const ap_mesh *m, const ap_spec *s,
                                           const ap_shape *full, size_t elem_size,
                                           double *bytes) {
    ap_shape local;
    ap_status st = ap_spec_local_shape(m, s, full, &local);
    if (st) return st;
    if (bytes) *bytes = (double)ap_shape_numel(&local) * (double)elem_size;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Resharding: shortest path over specs                                                        */
/* ------------------------------------------------------------------------------------------ */

/*
 * A spec's split of one dim is a list of mesh axes, major first: R = [], S0 = [0], S1 = [1],
 * S01 = [0, 1]. Only the minor (last) axis can be gathered or moved away, and a new split is
 * appended as the minor axis: those are the moves whose result is again a rectangular tile
 * that one of the four dim specs describes (gathering axis 0 of S01 would leave every device
 * a strided set of rows).
 */
static int dim_last_axis(uint8_t d) {
    return d == AP_DIM_S0 ? 0 : (d == AP_DIM_S1 || d == AP_DIM_S01) ? 1 : -1;
}
static uint8_t dim_pop(uint8_t d) { return d == AP_DIM_S01 ? AP_DIM_S0 : AP_DIM_R; }
/* AP_DIM_SPEC_COUNT when the result is not one of the four specs ([1, 0] or 3 axes). */
static uint8_t dim_push(uint8_t d, int axis) {
    if (d == AP_DIM_R) return axis == 0 ? AP_DIM_S0 : AP_DIM_S1;
    if (d == AP_DIM_S0 && axis == 1) return AP_DIM_S01;
    return AP_DIM_SPEC_COUNT;
}
static unsigned spec_axes_used(const ap_spec *s) {
    unsigned used = s->partial;
    for (int d = 0; d < s->ndim; d++)
        used |= s->dim[d] == AP_DIM_S0 ? 1u : s->dim[d] == AP_DIM_S1 ? 2u
              : s->dim[d] == AP_DIM_S01 ? 3u : 0u;
    return used;
}

/* 2 bits per dim, partial bits above: every spec of rank <= 4 has a key below 1024. */
#define N_KEYS (1 << (2 * AP_MAX_DIMS + 2))
static int spec_key(const ap_spec *s) {
    int k = 0;
    for (int d = 0; d < s->ndim; d++) k |= s->dim[d] << (2 * d);
    return k | (s->partial << (2 * AP_MAX_DIMS));
}
static ap_spec spec_from_key(int key, int ndim) {
    ap_spec s = ap_spec_replicated(ndim);
    for (int d = 0; d < ndim; d++) s.dim[d] = (uint8_t)((key >> (2 * d)) & 3);
    s.partial = (uint8_t)(key >> (2 * AP_MAX_DIMS));
    return s;
}

typedef struct search {
    const ap_mesh *m;
    double         full_bytes;
    int            ndim;
    bool           divisible[AP_MAX_DIMS][AP_DIM_SPEC_COUNT];
    /* Per key: best (time, collectives) found, predecessor and the collective on the edge from
     * it (kind < 0: no communication). */
    double         time[N_KEYS];
    int            n_coll[N_KEYS];
    short          prev[N_KEYS];
    signed char    kind[N_KEYS], axis[N_KEYS];
    double         bytes[N_KEYS], step_time[N_KEYS];
    unsigned char  state[N_KEYS];   /* 0 unseen, 1 open, 2 done */
    short          open[N_KEYS];
    int            n_open;
} search;

static bool spec_divisible(const search *S, const ap_spec *s) {
    for (int d = 0; d < s->ndim; d++)
        if (!S->divisible[d][s->dim[d]]) return false;
    return true;
}

/* Lexicographic (time, collectives) with a relative tolerance on time, so that routes equal up
 * to rounding are decided by their number of collectives. */
static bool better(double t_new, int c_new, double t_old, int c_old) {
    double tol = 1e-12 * (fabs(t_old) > fabs(t_new) ? fabs(t_old) : fabs(t_new)) + 1e-300;
    if (t_new < t_old - tol) return true;
    if (t_new > t_old + tol) return false;
    return c_new < c_old;
}

/* Offers an edge from key `from` to spec `to` carrying one collective (kind < 0: none). */
static void relax(search *S, int from, const ap_spec *to, int kind, ap_mesh_axis axis,
                  double bytes) {
    if (!spec_divisible(S, to)) return;
    int key = spec_key(to);
    if (S->state[key] == 2) return;
    double t = 0.0;
    int moves = 0;
    if (kind >= 0) {
        int n = ap_mesh_axis_size(S->m, axis);
        if (n > 1) {
            t = ap_mesh_collective_time(S->m, (ap_coll_kind)kind, axis, bytes);
            moves = 1;
        } else {
            kind = -1;   /* a collective over one device moves nothing: do not list it */
        }
    }
    double nt = S->time[from] + t;
    int nc = S->n_coll[from] + moves;
    if (S->state[key] == 1 && !better(nt, nc, S->time[key], S->n_coll[key])) return;
    if (S->state[key] == 0) {
        S->state[key] = 1;
        S->open[S->n_open++] = (short)key;
    }
    S->time[key] = nt;
    S->n_coll[key] = nc;
    S->prev[key] = (short)from;
    S->kind[key] = (signed char)kind;
    S->axis[key] = (signed char)axis;
    S->bytes[key] = bytes;
    S->step_time[key] = t;
}

static void expand(search *S, int key) {
    const ap_mesh *m = S->m;
    /* ndim was validated; the clamp lets the optimiser see that dim[] indices stay in range. */
    int nd = S->ndim < AP_MAX_DIMS ? S->ndim : AP_MAX_DIMS;
    ap_spec s = spec_from_key(key, nd);
    double shard = S->full_bytes / (double)ap_spec_num_tiles(m, &s);
    unsigned used = spec_axes_used(&s);

    for (int a = 0; a < 2; a++) {
        unsigned bit = 1u << a;
        double n_a = (double)m->shape[a];
        for (int d = 0; d < nd; d++) {
            /* Gather, or move to another dim, the minor split axis of d. */
            if (dim_last_axis(s.dim[d]) == a) {
                ap_spec t = s;
                t.dim[d] = dim_pop(s.dim[d]);
                relax(S, key, &t, AP_COLL_ALL_GATHER, (ap_mesh_axis)a, shard * n_a);
                for (int d2 = 0; d2 < nd; d2++) {
                    if (d2 == d) continue;
                    uint8_t pushed = dim_push(s.dim[d2], a);
                    if (pushed == AP_DIM_SPEC_COUNT) continue;
                    ap_spec u = t;
                    u.dim[d2] = pushed;
                    relax(S, key, &u, AP_COLL_ALL_TO_ALL, (ap_mesh_axis)a, shard * n_a);
                }
            }
            /* Split d further over a free axis: every device slices its own shard. */
            if (!(used & bit)) {
                uint8_t pushed = dim_push(s.dim[d], a);
                if (pushed != AP_DIM_SPEC_COUNT) {
                    ap_spec t = s;
                    t.dim[d] = pushed;
                    relax(S, key, &t, -1, (ap_mesh_axis)a, 0.0);
                }
            }
        }
        if (s.partial & bit) {
            ap_spec t = s;
            t.partial &= (uint8_t)~bit;
            relax(S, key, &t, AP_COLL_ALL_REDUCE, (ap_mesh_axis)a, shard);
            for (int d = 0; d < nd; d++) {
                uint8_t pushed = dim_push(s.dim[d], a);
                if (pushed == AP_DIM_SPEC_COUNT) continue;
                ap_spec u = t;
                u.dim[d] = pushed;
                relax(S, key, &u, AP_COLL_REDUCE_SCATTER, (ap_mesh_axis)a, shard);
            }
        } else if (!(used & bit) && m->shape[a] == 1) {
            /* A sum over one device is already complete, so "pending" is free to claim. */
            ap_spec t = s;
            t.partial |= (uint8_t)bit;
            relax(S, key, &t, -1, (ap_mesh_axis)a, 0.0);
        }
    }

    /* Whole-mesh collectives: one step where the per-axis route needs two. */
    double n = (double)m->n_devices;
    for (int d = 0; d < nd; d++) {
        if (s.dim[d] == AP_DIM_S01) {
            ap_spec t = s;
            t.dim[d] = AP_DIM_R;
            relax(S, key, &t, AP_COLL_ALL_GATHER, AP_AXIS_FLAT, shard * n);
            for (int d2 = 0; d2 < nd; d2++) {
                if (d2 == d || s.dim[d2] != AP_DIM_R) continue;
                ap_spec u = t;
                u.dim[d2] = AP_DIM_S01;
                relax(S, key, &u, AP_COLL_ALL_TO_ALL, AP_AXIS_FLAT, shard * n);
            }
        }
    }
    if (s.partial == (AP_PARTIAL_0 | AP_PARTIAL_1)) {
        ap_spec t = s;
        t.partial = 0;
        relax(S, key, &t, AP_COLL_ALL_REDUCE, AP_AXIS_FLAT, shard);
        for (int d = 0; d < nd; d++) {
            if (s.dim[d] != AP_DIM_R) continue;
            ap_spec u = t;
            u.dim[d] = AP_DIM_S01;
            relax(S, key, &u, AP_COLL_REDUCE_SCATTER, AP_AXIS_FLAT, shard);
        }
    }
}

AP_INTERNAL ap_status ap_reshard_cost(const ap_mesh *m, const ap_spec *src, const ap_spec *dst,
                                      const ap_shape *shape, double full_bytes, ap_reshard *out) {
    char sb[AP_SPEC_STR_MAX], db[AP_SPEC_STR_MAX];
    if (!m || !src || !dst || !out)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_reshard_cost: NULL argument");
    memset(out, 0, sizeof *out);
    ap_status st;
    if ((st = ap_spec_validate(src)) || (st = ap_spec_validate(dst))) return st;
    if (src->ndim != dst->ndim)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "resharding '%s' -> '%s': the specs have different ranks (%d, %d)",
                        ap_spec_str(src, sb, sizeof sb), ap_spec_str(dst, db, sizeof db),
                        src->ndim, dst->ndim);
    if (!isfinite(full_bytes) || full_bytes < 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "resharding '%s' -> '%s': tensor size %g bytes is not a finite number "
                        ">= 0",
                        ap_spec_str(src, sb, sizeof sb), ap_spec_str(dst, db, sizeof db),
                        full_bytes);
    if (shape) {
        ap_shape local;
        if ((st = ap_spec_local_shape(m, src, shape, &local)) ||
            (st = ap_spec_local_shape(m, dst, shape, &local)))
            return st;
    }
    if (ap_spec_equal(src, dst)) return AUTOPAR_OK;

    search *S = calloc(1, sizeof *S);
    if (!S) return ap_error(AUTOPAR_ERR_NOMEM, "ap_reshard_cost: out of memory");
    S->m = m;
    S->full_bytes = full_bytes;
    S->ndim = src->ndim;
    for (int d = 0; d < AP_MAX_DIMS; d++)
        for (int v = 0; v < AP_DIM_SPEC_COUNT; v++) {
            ap_spec one = ap_spec_replicated(1);
            one.dim[0] = (uint8_t)v;
            S->divisible[d][v] = !shape || d >= shape->ndim ||
                                 shape->dim[d] % ap_spec_dim_parts(m, &one, 0) == 0;
        }

    int start = spec_key(src), goal = spec_key(dst);
    S->state[start] = 1;
    S->open[S->n_open++] = (short)start;
    S->kind[start] = -1;
    while (S->n_open > 0) {
        int best = 0;
        for (int i = 1; i < S->n_open; i++) {
            int k = S->open[i], b = S->open[best];
            if (better(S->time[k], S->n_coll[k], S->time[b], S->n_coll[b])) best = i;
        }
        int key = S->open[best];
        S->open[best] = S->open[--S->n_open];
        S->state[key] = 2;
        if (key == goal) break;
        expand(S, key);
    }

    if (S->state[goal] != 2) {
        unsigned missing = dst->partial & ~src->partial;
        free(S);
        if (missing)
            return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                            "resharding '%s' -> '%s' on mesh %d x %d is impossible: a pending "
                            "partial sum over mesh axis %d cannot be created by communication",
                            ap_spec_str(src, sb, sizeof sb), ap_spec_str(dst, db, sizeof db),
                            m->shape[0], m->shape[1], (missing & AP_PARTIAL_0) ? 0 : 1);
        return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                        "resharding '%s' -> '%s' on mesh %d x %d: no sequence of collectives "
                        "reaches the target",
                        ap_spec_str(src, sb, sizeof sb), ap_spec_str(dst, db, sizeof db),
                        m->shape[0], m->shape[1]);
    }

    /* Walk back from the goal; the steps come out last first. */
    int n = S->n_coll[goal];
    if (n > AP_RESHARD_MAX_STEPS) {
        free(S);
        return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                        "resharding '%s' -> '%s' needs %d collectives (limit %d)",
                        ap_spec_str(src, sb, sizeof sb), ap_spec_str(dst, db, sizeof db), n,
                        AP_RESHARD_MAX_STEPS);
    }
    out->n_steps = n;
    out->time = S->time[goal];
    int i = n;
    for (int key = goal; key != start; key = S->prev[key]) {
        if (S->kind[key] < 0) continue;
        ap_collective *c = &out->step[--i];
        c->kind = (ap_coll_kind)S->kind[key];
        c->axis = (ap_mesh_axis)S->axis[key];
        c->bytes = S->bytes[key];
        c->time = S->step_time[key];
        c->from = spec_from_key(S->prev[key], S->ndim);
        c->to = spec_from_key(key, S->ndim);
    }
    free(S);
    return AUTOPAR_OK;
}

AP_INTERNAL void ap_reshard_print(const ap_reshard *r, FILE *f) {
    static const char *const axis_name[] = {"axis 0", "axis 1", "the flat mesh"};
    if (!f || !r) return;
    if (r->n_steps == 0) fprintf(f, "  (no communication)\n");
    for (int i = 0; i < r->n_steps; i++) {
        const ap_collective *c = &r->step[i];
        char a[AP_SPEC_STR_MAX], b[AP_SPEC_STR_MAX];
        fprintf(f, "  %s on %s: %.6g bytes, %.6g s  (%s -> %s)\n", ap_coll_kind_name(c->kind),
                c->axis >= 0 && c->axis < AP_AXIS_COUNT ? axis_name[c->axis] : "?", c->bytes,
                c->time, ap_spec_str(&c->from, a, sizeof a), ap_spec_str(&c->to, b, sizeof b));
    }
}
