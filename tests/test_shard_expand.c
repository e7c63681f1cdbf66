/*
 * Regression: the sharding strategies of EXPAND (the adjoint of sum / mean).
 *
 * The backward of mean_all / sum_all broadcasts the (replicated) scalar seed over the reduced
 * tensor's shape with EXPAND; the backward of mean / sum over an axis broadcasts the gradient
 * over the inserted axis. EXPAND used to follow its operand, so a scalar EXPAND could only be
 * replicated, and with it every gradient op that follows it (the mul of d(d*d), the relu
 * backward, ...): they then read the batch-split activations whole. With
 * force_batch_dim_to_mesh_axis set, that all-gather over the batch axis is forbidden and
 * ap_shard_stage found no plan at all. EXPAND now offers every spec of its result (each device
 * fills its own tile at no communication cost), reading its operand in that spec without the
 * inserted dim (a scalar replicated), as runtime/spmd_lower.c executes it.
 *
 * MLPs (5 dense D -> D layers with biases, ReLU between) with the losses
 *   mean_all(d * d), mean_all(mean(d * d, 1)), sum_all(sum(d * d, 0)), d = pred - target,
 * trained with AdamW, flat and with one pipeline mark per layer (the identical middle layers
 * are solved once and reused), on (2,1), (1,2), (2,2), (4,1) meshes of one DGX H100 host with
 * force_batch_dim_to_mesh_axis = 0 (and = 1 where axis 1 is non-trivial), and without forcing:
 *  - a plan exists; every spec divides its shape; every operand resharding is realisable by
 *    ap_reshard_cost and they add up to the plan's resharding total;
 *  - under forcing: the inputs' batch dim is split over the forced axis; no collective
 *    all-gathers or all-to-alls over it (or the flattened mesh); every EXPAND with a [B, D]
 *    result is split on its batch dim over the forced axis;
 *  - every EXPAND reads its operand in its result's spec without the inserted dim.
 * And on small instances the ILP's optimum equals brute force over the merged problem
 * (ap_shard_problem_*, as tests/test_shard_ilp.c), with and without forcing, in both cost
 * modes.
 */
#include "autopar.h"
#include "cluster.h"
#include "cost_model.h"
#include "mesh.h"
#include "shard_plan_check.h"
#include "sharding.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { LOSS_MEAN_ALL = 0, LOSS_MEAN_AXIS, LOSS_SUM_AXIS0, LOSS_COUNT };
static const char *loss_names[LOSS_COUNT] = {"mean_all(d*d)", "mean_all(mean(d*d, 1))",
                                             "sum_all(sum(d*d, 0))"};

/* layers dense D -> D layers (+ bias, ReLU between), loss of kind `loss` against y. */
static autopar_graph *mlp(int loss, int layers, bool marks, int64_t B, int64_t D) {
    autopar_graph *g = NULL;
    if (autopar_graph_new(&g)) return NULL;
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){B, D}, 0);
    autopar_tensor *y = autopar_input(g, "y", AUTOPAR_F32, 2, (int64_t[]){B, D}, 0);
    autopar_tensor *h = x;
    for (int i = 0; i < layers; i++) {
        char wn[16], bn[16];
        snprintf(wn, sizeof wn, "w%d", i);
        snprintf(bn, sizeof bn, "b%d", i);
        autopar_tensor *w = autopar_param(g, wn, 2, (int64_t[]){D, D}, AUTOPAR_INIT_NORMAL, 0.1f);
        autopar_tensor *b = autopar_param(g, bn, 1, (int64_t[]){D}, AUTOPAR_INIT_ZEROS, 0);
        h = autopar_add(g, autopar_matmul(g, h, w), b);
        if (i + 1 < layers) {
            h = autopar_relu(g, h);
            if (marks && autopar_graph_status(g) == AUTOPAR_OK)
                (void)autopar_mark_pipeline_boundary(g);
        }
    }
    autopar_tensor *d = autopar_sub(g, h, y);
    autopar_tensor *sq = autopar_mul(g, d, d), *l = NULL;
    switch (loss) {
    case LOSS_MEAN_ALL: l = autopar_mean_all(g, sq); break;
    case LOSS_MEAN_AXIS: l = autopar_mean_all(g, autopar_mean(g, sq, 1)); break;
    default: l = autopar_sum_all(g, autopar_sum(g, sq, 0)); break;
    }
    autopar_optimizer o;
    autopar_optimizer_default(&o);   /* AdamW */
    if (autopar_graph_status(g) || autopar_build_training(g, l, &o)) {
        fprintf(stderr, "graph: %s\n", autopar_last_error());
        autopar_graph_free(g);
        return NULL;
    }
    return g;
}

