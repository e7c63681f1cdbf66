/*
 * Intra-operator pass: the sharding ILP (DESIGN.md §5, reference/alpa-notes.md §1).
 *
 * Given one stage of a training graph (a set of nodes: forward, backward and optimizer ops) and a
 * logical 2-D mesh, the pass picks a sharding strategy for every node so that the sum of compute
 * time, the communication the ops themselves perform and the resharding between ops is minimal,
 * under a per-device memory budget. It follows Alpa: a strategy set per op class (docs/intra-op.md
 * lists them), light ops merged into the heavy op they follow, an ILP over one-hot strategy
 * vectors with linearised edge variables, solved by GLPK. Identical repeated layers are solved
 * once and reused (see ap_shard_stage).
 *
 * Nothing here calls the runtime; the result is a plain data structure (ap_shard_plan) that
 * prints, serialises to JSON and reads back.
 */
#ifndef AUTOPAR_SHARDING_H
#define AUTOPAR_SHARDING_H

#include "cluster.h"
#include "cost_model.h"
#include "internal.h"
#include "mesh.h"

#include <stdbool.h>
#include <stdio.h>

/* ------------------------------------------------------------------------------------------ */
/* Options                                                                                     */
/* ------------------------------------------------------------------------------------------ */

typedef struct ap_shard_cache ap_shard_cache;

typedef struct ap_shard_options {
    /* Per-device memory budget in bytes for the stage's live tensors (parameters, gradients,
     * optimizer state, inputs, activations). > 0: that limit; 0: the cluster's device memory
     * (no limit when no cluster is given); < 0: no limit. */
    double memory_budget;
    /* Wall-clock limit of one GLPK solve, seconds (> 0). When it runs out the best plan found so
     * far is returned and plan->optimal is false; with no plan found, AUTOPAR_ERR_INFEASIBLE. */
    double time_limit;
    /* -1: off. 0 or 1: inputs must split their batch dim over that mesh axis, and resharding may
     * not all-gather or all-to-all over it (Alpa's force_batch_dim_to_mesh_dim: the batch axis
     * only carries all-reduces). */
    int force_batch_dim_to_mesh_axis;
    /* false: reshardings that all-gather are forbidden (Alpa's allow_all_gather). */
    bool allow_all_gather;
    /* true: also strategies that split one tensor dim over the flattened mesh (S01). */
    bool allow_mixed_mesh;
    /* true: ZeRO-like weight-update sharding is available: parameter gradients may be
     * reduce-scattered instead of all-reduced, the optimizer update and its state sharded over
     * the axes the parameter is replicated on, and the new parameter all-gathered. The ILP picks
     * it where its costs (reduce-scatter + all-gather, sharded update compute, state memory) are
     * lower; see docs/intra-op.md. */
    bool prefer_reduce_scatter;
    /* true: Alpa's objective: compute costs are 0 and replicated parameters / optimizer state pay
     * Alpa's replicated_penalty; heavy ops must use every mesh axis. Used by the hand-derived
     * tests. */
    bool communication_only;
    /* false: parameters (and their state) may not be fully replicated on a mesh of > 1 device. */
    bool allow_replicated_params;
    /* true (Alpa's default): on a 2-D mesh, batch_matmul only uses strategies that split one of
     * its batch dims. */
    bool batch_matmul_always_split_batch;
    /* true: repeated identical layers are solved once and reused (ap_shard_stage). */
    bool solve_per_layer;
    /* false (default): the LP relaxation is solved by GLPK's dual simplex from a crash basis,
     * then glp_intopt branches with the warm start injected as its first incumbent. true:
     * glp_intopt with GLPK's MIP presolver (no warm start: the presolver renumbers columns).
     * Same optimum; the default is ~10x faster on GPT layers (docs/intra-op.md). */
    bool ilp_presolve;
    /* Which peak FLOP rate of the cluster the compute costs use. */
    ap_flop_type flop_type;
    /* Optional per-node-id layer index (g->n_nodes entries) used instead of node->layer, e.g.
     * the layers found by the layer-clustering pass. Not owned. */
    const int *layer_of;
    /* Optional cache of solved layers shared across calls (ap_shard_cache_new). Not owned. */
    ap_shard_cache *cache;
} ap_shard_options;

/* Defaults: no memory limit (< 0), time limit 60 s, force_batch_dim_to_mesh_axis -1,
 * allow_all_gather true, allow_mixed_mesh false, prefer_reduce_scatter false,
 * communication_only false, allow_replicated_params true, batch_matmul_always_split_batch true,
 * solve_per_layer true, ilp_presolve false, AP_FLOPS_F32, no layer override, no cache.
 * NULL-safe. */
AP_INTERNAL void ap_shard_options_default(ap_shard_options *o);

