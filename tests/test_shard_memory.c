/*
 * The sharding pass under a memory budget.
 *
 *  1. Liveness by hand: loss = sum_all(x w) on one device, x [8, 4] and w [4, 4] f32. Stage
 *     order x, w, matmul, sum. x lives until the matmul, w throughout (a parameter), the
 *     product from the matmul to the sum, the loss at the end. Peak at the matmul:
 *     x 128 + w 64 + product 128 = 320 bytes (at the sum: w 64 + product 128 + loss 4 = 196).
 *  2. A budget that replicated parameters + AdamW state cannot meet forces sharding:
 *     (a) communication-only data parallelism (replicated optimum) squeezed by 3/8 of the
 *         parameters + moments: parameters or their state get sharded, the cost rises; with
 *         prefer_reduce_scatter ZeRO-style state sharding is available too (never worse);
 *     (b) with the compute cost model, a budget of 60% of the replicated parameters + moments.
 *     Every plan keeps optimizer state co-sharded with its parameter and updates aliased.
 *  3. A budget nothing can meet (1 KB) returns AUTOPAR_ERR_INFEASIBLE and names the smallest
 *     budget that fits; that budget then succeeds (peak <= it) and one byte less fails.
 */
#include "autopar.h"
#include "check_cond.h"
#include "cluster.h"
#include "mesh.h"
#include "models.h"
#include "sharding.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ap_status stage(const autopar_graph *g, const ap_mesh *m, const autopar_cluster *cl,
                       double budget, bool zero, ap_shard_plan **out) {
    ap_shard_options opt;
    ap_shard_options_default(&opt);
    opt.memory_budget = budget;
    opt.prefer_reduce_scatter = zero;
    opt.communication_only = cl == NULL;
    return ap_shard_stage(g, NULL, 0, m, cl, &opt, out);
}

static void liveness_by_hand(void) {
    autopar_graph *g;
    autopar_graph_new(&g);
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){8, 4}, 0);
    autopar_tensor *w = autopar_param(g, "w", 2, (int64_t[]){4, 4}, AUTOPAR_INIT_NORMAL, 0);
    autopar_tensor *y = autopar_matmul(g, x, w);
    (void)autopar_sum_all(g, y);
    ap_mesh *m = NULL;
    ap_mesh_new_custom(1, 1, (const double[]){1e-6, 1e-6}, (const double[]){1e-9, 1e-9}, &m);
    ap_shard_plan *p = NULL;
    CHECK(stage(g, m, NULL, -1, false, &p) == AUTOPAR_OK);
    if (p) {
        printf("liveness: peak %.0f bytes at '%s' (by hand: 320 at the matmul)\n",
               p->peak_memory, g->nodes[p->peak_node]->name);
        CHECK(p->peak_memory == 320.0);
        CHECK(p->peak_node == ((ap_node *)y)->id);
        ap_shard_plan_free(p);
    }
    /* 320 fits exactly, 319 does not, and the message names 320 */
    CHECK(stage(g, m, NULL, 320, false, &p) == AUTOPAR_OK);
    ap_shard_plan_free(p);
    CHECK(stage(g, m, NULL, 319, false, &p) == AUTOPAR_ERR_INFEASIBLE);
    CHECK(strstr(autopar_last_error(), "smallest budget that fits is 320 bytes") != NULL);
    ap_mesh_free(m);
    autopar_graph_free(g);
}

static bool all_params_replicated(const autopar_graph *g, const ap_shard_plan *p) {
    for (int id = 0; id < g->n_nodes; id++) {
        const ap_node *v = g->nodes[id];
        if (v->op != AP_OP_PARAM) continue;
        ap_spec r = ap_spec_replicated(v->shape.ndim);
        if (!ap_spec_equal(&p->node[id].spec, &r) || !ap_spec_equal(&p->node[id].state_spec, &r))
            return false;
    }
    return true;
}

static autopar_graph *adam_mlp(int64_t B, int64_t D, double *params_bytes) {
    autopar_graph *g;
    autopar_graph_new(&g);
    mlp_config c = {B, D, 0};
    autopar_tensor *loss = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    if (model_mlp_build(g, &c, &loss) || autopar_build_training(g, loss, &o)) {
        fprintf(stderr, "MLP: %s\n", autopar_last_error());
        g_failures++;
        autopar_graph_free(g);
        return NULL;
    }
    double params = 0;
    for (int id = 0; id < g->n_nodes; id++)
        if (g->nodes[id]->op == AP_OP_PARAM)
            params += 4.0 * (double)ap_shape_numel(&g->nodes[id]->shape);
    *params_bytes = params;
    return g;
}

/* co-sharding: every state has its parameter's state spec; updates match their leaf */
static void check_cosharding(const autopar_graph *g, const ap_shard_plan *p) {
    for (int id = 0; id < g->n_nodes; id++) {
        const ap_node *v = g->nodes[id];
        if (v->op == AP_OP_OPT_STATE)
            CHECK(ap_spec_equal(&p->node[id].spec, &p->node[v->attrs.i[0]].state_spec));
        if (v->assign_to >= 0) CHECK(ap_spec_equal(&p->node[id].spec, &p->node[v->assign_to].spec));
    }
}

/* 2a. Communication-only, data parallel: the MLP of test_shard_mlp case (a) (B = 4096,
 *     D = 16, AdamW) on (1,4): the unconstrained optimum replicates every parameter and both
 *     moments. A budget 3/8 of (parameters + moments) below its peak can only be met by
 *     sharding parameters or their state (the activations are already split 4 ways). */
