/*
 * End-to-end training of the example models (examples/models.h) with the single-process CPU
 * executor, plus the builders' handling of bad configurations and the data helpers.
 *
 * Bounds checked (the same configurations as the examples' defaults):
 *   - MLP (dim 64, batch 256, AdamW lr 2e-3, seed 42, 300 steps, as train_mlp): the loss of the
 *     last step is at least 10x below the loss of the first step.
 *   - GPT (2 layers, hidden 64, 4 heads, seq 32, batch 8, AdamW lr 2e-3, seed 42, 600 steps on
 *     examples/data/tiny_corpus.txt, as train_gpt): the mean loss of the last 20 steps is below
 *     0.6·ln(256) = 3.327 nats (ln(256) = 5.545 is the loss of a uniform guess; byte unigram
 *     statistics alone give about 3.0).
 * Both also require every loss to be finite. Measured (Release, one OpenBLAS thread): MLP
 * 1.140 -> 0.043 (26x, seeds 1/7/42: 26-29x) in about 1 s; GPT 5.551 -> 2.12 (seeds 1/7/42/123:
 * 2.01-2.12) in about 4 s. Budget: well under 60 s on one core (Release).
 * Before training, the gradients of tiny instances of both models (every parameter kind, every
 * op the GPT uses) are compared with central differences in F64.
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime */

#include "autopar.h"
/* TRY (check.h) also marks the calling function's result failed. */
#define TRY_ON_FAIL rc = 1
#include "check.h"
#include "models.h"

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

static autopar_optimizer adamw(float lr) {
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    o.kind = AUTOPAR_OPT_ADAMW;
    o.lr = lr;
    return o;
}

/* ------------------------------------------------------------------------------------------ */
/* Training runs                                                                               */
/* ------------------------------------------------------------------------------------------ */

/* Trains the MLP; writes the first and last step's loss. Returns 0 on success. */
static int train_mlp(const mlp_config *c, int steps, float lr, uint64_t seed, double *first,
                     double *last) {
    int rc = 0;
    autopar_graph *g = NULL;
    autopar_executor *ex = NULL;
    autopar_tensor *loss = NULL;
    const int64_t n = c->batch * c->dim;
    float *x = malloc((size_t)n * sizeof *x), *y = malloc((size_t)n * sizeof *y);
    autopar_optimizer o = adamw(lr);
    *first = *last = NAN;
    if (!x || !y) {
        rc = 1;
        goto cleanup;
    }
    TRY(autopar_graph_new(&g));
    TRY(model_mlp_build(g, c, &loss));
    TRY(autopar_build_training(g, loss, &o));
    TRY(autopar_executor_new(g, seed, AUTOPAR_PRECISION_F32, &ex));
    autopar_tensor *tx = autopar_graph_find(g, "x"), *ty = autopar_graph_find(g, "y");
    CHECK(tx && ty, "inputs x and y exist");
    if (!tx || !ty) {
        rc = 1;
        goto cleanup;
    }
    for (int step = 0; step < steps; step++) {
        double l = NAN;
        model_mlp_batch(c, 1234, seed, step, x, y);
        TRY(autopar_executor_write(ex, tx, x, n));
        TRY(autopar_executor_write(ex, ty, y, n));
        TRY(autopar_executor_step(ex, &l));
        CHECK(isfinite(l), "MLP loss finite at step %d (got %g)", step, l);
        if (!isfinite(l)) {
            rc = 1;
            goto cleanup;
        }
        if (step == 0) *first = l;
        *last = l;
    }
    CHECK(autopar_executor_steps(ex) == steps, "executor counted %lld steps, want %d",
          (long long)autopar_executor_steps(ex), steps);
cleanup:
    autopar_executor_free(ex);
    autopar_graph_free(g);
    free(x);
    free(y);
    return rc;
}

