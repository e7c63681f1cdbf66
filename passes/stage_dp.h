/*
 * Stage construction of the inter-operator pass: slices L layers into contiguous pipeline stages
 * and gives each stage a submesh of the cluster and a logical-mesh configuration, minimising the
 * pipeline latency of B micro-batches (reference/alpa-notes.md §2.3 and §2.6, DESIGN.md §6):
 *
 *     T = sum_s t_s + (B - 1) * max_s t_s
 *
 * subject to: the stages cover layers 0..L-1 in order, their submeshes tile the N x M cluster
 * exactly, and a stage followed by k later stages is allowed only when k <= its max_n_succ (the
 * 1F1B memory bound of §2.5).
 *
 * This module works on an abstract cost table (ap_stage_table) and knows nothing of graphs,
 * sharding or profiling: whoever fills the table decides what a stage time means. Tests compare
 * ap_stage_dp against ap_stage_dp_brute_force on random tables.
 *
 * Submeshes. A submesh shape (h, w) is h hosts x w devices per host. Accepted shapes:
 *   - (1, w) with w a power of two dividing M (Alpa's (1, 2^k), 2^k <= M when M is a power of
 *     two; Alpa requires M to be one, this module does not);
 *   - (h, M) with 1 <= h <= N (whole hosts).
 * With these shapes every multiset of stage submeshes whose sizes add up to N * M can be placed:
 * whole-host submeshes take whole hosts, and the (1, w) pieces, placed largest first, pack the
 * remaining hosts exactly because their sizes are powers of two dividing M (a first-fit on sizes
 * that divide each other never leaves a hole). The DP therefore only tracks the total device
 * count; ap_stage_place computes and verifies the placement anyway. A (1, w) with w not a power of
 * two dividing M (e.g. (1, 3) on 8-device hosts) could make the DP pick an unplaceable multiset,
 * so it is rejected up front.
 */
#ifndef AUTOPAR_STAGE_DP_H
#define AUTOPAR_STAGE_DP_H

#include "internal.h"

#include <limits.h>
#include <stddef.h>
#include <stdio.h>

/* ------------------------------------------------------------------------------------------ */
/* Submesh shapes                                                                              */
/* ------------------------------------------------------------------------------------------ */

typedef struct ap_submesh_shape {
    int n_hosts;            /* h >= 1                                                          */
    int devices_per_host;   /* w >= 1; w == M whenever h > 1                                   */
} ap_submesh_shape;

/* Which whole-host shapes (h, M) ap_submesh_choices offers (Alpa's submesh_choices_mode). The
 * (1, 2^k) shapes are always offered. */
typedef enum ap_submesh_space {
    AP_SUBMESH_POWER_OF_TWO = 0,    /* h a power of two <= N (Alpa's default)                 */
    AP_SUBMESH_ALL,                 /* every h in 2..N                                         */
    AP_SUBMESH_SMALL_POWER_OF_TWO,  /* h a power of two <= min(N, 4)                           */
    AP_SUBMESH_SPACE_COUNT
} ap_submesh_space;

/* Number of devices of a shape. */
static inline int ap_submesh_size(ap_submesh_shape s) { return s.n_hosts * s.devices_per_host; }

/* Writes the submesh choices of an n_hosts x devices_per_host cluster to out[0..*n_out-1]:
 * (1, 1), (1, 2), (1, 4), ... for powers of two dividing devices_per_host, (1, M) when M is not
 * a power of two, then (h, M) for the h > 1 that `space` selects, in increasing size. out may be NULL to only count (then cap is
 * ignored). Every set of choices contains (1, M), so the whole-host shapes can always tile the
 * cluster. Errors: AUTOPAR_ERR_INVALID_ARG (sizes < 1, bad space, n_out NULL, cap too small; the
 * message gives the count needed). */
AP_INTERNAL ap_status ap_submesh_choices(int n_hosts, int devices_per_host, ap_submesh_space space,
                                         ap_submesh_shape *out, int cap, int *n_out);

