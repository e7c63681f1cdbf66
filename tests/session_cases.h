/*
 * Shared by the MPI session tests (mpi_test_session.c, mpi_test_pipeline.c): the MLP and small
 * GPT test models, their deterministic batches, and run_case, which trains a model under a plan
 * through public sessions and compares every step's loss and the final parameters and optimizer
 * states with the single-device reference executor.
 * Tolerances:
 *  - loss of every step: relative error <= 1e-5;
 *  - every parameter and optimizer state after 3 steps: max-norm relative error <= 1e-5 per
 *    tensor; under AdamW, a parameter element's tolerance is widened by the float32 error that
 *    AdamW's per-element normalisation propagates into it (adam_widen_step in test_util.h:
 *    about lr * 1e-5 * G / sqrt(v^) per step, G the tensor's largest gradient), so elements
 *    whose gradients are far below the tensor's largest, or rounding noise, are held to what
 *    float32 can promise; how many elements got over 10x the base tolerance is printed.
 * Include once per test program, after test_util.h and models.h.
 */
#ifndef AUTOPAR_SESSION_CASES_H
#define AUTOPAR_SESSION_CASES_H

#include <cjson/cJSON.h>
#include <math.h>
#include <mpi.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_STEPS 3
#define SEED 1234
#define TOL 1e-5
#define LR 1e-3
#define MICRO 2   /* micro-batches of the gradient-accumulation cases */

static int g_size;   /* world size */

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

__attribute__((unused)) static bool model_new(model *m, bool gpt, autopar_optimizer_kind ok) {
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
    test_gpt_batch(m->gc.vocab, m->in_n[0], s, a, b);
}

static bool is_state(const autopar_tensor *t) {
    autopar_kind k = autopar_tensor_kind(t);
    return k == AUTOPAR_KIND_PARAM || k == AUTOPAR_KIND_OPT_STATE;
}

/* Compares every parameter and optimizer state of two sessions on the same graph g, bit for
 * bit; each difference is a test failure naming the tensor. Returns how many differ. */
__attribute__((unused)) static int states_differ(autopar_session *sa, autopar_session *sb,
                                                 const autopar_graph *g) {
    int differ = 0;
    for (int id = 0; id < autopar_graph_size(g); id++) {
        const autopar_tensor *t = autopar_graph_tensor(g, id);
        if (!is_state(t)) continue;
        int64_t n = autopar_tensor_numel(t);
        float *a = malloc((size_t)n * 4), *b = malloc((size_t)n * 4);
        if (a && b) {
            EXPECT_OK(autopar_session_read_param(sa, autopar_tensor_name(t), a, n));
            EXPECT_OK(autopar_session_read_param(sb, autopar_tensor_name(t), b, n));
            if (memcmp(a, b, (size_t)n * 4) != 0) {
                differ++;
                test_fail_at(__LINE__, "checkpoint: '%s' differs after load",
                             autopar_tensor_name(t));
            }
        }
        free(a);
        free(b);
    }
    return differ;
}

/* The backend run_case's sessions use: AUTOPAR_TEST_BACKEND=cuda or auto (scripts/gpu-check.sh
 * runs the session test so on one GPU), the CPU backend otherwise. */
static autopar_backend_kind test_backend_kind(void) {
    const char *e = getenv("AUTOPAR_TEST_BACKEND");
    if (e && !strcmp(e, "cuda")) return AUTOPAR_BACKEND_CUDA;
    if (e && !strcmp(e, "auto")) return AUTOPAR_BACKEND_AUTO;
    return AUTOPAR_BACKEND_CPU;
}

/* Checkpoints across plans: trains 2 steps under plan pa, saves to "<test>_np<N>.ckpt", loads
 * the file into a session of plan pb (another seed), and checks the loaded step count, every
 * parameter and optimizer state bit for bit, the next step's losses within TOL, and that a
 * missing file is an IO error. m: the model whose batches both plans take (its graph names the
 * states); what: printed with the result. */
