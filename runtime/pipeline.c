/*
 * Pipeline execution of a plan (pipeline.h): stage programs, cross-mesh transfer routes by tile
 * intersection, and the per-rank interpreter of the schedule's instruction lists.
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime */
#include "pipeline.h"

#include "schedule.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Every message starts with its sender's status so far, so that a failure travels with the
 * data instead of leaving a receiver computing on garbage. */
#define PX_HEADER 256
typedef struct px_header {
    int32_t status;
    char    msg[PX_HEADER - sizeof(int32_t)];
} px_header;

typedef enum px_kind {
    PX_LEAF = 0,     /* once per step, before the micro-batches                              */
    PX_ACT,          /* per micro-batch, forward, to a later stage                           */
    PX_GRAD,         /* per micro-batch, backward, to an earlier stage                       */
} px_kind;

/* One box of a tensor between two devices: offsets in THIS rank's local shard. */
typedef struct px_msg {
    int     peer;                  /* world rank                                             */
    int64_t off[AP_MAX_DIMS];
    int64_t ext[AP_MAX_DIMS];
    size_t  count;                 /* elements                                               */
} px_msg;

typedef struct px_xfer {
    int     node;
    px_kind kind;
    int     from, to;              /* stages                                                 */
    ap_shape local;                /* this rank's shard shape (when it sends or receives)   */
    size_t  esz;
    int     n_send, n_recv;
    px_msg *send, *recv;           /* this rank's messages between the meshes                */
    int     n_gather_send, n_gather_recv;
    px_msg *gather_send, *gather_recv;   /* inside the receiving mesh, among replicas        */
} px_xfer;

struct ap_pipeline {
    const autopar_plan *plan;
    ap_comm     *world;            /* host messages and agreements                           */
    ap_comm     *stage_comm;       /* owned (NULL for one stage: dev_world is used)          */
    int          stage;
    ap_mesh     *mesh;             /* owned, devices renumbered to stage ranks                */
    ap_spmd     *spmd;             /* owned                                                  */
    ap_schedule *sched;            /* owned (multi-stage plans only)                         */
    int          n_x;
    px_xfer     *x;
    int         *root;             /* per stage: world rank of its mesh device 0             */
    int          loss_stage;
    ap_pipeline_traffic traffic;   /* this rank's sends per step                             */
};

static double px_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------------------------------ */
/* Routes                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static bool holds_zeros(const ap_mesh *m, const ap_spec *s, int c0, int c1) {
    return ((s->partial & AP_PARTIAL_0) && m->shape[0] > 1 && c0 != 0) ||
           ((s->partial & AP_PARTIAL_1) && m->shape[1] > 1 && c1 != 0);
}

static ap_status push_msg(px_msg **arr, int *n, const px_msg *m) {
    px_msg *a = realloc(*arr, sizeof *a * (size_t)(*n + 1));
    if (!a) return ap_error(AUTOPAR_ERR_NOMEM, "pipeline: out of memory");
    a[(*n)++] = *m;
    *arr = a;
    return AUTOPAR_OK;
}

/* Tiles of every device of mesh m under spec s (n_devices x ndim offsets and extents). */
static ap_status all_tiles(const ap_mesh *m, const ap_spec *s, const ap_shape *full,
                           int64_t **off, int64_t **ext) {
    int nd = full->ndim > 0 ? full->ndim : 1;
    *off = calloc((size_t)m->n_devices * (size_t)nd, sizeof **off);
    *ext = calloc((size_t)m->n_devices * (size_t)nd, sizeof **ext);
    if (!*off || !*ext) return ap_error(AUTOPAR_ERR_NOMEM, "pipeline: out of memory");
    for (int k = 0; k < m->n_devices; k++) {
        if (full->ndim == 0) {
            (*ext)[k] = 1;
            continue;
        }
        ap_status st = ap_spec_tile(m, s, full, k / m->shape[1], k % m->shape[1],
                                    *off + (size_t)k * (size_t)nd, *ext + (size_t)k * (size_t)nd);
        if (st) return st;
    }
    return AUTOPAR_OK;
}

static bool same_box(const int64_t *o, const int64_t *e, int a, int b, int w) {
    size_t ia = (size_t)a * (size_t)w, ib = (size_t)b * (size_t)w, len = sizeof *o * (size_t)w;
    return memcmp(o + ia, o + ib, len) == 0 && memcmp(e + ia, e + ib, len) == 0;
}

/* Devices of mesh m that hold device j's tile (not zeros of a pending sum), in device order,
 * into members[]; returns how many, and j's place among them in *place (may be NULL). */
