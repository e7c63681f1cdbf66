/*
 * Single-process training step time of the example models on the CPU executor, compared with
 * OpenBLAS cblas_sgemm running the same matrix products in the same process.
 *
 *   ./bench_single [--model all|mlp|gpt] [--steps 3] [--warmup 1] [--threads N]
 *                  [--mlp-dim 1024] [--mlp-batch 1024]
 *                  [--gpt-layers 4] [--gpt-hidden 512] [--gpt-heads 8] [--gpt-seq 256]
 *                  [--gpt-vocab 256] [--gpt-batch 8]
 *
 * For each model it prints:
 *   step ms        wall time of autopar_executor_step (forward + backward + AdamW): the
 *                  fastest of --steps steps after --warmup untimed ones (the mean is printed
 *                  too; the fastest is the figure least disturbed by other processes)
 *   model GFLOP    the matrix-product FLOPs of one training step (formulas below; elementwise
 *                  ops, softmax, layernorm, embedding and the optimizer are not counted)
 *   step GFLOP/s   model GFLOP / step time
 *   sgemm ms       the time cblas_sgemm takes for exactly the same list of products (same
 *                  m, n, k and transposes), with the same OpenBLAS thread count (the fastest
 *                  of at least 3 passes and 1 s)
 *   sgemm GFLOP/s  model GFLOP / sgemm time
 *   ratio          step GFLOP/s / sgemm GFLOP/s = sgemm ms / step ms (1.0 = the step costs no
 *                  more than its matrix products in OpenBLAS; < 1 also because the elementwise
 *                  ops, softmax, layernorm and AdamW are not in the reference)
 *
 * FLOP formulas (a multiply-add counts 2; one product C[m,n] = A[m,k]·B[k,n] is 2·m·n·k):
 *   MLP, batch B, layers (in_i, out_i) = (D,4D), (4D,D), (D,4D), (4D,D):
 *     forward   2·B·Σ_i in_i·out_i                        (x·W_i)
 *     backward  2·B·Σ_i in_i·out_i                        (dW_i = x_i^T·dy_i)
 *             + 2·B·Σ_{i>0} in_i·out_i                    (dx_i = dy_i·W_i^T; none for the input)
 *     with Σ_i in_i·out_i = 16·D² this is 2·B·(16 + 16 + 12)·D² = 88·B·D² (the usual estimate
 *     3 × 2·B·Σ in·out = 96·B·D² also counts the input gradient of the first layer).
 *   GPT, M = B·T tokens, per block: qkv (M,3C,C), attention proj (M,C,C), fc (M,4C,C), mlp proj
 *     (M,C,4C), scores q·k^T and att·v (B·H products of T×T×D each); head logits (M,V,C) with
 *     the tied embedding. Each product costs 3× its forward FLOPs (forward, d-input, d-weight),
 *     i.e. 6·M·(12·L·C² + C·V) + 12·L·B·T²·C in all (the causal mask is not discounted).
 *
 * Exits 1 on a library error (printing autopar_last_error()), 2 on bad flags.
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime */

#include "autopar.h"
#include "models.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef AUTOPAR_SOURCE_DIR
#define AUTOPAR_SOURCE_DIR "."
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------------------------------ */
/* Reference products                                                                          */
/* ------------------------------------------------------------------------------------------ */

/* `count` products C[m,n] = op(A)·op(B) with inner dimension k. */
typedef struct gemm {
    int     ta, tb;
    int64_t m, n, k, count;
} gemm;

typedef struct gemm_list {
    gemm items[64];
    int  n;
} gemm_list;

static void gemm_push(gemm_list *l, int ta, int tb, int64_t m, int64_t n, int64_t k,
                      int64_t count) {
    if (l->n < (int)(sizeof l->items / sizeof l->items[0]))
        l->items[l->n++] = (gemm){ta, tb, m, n, k, count};
}

