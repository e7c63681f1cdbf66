/*
 * autopar_parallelize: the compiler entry point (include/autopar.h section 7, DESIGN.md §2 and
 * §6, docs/inter-op.md).
 *
 *   training graph ──copy──► layers (manual / automatic, ap_layer_cluster) and solve units
 *     ──► stage cost context (submeshes x logical meshes, stage_cost.c)
 *     ──► per-unit intra-operator ILPs (one per unit type and logical mesh)
 *     ──► stages: DP (ap_stage_dp) / uniform / manual, memory bounds from the composed costs
 *     ──► per-stage plans (composed unit solutions), cross-stage tensors, step-time estimate,
 *         schedule simulation ──► autopar_plan
 *
 * The user's graph is never modified: the passes work on a copy (made through the graph's JSON
 * round trip, which keeps node ids), and that copy, with the layers set, goes into the plan.
 */
#define _POSIX_C_SOURCE 200809L

#include "layer_cluster.h"
#include "plan.h"
#include "schedule.h"
#include "stage_cost.h"
#include "stage_dp.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Largest automatic layer count when the user gives none (Alpa's GPT searches use 8-16). */
#define AP_AUTO_MAX_LAYERS 16
/* Solve units aim at about this many heavy forward ops (matmuls): one transformer block has 6
 * (qkv, q.k, att.v, projection, two MLP matmuls), so a unit is about one block. */
#define AP_UNIT_HEAVY_OPS 6
/* Most solve units (bounds the clustering work on very deep graphs). */
#define AP_MAX_UNITS 512
/* Memory variants per unit and logical mesh (stage_cost.h): the fastest sharding and the
 * fastest without replicated parameters. Budget-halving variants (3 and more) find leaner
 * plans but cost ~10x more ILP time. */
#define AP_MEMORY_VARIANTS 2

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

AUTOPAR_API void autopar_options_default(autopar_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->method = AUTOPAR_METHOD_PIPESHARD;
    o->num_micro_batches = 1;
    o->num_layers = 0;
    o->layer_eps = 0.5;
    o->stage_option = AUTOPAR_STAGE_AUTO;
    o->uniform_num_stages = 0;
    o->num_manual_stages = 0;
    o->manual_stages = NULL;
    o->schedule = AUTOPAR_SCHEDULE_1F1B;
    o->submesh_space = AUTOPAR_SUBMESH_POWER_OF_TWO;
    o->memory_budget = 0.0;
    o->force_batch_dim_to_axis0 = 1;
    o->prefer_reduce_scatter = 1;
    o->flop_rate = AUTOPAR_FLOPS_F32;
    o->ilp_time_limit = 10.0;
    o->verbose = 0;
}

/* Compilation context shared by the steps below. */
typedef struct par_ctx {
    const autopar_options *o;
    const autopar_cluster *c;
    autopar_graph *g;          /* working copy, owned until moved into the plan              */
    bool verbose;
    int  n_layers;
    int *unit_of;
    ap_cost_ctx *cost;
    double budget;
    const char *layer_source;  /* "manual boundaries", "automatic", ...                      */
} par_ctx;

