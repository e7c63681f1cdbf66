/*
 * Trains the Alpa tutorial MLP (examples/models.h) on a synthetic regression task with the
 * single-process CPU executor.
 *
 *   ./train_mlp [--dim 64] [--batch 256] [--steps 300] [--lr 2e-3] [--seed 42] [--every 25]
 *
 * The target is y = x·W + b with a fixed random teacher (W, b); every step draws a fresh x.
 * Prints the loss every --every steps and a final line with the first and last loss and their
 * ratio. Exits 1 on any library error (printing autopar_last_error()), 2 on bad flags.
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime */

#include "autopar.h"
#include "models.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct args {
    int64_t dim, batch;
    int     steps, every;
    double  lr;
    uint64_t seed;
} args;

static void usage(const char *prog) {
    fprintf(stderr,
            "usage: %s [--dim N] [--batch N] [--steps N] [--lr X] [--seed N] [--every N]\n"
            "defaults: --dim 64 --batch 256 --steps 300 --lr 2e-3 --seed 42 --every 25\n",
            prog);
}

/* Parses "--flag value" pairs; returns 0 on success. */
static int parse_args(int argc, char **argv, args *a) {
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) return 1;
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: missing value for %s\n", argv[0], f);
            return 1;
        }
        const char *v = argv[++i];
        char *end = NULL;
        if (!strcmp(f, "--dim")) a->dim = strtoll(v, &end, 10);
        else if (!strcmp(f, "--batch")) a->batch = strtoll(v, &end, 10);
        else if (!strcmp(f, "--steps")) a->steps = (int)strtol(v, &end, 10);
        else if (!strcmp(f, "--every")) a->every = (int)strtol(v, &end, 10);
        else if (!strcmp(f, "--lr")) a->lr = strtod(v, &end);
        else if (!strcmp(f, "--seed")) a->seed = strtoull(v, &end, 10);
        else {
            fprintf(stderr, "%s: unknown flag %s\n", argv[0], f);
            return 1;
        }
        if (!end || *end != '\0') {
            fprintf(stderr, "%s: bad value '%s' for %s\n", argv[0], v, f);
            return 1;
        }
    }
    if (a->dim <= 0 || a->batch <= 0 || a->steps <= 0 || a->every <= 0 || !(a->lr > 0)) {
        fprintf(stderr, "%s: --dim, --batch, --steps, --every and --lr must be > 0\n", argv[0]);
        return 1;
    }
    return 0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    args a = {.dim = 64, .batch = 256, .steps = 300, .every = 25, .lr = 2e-3, .seed = 42};
    if (parse_args(argc, argv, &a)) {
        usage(argv[0]);
        return 2;
    }

    int rc = 1;
    autopar_graph *g = NULL;
    autopar_executor *ex = NULL;
    float *x = NULL, *y = NULL;

    mlp_config cfg = {.batch = a.batch, .dim = a.dim, .mark_layers = 0};
    autopar_tensor *loss = NULL;
    autopar_optimizer opt;
    autopar_optimizer_default(&opt);  /* AdamW */
    opt.lr = (float)a.lr;

    if (autopar_graph_new(&g) != AUTOPAR_OK) goto fail;
    if (model_mlp_build(g, &cfg, &loss) != AUTOPAR_OK) goto fail;
    if (autopar_build_training(g, loss, &opt) != AUTOPAR_OK) goto fail;
    if (autopar_executor_new(g, a.seed, AUTOPAR_PRECISION_F32, &ex) != AUTOPAR_OK) goto fail;

    autopar_tensor *tx = autopar_graph_find(g, "x");
    autopar_tensor *ty = autopar_graph_find(g, "y");
    if (!tx || !ty) goto fail;
    const int64_t n = a.batch * a.dim;
    x = malloc((size_t)n * sizeof *x);
    y = malloc((size_t)n * sizeof *y);
    if (!x || !y) {
        fprintf(stderr, "train_mlp: out of memory for a batch of %lld floats\n", (long long)n);
        goto done;
    }

    printf("train_mlp: dim %lld, batch %lld, steps %d, AdamW lr %g, seed %llu\n",
           (long long)a.dim, (long long)a.batch, a.steps, a.lr, (unsigned long long)a.seed);
    double first = 0.0, last = 0.0, t_step = 0.0;
    for (int step = 0; step < a.steps; step++) {
        model_mlp_batch(&cfg, /*teacher_seed=*/1234, /*batch_seed=*/a.seed, step, x, y);
        if (autopar_executor_write(ex, tx, x, n) != AUTOPAR_OK) goto fail;
        if (autopar_executor_write(ex, ty, y, n) != AUTOPAR_OK) goto fail;
        double t0 = now_s();
        if (autopar_executor_step(ex, &last) != AUTOPAR_OK) goto fail;
        t_step += now_s() - t0;
        if (step == 0) first = last;
        if (step % a.every == 0 || step + 1 == a.steps)
            printf("step %5d  loss %.6f\n", step, last);
    }
    printf("final: loss %.6f -> %.6f (%.1fx lower) in %d steps, %.2f ms/step\n", first, last,
           last > 0 ? first / last : 0.0, a.steps, 1e3 * t_step / a.steps);
    rc = 0;
    goto done;

fail:
    fprintf(stderr, "train_mlp: error: %s\n", autopar_last_error());
done:
    free(x);
    free(y);
    autopar_executor_free(ex);
    autopar_graph_free(g);
    return rc;
}