static int replicas(const ap_mesh *m, const ap_spec *s, const int64_t *o, const int64_t *e,
                    int w, int j, int *members, int *place) {
    int h = 0;
    for (int r = 0; r < m->n_devices; r++) {
        if (!same_box(o, e, r, j, w) || holds_zeros(m, s, r / m->shape[1], r % m->shape[1]))
            continue;
        if (r == j && place) *place = h;
        members[h++] = r;
    }
    return h;
}

/* Part `place` of `h` of a tile (off, ext): the tile cut along its longest dimension into h
 * near-equal slabs (some empty when that dimension is shorter than h). Returns its elements. */
static size_t tile_part(int nd, const int64_t *off, const int64_t *ext, int place, int h,
                        int64_t *poff, int64_t *pext) {
    if (nd == 0) return place == 0;
    int cut = 0;
    for (int d = 1; d < nd; d++)
        if (ext[d] > ext[cut]) cut = d;
    size_t count = 1;
    for (int d = 0; d < nd; d++) {
        poff[d] = off[d];
        pext[d] = ext[d];
        if (d == cut) {
            int64_t lo = ext[d] * place / h, hi = ext[d] * (place + 1) / h;
            poff[d] = off[d] + lo;
            pext[d] = hi - lo;
        }
        count *= (size_t)pext[d];
    }
    return count;
}

/* This rank's messages of transfer x. Every receiving tile crosses between the meshes once:
 * its h replicas in the receiving mesh each fetch one part of it (tile_part), and then
 * exchange their parts among themselves (a direct all-gather inside the receiving mesh, the
 * x->gather messages). A part is fetched by tile intersection: for every distinct sending tile
 * meeting it, one holder of that tile (replica j mod holders, to spread the sending) sends the
 * intersection box. */
static ap_status route(ap_pipeline *pp, px_xfer *x, int my_rank) {
    const autopar_plan *p = pp->plan;
    const ap_node *n = p->graph->nodes[x->node];
    const ap_spec *sa = &p->stages[x->from].shard->node[x->node].spec;
    const ap_spec *sb = &p->stages[x->to].shard->node[x->node].spec;
    ap_mesh *ma = NULL, *mb = NULL;
    int64_t *oa = NULL, *ea = NULL, *ob = NULL, *eb = NULL;
    int *members = NULL;
    ap_status st = ap_plan_stage_mesh(p, x->from, &ma);
    if (!st) st = ap_plan_stage_mesh(p, x->to, &mb);
    if (!st) st = all_tiles(ma, sa, &n->shape, &oa, &ea);
    if (!st) st = all_tiles(mb, sb, &n->shape, &ob, &eb);
    if (!st && !(members = malloc(sizeof *members * (size_t)(ma->n_devices + mb->n_devices))))
        st = ap_error(AUTOPAR_ERR_NOMEM, "pipeline: out of memory");
    int nd = n->shape.ndim, w = nd > 0 ? nd : 1;
    for (int j = 0; !st && j < mb->n_devices; j++) {
        if (holds_zeros(mb, sb, j / mb->shape[1], j % mb->shape[1])) continue;
        const int64_t *rj = ob + (size_t)j * (size_t)w;
        int place = 0, h = replicas(mb, sb, ob, eb, w, j, members, &place);
        int64_t pj[AP_MAX_DIMS] = {0}, pje[AP_MAX_DIMS] = {0};
        size_t part = tile_part(nd, rj, eb + (size_t)j * (size_t)w, place, h, pj, pje);
        int dst_rank = p->stages[x->to].devices[j];
        /* the all-gather among the replicas: j's part to each other replica */
        for (int q = 0; !st && part > 0 && q < h; q++) {
            int peer = p->stages[x->to].devices[members[q]];
            if (members[q] == j || (peer != my_rank && dst_rank != my_rank)) continue;
            px_msg m;
            memset(&m, 0, sizeof m);
            m.count = part;
            for (int d = 0; d < nd; d++) {
                m.off[d] = pj[d] - rj[d];
                m.ext[d] = pje[d];
            }
            m.peer = dst_rank == my_rank ? peer : dst_rank;
            st = dst_rank == my_rank ? push_msg(&x->gather_send, &x->n_gather_send, &m)
                                     : push_msg(&x->gather_recv, &x->n_gather_recv, &m);
        }
        for (int i = 0; !st && part > 0 && i < ma->n_devices; i++) {
            const int64_t *si = oa + (size_t)i * (size_t)w, *sie = ea + (size_t)i * (size_t)w;
            px_msg m;
            memset(&m, 0, sizeof m);
            m.count = 1;
            for (int d = 0; d < nd; d++) {
                int64_t lo = si[d] > pj[d] ? si[d] : pj[d];
                int64_t hi = si[d] + sie[d] < pj[d] + pje[d] ? si[d] + sie[d] : pj[d] + pje[d];
                m.ext[d] = hi > lo ? hi - lo : 0;
                m.off[d] = lo;
                m.count *= (size_t)m.ext[d];
            }
            if (m.count == 0) continue;
            int holders = replicas(ma, sa, oa, ea, w, i, members + mb->n_devices, NULL);
            if (members[mb->n_devices + j % holders] != i) continue;
            int src_rank = p->stages[x->from].devices[i];
            if (src_rank == my_rank) {
                px_msg s = m;
                s.peer = dst_rank;
                for (int d = 0; d < nd; d++) s.off[d] = m.off[d] - si[d];
                st = push_msg(&x->send, &x->n_send, &s);
            }
            if (!st && dst_rank == my_rank) {
                px_msg r = m;
                r.peer = src_rank;
                for (int d = 0; d < nd; d++) r.off[d] = m.off[d] - rj[d];
                st = push_msg(&x->recv, &x->n_recv, &r);
            }
        }
    }
    free(members);
    free(oa);
    free(ea);
    free(ob);
    free(eb);
    ap_mesh_free(ma);
    ap_mesh_free(mb);
    return st;
}

