/*
 * SPMD execution of one sharded stage over MPI ranks (DESIGN.md §7; reference/alpa-notes.md
 * §1.2 and §3).
 *
 * Input: a training graph (forward, backward and optimizer nodes), an ap_shard_plan covering
 * every node of it (one stage: passes/sharding.h), a logical mesh whose devices are the ranks of
 * a communicator, and a backend. Every rank builds its own program once ("lowering"):
 *
 *  - local shapes: every tensor's shard shape from its spec (ap_spec_local_shape); parameters,
 *    optimizer states and inputs get one persistent buffer each, every other tensor lives in one
 *    arena whose offsets come from a liveness-based memory plan (greedy by size over the
 *    program's instruction intervals). The plan's peak is known before anything runs.
 *  - communicators: one per mesh-axis line (axis 0: the devices sharing i1, ranked by i0;
 *    axis 1: sharing i0, ranked by i1) and one over the flattened mesh (ranked i0 * n1 + i1),
 *    split from the world communicator.
 *  - per node, in graph order: (1) resharding of every operand whose current spec differs from
 *    the spec the op reads it in: the collectives of ap_reshard_cost's route (the plan's own list
 *    of steps for that operand when it is consistent with the layout, otherwise a fresh
 *    ap_reshard_cost), with local slicing between them: all-gather, all-to-all, all-reduce,
 *    reduce-scatter on the right axis line, data rearranged around them with PERMUTE/SLICE
 *    kernels so that blocks are contiguous; (2) the local kernel with local shapes; (3) the
 *    op's own collectives (finishing a pending partial sum, gathering a ZeRO-sharded update),
 *    i.e. the resharding of the op's local result into the plan's output spec.
 *
 * How local kernels are made to compute the global op (the CPU kernels size everything from the
 * call's shapes, see runtime/cpu/kernels_cpu.c):
 *  - means and losses divide by LOCAL counts: MEAN, MSE_LOSS and CROSS_ENTROPY results are
 *    scaled by local/global count (a SCALE kernel after the op) before their pending sum is
 *    finished; MSE_LOSS_BACK and CROSS_ENTROPY_BACK get their scalar dL scaled the same way.
 *  - cross-entropy (and its backward) on logits whose last (vocabulary) dim is split runs
 *    vocabulary-parallel: per-device row statistics (CE_PARTIAL), all-gathered over the
 *    vocabulary axes and combined (CE_COMBINE), then the device's gradient columns
 *    (CE_BACK_PARTIAL); see lower_ce_parallel in spmd_lower.c.
 *  - the other row-wise ops (layernorm and its backward ops, softmax) need whole rows: a
 *    split of the last dim is moved onto a whole row dim (all-to-all there and back; every
 *    device then normalises its own rows), or gathered when no row dim can take it; their gain
 *    and bias are gathered. A causal softmax may keep its query dim split: the kernel's ia[1]
 *    gives the global index of the device's first query row.
 *  - a lookup in a vocabulary-split table is vocabulary-parallel: each device looks up the ids
 *    of its rows (zeros for the others: the EMBEDDING kernel's ia[0], ia[1]) and the result is
 *    a pending sum over the vocabulary axes; embedding gradients are computed for the whole
 *    vocabulary and then reduce-scattered / sliced into the plan's spec.
 *  - slice / concat / slice_back along a split axis, reshapes that would need an unexpressible
 *    split, and matmuls whose operand specs do not pair up, read their operands in the nearest
 *    layout that works (the split axes concerned gathered); operand layouts that cannot combine
 *    at all (axis conflicts) make the op run whole on every device from replicated operands.
 *  Every such choice that differs from what the plan says is a "deviation": it is counted,
 *  listed by ap_spmd_print (op, tensor, the plan's spec and the one used) and costs
 *  communication the plan did not count; results are the same. Any valid specs are accepted,
 *  also ones no plan would choose (pending sums on leaves, a split turned into a pending sum).
 *
 * Memory. The plan's peak (ap_spmd_stats.predicted_peak) is known when ap_spmd_new returns,
 * before any step. Updates write their parameter's or state's buffer in place, as the sharding
 * pass assumes (an update is first written in the apply part, which runs only after the ranks
 * agreed that everything before it succeeded, and nothing reads the old value afterwards; the
 * optimizer kernels allow their output to alias operand 0). An update the lowering cannot
 * place so (none in the graphs seen so far) stays in the arena and is copied over its leaf at
 * the end of a successful step.
 *
 * Parameters are initialised exactly as in a single-device run (ap_param_init_host): each rank
 * initialises only its tile, row by row. Optimizer states start at zero.
 *
 * Inputs: the user passes the GLOBAL batch to every rank (ap_spmd_set_input) and each rank keeps
 * the tile its spec assigns to it.
 *
 * Reads (ap_spmd_read) gather a whole tensor on every rank: with host-memory communicators (MPI)
 * the shards are all-gathered into host memory and placed by their tiles, which uses no backend
 * memory; otherwise (NCCL, or options.device_reads) a resharding program runs in the idle step
 * arena, or in a temporary one when it does not fit (counted by the measured peak).
 *
 * Errors. Every entry point is collective over the world communicator given to ap_spmd_new and
 * ends with an agreement (ap_comm_all_ok): a failure on one rank (a bad id in one rank's shard, an
 * allocation failure) becomes the same status and message ("rank W: ...") on every rank, never a
 * hang. Inside a step a rank whose kernel failed skips its remaining kernels but still takes part
 * in every collective of the program, so that its peers finish; no parameter or state changes
 * when a step fails on any rank before the apply part: the ranks agree before it, and when any
 * failed none runs it. A failure inside the apply part itself (a device fault in an optimizer
 * kernel or its collectives) is reported the same way, but the parameters and states it was
 * updating are then undefined.
 * Nothing exits or aborts; messages name the rank (through the agreement), the tensor and the op.
 * Not thread-safe.
 */
