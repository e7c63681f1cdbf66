/*
 * Stage costs composed from per-unit intra-operator solutions; see stage_cost.h.
 */
#define _POSIX_C_SOURCE 200809L

#include "stage_cost.h"

#include "cost_model.h"

#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Figures of one unit type on one configuration. */
typedef struct unit_fig {
    int    state;                 /* 0 not solved, 1 solved, -1 no realisable sharding       */
    int    variant;               /* variant whose solve this is (ladders repeat their last)  */
    double budget;                /* memory budget of the solve (< 0: none)                  */
    double fwd, bwd, fwd_compute, bwd_compute;   /* per micro-batch                          */
    double sync, apply;                          /* per step                                  */
    double params, opt_state, grads, act, transient;
} unit_fig;

/* A tensor produced in unit `from` and read in unit `to` (one per (tensor, reading unit)). */
typedef struct cost_edge {
    int    tensor, from, to;
    int    from_pos;              /* position of the tensor in from's node list               */
    int    to_ext;                /* index of the tensor in to's external list                */
    bool   per_step;              /* crosses once per step (parameters, state, gradient       */
                                  /* contributions to a parameter's gradient)                 */
    bool   forward;               /* a forward tensor (else backward / apply)                 */
    bool   held;                  /* read by a backward node (kept until the backward pass)   */
    double bytes;                 /* whole tensor                                             */
} cost_edge;

struct ap_cost_ctx {
    ap_cost_params prm;
    const autopar_graph *g;
    int     n;                    /* node count                                               */
    int     n_layers, n_units;
    int    *unit_of;              /* owned copy                                               */
    int    *unit_layer;           /* layer of each unit                                       */
    int    *layer_unit;           /* n_layers + 1: first unit of each layer                   */
    int    *node_begin, *nodes;   /* CSR: nodes of each unit, ascending                       */
    int    *ext_begin, *ext;      /* CSR: external operands of each unit, first-read order    */
    int    *pos;                  /* node id -> position in its unit's node list              */
    int    *unit_type, *type_rep; /* type of each unit; representative unit of each type      */
    int     n_types;
    /* node flags */
    /* The final gradient of some parameter, or a backward tensor that only flows into such
     * gradients through sums (a contribution, e.g. of a tied weight). Collectives are linear,
     * so those on such tensors can run once per step on values accumulated over the
     * micro-batches. */
    uint8_t *is_param_grad;
    uint8_t *held;                /* forward tensor read by a backward node                   */
    /* edges, and CSR indices of them by producing and by reading unit */
    int        n_edges;
    cost_edge *edges;
    int       *out_begin, *out_idx, *in_begin, *in_idx;
    /* submeshes and configurations */
    int              n_sub, cap_sub;
    ap_submesh_shape *sub;
    int             **sub_cfg;    /* per submesh: config indices                              */
    int              *sub_ncfg, *sub_capcfg;
    int               n_cfg, cap_cfg;
    ap_mesh_cfg      *cfg;
    /* Memory variants (stage_cost.h); a ladder that ends early repeats its last variant. A
     * slot is (cfg, variant): slot = cfg * n_var + v. */
    int       n_var;
    /* per (slot, type) figures and per (slot, edge) specs / costs, grown with cap_cfg */
    unit_fig *fig;                /* [slot * n_types + type]                                  */
    ap_spec  *prod, *arr;         /* [slot * n_edges + e]                                     */
    double   *ecost;              /* [slot * n_edges + e]; NaN = not computed yet             */
    ap_shard_cache *cache;
    /* scratch for range evaluation */
    int     *stamp_up, *stamp_down;
    int      stamp;
    /* statistics */
    int      n_solves, n_reused;
    double   solve_seconds;
};

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static ap_status nomem(void) { return ap_error(AUTOPAR_ERR_NOMEM, "stage costs: out of memory"); }

static double node_bytes(const ap_node *v) {
    return (double)ap_shape_numel(&v->shape) * (double)ap_dtype_size(v->dtype);
}

/* ------------------------------------------------------------------------------------------ */
/* Units and types                                                                             */
/* ------------------------------------------------------------------------------------------ */

/* Growable int64 vector for the structural signature of a unit. */
typedef struct sigvec {
    int64_t *v;
    size_t   n, cap;
    bool     oom;
} sigvec;

static void sig_push(sigvec *s, int64_t x) {
    if (s->oom) return;
    if (s->n == s->cap) {
        size_t nc = s->cap ? 2 * s->cap : 256;
        int64_t *nv = realloc(s->v, nc * sizeof *nv);
        if (!nv) {
            s->oom = true;
            return;
        }
        s->v = nv;
        s->cap = nc;
    }
    s->v[s->n++] = x;
}

static int64_t dbits(double d) {
    int64_t b;
    memcpy(&b, &d, sizeof b);
    return b;
}

#define SIG_OUTSIDE INT64_MIN

/* Reference to node id from unit u: its position inside, -(1 + external index), or outside.
 * ext_idx[id] holds the external index for the unit being encoded (-1 otherwise). */
static int64_t sig_ref(const ap_cost_ctx *x, int u, const int *ext_idx, int id) {
    if (id < 0 || id >= x->n) return SIG_OUTSIDE + 1;
    if (x->unit_of[id] == u) return x->pos[id];
    if (ext_idx[id] >= 0) return -1 - (int64_t)ext_idx[id];
    return SIG_OUTSIDE;
}

static void sig_node(const ap_cost_ctx *x, int u, const int *ext_idx, const ap_node *v,
                     sigvec *s) {
    sig_push(s, v->op);
    sig_push(s, v->dtype);
    sig_push(s, v->kind);
    sig_push(s, v->phase);
    sig_push(s, v->shape.ndim);
    for (int d = 0; d < v->shape.ndim; d++) sig_push(s, v->shape.dim[d]);
    for (int k = 0; k < AP_MAX_IATTR; k++) {
        /* An optimizer state's first attribute is its parameter's node id. */
        if (k == 0 && v->op == AP_OP_OPT_STATE)
            sig_push(s, sig_ref(x, u, ext_idx, (int)v->attrs.i[0]));
        else
            sig_push(s, v->attrs.i[k]);
    }
    for (int k = 0; k < AP_MAX_FATTR; k++) sig_push(s, dbits(v->attrs.f[k]));
}

/* Structural signature of unit u: its externals, then its nodes with operands, gradient and
 * assignment links as references, and whether other units read them. */
static void unit_signature(const ap_cost_ctx *x, int u, int *ext_idx, const uint8_t *read_out,
                           const uint8_t *read_any, sigvec *s) {
    const autopar_graph *g = x->g;
    int e0 = x->ext_begin[u], e1 = x->ext_begin[u + 1];
    for (int e = e0; e < e1; e++) ext_idx[x->ext[e]] = e - e0;
    sig_push(s, x->node_begin[u + 1] - x->node_begin[u]);
    sig_push(s, e1 - e0);
    for (int e = e0; e < e1; e++) sig_node(x, u, ext_idx, g->nodes[x->ext[e]], s);
    for (int i = x->node_begin[u]; i < x->node_begin[u + 1]; i++) {
        const ap_node *v = g->nodes[x->nodes[i]];
        sig_node(x, u, ext_idx, v, s);
        sig_push(s, v->n_src);
        for (int k = 0; k < v->n_src; k++) sig_push(s, sig_ref(x, u, ext_idx, v->src[k]));
        sig_push(s, sig_ref(x, u, ext_idx, v->grad));
        sig_push(s, sig_ref(x, u, ext_idx, v->assign_to));
        sig_push(s, (int64_t)read_out[v->id] | (int64_t)read_any[v->id] << 1 |
                        (int64_t)x->is_param_grad[v->id] << 2 | (int64_t)x->held[v->id] << 3);
    }
    for (int e = e0; e < e1; e++) ext_idx[x->ext[e]] = -1;
}