/* A forward product y[m,n] = x[m,k]·w[k,n] and its two backward products. With need_dx == 0
 * the input gradient is skipped (x is a model input). */
static void gemm_push_dense(gemm_list *l, int64_t m, int64_t n, int64_t k, int64_t count,
                            int need_dx) {
    gemm_push(l, 0, 0, m, n, k, count);            /* y  = x · w     */
    if (need_dx) gemm_push(l, 0, 1, m, k, n, count); /* dx = dy · w^T  */
    gemm_push(l, 1, 0, k, n, m, count);            /* dw = x^T · dy  */
}

static double gemm_list_flops(const gemm_list *l) {
    double f = 0.0;
    for (int i = 0; i < l->n; i++)
        f += 2.0 * (double)l->items[i].m * (double)l->items[i].n * (double)l->items[i].k *
             (double)l->items[i].count;
    return f;
}

/* Runs every product once; returns the seconds it took. */
static double gemm_list_run(const gemm_list *l, const float *a, const float *b, float *c) {
    double t0 = now_s();
    for (int i = 0; i < l->n; i++) {
        const gemm *g = &l->items[i];
        const int m = (int)g->m, n = (int)g->n, k = (int)g->k;
        const int lda = g->ta ? m : k, ldb = g->tb ? k : n;
        for (int64_t r = 0; r < g->count; r++)
            cblas_sgemm(CblasRowMajor, g->ta ? CblasTrans : CblasNoTrans,
                        g->tb ? CblasTrans : CblasNoTrans, m, n, k, 1.0f, a, lda, b, ldb, 0.0f,
                        c, n);
    }
    return now_s() - t0;
}

/* Fastest of several passes over the list (one untimed pass first, then at least 3 timed passes
 * and at least min_s seconds in all). Returns a negative value when the buffers cannot be
 * allocated. */
static double gemm_list_time(const gemm_list *l, double min_s) {
    size_t na = 1, nb = 1, nc = 1;
    for (int i = 0; i < l->n; i++) {
        const gemm *g = &l->items[i];
        if ((size_t)(g->m * g->k) > na) na = (size_t)(g->m * g->k);
        if ((size_t)(g->k * g->n) > nb) nb = (size_t)(g->k * g->n);
        if ((size_t)(g->m * g->n) > nc) nc = (size_t)(g->m * g->n);
    }
    float *a = malloc(na * sizeof *a), *b = malloc(nb * sizeof *b), *c = malloc(nc * sizeof *c);
    double best = -1.0;
    if (a && b && c) {
        for (size_t i = 0; i < na; i++) a[i] = (float)((i * 7919u) % 1000) * 1e-3f - 0.5f;
        for (size_t i = 0; i < nb; i++) b[i] = (float)((i * 104729u) % 1000) * 1e-3f - 0.5f;
        (void)gemm_list_run(l, a, b, c);
        double total = 0.0;
        int reps = 0;
        while (reps < 3 || total < min_s) {
            double t = gemm_list_run(l, a, b, c);
            if (reps == 0 || t < best) best = t;
            total += t;
            reps++;
        }
    }
    free(a);
    free(b);
    free(c);
    return best;
}

/* ------------------------------------------------------------------------------------------ */
/* Model runs                                                                                  */
/* ------------------------------------------------------------------------------------------ */

typedef struct bench_opts {
    int steps, warmup;
} bench_opts;

/* Runs --warmup untimed and --steps timed training steps on a fixed batch (already written).
 * Writes the fastest and the mean step seconds; returns 0, or -1 on a library error. */
static int time_steps(autopar_executor *ex, const bench_opts *o, double *loss, double *best,
                      double *mean) {
    for (int i = 0; i < o->warmup; i++)
        if (autopar_executor_step(ex, loss) != AUTOPAR_OK) return -1;
    double total = 0.0;
    *best = INFINITY;
    for (int i = 0; i < o->steps; i++) {
        double t0 = now_s();
        if (autopar_executor_step(ex, loss) != AUTOPAR_OK) return -1;
        double t = now_s() - t0;
        total += t;
        if (t < *best) *best = t;
    }
    *mean = total / o->steps;
    return 0;
}

