/*
 * Stage costs of the inter-operator pass (DESIGN.md §6, reference/alpa-notes.md §2.4-2.5): the
 * time and memory of "layers i..j on submesh m with logical mesh c", the entries of the stage
 * DP's table, composed from per-unit intra-operator solutions.
 *
 * Solve units. A unit is a set of nodes solved by one ap_shard_stage call: the forward,
 * backward and apply nodes of a contiguous piece of the forward graph, with the leaves it owns.
 * Units refine the layers of the layer pass (every layer is a contiguous run of units; by
 * default a unit is a layer, parallelize.c may cut layers further at repeated blocks). Units
 * that are structurally identical (same ops, shapes, attributes, wiring inside the unit and to
 * its external operands, up to the node ids) form one type; a type is solved once per logical
 * mesh and its solution serves every unit of the type (shared ap_shard_cache as well).
 *
 * Composition (Alpa's "individual" 1D profiling mode, made analytic). For a stage of layers
 * i..j on a mesh configuration:
 *   - forward / backward time per micro-batch = sum over its units of the unit solution's
 *     compute + own collectives + resharding of FORWARD / BACKWARD nodes, plus, for every
 *     tensor produced in one unit and read in another unit of the stage, the resharding from
 *     the producer's output spec to the spec the consumer unit's solution wanted it in
 *     (ap_reshard_cost). Approximation: each unit is optimised alone with its external operands
 *     free (any layout at no cost), so the composition can cost more than one ILP over the
 *     whole stage, never less than the true cost of the composed plan's layouts;
 *   - the collectives that finish a parameter gradient (all-reduce / reduce-scatter over the
 *     data-parallel axis) run once per step on the accumulated gradients, not per micro-batch,
 *     and so do the optimizer's nodes (phase APPLY) and tensors that cross units once per step;
 *     they are kept apart (grad_sync, apply, step_send);
 *   - boundary tensors: a tensor produced in the stage and read by a later (activation) or
 *     earlier (gradient) stage is sent once per micro-batch over the link between the meshes:
 *     alpha + bytes / bandwidth, with the inter-host link (bandwidth per host, times the hosts
 *     the submesh spans, times its share of a host) on a multi-host cluster and the intra-host
 *     link (per device, times the submesh's devices) on one host. The neighbour's placement is
 *     not known while the table is filled, so two (1, w) stages that end up side by side on one
 *     host are charged the slower inter-host link;
 *   - stage time for the DP = forward + backward + send + (grad_sync + apply + step_send) / B.
 *     With it the DP objective sum_s t_s + (B - 1) max_s t_s is exactly B (f + b) + sync +
 *     apply for one stage, and spreads the once-per-step work of each stage over its B
 *     micro-batches when there are several;
 *   - memory per device: parameters, optimizer state and gradient accumulators of every unit
 *     (their sharded sizes), plus per micro-batch in flight the forward tensors that backward
 *     nodes read (and received boundary activations), plus the largest transient working set
 *     of a unit (its ILP peak minus those). Under 1F1B a stage followed by k stages holds
 *     min(k + 1, B) micro-batches (GPipe: B), which gives max_n_succ.
 */
#ifndef AUTOPAR_STAGE_COST_H
#define AUTOPAR_STAGE_COST_H

#include "plan.h"
#include "sharding.h"
#include "stage_dp.h"

#include <stdbool.h>

/* A logical-mesh configuration of a submesh. */
typedef struct ap_mesh_cfg {
    int      submesh;            /* index of the submesh (ap_cost_submesh)                    */
    int      dp, mp;             /* logical mesh dp x mp                                      */
    int      force_batch_axis;   /* 0: batch dims forced onto axis 0; -1: the ILP is free     */
    ap_mesh *mesh;               /* owned: the mesh on hosts [0, h) x devices [0, w); link    */
                                 /* coefficients depend only on the shape, so costs computed  */
                                 /* here hold wherever the submesh is placed                  */
} ap_mesh_cfg;

