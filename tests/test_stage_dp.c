/*
 * Stage DP (passes/stage_dp.h): the DP against exhaustive enumeration on random small
 * instances, hand-derived cases, placement, error cases, and a timing at L = 48 on 64 devices.
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime */
#include "stage_dp.h"
#include "check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double rng_unif(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }
static int rng_int(int lo, int hi) { return lo + (int)(rng_next() % (uint64_t)(hi - lo + 1)); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Every device of the cluster is covered by exactly one stage's placement. */
static int placement_ok(const ap_stage_dp_problem *p, const ap_stage_dp_result *r) {
    int N = p->n_hosts, M = p->devices_per_host;
    int *cover = calloc((size_t)(N * M), sizeof *cover);
    if (!cover) return 0;
    int ok = 1;
    for (int q = 0; q < r->n_stages; q++) {
        const ap_stage_assignment *a = &r->stages[q];
        ap_submesh_shape s = p->submeshes[a->submesh];
        if (a->n_hosts != s.n_hosts || a->devices_per_host != s.devices_per_host) ok = 0;
        for (int h = a->host_begin; h < a->host_begin + a->n_hosts; h++)
            for (int d = a->device_begin; d < a->device_begin + a->devices_per_host; d++) {
                if (h < 0 || h >= N || d < 0 || d >= M) {
                    ok = 0;
                    continue;
                }
                cover[h * M + d]++;
            }
    }
    for (int k = 0; k < N * M; k++) ok &= cover[k] == 1;
    free(cover);
    return ok;
}

static int rel_close(double a, double b) {
    return fabs(a - b) <= 1e-9 * fmax(1.0, fmax(fabs(a), fabs(b)));
}

/* ---- random instances ----------------------------------------------------------------------- */

typedef struct instance {
    ap_stage_dp_problem p;
    ap_stage_table *t;
    ap_submesh_shape shapes[16];
} instance;

static const int clusters[][2] = {{1, 2}, {1, 4}, {1, 8}, {2, 2}, {2, 4}, {1, 1}, {4, 2}, {2, 6}};

/* kind 0: uniform times; 1: work / devices with noise (near-ties, structure); 2: small integer
 * times (many exact ties). */
static int make_random(instance *in, int kind) {
    memset(in, 0, sizeof *in);
    int ci = rng_int(0, (int)(sizeof clusters / sizeof clusters[0]) - 1);
    int N = clusters[ci][0], M = clusters[ci][1];
    ap_submesh_space space = rng_int(0, 1) ? AP_SUBMESH_ALL : AP_SUBMESH_POWER_OF_TWO;
    int S = 0;
    if (ap_submesh_choices(N, M, space, in->shapes, 16, &S) != AUTOPAR_OK) return 0;
    int L = rng_int(1, 6);
    int C = rng_int(1, 3);
    if (ap_stage_table_new(L, S, C, &in->t) != AUTOPAR_OK) return 0;
    double p_inf = rng_unif() * 0.35;
    double p_mem = rng_unif();          /* share of entries with a memory bound */
    double work[8];
    for (int l = 0; l < L; l++) work[l] = 0.5 + rng_unif();
    for (int i = 0; i < L; i++)
        for (int j = i; j < L; j++) {
            double w = 0.0;
            for (int l = i; l <= j; l++) w += work[l];
            for (int m = 0; m < S; m++) {
                int n = ap_submesh_size(in->shapes[m]);
                int nc = rng_int(1, C);
                for (int c = 0; c < nc; c++) {
                    size_t e = ap_stage_table_index(in->t, i, j, m, c);
                    if (rng_unif() < p_inf) continue;
                    double v;
                    if (kind == 0) v = 0.1 + 10.0 * rng_unif();
                    else if (kind == 1) v = w / n * (1.0 + 0.3 * rng_unif()) + 0.05 * log2(n + 1.0);
                    else v = (double)rng_int(1, 6);
                    in->t->time[e] = v;
                    if (rng_unif() < p_mem) in->t->max_n_succ[e] = rng_int(-1, L);
                }
            }
        }
    in->p.n_hosts = N;
    in->p.devices_per_host = M;
    in->p.n_submeshes = S;
    in->p.submeshes = in->shapes;
    in->p.table = in->t;
    static const int Bs[4] = {1, 2, 4, 8};
    in->p.n_micro_batches = Bs[rng_int(0, 3)];
    in->p.t_max_gap = 0.0;
    in->p.search = AP_TMAX_BRANCH_AND_BOUND;
    return 1;
}

static void test_random(int n_instances) {
    int n_feasible = 0, n_infeasible = 0, n_multi_stage = 0, n_bnb_evals = 0, n_asc_evals = 0;
    for (int it = 0; it < n_instances; it++) {
        instance in;
        if (!make_random(&in, it % 3)) {
            CHECK(0, "instance %d: setup failed: %s", it, autopar_last_error());
            continue;
        }
        ap_stage_dp_result bf, dp, asc;
        ap_status sb = ap_stage_dp_brute_force(&in.p, &bf);
        ap_status sd = ap_stage_dp(&in.p, &dp);
        in.p.search = AP_TMAX_ASCENDING;
        ap_status sa = ap_stage_dp(&in.p, &asc);
        in.p.search = AP_TMAX_BRANCH_AND_BOUND;
        CHECK(sb == AUTOPAR_OK || sb == AUTOPAR_ERR_INFEASIBLE, "instance %d: brute force %d: %s",
              it, sb, autopar_last_error());
        CHECK(sd == sb && sa == sb, "instance %d (L=%d, %dx%d, B=%d): status dp %d asc %d, brute "
              "force %d", it, in.t->n_layers, in.p.n_hosts, in.p.devices_per_host,
              in.p.n_micro_batches, sd, sa, sb);
        if (sb == AUTOPAR_OK && sd == AUTOPAR_OK && sa == AUTOPAR_OK) {
            n_feasible++;
            n_multi_stage += dp.n_stages > 1;
            n_bnb_evals += dp.n_evaluated;
            n_asc_evals += asc.n_evaluated;
            CHECK(rel_close(dp.objective, bf.objective), "instance %d (L=%d, %dx%d, B=%d): dp "
                  "objective %.17g, brute force %.17g", it, in.t->n_layers, in.p.n_hosts,
                  in.p.devices_per_host, in.p.n_micro_batches, dp.objective, bf.objective);
            CHECK(rel_close(asc.objective, bf.objective), "instance %d: ascending objective "
                  "%.17g, brute force %.17g", it, asc.objective, bf.objective);
            double obj = -1.0, sum = -1.0, mx = -1.0;
            ap_status se = ap_stage_dp_evaluate(&in.p, dp.stages, dp.n_stages, &obj, &sum, &mx);
            CHECK(se == AUTOPAR_OK && obj == dp.objective && sum == dp.sum_time &&
                  mx == dp.max_time, "instance %d: re-evaluation %d (%s) gives %.17g, reported "
                  "%.17g", it, se, autopar_last_error(), obj, dp.objective);
            CHECK(dp.max_time <= dp.t_max, "instance %d: max %.17g above t_max %.17g", it,
                  dp.max_time, dp.t_max);
            CHECK(placement_ok(&in.p, &dp), "instance %d: placement does not tile the cluster",
                  it);
            CHECK(placement_ok(&in.p, &bf), "instance %d: brute-force placement", it);
            for (int q = 0; q < dp.n_stages; q++)
                CHECK(dp.stages[q].max_n_succ >= dp.n_stages - 1 - q, "instance %d: stage %d "
                      "memory", it, q);
        } else if (sb == AUTOPAR_ERR_INFEASIBLE) {
            n_infeasible++;
        }
        ap_stage_dp_result_clear(&bf);
        ap_stage_dp_result_clear(&dp);
        ap_stage_dp_result_clear(&asc);
        ap_stage_table_free(in.t);
    }
    printf("random: %d instances, %d feasible (%d with > 1 stage), %d infeasible; t_max runs: "
           "branch-and-bound %d, ascending %d\n", n_instances, n_feasible, n_multi_stage,
           n_infeasible, n_bnb_evals, n_asc_evals);
    CHECK(n_feasible >= n_instances / 2, "too few feasible instances (%d)", n_feasible);
    CHECK(n_multi_stage >= n_instances / 10, "too few pipelined optima (%d)", n_multi_stage);
}

/* With a gap, the result is within (B - 1) * gap of the optimum. */
static void test_gap(void) {
    for (int it = 0; it < 60; it++) {
        instance in;
        if (!make_random(&in, 1)) continue;
        in.p.t_max_gap = 0.05;
        ap_stage_dp_result bf, dp;
        ap_status sb = ap_stage_dp_brute_force(&in.p, &bf);
        ap_status sd = ap_stage_dp(&in.p, &dp);
        CHECK(sd == sb, "gap instance %d: status %d vs %d", it, sd, sb);
        if (sb == AUTOPAR_OK && sd == AUTOPAR_OK)
            CHECK(dp.objective >= bf.objective - 1e-9 &&
                  dp.objective <= bf.objective + (in.p.n_micro_batches - 1) * 0.05 + 1e-9,
                  "gap instance %d: %.17g vs optimum %.17g", it, dp.objective, bf.objective);
        ap_stage_dp_result_clear(&bf);
        ap_stage_dp_result_clear(&dp);
        ap_stage_table_free(in.t);
    }
}

/* ---- hand cases ----------------------------------------------------------------------------- */

static void set_time(ap_stage_table *t, int i, int j, int m, int c, double v, int mns) {
    size_t e = ap_stage_table_index(t, i, j, m, c);
    t->time[e] = v;
    t->max_n_succ[e] = mns;
}

/* 4 layers of unit work on one host of 4 devices, perfectly scaling: t(i..j, n devices) =
 * (j - i + 1) / n. Every tiling has per-stage times (layers / devices); with B = 4:
 *   one stage on (1,4):                t = 1,              obj = 1 + 3 * 1 = 4
 *   two stages of 2 layers on (1,2):   t = 1, 1,           obj = 2 + 3 * 1 = 5
 *   four stages of 1 layer on (1,1):   t = 1 x 4,          obj = 4 + 3 * 1 = 7
 *   layers 0..2 on (1,2) + 3 on (1,2): t = 1.5, 0.5,       obj = 2 + 3 * 1.5 = 6.5
 * Any pipeline has >= 2 stages whose times add up to >= 2 (total work 4 over <= 4 devices, each
 * stage on a share of them), so the pure data-parallel stage (objective 4) is the optimum. */
static void test_hand_data_parallel(void) {
    ap_submesh_shape shapes[3];
    int S = 0;
    CHECK(ap_submesh_choices(1, 4, AP_SUBMESH_POWER_OF_TWO, shapes, 3, &S) == AUTOPAR_OK && S == 3,
          "choices");
    ap_stage_table *t = NULL;
    CHECK(ap_stage_table_new(4, S, 1, &t) == AUTOPAR_OK, "table");
    if (!t) return;
    for (int i = 0; i < 4; i++)
        for (int j = i; j < 4; j++)
            for (int m = 0; m < S; m++)
                set_time(t, i, j, m, 0, (double)(j - i + 1) / ap_submesh_size(shapes[m]),
                         AP_STAGE_NO_MEM_LIMIT);
    ap_stage_dp_problem p = {.n_hosts = 1, .devices_per_host = 4, .n_submeshes = S,
                             .submeshes = shapes, .table = t, .n_micro_batches = 4};
    ap_stage_dp_result r;
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_OK, "dp: %s", autopar_last_error());
    CHECK(r.n_stages == 1 && r.stages[0].first_layer == 0 && r.stages[0].last_layer == 3 &&
          r.stages[0].submesh == 2 && r.objective == 4.0,
          "expected one stage 0..3 on (1,4) with objective 4, got %d stages, objective %g",
          r.n_stages, r.objective);
    ap_stage_dp_result_clear(&r);
    ap_stage_table_free(t);
}

