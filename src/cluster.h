/*
 * Private view of a cluster description (the public handle is autopar_cluster, include/autopar.h
 * section 6). The passes read the fields directly; only cluster.c creates or changes them.
 *
 * Units are SI throughout: bytes, seconds, FLOP/s, bytes/s. The JSON form is documented in
 * docs/cluster.md.
 */
#ifndef AUTOPAR_CLUSTER_H
#define AUTOPAR_CLUSTER_H

#include "internal.h"

#include <stdint.h>

/* Largest hosts x devices_per_host accepted. Device ids are ints and the passes keep per-device
 * arrays, so a bound keeps a typo ("hosts": 1e12) from turning into a huge allocation. */
#define AP_CLUSTER_MAX_DEVICES (1 << 20)

/* Version written by autopar_cluster_to_json and the only one autopar_cluster_from_json reads. */
#define AP_CLUSTER_JSON_VERSION 1

/* A point-to-point link in the alpha-beta model: moving B bytes costs latency + B / bandwidth. */
typedef struct ap_link {
    double bandwidth;   /* bytes/s, one direction, as NCCL's "bus bandwidth" (busBw)          */
    double latency;     /* s, fixed cost of one collective (alpha)                            */
} ap_link;

struct autopar_cluster {
    char     name[AP_MAX_NAME];
    int      hosts;                /* >= 1                                                   */
    int      devices_per_host;     /* >= 1                                                   */
    int64_t  device_memory;        /* bytes per device, > 0                                  */
    double   peak_flops_f32;       /* FLOP/s per device, dense fp32 (non-tensor-core)        */
    double   peak_flops_f16;       /* FLOP/s per device, dense bf16/fp16 (tensor cores)      */
    double   memory_bandwidth;     /* bytes/s per device                                     */
    /* Between two devices of one host: bandwidth is per device (each device can drive it at
     * once, as with an NVSwitch), so concurrent groups inside a host do not share it.        */
    ap_link  intra_host;
    /* Between hosts: bandwidth is per host (all NICs of a host together). Groups that cross
     * hosts at the same time share it; see ap_mesh_new in mesh.h.                             */
    ap_link  inter_host;
};

/* Total number of devices (hosts x devices_per_host). */
static inline int ap_cluster_num_devices(const autopar_cluster *c) {
    return c->hosts * c->devices_per_host;
}

/* Host that a global device id belongs to (ids are host-major: host * devices_per_host + local). */
static inline int ap_cluster_host_of(const autopar_cluster *c, int device) {
    return device / c->devices_per_host;
}

/* Checks every field against the constraints of docs/cluster.md (the same checks as the JSON
 * reader, for clusters built in code). Errors: AUTOPAR_ERR_INVALID_ARG naming the field and its
 * value. */
AP_INTERNAL ap_status ap_cluster_validate(const autopar_cluster *c);

/* Allocates a copy of *c after validating it. Errors: as ap_cluster_validate, AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_cluster_clone(const autopar_cluster *c, autopar_cluster **out);

#endif /* AUTOPAR_CLUSTER_H */
