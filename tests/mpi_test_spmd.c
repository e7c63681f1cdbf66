/*
 * SPMD execution of sharded plans (runtime/spmd.h) under mpirun with 1, 2, 4 and 8 ranks.
 *
 * For every mesh that fits the rank count (np 1: (1,1); 2: (2,1), (1,2); 4: (4,1), (1,4), (2,2);
 * 8: (8,1), (2,4), (4,2)) and every plan kind, the plan comes from the sharding pass
 * (ap_shard_stage, solved on rank 0 and broadcast as JSON):
 *   dp    communication-only objective, the batch forced onto the mesh's non-trivial axis
 *         (force_batch_dim_to_mesh_axis: that axis may then only carry all-reduces, so the
 *         parameters stay replicated): pure data parallelism;
 *   tp    communication-only, small batch / wide layers on a 1-D mesh: Megatron column/row
 *         alternation (MLP); the pass's operator-parallel plan (GPT);
 *   2d    on 2-D meshes: communication-only, batch forced onto axis 0, tensor parallelism on
 *         axis 1;
 *   mixed on 2-D meshes (MLP): flattened-mesh strategies (S01 specs, whole-mesh collectives);
 *   zero  weight-update sharding allowed (prefer_reduce_scatter) with compute + communication
 *         costs: gradients reduce-scattered, AdamW on shards, parameters all-gathered (where
 *         the pass picks it; MLP with batch 512); these cases also read parameters back
 *         through backend memory, the path device communicators take;
 *   auto  the plain automatic plan (default options, compute + communication costs on the
 *         "cpu" cluster preset).
 * for the MLP (examples/models.h, dims divisible by 8) and a small GPT (2 layers, hidden 32,
 * 4 heads, seq 8, vocab 64, batch 8), each trained 3 AdamW steps on the same batches as the
 * single-device reference executor (autopar_executor_*, float32).
 *
 * Every case runs twice: in float32 (the configuration the project cares about) and in float64
 * (both the reference and the SPMD run; the CPU kernels are the same code in both precisions,
 * so the runtime's layout logic under test is identical).
 * Tolerances:
 *  - the loss of every step, float32: relative error <= 1e-5 (observed <= ~1e-7);
 *  - float64: losses, and every parameter and optimizer state after 3 steps, <= 1e-6 max-norm
 *    relative error (max |a - b| / max |b| per tensor; both sides are read back as float, so
 *    1 ulp of float is the floor; observed ~1e-12);
 *  - float32 parameters and states after 3 steps: <= 1e-5 max-norm relative error per tensor;
 *    under AdamW a parameter element's tolerance is widened by the rounding error AdamW's
 *    per-element normalisation propagates into it (adam_widen_step in test_util.h): its
 *    update m/(sqrt(v) + eps) is ~lr * sign(g) whatever |g|, so a gradient error that is tiny
 *    next to the tensor's largest gradient (the SPMD run sums in another order than the
 *    single device: per shard, then across ranks) is large next to an element with a small
 *    gradient, or with a gradient that is zero mathematically (the attention key bias: softmax
 *    ignores a constant added to a row), and moves it by up to lr per step. The number of
 *    elements whose tolerance grew over 10x is printed. With SGD (environment variable
 *    SPMD_TEST_SGD=1) no widening applies. The float64 runs, with 1e9 times less summation
 *    noise, show that nothing but rounding separates the runs.
 * Memory: every rank's predicted peak (memory plan, before running) and measured peak (the
 * runtime's allocations) are printed; they must agree within 10%.
 *
 * Error cases: a mesh whose device count differs from the world size (a clear error on every
 * rank, no hang); a batch of the wrong size (AUTOPAR_ERR_SHAPE everywhere); an out-of-range
 * token in one part of the batch, so that only some ranks' kernels fail: every rank returns the
 * same error naming the failing rank, no parameter changes, and the next good step works.
 *
 * A failing check prints "rank R: FAIL ..." and the run goes on (every rank still runs every
 * collective); the exit code is non-zero on every rank when any rank failed.
 */
#include "backend.h"
#include "comm.h"
#include "mesh.h"
#include "models.h"
#include "sharding.h"
#include "spmd.h"
#include "test_util.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef N_STEPS
#define N_STEPS 3
#endif
#define SEED 1234
#define TOL 1e-5          /* float32 losses                                                */
#define TOL_F64 1e-6      /* float64 runs, compared after rounding both sides to float      */
#define ADAM_LR 1e-3      /* autopar_optimizer_default's                                    */
#define MEM_TOL 0.10