/* 2 layers on one host of 2 devices. Data parallelism pays a gradient all-reduce:
 *   both layers on (1,2):        t = 1.0 compute + 0.5 all-reduce = 1.5
 *   one layer on (1,1) each:     t = 1.0, 1.0 (no all-reduce; activations cross)
 * (a (1,2) stage plus anything else exceeds 2 devices; a lone (1,1) stage leaves a device idle).
 *   B = 4: data parallel 1.5 + 3 * 1.5 = 6;  pipeline 2 + 3 * 1 = 5      -> 2-stage pipeline
 *   B = 1: data parallel 1.5;                pipeline 2 + 0     = 2      -> data parallel
 *   B = 4 with stage 0 on (1,1) allowed no later stage (max_n_succ 0: it cannot hold the
 *   activations of two micro-batches): the pipeline is infeasible       -> data parallel, 6 */
static void test_hand_pipeline(void) {
    ap_submesh_shape shapes[2] = {{1, 1}, {1, 2}};
    ap_stage_table *t = NULL;
    CHECK(ap_stage_table_new(2, 2, 1, &t) == AUTOPAR_OK, "table");
    if (!t) return;
    set_time(t, 0, 1, 1, 0, 1.5, AP_STAGE_NO_MEM_LIMIT);
    set_time(t, 0, 0, 0, 0, 1.0, AP_STAGE_NO_MEM_LIMIT);
    set_time(t, 1, 1, 0, 0, 1.0, AP_STAGE_NO_MEM_LIMIT);
    set_time(t, 0, 1, 0, 0, 2.0, AP_STAGE_NO_MEM_LIMIT);
    set_time(t, 0, 0, 1, 0, 0.75, AP_STAGE_NO_MEM_LIMIT);
    set_time(t, 1, 1, 1, 0, 0.75, AP_STAGE_NO_MEM_LIMIT);
    ap_stage_dp_problem p = {.n_hosts = 1, .devices_per_host = 2, .n_submeshes = 2,
                             .submeshes = shapes, .table = t, .n_micro_batches = 4};
    ap_stage_dp_result r;
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_OK, "dp: %s", autopar_last_error());
    CHECK(r.n_stages == 2 && r.stages[0].last_layer == 0 && r.stages[0].submesh == 0 &&
          r.stages[1].submesh == 0 && r.objective == 5.0 && r.max_time == 1.0,
          "B=4: expected the 2-stage pipeline (objective 5), got %d stages, objective %g",
          r.n_stages, r.objective);
    CHECK(r.n_stages != 2 || (r.stages[0].device_begin != r.stages[1].device_begin),
          "the two stages share a device");
    ap_stage_dp_result_clear(&r);

    p.n_micro_batches = 1;
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_OK, "dp: %s", autopar_last_error());
    CHECK(r.n_stages == 1 && r.stages[0].submesh == 1 && r.objective == 1.5,
          "B=1: expected data parallel (1.5), got %d stages, objective %g", r.n_stages,
          r.objective);
    ap_stage_dp_result_clear(&r);

    p.n_micro_batches = 4;
    set_time(t, 0, 0, 0, 0, 1.0, 0);
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_OK, "dp: %s", autopar_last_error());
    CHECK(r.n_stages == 1 && r.objective == 6.0,
          "B=4 with memory: expected data parallel (6), got %d stages, objective %g", r.n_stages,
          r.objective);
    ap_stage_dp_result_clear(&r);
    ap_stage_table_free(t);
}