static uint64_t sig_hash(const sigvec *s) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < s->n; i++) {
        uint64_t w = (uint64_t)s->v[i];
        for (int b = 0; b < 8; b++) {
            h ^= (w >> (8 * b)) & 0xffu;
            h *= 1099511628211ull;
        }
    }
    return h;
}

static ap_status build_types(ap_cost_ctx *x, const uint8_t *read_out, const uint8_t *read_any) {
    ap_status st = AUTOPAR_OK;
    int *ext_idx = malloc(sizeof(int) * (size_t)x->n);
    sigvec *sigs = calloc((size_t)x->n_units, sizeof *sigs);
    uint64_t *hash = malloc(sizeof(uint64_t) * (size_t)x->n_units);
    x->unit_type = malloc(sizeof(int) * (size_t)x->n_units);
    x->type_rep = malloc(sizeof(int) * (size_t)x->n_units);
    if (!ext_idx || !sigs || !hash || !x->unit_type || !x->type_rep) {
        st = nomem();
        goto done;
    }
    for (int i = 0; i < x->n; i++) ext_idx[i] = -1;
    x->n_types = 0;
    for (int u = 0; u < x->n_units; u++) {
        unit_signature(x, u, ext_idx, read_out, read_any, &sigs[u]);
        if (sigs[u].oom) {
            st = nomem();
            goto done;
        }
        hash[u] = sig_hash(&sigs[u]);
        int found = -1;
        for (int t = 0; t < x->n_types && found < 0; t++) {
            int r = x->type_rep[t];
            if (hash[r] == hash[u] && sigs[r].n == sigs[u].n &&
                memcmp(sigs[r].v, sigs[u].v, sigs[u].n * sizeof(int64_t)) == 0)
                found = t;
        }
        if (found < 0) {
            found = x->n_types++;
            x->type_rep[found] = u;
        }
        x->unit_type[u] = found;
    }
done:
    if (sigs)
        for (int u = 0; u < x->n_units; u++) free(sigs[u].v);
    free(sigs);
    free(hash);
    free(ext_idx);
    return st;
}

/* Whether every reader of tensor t inside unit `to` only accumulates a parameter gradient or
 * belongs to the optimizer (then the tensor can be summed over micro-batches first and sent
 * once per step). */
static bool readers_accumulate(const ap_cost_ctx *x, int t, int to) {
    const autopar_graph *g = x->g;
    bool any = false;
    for (int i = x->node_begin[to]; i < x->node_begin[to + 1]; i++) {
        const ap_node *v = g->nodes[x->nodes[i]];
        for (int k = 0; k < v->n_src; k++) {
            if (v->src[k] != t) continue;
            any = true;
            if (!x->is_param_grad[v->id] && v->phase != AUTOPAR_PHASE_APPLY) return false;
        }
    }
    return any;
}

static ap_status build_edges(ap_cost_ctx *x) {
    const autopar_graph *g = x->g;
    int n_e = x->ext_begin[x->n_units];
    x->edges = malloc(sizeof(cost_edge) * (size_t)(n_e > 0 ? n_e : 1));
    x->out_begin = calloc((size_t)x->n_units + 1, sizeof(int));
    x->in_begin = calloc((size_t)x->n_units + 1, sizeof(int));
    x->out_idx = malloc(sizeof(int) * (size_t)(n_e > 0 ? n_e : 1));
    x->in_idx = malloc(sizeof(int) * (size_t)(n_e > 0 ? n_e : 1));
    if (!x->edges || !x->out_begin || !x->in_begin || !x->out_idx || !x->in_idx) return nomem();
    x->n_edges = n_e;
    for (int b = 0; b < x->n_units; b++) {
        for (int e = x->ext_begin[b]; e < x->ext_begin[b + 1]; e++) {
            int t = x->ext[e];
            const ap_node *v = g->nodes[t];
            cost_edge *ed = &x->edges[e];
            ed->tensor = t;
            ed->from = x->unit_of[t];
            ed->to = b;
            ed->from_pos = x->pos[t];
            ed->to_ext = e - x->ext_begin[b];
            ed->bytes = node_bytes(v);
            ed->forward = v->phase == AUTOPAR_PHASE_FORWARD;
            ed->held = x->held[t] != 0;
            bool leaf_state = v->kind == AUTOPAR_KIND_PARAM || v->kind == AUTOPAR_KIND_OPT_STATE ||
                              v->kind == AUTOPAR_KIND_CONSTANT;
            ed->per_step = leaf_state || v->phase == AUTOPAR_PHASE_APPLY ||
                           (v->phase == AUTOPAR_PHASE_BACKWARD && readers_accumulate(x, t, b));
            x->out_begin[ed->from + 1]++;
            x->in_begin[b + 1]++;
        }
    }
    for (int u = 0; u < x->n_units; u++) {
        x->out_begin[u + 1] += x->out_begin[u];
        x->in_begin[u + 1] += x->in_begin[u];
    }
    int *fo = malloc(sizeof(int) * (size_t)(x->n_units + 1));
    int *fi = malloc(sizeof(int) * (size_t)(x->n_units + 1));
    if (!fo || !fi) {
        free(fo);
        free(fi);
        return nomem();
    }
    memcpy(fo, x->out_begin, sizeof(int) * (size_t)(x->n_units + 1));
    memcpy(fi, x->in_begin, sizeof(int) * (size_t)(x->n_units + 1));
    for (int e = 0; e < n_e; e++) {
        x->out_idx[fo[x->edges[e].from]++] = e;
        x->in_idx[fi[x->edges[e].to]++] = e;
    }
    free(fo);
    free(fi);
    return AUTOPAR_OK;
}