/* Trains the GPT on text; writes the first loss and the mean of the last `tail` losses. */
static int train_gpt(const gpt_config *c, const unsigned char *text, int64_t len, int steps,
                     int tail, float lr, uint64_t seed, double *first, double *tail_mean) {
    int rc = 0;
    autopar_graph *g = NULL;
    autopar_executor *ex = NULL;
    autopar_tensor *loss = NULL;
    const int64_t n = c->batch * c->seq;
    int32_t *tok = malloc((size_t)n * sizeof *tok), *tgt = malloc((size_t)n * sizeof *tgt);
    autopar_optimizer o = adamw(lr);
    double sum = 0.0;
    *first = *tail_mean = NAN;
    if (!tok || !tgt) {
        rc = 1;
        goto cleanup;
    }
    TRY(autopar_graph_new(&g));
    TRY(model_gpt_build(g, c, &loss));
    TRY(autopar_build_training(g, loss, &o));
    TRY(autopar_executor_new(g, seed, AUTOPAR_PRECISION_F32, &ex));
    autopar_tensor *ttok = autopar_graph_find(g, "tokens");
    autopar_tensor *ttgt = autopar_graph_find(g, "targets");
    CHECK(ttok && ttgt, "inputs tokens and targets exist");
    if (!ttok || !ttgt) {
        rc = 1;
        goto cleanup;
    }
    for (int step = 0; step < steps; step++) {
        double l = NAN;
        model_text_batch(text, len, c->batch, c->seq, seed, step, tok, tgt);
        TRY(autopar_executor_write(ex, ttok, tok, n));
        TRY(autopar_executor_write(ex, ttgt, tgt, n));
        TRY(autopar_executor_step(ex, &l));
        CHECK(isfinite(l), "GPT loss finite at step %d (got %g)", step, l);
        if (!isfinite(l)) {
            rc = 1;
            goto cleanup;
        }
        if (step == 0) *first = l;
        if (step >= steps - tail) sum += l;
    }
    *tail_mean = sum / tail;
cleanup:
    autopar_executor_free(ex);
    autopar_graph_free(g);
    free(tok);
    free(tgt);
    return rc;
}

static void test_mlp_trains(void) {
    /* Same as train_mlp's defaults. */
    mlp_config c = {.batch = 256, .dim = 64, .mark_layers = 0};
    double first, last, t0 = now_s();
    const int steps = 300;
    if (train_mlp(&c, steps, 2e-3f, 42, &first, &last) != 0) return;
    printf("mlp: loss %.5f -> %.5f (%.1fx) in %d steps, %.2f s\n", first, last, first / last,
           steps, now_s() - t0);
    CHECK(last * 10.0 <= first, "MLP loss must fall >= 10x: %g -> %g", first, last);
}

static void test_gpt_trains(void) {
    unsigned char *text = NULL;
    int64_t len = 0;
    const char *path = AUTOPAR_SOURCE_DIR "/examples/data/tiny_corpus.txt";
    autopar_status s = model_text_load(path, &text, &len);
    CHECK(s == AUTOPAR_OK && len > 30000, "load %s: status %d, %lld bytes", path, (int)s,
          (long long)len);
    if (s != AUTOPAR_OK) return;
    /* Same as train_gpt's defaults. */
    gpt_config c = {.layers = 2, .hidden = 64, .heads = 4, .seq = 32, .vocab = MODEL_BYTE_VOCAB,
                    .batch = 8, .mark_layers = 0};
    const int steps = 600, tail = 20;
    double first, tail_mean, t0 = now_s();
    if (train_gpt(&c, text, len, steps, tail, 2e-3f, 42, &first, &tail_mean) == 0) {
        const double bound = 0.6 * log(256.0);
        printf("gpt: loss %.4f -> mean of last %d %.4f (bound %.4f) in %d steps, %.2f s\n", first,
               tail, tail_mean, bound, steps, now_s() - t0);
        /* An untrained model with 0.02-scale embeddings predicts nearly uniformly. */
        CHECK(fabs(first - log(256.0)) < 0.25, "initial GPT loss %g near ln 256", first);
        CHECK(tail_mean < bound, "GPT loss %g must end below %g", tail_mean, bound);
    }
    free(text);
}

/* ------------------------------------------------------------------------------------------ */
/* Graph structure                                                                             */
/* ------------------------------------------------------------------------------------------ */

