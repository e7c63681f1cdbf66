/*
 * Public sessions (include/autopar.h section 8) under mpirun with 1, 2, 4 and 8 ranks.
 *
 * For the MLP (examples/models.h; batch 32, dim 16) and a small GPT (2 layers, hidden 32,
 * 4 heads, seq 8, vocab 64, batch 8): autopar_parallelize on the "cpu" preset with one host of
 * world-size devices (MLP: the default automatic plan and a DATA_PARALLEL plan; GPT: a SHARD
 * plan, automatic sharding on one stage), a session, 3 steps
 * on the same batches as the single-device reference executor (autopar_executor_*, float32),
 * under AdamW and under SGD.
 * Tolerances: tests/session_cases.h (loss, parameters and states 1e-5 relative; AdamW-widened
 * for parameter elements with small gradients).
 * Gradient accumulation: the same models built at batch / 2 and planned with 2 micro-batches
 * (MLP: DATA_PARALLEL and SHARD; GPT: SHARD), fed the global batch, against the reference
 * executor on the model built at the FULL batch: the loss is a mean, so the full-batch gradient
 * is the mean of the micro-batch gradients and the same tolerances hold (only the float
 * summation order differs).
 * Checkpoints: the MLP trained 2 steps under the automatic plan, saved, loaded into a session
 * under a DATA_PARALLEL plan: every parameter and state bit-identical; the next step's losses
 * agree within 1e-5.
 * Error cases: a plan for another device count (a clear error naming both counts on every
 * rank, no hang); a plan file that does not parse on rank 0 (AUTOPAR_ERR_PARSE there, then
 * autopar_session_new fails on every rank naming rank 0, no hang); a batch of the wrong size
 * (AUTOPAR_ERR_SHAPE); an unknown input name
 * (AUTOPAR_ERR_NOT_FOUND). Pipelines (multi-stage plans): tests/mpi_test_pipeline.c.
 * Exit code non-zero on every rank when any check failed on that rank.
 */
#include "autopar.h"
#include "test_util.h"
#include "models.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "session_cases.h"

/* Options of a plan by method and micro-batch count (static: valid until the next call). */
static const autopar_options *method_opts(autopar_method method, int micro) {
    static autopar_options o;
    autopar_options_default(&o);
    o.method = method;
    o.num_micro_batches = micro;
    return &o;
}

static void error_cases(void) {
    model m;
    if (!model_new(&m, false, AUTOPAR_OPT_ADAMW)) return;
    autopar_cluster *cl = NULL;
    autopar_plan *plan = NULL;
    autopar_session *s = NULL;
    autopar_options o;
    autopar_options_default(&o);
    o.method = AUTOPAR_METHOD_DATA_PARALLEL;

    /* A plan for another device count: the same clear error on every rank. */
    int other = g_size == 4 ? 2 : 4;
    EXPECT_OK(autopar_cluster_preset("cpu", 1, other, &cl));
    EXPECT_OK(autopar_parallelize(m.g, cl, &o, &plan));
    autopar_status st = autopar_session_new(plan, AUTOPAR_BACKEND_CPU, SEED, &s);
    char want[64];
    snprintf(want, sizeof want, "mpirun -np %d", other);
    EXPECT(st == AUTOPAR_ERR_INVALID_ARG && !s && strstr(autopar_last_error(), want),
           "plan for %d devices on %d ranks: %s: %s", other, g_size, autopar_status_str(st),
           autopar_last_error());
    if (test_rank == 0) printf("np %d wrong world size: %s\n", g_size, autopar_last_error());
    autopar_session_free(s);
    s = NULL;
    autopar_plan_free(plan);
    plan = NULL;
    autopar_cluster_free(cl);
    cl = NULL;

    /* A plan file that does not parse, on rank 0 only (rank 0's plan is the one that runs;
     * the others have a good one): the parse error on rank 0, then the same error from
     * autopar_session_new on every rank, naming rank 0, instead of the others waiting. */
    EXPECT_OK(autopar_cluster_preset("cpu", 1, g_size, &cl));
    EXPECT_OK(autopar_parallelize(m.g, cl, &o, &plan));
    char path[64];
    snprintf(path, sizeof path, "/tmp/autopar_bad_plan_%d.json", test_rank);
    FILE *f = fopen(path, "w");
    if (f) {
        char *text = NULL;
        EXPECT_OK(autopar_plan_to_json(plan, &text));
        /* rank 0's file is cut in the middle */
        if (text) fwrite(text, 1, test_rank == 0 ? strlen(text) / 2 : strlen(text), f);
        free(text);
        fclose(f);
    }
    autopar_plan *loaded = NULL;
    st = autopar_plan_load(path, &loaded);
    if (test_rank == 0) {
        EXPECT(st == AUTOPAR_ERR_PARSE && !loaded, "truncated plan file: %s: %s",
               autopar_status_str(st), autopar_last_error());
        printf("np %d truncated plan file: %s\n", g_size, autopar_last_error());
    } else {
        EXPECT(st == AUTOPAR_OK, "good plan file: %s", autopar_last_error());
    }
    st = autopar_session_new(loaded, AUTOPAR_BACKEND_CPU, SEED, &s);
    EXPECT(st == AUTOPAR_ERR_INVALID_ARG && !s && strstr(autopar_last_error(), "rank 0") &&
               strstr(autopar_last_error(), "plan is NULL"),
           "session on a plan rank 0 could not load: %s: %s", autopar_status_str(st),
           autopar_last_error());
    if (test_rank == 0) printf("np %d session without rank 0's plan: %s\n", g_size,
                               autopar_last_error());
    autopar_session_free(s);
    s = NULL;
    autopar_plan_free(loaded);
    remove(path);

    /* A batch of the wrong size; an unknown input; a good step afterwards. */
    EXPECT_OK(autopar_session_new(plan, AUTOPAR_BACKEND_CPU, SEED, &s));
    float *x = malloc((size_t)m.in_n[0] * 4), *y = malloc((size_t)m.in_n[1] * 4);
    if (s && x && y) {
        model_batch(&m, 0, x, y);
        st = autopar_session_write_input(s, "x", x, m.in_n[0] - 16);
        EXPECT(st == AUTOPAR_ERR_SHAPE && strstr(autopar_last_error(), "'x'"),
               "short batch: %s: %s", autopar_status_str(st), autopar_last_error());
        if (test_rank == 0) printf("np %d short batch: %s\n", g_size, autopar_last_error());
        st = autopar_session_write_input(s, "nope", x, m.in_n[0]);
        EXPECT(st == AUTOPAR_ERR_NOT_FOUND, "unknown input: %s: %s", autopar_status_str(st),
               autopar_last_error());
        st = autopar_session_write_input(s, "w0", x, m.in_n[0]);
        EXPECT(st == AUTOPAR_ERR_INVALID_ARG, "param as input: %s: %s", autopar_status_str(st),
               autopar_last_error());
        EXPECT_OK(autopar_session_write_input(s, "x", x, m.in_n[0]));
        EXPECT_OK(autopar_session_write_input(s, "y", y, m.in_n[1]));
        double loss = 0;
        EXPECT_OK(autopar_session_step(s, &loss));
        EXPECT(loss > 0 && isfinite(loss), "loss %g", loss);
    }
    free(x);
    free(y);
    autopar_session_free(s);
    s = NULL;
    autopar_plan_free(plan);
    plan = NULL;

    autopar_cluster_free(cl);
    autopar_graph_free(m.g);
}

