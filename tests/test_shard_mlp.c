/*
 * Hand-derived sharding plans of the 4-layer MLP (examples/models.h: dense D -> 4D -> D -> 4D
 * -> D with biases, ReLU between layers, MSE loss) trained with SGD or AdamW, in the
 * communication-only setting (Alpa's objective: compute is free, a fully replicated parameter
 * or optimizer state pays replicated_penalty = sum over axes of size > 1 of AR(1 byte)).
 * Expected objectives are computed below from the alpha-beta formulas by hand
 * (AR(B bytes) on an axis of n devices = alpha + 2 (n-1)/n B beta), never by calling the pass,
 * and must match the pass's objective to 1e-6 relative; the collectives it lists must be exactly
 * the ones derived.
 *
 * The training graph (names as built): forward z_i = h_{i-1} w_i, a_i = z_i + b_i,
 * h_i = relu(a_i) (i < 3), loss = mse(a_3, y); backward (autodiff):
 *   d a_3 = mse_back(seed, a_3, y);  d b_3 = sum_to(d a_3);
 *   for i = 3..0: d w_i = h_{i-1}^T d a_i;  d h_{i-1} = d a_i w_i^T (i > 0);
 *                 d a_{i-1} = relu_back(d h_{i-1}, a_{i-1});  d b_{i-1} = sum_to(d a_{i-1});
 * then one update per parameter (and AdamW's two moment updates), each replacing its leaf.
 * The scalar loss is read by nobody inside the step, so a batch-split loss keeps its pending
 * sum (no all-reduce; see docs/intra-op.md).
 *
 * (a) Large batch, small hidden (B = 4096, D = 16) on (4,1) and (1,4): activations are 256x
 *     larger than all weights together, so the plan is pure data parallelism. Every matmul
 *     splits its rows (the batch) over the 4-device axis; forward and backward activation
 *     products need nothing; each weight gradient h^T da contracts over the split batch, so
 *     finishes with one all-reduce of the full weight; each bias gradient sum_to(da) sums over
 *     the split batch: one all-reduce of the bias. Parameters stay replicated (their updates
 *     read replicated gradients), so each parameter, and with AdamW each of its two moments,
 *     pays the penalty alpha + 1.5 beta. Sharding a parameter (and its moments) instead saves
 *     up to 3 penalties but needs an all-gather, alpha + 0.75 |p| beta, before each of its
 *     uses; with alpha = 1e-8 s, beta = 1e-9 s/B the smallest parameter (b3, 64 bytes) gives
 *     5.8e-8 s > 3.5e-8 s, so replication wins everywhere. (With alpha-dominated links the
 *     penalty, ~alpha per leaf, would make sharding tiny biases and gathering them cheaper:
 *     Alpa's own tests use byte counts that dwarf the penalty, as we do here.)
 *     Objective = sum_p AR(4 |p|) + penalty * (#params + #states).
 *     Collectives: exactly 8 all-reduces, one per parameter gradient, nothing else.
 *
 * (b) Small batch, large hidden (B = 8, D = 1024) on (1,4) and (4,1): weights (64 MB) dwarf
 *     activations (32 KB per [B, D]), so no weight may move: Megatron alternation.
 *     w0: column split (R S), b0 split, z0 = x w0 needs x replicated (the input arrives
 *         replicated) and gives [B, 4D] split on columns, relu keeps it;
 *     w1: row split (S R): z1 = h0 w1 contracts over the split 4D: partial, AR of B D 4 bytes;
 *         b1 replicated (penalty; it is added to the replicated z1);
 *     w2, b2 as w0, b0; w3, b3 as w1, b1: a second forward AR of B D 4 bytes.
 *     Backward: d a3 replicated; d h2 = d a3 w3^T: w3 split on its rows = the output columns,
 *     no communication; d w3 = h2^T d a3 has the split 4D as rows = w3's spec, none;
 *     d a2, d b2 split like b2; d h1 = d a2 w2^T contracts over the split 4D: the one backward
 *     AR (B D 4 bytes); d w2 = h1^T d a2 column-split like w2; d h0 = d a1 w1^T column-split,
 *     no communication; d w1 row-split like w1; d w0 = x^T d a0 column-split like w0; d x is
 *     not needed. Updates read gradients in their parameter's spec: no communication.
 *     Objective = 3 AR(4 B D) + 2 penalty (b1, b3). That is (layers - 1) = 3 activation
 *     all-reduces: 2 forward, 1 backward. Every alternative moves an activation of [B, 4D]
 *     (4x larger) or a weight.
 *
 * (c) (2,2) mesh, B = 2048, D = 32, both axes alike (alpha = 1e-9 s, beta = 1e-9 s/B): without
 *     mixed mode a matmul must use both axes, so one axis carries the batch and the other
 *     tensor parallelism. Plan: batch over one axis ("dp"), Megatron (as in (b)) over the
 *     other ("tp"); the two orientations cost the same, the test accepts either.
 *     Activation ARs run on tp over the per-device batch: 3 x AR_tp((B/2) D 4 = 2 B D bytes).
 *     Every weight gradient finishes with an all-reduce over dp of its local shard: w0, w2
 *     (column split over tp: D x 2D local) and w1, w3 (row split: 2D x D local): AR_dp(8 D^2)
 *     each; b0, b2 (split over tp, 2D local): AR_dp(8 D); b1, b3 (replicated, D): AR_dp(4 D).
 *     Penalty for b1, b3 (replicated on both axes): 2 (AR0(1) + AR1(1)) = 2 (2 alpha + 2 beta);
 *     sharding b1 over tp and gathering it before the add costs alpha + 64 beta, more.
 *     A replicated bias gradient could also be finished hierarchically (slice over tp,
 *     all-reduce half over dp, all-gather over tp): 2 alpha + 128 beta > alpha + 128 beta for
 *     the plain all-reduce, so the plain one is used (with a slower dp axis the hierarchical
 *     route would win, which is why the axes are alike here). 2-D tensor parallelism would
 *     move [B, 4D] activations; batch on both axes needs the flattened mesh (mixed mode).
 *     Objective = 3 AR(2BD) + 4 AR(8D^2) + 2 AR(8D) + 2 AR(4D) + 2 (AR(1) + AR(1)), n = 2.
 *     Collectives: 3 on tp (activations), 8 on dp (one per parameter gradient).
 */
