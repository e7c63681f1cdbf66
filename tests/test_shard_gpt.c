/*
 * The sharding pass on the GPT training graph (examples/models.h, AdamW) on (1,1), (2,1),
 * (1,2), (2,2), (1,8), (8,1) meshes of one DGX H100 host, with the compute cost model.
 * For every plan:
 *  - every stage node has a valid spec that divides its shape, a strategy, and operand specs
 *    that divide the operands' shapes;
 *  - every edge's resharding (operand's spec -> the spec the op reads it in) is realisable by
 *    ap_reshard_cost, and these costs add up to the plan's resharding total;
 *  - updates have their leaf's spec, optimizer states their parameter's state spec;
 *  - compute + communication + resharding + penalty = objective; peak memory <= budget;
 *  - collectives name valid nodes and axes;
 *  - the plan survives a JSON round trip unchanged.
 * With pipeline marks (one layer per block) the stage is solved by layer reuse; without, flat;
 * the flat plan is the optimum of the same merged problem, so it may not cost more than the
 * composed one, and on these sizes the two agree. A (1,1) mesh gives an all-replicated plan
 * without communication. Extra options (mixed mesh, prefer_reduce_scatter, forced batch axis,
 * no all-gather) are exercised on (2,2) and (2,4).
 * Also: the same input gives the same plan (specs, strategies, objective); a stage that is a
 * subset of the graph (blocks 1-2 with their backward and updates, as the inter-operator pass
 * asks) gets specs for its external operands and a cache shared across calls answers the
 * repeated layer; bad arguments are rejected; the printer writes the plan.
 */
#include "autopar.h"
#include "cluster.h"
#include "cost_model.h"
#include "mesh.h"
#include "models.h"
#include "shard_plan_check.h"
#include "sharding.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static autopar_graph *gpt(int marks) {
    autopar_graph *g;
    autopar_graph_new(&g);
    gpt_config c = {.layers = 5, .hidden = 64, .heads = 4, .seq = 16, .vocab = 64, .batch = 8,
                    .mark_layers = marks};
    autopar_tensor *loss = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    if (model_gpt_build(g, &c, &loss) || autopar_build_training(g, loss, &o)) {
        fprintf(stderr, "GPT: %s\n", autopar_last_error());
        autopar_graph_free(g);
        return NULL;
    }
    return g;
}

static void check_plan(const char *label, const autopar_graph *g, const ap_mesh *m,
                       const ap_shard_plan *p, double budget) {
    int bad = g_failures;
    double reshard = 0;
    for (int id = 0; id < g->n_nodes; id++) {
        const ap_node *v = g->nodes[id];
        const ap_shard_node *n = &p->node[id];
        reshard += check_node_specs(label, g, m, p, id);
        CHECK(n->strategy[0] != '\0');
        if (v->op == AP_OP_OPT_STATE)
            CHECK(ap_spec_equal(&n->spec, &p->node[v->attrs.i[0]].state_spec));
    }
    check_plan_costs(p, reshard);
    if (budget >= 0) CHECK(p->peak_memory <= budget);
    double coll = 0;
    for (int i = 0; i < p->n_coll; i++) {
        const ap_shard_coll *c = &p->coll[i];
        CHECK(c->node >= 0 && c->node < g->n_nodes && c->tensor >= 0 && c->tensor < g->n_nodes);
        CHECK(c->axis >= AP_AXIS_0 && c->axis < AP_AXIS_COUNT && c->kind < AP_COLL_SEND_RECV);
        CHECK(c->operand >= -1 && c->operand < g->nodes[c->node]->n_src);
        coll += c->time;
    }
    CHECK(fabs(coll - (p->comm_cost + p->reshard_cost)) <= 1e-9 * (coll + 1e-12));
    /* JSON round trip */
    char *j1 = NULL, *j2 = NULL;
    ap_shard_plan *q = NULL;
    CHECK(ap_shard_plan_to_json(p, g, &j1) == AUTOPAR_OK);
    CHECK(j1 && ap_shard_plan_from_json(j1, g, &q) == AUTOPAR_OK);
    if (q) {
        CHECK(ap_shard_plan_to_json(q, g, &j2) == AUTOPAR_OK);
        CHECK(j2 && strcmp(j1, j2) == 0);
        CHECK(q->objective == p->objective && q->n_coll == p->n_coll);
        for (int id = 0; id < g->n_nodes; id++)
            CHECK(ap_spec_equal(&q->node[id].spec, &p->node[id].spec));
    }
    free(j1);
    free(j2);
    ap_shard_plan_free(q);
    if (g_failures > bad) fprintf(stderr, "  ... in %s\n", label);
}

