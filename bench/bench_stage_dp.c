/*
 * Stage DP timing (passes/stage_dp.h) on synthetic cost tables, one core.
 *
 * Two table families:
 *   profiled: layer work w_l ~ U[0.5, 1.5]; a stage of work W on n devices takes
 *             W / n * (1 + config overhead + noise) + a gradient all-reduce growing with W and n
 *             (3x slower across hosts); candidates whose device share is more than 2x away from
 *             their work share are infeasible (Alpa's stage_imbalance_tolerance = 1, used for
 *             GPT); max_n_succ from a per-device memory budget (weights + activations per
 *             micro-batch in flight), which binds for large early stages.
 *   uniform:  every (i, j, m, c) time ~ (j - i + 1) * U[0.2, 1.2] / sqrt(n), 10% infeasible,
 *             half the entries with a random max_n_succ in [0, L): no structure to exploit
 *             (the worst case for the device-range pruning).
 * Usage: bench_stage_dp [quick]   ("quick" skips the largest uniform case)
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime */
#include "stage_dp.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t rng_state = 12345;
static double rng_unif(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static ap_stage_table *make_table(int uniform, int L, const ap_submesh_shape *shapes, int S,
                                  int C, int D) {
    ap_stage_table *t = NULL;
    if (ap_stage_table_new(L, S, C, &t) != AUTOPAR_OK) return NULL;
    double *w = malloc((size_t)L * sizeof *w), total = 0.0;
    if (!w) {
        ap_stage_table_free(t);
        return NULL;
    }
    for (int l = 0; l < L; l++) total += (w[l] = 0.5 + rng_unif());
    const double mem = 64.0 * 48.0 / L * (D / 64.0);
    for (int i = 0; i < L; i++) {
        double work = 0.0;
        for (int j = i; j < L; j++) {
            work += w[j];
            for (int m = 0; m < S; m++) {
                int n = ap_submesh_size(shapes[m]);
                int nc = 1;
                while (nc < C && (1 << nc) <= n) nc++;   /* (dp, mp) choices, at most C */
                for (int c = 0; c < nc; c++) {
                    size_t e = ap_stage_table_index(t, i, j, m, c);
                    if (uniform) {
                        if (rng_unif() < 0.1) continue;
                        t->time[e] = (j - i + 1) * (0.2 + rng_unif()) / sqrt((double)n);
                        if (rng_unif() < 0.5) t->max_n_succ[e] = (int)(rng_unif() * L);
                        continue;
                    }
                    double share = work / total, dev_share = (double)n / D;
                    if (dev_share > 2.0 * share || dev_share < share / 2.0) continue;
                    double eff = 1.0 + 0.05 * c + 0.2 * rng_unif();
                    double comm = 0.02 * work * (1.0 - 1.0 / n) * (shapes[m].n_hosts > 1 ? 3.0 : 1.0);
                    double weights = 4.0 * work / n, act = 8.0 * work / n;
                    double k = floor((mem - weights) / act) - 1.0;
                    t->time[e] = work / n * eff + comm * (1.0 + 0.1 * rng_unif());
                    t->max_n_succ[e] = k < -1.0 ? -1 : (k > 1e6 ? 1000000 : (int)k);
                }
            }
        }
    }
    free(w);
    return t;
}

static void run(const char *family, int uniform, int L, int N, int M, int B, int ascending) {
    ap_submesh_shape shapes[64];
    int S = 0;
    if (ap_submesh_choices(N, M, AP_SUBMESH_POWER_OF_TWO, shapes, 64, &S) != AUTOPAR_OK) return;
    const int C = 5;
    rng_state = 12345u + (uint64_t)L * 7919u + (uint64_t)N * 104729u + (uint64_t)uniform;
    double t0 = now_s();
    ap_stage_table *t = make_table(uniform, L, shapes, S, C, N * M);
    double t_table = now_s() - t0;
    if (!t) {
        printf("table allocation failed\n");
        return;
    }
    ap_stage_dp_problem p = {.n_hosts = N, .devices_per_host = M, .n_submeshes = S,
                             .submeshes = shapes, .table = t, .n_micro_batches = B,
                             .search = ascending ? AP_TMAX_ASCENDING : AP_TMAX_BRANCH_AND_BOUND};
    ap_stage_dp_result r;
    t0 = now_s();
    ap_status st = ap_stage_dp(&p, &r);
    double dt = now_s() - t0;
    if (st != AUTOPAR_OK) {
        printf("%-8s L=%3d %3dx%d B=%3d %-9s: %s\n", family, L, N, M, B,
               ascending ? "ascending" : "b&b", autopar_last_error());
    } else {
        printf("%-8s L=%3d %3dx%d (%4d devices) S=%2d C=%d B=%3d %-9s: %8.3f s  "
               "(%4d of %6d t_max runs, %.1f ms each)  %2d stages, objective %.5g, "
               "max stage %.4g  [table %.2f s]\n",
               family, L, N, M, N * M, S, C, B, ascending ? "ascending" : "b&b", dt,
               r.n_evaluated, r.n_candidates, 1e3 * dt / (r.n_evaluated + 1), r.n_stages,
               r.objective, r.max_time, t_table);
    }
    ap_stage_dp_result_clear(&r);
    ap_stage_table_free(t);
}

int main(int argc, char **argv) {
    int quick = argc > 1 && strcmp(argv[1], "quick") == 0;
    run("profiled", 0, 48, 8, 8, 16, 0);
    run("profiled", 0, 48, 8, 8, 16, 1);
    run("uniform", 1, 48, 8, 8, 16, 0);
    run("uniform", 1, 48, 8, 8, 16, 1);
    run("profiled", 0, 64, 128, 8, 64, 0);
    run("profiled", 0, 64, 128, 8, 64, 1);
    run("profiled", 0, 96, 128, 8, 64, 0);
    run("profiled", 0, 96, 128, 8, 8, 0);
    run("uniform", 1, 64, 128, 8, 64, 0);
    if (!quick) run("uniform", 1, 96, 128, 8, 64, 0);
    return 0;
}
