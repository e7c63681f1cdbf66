/*
 * The pass's entry point, plans (building, printing, JSON) and the public problem API.
 * Layer reuse lives in shard_layers.c.
 */
#include "shard_internal.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

/* Defined in shard_layers.c: solves a stage by reusing identical layers. *handled = false when
 * the stage has no repeated layers (the caller then solves it flat). */
AP_INTERNAL ap_status ap_shard_stage_layers(const autopar_graph *g, const int *nodes, int n_nodes,
                                            const ap_mesh *mesh, const autopar_cluster *cluster,
                                            const ap_shard_options *opt, bool *handled,
                                            ap_shard_plan **out);

AP_INTERNAL void ap_shard_options_default(ap_shard_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->memory_budget = -1.0;
    o->time_limit = 60.0;
    o->force_batch_dim_to_mesh_axis = -1;
    o->allow_all_gather = true;
    o->allow_mixed_mesh = false;
    o->prefer_reduce_scatter = false;
    o->communication_only = false;
    o->allow_replicated_params = true;
    o->batch_matmul_always_split_batch = true;
    o->solve_per_layer = true;
    o->flop_type = AP_FLOPS_F32;
    o->layer_of = NULL;
    o->cache = NULL;
}

static ap_status check_args(const autopar_graph *g, const int *nodes, int n_nodes,
                            const ap_mesh *mesh, const autopar_cluster *cluster,
                            const ap_shard_options *opt) {
    if (!g || !mesh || !opt)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding: graph, mesh or options is NULL");
    if (g->status != AUTOPAR_OK)
        return ap_error(AUTOPAR_ERR_GRAPH, "sharding: the graph has an error: %s", g->error);
    if (nodes && n_nodes < 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding: n_nodes %d < 0", n_nodes);
    if (!cluster && !opt->communication_only)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding: compute costs need a cluster (or "
                        "set communication_only)");
    if (!(opt->time_limit > 0) || !isfinite(opt->time_limit))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding: time_limit %g must be > 0",
                        opt->time_limit);
    if (opt->force_batch_dim_to_mesh_axis < -1 || opt->force_batch_dim_to_mesh_axis > 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "sharding: force_batch_dim_to_mesh_axis %d must be -1, 0 or 1",
                        opt->force_batch_dim_to_mesh_axis);
    if (isnan(opt->memory_budget))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding: memory_budget is NaN");
    if ((int)opt->flop_type < 0 || opt->flop_type > AP_FLOPS_F16)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding: bad flop_type %d", (int)opt->flop_type);
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Problem API                                                                                 */
/* ------------------------------------------------------------------------------------------ */

AP_INTERNAL ap_status ap_shard_problem_build(const autopar_graph *g, const int *nodes,
                                             int n_nodes, const ap_mesh *mesh,
                                             const autopar_cluster *cluster,
                                             const ap_shard_options *opt,
                                             ap_shard_problem **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding: out is NULL");
    *out = NULL;
    ap_status st = check_args(g, nodes, n_nodes, mesh, cluster, opt);
    if (st) return st;
    ap_shard_problem *p;
    if ((st = ap_shard_problem_alloc(g, mesh, cluster, opt, &p))) return st;
    if ((st = ap_shard_problem_set_stage(p, nodes, n_nodes)) || (st = ap_shard_problem_assemble(p))) {
        ap_shard_problem_free(p);
        return st;
    }
    *out = p;
    return AUTOPAR_OK;
}

AP_INTERNAL int ap_shard_problem_n_groups(const ap_shard_problem *p) { return p ? p->n_groups : 0; }

AP_INTERNAL int ap_shard_problem_group_size(const ap_shard_problem *p, int i) {
    if (!p || i < 0 || i >= p->n_groups) return 0;
    return p->groups[i].n_strat;
}

static double gib(double b) { return b / (1024.0 * 1024.0 * 1024.0); }

/* Solves; when the budget cannot be met, finds the smallest budget that can (a second ILP that
 * minimises the peak) and says so. */
static ap_status solve_or_explain(ap_shard_problem *p, int *choice) {
    ap_status st = ap_shard_problem_solve_mode(p, 0, choice, NULL);
    if (st != AUTOPAR_ERR_INFEASIBLE || p->solve_timed_out) return st;
    const char *what = p->n_order == p->n ? "the graph" : "the stage";
    if (p->budget < 0)
        return ap_error(AUTOPAR_ERR_INFEASIBLE,
                        "sharding: no combination of strategies of %s (%d nodes) is realisable "
                        "on mesh %d x %d under the options (forbidden reshardings)",
                        what, p->n_order, p->mesh->shape[0], p->mesh->shape[1]);
    double z;
    st = ap_shard_problem_solve_mode(p, 1, choice, &z);
    if (st == AUTOPAR_ERR_INFEASIBLE && !p->solve_timed_out)
        return ap_error(AUTOPAR_ERR_INFEASIBLE,
                        "sharding: no combination of strategies of %s (%d nodes) is realisable "
                        "on mesh %d x %d under the options (forbidden reshardings)",
                        what, p->n_order, p->mesh->shape[0], p->mesh->shape[1]);
    if (st) return st;
    double peak;
    int at;
    if ((st = ap_shard_problem_peak(p, choice, &peak, &at))) return st;
    double need = ceil(peak);
    return ap_error(AUTOPAR_ERR_INFEASIBLE,
                    "sharding: no plan of %s (%d nodes) fits the memory budget of %.0f bytes "
                    "(%.3f GiB) per device on mesh %d x %d; the smallest budget that fits is "
                    "%.0f bytes (%.3f GiB)%s, peaking at '%s'",
                    what, p->n_order, p->budget, gib(p->budget), p->mesh->shape[0],
                    p->mesh->shape[1], need, gib(need),
                    p->optimal ? "" : " (best found within the time limit)",
                    at >= 0 ? p->g->nodes[at]->name : "?");
}

AP_INTERNAL ap_status ap_shard_problem_solve(ap_shard_problem *p, int *choice,
                                             double *objective) {
    if (!p || !choice) return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding: NULL argument");
    ap_status st = solve_or_explain(p, choice);
    if (st) return st;
    if (objective) ap_shard_problem_eval(p, choice, objective, NULL, NULL);
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Plans                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static const char *coll_short(ap_coll_kind k) {
    switch (k) {
    case AP_COLL_ALL_REDUCE: return "AR";
    case AP_COLL_ALL_GATHER: return "AG";
    case AP_COLL_REDUCE_SCATTER: return "RS";
    case AP_COLL_ALL_TO_ALL: return "A2A";
    default: return "P2P";
    }
}

static const char *axis_short(ap_mesh_axis a) {
    return a == AP_AXIS_0 ? "0" : a == AP_AXIS_1 ? "1" : "01";
}

static void make_label(const ap_shard_problem *p, const ap_node *v, const ap_nstrat *ns,
                       bool external, char *buf, size_t len) {
    char o[AP_SPEC_STR_MAX], a[AP_SPEC_STR_MAX], b[AP_SPEC_STR_MAX];
    ap_spec_str(&ns->out, o, sizeof o);
    size_t n;
    if (external) {
        n = (size_t)snprintf(buf, len, "%s (external)", o);
    } else if (v->n_src == 0) {
        if (!ap_spec_equal(&ns->out, &ns->aux) && v->op == AP_OP_PARAM)
            n = (size_t)snprintf(buf, len, "%s (state %s)", o, ap_spec_str(&ns->aux, a, sizeof a));
        else
            n = (size_t)snprintf(buf, len, "%s", o);
    } else if (v->n_src >= 2 && (v->op == AP_OP_MATMUL || v->op == AP_OP_BATCH_MATMUL ||
                                 v->op == AP_OP_EMBEDDING || v->op == AP_OP_EMBEDDING_BACK)) {
        n = (size_t)snprintf(buf, len, "%s = %s x %s", o, ap_spec_str(&ns->in[0], a, sizeof a),
                             ap_spec_str(&ns->in[1], b, sizeof b));
    } else {
        int f = p->follow[v->id];
        n = (size_t)snprintf(buf, len, "%s <- %s%s", o, ap_spec_str(&ns->in[0], a, sizeof a),
                             f >= 0 ? "" : " (root)");
    }
    for (int i = 0; i < ns->n_own && n < len; i++) {
        const ap_collective *c = &p->own[ns->own_first + i];
        n += (size_t)snprintf(buf + n, len - n, "%s%s@%s%s", i == 0 ? " (" : " ",
                              coll_short(c->kind), axis_short(c->axis),
                              i + 1 == ns->n_own ? ")" : "");
    }
}

static ap_status coll_push(ap_shard_plan *pl, int *cap, const ap_collective *c, int node,
                           int operand, int tensor) {
    if (pl->n_coll == *cap) {
        int nc = *cap ? 2 * *cap : 64;
        ap_shard_coll *n = realloc(pl->coll, (size_t)nc * sizeof *n);
        if (!n) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
        pl->coll = n;
        *cap = nc;
    }
    ap_shard_coll *d = &pl->coll[pl->n_coll++];
    d->kind = c->kind;
    d->axis = c->axis;
    d->bytes = c->bytes;
    d->time = c->time;
    d->node = node;
    d->operand = operand;
    d->tensor = tensor;
    d->from = c->from;
    d->to = c->to;
    return AUTOPAR_OK;
}

static ap_status plan_alloc(int n_nodes, ap_shard_plan **out) {
    ap_shard_plan *pl = calloc(1, sizeof *pl);
    if (!pl) return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    pl->n_nodes = n_nodes;
    pl->node = calloc((size_t)(n_nodes > 0 ? n_nodes : 1), sizeof *pl->node);
    if (!pl->node) {
        free(pl);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    for (int i = 0; i < n_nodes; i++) pl->node[i].group = -1;
    pl->peak_node = -1;
    *out = pl;
    return AUTOPAR_OK;
}

AP_INTERNAL ap_status ap_shard_problem_plan(const ap_shard_problem *pc, const int *choice,
                                            ap_shard_plan **out) {
    ap_shard_problem *p = (ap_shard_problem *)pc;   /* the reshard cache is filled lazily */
    if (!p || !choice || !out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding: NULL argument");
    *out = NULL;
    const autopar_graph *g = p->g;
    ap_shard_plan *pl = NULL;
    ap_status st = plan_alloc(p->n, &pl);
    if (st) return st;
    pl->mesh_shape[0] = p->mesh->shape[0];
    pl->mesh_shape[1] = p->mesh->shape[1];
    pl->memory_budget = p->budget;
    int cap = 0;
    for (int id = 0; id < p->n && !st; id++) {
        if (p->role[id] == AP_ROLE_NONE) continue;
        const ap_node *v = g->nodes[id];
        int j = choice[p->group[id]];
        const ap_nstrat *ns = &p->st[id][j];
        ap_shard_node *pn = &pl->node[id];
        bool ext = p->role[id] == AP_ROLE_EXTERNAL;
        if (!ns->ok) {
            st = ap_error(AUTOPAR_ERR_INFEASIBLE, "sharding: strategy %d of '%s' is not "
                          "realisable", j, v->name);
            break;
        }
        pn->in_stage = !ext;
        pn->external = ext;
        pn->spec = ns->out;
        pn->state_spec = ns->aux;
        pn->group = p->groups[p->group[id]].root;
        pn->memory = ns->mem;
        make_label(p, v, ns, ext, pn->strategy, sizeof pn->strategy);
        if (ext) continue;
        pn->n_src = v->n_src;
        pn->compute = ns->compute;
        pn->comm = ns->comm;
        pn->penalty = ns->penalty;
        for (int k = 0; k < v->n_src && !st; k++) {
            pn->in[k] = ns->in[k];
            int u = p->alias[v->src[k]] >= 0 ? p->alias[v->src[k]] : v->src[k];
            const ap_nstrat *us = &p->st[u][choice[p->group[u]]];
            double t;
            const ap_reshard *r;
            if (!ap_shard_reshard(p, u, &us->out, &ns->in[k], &t, &r)) {
                char a[AP_SPEC_STR_MAX], b[AP_SPEC_STR_MAX];
                st = ap_error(AUTOPAR_ERR_INFEASIBLE, "sharding: operand %d '%s' of '%s' cannot "
                              "be resharded from %s to %s", k, g->nodes[u]->name, v->name,
                              ap_spec_str(&us->out, a, sizeof a), ap_spec_str(&ns->in[k], b, sizeof b));
                break;
            }
            pn->reshard += t;
            for (int s = 0; r && s < r->n_steps && !st; s++)
                st = coll_push(pl, &cap, &r->step[s], id, k, v->src[k]);
        }
        for (int i = 0; i < ns->n_own && !st; i++)
            st = coll_push(pl, &cap, &p->own[ns->own_first + i], id, -1, id);
        pl->compute_cost += pn->compute;
        pl->comm_cost += pn->comm;
        pl->reshard_cost += pn->reshard;
        pl->penalty_cost += pn->penalty;
    }
    /* Alias: an update's result takes the place of its leaf, so their specs must agree. */
    for (int id = 0; id < p->n && !st; id++) {
        const ap_node *v = g->nodes[id];
        if (p->role[id] != AP_ROLE_STAGE || v->assign_to < 0) continue;
        if (p->role[v->assign_to] == AP_ROLE_NONE) continue;
        if (!ap_spec_equal(&pl->node[id].spec, &pl->node[v->assign_to].spec)) {
            char a[AP_SPEC_STR_MAX], b[AP_SPEC_STR_MAX];
            st = ap_error(AUTOPAR_ERR_GRAPH, "sharding: update '%s' has spec %s but the '%s' it "
                          "replaces has %s", v->name, ap_spec_str(&pl->node[id].spec, a, sizeof a),
                          g->nodes[v->assign_to]->name,
                          ap_spec_str(&pl->node[v->assign_to].spec, b, sizeof b));
        }
    }
    if (!st) st = ap_shard_problem_peak(p, choice, &pl->peak_memory, &pl->peak_node);
    if (st) {
        ap_shard_plan_free(pl);
        return st;
    }
    pl->objective = pl->compute_cost + pl->comm_cost + pl->reshard_cost + pl->penalty_cost;
    pl->optimal = p->optimal;
    pl->n_groups = p->n_groups;
    pl->n_cols = p->n_cols;
    pl->n_int_cols = p->n_int_cols;
    pl->n_rows = p->n_lp_rows;
    pl->n_nonzeros = p->n_nonzeros;
    pl->n_solves = 1;
    pl->build_seconds = p->build_seconds;
    pl->solve_seconds = p->solve_seconds;
    *out = pl;
    return AUTOPAR_OK;
}

AP_INTERNAL void ap_shard_plan_free(ap_shard_plan *p) {
    if (!p) return;
    free(p->node);
    free(p->coll);
    free(p);
}

/* ------------------------------------------------------------------------------------------ */
/* Entry point                                                                                 */
/* ------------------------------------------------------------------------------------------ */

AP_INTERNAL ap_status ap_shard_stage_flat(const autopar_graph *g, const int *nodes, int n_nodes,
                                          const ap_mesh *mesh, const autopar_cluster *cluster,
                                          const ap_shard_options *opt, ap_shard_plan **out) {
    ap_shard_problem *p;
    ap_status st = ap_shard_problem_build(g, nodes, n_nodes, mesh, cluster, opt, &p);
    if (st) return st;
    int *choice = malloc(sizeof(int) * (size_t)(p->n_groups + 1));
    if (!choice) {
        ap_shard_problem_free(p);
        return ap_error(AUTOPAR_ERR_NOMEM, "sharding: out of memory");
    }
    st = solve_or_explain(p, choice);
    if (!st) st = ap_shard_problem_plan(p, choice, out);
    free(choice);
    ap_shard_problem_free(p);
    return st;
}

AP_INTERNAL ap_status ap_shard_stage(const autopar_graph *g, const int *nodes, int n_nodes,
                                     const ap_mesh *mesh, const autopar_cluster *cluster,
                                     const ap_shard_options *opt, ap_shard_plan **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding: out is NULL");
    *out = NULL;
    ap_status st = check_args(g, nodes, n_nodes, mesh, cluster, opt);
    if (st) return st;
    double t0 = ap_shard_now();
    if (opt->solve_per_layer) {
        bool handled = false;
        st = ap_shard_stage_layers(g, nodes, n_nodes, mesh, cluster, opt, &handled, out);
        if (st || handled) {
            if (!st && ap_shard_verbose())
                fprintf(stderr, "[autopar sharding] stage solved by layer reuse in %.3f s\n",
                        ap_shard_now() - t0);
            return st;
        }
    }
    st = ap_shard_stage_flat(g, nodes, n_nodes, mesh, cluster, opt, out);
    if (!st && ap_shard_verbose())
        fprintf(stderr, "[autopar sharding] stage solved flat in %.3f s, objective %.6g s\n",
                ap_shard_now() - t0, (*out)->objective);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Printing                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static const char *axis_name(ap_mesh_axis a) {
    return a == AP_AXIS_0 ? "axis 0" : a == AP_AXIS_1 ? "axis 1" : "flat";
}

AP_INTERNAL void ap_shard_plan_print(const ap_shard_plan *p, const autopar_graph *g, FILE *f) {
    if (!f) return;
    if (!p) {
        fprintf(f, "sharding plan (null)\n");
        return;
    }
    fprintf(f, "sharding plan on mesh %d x %d: objective %.6g s = compute %.6g + communication "
            "%.6g + resharding %.6g + penalty %.6g\n",
            p->mesh_shape[0], p->mesh_shape[1], p->objective, p->compute_cost, p->comm_cost,
            p->reshard_cost, p->penalty_cost);
    fprintf(f, "  peak memory %.6g bytes (%.3f GiB) per device at '%s'", p->peak_memory,
            gib(p->peak_memory),
            g && p->peak_node >= 0 && p->peak_node < g->n_nodes ? g->nodes[p->peak_node]->name
                                                                : "?");
    if (p->memory_budget >= 0) fprintf(f, ", budget %.6g bytes", p->memory_budget);
    fprintf(f, "\n  ILP: %d merged nodes, %d columns (%d binary), %d rows, %d nonzeros; %d "
            "solve(s), %d layer(s) reused; build %.3f s, solve %.3f s%s\n",
            p->n_groups, p->n_cols, p->n_int_cols, p->n_rows, p->n_nonzeros, p->n_solves,
            p->n_layers_reused, p->build_seconds, p->solve_seconds,
            p->optimal ? "" : " (time limit reached)");
    for (int id = 0; id < p->n_nodes; id++) {
        const ap_shard_node *n = &p->node[id];
        if (!n->in_stage && !n->external) continue;
        const ap_node *v = g && id < g->n_nodes ? g->nodes[id] : NULL;
        char sp[AP_SPEC_STR_MAX];
        fprintf(f, "  %5d %-28s %-14s %-10s %-40s", id, v ? v->name : "?",
                v ? ap_op_name(v->op) : "?", ap_spec_str(&n->spec, sp, sizeof sp), n->strategy);
        if (n->compute + n->comm + n->reshard > 0)
            fprintf(f, " compute %.3g comm %.3g reshard %.3g", n->compute, n->comm, n->reshard);
        if (n->penalty > 0) fprintf(f, " penalty %.3g", n->penalty);
        fprintf(f, "\n");
    }
    if (p->n_coll) fprintf(f, "  collectives:\n");
    for (int i = 0; i < p->n_coll; i++) {
        const ap_shard_coll *c = &p->coll[i];
        char a[AP_SPEC_STR_MAX], b[AP_SPEC_STR_MAX];
        const char *tn = g && c->tensor >= 0 && c->tensor < g->n_nodes ? g->nodes[c->tensor]->name
                                                                       : "?";
        const char *nn = g && c->node >= 0 && c->node < g->n_nodes ? g->nodes[c->node]->name : "?";
        if (c->operand < 0)
            fprintf(f, "    %-14s %-6s %12.6g bytes %10.4g s  in '%s' (%s -> %s)\n",
                    ap_coll_kind_name(c->kind), axis_name(c->axis), c->bytes, c->time, nn,
                    ap_spec_str(&c->from, a, sizeof a), ap_spec_str(&c->to, b, sizeof b));
        else
            fprintf(f, "    %-14s %-6s %12.6g bytes %10.4g s  '%s' for operand %d of '%s' "
                    "(%s -> %s)\n",
                    ap_coll_kind_name(c->kind), axis_name(c->axis), c->bytes, c->time, tn,
                    c->operand, nn, ap_spec_str(&c->from, a, sizeof a),
                    ap_spec_str(&c->to, b, sizeof b));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* JSON                                                                                        */
/* ------------------------------------------------------------------------------------------ */

#define AP_SHARD_JSON_VERSION 1

static cJSON *spec_json(const ap_spec *s) {
    char b[AP_SPEC_STR_MAX];
    return cJSON_CreateString(ap_spec_str(s, b, sizeof b));
}

AP_INTERNAL ap_status ap_shard_plan_to_json(const ap_shard_plan *p, const autopar_graph *g,
                                            char **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_shard_plan_to_json: out is NULL");
    *out = NULL;
    if (!p) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_shard_plan_to_json: plan is NULL");
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL;
#define ADD(obj, key, item) do { cJSON *it_ = (item); if (!it_ || !cJSON_AddItemToObject((obj), (key), it_)) { cJSON_Delete(it_); ok = false; } } while (0)
    if (ok) {
        ADD(root, "format", cJSON_CreateString("autopar-shard-plan"));
        ADD(root, "version", cJSON_CreateNumber(AP_SHARD_JSON_VERSION));
        ADD(root, "mesh", cJSON_CreateIntArray(p->mesh_shape, 2));
        ADD(root, "n_nodes", cJSON_CreateNumber(p->n_nodes));
        ADD(root, "objective", cJSON_CreateNumber(p->objective));
        ADD(root, "compute", cJSON_CreateNumber(p->compute_cost));
        ADD(root, "communication", cJSON_CreateNumber(p->comm_cost));
        ADD(root, "resharding", cJSON_CreateNumber(p->reshard_cost));
        ADD(root, "penalty", cJSON_CreateNumber(p->penalty_cost));
        ADD(root, "peak_memory", cJSON_CreateNumber(p->peak_memory));
        ADD(root, "peak_node", cJSON_CreateNumber(p->peak_node));
        ADD(root, "memory_budget", cJSON_CreateNumber(p->memory_budget));
        ADD(root, "optimal", cJSON_CreateBool(p->optimal));
        cJSON *stats = cJSON_CreateObject();
        if (stats) {
            ADD(stats, "groups", cJSON_CreateNumber(p->n_groups));
            ADD(stats, "columns", cJSON_CreateNumber(p->n_cols));
            ADD(stats, "binary_columns", cJSON_CreateNumber(p->n_int_cols));
            ADD(stats, "rows", cJSON_CreateNumber(p->n_rows));
            ADD(stats, "nonzeros", cJSON_CreateNumber(p->n_nonzeros));
            ADD(stats, "solves", cJSON_CreateNumber(p->n_solves));
            ADD(stats, "layers_reused", cJSON_CreateNumber(p->n_layers_reused));
            ADD(stats, "build_seconds", cJSON_CreateNumber(p->build_seconds));
            ADD(stats, "solve_seconds", cJSON_CreateNumber(p->solve_seconds));
        }
        ADD(root, "stats", stats);
    }
    cJSON *nodes = ok ? cJSON_CreateArray() : NULL;
    if (ok) ADD(root, "nodes", nodes);
    for (int id = 0; ok && id < p->n_nodes; id++) {
        const ap_shard_node *n = &p->node[id];
        if (!n->in_stage && !n->external) continue;
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(nodes, o)) {
            cJSON_Delete(o);
            ok = false;
            break;
        }
        ADD(o, "id", cJSON_CreateNumber(id));
        ADD(o, "name", cJSON_CreateString(g && id < g->n_nodes ? g->nodes[id]->name : ""));
        ADD(o, "external", cJSON_CreateBool(n->external));
        ADD(o, "spec", spec_json(&n->spec));
        ADD(o, "state_spec", spec_json(&n->state_spec));
        cJSON *in = cJSON_CreateArray();
        for (int k = 0; in && k < n->n_src; k++) {
            cJSON *s = spec_json(&n->in[k]);
            if (!s || !cJSON_AddItemToArray(in, s)) {
                cJSON_Delete(s);
                ok = false;
            }
        }
        ADD(o, "in", in);
        ADD(o, "strategy", cJSON_CreateString(n->strategy));
        ADD(o, "compute", cJSON_CreateNumber(n->compute));
        ADD(o, "communication", cJSON_CreateNumber(n->comm));
        ADD(o, "resharding", cJSON_CreateNumber(n->reshard));
        ADD(o, "penalty", cJSON_CreateNumber(n->penalty));
        ADD(o, "memory", cJSON_CreateNumber(n->memory));
        ADD(o, "group", cJSON_CreateNumber(n->group));
    }
    cJSON *colls = ok ? cJSON_CreateArray() : NULL;
    if (ok) ADD(root, "collectives", colls);
    for (int i = 0; ok && i < p->n_coll; i++) {
        const ap_shard_coll *c = &p->coll[i];
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(colls, o)) {
            cJSON_Delete(o);
            ok = false;
            break;
        }
        ADD(o, "kind", cJSON_CreateString(ap_coll_kind_name(c->kind)));
        ADD(o, "axis", cJSON_CreateString(axis_short(c->axis)));
        ADD(o, "bytes", cJSON_CreateNumber(c->bytes));
        ADD(o, "time", cJSON_CreateNumber(c->time));
        ADD(o, "node", cJSON_CreateNumber(c->node));
        ADD(o, "operand", cJSON_CreateNumber(c->operand));
        ADD(o, "tensor", cJSON_CreateNumber(c->tensor));
        ADD(o, "from", spec_json(&c->from));
        ADD(o, "to", spec_json(&c->to));
    }
#undef ADD
    char *text = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (!text) return ap_error(AUTOPAR_ERR_NOMEM, "ap_shard_plan_to_json: out of memory");
    *out = text;
    return AUTOPAR_OK;
}

/* JSON reading helpers: each names the field at fault. */
static ap_status jnum(const cJSON *o, const char *key, const char *where, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v))
        return ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: '%s' missing or not a number",
                        where, key);
    *out = v->valuedouble;
    return AUTOPAR_OK;
}

static ap_status jint(const cJSON *o, const char *key, const char *where, int lo, int hi,
                      int *out) {
    double d = 0;
    ap_status st = jnum(o, key, where, &d);
    if (st) return st;
    if (d != floor(d) || d < lo || d > hi)
        return ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: '%s' = %g is not an integer in "
                        "%d..%d", where, key, d, lo, hi);
    *out = (int)d;
    return AUTOPAR_OK;
}

static ap_status jspec(const cJSON *v, const char *key, const char *where, ap_spec *out) {
    if (!cJSON_IsString(v) || !v->valuestring)
        return ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: '%s' missing or not a string",
                        where, key);
    if (ap_spec_parse(v->valuestring, out))
        return ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: '%s' = '%s' is not a spec",
                        where, key, v->valuestring);
    return AUTOPAR_OK;
}