static void vlog(const par_ctx *x, const char *fmt, ...) AP_PRINTF(2, 3);
static void vlog(const par_ctx *x, const char *fmt, ...) {
    if (!x->verbose) return;
    va_list ap;
    va_start(ap, fmt);
    fputs("autopar: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* ------------------------------------------------------------------------------------------ */
/* Checks                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static ap_status check_options(const autopar_options *o, const autopar_cluster *c) {
    if ((int)o->method < 0 || o->method >= AUTOPAR_METHOD_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.method = %d is not a method",
                        (int)o->method);
    if ((int)o->stage_option < 0 || o->stage_option >= AUTOPAR_STAGE_OPTION_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.stage_option = %d is not a "
                        "stage option", (int)o->stage_option);
    if ((int)o->schedule < 0 || o->schedule >= AUTOPAR_SCHEDULE_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.schedule = %d is not a "
                        "schedule", (int)o->schedule);
    if ((int)o->submesh_space < 0 || o->submesh_space >= AUTOPAR_SUBMESH_SPACE_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.submesh_space = %d is not a "
                        "submesh space", (int)o->submesh_space);
    if ((int)o->flop_rate < 0 || o->flop_rate >= AUTOPAR_FLOPS_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.flop_rate = %d is not a FLOP "
                        "rate", (int)o->flop_rate);
    if (o->num_micro_batches < 1 || o->num_micro_batches > AP_SCHEDULE_MAX_MICRO_BATCHES)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.num_micro_batches = %d must be "
                        "in 1..%d", o->num_micro_batches, AP_SCHEDULE_MAX_MICRO_BATCHES);
    if (o->num_layers < 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.num_layers = %d must be >= 0",
                        o->num_layers);
    if (!(o->layer_eps >= 0) || !isfinite(o->layer_eps))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.layer_eps = %g must be finite "
                        "and >= 0", o->layer_eps);
    if (!(o->ilp_time_limit > 0) || !isfinite(o->ilp_time_limit))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.ilp_time_limit = %g must be a "
                        "positive number of seconds", o->ilp_time_limit);
    if (isnan(o->memory_budget) || isinf(o->memory_budget))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.memory_budget = %g must be "
                        "finite", o->memory_budget);
    if (o->force_batch_dim_to_axis0 != 0 && o->force_batch_dim_to_axis0 != 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.force_batch_dim_to_axis0 = %d "
                        "must be 0 or 1", o->force_batch_dim_to_axis0);
    if (o->uniform_num_stages < 0 || o->uniform_num_stages > ap_cluster_num_devices(c))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options.uniform_num_stages = %d must "
                        "be in 0..%d (the cluster's devices)", o->uniform_num_stages,
                        ap_cluster_num_devices(c));
    if (o->method == AUTOPAR_METHOD_PIPESHARD && o->stage_option == AUTOPAR_STAGE_MANUAL &&
        (o->num_manual_stages < 1 || !o->manual_stages))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_options: stage_option MANUAL needs "
                        "num_manual_stages >= 1 (got %d) and manual_stages (%s)",
                        o->num_manual_stages, o->manual_stages ? "given" : "NULL");
    return AUTOPAR_OK;
}

static ap_status check_training_graph(const autopar_graph *g) {
    if (g->status != AUTOPAR_OK)
        return ap_error(AUTOPAR_ERR_GRAPH, "autopar_parallelize: the graph has an earlier error: "
                        "%s", g->error);
    bool has_backward = false, has_apply = false;
    for (int i = 0; i < g->n_nodes; i++) {
        has_backward = has_backward || g->nodes[i]->phase == AUTOPAR_PHASE_BACKWARD;
        has_apply = has_apply || g->nodes[i]->phase == AUTOPAR_PHASE_APPLY;
    }
    if (g->loss < 0 || !has_backward)
        return ap_error(AUTOPAR_ERR_GRAPH, "autopar_parallelize: the graph has no backward pass; "
                        "it must be a training graph: call autopar_build_training(g, loss, "
                        "&optimizer) first");
    if (!g->has_optimizer || !has_apply)
        return ap_error(AUTOPAR_ERR_GRAPH, "autopar_parallelize: the graph has a backward pass "
                        "but no optimizer update; call autopar_apply_optimizer (or build it with "
                        "autopar_build_training)");
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Layers and solve units                                                                      */
/* ------------------------------------------------------------------------------------------ */

static bool is_forward_op(const ap_node *n) {
    return n->phase == AUTOPAR_PHASE_FORWARD && n->n_src > 0;
}

/* Sets every forward op's layer from lay[] (indexed by node id) and lets ap_layer_manual place
 * the rest. */
static ap_status apply_forward_layers(autopar_graph *g, const int *lay, int *n_layers) {
    for (int i = 0; i < g->n_nodes; i++)
        if (is_forward_op(g->nodes[i])) g->nodes[i]->layer = lay[i];
    return ap_layer_manual(g, n_layers);
}

static ap_status layer_pass(par_ctx *x) {
    autopar_graph *g = x->g;
    const autopar_options *o = x->o;
    ap_status st;
    int n = g->n_nodes;
    int *lay = malloc(sizeof(int) * (size_t)n);
    if (!lay) return ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
    bool has_marks = false;
    int heavy = 0;
    for (int i = 0; i < n; i++) {
        const ap_node *v = g->nodes[i];
        if (!is_forward_op(v)) continue;
        has_marks = has_marks || v->layer > 0;
        heavy += ap_op_is_heavy(v->op);
    }
    if (o->method != AUTOPAR_METHOD_PIPESHARD) {
        for (int i = 0; i < n; i++) lay[i] = 0;
        st = apply_forward_layers(g, lay, &x->n_layers);
        x->layer_source = "one layer (single-stage method)";
    } else if (o->num_layers > 0) {
        st = ap_layer_cluster(g, o->num_layers, o->layer_eps, NULL);
        x->n_layers = o->num_layers;
        x->layer_source = "automatic clustering";
    } else if (has_marks) {
        st = ap_layer_manual(g, &x->n_layers);
        x->layer_source = "manual boundaries";
    } else {
        /* At most one layer per device (a stage needs one), about one block per layer
         * (finer layers split blocks and multiply the distinct layer types), at most 16. */
        int L = AP_AUTO_MAX_LAYERS;
        int devices = ap_cluster_num_devices(x->c);
        if (devices < L) L = devices;
        if (heavy / AP_UNIT_HEAVY_OPS < L) L = heavy / AP_UNIT_HEAVY_OPS;
        if (L < 1) L = 1;
        st = AUTOPAR_ERR_INVALID_ARG;
        for (; L >= 1; L--) {
            st = ap_layer_cluster(g, L, o->layer_eps, NULL);
            if (st != AUTOPAR_ERR_INVALID_ARG) break;
        }
        x->n_layers = L;
        x->layer_source = "automatic clustering (automatic count)";
    }
    if (st) {
        free(lay);
        return st;
    }
    /* Solve units: cut the layers further where a finer clustering (about one block per unit)
     * cuts, so that repeated blocks become identical units solved once. */
    x->unit_of = malloc(sizeof(int) * (size_t)n);
    int *dp_layer = malloc(sizeof(int) * (size_t)n);
    if (!x->unit_of || !dp_layer) {
        free(lay);
        free(dp_layer);
        return ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
    }
    for (int i = 0; i < n; i++) dp_layer[i] = x->unit_of[i] = g->nodes[i]->layer;
    int target = heavy / AP_UNIT_HEAVY_OPS;
    if (target > AP_MAX_UNITS) target = AP_MAX_UNITS;
    bool refined = false;
    for (int tries = 0; target > x->n_layers && tries < 4 && !refined; tries++) {
        st = ap_layer_cluster(g, target, o->layer_eps, NULL);
        if (st == AUTOPAR_OK) {
            int unit = -1, prev_dp = -1, prev_fine = -1;
            for (int i = 0; i < n; i++) {
                const ap_node *v = g->nodes[i];
                if (!is_forward_op(v)) continue;
                if (dp_layer[i] != prev_dp || v->layer != prev_fine) unit++;
                prev_dp = dp_layer[i];
                prev_fine = v->layer;
                lay[i] = unit;
            }
            int n_units;
            st = apply_forward_layers(g, lay, &n_units);
            if (st == AUTOPAR_OK) {
                /* Units must refine the layers; check, else keep the layers as units. */
                int *unit_layer = malloc(sizeof(int) * (size_t)n_units);
                bool ok = unit_layer != NULL;
                for (int u = 0; ok && u < n_units; u++) unit_layer[u] = -1;
                for (int i = 0; ok && i < n; i++) {
                    int u = g->nodes[i]->layer;
                    if (unit_layer[u] < 0) unit_layer[u] = dp_layer[i];
                    ok = unit_layer[u] == dp_layer[i];
                }
                free(unit_layer);
                if (ok) {
                    for (int i = 0; i < n; i++) x->unit_of[i] = g->nodes[i]->layer;
                    refined = true;
                }
            }
        }
        autopar_clear_error();
        target = target * 3 / 4;
    }
    for (int i = 0; i < n; i++) g->nodes[i]->layer = dp_layer[i];
    free(dp_layer);
    free(lay);
    /* The working graph keeps the layers of the layer pass; re-check them. */
    return ap_layer_check(g, x->n_layers);
}

/* ------------------------------------------------------------------------------------------ */
/* Stage selection                                                                             */
/* ------------------------------------------------------------------------------------------ */

/* One chosen stage before placement details. */
typedef struct chosen {
    ap_stage_assignment a;    /* layers, submesh (index into the cost context), config, placement */
    int cfg;                  /* global configuration index                                      */
    int var;                  /* memory variant                                                  */
} chosen;

/* Memory a stage needs when `succ` stages follow it. */
static double stage_need(const par_ctx *x, const ap_stage_cost *k, int succ) {
    int B = x->o->num_micro_batches;
    int in_flight = x->o->schedule == AUTOPAR_SCHEDULE_GPIPE ? B : (succ + 1 < B ? succ + 1 : B);
    return ap_stage_cost_fixed_memory(k) + (double)in_flight * k->activations;
}

static ap_status infeasible_budget_error(const par_ctx *x, double need) {
    char a[32], b[32];
    return ap_error(AUTOPAR_ERR_INFEASIBLE, "no plan fits the memory budget of %s per device: "
                    "the leanest plan found needs %s per device (raise autopar_options."
                    "memory_budget, use more devices, or more micro-batches of a smaller batch; "
                    "1F1B holds fewer micro-batches than GPipe)",
                    ap_fmt_bytes(x->budget, a, sizeof a), ap_fmt_bytes(need, b, sizeof b));
}

/* Runs the stage DP over every submesh and configuration of the cost context. */
static ap_status select_dp(par_ctx *x, chosen **out, int *n_out) {
    ap_cost_ctx *cc = x->cost;
    int S = ap_cost_n_submeshes(cc), C = 1, V = ap_cost_n_variants(cc);
    for (int m = 0; m < S; m++) {
        int k;
        ap_cost_submesh_configs(cc, m, &k);
        if (k * V > C) C = k * V;
    }
    ap_stage_table *t = NULL;
    ap_status st = ap_stage_table_new(x->n_layers, S, C, &t);
    if (st) return st;
    size_t total = (size_t)x->n_layers * (size_t)x->n_layers * (size_t)S * (size_t)C;
    double *fixed = malloc(sizeof(double) * total), *per_mb = malloc(sizeof(double) * total);
    ap_submesh_shape *shapes = malloc(sizeof *shapes * (size_t)S);
    ap_stage_dp_result r = {0};
    if (!fixed || !per_mb || !shapes) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
        goto done;
    }
    for (int m = 0; m < S; m++) shapes[m] = ap_cost_submesh(cc, m);
    if ((st = ap_cost_fill_table(cc, t, fixed, per_mb))) goto done;
    ap_stage_dp_problem prob = {.n_hosts = x->c->hosts, .devices_per_host = x->c->devices_per_host,
                                .n_submeshes = S, .submeshes = shapes, .table = t,
                                .n_micro_batches = x->o->num_micro_batches, .t_max_gap = 0.0,
                                .search = AP_TMAX_BRANCH_AND_BOUND};
    st = ap_stage_dp(&prob, &r);
    if (st == AUTOPAR_ERR_INFEASIBLE && x->budget >= 0) {
        /* Find the smallest budget with a solution: feasibility grows with the budget. */
        double hi = 0;
        for (size_t k = 0; k < total; k++)
            if (isfinite(t->time[k]) && !isnan(fixed[k])) {
                double need = fixed[k] + (double)x->o->num_micro_batches * per_mb[k];
                if (need > hi) hi = need;
            }
        double lo = x->budget;
        bool any = false;
        for (int it = 0; it < 40 && hi > lo * 1.001; it++) {
            double mid = it == 0 ? hi : 0.5 * (lo + hi);
            for (size_t k = 0; k < total; k++)
                if (!isnan(fixed[k]))
                    t->max_n_succ[k] = ap_cost_max_n_succ(cc, fixed[k], per_mb[k], mid);
            ap_stage_dp_result tr = {0};
            ap_status s2 = ap_stage_dp(&prob, &tr);
            ap_stage_dp_result_clear(&tr);
            if (s2 == AUTOPAR_OK) {
                hi = mid;
                any = true;
            } else if (s2 == AUTOPAR_ERR_INFEASIBLE) {
                if (it == 0) break;
                lo = mid;
            } else {
                st = s2;
                goto done;
            }
        }
        autopar_clear_error();
        if (any)
            st = infeasible_budget_error(x, hi);
        else
            st = ap_error(AUTOPAR_ERR_INFEASIBLE, "no stage slicing has a realisable sharding on "
                          "this cluster (every candidate stage is infeasible whatever the "
                          "memory)");
        goto done;
    }
    if (st) goto done;
    chosen *ch = calloc((size_t)r.n_stages, sizeof *ch);
    if (!ch) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
        goto done;
    }
    for (int s = 0; s < r.n_stages; s++) {
        int k;
        const int *cfgs = ap_cost_submesh_configs(cc, r.stages[s].submesh, &k);
        ch[s].a = r.stages[s];
        ch[s].cfg = cfgs[r.stages[s].config / V];
        ch[s].var = r.stages[s].config % V;
    }
    vlog(x, "stage DP: %d stages, objective %.6g s, %d t_max candidates, %d evaluated",
         r.n_stages, r.objective, r.n_candidates, r.n_evaluated);
    *out = ch;
    *n_out = r.n_stages;
done:
    ap_stage_dp_result_clear(&r);
    ap_stage_table_free(t);
    free(fixed);
    free(per_mb);
    free(shapes);
    return st;
}