/* A cache of per-layer solutions keyed by a structural hash of the layer, the mesh (shape and
 * link coefficients), the cluster's rates and the options. The inter-operator pass creates one
 * and passes it in ap_shard_options.cache for all its queries, so that a layer shape is solved
 * once per logical mesh. Errors: AUTOPAR_ERR_INVALID_ARG (out NULL), AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_shard_cache_new(ap_shard_cache **out);
/* Frees a cache. NULL-safe. */
AP_INTERNAL void ap_shard_cache_free(ap_shard_cache *c);
/* Number of cached solutions and number of lookups answered from the cache so far. */
AP_INTERNAL void ap_shard_cache_stats(const ap_shard_cache *c, int *entries, int *hits);

/* ------------------------------------------------------------------------------------------ */
/* The plan                                                                                    */
/* ------------------------------------------------------------------------------------------ */

#define AP_SHARD_LABEL_MAX 64

/* One collective the plan implies. */
typedef struct ap_shard_coll {
    ap_coll_kind kind;
    ap_mesh_axis axis;
    double       bytes;      /* B as defined at ap_collective_time                            */
    double       time;       /* seconds                                                       */
    int          node;       /* id of the node at which it runs                               */
    /* -1: the op's own collective (finishing a partial sum, reducing row statistics of a
     * normalisation split along its reduced dim, gathering a ZeRO-sharded update);
     * k >= 0: resharding of operand k before the op reads it.                                */
    int          operand;
    int          tensor;     /* id of the tensor moved (the node itself, or its operand k)    */
    ap_spec      from, to;   /* the tensor's spec before and after                            */
} ap_shard_coll;

/* What the plan says about one node id of the graph. */
typedef struct ap_shard_node {
    bool    in_stage;        /* the node belongs to the stage                                 */
    bool    external;        /* not in the stage but read by it: spec = layout it arrives in  */
    ap_spec spec;            /* output spec (stage and external nodes)                        */
    ap_spec state_spec;      /* parameters: spec of their optimizer state and of the update's */
                             /* computation (differs from spec only for ZeRO-sharded updates) */
    int     n_src;
    ap_spec in[AP_MAX_SRC];  /* spec in which the op reads each operand                       */
    char    strategy[AP_SHARD_LABEL_MAX];   /* e.g. "S0R = S0R x RR", "RS1 = RS1 x S1R (AR@1)" */
    double  compute;         /* seconds (0 in communication-only mode)                        */
    double  comm;            /* seconds of the op's own collectives                           */
    double  reshard;         /* seconds of resharding its operands                            */
    double  penalty;         /* replicated penalty (communication-only mode)                   */
    double  memory;          /* bytes per device of its output                                */
    int     group;           /* id of the node whose ILP variable it shares (merged followers) */
} ap_shard_node;

typedef struct ap_shard_plan {
    int            mesh_shape[2];
    int            n_nodes;         /* = the graph's node count; node[] is indexed by node id */
    ap_shard_node *node;
    int            n_coll;
    ap_shard_coll *coll;            /* in node order; resharding before the op's own          */
    /* Totals, seconds. objective = compute + comm + reshard + penalty, the ILP's objective.  */
    double         compute_cost, comm_cost, reshard_cost, penalty_cost, objective;
    double         peak_memory;     /* bytes per device, liveness over the stage's node order */
    int            peak_node;       /* node id at which the peak occurs                       */
    double         memory_budget;   /* budget used (< 0: none)                                 */
    /* Solve statistics. */
    bool           optimal;         /* every ILP proven optimal (no time limit reached)       */
    int            n_groups;        /* merged ILP nodes of the largest ILP solved             */
    int            n_cols, n_int_cols, n_rows, n_nonzeros;   /* of that ILP                   */
    int            n_solves;        /* ILPs solved (layers + remainder)                       */
    int            n_layers_reused; /* layers whose strategy came from another layer's solve  */
    double         build_seconds, solve_seconds;
} ap_shard_plan;

/*
 * The pass's single entry point.
 *
 * Reads: g's nodes listed in `nodes` (n_nodes ids, any order, duplicates ignored; NULL means
 * every node of g), their ops, shapes, dtypes, kinds, phases, layers (or opt->layer_of), grad and
 * assign_to links; operands outside the list are "external": they arrive from another stage in
 * whatever layout suits the stage (any spec, at no cost here). The mesh gives the axes and their
 * alpha-beta coefficients; the cluster gives peak FLOP/s and memory bandwidth for compute costs
 * (it may be NULL only with opt->communication_only) and the default memory budget.
 *
 * Produces: *out, a plan with a spec for every stage and external node, a strategy and operand
 * specs for every stage node, the collectives implied, the cost split and the per-device peak
 * memory. Guarantees: an update node (assign_to >= 0) has exactly the spec of the leaf it
 * replaces, and an optimizer state has its parameter's state_spec (co-sharding by
 * construction); every resharding the plan implies is realisable by ap_reshard_cost; the same
 * input gives the same plan.
 *
 * Repeated layers: with opt->solve_per_layer, runs of >= 2 consecutive layers that are
 * structurally identical (same ops, shapes, attributes and wiring, up to the layer offset) are
 * solved once as a periodic layer (the boundary tensors to the neighbouring identical layer are
 * tied to the layer's own corresponding tensors, so consecutive layers connect without
 * resharding), and the other nodes are then solved with those layers fixed. Memory is checked
 * exactly on the composed stage; when it does not fit, the layers' memory share is tightened
 * (at most 3 times). This is exact for stationary plans (identical layers sharing one
 * strategy); see docs/intra-op.md. For a stage of more than 1000 nodes that still does not
 * fit, the smallest budget named is the smallest for such plans (smaller stages fall back to
 * the exact flat ILP).
 *
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL argument, bad node id or option, no cluster without
 * communication_only), AUTOPAR_ERR_GRAPH (graph has a sticky error), AUTOPAR_ERR_INFEASIBLE
 * (no plan fits the memory budget: the message names the smallest budget that fits; or no
 * combination of strategies is realisable under the options, naming a node), AUTOPAR_ERR_BACKEND
 * (GLPK failed), AUTOPAR_ERR_NOMEM. On error *out is NULL.
 * Progress and timings go to stderr when the environment variable AUTOPAR_VERBOSE=1.
 */