static void checkpoint_case(void) {
    model m;
    if (!model_new(&m, false, AUTOPAR_OPT_ADAMW)) return;
    autopar_cluster *cl = NULL;
    autopar_plan *pa = NULL, *pb = NULL;
    autopar_options o;
    autopar_options_default(&o);
    EXPECT_OK(autopar_cluster_preset("cpu", 1, g_size, &cl));
    EXPECT_OK(autopar_parallelize(m.g, cl, &o, &pa));
    o.method = AUTOPAR_METHOD_DATA_PARALLEL;
    EXPECT_OK(autopar_parallelize(m.g, cl, &o, &pb));
    checkpoint_round_trip(&m, pa, pb, "mpi_test_session", "auto -> data-parallel");
    autopar_plan_free(pa);
    autopar_plan_free(pb);
    autopar_cluster_free(cl);
    autopar_graph_free(m.g);
}

int main(void) {
    if (autopar_world(&test_rank, &g_size)) {
        fprintf(stderr, "autopar_world: %s\n", autopar_last_error());
        return 1;
    }
    for (int gpt = 0; gpt < 2; gpt++) {
        for (int sgd = 0; sgd < 2; sgd++) {
            model m;
            if (!model_new(&m, gpt, sgd ? AUTOPAR_OPT_SGD : AUTOPAR_OPT_ADAMW)) continue;
            char what[64];
            /* GPT: METHOD_SHARD (one stage, automatic sharding); its automatic pipeline plans
             * are run by tests/mpi_test_pipeline.c. */
            snprintf(what, sizeof what, "%s %s %s", gpt ? "gpt" : "mlp", sgd ? "sgd" : "adamw",
                     gpt ? "shard" : "auto");
            run_case(&m, &m, method_opts(gpt ? AUTOPAR_METHOD_SHARD : AUTOPAR_METHOD_PIPESHARD,
                                         1), what, sgd);
            if (!gpt) {
                snprintf(what, sizeof what, "mlp %s data-parallel", sgd ? "sgd" : "adamw");
                run_case(&m, &m, method_opts(AUTOPAR_METHOD_DATA_PARALLEL, 1), what, sgd);
            }
            /* Gradient accumulation: the plan for the micro-batch graph (batch / MICRO) with
             * MICRO micro-batches against the reference on the whole global batch. */
            model mm;
            if (micro_model(&mm, &m, sgd)) {
                snprintf(what, sizeof what, "%s %s %s x%d micro", gpt ? "gpt" : "mlp",
                         sgd ? "sgd" : "adamw", gpt ? "shard" : "data-parallel", MICRO);
                run_case(&mm, &m,
                         method_opts(gpt ? AUTOPAR_METHOD_SHARD : AUTOPAR_METHOD_DATA_PARALLEL,
                                     MICRO), what, sgd);
                if (!gpt) {
                    snprintf(what, sizeof what, "mlp %s shard x%d micro", sgd ? "sgd" : "adamw",
                             MICRO);
                    run_case(&mm, &m, method_opts(AUTOPAR_METHOD_SHARD, MICRO), what, sgd);
                }
                autopar_graph_free(mm.g);
            }
            autopar_graph_free(m.g);
        }
    }
    checkpoint_case();
    error_cases();
    int failures = test_failures;
    if (test_rank == 0) printf("np %d: %s\n", g_size, failures ? "FAILED" : "ok");
    autopar_finalize();
    return failures ? 1 : 0;
}