static void check_param(autopar_graph *g, const char *name, int ndim, int64_t d0, int64_t d1) {
    autopar_tensor *t = autopar_graph_find(g, name);
    CHECK(t != NULL, "parameter %s exists", name);
    if (!t) return;
    CHECK(autopar_tensor_kind(t) == AUTOPAR_KIND_PARAM, "%s is a parameter", name);
    CHECK(autopar_tensor_ndim(t) == ndim, "%s has rank %d (got %d)", name, ndim,
          autopar_tensor_ndim(t));
    CHECK(autopar_tensor_dim(t, 0) == d0, "%s dim 0 = %lld (got %lld)", name, (long long)d0,
          (long long)autopar_tensor_dim(t, 0));
    if (ndim > 1)
        CHECK(autopar_tensor_dim(t, 1) == d1, "%s dim 1 = %lld (got %lld)", name, (long long)d1,
              (long long)autopar_tensor_dim(t, 1));
}

static void test_structure(void) {
    autopar_graph *g = NULL;
    autopar_tensor *loss = NULL;

    mlp_config mc = {.batch = 4, .dim = 8, .mark_layers = 1};
    CHECK(autopar_graph_new(&g) == AUTOPAR_OK, "graph_new");
    CHECK(model_mlp_build(g, &mc, &loss) == AUTOPAR_OK, "mlp build: %s", autopar_last_error());
    if (loss) {
        CHECK(autopar_tensor_ndim(loss) == 0, "MLP loss is a scalar");
        CHECK(autopar_tensor_layer(loss) == 3, "MLP with boundaries has 4 layers (loss in %d)",
              autopar_tensor_layer(loss));
        check_param(g, "w0", 2, 8, 32);
        check_param(g, "w1", 2, 32, 8);
        check_param(g, "w2", 2, 8, 32);
        check_param(g, "w3", 2, 32, 8);
        check_param(g, "b0", 1, 32, 0);
        check_param(g, "b3", 1, 8, 0);
        CHECK(autopar_graph_validate(g) == AUTOPAR_OK, "MLP graph valid: %s",
              autopar_last_error());
    }
    autopar_graph_free(g);

    g = NULL;
    loss = NULL;
    gpt_config gc = {.layers = 3, .hidden = 16, .heads = 2, .seq = 8, .vocab = 32, .batch = 2,
                     .mark_layers = 1};
    CHECK(autopar_graph_new(&g) == AUTOPAR_OK, "graph_new");
    CHECK(model_gpt_build(g, &gc, &loss) == AUTOPAR_OK, "gpt build: %s", autopar_last_error());
    if (loss) {
        CHECK(autopar_tensor_ndim(loss) == 0, "GPT loss is a scalar");
        /* A boundary after every block but the last: 3 blocks -> layers 0..2. */
        CHECK(autopar_tensor_layer(loss) == 2, "GPT with 3 blocks has 3 layers (loss in %d)",
              autopar_tensor_layer(loss));
        check_param(g, "wte", 2, 32, 16);
        check_param(g, "wpe", 2, 8, 16);
        check_param(g, "h2.ln1.g", 1, 16, 0);
        check_param(g, "h2.ln1.b", 1, 16, 0);
        check_param(g, "h2.attn.qkv.w", 2, 16, 48);
        check_param(g, "h2.attn.qkv.b", 1, 48, 0);
        check_param(g, "h2.attn.proj.w", 2, 16, 16);
        check_param(g, "h2.attn.proj.b", 1, 16, 0);
        check_param(g, "h2.ln2.g", 1, 16, 0);
        check_param(g, "h2.mlp.fc.w", 2, 16, 64);
        check_param(g, "h2.mlp.fc.b", 1, 64, 0);
        check_param(g, "h2.mlp.proj.w", 2, 64, 16);
        check_param(g, "h2.mlp.proj.b", 1, 16, 0);
        check_param(g, "lnf.g", 1, 16, 0);
        check_param(g, "lnf.b", 1, 16, 0);
        CHECK(autopar_graph_find(g, "h3.ln1.g") == NULL, "no fourth block");
        autopar_tensor *tok = autopar_graph_find(g, "tokens");
        CHECK(tok && autopar_tensor_dtype(tok) == AUTOPAR_I32 && autopar_tensor_kind(tok) ==
                         AUTOPAR_KIND_INPUT, "tokens is an I32 input");
        CHECK(autopar_graph_validate(g) == AUTOPAR_OK, "GPT graph valid: %s",
              autopar_last_error());
    }
    autopar_clear_error();
    autopar_graph_free(g);
}

/* ------------------------------------------------------------------------------------------ */
/* Gradients of the whole models against central differences (F64)                            */
/* ------------------------------------------------------------------------------------------ */

