/*
 * Stage DP of the inter-operator pass (see stage_dp.h for the problem and the algorithm).
 *
 * Layout of the DP arrays: a "layer" of the DP (one stage count s) is (L + 1) rows of D + 1
 * device counts, row i holding suffixes that start at layer i. Two layers roll (s - 1 -> s),
 * plus the merged layer (suffixes with more than E stages) and its successor view (the better
 * of "exactly E stages" and "more than E stages" per entry). Every entry carries the least sum
 * of stage times and the largest stage time on that path.
 */
#include "stage_dp.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Submesh shapes                                                                              */
/* ------------------------------------------------------------------------------------------ */

static bool is_pow2(int v) { return v > 0 && (v & (v - 1)) == 0; }

ap_status ap_submesh_check(ap_submesh_shape s, int n_hosts, int devices_per_host) {
    if (s.n_hosts < 1 || s.devices_per_host < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "submesh (%d, %d): sizes must be >= 1",
                        s.n_hosts, s.devices_per_host);
    if (s.n_hosts == 1 && s.devices_per_host != devices_per_host) {
        /* Powers of two dividing M are what makes any multiset of pieces pack into hosts. */
        if (!is_pow2(s.devices_per_host) || devices_per_host % s.devices_per_host != 0)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "submesh (1, %d): a single-host submesh needs "
                            "a power-of-two device count dividing the %d devices per host",
                            s.devices_per_host, devices_per_host);
        return AUTOPAR_OK;
    }
    if (s.devices_per_host != devices_per_host)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "submesh (%d, %d): a multi-host submesh must use "
                        "all %d devices of each host", s.n_hosts, s.devices_per_host,
                        devices_per_host);
    if (s.n_hosts > n_hosts)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "submesh (%d, %d): the cluster has only %d hosts",
                        s.n_hosts, s.devices_per_host, n_hosts);
    return AUTOPAR_OK;
}

ap_status ap_submesh_choices(int n_hosts, int devices_per_host, ap_submesh_space space,
                             ap_submesh_shape *out, int cap, int *n_out) {
    if (!n_out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_submesh_choices: n_out is NULL");
    *n_out = 0;
    if (n_hosts < 1 || devices_per_host < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_submesh_choices: cluster %d x %d: sizes must "
                        "be >= 1", n_hosts, devices_per_host);
    if ((int)space < 0 || space >= AP_SUBMESH_SPACE_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_submesh_choices: bad space %d", (int)space);
    int count = 0;
    for (long w = 1; w <= devices_per_host; w *= 2) {
        if (devices_per_host % w != 0) continue;
        if (out && count < cap) out[count] = (ap_submesh_shape){1, (int)w};
        count++;
    }
    if (!is_pow2(devices_per_host)) {   /* the whole host, when M is not a power of two */
        if (out && count < cap) out[count] = (ap_submesh_shape){1, devices_per_host};
        count++;
    }
    int h_cap = space == AP_SUBMESH_SMALL_POWER_OF_TWO ? (n_hosts < 4 ? n_hosts : 4) : n_hosts;
    for (int h = 2; h <= h_cap; h++) {
        if (space != AP_SUBMESH_ALL && !is_pow2(h)) continue;
        if (out && count < cap) out[count] = (ap_submesh_shape){h, devices_per_host};
        count++;
    }
    if (out && count > cap)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_submesh_choices: %d choices do not fit in "
                        "cap %d", count, cap);
    *n_out = count;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Cost table                                                                                  */
/* ------------------------------------------------------------------------------------------ */

ap_status ap_stage_table_new(int n_layers, int n_submeshes, int n_configs, ap_stage_table **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_table_new: out is NULL");
    *out = NULL;
    if (n_layers < 1 || n_submeshes < 1 || n_configs < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_table_new: sizes L=%d S=%d C=%d must "
                        "be >= 1", n_layers, n_submeshes, n_configs);
    double n = (double)n_layers * n_layers * n_submeshes * n_configs;
    if (n > (double)INT32_MAX)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_table_new: L=%d S=%d C=%d gives %.0f "
                        "entries, over the 2^31 limit", n_layers, n_submeshes, n_configs, n);
    size_t cnt = (size_t)n;
    ap_stage_table *t = calloc(1, sizeof *t);
    if (t) {
        t->time = malloc(cnt * sizeof *t->time);
        t->max_n_succ = malloc(cnt * sizeof *t->max_n_succ);
    }
    if (!t || !t->time || !t->max_n_succ) {
        ap_stage_table_free(t);
        return ap_error(AUTOPAR_ERR_NOMEM, "ap_stage_table_new: out of memory (%zu entries)", cnt);
    }
    t->n_layers = n_layers;
    t->n_submeshes = n_submeshes;
    t->n_configs = n_configs;
    for (size_t k = 0; k < cnt; k++) {
        t->time[k] = INFINITY;
        t->max_n_succ[k] = AP_STAGE_NO_MEM_LIMIT;
    }
    *out = t;
    return AUTOPAR_OK;
}

void ap_stage_table_free(ap_stage_table *t) {
    if (!t) return;
    free(t->time);
    free(t->max_n_succ);
    free(t);
}

ap_status ap_stage_table_fill(ap_stage_table *t, const int *n_configs, ap_stage_cost_fn fn,
                              void *ctx) {
    if (!t || !fn) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_table_fill: NULL table or fn");
    const int L = t->n_layers, S = t->n_submeshes;
    if (n_configs)
        for (int m = 0; m < S; m++)
            if (n_configs[m] < 1 || n_configs[m] > t->n_configs)
                return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_table_fill: submesh %d has %d "
                                "configs, expected 1..%d", m, n_configs[m], t->n_configs);
    for (int i = 0; i < L; i++)
        for (int j = i; j < L; j++)
            for (int m = 0; m < S; m++) {
                int nc = n_configs ? n_configs[m] : t->n_configs;
                for (int c = 0; c < nc; c++) {
                    size_t e = ap_stage_table_index(t, i, j, m, c);
                    double time = INFINITY;
                    int mns = AP_STAGE_NO_MEM_LIMIT;
                    ap_status st = fn(ctx, i, j, m, c, &time, &mns);
                    if (st != AUTOPAR_OK) return st;
                    t->time[e] = time;
                    t->max_n_succ[e] = mns;
                }
            }
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Problem validation, evaluation, placement                                                   */
/* ------------------------------------------------------------------------------------------ */

static ap_status check_problem(const ap_stage_dp_problem *p, const char *who) {
    if (!p || !p->table || !p->submeshes)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: NULL problem, table or submesh list", who);
    const ap_stage_table *t = p->table;
    if (p->n_hosts < 1 || p->devices_per_host < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: cluster %d x %d: sizes must be >= 1", who,
                        p->n_hosts, p->devices_per_host);
    if ((double)p->n_hosts * p->devices_per_host > (double)(1 << 24))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: cluster %d x %d is too large", who,
                        p->n_hosts, p->devices_per_host);
    if (p->n_micro_batches < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: %d micro-batches, need >= 1", who,
                        p->n_micro_batches);
    if (!(p->t_max_gap >= 0.0) || !isfinite(p->t_max_gap))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: t_max_gap %g must be finite and >= 0", who,
                        p->t_max_gap);
    if ((int)p->search < 0 || p->search >= AP_TMAX_SEARCH_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: bad t_max search %d", who, (int)p->search);
    if (t->n_layers < 1 || t->n_configs < 1 || !t->time || !t->max_n_succ)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: malformed table", who);
    if (p->n_submeshes < 1 || p->n_submeshes != t->n_submeshes)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: %d submeshes but the table has %d", who,
                        p->n_submeshes, t->n_submeshes);
    const int D = p->n_hosts * p->devices_per_host;
    for (int m = 0; m < p->n_submeshes; m++) {
        ap_status st = ap_submesh_check(p->submeshes[m], p->n_hosts, p->devices_per_host);
        if (st != AUTOPAR_OK) return st;
        if (ap_submesh_size(p->submeshes[m]) > D)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: submesh %d has more devices than the "
                            "cluster", who, m);
    }
    const int L = t->n_layers, S = t->n_submeshes, C = t->n_configs;
    for (int i = 0; i < L; i++)
        for (int j = i; j < L; j++)
            for (int m = 0; m < S; m++)
                for (int c = 0; c < C; c++) {
                    double v = t->time[ap_stage_table_index(t, i, j, m, c)];
                    if (isnan(v) || v < 0.0)
                        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: stage time of layers %d..%d "
                                        "on submesh %d config %d is %g; times must be >= 0 (use "
                                        "INFINITY for infeasible)", who, i, j, m, c, v);
                }
    return AUTOPAR_OK;
}