#include "autopar.h"
#include "check_cond.h"
#include "cluster.h"
#include "mesh.h"
#include "models.h"
#include "sharding.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* AR(B) on an axis of n devices, by hand. */
static double ar(double alpha, double beta, int n, double bytes) {
    if (n <= 1) return 0.0;
    return alpha + 2.0 * (n - 1) / n * bytes * beta;
}

static const char *param_names[8] = {"w0", "w1", "w2", "w3", "b0", "b1", "b2", "b3"};

typedef struct mlp {
    autopar_graph *g;
    int64_t        B, D;
    int            param[8], grad[8];
} mlp;

static bool mlp_build(mlp *m, int64_t B, int64_t D, autopar_optimizer_kind kind) {
    memset(m, 0, sizeof *m);
    m->B = B;
    m->D = D;
    autopar_graph_new(&m->g);
    mlp_config c = {B, D, 0};
    autopar_tensor *loss = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    o.kind = kind;
    if (model_mlp_build(m->g, &c, &loss) || autopar_build_training(m->g, loss, &o)) {
        fprintf(stderr, "MLP build: %s\n", autopar_last_error());
        return false;
    }
    for (int i = 0; i < 8; i++) {
        autopar_tensor *t = autopar_graph_find(m->g, param_names[i]);
        m->param[i] = ((ap_node *)t)->id;
        m->grad[i] = ((ap_node *)autopar_grad(m->g, t))->id;
    }
    return true;
}

static int64_t param_numel(const mlp *m, int i) {
    return autopar_tensor_numel(autopar_graph_tensor(m->g, m->param[i]));
}

static ap_shard_plan *solve(const mlp *m, int n0, int n1, const double alpha[2],
                            const double beta[2]) {
    ap_mesh *mesh = NULL;
    if (ap_mesh_new_custom(n0, n1, alpha, beta, &mesh)) return NULL;
    ap_shard_options opt;
    ap_shard_options_default(&opt);
    opt.communication_only = true;
    ap_shard_plan *p = NULL;
    if (ap_shard_stage(m->g, NULL, 0, mesh, NULL, &opt, &p) != AUTOPAR_OK)
        fprintf(stderr, "ap_shard_stage: %s\n", autopar_last_error());
    ap_mesh_free(mesh);
    return p;
}

static bool rel_close(double a, double b) { return fabs(a - b) <= 1e-6 * fabs(b); }

static void check_objective(const char *label, const ap_shard_plan *p, double expected) {
    printf("%-34s objective %.12g s, hand-derived %.12g s\n", label, p->objective, expected);
    if (!rel_close(p->objective, expected)) {
        fprintf(stderr, "%s: objective %.17g != hand-derived %.17g\n", label, p->objective,
                expected);
        g_failures++;
    }
    CHECK(p->optimal);
}

static const char *spec_of(const ap_shard_plan *p, int id, char *buf) {
    return ap_spec_str(&p->node[id].spec, buf, AP_SPEC_STR_MAX);
}