AP_INTERNAL ap_status ap_cost_ctx_new(const ap_cost_params *prm, ap_cost_ctx **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_ctx_new: out is NULL");
    *out = NULL;
    if (!prm || !prm->g || !prm->cluster)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_ctx_new: NULL parameter");
    const autopar_graph *g = prm->g;
    if (prm->n_layers < 1 || prm->n_micro_batches < 1 || g->n_nodes < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_ctx_new: %d layers, %d micro-batches, "
                        "%d nodes: each must be >= 1", prm->n_layers, prm->n_micro_batches,
                        g->n_nodes);
    ap_cost_ctx *x = calloc(1, sizeof *x);
    if (!x) return nomem();
    x->prm = *prm;
    x->g = g;
    x->n_var = prm->n_variants >= 1 ? prm->n_variants : 1;
    x->n = g->n_nodes;
    x->n_layers = prm->n_layers;
    ap_status st = AUTOPAR_OK;
    uint8_t *read_out = NULL, *read_any = NULL;
    int *stamp = NULL;
    size_t n = (size_t)x->n;
    x->unit_of = malloc(sizeof(int) * n);
    x->pos = malloc(sizeof(int) * n);
    x->is_param_grad = calloc(n, 1);
    x->held = calloc(n, 1);
    x->stamp_up = calloc(n, sizeof(int));
    x->stamp_down = calloc(n, sizeof(int));
    read_out = calloc(n, 1);
    read_any = calloc(n, 1);
    stamp = malloc(sizeof(int) * n);
    if (!x->unit_of || !x->pos || !x->is_param_grad || !x->held || !x->stamp_up ||
        !x->stamp_down || !read_out || !read_any || !stamp) {
        st = nomem();
        goto fail;
    }
    int max_unit = -1;
    for (int i = 0; i < x->n; i++) {
        const ap_node *v = g->nodes[i];
        if (v->layer < 0 || v->layer >= x->n_layers) {
            st = ap_error(AUTOPAR_ERR_INVALID_ARG, "stage costs: node '%s' has layer %d, outside "
                          "0..%d", v->name, v->layer, x->n_layers - 1);
            goto fail;
        }
        x->unit_of[i] = prm->unit_of ? prm->unit_of[i] : v->layer;
        if (x->unit_of[i] < 0 || x->unit_of[i] >= x->n) {
            st = ap_error(AUTOPAR_ERR_INVALID_ARG, "stage costs: node '%s' has unit %d", v->name,
                          x->unit_of[i]);
            goto fail;
        }
        if (x->unit_of[i] > max_unit) max_unit = x->unit_of[i];
        if (v->kind == AUTOPAR_KIND_PARAM && v->grad >= 0 && v->grad < x->n)
            x->is_param_grad[v->grad] = 1;
    }
    /* Contributions: backward nodes all of whose readers are sums that are (or feed only)
     * parameter gradients; readers have larger ids, so one backward sweep settles it. */
    {
        uint8_t *bad = calloc(n, 1);   /* read by something that is not such a sum */
        uint8_t *has = calloc(n, 1);
        if (!bad || !has) {
            free(bad);
            free(has);
            st = nomem();
            goto fail;
        }
        for (int i = x->n - 1; i >= 0; i--) {
            const ap_node *v = g->nodes[i];
            if (!x->is_param_grad[i] && v->phase == AUTOPAR_PHASE_BACKWARD && has[i] && !bad[i])
                x->is_param_grad[i] = 1;
            for (int k = 0; k < v->n_src; k++) {
                int s = v->src[k];
                has[s] = 1;
                if (!(x->is_param_grad[i] && v->op == AP_OP_ADD)) bad[s] = 1;
            }
        }
        free(bad);
        free(has);
    }
    for (int i = 0; i < x->n; i++) {
        const ap_node *v = g->nodes[i];
        for (int k = 0; k < v->n_src; k++) {
            read_any[v->src[k]] = 1;
            if (v->phase == AUTOPAR_PHASE_BACKWARD &&
                g->nodes[v->src[k]]->phase == AUTOPAR_PHASE_FORWARD)
                x->held[v->src[k]] = 1;
        }
    }
    x->n_units = max_unit + 1;
    size_t nu = (size_t)x->n_units;
    x->unit_layer = malloc(sizeof(int) * nu);
    x->layer_unit = malloc(sizeof(int) * ((size_t)x->n_layers + 1));
    x->node_begin = calloc(nu + 1, sizeof(int));
    x->nodes = malloc(sizeof(int) * n);
    x->ext_begin = calloc(nu + 1, sizeof(int));
    if (!x->unit_layer || !x->layer_unit || !x->node_begin || !x->nodes || !x->ext_begin) {
        st = nomem();
        goto fail;
    }
    for (int u = 0; u < x->n_units; u++) x->unit_layer[u] = -1;
    for (int i = 0; i < x->n; i++) {
        int u = x->unit_of[i], l = g->nodes[i]->layer;
        if (x->unit_layer[u] < 0) x->unit_layer[u] = l;
        if (x->unit_layer[u] != l) {
            st = ap_error(AUTOPAR_ERR_INVALID_ARG, "stage costs: unit %d holds nodes of layers %d "
                          "and %d ('%s')", u, x->unit_layer[u], l, g->nodes[i]->name);
            goto fail;
        }
        x->node_begin[u + 1]++;
    }
    for (int u = 0; u < x->n_units; u++) {
        if (x->unit_layer[u] < 0 || (u > 0 && x->unit_layer[u] < x->unit_layer[u - 1]) ||
            (u > 0 && x->unit_layer[u] > x->unit_layer[u - 1] + 1) ||
            (u == 0 && x->unit_layer[u] != 0)) {
            st = ap_error(AUTOPAR_ERR_INVALID_ARG, "stage costs: units do not cover the layers in "
                          "order (unit %d is in layer %d)", u, x->unit_layer[u]);
            goto fail;
        }
    }
    if (x->unit_layer[x->n_units - 1] != x->n_layers - 1) {
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "stage costs: layer %d has no node",
                      x->unit_layer[x->n_units - 1] + 1);
        goto fail;
    }
    for (int l = 0, u = 0; l <= x->n_layers; l++) {
        while (u < x->n_units && x->unit_layer[u] < l) u++;
        x->layer_unit[l] = u;
    }
    for (int u = 0; u < x->n_units; u++) x->node_begin[u + 1] += x->node_begin[u];
    {
        int *fill = malloc(sizeof(int) * nu);
        if (!fill) {
            st = nomem();
            goto fail;
        }
        memcpy(fill, x->node_begin, sizeof(int) * nu);
        for (int i = 0; i < x->n; i++) {
            int u = x->unit_of[i];
            x->pos[i] = fill[u] - x->node_begin[u];
            x->nodes[fill[u]++] = i;
        }
        free(fill);
    }
    /* External operands, in first-read order per unit. */
    for (int i = 0; i < x->n; i++) stamp[i] = -1;
    int n_ext = 0, cap_ext = 64;
    x->ext = malloc(sizeof(int) * (size_t)cap_ext);
    if (!x->ext) {
        st = nomem();
        goto fail;
    }
    for (int u = 0; u < x->n_units; u++) {
        x->ext_begin[u] = n_ext;
        for (int i = x->node_begin[u]; i < x->node_begin[u + 1]; i++) {
            const ap_node *v = g->nodes[x->nodes[i]];
            for (int k = 0; k < v->n_src; k++) {
                int s = v->src[k];
                if (x->unit_of[s] == u || stamp[s] == u) continue;
                stamp[s] = u;
                read_out[s] = 1;
                if (n_ext == cap_ext) {
                    int *ne = realloc(x->ext, sizeof(int) * (size_t)cap_ext * 2);
                    if (!ne) {
                        st = nomem();
                        goto fail;
                    }
                    x->ext = ne;
                    cap_ext *= 2;
                }
                x->ext[n_ext++] = s;
            }
        }
    }
    x->ext_begin[x->n_units] = n_ext;
    if ((st = build_types(x, read_out, read_any)) || (st = build_edges(x))) goto fail;
    if ((st = ap_shard_cache_new(&x->cache))) goto fail;
    free(read_out);
    free(read_any);
    free(stamp);
    *out = x;
    return AUTOPAR_OK;
fail:
    free(read_out);
    free(read_any);
    free(stamp);
    ap_cost_ctx_free(x);
    return st;
}

AP_INTERNAL void ap_cost_ctx_free(ap_cost_ctx *x) {
    if (!x) return;
    free(x->unit_of);
    free(x->unit_layer);
    free(x->layer_unit);
    free(x->node_begin);
    free(x->nodes);
    free(x->ext_begin);
    free(x->ext);
    free(x->pos);
    free(x->unit_type);
    free(x->type_rep);
    free(x->is_param_grad);
    free(x->held);
    free(x->edges);
    free(x->out_begin);
    free(x->out_idx);
    free(x->in_begin);
    free(x->in_idx);
    for (int m = 0; m < x->n_sub; m++) free(x->sub_cfg[m]);
    free(x->sub_cfg);
    free(x->sub_ncfg);
    free(x->sub_capcfg);
    free(x->sub);
    for (int c = 0; c < x->n_cfg; c++) ap_mesh_free(x->cfg[c].mesh);
    free(x->cfg);
    free(x->fig);
    free(x->prod);
    free(x->arr);
    free(x->ecost);
    free(x->stamp_up);
    free(x->stamp_down);
    ap_shard_cache_free(x->cache);
    free(x);
}

/* ------------------------------------------------------------------------------------------ */
/* Submeshes and configurations                                                                */
/* ------------------------------------------------------------------------------------------ */