typedef struct place_item {
    int stage;
    int key;
} place_item;

/* Stable ordering: larger key first, then stage order. */
static int place_cmp(const void *a, const void *b) {
    const place_item *x = a, *y = b;
    if (x->key != y->key) return x->key > y->key ? -1 : 1;
    return (x->stage > y->stage) - (x->stage < y->stage);
}

ap_status ap_stage_place(int n_hosts, int devices_per_host, const ap_submesh_shape *submeshes,
                         int n_submeshes, ap_stage_assignment *stages, int n_stages) {
    if (!submeshes || (!stages && n_stages > 0) || n_stages < 0 || n_hosts < 1 ||
        devices_per_host < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_place: bad arguments");
    const int N = n_hosts, M = devices_per_host;
    long total = 0;
    for (int q = 0; q < n_stages; q++) {
        int m = stages[q].submesh;
        if (m < 0 || m >= n_submeshes)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_place: stage %d uses submesh %d of "
                            "%d", q, m, n_submeshes);
        ap_status st = ap_submesh_check(submeshes[m], N, M);
        if (st != AUTOPAR_OK) return st;
        total += ap_submesh_size(submeshes[m]);
    }
    if (total != (long)N * M)
        return ap_error(AUTOPAR_ERR_INFEASIBLE, "ap_stage_place: the stages use %ld devices, the "
                        "cluster has %d x %d = %d", total, N, M, N * M);
    place_item *items = malloc((size_t)(n_stages > 0 ? n_stages : 1) * sizeof *items);
    int *used = calloc((size_t)N, sizeof *used);
    if (!items || !used) {
        free(items);
        free(used);
        return ap_error(AUTOPAR_ERR_NOMEM, "ap_stage_place: out of memory");
    }
    ap_status st = AUTOPAR_OK;
    /* Whole-host submeshes first, on consecutive hosts. */
    int n_items = 0;
    for (int q = 0; q < n_stages; q++) {
        ap_submesh_shape s = submeshes[stages[q].submesh];
        if (s.devices_per_host == M) items[n_items++] = (place_item){q, s.n_hosts};
    }
    qsort(items, (size_t)n_items, sizeof *items, place_cmp);
    int host = 0;
    for (int k = 0; k < n_items; k++) {
        ap_stage_assignment *a = &stages[items[k].stage];
        a->host_begin = host;
        a->n_hosts = items[k].key;
        a->device_begin = 0;
        a->devices_per_host = M;
        host += items[k].key;
        for (int h = a->host_begin; h < host && h < N; h++) used[h] = M;
    }
    if (host > N)
        st = ap_error(AUTOPAR_ERR_INFEASIBLE, "ap_stage_place: whole-host submeshes need %d hosts, "
                      "the cluster has %d", host, N);
    /* Then single-host pieces, larger first, first fit. */
    n_items = 0;
    for (int q = 0; q < n_stages && st == AUTOPAR_OK; q++) {
        ap_submesh_shape s = submeshes[stages[q].submesh];
        if (s.devices_per_host < M) items[n_items++] = (place_item){q, s.devices_per_host};
    }
    if (st == AUTOPAR_OK) qsort(items, (size_t)n_items, sizeof *items, place_cmp);
    for (int k = 0; k < n_items && st == AUTOPAR_OK; k++) {
        ap_stage_assignment *a = &stages[items[k].stage];
        int w = items[k].key, h = host;
        while (h < N && M - used[h] < w) h++;
        if (h >= N) {
            st = ap_error(AUTOPAR_ERR_INFEASIBLE, "ap_stage_place: a (1, %d) submesh (stage %d) "
                          "does not fit in the devices left on the hosts", w, items[k].stage);
            break;
        }
        a->host_begin = h;
        a->n_hosts = 1;
        a->device_begin = used[h];
        a->devices_per_host = w;
        used[h] += w;
    }
    for (int h = 0; h < N && st == AUTOPAR_OK; h++)
        if (used[h] != M)
            st = ap_error(AUTOPAR_ERR_INFEASIBLE, "ap_stage_place: host %d keeps %d of its %d "
                          "devices idle", h, M - used[h], M);
    free(items);
    free(used);
    return st;
}