typedef struct ap_cost_params {
    const autopar_graph   *g;        /* training graph; node->layer = layer of the layer pass */
    int                    n_layers;
    /* Solve unit of every node id (g->n_nodes entries), or NULL for one unit per layer. Units
     * must be numbered so that each layer is a contiguous run of units, in layer order. */
    const int             *unit_of;
    const autopar_cluster *cluster;
    int                    n_micro_batches;   /* B >= 1                                      */
    autopar_schedule       schedule;
    double                 budget;            /* bytes per device; < 0: no limit             */
    /* Base options of the unit solves; memory_budget, force_batch_dim_to_mesh_axis, layer_of
     * and cache are set by this module. */
    ap_shard_options       shard;
    /* Memory variants per unit type and configuration (>= 1). The unit solves have no memory
     * limit (memory is checked on composed stages), so the fastest sharding may replicate
     * parameters that a deep stage cannot hold; leaner variants give the DP other points of
     * the time / memory trade-off: variant 0 is the fastest sharding; variant 1 the fastest
     * that does not fully replicate any parameter (tensor or ZeRO-3 style sharding; one more
     * unconstrained solve); variant v >= 2 the fastest whose peak is at most half that of
     * variant v - 1 (a memory-constrained ILP, much slower: an infeasible one is proved by a
     * second ILP). A ladder ends when a variant is infeasible or saves no memory. The DP sees
     * (configuration, variant) pairs as configurations. */
    int                    n_variants;
    bool                   verbose;
} ap_cost_params;

typedef struct ap_cost_ctx ap_cost_ctx;

/* Builds the units, their external operands, their types and the cross-unit tensors of g.
 * Reads g (which must outlive the context). Errors: AUTOPAR_ERR_INVALID_ARG (bad parameters, a
 * unit spanning two layers, layers not covered by units in order), AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_cost_ctx_new(const ap_cost_params *prm, ap_cost_ctx **out);
AP_INTERNAL void ap_cost_ctx_free(ap_cost_ctx *x);

/* Adds (or finds) the configuration dp x mp with the given forcing on submesh s and writes its
 * index. Errors: AUTOPAR_ERR_INVALID_ARG (bad shape: ap_submesh_check; dp * mp not the submesh
 * size; force not 0 / -1), AUTOPAR_ERR_NOMEM, the errors of ap_mesh_new_block. */
AP_INTERNAL ap_status ap_cost_add_config(ap_cost_ctx *x, ap_submesh_shape s, int dp, int mp,
                                         int force_batch_axis, int *index);

/* Adds the automatic search space of submesh s: for every mp dividing the submesh size n with
 * mp <= devices per host, (n/mp) x mp with the batch forced onto axis 0 (when `force`; skipped
 * when some input's batch dim is not divisible by n/mp), then n x 1 with the ILP free; without
 * `force` the same shapes, all free. Writes submesh s's configuration indices (all of them so
 * far, in the order added; valid until the next configuration is added) to *configs and their
 * number to *count (both may be NULL). Errors: as ap_cost_add_config. */
AP_INTERNAL ap_status ap_cost_add_auto_configs(ap_cost_ctx *x, ap_submesh_shape s, bool force,
                                               const int **configs, int *count);

/* The submeshes and configurations added so far. cfgs of submesh m: ap_cost_submesh_configs. */
AP_INTERNAL int ap_cost_n_submeshes(const ap_cost_ctx *x);
AP_INTERNAL ap_submesh_shape ap_cost_submesh(const ap_cost_ctx *x, int m);
AP_INTERNAL int ap_cost_n_configs(const ap_cost_ctx *x);
AP_INTERNAL const ap_mesh_cfg *ap_cost_config(const ap_cost_ctx *x, int c);
/* Configuration indices of submesh m, in the order they were added; *n gets the count. */
AP_INTERNAL const int *ap_cost_submesh_configs(const ap_cost_ctx *x, int m, int *n);

