/*
 * Public sessions (include/autopar.h section 8) under mpirun with 1, 2, 4 and 8 ranks.
 *
 * For the MLP (examples/models.h; batch 32, dim 16) and a small GPT (2 layers, hidden 32,
 * 4 heads, seq 8, vocab 64, batch 8): autopar_parallelize on the "cpu" preset with one host of
 * world-size devices (MLP: the default automatic plan and a DATA_PARALLEL plan; GPT: a SHARD
 * plan, automatic sharding on one stage), a session, 3 steps
 * on the same batches as the single-device reference executor (autopar_executor_*, float32),
 * under AdamW and under SGD.
 * Tolerances (see tests/mpi_test_spmd.c for the reasoning):
 *  - loss of every step: relative error <= 1e-5;
 *  - every parameter and optimizer state after 3 steps: SGD, max-norm relative error <= 1e-5;
 *    AdamW, |a - b| <= 2 lr per step (AdamW turns float32 summation-order noise in gradients
 *    that are ~0 into moves of up to lr, so exact agreement cannot hold).
 * Gradient accumulation: the same models built at batch / 2 and planned with 2 micro-batches
 * (MLP: DATA_PARALLEL and SHARD; GPT: SHARD), fed the global batch, against the reference
 * executor on the model built at the FULL batch: the loss is a mean, so the full-batch gradient
 * is the mean of the micro-batch gradients and the same tolerances hold (only the float
 * summation order differs).
 * Checkpoints: the MLP trained 2 steps under the automatic plan, saved, loaded into a session
 * under a DATA_PARALLEL plan: every parameter and state bit-identical; the next step's losses
 * agree within 1e-5.
 * Error cases: a plan for another device count (a clear error naming both counts on every
 * rank, no hang); a batch of the wrong size (AUTOPAR_ERR_SHAPE); an unknown input name
 * (AUTOPAR_ERR_NOT_FOUND); a multi-stage plan (AUTOPAR_ERR_UNSUPPORTED, while unsupported).
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

#define N_STEPS 3
#define SEED 1234
#define TOL 1e-5
#define LR 1e-3
#define MICRO 2   /* micro-batches of the gradient-accumulation cases */

static int g_size;


typedef struct model {
    bool           gpt;
    mlp_config     mc;
    gpt_config     gc;
    autopar_graph *g;
    const char    *in_name[2];
    int64_t        in_n[2];
    float          lr;
} model;

/* Builds the model described by cfg's gpt flag and configuration (gc or mc). */
static bool model_new_cfg(model *m, const model *cfg, autopar_optimizer_kind ok) {
    memset(m, 0, sizeof *m);
    bool gpt = cfg->gpt;
    m->gpt = gpt;
    autopar_tensor *loss = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    o.kind = ok;
    o.lr = ok == AUTOPAR_OPT_SGD ? 0.05f : (float)LR;
    m->lr = o.lr;
    if (autopar_graph_new(&m->g)) return false;
    autopar_status st;
    if (gpt) {
        m->gc = cfg->gc;
        st = model_gpt_build(m->g, &m->gc, &loss);
    } else {
        m->mc = cfg->mc;
        st = model_mlp_build(m->g, &m->mc, &loss);
    }
    if (!st) st = autopar_build_training(m->g, loss, &o);
    if (st) {
        test_fail_at(__LINE__, "model build: %s", autopar_last_error());
        autopar_graph_free(m->g);
        m->g = NULL;
        return false;
    }
    m->in_name[0] = gpt ? "tokens" : "x";
    m->in_name[1] = gpt ? "targets" : "y";
    for (int i = 0; i < 2; i++)
        m->in_n[i] = autopar_tensor_numel(autopar_graph_find(m->g, m->in_name[i]));
    return true;
}

static bool model_new(model *m, bool gpt, autopar_optimizer_kind ok) {
    model cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gpt = gpt;
    cfg.gc = (gpt_config){2, 32, 4, 8, 64, 8, 0};
    cfg.mc = (mlp_config){32, 16, 0};
    return model_new_cfg(m, &cfg, ok);
}

static void model_batch(const model *m, int64_t s, void *a, void *b) {
    if (!m->gpt) {
        model_mlp_batch(&m->mc, 7, 11, s, a, b);
        return;
    }
    int32_t *t = a, *y = b;
    uint64_t x = 0x9E3779B97F4A7C15ull * (uint64_t)(s + 1);
    for (int64_t i = 0; i < m->in_n[0]; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        t[i] = (int32_t)((x >> 33) % (uint64_t)m->gc.vocab);
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        y[i] = (int32_t)((x >> 33) % (uint64_t)m->gc.vocab);
    }
}