/* The transfers of the plan, classified, with this rank's routes. Local (same on every rank). */
static ap_status make_transfers(ap_pipeline *pp, int my_rank, const ap_spmd_options *o) {
    const autopar_plan *p = pp->plan;
    const autopar_graph *g = p->graph;
    pp->x = calloc((size_t)p->n_transfers + 1, sizeof *pp->x);
    if (!pp->x) return ap_error(AUTOPAR_ERR_NOMEM, "pipeline: out of memory");
    ap_status st = AUTOPAR_OK;
    for (int t = 0; t < p->n_transfers && !st; t++) {
        const ap_plan_transfer *tr = &p->transfers[t];
        const ap_node *n = g->nodes[tr->tensor];
        px_xfer *x = &pp->x[pp->n_x++];
        x->node = tr->tensor;
        x->from = tr->from_stage;
        x->to = tr->to_stage;
        x->esz = ap_elem_size(n->dtype, o->precision);
        char sp[AP_SPEC_STR_MAX];
        const ap_spec *sa = &p->stages[x->from].shard->node[x->node].spec;
        if (n->kind == AUTOPAR_KIND_PARAM || n->kind == AUTOPAR_KIND_OPT_STATE ||
            n->kind == AUTOPAR_KIND_CONSTANT)
            x->kind = PX_LEAF;
        else if (n->phase == AUTOPAR_PHASE_FORWARD && x->from < x->to)
            x->kind = PX_ACT;
        else if (n->phase == AUTOPAR_PHASE_BACKWARD && x->from > x->to)
            x->kind = PX_GRAD;
        else
            st = ap_error(AUTOPAR_ERR_UNSUPPORTED, "pipeline: tensor '%s' (%s phase) goes from "
                          "stage %d to stage %d; the pipeline schedule carries forward values to "
                          "later stages and backward values to earlier ones only", n->name,
                          ap_phase_name(n->phase), x->from, x->to);
        if (!st && (sa->partial & 3u))
            st = ap_error(AUTOPAR_ERR_UNSUPPORTED, "pipeline: tensor '%s' leaves stage %d with "
                          "a pending sum (spec %s); transfers need finished values", n->name,
                          x->from, ap_spec_str(sa, sp, sizeof sp));
        if (!st) st = route(pp, x, my_rank);
        if (!st && (x->from == pp->stage || x->to == pp->stage))
            st = ap_spec_local_shape(pp->mesh, &p->stages[pp->stage].shard->node[x->node].spec,
                                     &n->shape, &x->local);
        int times = x->kind == PX_LEAF ? 1 : p->n_micro_batches;
        ap_pipeline_traffic *tf = &pp->traffic;
        for (int k = 0; k < x->n_send; k++) {
            tf->cross_messages += times;
            tf->cross_bytes += (double)(x->send[k].count * x->esz) * times;
        }
        for (int k = 0; k < x->n_gather_send; k++) {
            tf->gather_messages += times;
            tf->gather_bytes += (double)(x->gather_send[k].count * x->esz) * times;
        }
    }
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Creation                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static bool computes_loss(const autopar_plan *p, int s) {
    int loss = p->graph->loss;
    return loss >= 0 && p->stages[s].shard && p->stages[s].shard->node[loss].in_stage;
}

ap_status ap_pipeline_new(const autopar_plan *p, ap_backend *b, ap_comm *world,
                          ap_comm *dev_world, const ap_spmd_options *o, ap_pipeline **out) {
    const char *fn = "ap_pipeline_new";
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!p || !b || !world || !dev_world || !o)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: NULL argument", fn);
    /* stage messages, statuses and the loss travel in host buffers over world */
    if (ap_comm_device_buffers(world))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: world must be a host-memory (MPI) "
                        "communicator; the device one is dev_world", fn);
    int rank = ap_comm_rank(world), size = ap_comm_size(world);
    ap_status st = AUTOPAR_OK;
    ap_pipeline *pp = calloc(1, sizeof *pp);
    int *keep = NULL, n_keep = 0;
    if (!pp) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
    if (!st) {
        pp->plan = p;
        pp->world = world;
        pp->stage = -1;
        pp->loss_stage = -1;
        pp->root = calloc((size_t)p->n_stages + 1, sizeof *pp->root);
        if (!pp->root) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
    }
    /* this rank's stage and mesh index; every device in exactly one stage */
    int index = -1, total = 0;
    for (int s = 0; !st && s < p->n_stages; s++) {
        const ap_plan_stage *ps = &p->stages[s];
        total += ps->n_devices;
        pp->root[s] = ps->n_devices > 0 ? ps->devices[0] : -1;
        if (!ps->shard)
            st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: stage %d has no sharding", fn, s);
        for (int k = 0; !st && k < ps->n_devices; k++)
            if (ps->devices[k] == rank) {
                pp->stage = s;
                index = k;
            }
        if (!st && computes_loss(p, s)) pp->loss_stage = s;
    }
    if (!st && (total != size || pp->stage < 0))
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: the plan's stages use %d devices, the world "
                      "has %d ranks%s", fn, total, size,
                      pp->stage < 0 ? " (this rank runs no stage)" : "");
    if ((st = ap_comm_all_ok(world, st))) {
        ap_pipeline_free(pp);
        return st;
    }
    const ap_plan_stage *mine = &p->stages[pp->stage];
    st = ap_plan_stage_mesh(p, pp->stage, &pp->mesh);
    if (!st && p->n_stages > 1)
        for (int k = 0; k < pp->mesh->n_devices; k++) pp->mesh->devices[k] = k;
    if (!st && p->n_stages > 1) {
        st = make_transfers(pp, rank, o);
        keep = malloc(sizeof(int) * (size_t)(pp->n_x + 1));
        if (!st && !keep) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
        for (int t = 0; !st && t < pp->n_x; t++)
            if (pp->x[t].from == pp->stage && pp->x[t].kind != PX_LEAF)
                keep[n_keep++] = pp->x[t].node;
        if (!st) st = ap_schedule_build(p->schedule == AUTOPAR_SCHEDULE_GPIPE ? AP_SCHEDULE_GPIPE
                                                                              : AP_SCHEDULE_1F1B,
                                        p->n_stages, p->n_micro_batches, &pp->sched);
    }
    if ((st = ap_comm_all_ok(world, st))) {
        free(keep);
        ap_pipeline_free(pp);
        return st;
    }
    ap_comm *stage_world = dev_world;
    if (p->n_stages > 1) {
        st = ap_comm_split(dev_world, pp->stage, index, &pp->stage_comm);
        if ((st = ap_comm_all_ok(world, st))) {
            free(keep);
            ap_pipeline_free(pp);
            return st;
        }
        stage_world = pp->stage_comm;
    }
    ap_spmd_options so = *o;
    so.keep_nodes = keep;
    so.n_keep = n_keep;
    st = ap_spmd_new(p->graph, mine->shard, pp->mesh, b, stage_world, &so, &pp->spmd);
    free(keep);
    if ((st = ap_comm_all_ok(world, st))) {
        ap_pipeline_free(pp);
        return st;
    }
    *out = pp;
    return AUTOPAR_OK;
}