/* s without dim ax (rank - 1). */
static ap_spec drop_dim(const ap_spec *s, int ax) {
    ap_spec r = ap_spec_replicated(s->ndim - 1);
    for (int d = 0, o = 0; d < s->ndim; d++)
        if (d != ax) r.dim[o++] = s->dim[d];
    return r;
}

static bool dim_uses_axis(uint8_t d, int axis) {
    return d == AP_DIM_S01 || (axis == 0 && d == AP_DIM_S0) || (axis == 1 && d == AP_DIM_S1);
}

static void check_plan(const char *label, const autopar_graph *g, const ap_mesh *m,
                       const ap_shard_plan *p, int force) {
    int bad = g_failures;
    bool forced = force >= 0 && m->shape[force] > 1;
    double reshard = 0;
    int n_expand = 0;
    for (int id = 0; id < g->n_nodes; id++) {
        const ap_node *v = g->nodes[id];
        const ap_shard_node *n = &p->node[id];
        reshard += check_node_specs(label, g, m, p, id);
        if (v->op == AP_OP_INPUT && forced) CHECK(dim_uses_axis(n->spec.dim[0], force));
        if (v->op == AP_OP_EXPAND) {
            n_expand++;
            int ax = (int)v->attrs.i[0];
            /* the operand is read as the result's tiles without the inserted dim (what the
             * runtime's EXPAND rule reads) */
            ap_spec want = ax >= 0 ? drop_dim(&n->spec, ax) : ap_spec_replicated(0);
            CHECK(ap_spec_equal(&n->in[0], &want));
            /* a [B, D] result (the seed broadcast of mean_all, or the broadcast over the
             * inserted axis) is read with the batch-split activations: split on the batch dim
             * (reading them whole would all-gather over the forced axis) */
            if (forced && v->shape.ndim == 2) CHECK(dim_uses_axis(n->spec.dim[0], force));
        }
    }
    CHECK(n_expand >= 1);
    check_plan_costs(p, reshard);
    for (int i = 0; i < p->n_coll; i++) {
        const ap_shard_coll *c = &p->coll[i];
        CHECK(c->node >= 0 && c->node < g->n_nodes);
        if (forced && (c->kind == AP_COLL_ALL_GATHER || c->kind == AP_COLL_ALL_TO_ALL))
            CHECK(c->axis != (ap_mesh_axis)force && c->axis != AP_AXIS_FLAT);
    }
    if (g_failures > bad) {
        fprintf(stderr, "  ... in %s\n", label);
        ap_shard_plan_print(p, g, stderr);
    }
}

/* ---- brute force (as tests/test_shard_ilp.c) ---------------------------------------------- */

static double space_size(const ap_shard_problem *p) {
    double s = 1;
    for (int i = 0; i < ap_shard_problem_n_groups(p); i++) s *= ap_shard_problem_group_size(p, i);
    return s;
}

static double brute_force(const ap_shard_problem *p, long *feasible) {
    int ng = ap_shard_problem_n_groups(p);
    int *c = calloc((size_t)ng + 1, sizeof(int));
    double best = INFINITY;
    *feasible = 0;
    if (!c) return best;
    for (;;) {
        double obj;
        bool ok;
        ap_shard_problem_eval(p, c, &obj, NULL, &ok);
        if (ok) {
            (*feasible)++;
            if (obj < best) best = obj;
        }
        int i = 0;
        while (i < ng && ++c[i] == ap_shard_problem_group_size(p, i)) c[i++] = 0;
        if (i == ng) break;
    }
    free(c);
    return best;
}

/* Returns 1 when the instance was compared, 0 when it was too large to enumerate. */
static int ilp_vs_brute(const char *label, const autopar_graph *g, const ap_mesh *m,
                        const autopar_cluster *cl, const ap_shard_options *opt) {
    ap_shard_problem *p = NULL;
    ap_status st = ap_shard_problem_build(g, NULL, 0, m, cl, opt, &p);
    if (st) {
        fprintf(stderr, "%s: problem: %s\n", label, autopar_last_error());
        g_failures++;
        return 0;
    }
    double space = space_size(p);
    if (space > 300000) {
        printf("%-52s %.0f combinations: not enumerated\n", label, space);
        ap_shard_problem_free(p);
        return 0;
    }
    long feasible = 0;
    double bf = brute_force(p, &feasible);
    int *choice = calloc((size_t)ap_shard_problem_n_groups(p) + 1, sizeof(int));
    double obj = INFINITY;
    CHECK(choice != NULL);
    if (choice) {
        st = ap_shard_problem_solve(p, choice, &obj);
        CHECK(st == AUTOPAR_OK);
        if (st) fprintf(stderr, "%s: solve: %s\n", label, autopar_last_error());
    }
    CHECK(feasible > 0);
    if (!(fabs(obj - bf) <= 1e-9 * fabs(bf) + 1e-15)) {
        fprintf(stderr, "%s: ILP %.17g, brute force %.17g\n", label, obj, bf);
        g_failures++;
    }
    printf("%-52s %d groups, %.0f combinations (%ld realisable), optimum %.6g s\n", label,
           ap_shard_problem_n_groups(p), space, feasible, bf);
    free(choice);
    ap_shard_problem_free(p);
    return 1;
}