static int64_t count_params(const autopar_graph *g) {
    int64_t n = 0;
    for (int i = 0; i < autopar_graph_size(g); i++) {
        autopar_tensor *t = autopar_graph_tensor(g, i);
        if (autopar_tensor_kind(t) == AUTOPAR_KIND_PARAM) n += autopar_tensor_numel(t);
    }
    return n;
}

static void report(const char *what, double step_s, double mean_s, const gemm_list *l,
                   double loss) {
    const double flops = gemm_list_flops(l);
    const double sgemm_s = gemm_list_time(l, 1.0);
    const double step_rate = flops / step_s * 1e-9;
    printf("%s: loss %.4f\n", what, loss);
    printf("%s: step %.1f ms (best; mean %.1f ms), model %.2f GFLOP, %.2f GFLOP/s\n", what,
           1e3 * step_s, 1e3 * mean_s, flops * 1e-9, step_rate);
    if (sgemm_s > 0) {
        const double sgemm_rate = flops / sgemm_s * 1e-9;
        printf("%s: sgemm same products %.1f ms (best), %.2f GFLOP/s (OpenBLAS, %d threads)\n",
               what, 1e3 * sgemm_s, sgemm_rate, openblas_get_num_threads());
        printf("%s: ratio step-rate / sgemm-rate = %.3f\n", what, step_rate / sgemm_rate);
    } else {
        printf("%s: sgemm reference skipped (out of memory)\n", what);
    }
}

static int bench_mlp(const bench_opts *o, int64_t dim, int64_t batch) {
    int rc = 1;
    autopar_graph *g = NULL;
    autopar_executor *ex = NULL;
    autopar_tensor *loss = NULL;
    mlp_config c = {.batch = batch, .dim = dim, .mark_layers = 0};
    const int64_t n = batch * dim;
    float *x = malloc((size_t)n * sizeof *x), *y = malloc((size_t)n * sizeof *y);
    autopar_optimizer opt;
    autopar_optimizer_default(&opt);
    if (!x || !y) {
        fprintf(stderr, "bench_single: out of memory\n");
        goto done;
    }
    if (autopar_graph_new(&g) != AUTOPAR_OK || model_mlp_build(g, &c, &loss) != AUTOPAR_OK ||
        autopar_build_training(g, loss, &opt) != AUTOPAR_OK ||
        autopar_executor_new(g, 42, AUTOPAR_PRECISION_F32, &ex) != AUTOPAR_OK)
        goto fail;
    model_mlp_batch(&c, 1234, 42, 0, x, y);
    if (autopar_executor_write(ex, autopar_graph_find(g, "x"), x, n) != AUTOPAR_OK ||
        autopar_executor_write(ex, autopar_graph_find(g, "y"), y, n) != AUTOPAR_OK)
        goto fail;

    printf("mlp: dim %lld, batch %lld, %lld parameters, AdamW; %d warm-up + %d timed steps\n",
           (long long)dim, (long long)batch, (long long)count_params(g), o->warmup, o->steps);
    double l = 0.0, step_s = 0.0, mean_s = 0.0;
    if (time_steps(ex, o, &l, &step_s, &mean_s) != 0) goto fail;

    gemm_list gl = {.n = 0};
    const int64_t w[5] = {dim, 4 * dim, dim, 4 * dim, dim};
    for (int i = 0; i < 4; i++) gemm_push_dense(&gl, batch, w[i + 1], w[i], 1, i > 0);
    report("mlp", step_s, mean_s, &gl, l);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "bench_single: mlp: %s\n", autopar_last_error());
done:
    autopar_executor_free(ex);
    autopar_graph_free(g);
    free(x);
    free(y);
    return rc;
}

