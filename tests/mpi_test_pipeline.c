/*
 * Pipeline (multi-stage) plans run by public sessions under mpirun with 2, 4 and 8 ranks
 * (1 rank: skipped, a pipeline needs two devices).
 *
 * Models (tests/session_cases.h): the MLP (batch 32, dim 16) with a pipeline boundary after each
 * dense layer (4 layers) and the small GPT (2 blocks, hidden 32, 4 heads, seq 8, vocab 64, batch
 * 8) with a boundary after each block; its LM head is tied to the token embedding, so the
 * embedding parameter crosses stages once per step and its gradient contribution comes back.
 * Each model is built at the micro-batch size and planned with B micro-batches (1 and 2) and
 * compared, after 3 steps on the global batch, with the single-device reference executor on the
 * model built at the GLOBAL batch: every loss, parameter and optimizer state within 1e-5
 * relative (AdamW parameter elements with small gradients: the widened tolerance of
 * session_cases.h). Each rank's measured peak memory within 10% of the prediction.
 * Plans, on W ranks:
 *  - 2 stages, manual, each on W/2 devices with the pass choosing each stage's logical mesh
 *    (W = 2: one device each; W = 4, 8: sharded stages), GPipe and 1F1B;
 *  - explicit sharded stages (W >= 4): stage 0 data-parallel (W/2 x 1), stage 1 tensor-parallel
 *    (1 x W/2), so every boundary tensor is resharded across meshes;
 *  - 4 stages (W >= 4): one layer per stage on W/4 devices each (the MLP, and a 4-block GPT
 *    with B = 2);
 *  - the automatic plan (stage DP) with 2 micro-batches (whatever it chooses).
 * Errors: a pipeline plan for another world size fails cleanly on every rank; a step whose
 * second micro-batch has a token id out of the vocabulary (the embedding on stage 0 fails in
 * the middle of the schedule) returns the same error on every rank of every stage, naming the
 * tensor, without hanging and without changing any parameter; the next good step succeeds.
 * Checkpoints: the GPT trained 2 steps under a 2-stage plan, saved, loaded into a session under
 * a one-stage data-parallel plan: every parameter and state bit-identical, next losses within
 * 1e-5.
 */
#include "autopar.h"
#include "test_util.h"
#include "models.h"

#include "session_cases.h"

static autopar_options g_opt;
static autopar_manual_stage g_stages[4];

/* Options for manual stages: n stages over the model's layers (n_layers split evenly), each on
 * (1, W/n) devices with logical mesh dp x mp (0, 0: the pass picks). */
static const autopar_options *manual(int n, int n_layers, int dp0, int mp0, int dp1, int mp1,
                                     int micro, autopar_schedule sched) {
    autopar_options_default(&g_opt);
    g_opt.stage_option = AUTOPAR_STAGE_MANUAL;
    g_opt.num_micro_batches = micro;
    g_opt.schedule = sched;
    g_opt.memory_budget = -1;
    int per = n_layers / n;
    for (int s = 0; s < n; s++) {
        autopar_manual_stage *m = &g_stages[s];
        m->first_layer = s * per;
        m->last_layer = s == n - 1 ? n_layers - 1 : (s + 1) * per - 1;
        m->submesh_hosts = 1;
        m->submesh_devices = g_size / n;
        m->mesh_dp = s == 0 ? dp0 : dp1;
        m->mesh_mp = s == 0 ? mp0 : mp1;
        m->force_batch_dim_to_axis0 = m->mesh_dp ? 0 : -1;
    }
    g_opt.num_manual_stages = n;
    g_opt.manual_stages = g_stages;
    return &g_opt;
}

static bool build_pair_layers(model *mm, model *m, bool gpt, bool sgd, int micro, int layers) {
    model cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gpt = gpt;
    cfg.gc = (gpt_config){layers, 32, 4, 8, 64, 8, 1};
    cfg.mc = (mlp_config){32, 16, 1};
    autopar_optimizer_kind ok = sgd ? AUTOPAR_OPT_SGD : AUTOPAR_OPT_ADAMW;
    if (!model_new_cfg(m, &cfg, ok)) return false;
    if (micro == 1) {
        *mm = *m;
        return true;
    }
    if (gpt) cfg.gc.batch /= micro;
    else cfg.mc.batch /= micro;
    if (!model_new_cfg(mm, &cfg, ok)) {
        autopar_graph_free(m->g);
        return false;
    }
    return true;
}