static int g_size;
static ap_comm *g_world;
static ap_backend *g_backend;


/* ------------------------------------------------------------------------------------------ */
/* Models and batches                                                                          */
/* ------------------------------------------------------------------------------------------ */

enum { MODEL_MLP = 0, MODEL_GPT, MODEL_MISC, MODEL_COUNT };
static const char *model_names[MODEL_COUNT] = {"mlp", "gpt", "misc"};

typedef struct model {
    int             kind;
    bool            gpt;
    mlp_config      mc;
    gpt_config      gc;
    autopar_graph  *g;
    autopar_tensor *in[2];      /* x, y  or  tokens, targets                                  */
    int64_t         in_n[2];
    bool            adamw;      /* the optimizer (SGD with SPMD_TEST_SGD=1)                  */
} model;

/* A small model over the ops the MLP and the GPT do not use the same way: slices of a wide
 * activation, softmax times layernorm, concat, reshape + permute, a mean over a minor axis, a
 * squared error averaged with mean_all.
 *   h = gelu(x w + b)  [B, 2D];  s = softmax(h[:, :D]) * layernorm(h[:, D:])
 *   r = mean(permute(reshape(concat(s, x), [B, 2, D]), [0, 2, 1]), axis 2)
 *   loss = mean_all((r - y) * (r - y))
 * The backward broadcasts with EXPAND twice: the scalar seed over [B, D] (mean_all) and the
 * [B, D] gradient over the inserted axis of the mean; the plans split those results (the
 * batch forced onto a mesh axis needs it) and every device fills its own tile. */
static autopar_status misc_build(autopar_graph *g, int64_t B, int64_t D, autopar_tensor **loss) {
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){B, D}, 0);
    autopar_tensor *y = autopar_input(g, "y", AUTOPAR_F32, 2, (int64_t[]){B, D}, 0);
    autopar_tensor *w = autopar_param(g, "w", 2, (int64_t[]){D, 2 * D}, AUTOPAR_INIT_NORMAL, 0);
    autopar_tensor *b = autopar_param(g, "b", 1, (int64_t[]){2 * D}, AUTOPAR_INIT_UNIFORM, 0.1f);
    autopar_tensor *lg = autopar_param(g, "ln.g", 1, (int64_t[]){D}, AUTOPAR_INIT_ONES, 0);
    autopar_tensor *lb = autopar_param(g, "ln.b", 1, (int64_t[]){D}, AUTOPAR_INIT_ZEROS, 0);
    autopar_tensor *h = autopar_gelu(g, autopar_add(g, autopar_matmul(g, x, w), b));
    autopar_tensor *sm = autopar_softmax(g, autopar_slice(g, h, 1, 0, D), 0);
    autopar_tensor *ln = autopar_layernorm(g, autopar_slice(g, h, 1, D, D), lg, lb, 1e-5f);
    autopar_tensor *cat[2] = {autopar_mul(g, sm, ln), x};
    autopar_tensor *t = autopar_concat(g, 2, cat, 1);
    t = autopar_reshape(g, t, 3, (int64_t[]){B, 2, D});
    t = autopar_permute(g, t, (int[]){0, 2, 1});
    autopar_tensor *r = autopar_mean(g, t, 2);
    autopar_tensor *d = autopar_sub(g, r, y);
    *loss = autopar_mean_all(g, autopar_mul(g, d, d));
    return autopar_graph_status(g);
}