/* Placement on 2 hosts x 4 of stages (1,2), (1,4), (1,2): the (1,4) uses all devices of a host,
 * so it is placed first as a whole host (host 0); the two (1,2) pieces then share host 1. */
static void test_place(void) {
    ap_submesh_shape shapes[4] = {{1, 1}, {1, 2}, {1, 4}, {2, 4}};
    ap_stage_assignment st[3] = {{.submesh = 1}, {.submesh = 2}, {.submesh = 1}};
    CHECK(ap_stage_place(2, 4, shapes, 4, st, 3) == AUTOPAR_OK, "place: %s", autopar_last_error());
    CHECK(st[1].host_begin == 0 && st[1].device_begin == 0 && st[1].devices_per_host == 4,
          "(1,4) should take host 0");
    CHECK(st[0].host_begin == 1 && st[0].device_begin == 0 && st[2].host_begin == 1 &&
          st[2].device_begin == 2, "(1,2) pieces should share host 1: %d/%d %d/%d",
          st[0].host_begin, st[0].device_begin, st[2].host_begin, st[2].device_begin);
    ap_stage_assignment bad[2] = {{.submesh = 2}, {.submesh = 1}};
    CHECK(ap_stage_place(2, 4, shapes, 4, bad, 2) == AUTOPAR_ERR_INFEASIBLE, "6 of 8 devices");
    ap_submesh_shape odd[2] = {{1, 3}, {1, 1}};
    ap_stage_assignment o[2] = {{.submesh = 0}, {.submesh = 1}};
    CHECK(ap_stage_place(1, 4, odd, 2, o, 2) == AUTOPAR_ERR_INVALID_ARG, "(1,3) on 4-device hosts");
}