int main(void) {
    autopar_cluster *cl = NULL;
    if (autopar_cluster_preset("dgx-h100", 1, 8, &cl) != AUTOPAR_OK) {
        fprintf(stderr, "%s\n", autopar_last_error());
        return 1;
    }
    static const int meshes[][2] = {{2, 1}, {1, 2}, {2, 2}, {4, 1}};
    int plans = 0;
    for (int loss = 0; loss < LOSS_COUNT; loss++) {
        for (int marks = 0; marks < 2; marks++) {
            autopar_graph *g = mlp(loss, 5, marks, 32, 64);
            CHECK(g != NULL);
            if (!g) continue;
            for (int mi = 0; mi < 4; mi++) {
                int n0 = meshes[mi][0], n1 = meshes[mi][1];
                ap_mesh *m = NULL;
                CHECK(ap_mesh_new_block(cl, 0, 1, 0, n0 * n1, n0, n1, &m) == AUTOPAR_OK);
                if (!m) continue;
                for (int force = -1; force < 2; force++) {
                    if (force == 1 && n1 == 1) continue;   /* the same as no forcing */
                    ap_shard_options opt;
                    ap_shard_options_default(&opt);
                    opt.force_batch_dim_to_mesh_axis = force;
                    ap_shard_plan *p = NULL;
                    char label[128];
                    snprintf(label, sizeof label, "%s, %s, mesh %dx%d, force %d",
                             loss_names[loss], marks ? "layered" : "flat", n0, n1, force);
                    ap_status st = ap_shard_stage(g, NULL, 0, m, cl, &opt, &p);
                    if (st) {
                        fprintf(stderr, "%s: no plan: %s\n", label, autopar_last_error());
                        g_failures++;
                        continue;
                    }
                    check_plan(label, g, m, p, force);
                    printf("%-60s %.6g s, %d collectives, %d solves, %d layers reused\n",
                           label, p->objective, p->n_coll, p->n_solves, p->n_layers_reused);
                    plans++;
                    ap_shard_plan_free(p);
                }
                ap_mesh_free(m);
            }
            autopar_graph_free(g);
        }
    }
    CHECK(plans == LOSS_COUNT * 2 * (4 * 2 + 2));

    /* ILP = brute force on one-layer instances, both cost modes, forced and free */
    int compared = 0;
    for (int loss = 0; loss < LOSS_COUNT; loss++) {
        autopar_graph *g = mlp(loss, 1, false, 8, 8);
        CHECK(g != NULL);
        if (!g) continue;
        for (int mi = 0; mi < 4; mi++) {
            int n0 = meshes[mi][0], n1 = meshes[mi][1];
            const double alpha[2] = {2e-6, 5e-6}, beta[2] = {1e-9, 3e-9};
            ap_mesh *m = NULL;
            CHECK(ap_mesh_new_custom(n0, n1, alpha, beta, &m) == AUTOPAR_OK);
            if (!m) continue;
            for (int variant = 0; variant < 4; variant++) {
                ap_shard_options opt;
                ap_shard_options_default(&opt);
                opt.communication_only = variant & 1;
                opt.force_batch_dim_to_mesh_axis = variant & 2 ? 0 : -1;
                char label[128];
                snprintf(label, sizeof label, "ILP vs brute: %s %dx%d%s%s", loss_names[loss], n0,
                         n1, opt.communication_only ? " comm" : "",
                         opt.force_batch_dim_to_mesh_axis >= 0 ? " forced" : "");
                compared += ilp_vs_brute(label, g, m, cl, &opt);
            }
            ap_mesh_free(m);
        }
        autopar_graph_free(g);
    }
    CHECK(compared >= 24);
    autopar_cluster_free(cl);
    if (g_failures) {
        printf("FAILED: %d check(s)\n", g_failures);
        return 1;
    }
    printf("test_shard_expand: OK (%d plans, %d brute-force comparisons)\n", plans, compared);
    return 0;
}