static bool model_new(model *m, int kind, int64_t batch, int64_t dim) {
    memset(m, 0, sizeof *m);
    m->kind = kind;
    m->gpt = kind == MODEL_GPT;
    autopar_tensor *loss = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);   /* AdamW */
    if (getenv("SPMD_TEST_SGD")) o.kind = AUTOPAR_OPT_SGD;
    m->adamw = o.kind == AUTOPAR_OPT_ADAMW;
    if (autopar_graph_new(&m->g)) return false;
    autopar_status st;
    if (kind == MODEL_GPT) {
        m->gc = (gpt_config){2, 32, 4, 8, 64, 8, 0};
        st = model_gpt_build(m->g, &m->gc, &loss);
    } else if (kind == MODEL_MLP) {
        m->mc = (mlp_config){batch, dim, 0};
        st = model_mlp_build(m->g, &m->mc, &loss);
    } else {
        m->mc = (mlp_config){batch, dim, 0};   /* batch shapes as the MLP's */
        st = misc_build(m->g, batch, dim, &loss);
    }
    if (!st) st = autopar_build_training(m->g, loss, &o);
    if (st) {
        test_fail_at(__LINE__, "model build: %s", autopar_last_error());
        autopar_graph_free(m->g);
        return false;
    }
    m->in[0] = autopar_graph_find(m->g, m->gpt ? "tokens" : "x");
    m->in[1] = autopar_graph_find(m->g, m->gpt ? "targets" : "y");
    for (int i = 0; i < 2; i++) m->in_n[i] = autopar_tensor_numel(m->in[i]);
    return true;
}

static void model_free(model *m) { autopar_graph_free(m->g); }

/* The global batch of step s (the same on every rank). */
static void model_batch(const model *m, int64_t s, void *a, void *b) {
    if (!m->gpt) {
        model_mlp_batch(&m->mc, 7, 11, s, a, b);
        return;
    }
    test_gpt_batch(m->gc.vocab, m->in_n[0], s, a, b);
}

/* ------------------------------------------------------------------------------------------ */
/* Plans                                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Rank 0 solves; the plan travels as JSON so that every rank runs exactly the same plan. */
static ap_status plan_get(const model *m, const ap_mesh *mesh, const ap_shard_options *opt,
                          const autopar_cluster *cl, ap_shard_plan **out) {
    *out = NULL;
    char *json = NULL;
    ap_status st = AUTOPAR_OK;
    if (test_rank == 0) {
        ap_shard_plan *p = NULL;
        st = ap_shard_stage(m->g, NULL, 0, mesh, cl, opt, &p);
        if (!st) st = ap_shard_plan_to_json(p, m->g, &json);
        ap_shard_plan_free(p);
    }
    if ((st = ap_comm_bcast_error(g_world, 0, st))) return st;
    int64_t len = test_rank == 0 ? (int64_t)strlen(json) + 1 : 0;
    if ((st = ap_comm_broadcast(g_world, &len, sizeof len, AP_COMM_U8, 0))) return st;
    if (test_rank != 0) {
        json = malloc((size_t)len);
        if (!json) st = ap_error(AUTOPAR_ERR_NOMEM, "plan_get: out of memory");
    }
    if ((st = ap_comm_all_ok(g_world, st))) {
        free(json);
        return st;
    }
    st = ap_comm_broadcast(g_world, json, (size_t)len, AP_COMM_U8, 0);
    if (!st) st = ap_shard_plan_from_json(json, m->g, out);
    free(json);
    return ap_comm_all_ok(g_world, st);
}

/* "dp", "tp", "2d" or "replicated" from the parameter and input specs, with "+zero" when some
 * optimizer state is split further than its parameter (weight-update sharding). */
static const char *plan_kind(const model *m, const ap_shard_plan *p) {
    static char buf[32];
    bool batch_split = false, param_split = false, zero = false;
    for (int id = 0; id < p->n_nodes; id++) {
        const ap_node *n = (const ap_node *)autopar_graph_tensor(m->g, id);
        const ap_spec *s = &p->node[id].spec;
        int parts = 0;
        for (int d = 0; d < s->ndim; d++) parts += s->dim[d] != AP_DIM_R;
        if (n->op == AP_OP_INPUT) batch_split |= parts > 0;
        if (n->op == AP_OP_PARAM) param_split |= parts > 0;
        if (n->op == AP_OP_OPT_STATE) {
            const ap_spec *ps = &p->node[n->attrs.i[0]].spec;
            zero |= !ap_spec_equal(s, ps);
        }
    }
    snprintf(buf, sizeof buf, "%s%s",
             batch_split && param_split ? "2d" : batch_split ? "dp"
             : param_split ? "tp" : "replicated", zero ? "+zero" : "");
    return buf;
}

/* ------------------------------------------------------------------------------------------ */
/* One case: 3 steps against the reference                                                     */
/* ------------------------------------------------------------------------------------------ */