void ap_pipeline_free(ap_pipeline *pp) {
    if (!pp) return;
    ap_spmd_free(pp->spmd);
    ap_comm_free(pp->stage_comm);
    ap_mesh_free(pp->mesh);
    ap_schedule_free(pp->sched);
    for (int t = 0; t < pp->n_x; t++) {
        free(pp->x[t].send);
        free(pp->x[t].recv);
        free(pp->x[t].gather_send);
        free(pp->x[t].gather_recv);
    }
    free(pp->x);
    free(pp->root);
    free(pp);
}

int ap_pipeline_stage(const ap_pipeline *pp) { return pp ? pp->stage : -1; }
ap_spmd *ap_pipeline_spmd(const ap_pipeline *pp) { return pp ? pp->spmd : NULL; }

void ap_pipeline_get_traffic(const ap_pipeline *pp, ap_pipeline_traffic *out) {
    memset(out, 0, sizeof *out);
    if (pp) *out = pp->traffic;
}

/* ------------------------------------------------------------------------------------------ */
/* Messages                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Copies box m between a local shard (shape `local`) and a packed message body. */
static void box_copy(const ap_shape *local, const px_msg *m, size_t esz, char *shard, char *body,
                     bool pack) {
    int nd = local->ndim;
    if (nd == 0) {
        if (pack) memcpy(body, shard, esz);
        else memcpy(shard, body, esz);
        return;
    }
    int64_t stride[AP_MAX_DIMS], idx[AP_MAX_DIMS] = {0}, acc = 1;
    for (int d = nd - 1; d >= 0; d--) {
        stride[d] = acc;
        acc *= local->dim[d];
    }
    size_t run = (size_t)m->ext[nd - 1] * esz, pos = 0;
    for (;;) {
        int64_t first = m->off[nd - 1];
        for (int d = 0; d < nd - 1; d++) first += (m->off[d] + idx[d]) * stride[d];
        char *sp = shard + (size_t)first * esz;
        if (pack) memcpy(body + pos, sp, run);
        else memcpy(sp, body + pos, run);
        pos += run;
        int d = nd - 2;
        for (; d >= 0; d--) {
            if (++idx[d] < m->ext[d]) break;
            idx[d] = 0;
        }
        if (d < 0) break;
    }
}

