/*
 * The sharding ILP against brute force.
 *
 * Random small graphs (forward MLPs, training graphs with backward and optimizer updates,
 * until every op of the IR has appeared in some instance;
 * attention-like blocks with reshape / permute / batch_matmul / softmax / layernorm, embeddings
 * with a tied head and cross-entropy) on random meshes ((1,2), (2,1), (2,2), (1,4), (4,1)) with
 * random link coefficients and random options. For each, every combination of the merged
 * problem's strategies is enumerated and evaluated from first principles
 * (ap_shard_problem_eval: node costs plus a resharding cost per operand edge and liveness
 * memory, not the ILP's aggregated matrices), and the ILP's optimum must equal the enumerated
 * minimum (relative 1e-9). Memory-constrained instances use a budget between the smallest peak
 * any combination reaches and the peak of the unconstrained optimum, so the constraint binds;
 * the enumeration then only accepts combinations within the budget. A budget below the smallest
 * peak must give AUTOPAR_ERR_INFEASIBLE naming that smallest peak.
 * The plan built from the ILP's choice must report the same objective and peak. Both solver
 * paths (dual simplex + warm-started branch-and-cut, and glp_intopt's MIP presolver) are used.
 */
#include "autopar.h"
#include "check_cond.h"
#include "cluster.h"
#include "mesh.h"
#include "sharding.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 0x1234567887654321ull;
static uint32_t rnd(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33);
}
static int rnd_in(int n) { return (int)(rnd() % (uint32_t)n); }
static int64_t rnd_dim(void) { static const int64_t d[] = {4, 8, 16}; return d[rnd_in(3)]; }

static autopar_tensor *param(autopar_graph *g, const char *name, int nd, int64_t a, int64_t b) {
    int64_t sh[2] = {a, b};
    return autopar_param(g, name, nd, sh, AUTOPAR_INIT_NORMAL, 0.1f);
}

/* ---- random graphs ------------------------------------------------------------------------ */

static autopar_tensor *build_mlp(autopar_graph *g) {
    int64_t B = rnd_dim(), D = rnd_dim(), H = rnd_dim();
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){B, D}, 0);
    autopar_tensor *h = autopar_matmul(g, x, param(g, "w0", 2, D, H));
    if (rnd_in(2)) h = autopar_add(g, h, param(g, "b0", 1, H, 0));
    if (rnd_in(3) == 0) h = autopar_mul(g, h, param(g, "s0", 1, H, 0));
    if (rnd_in(3) == 0) h = autopar_sub(g, h, param(g, "c0", 1, H, 0));
    h = rnd_in(2) ? autopar_relu(g, h) : autopar_gelu(g, h);
    if (rnd_in(2)) h = autopar_matmul(g, h, param(g, "w1", 2, H, D));
    if (rnd_in(2)) {
        int64_t last = autopar_tensor_dim(h, 1);
        autopar_tensor *y = autopar_input(g, "y", AUTOPAR_F32, 2, (int64_t[]){B, last}, 0);
        return autopar_mse_loss(g, h, y);
    }
    return autopar_sum_all(g, h);
}

static autopar_tensor *build_attention(autopar_graph *g) {
    int64_t B = 4, T = rnd_in(2) ? 4 : 8, C = 8, H = 2;
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 3, (int64_t[]){B, T, C}, 0);
    if (rnd_in(2)) x = autopar_add(g, x, param(g, "pe", 2, T, C));   /* gives layernorm_back */
    autopar_tensor *gn = param(g, "ln.g", 1, C, 0), *bn = param(g, "ln.b", 1, C, 0);
    autopar_tensor *h = autopar_layernorm(g, x, gn, bn, 1e-5f);
    autopar_tensor *q = autopar_reshape(g, h, 4, (int64_t[]){B, T, H, C / H});
    q = autopar_permute(g, q, (int[]){0, 2, 1, 3});                    /* [B, H, T, D] */
    autopar_tensor *att = autopar_batch_matmul(g, q, q, 0, 1);          /* [B, H, T, T] */
    att = autopar_softmax(g, att, 1);
    autopar_tensor *y = autopar_batch_matmul(g, att, q, 0, 0);
    y = autopar_reshape(g, autopar_permute(g, y, (int[]){0, 2, 1, 3}), 3, (int64_t[]){B, T, C});
    return autopar_sum_all(g, autopar_add(g, x, y));
}