static void run_case(const char *model_name, const char *want_kind, const model *m,
                     const ap_mesh *mesh, const ap_shard_plan *plan, autopar_precision prec,
                     bool device_reads) {
    double t0 = (double)clock() / CLOCKS_PER_SEC;
    const char *pn = prec == AUTOPAR_PRECISION_F64 ? "f64" : "f32";
    size_t bytes0 = (size_t)(m->in_n[0] > m->in_n[1] ? m->in_n[0] : m->in_n[1]) * 4;
    void *a = malloc(bytes0), *b = malloc(bytes0);
    int nn = autopar_graph_size(m->g);
    float **ref = calloc((size_t)nn, sizeof *ref);
    double **widen = calloc((size_t)nn, sizeof *widen);
    double ref_loss[N_STEPS] = {0}, loss_err[N_STEPS] = {0}, worst = -1;
    int64_t n_widened = 0;
    char worst_name[AUTOPAR_MAX_NAME] = "";
    double tol = prec == AUTOPAR_PRECISION_F64 ? TOL_F64 : TOL;
    if (!a || !b || !ref || !widen) {
        test_fail_at(__LINE__, "out of memory");
        free(a);
        free(b);
        free(ref);
        free(widen);
        return;
    }

    /* The single-device reference (every rank runs it; it is small). */
    autopar_executor *ex = NULL;
    EXPECT_OK(autopar_executor_new(m->g, SEED, prec, &ex));
    /* float32 under AdamW: each parameter's widened tolerance (adam_widen_step in
     * test_util.h) */
    bool widened = prec == AUTOPAR_PRECISION_F32 && m->adamw;
    for (int id = 0; ex && widened && id < nn; id++) {
        const ap_node *n = (const ap_node *)autopar_graph_tensor(m->g, id);
        if (n->op == AP_OP_PARAM &&
            !(widen[id] = calloc((size_t)ap_shape_numel(&n->shape), sizeof(double))))
            test_fail_at(__LINE__, "out of memory");
    }
    for (int s = 0; ex && s < N_STEPS; s++) {
        model_batch(m, s, a, b);
        EXPECT_OK(autopar_executor_write(ex, m->in[0], a, m->in_n[0]));
        EXPECT_OK(autopar_executor_write(ex, m->in[1], b, m->in_n[1]));
        EXPECT_OK(autopar_executor_step(ex, &ref_loss[s]));
        if (widened) adam_widen_graph(m->g, ex, s + 1, ADAM_LR, widen);
    }
    for (int id = 0; ex && id < nn; id++) {
        const autopar_tensor *t = autopar_graph_tensor(m->g, id);
        const ap_node *n = (const ap_node *)t;
        if (n->op != AP_OP_PARAM && n->op != AP_OP_OPT_STATE) continue;
        ref[id] = malloc((size_t)autopar_tensor_numel(t) * sizeof(float));
        if (ref[id]) EXPECT_OK(autopar_executor_read(ex, t, ref[id], autopar_tensor_numel(t)));
    }
    autopar_executor_free(ex);

    /* The SPMD run. */
    ap_spmd_options o;
    ap_spmd_options_default(&o);
    o.seed = SEED;
    o.precision = prec;
    o.device_reads = device_reads;
    o.deterministic = getenv("SPMD_TEST_DETERMINISTIC") != NULL;   /* rank-order sums */
    ap_spmd *sp = NULL;
    ap_status st = ap_spmd_new(m->g, plan, mesh, g_backend, g_world, &o, &sp);
    EXPECT(st == AUTOPAR_OK, "%s %s %s on %dx%d: ap_spmd_new -> %s: %s", model_name, want_kind,
           pn, mesh->shape[0], mesh->shape[1], autopar_status_str(st), autopar_last_error());
    for (int s = 0; sp && s < N_STEPS; s++) {
        model_batch(m, s, a, b);
        EXPECT_OK(ap_spmd_set_input(sp, m->in[0], a, m->in_n[0]));
        EXPECT_OK(ap_spmd_set_input(sp, m->in[1], b, m->in_n[1]));
        double loss = NAN;
        EXPECT_OK(ap_spmd_step(sp, &loss));
        loss_err[s] = fabs(loss - ref_loss[s]) / fabs(ref_loss[s]);
        if (isnan(loss_err[s])) loss_err[s] = INFINITY;
        EXPECT(loss_err[s] <= tol, "%s %s %s on %dx%d: step %d loss %.9g, reference %.9g (rel "
               "err %.3g)", model_name, want_kind, pn, mesh->shape[0], mesh->shape[1], s + 1, loss,
               ref_loss[s], loss_err[s]);
    }
    for (int id = 0; sp && id < nn; id++) {
        if (!ref[id]) continue;
        const autopar_tensor *t = autopar_graph_tensor(m->g, id);
        int64_t n = autopar_tensor_numel(t);
        float *got = malloc((size_t)n * sizeof *got);
        if (!got) continue;
        EXPECT_OK(ap_spmd_read(sp, t, got, n));
        state_error se;
        compare_state(got, ref[id], widen[id], n, &se);
        double e = se.rel;
        n_widened += se.n_widened;
        if (e > worst) {
            worst = e;
            snprintf(worst_name, sizeof worst_name, "%s", autopar_tensor_name(t));
        }
        EXPECT(e <= tol, "%s %s %s on %dx%d: '%s' after %d steps: rel err %.3g", model_name,
               want_kind, pn, mesh->shape[0], mesh->shape[1], autopar_tensor_name(t), N_STEPS, e);
        free(got);
    }

    /* Memory per rank: predicted (plan) vs measured (allocator), printed by rank 0. */
    ap_spmd_stats stt;
    ap_spmd_get_stats(sp, &stt);
    if (sp) {
        double pm = fabs((double)stt.measured_peak - (double)stt.predicted_peak);
        EXPECT(pm <= MEM_TOL * (double)stt.predicted_peak,
               "%s %s %s on %dx%d: predicted peak %zu bytes, measured %zu (%.1f%% apart)",
               model_name, want_kind, pn, mesh->shape[0], mesh->shape[1], stt.predicted_peak,
               stt.measured_peak, 100.0 * pm / (double)stt.predicted_peak);
    }
    double mine[4] = {(double)stt.predicted_peak, (double)stt.measured_peak,
                      (double)stt.n_collectives, (double)stt.n_deviations};
    double *all = calloc((size_t)g_size * 4, sizeof *all);
    if (all) EXPECT_OK(ap_comm_all_gather(g_world, mine, all, 4, AP_COMM_F64));
    double secs = (double)clock() / CLOCKS_PER_SEC - t0;
    if (test_rank == 0 && all) {
        printf("%-4s %-5s %s (%s) mesh %dx%d: loss rel err", model_name, want_kind, pn,
               plan_kind(m, plan), mesh->shape[0], mesh->shape[1]);
        for (int s = 0; s < N_STEPS; s++) printf(" %.1e", loss_err[s]);
        printf("; params+states max rel err %.1e ('%s'; %lld elements with tolerance > 10x); "
               "%d coll/step, %d deviations, %.2f s cpu\n", worst, worst_name,
               (long long)n_widened, (int)all[2], (int)all[3], secs);
        printf("     peak bytes per rank, predicted/measured:");
        for (int k = 0; k < g_size; k++) printf(" %.0f/%.0f", all[4 * k], all[4 * k + 1]);
        printf("  (sharding pass estimate %.0f)\n", stt.plan_peak);
        fflush(stdout);
    }
    if (getenv("SPMD_TEST_VERBOSE") && sp && test_rank == 0) ap_spmd_print(sp, stdout);
    free(all);
    ap_spmd_free(sp);
    for (int id = 0; id < nn; id++) {
        free(ref[id]);
        free(widen[id]);
    }
    free(ref);
    free(widen);
    free(a);
    free(b);
}