/* One group of point-to-point messages being assembled. */
typedef struct px_group {
    ap_comm_p2p *ops;
    char       **bufs;      /* per op: header + body                                          */
    int          n, cap;
    /* receives: per op, the transfer and message it fills */
    px_xfer    **x;
    int         *msg;
} px_group;

static void group_clear(px_group *gr) {
    for (int k = 0; k < gr->n; k++) free(gr->bufs[k]);
    free(gr->ops);
    free(gr->bufs);
    free(gr->x);
    free(gr->msg);
    memset(gr, 0, sizeof *gr);
}

static ap_status group_add(px_group *gr, ap_comm_p2p_kind kind, int peer, size_t body,
                           px_xfer *x, int msg, char **buf) {
    if (gr->n == gr->cap) {
        int cap = gr->cap ? 2 * gr->cap : 16;
        ap_comm_p2p *o = realloc(gr->ops, sizeof *o * (size_t)cap);
        if (o) gr->ops = o;
        char **b = realloc(gr->bufs, sizeof *b * (size_t)cap);
        if (b) gr->bufs = b;
        px_xfer **xx = realloc(gr->x, sizeof *xx * (size_t)cap);
        if (xx) gr->x = xx;
        int *mm = realloc(gr->msg, sizeof *mm * (size_t)cap);
        if (mm) gr->msg = mm;
        if (!o || !b || !xx || !mm) return ap_error(AUTOPAR_ERR_NOMEM, "pipeline: out of memory");
        gr->cap = cap;
    }
    char *bf = calloc(1, PX_HEADER + body);
    if (!bf) return ap_error(AUTOPAR_ERR_NOMEM, "pipeline: no memory for a %zu-byte message",
                             body);
    int k = gr->n++;
    gr->ops[k] = (ap_comm_p2p){kind, peer, bf, PX_HEADER + body, AP_COMM_U8};
    gr->bufs[k] = bf;
    gr->x[k] = x;
    gr->msg[k] = msg;
    *buf = bf;
    return AUTOPAR_OK;
}

/* Fills message buffer buf: the header with this rank's status st (and message), then, when
 * st is OK, box m of x packed from the local shard. */
static void pack_message(char *buf, ap_status st, const px_xfer *x, const px_msg *m,
                         char *shard) {
    px_header h;
    memset(&h, 0, sizeof h);
    h.status = (int32_t)st;
    if (st) snprintf(h.msg, sizeof h.msg, "%s", autopar_last_error());
    else box_copy(&x->local, m, x->esz, shard, buf + PX_HEADER, true);
    memcpy(buf, &h, sizeof h);
}

static bool takes(const px_xfer *x, px_kind kind, int stage, bool send) {
    return x->kind == kind && (send ? x->from : x->to) == stage;
}

/* Adds the sends of every transfer of `kind` leaving this stage: this rank's shard downloaded
 * once per transfer, each box packed behind the header carrying *st. */