__attribute__((unused)) static void checkpoint_round_trip(const model *m, autopar_plan *pa,
                                                          autopar_plan *pb, const char *test,
                                                          const char *what) {
    char path[128];
    snprintf(path, sizeof path, "%s_np%d.ckpt", test, g_size);
    autopar_session *sa = NULL, *sb = NULL;
    if (pa && pb) {
        EXPECT_OK(autopar_session_new(pa, test_backend_kind(), SEED, &sa));
        EXPECT_OK(autopar_session_new(pb, test_backend_kind(), SEED + 1, &sb));
    }
    void *a = malloc((size_t)m->in_n[0] * 4), *b = malloc((size_t)m->in_n[1] * 4);
    autopar_session *both[2] = {sa, sb};
    if (sa && sb && a && b) {
        double loss[2] = {0, 0};
        for (int st = 0; st < 2; st++) {
            model_batch(m, st, a, b);
            EXPECT_OK(autopar_session_write_input(sa, m->in_name[0], a, m->in_n[0]));
            EXPECT_OK(autopar_session_write_input(sa, m->in_name[1], b, m->in_n[1]));
            EXPECT_OK(autopar_session_step(sa, &loss[0]));
        }
        EXPECT_OK(autopar_session_save(sa, path));
        EXPECT_OK(autopar_session_load(sb, path));
        EXPECT(autopar_session_steps(sb) == 2, "loaded steps %lld",
               (long long)autopar_session_steps(sb));
        int differ = states_differ(sa, sb, m->g);
        model_batch(m, 2, a, b);
        for (int k = 0; k < 2; k++) {
            EXPECT_OK(autopar_session_write_input(both[k], m->in_name[0], a, m->in_n[0]));
            EXPECT_OK(autopar_session_write_input(both[k], m->in_name[1], b, m->in_n[1]));
            EXPECT_OK(autopar_session_step(both[k], &loss[k]));
        }
        EXPECT(fabs(loss[0] - loss[1]) <= TOL * fabs(loss[0]), "checkpoint: next loss %.9g vs "
               "%.9g", loss[0], loss[1]);
        autopar_status st = autopar_session_load(sb, "/nonexistent/autopar.ckpt");
        EXPECT(st == AUTOPAR_ERR_IO, "missing checkpoint: %s", autopar_status_str(st));
        if (test_rank == 0) {
            printf("np %d checkpoint %s: %d tensors differ, next loss %.9g vs %.9g\n", g_size,
                   what, differ, loss[0], loss[1]);
            remove(path);
        }
    }
    free(a);
    free(b);
    autopar_session_free(sa);
    autopar_session_free(sb);
}

/* Payload bytes the plan's cross-stage transfers carry per step when every receiving tile
 * crosses between the meshes exactly once: each transfer's tensor once (the distinct tiles of
 * a spec partition it), parameters and other leaves once per step, activations and gradients
 * once per micro-batch. */
static double transfer_bytes_once(const autopar_plan *plan) {
    const autopar_graph *g = autopar_plan_graph(plan);
    char *text = NULL;
    double bytes = 0;
    EXPECT_OK(autopar_plan_to_json(plan, &text));
    cJSON *root = text ? cJSON_Parse(text) : NULL;
    const cJSON *tr = cJSON_GetObjectItemCaseSensitive(root, "transfers"), *x = NULL;
    cJSON_ArrayForEach(x, tr) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(x, "tensor");
        const autopar_tensor *t = cJSON_IsNumber(id) ? autopar_graph_tensor(g, id->valueint) : NULL;
        if (!t) {
            test_fail_at(__LINE__, "plan JSON: a transfer without a valid tensor id");
            continue;
        }
        autopar_kind k = autopar_tensor_kind(t);
        bool leaf = k == AUTOPAR_KIND_PARAM || k == AUTOPAR_KIND_OPT_STATE ||
                    k == AUTOPAR_KIND_CONSTANT;
        bytes += 4.0 * (double)autopar_tensor_numel(t) *
                 (leaf ? 1 : autopar_plan_num_micro_batches(plan));
    }
    cJSON_Delete(root);
    free(text);
    return bytes;
}

/* Trains m for N_STEPS under a plan made with options opt on the "cpu" preset of one host with
 * g_size devices, and compares losses, parameters and optimizer states with the single-device
 * reference executor on rm (tolerances at the top of this file).
 * m: the model the plan is made for (the micro-batch graph); rm: the reference model, the same
 * model at the global batch (B x m's batch for B = opt->num_micro_batches; rm == m when B = 1). */