static void forced_from_replicated(void) {
    double params;
    autopar_graph *g = adam_mlp(4096, 16, &params);
    if (!g) return;
    ap_mesh *m = NULL;
    ap_mesh_new_custom(1, 4, (const double[]){1e-8, 1e-8}, (const double[]){1e-9, 1e-9}, &m);
    double replicated = 3.0 * params;   /* parameters + Adam's two moments */
    ap_shard_plan *free_plan = NULL, *p = NULL, *z = NULL;
    CHECK(stage(g, m, NULL, -1, false, &free_plan) == AUTOPAR_OK);
    if (!free_plan) goto out;
    CHECK(all_params_replicated(g, free_plan));
    double budget = floor(free_plan->peak_memory - 0.375 * replicated);
    printf("data parallel: %.6g s, peak %.0f bytes (params + moments %.0f, replicated); budget "
           "%.0f\n", free_plan->objective, free_plan->peak_memory, replicated, budget);
    ap_status st = stage(g, m, NULL, budget, false, &p);
    if (st) fprintf(stderr, "budget %.0f: %s\n", budget, autopar_last_error());
    CHECK(st == AUTOPAR_OK);
    if (p) {
        printf("  under the budget: %.6g s, peak %.0f, all replicated: %d\n", p->objective,
               p->peak_memory, all_params_replicated(g, p));
        CHECK(p->peak_memory <= budget);
        CHECK(!all_params_replicated(g, p));
        CHECK(p->objective > free_plan->objective);
        check_cosharding(g, p);
    }
    st = stage(g, m, NULL, budget, true, &z);
    if (st) fprintf(stderr, "ZeRO budget %.0f: %s\n", budget, autopar_last_error());
    CHECK(st == AUTOPAR_OK);
    if (z) {
        int zero_sharded = 0;
        for (int id = 0; id < g->n_nodes; id++)
            if (g->nodes[id]->op == AP_OP_PARAM &&
                !ap_spec_equal(&z->node[id].spec, &z->node[id].state_spec))
                zero_sharded++;
        printf("  with prefer_reduce_scatter: %.6g s, peak %.0f, %d parameter(s) with "
               "ZeRO-sharded state\n", z->objective, z->peak_memory, zero_sharded);
        CHECK(z->peak_memory <= budget);
        if (p) CHECK(z->objective <= p->objective * (1 + 1e-9));   /* a superset of strategies */
        check_cosharding(g, z);
    }
out:
    ap_shard_plan_free(free_plan);
    ap_shard_plan_free(p);
    ap_shard_plan_free(z);
    ap_mesh_free(m);
    autopar_graph_free(g);
}

/* 2b. Compute cost model (one DGX H100 host, (1,4)): B = 512, D = 256. A budget of 60% of
 *     (parameters + moments) replicated: the replicated layout cannot fit, the plan must
 *     shard. 3. Nothing fits 1 KB: the error names the smallest budget, which then fits, and
 *     one byte less does not. */
static void forced_with_compute(void) {
    double params;
    autopar_graph *g = adam_mlp(512, 256, &params);
    if (!g) return;
    autopar_cluster *cl = NULL;
    CHECK(autopar_cluster_preset("dgx-h100", 1, 8, &cl) == AUTOPAR_OK);
    ap_mesh *m = NULL;
    CHECK(ap_mesh_new_block(cl, 0, 1, 0, 4, 1, 4, &m) == AUTOPAR_OK);
    double budget = 0.6 * 3.0 * params;
    ap_shard_plan *p = NULL;
    ap_status st = stage(g, m, cl, budget, false, &p);
    if (st) fprintf(stderr, "budget %.0f: %s\n", budget, autopar_last_error());
    CHECK(st == AUTOPAR_OK);
    if (p) {
        printf("compute model, budget %.0f (params + moments %.0f): %.6g s, peak %.0f\n",
               budget, 3.0 * params, p->objective, p->peak_memory);
        CHECK(p->peak_memory <= budget);
        CHECK(!all_params_replicated(g, p));
        check_cosharding(g, p);
    }
    ap_shard_plan_free(p);
    p = NULL;

    st = stage(g, m, cl, 1024, false, &p);
    CHECK(st == AUTOPAR_ERR_INFEASIBLE);
    const char *msg = autopar_last_error();
    printf("1 KB budget: %s\n", msg);
    const char *at = strstr(msg, "smallest budget that fits is ");
    CHECK(at != NULL);
    if (at) {
        double named = atof(at + strlen("smallest budget that fits is "));
        CHECK(named > 1024);
        ap_shard_plan *q = NULL;
        CHECK(stage(g, m, cl, named, false, &q) == AUTOPAR_OK);
        if (q) CHECK(q->peak_memory <= named);
        ap_shard_plan_free(q);
        q = NULL;
        CHECK(stage(g, m, cl, named - 1, false, &q) == AUTOPAR_ERR_INFEASIBLE);
        ap_shard_plan_free(q);
    }
    ap_mesh_free(m);
    autopar_cluster_free(cl);
    autopar_graph_free(g);
}

int main(void) {
    liveness_by_hand();
    forced_from_replicated();
    forced_with_compute();
    if (g_failures) {
        printf("FAILED: %d check(s)\n", g_failures);
        return 1;
    }
    printf("test_shard_memory: OK\n");
    return 0;
}
