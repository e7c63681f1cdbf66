/*
 * Every differentiable op's gradient against central finite differences.
 *
 * Each case builds one op (or a small composition) on parameters, and the harness turns its
 * output into a scalar with a fixed random projection, loss = sum(out * R), so every output
 * element influences the loss. Gradients from autodiff (run in double precision) are compared
 * with (L(p + h) - L(p - h)) / 2h, also in double precision, h = 1e-5.
 * Bound: |analytic - fd| <= 1e-6 * max(|fd|, 1e-2) for every element; the FD truncation error
 * is O(h^2) ~ 1e-10 relative and the rounding error ~ 1e-16 / h ~ 1e-11, so 1e-6 has margin and
 * still catches any wrong factor or index.
 * The float32 kernels are then checked against the double-precision gradients:
 * |g32 - g64| <= 1e-5 * max(|g64|_inf, 1e-2) per parameter (float32 accumulation error).
 */
#include "autopar.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FD_H 1e-5
#define FD_TOL 1e-6
#define F32_TOL 1e-5

static uint64_t rng_state = 12345;
static double rnd(void) { /* uniform in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(rng_state >> 11) / 4503599627370496.0 - 1.0;
}

static int failures;

#define SHAPE(...) (int64_t[]){__VA_ARGS__}, (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t))

static autopar_tensor *P(autopar_graph *g, const char *name, const int64_t *shape, int ndim) {
    return autopar_param(g, name, ndim, shape, AUTOPAR_INIT_ZEROS, 0.0f);
}
static autopar_tensor *I32(autopar_graph *g, const char *name, const int64_t *shape, int ndim) {
    return autopar_input(g, name, AUTOPAR_I32, ndim, shape, -1);
}

typedef autopar_tensor *(*build_fn)(autopar_graph *g);

/* ---- cases ------------------------------------------------------------------------------------ */

static autopar_tensor *mm(autopar_graph *g, int ta, int tb) {
    autopar_tensor *a = ta ? P(g, "a", SHAPE(4, 3)) : P(g, "a", SHAPE(3, 4));
    autopar_tensor *b = tb ? P(g, "b", SHAPE(5, 4)) : P(g, "b", SHAPE(4, 5));
    return autopar_matmul_ex(g, a, b, ta, tb);
}
static autopar_tensor *c_mm_nn(autopar_graph *g) { return mm(g, 0, 0); }
static autopar_tensor *c_mm_nt(autopar_graph *g) { return mm(g, 0, 1); }
static autopar_tensor *c_mm_tn(autopar_graph *g) { return mm(g, 1, 0); }
static autopar_tensor *c_mm_tt(autopar_graph *g) { return mm(g, 1, 1); }
static autopar_tensor *c_mm_3d_dense(autopar_graph *g) {
    return autopar_matmul(g, P(g, "x", SHAPE(2, 3, 4)), P(g, "w", SHAPE(4, 5)));
}
static autopar_tensor *c_mm_3d_trans_a(autopar_graph *g) { /* x^T over flattened rows */
    return autopar_matmul_ex(g, P(g, "x", SHAPE(2, 3, 4)), P(g, "y", SHAPE(6, 5)), 1, 0);
}
static autopar_tensor *c_mm_3d_trans_b(autopar_graph *g) {
    return autopar_matmul_ex(g, P(g, "x", SHAPE(3, 4)), P(g, "y", SHAPE(2, 5, 4)), 0, 1);
}
static autopar_tensor *bmm(autopar_graph *g, int ta, int tb, int rank4) {
    autopar_tensor *a, *b;
    if (rank4) {
        a = ta ? P(g, "a", SHAPE(2, 2, 4, 3)) : P(g, "a", SHAPE(2, 2, 3, 4));
        b = tb ? P(g, "b", SHAPE(2, 2, 5, 4)) : P(g, "b", SHAPE(2, 2, 4, 5));
    } else {
        a = ta ? P(g, "a", SHAPE(2, 4, 3)) : P(g, "a", SHAPE(2, 3, 4));
        b = tb ? P(g, "b", SHAPE(2, 5, 4)) : P(g, "b", SHAPE(2, 4, 5));
    }
    return autopar_batch_matmul(g, a, b, ta, tb);
}
static autopar_tensor *c_bmm_nn(autopar_graph *g) { return bmm(g, 0, 0, 0); }
static autopar_tensor *c_bmm_nt(autopar_graph *g) { return bmm(g, 0, 1, 0); }
static autopar_tensor *c_bmm_tn(autopar_graph *g) { return bmm(g, 1, 0, 0); }
static autopar_tensor *c_bmm_tt4(autopar_graph *g) { return bmm(g, 1, 1, 1); }
static autopar_tensor *c_bmm_nt4(autopar_graph *g) { return bmm(g, 0, 1, 1); }

static autopar_tensor *c_add(autopar_graph *g) {
    return autopar_add(g, P(g, "a", SHAPE(3, 4)), P(g, "b", SHAPE(3, 4)));
}
static autopar_tensor *c_add_bias(autopar_graph *g) {
    return autopar_add(g, P(g, "a", SHAPE(2, 3, 4)), P(g, "b", SHAPE(4)));
}
static autopar_tensor *c_add_bias2(autopar_graph *g) {
    return autopar_add(g, P(g, "a", SHAPE(2, 3, 4)), P(g, "b", SHAPE(3, 4)));
}
static autopar_tensor *c_sub_bias(autopar_graph *g) {
    return autopar_sub(g, P(g, "a", SHAPE(2, 3, 4)), P(g, "b", SHAPE(4)));
}
static autopar_tensor *c_mul(autopar_graph *g) {
    return autopar_mul(g, P(g, "a", SHAPE(3, 4)), P(g, "b", SHAPE(3, 4)));
}
static autopar_tensor *c_mul_bias(autopar_graph *g) {
    return autopar_mul(g, P(g, "a", SHAPE(2, 3, 4)), P(g, "b", SHAPE(3, 4)));
}
static autopar_tensor *c_scale(autopar_graph *g) { return autopar_scale(g, P(g, "a", SHAPE(3, 4)), -2.5f); }
static autopar_tensor *c_relu(autopar_graph *g) { return autopar_relu(g, P(g, "a", SHAPE(3, 5))); }
static autopar_tensor *c_gelu(autopar_graph *g) { return autopar_gelu(g, P(g, "a", SHAPE(3, 5))); }
static autopar_tensor *c_layernorm(autopar_graph *g) {
    return autopar_layernorm(g, P(g, "x", SHAPE(2, 3, 6)), P(g, "gain", SHAPE(6)),
                             P(g, "bias", SHAPE(6)), 1e-5f);
}
static autopar_tensor *c_softmax(autopar_graph *g) { return autopar_softmax(g, P(g, "x", SHAPE(3, 5)), 0); }
static autopar_tensor *c_softmax_causal(autopar_graph *g) {
    return autopar_softmax(g, P(g, "x", SHAPE(2, 4, 4)), 1);
}
static autopar_tensor *c_reshape(autopar_graph *g) {
    autopar_tensor *x = P(g, "x", SHAPE(2, 6));
    /* a nonlinearity after the reshape so the test sees the layout, not just a permuted R */
    return autopar_mul(g, autopar_reshape(g, x, 3, (int64_t[]){3, 2, 2}), P(g, "w", SHAPE(2)));
}
static autopar_tensor *c_permute3(autopar_graph *g) {
    return autopar_mul(g, autopar_permute(g, P(g, "x", SHAPE(2, 3, 4)), (int[]){2, 0, 1}),
                       P(g, "w", SHAPE(3)));
}
static autopar_tensor *c_permute4(autopar_graph *g) {
    return autopar_mul(g, autopar_permute(g, P(g, "x", SHAPE(2, 3, 4, 5)), (int[]){0, 2, 1, 3}),
                       P(g, "w", SHAPE(3, 5)));
}
static autopar_tensor *c_transpose(autopar_graph *g) {
    return autopar_mul(g, autopar_transpose(g, P(g, "x", SHAPE(3, 4))), P(g, "w", SHAPE(3)));
}
static autopar_tensor *c_slice(autopar_graph *g) {
    return autopar_slice(g, P(g, "x", SHAPE(3, 7)), 1, 2, 3);
}
static autopar_tensor *c_split_concat(autopar_graph *g) {
    autopar_tensor *parts[3];
    autopar_tensor *x = P(g, "x", SHAPE(2, 9));
    if (autopar_split(g, x, -1, 3, parts) != AUTOPAR_OK) return NULL;
    autopar_tensor *mixed[3] = {autopar_gelu(g, parts[2]), parts[0],
                                autopar_concat(g, 2, (autopar_tensor *[]){parts[1], P(g, "y", SHAPE(2, 2))}, 1)};
    return autopar_concat(g, 3, mixed, 1);
}
static autopar_tensor *c_embedding(autopar_graph *g) {
    /* ids in [0, 5) over 2x6 positions: repeated ids exercise the scatter-add */
    return autopar_embedding(g, P(g, "table", SHAPE(5, 3)), I32(g, "ids", SHAPE(2, 6)));
}
static autopar_tensor *c_sum_axis(autopar_graph *g) { return autopar_sum(g, P(g, "x", SHAPE(2, 3, 4)), 1); }
static autopar_tensor *c_mean_axis(autopar_graph *g) { return autopar_mean(g, P(g, "x", SHAPE(2, 3, 4)), -1); }
static autopar_tensor *c_sum_all(autopar_graph *g) {
    return autopar_sum_all(g, autopar_mul(g, P(g, "x", SHAPE(3, 4)), P(g, "y", SHAPE(3, 4))));
}
static autopar_tensor *c_mean_all(autopar_graph *g) {
    return autopar_mean_all(g, autopar_gelu(g, P(g, "x", SHAPE(3, 4))));
}
static autopar_tensor *c_mse(autopar_graph *g) {
    return autopar_mse_loss(g, P(g, "pred", SHAPE(3, 4)), P(g, "target", SHAPE(3, 4)));
}
static autopar_tensor *c_cross_entropy(autopar_graph *g) {
    return autopar_cross_entropy(g, P(g, "logits", SHAPE(2, 3, 5)), I32(g, "labels", SHAPE(2, 3)));
}
static autopar_tensor *c_multi_consumer(autopar_graph *g) {
    /* x feeds three consumers; w feeds two: gradients must be summed. */
    autopar_tensor *x = P(g, "x", SHAPE(3, 4)), *w = P(g, "w", SHAPE(4, 4));
    autopar_tensor *h = autopar_matmul(g, x, w);
    autopar_tensor *r = autopar_mul(g, autopar_relu(g, h), x);
    return autopar_add(g, autopar_add(g, r, x), autopar_matmul(g, r, w));
}
static autopar_tensor *c_attention(autopar_graph *g) {
    /* one causal attention head block as the GPT builder composes it */
    autopar_tensor *x = P(g, "x", SHAPE(2, 4, 6)), *wqkv = P(g, "wqkv", SHAPE(6, 18));
    autopar_tensor *qkv = autopar_matmul(g, x, wqkv), *p[3];
    if (autopar_split(g, qkv, 2, 3, p) != AUTOPAR_OK) return NULL;
    autopar_tensor *hd[3];
    for (int i = 0; i < 3; i++)
        hd[i] = autopar_permute(g, autopar_reshape(g, p[i], 4, (int64_t[]){2, 4, 2, 3}),
                                (int[]){0, 2, 1, 3});
    autopar_tensor *att = autopar_softmax(
        g, autopar_scale(g, autopar_batch_matmul(g, hd[0], hd[1], 0, 1), 0.57735f), 1);
    autopar_tensor *y = autopar_permute(g, autopar_batch_matmul(g, att, hd[2], 0, 0), (int[]){0, 2, 1, 3});
    return autopar_reshape(g, y, 3, (int64_t[]){2, 4, 6});
}

static const struct {
    const char *name;
    build_fn    build;
    int         int_range; /* values of I32 inputs: [0, int_range) */
    int         output_is_loss;
} cases[] = {
    {"matmul", c_mm_nn, 0, 0},
    {"matmul trans_b", c_mm_nt, 0, 0},
    {"matmul trans_a", c_mm_tn, 0, 0},
    {"matmul trans_a trans_b", c_mm_tt, 0, 0},
    {"matmul 3d x 2d", c_mm_3d_dense, 0, 0},
    {"matmul 3d trans_a", c_mm_3d_trans_a, 0, 0},
    {"matmul 3d trans_b", c_mm_3d_trans_b, 0, 0},
    {"batch_matmul", c_bmm_nn, 0, 0},
    {"batch_matmul trans_b", c_bmm_nt, 0, 0},
    {"batch_matmul trans_a", c_bmm_tn, 0, 0},
    {"batch_matmul rank4 trans_a trans_b", c_bmm_tt4, 0, 0},
    {"batch_matmul rank4 trans_b", c_bmm_nt4, 0, 0},
    {"add", c_add, 0, 0},
    {"add bias [C]", c_add_bias, 0, 0},
    {"add bias [T,C]", c_add_bias2, 0, 0},
    {"sub bias", c_sub_bias, 0, 0},
    {"mul", c_mul, 0, 0},
    {"mul broadcast", c_mul_bias, 0, 0},
    {"scale", c_scale, 0, 0},
    {"relu", c_relu, 0, 0},
    {"gelu", c_gelu, 0, 0},
    {"layernorm", c_layernorm, 0, 0},
    {"softmax", c_softmax, 0, 0},
    {"softmax causal", c_softmax_causal, 0, 0},
    {"reshape", c_reshape, 0, 0},
    {"permute rank 3", c_permute3, 0, 0},
    {"permute rank 4", c_permute4, 0, 0},
    {"transpose", c_transpose, 0, 0},
    {"slice", c_slice, 0, 0},
    {"split + concat", c_split_concat, 0, 0},
    {"embedding", c_embedding, 5, 0},
    {"sum axis", c_sum_axis, 0, 0},
    {"mean axis", c_mean_axis, 0, 0},
    {"sum all", c_sum_all, 0, 0},
    {"mean all", c_mean_all, 0, 0},
    {"mse loss", c_mse, 0, 1},
    {"cross entropy", c_cross_entropy, 5, 1},
    {"multi-consumer accumulation", c_multi_consumer, 0, 0},
    {"causal attention block", c_attention, 0, 0},
};

/* ---- harness ---------------------------------------------------------------------------------- */

static int build_case(int c, autopar_graph **out_g) {
    autopar_graph *g;
    if (autopar_graph_new(&g) != AUTOPAR_OK) return -1;
    autopar_tensor *out = cases[c].build(g);
    autopar_tensor *loss = out;
    if (out && !cases[c].output_is_loss && autopar_tensor_ndim(out) > 0) {
        int64_t shape[4];
        for (int i = 0; i < autopar_tensor_ndim(out); i++) shape[i] = autopar_tensor_dim(out, i);
        autopar_tensor *r = autopar_input(g, "R", AUTOPAR_F32, autopar_tensor_ndim(out), shape, -1);
        loss = autopar_sum_all(g, autopar_mul(g, out, r));
    } else if (out && !cases[c].output_is_loss) {
        loss = autopar_scale(g, out, 1.5f);
    }
    if (autopar_backward(g, loss) != AUTOPAR_OK) {
        printf("FAIL %-36s building: %s\n", cases[c].name, autopar_last_error());
        autopar_graph_free(g);
        return -1;
    }
    *out_g = g;
    return 0;
}

/* Writes the same pseudo-random values into every input and parameter of both executors. */
static int feed(autopar_graph *g, autopar_executor **exs, int n_ex, int int_range) {
    for (int i = 0; i < autopar_graph_size(g); i++) {
        autopar_tensor *t = autopar_graph_tensor(g, i);
        autopar_kind k = autopar_tensor_kind(t);
        if (k != AUTOPAR_KIND_INPUT && k != AUTOPAR_KIND_PARAM) continue;
        int64_t n = autopar_tensor_numel(t);
        if (autopar_tensor_dtype(t) == AUTOPAR_I32) {
            int32_t *v = malloc((size_t)n * sizeof *v);
            for (int64_t j = 0; j < n; j++) v[j] = (int32_t)((rnd() + 1.0) * 0.5 * int_range) % int_range;
            for (int e = 0; e < n_ex; e++)
                if (autopar_executor_write(exs[e], t, v, n)) return -1;
            free(v);
        } else {
            double *v = malloc((size_t)n * sizeof *v);
            for (int64_t j = 0; j < n; j++) v[j] = rnd();
            /* keep values well away from relu's kink so central differences are smooth */
            for (int64_t j = 0; j < n; j++)
                if (fabs(v[j]) < 0.05) v[j] += v[j] < 0 ? -0.1 : 0.1;
            for (int e = 0; e < n_ex; e++)
                if (autopar_executor_write_f64(exs[e], t, v, n)) return -1;
            free(v);
        }
    }
    return 0;
}

static void check_case(int c) {
    autopar_graph *g = NULL;
    if (build_case(c, &g)) {
        failures++;
        return;
    }
    autopar_executor *ex[2] = {NULL, NULL};
    if (autopar_executor_new(g, 1, AUTOPAR_PRECISION_F64, &ex[0]) ||
        autopar_executor_new(g, 1, AUTOPAR_PRECISION_F32, &ex[1]) || feed(g, ex, 2, cases[c].int_range)) {
        printf("FAIL %-36s setup: %s\n", cases[c].name, autopar_last_error());
        failures++;
        goto done;
    }
    double loss64, loss32;
    if (autopar_executor_forward_backward(ex[0], &loss64) ||
        autopar_executor_forward_backward(ex[1], &loss32)) {
        printf("FAIL %-36s run: %s\n", cases[c].name, autopar_last_error());
        failures++;
        goto done;
    }
    double worst_fd = 0.0, worst_f32 = 0.0;
    int n_params = 0;
    for (int i = 0; i < autopar_graph_size(g); i++) {
        autopar_tensor *p = autopar_graph_tensor(g, i);
        if (autopar_tensor_kind(p) != AUTOPAR_KIND_PARAM) continue;
        n_params++;
        autopar_tensor *gp = autopar_grad(g, p);
        if (!gp) {
            printf("FAIL %-36s parameter '%s' got no gradient\n", cases[c].name, autopar_tensor_name(p));
            failures++;
            continue;
        }
        int64_t n = autopar_tensor_numel(p);
        double *val = malloc((size_t)n * sizeof *val), *an = malloc((size_t)n * sizeof *an);
        double *an32 = malloc((size_t)n * sizeof *an32);
        autopar_executor_read_f64(ex[0], p, val, n);
        autopar_executor_read_f64(ex[0], gp, an, n);
        autopar_executor_read_f64(ex[1], gp, an32, n);
        double scale = 1e-2;
        for (int64_t j = 0; j < n; j++) scale = fmax(scale, fabs(an[j]));
        for (int64_t j = 0; j < n; j++) {
            double saved = val[j], lp, lm;
            val[j] = saved + FD_H;
            autopar_executor_write_f64(ex[0], p, val, n);
            autopar_executor_forward(ex[0], &lp);
            val[j] = saved - FD_H;
            autopar_executor_write_f64(ex[0], p, val, n);
            autopar_executor_forward(ex[0], &lm);
            val[j] = saved;
            double fd = (lp - lm) / (2 * FD_H);
            double err = fabs(an[j] - fd) / fmax(fabs(fd), 1e-2);
            if (err > worst_fd) worst_fd = err;
            if (err > FD_TOL) {
                printf("FAIL %-36s d loss / d %s[%lld]: autodiff %.10g, finite difference %.10g\n",
                       cases[c].name, autopar_tensor_name(p), (long long)j, an[j], fd);
                failures++;
                break;
            }
            double e32 = fabs(an32[j] - an[j]) / scale;
            if (e32 > worst_f32) worst_f32 = e32;
        }
        autopar_executor_write_f64(ex[0], p, val, n);
        free(val);
        free(an);
        free(an32);
    }
    if (worst_f32 > F32_TOL) {
        printf("FAIL %-36s float32 gradients differ from float64 by %.3g (relative to max |g|)\n",
               cases[c].name, worst_f32);
        failures++;
    }
    printf("ok   %-36s %d params, max fd error %.2e, f32 vs f64 %.2e, loss %.6f\n", cases[c].name,
           n_params, worst_fd, worst_f32, loss64);
done:
    autopar_executor_free(ex[0]);
    autopar_executor_free(ex[1]);
    autopar_graph_free(g);
}

int main(void) {
    int n_cases = (int)(sizeof cases / sizeof cases[0]);
    for (int c = 0; c < n_cases; c++) check_case(c);
    printf("%d cases, %d failures\n", n_cases, failures);
    return failures ? 1 : 0;
}
