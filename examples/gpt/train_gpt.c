/*
 * Trains a small GPT-2 style byte-level language model (examples/models.h) on a text file, on as
 * many MPI ranks as it is started with (one without mpirun):
 *
 *   mpirun -np 4 ./train_gpt [--data FILE] [--layers 2] [--hidden 64] [--heads 4] [--seq 32]
 *               [--batch 8] [--steps 600] [--lr 2e-3] [--seed 42] [--every 50]
 *               [--cluster FILE.json] [--method auto|shard|dp|zero2] [--micro 1]
 *
 * autopar_parallelize plans the model for the cluster (the "cpu" preset with one host of
 * world-size devices, or --cluster FILE.json with world-size devices), rank 0 prints the plan,
 * and a session trains it; every rank draws the same global batch. Rank 0 prints the progress.
 *
 * The default corpus is examples/data/tiny_corpus.txt. A model that has learned nothing has a
 * loss of ln(256) = 5.545 nats per byte; the final line prints the last loss, a moving average
 * over the last steps, and tokens/s. Exits 1 on any library error (printing
 * autopar_last_error()), 2 on bad flags.
 */
#include "autopar.h"
#include "example_util.h"
#include "models.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef AUTOPAR_SOURCE_DIR
#define AUTOPAR_SOURCE_DIR "."
#endif

typedef struct args {
    const char *data;
    int         layers, heads, steps, every;
    int64_t     hidden, seq, batch;
    double      lr;
    uint64_t    seed;
    const char *cluster;
    autopar_method method;
    int         micro;
} args;

static void usage(const char *prog) {
    fprintf(stderr,
            "usage: %s [--data FILE] [--layers N] [--hidden N] [--heads N] [--seq N] [--batch N]\n"
            "          [--steps N] [--lr X] [--seed N] [--every N] [--cluster FILE.json]\n"
            "          [--method auto|shard|dp|zero2] [--micro B]\n"
            "defaults: --data %s/examples/data/tiny_corpus.txt --layers 2 --hidden 64 --heads 4\n"
            "          --seq 32 --batch 8 --steps 600 --lr 2e-3 --seed 42 --every 50\n"
            "          --method auto --micro 1, cluster: the \"cpu\" preset with one device per rank\n",
            prog, AUTOPAR_SOURCE_DIR);
}

