/*
 * Check macros shared by the tests: a failed check prints the rank (for MPI tests), the line and
 * a message, and counts a failure; the test then exits non-zero from test_failures. Up to 40
 * failures are printed so one broken invariant does not flood the log.
 */
#ifndef AUTOPAR_TEST_UTIL_H
#define AUTOPAR_TEST_UTIL_H

#include "autopar.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static int test_failures;
static int test_rank;   /* set by MPI tests; 0 otherwise */

static void test_fail_at(int line, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void test_fail_at(int line, const char *fmt, ...) {
    char msg[1400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (test_failures < 40) fprintf(stderr, "rank %d: FAIL line %d: %s\n", test_rank, line, msg);
    test_failures++;
}

#define EXPECT(cond, ...)                                                                       \
    do {                                                                                        \
        if (!(cond)) test_fail_at(__LINE__, __VA_ARGS__);                                       \
    } while (0)

#define EXPECT_OK(expr)                                                                         \
    do {                                                                                        \
        autopar_status s_ = (expr);                                                             \
        if (s_ != AUTOPAR_OK)                                                                   \
            test_fail_at(__LINE__, "%s -> %s: %s", #expr, autopar_status_str(s_),               \
                         autopar_last_error());                                                 \
    } while (0)

/* The GPT test batch of step s: n random tokens and n random targets in [0, vocab). */
__attribute__((unused)) static void test_gpt_batch(int64_t vocab, int64_t n, int64_t s,
                                                   int32_t *tokens, int32_t *targets) {
    uint64_t x = 0x9E3779B97F4A7C15ull * (uint64_t)(s + 1);
    for (int64_t i = 0; i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        tokens[i] = (int32_t)((x >> 33) % (uint64_t)vocab);
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        targets[i] = (int32_t)((x >> 33) % (uint64_t)vocab);
    }
}

/* How a trained parameter or optimizer state compares with the reference's. */
typedef struct state_error {
    double  rel;       /* max over elements of |a - b| / (max |b| + widen_i / TOL_REL), so that
                        * rel <= TOL_REL iff every |a - b| <= TOL_REL max |b| + widen_i      */
    int64_t n_widened; /* elements whose tolerance is over 10x TOL_REL max |b| (widen_i)     */
} state_error;

#define TOL_REL 1e-5

/* Float32 AdamW parameters: AdamW's update m^ / (sqrt(v^) + eps) divides each element's
 * gradient by that element's own gradient scale sqrt(v^), so an error that is small next to
 * the tensor's largest gradient G (float32 summation in another order: per shard, then across
 * ranks; the runs agree to ~1e-6 of G, and m and v are checked to TOL_REL) becomes, for an
 * element whose gradients are much smaller than G, a relative error of the update of
 * rho G / sqrt(v^_i), and AdamW moves by lr times that: an element whose gradient is zero in
 * exact arithmetic (an attention key bias: softmax ignores a constant added to a row) is pure
 * rounding noise and moves by up to lr per step in either run independently. The tolerance of
 * a parameter element is therefore TOL_REL max |p| widened by this propagated error, summed
 * over the steps: widen_i = sum_t min(2 lr, 2 lr rho G_t / (sqrt(v^_t,i) + eps)), with
 * rho = TOL_REL (the gradient agreement the m and v checks hold), G_t the tensor's largest
 * |gradient| at step t and v^ the bias-corrected second moment after it, both from the
 * reference. Elements whose gradients are near the tensor's largest keep TOL_REL (the factor
 * 2 covers the m and v paths of the derivative). Call after every reference step t (1-based)
 * with that step's gradient and second moment; widen accumulates. */
#define ADAM_BETA2 0.999   /* autopar_optimizer_default's, which the test models use */
#define ADAM_EPS 1e-8

__attribute__((unused)) static void adam_widen_step(const float *grad, const float *v,
                                                    int64_t n, int t, double lr,
                                                    double *widen) {
    double g_max = 0, ib2 = 1.0 / (1.0 - pow(ADAM_BETA2, t));
    for (int64_t i = 0; i < n; i++)
        if (fabs((double)grad[i]) > g_max) g_max = fabs((double)grad[i]);
    for (int64_t i = 0; i < n; i++) {
        double w = 2.0 * lr * TOL_REL * g_max / (sqrt((double)v[i] * ib2) + ADAM_EPS);
        widen[i] += w < 2.0 * lr ? w : 2.0 * lr;
    }
}

/* Compares got with ref (n elements); widen: per-element widening (adam_widen_step) or NULL. */
__attribute__((unused)) static void compare_state(const float *got, const float *ref,
                                                  const double *widen, int64_t n,
                                                  state_error *e) {
    double den = 0;
    for (int64_t i = 0; i < n; i++)
        if (fabs((double)ref[i]) > den) den = fabs((double)ref[i]);
    e->rel = 0;
    e->n_widened = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        double scale = den + (widen ? widen[i] / TOL_REL : 0.0);
        double r = d != d ? INFINITY : (scale > 0 ? d / scale : d);
        if (r > e->rel) e->rel = r;
        if (widen && widen[i] > 9.0 * TOL_REL * den) e->n_widened++;
    }
}

/* After a reference step t (1-based) of executor ex on graph g: adam_widen_step for every
 * parameter with a widen[id] array, from its gradient and its "<name>.adam_v" state. */
__attribute__((unused)) static void adam_widen_graph(const autopar_graph *g,
                                                     const autopar_executor *ex, int t,
                                                     double lr, double **widen) {
    for (int id = 0; id < autopar_graph_size(g); id++) {
        if (!widen[id]) continue;
        const autopar_tensor *p = autopar_graph_tensor(g, id), *gt = autopar_grad(g, p);
        char vname[AUTOPAR_MAX_NAME + 16];
        snprintf(vname, sizeof vname, "%s.adam_v", autopar_tensor_name(p));
        const autopar_tensor *vt = autopar_graph_find(g, vname);
        int64_t n = autopar_tensor_numel(p);
        float *gr = malloc((size_t)n * sizeof *gr), *v = malloc((size_t)n * sizeof *v);
        if (gt && vt && gr && v && !autopar_executor_read(ex, gt, gr, n) &&
            !autopar_executor_read(ex, vt, v, n))
            adam_widen_step(gr, v, n, t, lr, widen[id]);
        else
            test_fail_at(__LINE__, "reading the reference gradient and second moment of '%s' "
                         "failed: %s", autopar_tensor_name(p), autopar_last_error());
        free(gr);
        free(v);
    }
}

#endif