ap_status ap_stage_dp_evaluate(const ap_stage_dp_problem *p, const ap_stage_assignment *stages,
                               int n_stages, double *objective, double *sum_time,
                               double *max_time) {
    ap_status st = check_problem(p, "ap_stage_dp_evaluate");
    if (st != AUTOPAR_OK) return st;
    const ap_stage_table *t = p->table;
    const int L = t->n_layers;
    if (n_stages < 1 || !stages)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_dp_evaluate: no stages");
    double sum = 0.0, mx = 0.0;
    int next = 0;
    for (int q = 0; q < n_stages; q++) {
        const ap_stage_assignment *a = &stages[q];
        if (a->first_layer != next || a->last_layer < a->first_layer || a->last_layer >= L)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_dp_evaluate: stage %d covers layers "
                            "%d..%d, expected to start at %d and end before %d", q, a->first_layer,
                            a->last_layer, next, L);
        if (a->submesh < 0 || a->submesh >= t->n_submeshes || a->config < 0 ||
            a->config >= t->n_configs)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_dp_evaluate: stage %d has submesh "
                            "%d config %d out of range", q, a->submesh, a->config);
        size_t e = ap_stage_table_index(t, a->first_layer, a->last_layer, a->submesh, a->config);
        double time = t->time[e];
        if (!isfinite(time))
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_dp_evaluate: stage %d (layers "
                            "%d..%d, submesh %d, config %d) is infeasible", q, a->first_layer,
                            a->last_layer, a->submesh, a->config);
        int succ = n_stages - 1 - q;
        if (t->max_n_succ[e] < succ)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_dp_evaluate: stage %d is followed "
                            "by %d stages but its memory allows %d", q, succ, t->max_n_succ[e]);
        sum += time;
        if (time > mx) mx = time;
        next = a->last_layer + 1;
    }
    if (next != L)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_dp_evaluate: the stages end at layer "
                        "%d, the model has %d layers", next - 1, L);
    ap_stage_assignment *copy = malloc((size_t)n_stages * sizeof *copy);
    if (!copy) return ap_error(AUTOPAR_ERR_NOMEM, "ap_stage_dp_evaluate: out of memory");
    memcpy(copy, stages, (size_t)n_stages * sizeof *copy);
    st = ap_stage_place(p->n_hosts, p->devices_per_host, p->submeshes, p->n_submeshes, copy,
                        n_stages);
    free(copy);
    if (st == AUTOPAR_ERR_INFEASIBLE) st = AUTOPAR_ERR_INVALID_ARG;  /* message already set */
    if (st != AUTOPAR_OK) return st;
    if (objective) *objective = sum + (double)(p->n_micro_batches - 1) * mx;
    if (sum_time) *sum_time = sum;
    if (max_time) *max_time = mx;
    return AUTOPAR_OK;
}

void ap_stage_dp_result_clear(ap_stage_dp_result *r) {
    if (!r) return;
    free(r->stages);
    memset(r, 0, sizeof *r);
}

void ap_stage_dp_result_print(const ap_stage_dp_result *r, const ap_submesh_shape *submeshes,
                              FILE *f) {
    if (!r || !f) return;
    fprintf(f, "stage DP: %d stages, objective %.6g s (sum %.6g s, max %.6g s, t_max %.6g s), "
            "%d of %d t_max candidates evaluated\n", r->n_stages, r->objective, r->sum_time,
            r->max_time, r->t_max, r->n_evaluated, r->n_candidates);
    for (int q = 0; q < r->n_stages; q++) {
        const ap_stage_assignment *a = &r->stages[q];
        ap_submesh_shape s = submeshes ? submeshes[a->submesh] : (ap_submesh_shape){0, 0};
        fprintf(f, "  stage %d: layers %d..%d, submesh %d (%d x %d), config %d, time %.6g s, "
                "hosts %d..%d devices %d..%d\n", q, a->first_layer, a->last_layer, a->submesh,
                s.n_hosts, s.devices_per_host, a->config, a->time, a->host_begin,
                a->host_begin + a->n_hosts - 1, a->device_begin,
                a->device_begin + a->devices_per_host - 1);
    }
}

/* Fills a result from a stage list: re-evaluates it (so the reported objective is exactly the
 * one a caller recomputes) and places it. Takes ownership of `stages`. */
