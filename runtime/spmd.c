/*
 * SPMD sessions (spmd.h): communicators, buffers, parameter initialisation, inputs, the step,
 * reads, error agreement. The program itself is built by spmd_lower.c.
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime (step timers) */
#include "spmd_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct ap_spmd {
    const autopar_graph *g;
    ap_mesh              mesh;          /* copy; devices owned                                */
    ap_backend          *b;
    ap_comm             *world;         /* borrowed                                           */
    ap_comm             *comm[AP_AXIS_COUNT];   /* axis-0 line, axis-1 line, whole mesh       */
    int                  coord[2];
    autopar_precision    precision;
    uint64_t             seed;
    bool                 device_reads;
    ap_spec             *spec;          /* per node: layout of its value after it ran         */
    int                 *node_val;      /* per node: its value in the step program            */
    unsigned char       *role;          /* per node: 0 not read, 1 in the stage, 2 external   */
    sp_prog              prog;
    ap_buffer           *pbuf;          /* per value: buffer of a persistent value            */
    ap_buffer           *const *pers;   /* per value: &pbuf[v] (the executor's view)          */
    ap_buffer            arena;
    int                  loss_val;
    int                  apply_from;    /* first instruction of the apply phase               */
    int                  n_in_place;    /* updates writing their leaf's buffer directly       */
    int                  n_commit;
    int                 *commit;        /* pairs (update value, leaf value) copied at the end */
    int64_t              steps;
    size_t               cur_bytes, peak_bytes, persistent_bytes;
    double               plan_peak;
    /* Gradient accumulation (ap_spmd_step_accum), set up on its first use. */
    int                  split;         /* first instruction of the apply part; -1 not yet     */
    int                  n_carry;
    int                 *carry;         /* transient values crossing the split                */
    size_t              *carry_off;     /* their offsets in acc                               */
    ap_buffer            acc;           /* the accumulators                                   */
    bool                *defer;         /* per instruction: a sum deferred past the micro part */
    int                  n_defer;
    /* Pipeline stage (ap_spmd_stage_*): boundary outputs kept to the program's end, the first
     * instruction of the backward part, the values that micro-batch k's backward needs from
     * its forward (stashed per micro-batch in flight), the stash slots. */
    int                 *keep;
    int                  n_keep;
    int                  bwd;           /* -1: not set up                                    */
    int                  n_stash;
    int                 *stash;         /* values                                            */
    size_t              *stash_off;     /* offsets in a slot                                 */
    size_t               stash_bytes;   /* one slot                                          */
    ap_buffer           *slot;          /* slots allocated so far                            */
    bool                *slot_busy;
    int                  n_slot, cap_slot;
    int                 *mb_slot;       /* per micro-batch: its slot, -1 none                */
    int                  cap_mb;
    size_t               extra_predicted;  /* accumulators + stash slots in flight           */
    /* Cumulative timers over the steps (ap_spmd_get_stats; CLOCK_MONOTONIC, see spmd.h). */
    double               t_step, t_kernel, t_coll;
    int64_t              timed_steps;
};

void ap_spmd_options_default(ap_spmd_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->precision = AUTOPAR_PRECISION_F32;
}

/* ------------------------------------------------------------------------------------------ */
/* Tracked allocations: every backend buffer of a session goes through these two functions,   */
/* which is what the measured peak counts.                                                     */
/* ------------------------------------------------------------------------------------------ */

static ap_status sp_alloc(ap_spmd *s, size_t bytes, const char *what, ap_buffer *out) {
    ap_status st = ap_backend_buffer_alloc(s->b, bytes, what, out);
    if (st) return st;
    s->cur_bytes += out->bytes;
    if (s->cur_bytes > s->peak_bytes) s->peak_bytes = s->cur_bytes;
    return AUTOPAR_OK;
}

static void sp_release(ap_spmd *s, ap_buffer *buf) {
    if (!buf->data) return;
    s->cur_bytes -= buf->bytes;
    ap_backend_buffer_free(s->b, buf);
}

/* ------------------------------------------------------------------------------------------ */
/* Executing a program                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* Buffer and byte offset of value v. */
static const ap_buffer *val_buf(const sp_prog *p, const ap_buffer *arena, ap_buffer *const *pers,
                                int v, size_t *off) {
    if (p->val[v].persistent) {
        *off = 0;
        return pers[v];
    }
    *off = p->val[v].offset;
    return arena;
}

static void *val_ptr(const sp_prog *p, const ap_buffer *arena, ap_buffer *const *pers, int v) {
    size_t off;
    const ap_buffer *b = val_buf(p, arena, pers, v, &off);
    return b->data ? (char *)b->data + off : NULL;
}

static double sp_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const char *what_of(const ap_spmd *s, const sp_ins *in, char *buf, size_t len) {
    const ap_node *v = s->g->nodes[in->node];
    if (in->operand >= 0 && in->operand < v->n_src)
        snprintf(buf, len, "resharding operand %d ('%s') of %s '%s'", in->operand,
                 ap_src(s->g, v, in->operand)->name, ap_op_name(v->op), v->name);
    else if (in->operand == -2)
        snprintf(buf, len, "reading the loss '%s'", v->name);
    else if (in->operand == -3)
        snprintf(buf, len, "gathering '%s'", v->name);
    else
        snprintf(buf, len, "%s '%s'", ap_op_name(v->op), v->name);
    return buf;
}

/* Runs instructions [begin, end) except those marked in skip (may be NULL). After a local
 * failure (or from the start when `prior` is one: an earlier part of the step failed on this
 * rank) the rank skips its remaining kernels but still takes part in every collective (with
 * whatever data), so that the other ranks finish and the caller's agreement reports the failure
 * everywhere. Returns the first failure (prior when set, its message untouched). */
static ap_status run_range(ap_spmd *s, const sp_prog *p, const ap_buffer *arena,
                           ap_buffer *const *pers, int64_t step_no, int begin, int end,
                           const bool *skip, ap_status prior) {
    ap_status first = prior;
    char first_msg[1024] = "";
    for (int i = begin; i < end; i++) {
        const sp_ins *in = &p->ins[i];
        if (skip && skip[i]) continue;
        if (first && in->kind != SP_COLL) continue;
        ap_status st = AUTOPAR_OK;
        double t_in = sp_now();
        switch (in->kind) {
        case SP_KERNEL: {
            ap_kernel_call call = in->call;
            call.out = val_ptr(p, arena, pers, in->out);
            for (int k = 0; k < call.n_src; k++) call.src[k] = val_ptr(p, arena, pers, in->src[k]);
            call.step = in->uses_step ? step_no : 1;
            st = ap_backend_run(s->b, &call);
            break;
        }
        case SP_ZERO: {
            size_t off;
            const ap_buffer *b = val_buf(p, arena, pers, in->out, &off);
            st = ap_backend_fill_zero(s->b, b, off, p->val[in->out].bytes,
                                      s->g->nodes[in->node]->name);
            break;
        }
        case SP_COLL: {
            ap_comm *cm = s->comm[in->axis];
            void *sp = val_ptr(p, arena, pers, in->send), *rp = val_ptr(p, arena, pers, in->recv);
            ap_comm_dtype t = (ap_comm_dtype)in->comm_dtype;
            switch (in->coll) {
            case AP_COLL_ALL_REDUCE:
                st = ap_comm_all_reduce(cm, sp, rp, in->count, t, AP_COMM_SUM);
                break;
            case AP_COLL_ALL_GATHER: st = ap_comm_all_gather(cm, sp, rp, in->count, t); break;
            case AP_COLL_REDUCE_SCATTER:
                st = ap_comm_reduce_scatter(cm, sp, rp, in->count, t, AP_COMM_SUM);
                break;
            case AP_COLL_ALL_TO_ALL: st = ap_comm_all_to_all(cm, sp, rp, in->count, t); break;
            default:
                st = ap_error(AUTOPAR_ERR_UNSUPPORTED, "spmd: collective kind %d", (int)in->coll);
                break;
            }
            break;
        }
        }
        if (in->kind == SP_COLL) s->t_coll += sp_now() - t_in;
        else s->t_kernel += sp_now() - t_in;
        if (st && !first) {
            char w[256];
            first = st;
            snprintf(first_msg, sizeof first_msg, "step %lld, %s (instruction %d): %s",
                     (long long)step_no, what_of(s, in, w, sizeof w), i, autopar_last_error());
        }
    }
    double t_sync = sp_now();
    ap_status sy = ap_backend_synchronize(s->b);
    s->t_kernel += sp_now() - t_sync;
    if (!first && sy) {
        first = sy;
        snprintf(first_msg, sizeof first_msg, "step %lld: %s", (long long)step_no,
                 autopar_last_error());
    }
    if (first && first_msg[0]) (void)ap_error(first, "%s", first_msg);
    return first;
}

