/*
 * Communicators: the interface through which the runtime moves data between ranks
 * (DESIGN.md §7). A communicator is a group of ranks (processes) numbered 0..size-1; every
 * communicator but the world is made by splitting a parent (MPI_Comm_split semantics), typically
 * one per mesh-axis line (the devices that share all mesh coordinates but one).
 *
 * Two implementations sit behind one vtable (ggml-style: a struct of function pointers plus the
 * implementation's private state):
 *   - "mpi"  (runtime/comm_mpi.c, always built): buffers are host memory; every operation is
 *            blocking (complete when it returns).
 *   - "nccl" (runtime/cuda/comm_nccl.cu, built with CUDA + NCCL): buffers are device memory of the
 *            communicator's CUDA context; operations are *enqueued* on that context's stream and
 *            complete in stream order: kernels enqueued later on the same stream see the results,
 *            the host must call ap_comm_synchronize (or ap_cuda_synchronize) before reading them.
 *            Each NCCL communicator owns an MPI communicator over the same group ("host"
 *            communicator) for bootstrap and for the host-side agreement helpers below.
 *
 * Contract shared by every operation:
 *   - Collectives (all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, barrier, split,
 *     the agreement helpers) must be called by every rank of the group, in the same order, with
 *     the same count, dtype, op and root. Point-to-point messages between two ranks match in the
 *     order they were posted (per direction; there are no tags), with the same count and dtype.
 *   - Counts are in elements. Buffers may be NULL only when the count is 0.
 *   - Argument errors (NULL, bad dtype/op, root or peer out of range, forbidden overlap) are found
 *     locally before any communication, so consistent arguments fail on every rank alike. A
 *     caller whose inputs may differ between ranks agrees first with ap_comm_all_ok, which is what
 *     turns "one rank has a bad input" into a clean error on every rank instead of a hang.
 *   - Errors: AUTOPAR_ERR_INVALID_ARG (arguments), AUTOPAR_ERR_NOMEM, AUTOPAR_ERR_MPI (an MPI call
 *     failed: the message names the operation, the group rank/size, the world rank and MPI's
 *     error string; MPI_ERRORS_RETURN is set on every communicator made here), AUTOPAR_ERR_BACKEND
 *     (a CUDA or NCCL call failed, with ncclGetErrorString), AUTOPAR_ERR_UNSUPPORTED (NCCL not
 *     built, ranks sharing a GPU). After an MPI/NCCL failure the communicator's state is
 *     undefined: report the error and free it. Nothing here exits or aborts.
 *   - Not thread-safe: a communicator is used by one thread at a time (MPI is initialised with
 *     MPI_THREAD_FUNNELED when this layer initialises it).
 *
 * Summation order (determinism). By default all_reduce / reduce_scatter use MPI_Allreduce /
 * MPI_Reduce_scatter_block (NCCL: ncclAllReduce / ncclReduceScatter), whose order of additions
 * depends on the implementation, the group size and the message size; results are then within
 * rounding of the exact sum (the runtime's tests compare with a single-device run at 1e-5
 * relative tolerance, which this meets) and exact for integer-valued data. With
 * ap_comm_set_deterministic(comm, true) sums of F32/F64 are instead computed as
 * ((x_0 + x_1) + x_2) + ... in group-rank order, in the element type, from the gathered
 * contributions: bit-identical on every rank, on every run, and between the MPI and NCCL
 * implementations, at the price of size x count elements of temporary memory and traffic.
 * MAX/MIN and integer sums are exact either way.
 */
#ifndef AUTOPAR_COMM_H
#define AUTOPAR_COMM_H