/* Evaluates a fixed list of stages with per-stage candidate configurations (cands[s][0..nc[s]),
 * each configuration in every memory variant; one (configuration, variant) picked per stage:
 * the cheapest that fits its memory with its successors). Returns the
 * objective (INFINITY when some stage fits no candidate) and the largest memory a stage needs
 * with its best-fitting candidate in *need. */
static ap_status evaluate_fixed(par_ctx *x, chosen *ch, int n, int *const *cands, const int *nc,
                                double *objective, double *need) {
    double sum = 0, mx = 0, worst_need = 0;
    bool ok = true;
    int V = ap_cost_n_variants(x->cost);
    for (int s = 0; s < n; s++) {
        double best = INFINITY, best_need = INFINITY;
        int best_cfg = -1, best_var = 0;
        for (int k = 0; k < nc[s] * V; k++) {
            ap_stage_cost sc;
            bool feas;
            ap_status st = ap_cost_range(x->cost, ch[s].a.first_layer, ch[s].a.last_layer,
                                         cands[s][k / V], k % V, &sc, &feas);
            if (st) return st;
            if (!feas) continue;
            double nd = stage_need(x, &sc, n - 1 - s);
            if (nd < best_need) best_need = nd;
            if (x->budget >= 0 && nd > x->budget) continue;
            if (sc.stage_time < best) {
                best = sc.stage_time;
                best_cfg = cands[s][k / V];
                best_var = k % V;
            }
        }
        if (best_need > worst_need) worst_need = best_need;
        if (best_cfg < 0) {
            ok = false;
            continue;
        }
        ch[s].cfg = best_cfg;
        ch[s].var = best_var;
        ch[s].a.time = best;
        sum += best;
        if (best > mx) mx = best;
    }
    *need = worst_need;
    *objective = ok ? sum + (double)(x->o->num_micro_batches - 1) * mx : INFINITY;
    return AUTOPAR_OK;
}