/* Checks one shape against the rules in the file comment for an n_hosts x devices_per_host
 * cluster. Errors: AUTOPAR_ERR_INVALID_ARG, the message naming the shape and the rule. */
AP_INTERNAL ap_status ap_submesh_check(ap_submesh_shape s, int n_hosts, int devices_per_host);

/* ------------------------------------------------------------------------------------------ */
/* Cost table                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* max_n_succ value meaning "no memory limit". */
#define AP_STAGE_NO_MEM_LIMIT INT_MAX

/* Dense table of stage candidates, indexed by (first layer i, last layer j >= i, submesh m,
 * config c) as time[((i * L + j) * S + m) * C + c]. Entries with j < i are never read.
 *   time:       stage time in seconds, >= 0; INFINITY when the candidate is infeasible or the
 *               submesh has fewer than c + 1 configs (Alpa pads config lists with None).
 *   max_n_succ: how many stages may follow this one (the 1F1B memory bound); < 0 means the
 *               stage does not fit at all; AP_STAGE_NO_MEM_LIMIT when unconstrained. */
typedef struct ap_stage_table {
    int     n_layers;       /* L >= 1 */
    int     n_submeshes;    /* S >= 1 */
    int     n_configs;      /* C >= 1: the largest config count of any submesh */
    double *time;
    int    *max_n_succ;
} ap_stage_table;

/* Index of (i, j, m, c) in time / max_n_succ. */
static inline size_t ap_stage_table_index(const ap_stage_table *t, int i, int j, int m, int c) {
    return (((size_t)i * (size_t)t->n_layers + (size_t)j) * (size_t)t->n_submeshes + (size_t)m) *
               (size_t)t->n_configs + (size_t)c;
}

/* Allocates an L x L x S x C table with every time INFINITY and every max_n_succ
 * AP_STAGE_NO_MEM_LIMIT. Output: *out (free with ap_stage_table_free), NULL on failure.
 * Errors: AUTOPAR_ERR_INVALID_ARG (a size < 1 or a table over 2^31 entries), AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_stage_table_new(int n_layers, int n_submeshes, int n_configs,
                                         ap_stage_table **out);

/* Frees a table. NULL-safe. */
AP_INTERNAL void ap_stage_table_free(ap_stage_table *t);

/* Produces the cost of one stage candidate: layers first..last on submesh m with config c.
 * Writes *time (INFINITY = infeasible) and *max_n_succ (AP_STAGE_NO_MEM_LIMIT = unconstrained).
 * A non-OK status aborts ap_stage_table_fill with that status. */
typedef ap_status (*ap_stage_cost_fn)(void *ctx, int first, int last, int submesh, int config,
                                      double *time, int *max_n_succ);

/* Fills every entry (i <= j, m, c < n_configs[m]) of t by calling fn once per entry, in order of
 * i, j, m, c. n_configs: per-submesh config counts (each in 1..t->n_configs), or NULL for
 * t->n_configs everywhere; entries beyond a submesh's count are left INFINITY.
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL table or fn, bad count), whatever fn returns. */
AP_INTERNAL ap_status ap_stage_table_fill(ap_stage_table *t, const int *n_configs,
                                          ap_stage_cost_fn fn, void *ctx);

/* ------------------------------------------------------------------------------------------ */
/* The DP                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* How ap_stage_dp enumerates the bound t_max on every stage's time (see ap_stage_dp). */
typedef enum ap_tmax_search {
    AP_TMAX_BRANCH_AND_BOUND = 0,   /* default: bisection over the candidates with bounds      */
    AP_TMAX_ASCENDING,              /* Alpa's loop: every candidate ascending, early stop      */
    AP_TMAX_SEARCH_COUNT
} ap_tmax_search;