static ap_status run_prog(ap_spmd *s, const sp_prog *p, const ap_buffer *arena,
                          ap_buffer *const *pers, int64_t step_no) {
    return run_range(s, p, arena, pers, step_no, 0, p->n_ins, NULL, AUTOPAR_OK);
}

/* ------------------------------------------------------------------------------------------ */
/* Tiles on the host                                                                           */
/* ------------------------------------------------------------------------------------------ */

/* Calls fn(first, count, local_pos) for every contiguous run (along the last dim) of the tile
 * that the device at mesh coordinate (i0, i1) holds of a tensor of shape `full` under spec:
 * `first` is the flat global index, `local_pos` the flat index in the local shard. */
typedef void (*run_fn)(void *ctx, int64_t first, int64_t count, int64_t local_pos);

static ap_status for_each_run_at(const ap_spmd *s, int i0, int i1, const ap_spec *spec,
                                 const ap_shape *full, run_fn fn, void *ctx) {
    int nd = full->ndim;
    if (nd == 0) {
        fn(ctx, 0, 1, 0);
        return AUTOPAR_OK;
    }
    int64_t off[AP_MAX_DIMS], ext[AP_MAX_DIMS], stride[AP_MAX_DIMS], idx[AP_MAX_DIMS] = {0};
    ap_status st = ap_spec_tile(&s->mesh, spec, full, i0, i1, off, ext);
    if (st) return st;
    int64_t acc = 1;
    for (int d = nd - 1; d >= 0; d--) {
        stride[d] = acc;
        acc *= full->dim[d];
    }
    for (int d = 0; d < nd; d++)
        if (ext[d] == 0) return AUTOPAR_OK;
    int64_t pos = 0;
    for (;;) {
        int64_t first = off[nd - 1];
        for (int d = 0; d < nd - 1; d++) first += (off[d] + idx[d]) * stride[d];
        fn(ctx, first, ext[nd - 1], pos);
        pos += ext[nd - 1];
        int d = nd - 2;
        for (; d >= 0; d--) {
            if (++idx[d] < ext[d]) break;
            idx[d] = 0;
        }
        if (d < 0) break;
    }
    return AUTOPAR_OK;
}

/* The same for this rank's own tile. */
static ap_status for_each_run(const ap_spmd *s, const ap_spec *spec, const ap_shape *full,
                              run_fn fn, void *ctx) {
    return for_each_run_at(s, s->coord[0], s->coord[1], spec, full, fn, ctx);
}

typedef struct init_ctx {
    const ap_node    *n;
    uint64_t          seed;
    autopar_precision p;
    char             *dst;
    size_t            esz;
} init_ctx;

static void init_run(void *vc, int64_t first, int64_t count, int64_t pos) {
    init_ctx *c = vc;
    ap_param_init_host(c->n, c->seed, c->p, first, count, c->dst + (size_t)pos * c->esz);
}

typedef struct copy_ctx {
    const char *src;
    char       *dst;
    size_t      esz;
} copy_ctx;

static void copy_run(void *vc, int64_t first, int64_t count, int64_t pos) {
    copy_ctx *c = vc;
    memcpy(c->dst + (size_t)pos * c->esz, c->src + (size_t)first * c->esz, (size_t)count * c->esz);
}

/* The reverse: a shard's runs placed into the whole tensor, converted to float for F64 data. */
typedef struct place_ctx {
    const char *shard;
    char       *whole;
    bool        f64_to_f32;
} place_ctx;

static void place_run(void *vc, int64_t first, int64_t count, int64_t pos) {
    place_ctx *c = vc;
    if (!c->f64_to_f32) {
        memcpy(c->whole + (size_t)first * 4, c->shard + (size_t)pos * 4, (size_t)count * 4);
        return;
    }
    const double *src = (const double *)c->shard + pos;
    float *dst = (float *)c->whole + first;
    for (int64_t i = 0; i < count; i++) dst[i] = (float)src[i];
}

/* Whether this rank holds zeros of a tensor whose spec pends a sum over an axis where it is not
 * at coordinate 0 (only the coordinate-0 device holds the value). */
static bool zero_by_partial(const ap_spmd *s, const ap_spec *spec) {
    return ((spec->partial & AP_PARTIAL_0) && s->mesh.shape[0] > 1 && s->coord[0] != 0) ||
           ((spec->partial & AP_PARTIAL_1) && s->mesh.shape[1] > 1 && s->coord[1] != 0);
}

/* Uploads host data of a leaf's local shard (float/int32 layout as given; converted to double
 * for F32 tensors in F64 precision). */
static ap_status upload_local(ap_spmd *s, int id, const void *host, int64_t n) {
    const ap_node *node = s->g->nodes[id];
    const ap_buffer *dst = &s->pbuf[s->node_val[id]];
    if (n == 0) return AUTOPAR_OK;
    if (node->dtype == AUTOPAR_I32 || s->precision == AUTOPAR_PRECISION_F32)
        return ap_backend_upload(s->b, dst, 0, host, (size_t)n * 4, node->name);
    double *tmp = malloc((size_t)n * sizeof *tmp);
    if (!tmp) return ap_error(AUTOPAR_ERR_NOMEM, "spmd: out of host memory for '%s'", node->name);
    for (int64_t i = 0; i < n; i++) tmp[i] = ((const float *)host)[i];
    ap_status st = ap_backend_upload(s->b, dst, 0, tmp, (size_t)n * sizeof *tmp, node->name);
    free(tmp);
    return st;
}

static ap_status init_params(ap_spmd *s) {
    const autopar_graph *g = s->g;
    ap_status st = AUTOPAR_OK;
    for (int id = 0; id < g->n_nodes && !st; id++) {
        const ap_node *n = g->nodes[id];
        if (n->op != AP_OP_PARAM || s->role[id] != 1) continue;
        int v = s->node_val[id];
        size_t bytes = s->prog.val[v].bytes;
        if (bytes == 0 || zero_by_partial(s, &s->spec[id])) continue;   /* zeroed already */
        size_t esz = ap_elem_size(n->dtype, s->precision);
        char *host = malloc(bytes);
        if (!host)
            return ap_error(AUTOPAR_ERR_NOMEM, "spmd: out of host memory initialising '%s'",
                            n->name);
        init_ctx ic = {n, s->seed, s->precision, host, esz};
        st = for_each_run(s, &s->spec[id], &n->shape, init_run, &ic);
        if (!st) st = ap_backend_upload(s->b, &s->pbuf[v], 0, host, bytes, n->name);
        free(host);
    }
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Creation                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static bool is_leaf(ap_op op) {
    return op == AP_OP_INPUT || op == AP_OP_PARAM || op == AP_OP_OPT_STATE;
}

/* Local checks of ap_spmd_new's arguments (the same outcome on every rank for the same call). */
static ap_status check_args(const autopar_graph *g, const ap_shard_plan *plan,
                            const ap_mesh *mesh, ap_backend *b, ap_comm *world,
                            const ap_spmd_options *o, int *coord) {
    const char *fn = "ap_spmd_new";
    if (!g || !plan || !mesh || !b)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: NULL graph, plan, mesh or backend", fn);
    if (o->precision != AUTOPAR_PRECISION_F32 && o->precision != AUTOPAR_PRECISION_F64)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: precision %d is not valid", fn,
                        (int)o->precision);
    if (g->status != AUTOPAR_OK)
        return ap_error(AUTOPAR_ERR_GRAPH, "%s: the graph has an error: %s", fn, g->error);
    int size = ap_comm_size(world), rank = ap_comm_rank(world);
    if (size != mesh->n_devices)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s: the mesh %d x %d has %d devices but the world communicator has %d "
                        "ranks (start the job with %d ranks)", fn, mesh->shape[0],
                        mesh->shape[1], mesh->n_devices, size, mesh->n_devices);
    int found = -1;
    for (int k = 0; k < mesh->n_devices; k++) {
        int dev = mesh->devices ? mesh->devices[k] : k;
        if (dev < 0 || dev >= size)
            return ap_error(AUTOPAR_ERR_INVALID_ARG,
                            "%s: mesh device %d is not a rank of the world communicator (0..%d)",
                            fn, dev, size - 1);
        if (dev == rank) found = k;
    }
    if (found < 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: world rank %d is not a device of the mesh",
                        fn, rank);
    coord[0] = found / mesh->shape[1];
    coord[1] = found % mesh->shape[1];
    if (plan->mesh_shape[0] != mesh->shape[0] || plan->mesh_shape[1] != mesh->shape[1])
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: the plan is for a %d x %d mesh, the mesh is "
                        "%d x %d", fn, plan->mesh_shape[0], plan->mesh_shape[1], mesh->shape[0],
                        mesh->shape[1]);
    if (plan->n_nodes != g->n_nodes)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: the plan has %d nodes, the graph %d (a plan "
                        "of another graph?)", fn, plan->n_nodes, g->n_nodes);
    for (int id = 0; id < g->n_nodes; id++) {
        const ap_node *n = g->nodes[id];
        const ap_shard_node *pn = &plan->node[id];
        if (!pn->in_stage && !pn->external) continue;   /* another stage's node, not read */
        if (pn->spec.ndim != n->shape.ndim)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: the plan's spec of '%s' has rank %d, "
                            "the tensor rank %d", fn, n->name, pn->spec.ndim, n->shape.ndim);
        if (pn->in_stage && !is_leaf(n->op) && !ap_backend_supports_op(b, n->op, o->precision))
            return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: op %s (tensor '%s') is not supported by "
                            "the %s backend", fn, ap_op_name(n->op), n->name,
                            ap_backend_name(b));
    }
    bool dev_mem = ap_backend_get_kind(b) == AP_BACKEND_CUDA;
    if (ap_comm_device_buffers(world) != dev_mem)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: the %s communicator takes %s buffers but the "
                        "%s backend has %s memory", fn, ap_comm_backend_name(world),
                        ap_comm_device_buffers(world) ? "device" : "host", ap_backend_name(b),
                        dev_mem ? "device" : "host");
    return AUTOPAR_OK;
}