/* For each listed parameter, compares a few elements of its gradient with
 * (L(p + h) - L(p - h)) / 2h, in double precision: |fd - grad| <= 1e-6 + 1e-4·|fd|. */
static void check_model_grads(autopar_graph *g, autopar_executor *ex, const char *const *params,
                              int n_params, const char *what) {
    double loss0 = 0.0;
    if (autopar_executor_forward_backward(ex, &loss0) != AUTOPAR_OK) {
        CHECK(0, "%s: forward_backward: %s", what, autopar_last_error());
        return;
    }
    for (int p = 0; p < n_params; p++) {
        autopar_tensor *t = autopar_graph_find(g, params[p]);
        autopar_tensor *gt = t ? autopar_grad(g, t) : NULL;
        CHECK(t && gt, "%s: %s and its gradient exist", what, params[p]);
        if (!t || !gt) continue;
        const int64_t n = autopar_tensor_numel(t);
        double *val = malloc((size_t)n * sizeof *val), *grad = malloc((size_t)n * sizeof *grad);
        if (!val || !grad || autopar_executor_read_f64(ex, t, val, n) != AUTOPAR_OK ||
            autopar_executor_read_f64(ex, gt, grad, n) != AUTOPAR_OK) {
            CHECK(0, "%s: read %s: %s", what, params[p], autopar_last_error());
            free(val);
            free(grad);
            continue;
        }
        double worst = 0.0, largest = 0.0;
        for (int k = 0; k < 5; k++) {
            const int64_t i = (int64_t)(((uint64_t)k * 2654435761u + 17u) % (uint64_t)n);
            const double h = 1e-5, orig = val[i];
            double lp = 0.0, lm = 0.0;
            val[i] = orig + h;
            autopar_status s1 = autopar_executor_write_f64(ex, t, val, n);
            if (s1 == AUTOPAR_OK) s1 = autopar_executor_forward(ex, &lp);
            val[i] = orig - h;
            autopar_status s2 = autopar_executor_write_f64(ex, t, val, n);
            if (s2 == AUTOPAR_OK) s2 = autopar_executor_forward(ex, &lm);
            val[i] = orig;
            autopar_status s3 = autopar_executor_write_f64(ex, t, val, n);
            CHECK(s1 == AUTOPAR_OK && s2 == AUTOPAR_OK && s3 == AUTOPAR_OK, "%s: %s", what,
                  autopar_last_error());
            const double fd = (lp - lm) / (2 * h), err = fabs(fd - grad[i]);
            CHECK(err <= 1e-6 + 1e-4 * fabs(fd), "%s: d loss / d %s[%lld]: autodiff %.9g, "
                  "central difference %.9g", what, params[p], (long long)i, grad[i], fd);
            if (err > worst) worst = err;
            if (fabs(fd) > largest) largest = fabs(fd);
        }
        /* A gradient that is zero everywhere would pass trivially. */
        CHECK(largest > 1e-6, "%s: gradient of %s is not all zero", what, params[p]);
        printf("%s: grad %-16s max |fd| %.2e, max |autodiff - fd| %.2e\n", what, params[p],
               largest, worst);
        free(val);
        free(grad);
    }
}

