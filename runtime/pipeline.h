/*
 * Pipeline execution of a plan (DESIGN.md §7; reference/alpa-notes.md §3): every rank runs one
 * stage of the plan as an SPMD program over its stage's mesh (runtime/spmd.h) and follows its
 * stage's instruction list of the plan's schedule (passes/schedule.h, GPipe or 1F1B).
 *
 * Setup (ap_pipeline_new, collective over the world):
 *  - the world is split by stage (rank r runs device r of the cluster; a stage's communicator
 *    ranks its devices in the order of the plan's row-major logical mesh);
 *  - this rank's stage program: the stage's shard plan, lowered with its boundary outputs kept
 *    alive until the step's end (they are sent after the part that computes them);
 *  - cross-mesh resharding of every tensor crossing stages (the plan's transfers) by tile
 *    intersection, each receiving tile crossing between the meshes once (Alpa's local
 *    all-gather): the h devices of the receiving mesh that hold the same tile (replicas) each
 *    fetch one part of it (the tile cut into h slabs along its longest dimension), then send
 *    their part to the other replicas inside the mesh. A part is fetched from every distinct
 *    tile of the sending spec that meets it, by ONE holder of that tile (replica j mod
 *    holders), as the intersection box; the union of a receiver's boxes is exactly its tile and
 *    no box reaches a device twice. A receiver that holds zeros of a pending-sum spec gets
 *    nothing. A sender spec pending a sum is refused (AUTOPAR_ERR_UNSUPPORTED).
 *  - transfer kinds: parameters, optimizer states and constants read by another stage are sent
 *    once at the start of every step (before any micro-batch); forward values (activations,
 *    inputs) after RUN_FORWARD k of the sending stage, received before RUN_FORWARD k of the
 *    receiving one (the schedule's SEND/RECV_ACTIVATION, generalised to any later stage);
 *    backward values (gradients, and gradient contributions to another stage's parameter: the
 *    plan calls those "per step", they are sent per micro-batch here because the receiving
 *    stage adds them inside its own backward of that micro-batch) after RUN_BACKWARD k, to any
 *    earlier stage. A forward value sent to an earlier stage or a backward value to a later one
 *    has no place in the schedule: AUTOPAR_ERR_UNSUPPORTED naming the tensor.
 *
 * A step (ap_pipeline_step): the leaf transfers; then the stage's instructions in order:
 * RUN_FORWARD k (feed micro-batch k's inputs of the stage, forward part), RUN_BACKWARD k
 * (backward part, gradients accumulated), APPLY (mean of the accumulators, gradient sums, the
 * optimizer); every maximal run of consecutive SEND/RECV instructions is posted as one group of
 * non-blocking point-to-point operations over the world and waited for together (the
 * schedule's "grouped" send semantics, which its simulation finds deadlock-free), followed,
 * where received tiles have replicas, by a second group among the receiving stage's ranks
 * only (the replicas' all-gather, which no other stage waits on). Messages go
 * through host memory over the world (MPI) communicator, whatever the backend.
 * Errors never hang: a rank whose part failed keeps following its list, skipping kernels but
 * taking part in every collective and message; each message carries its sender's status (and
 * message), so receivers stop computing too; the step ends with an agreement over the world,
 * and updates are committed only when every rank succeeded. The error reported everywhere
 * names the first failing rank.
 *
 * A plan of one stage runs as the SPMD program alone: ap_spmd_step (one micro-batch) or
 * ap_spmd_step_accum (several).
 */
#ifndef AUTOPAR_PIPELINE_H
#define AUTOPAR_PIPELINE_H

#include "plan.h"
#include "spmd.h"

typedef struct ap_pipeline ap_pipeline;

/* Builds this rank's stage program, its communicators and transfer routes; initialises its
 * parameters. Collective over `world` (host-memory communicator whose size is the plan's device
 * count); `dev_world` is the communicator over the same ranks the stage programs' collectives
 * use (the NCCL one for the CUDA backend; `world` itself for the CPU backend). p, b, world and
 * dev_world are borrowed and must outlive the pipeline. o: options of the stage programs
 * (keep_nodes is set here). Errors (agreed): AUTOPAR_ERR_INVALID_ARG (NULL, world size),
 * AUTOPAR_ERR_UNSUPPORTED (a transfer the schedule cannot carry), those of ap_spmd_new. */
AP_INTERNAL ap_status ap_pipeline_new(const autopar_plan *p, ap_backend *b, ap_comm *world,
                                      ap_comm *dev_world, const ap_spmd_options *o,
                                      ap_pipeline **out);

/* Frees everything (local). NULL-safe. */
AP_INTERNAL void ap_pipeline_free(ap_pipeline *pp);

/* This rank's stage index and its SPMD program (borrowed: inputs are written to it, stats read). */
AP_INTERNAL int      ap_pipeline_stage(const ap_pipeline *pp);
AP_INTERNAL ap_spmd *ap_pipeline_spmd(const ap_pipeline *pp);

/* One training step over the plan's B micro-batches. feed(ctx, k) sets micro-batch k's inputs
 * of this rank's stage (ap_spmd_set_input on ap_pipeline_spmd; collective over the stage and
 * agreed there); it may be NULL when B = 1 and the inputs were written before. *loss (may be
 * NULL) gets the mean loss over the micro-batches on every rank. Collective over the world.
 * Errors (agreed): whatever a part, a feed or a message reported, naming the rank. */
AP_INTERNAL ap_status ap_pipeline_step(ap_pipeline *pp, ap_spmd_feed_fn feed, void *ctx,
                                       double *loss);

/* The whole value of a parameter, optimizer state or input (float, or int32 for I32 inputs) on
 * every rank: read by the stage that owns it, broadcast to the world. Collective over the world.
 * Errors (agreed): those of ap_spmd_read, AUTOPAR_ERR_INVALID_ARG (no stage owns the tensor). */
AP_INTERNAL ap_status ap_pipeline_read(ap_pipeline *pp, const autopar_tensor *t, void *data,
                                       int64_t n);

/* Writes the whole value of a parameter or optimizer state (every rank passes it; the owning
 * stage keeps its tiles). Collective over the world; errors (agreed) as ap_spmd_write. */
AP_INTERNAL ap_status ap_pipeline_write(ap_pipeline *pp, const autopar_tensor *t,
                                        const void *data, int64_t n);

/* Completed steps (the same on every rank), and setting them (checkpoint loading). */
AP_INTERNAL int64_t ap_pipeline_steps(const ap_pipeline *pp);
AP_INTERNAL void    ap_pipeline_set_steps(ap_pipeline *pp, int64_t steps);

/* Point-to-point traffic this rank sends per step (payload bytes, headers not counted). */
typedef struct ap_pipeline_traffic {
    int    cross_messages;   /* to devices of other stages                                  */
    double cross_bytes;
    int    gather_messages;  /* to replicas in this stage (all-gathers of received tiles)  */
    double gather_bytes;
} ap_pipeline_traffic;

/* Writes pp's traffic (zeros for NULL or a one-stage plan). */
AP_INTERNAL void ap_pipeline_get_traffic(const ap_pipeline *pp, ap_pipeline_traffic *out);

#endif /* AUTOPAR_PIPELINE_H */