static ap_status add_sends(ap_pipeline *pp, px_group *gr, px_kind kind, ap_status *st) {
    for (int t = 0; t < pp->n_x; t++) {
        px_xfer *x = &pp->x[t];
        if (!takes(x, kind, pp->stage, true) || x->n_send == 0) continue;
        size_t bytes = ap_spmd_shard_bytes(pp->spmd, x->node);
        char *shard = NULL;
        if (!*st) {
            shard = malloc(bytes ? bytes : 1);
            if (!shard) *st = ap_error(AUTOPAR_ERR_NOMEM, "pipeline: out of host memory");
            else *st = ap_spmd_shard_download(pp->spmd, x->node, shard, bytes);
        }
        for (int k = 0; k < x->n_send; k++) {
            char *buf = NULL;
            ap_status a = group_add(gr, AP_COMM_P2P_SEND, x->send[k].peer,
                                    x->send[k].count * x->esz, x, k, &buf);
            if (a) {   /* cannot even send: fatal for the step, peers would wait */
                free(shard);
                return a;
            }
            pack_message(buf, *st, x, &x->send[k], shard);
        }
        free(shard);
    }
    return AUTOPAR_OK;
}

static ap_status add_recvs(ap_pipeline *pp, px_group *gr, px_kind kind) {
    for (int t = 0; t < pp->n_x; t++) {
        px_xfer *x = &pp->x[t];
        if (!takes(x, kind, pp->stage, false)) continue;
        for (int k = 0; k < x->n_recv; k++) {
            char *buf = NULL;
            ap_status a = group_add(gr, AP_COMM_P2P_RECV, x->recv[k].peer,
                                    x->recv[k].count * x->esz, x, k, &buf);
            if (a) return a;
        }
    }
    return AUTOPAR_OK;
}

/* The status carried by received message k of group gr, folded into *st (first failure wins;
 * a message that does not name its rank gets its sender's). */
static void take_header(const px_group *gr, int k, ap_status *st) {
    px_header h;
    memcpy(&h, gr->bufs[k], sizeof h);
    h.msg[sizeof h.msg - 1] = '\0';
    if (*st || !h.status) return;
    if (!strncmp(h.msg, "rank ", 5)) *st = ap_error((ap_status)h.status, "%s", h.msg);
    else *st = ap_error((ap_status)h.status, "rank %d: %s", gr->ops[k].peer, h.msg);
}

/* Second round of a group that received tiles with replicas: each replica sends the part it
 * fetched (in shards[t], host copies of the received tiles) to the others, and fills theirs
 * in. Only ranks of this stage take part, all with the same transfers (same instructions). */
static ap_status gather_parts(ap_pipeline *pp, const bool kinds[3], char **shards,
                              ap_status *st, double *t_p2p) {
    px_group gr;
    memset(&gr, 0, sizeof gr);
    ap_status a = AUTOPAR_OK;
    for (int t = 0; t < pp->n_x && !a; t++) {
        px_xfer *x = &pp->x[t];
        if (!kinds[x->kind] || x->to != pp->stage) continue;
        for (int k = 0; k < x->n_gather_send && !a; k++) {
            char *buf = NULL;
            a = group_add(&gr, AP_COMM_P2P_SEND, x->gather_send[k].peer,
                          x->gather_send[k].count * x->esz, x, k, &buf);
            if (a) break;
            pack_message(buf, *st, x, &x->gather_send[k], shards[t]);
        }
        for (int k = 0; k < x->n_gather_recv && !a; k++) {
            char *buf = NULL;
            a = group_add(&gr, AP_COMM_P2P_RECV, x->gather_recv[k].peer,
                          x->gather_recv[k].count * x->esz, x, k, &buf);
        }
    }
    if (!a && gr.n > 0) {
        double t0 = px_now();
        a = ap_comm_exchange(pp->world, gr.ops, gr.n);
        *t_p2p += px_now() - t0;
    }
    for (int k = 0; k < gr.n && !a; k++) {
        if (gr.ops[k].kind != AP_COMM_P2P_RECV) continue;
        take_header(&gr, k, st);
        px_xfer *x = gr.x[k];
        if (!*st) box_copy(&x->local, &x->gather_recv[gr.msg[k]], x->esz, shards[x - pp->x],
                           gr.bufs[k] + PX_HEADER, false);
    }
    group_clear(&gr);
    return a;
}

/* After the exchange: every received transfer's shard assembled (also those whose boxes are
 * all empty here: zeros), completed by the replicas' all-gather, and uploaded. Returns non-OK
 * only when the all-gather could not be posted; *st takes failures and received statuses. */