static bool is_update_op(ap_op op) {
    return op == AP_OP_SGD_UPDATE || op == AP_OP_MOMENTUM_UPDATE || op == AP_OP_ADAM_M ||
           op == AP_OP_ADAM_V || op == AP_OP_ADAMW_UPDATE;
}

static bool reads_value(const sp_ins *in, int v) {
    if (in->kind == SP_COLL) return in->send == v;
    if (in->kind == SP_KERNEL)
        for (int k = 0; k < in->call.n_src; k++)
            if (in->src[k] == v) return true;
    return false;
}

static bool writes_value(const sp_ins *in, int v) {
    return in->kind == SP_COLL ? in->recv == v : in->out == v;
}

/* Makes update value src (transient) write its leaf's buffer dst directly, when that is safe:
 * src is first written in the apply part (after the step's agreement, so that a failed step
 * still changes nothing), has the leaf's size, and from that instruction on nothing reads or
 * writes the leaf's old value, except the writing instruction itself when it is an elementwise
 * optimizer kernel reading the leaf as its operand 0 (the kernels allow that aliasing). Every
 * use of src then names dst. Returns whether it did. */
static bool update_in_place(ap_spmd *s, int src, int dst) {
    sp_prog *p = &s->prog;
    if (src < 0 || dst < 0 || p->val[src].persistent || !p->val[dst].persistent ||
        p->val[src].bytes != p->val[dst].bytes)
        return false;
    int w = -1;
    for (int i = 0; i < p->n_ins && w < 0; i++)
        if (writes_value(&p->ins[i], src)) w = i;
    if (w < s->apply_from) return false;
    for (int i = w; i < p->n_ins; i++) {
        const sp_ins *in = &p->ins[i];
        if (writes_value(in, dst)) return false;
        if (!reads_value(in, dst)) continue;
        bool elementwise_self = i == w && in->kind == SP_KERNEL && is_update_op(in->call.op) &&
                                in->src[0] == dst && in->out == src;
        for (int k = 1; elementwise_self && k < in->call.n_src; k++)
            if (in->src[k] == dst) elementwise_self = false;
        if (!elementwise_self) return false;
    }
    for (int i = w; i < p->n_ins; i++) {
        sp_ins *in = &p->ins[i];
        if (in->out == src) in->out = dst;
        if (in->send == src) in->send = dst;
        if (in->recv == src) in->recv = dst;
        for (int k = 0; k < AP_MAX_SRC; k++)
            if (in->src[k] == src) in->src[k] = dst;
    }
    p->val[src].to_end = false;
    return true;
}

/* Persistent values for the leaves, the step program, the memory plan. */
static ap_status lower(ap_spmd *s, const ap_shard_plan *plan) {
    const autopar_graph *g = s->g;
    for (int id = 0; id < g->n_nodes; id++) {
        s->spec[id] = plan->node[id].spec;
        s->node_val[id] = -1;
        s->role[id] = plan->node[id].in_stage ? 1 : plan->node[id].external ? 2 : 0;
        const ap_node *n = g->nodes[id];
        /* leaves of the stage and external operands (boundary values written before they are
         * read) get persistent values; nodes of other stages that the stage does not read get
         * nothing */
        if (s->role[id] == 0 || (s->role[id] == 1 && !is_leaf(n->op))) continue;
        ap_shape ls;
        ap_status st = ap_spec_local_shape(&s->mesh, &s->spec[id], &n->shape, &ls);
        if (st) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", autopar_last_error());
            return ap_error(st, "spmd lowering: tensor '%s': %s", n->name, msg);
        }
        size_t bytes = (size_t)ap_shape_numel(&ls) * ap_elem_size(n->dtype, s->precision);
        int v = sp_value_new(&s->prog, bytes, id, true);
        if (v < 0) return AUTOPAR_ERR_NOMEM;
        s->node_val[id] = v;
    }
    sp_lower_ctx c = {g, plan, &s->mesh, s->precision, {s->coord[0], s->coord[1]}, &s->prog,
                      s->node_val, s->spec};
    ap_status st = sp_lower_step(&c, &s->loss_val);
    if (st) return st;
    for (int k = 0; k < s->n_keep; k++) {   /* boundary outputs: readable after their part */
        int id = s->keep[k], v = id >= 0 && id < g->n_nodes ? s->node_val[id] : -1;
        if (v < 0 || s->role[id] != 1)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "spmd lowering: kept node %d is not "
                            "computed by the stage", id);
        if (!s->prog.val[v].persistent) s->prog.val[v].to_end = true;
    }
    s->apply_from = s->prog.n_ins;
    for (int i = 0; i < s->prog.n_ins; i++)
        if (g->nodes[s->prog.ins[i].node]->phase == AUTOPAR_PHASE_APPLY) {
            s->apply_from = i;
            break;
        }
    s->commit = malloc(2 * sizeof(int) * (size_t)(g->n_nodes > 0 ? g->n_nodes : 1));
    if (!s->commit) return ap_error(AUTOPAR_ERR_NOMEM, "spmd: out of memory");
    for (int id = 0; id < g->n_nodes; id++) {
        const ap_node *n = g->nodes[id];
        if (n->assign_to < 0 || s->role[id] != 1) continue;
        if (s->role[n->assign_to] != 1)
            return ap_error(AUTOPAR_ERR_UNSUPPORTED, "spmd: update '%s' of the stage replaces "
                            "'%s' of another stage", n->name, g->nodes[n->assign_to]->name);
        if (!is_leaf(g->nodes[n->assign_to]->op))
            return ap_error(AUTOPAR_ERR_GRAPH, "spmd: update '%s' replaces '%s', which is not a "
                            "parameter or optimizer state", n->name,
                            g->nodes[n->assign_to]->name);
        int src = s->node_val[id], dst = s->node_val[n->assign_to];
        if (update_in_place(s, src, dst)) {
            s->node_val[id] = dst;
            s->n_in_place++;
        } else {   /* copied over the leaf at the end of a successful step */
            s->commit[2 * s->n_commit] = src;
            s->commit[2 * s->n_commit + 1] = dst;
            s->n_commit++;
        }
    }
    return sp_plan_memory(&s->prog);
}

static ap_status alloc_buffers(ap_spmd *s) {
    sp_prog *p = &s->prog;
    s->pbuf = calloc((size_t)p->n_val + 1, sizeof *s->pbuf);
    ap_buffer **pers = calloc((size_t)p->n_val + 1, sizeof *pers);
    if (!s->pbuf || !pers) {
        free(pers);
        return ap_error(AUTOPAR_ERR_NOMEM, "spmd: out of memory");
    }
    s->pers = pers;
    ap_status st = AUTOPAR_OK;
    for (int v = 0; v < p->n_val && !st; v++) {
        pers[v] = &s->pbuf[v];
        if (!p->val[v].persistent) continue;
        const char *name = s->g->nodes[p->val[v].node]->name;
        /* at least one word, so that every tensor has an address */
        size_t bytes = p->val[v].bytes ? p->val[v].bytes : 4;
        st = sp_alloc(s, bytes, name, &s->pbuf[v]);
        if (!st) st = ap_backend_fill_zero(s->b, &s->pbuf[v], 0, bytes, name);
        if (!st) s->persistent_bytes += s->pbuf[v].bytes;
    }
    if (!st && p->arena_bytes) st = sp_alloc(s, p->arena_bytes, "spmd arena", &s->arena);
    return st;
}

