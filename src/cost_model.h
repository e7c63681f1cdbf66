/*
 * The alpha-beta cost model (DESIGN.md §4, reference/alpa-notes.md §1.4): collective times on a
 * mesh axis, roofline compute time, and the cost of changing a tensor's sharding spec.
 * One unit for everything: seconds.
 */
#ifndef AUTOPAR_COST_MODEL_H
#define AUTOPAR_COST_MODEL_H

#include "cluster.h"
#include "internal.h"
#include "mesh.h"

#include <stdio.h>

typedef enum ap_coll_kind {
    AP_COLL_ALL_REDUCE = 0,
    AP_COLL_ALL_GATHER,
    AP_COLL_REDUCE_SCATTER,
    AP_COLL_ALL_TO_ALL,
    AP_COLL_SEND_RECV,
    AP_COLL_KIND_COUNT
} ap_coll_kind;

/* "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send-recv" ("?" otherwise). */
AP_INTERNAL const char *ap_coll_kind_name(ap_coll_kind k);

/* Time of one collective over a group of n devices on a link with latency alpha (s) and
 * beta = 1 / bandwidth (s/byte). What `bytes` (B) means differs per kind:
 *   all-reduce      B = size of the array reduced (per device)   alpha + 2(n-1)/n * B * beta
 *   all-gather      B = size of the gathered result (per device) alpha +  (n-1)/n * B * beta
 *   reduce-scatter  B = size of the input (per device)           alpha +  (n-1)/n * B * beta
 *   all-to-all      B = sum of the n devices' buffers            alpha + (n-1)/n^2 * B * beta
 *                   (each device sends (n-1)/n of its own B/n bytes)
 *   send-recv       B = message size                             alpha + B * beta
 * n <= 1 costs 0 (nothing moves). An unknown kind costs 0. */
AP_INTERNAL double ap_collective_time(ap_coll_kind k, int n, double alpha, double beta,
                                      double bytes);

/* The same on one axis of a mesh (n, alpha and beta of that axis; AP_AXIS_FLAT = all devices).
 * For send-recv the axis gives the link only. */
AP_INTERNAL double ap_mesh_collective_time(const ap_mesh *m, ap_coll_kind k, ap_mesh_axis axis,
                                           double bytes);

/* Which peak rate an op runs at. */
typedef enum ap_flop_type {
    AP_FLOPS_F32 = 0,   /* cluster peak_flops_f32                                            */
    AP_FLOPS_F16,       /* cluster peak_flops_f16 (bf16/fp16 tensor cores)                   */
} ap_flop_type;

/* Roofline time of one op on one device: max(flops / peak, bytes / memory bandwidth) divided
 * by efficiency, the achieved fraction of the roofline for this op class (from calibration;
 * 1 = the hardware peak). An efficiency outside (0, 1] is treated as 1 so that a missing
 * calibration entry cannot make an op free or negative. */
AP_INTERNAL double ap_compute_time(const autopar_cluster *c, double flops, double bytes,
                                   ap_flop_type type, double efficiency);

/* Bytes one device holds of a tensor of shape `full` and elem_size-byte elements under spec s
 * (the local shard; a pending partial sum is the same size as the value).
 * Errors: as ap_spec_local_shape (AUTOPAR_ERR_INVALID_ARG, AUTOPAR_ERR_SHAPE). */
AP_INTERNAL ap_status ap_spec_device_bytes(const ap_mesh *m, const ap_spec *s,
                                           const ap_shape *full, size_t elem_size,
                                           double *bytes);

/* One collective implied by a resharding, with the tensor's spec before and after it. Between
 * two consecutive collectives (and before the first, after the last) only local slicing happens:
 * `from` of a step differs from `to` of the previous one (or from the source spec) by extra
 * splits that every device makes on its own data. */
typedef struct ap_collective {
    ap_coll_kind kind;
    ap_mesh_axis axis;
    double       bytes;     /* B as defined at ap_collective_time                            */
    double       time;      /* seconds                                                       */
    ap_spec      from, to;
} ap_collective;

#define AP_RESHARD_MAX_STEPS 8

typedef struct ap_reshard {
    double        time;     /* sum of the steps' times                                        */
    int           n_steps;
    ap_collective step[AP_RESHARD_MAX_STEPS];
} ap_reshard;

/*
 * Cheapest way, under the alpha-beta model, to turn a tensor laid out as `src` into `dst` on
 * mesh m, and the collectives it takes. full_bytes is the size of the whole (unsharded) tensor.
 * The search (shortest path over specs) combines these moves, each on one mesh axis a with
 * n_a devices, or on the flattened mesh when a dim is S01 or both axes are partial:
 *   - split a dim further over a free axis (appended as the minor axis): local slice, free;
 *   - gather the minor split axis of a dim: all-gather, B = current shard size x n_a;
 *   - move the minor split axis of one dim to another dim: all-to-all, B = shard x n_a;
 *   - finish a pending sum over an axis: all-reduce (B = shard), or reduce-scatter onto a dim
 *     that the axis then splits (B = shard before, the shard shrinks n_a times).
 * So: same spec 0; only new splits 0; and on a mesh whose axes are equally fast the table of
 * alpa-notes §1.2: S0R->RR all-gather(M, axis 0); S0S1->S0R all-gather(M/n0, axis 1);
 * S0R->RS0 all-to-all on axis 0; S0S1->S01R all-to-all on axis 1; RR+P0->RR all-reduce(M,
 * axis 0); a dim moving to the other mesh axis (S0R->S1R) all-gather then slice. When one axis
 * is much slower the search finds hierarchical routes (e.g. S0R->RR: slice over axis 1,
 * all-gather M/n1 over axis 0, then all-gather M over axis 1), which is why a route may have
 * several steps. Collectives on an axis of one device move nothing and are left out of the
 * list. Equal-time routes prefer fewer collectives.
 * shape may be NULL; when given, every intermediate spec must divide it evenly (the runtime
 * cannot hold uneven shards) and src/dst must too.
 * Output: *out (time, steps). Errors: AUTOPAR_ERR_INVALID_ARG (invalid spec, ranks differ, bad
 * bytes), AUTOPAR_ERR_SHAPE (src or dst does not divide shape), AUTOPAR_ERR_UNSUPPORTED (dst
 * cannot be reached: it pends a sum over an axis of size > 1 that src does not; never a silent
 * cost 0).
 */
AP_INTERNAL ap_status ap_reshard_cost(const ap_mesh *m, const ap_spec *src, const ap_spec *dst,
                                      const ap_shape *shape, double full_bytes, ap_reshard *out);

/* One line per step: "  all-gather on axis 0: 4 MB, 1.2e-05 s  (S0R -> RR)". */
AP_INTERNAL void ap_reshard_print(const ap_reshard *r, FILE *f);

#endif /* AUTOPAR_COST_MODEL_H */