static ap_status finish_result(const ap_stage_dp_problem *p, ap_stage_assignment *stages, int n,
                               double t_max, ap_stage_dp_result *out) {
    const ap_stage_table *t = p->table;
    for (int q = 0; q < n; q++) {
        size_t e = ap_stage_table_index(t, stages[q].first_layer, stages[q].last_layer,
                                        stages[q].submesh, stages[q].config);
        stages[q].time = t->time[e];
        stages[q].max_n_succ = t->max_n_succ[e];
    }
    double obj, sum, mx;
    ap_status st = ap_stage_dp_evaluate(p, stages, n, &obj, &sum, &mx);
    if (st == AUTOPAR_OK)
        st = ap_stage_place(p->n_hosts, p->devices_per_host, p->submeshes, p->n_submeshes,
                            stages, n);
    if (st != AUTOPAR_OK) {
        free(stages);
        /* A solution of our own search that fails re-evaluation is a bug, not a user error. */
        return ap_error(AUTOPAR_ERR_GRAPH, "stage DP: internal error, the solution found does "
                        "not re-evaluate: %s", autopar_last_error());
    }
    out->stages = stages;
    out->n_stages = n;
    out->objective = obj;
    out->sum_time = sum;
    out->max_time = mx;
    out->t_max = t_max > mx ? t_max : mx;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* The DP                                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct dp_ctx {
    const ap_stage_dp_problem *p;
    const ap_stage_table *t;
    int L, S, C, D, B;
    int min_sz;
    int *sz;                /* device count per submesh                                     */
    /* Pareto front per group g = (i * L + j) * S + m: entries r < front_len[g] at g * C + r,
     * time ascending, max_n_succ strictly ascending. */
    int *front_len;
    double *ft;
    int *fmns;
    int *fc;
    /* DP layers: rows of D + 1. */
    size_t row;             /* D + 1                                                        */
    double *f[2], *mx[2];   /* rolling exact layers                                         */
    int *lo[2], *hi[2];     /* finite range per row (lo > hi: empty)                        */
    double *fm, *mm;        /* merged layer                                                 */
    int *lom, *him;
    double *cf, *cm;        /* successor view for the merged layer                          */
    int *loc, *hic;
    /* Reconstruction: argmins of the exact layers (triangular: layer s has rows 0..L-s) and of
     * the merged layer, allocated for the final run only. Code = (k * S + m) * C + c. */
    int32_t *arg;
    int32_t *argm;
    size_t arg_cap;
    int last_exact;         /* index into f/mx holding the last exact layer after a run     */
    /* Search state. */
    double *bot, *top;      /* candidate buckets: times in [bot[b], top[b]]                */
    int n_buckets;
    int infeasible_upto;    /* buckets <= this have no solution                             */
    double best_obj, best_sum, best_t;
    int best_label, have_best, evaluated;
} dp_ctx;

typedef struct dp_eval {
    bool   feasible;
    int    E;
    double min_sum, min_sum_max;   /* lexicographic least (sum, max) over stage counts     */
    double obj, sum, max;          /* best objective over stage counts                      */
    int    label;                  /* 1..E exact stage count, E + 1 = merged               */
} dp_eval;

static void ctx_free(dp_ctx *x) {
    free(x->sz);
    free(x->front_len);
    free(x->ft);
    free(x->fmns);
    free(x->fc);
    for (int k = 0; k < 2; k++) {
        free(x->f[k]);
        free(x->mx[k]);
        free(x->lo[k]);
        free(x->hi[k]);
    }
    free(x->fm);
    free(x->mm);
    free(x->lom);
    free(x->him);
    free(x->cf);
    free(x->cm);
    free(x->loc);
    free(x->hic);
    free(x->arg);
    free(x->argm);
    free(x->bot);
    free(x->top);
}

typedef struct cfg_entry {
    double t;
    int mns;
    int c;
} cfg_entry;

static int cfg_cmp(const void *a, const void *b) {
    const cfg_entry *x = a, *y = b;
    if (x->t != y->t) return x->t < y->t ? -1 : 1;
    return (x->c > y->c) - (x->c < y->c);
}

static int dbl_cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static ap_status ctx_init(dp_ctx *x, const ap_stage_dp_problem *p) {
    memset(x, 0, sizeof *x);
    x->p = p;
    x->t = p->table;
    x->L = p->table->n_layers;
    x->S = p->table->n_submeshes;
    x->C = p->table->n_configs;
    x->D = p->n_hosts * p->devices_per_host;
    x->B = p->n_micro_batches;
    x->row = (size_t)x->D + 1;
    const int L = x->L, S = x->S, C = x->C;
    /* Eight DP arrays of (L + 1) x (D + 1) doubles (64 MB each at this limit) plus argmins. */
    if ((double)(L + 1) * (double)x->row > (double)(1u << 23))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_dp: %d layers x %d devices is too "
                        "large for the DP (at most 2^23 layer x device-count states)", L, x->D);
    size_t n_groups = (size_t)L * L * S;
    x->sz = malloc((size_t)S * sizeof *x->sz);
    x->front_len = calloc(n_groups, sizeof *x->front_len);
    x->ft = malloc(n_groups * C * sizeof *x->ft);
    x->fmns = malloc(n_groups * C * sizeof *x->fmns);
    x->fc = malloc(n_groups * C * sizeof *x->fc);
    cfg_entry *tmp = malloc((size_t)C * sizeof *tmp);
    size_t cells = (size_t)(L + 1) * x->row;
    for (int k = 0; k < 2; k++) {
        x->f[k] = malloc(cells * sizeof(double));
        x->mx[k] = malloc(cells * sizeof(double));
        x->lo[k] = malloc((size_t)(L + 1) * sizeof(int));
        x->hi[k] = malloc((size_t)(L + 1) * sizeof(int));
    }
    x->fm = malloc(cells * sizeof(double));
    x->mm = malloc(cells * sizeof(double));
    x->cf = malloc(cells * sizeof(double));
    x->cm = malloc(cells * sizeof(double));
    x->lom = malloc((size_t)(L + 1) * sizeof(int));
    x->him = malloc((size_t)(L + 1) * sizeof(int));
    x->loc = malloc((size_t)(L + 1) * sizeof(int));
    x->hic = malloc((size_t)(L + 1) * sizeof(int));
    bool ok = x->sz && x->front_len && x->ft && x->fmns && x->fc && tmp && x->fm && x->mm &&
              x->cf && x->cm && x->lom && x->him && x->loc && x->hic;
    for (int k = 0; k < 2; k++) ok = ok && x->f[k] && x->mx[k] && x->lo[k] && x->hi[k];
    if (!ok) {
        free(tmp);
        return ap_error(AUTOPAR_ERR_NOMEM, "ap_stage_dp: out of memory (%d layers, %d devices)", L,
                        x->D);
    }
    x->min_sz = x->D;
    for (int m = 0; m < S; m++) {
        x->sz[m] = ap_submesh_size(p->submeshes[m]);
        if (x->sz[m] < x->min_sz) x->min_sz = x->sz[m];
    }
    /* Pareto fronts: a config is useful only if no config with a smaller-or-equal time (listed
     * earlier) allows at least as many later stages. */
    const ap_stage_table *t = x->t;
    size_t n_values = 0;
    for (int i = 0; i < L; i++)
        for (int j = i; j < L; j++)
            for (int m = 0; m < S; m++) {
                size_t g = ((size_t)i * L + j) * S + m;
                int n = 0;
                for (int c = 0; c < C; c++) {
                    size_t e = ap_stage_table_index(t, i, j, m, c);
                    if (!isfinite(t->time[e]) || t->max_n_succ[e] < 0) continue;
                    tmp[n++] = (cfg_entry){t->time[e], t->max_n_succ[e], c};
                }
                qsort(tmp, (size_t)n, sizeof *tmp, cfg_cmp);
                int len = 0, best_mns = -1;
                for (int r = 0; r < n; r++) {
                    if (tmp[r].mns <= best_mns) continue;
                    best_mns = tmp[r].mns;
                    x->ft[g * C + len] = tmp[r].t;
                    x->fmns[g * C + len] = tmp[r].mns;
                    x->fc[g * C + len] = tmp[r].c;
                    len++;
                }
                x->front_len[g] = len;
                n_values += (size_t)len;
            }
    free(tmp);
    /* t_max candidates: every time a solution can use, merged into buckets of width gap. */
    double *vals = malloc((n_values ? n_values : 1) * sizeof *vals);
    if (!vals) return ap_error(AUTOPAR_ERR_NOMEM, "ap_stage_dp: out of memory");
    size_t nv = 0;
    for (size_t g = 0; g < n_groups; g++)
        for (int r = 0; r < x->front_len[g]; r++) vals[nv++] = x->ft[g * C + r];
    qsort(vals, nv, sizeof *vals, dbl_cmp);
    x->bot = malloc((nv ? nv : 1) * sizeof *x->bot);
    x->top = malloc((nv ? nv : 1) * sizeof *x->top);
    if (!x->bot || !x->top) {
        free(vals);
        return ap_error(AUTOPAR_ERR_NOMEM, "ap_stage_dp: out of memory");
    }
    int nb = 0;
    for (size_t k = 0; k < nv; k++) {
        if (nb > 0 && vals[k] <= x->bot[nb - 1] + p->t_max_gap) {
            x->top[nb - 1] = vals[k];
            continue;
        }
        x->bot[nb] = x->top[nb] = vals[k];
        nb++;
    }
    free(vals);
    x->n_buckets = nb;
    x->infeasible_upto = -1;
    x->best_obj = x->best_sum = INFINITY;
    x->best_label = -1;
    return AUTOPAR_OK;
}