ap_status ap_spmd_new(const autopar_graph *g, const ap_shard_plan *plan, const ap_mesh *mesh,
                      ap_backend *b, ap_comm *world, const ap_spmd_options *opt, ap_spmd **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_spmd_new: out is NULL");
    *out = NULL;
    if (!world) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_spmd_new: world is NULL");
    ap_spmd_options o;
    ap_spmd_options_default(&o);
    if (opt) o = *opt;
    int coord[2] = {0, 0};
    ap_status st = check_args(g, plan, mesh, b, world, &o, coord);
    if ((st = ap_comm_all_ok(world, st))) return st;

    ap_spmd *s = calloc(1, sizeof *s);
    if (s) {
        s->g = g;
        s->b = b;
        s->world = world;
        s->coord[0] = coord[0];
        s->coord[1] = coord[1];
        s->precision = o.precision;
        s->seed = o.seed;
        s->device_reads = o.device_reads;
        s->loss_val = -1;
        s->split = -1;
        s->bwd = -1;
        if (o.n_keep > 0 && o.keep_nodes) {
            s->keep = malloc(sizeof(int) * (size_t)o.n_keep);
            if (s->keep) {
                memcpy(s->keep, o.keep_nodes, sizeof(int) * (size_t)o.n_keep);
                s->n_keep = o.n_keep;
            }
        }
        s->plan_peak = plan->peak_memory;
        s->mesh = *mesh;
        s->mesh.devices = malloc(sizeof(int) * (size_t)mesh->n_devices);
        s->spec = calloc((size_t)g->n_nodes + 1, sizeof *s->spec);
        s->node_val = calloc((size_t)g->n_nodes + 1, sizeof *s->node_val);
        s->role = calloc((size_t)g->n_nodes + 1, sizeof *s->role);
        if (s->mesh.devices)
            for (int k = 0; k < mesh->n_devices; k++)
                s->mesh.devices[k] = mesh->devices ? mesh->devices[k] : k;
    }
    if (!s || !s->mesh.devices || !s->spec || !s->node_val || !s->role ||
        (o.n_keep > 0 && o.keep_nodes && !s->keep))
        st = ap_error(AUTOPAR_ERR_NOMEM, "ap_spmd_new: out of memory");
    if ((st = ap_comm_all_ok(world, st))) {
        ap_spmd_free(s);
        return st;
    }

    /* Communicators: collective over the world, every rank takes part in every split. */
    int flat = coord[0] * mesh->shape[1] + coord[1];
    st = ap_comm_split(world, coord[1], coord[0], &s->comm[AP_AXIS_0]);
    if (!st) st = ap_comm_split(world, coord[0], coord[1], &s->comm[AP_AXIS_1]);
    if (!st) st = ap_comm_split(world, 0, flat, &s->comm[AP_AXIS_FLAT]);
    if (!st && o.deterministic)
        for (int a = 0; a < AP_AXIS_COUNT; a++) ap_comm_set_deterministic(s->comm[a], true);
    if ((st = ap_comm_all_ok(world, st))) {
        ap_spmd_free(s);
        return st;
    }

    st = lower(s, plan);
    if (!st) st = alloc_buffers(s);
    if (!st) st = init_params(s);
    if (!st) st = ap_backend_synchronize(b);
    if ((st = ap_comm_all_ok(world, st))) {
        ap_spmd_free(s);
        return st;
    }
    *out = s;
    return AUTOPAR_OK;
}

void ap_spmd_free(ap_spmd *s) {
    if (!s) return;
    if (s->b) (void)ap_backend_synchronize(s->b);
    if (s->pbuf)
        for (int v = 0; v < s->prog.n_val; v++) sp_release(s, &s->pbuf[v]);
    sp_release(s, &s->arena);
    sp_release(s, &s->acc);
    free(s->carry);
    free(s->carry_off);
    free(s->defer);
    for (int k = 0; k < s->n_slot; k++) sp_release(s, &s->slot[k]);
    free(s->slot);
    free(s->slot_busy);
    free(s->mb_slot);
    free(s->stash);
    free(s->stash_off);
    free(s->keep);
    for (int a = 0; a < AP_AXIS_COUNT; a++) ap_comm_free(s->comm[a]);
    free(s->pbuf);
    free((void *)s->pers);
    free(s->commit);
    sp_prog_free(&s->prog);
    free(s->spec);
    free(s->node_val);
    free(s->role);
    free(s->mesh.devices);
    free(s);
}

/* ------------------------------------------------------------------------------------------ */
/* Inputs, steps, reads                                                                        */
/* ------------------------------------------------------------------------------------------ */

static ap_status check_tensor(const ap_spmd *s, const autopar_tensor *t, int64_t n,
                              const char *fn, const ap_node **out) {
    if (!t) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: tensor is NULL", fn);
    ap_status st = ap_graph_check_tensor(s->g, t, n, fn, "session's");
    if (!st) *out = (const ap_node *)t;
    return st;
}

/* Writes the global value of a tensor kept between steps (inputs; with any_leaf also
 * parameters and optimizer states): each rank keeps its tile. Collective, agreed. */
static ap_status write_leaf(ap_spmd *s, const autopar_tensor *t, const void *data, int64_t n,
                            bool any_leaf, const char *fn) {
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    const ap_node *node = NULL;
    ap_status st = check_tensor(s, t, n, fn, &node);
    if (!st && s->role[node->id] == 0)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: tensor '%s' belongs to another stage", fn,
                      node->name);
    else if (!st && node->op != AP_OP_INPUT && s->role[node->id] != 2 &&
             !(any_leaf && (node->op == AP_OP_PARAM || node->op == AP_OP_OPT_STATE)))
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: tensor '%s' is a %s, not an input%s", fn,
                      node->name, ap_op_name(node->op),
                      any_leaf ? ", parameter or optimizer state" : "");
    if (!st && !data && n > 0)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: data for '%s' is NULL", fn, node->name);
    if (!st) {
        int v = s->node_val[node->id];
        size_t local_n = s->prog.val[v].bytes / ap_elem_size(node->dtype, s->precision);
        void *host = malloc(local_n ? local_n * 4 : 4);
        if (!host) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of host memory for '%s'", fn, node->name);
        } else {
            if (zero_by_partial(s, &s->spec[node->id])) {
                memset(host, 0, local_n * 4);
            } else {
                copy_ctx cc = {data, host, 4};
                st = for_each_run(s, &s->spec[node->id], &node->shape, copy_run, &cc);
            }
            if (!st) st = upload_local(s, node->id, host, (int64_t)local_n);
            free(host);
        }
    }
    return ap_comm_all_ok(s->world, st);
}

ap_status ap_spmd_set_input(ap_spmd *s, const autopar_tensor *t, const void *data, int64_t n) {
    return write_leaf(s, t, data, n, false, "ap_spmd_set_input");
}

ap_status ap_spmd_write(ap_spmd *s, const autopar_tensor *t, const void *data, int64_t n) {
    return write_leaf(s, t, data, n, true, "ap_spmd_write");
}

void ap_spmd_set_steps(ap_spmd *s, int64_t steps) {
    if (s && steps >= 0) s->steps = steps;
}

/* The end of a step whose program ran (status st, local): the loss downloaded, the agreement
 * over `agree` (the session's world, or a pipeline's world containing it), then (on success
 * everywhere) the updates committed over their leaves. */