static ap_status submesh_index(ap_cost_ctx *x, ap_submesh_shape s, int *index) {
    for (int m = 0; m < x->n_sub; m++)
        if (x->sub[m].n_hosts == s.n_hosts && x->sub[m].devices_per_host == s.devices_per_host) {
            *index = m;
            return AUTOPAR_OK;
        }
    if (x->n_sub == x->cap_sub) {
        int nc = x->cap_sub ? 2 * x->cap_sub : 8;
        ap_submesh_shape *ns = realloc(x->sub, sizeof *ns * (size_t)nc);
        if (!ns) return nomem();
        x->sub = ns;
        int **nsc = realloc(x->sub_cfg, sizeof *nsc * (size_t)nc);
        if (!nsc) return nomem();
        x->sub_cfg = nsc;
        int *nn = realloc(x->sub_ncfg, sizeof *nn * (size_t)nc);
        if (!nn) return nomem();
        x->sub_ncfg = nn;
        int *ncap = realloc(x->sub_capcfg, sizeof *ncap * (size_t)nc);
        if (!ncap) return nomem();
        x->sub_capcfg = ncap;
        x->cap_sub = nc;
    }
    int m = x->n_sub++;
    x->sub[m] = s;
    x->sub_cfg[m] = NULL;
    x->sub_ncfg[m] = 0;
    x->sub_capcfg[m] = 0;
    *index = m;
    return AUTOPAR_OK;
}

/* Grows the per-configuration arrays to hold cap configurations. */
static ap_status grow_cfg(ap_cost_ctx *x, int cap) {
    if (cap <= x->cap_cfg) return AUTOPAR_OK;
    int nc = x->cap_cfg ? 2 * x->cap_cfg : 16;
    while (nc < cap) nc *= 2;
    ap_mesh_cfg *c = realloc(x->cfg, sizeof *c * (size_t)nc);
    if (!c) return nomem();
    x->cfg = c;
    size_t nt = (size_t)x->n_types, ne = (size_t)(x->n_edges > 0 ? x->n_edges : 1);
    size_t ns = (size_t)nc * (size_t)x->n_var;
    unit_fig *f = realloc(x->fig, sizeof *f * nt * ns);
    if (!f) return nomem();
    x->fig = f;
    ap_spec *p = realloc(x->prod, sizeof *p * ne * ns);
    if (!p) return nomem();
    x->prod = p;
    ap_spec *a = realloc(x->arr, sizeof *a * ne * ns);
    if (!a) return nomem();
    x->arr = a;
    double *e = realloc(x->ecost, sizeof *e * ne * ns);
    if (!e) return nomem();
    x->ecost = e;
    x->cap_cfg = nc;
    return AUTOPAR_OK;
}

AP_INTERNAL ap_status ap_cost_add_config(ap_cost_ctx *x, ap_submesh_shape s, int dp, int mp,
                                         int force_batch_axis, int *index) {
    if (!x) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_add_config: NULL context");
    const autopar_cluster *c = x->prm.cluster;
    ap_status st = ap_submesh_check(s, c->hosts, c->devices_per_host);
    if (st) return st;
    if (dp < 1 || mp < 1 || (int64_t)dp * mp != (int64_t)ap_submesh_size(s))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "logical mesh %d x %d does not have the %d "
                        "devices of submesh (%d, %d)", dp, mp, ap_submesh_size(s), s.n_hosts,
                        s.devices_per_host);
    if (force_batch_axis != 0 && force_batch_axis != -1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_add_config: force_batch_axis %d must be "
                        "0 or -1", force_batch_axis);
    /* On a 1 x 1 mesh forcing changes nothing: one configuration. */
    if (dp * mp == 1) force_batch_axis = -1;
    int m;
    if ((st = submesh_index(x, s, &m))) return st;
    for (int k = 0; k < x->sub_ncfg[m]; k++) {
        const ap_mesh_cfg *q = &x->cfg[x->sub_cfg[m][k]];
        if (q->dp == dp && q->mp == mp && q->force_batch_axis == force_batch_axis) {
            if (index) *index = x->sub_cfg[m][k];
            return AUTOPAR_OK;
        }
    }
    if ((st = grow_cfg(x, x->n_cfg + 1))) return st;
    if (x->sub_ncfg[m] == x->sub_capcfg[m]) {
        int nc = x->sub_capcfg[m] ? 2 * x->sub_capcfg[m] : 8;
        int *ns = realloc(x->sub_cfg[m], sizeof(int) * (size_t)nc);
        if (!ns) return nomem();
        x->sub_cfg[m] = ns;
        x->sub_capcfg[m] = nc;
    }
    ap_mesh *mesh = NULL;
    if ((st = ap_mesh_new_block(c, 0, s.n_hosts, 0, s.devices_per_host, dp, mp, &mesh)))
        return st;
    int k = x->n_cfg++;
    x->cfg[k] = (ap_mesh_cfg){.submesh = m, .dp = dp, .mp = mp,
                              .force_batch_axis = force_batch_axis, .mesh = mesh};
    for (int v = 0; v < x->n_var; v++) {
        size_t slot = (size_t)k * (size_t)x->n_var + (size_t)v;
        for (int t = 0; t < x->n_types; t++) x->fig[slot * (size_t)x->n_types + (size_t)t].state = 0;
        for (int e = 0; e < x->n_edges; e++) x->ecost[slot * (size_t)x->n_edges + (size_t)e] = NAN;
    }
    x->sub_cfg[m][x->sub_ncfg[m]++] = k;
    if (index) *index = k;
    return AUTOPAR_OK;
}

/* True when every input's batch dim (if it has one) is divisible by dp. */
static bool batch_divisible(const autopar_graph *g, int dp) {
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *v = g->nodes[i];
        if (v->op != AP_OP_INPUT) continue;
        int64_t bd = v->attrs.i[0];
        if (bd < 0 || bd >= v->shape.ndim) continue;
        if (v->shape.dim[bd] % dp != 0) return false;
    }
    return true;
}

AP_INTERNAL ap_status ap_cost_add_auto_configs(ap_cost_ctx *x, ap_submesh_shape s, bool force,
                                               const int **configs, int *count) {
    if (configs) *configs = NULL;
    if (count) *count = 0;
    if (!x) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_add_auto_configs: NULL context");
    int n = ap_submesh_size(s), M = x->prm.cluster->devices_per_host;
    ap_status st;
    for (int mp = 1; mp <= n && mp <= M; mp++) {
        if (n % mp != 0) continue;
        int dp = n / mp;
        if (force && dp > 1 && !batch_divisible(x->g, dp)) continue;
        if ((st = ap_cost_add_config(x, s, dp, mp, force ? 0 : -1, NULL))) return st;
    }
    if (force && n > 1 && (st = ap_cost_add_config(x, s, n, 1, -1, NULL))) return st;
    if (configs || count) {
        int m;
        if ((st = submesh_index(x, s, &m))) return st;
        if (configs) *configs = x->sub_cfg[m];
        if (count) *count = x->sub_ncfg[m];
    }
    return AUTOPAR_OK;
}

AP_INTERNAL int ap_cost_n_submeshes(const ap_cost_ctx *x) { return x ? x->n_sub : 0; }
AP_INTERNAL ap_submesh_shape ap_cost_submesh(const ap_cost_ctx *x, int m) { return x->sub[m]; }
AP_INTERNAL int ap_cost_n_configs(const ap_cost_ctx *x) { return x ? x->n_cfg : 0; }
AP_INTERNAL const ap_mesh_cfg *ap_cost_config(const ap_cost_ctx *x, int c) { return &x->cfg[c]; }
AP_INTERNAL const int *ap_cost_submesh_configs(const ap_cost_ctx *x, int m, int *n) {
    *n = x->sub_ncfg[m];
    return x->sub_cfg[m];
}

/* ------------------------------------------------------------------------------------------ */
/* Unit solves                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static void shard_options_for(const ap_cost_ctx *x, const ap_mesh_cfg *cf, ap_shard_options *o) {
    *o = x->prm.shard;
    /* Units are solved without a memory limit (the fastest sharding); memory is checked on the
     * composed stage, where the micro-batches in flight are known. */
    o->memory_budget = -1.0;
    o->force_batch_dim_to_mesh_axis = cf->force_batch_axis;
    o->layer_of = x->unit_of;   /* a unit is one layer for the sharding pass */
    o->cache = x->cache;
}