static bool is_state(const autopar_tensor *t) {
    autopar_kind k = autopar_tensor_kind(t);
    return k == AUTOPAR_KIND_PARAM || k == AUTOPAR_KIND_OPT_STATE;
}

/* m: the model the plan is made for (the micro-batch graph); rm: the reference model, the same
 * model at the global batch (micro x m's batch; rm == m when micro == 1). */
static void run_case(const model *m, const model *rm, int micro, const char *what,
                     autopar_method method, bool sgd) {
    autopar_cluster *cl = NULL;
    autopar_plan *plan = NULL;
    autopar_session *s = NULL;
    int nn = autopar_graph_size(rm->g);
    float **ref = calloc((size_t)nn, sizeof *ref);
    void *a = malloc((size_t)rm->in_n[0] * 4), *b = malloc((size_t)rm->in_n[1] * 4);
    double ref_loss[N_STEPS], worst_loss = 0, worst = 0;
    char worst_name[AUTOPAR_MAX_NAME] = "";
    if (!ref || !a || !b) {
        test_fail_at(__LINE__, "out of memory");
        goto done;
    }
    /* reference */
    autopar_executor *ex = NULL;
    EXPECT_OK(autopar_executor_new(rm->g, SEED, AUTOPAR_PRECISION_F32, &ex));
    for (int st = 0; ex && st < N_STEPS; st++) {
        model_batch(rm, st, a, b);
        EXPECT_OK(autopar_executor_write(ex, autopar_graph_find(rm->g, rm->in_name[0]), a,
                                         rm->in_n[0]));
        EXPECT_OK(autopar_executor_write(ex, autopar_graph_find(rm->g, rm->in_name[1]), b,
                                         rm->in_n[1]));
        EXPECT_OK(autopar_executor_step(ex, &ref_loss[st]));
    }
    for (int id = 0; ex && id < nn; id++) {
        const autopar_tensor *t = autopar_graph_tensor(rm->g, id);
        if (!is_state(t)) continue;
        ref[id] = malloc((size_t)autopar_tensor_numel(t) * sizeof(float));
        if (ref[id]) EXPECT_OK(autopar_executor_read(ex, t, ref[id], autopar_tensor_numel(t)));
    }
    autopar_executor_free(ex);

    /* plan + session */
    EXPECT_OK(autopar_cluster_preset("cpu", 1, g_size, &cl));
    autopar_options o;
    autopar_options_default(&o);
    o.method = method;
    o.num_micro_batches = micro;
    EXPECT_OK(autopar_parallelize(m->g, cl, &o, &plan));
    if (!plan) goto done;
    autopar_status st0 = autopar_session_new(plan, AUTOPAR_BACKEND_CPU, SEED, &s);
    EXPECT(st0 == AUTOPAR_OK, "%s: autopar_session_new -> %s: %s", what,
           autopar_status_str(st0), autopar_last_error());
    for (int st = 0; s && st < N_STEPS; st++) {
        model_batch(rm, st, a, b);   /* the global batch: micro micro-batches stacked */
        EXPECT_OK(autopar_session_write_input(s, m->in_name[0], a, rm->in_n[0]));
        EXPECT_OK(autopar_session_write_input(s, m->in_name[1], b, rm->in_n[1]));
        double loss = NAN;
        EXPECT_OK(autopar_session_step(s, &loss));
        double e = fabs(loss - ref_loss[st]) / fabs(ref_loss[st]);
        if (!(e <= TOL)) e = isnan(e) ? INFINITY : e;
        if (e > worst_loss) worst_loss = e;
        EXPECT(e <= TOL, "%s: step %d loss %.9g, reference %.9g (rel err %.3g)", what, st + 1,
               loss, ref_loss[st], e);
    }
    if (s) EXPECT(autopar_session_steps(s) == N_STEPS, "%s: steps %lld", what,
                  (long long)autopar_session_steps(s));
    for (int id = 0; s && id < nn; id++) {
        if (!ref[id]) continue;
        const autopar_tensor *t = autopar_graph_tensor(rm->g, id);
        int64_t n = autopar_tensor_numel(t);
        float *got = malloc((size_t)n * sizeof *got);
        if (!got) continue;
        EXPECT_OK(autopar_session_read_param(s, autopar_tensor_name(t), got, n));
        double num = 0, den = 0;
        for (int64_t i = 0; i < n; i++) {
            double d = fabs((double)got[i] - (double)ref[id][i]);
            if (d > num || d != d) num = d;
            if (fabs((double)ref[id][i]) > den) den = fabs((double)ref[id][i]);
        }
        double rel = den > 0 ? num / den : num;
        if (isnan(rel)) rel = num = INFINITY;
        if (rel > worst) {
            worst = rel;
            snprintf(worst_name, sizeof worst_name, "%s", autopar_tensor_name(t));
        }
        if (sgd)
            EXPECT(rel <= TOL, "%s: '%s' after %d steps: rel err %.3g", what,
                   autopar_tensor_name(t), N_STEPS, rel);
        else
            EXPECT(num <= 2.0 * m->lr * N_STEPS, "%s: '%s' after %d steps: abs err %.3g beyond "
                   "the AdamW drift bound", what, autopar_tensor_name(t), N_STEPS, num);
        free(got);
    }
    if (test_rank == 0)
        printf("np %d %-34s stages %d: loss rel err <= %.1e, params+states max rel err %.1e "
               "('%s')\n", g_size, what, autopar_plan_num_stages(plan), worst_loss, worst,
               worst_name);
done:
    autopar_session_free(s);
    autopar_plan_free(plan);
    autopar_cluster_free(cl);
    for (int id = 0; ref && id < nn; id++) free(ref[id]);
    free(ref);
    free(a);
    free(b);
}