static void test_choices(void) {
    ap_submesh_shape s[16];
    int n = 0;
    CHECK(ap_submesh_choices(128, 8, AP_SUBMESH_POWER_OF_TWO, s, 16, &n) == AUTOPAR_OK && n == 11,
          "128x8: %d", n);
    CHECK(n == 11 && s[0].devices_per_host == 1 && s[3].devices_per_host == 8 &&
          s[3].n_hosts == 1 && s[4].n_hosts == 2 && s[10].n_hosts == 128, "128x8 shapes");
    CHECK(ap_submesh_choices(3, 4, AP_SUBMESH_ALL, s, 16, &n) == AUTOPAR_OK && n == 5 &&
          s[4].n_hosts == 3, "3x4 all: %d", n);
    CHECK(ap_submesh_choices(16, 8, AP_SUBMESH_SMALL_POWER_OF_TWO, s, 16, &n) == AUTOPAR_OK &&
          n == 6, "16x8 small: %d", n);
    CHECK(ap_submesh_choices(2, 6, AP_SUBMESH_POWER_OF_TWO, s, 16, &n) == AUTOPAR_OK && n == 4 &&
          s[1].devices_per_host == 2 && s[2].devices_per_host == 6 && s[3].n_hosts == 2,
          "2x6: (1,1), (1,2), (1,6), (2,6): %d", n);
    CHECK(ap_submesh_check((ap_submesh_shape){1, 6}, 2, 6) == AUTOPAR_OK &&
          ap_submesh_check((ap_submesh_shape){1, 3}, 2, 6) == AUTOPAR_ERR_INVALID_ARG &&
          ap_submesh_check((ap_submesh_shape){2, 3}, 2, 6) == AUTOPAR_ERR_INVALID_ARG &&
          ap_submesh_check((ap_submesh_shape){3, 6}, 2, 6) == AUTOPAR_ERR_INVALID_ARG,
          "shape checks on 2 x 6");
    CHECK(ap_submesh_choices(2, 8, AP_SUBMESH_POWER_OF_TWO, s, 2, &n) == AUTOPAR_ERR_INVALID_ARG,
          "cap");
    CHECK(ap_submesh_choices(2, 8, AP_SUBMESH_POWER_OF_TWO, NULL, 0, &n) == AUTOPAR_OK && n == 5,
          "count only");
}