static size_t slot_of(const ap_cost_ctx *x, int c, int v) {
    return (size_t)c * (size_t)x->n_var + (size_t)v;
}
static unit_fig *fig_at(const ap_cost_ctx *x, int type, int c, int v) {
    return &x->fig[slot_of(x, c, v) * (size_t)x->n_types + (size_t)type];
}

/* Solves the representative of `type` on configuration c as variant var says: var >= 1 keeps
 * parameters from being fully replicated; budget (< 0: none) limits the peak. *plan (may be
 * NULL to discard) gets the plan; *infeasible is set when no sharding is realisable. */
static ap_status solve_rep(ap_cost_ctx *x, int type, int c, int var, double budget,
                           ap_shard_plan **plan, bool *infeasible) {
    int u = x->type_rep[type];
    const ap_mesh_cfg *cf = &x->cfg[c];
    ap_shard_options o;
    shard_options_for(x, cf, &o);
    o.memory_budget = budget;
    if (var >= 1 && cf->dp * cf->mp > 1) o.allow_replicated_params = false;
    ap_shard_plan *p = NULL;
    double t0 = now_seconds();
    ap_status st = ap_shard_stage(x->g, x->nodes + x->node_begin[u],
                                  x->node_begin[u + 1] - x->node_begin[u], cf->mesh,
                                  x->prm.cluster, &o, &p);
    x->solve_seconds += now_seconds() - t0;
    x->n_solves++;
    *infeasible = false;
    if (st == AUTOPAR_ERR_INFEASIBLE) {
        *infeasible = true;
        if (x->prm.verbose && var == 0)
            fprintf(stderr, "autopar:   unit type %d (e.g. layer %d) has no sharding on mesh "
                    "%dx%d: %s\n", type, x->unit_layer[u], cf->dp, cf->mp, autopar_last_error());
        autopar_clear_error();
        return AUTOPAR_OK;
    }
    if (st) return st;
    if (plan)
        *plan = p;
    else
        ap_shard_plan_free(p);
    return AUTOPAR_OK;
}

/* Figures of a unit plan p of `type`'s representative. */
static void extract_fig(const ap_cost_ctx *x, int type, const ap_shard_plan *p, unit_fig *f) {
    const autopar_graph *g = x->g;
    int u = x->type_rep[type];
    for (int i = x->node_begin[u]; i < x->node_begin[u + 1]; i++) {
        int id = x->nodes[i];
        const ap_node *v = g->nodes[id];
        const ap_shard_node *pn = &p->node[id];
        double own = pn->comm + pn->penalty;
        if (v->phase == AUTOPAR_PHASE_APPLY) {
            f->apply += pn->compute + own;
        } else if (x->is_param_grad[id]) {
            /* The gradient's own all-reduce (finishing the sum over the data-parallel axis)
             * runs once per step on the accumulated gradient; a reduce-scatter (ZeRO) runs per
             * micro-batch, as the runtime does it, so that the accumulator holds only this
             * device's shard. */
            double per_mb = 0.0;
            for (int k = 0; k < p->n_coll; k++)
                if (p->coll[k].node == id && p->coll[k].operand < 0 &&
                    p->coll[k].kind != AP_COLL_ALL_REDUCE)
                    per_mb += p->coll[k].time;
            if (per_mb > own) per_mb = own;
            f->bwd += pn->compute + per_mb;
            f->bwd_compute += pn->compute;
            f->sync += own - per_mb;
        } else if (v->phase == AUTOPAR_PHASE_FORWARD) {
            f->fwd += pn->compute + own;
            f->fwd_compute += pn->compute;
        } else {
            f->bwd += pn->compute + own;
            f->bwd_compute += pn->compute;
        }
        /* Memory of what the stage keeps. */
        if (v->kind == AUTOPAR_KIND_PARAM)
            f->params += pn->memory;
        else if (v->kind == AUTOPAR_KIND_OPT_STATE)
            f->opt_state += pn->memory;
        else if (x->is_param_grad[id])
            f->grads += pn->memory;
        else if (v->phase == AUTOPAR_PHASE_FORWARD && x->held[id] &&
                 (v->n_src > 0 || v->kind == AUTOPAR_KIND_INPUT))
            f->act += pn->memory;
    }
    /* Resharding of operands, attributed by where it happens and what it moves. */
    for (int i = 0; i < p->n_coll; i++) {
        const ap_shard_coll *cl = &p->coll[i];
        if (cl->operand < 0 || cl->node < 0 || cl->node >= x->n) continue;
        const ap_node *v = g->nodes[cl->node];
        if (v->phase == AUTOPAR_PHASE_APPLY)
            f->apply += cl->time;
        else if (cl->tensor >= 0 && cl->tensor < x->n && x->is_param_grad[cl->tensor])
            f->sync += cl->time;
        else if (v->phase == AUTOPAR_PHASE_FORWARD)
            f->fwd += cl->time;
        else
            f->bwd += cl->time;
    }
    double kept = f->params + f->opt_state + f->grads + f->act;
    f->transient = p->peak_memory > kept ? p->peak_memory - kept : 0.0;
}

/* Boundary specs of every unit of `type` from the representative's plan p (slot dst), or
 * copied from slot src when p is NULL. */
static void store_specs(ap_cost_ctx *x, int type, const ap_shard_plan *p, size_t src,
                        size_t dst) {
    int u = x->type_rep[type];
    size_t ne = (size_t)x->n_edges;
    for (int w = 0; w < x->n_units; w++) {
        if (x->unit_type[w] != type) continue;
        for (int k = x->out_begin[w]; k < x->out_begin[w + 1]; k++) {
            int e = x->out_idx[k];
            int rep_id = x->nodes[x->node_begin[u] + x->edges[e].from_pos];
            x->prod[dst * ne + (size_t)e] = p ? p->node[rep_id].spec : x->prod[src * ne + (size_t)e];
        }
        for (int k = x->in_begin[w]; k < x->in_begin[w + 1]; k++) {
            int e = x->in_idx[k];
            int rep_id = x->ext[x->ext_begin[u] + x->edges[e].to_ext];
            x->arr[dst * ne + (size_t)e] = p ? p->node[rep_id].spec : x->arr[src * ne + (size_t)e];
        }
    }
}

/* Solves the memory-variant ladder of `type` on configuration c. */
static ap_status solve_fig(ap_cost_ctx *x, int type, int c) {
    if (fig_at(x, type, c, 0)->state != 0) return AUTOPAR_OK;
    double budget = -1.0, prev_peak = INFINITY;
    int last = -1;
    for (int v = 0; v < x->n_var; v++) {
        ap_shard_plan *p = NULL;
        bool infeasible;
        ap_status st = solve_rep(x, type, c, v, budget, &p, &infeasible);
        if (st) return st;
        if (infeasible) {
            /* No sharding without replicated parameters (e.g. a forced batch axis that may not
             * gather): the budget ladder continues from variant 0. */
            if (v == 1 && last == 0 && x->n_var > 2) {
                *fig_at(x, type, c, 1) = *fig_at(x, type, c, 0);
                store_specs(x, type, NULL, slot_of(x, c, 0), slot_of(x, c, 1));
                last = 1;
                continue;
            }
            break;
        }
        /* A variant that saves nothing ends the ladder. */
        if (v >= 1 && !(p->peak_memory < prev_peak)) {
            ap_shard_plan_free(p);
            break;
        }
        unit_fig *f = fig_at(x, type, c, v);
        memset(f, 0, sizeof *f);
        extract_fig(x, type, p, f);
        f->variant = v;
        f->budget = budget;
        f->state = 1;
        store_specs(x, type, p, 0, slot_of(x, c, v));
        last = v;
        /* Variants 2.. must at least halve the peak; a unit already at its floor ends the
         * ladder (the next solve is infeasible). */
        prev_peak = p->peak_memory;
        budget = v >= 1 ? 0.5 * p->peak_memory : -1.0;
        ap_shard_plan_free(p);
        if (v >= 1 && !(budget > 0)) break;
    }
    if (last < 0) {
        for (int v = 0; v < x->n_var; v++) {
            unit_fig *f = fig_at(x, type, c, v);
            memset(f, 0, sizeof *f);
            f->state = -1;
        }
        return AUTOPAR_OK;
    }
    for (int v = last + 1; v < x->n_var; v++) {
        *fig_at(x, type, c, v) = *fig_at(x, type, c, last);
        store_specs(x, type, NULL, slot_of(x, c, last), slot_of(x, c, v));
    }
    for (int w = 0; w < x->n_units; w++)
        if (x->unit_type[w] == type && w != x->type_rep[type]) x->n_reused++;
    return AUTOPAR_OK;
}

