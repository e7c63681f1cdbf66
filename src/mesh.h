/*
 * Logical 2-D device meshes and sharding specs (reference/alpa-notes.md §1.2, DESIGN.md §5).
 *
 * A mesh is an n0 x n1 view of a set of devices of a cluster. Device (i0, i1) is
 * devices[i0 * n1 + i1]. Each mesh axis has alpha-beta link coefficients derived from the links
 * its device groups cross; AP_AXIS_FLAT is the whole mesh viewed as one axis of n0 * n1 devices
 * in row-major order (flat index i0 * n1 + i1), used by S01 and by collectives over all devices.
 *
 * A sharding spec gives, per tensor dim, how it is laid out over the mesh:
 *   R   replicated                 S0  split over mesh axis 0 (n0 parts, part = i0)
 *   S1  split over mesh axis 1     S01 split over both axes, flattened (n0*n1 parts, part = i0*n1+i1)
 * plus a partial-sum flag per mesh axis: the devices along that axis hold addends of the value,
 * which becomes correct only after a sum over the axis (a pending all-reduce / reduce-scatter).
 */
#ifndef AUTOPAR_MESH_H
#define AUTOPAR_MESH_H

#include "cluster.h"
#include "internal.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

typedef enum ap_mesh_axis {
    AP_AXIS_0 = 0,
    AP_AXIS_1 = 1,
    AP_AXIS_FLAT = 2,   /* both axes flattened, row-major                                   */
    AP_AXIS_COUNT
} ap_mesh_axis;

typedef struct ap_mesh {
    int     shape[2];               /* n0, n1 (each >= 1)                                        */
    int     n_devices;              /* n0 * n1                                                   */
    int    *devices;                /* owned; global device ids, row-major over (i0, i1)         */
    /* Alpha-beta coefficients per ap_mesh_axis: a transfer of B bytes over the axis costs
     * alpha + beta * B (before the collective's own factor). beta = 1 / effective bandwidth.  */
    double  alpha[AP_AXIS_COUNT];
    double  beta[AP_AXIS_COUNT];
    bool    crosses_hosts[AP_AXIS_COUNT];   /* some group of the axis spans several hosts       */
} ap_mesh;

/* Creates the n0 x n1 mesh over `devices` (n0*n1 distinct global device ids of cluster c, in
 * row-major mesh order; NULL means 0, 1, ..., n0*n1-1). Per axis, alpha/beta come from the
 * links its groups (the lines of devices along that axis) cross:
 *  - a group inside one host uses the intra-host link: beta = 1 / intra bandwidth;
 *  - a group spanning hosts also uses the inter-host link, whose bandwidth is per host and is
 *    shared by every group of the axis crossing hosts from that host at the same time:
 *    beta = max(1 / intra bandwidth (if two members share a host), k / inter bandwidth), where k
 *    is the largest number of such groups with a member on one host;
 *  - alpha is the latency of the slowest link crossed;
 *  - the worst group of the axis decides (collectives on an axis run on all groups at once).
 * Output: *out (free with ap_mesh_free), NULL on failure.
 * Errors: AUTOPAR_ERR_INVALID_ARG (n0 or n1 < 1, NULL cluster/out, id out of range or repeated),
 * AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_mesh_new(const autopar_cluster *c, int n0, int n1, const int *devices,
                                  ap_mesh **out);

/* The mesh over a rectangular block of the cluster: hosts [host0, host0 + n_hosts) and, on each,
 * local devices [dev0, dev0 + n_dev), taken host-major (device (h, d) is the (h*n_dev + d)-th)
 * and viewed as n0 x n1 (n0 * n1 must equal n_hosts * n_dev). This is how the inter-operator
 * pass names a submesh and one of its logical shapes.
 * Errors: AUTOPAR_ERR_INVALID_ARG (block outside the cluster, size mismatch), AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_mesh_new_block(const autopar_cluster *c, int host0, int n_hosts,
                                        int dev0, int n_dev, int n0, int n1, ap_mesh **out);

/* A mesh with explicit coefficients and no cluster (devices 0..n0*n1-1), for tests and for
 * what-if costs. The flattened axis takes the larger alpha and the larger beta of the two axes
 * (a ring over the whole mesh is as slow as its slowest link).
 * Errors: AUTOPAR_ERR_INVALID_ARG (sizes < 1, negative or non-finite coefficient),
 * AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_mesh_new_custom(int n0, int n1, const double alpha[2],
                                         const double beta[2], ap_mesh **out);

/* Frees a mesh. NULL-safe. */
AP_INTERNAL void ap_mesh_free(ap_mesh *m);

/* Number of devices along an axis: n0, n1, or n0*n1 for AP_AXIS_FLAT (0 for a bad axis). */
AP_INTERNAL int ap_mesh_axis_size(const ap_mesh *m, ap_mesh_axis axis);

/* Global device id at mesh coordinate (i0, i1), or -1 when out of range. */
AP_INTERNAL int ap_mesh_device_at(const ap_mesh *m, int i0, int i1);

/* Mesh coordinate of a global device id. Errors: AUTOPAR_ERR_NOT_FOUND (not in this mesh). */
AP_INTERNAL ap_status ap_mesh_coord_of(const ap_mesh *m, int device, int *i0, int *i1);