typedef struct ap_stage_dp_problem {
    int                     n_hosts;            /* N >= 1                                      */
    int                     devices_per_host;   /* M >= 1                                      */
    int                     n_submeshes;        /* S, equal to table->n_submeshes              */
    const ap_submesh_shape *submeshes;          /* S shapes (see the file comment)             */
    const ap_stage_table   *table;
    int                     n_micro_batches;    /* B >= 1                                      */
    /* t_max candidates closer than this (seconds) are merged into one evaluation at the
     * largest of them (Alpa uses 1e-6). 0 = exact. The result is then within (B - 1) * gap of
     * the optimum. */
    double                  t_max_gap;
    ap_tmax_search          search;
} ap_stage_dp_problem;

/* One stage of a solution. */
typedef struct ap_stage_assignment {
    int    first_layer, last_layer;   /* inclusive                                          */
    int    submesh;                   /* index into problem->submeshes                      */
    int    config;                    /* logical-mesh config index                          */
    double time;                      /* table time of the candidate                        */
    int    max_n_succ;                /* table memory bound (>= stages after this one)      */
    /* Placement (ap_stage_place): hosts [host_begin, host_begin + n_hosts), local devices
     * [device_begin, device_begin + devices_per_host) on each: the arguments of
     * ap_mesh_new_block (mesh.h). */
    int    host_begin, n_hosts, device_begin, devices_per_host;
} ap_stage_assignment;

typedef struct ap_stage_dp_result {
    int                  n_stages;
    ap_stage_assignment *stages;     /* malloc'ed, stage order; ap_stage_dp_result_clear frees */
    double               objective;  /* sum_time + (B - 1) * max_time                          */
    double               sum_time;
    double               max_time;
    double               t_max;      /* the bound of the DP run that found it (>= max_time)    */
    int                  n_candidates;   /* distinct t_max candidates (after gap merging)      */
    int                  n_evaluated;    /* DP runs over candidates (brute force: solutions)   */
} ap_stage_dp_result;

/* Alpa's stage DP. For a bound t_max, f[s][i][d] is the least sum of stage times over slicings of
 * layers i..L-1 into s stages using exactly d devices, every stage's time <= t_max and every
 * stage with k later stages having k <= max_n_succ; it also keeps the largest stage time on that
 * path (ties on the sum prefer the smaller maximum, which keeps the lexicographic order exact).
 * The objective of a bound is min over s of f[s][0][N*M] + (B - 1) * (that maximum); the answer
 * is the best over all bounds, and a bound equal to the optimum's largest stage time finds it,
 * so enumerating every distinct table time as t_max is exact.
 *
 * Speed-ups that keep the result exact:
 *   - configs are reduced per (i, j, m) to a Pareto list over (time, max_n_succ), so the device
 *     loop runs once per (i, j, m) and stage count, not once per config;
 *   - the stage count s is kept exactly only up to E = 1 + the largest max_n_succ that can
 *     bind (an entry binds when max_n_succ < L-1-j, the most stages that can follow layers
 *     i..j); suffixes with more than E stages share one "merged" state, where only non-binding
 *     entries are usable. Without memory limits the DP is O(L^2 * S * N*M) per bound;
 *   - device loops cover only the range of device counts that are reachable;
 *   - t_max search (AP_TMAX_BRANCH_AND_BOUND): evaluate the largest candidate of an interval;
 *     the min-sum solution found (sum S, largest stage M) covers every bound in [M, t_max]
 *     (any solution with its largest stage there has sum >= S and max >= M); the interval
 *     below is bisected, and a candidate c is dropped when max(S', c) + (B - 1) * c >= best,
 *     with S' a least sum known for bounds above it (a solution whose largest stage is c costs
 *     at least that). A bound without any solution ends the search below it.
 *   - AP_TMAX_ASCENDING is Alpa's loop: every candidate in ascending order, stopping once
 *     B * t_max >= best.
 * Determinism: within a DP run, equal sums go to the smaller largest stage, then to the smaller
 * stage count, then to the first (next layer, submesh, config) in ascending order; across runs a
 * solution replaces the best only with a smaller objective, or an equal one with a smaller sum.
 * (Bounds that cannot beat the best are skipped, so among several optimal solutions the one
 * returned may depend on the search mode; the objective does not.) The reported objective, sum
 * and max are recomputed from the returned stages, in stage order.
 *
 * Measured (bench/bench_stage_dp.c, one core): L = 48 on 8 x 8 devices, 7 submeshes x 5
 * configs: 0.01-0.05 s; L = 96 on 128 x 8 devices, 11 submeshes x 5 configs: about 0.6 s on a
 * profiled-style table, about 4 s on a structureless random one.
 *
 * Reads: problem (not modified). Writes: *out (zeroed first; the caller clears it with
 * ap_stage_dp_result_clear), including the placement of every stage.
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL pointers, sizes, B < 1, negative gap, a bad submesh
 * shape, table dims that do not match, a negative or NaN time, a submesh larger than the
 * cluster, (L + 1) x (N*M + 1) over 2^23), AUTOPAR_ERR_INFEASIBLE (no slicing tiles the cluster within the memory bounds; the
 * message says why when it can tell), AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_stage_dp(const ap_stage_dp_problem *problem, ap_stage_dp_result *out);

/* Exhaustive reference for tests: enumerates every slicing into contiguous stages and every
 * (submesh, config) per stage whose sizes add up to N*M, with the same memory rule, and keeps
 * the least objective (ties: smaller sum, then fewer stages, then the first enumerated).
 * Exponential: meant for L <= 8 and small tables. Same contract and errors as ap_stage_dp
 * (t_max_gap and search are ignored; out->t_max = out->max_time). */