static ap_status place(par_ctx *x, chosen *ch, int n) {
    ap_stage_assignment *a = malloc(sizeof *a * (size_t)n);
    ap_submesh_shape *shapes = calloc((size_t)n, sizeof *shapes);
    if (!a || !shapes) {
        free(a);
        free(shapes);
        return ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
    }
    for (int s = 0; s < n; s++) {
        a[s] = ch[s].a;
        a[s].submesh = s;
        shapes[s] = ap_cost_submesh(x->cost, ap_cost_config(x->cost, ch[s].cfg)->submesh);
    }
    ap_status st = ap_stage_place(x->c->hosts, x->c->devices_per_host, shapes, n, a, n);
    for (int s = 0; s < n && !st; s++) {
        ch[s].a.host_begin = a[s].host_begin;
        ch[s].a.n_hosts = a[s].n_hosts;
        ch[s].a.device_begin = a[s].device_begin;
        ch[s].a.devices_per_host = a[s].devices_per_host;
    }
    free(a);
    free(shapes);
    return st;
}

static ap_status select_manual(par_ctx *x, chosen **out, int *n_out) {
    const autopar_options *o = x->o;
    int n = o->num_manual_stages, D = ap_cluster_num_devices(x->c), L = x->n_layers;
    const autopar_manual_stage *m = o->manual_stages;
    long used = 0;
    for (int s = 0; s < n; s++) {
        if (m[s].first_layer > m[s].last_layer || m[s].first_layer < 0)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "manual stage %d: layer range %d..%d is "
                            "empty or negative", s, m[s].first_layer, m[s].last_layer);
        if (m[s].last_layer >= L)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "manual stage %d: layer %d does not exist "
                            "(the layer pass made %d layers, 0..%d)", s, m[s].last_layer, L,
                            L - 1);
        int expect = s == 0 ? 0 : m[s - 1].last_layer + 1;
        if (m[s].first_layer < expect)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "manual stage %d: layers %d..%d overlap "
                            "%s (which ends at layer %d)", s, m[s].first_layer, m[s].last_layer,
                            s == 0 ? "the start" : "the previous stage", expect - 1);
        if (m[s].first_layer > expect)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "manual stage %d: starts at layer %d, so "
                            "layers %d..%d belong to no stage", s, m[s].first_layer, expect,
                            m[s].first_layer - 1);
        ap_submesh_shape sh = {m[s].submesh_hosts, m[s].submesh_devices};
        if (ap_submesh_check(sh, x->c->hosts, x->c->devices_per_host)) {
            char why[512];
            snprintf(why, sizeof why, "%s", autopar_last_error());
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "manual stage %d: invalid submesh: %s", s,
                            why);
        }
        bool auto_mesh = m[s].mesh_dp == 0 && m[s].mesh_mp == 0;
        if (!auto_mesh && (m[s].mesh_dp < 1 || m[s].mesh_mp < 1 ||
                           (long)m[s].mesh_dp * m[s].mesh_mp != (long)ap_submesh_size(sh)))
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "manual stage %d: logical mesh %d x %d does "
                            "not have the %d devices of submesh (%d, %d) (0 x 0 lets the pass "
                            "choose)", s, m[s].mesh_dp, m[s].mesh_mp, ap_submesh_size(sh),
                            sh.n_hosts, sh.devices_per_host);
        if (m[s].force_batch_dim_to_axis0 < -1 || m[s].force_batch_dim_to_axis0 > 1)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "manual stage %d: force_batch_dim_to_axis0 "
                            "= %d must be -1, 0 or 1", s, m[s].force_batch_dim_to_axis0);
        used += ap_submesh_size(sh);
    }
    if (m[n - 1].last_layer != L - 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "manual stages end at layer %d: layers %d..%d "
                        "belong to no stage", m[n - 1].last_layer, m[n - 1].last_layer + 1, L - 1);
    if (used != D)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "manual stages use %ld devices but the cluster "
                        "has %d (%d x %d): the submeshes must tile the cluster exactly", used, D,
                        x->c->hosts, x->c->devices_per_host);
    chosen *ch = calloc((size_t)n, sizeof *ch);
    int **cands = calloc((size_t)n, sizeof *cands);
    int *nc = calloc((size_t)n, sizeof *nc);
    ap_status st = AUTOPAR_OK;
    if (!ch || !cands || !nc) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
        goto done;
    }
    for (int s = 0; s < n && !st; s++) {
        ap_submesh_shape sh = {m[s].submesh_hosts, m[s].submesh_devices};
        ch[s].a.first_layer = m[s].first_layer;
        ch[s].a.last_layer = m[s].last_layer;
        if (m[s].mesh_dp == 0 && m[s].mesh_mp == 0) {
            const int *cf = NULL;
            int k = 0;
            if ((st = ap_cost_add_auto_configs(x->cost, sh, o->force_batch_dim_to_axis0 != 0,
                                               &cf, &k)))
                break;
            cands[s] = malloc(sizeof(int) * (size_t)k);
            if (!cands[s]) {
                st = ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
                break;
            }
            memcpy(cands[s], cf, sizeof(int) * (size_t)k);
            nc[s] = k;
        } else {
            int force = m[s].force_batch_dim_to_axis0 < 0 ? o->force_batch_dim_to_axis0
                                                          : m[s].force_batch_dim_to_axis0;
            cands[s] = malloc(sizeof(int));
            if (!cands[s]) {
                st = ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
                break;
            }
            nc[s] = 1;
            st = ap_cost_add_config(x->cost, sh, m[s].mesh_dp, m[s].mesh_mp, force ? 0 : -1,
                                    &cands[s][0]);
        }
    }
    for (int s = 0; s < n && !st; s++) ch[s].cfg = cands[s][0];   /* its submesh, for placing */
    if (!st && (st = place(x, ch, n)) == AUTOPAR_ERR_INFEASIBLE) {
        char why[512];
        snprintf(why, sizeof why, "%s", autopar_last_error());
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "manual stages: the submeshes do not tile the "
                      "cluster: %s", why);
    }
    double obj = 0, need = 0;
    if (!st) st = evaluate_fixed(x, ch, n, cands, nc, &obj, &need);
    if (!st && !isfinite(obj)) {
        /* Name the first stage that does not fit. */
        for (int s = 0; s < n; s++) {
            double best_need = INFINITY;
            bool any = false;
            int V = ap_cost_n_variants(x->cost);
            for (int k = 0; k < nc[s] * V; k++) {
                ap_stage_cost sc;
                bool feas;
                if ((st = ap_cost_range(x->cost, ch[s].a.first_layer, ch[s].a.last_layer,
                                        cands[s][k / V], k % V, &sc, &feas)))
                    goto done;
                if (!feas) continue;
                any = true;
                double nd = stage_need(x, &sc, n - 1 - s);
                if (nd < best_need) best_need = nd;
            }
            if (!any) {
                st = ap_error(AUTOPAR_ERR_INFEASIBLE, "manual stage %d (layers %d-%d on submesh "
                              "(%d, %d)): no realisable sharding on its logical mesh", s,
                              m[s].first_layer, m[s].last_layer, m[s].submesh_hosts,
                              m[s].submesh_devices);
                goto done;
            }
            if (x->budget >= 0 && best_need > x->budget) {
                char a[32], b[32];
                st = ap_error(AUTOPAR_ERR_INFEASIBLE, "manual stage %d (layers %d-%d on submesh "
                              "(%d, %d)) needs %s per device with the micro-batches it holds "
                              "in flight; the memory budget is %s", s, m[s].first_layer,
                              m[s].last_layer, m[s].submesh_hosts, m[s].submesh_devices,
                              ap_fmt_bytes(best_need, a, sizeof a),
                              ap_fmt_bytes(x->budget, b, sizeof b));
                goto done;
            }
        }
        st = infeasible_budget_error(x, need);
    }