/* One line: "mesh 2x4 [0 1 2 3 4 5 6 7], axis 0: alpha .. beta .., axis 1: ...". */
AP_INTERNAL void ap_mesh_print(const ap_mesh *m, FILE *f);

/* ------------------------------------------------------------------------------------------ */
/* Sharding specs                                                                              */
/* ------------------------------------------------------------------------------------------ */

typedef enum ap_dim_spec {
    AP_DIM_R = 0,
    AP_DIM_S0,
    AP_DIM_S1,
    AP_DIM_S01,
    AP_DIM_SPEC_COUNT
} ap_dim_spec;

/* Bits of ap_spec.partial. */
#define AP_PARTIAL_0 1u   /* pending sum over mesh axis 0 */
#define AP_PARTIAL_1 2u   /* pending sum over mesh axis 1 */

typedef struct ap_spec {
    int     ndim;                   /* the tensor's rank, 0..AP_MAX_DIMS                          */
    uint8_t dim[AP_MAX_DIMS];       /* ap_dim_spec per tensor dim                                 */
    uint8_t partial;                /* AP_PARTIAL_* bits                                          */
} ap_spec;

/* Longest string ap_spec_str writes, with the NUL ("S01S01S01S01+P01"). */
#define AP_SPEC_STR_MAX 24

/* The fully replicated spec of a rank-ndim tensor (ndim clamped to 0..AP_MAX_DIMS). */
AP_INTERNAL ap_spec ap_spec_replicated(int ndim);

/* True when both specs are the same (rank, every dim, partial flags). */
AP_INTERNAL bool ap_spec_equal(const ap_spec *a, const ap_spec *b);

/* Checks a spec on its own: rank in range, known dim values, partial bits known, and every mesh
 * axis used by at most one tensor dim or partial flag (S01 uses both axes; a tensor cannot be
 * split over an axis and pending a sum over it). An axis of size 1 may be used (it is valid and
 * merely does nothing). Errors: AUTOPAR_ERR_INVALID_ARG naming the spec and the axis. */
AP_INTERNAL ap_status ap_spec_validate(const ap_spec *s);

/* Number of parts tensor dim d is cut into on mesh m (1 for R, n0, n1, n0*n1). */
AP_INTERNAL int ap_spec_dim_parts(const ap_mesh *m, const ap_spec *s, int d);

/* Number of distinct tiles (product of the parts of every dim); a device holds one tile, and
 * n_devices / tiles devices hold each. Does not validate. */
AP_INTERNAL int64_t ap_spec_num_tiles(const ap_mesh *m, const ap_spec *s);

/* The shard shape a device holds of a tensor of shape `full` under spec s.
 * Errors: AUTOPAR_ERR_INVALID_ARG (invalid spec, rank differs from the shape's),
 * AUTOPAR_ERR_SHAPE (a dim not divisible by its parts; the message names dim, size and parts). */
AP_INTERNAL ap_status ap_spec_local_shape(const ap_mesh *m, const ap_spec *s, const ap_shape *full,
                                          ap_shape *local);

/* The tile the device at mesh coordinate (i0, i1) owns: element range
 * [offset[d], offset[d] + extent[d]) of every dim d (arrays of at least full->ndim entries).
 * Errors: as ap_spec_local_shape, AUTOPAR_ERR_INVALID_ARG for a coordinate outside the mesh. */
AP_INTERNAL ap_status ap_spec_tile(const ap_mesh *m, const ap_spec *s, const ap_shape *full,
                                   int i0, int i1, int64_t *offset, int64_t *extent);

/* Writes the paper's notation: "S0R", "RS01", "S0S1", "RR+P1" (partial over axis 1), "R+P01"
 * (both), "-" for a rank-0 tensor ("-+P0" when partial). Returns buf. len >= AP_SPEC_STR_MAX
 * always suffices; shorter buffers get a truncated string. */
AP_INTERNAL const char *ap_spec_str(const ap_spec *s, char *buf, size_t len);

/* Reads the notation of ap_spec_str back ("S0S1", "RS01+P0", "-"). The rank is the number of
 * dim tokens. Errors: AUTOPAR_ERR_INVALID_ARG (bad syntax or an invalid spec), naming the text. */
AP_INTERNAL ap_status ap_spec_parse(const char *text, ap_spec *out);

/* How a sharding travels through a reshape from shape `in` (spec s) to shape `out`. Dims are
 * grouped into runs whose products match; within a run, only a split of the run's major (first
 * non-unit) input dim maps, to a contiguous split of the run's major output dim (when that
 * divides). Writes to *in_ok the input spec a local reshape can read (s itself when expressible;
 * otherwise the offending split moved to the run's major dim when that divides, else dropped)
 * and to *out_spec the resulting output spec. Returns true when s was expressible as is. The
 * sharding pass prices reshapes with it and the runtime executes them with it, so both agree. */
AP_INTERNAL bool ap_spec_reshape(const ap_mesh *m, const ap_shape *in, const ap_spec *s,
                                 const ap_shape *out, ap_spec *in_ok, ap_spec *out_spec);

#endif /* AUTOPAR_MESH_H */