static autopar_tensor *build_embedding(autopar_graph *g) {
    int64_t B = 4, T = 4, V = rnd_in(2) ? 8 : 16, C = 8;
    autopar_tensor *ids = autopar_input(g, "ids", AUTOPAR_I32, 2, (int64_t[]){B, T}, 0);
    autopar_tensor *lab = autopar_input(g, "lab", AUTOPAR_I32, 2, (int64_t[]){B, T}, 0);
    autopar_tensor *wte = param(g, "wte", 2, V, C);
    autopar_tensor *h = autopar_embedding(g, wte, ids);
    if (rnd_in(2)) h = autopar_scale(g, h, 0.5f);
    autopar_tensor *logits = autopar_matmul_ex(g, h, wte, 0, 1);
    return autopar_cross_entropy(g, logits, lab);
}

static autopar_tensor *build_concat(autopar_graph *g) {
    int64_t B = 8, D = 8;
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){B, D}, 0);
    autopar_tensor *a = autopar_matmul(g, x, param(g, "wa", 2, D, D));
    autopar_tensor *parts[2];
    autopar_split(g, a, 1, 2, parts);
    autopar_tensor *c = autopar_concat(g, 2, (autopar_tensor *[]){parts[1], parts[0]}, 1);
    autopar_tensor *t = autopar_transpose(g, c);
    return autopar_mean_all(g, autopar_sum(g, t, 0));
}

/* ---- brute force -------------------------------------------------------------------------- */

typedef struct brute {
    double best_obj, best_peak;   /* optimum under the budget, and its peak                     */
    double min_peak;              /* smallest peak of any realisable combination                */
    long   combos, feasible;
} brute;

static void brute_force(const ap_shard_problem *p, double budget, brute *out) {
    int ng = ap_shard_problem_n_groups(p);
    int *c = calloc((size_t)ng + 1, sizeof(int));
    out->best_obj = INFINITY;
    out->best_peak = INFINITY;
    out->min_peak = INFINITY;
    out->combos = out->feasible = 0;
    for (;;) {
        double obj, peak;
        bool ok;
        ap_shard_problem_eval(p, c, &obj, &peak, &ok);
        out->combos++;
        if (ok) {
            out->feasible++;
            if (peak < out->min_peak) out->min_peak = peak;
            if ((budget < 0 || peak <= budget) && obj < out->best_obj) {
                out->best_obj = obj;
                out->best_peak = peak;
            }
        }
        int i = 0;
        while (i < ng && ++c[i] == ap_shard_problem_group_size(p, i)) c[i++] = 0;
        if (i == ng) break;
    }
    free(c);
}

static double space_size(const ap_shard_problem *p) {
    double s = 1;
    for (int i = 0; i < ap_shard_problem_n_groups(p); i++) s *= ap_shard_problem_group_size(p, i);
    return s;
}

static bool close_rel(double a, double b) { return fabs(a - b) <= 1e-9 * fabs(b) + 1e-15; }

/* Solves with the ILP under `budget`; returns the status, the objective (eval of its choice)
 * and checks the plan against eval. */
static ap_status ilp(const autopar_graph *g, const ap_mesh *m, const autopar_cluster *cl,
                     ap_shard_options opt, double budget, double *obj, double *peak,
                     char *msg, size_t msg_len) {
    opt.memory_budget = budget;
    ap_shard_problem *p = NULL;
    ap_status st = ap_shard_problem_build(g, NULL, 0, m, cl, &opt, &p);
    if (st) {
        snprintf(msg, msg_len, "%s", autopar_last_error());
        return st;
    }
    int *choice = calloc((size_t)ap_shard_problem_n_groups(p) + 1, sizeof(int));
    st = ap_shard_problem_solve(p, choice, obj);
    if (st) {
        snprintf(msg, msg_len, "%s", autopar_last_error());
    } else {
        bool ok;
        ap_shard_problem_eval(p, choice, obj, peak, &ok);
        CHECK(ok);
        ap_shard_plan *plan = NULL;
        CHECK(ap_shard_problem_plan(p, choice, &plan) == AUTOPAR_OK);
        if (plan) {
            CHECK(close_rel(plan->objective, *obj));
            CHECK(close_rel(plan->peak_memory, *peak));
            if (budget >= 0) CHECK(plan->peak_memory <= budget);
            ap_shard_plan_free(plan);
        }
    }
    free(choice);
    ap_shard_problem_free(p);
    return st;
}

/* Ops that may appear in graphs (the kernel-only ones are the runtime lowering's). */
static int n_graph_ops(void) {
    int n = 0;
    for (int o = 0; o < AP_OP_COUNT; o++) n += !ap_op_info_get((ap_op)o)->kernel_only;
    return n;
}