done:
    for (int s = 0; cands && s < n; s++) free(cands[s]);
    free(cands);
    free(nc);
    if (st) {
        free(ch);
        return st;
    }
    *out = ch;
    *n_out = n;
    return AUTOPAR_OK;
}

/* Submesh of d devices for uniform stages, or false. */
static bool uniform_shape(const autopar_cluster *c, int d, ap_submesh_shape *out) {
    int M = c->devices_per_host;
    ap_submesh_shape s = d <= M ? (ap_submesh_shape){1, d}
                                : (ap_submesh_shape){d / M, M};
    if (d > M && d % M != 0) return false;
    if (ap_submesh_check(s, c->hosts, M)) {
        autopar_clear_error();
        return false;
    }
    *out = s;
    return true;
}

static ap_status select_uniform(par_ctx *x, chosen **out, int *n_out) {
    int D = ap_cluster_num_devices(x->c), L = x->n_layers;
    int s_lo = x->o->uniform_num_stages ? x->o->uniform_num_stages : 1;
    int s_hi = x->o->uniform_num_stages ? x->o->uniform_num_stages : (L < D ? L : D);
    double best = INFINITY, best_need = INFINITY;
    chosen *best_ch = NULL;
    int best_n = 0;
    ap_status st = AUTOPAR_OK;
    bool any_shape = false;
    for (int S = s_lo; S <= s_hi && !st; S++) {
        ap_submesh_shape sh;
        if (S > L || D % S != 0 || !uniform_shape(x->c, D / S, &sh)) continue;
        any_shape = true;
        const int *cf = NULL;
        int k = 0;
        if ((st = ap_cost_add_auto_configs(x->cost, sh, x->o->force_batch_dim_to_axis0 != 0,
                                           &cf, &k)))
            break;
        chosen *ch = calloc((size_t)S, sizeof *ch);
        int **cands = calloc((size_t)S, sizeof *cands);
        int *nc = calloc((size_t)S, sizeof *nc);
        if (!ch || !cands || !nc) {
            free(ch);
            free(cands);
            free(nc);
            st = ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
            break;
        }
        int layer = 0;
        for (int s = 0; s < S; s++) {
            int cnt = L / S + (s < L % S ? 1 : 0);
            ch[s].a.first_layer = layer;
            ch[s].a.last_layer = layer + cnt - 1;
            layer += cnt;
            nc[s] = 1;
        }
        /* One logical mesh for every stage: try each. */
        for (int q = 0; q < k && !st; q++) {
            int cfg = cf[q];
            for (int s = 0; s < S; s++) cands[s] = &cfg;
            double obj, need;
            st = evaluate_fixed(x, ch, S, cands, nc, &obj, &need);
            if (st) break;
            if (need < best_need) best_need = need;
            if (obj < best) {
                best = obj;
                free(best_ch);
                best_ch = malloc(sizeof *best_ch * (size_t)S);
                if (!best_ch) {
                    st = ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
                    break;
                }
                memcpy(best_ch, ch, sizeof *ch * (size_t)S);
                best_n = S;
            }
        }
        free(ch);
        free(cands);
        free(nc);
    }
    if (!st && !any_shape)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "uniform stages: no stage count%s splits the %d "
                      "devices into equal valid submeshes with at most %d layers each stage",
                      x->o->uniform_num_stages ? " (uniform_num_stages)" : "", D, L);
    if (!st && !best_ch) st = infeasible_budget_error(x, best_need);
    if (!st) st = place(x, best_ch, best_n);
    if (st) {
        free(best_ch);
        return st;
    }
    *out = best_ch;
    *n_out = best_n;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Plan assembly                                                                               */