#ifndef AUTOPAR_SPMD_H
#define AUTOPAR_SPMD_H

#include "backend.h"
#include "comm.h"
#include "internal.h"
#include "mesh.h"
#include "sharding.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct ap_spmd ap_spmd;

typedef struct ap_spmd_options {
    uint64_t          seed;        /* parameter initialisation seed (as autopar_executor_new) */
    autopar_precision precision;   /* F32 (default) or F64 (CPU backend only)                 */
    /* Rank-order sums in every communicator (see comm.h): bit-identical results on every run,
     * at the price of extra traffic. Default false. */
    bool              deterministic;
    /* ap_spmd_read gathers through backend memory (a resharding program in the step arena, or
     * a temporary one) even when the communicators take host buffers, where it would otherwise
     * gather into host memory and leave the backend memory peak untouched. Always the case for
     * device communicators (NCCL). Default false; tests set it to cover that path. */
    bool              device_reads;
    /* Nodes of the stage whose values must stay readable (ap_spmd_shard_download) until the
     * step program's end: a pipeline stage's boundary outputs, sent after the part of the step
     * that computes them. Their arena slots are not reused (the memory plan counts that).
     * NULL / 0: none. Read during ap_spmd_new only. */
    const int        *keep_nodes;
    int               n_keep;
} ap_spmd_options;

/* Defaults: seed 0, F32, not deterministic, host reads where possible. NULL-safe. */
AP_INTERNAL void ap_spmd_options_default(ap_spmd_options *o);

/* Memory and program statistics of this rank. */
typedef struct ap_spmd_stats {
    /* Bytes of backend memory this rank's runtime holds at most, predicted by the memory plan
     * before running: persistent buffers (parameters, states, inputs) + the largest sum of the
     * (aligned) sizes of the transient tensors live at any one instruction. */
    size_t  predicted_peak;
    /* Measured: the largest total of the runtime's live backend allocations so far (persistent
     * buffers, the arena, and temporary buffers of reads that did not fit the arena). The arena
     * is as large as the greedy offset assignment needs, so measured >= predicted; the gap is
     * fragmentation. */
    size_t  measured_peak;
    size_t  persistent_bytes;      /* parameters + optimizer states + inputs                  */
    size_t  arena_bytes;           /* transient tensors, laid out by the memory plan          */
    size_t  transient_peak;        /* liveness peak of the transient tensors                  */
    double  plan_peak;             /* the sharding pass's own estimate (ap_shard_plan)        */
    int     n_instructions;        /* per step                                                 */
    int     n_kernels;
    int     n_collectives;         /* per step, by kind below                                  */
    int     n_coll_kind[AP_COLL_KIND_COUNT];
    double  coll_bytes;            /* bytes this rank sends + receives per step (payloads)     */
    int     n_deviations;          /* operand layouts that differ from the plan (listed by print) */
    int     n_route_plan;          /* reshardings executed along the plan's listed collectives  */
    int     n_route_fresh;         /* reshardings whose route came from ap_reshard_cost here    */
    /* Timers (CLOCK_MONOTONIC), accumulated over every ap_spmd_step since ap_spmd_new (the step
     * program only: reads run their own programs, which count into kernel/comm seconds too).
     * step_seconds: whole ap_spmd_step calls that succeeded; kernel_seconds: kernel, zero-fill
     * and backend-synchronize instructions; comm_seconds: collective calls (including the wait
     * for slower peers). The rest of step_seconds is runtime overhead (agreements, loss
     * download, update commits, dispatch). Two clock reads per instruction. */
    int64_t timed_steps;
    double  step_seconds, kernel_seconds, comm_seconds;
} ap_spmd_stats;