/* First Pareto entry of group g allowing `mu` later stages with time <= T, or -1. */
static inline int pick_cfg(const dp_ctx *x, size_t g, int mu, double T) {
    const int n = x->front_len[g];
    const size_t base = g * (size_t)x->C;
    for (int r = 0; r < n; r++) {
        if (x->ft[base + r] > T) return -1;
        if (x->fmns[base + r] >= mu) return r;
    }
    return -1;
}

/* Lexicographic (sum, max) relaxation of dst[d] by src[d - sz] + t over d in [dlo, dhi].
 * Strict improvement only, so the first candidate in loop order wins ties. */
static void relax(double *restrict df, double *restrict dm, const double *restrict sf,
                  const double *restrict sm, int sz, double t, int dlo, int dhi) {
    for (int d = dlo; d <= dhi; d++) {
        double v = sf[d - sz] + t;
        double m = sm[d - sz] > t ? sm[d - sz] : t;
        bool better = v < df[d] || (v == df[d] && m < dm[d]);
        df[d] = better ? v : df[d];
        dm[d] = better ? m : dm[d];
    }
}

static void relax_arg(double *restrict df, double *restrict dm, int32_t *restrict da,
                      const double *restrict sf, const double *restrict sm, int sz, double t,
                      int dlo, int dhi, int32_t code) {
    for (int d = dlo; d <= dhi; d++) {
        double v = sf[d - sz] + t;
        double m = sm[d - sz] > t ? sm[d - sz] : t;
        if (v < df[d] || (v == df[d] && m < dm[d])) {
            df[d] = v;
            dm[d] = m;
            da[d] = code;
        }
    }
}

static void fill_inf(double *a, size_t n) {
    for (size_t k = 0; k < n; k++) a[k] = INFINITY;
}

/* Offset of row (s, i) in x->arg (layer s >= 1 has rows 0..L-s). */
static size_t arg_offset(const dp_ctx *x, int s, int i) {
    /* rows before layer s: sum_{u=1}^{s-1} (L - u + 1) */
    size_t rows = (size_t)(s - 1) * (size_t)(x->L + 1) - (size_t)(s - 1) * (size_t)s / 2;
    return (rows + (size_t)i) * x->row;
}

/* Relaxes DP row `i` of (df, dm, lo/hi, da) from every successor row k > i of the source view
 * (sf, sm, slo/shi) over stage candidates picked with threshold mu(k) (exact layer: s - 1;
 * merged layer: L - k, i.e. non-binding entries only). k_max bounds the successor rows. */
static void relax_row(const dp_ctx *x, int i, int k_max, int mu_exact, double T,
                      const double *sf, const double *sm, const int *slo, const int *shi,
                      double *df, double *dm, int *dlo_out, int *dhi_out, int32_t *da) {
    const int L = x->L, S = x->S, C = x->C, D = x->D;
    const size_t R = x->row;
    /* Suffixes starting at i > 0 leave at least one submesh for the layers before them; the
     * full suffix (i = 0) is only needed at d = D. */
    const int d_min_row = i == 0 ? D : 0;
    const int d_max_row = i == 0 ? D : D - x->min_sz;
    int rlo = *dlo_out, rhi = *dhi_out;
    for (int k = i + 1; k <= k_max; k++) {
        if (slo[k] > shi[k]) continue;
        const int j = k - 1;
        const int mu = mu_exact >= 0 ? mu_exact : L - k;
        for (int m = 0; m < S; m++) {
            size_t g = ((size_t)i * L + j) * S + m;
            int r = pick_cfg(x, g, mu, T);
            if (r < 0) continue;
            const int sz = x->sz[m];
            int dlo = slo[k] + sz, dhi = shi[k] + sz;
            if (dlo < d_min_row) dlo = d_min_row;
            if (dhi > d_max_row) dhi = d_max_row;
            if (dlo > dhi) continue;
            double t = x->ft[g * C + r];
            const double *srow_f = sf + (size_t)k * R, *srow_m = sm + (size_t)k * R;
            if (da)
                relax_arg(df, dm, da, srow_f, srow_m, sz, t, dlo, dhi,
                          (int32_t)(((int64_t)k * S + m) * C + x->fc[g * C + r]));
            else
                relax(df, dm, srow_f, srow_m, sz, t, dlo, dhi);
            if (dlo < rlo) rlo = dlo;
            if (dhi > rhi) rhi = dhi;
        }
    }
    *dlo_out = rlo;
    *dhi_out = rhi;
}

