/*
 * The plan object of the inter-operator pass (the public handle is autopar_plan, include/autopar.h
 * section 7). passes/parallelize.c builds it; the runtime reads the fields directly; plan.c
 * prints, serialises and reads it back.
 *
 * A plan owns:
 *   - a copy of the training graph, whose node->layer fields are the layers of the layer pass
 *     (node ids are those of the graph given to autopar_parallelize);
 *   - a copy of the cluster;
 *   - one ap_plan_stage per pipeline stage, in pipeline order: layer range, submesh and its
 *     placement, the logical mesh and its device ids, the node ids the stage computes, the
 *     intra-operator plan (ap_shard_plan, sharding.h) of those nodes on that mesh, and the cost
 *     model's figures;
 *   - the tensors that cross stages (ap_plan_transfer), which the runtime sends between meshes.
 *
 * Time figures are seconds, memory figures bytes per device.
 */
#ifndef AUTOPAR_PLAN_H
#define AUTOPAR_PLAN_H

#include "cluster.h"
#include "internal.h"
#include "mesh.h"
#include "sharding.h"

#include <stdbool.h>
#include <stdio.h>

/* Version written by ap_plan_to_json and the only one the reader accepts. */
#define AP_PLAN_JSON_VERSION 1

/* Cost-model figures of one stage (see docs/inter-op.md, "Stage cost"). */
typedef struct ap_stage_cost {
    /* Per micro-batch. forward / backward include the stage's own collectives and the resharding
     * between its layers; *_compute is their compute part. send: boundary tensors this stage
     * sends to its neighbours (activations forward, gradients backward). */
    double forward, backward, forward_compute, backward_compute, send;
    double send_activation, send_gradient;   /* the two directions of send                  */
    /* Per step: gradient synchronisation (the collectives that finish parameter gradients,
     * run once on the accumulated gradients), the optimizer apply (its compute and
     * collectives), and tensors sent once per step (parameters read by another stage, gradient
     * contributions accumulated over the micro-batches). */
    double grad_sync, apply, step_send;
    /* The stage DP's time of the stage: forward + backward + send + (grad_sync + apply +
     * step_send) / B: the once-per-step work spread over the B micro-batches. */
    double stage_time;
    /* Memory per device: parameters, optimizer state, gradient accumulators, activations held
     * for the backward pass per micro-batch (including received boundary activations), tensors
     * received once per step (parameter copies and their gradient buffers), and the largest
     * transient working set of a layer. Peak with k micro-batches in flight =
     * params + opt_state + grads + step_recv + transient + k * activations. */
    double params, opt_state, grads, activations, step_recv, transient;
    int    max_n_succ;    /* how many stages may follow (1F1B memory bound), INT_MAX = any   */
} ap_stage_cost;

typedef struct ap_plan_stage {
    int           first_layer, last_layer;   /* inclusive                                    */
    int           submesh[2];                /* physical (hosts, devices per host)           */
    int           host_begin, device_begin;  /* placement                                    */
    int           mesh_shape[2];             /* logical (dp, mp)                             */
    int           force_batch_axis;          /* 0: batch dim forced onto axis 0; -1: free    */
    int           n_devices;
    int          *devices;                   /* owned; row-major over the logical mesh       */
    int           n_nodes;
    int          *nodes;                     /* owned; ascending node ids                    */
    ap_shard_plan *shard;                    /* owned; the stage's intra-operator plan       */
    ap_stage_cost cost;
    int           in_flight;                 /* micro-batches of activations held at the peak */
    double        memory;                    /* estimated peak bytes per device              */
} ap_plan_stage;

/* A tensor produced on one stage and read on another. */
typedef struct ap_plan_transfer {
    int    tensor;        /* node id                                                          */
    int    from_stage, to_stage;
    /* false: sent for every micro-batch (activations, their gradients); true: once per step
     * (a parameter read by another stage, sent before the first micro-batch; or a gradient
     * contribution to a parameter of another stage, accumulated over the micro-batches and
     * sent after the last one). */
    bool   per_step;
    double bytes;         /* size of the whole tensor                                         */
} ap_plan_transfer;

/* Per-pass wall times and counters of one autopar_parallelize call. */
typedef struct ap_plan_stats {
    double layers_seconds;      /* layer pass (and the solve units)                          */
    double ilp_seconds;         /* per-layer intra-operator solves                           */
    double dp_seconds;          /* stage DP / uniform / manual evaluation                    */
    double stage_seconds;       /* stage plans: composition of the solved layers             */
    double total_seconds;
    int    n_units;             /* solve units (layers, refined at repeated blocks)          */
    int    n_unit_types;        /* structurally distinct units                               */
    int    n_mesh_configs;      /* (submesh, logical mesh) candidates                        */
    int    n_solves;            /* ap_shard_stage calls                                      */
    int    n_cache_hits;        /* unit solutions reused from an identical unit              */
} ap_plan_stats;

struct autopar_plan {
    autopar_graph    *graph;           /* owned copy; node->layer = layer of the layer pass   */
    autopar_cluster  *cluster;         /* owned copy                                          */
    autopar_method    method;
    autopar_stage_option stage_option;
    autopar_schedule  schedule;
    int               n_micro_batches;
    int               n_layers;
    double            memory_budget;   /* bytes per device used (< 0: none)                   */
    int               n_stages;
    ap_plan_stage    *stages;          /* owned, pipeline order                               */
    int               n_transfers;
    ap_plan_transfer *transfers;       /* owned                                               */
    autopar_plan_estimate estimate;
    ap_plan_stats     stats;
};

/* Allocates an empty plan (every pointer NULL). Errors: AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_plan_alloc(autopar_plan **out);

/* The logical mesh of stage s (ap_mesh_new over the stage's devices of the plan's cluster).
 * Output: *out, free with ap_mesh_free. Errors: AUTOPAR_ERR_INVALID_ARG, AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_plan_stage_mesh(const autopar_plan *p, int s, ap_mesh **out);

/* Makes the shard plans canonical: each is written to JSON and read back, so that the plan in
 * memory is exactly what any later autopar_plan_from_json of its JSON gives (the shard plan
 * JSON prints numbers with 15 significant digits when they read back within an ulp). Errors:
 * those of ap_shard_plan_to_json / ap_shard_plan_from_json. */
AP_INTERNAL ap_status ap_plan_canonicalize(autopar_plan *p);

/* Human-readable byte and time figures ("12.3 GiB", "4.56 ms") into buf; returns buf. */
AP_INTERNAL const char *ap_fmt_bytes(double bytes, char *buf, size_t len);
AP_INTERNAL const char *ap_fmt_time(double seconds, char *buf, size_t len);

/* Names used in JSON and messages ("pipeshard", "auto", "1f1b", ...); "?" when out of range. */
AP_INTERNAL const char *ap_method_name(autopar_method m);
AP_INTERNAL const char *ap_stage_option_name(autopar_stage_option s);
AP_INTERNAL const char *ap_schedule_name(autopar_schedule s);

#endif /* AUTOPAR_PLAN_H */
