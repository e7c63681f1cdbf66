/*
 * Automatic planning time and plan quality on the Alpa GPT suite (reference/alpa-notes.md §6):
 * 350M/1, 760M/2, 1.3B/4, 2.6B/8, 6.7B/16, 15B/32, 39B/64 GPUs on the simulated p3.16xlarge
 * cluster (8 V100 16 GB per host), and GPT-3 175B on 1024 simulated H100s (dgx-h100, 128 x 8).
 * Sequence 1024, vocabulary 51200, global batch 1024.
 *
 * For every micro-batch size mb in the list (B = 1024 / mb micro-batches, the graph built at
 * batch mb) it runs the full automatic planner (layers + per-layer ILPs + stage DP + stage
 * plans) and every Megatron-style grid point: dp x tp x pp = GPUs with tp <= 8 inside a host,
 * pp <= L uniform stages of L / pp layers on equal submeshes, logical mesh dp x tp with the
 * batch on axis 0, evaluated by the same cost model through the manual stage option. It prints
 * the best automatic plan (over mb) and the best grid point (over mb, dp, tp, pp), their
 * estimated step times and the planning time of one automatic run. The automatic plan must
 * never be worse (checked; the program exits 1 otherwise).
 *
 * Compute costs use the devices' fp16 tensor-core rate (Alpa's benchmarks train in mixed
 * precision); memory is counted at 4 bytes per element and without rematerialisation. When no
 * micro-batch size fits the device memory, the model is re-planned with twice the memory and
 * the row says so.
 *
 * Usage: bench_parallelize [--models 350M,39B,...] [--mb 1,2,4,...] [--no-grid] [--verbose]
 */
#define _POSIX_C_SOURCE 200809L

#include "autopar.h"
#include "models.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct model_case {
    const char *name;
    int64_t     hidden;
    int         layers, heads;
    const char *preset;
    int         hosts, per_host;
} model_case;

static const model_case k_cases[] = {
    {"350M", 1024, 24, 16, "p3.16xlarge", 1, 1},
    {"760M", 1536, 24, 16, "p3.16xlarge", 1, 2},
    {"1.3B", 2048, 24, 32, "p3.16xlarge", 1, 4},
    {"2.6B", 2560, 32, 32, "p3.16xlarge", 1, 8},
    {"6.7B", 4096, 32, 32, "p3.16xlarge", 2, 8},
    {"15B", 5120, 48, 40, "p3.16xlarge", 4, 8},
    {"39B", 8192, 48, 64, "p3.16xlarge", 8, 8},
    {"175B", 12288, 96, 96, "dgx-h100", 128, 8},
};
#define N_CASES ((int)(sizeof k_cases / sizeof k_cases[0]))

#define GLOBAL_BATCH 1024

static autopar_graph *build(const model_case *m, int64_t mb) {
    gpt_config c = {.layers = m->layers, .hidden = m->hidden, .heads = m->heads, .seq = 1024,
                    .vocab = 51200, .batch = mb};
    autopar_graph *g = NULL;
    autopar_tensor *loss = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    if (autopar_graph_new(&g) || model_gpt_build(g, &c, &loss) ||
        autopar_build_training(g, loss, &o)) {
        fprintf(stderr, "build %s: %s\n", m->name, autopar_last_error());
        autopar_graph_free(g);
        return NULL;
    }
    return g;
}

/* "2x(1,8)1x8 + 1x(2,8)16x1": consecutive stages with the same submesh and mesh grouped. */
static void plan_shape(const autopar_plan *p, char *buf, size_t len) {
    size_t used = 0;
    buf[0] = '\0';
    int S = autopar_plan_num_stages(p);
    for (int s = 0; s < S;) {
        autopar_stage_info a, b;
        autopar_plan_stage_info(p, s, &a);
        int run = 1;
        while (s + run < S) {
            autopar_plan_stage_info(p, s + run, &b);
            if (b.submesh_hosts != a.submesh_hosts || b.submesh_devices != a.submesh_devices ||
                b.mesh_shape[0] != a.mesh_shape[0] || b.mesh_shape[1] != a.mesh_shape[1] ||
                b.force_batch_dim_to_axis0 != a.force_batch_dim_to_axis0)
                break;
            run++;
        }
        int n = snprintf(buf + used, len - used, "%s%dx(%d,%d)%dx%d%s", s ? " + " : "", run,
                         a.submesh_hosts, a.submesh_devices, a.mesh_shape[0], a.mesh_shape[1],
                         a.force_batch_dim_to_axis0 ? "" : "*");
        if (n < 0 || (size_t)n >= len - used) break;
        used += (size_t)n;
        s += run;
    }
}