static ap_shard_plan *solve(const autopar_graph *g, const ap_mesh *m, const autopar_cluster *cl,
                            const ap_shard_options *opt) {
    ap_shard_plan *p = NULL;
    ap_status st = ap_shard_stage(g, NULL, 0, m, cl, opt, &p);
    if (st) {
        fprintf(stderr, "ap_shard_stage: %s\n", autopar_last_error());
        g_failures++;
    }
    return p;
}

int main(void) {
    autopar_cluster *cl = NULL;
    if (autopar_cluster_preset("dgx-h100", 1, 8, &cl) != AUTOPAR_OK) {
        fprintf(stderr, "%s\n", autopar_last_error());
        return 1;
    }
    autopar_graph *flat_g = gpt(0), *layered_g = gpt(1);
    if (!flat_g || !layered_g) return 1;
    static const int meshes[][2] = {{1, 1}, {2, 1}, {1, 2}, {2, 2}, {1, 8}, {8, 1}};
    for (int mi = 0; mi < 6; mi++) {
        int n0 = meshes[mi][0], n1 = meshes[mi][1];
        ap_mesh *m = NULL;
        CHECK(ap_mesh_new_block(cl, 0, 1, 0, n0 * n1, n0, n1, &m) == AUTOPAR_OK);
        if (!m) continue;
        ap_shard_options opt;
        ap_shard_options_default(&opt);
        opt.memory_budget = 0;   /* the cluster's device memory */
        ap_shard_plan *pf = solve(flat_g, m, cl, &opt);
        ap_shard_plan *pl = solve(layered_g, m, cl, &opt);
        char label[64];
        if (pf) {
            snprintf(label, sizeof label, "flat %dx%d", n0, n1);
            check_plan(label, flat_g, m, pf, (double)cl->device_memory);
        }
        if (pl) {
            snprintf(label, sizeof label, "layered %dx%d", n0, n1);
            check_plan(label, layered_g, m, pl, (double)cl->device_memory);
        }
        if (pf && pl) {
            printf("mesh %dx%d: flat %.6g s (%d groups, %.3f s), by layers %.6g s (%d solves, %d "
                   "layers reused, %.3f s), %d collectives\n",
                   n0, n1, pf->objective, pf->n_groups, pf->build_seconds + pf->solve_seconds,
                   pl->objective, pl->n_solves, pl->n_layers_reused,
                   pl->build_seconds + pl->solve_seconds, pl->n_coll);
            /* the graphs differ only in layer tags; flat is optimal for the merged problem of
             * the unmarked graph, whose groups may span layers, so compare loosely */
            CHECK(pl->objective <= pf->objective * 1.5);
            if (n0 * n1 > 1) CHECK(pl->n_layers_reused >= 2);
        }
        if (n0 * n1 == 1 && pf) {
            CHECK(pf->n_coll == 0 && pf->comm_cost == 0 && pf->reshard_cost == 0);
            for (int id = 0; id < flat_g->n_nodes; id++)
                for (int d = 0; d < pf->node[id].spec.ndim; d++)
                    CHECK(pf->node[id].spec.dim[d] == AP_DIM_R);
        }
        ap_shard_plan_free(pf);
        ap_shard_plan_free(pl);
        ap_mesh_free(m);
    }

    /* options on 2-D meshes */
    static const int meshes2[][2] = {{2, 2}, {2, 4}};
    for (int mi = 0; mi < 2; mi++) {
        int n0 = meshes2[mi][0], n1 = meshes2[mi][1];
        ap_mesh *m = NULL;
        CHECK(ap_mesh_new_block(cl, 0, 1, 0, n0 * n1, n0, n1, &m) == AUTOPAR_OK);
        if (!m) continue;
        for (int variant = 0; variant < 4; variant++) {
            ap_shard_options opt;
            ap_shard_options_default(&opt);
            const char *what = "";
            switch (variant) {
            case 0: opt.allow_mixed_mesh = true; what = "mixed mesh"; break;
            case 1: opt.prefer_reduce_scatter = true; what = "prefer_reduce_scatter"; break;
            case 2: opt.force_batch_dim_to_mesh_axis = 0; what = "batch forced to axis 0"; break;
            default: opt.allow_all_gather = false; opt.communication_only = true;
                     what = "no all-gather, communication only"; break;
            }
            ap_shard_plan *p = solve(layered_g, m, cl, &opt);
            if (!p) continue;
            char label[96];
            snprintf(label, sizeof label, "%s %dx%d", what, n0, n1);
            check_plan(label, layered_g, m, p, -1);
            printf("mesh %dx%d %-34s %.6g s, %d collectives\n", n0, n1, what, p->objective,
                   p->n_coll);
            if (variant == 2) {
                int tok = ((ap_node *)autopar_graph_find(layered_g, "tokens"))->id;
                CHECK(p->node[tok].spec.dim[0] == AP_DIM_S0 || p->node[tok].spec.dim[0] == AP_DIM_S01);
            }
            if (variant == 3)
                for (int i = 0; i < p->n_coll; i++) CHECK(p->coll[i].kind != AP_COLL_ALL_GATHER);
            ap_shard_plan_free(p);
        }
        ap_mesh_free(m);
    }
    /* determinism, a sub-stage with a shared cache, errors, printing */
    {
        ap_mesh *m = NULL;
        CHECK(ap_mesh_new_block(cl, 0, 1, 0, 8, 2, 4, &m) == AUTOPAR_OK);
        ap_shard_options opt;
        ap_shard_options_default(&opt);
        ap_shard_plan *a = solve(layered_g, m, cl, &opt), *b = solve(layered_g, m, cl, &opt);
        if (a && b) {
            CHECK(a->objective == b->objective && a->n_coll == b->n_coll);
            for (int id = 0; id < layered_g->n_nodes; id++) {
                CHECK(ap_spec_equal(&a->node[id].spec, &b->node[id].spec));
                CHECK(strcmp(a->node[id].strategy, b->node[id].strategy) == 0);
            }
            FILE *f = tmpfile();
            if (f) {
                ap_shard_plan_print(a, layered_g, f);
                CHECK(ftell(f) > 1000);
                fclose(f);
            }
        }
        ap_shard_plan_free(a);
        ap_shard_plan_free(b);

        ap_shard_cache *cache = NULL;
        CHECK(ap_shard_cache_new(&cache) == AUTOPAR_OK);
        opt.cache = cache;
        int *nodes = malloc(sizeof(int) * (size_t)layered_g->n_nodes), n = 0;
        for (int id = 0; id < layered_g->n_nodes; id++)
            if (layered_g->nodes[id]->layer >= 1 && layered_g->nodes[id]->layer <= 3) nodes[n++] = id;
        for (int rep = 0; rep < 2; rep++) {
            ap_shard_plan *p = NULL;
            CHECK(ap_shard_stage(layered_g, nodes, n, m, cl, &opt, &p) == AUTOPAR_OK);
            if (!p) continue;
            int ext = 0;
            for (int i = 0; i < n; i++) {
                const ap_node *v = layered_g->nodes[nodes[i]];
                CHECK(p->node[v->id].in_stage);
                for (int k = 0; k < v->n_src; k++) {
                    const ap_shard_node *u = &p->node[v->src[k]];
                    CHECK(u->in_stage || u->external);
                    ext += u->external;
                }
            }
            CHECK(ext > 0);
            if (rep == 1) {
                int entries = 0, hits = 0;
                ap_shard_cache_stats(cache, &entries, &hits);
                CHECK(entries >= 1 && hits >= 1);
                printf("sub-stage of blocks 1-3: %.6g s, %d external operands read; cache: %d "
                       "entries, %d hits\n", p->objective, ext, entries, hits);
            }
            ap_shard_plan_free(p);
        }
        free(nodes);
        ap_shard_cache_free(cache);
        opt.cache = NULL;

        ap_shard_plan *p = NULL;
        CHECK(ap_shard_stage(NULL, NULL, 0, m, cl, &opt, &p) == AUTOPAR_ERR_INVALID_ARG && !p);
        CHECK(ap_shard_stage(layered_g, NULL, 0, m, NULL, &opt, &p) == AUTOPAR_ERR_INVALID_ARG);
        int bad = layered_g->n_nodes;
        CHECK(ap_shard_stage(layered_g, &bad, 1, m, cl, &opt, &p) == AUTOPAR_ERR_INVALID_ARG);
        CHECK(strstr(autopar_last_error(), "outside the graph") != NULL);
        opt.time_limit = 0;
        CHECK(ap_shard_stage(layered_g, NULL, 0, m, cl, &opt, &p) == AUTOPAR_ERR_INVALID_ARG);
        ap_shard_options_default(&opt);
        opt.force_batch_dim_to_mesh_axis = 2;
        CHECK(ap_shard_stage(layered_g, NULL, 0, m, cl, &opt, &p) == AUTOPAR_ERR_INVALID_ARG);
        CHECK(ap_shard_plan_from_json("{\"format\": \"autopar-shard-plan\"}", NULL, &p) ==
              AUTOPAR_ERR_PARSE && !p);
        CHECK(ap_shard_plan_from_json("not json", NULL, &p) == AUTOPAR_ERR_PARSE);
        ap_mesh_free(m);
    }
    autopar_graph_free(flat_g);
    autopar_graph_free(layered_g);
    autopar_cluster_free(cl);
    if (g_failures) {
        printf("FAILED: %d check(s)\n", g_failures);
        return 1;
    }
    printf("test_shard_gpt: OK\n");
    return 0;
}