static void test_model_grads(void) {
    autopar_graph *g = NULL;
    autopar_executor *ex = NULL;
    autopar_tensor *loss = NULL;

    /* MLP: dim 4, batch 3. */
    mlp_config mc = {.batch = 3, .dim = 4, .mark_layers = 1};
    float x[12], y[12];
    model_mlp_batch(&mc, 1, 2, 0, x, y);
    if (autopar_graph_new(&g) == AUTOPAR_OK && model_mlp_build(g, &mc, &loss) == AUTOPAR_OK &&
        autopar_backward(g, loss) == AUTOPAR_OK &&
        autopar_executor_new(g, 5, AUTOPAR_PRECISION_F64, &ex) == AUTOPAR_OK &&
        autopar_executor_write(ex, autopar_graph_find(g, "x"), x, 12) == AUTOPAR_OK &&
        autopar_executor_write(ex, autopar_graph_find(g, "y"), y, 12) == AUTOPAR_OK) {
        const char *const names[] = {"w0", "b0", "w1", "b2", "w3", "b3"};
        check_model_grads(g, ex, names, 6, "mlp");
    } else {
        CHECK(0, "mlp gradient setup: %s", autopar_last_error());
    }
    autopar_executor_free(ex);
    autopar_graph_free(g);

    /* GPT: 2 blocks, hidden 8, 2 heads, seq 4, vocab 16, batch 2; every parameter kind. */
    g = NULL;
    ex = NULL;
    loss = NULL;
    gpt_config gc = {.layers = 2, .hidden = 8, .heads = 2, .seq = 4, .vocab = 16, .batch = 2,
                     .mark_layers = 1};
    const int32_t tok[8] = {1, 5, 9, 2, 15, 0, 7, 7}, tgt[8] = {5, 9, 2, 3, 0, 7, 7, 11};
    if (autopar_graph_new(&g) == AUTOPAR_OK && model_gpt_build(g, &gc, &loss) == AUTOPAR_OK &&
        autopar_backward(g, loss) == AUTOPAR_OK &&
        autopar_executor_new(g, 5, AUTOPAR_PRECISION_F64, &ex) == AUTOPAR_OK &&
        autopar_executor_write(ex, autopar_graph_find(g, "tokens"), tok, 8) == AUTOPAR_OK &&
        autopar_executor_write(ex, autopar_graph_find(g, "targets"), tgt, 8) == AUTOPAR_OK) {
        /* Larger weights than the 0.02 init, so attention is not uniform and every path
         * carries a visible gradient. */
        const char *const big[] = {"wte", "wpe", "h0.attn.qkv.w", "h1.attn.qkv.w",
                                   "h0.attn.proj.w", "h1.mlp.fc.w"};
        for (int p = 0; p < 6; p++) {
            autopar_tensor *t = autopar_graph_find(g, big[p]);
            const int64_t n = autopar_tensor_numel(t);
            double *v = malloc((size_t)n * sizeof *v);
            if (!v) continue;
            for (int64_t i = 0; i < n; i++)
                v[i] = 0.5 * sin(0.7 * (double)i + (double)p) + 0.1 * cos(1.3 * (double)i);
            CHECK(autopar_executor_write_f64(ex, t, v, n) == AUTOPAR_OK, "write %s", big[p]);
            free(v);
        }
        const char *const names[] = {"wte", "wpe", "h0.ln1.g", "h0.ln1.b", "h0.attn.qkv.w",
                                     "h0.attn.qkv.b", "h0.attn.proj.w", "h1.ln2.g",
                                     "h1.mlp.fc.w", "h1.mlp.fc.b", "h1.mlp.proj.w",
                                     "h1.mlp.proj.b", "lnf.g", "lnf.b"};
        check_model_grads(g, ex, names, (int)(sizeof names / sizeof names[0]), "gpt");
    } else {
        CHECK(0, "gpt gradient setup: %s", autopar_last_error());
    }
    autopar_executor_free(ex);
    autopar_graph_free(g);
}

/* ------------------------------------------------------------------------------------------ */
/* Bad inputs                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Builds with a bad GPT config; expects an error status, NULL loss, a sticky graph error and a
 * message. */
static void expect_gpt_error(gpt_config c, const char *what, const char *mentions) {
    autopar_graph *g = NULL;
    autopar_tensor *loss = (autopar_tensor *)&c;  /* must be reset to NULL */
    autopar_clear_error();
    if (autopar_graph_new(&g) != AUTOPAR_OK) {
        CHECK(0, "graph_new");
        return;
    }
    autopar_status s = model_gpt_build(g, &c, &loss);
    printf("bad gpt config (%s): %s: %s\n", what, autopar_status_str(s), autopar_last_error());
    CHECK(s != AUTOPAR_OK, "%s: must fail", what);
    CHECK(loss == NULL, "%s: loss must be NULL", what);
    CHECK(autopar_graph_status(g) == s, "%s: graph status %d == returned %d", what,
          (int)autopar_graph_status(g), (int)s);
    CHECK(strlen(autopar_graph_error(g)) > 0, "%s: graph has a message", what);
    CHECK(strlen(autopar_last_error()) > 0, "%s: last error has a message", what);
    CHECK(strstr(autopar_graph_error(g), mentions) != NULL, "%s: message names '%s': %s", what,
          mentions, autopar_graph_error(g));
    autopar_graph_free(g);
}

