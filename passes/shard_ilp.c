/*
 * The sharding ILP: cost assembly over merged groups, memory rows from a liveness sweep, the
 * GLPK model (reference/alpa-notes.md §1.3) and an independent evaluator used by the tests.
 *
 * Model (docs/intra-op.md §Formulation):
 *   s_g ∈ {0,1}^{k_g}, Σ_j s_gj = 1                       one-hot per group with > 1 choice
 *   e_ab ∈ [0,1]^{k_a×k_b}, Σ_j e_ij = s_ai, Σ_i e_ij = s_bj   per cross-group edge
 *   min Σ c_g·s_g + Σ R_ab·e_ab                          compute + own comm + penalty, resharding
 *   Σ_{live at t} m·s ≤ budget                            per kept liveness point t
 * With binary s the two marginal constraints force e = s_a ⊗ s_b, so e can stay continuous
 * (fewer integer variables than Alpa's formulation, same optimum). Forbidden pairs (impossible or
 * disallowed resharding) get no e variable, which forbids the pair outright. Groups with one
 * allowed strategy and edges whose matrix is additive (R_ij = a_i + b_j, e.g. all zero) are
 * folded into the objective without variables.
 */
#include "shard_internal.h"

#include <glpk.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

AP_INTERNAL double ap_shard_now(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

AP_INTERNAL bool ap_shard_verbose(void) {
    const char *e = getenv("AUTOPAR_VERBOSE");
    return e && e[0] == '1';
}

/* ------------------------------------------------------------------------------------------ */
/* Resharding cache                                                                            */
/* ------------------------------------------------------------------------------------------ */

typedef struct rc_entry {
    ap_shape   shape;
    uint16_t   src, dst;
    uint8_t    used, possible;
    ap_reshard r;
} rc_entry;

struct ap_reshard_cache {
    rc_entry *e;
    int       cap, n;
};

static int spec_key(const ap_spec *s) {
    int k = 0;
    for (int d = 0; d < s->ndim; d++) k |= s->dim[d] << (2 * d);
    return k | (s->partial << (2 * AP_MAX_DIMS));
}

static uint64_t rc_hash(const ap_shape *sh, int src, int dst) {
    uint64_t h = 1469598103934665603ull;
    h = (h ^ (uint64_t)sh->ndim) * 1099511628211ull;
    for (int d = 0; d < sh->ndim; d++) h = (h ^ (uint64_t)sh->dim[d]) * 1099511628211ull;
    h = (h ^ (uint64_t)src) * 1099511628211ull;
    h = (h ^ (uint64_t)dst) * 1099511628211ull;
    return h ^ (h >> 29);
}

AP_INTERNAL ap_status ap_reshard_cache_new(ap_reshard_cache **out) {
    ap_reshard_cache *c = calloc(1, sizeof *c);
    if (!c) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    c->cap = 1024;
    c->e = calloc((size_t)c->cap, sizeof *c->e);
    if (!c->e) {
        free(c);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    *out = c;
    return AUTOPAR_OK;
}

AP_INTERNAL void ap_reshard_cache_free(ap_reshard_cache *c) {
    if (!c) return;
    free(c->e);
    free(c);
}

static rc_entry *rc_slot(ap_reshard_cache *c, const ap_shape *sh, int src, int dst) {
    uint64_t h = rc_hash(sh, src, dst);
    for (int i = (int)(h & (uint64_t)(c->cap - 1));; i = (i + 1) & (c->cap - 1)) {
        rc_entry *e = &c->e[i];
        if (!e->used) return e;
        if (e->src == src && e->dst == dst && ap_shape_equal(&e->shape, sh)) return e;
    }
}

static bool rc_grow(ap_reshard_cache *c) {
    rc_entry *old = c->e;
    int oldcap = c->cap;
    rc_entry *ne = calloc((size_t)oldcap * 2, sizeof *ne);
    if (!ne) return false;
    c->e = ne;
    c->cap = oldcap * 2;
    for (int i = 0; i < oldcap; i++) {
        if (!old[i].used) continue;
        rc_entry *s = rc_slot(c, &old[i].shape, old[i].src, old[i].dst);
        *s = old[i];
    }
    free(old);
    return true;
}

/* dst only adds minor splits to src (and neither is partial): every device slices locally. */
static bool spec_refines(const ap_spec *src, const ap_spec *dst) {
    if (src->partial || dst->partial || src->ndim != dst->ndim) return false;
    for (int d = 0; d < src->ndim; d++) {
        uint8_t a = src->dim[d], b = dst->dim[d];
        if (a == b || a == AP_DIM_R) continue;
        if (a == AP_DIM_S0 && b == AP_DIM_S01) continue;
        return false;
    }
    return true;
}

/* A route the options forbid: all-gathers when !allow_all_gather; all-gathers and all-to-alls
 * over the forced batch axis (Alpa gives them an infinite cost). */
static bool route_forbidden(const ap_shard_problem *p, const ap_reshard *r) {
    int fa = p->opt.force_batch_dim_to_mesh_axis;
    for (int i = 0; i < r->n_steps; i++) {
        const ap_collective *c = &r->step[i];
        if (c->kind == AP_COLL_ALL_GATHER && !p->opt.allow_all_gather) return true;
        if (fa >= 0 && fa < 2 && p->mesh->shape[fa] > 1 &&
            (c->kind == AP_COLL_ALL_GATHER || c->kind == AP_COLL_ALL_TO_ALL) &&
            (c->axis == (ap_mesh_axis)fa || c->axis == AP_AXIS_FLAT))
            return true;
    }
    return false;
}

AP_INTERNAL bool ap_shard_reshard(ap_shard_problem *p, int u, const ap_spec *s, const ap_spec *d,
                                  double *time, const ap_reshard **route) {
    *time = 0;
    if (route) *route = NULL;
    if (ap_spec_equal(s, d) || spec_refines(s, d)) return true;
    const ap_shape *sh = &p->g->nodes[u]->shape;
    int ks = spec_key(s), kd = spec_key(d);
    ap_reshard_cache *c = p->rc;
    if (2 * (c->n + 1) > c->cap && !rc_grow(c)) {
        /* no memory for the cache: compute without it (route unavailable) */
        ap_reshard r;
        if (ap_reshard_cost(p->mesh, s, d, sh, (double)ap_shape_numel(sh) * 4.0, &r) ||
            route_forbidden(p, &r))
            return false;
        *time = r.time;
        return true;
    }
    rc_entry *e = rc_slot(c, sh, ks, kd);
    if (!e->used) {
        e->used = 1;
        e->shape = *sh;
        e->src = (uint16_t)ks;
        e->dst = (uint16_t)kd;
        e->possible =
            ap_reshard_cost(p->mesh, s, d, sh, (double)ap_shape_numel(sh) * 4.0, &e->r) ==
            AUTOPAR_OK;
        c->n++;
    }
    if (!e->possible || route_forbidden(p, &e->r)) return false;
    *time = e->r.time;
    if (route) *route = &e->r;
    return true;
}

/* ------------------------------------------------------------------------------------------ */
/* Problem skeleton                                                                            */
/* ------------------------------------------------------------------------------------------ */

AP_INTERNAL ap_status ap_shard_problem_alloc(const autopar_graph *g, const ap_mesh *mesh,
                                             const autopar_cluster *cluster,
                                             const ap_shard_options *opt, ap_shard_problem **out) {
    *out = NULL;
    ap_shard_problem *p = calloc(1, sizeof *p);
    if (!p) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    p->g = g;
    p->mesh = mesh;
    p->cluster = cluster;
    p->opt = *opt;
    p->n = g->n_nodes;
    size_t n = (size_t)(p->n > 0 ? p->n : 1);
    p->role = calloc(n, 1);
    p->order = malloc(n * sizeof(int));
    p->pos = malloc(n * sizeof(int));
    p->layer = malloc(n * sizeof(int));
    p->alias = malloc(n * sizeof(int));
    p->follow = malloc(n * sizeof(int));
    p->group = malloc(n * sizeof(int));
    p->st = calloc(n, sizeof *p->st);
    p->read = calloc(n, 1);
    ap_status st = ap_reshard_cache_new(&p->rc);
    if (!p->read || !p->role || !p->order || !p->pos || !p->layer || !p->alias || !p->follow || !p->group ||
        !p->st || st) {
        ap_shard_problem_free(p);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    for (int i = 0; i < p->n; i++) {
        p->pos[i] = -1;
        p->alias[i] = -1;
        p->follow[i] = -1;
        p->group[i] = -1;
        p->layer[i] = opt->layer_of ? opt->layer_of[i] : g->nodes[i]->layer;
        for (int k = 0; k < g->nodes[i]->n_src; k++) p->read[g->nodes[i]->src[k]] = 1;
    }
    /* Budget: explicit, the cluster's device memory, or none. */
    p->budget = opt->memory_budget > 0 ? opt->memory_budget
              : opt->memory_budget == 0 && cluster ? (double)cluster->device_memory : -1.0;
    /* Alpa's replicated_penalty: an all-reduce of one byte over each axis. */
    if (opt->communication_only)
        for (int a = 0; a < 2; a++)
            p->penalty_value += ap_mesh_collective_time(mesh, AP_COLL_ALL_REDUCE,
                                                        (ap_mesh_axis)a, 1.0);
    p->verbose = ap_shard_verbose();
    *out = p;
    return AUTOPAR_OK;
}

AP_INTERNAL void ap_shard_problem_free(ap_shard_problem *p) {
    if (!p) return;
    if (p->st)
        for (int i = 0; i < p->n; i++) free(p->st[i]);
    free(p->st);
    if (p->groups)
        for (int i = 0; i < p->n_groups; i++) {
            free(p->groups[i].cost);
            free(p->groups[i].ok);
        }
    free(p->groups);
    free(p->members);
    free(p->group_off);
    for (int i = 0; i < p->n_edges; i++) free(p->edges[i].cost);
    free(p->edges);
    free(p->edge_hash);
    for (int i = 0; i < p->n_rows; i++) {
        free(p->rows[i].var);
        free(p->rows[i].coef);
    }
    free(p->rows);
    free(p->own);
    free(p->role);
    free(p->order);
    free(p->pos);
    free(p->layer);
    free(p->alias);
    free(p->read);
    free(p->follow);
    free(p->group);
    free(p->periodic_held);
    free(p->fixed_by_root);
    free(p->fixed_size_by_root);
    ap_reshard_cache_free(p->rc);
    free(p);
}

AP_INTERNAL ap_status ap_shard_problem_set_stage(ap_shard_problem *p, const int *nodes,
                                                 int n_nodes) {
    const autopar_graph *g = p->g;
    if (!nodes) {
        for (int i = 0; i < p->n; i++) p->role[i] = AP_ROLE_STAGE;
    } else {
        for (int i = 0; i < n_nodes; i++) {
            if (nodes[i] < 0 || nodes[i] >= p->n)
                return ap_error(AUTOPAR_ERR_INVALID_ARG,
                                "sharding: stage node id %d is outside the graph (0..%d)",
                                nodes[i], p->n - 1);
            p->role[nodes[i]] = AP_ROLE_STAGE;
        }
    }
    p->n_order = 0;
    for (int i = 0; i < p->n; i++) {
        if (p->role[i] != AP_ROLE_STAGE) continue;
        p->pos[i] = p->n_order;
        p->order[p->n_order++] = i;
        const ap_node *v = g->nodes[i];
        for (int k = 0; k < v->n_src; k++)
            if (p->role[v->src[k]] == AP_ROLE_NONE) p->role[v->src[k]] = AP_ROLE_EXTERNAL;
    }
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Costs                                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* The operand node u of v as the problem sees it (periodic layers remap some). */
static int operand_of(const ap_shard_problem *p, const ap_node *v, int k) {
    int u = v->src[k];
    return p->alias[u] >= 0 ? p->alias[u] : u;
}

/* The only allowed strategy of a group, or -1 when it has several. */
static int group_only(const ap_group *gr) {
    int only = -1;
    for (int j = 0; j < gr->n_strat; j++) {
        if (!gr->ok[j]) continue;
        if (only >= 0) return -1;
        only = j;
    }
    return only;
}

/* The first group none of whose strategies is still allowed, or NULL. */
static const ap_group *group_without_strategy(const ap_shard_problem *p) {
    for (int gi = 0; gi < p->n_groups; gi++) {
        const ap_group *gr = &p->groups[gi];
        bool any = false;
        for (int j = 0; j < gr->n_strat && !any; j++) any = gr->ok[j] != 0;
        if (!any) return gr;
    }
    return NULL;
}

static ap_gedge *edge_get(ap_shard_problem *p, int a, int b) {
    if (p->edge_hash_cap == 0 || 2 * (p->n_edges + 1) > p->edge_hash_cap) {
        int cap = p->edge_hash_cap ? 2 * p->edge_hash_cap : 1024;
        int *h = malloc(sizeof(int) * (size_t)cap);
        if (!h) return NULL;
        for (int i = 0; i < cap; i++) h[i] = -1;
        for (int e = 0; e < p->n_edges; e++) {
            uint64_t key = (uint64_t)p->edges[e].a * 2654435761u + (uint64_t)p->edges[e].b;
            int i = (int)((key * 0x9E3779B97F4A7C15ull) >> 40) & (cap - 1);
            while (h[i] >= 0) i = (i + 1) & (cap - 1);
            h[i] = e;
        }
        free(p->edge_hash);
        p->edge_hash = h;
        p->edge_hash_cap = cap;
    }
    uint64_t key = (uint64_t)a * 2654435761u + (uint64_t)b;
    int i = (int)((key * 0x9E3779B97F4A7C15ull) >> 40) & (p->edge_hash_cap - 1);
    while (p->edge_hash[i] >= 0) {
        ap_gedge *e = &p->edges[p->edge_hash[i]];
        if (e->a == a && e->b == b) return e;
        i = (i + 1) & (p->edge_hash_cap - 1);
    }
    if (p->n_edges == p->cap_edges) {
        int cap = p->cap_edges ? 2 * p->cap_edges : 256;
        ap_gedge *ne = realloc(p->edges, (size_t)cap * sizeof *ne);
        if (!ne) return NULL;
        p->edges = ne;
        p->cap_edges = cap;
    }
    int ka = p->groups[a].n_strat, kb = p->groups[b].n_strat;
    double *cost = calloc((size_t)ka * (size_t)kb, sizeof *cost);
    if (!cost) return NULL;
    ap_gedge *e = &p->edges[p->n_edges];
    e->a = a;
    e->b = b;
    e->cost = cost;
    p->edge_hash[i] = p->n_edges++;
    return e;
}

static ap_status assemble_costs(ap_shard_problem *p) {
    const autopar_graph *g = p->g;
    for (int gi = 0; gi < p->n_groups; gi++) {
        ap_group *gr = &p->groups[gi];
        gr->cost = calloc((size_t)(gr->n_strat > 0 ? gr->n_strat : 1), sizeof(double));
        gr->ok = malloc((size_t)(gr->n_strat > 0 ? gr->n_strat : 1));
        if (!gr->cost || !gr->ok) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        for (int j = 0; j < gr->n_strat; j++) gr->ok[j] = gr->fixed < 0 || gr->fixed == j;
        for (int mi = 0; mi < gr->n_members; mi++) {
            const ap_nstrat *ns = p->st[p->members[gr->first_member + mi]];
            for (int j = 0; j < gr->n_strat; j++) {
                gr->cost[j] += ns[j].compute + ns[j].penalty + ns[j].comm;
                if (!ns[j].ok) gr->ok[j] = 0;
            }
        }
    }
    /* Edges inside a group: the merged follower's resharding (usually none). */
    for (int t = 0; t < p->n_order; t++) {
        const ap_node *v = g->nodes[p->order[t]];
        int gv = p->group[v->id];
        ap_group *gr = &p->groups[gv];
        for (int k = 0; k < v->n_src; k++) {
            int u = operand_of(p, v, k);
            if (p->role[u] == AP_ROLE_NONE)
                return ap_error(AUTOPAR_ERR_GRAPH, "sharding: operand %d of '%s' is not in the "
                                "problem", k, v->name);
            if (p->group[u] != gv) continue;
            for (int j = 0; j < gr->n_strat; j++) {
                if (!gr->ok[j]) continue;
                double c;
                if (!ap_shard_reshard(p, u, &p->st[u][j].out, &p->st[v->id][j].in[k], &c, NULL))
                    gr->ok[j] = 0;
                else
                    gr->cost[j] += c;
            }
        }
    }
    const ap_group *dead = group_without_strategy(p);
    if (dead) {
        const ap_node *r = g->nodes[dead->root];
        return ap_error(AUTOPAR_ERR_INFEASIBLE,
                        "sharding: none of the %d strategies of '%s' (%s) and the %d ops merged "
                        "into it is realisable on mesh %d x %d under the options (e.g. a "
                        "resharding they need is forbidden)",
                        dead->n_strat, r->name, ap_op_name(r->op), dead->n_members - 1,
                        p->mesh->shape[0], p->mesh->shape[1]);
    }
    /* Edges between groups. One side with a single allowed strategy folds into the other. */
    for (int t = 0; t < p->n_order; t++) {
        const ap_node *v = g->nodes[p->order[t]];
        int gv = p->group[v->id];
        for (int k = 0; k < v->n_src; k++) {
            int u = operand_of(p, v, k);
            int gu = p->group[u];
            if (gu == gv) continue;
            ap_group *A = &p->groups[gu], *B = &p->groups[gv];
            int oa = group_only(A), ob = group_only(B);
            if (oa >= 0 && ob >= 0) {
                double c;
                if (!ap_shard_reshard(p, u, &p->st[u][oa].out, &p->st[v->id][ob].in[k], &c,
                                      NULL))
                    return ap_error(AUTOPAR_ERR_INFEASIBLE,
                                    "sharding: operand %d of '%s' cannot be resharded from the "
                                    "only layout of '%s' under the options",
                                    k, v->name, g->nodes[u]->name);
                A->cost[oa] += c;   /* a constant: any fixed group may carry it */
                continue;
            }
            if (oa >= 0 || ob >= 0) {
                ap_group *F = oa >= 0 ? B : A;   /* the free side */
                for (int j = 0; j < F->n_strat; j++) {
                    if (!F->ok[j]) continue;
                    int i_u = oa >= 0 ? oa : j, i_v = oa >= 0 ? j : ob;
                    double c;
                    if (!ap_shard_reshard(p, u, &p->st[u][i_u].out, &p->st[v->id][i_v].in[k],
                                          &c, NULL))
                        F->ok[j] = 0;
                    else
                        F->cost[j] += c;
                }
                continue;
            }
            int a = gu < gv ? gu : gv, b = gu < gv ? gv : gu;
            ap_gedge *e = edge_get(p, a, b);
            if (!e) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
            int kb = p->groups[b].n_strat;
            for (int i = 0; i < A->n_strat; i++) {
                if (!A->ok[i]) continue;
                for (int j = 0; j < B->n_strat; j++) {
                    if (!B->ok[j]) continue;
                    double *slot = gu < gv ? &e->cost[(size_t)i * kb + j]
                                           : &e->cost[(size_t)j * kb + i];
                    if (isinf(*slot)) continue;
                    double c;
                    if (!ap_shard_reshard(p, u, &p->st[u][i].out, &p->st[v->id][j].in[k], &c,
                                          NULL))
                        *slot = INFINITY;
                    else
                        *slot += c;
                }
            }
        }
    }
    /* Forbidden pairs can leave a group with one allowed strategy; its edges then fold too.
     * Repeat until nothing changes. A folded edge has cost == NULL. */
    for (bool changed = true; changed;) {
        changed = false;
        for (int e = 0; e < p->n_edges; e++) {
            ap_gedge *E = &p->edges[e];
            if (!E->cost) continue;
            ap_group *A = &p->groups[E->a], *B = &p->groups[E->b];
            int oa = group_only(A), ob = group_only(B), kb = B->n_strat;
            if (oa < 0 && ob < 0) continue;
            if (oa >= 0 && ob >= 0) {
                double c = E->cost[(size_t)oa * kb + ob];
                if (isinf(c)) {
                    A->ok[oa] = 0;   /* reported below */
                    changed = true;
                } else {
                    A->cost[oa] += c;
                }
            } else if (oa >= 0) {
                for (int j = 0; j < kb; j++) {
                    if (!B->ok[j]) continue;
                    double c = E->cost[(size_t)oa * kb + j];
                    if (isinf(c)) {
                        B->ok[j] = 0;
                        changed = true;
                    } else {
                        B->cost[j] += c;
                    }
                }
            } else {
                for (int i = 0; i < A->n_strat; i++) {
                    if (!A->ok[i]) continue;
                    double c = E->cost[(size_t)i * kb + ob];
                    if (isinf(c)) {
                        A->ok[i] = 0;
                        changed = true;
                    } else {
                        A->cost[i] += c;
                    }
                }
            }
            free(E->cost);
            E->cost = NULL;
        }
    }
    dead = group_without_strategy(p);
    if (dead) {
        const ap_node *r = g->nodes[dead->root];
        return ap_error(AUTOPAR_ERR_INFEASIBLE,
                        "sharding: no strategy of '%s' (%s) can read its operands from, or hand "
                        "its result to, the layouts its neighbours allow under the options",
                        r->name, ap_op_name(r->op));
    }
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Liveness and memory rows                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Live interval [start, end] over stage positions of every problem node (start = -1: absent).
 * Parameters and optimizer state live throughout, inputs and external operands from the start
 * to their last use, activations from their production to their last use (or the end when a
 * node outside the stage reads them). */
static ap_status live_intervals(const ap_shard_problem *p, int **start_out, int **end_out) {
    const autopar_graph *g = p->g;
    int *start = malloc(sizeof(int) * (size_t)(p->n > 0 ? p->n : 1));
    int *end = malloc(sizeof(int) * (size_t)(p->n > 0 ? p->n : 1));
    if (!start || !end) {
        free(start);
        free(end);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    int last = p->n_order - 1;
    for (int i = 0; i < p->n; i++) {
        start[i] = -1;
        end[i] = -1;
        if (p->role[i] == AP_ROLE_NONE) continue;
        const ap_node *v = g->nodes[i];
        bool leaf = p->role[i] == AP_ROLE_EXTERNAL || v->op == AP_OP_INPUT ||
                    v->op == AP_OP_PARAM || v->op == AP_OP_OPT_STATE;
        start[i] = leaf ? 0 : p->pos[i];
        end[i] = v->op == AP_OP_PARAM || v->op == AP_OP_OPT_STATE ? last : start[i];
    }
    for (int w = 0; w < p->n; w++) {
        const ap_node *v = g->nodes[w];
        for (int k = 0; k < v->n_src; k++) {
            int u = v->src[k];
            if (p->role[u] == AP_ROLE_NONE) continue;
            if (p->role[w] == AP_ROLE_STAGE) {
                if (p->pos[w] > end[u]) end[u] = p->pos[w];
            } else if (p->role[u] == AP_ROLE_STAGE) {
                end[u] = last;   /* read by another stage */
            }
        }
    }
    *start_out = start;
    *end_out = end;
    return AUTOPAR_OK;
}

static bool row_dominated(const ap_memrow *a, const ap_memrow *b) {
    /* a <= b everywhere? (sparse rows sorted by var) */
    if (a->cnst > b->cnst) return false;
    int j = 0;
    for (int i = 0; i < a->nnz; i++) {
        while (j < b->nnz && b->var[j] < a->var[i]) j++;
        double bv = j < b->nnz && b->var[j] == a->var[i] ? b->coef[j] : 0.0;
        if (a->coef[i] > bv) return false;
    }
    return true;
}

/* The single memory row of a periodic layer solve (see periodic_held). */
static ap_status build_periodic_row(ap_shard_problem *p) {
    int nnz = 0;
    for (int gi = 0; gi < p->n_groups; gi++) nnz += p->groups[gi].n_strat;
    p->rows = calloc(1, sizeof *p->rows);
    double *acc = calloc((size_t)p->n_strat_total + 1, sizeof(double));
    if (!p->rows || !acc) {
        free(acc);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    ap_memrow *r = &p->rows[0];
    p->n_rows = 1;
    r->at = p->n_order > 0 ? p->order[0] : -1;
    r->var = malloc(sizeof(int) * (size_t)(nnz + 1));
    r->coef = malloc(sizeof(double) * (size_t)(nnz + 1));
    if (!r->var || !r->coef) {
        free(acc);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    for (int id = 0; id < p->n; id++) {
        if (!p->periodic_held[id] || p->role[id] == AP_ROLE_NONE) continue;
        int gi = p->group[id], only = group_only(&p->groups[gi]);
        if (only >= 0) {
            r->cnst += p->periodic_reps * p->st[id][only].mem;
            continue;
        }
        for (int j = 0; j < p->groups[gi].n_strat; j++)
            acc[p->group_off[gi] + j] += p->periodic_reps * p->st[id][j].mem;
    }
    r->cnst += p->periodic_reserve;
    for (int gi = 0; gi < p->n_groups; gi++) {
        if (group_only(&p->groups[gi]) >= 0) continue;
        for (int j = 0; j < p->groups[gi].n_strat; j++) {
            if (!p->groups[gi].ok[j]) continue;
            r->var[r->nnz] = p->group_off[gi] + j;
            r->coef[r->nnz++] = acc[p->group_off[gi] + j];
        }
    }
    free(acc);
    return AUTOPAR_OK;
}

static ap_status build_rows(ap_shard_problem *p) {
    if (p->rows) return AUTOPAR_OK;
    if (p->periodic_held) return build_periodic_row(p);
    int *start, *end;
    ap_status st = live_intervals(p, &start, &end);
    if (st) return st;
    int T = p->n_order;
    /* births / deaths bucketed by position */
    int *bcount = calloc((size_t)T + 2, sizeof(int)), *dcount = calloc((size_t)T + 2, sizeof(int));
    int *blist = malloc(sizeof(int) * (size_t)(p->n + 1)),
        *dlist = malloc(sizeof(int) * (size_t)(p->n + 1));
    int *only = malloc(sizeof(int) * (size_t)(p->n_groups + 1));
    double *run = calloc((size_t)p->n_strat_total + 1, sizeof(double));
    int *live_members = calloc((size_t)p->n_groups + 1, sizeof(int));
    p->rows = NULL;
    int cap_rows = 0;
    if (!bcount || !dcount || !blist || !dlist || !only || !run || !live_members) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        goto done;
    }
    for (int gi = 0; gi < p->n_groups; gi++) only[gi] = group_only(&p->groups[gi]);
    for (int i = 0; i < p->n; i++)
        if (start[i] >= 0) {
            bcount[start[i] + 1]++;
            dcount[end[i] + 1]++;
        }
    for (int t = 0; t <= T; t++) {
        bcount[t + 1] += bcount[t];
        dcount[t + 1] += dcount[t];
    }
    {
        int *bf = calloc((size_t)T + 1, sizeof(int)), *df = calloc((size_t)T + 1, sizeof(int));
        if (!bf || !df) {
            free(bf);
            free(df);
            st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
            goto done;
        }
        for (int i = 0; i < p->n; i++)
            if (start[i] >= 0) {
                blist[bcount[start[i]] + bf[start[i]]++] = i;
                dlist[dcount[end[i]] + df[end[i]]++] = i;
            }
        free(bf);
        free(df);
    }
    double cnst = 0;
    long version = 0, row_version = -1;
    for (int t = 0; t < T; t++) {
        for (int b = bcount[t]; b < bcount[t + 1]; b++) {
            int v = blist[b], gi = p->group[v];
            if (only[gi] >= 0) {
                cnst += p->st[v][only[gi]].mem;
            } else {
                int off = p->group_off[gi];
                for (int j = 0; j < p->groups[gi].n_strat; j++) run[off + j] += p->st[v][j].mem;
                live_members[gi]++;
                version++;
            }
        }
        if (dcount[t + 1] > dcount[t]) {
            /* the live set is maximal here: snapshot it (or raise the constant of the last row
             * when only fixed tensors changed since) */
            if (row_version == version && p->n_rows > 0) {
                ap_memrow *r = &p->rows[p->n_rows - 1];
                if (cnst > r->cnst) {
                    r->cnst = cnst;
                    r->at = p->order[t];
                }
            } else {
                if (p->n_rows == cap_rows) {
                    int nc = cap_rows ? 2 * cap_rows : 64;
                    ap_memrow *nr = realloc(p->rows, (size_t)nc * sizeof *nr);
                    if (!nr) {
                        st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
                        goto done;
                    }
                    p->rows = nr;
                    cap_rows = nc;
                }
                ap_memrow *r = &p->rows[p->n_rows];
                memset(r, 0, sizeof *r);
                r->cnst = cnst;
                r->at = p->order[t];
                int nnz = 0;
                for (int gi = 0; gi < p->n_groups; gi++)
                    if (live_members[gi]) nnz += p->groups[gi].n_strat;
                r->var = malloc(sizeof(int) * (size_t)(nnz > 0 ? nnz : 1));
                r->coef = malloc(sizeof(double) * (size_t)(nnz > 0 ? nnz : 1));
                if (!r->var || !r->coef) {
                    free(r->var);
                    free(r->coef);
                    st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
                    goto done;
                }
                p->n_rows++;
                for (int gi = 0; gi < p->n_groups; gi++) {
                    if (!live_members[gi]) continue;
                    int off = p->group_off[gi];
                    for (int j = 0; j < p->groups[gi].n_strat; j++) {
                        if (!p->groups[gi].ok[j]) continue;
                        r->var[r->nnz] = off + j;
                        r->coef[r->nnz++] = run[off + j];
                    }
                }
                row_version = version;
            }
        }
        for (int d = dcount[t]; d < dcount[t + 1]; d++) {
            int v = dlist[d], gi = p->group[v];
            if (only[gi] >= 0) {
                cnst -= p->st[v][only[gi]].mem;
            } else {
                int off = p->group_off[gi];
                for (int j = 0; j < p->groups[gi].n_strat; j++) run[off + j] -= p->st[v][j].mem;
                live_members[gi]--;
                version++;
            }
        }
    }
    /* Drop rows another row dominates (exact: a dominated row can never bind). Quadratic, so
     * only for moderate row counts; neighbours are always compared. */
    {
        bool *dead = calloc((size_t)p->n_rows + 1, 1);
        if (!dead) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
            goto done;
        }
        bool full = p->n_rows <= 1500;
        for (int i = 0; i < p->n_rows; i++) {
            for (int j = 0; j < p->n_rows && !dead[i]; j++) {
                if (i == j || dead[j]) continue;
                if (!full && abs(i - j) > 1) continue;
                if (row_dominated(&p->rows[i], &p->rows[j]) &&
                    (!row_dominated(&p->rows[j], &p->rows[i]) || j < i))
                    dead[i] = true;
            }
        }
        int w = 0;
        for (int i = 0; i < p->n_rows; i++) {
            if (dead[i]) {
                free(p->rows[i].var);
                free(p->rows[i].coef);
            } else {
                p->rows[w++] = p->rows[i];
            }
        }
        p->n_rows = w;
        free(dead);
    }
done:
    free(start);
    free(end);
    free(bcount);
    free(dcount);
    free(blist);
    free(dlist);
    free(only);
    free(run);
    free(live_members);
    return st;
}

AP_INTERNAL ap_status ap_shard_problem_assemble(ap_shard_problem *p) {
    double t0 = ap_shard_now();
    ap_shard_pick_follow(p);
    ap_status st = ap_shard_gen_strategies(p);
    if (st) return st;
    double t1 = ap_shard_now();
    if ((st = assemble_costs(p))) return st;
    double t2 = ap_shard_now();
    if (p->budget >= 0 && (st = build_rows(p))) return st;
    double t3 = ap_shard_now();
    p->build_seconds = t3 - t0;
    if (p->verbose)
        fprintf(stderr,
                "[autopar sharding] %d stage nodes, %d groups, %d strategies, %d edge matrices, "
                "%d memory rows; strategies %.3f s, costs %.3f s, rows %.3f s\n",
                p->n_order, p->n_groups, p->n_strat_total, p->n_edges, p->n_rows, t1 - t0,
                t2 - t1, t3 - t2);
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* GLPK                                                                                        */
/* ------------------------------------------------------------------------------------------ */

typedef struct heur_ctx {
    const double *x;   /* warm start, 1-based over the columns, or NULL */
    bool          done;
} heur_ctx;

static void mip_callback(glp_tree *T, void *info) {
    heur_ctx *h = info;
    if (glp_ios_reason(T) == GLP_IHEUR && h->x && !h->done) {
        h->done = true;
        glp_ios_heur_sol(T, h->x);
    }
}

/* Greedy warm start: groups in order, each takes the allowed strategy that is cheapest given
 * the groups already chosen (own cost + edges to them). Returns false when it gets stuck. */
static bool greedy_choice(const ap_shard_problem *p, const int *only, int *choice) {
    int ng = p->n_groups;
    for (int gi = 0; gi < ng; gi++) choice[gi] = only[gi];
    /* edges per group, for lookup */
    for (int gi = 0; gi < ng; gi++) {
        if (choice[gi] >= 0) continue;
        const ap_group *gr = &p->groups[gi];
        double best = INFINITY;
        int bj = -1;
        for (int j = 0; j < gr->n_strat; j++) {
            if (!gr->ok[j]) continue;
            double c = gr->cost[j];
            for (int e = 0; e < p->n_edges && isfinite(c); e++) {
                const ap_gedge *E = &p->edges[e];
                if (!E->cost) continue;
                int kb = p->groups[E->b].n_strat;
                if (E->a == gi && choice[E->b] >= 0)
                    c += E->cost[(size_t)j * kb + choice[E->b]];
                else if (E->b == gi && choice[E->a] >= 0)
                    c += E->cost[(size_t)choice[E->a] * kb + j];
            }
            if (c < best) {
                best = c;
                bj = j;
            }
        }
        if (bj < 0) return false;
        choice[gi] = bj;
    }
    return true;
}

enum { LP_OPTIMAL = 0, LP_INFEASIBLE, LP_TIMEOUT, LP_FAILED };

/*
 * The LP relaxation, robustly. GLPK's simplex variants fail on different instances of these
 * degenerate problems (a singular crash basis, "tcol[p] = 0.0" in the dual ratio test, a false
 * infeasibility verdict after such a failure, cycling of the presolved primal for millions of
 * iterations): try, in order, the dual simplex from a crash basis (the fastest), the dual
 * simplex from the standard basis, the primal simplex from the standard basis, the presolved
 * primal, each with an iteration cap, and accept "infeasible" only when no variant finds an
 * optimum. Returns LP_*; on LP_OPTIMAL the problem holds an optimal basis.
 */
static int solve_lp_robust(glp_prob *P, int time_ms, bool verbose) {
    double t0 = ap_shard_now();
    int n = glp_get_num_rows(P) + glp_get_num_cols(P);
    bool said_infeasible = false;
    for (int variant = 0; variant < 4; variant++) {
        int left = time_ms - (int)((ap_shard_now() - t0) * 1000.0);
        if (left <= 0) return LP_TIMEOUT;
        glp_smcp sm;
        glp_init_smcp(&sm);
        sm.msg_lev = verbose ? GLP_MSG_ON : GLP_MSG_OFF;
        sm.tm_lim = left;
        sm.it_lim = 50 * n + 10000;   /* cycling guard: a healthy solve needs a few n */
        switch (variant) {
        case 0: sm.meth = GLP_DUAL; sm.presolve = GLP_OFF; glp_cpx_basis(P); break;
        case 1: sm.meth = GLP_DUAL; sm.presolve = GLP_OFF; glp_std_basis(P); break;
        case 2: sm.meth = GLP_PRIMAL; sm.presolve = GLP_OFF; glp_std_basis(P); break;
        default: sm.meth = GLP_PRIMAL; sm.presolve = GLP_ON; glp_std_basis(P); break;
        }
        int rc = glp_simplex(P, &sm);
        if (rc == 0 && glp_get_status(P) == GLP_OPT) return LP_OPTIMAL;
        if (rc == GLP_ETMLIM) return LP_TIMEOUT;
        if (rc == GLP_ENOPFS || (rc == 0 && glp_get_status(P) == GLP_NOFEAS)) said_infeasible = true;
        if (verbose)
            fprintf(stderr, "[autopar sharding] LP variant %d: code %d, status %d; trying the "
                    "next\n", variant, rc, glp_get_status(P));
    }
    return said_infeasible ? LP_INFEASIBLE : LP_FAILED;
}

/* One GLPK solve with the memory rows marked in `active` (see ap_shard_problem_solve_mode).
 * time_limit: seconds left. */
static ap_status solve_once(ap_shard_problem *p, int mode, const bool *active, double time_limit,
                            int *choice, double *objective) {
    double t0 = ap_shard_now();
    ap_status st = AUTOPAR_OK;
    p->solve_timed_out = false;
    p->hit_time_limit = false;
    int ng = p->n_groups, S = p->n_strat_total;
    int *only = malloc(sizeof(int) * (size_t)(ng + 1));
    double *obj = malloc(sizeof(double) * (size_t)(S + 1));
    double *obj_mem = malloc(sizeof(double) * (size_t)(S + 1));
    int *col = calloc((size_t)S + 1, sizeof(int));
    bool *fold = calloc((size_t)p->n_edges + 1, sizeof(bool));
    int *greedy = malloc(sizeof(int) * (size_t)(ng + 1));
    glp_prob *P = NULL;
    int term_prev = GLP_ON;
    bool term_set = false;
    bool *row_used = NULL;
    int *ia = NULL, *ja = NULL;
    double *ar = NULL, *x0 = NULL;
    if (!only || !obj || !obj_mem || !col || !fold || !greedy) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        goto done;
    }
    double cnst = 0;
    for (int gi = 0; gi < ng; gi++) {
        const ap_group *gr = &p->groups[gi];
        only[gi] = group_only(gr);
        for (int j = 0; j < gr->n_strat; j++) obj[p->group_off[gi] + j] = gr->cost[j];
        if (only[gi] >= 0) cnst += gr->cost[only[gi]];
    }
    /* Additive edge matrices fold into the two groups' costs. */
    for (int e = 0; e < p->n_edges; e++) {
        const ap_gedge *E = &p->edges[e];
        if (!E->cost) {
            fold[e] = true;
            continue;
        }
        const ap_group *A = &p->groups[E->a], *B = &p->groups[E->b];
        int kb = B->n_strat, i0 = -1, j0 = -1;
        double mx = 0;
        bool additive = true;
        for (int i = 0; i < A->n_strat && additive; i++) {
            if (!A->ok[i]) continue;
            if (i0 < 0) i0 = i;
            for (int j = 0; j < kb; j++) {
                if (!B->ok[j]) continue;
                if (j0 < 0) j0 = j;
                double c = E->cost[(size_t)i * kb + j];
                if (isinf(c)) additive = false;
                else if (fabs(c) > mx) mx = fabs(c);
            }
        }
        if (!additive || i0 < 0 || j0 < 0) continue;
        double c00 = E->cost[(size_t)i0 * kb + j0], tol = 1e-12 * mx;
        for (int i = 0; i < A->n_strat && additive; i++) {
            if (!A->ok[i]) continue;
            for (int j = 0; j < kb && additive; j++) {
                if (!B->ok[j]) continue;
                double pred = E->cost[(size_t)i * kb + j0] + E->cost[(size_t)i0 * kb + j] - c00;
                if (fabs(E->cost[(size_t)i * kb + j] - pred) > tol) additive = false;
            }
        }
        if (!additive) continue;
        fold[e] = true;
        for (int i = 0; i < A->n_strat; i++)
            if (A->ok[i]) obj[p->group_off[E->a] + i] += E->cost[(size_t)i * kb + j0] - c00;
        for (int j = 0; j < kb; j++)
            if (B->ok[j]) obj[p->group_off[E->b] + j] += E->cost[(size_t)i0 * kb + j];
    }
    /* Scale the objective so that its largest coefficient is 1e6: GLPK's absolute tolerances
     * (1e-7 and the like) then sit far below any cost difference that matters. */
    double mx = 0;
    for (int gi = 0; gi < ng; gi++)
        for (int j = 0; j < p->groups[gi].n_strat; j++)
            if (p->groups[gi].ok[j] && fabs(obj[p->group_off[gi] + j]) > mx)
                mx = fabs(obj[p->group_off[gi] + j]);
    for (int e = 0; e < p->n_edges; e++) {
        if (fold[e]) continue;
        const ap_gedge *E = &p->edges[e];
        size_t kk = (size_t)p->groups[E->a].n_strat * (size_t)p->groups[E->b].n_strat;
        for (size_t i = 0; i < kk; i++)
            if (isfinite(E->cost[i]) && fabs(E->cost[i]) > mx) mx = fabs(E->cost[i]);
    }
    /* Tie-breaker: among plans of equal cost, prefer the one holding fewer bytes per device
     * (e.g. an input that arrives split rather than replicated and sliced). Its total weight
     * is at most 1e-10 of the largest cost coefficient, far below any cost difference the
     * model means. */
    {
        double tot = 0;
        for (int gi = 0; gi < ng; gi++) {
            const ap_group *gr = &p->groups[gi];
            double best = 0;
            for (int j = 0; j < gr->n_strat; j++) {
                double m = 0;
                for (int mi = 0; mi < gr->n_members; mi++)
                    m += p->st[p->members[gr->first_member + mi]][j].mem;
                obj_mem[p->group_off[gi] + j] = m;
                if (m > best) best = m;
            }
            tot += best;
        }
        double tie = tot > 0 && mx > 0 ? 1e-10 * mx / tot : 0.0;
        for (int gi = 0; gi < ng; gi++)
            for (int j = 0; j < p->groups[gi].n_strat; j++)
                obj[p->group_off[gi] + j] += tie * obj_mem[p->group_off[gi] + j];
    }
    double scale = mx > 0 ? 1e6 / mx : 1.0;
    if (mode == 1) scale = 0.0;

    /* GLPK prints some notes (scaling) whatever msg_lev says: silence its terminal unless
     * AUTOPAR_VERBOSE, and restore the caller's setting afterwards. */
    term_prev = glp_term_out(p->verbose ? GLP_ON : GLP_OFF);
    term_set = true;
    P = glp_create_prob();
    glp_set_obj_dir(P, GLP_MIN);
    int n_int = 0;
    for (int gi = 0; gi < ng; gi++) {
        if (only[gi] >= 0) continue;
        const ap_group *gr = &p->groups[gi];
        for (int j = 0; j < gr->n_strat; j++) {
            if (!gr->ok[j]) continue;
            int c = glp_add_cols(P, 1);
            glp_set_col_kind(P, c, GLP_BV);
            glp_set_obj_coef(P, c, obj[p->group_off[gi] + j] * scale);
            col[p->group_off[gi] + j] = c;
            n_int++;
        }
    }
    /* count nonzeros to size the triplet arrays */
    size_t nnz = 0;
    for (int gi = 0; gi < ng; gi++)
        if (only[gi] < 0) nnz += (size_t)p->groups[gi].n_strat;
    for (int e = 0; e < p->n_edges; e++) {
        if (fold[e]) continue;
        const ap_gedge *E = &p->edges[e];
        nnz += 2 * (size_t)p->groups[E->a].n_strat * (size_t)p->groups[E->b].n_strat +
               (size_t)p->groups[E->a].n_strat + (size_t)p->groups[E->b].n_strat;
    }
    bool mem_rows = (mode == 0 && p->budget >= 0) || mode == 1;
    /* A row that stays within the budget whatever the choice (its constant plus every group's
     * largest coefficient) can never bind: leave it out (the usual case with a generous
     * budget; such rows slow GLPK down a lot). The peak-minimising mode keeps all rows. */
    row_used = calloc((size_t)p->n_rows + 1, sizeof(bool));
    int *var_group = malloc(sizeof(int) * (size_t)(S + 1));
    if (!row_used || !var_group) {
        free(row_used);
        free(var_group);
        st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        goto done;
    }
    for (int gi = 0; gi < ng; gi++)
        for (int j = 0; j < p->groups[gi].n_strat; j++) var_group[p->group_off[gi] + j] = gi;
    int n_mem_rows = 0;
    for (int r = 0; mem_rows && r < p->n_rows; r++) {
        const ap_memrow *R = &p->rows[r];
        bool need = active[r] && mode == 1;
        if (active[r] && !need) {
            double worst = R->cnst, gmax = 0;
            int cur = -1;
            for (int q = 0; q < R->nnz; q++) {
                int gi = var_group[R->var[q]];
                if (gi != cur) {
                    worst += gmax;
                    gmax = 0;
                    cur = gi;
                }
                if (col[R->var[q]] && R->coef[q] > gmax) gmax = R->coef[q];
            }
            worst += gmax;
            need = worst > p->budget;
        }
        if (need) {
            row_used[r] = true;
            nnz += (size_t)R->nnz + 1;
            n_mem_rows++;
        }
    }
    free(var_group);
    ia = malloc(sizeof(int) * (nnz + 1));
    ja = malloc(sizeof(int) * (nnz + 1));
    ar = malloc(sizeof(double) * (nnz + 1));
    if (!ia || !ja || !ar) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory for the ILP (%zu nonzeros)", nnz);
        goto done;
    }
    size_t nz = 0;
#define PUT(r_, c_, v_) do { nz++; ia[nz] = (r_); ja[nz] = (c_); ar[nz] = (v_); } while (0)
    for (int gi = 0; gi < ng; gi++) {
        if (only[gi] >= 0) continue;
        int r = glp_add_rows(P, 1);
        glp_set_row_bnds(P, r, GLP_FX, 1.0, 1.0);
        for (int j = 0; j < p->groups[gi].n_strat; j++)
            if (col[p->group_off[gi] + j]) PUT(r, col[p->group_off[gi] + j], 1.0);
    }
    for (int e = 0; e < p->n_edges; e++) {
        if (fold[e]) continue;
        const ap_gedge *E = &p->edges[e];
        const ap_group *A = &p->groups[E->a], *B = &p->groups[E->b];
        int ka = A->n_strat, kb = B->n_strat;
        int first = glp_get_num_cols(P) + 1;
        int *ecol = calloc((size_t)ka * (size_t)kb, sizeof(int));
        if (!ecol) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
            goto done;
        }
        int cnt = 0;
        for (int i = 0; i < ka; i++)
            for (int j = 0; j < kb; j++)
                if (A->ok[i] && B->ok[j] && isfinite(E->cost[(size_t)i * kb + j])) cnt++;
        if (cnt > 0) glp_add_cols(P, cnt);
        int c = first;
        for (int i = 0; i < ka; i++)
            for (int j = 0; j < kb; j++) {
                if (!(A->ok[i] && B->ok[j] && isfinite(E->cost[(size_t)i * kb + j]))) continue;
                glp_set_col_bnds(P, c, GLP_LO, 0.0, 0.0);
                glp_set_obj_coef(P, c, E->cost[(size_t)i * kb + j] * scale);
                ecol[(size_t)i * kb + j] = c++;
            }
        for (int i = 0; i < ka; i++) {
            if (!A->ok[i]) continue;
            int r = glp_add_rows(P, 1);
            glp_set_row_bnds(P, r, GLP_FX, 0.0, 0.0);
            PUT(r, col[p->group_off[E->a] + i], -1.0);
            for (int j = 0; j < kb; j++)
                if (ecol[(size_t)i * kb + j]) PUT(r, ecol[(size_t)i * kb + j], 1.0);
        }
        for (int j = 0; j < kb; j++) {
            if (!B->ok[j]) continue;
            int r = glp_add_rows(P, 1);
            glp_set_row_bnds(P, r, GLP_FX, 0.0, 0.0);
            PUT(r, col[p->group_off[E->b] + j], -1.0);
            for (int i = 0; i < ka; i++)
                if (ecol[(size_t)i * kb + j]) PUT(r, ecol[(size_t)i * kb + j], 1.0);
        }
        free(ecol);
    }
    int zcol = 0;
    if (mode == 1) {
        zcol = glp_add_cols(P, 1);
        glp_set_col_bnds(P, zcol, GLP_LO, 0.0, 0.0);
        glp_set_obj_coef(P, zcol, 1.0 / (p->budget > 0 ? p->budget : 1e9));
    }
    if (mem_rows) {
        for (int ri = 0; ri < p->n_rows; ri++) {
            if (!row_used[ri]) continue;
            const ap_memrow *R = &p->rows[ri];
            int r = glp_add_rows(P, 1);
            /* bytes are large next to the 0/1 structure: express the row in units of its
             * largest coefficient (GLPK's branch-and-cut misjudges feasibility otherwise) */
            double unit = 0;
            for (int q = 0; q < R->nnz; q++)
                if (col[R->var[q]] && R->coef[q] > unit) unit = R->coef[q];
            if (mode == 1 || unit <= 0) unit = 1.0;
            for (int q = 0; q < R->nnz; q++)
                if (col[R->var[q]] && R->coef[q] != 0.0) PUT(r, col[R->var[q]], R->coef[q] / unit);
            if (mode == 1) {
                PUT(r, zcol, -1.0);
                glp_set_row_bnds(P, r, GLP_UP, 0.0, -R->cnst);
            } else {
                glp_set_row_bnds(P, r, GLP_UP, 0.0, (p->budget - R->cnst) / unit);
            }
        }
    }
#undef PUT
    free(row_used);
    row_used = NULL;
    if (nz > 0) glp_load_matrix(P, (int)nz, ia, ja, ar);
    p->n_cols = glp_get_num_cols(P);
    p->n_int_cols = n_int;
    p->n_lp_rows = glp_get_num_rows(P);
    p->n_nonzeros = (int)nz;
    double t_build = ap_shard_now();

    for (int gi = 0; gi < ng; gi++) choice[gi] = only[gi];
    bool optimal = true;
    if (p->n_cols > 0) {
        /* warm start */
        x0 = calloc((size_t)p->n_cols + 1, sizeof(double));
        if (!x0) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
            goto done;
        }
        bool have_ws = mode == 0 && greedy_choice(p, only, greedy);
        if (have_ws) {
            for (int gi = 0; gi < ng; gi++)
                if (only[gi] < 0) x0[col[p->group_off[gi] + greedy[gi]]] = 1.0;
            /* e columns: the product; found by scanning each edge's rows is costly, so fill by
             * recomputing the column numbering in the same order as above */
            int c = 0;
            for (int e = 0; e < p->n_edges && have_ws; e++) {
                if (fold[e]) continue;
                const ap_gedge *E = &p->edges[e];
                const ap_group *A = &p->groups[E->a], *B = &p->groups[E->b];
                int ka = A->n_strat, kb = B->n_strat;
                if (c == 0) c = n_int + 1;
                for (int i = 0; i < ka; i++)
                    for (int j = 0; j < kb; j++) {
                        if (!(A->ok[i] && B->ok[j] && isfinite(E->cost[(size_t)i * kb + j])))
                            continue;
                        if (i == greedy[E->a] && j == greedy[E->b]) x0[c] = 1.0;
                        c++;
                    }
                if (!isfinite(E->cost[(size_t)greedy[E->a] * kb + greedy[E->b]])) have_ws = false;
            }
            /* memory rows */
            for (int ri = 0; ri < p->n_rows && have_ws && p->budget >= 0; ri++) {
                const ap_memrow *R = &p->rows[ri];
                double m = R->cnst;
                for (int q = 0; q < R->nnz; q++)
                    if (col[R->var[q]] && x0[col[R->var[q]]] > 0.5) m += R->coef[q];
                if (m > p->budget) have_ws = false;
            }
        }
        /* LP relaxation: dual simplex from a crash basis, without GLPK's LP presolver. On
         * these problems (one-hot rows, edge marginals) this is ~10x faster than the primal
         * simplex or the presolved LP (docs/intra-op.md has the measurements), and the LP is
         * often integral already. With opt.ilp_presolve the MIP goes straight to glp_intopt
         * with its MIP presolver instead, at the price of the warm start (the presolver
         * renumbers the columns, so a heuristic solution cannot be injected). */
        int rc = 0;
        int left_ms = (int)(time_limit * 1000.0);
        glp_scale_prob(P, GLP_SF_AUTO);
        if (!p->opt.ilp_presolve) {
            int lp = solve_lp_robust(P, left_ms, p->verbose);
            if (lp == LP_INFEASIBLE) {
                st = AUTOPAR_ERR_INFEASIBLE;
                goto done;
            }
            if (lp == LP_TIMEOUT) {
                p->solve_timed_out = true;
                st = ap_error(AUTOPAR_ERR_INFEASIBLE, "sharding: the ILP's LP relaxation did not "
                              "finish within the time limit of %g s", p->opt.time_limit);
                goto done;
            }
            if (lp != LP_OPTIMAL) {
                st = ap_error(AUTOPAR_ERR_BACKEND, "sharding: GLPK could not solve the LP "
                              "relaxation (%d columns, %d rows) with any simplex variant",
                              glp_get_num_cols(P), glp_get_num_rows(P));
                goto done;
            }
        }
        glp_iocp io;
        glp_init_iocp(&io);
        io.msg_lev = p->verbose ? GLP_MSG_ON : GLP_MSG_OFF;
        io.presolve = p->opt.ilp_presolve ? GLP_ON : GLP_OFF;
        heur_ctx hc = {have_ws && !p->opt.ilp_presolve ? x0 : NULL, false};
        io.cb_func = mip_callback;
        io.cb_info = &hc;
        double used = ap_shard_now() - t_build;
        left_ms = (int)((time_limit - used) * 1000.0);
        io.tm_lim = left_ms > 1 ? left_ms : 1;
        io.mip_gap = 0.0;
        rc = glp_intopt(P, &io);
        int ms = glp_mip_status(P);
        if (rc == GLP_ETMLIM) p->hit_time_limit = true;
        if (ms == GLP_NOFEAS || rc == GLP_ENOPFS || rc == GLP_ENODFS) {
            st = AUTOPAR_ERR_INFEASIBLE;
            goto done;
        }
        if (ms != GLP_OPT && ms != GLP_FEAS) {
            if (rc == GLP_ETMLIM) {
                p->solve_timed_out = true;
                st = ap_error(AUTOPAR_ERR_INFEASIBLE, "sharding: no plan found within the time "
                              "limit of %g s", p->opt.time_limit);
            } else {
                st = ap_error(AUTOPAR_ERR_BACKEND, "sharding: GLPK branch-and-cut failed "
                              "(code %d, status %d)", rc, ms);
            }
            goto done;
        }
        optimal = ms == GLP_OPT && rc == 0;
        for (int gi = 0; gi < ng; gi++) {
            if (only[gi] >= 0) continue;
            int best = -1;
            double bv = -1;
            for (int j = 0; j < p->groups[gi].n_strat; j++) {
                int c = col[p->group_off[gi] + j];
                if (!c) continue;
                double v = glp_mip_col_val(P, c);
                if (v > bv) {
                    bv = v;
                    best = j;
                }
            }
            choice[gi] = best;
        }
        if (objective)
            *objective = mode == 1 ? glp_mip_col_val(P, zcol) : glp_mip_obj_val(P) / scale + cnst;
    } else {
        /* nothing to choose: every group has one strategy */
        double peak = 0;
        for (int ri = 0; ri < p->n_rows; ri++)
            if (p->rows[ri].cnst > peak) peak = p->rows[ri].cnst;
        if (mode == 0 && p->budget >= 0 && peak > p->budget) {
            st = AUTOPAR_ERR_INFEASIBLE;
            goto done;
        }
        if (objective) *objective = mode == 1 ? peak : cnst;
    }
    p->optimal = optimal;
    p->solve_seconds = ap_shard_now() - t0;
    if (p->verbose)
        fprintf(stderr,
                "[autopar sharding] ILP mode %d: %d cols (%d binary), %d rows, %zu nonzeros; "
                "build %.3f s, solve %.3f s, %s\n",
                mode, p->n_cols, p->n_int_cols, p->n_lp_rows, nz, t_build - t0,
                p->solve_seconds - (t_build - t0), optimal ? "optimal" : "time limit");
done:
    if (st) p->solve_seconds = ap_shard_now() - t0;
    if (st == AUTOPAR_ERR_INFEASIBLE && p->verbose)
        fprintf(stderr, "[autopar sharding] ILP mode %d infeasible\n", mode);
    if (P) glp_delete_prob(P);
    if (term_set) glp_term_out(term_prev);
    free(row_used);
    free(only);
    free(obj);
    free(obj_mem);
    free(col);
    free(fold);
    free(greedy);
    free(ia);
    free(ja);
    free(ar);
    free(x0);
    return st;
}

/* Value of memory row r under a choice. */
static double row_value(const ap_shard_problem *p, const ap_memrow *R, const int *choice,
                        const int *var_group) {
    double m = R->cnst;
    for (int q = 0; q < R->nnz; q++) {
        int gi = var_group[R->var[q]];
        if (R->var[q] - p->group_off[gi] == choice[gi]) m += R->coef[q];
    }
    return m;
}

/*
 * Memory rows are added lazily: the first solve has none; the rows the solution violates (its
 * live bytes there exceed the budget, or in mode 1 the peak variable) are added, a few at a
 * time, and the ILP is solved again, until the solution satisfies every row. The result is
 * exact: it is optimal for a subset of the constraints and satisfies all of them. Dense memory
 * rows slow GLPK down by an order of magnitude, and usually only one or two of them bind.
 */
AP_INTERNAL ap_status ap_shard_problem_solve_mode(ap_shard_problem *p, int mode, int *choice,
                                                  double *objective) {
    double t0 = ap_shard_now();
    ap_status st = AUTOPAR_OK;
    if ((mode == 1 || p->budget >= 0) && (st = build_rows(p))) return st;
    bool *active = calloc((size_t)p->n_rows + 1, sizeof(bool));
    int *var_group = malloc(sizeof(int) * (size_t)(p->n_strat_total + 1));
    int *order = malloc(sizeof(int) * (size_t)(p->n_rows + 1));
    double *viol = malloc(sizeof(double) * (size_t)(p->n_rows + 1));
    if (!active || !var_group || !order || !viol) {
        free(active);
        free(var_group);
        free(order);
        free(viol);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    for (int gi = 0; gi < p->n_groups; gi++)
        for (int j = 0; j < p->groups[gi].n_strat; j++) var_group[p->group_off[gi] + j] = gi;
    bool use_rows = mode == 1 || p->budget >= 0;
    /* mode 1 needs at least one row to bound the peak variable: the largest constant one */
    if (mode == 1 && p->n_rows > 0) {
        int best = 0;
        for (int r = 1; r < p->n_rows; r++)
            if (p->rows[r].cnst > p->rows[best].cnst) best = r;
        active[best] = true;
    }
    double solve = 0;
    int rounds = 0, n_active = mode == 1 && p->n_rows > 0 ? 1 : 0;
    int cols = 0, icols = 0, lrows = 0, nnz = 0;
    bool optimal = true;
    for (;;) {
        double left = p->opt.time_limit - (ap_shard_now() - t0);
        if (left <= 0) {
            p->solve_timed_out = true;
            st = ap_error(AUTOPAR_ERR_INFEASIBLE, "sharding: no plan found within the time limit "
                          "of %g s", p->opt.time_limit);
            break;
        }
        double obj = 0;
        st = solve_once(p, mode, active, left, choice, &obj);
        rounds++;
        solve += p->solve_seconds;
        if (!p->opt.ilp_presolve && !p->solve_timed_out && !p->hit_time_limit &&
            (st == AUTOPAR_ERR_INFEASIBLE || (st == AUTOPAR_OK && !p->optimal))) {
            /* GLPK's simplex can misjudge these degenerate problems (a false "no integer
             * solution", an aborted tree): ask its other path for a second opinion and keep
             * the better answer. */
            int *alt = malloc(sizeof(int) * (size_t)(p->n_groups + 1));
            if (!alt) {
                st = ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
                break;
            }
            double obj2 = 0;
            bool opt1 = p->optimal;
            p->opt.ilp_presolve = true;
            ap_status st2 = solve_once(p, mode, active, p->opt.time_limit - (ap_shard_now() - t0),
                                       alt, &obj2);
            p->opt.ilp_presolve = false;
            solve += p->solve_seconds;
            if (p->verbose)
                fprintf(stderr, "[autopar sharding] second opinion (MIP presolver): status %d, "
                        "objective %.9g (first: status %d, %.9g)\n", st2, obj2, st, obj);
            if (st2 == AUTOPAR_OK && (st != AUTOPAR_OK || obj2 < obj)) {
                memcpy(choice, alt, sizeof(int) * (size_t)p->n_groups);
                obj = obj2;
                st = AUTOPAR_OK;
            } else if (st == AUTOPAR_OK) {
                /* kept the first answer: it is optimal if either solve proved optimality */
                p->optimal = opt1 || (st2 == AUTOPAR_OK && p->optimal);
            }
            free(alt);
        }
        cols = p->n_cols;
        icols = p->n_int_cols;
        lrows = p->n_lp_rows;
        nnz = p->n_nonzeros;
        optimal = optimal && p->optimal;
        if (st) break;
        if (objective) *objective = obj;
        if (!use_rows) break;
        /* rows the solution violates */
        double bound = mode == 1 ? obj : p->budget;
        int nv = 0;
        for (int r = 0; r < p->n_rows; r++) {
            if (active[r]) continue;
            double v = row_value(p, &p->rows[r], choice, var_group);
            double tol = 1e-9 * (fabs(bound) + 1.0);
            if (v > bound + tol) {
                viol[r] = v;
                order[nv++] = r;
            }
        }
        if (nv == 0) break;
        /* add the 4 most violated */
        for (int k = 0; k < 4 && k < nv; k++) {
            int bi = k;
            for (int i = k + 1; i < nv; i++)
                if (viol[order[i]] > viol[order[bi]]) bi = i;
            int tmp = order[k];
            order[k] = order[bi];
            order[bi] = tmp;
            active[order[k]] = true;
            n_active++;
        }
        if (p->verbose)
            fprintf(stderr, "[autopar sharding] %d memory row(s) violated, %d active\n", nv,
                    n_active);
    }
    if (p->verbose && use_rows)
        fprintf(stderr, "[autopar sharding] mode %d: %d solve round(s), %d of %d memory rows "
                "used\n", mode, rounds, n_active, p->n_rows);
    if (mode == 1 && !st && objective) {
        /* the peak of the final choice over every row */
        double peak = 0;
        for (int r = 0; r < p->n_rows; r++) {
            double v = row_value(p, &p->rows[r], choice, var_group);
            if (v > peak) peak = v;
        }
        *objective = peak;
    }
    p->solve_seconds = solve;
    p->n_cols = cols;
    p->n_int_cols = icols;
    p->n_lp_rows = lrows;
    p->n_nonzeros = nnz;
    p->optimal = optimal;
    free(active);
    free(var_group);
    free(order);
    free(viol);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Independent evaluation                                                                      */
/* ------------------------------------------------------------------------------------------ */

AP_INTERNAL void ap_shard_problem_eval(const ap_shard_problem *pc, const int *choice,
                                       double *objective, double *peak_memory, bool *feasible) {
    /* the resharding cache is a memo of ap_reshard_cost, filled lazily */
    ap_shard_problem *p = (ap_shard_problem *)pc;
    const autopar_graph *g = p->g;
    double total = 0;
    bool ok = true;
    for (int gi = 0; gi < p->n_groups && ok; gi++)
        if (choice[gi] < 0 || choice[gi] >= p->groups[gi].n_strat) ok = false;
    for (int t = 0; t < p->n_order && ok; t++) {
        const ap_node *v = g->nodes[p->order[t]];
        const ap_nstrat *ns = &p->st[v->id][choice[p->group[v->id]]];
        if (!ns->ok) {
            ok = false;
            break;
        }
        total += ns->compute + ns->penalty + ns->comm;
        for (int k = 0; k < v->n_src && ok; k++) {
            int u = operand_of(p, v, k);
            const ap_nstrat *us = &p->st[u][choice[p->group[u]]];
            if (!us->ok) {
                ok = false;
                break;
            }
            double c;
            if (!ap_shard_reshard(p, u, &us->out, &ns->in[k], &c, NULL))
                ok = false;
            else
                total += c;
        }
    }
    double peak = 0;
    int at;
    if (ok && peak_memory && ap_shard_problem_peak(p, choice, &peak, &at) != AUTOPAR_OK)
        peak = INFINITY;
    if (objective) *objective = ok ? total : INFINITY;
    if (peak_memory) *peak_memory = ok ? peak : INFINITY;
    if (feasible) *feasible = ok;
}

AP_INTERNAL ap_status ap_shard_problem_peak(const ap_shard_problem *p, const int *choice,
                                            double *peak, int *peak_node) {
    int *start, *end;
    ap_status st = live_intervals(p, &start, &end);
    if (st) return st;
    double *delta = calloc((size_t)p->n_order + 1, sizeof(double));
    if (!delta) {
        free(start);
        free(end);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    for (int i = 0; i < p->n; i++) {
        if (start[i] < 0) continue;
        double m = p->st[i][choice[p->group[i]]].mem;
        delta[start[i]] += m;
        delta[end[i] + 1] -= m;
    }
    double cur = 0, best = 0;
    int at = p->n_order > 0 ? p->order[0] : -1;
    for (int t = 0; t < p->n_order; t++) {
        cur += delta[t];
        if (cur > best) {
            best = cur;
            at = p->order[t];
        }
    }
    free(delta);
    free(start);
    free(end);
    *peak = best;
    *peak_node = at;
    return AUTOPAR_OK;
}