static void run_case(const model *m, const model *rm, const autopar_options *opt,
                     const char *what, bool sgd) {
    autopar_cluster *cl = NULL;
    autopar_plan *plan = NULL;
    autopar_session *s = NULL;
    int nn = autopar_graph_size(rm->g);
    float **ref = calloc((size_t)nn, sizeof *ref);
    double **widen = calloc((size_t)nn, sizeof *widen);
    void *a = malloc((size_t)rm->in_n[0] * 4), *b = malloc((size_t)rm->in_n[1] * 4);
    double ref_loss[N_STEPS], worst_loss = 0, worst = 0;
    char worst_name[AUTOPAR_MAX_NAME] = "";
    if (!ref || !widen || !a || !b) {
        test_fail_at(__LINE__, "out of memory");
        goto done;
    }
    /* reference; under AdamW also each parameter's widened tolerance (adam_widen_step in
     * test_util.h) */
    autopar_executor *ex = NULL;
    EXPECT_OK(autopar_executor_new(rm->g, SEED, AUTOPAR_PRECISION_F32, &ex));
    for (int id = 0; ex && !sgd && id < nn; id++) {
        const autopar_tensor *t = autopar_graph_tensor(rm->g, id);
        if (autopar_tensor_kind(t) != AUTOPAR_KIND_PARAM) continue;
        if (!(widen[id] = calloc((size_t)autopar_tensor_numel(t), sizeof(double))))
            test_fail_at(__LINE__, "out of memory");
    }
    for (int st = 0; ex && st < N_STEPS; st++) {
        model_batch(rm, st, a, b);
        EXPECT_OK(autopar_executor_write(ex, autopar_graph_find(rm->g, rm->in_name[0]), a,
                                         rm->in_n[0]));
        EXPECT_OK(autopar_executor_write(ex, autopar_graph_find(rm->g, rm->in_name[1]), b,
                                         rm->in_n[1]));
        EXPECT_OK(autopar_executor_step(ex, &ref_loss[st]));
        if (!sgd) adam_widen_graph(rm->g, ex, st + 1, m->lr, widen);
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
    EXPECT_OK(autopar_parallelize(m->g, cl, opt, &plan));
    if (!plan) goto done;
    autopar_status st0 = autopar_session_new(plan, test_backend_kind(), SEED, &s);
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
    int64_t n_widened = 0, n_param = 0;
    for (int id = 0; s && id < nn; id++) {
        if (!ref[id]) continue;
        const autopar_tensor *t = autopar_graph_tensor(rm->g, id);
        int64_t n = autopar_tensor_numel(t);
        float *got = malloc((size_t)n * sizeof *got);
        if (!got) continue;
        EXPECT_OK(autopar_session_read_param(s, autopar_tensor_name(t), got, n));
        state_error e;
        compare_state(got, ref[id], widen[id], n, &e);
        n_widened += e.n_widened;
        if (autopar_tensor_kind(t) == AUTOPAR_KIND_PARAM) n_param += n;
        if (e.rel > worst) {
            worst = e.rel;
            snprintf(worst_name, sizeof worst_name, "%s", autopar_tensor_name(t));
        }
        EXPECT(e.rel <= TOL, "%s: '%s' after %d steps: rel err %.3g%s", what,
               autopar_tensor_name(t), N_STEPS, e.rel,
               widen[id] ? " (AdamW-widened, see test_util.h)" : "");
        free(got);
    }
    /* memory: the runtime's measured peak within 10% of the lowering's prediction */
    autopar_session_stats ss;
    memset(&ss, 0, sizeof ss);
    if (s) EXPECT_OK(autopar_session_stats_get(s, &ss));
    EXPECT(!s || (ss.measured_peak_bytes >= ss.predicted_peak_bytes &&
                  ss.measured_peak_bytes <= 1.10 * ss.predicted_peak_bytes),
           "%s: measured peak %.0f bytes, predicted %.0f", what, ss.measured_peak_bytes,
           ss.predicted_peak_bytes);
    /* cross-stage traffic: each receiving tile fetched once (replicas all-gather inside
     * their mesh), so all ranks together send each transfer's tensor exactly once */
    double sent[2] = {ss.cross_stage_bytes, ss.replica_gather_bytes}, total[2] = {0, 0};
    MPI_Allreduce(sent, total, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    double want = plan ? transfer_bytes_once(plan) : 0;
    EXPECT(!s || total[0] == want, "%s: the ranks send %.0f bytes per step to other stages, "
           "the transfers' tensors once are %.0f", what, total[0], want);
    if (test_rank == 0 && total[0] > 0)
        printf("np %d %-36s cross-stage %.0f B/step (= the transfers once), all-gathers among "
               "receiving replicas %.0f B/step\n", g_size, what, total[0], total[1]);
    if (test_rank == 0)
        printf("np %d %-36s stages %d: loss rel err <= %.1e, params+states max rel err %.1e "
               "('%s'; %lld of %lld parameter elements with tolerance > 10x); rank 0 peak %.0f B "
               "measured / %.0f predicted\n", g_size, what, autopar_plan_num_stages(plan),
               worst_loss, worst, worst_name, (long long)n_widened, (long long)n_param,
               ss.measured_peak_bytes, ss.predicted_peak_bytes);
done:
    autopar_session_free(s);
    autopar_plan_free(plan);
    autopar_cluster_free(cl);
    for (int id = 0; id < nn; id++) {
        if (ref) free(ref[id]);
        if (widen) free(widen[id]);
    }
    free(ref);
    free(widen);
    free(a);
    free(b);
}

/* The model m at batch m's / MICRO (the micro-batch graph of a step on m's batch). */
__attribute__((unused)) static bool micro_model(model *mm, const model *m, bool sgd) {
    model tmp = *m;
    if (m->gpt) tmp.gc.batch /= MICRO;
    else tmp.mc.batch /= MICRO;
    return model_new_cfg(mm, &tmp, sgd ? AUTOPAR_OPT_SGD : AUTOPAR_OPT_ADAMW);
}

#endif