/* The number of memory variants (ap_cost_params.n_variants). */
AP_INTERNAL int ap_cost_n_variants(const ap_cost_ctx *x);

/* Solves every unit type on every configuration (the per-layer ILP pass). Errors: those of
 * ap_shard_stage other than AUTOPAR_ERR_INFEASIBLE (an infeasible unit makes the
 * configuration unusable for stages containing it, it is not an error). */
AP_INTERNAL ap_status ap_cost_solve_all(ap_cost_ctx *x);

/* Cost of the stage of layers first..last on configuration cfg with every unit in memory
 * variant `var` (its type's last variant when its ladder is shorter), solving the units it needs
 * that are not solved yet. *feasible is false when a unit has no realisable sharding on that
 * mesh or a resharding between its units is not realisable; out is then only partly filled.
 * Errors: as ap_cost_solve_all, AUTOPAR_ERR_INVALID_ARG (bad range or configuration). */
AP_INTERNAL ap_status ap_cost_range(ap_cost_ctx *x, int first, int last, int cfg, int var,
                                    ap_stage_cost *out, bool *feasible);

/* max_n_succ of a stage with `fixed` bytes plus `per_mb` bytes per micro-batch in flight under
 * the context's schedule, B and a budget (< 0: none). */
AP_INTERNAL int ap_cost_max_n_succ(const ap_cost_ctx *x, double fixed, double per_mb,
                                   double budget);

/* Fixed and per-micro-batch memory of a stage cost. */
static inline double ap_stage_cost_fixed_memory(const ap_stage_cost *c) {
    return c->params + c->opt_state + c->grads + c->step_recv + c->transient;
}

/* Fills the stage DP's table over the context's submeshes (table submesh m = ap_cost_submesh
 * m, table config c = configuration c / V of ap_cost_submesh_configs(m) in memory variant
 * c % V, V = ap_cost_n_variants). t must have L layers, the context's submesh count and
 * n_configs >= V x the largest config count. Variants identical to the previous one for
 * every unit of a range are left infeasible (they add nothing). fixed / per_mb (may be NULL;
 * else the table's entry count each) receive every entry's memory figures (NaN where the
 * entry is infeasible or absent), for re-deriving max_n_succ under another budget. */
AP_INTERNAL ap_status ap_cost_fill_table(ap_cost_ctx *x, ap_stage_table *t, double *fixed,
                                         double *per_mb);

/* The intra-operator plan of the stage of layers first..last on configuration cfg in memory
 * variant var: the unit
 * solutions mapped onto the stage's nodes, with the resharding between its units as
 * collectives (direct routes from the producer's spec to the spec each consumer reads, which
 * cost at most the composition's estimate). peak_memory is set to `memory` and memory_budget
 * to the context's budget. Output: *out (free with ap_shard_plan_free).
 * Errors: as ap_cost_range; AUTOPAR_ERR_INFEASIBLE when the stage is not feasible. */
AP_INTERNAL ap_status ap_cost_stage_plan(ap_cost_ctx *x, int first, int last, int cfg, int var,
                                         double memory, ap_shard_plan **out);

/* The tensors crossing stages when layer l belongs to stage stage_of_layer[l] (n_layers
 * entries): one entry per (tensor, receiving stage). Output: *out (malloc'ed, may be NULL when
 * *n is 0). Errors: AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_cost_transfers(const ap_cost_ctx *x, const int *stage_of_layer,
                                        ap_plan_transfer **out, int *n);

/* Counters: units, unit types, ap_shard_stage calls, unit solutions served to another unit
 * of the same type, and the seconds spent in ap_shard_stage. */
AP_INTERNAL void ap_cost_stats(const ap_cost_ctx *x, int *n_units, int *n_types, int *n_solves,
                               int *n_reused, double *solve_seconds);

#endif /* AUTOPAR_STAGE_COST_H */