static ap_status finish_step_on(ap_spmd *s, ap_status st, ap_comm *agree, double *loss) {
    double lv = 0.0;
    if (!st && s->loss_val >= 0) {
        size_t off;
        const ap_buffer *b = val_buf(&s->prog, &s->arena, s->pers, s->loss_val, &off);
        const char *name = s->g->nodes[s->g->loss]->name;
        if (s->precision == AUTOPAR_PRECISION_F64) {
            st = ap_backend_download(s->b, &lv, b, off, sizeof lv, name);
        } else {
            float f = 0.0f;
            st = ap_backend_download(s->b, &f, b, off, sizeof f, name);
            lv = f;
        }
    }
    /* With every update in place (the usual case) one agreement ends the step; updates left
     * in the arena are copied over their leaves only once every rank succeeded. */
    if (!st && s->n_commit == 0) st = ap_backend_synchronize(s->b);
    if ((st = ap_comm_all_ok(agree, st))) return st;
    for (int k = 0; k < s->n_commit && !st; k++) {
        int src = s->commit[2 * k], dst = s->commit[2 * k + 1];
        size_t off;
        const ap_buffer *b = val_buf(&s->prog, &s->arena, s->pers, src, &off);
        size_t bytes = s->prog.val[dst].bytes;
        if (bytes)
            st = ap_backend_copy(s->b, &s->pbuf[dst], 0, b, off, bytes,
                                 s->g->nodes[s->prog.val[dst].node]->name);
    }
    if (s->n_commit > 0) {
        if (!st) st = ap_backend_synchronize(s->b);
        if ((st = ap_comm_all_ok(agree, st))) return st;
    }
    s->steps++;
    if (loss) *loss = lv;
    return AUTOPAR_OK;
}

static ap_status finish_step(ap_spmd *s, ap_status st, double *loss) {
    return finish_step_on(s, st, s->world, loss);
}

static ap_status check_trainable(const ap_spmd *s, const char *fn) {
    if (s->g->loss < 0 || !s->g->has_optimizer)
        return ap_error(AUTOPAR_ERR_GRAPH, "%s: the graph has no backward pass or no optimizer "
                        "(call autopar_build_training)", fn);
    return AUTOPAR_OK;
}

/* The apply part [apply_from, end) of the step program: after an agreement over `agree`, and
 * not at all (on any rank) when any rank failed before, since updates write their leaves in
 * place. */
static ap_status run_apply(ap_spmd *s, int64_t step_no, ap_comm *agree, ap_status prior) {
    if ((prior = ap_comm_all_ok(agree, prior))) return prior;
    return run_range(s, &s->prog, &s->arena, s->pers, step_no, s->apply_from, s->prog.n_ins,
                     NULL, AUTOPAR_OK);
}

ap_status ap_spmd_step(ap_spmd *s, double *loss) {
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_spmd_step: session is NULL");
    ap_status st = check_trainable(s, "ap_spmd_step");   /* the same on every rank */
    double t_begin = sp_now();
    int64_t step_no = s->steps + 1;
    if (!st) st = run_range(s, &s->prog, &s->arena, s->pers, step_no, 0, s->apply_from, NULL,
                            AUTOPAR_OK);
    st = run_apply(s, step_no, s->world, st);
    st = finish_step(s, st, loss);
    if (!st) {  /* step timers (spmd.h: ap_spmd_stats.step_seconds) */
        s->t_step += sp_now() - t_begin;
        s->timed_steps++;
    }
    return st;
}

/* Finds the split of the step program (first instruction of an APPLY-phase node; everything
 * after it must be APPLY nodes or the loss read) and the transient values crossing it (written
 * before, read at or after it, plus the loss value), and allocates their accumulators. Local. */
static ap_status setup_accum(ap_spmd *s) {
    const char *fn = "ap_spmd_step_accum";
    const sp_prog *p = &s->prog;
    const autopar_graph *g = s->g;
    int split = s->apply_from;
    for (int i = split; i < p->n_ins; i++) {
        const sp_ins *in = &p->ins[i];
        if (g->nodes[in->node]->phase != AUTOPAR_PHASE_APPLY && in->operand != -2)
            return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: node '%s' (%s phase) runs after the "
                            "optimizer began; gradients cannot be accumulated", fn,
                            g->nodes[in->node]->name, ap_phase_name(g->nodes[in->node]->phase));
    }
    /* written[v]: the value is written before the split */
    bool *written = calloc((size_t)p->n_val + 1, sizeof *written);
    bool *carried = calloc((size_t)p->n_val + 1, sizeof *carried);
    ap_status st = AUTOPAR_OK;
    if (!written || !carried) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
    for (int i = 0; !st && i < split; i++) {
        const sp_ins *in = &p->ins[i];
        int w = in->kind == SP_COLL ? in->recv : in->out;
        if (w >= 0) written[w] = true;
    }
    for (int i = split; !st && i < p->n_ins; i++) {
        const sp_ins *in = &p->ins[i];
        int rd[AP_MAX_SRC + 1], nr = 0;
        if (in->kind == SP_KERNEL)
            for (int k = 0; k < in->call.n_src; k++) rd[nr++] = in->src[k];
        else if (in->kind == SP_COLL)
            rd[nr++] = in->send;
        for (int k = 0; k < nr; k++)
            if (rd[k] >= 0 && written[rd[k]] && !p->val[rd[k]].persistent) carried[rd[k]] = true;
    }
    if (!st && s->loss_val >= 0 && written[s->loss_val] && !p->val[s->loss_val].persistent)
        carried[s->loss_val] = true;
    int n = 0;
    size_t total = 0;
    for (int v = 0; !st && v < p->n_val; v++) {
        if (!carried[v]) continue;
        int node = p->val[v].node;
        if (node < 0 || g->nodes[node]->dtype != AUTOPAR_F32)
            st = ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: value v%d ('%s') crosses into the "
                          "optimizer and is not a float tensor", fn, v,
                          node >= 0 ? g->nodes[node]->name : "?");
        n++;
        total += (p->val[v].bytes + SP_ALIGN - 1) / SP_ALIGN * SP_ALIGN;
    }
    if (!st) {   /* a failed earlier setup may have left some of these */
        free(s->carry);
        free(s->carry_off);
        free(s->defer);
        s->defer = NULL;
        s->n_defer = 0;
        sp_release(s, &s->acc);
        s->carry = malloc(sizeof(int) * (size_t)(n ? n : 1));
        s->carry_off = malloc(sizeof(size_t) * (size_t)(n ? n : 1));
        if (!s->carry || !s->carry_off) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
    }
    if (!st && total) st = sp_alloc(s, total, "gradient accumulators", &s->acc);
    if (!st) s->extra_predicted = total;
    if (!st) {
        size_t off = 0;
        s->n_carry = 0;
        for (int v = 0; v < p->n_val; v++) {
            if (!carried[v]) continue;
            s->carry[s->n_carry] = v;
            s->carry_off[s->n_carry++] = off;
            off += (p->val[v].bytes + SP_ALIGN - 1) / SP_ALIGN * SP_ALIGN;
        }
    }
    /* In-place all-reduces of crossing values that nothing else in the micro part touches
     * afterwards (a gradient's pending sum finished by its own node) are deferred: a sum is
     * linear, so the accumulators take the partial values and the sum runs once per step. */
    if (!st && !(s->defer = calloc((size_t)p->n_ins + 1, sizeof *s->defer)))
        st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
    for (int i = 0; !st && i < split; i++) {
        const sp_ins *in = &p->ins[i];
        if (in->kind != SP_COLL || in->coll != AP_COLL_ALL_REDUCE || in->send != in->recv ||
            in->recv < 0 || !carried[in->recv])
            continue;
        int v = in->recv;
        bool touched = false;
        for (int j = i + 1; j < split && !touched; j++) {
            const sp_ins *o = &p->ins[j];
            if (o->kind == SP_KERNEL) {
                touched = o->out == v;
                for (int k = 0; k < o->call.n_src; k++) touched = touched || o->src[k] == v;
            } else if (o->kind == SP_COLL) {
                touched = o->send == v || o->recv == v;
            } else {
                touched = o->out == v;
            }
        }
        if (!touched) {
            s->defer[i] = true;
            s->n_defer++;
        }
    }
    if (!st) s->split = split;
    free(written);
    free(carried);
    return st;
}

/* One elementwise kernel over n elements: out = a + b (ADD) or out = a * f (SCALE). */
static ap_status flat_kernel(ap_spmd *s, ap_op op, void *out, const void *a, const void *b,
                             int64_t n, double f, const char *name) {
    ap_kernel_call call;
    memset(&call, 0, sizeof call);
    call.op = op;
    call.precision = s->precision;
    call.out_shape.ndim = 1;
    call.out_shape.dim[0] = n;
    call.out_dtype = AUTOPAR_F32;
    call.n_src = op == AP_OP_ADD ? 2 : 1;
    for (int k = 0; k < call.n_src; k++) {
        call.src_shape[k] = call.out_shape;
        call.src_dtype[k] = AUTOPAR_F32;
    }
    call.src[0] = a;
    call.src[1] = b;
    call.attrs.f[0] = f;
    call.out = out;
    call.step = 1;
    call.name = name;
    return ap_backend_run(s->b, &call);
}