AP_INTERNAL ap_status ap_cost_solve_all(ap_cost_ctx *x) {
    if (!x) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_solve_all: NULL context");
    for (int c = 0; c < x->n_cfg; c++) {
        double t0 = now_seconds();
        int before = x->n_solves;
        for (int t = 0; t < x->n_types; t++) {
            ap_status st = solve_fig(x, t, c);
            if (st) return st;
        }
        if (x->prm.verbose) {
            const ap_mesh_cfg *cf = &x->cfg[c];
            fprintf(stderr, "autopar:   [%d/%d] submesh (%d, %d) mesh %dx%d%s: %d unit types, %d "
                    "solves, %.3f s\n", c + 1, x->n_cfg, x->sub[cf->submesh].n_hosts,
                    x->sub[cf->submesh].devices_per_host, cf->dp, cf->mp,
                    cf->force_batch_axis == 0 ? " (batch on axis 0)" : "", x->n_types,
                    x->n_solves - before, now_seconds() - t0);
        }
    }
    return AUTOPAR_OK;
}

AP_INTERNAL int ap_cost_n_variants(const ap_cost_ctx *x) { return x ? x->n_var : 0; }

/* ------------------------------------------------------------------------------------------ */
/* Composition                                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Cost of resharding edge e from the producer's spec to the consumer's on configuration c
 * (both units solved). INFINITY when not realisable. */
static double edge_cost(ap_cost_ctx *x, int e, int c, int var) {
    size_t k = slot_of(x, c, var) * (size_t)x->n_edges + (size_t)e;
    if (!isnan(x->ecost[k])) return x->ecost[k];
    const ap_node *v = x->g->nodes[x->edges[e].tensor];
    ap_reshard r;
    ap_status st = ap_reshard_cost(x->cfg[c].mesh, &x->prod[k], &x->arr[k], &v->shape,
                                   x->edges[e].bytes, &r);
    if (st) autopar_clear_error();
    x->ecost[k] = st ? INFINITY : r.time;
    return x->ecost[k];
}

/* Time to send `bytes` from a stage on submesh s to a neighbouring stage (stage_cost.h). */
static double send_time(const ap_cost_ctx *x, ap_submesh_shape s, double bytes) {
    const autopar_cluster *c = x->prm.cluster;
    if (c->hosts > 1) {
        double share = (double)s.n_hosts * (double)s.devices_per_host / (double)c->devices_per_host;
        return c->inter_host.latency + bytes / (c->inter_host.bandwidth * share);
    }
    return c->intra_host.latency + bytes / (c->intra_host.bandwidth * (double)s.devices_per_host);
}

/* Bytes per device of edge e's tensor as it arrives in its consumer's spec on configuration c. */
static double arrival_bytes(const ap_cost_ctx *x, int e, int c, int var) {
    const ap_node *v = x->g->nodes[x->edges[e].tensor];
    double b;
    if (ap_spec_device_bytes(x->cfg[c].mesh,
                             &x->arr[slot_of(x, c, var) * (size_t)x->n_edges + (size_t)e],
                             &v->shape, ap_dtype_size(v->dtype), &b)) {
        autopar_clear_error();
        return x->edges[e].bytes;
    }
    return b;
}

AP_INTERNAL int ap_cost_max_n_succ(const ap_cost_ctx *x, double fixed, double per_mb,
                                   double budget) {
    if (budget < 0) return AP_STAGE_NO_MEM_LIMIT;
    double B = (double)x->prm.n_micro_batches;
    if (fixed + B * per_mb <= budget) return AP_STAGE_NO_MEM_LIMIT;
    if (x->prm.schedule == AUTOPAR_SCHEDULE_GPIPE) return -1;
    if (fixed + per_mb > budget) return -1;
    double k = floor((budget - fixed) / per_mb);   /* micro-batches that fit, 1 <= k < B */
    if (k > (double)INT_MAX) return AP_STAGE_NO_MEM_LIMIT;
    return (int)k - 1;
}

AP_INTERNAL ap_status ap_cost_range(ap_cost_ctx *x, int first, int last, int c, int var,
                                    ap_stage_cost *out, bool *feasible) {
    if (!x || !out || !feasible)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_range: NULL argument");
    *feasible = false;
    memset(out, 0, sizeof *out);
    if (first < 0 || last < first || last >= x->n_layers || c < 0 || c >= x->n_cfg || var < 0 ||
        var >= x->n_var)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_range: layers %d..%d, configuration %d, "
                        "variant %d out of range", first, last, c, var);
    int u0 = x->layer_unit[first], u1 = x->layer_unit[last + 1];
    ap_status st;
    double transient = 0;
    for (int u = u0; u < u1; u++) {
        int t = x->unit_type[u];
        if ((st = solve_fig(x, t, c))) return st;
        const unit_fig *f = fig_at(x, t, c, var);
        if (f->state < 0) return AUTOPAR_OK;
        out->forward += f->fwd;
        out->backward += f->bwd;
        out->forward_compute += f->fwd_compute;
        out->backward_compute += f->bwd_compute;
        out->grad_sync += f->sync;
        out->apply += f->apply;
        out->params += f->params;
        out->opt_state += f->opt_state;
        out->grads += f->grads;
        out->activations += f->act;
        if (f->transient > transient) transient = f->transient;
    }
    out->transient = transient;
    ap_submesh_shape sm = x->sub[x->cfg[c].submesh];
    /* Tensors out of the units: resharding inside the stage, or sends to other stages (one
     * send per tensor and direction). */
    if (++x->stamp == INT_MAX) {
        memset(x->stamp_up, 0, sizeof(int) * (size_t)x->n);
        memset(x->stamp_down, 0, sizeof(int) * (size_t)x->n);
        x->stamp = 1;
    }
    for (int u = u0; u < u1; u++) {
        for (int k = x->out_begin[u]; k < x->out_begin[u + 1]; k++) {
            int e = x->out_idx[k];
            const cost_edge *ed = &x->edges[e];
            if (ed->to >= u0 && ed->to < u1) {
                double t = edge_cost(x, e, c, var);
                if (!isfinite(t)) return AUTOPAR_OK;
                if (ed->per_step)
                    out->grad_sync += t;
                else if (ed->forward)
                    out->forward += t;
                else
                    out->backward += t;
                continue;
            }
            int *stamp = ed->to >= u1 ? x->stamp_up : x->stamp_down;
            if (stamp[ed->tensor] == x->stamp) continue;
            stamp[ed->tensor] = x->stamp;
            double t = send_time(x, sm, ed->bytes);
            if (ed->per_step) {
                out->step_send += t;
            } else {
                out->send += t;
                if (ed->to >= u1)
                    out->send_activation += t;
                else
                    out->send_gradient += t;
            }
        }
        /* Tensors received from other stages and kept. */
        for (int k = x->in_begin[u]; k < x->in_begin[u + 1]; k++) {
            int e = x->in_idx[k];
            const cost_edge *ed = &x->edges[e];
            if (ed->from >= u0 && ed->from < u1) continue;
            if (ed->per_step) {
                /* A parameter copy needs a gradient buffer too; a gradient contribution is
                 * an accumulator. */
                const ap_node *v = x->g->nodes[ed->tensor];
                double b = arrival_bytes(x, e, c, var);
                out->step_recv += v->kind == AUTOPAR_KIND_PARAM ? 2 * b : b;
            } else if (ed->forward && ed->held) {
                out->activations += arrival_bytes(x, e, c, var);
            }
        }
    }
    double B = (double)x->prm.n_micro_batches;
    out->stage_time = out->forward + out->backward + out->send +
                      (out->grad_sync + out->apply + out->step_send) / B;
    out->max_n_succ = ap_cost_max_n_succ(x, ap_stage_cost_fixed_memory(out), out->activations,
                                         x->prm.budget);
    *feasible = isfinite(out->stage_time);
    return AUTOPAR_OK;
}

