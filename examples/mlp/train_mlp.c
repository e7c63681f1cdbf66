/*
 * Trains the Alpa tutorial MLP (examples/models.h) on a synthetic regression task, on as many
 * MPI ranks as it is started with (one without mpirun):
 *
 *   mpirun -np 4 ./train_mlp [--dim 64] [--batch 256] [--steps 300] [--lr 2e-3] [--seed 42]
 *                            [--every 25] [--cluster FILE.json] [--method auto|shard|dp|zero2]
 *                            [--micro 1]
 *
 * The graph is built at the (micro-)batch size, autopar_parallelize plans it for the cluster
 * (the "cpu" preset with one host of world-size devices, or --cluster FILE.json, which must
 * have world-size devices), rank 0 prints the plan, and a session trains it. The target is
 * y = x·W + b with a fixed random teacher (W, b); every step draws a fresh x (every rank draws
 * the same global batch; the session keeps each rank's part). Rank 0 prints the loss every
 * --every steps and a final line with the first and last loss, their ratio, the step time,
 * samples/s and the achieved GFLOP/s (model FLOPs of the whole job). Exits 1 on any library
 * error (printing autopar_last_error()), 2 on bad flags.
 */
#include "autopar.h"
#include "example_util.h"
#include "models.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct args {
    int64_t dim, batch;
    int     steps, every;
    double  lr;
    uint64_t seed;
    const char *cluster;
    autopar_method method;
    int         micro;
} args;

static void usage(const char *prog) {
    fprintf(stderr,
            "usage: %s [--dim N] [--batch N] [--steps N] [--lr X] [--seed N] [--every N]\n"
            "          [--cluster FILE.json] [--method auto|shard|dp|zero2] [--micro B]\n"
            "defaults: --dim 64 --batch 256 --steps 300 --lr 2e-3 --seed 42 --every 25\n"
            "          --method auto --micro 1, cluster: the \"cpu\" preset with one device per rank\n",
            prog);
}

/* Parses "--flag value" pairs; returns 0 on success. */
static int parse_args(int argc, char **argv, args *a) {
    const example_flag flags[] = {
        {"--cluster", EXAMPLE_STRING, &a->cluster}, {"--method", EXAMPLE_METHOD, &a->method},
        {"--dim", EXAMPLE_I64, &a->dim},            {"--batch", EXAMPLE_I64, &a->batch},
        {"--micro", EXAMPLE_INT, &a->micro},        {"--steps", EXAMPLE_INT, &a->steps},
        {"--every", EXAMPLE_INT, &a->every},        {"--lr", EXAMPLE_DOUBLE, &a->lr},
        {"--seed", EXAMPLE_U64, &a->seed},
    };
    if (example_parse_flags(argc, argv, flags, (int)(sizeof flags / sizeof flags[0]))) return 1;
    if (a->dim <= 0 || a->batch <= 0 || a->steps <= 0 || a->every <= 0 || !(a->lr > 0)) {
        fprintf(stderr, "%s: --dim, --batch, --steps, --every and --lr must be > 0\n", argv[0]);
        return 1;
    }
    if (a->micro < 1 || a->batch % a->micro != 0) {
        fprintf(stderr, "%s: --micro must be >= 1 and divide --batch\n", argv[0]);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    args a = {.dim = 64, .batch = 256, .steps = 300, .every = 25, .lr = 2e-3, .seed = 42,
              .method = AUTOPAR_METHOD_PIPESHARD, .micro = 1};
    int rank = 0, size = 1;
    if (autopar_world(&rank, &size) != AUTOPAR_OK) {
        fprintf(stderr, "train_mlp: %s\n", autopar_last_error());
        return 1;
    }
    if (parse_args(argc, argv, &a)) {
        if (rank == 0) usage(argv[0]);
        autopar_finalize();
        return 2;
    }

    int rc = 1;
    autopar_graph *g = NULL;
    autopar_cluster *cl = NULL;
    autopar_plan *plan = NULL;
    autopar_session *sess = NULL;
    float *x = NULL, *y = NULL;

    /* the graph is one micro-batch; a step's data is the global batch */
    mlp_config cfg = {.batch = a.batch / a.micro, .dim = a.dim, .mark_layers = 0};
    mlp_config global = cfg;
    global.batch = a.batch;
    autopar_tensor *loss = NULL;
    autopar_optimizer opt;
    autopar_optimizer_default(&opt);  /* AdamW */
    opt.lr = (float)a.lr;

    if (autopar_graph_new(&g) != AUTOPAR_OK) goto fail;
    if (model_mlp_build(g, &cfg, &loss) != AUTOPAR_OK) goto fail;
    if (autopar_build_training(g, loss, &opt) != AUTOPAR_OK) goto fail;

    if (example_plan(g, a.cluster, a.method, a.micro, size, &cl, &plan)) goto fail;
    if (rank == 0) {
        printf("train_mlp: dim %lld, batch %lld, steps %d, AdamW lr %g, seed %llu, %d rank%s\n",
               (long long)a.dim, (long long)a.batch, a.steps, a.lr, (unsigned long long)a.seed,
               size, size == 1 ? "" : "s");
        autopar_plan_print(plan, stdout);
        fflush(stdout);
    }
    if (autopar_session_new(plan, AUTOPAR_BACKEND_AUTO, a.seed, &sess) != AUTOPAR_OK) goto fail;

    const int64_t n = a.batch * a.dim;
    x = malloc((size_t)n * sizeof *x);
    y = malloc((size_t)n * sizeof *y);
    if (!x || !y) {
        fprintf(stderr, "train_mlp: out of memory for a batch of %lld floats\n", (long long)n);
        goto done;   /* every rank has the same batch size: every rank stops here */
    }

    double first = 0.0, last = 0.0, t_step = 0.0;
    for (int step = 0; step < a.steps; step++) {
        model_mlp_batch(&global, /*teacher_seed=*/1234, /*batch_seed=*/a.seed, step, x, y);
        double t0 = example_now_s();
        if (autopar_session_write_input(sess, "x", x, n) != AUTOPAR_OK) goto fail;
        if (autopar_session_write_input(sess, "y", y, n) != AUTOPAR_OK) goto fail;
        if (autopar_session_step(sess, &last) != AUTOPAR_OK) goto fail;
        t_step += example_now_s() - t0;
        if (step == 0) first = last;
        if (rank == 0 && (step % a.every == 0 || step + 1 == a.steps))
            printf("step %5d  loss %.6f\n", step, last);
    }
    if (rank == 0) {
        double per = t_step / a.steps;
        printf("final: loss %.6f -> %.6f (%.1fx lower) in %d steps on %d rank%s, %.2f ms/step, "
               "%.0f samples/s, %.2f GFLOP/s\n", first, last, last > 0 ? first / last : 0.0,
               a.steps, size, size == 1 ? "" : "s", 1e3 * per, (double)a.batch / per,
               autopar_session_flops_per_step(sess) / per * 1e-9);
    }
    rc = 0;
    goto done;

fail:
    fprintf(stderr, "train_mlp: rank %d: error: %s\n", rank, autopar_last_error());
done:
    free(x);
    free(y);
    autopar_session_free(sess);
    autopar_plan_free(plan);
    autopar_cluster_free(cl);
    autopar_graph_free(g);
    autopar_finalize();
    return rc;
}
