/*
 * Checks shared by the sharding tests that inspect a whole ap_shard_plan (test_shard_expand,
 * test_shard_gpt): every node's specs realisable, the costs adding up. Counts failures through
 * check_cond.h.
 */
#ifndef AUTOPAR_TEST_SHARD_PLAN_CHECK_H
#define AUTOPAR_TEST_SHARD_PLAN_CHECK_H

#include "check_cond.h"
#include "cost_model.h"
#include "mesh.h"
#include "sharding.h"

#include <math.h>

/* Node id of plan p (graph g, mesh m): in the stage, its spec and every operand's read spec have
 * local shapes, only the scalar loss is a pending sum, every operand's resharding is realisable
 * (a failure names the operand and both specs, after label), an assigned node shares its
 * target's spec. Returns the resharding time the node's operands add to the plan's total. */
static double check_node_specs(const char *label, const autopar_graph *g, const ap_mesh *m,
                               const ap_shard_plan *p, int id) {
    const ap_node *v = g->nodes[id];
    const ap_shard_node *n = &p->node[id];
    double reshard = 0;
    CHECK(n->in_stage);
    ap_shape local;
    CHECK(ap_spec_local_shape(m, &n->spec, &v->shape, &local) == AUTOPAR_OK);
    CHECK(n->spec.partial == 0 || (v->shape.ndim == 0 && id == g->loss));
    CHECK(n->n_src == v->n_src);
    for (int k = 0; k < v->n_src; k++) {
        const ap_node *u = g->nodes[v->src[k]];
        CHECK(ap_spec_local_shape(m, &n->in[k], &u->shape, &local) == AUTOPAR_OK);
        ap_reshard r;
        ap_status st = ap_reshard_cost(m, &p->node[u->id].spec, &n->in[k], &u->shape,
                                       4.0 * (double)ap_shape_numel(&u->shape), &r);
        if (st != AUTOPAR_OK) {
            char a[AP_SPEC_STR_MAX], b[AP_SPEC_STR_MAX];
            fprintf(stderr, "%s: operand %d of '%s': %s -> %s not realisable: %s\n", label, k,
                    v->name, ap_spec_str(&p->node[u->id].spec, a, sizeof a),
                    ap_spec_str(&n->in[k], b, sizeof b), autopar_last_error());
            g_failures++;
        } else {
            reshard += r.time;
        }
    }
    if (v->assign_to >= 0) CHECK(ap_spec_equal(&n->spec, &p->node[v->assign_to].spec));
    return reshard;
}

/* The plan's resharding total equals the operands' (reshard, summed by check_node_specs) and its
 * cost terms add up to its objective. */
static void check_plan_costs(const ap_shard_plan *p, double reshard) {
    CHECK(fabs(reshard - p->reshard_cost) <= 1e-9 * (reshard + 1e-12));
    CHECK(fabs(p->compute_cost + p->comm_cost + p->reshard_cost + p->penalty_cost - p->objective) <=
          1e-12 * p->objective + 1e-18);
}

#endif