/* True when variant var of configuration c is variant var - 1 for every unit of layers i..j
 * (the ladders of their types all ended before var). */
static bool same_variant(const ap_cost_ctx *x, int i, int j, int c, int var) {
    for (int u = x->layer_unit[i]; u < x->layer_unit[j + 1]; u++) {
        const unit_fig *a = fig_at(x, x->unit_type[u], c, var);
        const unit_fig *b = fig_at(x, x->unit_type[u], c, var - 1);
        if (a->state != b->state || a->variant != b->variant) return false;
    }
    return true;
}

AP_INTERNAL ap_status ap_cost_fill_table(ap_cost_ctx *x, ap_stage_table *t, double *fixed,
                                         double *per_mb) {
    if (!x || !t) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_fill_table: NULL argument");
    if (t->n_layers != x->n_layers || t->n_submeshes != x->n_sub)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_fill_table: table is %d layers x %d "
                        "submeshes, the context has %d x %d", t->n_layers, t->n_submeshes,
                        x->n_layers, x->n_sub);
    for (int m = 0; m < x->n_sub; m++)
        if (x->sub_ncfg[m] * x->n_var > t->n_configs)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_fill_table: submesh %d has %d "
                            "configurations x %d variants, the table %d", m, x->sub_ncfg[m],
                            x->n_var, t->n_configs);
    size_t total = (size_t)t->n_layers * (size_t)t->n_layers * (size_t)t->n_submeshes *
                   (size_t)t->n_configs;
    for (size_t k = 0; k < total; k++) {
        t->time[k] = INFINITY;
        t->max_n_succ[k] = -1;
        if (fixed) fixed[k] = NAN;
        if (per_mb) per_mb[k] = NAN;
    }
    for (int i = 0; i < x->n_layers; i++)
        for (int j = i; j < x->n_layers; j++)
            for (int m = 0; m < x->n_sub; m++)
                for (int k = 0; k < x->sub_ncfg[m] * x->n_var; k++) {
                    ap_stage_cost sc;
                    bool ok;
                    int var = k % x->n_var;
                    /* A variant equal to the previous one for every unit adds nothing. */
                    if (var > 0 && same_variant(x, i, j, x->sub_cfg[m][k / x->n_var], var))
                        continue;
                    ap_status st = ap_cost_range(x, i, j, x->sub_cfg[m][k / x->n_var], var, &sc,
                                                 &ok);
                    if (st) return st;
                    if (!ok) continue;
                    size_t idx = ap_stage_table_index(t, i, j, m, k);
                    t->time[idx] = sc.stage_time;
                    t->max_n_succ[idx] = sc.max_n_succ;
                    if (fixed) fixed[idx] = ap_stage_cost_fixed_memory(&sc);
                    if (per_mb) per_mb[idx] = sc.activations;
                }
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Stage plans                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static ap_status coll_push(ap_shard_plan *p, int *cap, const ap_shard_coll *c) {
    if (p->n_coll == *cap) {
        int nc = *cap ? 2 * *cap : 64;
        ap_shard_coll *n = realloc(p->coll, sizeof *n * (size_t)nc);
        if (!n) return nomem();
        p->coll = n;
        *cap = nc;
    }
    p->coll[p->n_coll++] = *c;
    return AUTOPAR_OK;
}

static ap_status route_push(ap_shard_plan *p, int *cap, const ap_reshard *r, int node, int k,
                            int tensor) {
    for (int s = 0; s < r->n_steps; s++) {
        ap_shard_coll c = {.kind = r->step[s].kind, .axis = r->step[s].axis,
                           .bytes = r->step[s].bytes, .time = r->step[s].time, .node = node,
                           .operand = k, .tensor = tensor, .from = r->step[s].from,
                           .to = r->step[s].to};
        ap_status st = coll_push(p, cap, &c);
        if (st) return st;
    }
    return AUTOPAR_OK;
}