/* After micro-batch k: accumulators get (k == 0) or add (k > 0) the carried values. Local. */
static ap_status accumulate(ap_spmd *s, int k) {
    ap_status st = AUTOPAR_OK;
    for (int c = 0; c < s->n_carry && !st; c++) {
        int v = s->carry[c];
        size_t bytes = s->prog.val[v].bytes;
        if (!bytes) continue;
        const char *name = s->g->nodes[s->prog.val[v].node]->name;
        size_t off;
        const ap_buffer *b = val_buf(&s->prog, &s->arena, s->pers, v, &off);
        if (k == 0) {
            st = ap_backend_copy(s->b, &s->acc, s->carry_off[c], b, off, bytes, name);
        } else {
            char *acc = (char *)s->acc.data + s->carry_off[c];
            st = flat_kernel(s, AP_OP_ADD, acc, acc, (char *)b->data + off,
                             (int64_t)(bytes / ap_elem_size(AUTOPAR_F32, s->precision)), 0.0,
                             name);
        }
    }
    return st;
}

/* Before the apply part: every carried value = its accumulator / B. Local. */
static ap_status restore_mean(ap_spmd *s, int n_micro) {
    ap_status st = AUTOPAR_OK;
    for (int c = 0; c < s->n_carry && !st; c++) {
        int v = s->carry[c];
        size_t bytes = s->prog.val[v].bytes;
        if (!bytes) continue;
        size_t off;
        const ap_buffer *b = val_buf(&s->prog, &s->arena, s->pers, v, &off);
        st = flat_kernel(s, AP_OP_SCALE, (char *)b->data + off,
                         (char *)s->acc.data + s->carry_off[c], NULL,
                         (int64_t)(bytes / ap_elem_size(AUTOPAR_F32, s->precision)),
                         1.0 / n_micro, s->g->nodes[s->prog.val[v].node]->name);
    }
    return st;
}

ap_status ap_spmd_step_accum(ap_spmd *s, int n_micro, ap_spmd_feed_fn feed, void *ctx,
                             double *loss) {
    const char *fn = "ap_spmd_step_accum";
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    ap_status st = AUTOPAR_OK;
    if (n_micro < 1 || !feed)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: %s", fn,
                      n_micro < 1 ? "fewer than one micro-batch" : "feed is NULL");
    if (!st) st = check_trainable(s, fn);
    if (!st && s->split < 0) st = setup_accum(s);
    if ((st = ap_comm_all_ok(s->world, st))) return st;
    int64_t step_no = s->steps + 1;
    double t_begin = sp_now();
    for (int k = 0; k < n_micro; k++) {
        if ((st = feed(ctx, k))) return st;   /* collective and agreed by contract */
        st = run_range(s, &s->prog, &s->arena, s->pers, step_no, 0, s->split, s->defer,
                       AUTOPAR_OK);
        if (!st) st = accumulate(s, k);
        if (!st) st = ap_backend_synchronize(s->b);
        if ((st = ap_comm_all_ok(s->world, st))) return st;
    }
    st = restore_mean(s, n_micro);
    if ((st = ap_comm_all_ok(s->world, st))) return st;
    /* The deferred sums (gradient synchronisation), once, on the accumulated values. */
    for (int i = 0; i < s->split && !st; i++)
        if (s->defer[i])
            st = run_range(s, &s->prog, &s->arena, s->pers, step_no, i, i + 1, NULL, AUTOPAR_OK);
    st = run_apply(s, step_no, s->world, st);
    st = finish_step(s, st, loss);
    if (!st) {  /* step timers, as ap_spmd_step (feeding the micro-batches included) */
        s->t_step += sp_now() - t_begin;
        s->timed_steps++;
    }
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Pipeline stages: the step program run in parts (spmd.h, "Pipeline stages")                   */
/* ------------------------------------------------------------------------------------------ */

static bool is_state_kind(const ap_node *n) {
    return n->kind == AUTOPAR_KIND_PARAM || n->kind == AUTOPAR_KIND_OPT_STATE ||
           n->kind == AUTOPAR_KIND_CONSTANT;
}

/* Finds the backward part and the values to stash. Local. */
static ap_status setup_stage(ap_spmd *s, int n_micro, int in_flight) {
    const char *fn = "ap_spmd_stage_begin";
    const sp_prog *p = &s->prog;
    const autopar_graph *g = s->g;
    ap_status st = s->split < 0 ? setup_accum(s) : AUTOPAR_OK;
    if (st) return st;
    int bwd = s->split;
    for (int i = 0; i < s->split; i++)
        if (g->nodes[p->ins[i].node]->phase != AUTOPAR_PHASE_FORWARD) {
            bwd = i;
            break;
        }
    for (int i = bwd; i < s->split; i++)
        if (g->nodes[p->ins[i].node]->phase != AUTOPAR_PHASE_BACKWARD)
            return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: node '%s' (%s phase) runs inside the "
                            "backward part of the stage", fn, g->nodes[p->ins[i].node]->name,
                            ap_phase_name(g->nodes[p->ins[i].node]->phase));
    bool *fwd_written = calloc((size_t)p->n_val + 1, sizeof *fwd_written);
    bool *late_read = calloc((size_t)p->n_val + 1, sizeof *late_read);
    if (!fwd_written || !late_read) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
    for (int i = 0; !st && i < p->n_ins; i++) {
        const sp_ins *in = &p->ins[i];
        if (i < bwd) {
            int w = in->kind == SP_COLL ? in->recv : in->out;
            if (w >= 0) fwd_written[w] = true;
            continue;
        }
        if (in->kind == SP_KERNEL)
            for (int k = 0; k < in->call.n_src; k++) late_read[in->src[k]] = true;
        else if (in->kind == SP_COLL)
            late_read[in->send] = true;
    }
    /* the loss is read at the step's end (maybe by no instruction, when it is replicated) */
    if (!st && s->loss_val >= 0) late_read[s->loss_val] = true;
    int n = 0;
    size_t total = 0;
    for (int v = 0; !st && v < p->n_val; v++) {
        bool need = false;
        if (late_read[v] && !p->val[v].persistent) {
            need = fwd_written[v];
        } else if (late_read[v]) {   /* per micro-batch leaves: inputs and received activations */
            const ap_node *nd = g->nodes[p->val[v].node];
            need = nd->op == AP_OP_INPUT ||
                   (s->role[nd->id] == 2 && nd->phase == AUTOPAR_PHASE_FORWARD &&
                    !is_state_kind(nd));
        }
        late_read[v] = need;   /* reused: the stash set */
        if (need) {
            n++;
            total += (p->val[v].bytes + SP_ALIGN - 1) / SP_ALIGN * SP_ALIGN;
        }
    }
    if (!st) {
        free(s->stash);
        free(s->stash_off);
        s->stash = malloc(sizeof(int) * (size_t)(n ? n : 1));
        s->stash_off = malloc(sizeof(size_t) * (size_t)(n ? n : 1));
        if (!s->stash || !s->stash_off) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
    }
    if (!st) {
        size_t off = 0;
        s->n_stash = 0;
        for (int v = 0; v < p->n_val; v++) {
            if (!late_read[v]) continue;
            s->stash[s->n_stash] = v;
            s->stash_off[s->n_stash++] = off;
            off += (p->val[v].bytes + SP_ALIGN - 1) / SP_ALIGN * SP_ALIGN;
        }
        s->stash_bytes = total;
    }
    if (!st && n_micro > s->cap_mb) {
        int *m = realloc(s->mb_slot, sizeof(int) * (size_t)n_micro);
        if (!m) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
        else {
            s->mb_slot = m;
            s->cap_mb = n_micro;
        }
    }
    if (!st) {
        s->bwd = bwd;
        s->extra_predicted = s->acc.bytes + s->stash_bytes * (size_t)in_flight;
    }
    free(fwd_written);
    free(late_read);
    return st;
}

ap_status ap_spmd_stage_begin(ap_spmd *s, int n_micro, int in_flight) {
    const char *fn = "ap_spmd_stage_begin";
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    if (n_micro < 1 || in_flight < 1 || in_flight > n_micro)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: %d micro-batches, %d in flight", fn,
                        n_micro, in_flight);
    ap_status st = check_trainable(s, fn);
    if (!st && (s->bwd < 0 || n_micro > s->cap_mb)) st = setup_stage(s, n_micro, in_flight);
    for (int k = 0; !st && k < s->cap_mb; k++) s->mb_slot[k] = -1;
    for (int k = 0; !st && k < s->n_slot; k++) s->slot_busy[k] = false;
    return st;
}

/* Copies the stash values of this program between the arena / their buffers and slot `k`
 * (save: into the slot). Local. */