typedef struct result {
    bool   ok;
    double step;
    int    mb, dp, tp, pp, layers;
    double plan_s, ilp_s, dp_s;
    int    solves, stages;
    char   shape[256];
} result;

static void options_for(autopar_options *o, double budget, int B, int verbose) {
    autopar_options_default(o);
    o->num_micro_batches = B;
    o->flop_rate = AUTOPAR_FLOPS_F16;
    o->memory_budget = budget;
    o->verbose = verbose;
}

static void run_auto(const autopar_graph *g, const autopar_cluster *c, double budget, int mb,
                     int verbose, result *best, double *total_s, double *max_s, int *layers,
                     double *need) {
    autopar_options o;
    options_for(&o, budget, GLOBAL_BATCH / mb, verbose);
    autopar_plan *p = NULL;
    double t0 = now_s();
    autopar_status st = autopar_parallelize(g, c, &o, &p);
    double dt = now_s() - t0;
    *total_s += dt;
    if (dt > *max_s) *max_s = dt;
    if (st) {
        if (st != AUTOPAR_ERR_INFEASIBLE) {
            fprintf(stderr, "  auto mb=%d: %s\n", mb, autopar_last_error());
        } else {
            const char *e = strstr(autopar_last_error(), "needs ");
            double v = 0;
            char unit[8] = "";
            if (e && sscanf(e + 6, "%lf %7s", &v, unit) == 2) {
                double mult = !strcmp(unit, "GiB") ? 1073741824.0 : !strcmp(unit, "MiB") ? 1048576.0
                            : !strcmp(unit, "TiB") ? 1099511627776.0 : 1.0;
                if (*need == 0 || v * mult < *need) *need = v * mult;
            }
        }
        printf("    auto   mb=%-3d B=%-5d: %s (%.2f s)\n", mb, GLOBAL_BATCH / mb,
               st == AUTOPAR_ERR_INFEASIBLE ? "infeasible" : "error", dt);
        return;
    }
    autopar_plan_estimate e;
    autopar_plan_get_estimate(p, &e);
    *layers = autopar_plan_num_layers(p);
    result r = {.ok = true, .step = e.step_time, .mb = mb, .plan_s = dt,
                .stages = autopar_plan_num_stages(p), .layers = *layers};
    plan_shape(p, r.shape, sizeof r.shape);
    /* Per-pass times from the plan's JSON "planning" block would need parsing; the printed
     * summary has them. Keep the totals here. */
    char *js = NULL;
    if (autopar_plan_to_json(p, &js) == AUTOPAR_OK) {
        const char *q = strstr(js, "\"ilp_seconds\":");
        if (q) r.ilp_s = strtod(q + 14, NULL);
        q = strstr(js, "\"dp_seconds\":");
        if (q) r.dp_s = strtod(q + 13, NULL);
        q = strstr(js, "\"solves\":");
        if (q) r.solves = (int)strtol(q + 9, NULL, 10);
        free(js);
    }
    printf("    auto   mb=%-3d B=%-5d: %8.3f s/step  %s  (plan %.2f s: ILP %.2f s, %d solves, "
           "stages %.3f s)\n", mb, GLOBAL_BATCH / mb, e.step_time, r.shape, dt, r.ilp_s,
           r.solves, r.dp_s);
    if (verbose) autopar_plan_print(p, stdout);
    if (!best->ok || r.step < best->step) *best = r;
    autopar_plan_free(p);
}

/* Submesh of d devices for a uniform stage, or false. */
static bool stage_submesh(int d, int hosts, int per_host, int *h, int *w) {
    if (d <= per_host) {
        if (per_host % d != 0 || (d & (d - 1)) != 0) return false;
        *h = 1;
        *w = d;
        return true;
    }
    if (d % per_host != 0 || d / per_host > hosts) return false;
    *h = d / per_host;
    *w = per_host;
    return true;
}