static void test_errors(void) {
    ap_submesh_shape shapes[2] = {{1, 1}, {1, 2}};
    ap_stage_table *t = NULL;
    CHECK(ap_stage_table_new(2, 2, 1, &t) == AUTOPAR_OK, "table");
    if (!t) return;
    ap_stage_dp_problem p = {.n_hosts = 1, .devices_per_host = 2, .n_submeshes = 2,
                             .submeshes = shapes, .table = t, .n_micro_batches = 2};
    ap_stage_dp_result r;
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_ERR_INFEASIBLE && r.stages == NULL,
          "all infinite: %s", autopar_last_error());
    set_time(t, 0, 0, 0, 0, 1.0, AP_STAGE_NO_MEM_LIMIT);
    set_time(t, 1, 1, 1, 0, 1.0, AP_STAGE_NO_MEM_LIMIT);
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_ERR_INFEASIBLE, "1 + 2 devices never tile 2: %s",
          autopar_last_error());
    set_time(t, 1, 1, 0, 0, 1.0, -1);
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_ERR_INFEASIBLE, "max_n_succ -1");
    set_time(t, 1, 1, 0, 0, 1.0, 0);
    set_time(t, 0, 0, 0, 0, 1.0, 0);
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_ERR_INFEASIBLE, "first stage may not have a successor");
    set_time(t, 0, 0, 0, 0, 1.0, 1);
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_OK && r.n_stages == 2 && r.objective == 3.0,
          "2 stages: %s", autopar_last_error());
    ap_stage_dp_result_clear(&r);

    p.n_micro_batches = 0;
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_ERR_INVALID_ARG, "B = 0");
    p.n_micro_batches = 2;
    p.t_max_gap = -1.0;
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_ERR_INVALID_ARG, "negative gap");
    p.t_max_gap = 0.0;
    p.n_submeshes = 1;
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_ERR_INVALID_ARG, "submesh count mismatch");
    p.n_submeshes = 2;
    ap_submesh_shape bad[2] = {{1, 1}, {1, 3}};
    p.submeshes = bad;
    p.devices_per_host = 4;
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_ERR_INVALID_ARG &&
          strstr(autopar_last_error(), "(1, 3)") != NULL, "(1, 3): %s", autopar_last_error());
    p.submeshes = shapes;
    p.devices_per_host = 2;
    set_time(t, 0, 1, 0, 0, -2.0, 0);
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_ERR_INVALID_ARG, "negative time");
    set_time(t, 0, 1, 0, 0, NAN, 0);
    CHECK(ap_stage_dp(&p, &r) == AUTOPAR_ERR_INVALID_ARG, "NaN time");
    CHECK(ap_stage_dp(NULL, &r) == AUTOPAR_ERR_INVALID_ARG, "NULL problem");
    CHECK(ap_stage_dp(&p, NULL) == AUTOPAR_ERR_INVALID_ARG, "NULL out");
    ap_stage_table *t2 = NULL;
    CHECK(ap_stage_table_new(0, 1, 1, &t2) == AUTOPAR_ERR_INVALID_ARG && !t2, "L = 0");
    ap_stage_table_free(t);
}