static ap_status finish_recvs(ap_pipeline *pp, px_group *gr, const bool kinds[3], ap_status *st,
                              double *t_p2p) {
    char **shards = calloc((size_t)pp->n_x + 1, sizeof *shards);
    if (!shards) return ap_error(AUTOPAR_ERR_NOMEM, "pipeline: out of host memory");
    bool gathers = false;
    for (int t = 0; t < pp->n_x; t++) {
        px_xfer *x = &pp->x[t];
        if (!kinds[x->kind] || x->to != pp->stage) continue;
        gathers = gathers || x->n_gather_send > 0 || x->n_gather_recv > 0;
        size_t bytes = ap_spmd_shard_bytes(pp->spmd, x->node);
        if (!*st && !(shards[t] = calloc(1, bytes ? bytes : 1)))
            *st = ap_error(AUTOPAR_ERR_NOMEM, "pipeline: out of host memory");
        for (int k = 0; k < gr->n; k++) {
            if (gr->x[k] != x || gr->ops[k].kind != AP_COMM_P2P_RECV) continue;
            take_header(gr, k, st);
            if (!*st) box_copy(&x->local, &x->recv[gr->msg[k]], x->esz, shards[t],
                               gr->bufs[k] + PX_HEADER, false);
        }
    }
    ap_status a = gathers ? gather_parts(pp, kinds, shards, st, t_p2p) : AUTOPAR_OK;
    for (int t = 0; t < pp->n_x; t++) {
        if (!a && !*st && shards[t])
            *st = ap_spmd_shard_upload(pp->spmd, pp->x[t].node, shards[t],
                                       ap_spmd_shard_bytes(pp->spmd, pp->x[t].node));
        free(shards[t]);
    }
    free(shards);
    return a;
}

/* Runs one group: `n` schedule instructions (SEND/RECV kinds) or, with n == 0, the leaf
 * transfers. *st: this rank's status (updated by failures here and by received headers).
 * Returns non-OK only when the group could not be posted at all. */
static ap_status run_group(ap_pipeline *pp, const ap_inst *in, int n, ap_status *st,
                           double *t_p2p) {
    px_group gr;
    memset(&gr, 0, sizeof gr);
    bool kinds[3] = {false, false, false};
    ap_status a = AUTOPAR_OK;
    if (n == 0) {
        kinds[PX_LEAF] = true;
        a = add_sends(pp, &gr, PX_LEAF, st);
        if (!a) a = add_recvs(pp, &gr, PX_LEAF);
    }
    for (int i = 0; i < n && !a; i++) {
        switch (in[i].op) {
        case AP_INST_SEND_ACTIVATION: a = add_sends(pp, &gr, PX_ACT, st); break;
        case AP_INST_SEND_GRAD: a = add_sends(pp, &gr, PX_GRAD, st); break;
        case AP_INST_RECV_ACTIVATION:
            kinds[PX_ACT] = true;
            a = add_recvs(pp, &gr, PX_ACT);
            break;
        case AP_INST_RECV_GRAD:
            kinds[PX_GRAD] = true;
            a = add_recvs(pp, &gr, PX_GRAD);
            break;
        default: break;
        }
    }
    if (!a) {
        double t0 = px_now();
        a = ap_comm_exchange(pp->world, gr.ops, gr.n);
        *t_p2p += px_now() - t0;
    }
    if (!a) a = finish_recvs(pp, &gr, kinds, st, t_p2p);
    group_clear(&gr);
    return a;
}

static bool is_p2p(ap_inst_op op) {
    return op == AP_INST_SEND_ACTIVATION || op == AP_INST_RECV_ACTIVATION ||
           op == AP_INST_SEND_GRAD || op == AP_INST_RECV_GRAD;
}

/* ------------------------------------------------------------------------------------------ */
/* Steps                                                                                       */
/* ------------------------------------------------------------------------------------------ */