/* The spec in which the first matmul reads x. (x itself may arrive replicated and be sliced
 * for free, or arrive split: both cost nothing, so the plan may pick either.) */
static const char *x_read_spec(const mlp *m, const ap_shard_plan *p, char *buf) {
    int x = ((ap_node *)autopar_graph_find(m->g, "x"))->id;
    for (int id = 0; id < m->g->n_nodes; id++) {
        const ap_node *v = m->g->nodes[id];
        if (v->op == AP_OP_MATMUL && v->src[0] == x)
            return ap_spec_str(&p->node[id].in[0], buf, AP_SPEC_STR_MAX);
    }
    return "?";
}

/* (a) data parallel on the axis of size 4. */
static void case_a(int n0, int n1, autopar_optimizer_kind kind) {
    mlp m;
    if (!mlp_build(&m, 4096, 16, kind)) {
        g_failures++;
        return;
    }
    /* latency small against byte terms: see the condition in the header comment */
    const double alpha[2] = {1e-8, 1e-8}, beta[2] = {1e-9, 1e-9};
    int axis = n0 > 1 ? 0 : 1, n = n0 > 1 ? n0 : n1;
    ap_shard_plan *p = solve(&m, n0, n1, alpha, beta);
    CHECK(p != NULL);
    if (!p) {
        autopar_graph_free(m.g);
        return;
    }
    double penalty = ar(alpha[axis], beta[axis], n, 1.0);
    int leaves_per_param = kind == AUTOPAR_OPT_ADAMW ? 3 : 1;
    double expected = 8.0 * leaves_per_param * penalty;
    for (int i = 0; i < 8; i++) expected += ar(alpha[axis], beta[axis], n, 4.0 * param_numel(&m, i));
    char label[64];
    snprintf(label, sizeof label, "(a) data parallel %dx%d %s", n0, n1,
             kind == AUTOPAR_OPT_ADAMW ? "adamw" : "sgd");
    check_objective(label, p, expected);
    /* exactly one all-reduce per parameter gradient, on the batch axis, of the whole gradient */
    CHECK(p->n_coll == 8);
    int seen[8] = {0};
    for (int c = 0; c < p->n_coll; c++) {
        const ap_shard_coll *cl = &p->coll[c];
        CHECK(cl->kind == AP_COLL_ALL_REDUCE);
        CHECK(cl->axis == (ap_mesh_axis)axis);
        int which = -1;
        for (int i = 0; i < 8; i++)
            if (cl->node == m.grad[i]) which = i;
        CHECK(which >= 0 && cl->operand == -1);
        if (which >= 0) {
            seen[which]++;
            CHECK(cl->bytes == 4.0 * param_numel(&m, which));
        }
    }
    for (int i = 0; i < 8; i++) CHECK(seen[i] == 1);
    /* the batch is split, the parameters replicated */
    char b[AP_SPEC_STR_MAX];
    CHECK(strcmp(x_read_spec(&m, p, b), axis == 0 ? "S0R" : "S1R") == 0);
    for (int i = 0; i < 4; i++) CHECK(strcmp(spec_of(p, m.param[i], b), "RR") == 0);
    ap_shard_plan_free(p);
    autopar_graph_free(m.g);
}

/* (b) Megatron alternation on the axis of size 4. */
static void case_b(int n0, int n1) {
    mlp m;
    if (!mlp_build(&m, 8, 1024, AUTOPAR_OPT_SGD)) {
        g_failures++;
        return;
    }
    const double alpha[2] = {2e-5, 2e-5}, beta[2] = {2e-10, 2e-10};
    int axis = n0 > 1 ? 0 : 1, n = n0 > 1 ? n0 : n1;
    ap_shard_plan *p = solve(&m, n0, n1, alpha, beta);
    CHECK(p != NULL);
    if (!p) {
        autopar_graph_free(m.g);
        return;
    }
    double act = 4.0 * (double)(m.B * m.D);
    double expected = 3.0 * ar(alpha[axis], beta[axis], n, act) +
                      2.0 * ar(alpha[axis], beta[axis], n, 1.0);
    char label[64];
    snprintf(label, sizeof label, "(b) Megatron %dx%d", n0, n1);
    check_objective(label, p, expected);
    CHECK(p->n_coll == 3);
    for (int c = 0; c < p->n_coll; c++) {
        CHECK(p->coll[c].kind == AP_COLL_ALL_REDUCE);
        CHECK(p->coll[c].axis == (ap_mesh_axis)axis);
        CHECK(p->coll[c].bytes == act);
    }
    /* column, row, column, row */
    const char *col = axis == 0 ? "RS0" : "RS1", *row = axis == 0 ? "S0R" : "S1R";
    const char *vec = axis == 0 ? "S0" : "S1";
    char b[AP_SPEC_STR_MAX];
    CHECK(strcmp(spec_of(p, m.param[0], b), col) == 0);
    CHECK(strcmp(spec_of(p, m.param[1], b), row) == 0);
    CHECK(strcmp(spec_of(p, m.param[2], b), col) == 0);
    CHECK(strcmp(spec_of(p, m.param[3], b), row) == 0);
    CHECK(strcmp(spec_of(p, m.param[4], b), vec) == 0);
    CHECK(strcmp(spec_of(p, m.param[5], b), "R") == 0);
    CHECK(strcmp(spec_of(p, m.param[6], b), vec) == 0);
    CHECK(strcmp(spec_of(p, m.param[7], b), "R") == 0);
    /* gradients come out in their parameter's spec */
    for (int i = 0; i < 8; i++) CHECK(ap_spec_equal(&p->node[m.grad[i]].spec, &p->node[m.param[i]].spec));
    ap_shard_plan_free(p);
    autopar_graph_free(m.g);
}