static bool build_pair(model *mm, model *m, bool gpt, bool sgd, int micro) {
    return build_pair_layers(mm, m, gpt, sgd, micro, 2);
}

static void free_pair(model *mm, model *m) {
    if (mm->g != m->g) autopar_graph_free(mm->g);
    autopar_graph_free(m->g);
}

static void pipeline_cases(bool gpt, bool sgd) {
    int n_layers = gpt ? 2 : 4;
    const char *name = gpt ? "gpt" : "mlp", *opt = sgd ? "sgd" : "adamw";
    char what[96];
    for (int micro = 1; micro <= 2; micro++) {
        model m, mm;
        if (!build_pair(&mm, &m, gpt, sgd, micro)) continue;
        for (int sc = 0; sc < 2; sc++) {
            autopar_schedule sched = sc ? AUTOPAR_SCHEDULE_1F1B : AUTOPAR_SCHEDULE_GPIPE;
            const char *sn = sc ? "1f1b" : "gpipe";
            snprintf(what, sizeof what, "%s %s 2 stages B%d %s", name, opt, micro, sn);
            run_case(&mm, &m, manual(2, n_layers, 0, 0, 0, 0, micro, sched), what, sgd);
            if (g_size >= 4) {
                snprintf(what, sizeof what, "%s %s dp|tp stages B%d %s", name, opt, micro, sn);
                run_case(&mm, &m, manual(2, n_layers, g_size / 2, 1, 1, g_size / 2, micro, sched),
                         what, sgd);
            }
            if (g_size >= 4 && !gpt) {
                snprintf(what, sizeof what, "%s %s 4 stages B%d %s", name, opt, micro, sn);
                run_case(&mm, &m, manual(4, n_layers, 0, 0, 0, 0, micro, sched), what, sgd);
            }
        }
        if (micro == 2 && gpt && g_size >= 4) {   /* a 4-block GPT on 4 stages */
            model m4, mm4;
            if (build_pair_layers(&mm4, &m4, true, sgd, micro, 4)) {
                for (int sc = 0; sc < 2; sc++) {
                    autopar_schedule sched = sc ? AUTOPAR_SCHEDULE_1F1B : AUTOPAR_SCHEDULE_GPIPE;
                    snprintf(what, sizeof what, "gpt4 %s 4 stages B%d %s", opt, micro,
                             sc ? "1f1b" : "gpipe");
                    run_case(&mm4, &m4, manual(4, 4, 0, 0, 0, 0, micro, sched), what, sgd);
                }
                free_pair(&mm4, &m4);
            }
        }
        if (micro == 2) {
            autopar_options_default(&g_opt);
            g_opt.num_micro_batches = micro;
            snprintf(what, sizeof what, "%s %s automatic B%d", name, opt, micro);
            run_case(&mm, &m, &g_opt, what, sgd);
        }
        free_pair(&mm, &m);
    }
}

/* A 2-stage plan made for twice the world: a clear error, the same on every rank. */
static void error_cases(void) {
    model m;
    memset(&m, 0, sizeof m);
    model cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.mc = (mlp_config){32, 16, 1};
    if (!model_new_cfg(&m, &cfg, AUTOPAR_OPT_ADAMW)) return;
    autopar_cluster *cl = NULL;
    autopar_plan *plan = NULL;
    autopar_session *s = NULL;
    int saved = g_size;
    g_size *= 2;   /* manual() sizes the stages from it */
    const autopar_options *o = manual(2, 4, 0, 0, 0, 0, 2, AUTOPAR_SCHEDULE_1F1B);
    g_size = saved;
    EXPECT_OK(autopar_cluster_preset("cpu", 1, 2 * g_size, &cl));
    EXPECT_OK(autopar_parallelize(m.g, cl, o, &plan));
    autopar_status st = autopar_session_new(plan, AUTOPAR_BACKEND_CPU, SEED, &s);
    EXPECT(st == AUTOPAR_ERR_INVALID_ARG && !s, "plan for %d devices on %d ranks: %s: %s",
           2 * g_size, g_size, autopar_status_str(st), autopar_last_error());
    if (test_rank == 0) printf("np %d 2-stage plan for %d devices: %s\n", g_size, 2 * g_size,
                               autopar_last_error());
    autopar_session_free(s);
    autopar_plan_free(plan);
    autopar_cluster_free(cl);
    autopar_graph_free(m.g);
}

/* A checkpoint saved under a 2-stage pipeline plan, loaded under a one-stage data-parallel
 * plan: every parameter and state bit-identical, the next losses equal within 1e-5. */