/* Records a finished plan of stage-time sum v and largest stage time m (label as in dp_eval):
 * the lexicographic least (sum, max), and the best objective v + (B - 1) m, ties to the smaller
 * sum. Infinite v (no plan) is ignored. */
static void eval_note(dp_eval *ev, double v, double m, int B, int label) {
    if (!isfinite(v)) return;
    double obj = v + (double)(B - 1) * m;
    if (v < ev->min_sum || (v == ev->min_sum && m < ev->min_sum_max)) {
        ev->min_sum = v;
        ev->min_sum_max = m;
    }
    if (obj < ev->obj || (obj == ev->obj && v < ev->sum)) {
        ev->obj = obj;
        ev->sum = v;
        ev->max = m;
        ev->label = label;
    }
}

/* One DP run with every stage time <= T. With store, argmins are kept for backtracking. */
static ap_status dp_run(dp_ctx *x, double T, bool store, dp_eval *ev) {
    const int L = x->L, S = x->S, C = x->C, D = x->D;
    const size_t R = x->row;
    memset(ev, 0, sizeof *ev);
    ev->min_sum = ev->min_sum_max = ev->obj = ev->sum = ev->max = INFINITY;
    ev->label = -1;

    /* E: stage counts kept exactly. An entry binds when it allows fewer later stages than the
     * layers after it could hold. */
    int E = 0;
    for (int i = 0; i < L; i++)
        for (int j = i; j < L; j++)
            for (int m = 0; m < S; m++) {
                size_t g = ((size_t)i * L + j) * S + m;
                for (int r = 0; r < x->front_len[g] && x->ft[g * C + r] <= T; r++) {
                    int mns = x->fmns[g * C + r];
                    if (mns < L - 1 - j && mns + 1 > E) E = mns + 1;
                }
            }
    ev->E = E;

    if (store) {
        size_t need = E > 0 ? arg_offset(x, E + 1, 0) : 0;
        free(x->arg);
        free(x->argm);
        x->arg = need ? malloc(need * sizeof *x->arg) : NULL;
        x->argm = malloc((size_t)L * R * sizeof *x->argm);
        if ((need && !x->arg) || !x->argm)
            return ap_error(AUTOPAR_ERR_NOMEM, "ap_stage_dp: out of memory for the argmins "
                            "(%zu entries)", need + (size_t)L * R);
        x->arg_cap = need;
    }

    /* Base: zero stages cover the empty suffix with zero devices. */
    int cur = 0;
    fill_inf(x->f[cur], (size_t)(L + 1) * R);
    fill_inf(x->mx[cur], (size_t)(L + 1) * R);
    for (int i = 0; i <= L; i++) {
        x->lo[cur][i] = INT32_MAX;
        x->hi[cur][i] = -1;
    }
    x->f[cur][(size_t)L * R] = 0.0;
    x->mx[cur][(size_t)L * R] = 0.0;
    x->lo[cur][L] = x->hi[cur][L] = 0;

    for (int s = 1; s <= E; s++) {
        const int prev = cur;
        cur ^= 1;
        double *df = x->f[cur], *dm = x->mx[cur];
        fill_inf(df, (size_t)(L + 1) * R);
        fill_inf(dm, (size_t)(L + 1) * R);
        for (int i = 0; i <= L; i++) {
            x->lo[cur][i] = INT32_MAX;
            x->hi[cur][i] = -1;
        }
        for (int i = 0; i <= L - s; i++) {
            int32_t *da = NULL;
            if (store) {
                da = x->arg + arg_offset(x, s, i);
                for (size_t d = 0; d < R; d++) da[d] = -1;
            }
            relax_row(x, i, L - s + 1, s - 1, T, x->f[prev], x->mx[prev], x->lo[prev],
                      x->hi[prev], df + (size_t)i * R, dm + (size_t)i * R, &x->lo[cur][i],
                      &x->hi[cur][i], da);
        }
        eval_note(ev, df[D], dm[D], x->B, s);
    }
    x->last_exact = cur;

    /* Merged layer: suffixes of more than E stages, built from non-binding entries only. Its
     * successor view is the better of exactly-E and more-than-E per entry (ties: exactly E). */
    const double *ef = x->f[cur], *em = x->mx[cur];
    const int *elo = x->lo[cur], *ehi = x->hi[cur];
    fill_inf(x->fm, (size_t)(L + 1) * R);
    fill_inf(x->mm, (size_t)(L + 1) * R);
    for (int i = 0; i <= L; i++) {
        x->lom[i] = INT32_MAX;
        x->him[i] = -1;
    }
    memcpy(x->cf + (size_t)L * R, ef + (size_t)L * R, R * sizeof(double));
    memcpy(x->cm + (size_t)L * R, em + (size_t)L * R, R * sizeof(double));
    x->loc[L] = elo[L];
    x->hic[L] = ehi[L];
    for (int i = L - 1; i >= 0; i--) {
        double *df = x->fm + (size_t)i * R, *dm = x->mm + (size_t)i * R;
        int32_t *da = NULL;
        if (store) {
            da = x->argm + (size_t)i * R;
            for (size_t d = 0; d < R; d++) da[d] = -1;
        }
        relax_row(x, i, L, -1, T, x->cf, x->cm, x->loc, x->hic, df, dm, &x->lom[i], &x->him[i],
                  da);
        /* Successor view of row i. */
        double *vf = x->cf + (size_t)i * R, *vm = x->cm + (size_t)i * R;
        const double *rf = ef + (size_t)i * R, *rm = em + (size_t)i * R;
        int lo = elo[i] < x->lom[i] ? elo[i] : x->lom[i];
        int hi = ehi[i] > x->him[i] ? ehi[i] : x->him[i];
        for (int d = 0; d <= D; d++) {
            bool merged = df[d] < rf[d] || (df[d] == rf[d] && dm[d] < rm[d]);
            vf[d] = merged ? df[d] : rf[d];
            vm[d] = merged ? dm[d] : rm[d];
        }
        x->loc[i] = lo;
        x->hic[i] = hi;
    }
    eval_note(ev, x->fm[D], x->mm[D], x->B, E + 1);
    ev->feasible = ev->label >= 0;
    return AUTOPAR_OK;
}