static ap_status jbool(const cJSON *o, const char *key, const char *where, bool *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsBool(v))
        return ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: '%s' missing or not a boolean",
                        where, key);
    *out = cJSON_IsTrue(v);
    return AUTOPAR_OK;
}

AP_INTERNAL ap_status ap_shard_plan_from_json(const char *json, const autopar_graph *g,
                                              ap_shard_plan **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_shard_plan_from_json: out is NULL");
    *out = NULL;
    if (!json) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_shard_plan_from_json: json is NULL");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json, &end, 1);
    if (!root) return ap_json_parse_error("shard plan JSON", json, end);
    ap_shard_plan *p = NULL;
    ap_status st = AUTOPAR_OK;
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(root, "format");
    int version = 0, n_nodes = 0;
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "autopar-shard-plan") != 0) {
        st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: 'format' is not \"autopar-shard-plan\"");
        goto done;
    }
    if ((st = jint(root, "version", "top level", 0, 1 << 20, &version))) goto done;
    if (version != AP_SHARD_JSON_VERSION) {
        st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: version %d, expected %d", version,
                      AP_SHARD_JSON_VERSION);
        goto done;
    }
    if ((st = jint(root, "n_nodes", "top level", 0, 1 << 30, &n_nodes))) goto done;
    if (g && n_nodes != g->n_nodes) {
        st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: the plan is for %d nodes, the graph "
                      "has %d", n_nodes, g->n_nodes);
        goto done;
    }
    if ((st = plan_alloc(n_nodes, &p))) goto done;
    const cJSON *mesh = cJSON_GetObjectItemCaseSensitive(root, "mesh");
    if (!cJSON_IsArray(mesh) || cJSON_GetArraySize(mesh) != 2 ||
        !cJSON_IsNumber(cJSON_GetArrayItem(mesh, 0)) || !cJSON_IsNumber(cJSON_GetArrayItem(mesh, 1))) {
        st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: 'mesh' must be [n0, n1]");
        goto done;
    }
    p->mesh_shape[0] = cJSON_GetArrayItem(mesh, 0)->valueint;
    p->mesh_shape[1] = cJSON_GetArrayItem(mesh, 1)->valueint;
    if ((st = jnum(root, "objective", "top level", &p->objective)) ||
        (st = jnum(root, "compute", "top level", &p->compute_cost)) ||
        (st = jnum(root, "communication", "top level", &p->comm_cost)) ||
        (st = jnum(root, "resharding", "top level", &p->reshard_cost)) ||
        (st = jnum(root, "penalty", "top level", &p->penalty_cost)) ||
        (st = jnum(root, "peak_memory", "top level", &p->peak_memory)) ||
        (st = jint(root, "peak_node", "top level", -1, n_nodes, &p->peak_node)) ||
        (st = jnum(root, "memory_budget", "top level", &p->memory_budget)) ||
        (st = jbool(root, "optimal", "top level", &p->optimal)))
        goto done;
    const cJSON *stats = cJSON_GetObjectItemCaseSensitive(root, "stats");
    if (cJSON_IsObject(stats)) {
        if ((st = jint(stats, "groups", "stats", 0, 1 << 30, &p->n_groups)) ||
            (st = jint(stats, "columns", "stats", 0, 1 << 30, &p->n_cols)) ||
            (st = jint(stats, "binary_columns", "stats", 0, 1 << 30, &p->n_int_cols)) ||
            (st = jint(stats, "rows", "stats", 0, 1 << 30, &p->n_rows)) ||
            (st = jint(stats, "nonzeros", "stats", 0, 1 << 30, &p->n_nonzeros)) ||
            (st = jint(stats, "solves", "stats", 0, 1 << 30, &p->n_solves)) ||
            (st = jint(stats, "layers_reused", "stats", 0, 1 << 30, &p->n_layers_reused)) ||
            (st = jnum(stats, "build_seconds", "stats", &p->build_seconds)) ||
            (st = jnum(stats, "solve_seconds", "stats", &p->solve_seconds)))
            goto done;
    }
    const cJSON *nodes = cJSON_GetObjectItemCaseSensitive(root, "nodes");
    if (!cJSON_IsArray(nodes)) {
        st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: 'nodes' missing or not an array");
        goto done;
    }
    const cJSON *o;
    int idx = 0;
    cJSON_ArrayForEach(o, nodes) {
        char where[96];
        snprintf(where, sizeof where, "nodes[%d]", idx++);
        int id;
        if ((st = jint(o, "id", where, 0, n_nodes - 1, &id))) goto done;
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(o, "name");
        if (!cJSON_IsString(name)) {
            st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: 'name' missing", where);
            goto done;
        }
        if (g && strcmp(g->nodes[id]->name, name->valuestring) != 0) {
            st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: node %d is '%s' in the plan "
                          "but '%s' in the graph", where, id, name->valuestring,
                          g->nodes[id]->name);
            goto done;
        }
        ap_shard_node *n = &p->node[id];
        bool ext;
        if ((st = jbool(o, "external", where, &ext))) goto done;
        n->external = ext;
        n->in_stage = !ext;
        if ((st = jspec(cJSON_GetObjectItemCaseSensitive(o, "spec"), "spec", where, &n->spec)) ||
            (st = jspec(cJSON_GetObjectItemCaseSensitive(o, "state_spec"), "state_spec", where,
                        &n->state_spec)))
            goto done;
        const cJSON *in = cJSON_GetObjectItemCaseSensitive(o, "in");
        if (!cJSON_IsArray(in) || cJSON_GetArraySize(in) > AP_MAX_SRC) {
            st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: 'in' must be an array of at "
                          "most %d specs", where, AP_MAX_SRC);
            goto done;
        }
        n->n_src = cJSON_GetArraySize(in);
        for (int k = 0; k < n->n_src; k++)
            if ((st = jspec(cJSON_GetArrayItem(in, k), "in", where, &n->in[k]))) goto done;
        const cJSON *strat = cJSON_GetObjectItemCaseSensitive(o, "strategy");
        if (!cJSON_IsString(strat)) {
            st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: 'strategy' missing", where);
            goto done;
        }
        snprintf(n->strategy, sizeof n->strategy, "%s", strat->valuestring);
        if ((st = jnum(o, "compute", where, &n->compute)) ||
            (st = jnum(o, "communication", where, &n->comm)) ||
            (st = jnum(o, "resharding", where, &n->reshard)) ||
            (st = jnum(o, "penalty", where, &n->penalty)) ||
            (st = jnum(o, "memory", where, &n->memory)) ||
            (st = jint(o, "group", where, -1, n_nodes - 1, &n->group)))
            goto done;
    }
    const cJSON *colls = cJSON_GetObjectItemCaseSensitive(root, "collectives");
    if (!cJSON_IsArray(colls)) {
        st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: 'collectives' missing or not an array");
        goto done;
    }
    int nc = cJSON_GetArraySize(colls);
    p->coll = calloc((size_t)(nc > 0 ? nc : 1), sizeof *p->coll);
    if (!p->coll) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "shard plan JSON: out of memory");
        goto done;
    }
    idx = 0;
    cJSON_ArrayForEach(o, colls) {
        char where[96];
        snprintf(where, sizeof where, "collectives[%d]", idx);
        ap_shard_coll *c = &p->coll[idx++];
        const cJSON *kind = cJSON_GetObjectItemCaseSensitive(o, "kind");
        const cJSON *axis = cJSON_GetObjectItemCaseSensitive(o, "axis");
        int k = AP_COLL_KIND_COUNT;
        if (cJSON_IsString(kind))
            for (k = 0; k < AP_COLL_KIND_COUNT; k++)
                if (strcmp(kind->valuestring, ap_coll_kind_name((ap_coll_kind)k)) == 0) break;
        if (k == AP_COLL_KIND_COUNT) {
            st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: bad 'kind'", where);
            goto done;
        }
        c->kind = (ap_coll_kind)k;
        if (!cJSON_IsString(axis) || (strcmp(axis->valuestring, "0") && strcmp(axis->valuestring, "1") &&
                                      strcmp(axis->valuestring, "01"))) {
            st = ap_error(AUTOPAR_ERR_PARSE, "shard plan JSON: %s: 'axis' must be \"0\", \"1\" "
                          "or \"01\"", where);
            goto done;
        }
        c->axis = strcmp(axis->valuestring, "0") == 0 ? AP_AXIS_0
                : strcmp(axis->valuestring, "1") == 0 ? AP_AXIS_1 : AP_AXIS_FLAT;
        if ((st = jnum(o, "bytes", where, &c->bytes)) || (st = jnum(o, "time", where, &c->time)) ||
            (st = jint(o, "node", where, 0, n_nodes - 1, &c->node)) ||
            (st = jint(o, "operand", where, -1, AP_MAX_SRC - 1, &c->operand)) ||
            (st = jint(o, "tensor", where, 0, n_nodes - 1, &c->tensor)) ||
            (st = jspec(cJSON_GetObjectItemCaseSensitive(o, "from"), "from", where, &c->from)) ||
            (st = jspec(cJSON_GetObjectItemCaseSensitive(o, "to"), "to", where, &c->to)))
            goto done;
        p->n_coll = idx;
    }
done:
    cJSON_Delete(root);
    if (st) {
        ap_shard_plan_free(p);
        return st;
    }
    *out = p;
    return AUTOPAR_OK;
}