AP_INTERNAL ap_status ap_stage_dp_brute_force(const ap_stage_dp_problem *problem,
                                              ap_stage_dp_result *out);

/* Re-evaluates a solution against a problem: stages must cover layers 0..L-1 contiguously in
 * order, use valid submesh and config indices with finite times, respect max_n_succ, and tile
 * the cluster (their sizes add up to N*M and ap_stage_place succeeds). Writes *objective,
 * *sum_time, *max_time (each may be NULL). Reads the stages' layer ranges, submesh and config
 * only. Errors: AUTOPAR_ERR_INVALID_ARG naming the first violated rule. */
AP_INTERNAL ap_status ap_stage_dp_evaluate(const ap_stage_dp_problem *problem,
                                           const ap_stage_assignment *stages, int n_stages,
                                           double *objective, double *sum_time, double *max_time);

/* Places the stages' submeshes on the cluster (Alpa's get_sliced_virtual_submeshes): whole-host
 * submeshes (h > 1, or h = 1 with w = M) first, larger first, on consecutive hosts from host 0;
 * then the (1, w) pieces, larger first, first-fit on the remaining hosts. Ties keep stage order.
 * Writes host_begin, n_hosts, device_begin and devices_per_host of every stage.
 * Errors: AUTOPAR_ERR_INVALID_ARG (bad shape or index), AUTOPAR_ERR_INFEASIBLE (the submeshes
 * do not tile the cluster: total size differs from N*M, or the pieces do not pack),
 * AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_stage_place(int n_hosts, int devices_per_host,
                                     const ap_submesh_shape *submeshes, int n_submeshes,
                                     ap_stage_assignment *stages, int n_stages);

/* Frees r->stages and zeroes *r. NULL-safe. */
AP_INTERNAL void ap_stage_dp_result_clear(ap_stage_dp_result *r);

/* Prints the solution, one line per stage: layers, submesh shape, config, time, placement. */
AP_INTERNAL void ap_stage_dp_result_print(const ap_stage_dp_result *r,
                                          const ap_submesh_shape *submeshes, FILE *f);

#endif /* AUTOPAR_STAGE_DP_H */
