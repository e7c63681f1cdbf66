/*
 * Layer reuse for the sharding pass (DESIGN.md §5: "solve per distinct layer and compose").
 *
 * 1. The stage's nodes are grouped by layer (opt->layer_of or node->layer). Each layer gets a
 *    structural signature: per node in id order its op, dtype, kind, phase, shape, attributes,
 *    and each operand as a reference: a position in the same layer, or (layer offset, op,
 *    shape) in another layer, inside the stage or not. Names do not count. Two layers with equal signatures have the same node sequence (so node p of one
 *    plays the role of node p of the other) and the same strategy lists. A strict signature
 *    also names the positions of references into other layers; it keys the cache.
 * 2. Runs: maximal sequences of consecutive layers with equal signatures (length >= 2).
 * 3. Per run, one "periodic" layer (the middle one) is solved alone: its operands in
 *    neighbouring layers of the same run are replaced by its own tensors at the same positions
 *    (a stationary plan: layer l+1 uses layer l's strategy, so the resharding between them is
 *    the resharding between the layer's output and its own input), other operands are free
 *    external leaves. Memory: one row, run length x (parameters + optimizer state + tensors
 *    kept for the backward pass of the layer) <= budget - a lower bound of the rest of the
 *    stage. The result is cached by signature + mesh + cluster + options (ap_shard_cache), so
 *    identical layers, in this stage or in the inter-op pass's next query, are solved once.
 * 4. The whole stage is then solved once more with every layer of every run fixed to its
 *    periodic solution: only the other layers (embeddings, head, loss, layers next to a run)
 *    have variables, and the memory rows of the whole stage's liveness check the composition
 *    exactly. If that is infeasible, the stage is solved flat (exact, with the smallest budget
 *    in the error).
 */
#include "shard_internal.h"

#include <stdlib.h>
#include <string.h>

/* Defined in shard_plan.c. */
AP_INTERNAL ap_status ap_shard_stage_flat(const autopar_graph *g, const int *nodes, int n_nodes,
                                          const ap_mesh *mesh, const autopar_cluster *cluster,
                                          const ap_shard_options *opt, ap_shard_plan **out);

/* ------------------------------------------------------------------------------------------ */
/* Cache                                                                                       */
/* ------------------------------------------------------------------------------------------ */

typedef struct cache_entry {
    uint64_t key;
    int      n_nodes;      /* of the layer                                                    */
    int     *fixed;        /* per layer position: strategy of the group it roots, or -1       */
    int     *size;         /* per layer position: that group's strategy count                 */
    bool     least;        /* the layer could not meet its memory share: least-memory plan   */
    double   held;         /* run length x the layer's held bytes under that plan             */
} cache_entry;

struct ap_shard_cache {
    cache_entry *e;
    int          n, cap;
    int          hits;
};

AP_INTERNAL ap_status ap_shard_cache_new(ap_shard_cache **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_shard_cache_new: out is NULL");
    *out = calloc(1, sizeof **out);
    return *out ? AUTOPAR_OK : ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
}

AP_INTERNAL void ap_shard_cache_free(ap_shard_cache *c) {
    if (!c) return;
    for (int i = 0; i < c->n; i++) {
        free(c->e[i].fixed);
        free(c->e[i].size);
    }
    free(c->e);
    free(c);
}

AP_INTERNAL void ap_shard_cache_stats(const ap_shard_cache *c, int *entries, int *hits) {
    if (entries) *entries = c ? c->n : 0;
    if (hits) *hits = c ? c->hits : 0;
}

static const cache_entry *cache_find(ap_shard_cache *c, uint64_t key, int n_nodes) {
    for (int i = 0; c && i < c->n; i++)
        if (c->e[i].key == key && c->e[i].n_nodes == n_nodes) return &c->e[i];
    return NULL;
}