ap_status ap_pipeline_step(ap_pipeline *pp, ap_spmd_feed_fn feed, void *ctx, double *loss) {
    const char *fn = "ap_pipeline_step";
    if (!pp) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: pipeline is NULL", fn);
    const autopar_plan *p = pp->plan;
    int B = p->n_micro_batches;
    if (!feed && B > 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: %d micro-batches need a feed", fn, B);
    if (p->n_stages == 1) {
        if (B == 1) {
            ap_status st = feed ? feed(ctx, 0) : AUTOPAR_OK;
            return st ? st : ap_spmd_step(pp->spmd, loss);
        }
        return ap_spmd_step_accum(pp->spmd, B, feed, ctx, loss);
    }
    double t_begin = px_now(), t_p2p = 0.0;
    ap_status st = ap_spmd_stage_begin(pp->spmd, B, pp->sched->peak_activations[pp->stage]);
    if ((st = ap_comm_all_ok(pp->world, st))) return st;
    ap_status fatal = run_group(pp, NULL, 0, &st, &t_p2p);
    bool applied = false;
    int n_in = 0;
    const ap_inst *in = ap_schedule_stage_insts(pp->sched, pp->stage, &n_in);
    for (int i = 0; i < n_in && !fatal; i++) {
        if (is_p2p(in[i].op)) {
            int j = i;
            while (j < n_in && is_p2p(in[j].op)) j++;
            fatal = run_group(pp, in + i, j - i, &st, &t_p2p);
            i = j - 1;
            continue;
        }
        switch (in[i].op) {
        case AP_INST_RUN_FORWARD: {
            /* the feed is collective over the stage: called whatever this rank's status */
            ap_status f = feed ? feed(ctx, in[i].micro_batch) : AUTOPAR_OK;
            if (!st) st = f;
            st = ap_spmd_stage_forward(pp->spmd, in[i].micro_batch, st);
            break;
        }
        case AP_INST_RUN_BACKWARD:
            st = ap_spmd_stage_backward(pp->spmd, in[i].micro_batch,
                                        (in[i].flags & AP_INST_FIRST_MB) != 0, st);
            break;
        case AP_INST_APPLY:
            st = ap_spmd_stage_apply(pp->spmd, B, st, pp->world);
            applied = true;
            break;
        default: break;   /* FREE: the stash slot went back at its backward; GRAD_SYNC: */
                          /* the deferred sums run in APPLY */
        }
    }
    if (fatal && !st) st = fatal;
    /* A rank that stopped early still joins the agreement the others make before applying,
     * so that the collectives over the world stay matched. */
    if (!applied) {
        if (!st)
            st = ap_error(AUTOPAR_ERR_UNSUPPORTED, "pipeline: stage %d's instruction list has no "
                          "APPLY", pp->stage);
        st = ap_comm_all_ok(pp->world, st);
    }
    double lv = 0.0;
    st = ap_spmd_stage_finish(pp->spmd, st, pp->world, &lv);
    if (!st && pp->loss_stage >= 0)
        st = ap_comm_broadcast(pp->world, &lv, 1, AP_COMM_F64, pp->root[pp->loss_stage]);
    if (!st) {
        if (loss) *loss = lv;
        ap_spmd_add_timers(pp->spmd, px_now() - t_begin, t_p2p);
    }
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Reads and writes of leaves                                                                  */
/* ------------------------------------------------------------------------------------------ */

static int owner_of(const ap_pipeline *pp, int node) {
    for (int s = 0; s < pp->plan->n_stages; s++)
        if (pp->plan->stages[s].shard->node[node].in_stage) return s;
    return -1;
}

static ap_status leaf_owner(const ap_pipeline *pp, const autopar_tensor *t, const char *fn,
                            int *owner) {
    if (!t)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: tensor is not part of the plan's graph", fn);
    ap_status st = ap_graph_check_tensor(pp->plan->graph, t, -1, fn, "plan's");
    if (st) return st;
    const ap_node *n = (const ap_node *)t;
    *owner = owner_of(pp, n->id);
    if (*owner < 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: no stage computes '%s'", fn, n->name);
    return AUTOPAR_OK;
}

ap_status ap_pipeline_read(ap_pipeline *pp, const autopar_tensor *t, void *data, int64_t n) {
    const char *fn = "ap_pipeline_read";
    if (!pp) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: pipeline is NULL", fn);
    if (pp->plan->n_stages == 1) return ap_spmd_read(pp->spmd, t, data, n);
    int owner = -1;
    ap_status st = leaf_owner(pp, t, fn, &owner);
    if ((st = ap_comm_all_ok(pp->world, st))) return st;
    if (pp->stage == owner) st = ap_spmd_read(pp->spmd, t, data, n);   /* agreed in the stage */
    if ((st = ap_comm_bcast_error(pp->world, pp->root[owner], st))) return st;
    return ap_comm_broadcast(pp->world, data, (size_t)n * 4, AP_COMM_U8, pp->root[owner]);
}

ap_status ap_pipeline_write(ap_pipeline *pp, const autopar_tensor *t, const void *data,
                            int64_t n) {
    const char *fn = "ap_pipeline_write";
    if (!pp) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: pipeline is NULL", fn);
    if (pp->plan->n_stages == 1) return ap_spmd_write(pp->spmd, t, data, n);
    int owner = -1;
    ap_status st = leaf_owner(pp, t, fn, &owner);
    if ((st = ap_comm_all_ok(pp->world, st))) return st;
    if (pp->stage == owner) st = ap_spmd_write(pp->spmd, t, data, n);
    return ap_comm_all_ok(pp->world, st);
}

int64_t ap_pipeline_steps(const ap_pipeline *pp) { return pp ? ap_spmd_steps(pp->spmd) : 0; }

void ap_pipeline_set_steps(ap_pipeline *pp, int64_t steps) {
    if (pp) ap_spmd_set_steps(pp->spmd, steps);
}