static void run_grid(const autopar_graph *g, const autopar_cluster *c, const model_case *m,
                     double budget, int mb, int L, result *best, int *points) {
    int D = m->hosts * m->per_host;
    for (int tp = 1; tp <= m->per_host; tp *= 2) {
        for (int pp = 1; pp <= L && pp <= D; pp++) {
            if (D % (tp * pp) != 0) continue;
            int dp = D / (tp * pp);
            if (mb % dp != 0) continue;
            int h, w;
            if (!stage_submesh(dp * tp, m->hosts, m->per_host, &h, &w)) continue;
            autopar_manual_stage *ms = calloc((size_t)pp, sizeof *ms);
            if (!ms) return;
            for (int s = 0, layer = 0; s < pp; s++) {
                int cnt = L / pp + (s < L % pp ? 1 : 0);
                ms[s] = (autopar_manual_stage){.first_layer = layer, .last_layer = layer + cnt - 1,
                                               .submesh_hosts = h, .submesh_devices = w,
                                               .mesh_dp = dp, .mesh_mp = tp,
                                               .force_batch_dim_to_axis0 = 1};
                layer += cnt;
            }
            autopar_options o;
            options_for(&o, budget, GLOBAL_BATCH / mb, 0);
            o.num_layers = L;
            o.stage_option = AUTOPAR_STAGE_MANUAL;
            o.num_manual_stages = pp;
            o.manual_stages = ms;
            autopar_plan *p = NULL;
            autopar_status st = autopar_parallelize(g, c, &o, &p);
            (*points)++;
            if (st == AUTOPAR_OK) {
                autopar_plan_estimate e;
                autopar_plan_get_estimate(p, &e);
                if (!best->ok || e.step_time < best->step) {
                    *best = (result){.ok = true, .step = e.step_time, .mb = mb, .dp = dp,
                                     .tp = tp, .pp = pp, .layers = L};
                }
            } else if (st != AUTOPAR_ERR_INFEASIBLE) {
                fprintf(stderr, "  grid dp=%d tp=%d pp=%d mb=%d: %s\n", dp, tp, pp, mb,
                        autopar_last_error());
            }
            autopar_plan_free(p);
            free(ms);
        }
    }
}

int main(int argc, char **argv) {
    const char *models = NULL, *mbs = "1,2,4,8,16,32";
    bool grid = true;
    int verbose = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--models") && i + 1 < argc)
            models = argv[++i];
        else if (!strcmp(argv[i], "--mb") && i + 1 < argc)
            mbs = argv[++i];
        else if (!strcmp(argv[i], "--no-grid"))
            grid = false;
        else if (!strcmp(argv[i], "--verbose"))
            verbose = 1;
        else {
            fprintf(stderr, "usage: %s [--models 350M,39B,...] [--mb 1,2,4,...] [--no-grid] "
                    "[--verbose]\n", argv[0]);
            return 2;
        }
    }
    int mb_list[16], n_mb = 0;
    for (const char *s = mbs; *s && n_mb < 16;) {
        int v = (int)strtol(s, (char **)&s, 10);
        if (v >= 1 && GLOBAL_BATCH % v == 0) mb_list[n_mb++] = v;
        while (*s == ',') s++;
        if (*s && (*s < '0' || *s > '9')) break;
    }
    printf("bench_parallelize: GPT suite, seq 1024, vocab 51200, global batch %d, fp16 rate, "
           "fp32 memory, AdamW, 1F1B; micro-batch sizes %s\n\n", GLOBAL_BATCH, mbs);
    int worse = 0;