/* ------------------------------------------------------------------------------------------ */

static ap_status build_plan(par_ctx *x, const chosen *ch, int n, autopar_plan *p) {
    const autopar_options *o = x->o;
    int B = o->num_micro_batches;
    ap_status st = AUTOPAR_OK;
    p->stages = calloc((size_t)n, sizeof *p->stages);
    int *stage_of_layer = malloc(sizeof(int) * (size_t)x->n_layers);
    if (!p->stages || !stage_of_layer) {
        free(stage_of_layer);
        return ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
    }
    p->n_stages = n;
    for (int s = 0; s < n && !st; s++) {
        ap_plan_stage *q = &p->stages[s];
        const ap_mesh_cfg *cf = ap_cost_config(x->cost, ch[s].cfg);
        ap_submesh_shape sh = ap_cost_submesh(x->cost, cf->submesh);
        q->first_layer = ch[s].a.first_layer;
        q->last_layer = ch[s].a.last_layer;
        for (int l = q->first_layer; l <= q->last_layer; l++) stage_of_layer[l] = s;
        q->submesh[0] = sh.n_hosts;
        q->submesh[1] = sh.devices_per_host;
        q->host_begin = ch[s].a.host_begin;
        q->device_begin = ch[s].a.device_begin;
        q->mesh_shape[0] = cf->dp;
        q->mesh_shape[1] = cf->mp;
        q->force_batch_axis = cf->force_batch_axis;
        bool feas;
        if ((st = ap_cost_range(x->cost, q->first_layer, q->last_layer, ch[s].cfg, ch[s].var,
                                &q->cost, &feas)))
            break;
        q->in_flight = o->schedule == AUTOPAR_SCHEDULE_GPIPE ? B : (n - s < B ? n - s : B);
        q->memory = ap_stage_cost_fixed_memory(&q->cost) + (double)q->in_flight *
                    q->cost.activations;
        ap_mesh *mesh = NULL;
        if ((st = ap_mesh_new_block(x->c, q->host_begin, sh.n_hosts, q->device_begin,
                                    sh.devices_per_host, cf->dp, cf->mp, &mesh)))
            break;
        q->n_devices = mesh->n_devices;
        q->devices = malloc(sizeof(int) * (size_t)mesh->n_devices);
        if (q->devices) memcpy(q->devices, mesh->devices, sizeof(int) * (size_t)mesh->n_devices);
        ap_mesh_free(mesh);
        int cnt = 0;
        for (int i = 0; i < x->g->n_nodes; i++)
            cnt += x->g->nodes[i]->layer >= q->first_layer && x->g->nodes[i]->layer <= q->last_layer;
        q->nodes = malloc(sizeof(int) * (size_t)(cnt > 0 ? cnt : 1));
        if (!q->devices || !q->nodes) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
            break;
        }
        for (int i = 0; i < x->g->n_nodes; i++)
            if (x->g->nodes[i]->layer >= q->first_layer && x->g->nodes[i]->layer <= q->last_layer)
                q->nodes[q->n_nodes++] = i;
        st = ap_cost_stage_plan(x->cost, q->first_layer, q->last_layer, ch[s].cfg, ch[s].var,
                                q->memory, &q->shard);
    }
    if (!st) st = ap_cost_transfers(x->cost, stage_of_layer, &p->transfers, &p->n_transfers);
    free(stage_of_layer);
    if (st) return st;

    /* Step-time estimate: the DP objective and its split over the critical stage. */
    autopar_plan_estimate *e = &p->estimate;
    double sum = 0, mx = -1;
    int crit = 0;
    for (int s = 0; s < n; s++) {
        double t = p->stages[s].cost.stage_time;
        sum += t;
        if (t > mx) {
            mx = t;
            crit = s;
        }
    }
    const ap_stage_cost *k = &p->stages[crit].cost;
    e->step_time = sum + (double)(B - 1) * mx;
    e->critical_stage = crit;
    e->compute = (double)B * (k->forward_compute + k->backward_compute);
    e->communication = (double)B * (k->forward + k->backward + k->send - k->forward_compute -
                                    k->backward_compute);
    e->grad_sync = k->grad_sync + k->step_send;
    e->apply = k->apply;
    e->bubble = e->step_time - e->compute - e->communication - e->grad_sync - e->apply;
    if (e->bubble < 0 && e->bubble > -1e-9 * e->step_time) e->bubble = 0;

    /* The same stage times through the schedule's event simulation. */
    e->simulated_step_time = NAN;
    ap_schedule *sched = NULL;
    double *tf = calloc((size_t)n * 6, sizeof(double));
    if (tf && ap_schedule_build((ap_schedule_kind)o->schedule, n, B, &sched) == AUTOPAR_OK) {
        double *tb = tf + n, *ts = tf + 2 * n, *ta = tf + 3 * n, *sa = tf + 4 * n,
               *sg = tf + 5 * n;
        for (int s = 0; s < n; s++) {
            const ap_stage_cost *c = &p->stages[s].cost;
            tf[s] = c->forward;
            tb[s] = c->backward;
            ts[s] = c->grad_sync + c->step_send;
            ta[s] = c->apply;
            if (s + 1 < n) {
                sa[s] = c->send_activation;
                sg[s] = p->stages[s + 1].cost.send_gradient;
            }
        }
        ap_schedule_sim_params sp = {.t_forward = tf, .t_backward = tb, .t_grad_sync = ts,
                                     .t_apply = ta, .t_send_activation = n > 1 ? sa : NULL,
                                     .t_send_grad = n > 1 ? sg : NULL, .t_send = 0,
                                     .mode = AP_SEND_ASYNC};
        ap_schedule_sim_result sr = {0};
        if (ap_schedule_simulate(sched, &sp, &sr) == AUTOPAR_OK) e->simulated_step_time = sr.makespan;
        ap_schedule_sim_result_clear(&sr);
    }
    autopar_clear_error();
    ap_schedule_free(sched);
    free(tf);
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Entry point                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static ap_status copy_graph(const autopar_graph *g, autopar_graph **out) {
    char *text = NULL;
    ap_status st = autopar_graph_to_json(g, &text);
    if (!st) st = autopar_graph_from_json(text, out);
    free(text);
    return st;
}