static int bench_gpt(const bench_opts *o, const gpt_config *c) {
    int rc = 1;
    autopar_graph *g = NULL;
    autopar_executor *ex = NULL;
    autopar_tensor *loss = NULL;
    unsigned char *text = NULL;
    int64_t len = 0;
    const int64_t n = c->batch * c->seq;
    int32_t *tok = malloc((size_t)n * sizeof *tok), *tgt = malloc((size_t)n * sizeof *tgt);
    autopar_optimizer opt;
    autopar_optimizer_default(&opt);
    if (!tok || !tgt) {
        fprintf(stderr, "bench_single: out of memory\n");
        goto done;
    }
    if (autopar_graph_new(&g) != AUTOPAR_OK || model_gpt_build(g, c, &loss) != AUTOPAR_OK ||
        autopar_build_training(g, loss, &opt) != AUTOPAR_OK ||
        autopar_executor_new(g, 42, AUTOPAR_PRECISION_F32, &ex) != AUTOPAR_OK)
        goto fail;

    /* Tokens: the corpus when it loads (and the vocabulary covers bytes), else a fixed pattern. */
    if (c->vocab >= MODEL_BYTE_VOCAB &&
        model_text_load(AUTOPAR_SOURCE_DIR "/examples/data/tiny_corpus.txt", &text, &len) ==
            AUTOPAR_OK) {
        model_text_batch(text, len, c->batch, c->seq, 42, 0, tok, tgt);
    } else {
        for (int64_t i = 0; i < n; i++) {
            tok[i] = (int32_t)((i * 31 + 7) % c->vocab);
            tgt[i] = (int32_t)((i * 31 + 38) % c->vocab);
        }
    }
    if (autopar_executor_write(ex, autopar_graph_find(g, "tokens"), tok, n) != AUTOPAR_OK ||
        autopar_executor_write(ex, autopar_graph_find(g, "targets"), tgt, n) != AUTOPAR_OK)
        goto fail;

    printf("gpt: layers %d, hidden %lld, heads %d, seq %lld, vocab %lld, batch %lld, "
           "%lld parameters, AdamW; %d warm-up + %d timed steps\n",
           c->layers, (long long)c->hidden, c->heads, (long long)c->seq, (long long)c->vocab,
           (long long)c->batch, (long long)count_params(g), o->warmup, o->steps);
    double l = 0.0, step_s = 0.0, mean_s = 0.0;
    if (time_steps(ex, o, &l, &step_s, &mean_s) != 0) goto fail;

    const int64_t B = c->batch, T = c->seq, C = c->hidden, H = c->heads, D = C / H;
    const int64_t M = B * T, V = c->vocab;
    gemm_list gl = {.n = 0};
    gemm_push_dense(&gl, M, 3 * C, C, c->layers, 1);    /* qkv                     */
    gemm_push(&gl, 0, 1, T, T, D, B * H * c->layers);   /* scores = q · k^T        */
    gemm_push(&gl, 0, 0, T, D, T, B * H * c->layers);   /* dq = dS · k             */
    gemm_push(&gl, 1, 0, T, D, T, B * H * c->layers);   /* dk = dS^T · q           */
    gemm_push(&gl, 0, 0, T, D, T, B * H * c->layers);   /* y = att · v             */
    gemm_push(&gl, 0, 1, T, T, D, B * H * c->layers);   /* datt = dy · v^T         */
    gemm_push(&gl, 1, 0, T, D, T, B * H * c->layers);   /* dv = att^T · dy         */
    gemm_push_dense(&gl, M, C, C, c->layers, 1);        /* attention proj          */
    gemm_push_dense(&gl, M, 4 * C, C, c->layers, 1);    /* mlp fc                  */
    gemm_push_dense(&gl, M, C, 4 * C, c->layers, 1);    /* mlp proj                */
    gemm_push(&gl, 0, 1, M, V, C, 1);                   /* logits = x · wte^T      */
    gemm_push(&gl, 0, 0, M, C, V, 1);                   /* dx = dlogits · wte      */
    gemm_push(&gl, 1, 0, V, C, M, 1);                   /* dwte = dlogits^T · x    */
    report("gpt", step_s, mean_s, &gl, l);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "bench_single: gpt: %s\n", autopar_last_error());