/* ------------------------------------------------------------------------------------------ */
/* Cases                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static void solve_and_run(const char *model_name, const char *kind, const model *m,
                          const ap_mesh *mesh, const ap_shard_options *opt,
                          const autopar_cluster *cl) {
    ap_shard_plan *plan = NULL;
    ap_status st = plan_get(m, mesh, opt, cl, &plan);
    EXPECT(st == AUTOPAR_OK, "%s %s on %dx%d: plan: %s", model_name, kind, mesh->shape[0],
           mesh->shape[1], autopar_last_error());
    /* ZeRO cases also read back through backend memory (the path device communicators use) */
    bool dev = strcmp(kind, "zero") == 0;
    if (!st) {
        run_case(model_name, kind, m, mesh, plan, AUTOPAR_PRECISION_F32, dev);
        run_case(model_name, kind, m, mesh, plan, AUTOPAR_PRECISION_F64, dev);
    }
    ap_shard_plan_free(plan);
}

/* A random layout for a tensor: each mesh axis of size > 1 splits a random dim that it divides
 * (both axes on one dim give S01), leaves a pending sum (F32 tensors only), or is unused. */
static ap_spec random_spec(const ap_mesh *mesh, const ap_node *n, uint64_t *rng) {
    ap_spec s = ap_spec_replicated(n->shape.ndim);
    for (int a = 0; a < 2; a++) {
        if (mesh->shape[a] == 1) continue;
        *rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
        int pick = (int)((*rng >> 33) % (uint64_t)(n->shape.ndim + 2));
        if (pick == n->shape.ndim) {
            if (n->dtype == AUTOPAR_F32) s.partial |= (uint8_t)(1u << a);
            continue;
        }
        if (pick > n->shape.ndim) continue;
        uint8_t cur = s.dim[pick];
        uint8_t next = cur == AP_DIM_R ? (a == 0 ? AP_DIM_S0 : AP_DIM_S1)
                       : cur == AP_DIM_S0 && a == 1 ? AP_DIM_S01 : AP_DIM_SPEC_COUNT;
        if (next == AP_DIM_SPEC_COUNT) continue;
        ap_spec t = s;
        t.dim[pick] = next;
        if (n->shape.dim[pick] % ap_spec_dim_parts(mesh, &t, pick) == 0) s = t;
    }
    return s;
}