#define MAX_ROWS (2 * N_CASES)
    char table[MAX_ROWS][512];
    int n_rows = 0;
    for (int k = 0; k < N_CASES; k++) {
        const model_case *m = &k_cases[k];
        if (models) {
            char key[32];
            snprintf(key, sizeof key, ",%s,", m->name);
            char list[512];
            snprintf(list, sizeof list, ",%s,", models);
            if (!strstr(list, key)) continue;
        }
        autopar_cluster *c = NULL;
        if (autopar_cluster_preset(m->preset, m->hosts, m->per_host, &c)) {
            fprintf(stderr, "cluster: %s\n", autopar_last_error());
            return 1;
        }
        int D = m->hosts * m->per_host;
        char mem_txt[32];
        double budget = 0, need = 0;
        printf("GPT-%s on %d GPUs (%s %dx%d)\n", m->name, D, m->preset, m->hosts, m->per_host);
        double mem = 0;
        {
            char *js = NULL;
            autopar_cluster_to_json(c, &js);
            const char *q = js ? strstr(js, "\"memory_bytes\":") : NULL;
            mem = q ? strtod(q + 15, NULL) : 0;
            free(js);
        }
        bool fit_any = false;
        for (int attempt = 0; attempt < 2; attempt++) {
            result best_auto = {0}, best_grid = {0};
            double auto_total = 0, auto_max = 0;
            int points = 0, L = 0;
            if (attempt == 1) {
                budget = 2 * mem;
                printf("  what-if with %.0f GiB per device%s\n", budget / 1073741824.0,
                       fit_any ? " (the grid had no feasible point)" : "");
                if (!fit_any && need > 0)
                    printf("  (the leanest automatic plan at %.0f GiB needs %.1f GiB)\n",
                           mem / 1073741824.0, need / 1073741824.0);
            }
            for (int i = 0; i < n_mb; i++) {
                int mb = mb_list[i];
                autopar_graph *g = build(m, mb);
                if (!g) return 1;
                run_auto(g, c, budget, mb, verbose, &best_auto, &auto_total, &auto_max, &L,
                         &need);
                if (grid && L > 0) run_grid(g, c, m, budget, mb, L, &best_grid, &points);
                autopar_graph_free(g);
            }
            fit_any = fit_any || best_auto.ok;
            snprintf(mem_txt, sizeof mem_txt, "%.0f GiB", (budget > 0 ? budget : mem) /
                                                            1073741824.0);
            if (best_auto.ok) {
                printf("  best auto: mb %d (B %d), %d layers, %d stages %s: %.3f s/step, planned "
                       "in %.2f s (ILP %.2f s)\n", best_auto.mb, GLOBAL_BATCH / best_auto.mb,
                       best_auto.layers, best_auto.stages, best_auto.shape, best_auto.step,
                       best_auto.plan_s, best_auto.ilp_s);
            }
            if (best_grid.ok)
                printf("  best grid: mb %d (B %d), dp %d x tp %d x pp %d: %.3f s/step (%d "
                       "points)\n", best_grid.mb, GLOBAL_BATCH / best_grid.mb, best_grid.dp,
                       best_grid.tp, best_grid.pp, best_grid.step, points);
            else if (grid)
                printf("  best grid: no feasible point (%d points)\n", points);
            bool bad = best_auto.ok && best_grid.ok &&
                       best_auto.step > best_grid.step * (1 + 1e-9);
            if (bad || (!best_auto.ok && best_grid.ok)) {
                printf("  ERROR: the automatic plan is worse than the grid\n");
                worse++;
            }
            char grid_txt[96] = "infeasible";
            if (best_grid.ok)
                snprintf(grid_txt, sizeof grid_txt, "%.3f (dp%d tp%d pp%d, B %d)",
                         best_grid.step, best_grid.dp, best_grid.tp, best_grid.pp,
                         GLOBAL_BATCH / best_grid.mb);
            if (n_rows < MAX_ROWS) {
                if (best_auto.ok)
                    snprintf(table[n_rows++], sizeof table[0],
                             "| %s | %d | %s | %d | %d | %s | %.3f | %s | %.2f | %.2f | %.2f | "
                             "%.1f |", m->name, D, mem_txt, GLOBAL_BATCH / best_auto.mb,
                             best_auto.layers, best_auto.shape, best_auto.step, grid_txt,
                             best_grid.ok ? best_grid.step / best_auto.step : NAN,
                             best_auto.plan_s, auto_max, auto_total);
                else
                    snprintf(table[n_rows++], sizeof table[0], "| %s | %d | %s | - | - | "
                             "infeasible | - | %s | - | - | %.2f | %.1f |", m->name, D, mem_txt,
                             grid_txt, auto_max, auto_total);
            }
            if (best_auto.ok && (best_grid.ok || !grid)) break;
        }
        printf("\n");
        fflush(stdout);
        autopar_cluster_free(c);
    }
    printf("| model | GPUs | memory/GPU | B | L | automatic plan (stages x (submesh) mesh) | auto "
           "s/step | best grid s/step | grid/auto | plan time (s) | slowest run (s) | all mb "
           "(s) |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (int r = 0; r < n_rows; r++) printf("%s\n", table[r]);
    printf("(* = logical mesh with the ILP free to place the batch)\n");
    return worse ? 1 : 0;
}