/* Stores a copy; failure to store is not an error (the cache is an optimisation). */
static void cache_put(ap_shard_cache *c, uint64_t key, int n_nodes, const int *fixed,
                      const int *size, bool least, double held) {
    if (!c) return;
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 16;
        cache_entry *ne = realloc(c->e, (size_t)cap * sizeof *ne);
        if (!ne) return;
        c->e = ne;
        c->cap = cap;
    }
    cache_entry *e = &c->e[c->n];
    e->fixed = malloc(sizeof(int) * (size_t)(n_nodes + 1));
    e->size = malloc(sizeof(int) * (size_t)(n_nodes + 1));
    if (!e->fixed || !e->size) {
        free(e->fixed);
        free(e->size);
        return;
    }
    memcpy(e->fixed, fixed, sizeof(int) * (size_t)n_nodes);
    memcpy(e->size, size, sizeof(int) * (size_t)n_nodes);
    e->key = key;
    e->n_nodes = n_nodes;
    e->least = least;
    e->held = held;
    c->n++;
}

/* ------------------------------------------------------------------------------------------ */
/* Signatures                                                                                  */
/* ------------------------------------------------------------------------------------------ */

typedef struct tokens {
    uint64_t *t;
    int       n, cap;
} tokens;

static bool tok_push(tokens *s, uint64_t v) {
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 256;
        uint64_t *nt = realloc(s->t, (size_t)cap * sizeof *nt);
        if (!nt) return false;
        s->t = nt;
        s->cap = cap;
    }
    s->t[s->n++] = v;
    return true;
}

static uint64_t mix(uint64_t h, uint64_t v) {
    h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    return h * 0xBF58476D1CE4E5B9ull;
}

static uint64_t shape_token(const ap_node *u) {
    uint64_t h = mix((uint64_t)u->op, (uint64_t)u->shape.ndim);
    for (int d = 0; d < u->shape.ndim; d++) h = mix(h, (uint64_t)u->shape.dim[d]);
    return h;
}

typedef struct layer_ctx {
    const autopar_graph *g;
    const int           *layer;      /* per node id                                        */
    const uint8_t       *in_stage;
    const int           *pos;        /* per node id: position in its layer                 */
} layer_ctx;

/* Appends the reference tokens of node u seen from layer l. Strict: a reference into another
 * layer names the position there; relaxed: only the layer offset, op and shape. */
static bool ref_tokens(const layer_ctx *c, tokens *s, int l, int u, bool strict) {
    if (u < 0) return tok_push(s, 0xFFFF);
    const ap_node *un = c->g->nodes[u];
    if (c->in_stage[u] && c->layer[u] == l) return tok_push(s, (1ull << 60) | (uint64_t)c->pos[u]);
    /* Another layer, inside the stage or not (an operand outside the stage is a free leaf of
     * the same shape either way, so strategy lists do not depend on it). */
    uint64_t delta = (uint64_t)(int64_t)(c->layer[u] - l) & 0xFFFFFFull;
    uint64_t where = strict && c->in_stage[u] ? (uint64_t)c->pos[u] : 0xFFFFFFFFull;
    return tok_push(s, (2ull << 60) | (delta << 32) | where) && tok_push(s, shape_token(un));
}

static bool layer_signature(const layer_ctx *c, int l, const int *nodes, int n, tokens *s,
                            bool strict) {
    bool ok = true;
    for (int i = 0; i < n && ok; i++) {
        const ap_node *v = c->g->nodes[nodes[i]];
        ok = tok_push(s, ((uint64_t)v->op << 32) | ((uint64_t)v->dtype << 24) |
                             ((uint64_t)v->kind << 16) | ((uint64_t)v->phase << 8) |
                             (uint64_t)v->shape.ndim);
        for (int d = 0; d < v->shape.ndim && ok; d++) ok = tok_push(s, (uint64_t)v->shape.dim[d]);
        ok = ok && tok_push(s, (uint64_t)v->n_src);
        for (int k = 0; k < v->n_src && ok; k++) ok = ref_tokens(c, s, l, v->src[k], strict);
        for (int k = 0; k < AP_MAX_IATTR && ok; k++) {
            if (v->op == AP_OP_OPT_STATE && k == 0)
                ok = ref_tokens(c, s, l, (int)v->attrs.i[0], strict);
            else
                ok = tok_push(s, (uint64_t)v->attrs.i[k]);
        }
        for (int k = 0; k < AP_MAX_FATTR && ok; k++) {
            uint64_t bits;
            memcpy(&bits, &v->attrs.f[k], sizeof bits);
            ok = tok_push(s, bits);
        }
        ok = ok && ref_tokens(c, s, l, v->assign_to, strict);
    }
    return ok;
}