/* ---- timing ----------------------------------------------------------------------------------- */

/* A table in the style of a profiled model: layer work w_l; a stage of work W on n devices takes
 * W / n * (1 + config overhead) plus a gradient all-reduce growing with W and n (3x slower when
 * the submesh spans hosts); candidates whose device share is far from their work share are
 * infeasible (Alpa's stage_imbalance_tolerance = 1); max_n_succ follows from a memory budget of
 * weights plus one activation set per micro-batch in flight. */
static ap_stage_table *profiled_table(int L, const ap_submesh_shape *shapes, int S, int C, int D) {
    ap_stage_table *t = NULL;
    if (ap_stage_table_new(L, S, C, &t) != AUTOPAR_OK) return NULL;
    double *w = malloc((size_t)L * sizeof *w), total = 0.0;
    if (!w) {
        ap_stage_table_free(t);
        return NULL;
    }
    for (int l = 0; l < L; l++) total += (w[l] = 0.5 + rng_unif());
    const double mem = 64.0 * 48.0 / L;
    for (int i = 0; i < L; i++) {
        double work = 0.0;
        for (int j = i; j < L; j++) {
            work += w[j];
            for (int m = 0; m < S; m++) {
                int n = ap_submesh_size(shapes[m]);
                double share = work / total, dev_share = (double)n / D;
                if (dev_share > 2.0 * share || dev_share < share / 2.0) continue;
                int nc = 1;
                while (nc < C && (1 << nc) <= n) nc++;
                for (int c = 0; c < nc; c++) {
                    double eff = 1.0 + 0.05 * c + 0.2 * rng_unif();
                    double comm = 0.02 * work * (1.0 - 1.0 / n) * (shapes[m].n_hosts > 1 ? 3.0 : 1.0);
                    double v = work / n * eff + comm * (1.0 + 0.1 * rng_unif());
                    double weights = 4.0 * work / n, act = 8.0 * work / n;
                    double k = floor((mem - weights) / act) - 1.0;
                    size_t e = ap_stage_table_index(t, i, j, m, c);
                    t->time[e] = v;
                    t->max_n_succ[e] = k < -1.0 ? -1 : (k > 1e6 ? 1000000 : (int)k);
                }
            }
        }
    }
    free(w);
    return t;
}