static ap_status stash_copy(ap_spmd *s, int slot, bool save) {
    ap_status st = AUTOPAR_OK;
    for (int c = 0; c < s->n_stash && !st; c++) {
        int v = s->stash[c];
        size_t bytes = s->prog.val[v].bytes, off;
        if (!bytes) continue;
        const ap_buffer *b = val_buf(&s->prog, &s->arena, s->pers, v, &off);
        const char *name = s->g->nodes[s->prog.val[v].node]->name;
        if (save) st = ap_backend_copy(s->b, &s->slot[slot], s->stash_off[c], b, off, bytes, name);
        else st = ap_backend_copy(s->b, b, off, &s->slot[slot], s->stash_off[c], bytes, name);
    }
    return st;
}

static ap_status check_mb(const ap_spmd *s, int k, const char *fn) {
    if (s->bwd < 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: call ap_spmd_stage_begin first", fn);
    if (k < 0 || k >= s->cap_mb)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: micro-batch %d out of range", fn, k);
    return AUTOPAR_OK;
}

ap_status ap_spmd_stage_forward(ap_spmd *s, int k, ap_status prior) {
    const char *fn = "ap_spmd_stage_forward";
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    ap_status st = check_mb(s, k, fn);
    if (st) return st;   /* the same on every rank: nothing collective ran */
    st = run_range(s, &s->prog, &s->arena, s->pers, s->steps + 1, 0, s->bwd, s->defer, prior);
    if (st || s->n_stash == 0) return st;
    int slot = -1;
    for (int i = 0; i < s->n_slot && slot < 0; i++)
        if (!s->slot_busy[i]) slot = i;
    if (slot < 0) {
        if (s->n_slot == s->cap_slot) {
            int cap = s->cap_slot ? 2 * s->cap_slot : 4;
            ap_buffer *nb = realloc(s->slot, sizeof *nb * (size_t)cap);
            if (nb) s->slot = nb;
            bool *nbusy = realloc(s->slot_busy, sizeof *nbusy * (size_t)cap);
            if (nbusy) s->slot_busy = nbusy;
            if (!nb || !nbusy) return ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
            s->cap_slot = cap;
        }
        memset(&s->slot[s->n_slot], 0, sizeof s->slot[0]);
        if ((st = sp_alloc(s, s->stash_bytes, "stashed activations", &s->slot[s->n_slot])))
            return st;
        s->slot_busy[s->n_slot] = false;
        slot = s->n_slot++;
    }
    s->slot_busy[slot] = true;
    s->mb_slot[k] = slot;
    return stash_copy(s, slot, true);
}

ap_status ap_spmd_stage_backward(ap_spmd *s, int k, bool first, ap_status prior) {
    const char *fn = "ap_spmd_stage_backward";
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    ap_status st = check_mb(s, k, fn);
    if (st) return st;
    if (!prior && s->n_stash > 0) {
        int slot = s->mb_slot[k];
        if (slot < 0)
            prior = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: micro-batch %d has no forward", fn, k);
        else {
            prior = stash_copy(s, slot, false);
            s->slot_busy[slot] = false;
            s->mb_slot[k] = -1;
        }
    }
    st = run_range(s, &s->prog, &s->arena, s->pers, s->steps + 1, s->bwd, s->split, s->defer,
                   prior);
    if (!st) st = accumulate(s, first ? 0 : 1);
    return st;
}

ap_status ap_spmd_stage_apply(ap_spmd *s, int n_micro, ap_status prior, ap_comm *agree) {
    const char *fn = "ap_spmd_stage_apply";
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    ap_status st = s->bwd < 0 ? ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: call "
                                         "ap_spmd_stage_begin first", fn) : AUTOPAR_OK;
    if (st) return st;
    if (!prior) prior = restore_mean(s, n_micro);
    int64_t step_no = s->steps + 1;
    for (int i = 0; i < s->split; i++)   /* deferred gradient sums, once */
        if (s->defer[i])
            prior = run_range(s, &s->prog, &s->arena, s->pers, step_no, i, i + 1, NULL, prior);
    return run_apply(s, step_no, agree, prior);
}

ap_status ap_spmd_stage_finish(ap_spmd *s, ap_status st, ap_comm *agree, double *loss) {
    if (!s || !agree)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_spmd_stage_finish: NULL argument");
    return finish_step_on(s, st, agree, loss);
}

int ap_spmd_role(const ap_spmd *s, int node) {
    return s && node >= 0 && node < s->g->n_nodes ? s->role[node] : 0;
}

bool ap_spmd_has_loss(const ap_spmd *s) { return s && s->loss_val >= 0; }

void ap_spmd_add_timers(ap_spmd *s, double step, double comm) {
    if (!s) return;
    s->t_step += step;
    s->t_coll += comm;
    if (step > 0) s->timed_steps++;
}

/* Value of a node this rank can read or write as a shard: computed by the stage (role 1) or
 * persistent (leaves, externals). */
static ap_status shard_val(const ap_spmd *s, int node, size_t bytes, const char *fn, int *v) {
    if (!s || node < 0 || node >= s->g->n_nodes)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: bad session or node", fn);
    *v = s->role[node] ? s->node_val[node] : -1;
    if (*v < 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: tensor '%s' has no value on this stage", fn,
                        s->g->nodes[node]->name);
    if (s->prog.val[*v].bytes != bytes)
        return ap_error(AUTOPAR_ERR_SHAPE, "%s: tensor '%s': shard of %zu bytes, %zu given", fn,
                        s->g->nodes[node]->name, s->prog.val[*v].bytes, bytes);
    return AUTOPAR_OK;
}

size_t ap_spmd_shard_bytes(const ap_spmd *s, int node) {
    if (!s || node < 0 || node >= s->g->n_nodes || !s->role[node] || s->node_val[node] < 0)
        return 0;
    return s->prog.val[s->node_val[node]].bytes;
}

ap_status ap_spmd_shard_download(ap_spmd *s, int node, void *host, size_t bytes) {
    int v = -1;
    ap_status st = shard_val(s, node, bytes, "ap_spmd_shard_download", &v);
    if (st || !bytes) return st;
    size_t off;
    const ap_buffer *b = val_buf(&s->prog, &s->arena, s->pers, v, &off);
    return ap_backend_download(s->b, host, b, off, bytes, s->g->nodes[node]->name);
}

ap_status ap_spmd_shard_upload(ap_spmd *s, int node, const void *host, size_t bytes) {
    int v = -1;
    ap_status st = shard_val(s, node, bytes, "ap_spmd_shard_upload", &v);
    if (!st && !s->prog.val[v].persistent)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_spmd_shard_upload: tensor '%s' is computed "
                      "by the stage", s->g->nodes[node]->name);
    if (st || !bytes) return st;
    return ap_backend_upload(s->b, &s->pbuf[v], 0, host, bytes, s->g->nodes[node]->name);
}

int64_t ap_spmd_steps(const ap_spmd *s) { return s ? s->steps : 0; }

/* Reading through host memory (communicators on host buffers): every rank's shard is gathered
 * over the whole mesh into a host block and placed by its tile. No backend memory is used, so
 * reads never change the session's memory peak. */
static ap_status read_host(ap_spmd *s, const ap_node *node, void *data) {
    int v = s->node_val[node->id];
    size_t bytes = s->prog.val[v].bytes, esz = ap_elem_size(node->dtype, s->precision);
    int nd = s->mesh.n_devices;
    char *mine = malloc(bytes ? bytes : 1), *all = malloc(bytes ? bytes * (size_t)nd : 1);
    ap_status st = AUTOPAR_OK;
    if (!mine || !all)
        st = ap_error(AUTOPAR_ERR_NOMEM, "ap_spmd_read: out of host memory for '%s'", node->name);
    if (!st && bytes) st = ap_backend_download(s->b, mine, &s->pbuf[v], 0, bytes, node->name);
    /* every rank reaches the gather, or every rank returns */
    if (!(st = ap_comm_all_ok(s->world, st)) && bytes) {
        ap_comm_dtype t = (ap_comm_dtype)sp_comm_dtype(node->dtype, s->precision);
        st = ap_comm_all_gather(s->comm[AP_AXIS_FLAT], mine, all, bytes / esz, t);
        for (int r = 0; !st && r < nd; r++) {
            place_ctx pc = {all + (size_t)r * bytes, data, esz == 8};
            st = for_each_run_at(s, r / s->mesh.shape[1], r % s->mesh.shape[1],
                                 &s->spec[node->id], &node->shape, place_run, &pc);
        }
        st = ap_comm_all_ok(s->world, st);
    }
    free(mine);
    free(all);
    return st;
}