/* The plan of solve_and_run with every layout replaced by a random one: every output spec and
 * every operand spec, and no listed collectives. Whatever the specs, the runtime must compute
 * the same training step (it reshards between whatever layouts it is given), so this covers
 * routes that real plans rarely take: pending sums on leaves and between ops, S01, all-to-alls,
 * reduce-scatters onto any dim, kernels fed layouts they cannot use. Same seed on every rank. */
static void random_case(const char *model_name, const model *m, const ap_mesh *mesh,
                        uint64_t seed) {
    ap_shard_options o;
    ap_shard_options_default(&o);
    o.communication_only = true;
    ap_shard_plan *plan = NULL;
    ap_status st = plan_get(m, mesh, &o, NULL, &plan);
    EXPECT(st == AUTOPAR_OK, "%s random on %dx%d: plan: %s", model_name, mesh->shape[0],
           mesh->shape[1], autopar_last_error());
    if (st) return;
    uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 1;
    for (int id = 0; id < plan->n_nodes; id++) {
        const ap_node *n = (const ap_node *)autopar_graph_tensor(m->g, id);
        plan->node[id].spec = random_spec(mesh, n, &rng);
        for (int k = 0; k < n->n_src; k++) {
            plan->node[id].in[k] =
                random_spec(mesh, (const ap_node *)autopar_graph_tensor(m->g, n->src[k]), &rng);
            plan->node[id].in[k].partial = 0;
        }
    }
    for (int id = 0; id < plan->n_nodes; id++) {   /* updates land in their leaf's layout */
        const ap_node *n = (const ap_node *)autopar_graph_tensor(m->g, id);
        if (n->assign_to >= 0) plan->node[id].spec = plan->node[n->assign_to].spec;
    }
    plan->n_coll = 0;
    run_case(model_name, "random", m, mesh, plan, AUTOPAR_PRECISION_F64, seed % 2 == 0);
    ap_shard_plan_free(plan);
}