AP_INTERNAL ap_status ap_shard_stage(const autopar_graph *g, const int *nodes, int n_nodes,
                                     const ap_mesh *mesh, const autopar_cluster *cluster,
                                     const ap_shard_options *opt, ap_shard_plan **out);

/* Frees a plan. NULL-safe. */
AP_INTERNAL void ap_shard_plan_free(ap_shard_plan *p);

/* Prints the plan: totals, memory, then one line per stage node (name, op, spec, strategy,
 * costs) and one per collective. g gives the names (it must be the plan's graph). */
AP_INTERNAL void ap_shard_plan_print(const ap_shard_plan *p, const autopar_graph *g, FILE *f);

/* Writes the plan as JSON text (malloc'ed; free with free()). Nodes carry their names so that a
 * reader can check it is applied to the right graph (format in docs/intra-op.md).
 * Errors: AUTOPAR_ERR_INVALID_ARG, AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_shard_plan_to_json(const ap_shard_plan *p, const autopar_graph *g,
                                            char **out);

/* Reads a plan written by ap_shard_plan_to_json. When g is not NULL, node ids and names must
 * match g (AUTOPAR_ERR_PARSE naming the node otherwise). Errors: AUTOPAR_ERR_PARSE (malformed
 * JSON, missing field, bad spec text), AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_shard_plan_from_json(const char *json, const autopar_graph *g,
                                              ap_shard_plan **out);

/* ------------------------------------------------------------------------------------------ */
/* Lower level: the merged problem, for tests and benchmarks                                   */
/* ------------------------------------------------------------------------------------------ */

typedef struct ap_shard_problem ap_shard_problem;

/* Builds the merged problem of one flat ILP (no layer reuse) for the stage, as ap_shard_stage
 * would: strategies of every node, follower merging, costs. Same arguments and errors as
 * ap_shard_stage (AUTOPAR_ERR_INFEASIBLE when a merged node has no realisable strategy). */
AP_INTERNAL ap_status ap_shard_problem_build(const autopar_graph *g, const int *nodes,
                                             int n_nodes, const ap_mesh *mesh,
                                             const autopar_cluster *cluster,
                                             const ap_shard_options *opt,
                                             ap_shard_problem **out);
AP_INTERNAL void ap_shard_problem_free(ap_shard_problem *p);

/* Number of merged nodes (ILP groups) and the strategy count of group i. */
AP_INTERNAL int ap_shard_problem_n_groups(const ap_shard_problem *p);
AP_INTERNAL int ap_shard_problem_group_size(const ap_shard_problem *p, int i);

/* Evaluates one choice (choice[i] = strategy of group i) from first principles, independently
 * of the ILP's aggregated matrices: every node's compute, own communication and penalty, every
 * operand edge's resharding by a fresh ap_reshard_cost call, and the per-device peak memory by
 * liveness over the stage order. *objective = +inf (and *feasible = false) when a strategy or a
 * resharding is not realisable. Any output pointer may be NULL. */
AP_INTERNAL void ap_shard_problem_eval(const ap_shard_problem *p, const int *choice,
                                       double *objective, double *peak_memory, bool *feasible);

/* Solves the problem's ILP (GLPK; memory rows added lazily, see docs/intra-op.md) and writes
 * the chosen strategy per group to choice (ap_shard_problem_n_groups entries) and the
 * objective as ap_shard_problem_eval computes it. Errors as ap_shard_stage (an infeasible
 * budget names the smallest that fits). */
AP_INTERNAL ap_status ap_shard_problem_solve(ap_shard_problem *p, int *choice,
                                             double *objective);

/* The plan of one choice (as ap_shard_stage returns it). Errors: AUTOPAR_ERR_NOMEM,
 * AUTOPAR_ERR_INFEASIBLE (the choice is not realisable). */
AP_INTERNAL ap_status ap_shard_problem_plan(const ap_shard_problem *p, const int *choice,
                                            ap_shard_plan **out);

#endif /* AUTOPAR_SHARDING_H */