/* The model m at batch m's / MICRO (the micro-batch graph of a step on m's batch). */
static bool micro_model(model *mm, const model *m, bool sgd) {
    model tmp = *m;
    if (m->gpt) tmp.gc.batch /= MICRO;
    else tmp.mc.batch /= MICRO;
    return model_new_cfg(mm, &tmp, sgd ? AUTOPAR_OPT_SGD : AUTOPAR_OPT_ADAMW);
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

    /* A batch of the wrong size; an unknown input; a good step afterwards. */
    EXPECT_OK(autopar_cluster_preset("cpu", 1, g_size, &cl));
    EXPECT_OK(autopar_parallelize(m.g, cl, &o, &plan));
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

    /* A multi-stage plan (manual: two stages of one layer each on halves of the cluster). */
    if (g_size >= 2) {
        model mm;
        if (model_new(&mm, true, AUTOPAR_OPT_ADAMW)) {
            autopar_options po;
            autopar_options_default(&po);
            po.num_layers = 2;
            po.stage_option = AUTOPAR_STAGE_MANUAL;
            autopar_manual_stage ms[2] = {{0, 0, 1, g_size / 2, 0, 0, -1},
                                          {1, 1, 1, g_size / 2, 0, 0, -1}};
            po.num_manual_stages = 2;
            po.manual_stages = ms;
            autopar_status ps = autopar_parallelize(mm.g, cl, &po, &plan);
            EXPECT(ps == AUTOPAR_OK, "manual 2-stage plan: %s", autopar_last_error());
            if (plan) {
                st = autopar_session_new(plan, AUTOPAR_BACKEND_CPU, SEED, &s);
                EXPECT((st == AUTOPAR_OK && s) || (st == AUTOPAR_ERR_UNSUPPORTED && !s),
                       "2-stage plan: %s: %s", autopar_status_str(st), autopar_last_error());
                if (test_rank == 0) printf("np %d 2-stage plan: %s\n", g_size,
                                        st ? autopar_last_error() : "accepted");
            }
            autopar_session_free(s);
            autopar_plan_free(plan);
            autopar_graph_free(mm.g);
        }
    }
    autopar_cluster_free(cl);
    autopar_graph_free(m.g);
}