/* Walks the argmins of a stored run from `label` and returns the stages (malloc'ed). */
static ap_status backtrack(const dp_ctx *x, int E, int label, ap_stage_assignment **out,
                           int *n_out) {
    const int L = x->L, S = x->S, C = x->C;
    const size_t R = x->row;
    ap_stage_assignment *st = calloc((size_t)L, sizeof *st);
    if (!st) return ap_error(AUTOPAR_ERR_NOMEM, "ap_stage_dp: out of memory");
    const double *ef = x->f[x->last_exact], *em = x->mx[x->last_exact];
    bool merged = label == E + 1;
    int s = merged ? E + 1 : label;   /* for exact states: stages left */
    int i = 0, d = x->D, n = 0;
    while (i < L) {
        int32_t code = merged ? x->argm[(size_t)i * R + (size_t)d]
                              : x->arg[arg_offset(x, s, i) + (size_t)d];
        if (code < 0 || n >= L) {
            free(st);
            return ap_error(AUTOPAR_ERR_GRAPH, "ap_stage_dp: internal error while backtracking "
                            "(layer %d, %d devices)", i, d);
        }
        int c = code % C, m = (code / C) % S, k = code / (C * S);
        st[n].first_layer = i;
        st[n].last_layer = k - 1;
        st[n].submesh = m;
        st[n].config = c;
        n++;
        d -= x->sz[m];
        i = k;
        if (merged) {
            /* Same choice as the successor view made. */
            if (i < L) {
                size_t e = (size_t)i * R + (size_t)d;
                bool stay = x->fm[e] < ef[e] || (x->fm[e] == ef[e] && x->mm[e] < em[e]);
                if (!stay) {
                    merged = false;
                    s = E;
                }
            } else {
                merged = false;   /* only the base (E == 0) covers the empty suffix */
                s = E;
            }
        } else {
            s--;
        }
        if (!merged && s <= 0 && i < L) break;   /* reported below */
    }
    if (i != L || d != 0 || merged || s != 0) {
        free(st);
        return ap_error(AUTOPAR_ERR_GRAPH, "ap_stage_dp: internal error: backtracking ended "
                        "with %d devices and %d stages left", d, s);
    }
    *out = st;
    *n_out = n;
    return AUTOPAR_OK;
}

static void consider(dp_ctx *x, const dp_eval *ev, double T) {
    if (!ev->feasible) return;
    if (!x->have_best || ev->obj < x->best_obj ||
        (ev->obj == x->best_obj && ev->sum < x->best_sum)) {
        x->have_best = 1;
        x->best_obj = ev->obj;
        x->best_sum = ev->sum;
        x->best_t = T;
        x->best_label = ev->label;
    }
}

/* Lower bound on the objective of any solution whose largest stage time is >= c, given that
 * every such solution (with largest stage <= some evaluated bound) has sum >= s_lb. */
static double lower_bound(const dp_ctx *x, double c, double s_lb) {
    return (s_lb > c ? s_lb : c) + (double)(x->B - 1) * c;
}