done:
    autopar_executor_free(ex);
    autopar_graph_free(g);
    free(text);
    free(tok);
    free(tgt);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Main                                                                                        */
/* ------------------------------------------------------------------------------------------ */

static void usage(const char *prog) {
    fprintf(stderr,
            "usage: %s [--model all|mlp|gpt] [--steps N] [--warmup N] [--threads N]\n"
            "          [--mlp-dim N] [--mlp-batch N]\n"
            "          [--gpt-layers N] [--gpt-hidden N] [--gpt-heads N] [--gpt-seq N]\n"
            "          [--gpt-vocab N] [--gpt-batch N]\n"
            "defaults: --model all --steps 3 --warmup 1 --mlp-dim 1024 --mlp-batch 1024\n"
            "          --gpt-layers 4 --gpt-hidden 512 --gpt-heads 8 --gpt-seq 256\n"
            "          --gpt-vocab 256 --gpt-batch 8 (OpenBLAS's own thread count)\n",
            prog);
}

int main(int argc, char **argv) {
    const char *model = "all";
    bench_opts o = {.steps = 3, .warmup = 1};
    int threads = 0;
    int64_t mlp_dim = 1024, mlp_batch = 1024;
    gpt_config gc = {.layers = 4, .hidden = 512, .heads = 8, .seq = 256, .vocab = 256,
                     .batch = 8, .mark_layers = 0};

    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "-h") || !strcmp(f, "--help") || i + 1 >= argc) {
            usage(argv[0]);
            return 2;
        }
        const char *v = argv[++i];
        if (!strcmp(f, "--model")) {
            model = v;
            continue;
        }
        char *end = NULL;
        long long x = strtoll(v, &end, 10);
        if (!end || *end != '\0') {
            fprintf(stderr, "%s: bad value '%s' for %s\n", argv[0], v, f);
            return 2;
        }
        if (!strcmp(f, "--steps")) o.steps = (int)x;
        else if (!strcmp(f, "--warmup")) o.warmup = (int)x;
        else if (!strcmp(f, "--threads")) threads = (int)x;
        else if (!strcmp(f, "--mlp-dim")) mlp_dim = x;
        else if (!strcmp(f, "--mlp-batch")) mlp_batch = x;
        else if (!strcmp(f, "--gpt-layers")) gc.layers = (int)x;
        else if (!strcmp(f, "--gpt-hidden")) gc.hidden = x;
        else if (!strcmp(f, "--gpt-heads")) gc.heads = (int)x;
        else if (!strcmp(f, "--gpt-seq")) gc.seq = x;
        else if (!strcmp(f, "--gpt-vocab")) gc.vocab = x;
        else if (!strcmp(f, "--gpt-batch")) gc.batch = x;
        else {
            fprintf(stderr, "%s: unknown flag %s\n", argv[0], f);
            usage(argv[0]);
            return 2;
        }
    }
    const int run_mlp = !strcmp(model, "all") || !strcmp(model, "mlp");
    const int run_gpt = !strcmp(model, "all") || !strcmp(model, "gpt");
    if ((!run_mlp && !run_gpt) || o.steps <= 0 || o.warmup < 0 || threads < 0 ||
        mlp_dim <= 0 || mlp_batch <= 0) {
        usage(argv[0]);
        return 2;
    }
    if (threads > 0) openblas_set_num_threads(threads);
    printf("bench_single: OpenBLAS %s, %d threads\n", openblas_get_config(),
           openblas_get_num_threads());

    int rc = 0;
    if (run_mlp) rc |= bench_mlp(&o, mlp_dim, mlp_batch);
    if (run_gpt) rc |= bench_gpt(&o, &gc);
    return rc;
}