#ifdef __cplusplus
extern "C" {
#endif

#include "internal.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Element types. U8 is for raw bytes (its sums wrap modulo 256, I32 sums modulo 2^32). */
typedef enum ap_comm_dtype {
    AP_COMM_F32 = 0,
    AP_COMM_F64,
    AP_COMM_I32,
    AP_COMM_U8,
    AP_COMM_DTYPE_COUNT
} ap_comm_dtype;

/* Reductions. */
typedef enum ap_comm_op {
    AP_COMM_SUM = 0,
    AP_COMM_MAX,
    AP_COMM_MIN,
    AP_COMM_OP_COUNT
} ap_comm_op;

/* "No peer" for ap_comm_send_recv (the send or the receive half is skipped, like MPI_PROC_NULL),
 * and "not in any group" for ap_comm_split (like MPI_UNDEFINED). */
#define AP_COMM_NO_PEER   (-1)
#define AP_COMM_UNDEFINED (-1)

/* Largest per-rank element count the MPI implementation takes in one call (MPI counts are int);
 * larger counts fail with AUTOPAR_ERR_UNSUPPORTED naming the count. */
#define AP_COMM_MPI_MAX_COUNT ((size_t)INT32_MAX)

typedef struct ap_comm ap_comm;

/* One point-to-point operation of ap_comm_exchange. */
typedef enum ap_comm_p2p_kind { AP_COMM_P2P_SEND = 0, AP_COMM_P2P_RECV } ap_comm_p2p_kind;
typedef struct ap_comm_p2p {
    ap_comm_p2p_kind kind;
    int              peer;    /* group rank; may be this rank (a copy to itself)                */
    void            *buf;     /* read for a send, written for a receive                         */
    size_t           count;   /* elements                                                        */
    ap_comm_dtype    dtype;
} ap_comm_p2p;

/* ------------------------------------------------------------------------------------------ */
/* The vtable. Implementations fill every entry not marked optional; the wrappers below have   */
/* already checked the arguments (and handled size-1 and count-0 shortcuts where noted) before */
/* calling them.                                                                                */
/* ------------------------------------------------------------------------------------------ */
typedef struct ap_comm_i {
    const char *name;               /* "mpi", "nccl"                                           */
    bool        device_buffers;     /* buffers are device pointers (true for NCCL)             */
    /* Releases the implementation's state (comm->ctx); the wrapper frees the struct. */
    void      (*free)(ap_comm *comm);
    /* Makes *out over the ranks of the same color (NULL for AP_COMM_UNDEFINED). */
    ap_status (*split)(ap_comm *comm, int color, int key, ap_comm **out);
    ap_status (*all_reduce)(ap_comm *comm, const void *send, void *recv, size_t count,
                            ap_comm_dtype t, ap_comm_op op);
    ap_status (*all_gather)(ap_comm *comm, const void *send, void *recv, size_t count,
                            ap_comm_dtype t);
    ap_status (*reduce_scatter)(ap_comm *comm, const void *send, void *recv, size_t count,
                                ap_comm_dtype t, ap_comm_op op);
    ap_status (*all_to_all)(ap_comm *comm, const void *send, void *recv, size_t count,
                            ap_comm_dtype t);
    ap_status (*broadcast)(ap_comm *comm, void *buf, size_t count, ap_comm_dtype t, int root);
    ap_status (*send)(ap_comm *comm, const void *buf, size_t count, ap_comm_dtype t, int peer);
    ap_status (*recv)(ap_comm *comm, void *buf, size_t count, ap_comm_dtype t, int peer);
    /* All operations posted at once, complete (MPI) or enqueued (NCCL) on return. */
    ap_status (*exchange)(ap_comm *comm, const ap_comm_p2p *ops, int n_ops);
    /* (optional) paired send and receive; NULL = done through exchange. */
    ap_status (*send_recv)(ap_comm *comm, const void *send, size_t send_count, int dest,
                           void *recv, size_t recv_count, int src, ap_comm_dtype t);
    ap_status (*barrier)(ap_comm *comm);
    /* (optional) waits for enqueued operations; NULL = operations are blocking. */
    ap_status (*synchronize)(ap_comm *comm);
} ap_comm_i;

/* A communicator. Fields are read through the accessors below; implementations fill them. */
struct ap_comm {
    const ap_comm_i *iface;
    void            *ctx;           /* implementation state, owned                              */
    int              rank, size;    /* this rank's number in the group, group size              */
    int              world_rank;    /* rank in the world communicator it descends from           */
    int              local_rank;    /* rank among the world ranks on this host                   */
    int              local_size;    /* world ranks on this host                                   */
    bool             deterministic; /* rank-order sums (see the top of this file); inherited    */
    /* MPI communicator over the same group for host-side control (agreement helpers, NCCL
     * bootstrap): the communicator itself for "mpi", an owned one for "nccl". */
    ap_comm         *host;
};

/* ------------------------------------------------------------------------------------------ */
/* Creation and destruction                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* The world communicator (all processes of the MPI job), an MPI_Comm_dup of MPI_COMM_WORLD so
 * that this library's traffic never matches the application's. Collective over the world.
 * Initialises MPI (MPI_Init_thread, FUNNELED) when nobody has; in that case MPI_Finalize is called
 * when the last communicator made by this layer is freed (so, as MPI cannot be initialised
 * twice, a program that wants several worlds in sequence initialises MPI itself; then this layer
 * never finalises it). Also computes the local rank/size on this host (MPI_Comm_split_type
 * SHARED), which every communicator split from it inherits.
 * Output: *out (free with ap_comm_free). Errors: AUTOPAR_ERR_INVALID_ARG (out NULL),
 * AUTOPAR_ERR_MPI (MPI already finalised, or a call failed), AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_comm_world(ap_comm **out);

/* Splits `parent` like MPI_Comm_split: ranks passing the same color (>= 0) form one new group,
 * numbered by ascending key (ties by parent rank); color AP_COMM_UNDEFINED gives *out = NULL
 * with AUTOPAR_OK. A child of an NCCL communicator is an NCCL communicator on the same CUDA
 * context (split via MPI, then ncclCommInitRank). Collective over the parent.
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL, color < -1), AUTOPAR_ERR_MPI, AUTOPAR_ERR_BACKEND,
 * AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_comm_split(ap_comm *parent, int color, int key, ap_comm **out);

/* Frees a communicator (MPI_Comm_free / ncclCommDestroy after pending work). Free in the same
 * order on every member: NCCL documents ncclCommDestroy as collective within a node. NULL-safe. Finalises MPI when this was the last communicator and this layer initialised MPI. */
AP_INTERNAL void ap_comm_free(ap_comm *comm);

/* ------------------------------------------------------------------------------------------ */
/* Queries                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Group rank and size (0 and 1 for a NULL communicator). */
AP_INTERNAL int  ap_comm_rank(const ap_comm *comm);
AP_INTERNAL int  ap_comm_size(const ap_comm *comm);
/* Rank in the world communicator this one descends from. */
AP_INTERNAL int  ap_comm_world_rank(const ap_comm *comm);
/* Rank among, and number of, the world ranks on this host (MPI_COMM_TYPE_SHARED). */
AP_INTERNAL int  ap_comm_local_rank(const ap_comm *comm);
AP_INTERNAL int  ap_comm_local_size(const ap_comm *comm);
/* The CUDA device this rank should use among `device_count` visible ones: local_rank modulo
 * device_count (-1 when device_count < 1). One GPU per rank needs local_size <= device_count. */
AP_INTERNAL int  ap_comm_local_device(const ap_comm *comm, int device_count);
/* "mpi" or "nccl". */
AP_INTERNAL const char *ap_comm_backend_name(const ap_comm *comm);
/* True when the operations take device pointers (NCCL). */
AP_INTERNAL bool ap_comm_device_buffers(const ap_comm *comm);
/* Rank-order summation on/off (default off); communicators split later inherit it. Local. */
AP_INTERNAL void ap_comm_set_deterministic(ap_comm *comm, bool on);
/* Size in bytes of one element. */
AP_INTERNAL size_t ap_comm_dtype_size(ap_comm_dtype t);

/* ------------------------------------------------------------------------------------------ */
/* Collectives (group-wide; see the contract at the top)                                       */
/* ------------------------------------------------------------------------------------------ */

/* recv[i] = op over ranks of send[i], i < count, on every rank. In place when send == recv;
 * otherwise the buffers must not overlap. */
AP_INTERNAL ap_status ap_comm_all_reduce(ap_comm *comm, const void *send, void *recv,
                                         size_t count, ap_comm_dtype t, ap_comm_op op);

/* recv[r * count + i] = rank r's send[i]: equal contributions concatenated in rank order;
 * recv holds size * count elements. In place when send == recv + rank * count (this rank's
 * block already in place); otherwise no overlap. */
AP_INTERNAL ap_status ap_comm_all_gather(ap_comm *comm, const void *send, void *recv,
                                         size_t count, ap_comm_dtype t);

/* recv[i] = op over ranks r of r's send[rank * count + i]: send holds size * count elements in
 * equal blocks in rank order, rank k receives the reduced block k. In place when
 * recv == send + rank * count (send is then overwritten); otherwise no overlap. */
AP_INTERNAL ap_status ap_comm_reduce_scatter(ap_comm *comm, const void *send, void *recv,
                                             size_t count, ap_comm_dtype t, ap_comm_op op);

/* recv[r * count + i] = rank r's send[rank * count + i]: block k of send goes to rank k, block r
 * of recv comes from rank r. Both hold size * count elements; they must not overlap. */
AP_INTERNAL ap_status ap_comm_all_to_all(ap_comm *comm, const void *send, void *recv,
                                         size_t count, ap_comm_dtype t);

/* buf on every rank = root's buf. */
AP_INTERNAL ap_status ap_comm_broadcast(ap_comm *comm, void *buf, size_t count, ap_comm_dtype t,
                                        int root);

/* Waits until every rank of the group has called it (NCCL: after this rank's stream drained). */
AP_INTERNAL ap_status ap_comm_barrier(ap_comm *comm);

/* Waits for this rank's enqueued operations (no-op for MPI). Local. */
AP_INTERNAL ap_status ap_comm_synchronize(ap_comm *comm);

/* ------------------------------------------------------------------------------------------ */
/* Point to point                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* Blocking send to / receive from group rank `peer` (!= this rank: use ap_comm_send_recv or
 * ap_comm_exchange for a copy to itself). Over MPI a receive checks the message had exactly
 * `count` elements (AUTOPAR_ERR_MPI otherwise); NCCL cannot check, so a mismatch there hangs or
 * corrupts. Two ranks that both send first may deadlock (MPI: large messages; NCCL: any size):
 * pipeline exchanges use ap_comm_send_recv or ap_comm_exchange. */
AP_INTERNAL ap_status ap_comm_send(ap_comm *comm, const void *buf, size_t count, ap_comm_dtype t,
                                   int peer);
AP_INTERNAL ap_status ap_comm_recv(ap_comm *comm, void *buf, size_t count, ap_comm_dtype t,
                                   int peer);

/* Sends send[0..send_count) to `dest` while receiving recv[0..recv_count) from `src`, without
 * deadlock whatever the peers do at the same time (a ring where every rank sends to rank+1 and
 * receives from rank-1 works). Either peer may be AP_COMM_NO_PEER (that half is skipped, e.g. at
 * the ends of a pipeline) or this rank. The buffers must not overlap. */
AP_INTERNAL ap_status ap_comm_send_recv(ap_comm *comm, const void *send, size_t send_count,
                                        int dest, void *recv, size_t recv_count, int src,
                                        ap_comm_dtype t);

/* Posts every operation of ops[0..n_ops) at once (MPI_Irecv/MPI_Isend + MPI_Waitall; NCCL: one
 * ncclGroupStart/End) and returns when all are complete (MPI) / enqueued (NCCL): a rank can send
 * to and receive from several peers (cross-mesh resharding) without ordering them. Receive
 * buffers must not overlap any other buffer of the batch. n_ops == 0 is a no-op. */
AP_INTERNAL ap_status ap_comm_exchange(ap_comm *comm, const ap_comm_p2p *ops, int n_ops);

/* ------------------------------------------------------------------------------------------ */
/* Agreement (host-side, collective over the group, also for NCCL communicators)               */
/* ------------------------------------------------------------------------------------------ */

/* Every rank passes its own outcome. Returns AUTOPAR_OK on every rank when every rank passed
 * AUTOPAR_OK. Otherwise every rank (the failing ones included) returns the status of the
 * lowest-ranked failing rank, and its last error (ap_error / autopar_last_error) becomes that
 * rank's message prefixed by "rank W: " (W = its world rank; not added twice). A failure of the
 * agreement itself returns AUTOPAR_ERR_MPI locally. */
AP_INTERNAL ap_status ap_comm_all_ok(ap_comm *comm, ap_status local);

/* Broadcasts root's status and, when it is not AUTOPAR_OK, root's last error message (as above,
 * "rank W: ..."). Returns root's status on every rank (AUTOPAR_ERR_MPI if the broadcast fails). */
AP_INTERNAL ap_status ap_comm_bcast_error(ap_comm *comm, int root, ap_status status);

/* Checks that every rank passed the same value (a plan fingerprint, a tensor size, ...).
 * Returns AUTOPAR_OK on every rank, or AUTOPAR_ERR_MPI on every rank with a message naming
 * `what`, the smallest and largest values and ranks holding them. */
AP_INTERNAL ap_status ap_comm_check_same(ap_comm *comm, uint64_t value, const char *what);

/* ------------------------------------------------------------------------------------------ */
/* NCCL (runtime/cuda/comm_nccl.cu). Without the CUDA backend these return                     */
/* AUTOPAR_ERR_UNSUPPORTED, so callers need no #ifdef.                                         */
/* ------------------------------------------------------------------------------------------ */

typedef struct ap_cuda_ctx ap_cuda_ctx;

/* An NCCL communicator over the same group as `parent` (an MPI or NCCL communicator), on the
 * device and stream of `cuda` (borrowed: it must outlive the communicator). Bootstrap: group rank
 * 0 calls ncclGetUniqueId, the id goes out over MPI, every rank calls ncclCommInitRank. Ranks of
 * the group must use distinct GPUs (select with ap_comm_local_device); when two share one, every
 * rank gets AUTOPAR_ERR_UNSUPPORTED naming them. Collective over parent; the outcome is agreed
 * (every rank returns the same status). Output: *out (free with ap_comm_free, before the CUDA
 * context). Errors: AUTOPAR_ERR_INVALID_ARG, AUTOPAR_ERR_UNSUPPORTED, AUTOPAR_ERR_BACKEND
 * (CUDA/NCCL, with ncclGetErrorString), AUTOPAR_ERR_MPI, AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_comm_nccl_new(ap_comm *parent, ap_cuda_ctx *cuda, ap_comm **out);

/* Creation helper for implementations: allocates a communicator with the given vtable and state
 * and copies world rank, local rank/size and the deterministic flag from `like`. */
AP_INTERNAL ap_status ap_comm_wrap(const ap_comm_i *iface, void *ctx, int rank, int size,
                                   const ap_comm *like, ap_comm *host, ap_comm **out);

#ifdef __cplusplus
}
#endif

#endif /* AUTOPAR_COMM_H */