ap_status ap_spmd_read(ap_spmd *s, const autopar_tensor *t, void *data, int64_t n) {
    const char *fn = "ap_spmd_read";
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    const ap_node *node = NULL;
    ap_status st = check_tensor(s, t, n, fn, &node);
    if (!st && s->role[node->id] != 1)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: tensor '%s' is not in the session's stage", fn,
                      node->name);
    else if (!st && !is_leaf(node->op))
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: tensor '%s' (%s) is not kept between steps; "
                      "parameters, optimizer states and inputs can be read", fn, node->name,
                      ap_op_name(node->op));
    if (!st && !data && n > 0)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: data for '%s' is NULL", fn, node->name);
    if ((st = ap_comm_all_ok(s->world, st))) return st;

    if (!s->device_reads && !ap_comm_device_buffers(s->world) &&
        (s->spec[node->id].partial & 3u) == 0)
        return read_host(s, node, data);
    /* A small program: the shard gathered into a replicated value, in the idle step arena when
     * it fits (nothing of the step is live between steps), else in a temporary arena. */
    sp_prog rp;
    memset(&rp, 0, sizeof rp);
    ap_buffer tmp_arena = {NULL, 0};
    ap_buffer **pers = NULL;
    int res = -1;
    int src = sp_value_new(&rp, s->prog.val[s->node_val[node->id]].bytes, node->id, true);
    if (src < 0) st = AUTOPAR_ERR_NOMEM;
    if (!st) {
        sp_lower_ctx c = {s->g, NULL, &s->mesh, s->precision, {s->coord[0], s->coord[1]}, &rp,
                          s->node_val, s->spec};
        ap_spec rep = ap_spec_replicated(node->shape.ndim);
        st = sp_emit_reshard(&c, src, false, &s->spec[node->id], &rep, &node->shape, node->dtype,
                             NULL, 0, node->id, -3, &res);
    }
    if (!st && res >= 0 && !rp.val[res].persistent) rp.val[res].to_end = true;
    if (!st) st = sp_plan_memory(&rp);
    const ap_buffer *arena = &s->arena;
    if (!st && rp.arena_bytes > s->arena.bytes) {
        st = sp_alloc(s, rp.arena_bytes, "spmd read arena", &tmp_arena);
        arena = &tmp_arena;
    }
    if (!st) {
        pers = calloc((size_t)rp.n_val + 1, sizeof *pers);
        if (!pers) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
        else pers[src] = &s->pbuf[s->node_val[node->id]];
    }
    /* Every rank reaches the program with the same instructions (or the same error). */
    if (!(st = ap_comm_all_ok(s->world, st))) {
        st = run_prog(s, &rp, arena, pers, s->steps);
        if (!st && n > 0) {
            size_t off;
            const ap_buffer *b = val_buf(&rp, arena, pers, res, &off);
            if (node->dtype == AUTOPAR_I32 || s->precision == AUTOPAR_PRECISION_F32) {
                st = ap_backend_download(s->b, data, b, off, (size_t)n * 4, node->name);
            } else {
                double *tmp = malloc((size_t)n * sizeof *tmp);
                if (!tmp) {
                    st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of host memory", fn);
                } else {
                    st = ap_backend_download(s->b, tmp, b, off, (size_t)n * sizeof *tmp,
                                             node->name);
                    if (!st)
                        for (int64_t i = 0; i < n; i++) ((float *)data)[i] = (float)tmp[i];
                    free(tmp);
                }
            }
        }
        st = ap_comm_all_ok(s->world, st);
    }
    sp_release(s, &tmp_arena);
    free(pers);
    sp_prog_free(&rp);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Statistics and printing                                                                     */
/* ------------------------------------------------------------------------------------------ */

void ap_spmd_get_stats(const ap_spmd *s, ap_spmd_stats *st) {
    if (!st) return;
    memset(st, 0, sizeof *st);
    if (!s) return;
    size_t pers = 0;
    for (int v = 0; v < s->prog.n_val; v++)
        if (s->prog.val[v].persistent) pers += s->pbuf[v].bytes;
    st->persistent_bytes = pers;
    st->transient_peak = s->prog.transient_peak;
    st->predicted_peak = pers + s->prog.transient_peak + s->extra_predicted;
    st->arena_bytes = s->prog.arena_bytes;
    st->measured_peak = s->peak_bytes;
    st->plan_peak = s->plan_peak;
    st->n_instructions = s->prog.n_ins;
    st->n_deviations = s->prog.n_note;
    st->n_route_plan = s->prog.n_route_plan;
    st->n_route_fresh = s->prog.n_route_fresh;
    st->timed_steps = s->timed_steps;
    st->step_seconds = s->t_step;
    st->kernel_seconds = s->t_kernel;
    st->comm_seconds = s->t_coll;
    for (int i = 0; i < s->prog.n_ins; i++) {
        const sp_ins *in = &s->prog.ins[i];
        if (in->kind == SP_KERNEL) st->n_kernels++;
        if (in->kind != SP_COLL) continue;
        st->n_collectives++;
        st->n_coll_kind[in->coll]++;
        double bytes = (double)in->count * (in->comm_dtype == AP_COMM_F64 ? 8.0 : 4.0);
        int n = ap_comm_size(s->comm[in->axis]);
        switch (in->coll) {
        case AP_COLL_ALL_REDUCE: st->coll_bytes += 2.0 * bytes; break;
        case AP_COLL_ALL_GATHER: st->coll_bytes += bytes * (double)n; break;
        case AP_COLL_REDUCE_SCATTER: st->coll_bytes += bytes * (double)n; break;
        case AP_COLL_ALL_TO_ALL: st->coll_bytes += 2.0 * bytes * (double)n; break;
        default: break;
        }
    }
}

void ap_spmd_print(const ap_spmd *s, FILE *f) {
    if (!s || !f) return;
    ap_spmd_stats st;
    ap_spmd_get_stats(s, &st);
    fprintf(f, "spmd rank %d at (%d, %d) of mesh %d x %d: %d instructions (%d kernels, %d "
            "collectives: %d all-reduce, %d all-gather, %d reduce-scatter, %d all-to-all)\n",
            ap_comm_rank(s->world), s->coord[0], s->coord[1], s->mesh.shape[0], s->mesh.shape[1],
            st.n_instructions, st.n_kernels, st.n_collectives,
            st.n_coll_kind[AP_COLL_ALL_REDUCE], st.n_coll_kind[AP_COLL_ALL_GATHER],
            st.n_coll_kind[AP_COLL_REDUCE_SCATTER], st.n_coll_kind[AP_COLL_ALL_TO_ALL]);
    fprintf(f, "  memory: predicted peak %zu bytes (persistent %zu + transient %zu), measured "
            "%zu (arena %zu), plan estimate %.0f\n", st.predicted_peak, st.persistent_bytes,
            st.transient_peak, st.measured_peak, st.arena_bytes, st.plan_peak);
    fprintf(f, "  updates: %d in place, %d copied over their leaf at the step's end\n",
            s->n_in_place, s->n_commit);
    fprintf(f, "  reshardings: %d along the plan's collectives, %d routed here; deviations from "
            "the plan: %d\n", st.n_route_plan, st.n_route_fresh, st.n_deviations);
    for (int i = 0; i < s->prog.n_note; i++) fprintf(f, "    %s\n", s->prog.note[i].text);
}

void ap_spmd_dump(const ap_spmd *s, FILE *f) {
    if (!s || !f) return;
    static const char *axis_name[AP_AXIS_COUNT] = {"axis 0", "axis 1", "flat"};
    for (int i = 0; i < s->prog.n_ins; i++) {
        const sp_ins *in = &s->prog.ins[i];
        char w[256];
        what_of(s, in, w, sizeof w);
        switch (in->kind) {
        case SP_KERNEL: {
            char ob[96];
            fprintf(f, "%5d kernel %-14s out v%d %s <-", i, ap_op_name(in->call.op), in->out,
                    ap_shape_str(&in->call.out_shape, ob, sizeof ob));
            for (int k = 0; k < in->call.n_src; k++)
                fprintf(f, " v%d %s", in->src[k],
                        ap_shape_str(&in->call.src_shape[k], ob, sizeof ob));
            fprintf(f, "   [%s]\n", w);
            break;
        }
        case SP_ZERO:
            fprintf(f, "%5d zero v%d   [%s]\n", i, in->out, w);
            break;
        case SP_COLL:
            fprintf(f, "%5d %s on %s: v%d -> v%d, %zu elements   [%s]\n", i,
                    ap_coll_kind_name(in->coll), axis_name[in->axis], in->send, in->recv,
                    in->count, w);
            break;
        }
    }
}