static void test_bad_inputs(void) {
    const gpt_config ok = {.layers = 1, .hidden = 64, .heads = 4, .seq = 8, .vocab = 32,
                           .batch = 2, .mark_layers = 0};
    gpt_config c;
    c = ok; c.heads = 5;   expect_gpt_error(c, "heads 5 do not divide hidden 64", "heads");
    c = ok; c.heads = 0;   expect_gpt_error(c, "heads 0", "heads");
    c = ok; c.hidden = 0;  expect_gpt_error(c, "hidden 0", "wte");
    c = ok; c.seq = -3;    expect_gpt_error(c, "seq -3", "tokens");
    c = ok; c.vocab = 0;   expect_gpt_error(c, "vocab 0", "wte");
    c = ok; c.layers = -1; expect_gpt_error(c, "layers -1", "layers");

    /* MLP: zero batch, negative dim, NULL config. */
    const mlp_config bad[2] = {{.batch = 0, .dim = 8, .mark_layers = 0},
                               {.batch = 4, .dim = -8, .mark_layers = 0}};
    for (int i = 0; i < 3; i++) {
        autopar_graph *g = NULL;
        autopar_tensor *loss = NULL;
        if (autopar_graph_new(&g) != AUTOPAR_OK) {
            CHECK(0, "graph_new");
            return;
        }
        autopar_status s = model_mlp_build(g, i < 2 ? &bad[i] : NULL, &loss);
        printf("bad mlp config %d: %s: %s\n", i, autopar_status_str(s), autopar_last_error());
        CHECK(s != AUTOPAR_OK && loss == NULL, "bad MLP config %d must fail", i);
        CHECK(autopar_graph_status(g) != AUTOPAR_OK, "bad MLP config %d: sticky error", i);
        autopar_graph_free(g);
    }

    /* A graph already in error: the builder returns that error and builds nothing. */
    {
        autopar_graph *g = NULL;
        autopar_tensor *loss = NULL;
        mlp_config mc = {.batch = 4, .dim = 8, .mark_layers = 0};
        if (autopar_graph_new(&g) == AUTOPAR_OK) {
            int64_t shape[2] = {4, 5};
            autopar_tensor *a = autopar_input(g, "a", AUTOPAR_F32, 2, shape, 0);
            autopar_tensor *b = autopar_input(g, "b", AUTOPAR_F32, 2, shape, 0);
            CHECK(autopar_matmul(g, a, b) == NULL, "[4,5]x[4,5] fails");
            autopar_status before = autopar_graph_status(g);
            CHECK(before != AUTOPAR_OK, "graph in error");
            CHECK(model_mlp_build(g, &mc, &loss) == before && loss == NULL,
                  "build on a failed graph returns its status");
        }
        autopar_graph_free(g);
    }

    /* NULL arguments. */
    autopar_tensor *loss = NULL;
    mlp_config mc = {.batch = 4, .dim = 8, .mark_layers = 0};
    CHECK(model_mlp_build(NULL, &mc, &loss) == AUTOPAR_ERR_INVALID_ARG, "NULL graph");
    CHECK(model_gpt_build(NULL, &ok, &loss) == AUTOPAR_ERR_INVALID_ARG, "NULL graph");

    /* Text loading: missing file, NULL out arguments. */
    unsigned char *text = (unsigned char *)"x";
    int64_t len = 7;
    CHECK(model_text_load("/nonexistent/tiny_corpus.txt", &text, &len) == AUTOPAR_ERR_IO,
          "missing file -> IO error");
    CHECK(text == NULL && len == 0, "outputs cleared on error");
    CHECK(model_text_load(NULL, &text, &len) == AUTOPAR_ERR_INVALID_ARG, "NULL path");
    autopar_clear_error();
}

/* ------------------------------------------------------------------------------------------ */
/* Data helpers                                                                                */
/* ------------------------------------------------------------------------------------------ */