AUTOPAR_API autopar_status autopar_parallelize(const autopar_graph *g, const autopar_cluster *c,
                                               const autopar_options *o_in, autopar_plan **out) {
    if (out) *out = NULL;
    if (!g || !c || !out)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_parallelize: %s is NULL",
                        !g ? "the graph" : !c ? "the cluster" : "out");
    double t_start = now_seconds();
    autopar_options defaults;
    autopar_options_default(&defaults);
    const autopar_options *o = o_in ? o_in : &defaults;
    ap_status st = check_options(o, c);
    if (!st) st = check_training_graph(g);
    if (!st) st = ap_cluster_validate(c);
    if (st) return st;
    const char *env = getenv("AUTOPAR_VERBOSE");
    par_ctx x = {.o = o, .c = c, .verbose = o->verbose || (env && !strcmp(env, "1"))};
    x.budget = o->memory_budget > 0 ? o->memory_budget
             : o->memory_budget == 0 ? (double)c->device_memory : -1.0;
    autopar_plan *p = NULL;
    chosen *ch = NULL;
    int n_stages = 0;
    if ((st = copy_graph(g, &x.g))) goto fail;

    /* 1. Layers and solve units. */
    double t0 = now_seconds();
    if ((st = layer_pass(&x))) goto fail;
    double t_layers = now_seconds() - t0;

    /* 2. Cost context and the search space. */
    ap_cost_params prm = {.g = x.g, .n_layers = x.n_layers, .unit_of = x.unit_of, .cluster = c,
                          .n_micro_batches = o->num_micro_batches, .schedule = o->schedule,
                          .budget = x.budget, .n_variants = AP_MEMORY_VARIANTS,
                          .verbose = x.verbose};
    ap_shard_options_default(&prm.shard);
    prm.shard.time_limit = o->ilp_time_limit;
    prm.shard.prefer_reduce_scatter = o->method == AUTOPAR_METHOD_ZERO2 ||
                                      (o->method != AUTOPAR_METHOD_DATA_PARALLEL &&
                                       o->prefer_reduce_scatter != 0);
    prm.shard.flop_type = o->flop_rate == AUTOPAR_FLOPS_F16 ? AP_FLOPS_F16 : AP_FLOPS_F32;
    if ((st = ap_cost_ctx_new(&prm, &x.cost))) goto fail;
    int n_units, n_types;
    ap_cost_stats(x.cost, &n_units, &n_types, NULL, NULL, NULL);
    t_layers = now_seconds() - t0;
    vlog(&x, "layers: %d (%s), %d solve units of %d distinct types (%.3f s)", x.n_layers,
         x.layer_source, n_units, n_types, t_layers);

    ap_submesh_shape whole = {c->hosts, c->devices_per_host};
    bool dp_search = false;
    if (o->method == AUTOPAR_METHOD_PIPESHARD && o->stage_option == AUTOPAR_STAGE_AUTO) {
        int ns;
        if ((st = ap_submesh_choices(c->hosts, c->devices_per_host,
                                     (ap_submesh_space)o->submesh_space, NULL, 0, &ns)))
            goto fail;
        ap_submesh_shape *shapes = malloc(sizeof *shapes * (size_t)(ns > 0 ? ns : 1));
        if (!shapes) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "autopar_parallelize: out of memory");
            goto fail;
        }
        st = ap_submesh_choices(c->hosts, c->devices_per_host,
                                (ap_submesh_space)o->submesh_space, shapes, ns, &ns);
        for (int m = 0; m < ns && !st; m++)
            st = ap_cost_add_auto_configs(x.cost, shapes[m], o->force_batch_dim_to_axis0 != 0,
                                          NULL, NULL);
        free(shapes);
        dp_search = true;
    } else if (o->method == AUTOPAR_METHOD_SHARD) {
        st = ap_cost_add_auto_configs(x.cost, whole, o->force_batch_dim_to_axis0 != 0, NULL,
                                      NULL);
        dp_search = true;
    } else if (o->method == AUTOPAR_METHOD_DATA_PARALLEL || o->method == AUTOPAR_METHOD_ZERO2) {
        st = ap_cost_add_config(x.cost, whole, ap_cluster_num_devices(c), 1, 0, NULL);
        dp_search = true;
    }
    if (st) goto fail;

    /* 3. Per-layer intra-operator solves (the whole space up front for the DP; manual and
     * uniform stages solve what they evaluate). */
    t0 = now_seconds();
    if (dp_search) {
        vlog(&x, "per-layer ILP: %d unit types x %d logical meshes", n_types,
             ap_cost_n_configs(x.cost));
        if ((st = ap_cost_solve_all(x.cost))) goto fail;
    }
    double t_ilp = now_seconds() - t0;

    /* 4. Stages. */
    t0 = now_seconds();
    if (dp_search)
        st = select_dp(&x, &ch, &n_stages);
    else if (o->stage_option == AUTOPAR_STAGE_MANUAL)
        st = select_manual(&x, &ch, &n_stages);
    else
        st = select_uniform(&x, &ch, &n_stages);
    if (st) goto fail;
    double t_dp = now_seconds() - t0;
    if (!dp_search) {
        /* Solves happened during the evaluation: count them as ILP time. */
        double solve_s;
        ap_cost_stats(x.cost, NULL, NULL, NULL, NULL, &solve_s);
        t_ilp = solve_s;
        t_dp = t_dp > solve_s ? t_dp - solve_s : 0;
    }
    vlog(&x, "stages: %d chosen (%.3f s)", n_stages, t_dp);

    /* 5. Plan. */
    t0 = now_seconds();
    if ((st = ap_plan_alloc(&p))) goto fail;
    p->method = o->method;
    p->stage_option = o->stage_option;
    p->schedule = o->schedule;
    p->n_micro_batches = o->num_micro_batches;
    p->n_layers = x.n_layers;
    p->memory_budget = x.budget;
    if ((st = build_plan(&x, ch, n_stages, p))) goto fail;
    if ((st = ap_cluster_clone(c, &p->cluster))) goto fail;
    p->graph = x.g;
    x.g = NULL;
    if ((st = ap_plan_canonicalize(p))) goto fail;
    double t_stage = now_seconds() - t0;
    vlog(&x, "stage plans and estimate (%.3f s)", t_stage);

    ap_plan_stats *q = &p->stats;
    q->layers_seconds = t_layers;
    q->ilp_seconds = t_ilp;
    q->dp_seconds = t_dp;
    q->stage_seconds = t_stage;
    q->n_units = n_units;
    q->n_unit_types = n_types;
    q->n_mesh_configs = ap_cost_n_configs(x.cost);
    ap_cost_stats(x.cost, NULL, NULL, &q->n_solves, &q->n_cache_hits, NULL);
    q->total_seconds = now_seconds() - t_start;
    p->estimate.planning_seconds = q->total_seconds;
    vlog(&x, "done: %d stages, estimated step time %.6g s, planning %.3f s", p->n_stages,
         p->estimate.step_time, q->total_seconds);

    free(ch);
    free(x.unit_of);
    ap_cost_ctx_free(x.cost);
    *out = p;
    return AUTOPAR_OK;
fail:
    free(ch);
    free(x.unit_of);
    ap_cost_ctx_free(x.cost);
    autopar_graph_free(x.g);
    autopar_plan_free(p);
    return st;
}