AP_INTERNAL ap_status ap_cost_stage_plan(ap_cost_ctx *x, int first, int last, int c, int var,
                                         double memory, ap_shard_plan **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cost_stage_plan: out is NULL");
    *out = NULL;
    ap_stage_cost sc;
    bool ok;
    ap_status st = ap_cost_range(x, first, last, c, var, &sc, &ok);
    if (st) return st;
    if (!ok)
        return ap_error(AUTOPAR_ERR_INFEASIBLE, "stage of layers %d..%d has no realisable "
                        "sharding on mesh %dx%d", first, last, x->cfg[c].dp, x->cfg[c].mp);
    const autopar_graph *g = x->g;
    const ap_mesh_cfg *cf = &x->cfg[c];
    int u0 = x->layer_unit[first], u1 = x->layer_unit[last + 1];
    size_t n = (size_t)x->n;
    ap_shard_plan **rep = calloc((size_t)x->n_types, sizeof *rep);
    int *map = malloc(sizeof(int) * n);
    int *cfirst = malloc(sizeof(int) * n), *ccount = calloc(n, sizeof(int));
    ap_shard_coll *mc = NULL;   /* mapped collectives of every unit, grouped by node */
    int n_mc = 0, cap_mc = 0, cap = 0;
    ap_shard_plan *sp = calloc(1, sizeof *sp);
    if (sp) sp->node = calloc(n, sizeof *sp->node);
    if (!rep || !map || !cfirst || !ccount || !sp || !sp->node) {
        st = nomem();
        goto done;
    }
    sp->n_nodes = x->n;
    sp->mesh_shape[0] = cf->dp;
    sp->mesh_shape[1] = cf->mp;
    sp->peak_node = -1;
    sp->peak_memory = memory;
    sp->memory_budget = x->prm.budget;
    sp->optimal = true;
    for (size_t i = 0; i < n; i++) {
        sp->node[i].group = -1;
        map[i] = -1;
        cfirst[i] = -1;
    }
    int n_types_used = 0;
    for (int u = u0; u < u1 && !st; u++) {
        int t = x->unit_type[u], r = x->type_rep[t];
        if (!rep[t]) {
            bool infeasible;
            /* The solve is deterministic: the same budget gives the variant's plan again. */
            if ((st = solve_rep(x, t, c, fig_at(x, t, c, var)->variant,
                                fig_at(x, t, c, var)->budget, &rep[t], &infeasible)))
                break;
            if (infeasible || !rep[t]) {
                st = ap_error(AUTOPAR_ERR_INFEASIBLE, "layer %d has no realisable sharding on "
                              "mesh %dx%d", x->unit_layer[u], cf->dp, cf->mp);
                break;
            }
            n_types_used++;
            const ap_shard_plan *p = rep[t];
            sp->optimal = sp->optimal && p->optimal;
            if (p->n_groups > sp->n_groups) {
                sp->n_groups = p->n_groups;
                sp->n_cols = p->n_cols;
                sp->n_int_cols = p->n_int_cols;
                sp->n_rows = p->n_rows;
                sp->n_nonzeros = p->n_nonzeros;
            }
            sp->n_solves += p->n_solves;
            sp->build_seconds += p->build_seconds;
            sp->solve_seconds += p->solve_seconds;
        }
        const ap_shard_plan *p = rep[t];
        /* map: representative's ids -> this unit's ids */
        int nn = x->node_begin[u + 1] - x->node_begin[u];
        int ne = x->ext_begin[u + 1] - x->ext_begin[u];
        for (int k = 0; k < nn; k++) map[x->nodes[x->node_begin[r] + k]] = x->nodes[x->node_begin[u] + k];
        for (int k = 0; k < ne; k++) map[x->ext[x->ext_begin[r] + k]] = x->ext[x->ext_begin[u] + k];
        for (int k = 0; k < nn; k++) {
            int rid = x->nodes[x->node_begin[r] + k], id = x->nodes[x->node_begin[u] + k];
            ap_shard_node *d = &sp->node[id];
            *d = p->node[rid];
            d->in_stage = true;
            d->external = false;
            d->group = p->node[rid].group >= 0 && map[p->node[rid].group] >= 0
                           ? map[p->node[rid].group] : id;
        }
        for (int k = 0; k < ne; k++) {
            int rid = x->ext[x->ext_begin[r] + k], id = x->ext[x->ext_begin[u] + k];
            if (x->unit_of[id] >= u0 && x->unit_of[id] < u1) continue;   /* inside the stage */
            ap_shard_node *d = &sp->node[id];
            if (d->external) continue;   /* first reader decides the arrival spec */
            *d = p->node[rid];
            d->in_stage = false;
            d->external = true;
            d->group = p->node[rid].group >= 0 && map[p->node[rid].group] >= 0
                           ? map[p->node[rid].group] : id;
        }
        /* Mapped collectives, grouped by node (a unit plan lists them in node order). */
        for (int i = 0; i < p->n_coll; i++) {
            ap_shard_coll cl = p->coll[i];
            if (cl.node < 0 || map[cl.node] < 0) continue;
            cl.node = map[cl.node];
            cl.tensor = cl.tensor >= 0 && map[cl.tensor] >= 0 ? map[cl.tensor] : cl.tensor;
            if (n_mc == cap_mc) {
                int ncap = cap_mc ? 2 * cap_mc : 256;
                ap_shard_coll *nm = realloc(mc, sizeof *nm * (size_t)ncap);
                if (!nm) {
                    st = nomem();
                    break;
                }
                mc = nm;
                cap_mc = ncap;
            }
            if (cfirst[cl.node] < 0) cfirst[cl.node] = n_mc;
            ccount[cl.node]++;
            mc[n_mc++] = cl;
        }
        for (int k = 0; k < nn; k++) map[x->nodes[x->node_begin[r] + k]] = -1;
        for (int k = 0; k < ne; k++) map[x->ext[x->ext_begin[r] + k]] = -1;
    }
    /* Collectives in node order: per operand the unit plan's route, or a direct route from the
     * producer's spec when the operand comes from another unit of the stage; then the node's
     * own collectives. */
    {
        for (int id = 0; id < x->n && !st; id++) {
            if (!sp->node[id].in_stage) continue;
            const ap_node *v = g->nodes[id];
            int cu = x->unit_of[id];
            for (int k = 0; k < v->n_src && !st; k++) {
                int s = v->src[k], su = x->unit_of[s];
                bool cross = su != cu && su >= u0 && su < u1;
                if (!cross) {
                    for (int i = 0; i < ccount[id] && !st; i++)
                        if (mc[cfirst[id] + i].operand == k) st = coll_push(sp, &cap, &mc[cfirst[id] + i]);
                    continue;
                }
                double old = 0;
                for (int i = 0; i < ccount[id]; i++)
                    if (mc[cfirst[id] + i].operand == k) old += mc[cfirst[id] + i].time;
                ap_reshard r;
                const ap_node *sv = g->nodes[s];
                if (ap_reshard_cost(cf->mesh, &sp->node[s].spec, &sp->node[id].in[k], &sv->shape,
                                    node_bytes(sv), &r) == AUTOPAR_OK) {
                    st = route_push(sp, &cap, &r, id, k, s);
                    sp->node[id].reshard += r.time - old;
                    continue;
                }
                autopar_clear_error();
                /* Two hops: to the spec the consumer's unit expected, then its own route. */
                ap_spec arrive = sp->node[s].spec;
                for (int q = x->in_begin[cu]; q < x->in_begin[cu + 1]; q++)
                    if (x->edges[x->in_idx[q]].tensor == s)
                        arrive = x->arr[slot_of(x, c, var) * (size_t)x->n_edges +
                                        (size_t)x->in_idx[q]];
                st = ap_reshard_cost(cf->mesh, &sp->node[s].spec, &arrive, &sv->shape,
                                     node_bytes(sv), &r);
                if (st) {
                    char a[AP_SPEC_STR_MAX], b[AP_SPEC_STR_MAX];
                    st = ap_error(AUTOPAR_ERR_INFEASIBLE, "stage plan: '%s' cannot be resharded "
                                  "from %s to %s for '%s'", sv->name,
                                  ap_spec_str(&sp->node[s].spec, a, sizeof a),
                                  ap_spec_str(&arrive, b, sizeof b), v->name);
                    break;
                }
                st = route_push(sp, &cap, &r, id, k, s);
                sp->node[id].reshard += r.time;
                for (int i = 0; i < ccount[id] && !st; i++)
                    if (mc[cfirst[id] + i].operand == k) st = coll_push(sp, &cap, &mc[cfirst[id] + i]);
            }
            for (int i = 0; i < ccount[id] && !st; i++)
                if (mc[cfirst[id] + i].operand < 0) st = coll_push(sp, &cap, &mc[cfirst[id] + i]);
        }
    }
    if (!st) {
        for (int id = 0; id < x->n; id++) {
            const ap_shard_node *d = &sp->node[id];
            if (!d->in_stage) continue;
            sp->compute_cost += d->compute;
            sp->comm_cost += d->comm;
            sp->reshard_cost += d->reshard;
            sp->penalty_cost += d->penalty;
        }
        sp->objective = sp->compute_cost + sp->comm_cost + sp->reshard_cost + sp->penalty_cost;
        sp->n_layers_reused = (u1 - u0) - n_types_used;
    }
done:
    if (rep)
        for (int t = 0; t < x->n_types; t++) ap_shard_plan_free(rep[t]);
    free(rep);
    free(map);
    free(cfirst);
    free(ccount);
    free(mc);
    if (st) {
        ap_shard_plan_free(sp);
        return st;
    }
    *out = sp;
    return AUTOPAR_OK;
}

AP_INTERNAL ap_status ap_cost_transfers(const ap_cost_ctx *x, const int *stage_of_layer,
                                        ap_plan_transfer **out, int *n) {
    *out = NULL;
    *n = 0;
    int cnt = 0;
    ap_plan_transfer *tr = malloc(sizeof *tr * (size_t)(x->n_edges > 0 ? x->n_edges : 1));
    if (!tr) return nomem();
    for (int e = 0; e < x->n_edges; e++) {
        const cost_edge *ed = &x->edges[e];
        int fs = stage_of_layer[x->unit_layer[ed->from]], ts = stage_of_layer[x->unit_layer[ed->to]];
        if (fs == ts) continue;
        bool dup = false;
        for (int k = 0; k < cnt && !dup; k++)
            dup = tr[k].tensor == ed->tensor && tr[k].to_stage == ts;
        if (dup) continue;
        tr[cnt++] = (ap_plan_transfer){.tensor = ed->tensor, .from_stage = fs, .to_stage = ts,
                                       .per_step = ed->per_step, .bytes = ed->bytes};
    }
    if (cnt == 0) {
        free(tr);
        return AUTOPAR_OK;
    }
    *out = tr;
    *n = cnt;
    return AUTOPAR_OK;
}

AP_INTERNAL void ap_cost_stats(const ap_cost_ctx *x, int *n_units, int *n_types, int *n_solves,
                               int *n_reused, double *solve_seconds) {
    if (n_units) *n_units = x ? x->n_units : 0;
    if (n_types) *n_types = x ? x->n_types : 0;
    if (n_solves) *n_solves = x ? x->n_solves : 0;
    if (n_reused) *n_reused = x ? x->n_reused : 0;
    if (solve_seconds) *solve_seconds = x ? x->solve_seconds : 0;
}