/* (c) data parallel on one axis x tensor parallel on the other. */
static void case_c(void) {
    mlp m;
    if (!mlp_build(&m, 2048, 32, AUTOPAR_OPT_SGD)) {
        g_failures++;
        return;
    }
    const double alpha[2] = {1e-9, 1e-9}, beta[2] = {1e-9, 1e-9};
    ap_shard_plan *p = solve(&m, 2, 2, alpha, beta);
    CHECK(p != NULL);
    if (!p) {
        autopar_graph_free(m.g);
        return;
    }
    char b[AP_SPEC_STR_MAX];
    const char *xs = x_read_spec(&m, p, b);
    int dp = strcmp(xs, "S0R") == 0 ? 0 : strcmp(xs, "S1R") == 0 ? 1 : -1;
    CHECK(dp >= 0);
    if (dp < 0) dp = 0;
    int tp = 1 - dp;
    double B = (double)m.B, D = (double)m.D;
    double ad = alpha[dp], bd = beta[dp], at = alpha[tp], bt = beta[tp];
    double expected = 3.0 * ar(at, bt, 2, 2.0 * B * D)          /* activations, tp      */
                      + 4.0 * ar(ad, bd, 2, 8.0 * D * D)        /* weight gradients, dp */
                      + 2.0 * ar(ad, bd, 2, 8.0 * D)            /* b0, b2 gradients     */
                      + 2.0 * ar(ad, bd, 2, 4.0 * D)            /* b1, b3 gradients     */
                      + 2.0 * (ar(ad, bd, 2, 1.0) + ar(at, bt, 2, 1.0));   /* penalty   */
    char label[64];
    snprintf(label, sizeof label, "(c) DP(axis %d) x TP(axis %d) 2x2", dp, tp);
    check_objective(label, p, expected);
    int on_dp = 0, on_tp = 0;
    for (int c = 0; c < p->n_coll; c++) {
        CHECK(p->coll[c].kind == AP_COLL_ALL_REDUCE);
        if (p->coll[c].axis == (ap_mesh_axis)dp) {
            on_dp++;
            bool grad = false;
            for (int i = 0; i < 8; i++) grad |= p->coll[c].node == m.grad[i];
            CHECK(grad);
        } else {
            on_tp++;
            CHECK(p->coll[c].axis == (ap_mesh_axis)tp);
            CHECK(p->coll[c].bytes == 2.0 * B * D);
        }
    }
    CHECK(on_dp == 8 && on_tp == 3);
    const char *col = tp == 1 ? "RS1" : "RS0", *row = tp == 1 ? "S1R" : "S0R";
    CHECK(strcmp(spec_of(p, m.param[0], b), col) == 0);
    CHECK(strcmp(spec_of(p, m.param[1], b), row) == 0);
    CHECK(strcmp(spec_of(p, m.param[2], b), col) == 0);
    CHECK(strcmp(spec_of(p, m.param[3], b), row) == 0);
    CHECK(strcmp(spec_of(p, m.param[5], b), "R") == 0);
    ap_shard_plan_free(p);
    autopar_graph_free(m.g);
}

int main(void) {
    case_a(4, 1, AUTOPAR_OPT_SGD);
    case_a(1, 4, AUTOPAR_OPT_SGD);
    case_a(4, 1, AUTOPAR_OPT_ADAMW);
    case_a(1, 4, AUTOPAR_OPT_ADAMW);
    case_b(1, 4);
    case_b(4, 1);
    case_c();
    if (g_failures) {
        printf("FAILED: %d check(s)\n", g_failures);
        return 1;
    }
    printf("test_shard_mlp: OK\n");
    return 0;
}