/* ------------------------------------------------------------------------------------------ */
/* Driver                                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct layer_info {
    int      layer;
    int      first, n;     /* nodes: lnodes[first .. first + n)                              */
    int      sig_first, sig_n;   /* relaxed signature tokens                            */
    uint64_t hash;               /* of the relaxed signature                            */
    uint64_t strict_hash;        /* of the strict signature (positions of references)   */
    int      run;          /* index of its run, -1 when not in a repeated run                 */
} layer_info;

typedef struct run_info {
    int first, len;        /* layer_info indices                                              */
} run_info;

static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static uint64_t options_key(const ap_mesh *mesh, const autopar_cluster *cl,
                            const ap_shard_options *o, double cap) {
    uint64_t h = mix(0x5AFEull, (uint64_t)mesh->shape[0]);
    h = mix(h, (uint64_t)mesh->shape[1]);
    double vals[16] = {mesh->alpha[0], mesh->alpha[1], mesh->alpha[2], mesh->beta[0],
                       mesh->beta[1], mesh->beta[2], cl ? cl->peak_flops_f32 : 0,
                       cl ? cl->peak_flops_f16 : 0, cl ? cl->memory_bandwidth : 0, cap,
                       o->time_limit};
    for (int i = 0; i < 11; i++) {
        uint64_t b;
        memcpy(&b, &vals[i], sizeof b);
        h = mix(h, b);
    }
    h = mix(h, (uint64_t)(o->force_batch_dim_to_mesh_axis + 2));
    h = mix(h, (uint64_t)o->allow_all_gather | (uint64_t)o->allow_mixed_mesh << 1 |
                   (uint64_t)o->prefer_reduce_scatter << 2 | (uint64_t)o->communication_only << 3 |
                   (uint64_t)o->allow_replicated_params << 4 |
                   (uint64_t)o->batch_matmul_always_split_batch << 5 |
                   (uint64_t)o->ilp_presolve << 6 | (uint64_t)o->flop_type << 8);
    return h;
}

/* A stage small enough for the exact flat ILP to be the better judge of infeasibility (about
 * six GPT blocks with their backward and updates). */
static bool n_order_small(const uint8_t *in_stage, int n) {
    int k = 0;
    for (int id = 0; id < n; id++) k += in_stage[id] != 0;
    return k <= 1000;
}

/* Solves the periodic layer `li` of run `r`. Writes fixed/size per layer position; *at_least
 * is set when the layer could not meet its memory share and the cheapest of the plans holding
 * the least was taken instead. */