static void mesh_cases(int n0, int n1, const autopar_cluster *cl) {
    const double alpha[2] = {1e-6, 1e-6}, beta[2] = {1e-9, 1e-9};
    ap_mesh *mesh = NULL;
    if (ap_mesh_new_custom(n0, n1, alpha, beta, &mesh)) {
        test_fail_at(__LINE__, "mesh: %s", autopar_last_error());
        return;
    }
    bool two_d = n0 > 1 && n1 > 1, one = n0 * n1 == 1;
    int big = n0 > 1 ? 0 : 1;
    ap_shard_options base;
    ap_shard_options_default(&base);
    for (int kind = 0; kind < MODEL_COUNT; kind++) {
        const char *mn = model_names[kind];
        bool gpt = kind == MODEL_GPT, misc = kind == MODEL_MISC;
        model m;
        /* dp: large batch, narrow layers, batch forced onto the non-trivial axis */
        if (!two_d && !one && model_new(&m, kind, 64, 8)) {
            ap_shard_options o = base;
            o.communication_only = !misc;
            o.force_batch_dim_to_mesh_axis = big;
            solve_and_run(mn, "dp", &m, mesh, &o, misc ? cl : NULL);
            model_free(&m);
        }
        /* tp: small batch, wide layers */
        if (!two_d && !one && model_new(&m, kind, 8, 64)) {
            ap_shard_options o = base;
            o.communication_only = true;
            solve_and_run(mn, "tp", &m, mesh, &o, NULL);
            model_free(&m);
        }
        /* 2d: batch on axis 0, tensor parallelism on axis 1 */
        if (two_d && model_new(&m, kind, 64, 32)) {
            ap_shard_options o = base;
            o.communication_only = !misc;
            o.force_batch_dim_to_mesh_axis = 0;
            solve_and_run(mn, "2d", &m, mesh, &o, misc ? cl : NULL);
            model_free(&m);
        }
        /* mixed: flattened-mesh strategies */
        if (two_d && !gpt && model_new(&m, kind, 64, 8)) {
            ap_shard_options o = base;
            o.communication_only = true;
            o.allow_mixed_mesh = true;
            solve_and_run(mn, "mixed", &m, mesh, &o, NULL);
            model_free(&m);
        }
        /* zero: weight-update sharding allowed (reduce-scatter gradients, sharded AdamW,
         * all-gather the new parameters), compute + communication costs */
        if (!one && !misc && model_new(&m, kind, 512, 16)) {
            ap_shard_options o = base;
            o.prefer_reduce_scatter = true;
            solve_and_run(mn, "zero", &m, mesh, &o, cl);
            model_free(&m);
        }
        /* auto: the plain automatic plan */
        if (model_new(&m, kind, 32, 16)) {
            solve_and_run(mn, "auto", &m, mesh, &base, cl);
            model_free(&m);
        }
        /* random layouts (float64: exact comparison); the seed differs per mesh and model */
        if (!one && model_new(&m, kind, 32, 16)) {
            random_case(mn, &m, mesh, (uint64_t)(10 * n0 + n1 + 100 * kind));
            model_free(&m);
        }
    }
    ap_mesh_free(mesh);
}