static int parse_args(int argc, char **argv, args *a) {
    const example_flag flags[] = {
        {"--data", EXAMPLE_STRING, &a->data},      {"--cluster", EXAMPLE_STRING, &a->cluster},
        {"--method", EXAMPLE_METHOD, &a->method},   {"--layers", EXAMPLE_INT, &a->layers},
        {"--heads", EXAMPLE_INT, &a->heads},        {"--steps", EXAMPLE_INT, &a->steps},
        {"--every", EXAMPLE_INT, &a->every},        {"--hidden", EXAMPLE_I64, &a->hidden},
        {"--seq", EXAMPLE_I64, &a->seq},            {"--batch", EXAMPLE_I64, &a->batch},
        {"--micro", EXAMPLE_INT, &a->micro},        {"--lr", EXAMPLE_DOUBLE, &a->lr},
        {"--seed", EXAMPLE_U64, &a->seed},
    };
    if (example_parse_flags(argc, argv, flags, (int)(sizeof flags / sizeof flags[0]))) return 1;
    if (a->steps <= 0 || a->every <= 0 || !(a->lr > 0)) {
        fprintf(stderr, "%s: --steps, --every and --lr must be > 0\n", argv[0]);
        return 1;
    }
    if (a->micro < 1 || a->batch % a->micro != 0) {
        fprintf(stderr, "%s: --micro must be >= 1 and divide --batch\n", argv[0]);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    args a = {.data = AUTOPAR_SOURCE_DIR "/examples/data/tiny_corpus.txt",
              .layers = 2, .hidden = 64, .heads = 4, .seq = 32, .batch = 8,
              .steps = 600, .every = 50, .lr = 2e-3, .seed = 42,
              .method = AUTOPAR_METHOD_PIPESHARD, .micro = 1};
    int rank = 0, size = 1;
    if (autopar_world(&rank, &size) != AUTOPAR_OK) {
        fprintf(stderr, "train_gpt: %s\n", autopar_last_error());
        return 1;
    }
    if (parse_args(argc, argv, &a)) {
        if (rank == 0) usage(argv[0]);
        autopar_finalize();
        return 2;
    }

    unsigned char *text = NULL;
    int64_t len = 0;
    errno = 0;
    autopar_status s = model_text_load(a.data, &text, &len);
    if (s != AUTOPAR_OK) {
        /* every rank reads the same file, so every rank stops here */
        fprintf(stderr, "train_gpt: rank %d: cannot read %s: %s (%s)\n", rank, a.data,
                autopar_status_str(s), errno ? strerror(errno) : "empty file");
        autopar_finalize();
        return 1;
    }

    int rc = 1;
    autopar_graph *g = NULL;
    autopar_cluster *cl = NULL;
    autopar_plan *plan = NULL;
    autopar_session *sess = NULL;
    int32_t *tokens = NULL, *targets = NULL;

    gpt_config cfg = {.layers = a.layers, .hidden = a.hidden, .heads = a.heads, .seq = a.seq,
                      .vocab = MODEL_BYTE_VOCAB, .batch = a.batch / a.micro,
                      .mark_layers = 0};   /* the graph is one micro-batch */
    autopar_tensor *loss = NULL;
    autopar_optimizer opt;
    autopar_optimizer_default(&opt);  /* AdamW */
    opt.lr = (float)a.lr;

    if (autopar_graph_new(&g) != AUTOPAR_OK) goto fail;
    if (model_gpt_build(g, &cfg, &loss) != AUTOPAR_OK) goto fail;
    if (autopar_build_training(g, loss, &opt) != AUTOPAR_OK) goto fail;

    if (example_plan(g, a.cluster, a.method, a.micro, size, &cl, &plan)) goto fail;

    const int64_t n = a.batch * a.seq;
    int64_t n_params = 0;
    for (int i = 0; i < autopar_graph_size(g); i++) {
        autopar_tensor *t = autopar_graph_tensor(g, i);
        if (autopar_tensor_kind(t) == AUTOPAR_KIND_PARAM) n_params += autopar_tensor_numel(t);
    }
    if (rank == 0) {
        printf("train_gpt: %s (%lld bytes), %d rank%s\n", a.data, (long long)len, size,
               size == 1 ? "" : "s");
        printf("model: layers %d, hidden %lld, heads %d, seq %lld, vocab %d, batch %lld, "
               "%lld parameters; AdamW lr %g, %d steps\n",
               a.layers, (long long)a.hidden, a.heads, (long long)a.seq, MODEL_BYTE_VOCAB,
               (long long)a.batch, (long long)n_params, a.lr, a.steps);
        autopar_plan_print(plan, stdout);
        printf("loss of a uniform guess: ln(256) = %.4f\n", log(256.0));
        fflush(stdout);
    }
    if (autopar_session_new(plan, AUTOPAR_BACKEND_AUTO, a.seed, &sess) != AUTOPAR_OK) goto fail;

    tokens = malloc((size_t)n * sizeof *tokens);
    targets = malloc((size_t)n * sizeof *targets);
    if (!tokens || !targets) {
        fprintf(stderr, "train_gpt: out of memory\n");
        goto done;
    }

    /* Moving average of the loss over the last `window` steps (batches are small and noisy). */
    enum { window = 20 };
    double recent[window] = {0};
    double last = 0.0, avg = 0.0, t_total = 0.0;
    for (int step = 0; step < a.steps; step++) {
        model_text_batch(text, len, a.batch, a.seq, a.seed, step, tokens, targets);
        double t0 = example_now_s();
        if (autopar_session_write_input(sess, "tokens", tokens, n) != AUTOPAR_OK) goto fail;
        if (autopar_session_write_input(sess, "targets", targets, n) != AUTOPAR_OK) goto fail;
        if (autopar_session_step(sess, &last) != AUTOPAR_OK) goto fail;
        t_total += example_now_s() - t0;
        recent[step % window] = last;
        int k = step + 1 < window ? step + 1 : window;
        avg = 0.0;
        for (int i = 0; i < k; i++) avg += recent[i];
        avg /= k;
        if (rank == 0 && (step % a.every == 0 || step + 1 == a.steps))
            printf("step %5d  loss %.4f  avg %.4f  %.0f tok/s\n", step, last, avg,
                   (double)n * (step + 1) / t_total);
    }
    if (rank == 0) {
        double per = t_total / a.steps;
        printf("final: loss %.4f, mean of last %d steps %.4f (ln 256 = %.4f) on %d rank%s, "
               "%.1f ms/step, %.0f tokens/s, %.2f GFLOP/s\n",
               last, a.steps < window ? a.steps : window, avg, log(256.0), size,
               size == 1 ? "" : "s", 1e3 * per, (double)n / per,
               autopar_session_flops_per_step(sess) / per * 1e-9);
    }
    rc = 0;
    goto done;

fail:
    fprintf(stderr, "train_gpt: rank %d: error: %s\n", rank, autopar_last_error());
done:
    free(tokens);
    free(targets);
    free(text);
    autopar_session_free(sess);
    autopar_plan_free(plan);
    autopar_cluster_free(cl);
    autopar_graph_free(g);
    autopar_finalize();
    return rc;
}