static void checkpoint_case(void) {
    model m;
    if (!model_new(&m, false, AUTOPAR_OPT_ADAMW)) return;
    char path[128];
    snprintf(path, sizeof path, "mpi_test_session_np%d.ckpt", g_size);
    autopar_cluster *cl = NULL;
    autopar_plan *pa = NULL, *pb = NULL;
    autopar_session *sa = NULL, *sb = NULL;
    autopar_options o;
    autopar_options_default(&o);
    EXPECT_OK(autopar_cluster_preset("cpu", 1, g_size, &cl));
    EXPECT_OK(autopar_parallelize(m.g, cl, &o, &pa));
    o.method = AUTOPAR_METHOD_DATA_PARALLEL;
    EXPECT_OK(autopar_parallelize(m.g, cl, &o, &pb));
    float *x = malloc((size_t)m.in_n[0] * 4), *y = malloc((size_t)m.in_n[1] * 4);
    if (pa && pb && x && y) {
        EXPECT_OK(autopar_session_new(pa, AUTOPAR_BACKEND_CPU, SEED, &sa));
        EXPECT_OK(autopar_session_new(pb, AUTOPAR_BACKEND_CPU, SEED + 1, &sb));
    }
    if (sa && sb) {
        double la = 0, lb = 0;
        for (int st = 0; st < 2; st++) {
            model_batch(&m, st, x, y);
            EXPECT_OK(autopar_session_write_input(sa, "x", x, m.in_n[0]));
            EXPECT_OK(autopar_session_write_input(sa, "y", y, m.in_n[1]));
            EXPECT_OK(autopar_session_step(sa, &la));
        }
        EXPECT_OK(autopar_session_save(sa, path));
        EXPECT_OK(autopar_session_load(sb, path));
        EXPECT(autopar_session_steps(sb) == 2, "loaded steps %lld",
               (long long)autopar_session_steps(sb));
        int mismatched = 0;
        for (int id = 0; id < autopar_graph_size(m.g); id++) {
            const autopar_tensor *t = autopar_graph_tensor(m.g, id);
            if (!is_state(t)) continue;
            int64_t n = autopar_tensor_numel(t);
            float *a = malloc((size_t)n * 4), *b = malloc((size_t)n * 4);
            if (a && b) {
                EXPECT_OK(autopar_session_read_param(sa, autopar_tensor_name(t), a, n));
                EXPECT_OK(autopar_session_read_param(sb, autopar_tensor_name(t), b, n));
                if (memcmp(a, b, (size_t)n * 4) != 0) {
                    mismatched++;
                    test_fail_at(__LINE__, "checkpoint: '%s' differs after load",
                            autopar_tensor_name(t));
                }
            }
            free(a);
            free(b);
        }
        model_batch(&m, 2, x, y);
        EXPECT_OK(autopar_session_write_input(sa, "x", x, m.in_n[0]));
        EXPECT_OK(autopar_session_write_input(sa, "y", y, m.in_n[1]));
        EXPECT_OK(autopar_session_write_input(sb, "x", x, m.in_n[0]));
        EXPECT_OK(autopar_session_write_input(sb, "y", y, m.in_n[1]));
        EXPECT_OK(autopar_session_step(sa, &la));
        EXPECT_OK(autopar_session_step(sb, &lb));
        EXPECT(fabs(la - lb) <= TOL * fabs(la), "checkpoint: next loss %.9g vs %.9g", la, lb);
        /* a file that is not a checkpoint */
        autopar_status st = autopar_session_load(sb, "/nonexistent/autopar.ckpt");
        EXPECT(st == AUTOPAR_ERR_IO, "missing checkpoint: %s", autopar_status_str(st));
        if (test_rank == 0)
            printf("np %d checkpoint auto -> data-parallel: %d tensors differ, next loss %.9g vs "
                   "%.9g\n", g_size, mismatched, la, lb);
        if (test_rank == 0) remove(path);
    }
    free(x);
    free(y);
    autopar_session_free(sa);
    autopar_session_free(sb);
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
            /* The GPT's automatic plan on 8 devices has 2 pipeline stages, which sessions do
             * not run yet: it is planned with METHOD_SHARD (one stage, automatic sharding). */
            snprintf(what, sizeof what, "%s %s %s", gpt ? "gpt" : "mlp", sgd ? "sgd" : "adamw",
                     gpt ? "shard" : "auto");
            run_case(&m, &m, 1, what, gpt ? AUTOPAR_METHOD_SHARD : AUTOPAR_METHOD_PIPESHARD,
                     sgd);
            if (!gpt) {
                snprintf(what, sizeof what, "mlp %s data-parallel", sgd ? "sgd" : "adamw");
                run_case(&m, &m, 1, what, AUTOPAR_METHOD_DATA_PARALLEL, sgd);
            }
            /* Gradient accumulation: the plan for the micro-batch graph (batch / MICRO) with
             * MICRO micro-batches against the reference on the whole global batch. */
            model mm;
            if (micro_model(&mm, &m, sgd)) {
                snprintf(what, sizeof what, "%s %s %s x%d micro", gpt ? "gpt" : "mlp",
                         sgd ? "sgd" : "adamw", gpt ? "shard" : "data-parallel", MICRO);
                run_case(&mm, &m, MICRO, what,
                         gpt ? AUTOPAR_METHOD_SHARD : AUTOPAR_METHOD_DATA_PARALLEL, sgd);
                if (!gpt) {
                    snprintf(what, sizeof what, "mlp %s shard x%d micro", sgd ? "sgd" : "adamw",
                             MICRO);
                    run_case(&mm, &m, MICRO, what, AUTOPAR_METHOD_SHARD, sgd);
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