static void test_data(void) {
    /* MLP batches: deterministic per (seed, step); rows of a smaller batch are a prefix; the
     * teacher seed changes y only; x looks like N(0, 1); y is affine in x. */
    enum { B = 64, D = 16 };
    mlp_config c = {.batch = B, .dim = D, .mark_layers = 0}, c1 = {.batch = 1, .dim = D};
    static float x0[B * D], y0[B * D], x1[B * D], y1[B * D], x2[B * D], y2[B * D];
    model_mlp_batch(&c, 7, 9, 3, x0, y0);
    model_mlp_batch(&c, 7, 9, 3, x1, y1);
    CHECK(!memcmp(x0, x1, sizeof x0) && !memcmp(y0, y1, sizeof y0), "MLP batch deterministic");
    model_mlp_batch(&c1, 7, 9, 3, x2, y2);
    CHECK(!memcmp(x0, x2, D * sizeof(float)) && !memcmp(y0, y2, D * sizeof(float)),
          "batch-1 row equals row 0");
    model_mlp_batch(&c, 7, 9, 4, x1, y1);
    CHECK(memcmp(x0, x1, sizeof x0) != 0, "different steps give different x");
    model_mlp_batch(&c, 8, 9, 3, x2, y2);
    CHECK(!memcmp(x0, x2, sizeof x0) && memcmp(y0, y2, sizeof y0) != 0,
          "teacher seed changes y only");
    double mean = 0, var = 0;
    for (int i = 0; i < B * D; i++) mean += x0[i];
    mean /= B * D;
    for (int i = 0; i < B * D; i++) var += (x0[i] - mean) * (x0[i] - mean);
    var /= B * D;
    CHECK(fabs(mean) < 0.15 && fabs(var - 1.0) < 0.2, "x ~ N(0,1): mean %g var %g", mean, var);
    /* y = x·w + b: with dim 1 every (x, y) row lies on one line. */
    {
        mlp_config c2 = {.batch = 16, .dim = 1, .mark_layers = 0};
        float xs[16], ys[16];
        model_mlp_batch(&c2, 7, 9, 0, xs, ys);
        const double w = (ys[1] - ys[0]) / (xs[1] - xs[0]), b0 = ys[0] - w * xs[0];
        for (int i = 2; i < 16; i++)
            CHECK(fabs(ys[i] - (w * xs[i] + b0)) < 1e-4, "row %d on the teacher line", i);
        CHECK(fabs(w) > 1e-3, "teacher weight nonzero");
    }

    /* Text batches: windows of the text; targets shifted by one; deterministic. */
    const char *s = "the quick brown fox jumps over the lazy dog, again and again and again.";
    const int64_t len = (int64_t)strlen(s), Bt = 5, T = 12;
    int32_t tok[5 * 12], tgt[5 * 12], tok2[5 * 12], tgt2[5 * 12];
    model_text_batch((const unsigned char *)s, len, Bt, T, 1, 0, tok, tgt);
    model_text_batch((const unsigned char *)s, len, Bt, T, 1, 0, tok2, tgt2);
    CHECK(!memcmp(tok, tok2, sizeof tok) && !memcmp(tgt, tgt2, sizeof tgt),
          "text batch deterministic");
    for (int64_t b = 0; b < Bt; b++) {
        int found = 0;
        for (int64_t p = 0; p + T < len && !found; p++) {
            int eq = 1;
            for (int64_t t = 0; t < T && eq; t++)
                eq = tok[b * T + t] == (unsigned char)s[p + t] &&
                     tgt[b * T + t] == (unsigned char)s[p + t + 1];
            found = eq;
        }
        CHECK(found, "row %lld is a window of the text with shifted targets",
              (long long)b);
    }
    int differ = 0;
    for (int step = 1; step < 5 && !differ; step++) {
        model_text_batch((const unsigned char *)s, len, Bt, T, 1, step, tok2, tgt2);
        differ = memcmp(tok, tok2, sizeof tok) != 0;
    }
    CHECK(differ, "text batches change with the step");
    /* A text shorter than a window wraps around instead of reading past its end. */
    model_text_batch((const unsigned char *)"ab", 2, 2, 5, 1, 0, tok2, tgt2);
    for (int i = 0; i < 10; i++)
        CHECK((tok2[i] == 'a' || tok2[i] == 'b') && tgt2[i] != tok2[i], "short text wraps");
}

int main(void) {
    double t0 = now_s();
    test_data();
    test_structure();
    test_bad_inputs();
    test_model_grads();
    test_mlp_trains();
    test_gpt_trains();
    printf("%s: %d failure(s), %.1f s\n", g_failures ? "FAILED" : "ok", g_failures,
           now_s() - t0);
    return g_failures ? 1 : 0;
}