/* Bucket containing time v (bot[b] <= v <= top[b]); v is always a candidate time. */
static int bucket_of(const dp_ctx *x, double v) {
    int lo = 0, hi = x->n_buckets - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;
        if (x->bot[mid] <= v) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Branch and bound over buckets [lo, hi]; s_lb is a least sum valid for every bound <= top[hi].
 * *s_out receives the least sum found at the top of the evaluated interval (or s_lb). */
static ap_status search_bnb(dp_ctx *x, int lo, int hi, double s_lb, double *s_out) {
    *s_out = s_lb;
    if (hi <= x->infeasible_upto) return AUTOPAR_OK;
    if (lo <= x->infeasible_upto) lo = x->infeasible_upto + 1;
    if (lo > hi) return AUTOPAR_OK;
    if (x->have_best) {
        /* Drop the top buckets that cannot beat the best: the bound grows with the bucket. */
        if (lower_bound(x, x->bot[lo], s_lb) >= x->best_obj) return AUTOPAR_OK;
        int a = lo, b = hi;   /* largest bucket with bound < best lies in [a, b] */
        while (a < b) {
            int mid = a + (b - a + 1) / 2;
            if (lower_bound(x, x->bot[mid], s_lb) < x->best_obj) a = mid;
            else b = mid - 1;
        }
        hi = a;
    }
    dp_eval ev;
    ap_status st = dp_run(x, x->top[hi], false, &ev);
    if (st != AUTOPAR_OK) return st;
    x->evaluated++;
    if (!ev.feasible) {
        /* Fewer stage candidates below: nothing is feasible there either. */
        if (hi > x->infeasible_upto) x->infeasible_upto = hi;
        return AUTOPAR_OK;
    }
    consider(x, &ev, x->top[hi]);
    *s_out = ev.min_sum;
    /* The min-sum solution covers every bound in [its max, top[hi]]. */
    int j = bucket_of(x, ev.min_sum_max);
    int hi2 = (j < hi ? j : hi) - 1;
    if (hi2 < lo) return AUTOPAR_OK;
    double s_up = ev.min_sum, ignored;
    if (hi2 == lo) return search_bnb(x, lo, lo, ev.min_sum, &ignored);
    int mid = lo + (hi2 - lo) / 2;
    st = search_bnb(x, mid + 1, hi2, ev.min_sum, &s_up);
    if (st != AUTOPAR_OK) return st;
    return search_bnb(x, lo, mid, s_up > ev.min_sum ? s_up : ev.min_sum, &ignored);
}

static ap_status search_ascending(dp_ctx *x) {
    for (int b = 0; b < x->n_buckets; b++) {
        if (x->have_best && (double)x->B * x->bot[b] >= x->best_obj) break;
        dp_eval ev;
        ap_status st = dp_run(x, x->top[b], false, &ev);
        if (st != AUTOPAR_OK) return st;
        x->evaluated++;
        consider(x, &ev, x->top[b]);
    }
    return AUTOPAR_OK;
}

ap_status ap_stage_dp(const ap_stage_dp_problem *p, ap_stage_dp_result *out) {
    if (out) memset(out, 0, sizeof *out);
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_dp: out is NULL");
    ap_status st = check_problem(p, "ap_stage_dp");
    if (st != AUTOPAR_OK) return st;
    dp_ctx x;
    st = ctx_init(&x, p);
    if (st == AUTOPAR_OK && x.n_buckets == 0)
        st = ap_error(AUTOPAR_ERR_INFEASIBLE, "ap_stage_dp: every stage candidate of the %d "
                      "layers is infeasible (infinite time or no memory)", x.L);
    if (st == AUTOPAR_OK) {
        if (p->search == AP_TMAX_ASCENDING) {
            st = search_ascending(&x);
        } else {
            double ignored;
            st = search_bnb(&x, 0, x.n_buckets - 1, 0.0, &ignored);
        }
    }
    if (st == AUTOPAR_OK && !x.have_best)
        st = ap_error(AUTOPAR_ERR_INFEASIBLE, "ap_stage_dp: no slicing of the %d layers into "
                      "stages tiles the %d x %d cluster within the stages' memory limits", x.L,
                      p->n_hosts, p->devices_per_host);
    ap_stage_assignment *stages = NULL;
    int n = 0;
    if (st == AUTOPAR_OK) {
        dp_eval ev;
        st = dp_run(&x, x.best_t, true, &ev);
        if (st == AUTOPAR_OK && (!ev.feasible || ev.label != x.best_label))
            st = ap_error(AUTOPAR_ERR_GRAPH, "ap_stage_dp: internal error: the final run "
                          "differs from the search");
        if (st == AUTOPAR_OK) st = backtrack(&x, ev.E, x.best_label, &stages, &n);
    }
    if (st == AUTOPAR_OK) {
        out->n_candidates = x.n_buckets;
        out->n_evaluated = x.evaluated;
        st = finish_result(p, stages, n, x.best_t, out);
        if (st != AUTOPAR_OK) {
            out->n_candidates = out->n_evaluated = 0;
        }
    }
    ctx_free(&x);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Brute force                                                                                 */
/* ------------------------------------------------------------------------------------------ */

typedef struct bf_ctx {
    const ap_stage_dp_problem *p;
    int L, S, C, D;
    ap_stage_assignment *cur, *best;
    int n_best;
    double best_obj, best_sum;
    long evaluated;
} bf_ctx;

static void bf_rec(bf_ctx *b, int i, int used, int depth) {
    const ap_stage_table *t = b->p->table;
    if (i == b->L) {
        if (used != b->D) return;
        double sum = 0.0, mx = 0.0;
        for (int q = 0; q < depth; q++) {
            size_t e = ap_stage_table_index(t, b->cur[q].first_layer, b->cur[q].last_layer,
                                            b->cur[q].submesh, b->cur[q].config);
            if (t->max_n_succ[e] < depth - 1 - q) return;
            sum += t->time[e];
            if (t->time[e] > mx) mx = t->time[e];
        }
        b->evaluated++;
        double obj = sum + (double)(b->p->n_micro_batches - 1) * mx;
        if (b->n_best == 0 || obj < b->best_obj ||
            (obj == b->best_obj && (sum < b->best_sum || (sum == b->best_sum &&
                                                          depth < b->n_best)))) {
            b->best_obj = obj;
            b->best_sum = sum;
            b->n_best = depth;
            memcpy(b->best, b->cur, (size_t)depth * sizeof *b->best);
        }
        return;
    }
    for (int j = i; j < b->L; j++)
        for (int m = 0; m < b->S; m++) {
            int sz = ap_submesh_size(b->p->submeshes[m]);
            if (used + sz > b->D) continue;
            for (int c = 0; c < b->C; c++) {
                size_t e = ap_stage_table_index(t, i, j, m, c);
                if (!isfinite(t->time[e]) || t->max_n_succ[e] < 0) continue;
                b->cur[depth] = (ap_stage_assignment){.first_layer = i, .last_layer = j,
                                                      .submesh = m, .config = c};
                bf_rec(b, j + 1, used + sz, depth + 1);
            }
        }
}

ap_status ap_stage_dp_brute_force(const ap_stage_dp_problem *p, ap_stage_dp_result *out) {
    if (out) memset(out, 0, sizeof *out);
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_stage_dp_brute_force: out is NULL");
    ap_status st = check_problem(p, "ap_stage_dp_brute_force");
    if (st != AUTOPAR_OK) return st;
    bf_ctx b = {0};
    b.p = p;
    b.L = p->table->n_layers;
    b.S = p->table->n_submeshes;
    b.C = p->table->n_configs;
    b.D = p->n_hosts * p->devices_per_host;
    b.cur = calloc((size_t)b.L, sizeof *b.cur);
    b.best = calloc((size_t)b.L, sizeof *b.best);
    if (!b.cur || !b.best) {
        free(b.cur);
        free(b.best);
        return ap_error(AUTOPAR_ERR_NOMEM, "ap_stage_dp_brute_force: out of memory");
    }
    bf_rec(&b, 0, 0, 0);
    free(b.cur);
    if (b.n_best == 0) {
        free(b.best);
        return ap_error(AUTOPAR_ERR_INFEASIBLE, "ap_stage_dp_brute_force: no slicing of the %d "
                        "layers tiles the %d x %d cluster within the memory limits", b.L,
                        p->n_hosts, p->devices_per_host);
    }
    out->n_evaluated = b.evaluated > INT32_MAX ? INT32_MAX : (int)b.evaluated;
    return finish_result(p, b.best, b.n_best, 0.0, out);
}