int main(void) {
    autopar_cluster *cl = NULL;
    if (autopar_cluster_preset("p3.16xlarge", 1, 8, &cl) != AUTOPAR_OK) {
        fprintf(stderr, "no cluster preset: %s\n", autopar_last_error());
        return 1;
    }
    static const int meshes[][2] = {{1, 2}, {2, 1}, {2, 2}, {1, 4}, {4, 1}};
    int done = 0, binding = 0, attempts = 0, infeasible_checked = 0;
    int kinds_seen[6] = {0};
    bool op_seen[AP_OP_COUNT] = {false};
    const double limit = 150000;   /* combinations per instance */
    int covered = 0;
    /* AUTOPAR_SHARD_STRESS=N runs at least N instances (a long soak; 2,500 take ~3 minutes) */
    const char *stress = getenv("AUTOPAR_SHARD_STRESS");
    int want = stress ? atoi(stress) : 30;
    if (want < 30) want = 30;
    while ((done < want || binding < 8 || covered < n_graph_ops()) && attempts < 3000 + 2 * want) {
        attempts++;
        int kind = rnd_in(6);
        const int *ms = meshes[rnd_in(5)];
        autopar_graph *g;
        autopar_graph_new(&g);
        autopar_tensor *loss = NULL;
        switch (kind) {
        case 0: loss = build_mlp(g); break;
        case 1: loss = build_mlp(g); break;
        case 2: loss = build_attention(g); break;
        case 3: loss = build_embedding(g); break;
        case 4: loss = build_concat(g); break;
        default: loss = build_attention(g); break;
        }
        if (!loss) {
            fprintf(stderr, "graph kind %d: %s\n", kind, autopar_graph_error(g));
            g_failures++;
            autopar_graph_free(g);
            break;
        }
        if (kind == 1 || kind == 5 || (kind == 3 && rnd_in(3) == 0) || (kind == 4 && rnd_in(2))) {
            autopar_optimizer o;
            autopar_optimizer_default(&o);
            o.kind = (autopar_optimizer_kind)rnd_in(3);
            if (autopar_build_training(g, loss, &o) != AUTOPAR_OK) {
                fprintf(stderr, "training graph: %s\n", autopar_last_error());
                g_failures++;
                autopar_graph_free(g);
                break;
            }
        }
        double alpha[2] = {1e-6 * (1 + rnd_in(20)), 1e-6 * (1 + rnd_in(20))};
        double beta[2] = {1e-10 * (1 + rnd_in(30)), 1e-10 * (1 + rnd_in(30))};
        ap_mesh *m = NULL;
        ap_mesh_new_custom(ms[0], ms[1], alpha, beta, &m);
        ap_shard_options opt;
        ap_shard_options_default(&opt);
        opt.communication_only = rnd_in(2);
        opt.prefer_reduce_scatter = rnd_in(3) == 0;
        opt.allow_mixed_mesh = ms[0] > 1 && ms[1] > 1 && rnd_in(3) == 0;
        if (rnd_in(8) == 0) opt.force_batch_dim_to_mesh_axis = ms[0] > 1 ? 0 : 1;
        if (rnd_in(10) == 0) opt.allow_all_gather = false;
        opt.ilp_presolve = rnd_in(3) == 0;   /* both GLPK paths: same optimum */

        ap_shard_problem *p = NULL;
        opt.memory_budget = -1;
        ap_status st = ap_shard_problem_build(g, NULL, 0, m, cl, &opt, &p);
        if (st == AUTOPAR_ERR_INFEASIBLE) {   /* options leave no strategy: fine, skip */
            ap_mesh_free(m);
            autopar_graph_free(g);
            continue;
        }
        CHECK(st == AUTOPAR_OK);
        /* An instance bringing an op no compared instance had yet may be larger: training
         * graphs whose loss broadcasts the seed with EXPAND (sum_all) multiply the space by
         * the EXPAND's result specs, and layernorm_back only occurs in such graphs. */
        bool new_op = false;
        for (int id = 0; id < g->n_nodes; id++) new_op |= !op_seen[g->nodes[id]->op];
        double cap = new_op ? 4 * limit : limit;
        if (st || space_size(p) > cap || space_size(p) < 2) {
            ap_shard_problem_free(p);
            ap_mesh_free(m);
            autopar_graph_free(g);
            continue;
        }
        brute bf;
        brute_force(p, -1, &bf);
        int ngroups = ap_shard_problem_n_groups(p);
        ap_shard_problem_free(p);
        if (bf.feasible == 0) {   /* nothing realisable (forbidden reshardings): the ILP must agree */
            double o, pk;
            char msg[1024];
            CHECK(ilp(g, m, cl, opt, -1, &o, &pk, msg, sizeof msg) == AUTOPAR_ERR_INFEASIBLE);
            ap_mesh_free(m);
            autopar_graph_free(g);
            continue;
        }
        double obj = 0, peak = 0;
        char msg[1024] = "";
        st = ilp(g, m, cl, opt, -1, &obj, &peak, msg, sizeof msg);
        CHECK(st == AUTOPAR_OK);
        if (st == AUTOPAR_OK && !close_rel(obj, bf.best_obj)) {
            fprintf(stderr, "instance %d (kind %d, mesh %dx%d): ILP %.17g, brute force %.17g\n",
                    done, kind, ms[0], ms[1], obj, bf.best_obj);
            g_failures++;
        }
        printf("instance %2d: kind %d mesh %dx%d, %d groups, %ld combinations (%ld realisable), "
               "optimum %.6g s%s\n",
               done, kind, ms[0], ms[1], ngroups, bf.combos, bf.feasible, bf.best_obj,
               opt.communication_only ? " (comm only)" : "");
        done++;
        kinds_seen[kind]++;
        for (int id = 0; id < g->n_nodes; id++) op_seen[g->nodes[id]->op] = true;
        covered = 0;
        for (int o = 0; o < AP_OP_COUNT; o++) covered += op_seen[o];

        /* memory-constrained: a budget that the unconstrained optimum exceeds */
        if (st == AUTOPAR_OK && bf.best_peak > bf.min_peak * 1.0001) {
            double budget = floor(0.5 * (bf.min_peak + bf.best_peak));
            brute bm;
            opt.memory_budget = budget;
            ap_shard_problem *pm = NULL;
            CHECK(ap_shard_problem_build(g, NULL, 0, m, cl, &opt, &pm) == AUTOPAR_OK);
            if (pm) {
                brute_force(pm, budget, &bm);
                ap_shard_problem_free(pm);
                double o2 = 0, pk2 = 0;
                st = ilp(g, m, cl, opt, budget, &o2, &pk2, msg, sizeof msg);
                CHECK(st == AUTOPAR_OK);
                if (st == AUTOPAR_OK) {
                    CHECK(pk2 <= budget);
                    if (!close_rel(o2, bm.best_obj)) {
                        fprintf(stderr, "memory instance: ILP %.17g, brute force %.17g (budget "
                                "%.0f)\n", o2, bm.best_obj, budget);
                        g_failures++;
                    }
                    CHECK(o2 >= obj * (1 - 1e-12));   /* the budget can only cost more */
                }
                printf("   with budget %.0f bytes (unconstrained peak %.0f, smallest %.0f): "
                       "optimum %.6g s\n", budget, bf.best_peak, bf.min_peak, bm.best_obj);
                if (bm.best_obj > bf.best_obj * (1 + 1e-9)) binding++;   /* the budget binds */
            }
            /* below the smallest peak: infeasible, and the message names the smallest peak */
            if (infeasible_checked < 6) {
                double low = floor(bf.min_peak * 0.9);
                double o3, pk3;
                st = ilp(g, m, cl, opt, low, &o3, &pk3, msg, sizeof msg);
                CHECK(st == AUTOPAR_ERR_INFEASIBLE);
                const char *at = strstr(msg, "smallest budget that fits is ");
                CHECK(at != NULL);
                if (at) {
                    double named = atof(at + strlen("smallest budget that fits is "));
                    if (fabs(named - ceil(bf.min_peak)) > 1.0) {
                        fprintf(stderr, "named budget %.0f, smallest peak %.3f (%s)\n", named,
                                bf.min_peak, msg);
                        g_failures++;
                    }
                }
                infeasible_checked++;
            }
        }
        ap_mesh_free(m);
        autopar_graph_free(g);
    }
    printf("%d instances, %d where the budget changes the optimum, %d infeasible-budget checks; "
           "kinds %d %d %d %d %d %d\n", done, binding, infeasible_checked, kinds_seen[0],
           kinds_seen[1], kinds_seen[2], kinds_seen[3], kinds_seen[4], kinds_seen[5]);
    int n_ops = 0;
    printf("ops not covered:");
    for (int o = 0; o < AP_OP_COUNT; o++) {
        n_ops += op_seen[o];
        if (!op_seen[o] && !ap_op_info_get((ap_op)o)->kernel_only)
            printf(" %s", ap_op_name((ap_op)o));
    }
    printf(" (%d of %d graph ops covered)\n", n_ops, n_graph_ops());
    CHECK(n_ops == n_graph_ops());   /* every graph op of the IR took part in some instance */
    CHECK(done >= 20);
    CHECK(binding >= 5);
    CHECK(infeasible_checked >= 3);
    autopar_cluster_free(cl);
    if (g_failures) {
        printf("FAILED: %d check(s)\n", g_failures);
        return 1;
    }
    printf("test_shard_ilp: OK\n");
    return 0;
}