/* ------------------------------------------------------------------------------------------ */
/* Error cases                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static void error_cases(const autopar_cluster *cl) {
    const double alpha[2] = {1e-6, 1e-6}, beta[2] = {1e-9, 1e-9};
    model m;
    if (!model_new(&m, MODEL_GPT, 8, 8)) return;

    /* A mesh with one device more than there are ranks: every rank fails alike. */
    ap_mesh *wrong = NULL, *mesh = NULL;
    EXPECT_OK(ap_mesh_new_custom(g_size + 1, 1, alpha, beta, &wrong));
    ap_shard_options o;
    ap_shard_options_default(&o);
    ap_shard_plan *plan = NULL;
    if (wrong) {
        ap_status st = plan_get(&m, wrong, &o, cl, &plan);
        EXPECT(st == AUTOPAR_OK, "plan for the wrong mesh: %s", autopar_last_error());
        ap_spmd *sp = NULL;
        if (plan) {
            st = ap_spmd_new(m.g, plan, wrong, g_backend, g_world, NULL, &sp);
            EXPECT(st == AUTOPAR_ERR_INVALID_ARG && sp == NULL &&
                       strstr(autopar_last_error(), "ranks") != NULL,
                   "wrong world size: got %s: %s", autopar_status_str(st), autopar_last_error());
            if (test_rank == 0) printf("error case, mesh of %d devices on %d ranks: %s\n",
                                    g_size + 1, g_size, autopar_last_error());
            ap_spmd_free(sp);
        }
        ap_shard_plan_free(plan);
        plan = NULL;
    }

    /* A batch of the wrong size; a bad token on part of the batch (DP over all ranks). */
    EXPECT_OK(ap_mesh_new_custom(g_size, 1, alpha, beta, &mesh));
    o.communication_only = true;
    o.force_batch_dim_to_mesh_axis = g_size > 1 ? 0 : -1;
    if (mesh && !plan_get(&m, mesh, &o, NULL, &plan)) {
        ap_spmd *sp = NULL;
        ap_spmd_options so;
        ap_spmd_options_default(&so);
        so.seed = SEED;
        EXPECT_OK(ap_spmd_new(m.g, plan, mesh, g_backend, g_world, &so, &sp));
        int32_t *t = malloc((size_t)m.in_n[0] * 4), *y = malloc((size_t)m.in_n[1] * 4);
        int64_t pn = autopar_tensor_numel(autopar_graph_find(m.g, "wte"));
        float *before = malloc((size_t)pn * 4), *after = malloc((size_t)pn * 4);
        if (sp && t && y && before && after) {
            model_batch(&m, 0, t, y);
            ap_status st = ap_spmd_set_input(sp, m.in[0], t, m.in_n[0] - 1);
            EXPECT(st == AUTOPAR_ERR_SHAPE, "short batch: got %s: %s", autopar_status_str(st),
                   autopar_last_error());
            if (test_rank == 0) printf("error case, short batch: %s\n", autopar_last_error());

            EXPECT_OK(ap_spmd_read(sp, autopar_graph_find(m.g, "wte"), before, pn));
            t[m.in_n[0] - 1] = (int32_t)m.gc.vocab;   /* last row: the last rank's shard */
            EXPECT_OK(ap_spmd_set_input(sp, m.in[0], t, m.in_n[0]));
            EXPECT_OK(ap_spmd_set_input(sp, m.in[1], y, m.in_n[1]));
            double loss = 0;
            st = ap_spmd_step(sp, &loss);
            char want[32];
            snprintf(want, sizeof want, "rank %d:", g_size - 1);
            EXPECT(st == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), want) &&
                       strstr(autopar_last_error(), "out of range"),
                   "bad token: got %s: %s", autopar_status_str(st), autopar_last_error());
            if (test_rank == 0) printf("error case, bad token on rank %d's shard: %s\n", g_size - 1,
                                    autopar_last_error());
            EXPECT(ap_spmd_steps(sp) == 0, "a failed step counted");
            EXPECT_OK(ap_spmd_read(sp, autopar_graph_find(m.g, "wte"), after, pn));
            EXPECT(memcmp(before, after, (size_t)pn * 4) == 0,
                   "a failed step changed a parameter");
            model_batch(&m, 0, t, y);
            EXPECT_OK(ap_spmd_set_input(sp, m.in[0], t, m.in_n[0]));
            EXPECT_OK(ap_spmd_step(sp, &loss));
            EXPECT(ap_spmd_steps(sp) == 1 && isfinite(loss), "good step after a failed one");
        }
        free(t);
        free(y);
        free(before);
        free(after);
        ap_spmd_free(sp);
    }
    ap_shard_plan_free(plan);
    ap_mesh_free(wrong);
    ap_mesh_free(mesh);
    model_free(&m);
}

int main(void) {
    ap_status st = ap_comm_world(&g_world);
    if (st) {
        fprintf(stderr, "ap_comm_world: %s\n", autopar_last_error());
        return 1;
    }
    test_rank = ap_comm_rank(g_world);
    g_size = ap_comm_size(g_world);
    if (ap_backend_new(AP_BACKEND_CPU, 0, &g_backend)) {
        fprintf(stderr, "backend: %s\n", autopar_last_error());
        ap_comm_free(g_world);
        return 1;
    }
    autopar_cluster *cl = NULL;
    EXPECT_OK(autopar_cluster_preset("cpu", 1, g_size, &cl));

    static const int meshes[][2] = {{1, 1}, {2, 1}, {1, 2}, {4, 1}, {1, 4}, {2, 2},
                                    {8, 1}, {2, 4}, {4, 2}};
    const char *only = getenv("SPMD_TEST_MESH");   /* e.g. "2x2": run one mesh only */
    for (size_t i = 0; i < sizeof meshes / sizeof meshes[0]; i++) {
        if (meshes[i][0] * meshes[i][1] != g_size) continue;
        char name[16];
        snprintf(name, sizeof name, "%dx%d", meshes[i][0], meshes[i][1]);
        if (only && strcmp(only, name) != 0) continue;
        mesh_cases(meshes[i][0], meshes[i][1], cl);
    }
    error_cases(cl);

    int total = 0;
    if (ap_comm_all_reduce(g_world, &test_failures, &total, 1, AP_COMM_I32, AP_COMM_SUM))
        total = test_failures + 1;
    if (test_rank == 0) printf("%s: %d failure(s) over %d rank(s)\n", total ? "FAIL" : "PASS", total,
                            g_size);
    autopar_cluster_free(cl);
    ap_backend_free(g_backend);
    ap_comm_free(g_world);
    return total ? 1 : 0;
}