/* Medium instances (too large for brute force): both t_max searches must agree. */
static void test_medium(void) {
    ap_submesh_shape shapes[16];
    int n_multi = 0;
    for (int it = 0; it < 40; it++) {
        int N = rng_int(1, 4), M = 1 << rng_int(0, 3), S = 0;
        if (ap_submesh_choices(N, M, AP_SUBMESH_ALL, shapes, 16, &S) != AUTOPAR_OK) continue;
        int L = rng_int(6, 20);
        ap_stage_table *t = it % 2 ? profiled_table(L, shapes, S, 3, N * M) : NULL;
        if (!t) {
            if (ap_stage_table_new(L, S, 3, &t) != AUTOPAR_OK) continue;
            for (int i = 0; i < L; i++)
                for (int j = i; j < L; j++)
                    for (int m = 0; m < S; m++)
                        for (int c = 0; c < 3; c++) {
                            if (rng_unif() < 0.2) continue;
                            size_t e = ap_stage_table_index(t, i, j, m, c);
                            t->time[e] = (j - i + 1) * (0.2 + rng_unif()) /
                                         sqrt((double)ap_submesh_size(shapes[m]));
                            if (rng_unif() < 0.5) t->max_n_succ[e] = rng_int(-1, L);
                        }
        }
        ap_stage_dp_problem p = {.n_hosts = N, .devices_per_host = M, .n_submeshes = S,
                                 .submeshes = shapes, .table = t,
                                 .n_micro_batches = 1 << rng_int(0, 5)};
        ap_stage_dp_result a, b;
        ap_status sa = ap_stage_dp(&p, &a);
        p.search = AP_TMAX_ASCENDING;
        ap_status sb = ap_stage_dp(&p, &b);
        CHECK(sa == sb, "medium %d: status %d vs %d", it, sa, sb);
        if (sa == AUTOPAR_OK && sb == AUTOPAR_OK) {
            CHECK(rel_close(a.objective, b.objective), "medium %d (L=%d, %dx%d, B=%d): "
                  "branch-and-bound %.17g, ascending %.17g", it, L, N, M, p.n_micro_batches,
                  a.objective, b.objective);
            CHECK(placement_ok(&p, &a), "medium %d placement", it);
            n_multi += a.n_stages > 1;
        }
        ap_stage_dp_result_clear(&a);
        ap_stage_dp_result_clear(&b);
        ap_stage_table_free(t);
    }
    printf("medium: 40 instances, %d pipelined optima\n", n_multi);
}

static void test_timing(void) {
    ap_submesh_shape shapes[16];
    int S = 0;
    CHECK(ap_submesh_choices(8, 8, AP_SUBMESH_POWER_OF_TWO, shapes, 16, &S) == AUTOPAR_OK, "ch");
    ap_stage_table *t = profiled_table(48, shapes, S, 5, 64);
    CHECK(t != NULL, "table");
    if (!t) return;
    ap_stage_dp_problem p = {.n_hosts = 8, .devices_per_host = 8, .n_submeshes = S,
                             .submeshes = shapes, .table = t, .n_micro_batches = 16};
    ap_stage_dp_result r;
    double t0 = now_s();
    ap_status st = ap_stage_dp(&p, &r);
    double dt = now_s() - t0;
    CHECK(st == AUTOPAR_OK, "timing dp: %s", autopar_last_error());
    if (st == AUTOPAR_OK) {
        printf("timing: L=48, 8x8 devices, %d submeshes x 5 configs, B=16: %.3f s, %d stages, "
               "objective %.4g, %d of %d t_max candidates evaluated\n", S, dt, r.n_stages,
               r.objective, r.n_evaluated, r.n_candidates);
        CHECK(dt < 30.0, "L=48 on 64 devices took %.1f s", dt);
    }
    ap_stage_dp_result_clear(&r);
    ap_stage_table_free(t);
}

int main(void) {
    test_choices();
    test_place();
    test_errors();
    test_hand_data_parallel();
    test_hand_pipeline();
    test_random(300);
    test_gap();
    test_medium();
    test_timing();
    if (g_failures) {
        fprintf(stderr, "test_stage_dp: %d failure(s)\n", g_failures);
        return 1;
    }
    printf("test_stage_dp: ok\n");
    return 0;
}