/*
 * Builds this rank's program and its buffers, initialises parameters. Collective over `world`.
 *
 * g: a training graph (autopar_build_training) without a sticky error; borrowed, must outlive
 * the session and not change. plan: a plan of ap_shard_stage on a mesh of mesh->shape (copied:
 * it may be freed afterwards), normally for ALL of g's nodes. A plan for a subset (one pipeline
 * stage, building block of multi-stage sessions; sessions still refuse them) is accepted: only
 * its in_stage nodes are lowered; its `external` nodes get persistent values in their plan spec
 * that the caller fills with ap_spmd_write (any op) before the instructions reading them run;
 * other nodes get nothing (writing or reading them is AUTOPAR_ERR_INVALID_ARG). Only in-stage
 * parameters are initialised and only in-stage updates are committed (an update of another
 * stage's leaf is AUTOPAR_ERR_UNSUPPORTED); without the loss in the stage, steps report loss 0.
 * ap_spmd_read reads in-stage leaves only. mesh: its devices are ranks of `world`
 * (mesh device k = world rank devices[k]); world's size must equal the mesh's device count.
 * b: this rank's backend (borrowed); its buffers must be ones the communicator accepts (host
 * memory for MPI). world: borrowed; the session splits its own communicators from it.
 *
 * Errors (the same on every rank): AUTOPAR_ERR_INVALID_ARG (NULL, world size different from the
 * mesh's device count, mesh devices not the world's ranks, plan for another mesh shape or graph
 * size, a node outside the stage, backend/communicator memory mismatch, bad precision),
 * AUTOPAR_ERR_GRAPH (sticky graph error, no optimizer), AUTOPAR_ERR_SHAPE (a spec does not
 * divide its tensor), AUTOPAR_ERR_UNSUPPORTED (an op the backend lacks, an impossible
 * resharding), AUTOPAR_ERR_NOMEM / AUTOPAR_ERR_BACKEND / AUTOPAR_ERR_MPI.
 */
AP_INTERNAL ap_status ap_spmd_new(const autopar_graph *g, const ap_shard_plan *plan,
                                  const ap_mesh *mesh, ap_backend *b, ap_comm *world,
                                  const ap_spmd_options *opt, ap_spmd **out);

/* Frees every buffer and communicator of the session (local; not collective). NULL-safe. */
AP_INTERNAL void ap_spmd_free(ap_spmd *s);

/* Gives input tensor t its GLOBAL value for the next steps: `data` holds all n elements
 * (row-major; float for F32 tensors, int32_t for I32), the same on every rank; each rank keeps
 * its tile. Collective. Errors (agreed): AUTOPAR_ERR_INVALID_ARG (t not an input of the graph,
 * NULL data), AUTOPAR_ERR_SHAPE (n is not the tensor's element count: a batch of the wrong
 * size), AUTOPAR_ERR_NOMEM, AUTOPAR_ERR_BACKEND. */
AP_INTERNAL ap_status ap_spmd_set_input(ap_spmd *s, const autopar_tensor *t, const void *data,
                                        int64_t n);

/* As ap_spmd_set_input, for inputs, parameters, optimizer states (checkpoint loading) and the
 * external nodes of a stage plan (boundary values from another stage):
 * every rank passes the whole value, each keeps its tile. Collective; errors as
 * ap_spmd_set_input (agreed). */