static ap_status solve_periodic(const autopar_graph *g, const ap_mesh *mesh,
                                const autopar_cluster *cluster, const ap_shard_options *opt,
                                const layer_ctx *c, const layer_info *L, const int *lnodes,
                                const run_info *r, int li, double reserve, const bool *saved,
                                int *fixed, int *size, bool *at_least, double *held,
                                ap_shard_problem **stats) {
    const layer_info *rep = &L[li];
    ap_shard_problem *p;
    ap_status st = ap_shard_problem_alloc(g, mesh, cluster, opt, &p);
    if (st) return st;
    p->periodic_held = calloc((size_t)p->n + 1, sizeof(bool));
    if (!p->periodic_held) {
        ap_shard_problem_free(p);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    int lo = L[r->first].layer, hi = L[r->first + r->len - 1].layer;
    for (int i = 0; i < rep->n; i++) {
        int id = lnodes[rep->first + i];
        p->role[id] = AP_ROLE_STAGE;
        p->pos[id] = i;
        p->order[i] = id;
        const ap_node *v = g->nodes[id];
        p->periodic_held[id] = v->op == AP_OP_PARAM || v->op == AP_OP_OPT_STATE || saved[id];
    }
    p->n_order = rep->n;
    /* operands: wrap references into neighbouring layers of the run, the rest external */
    for (int i = 0; i < rep->n; i++) {
        const ap_node *v = g->nodes[lnodes[rep->first + i]];
        for (int k = 0; k < v->n_src; k++) {
            int u = v->src[k];
            if (p->role[u] == AP_ROLE_STAGE || p->alias[u] >= 0) continue;
            if (c->in_stage[u] && c->layer[u] != rep->layer && c->layer[u] >= lo &&
                c->layer[u] <= hi) {
                p->alias[u] = lnodes[rep->first + c->pos[u]];
            } else {
                p->role[u] = AP_ROLE_EXTERNAL;
            }
        }
    }
    p->periodic_reps = r->len;
    p->periodic_reserve = reserve;
    if ((st = ap_shard_problem_assemble(p))) {
        ap_shard_problem_free(p);
        return st;
    }
    int *choice = malloc(sizeof(int) * (size_t)(p->n_groups + 1));
    if (!choice) {
        ap_shard_problem_free(p);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    st = ap_shard_problem_solve_mode(p, 0, choice, NULL);
    if (st == AUTOPAR_ERR_INFEASIBLE && !p->solve_timed_out && p->budget >= 0) {
        /* The layer cannot get its share: take the cheapest plan among those holding the
         * least (the composed stage then decides whether that fits). */
        double least;
        st = ap_shard_problem_solve_mode(p, 1, choice, &least);
        if (!st) {
            p->budget = least * (1.0 + 1e-9) + 1.0;
            st = ap_shard_problem_solve_mode(p, 0, choice, NULL);
            *at_least = true;
        }
    }
    if (!st) {
        for (int i = 0; i < rep->n; i++) {
            int id = lnodes[rep->first + i];
            bool root = p->follow[id] < 0;
            fixed[i] = root ? choice[p->group[id]] : -1;
            size[i] = root ? p->groups[p->group[id]].n_strat : 0;
        }
        *held = 0;
        for (int i = 0; i < rep->n; i++) {
            int id = lnodes[rep->first + i];
            if (p->periodic_held[id]) *held += p->st[id][choice[p->group[id]]].mem;
        }
        *held *= p->periodic_reps;
    }
    free(choice);
    *stats = p;
    return st;
}

AP_INTERNAL ap_status ap_shard_stage_layers(const autopar_graph *g, const int *nodes, int n_nodes,
                                            const ap_mesh *mesh, const autopar_cluster *cluster,
                                            const ap_shard_options *opt, bool *handled,
                                            ap_shard_plan **out) {
    *handled = false;
    *out = NULL;
    int n = g->n_nodes;
    bool verbose = ap_shard_verbose();
    double t0 = ap_shard_now();
    uint8_t *in_stage = calloc((size_t)n + 1, 1);
    int *layer = malloc(sizeof(int) * (size_t)(n + 1));
    int *pos = malloc(sizeof(int) * (size_t)(n + 1));
    int *lvals = malloc(sizeof(int) * (size_t)(n + 1));
    int *lnodes = malloc(sizeof(int) * (size_t)(n + 1));
    bool *saved = calloc((size_t)n + 1, sizeof(bool));
    layer_info *L = NULL;
    run_info *R = NULL;
    tokens sig = {0};
    int *lfixed = NULL, *lsize = NULL;
    ap_shard_problem *fin = NULL;
    int *choice = NULL;
    double *extra = NULL, *held = NULL, *res = NULL;
    ap_status st = AUTOPAR_OK;
    if (!in_stage || !layer || !pos || !lvals || !lnodes || !saved) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        goto done;
    }
    if (!nodes) {
        memset(in_stage, 1, (size_t)n);
    } else {
        for (int i = 0; i < n_nodes; i++) {
            if (nodes[i] < 0 || nodes[i] >= n) {
                st = ap_error(AUTOPAR_ERR_INVALID_ARG,
                              "sharding: stage node id %d is outside the graph (0..%d)",
                              nodes[i], n - 1);
                goto done;
            }
            in_stage[nodes[i]] = 1;
        }
    }
    int nl = 0, ns = 0;
    for (int id = 0; id < n; id++) {
        layer[id] = opt->layer_of ? opt->layer_of[id] : g->nodes[id]->layer;
        if (in_stage[id]) lvals[ns++] = layer[id];
        const ap_node *v = g->nodes[id];
        if (v->phase == AUTOPAR_PHASE_BACKWARD)
            for (int k = 0; k < v->n_src; k++)
                if (g->nodes[v->src[k]]->phase == AUTOPAR_PHASE_FORWARD) saved[v->src[k]] = true;
    }
    qsort(lvals, (size_t)ns, sizeof(int), cmp_int);
    for (int i = 0; i < ns; i++)
        if (i == 0 || lvals[i] != lvals[i - 1]) lvals[nl++] = lvals[i];
    if (nl < 2) goto done;   /* one layer: nothing to reuse */
    L = calloc((size_t)nl, sizeof *L);
    if (!L) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        goto done;
    }
    /* nodes per layer, in id order (counting sort over the sorted layer values) */
    {
        int w = 0;
        for (int li = 0; li < nl; li++) {
            L[li].layer = lvals[li];
            L[li].run = -1;
        }
        int *cnt = calloc((size_t)nl + 1, sizeof(int));
        if (!cnt) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
            goto done;
        }
        for (int id = 0; id < n; id++) {
            if (!in_stage[id]) continue;
            int li = (int)((int *)bsearch(&layer[id], lvals, (size_t)nl, sizeof(int), cmp_int) - lvals);
            cnt[li]++;
        }
        for (int li = 0; li < nl; li++) {
            L[li].first = w;
            w += cnt[li];
            cnt[li] = 0;
        }
        for (int id = 0; id < n; id++) {
            if (!in_stage[id]) continue;
            int li = (int)((int *)bsearch(&layer[id], lvals, (size_t)nl, sizeof(int), cmp_int) - lvals);
            pos[id] = cnt[li];
            lnodes[L[li].first + cnt[li]++] = id;
        }
        for (int li = 0; li < nl; li++) L[li].n = cnt[li];
        free(cnt);
    }
    layer_ctx c = {g, layer, in_stage, pos};
    for (int li = 0; li < nl; li++) {
        tokens strict = {0};
        if (!layer_signature(&c, L[li].layer, lnodes + L[li].first, L[li].n, &strict, true)) {
            free(strict.t);
            st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
            goto done;
        }
        uint64_t h = 0x4321;
        for (int t = 0; t < strict.n; t++) h = mix(h, strict.t[t]);
        L[li].strict_hash = h;
        free(strict.t);
        L[li].sig_first = sig.n;
        if (!layer_signature(&c, L[li].layer, lnodes + L[li].first, L[li].n, &sig, false)) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
            goto done;
        }
        L[li].sig_n = sig.n - L[li].sig_first;
        h = 0x1234;
        for (int t = 0; t < L[li].sig_n; t++) h = mix(h, sig.t[L[li].sig_first + t]);
        L[li].hash = h;
    }
    /* runs of consecutive identical layers */
    R = calloc((size_t)nl, sizeof *R);
    if (!R) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        goto done;
    }
    int nr = 0, in_runs = 0;
    for (int li = 0; li < nl;) {
        int lj = li + 1;
        while (lj < nl && L[lj].layer == L[lj - 1].layer + 1 && L[lj].hash == L[li].hash &&
               L[lj].sig_n == L[li].sig_n &&
               memcmp(sig.t + L[lj].sig_first, sig.t + L[li].sig_first,
                      sizeof(uint64_t) * (size_t)L[li].sig_n) == 0)
            lj++;
        if (lj - li >= 2) {
            R[nr].first = li;
            R[nr].len = lj - li;
            for (int k = li; k < lj; k++) L[k].run = nr;
            in_runs += lj - li;
            nr++;
        }
        li = lj;
    }
    if (nr == 0) goto done;
    if (verbose)
        fprintf(stderr, "[autopar sharding] %d layers, %d run(s) of identical layers covering %d "
                "layers\n", nl, nr, in_runs);

    /* per-node fixed strategy for the final problem */
    lfixed = malloc(sizeof(int) * (size_t)(n + 1));
    lsize = malloc(sizeof(int) * (size_t)(n + 1));
    if (!lfixed || !lsize) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        goto done;
    }
    int solves = 0, reused = 0;
    int max_groups = 0, max_cols = 0, max_int = 0, max_rows = 0, max_nz = 0;
    double solve_s = 0, build_s = 0;
    bool optimal = true;
    double budget = opt->memory_budget > 0 ? opt->memory_budget
                  : opt->memory_budget == 0 && cluster ? (double)cluster->device_memory : -1.0;
    /* Attempts: when the composed stage exceeds the budget, the periodic layers' share is
     * tightened by the overshoot (at most 3 times), then the stage is reported infeasible
     * with the smallest budget of composed plans (or, for a small stage, solved flat). */
    extra = calloc((size_t)nr + 1, sizeof(double));
    held = calloc((size_t)nr + 1, sizeof(double));
    res = calloc((size_t)nr + 1, sizeof(double));
    if (!extra || !held || !res) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        goto done;
    }
    bool all_least = false;
    for (int attempt = 0;; attempt++) {
        for (int id = 0; id < n; id++) lfixed[id] = lsize[id] = -1;
        all_least = true;
        for (int ri = 0; ri < nr; ri++) {
            const run_info *r = &R[ri];
            int li = r->first + r->len / 2;
            const layer_info *rep = &L[li];
            /* lower bound of what the rest of the stage holds at the peak */
            double reserve = extra[ri];
            for (int id = 0; id < n; id++) {
                if (!in_stage[id]) continue;
                int lr = L[r->first].layer, hr = L[r->first + r->len - 1].layer;
                if (layer[id] >= lr && layer[id] <= hr) continue;
                const ap_node *v = g->nodes[id];
                if (v->op == AP_OP_PARAM || v->op == AP_OP_OPT_STATE || saved[id])
                    reserve += 4.0 * (double)ap_shape_numel(&v->shape) / mesh->n_devices;
            }
            res[ri] = reserve - extra[ri];
            uint64_t key = L[li].strict_hash;
            key = mix(key, options_key(mesh, cluster, opt,
                                       budget >= 0 ? (budget - reserve) / r->len : -1.0));
            /* the wrap pattern: which references land inside the run */
            for (int i = 0; i < rep->n; i++) {
                const ap_node *v = g->nodes[lnodes[rep->first + i]];
                for (int k = 0; k < v->n_src; k++) {
                    int u = v->src[k];
                    bool wrap = in_stage[u] && layer[u] != rep->layer &&
                                layer[u] >= L[r->first].layer &&
                                layer[u] <= L[r->first + r->len - 1].layer;
                    key = mix(key, wrap);
                }
            }
            int *fx = malloc(sizeof(int) * (size_t)(rep->n + 1));
            int *sz = malloc(sizeof(int) * (size_t)(rep->n + 1));
            if (!fx || !sz) {
                free(fx);
                free(sz);
                st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
                goto done;
            }
            const cache_entry *ce = cache_find(opt->cache, key, rep->n);
            bool least = false;
            if (ce) {
                memcpy(fx, ce->fixed, sizeof(int) * (size_t)rep->n);
                memcpy(sz, ce->size, sizeof(int) * (size_t)rep->n);
                least = ce->least;
                held[ri] = ce->held;
                opt->cache->hits++;
                reused += r->len;
            } else {
                ap_shard_problem *pp = NULL;
                double ts = ap_shard_now();
                st = solve_periodic(g, mesh, cluster, opt, &c, L, lnodes, r, li, reserve, saved,
                                    fx, sz, &least, &held[ri], &pp);
                if (pp) {
                    int free_groups = 0;
                    for (int gi = 0; gi < pp->n_groups; gi++)
                        if (pp->groups[gi].fixed < 0) free_groups++;
                    if (pp->n_cols > max_cols) {
                        max_groups = free_groups;
                        max_cols = pp->n_cols;
                        max_int = pp->n_int_cols;
                        max_rows = pp->n_lp_rows;
                        max_nz = pp->n_nonzeros;
                    }
                    build_s += pp->build_seconds;
                    solve_s += pp->solve_seconds;
                    optimal = optimal && pp->optimal;
                    ap_shard_problem_free(pp);
                }
                if (st) {
                    free(fx);
                    free(sz);
                    if (st == AUTOPAR_ERR_INFEASIBLE || st == AUTOPAR_ERR_GRAPH) {
                        if (verbose)
                            fprintf(stderr, "[autopar sharding] periodic layer %d: %s; solving "
                                    "flat\n", rep->layer, autopar_last_error());
                        st = AUTOPAR_OK;
                    }
                    goto done;
                }
                solves++;
                reused += r->len - 1;
                cache_put(opt->cache, key, rep->n, fx, sz, least, held[ri]);
                if (verbose)
                    fprintf(stderr, "[autopar sharding] periodic layer %d (%d nodes, run of %d): "
                            "%.3f s%s\n", rep->layer, rep->n, r->len, ap_shard_now() - ts,
                            least ? " (least memory)" : "");
            }
            all_least = all_least && least;
            /* Every layer of the run takes the periodic solution, the end layers too (leaving
             * them to the final ILP was measured: no gain on whole models, 4x the solve time
             * on 2-D meshes; docs/intra-op.md). */
            for (int k = r->first; k < r->first + r->len; k++)
                for (int i = 0; i < L[k].n; i++) {
                    int id = lnodes[L[k].first + i];
                    lfixed[id] = fx[i];
                    lsize[id] = sz[i];
                }
            free(fx);
            free(sz);
        }

        /* the whole stage with the runs fixed */
        ap_shard_problem_free(fin);
        fin = NULL;
        st = ap_shard_problem_alloc(g, mesh, cluster, opt, &fin);
        if (st) goto done;
        fin->fixed_by_root = malloc(sizeof(int) * (size_t)(n + 1));
        fin->fixed_size_by_root = malloc(sizeof(int) * (size_t)(n + 1));
        if (!fin->fixed_by_root || !fin->fixed_size_by_root) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
            goto done;
        }
        memcpy(fin->fixed_by_root, lfixed, sizeof(int) * (size_t)n);
        memcpy(fin->fixed_size_by_root, lsize, sizeof(int) * (size_t)n);
        if ((st = ap_shard_problem_set_stage(fin, nodes, n_nodes))) goto done;
        st = ap_shard_problem_assemble(fin);
        if (st == AUTOPAR_ERR_GRAPH || st == AUTOPAR_ERR_INFEASIBLE) {
            if (verbose)
                fprintf(stderr, "[autopar sharding] composed stage: %s; solving flat\n",
                        autopar_last_error());
            st = AUTOPAR_OK;
            goto done;
        }
        if (st) goto done;
        free(choice);
        choice = malloc(sizeof(int) * (size_t)(fin->n_groups + 1));
        if (!choice) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
            goto done;
        }
        st = ap_shard_problem_solve_mode(fin, 0, choice, NULL);
        build_s += fin->build_seconds;
        solve_s += fin->solve_seconds;
        solves++;
        if (st != AUTOPAR_ERR_INFEASIBLE || fin->solve_timed_out || budget < 0) break;
        /* over the budget: how far? */
        double least_peak;
        st = ap_shard_problem_solve_mode(fin, 1, choice, &least_peak);
        solve_s += fin->solve_seconds;
        if (st) {
            if (st == AUTOPAR_ERR_INFEASIBLE && !fin->solve_timed_out) st = AUTOPAR_OK;
            goto done;   /* forbidden combinations: let the flat solve explain */
        }
        if (verbose)
            fprintf(stderr, "[autopar sharding] composed stage needs %.0f bytes, budget %.0f "
                    "(attempt %d)\n", least_peak, budget, attempt);
        if (least_peak > budget && (attempt >= 3 || all_least)) {
            if (n_order_small(in_stage, n)) {
                st = AUTOPAR_OK;   /* small enough: the exact flat solve names the budget */
                goto done;
            }
            double peak;
            int at;
            if ((st = ap_shard_problem_peak(fin, choice, &peak, &at))) goto done;
            double need = ceil(peak);
            st = ap_error(AUTOPAR_ERR_INFEASIBLE,
                          "sharding: no plan of the stage (%d nodes) fits the memory budget of "
                          "%.0f bytes (%.3f GiB) per device on mesh %d x %d; the smallest budget "
                          "that fits is %.0f bytes (%.3f GiB) for plans whose identical layers "
                          "share one strategy, peaking at '%s'",
                          fin->n_order, budget, budget / 1073741824.0, mesh->shape[0],
                          mesh->shape[1], need, need / 1073741824.0,
                          at >= 0 ? g->nodes[at]->name : "?");
            goto done;
        }
        /* tighten each run's share so that its row binds: its held bytes must drop by the
         * overshoot (and a margin) */
        for (int ri = 0; ri < nr; ri++) {
            double want = budget - res[ri] - (held[ri] - (least_peak - budget) * 1.05 - 1.0);
            extra[ri] = want > extra[ri] ? want : extra[ri] + (least_peak - budget) * 1.05 + 1.0;
        }
    }
    if (st) goto done;
    optimal = optimal && fin->optimal;
    if ((st = ap_shard_problem_plan(fin, choice, out))) goto done;
    {
        int free_groups = 0;
        for (int gi = 0; gi < fin->n_groups; gi++)
            if (fin->groups[gi].fixed < 0 && fin->groups[gi].n_strat > 1) free_groups++;
        ap_shard_plan *pl = *out;
        if (fin->n_cols > max_cols) {
            max_groups = free_groups;
            max_cols = fin->n_cols;
            max_int = fin->n_int_cols;
            max_rows = fin->n_lp_rows;
            max_nz = fin->n_nonzeros;
        }
        pl->n_groups = max_groups;
        pl->n_cols = max_cols;
        pl->n_int_cols = max_int;
        pl->n_rows = max_rows;
        pl->n_nonzeros = max_nz;
        pl->n_solves = solves;
        pl->n_layers_reused = reused;
        pl->optimal = optimal;
        pl->build_seconds = build_s;
        pl->solve_seconds = solve_s;
    }
    *handled = true;
    if (verbose)
        fprintf(stderr, "[autopar sharding] composed: %d solve(s), %d layer(s) reused, %.3f s\n",
                solves, reused, ap_shard_now() - t0);
done:
    free(extra);
    free(held);
    free(res);
    if (!*handled && *out) {
        ap_shard_plan_free(*out);
        *out = NULL;
    }
    free(in_stage);
    free(layer);
    free(pos);
    free(lvals);
    free(lnodes);
    free(saved);
    free(L);
    free(R);
    free(sig.t);
    free(lfixed);
    free(lsize);
    free(choice);
    ap_shard_problem_free(fin);
    return st;
}