static void checkpoint_case(void) {
    model m, mm;
    if (!build_pair(&mm, &m, true, false, 2)) return;
    autopar_cluster *cl = NULL;
    autopar_plan *pa = NULL, *pb = NULL;
    EXPECT_OK(autopar_cluster_preset("cpu", 1, g_size, &cl));
    EXPECT_OK(autopar_parallelize(mm.g, cl, manual(2, 2, 0, 0, 0, 0, 2, AUTOPAR_SCHEDULE_1F1B),
                                  &pa));
    autopar_options_default(&g_opt);
    g_opt.method = AUTOPAR_METHOD_DATA_PARALLEL;
    g_opt.num_micro_batches = 2;
    EXPECT_OK(autopar_parallelize(mm.g, cl, &g_opt, &pb));
    checkpoint_round_trip(&m, pa, pb, "mpi_test_pipeline", "2-stage pipeline -> data-parallel");
    autopar_plan_free(pa);
    autopar_plan_free(pb);
    autopar_cluster_free(cl);
    free_pair(&mm, &m);
}

/* A failure inside a pipelined step. */
static void failing_step_case(void) {
    model m, mm;
    if (!build_pair(&mm, &m, true, false, 2)) return;
    autopar_cluster *cl = NULL;
    autopar_plan *plan = NULL;
    autopar_session *s = NULL;
    EXPECT_OK(autopar_cluster_preset("cpu", 1, g_size, &cl));
    EXPECT_OK(autopar_parallelize(mm.g, cl, manual(2, 2, 0, 0, 0, 0, 2, AUTOPAR_SCHEDULE_1F1B),
                                  &plan));
    if (plan) EXPECT_OK(autopar_session_new(plan, AUTOPAR_BACKEND_CPU, SEED, &s));
    int32_t *t = malloc((size_t)m.in_n[0] * 4), *y = malloc((size_t)m.in_n[1] * 4);
    int64_t nw = autopar_tensor_numel(autopar_graph_find(m.g, "wte"));
    float *w0 = malloc((size_t)nw * 4), *w1 = malloc((size_t)nw * 4);
    if (s && t && y && w0 && w1) {
        EXPECT_OK(autopar_session_read_param(s, "wte", w0, nw));
        model_batch(&m, 0, t, y);
        t[m.in_n[0] - 1] = (int32_t)m.gc.vocab + 5;   /* in the second micro-batch */
        EXPECT_OK(autopar_session_write_input(s, "tokens", t, m.in_n[0]));
        EXPECT_OK(autopar_session_write_input(s, "targets", y, m.in_n[1]));
        double loss = 0;
        autopar_status st = autopar_session_step(s, &loss);
        EXPECT(st != AUTOPAR_OK && strstr(autopar_last_error(), "out of range"),
               "bad token in a pipelined step: %s: %s", autopar_status_str(st),
               autopar_last_error());
        if (test_rank == 0) printf("np %d bad token in micro-batch 1: %s\n", g_size,
                                   autopar_last_error());
        EXPECT(autopar_session_steps(s) == 0, "failed step counted");
        EXPECT_OK(autopar_session_read_param(s, "wte", w1, nw));
        EXPECT(memcmp(w0, w1, (size_t)nw * 4) == 0, "a failed step changed 'wte'");
        model_batch(&m, 0, t, y);
        EXPECT_OK(autopar_session_write_input(s, "tokens", t, m.in_n[0]));
        EXPECT_OK(autopar_session_step(s, &loss));
        EXPECT(isfinite(loss) && loss > 0, "loss after recovery %g", loss);
    }
    free(t);
    free(y);
    free(w0);
    free(w1);
    autopar_session_free(s);
    autopar_plan_free(plan);
    autopar_cluster_free(cl);
    free_pair(&mm, &m);
}

int main(void) {
    if (autopar_world(&test_rank, &g_size)) {
        fprintf(stderr, "autopar_world: %s\n", autopar_last_error());
        return 1;
    }
    if (g_size < 2) {
        if (test_rank == 0) printf("pipelines need at least 2 ranks: skipped\n");
        autopar_finalize();
        return 77;
    }
    for (int gpt = 0; gpt < 2; gpt++)
        for (int sgd = 0; sgd < 2; sgd++) pipeline_cases(gpt, sgd);
    error_cases();
    failing_step_case();
    checkpoint_case();
    int failures = test_failures;
    if (test_rank == 0) printf("np %d: %s\n", g_size, failures ? "FAILED" : "ok");
    autopar_finalize();
    return failures ? 1 : 0;
}