AP_INTERNAL ap_status ap_spmd_write(ap_spmd *s, const autopar_tensor *t, const void *data,
                                    int64_t n);

/* Sets the number of completed steps (the optimizer's step counter, e.g. AdamW's bias
 * correction, counts from it). Local; every rank must set the same value. */
AP_INTERNAL void ap_spmd_set_steps(ap_spmd *s, int64_t steps);

/* One training step: forward, backward, optimizer apply, then every parameter and optimizer
 * state takes its updated value (only when the step succeeded on every rank). *loss (may be
 * NULL) gets the loss before the update, the same on every rank. Collective. Errors (agreed):
 * whatever a kernel or collective reports, prefixed with the failing rank. */
AP_INTERNAL ap_status ap_spmd_step(ap_spmd *s, double *loss);

/* Feeds micro-batch k's inputs (ap_spmd_set_input for each of them). Collective; must return
 * the same status on every rank (ap_spmd_set_input's are agreed). */
typedef ap_status (*ap_spmd_feed_fn)(void *ctx, int k);

/* One training step with gradient accumulation over n_micro >= 1 micro-batches (DESIGN.md §7;
 * Alpa's micro-batching on one stage). The step program is cut in two at its first instruction
 * of an optimizer (APPLY-phase) node: the "micro part" (forward and backward, with whatever
 * collectives the plan put there) runs once per micro-batch, after feed(ctx, k) has set that
 * micro-batch's inputs; every transient value that crosses the cut (the gradients, in whatever
 * layout the plan hands them to the optimizer, possibly still pending a sum, and the loss) is
 * accumulated into a persistent accumulator (micro-batch 0 copies, later ones add); then each
 * crossing value is set to its accumulator / n_micro and the "apply part" (the resharding of
 * gradients into the optimizer's layouts, hence the gradient synchronisation when the plan
 * leaves it to the optimizer's operands, and the updates) runs ONCE, after an agreement, as in
 * ap_spmd_step. Since every loss is a mean over its micro-batch, the result is the step on
 * the mean loss over the global batch (up to float summation order). *loss gets the mean of the
 * micro-batch losses. The accumulators (one aligned copy of every crossing value) are allocated
 * on first use and count in the measured peak, not in the predicted one.
 * Collective. Errors (agreed): AUTOPAR_ERR_INVALID_ARG (n_micro < 1, NULL feed),
 * AUTOPAR_ERR_UNSUPPORTED (a non-optimizer node lowered after the cut, a non-float value
 * crossing it), and those of ap_spmd_step or of feed. No parameter or state changes on error. */
AP_INTERNAL ap_status ap_spmd_step_accum(ap_spmd *s, int n_micro, ap_spmd_feed_fn feed,
                                         void *ctx, double *loss);

/*
 * Pipeline stages (runtime/pipeline.h drives these): the step program of a stage run in parts,
 * so that the pipeline schedule can interleave micro-batches and boundary transfers.
 *  - forward part: the instructions of FORWARD-phase nodes (the program's first part; graph
 *    order puts every forward node before every backward node);
 *  - backward part: the BACKWARD-phase instructions up to the optimizer cut of
 *    ap_spmd_step_accum; after it the values crossing the cut are accumulated (first backward
 *    of the step: copied);
 *  - apply part: accumulators / B, the deferred gradient sums, the optimizer (as
 *    ap_spmd_step_accum).
 * Several micro-batches may be in flight between their forward and their backward: the values
 * micro-batch k's backward reads from its forward (transient values written in the forward
 * part and read later, inputs, and received activations) are copied into a stash slot after
 * forward k and back before backward k. Slots are allocated on demand and kept; the predicted
 * peak counts the accumulators and `in_flight` slots.
 * Status convention: `prior` is this rank's status so far in the step; when it is a failure the
 * part skips its kernels and local copies but still runs its collectives (so the stage's other
 * ranks finish), and returns prior. The forward and backward parts never agree; the apply part
 * agrees over the communicator given (the pipeline's world) before its updates, which run
 * only when every rank succeeded, and ap_spmd_stage_finish agrees again at the end.
 */
/* Prepares a step of n_micro micro-batches with at most in_flight forwards not yet followed by
 * their backward (1 <= in_flight <= n_micro). Local; the same result on every rank of the stage.
 * Errors: AUTOPAR_ERR_INVALID_ARG, AUTOPAR_ERR_GRAPH (no optimizer), AUTOPAR_ERR_UNSUPPORTED (a
 * program whose phases are not in forward / backward / apply order), AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_spmd_stage_begin(ap_spmd *s, int n_micro, int in_flight);
/* Forward part of micro-batch k (its inputs and received activations written before). */
AP_INTERNAL ap_status ap_spmd_stage_forward(ap_spmd *s, int k, ap_status prior);
/* Backward part of micro-batch k (its received gradients written before); `first`: the first
 * backward of the step (writes the accumulators). */
AP_INTERNAL ap_status ap_spmd_stage_backward(ap_spmd *s, int k, bool first, ap_status prior);
/* Apply part, once per step after every backward: accumulators / B and the deferred gradient
 * sums, then an agreement over `agree` (collective over it: every rank of the pipeline calls it
 * after its last transfer), then the updates (skipped everywhere when any rank failed). */
AP_INTERNAL ap_status ap_spmd_stage_apply(ap_spmd *s, int n_micro, ap_status prior,
                                          ap_comm *agree);
/* Ends the step: loss read, agreement over `agree` (collective over it), commit, step count.
 * *loss (may be NULL) gets the mean loss when the stage computes it, else 0. */
AP_INTERNAL ap_status ap_spmd_stage_finish(ap_spmd *s, ap_status st, ap_comm *agree,
                                           double *loss);
/* Role of node id in the stage: 0 not read, 1 computed (or a leaf) of the stage, 2 external. */
AP_INTERNAL int  ap_spmd_role(const ap_spmd *s, int node);
/* Whether the stage computes the loss. */
AP_INTERNAL bool ap_spmd_has_loss(const ap_spmd *s);
/* Bytes of this rank's shard of a node's value (0 when it has none). */
AP_INTERNAL size_t ap_spmd_shard_bytes(const ap_spmd *s, int node);
/* Copies this rank's shard of a node's current value (in the backend's element size: raw
 * bytes) to / from host memory. Download: any node with a value (a computed value must still be
 * live: a kept node, or one read right after the part computing it); upload: persistent values
 * only (leaves and externals). Local. Errors: AUTOPAR_ERR_INVALID_ARG, AUTOPAR_ERR_SHAPE (bytes
 * differ from the shard's), AUTOPAR_ERR_BACKEND. */
AP_INTERNAL ap_status ap_spmd_shard_download(ap_spmd *s, int node, void *host, size_t bytes);
AP_INTERNAL ap_status ap_spmd_shard_upload(ap_spmd *s, int node, const void *host, size_t bytes);
/* Adds a pipeline's step time and its point-to-point time to the stage's timers (a step with
 * step > 0 counts as timed). */
AP_INTERNAL void ap_spmd_add_timers(ap_spmd *s, double step, double comm);

/* Number of completed steps. */
AP_INTERNAL int64_t ap_spmd_steps(const ap_spmd *s);

/* Copies the WHOLE current value of t (a parameter, optimizer state or input: the tensors kept
 * between steps) into data on every rank, gathering the shards (float for F32, int32_t for I32;
 * n must be the element count). Collective. Errors (agreed): AUTOPAR_ERR_INVALID_ARG (not a
 * tensor kept between steps), AUTOPAR_ERR_SHAPE, AUTOPAR_ERR_NOMEM, AUTOPAR_ERR_MPI,
 * AUTOPAR_ERR_BACKEND. */
AP_INTERNAL ap_status ap_spmd_read(ap_spmd *s, const autopar_tensor *t, void *data, int64_t n);

/* This rank's statistics (zeros for NULL). */
AP_INTERNAL void ap_spmd_get_stats(const ap_spmd *s, ap_spmd_stats *st);

/* Prints this rank's program summary: mesh coordinate, memory (predicted / measured / plan),
 * instruction and collective counts, and one line per deviation from the plan. */
AP_INTERNAL void ap_spmd_print(const ap_spmd *s, FILE *f);

/* Prints every instruction of this rank's step program (debugging). */
AP_INTERNAL void ap_spmd_dump(const ap_spmd *s, FILE *f);

#endif /* AUTOPAR_SPMD_H */
