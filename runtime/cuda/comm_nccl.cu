/*
 * NCCL communicators (runtime/comm.h): the same operations as the MPI implementation, on device
 * buffers of one CUDA context, enqueued on that context's stream (ap_cuda_ctx::stream), so they
 * are ordered with the kernels around them without host round trips.
 *
 * Bootstrap is over MPI: every NCCL communicator owns an MPI communicator over the same group
 * (its "host" communicator). Group rank 0 calls ncclGetUniqueId, the id is broadcast over the host
 * communicator, and every rank calls ncclCommInitRank. Each step's outcome is agreed
 * (ap_comm_all_ok) before the next, so a failure on one rank gives an error on every rank rather
 * than leaving the others blocked in ncclCommInitRank. Splitting splits the host communicator and
 * bootstraps a new NCCL communicator on each part.
 *
 * Failures of NCCL calls become AUTOPAR_ERR_BACKEND with ncclGetErrorString (and NCCL's last
 * error text); CUDA failures go through AP_CUDA_TRY. Nothing here exits or aborts.
 */
#include "cuda_common.cuh"

extern "C" {
#include "comm.h"
}

#include <nccl.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct nccl_ctx {
    ncclComm_t   nccl;
    ap_cuda_ctx *cuda;              /* borrowed: device and stream                              */
    void        *scratch;           /* deterministic-mode staging (size x count), grows          */
    size_t       scratch_bytes;
} nccl_ctx;

static nccl_ctx *ctx_of(const ap_comm *c) { return (nccl_ctx *)c->ctx; }

/* ------------------------------------------------------------------------------------------ */
/* Errors and small helpers                                                                    */
/* ------------------------------------------------------------------------------------------ */

static ap_status nccl_fail(const ap_comm *c, ncclComm_t comm, const char *what, const char *call,
                           ncclResult_t r) {
    /* ncclGetLastError ignores its argument (NULL is allowed), so it also serves before a
     * communicator exists. */
    const char *last = ncclGetLastError(comm);
    return ap_error(AUTOPAR_ERR_BACKEND,
                    "NCCL communicator, %s on rank %d of %d (world rank %d): %s failed: %s%s%s",
                    what, c->rank, c->size, c->world_rank, call, ncclGetErrorString(r),
                    last && *last ? ": " : "", last && *last ? last : "");
}

#define NCCL_TRY(c, what, call, expr)                                                           \
    do {                                                                                        \
        ncclResult_t ap_r_ = (expr);                                                            \
        if (ap_r_ != ncclSuccess) return nccl_fail((c), ctx_of(c)->nccl, (what), (call), ap_r_); \
    } while (0)

static ncclDataType_t nccl_dtype(ap_comm_dtype t) {
    switch (t) {
    case AP_COMM_F32: return ncclFloat32;
    case AP_COMM_F64: return ncclFloat64;
    case AP_COMM_I32: return ncclInt32;
    default:          return ncclUint8;
    }
}

static ncclRedOp_t nccl_op(ap_comm_op op) {
    switch (op) {
    case AP_COMM_MAX: return ncclMax;
    case AP_COMM_MIN: return ncclMin;
    default:          return ncclSum;
    }
}

/* Every entry point makes the communicator's device current: NCCL and the kernels below run on
 * the current device, and the caller may have switched it. */
static ap_status use_device(const ap_comm *c, const char *what) {
    AP_CUDA_TRY(what, cudaSetDevice(ctx_of(c)->cuda->device));
    return AUTOPAR_OK;
}

#define TRY(expr)                                                                               \
    do {                                                                                        \
        ap_status ap_s_ = (expr);                                                               \
        if (ap_s_ != AUTOPAR_OK) return ap_s_;                                                  \
    } while (0)

static const char *ptr_at(const void *p, size_t elems, ap_comm_dtype t) {
    return (const char *)p + elems * ap_comm_dtype_size(t);
}

/* Staging memory of at least `bytes`, stream-ordered like the context's scratch. */
static ap_status get_scratch(ap_comm *c, size_t bytes, void **out, const char *what) {
    nccl_ctx *n = ctx_of(c);
    ap_cuda_ctx *cu = n->cuda;
    if (n->scratch_bytes < bytes) {
        if (n->scratch) {
            if (cu->async_alloc) {
                AP_CUDA_TRY(what, cudaFreeAsync(n->scratch, cu->stream));
            } else {
                AP_CUDA_TRY(what, cudaStreamSynchronize(cu->stream));
                AP_CUDA_TRY(what, cudaFree(n->scratch));
            }
            n->scratch = NULL;
            n->scratch_bytes = 0;
        }
        if (cu->async_alloc) AP_CUDA_TRY(what, cudaMallocAsync(&n->scratch, bytes, cu->stream));
        else AP_CUDA_TRY(what, cudaMalloc(&n->scratch, bytes));
        n->scratch_bytes = bytes;
    }
    *out = n->scratch;
    return AUTOPAR_OK;
}

/* out[i] = ((in[0][i] + in[1][i]) + in[2][i]) + ... over n blocks of count: the rank-order sum of
 * deterministic mode, in the element type, as the MPI implementation computes it on the host. */
template <typename T>
__global__ void sum_blocks_kernel(const T *in, T *out, i64 count, int n) {
    AP_GRID_LOOP(i, count) {
        T acc = in[i];
        for (int r = 1; r < n; r++) acc += in[(i64)r * count + i];
        out[i] = acc;
    }
}

static ap_status sum_blocks(ap_comm *c, const void *in, void *out, size_t count, ap_comm_dtype t,
                            const char *what) {
    cudaStream_t st = ctx_of(c)->cuda->stream;
    unsigned grid = ap_cuda_grid((i64)count, 256);
    if (t == AP_COMM_F32)
        sum_blocks_kernel<float><<<grid, 256, 0, st>>>((const float *)in, (float *)out,
                                                       (i64)count, c->size);
    else
        sum_blocks_kernel<double><<<grid, 256, 0, st>>>((const double *)in, (double *)out,
                                                        (i64)count, c->size);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

static bool rank_order_sum(const ap_comm *c, ap_comm_dtype t, ap_comm_op op) {
    return c->deterministic && op == AP_COMM_SUM && c->size > 1 &&
           (t == AP_COMM_F32 || t == AP_COMM_F64);
}

/* Closes a group opened with ncclGroupStart whatever happened inside it (an open group would
 * swallow later calls); the first failure wins. */
static ap_status group_end(ap_comm *c, const char *what, ap_status s) {
    ncclResult_t r = ncclGroupEnd();
    if (s != AUTOPAR_OK) return s;
    if (r != ncclSuccess) return nccl_fail(c, ctx_of(c)->nccl, what, "ncclGroupEnd", r);
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Operations                                                                                  */
/* ------------------------------------------------------------------------------------------ */

static ap_status nccl_create(ap_comm *host, ap_cuda_ctx *cuda, const ap_comm *like,
                             ap_comm **out);

static void nccl_free(ap_comm *c) {
    nccl_ctx *n = ctx_of(c);
    if (n) {
        if (cudaSetDevice(n->cuda->device) == cudaSuccess) {
            /* Work still queued may use the communicator and the staging memory. */
            (void)cudaStreamSynchronize(n->cuda->stream);
            if (n->nccl) (void)ncclCommDestroy(n->nccl);
            if (n->scratch) {
                if (n->cuda->async_alloc) (void)cudaFreeAsync(n->scratch, n->cuda->stream);
                else (void)cudaFree(n->scratch);
                (void)cudaStreamSynchronize(n->cuda->stream);
            }
        }
        (void)cudaGetLastError();
        free(n);
    }
    c->ctx = NULL;
    ap_comm_free(c->host);
    c->host = NULL;
}

static ap_status nccl_split(ap_comm *c, int color, int key, ap_comm **out) {
    ap_comm *h = NULL;
    ap_status s = ap_comm_split(c->host, color, key, &h);
    if (s == AUTOPAR_OK && h) s = nccl_create(h, ctx_of(c)->cuda, c, out);
    /* nccl_create agrees within the new group only: agree over the parent too, so that every
     * rank of c returns the same status (callers branch on it before their next collective). */
    s = ap_comm_all_ok(c, s);
    if (s != AUTOPAR_OK && *out) {
        ap_comm_free(*out); /* every member of that group frees it alike */
        *out = NULL;
    }
    return s;
}

static ap_status nccl_all_reduce(ap_comm *c, const void *send, void *recv, size_t count,
                                 ap_comm_dtype t, ap_comm_op op) {
    const char *what = "all_reduce";
    nccl_ctx *n = ctx_of(c);
    TRY(use_device(c, what));
    if (rank_order_sum(c, t, op)) {
        void *tmp = NULL;
        TRY(get_scratch(c, count * ap_comm_dtype_size(t) * (size_t)c->size, &tmp, what));
        NCCL_TRY(c, what, "ncclAllGather",
                 ncclAllGather(send, tmp, count, nccl_dtype(t), n->nccl, n->cuda->stream));
        return sum_blocks(c, tmp, recv, count, t, what);
    }
    NCCL_TRY(c, what, "ncclAllReduce",
             ncclAllReduce(send, recv, count, nccl_dtype(t), nccl_op(op), n->nccl,
                           n->cuda->stream));
    return AUTOPAR_OK;
}

static ap_status nccl_all_gather(ap_comm *c, const void *send, void *recv, size_t count,
                                 ap_comm_dtype t) {
    const char *what = "all_gather";
    nccl_ctx *n = ctx_of(c);
    TRY(use_device(c, what));
    /* NCCL's in-place form (send == recv + rank * count) is comm.h's. */
    NCCL_TRY(c, what, "ncclAllGather",
             ncclAllGather(send, recv, count, nccl_dtype(t), n->nccl, n->cuda->stream));
    return AUTOPAR_OK;
}

/* Block k of send to rank k, block r of recv from rank r, in one group. */
static ap_status grouped_all_to_all(ap_comm *c, const void *send, void *recv, size_t count,
                                    ap_comm_dtype t, const char *what) {
    nccl_ctx *n = ctx_of(c);
    ap_status s = AUTOPAR_OK;
    NCCL_TRY(c, what, "ncclGroupStart", ncclGroupStart());
    for (int r = 0; r < c->size && s == AUTOPAR_OK; r++) {
        ncclResult_t e = ncclSend(ptr_at(send, (size_t)r * count, t), count, nccl_dtype(t), r,
                                  n->nccl, n->cuda->stream);
        if (e != ncclSuccess) {
            s = nccl_fail(c, n->nccl, what, "ncclSend", e);
            break;
        }
        e = ncclRecv((void *)ptr_at(recv, (size_t)r * count, t), count, nccl_dtype(t), r,
                     n->nccl, n->cuda->stream);
        if (e != ncclSuccess) s = nccl_fail(c, n->nccl, what, "ncclRecv", e);
    }
    return group_end(c, what, s);
}

static ap_status nccl_reduce_scatter(ap_comm *c, const void *send, void *recv, size_t count,
                                     ap_comm_dtype t, ap_comm_op op) {
    const char *what = "reduce_scatter";
    nccl_ctx *n = ctx_of(c);
    TRY(use_device(c, what));
    if (rank_order_sum(c, t, op)) {
        /* Every rank's contribution to this rank's block, in rank order, then the ordered sum. */
        void *tmp = NULL;
        TRY(get_scratch(c, count * ap_comm_dtype_size(t) * (size_t)c->size, &tmp, what));
        TRY(grouped_all_to_all(c, send, tmp, count, t, what));
        return sum_blocks(c, tmp, recv, count, t, what);
    }
    /* NCCL's in-place form (recv == send + rank * count) is comm.h's. */
    NCCL_TRY(c, what, "ncclReduceScatter",
             ncclReduceScatter(send, recv, count, nccl_dtype(t), nccl_op(op), n->nccl,
                               n->cuda->stream));
    return AUTOPAR_OK;
}

static ap_status nccl_all_to_all(ap_comm *c, const void *send, void *recv, size_t count,
                                 ap_comm_dtype t) {
    const char *what = "all_to_all";
    TRY(use_device(c, what));
    return grouped_all_to_all(c, send, recv, count, t, what);
}

static ap_status nccl_broadcast(ap_comm *c, void *buf, size_t count, ap_comm_dtype t, int root) {
    const char *what = "broadcast";
    nccl_ctx *n = ctx_of(c);
    TRY(use_device(c, what));
    NCCL_TRY(c, what, "ncclBroadcast",
             ncclBroadcast(buf, buf, count, nccl_dtype(t), root, n->nccl, n->cuda->stream));
    return AUTOPAR_OK;
}

static ap_status nccl_send(ap_comm *c, const void *buf, size_t count, ap_comm_dtype t, int peer) {
    const char *what = "send";
    nccl_ctx *n = ctx_of(c);
    TRY(use_device(c, what));
    NCCL_TRY(c, what, "ncclSend",
             ncclSend(buf, count, nccl_dtype(t), peer, n->nccl, n->cuda->stream));
    return AUTOPAR_OK;
}

static ap_status nccl_recv(ap_comm *c, void *buf, size_t count, ap_comm_dtype t, int peer) {
    const char *what = "recv";
    nccl_ctx *n = ctx_of(c);
    TRY(use_device(c, what));
    NCCL_TRY(c, what, "ncclRecv",
             ncclRecv(buf, count, nccl_dtype(t), peer, n->nccl, n->cuda->stream));
    return AUTOPAR_OK;
}

static ap_status nccl_exchange(ap_comm *c, const ap_comm_p2p *ops, int n_ops) {
    const char *what = "exchange";
    nccl_ctx *n = ctx_of(c);
    TRY(use_device(c, what));
    ap_status s = AUTOPAR_OK;
    NCCL_TRY(c, what, "ncclGroupStart", ncclGroupStart());
    for (int i = 0; i < n_ops && s == AUTOPAR_OK; i++) {
        const ap_comm_p2p *o = &ops[i];
        ncclResult_t e;
        if (o->kind == AP_COMM_P2P_SEND) {
            e = ncclSend(o->buf, o->count, nccl_dtype(o->dtype), o->peer, n->nccl,
                         n->cuda->stream);
            if (e != ncclSuccess) s = nccl_fail(c, n->nccl, what, "ncclSend", e);
        } else {
            e = ncclRecv(o->buf, o->count, nccl_dtype(o->dtype), o->peer, n->nccl,
                         n->cuda->stream);
            if (e != ncclSuccess) s = nccl_fail(c, n->nccl, what, "ncclRecv", e);
        }
    }
    return group_end(c, what, s);
}

static ap_status nccl_synchronize(ap_comm *c) {
    const char *what = "synchronize";
    nccl_ctx *n = ctx_of(c);
    TRY(use_device(c, what));
    AP_CUDA_TRY(what, cudaStreamSynchronize(n->cuda->stream));
    ncclResult_t async_err = ncclSuccess;
    NCCL_TRY(c, what, "ncclCommGetAsyncError", ncclCommGetAsyncError(n->nccl, &async_err));
    if (async_err != ncclSuccess)
        return nccl_fail(c, n->nccl, what, "an enqueued NCCL operation", async_err);
    return AUTOPAR_OK;
}

static ap_status nccl_barrier(ap_comm *c) {
    TRY(nccl_synchronize(c));
    return ap_comm_barrier(c->host);
}

/* Positional (C++17 has no designated initialisers); order as in ap_comm_i. */
static const ap_comm_i nccl_iface = {
    /* name           */ "nccl",
    /* device_buffers */ true,
    /* free           */ nccl_free,
    /* split          */ nccl_split,
    /* all_reduce     */ nccl_all_reduce,
    /* all_gather     */ nccl_all_gather,
    /* reduce_scatter */ nccl_reduce_scatter,
    /* all_to_all     */ nccl_all_to_all,
    /* broadcast      */ nccl_broadcast,
    /* send           */ nccl_send,
    /* recv           */ nccl_recv,
    /* exchange       */ nccl_exchange,
    /* send_recv      */ NULL,
    /* barrier        */ nccl_barrier,
    /* synchronize    */ nccl_synchronize,
};

/* ------------------------------------------------------------------------------------------ */
/* Creation                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* What identifies a physical GPU across the job: host name and PCI bus id. */
typedef struct gpu_key {
    uint64_t hash;
    int32_t  world_rank;
    int32_t  device;
} gpu_key;

static uint64_t fnv1a(uint64_t h, const char *s) {
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ull;
    }
    return h;
}

static ap_status local_gpu_key(ap_comm *h, const ap_cuda_ctx *cuda, gpu_key *key) {
    const char *what = "ap_comm_nccl_new";
    char host[256] = {0}, bus[64] = {0};
    if (gethostname(host, sizeof host - 1) != 0) snprintf(host, sizeof host, "?");
    AP_CUDA_TRY(what, cudaSetDevice(cuda->device));
    AP_CUDA_TRY(what, cudaDeviceGetPCIBusId(bus, (int)sizeof bus, cuda->device));
    uint64_t x = fnv1a(0xcbf29ce484222325ull, host);
    x = fnv1a(fnv1a(x, "|"), bus);
    key->hash = x;
    key->world_rank = h->world_rank;
    key->device = cuda->device;
    return AUTOPAR_OK;
}

/* Ranks of one NCCL communicator must not share a GPU (NCCL rejects it as a duplicate GPU);
 * every rank sees the same gathered keys, so every rank reaches the same verdict. */
static ap_status check_distinct_gpus(ap_comm *h, const ap_cuda_ctx *cuda) {
    gpu_key mine;
    memset(&mine, 0, sizeof mine);
    ap_status s = local_gpu_key(h, cuda, &mine);
    TRY(ap_comm_all_ok(h, s));
    gpu_key *all = (gpu_key *)calloc((size_t)h->size, sizeof *all);
    if (!all) s = ap_error(AUTOPAR_ERR_NOMEM, "ap_comm_nccl_new: out of host memory");
    s = ap_comm_all_ok(h, s);
    if (s == AUTOPAR_OK) s = ap_comm_all_ok(h, ap_comm_all_gather(h, &mine, all, sizeof mine,
                                                                    AP_COMM_U8));
    for (int i = 0; i < h->size && s == AUTOPAR_OK; i++)
        for (int j = i + 1; j < h->size && s == AUTOPAR_OK; j++)
            if (all[i].hash == all[j].hash)
                s = ap_error(AUTOPAR_ERR_UNSUPPORTED,
                             "ap_comm_nccl_new: world ranks %d and %d would share CUDA device %d "
                             "of one host; NCCL needs one GPU per rank (run at most as many "
                             "ranks per host as it has GPUs)",
                             (int)all[i].world_rank, (int)all[j].world_rank, (int)all[i].device);
    free(all);
    return s;
}

/* Bootstraps an NCCL communicator over the group of host communicator `h` (taken over: freed on
 * failure, owned by the result on success). Collective over h; the outcome is agreed. */
static ap_status nccl_create(ap_comm *h, ap_cuda_ctx *cuda, const ap_comm *like,
                             ap_comm **out) {
    const char *what = "ap_comm_nccl_new";
    nccl_ctx *n = (nccl_ctx *)calloc(1, sizeof *n);
    ap_comm *c = NULL;
    ap_status s = AUTOPAR_OK;
    if (!n) s = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of host memory", what);
    else s = ap_comm_wrap(&nccl_iface, n, h->rank, h->size, like, h, &c);
    s = ap_comm_all_ok(h, s);
    if (s == AUTOPAR_OK) {
        n->cuda = cuda;
        s = check_distinct_gpus(h, cuda);
    }
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (s == AUTOPAR_OK) {
        ap_status mine = AUTOPAR_OK;
        if (h->rank == 0) {
            ncclResult_t r = ncclGetUniqueId(&id);
            if (r != ncclSuccess) mine = nccl_fail(h, NULL, what, "ncclGetUniqueId", r);
        }
        s = ap_comm_bcast_error(h, 0, mine);
    }
    if (s == AUTOPAR_OK) s = ap_comm_all_ok(h, ap_comm_broadcast(h, &id, sizeof id, AP_COMM_U8, 0));
    if (s == AUTOPAR_OK) {
        ap_status mine = AUTOPAR_OK;
        cudaError_t ce = cudaSetDevice(cuda->device);
        if (ce != cudaSuccess) {
            mine = ap_cuda_fail(what, "cudaSetDevice", cudaGetErrorName(ce), cudaGetErrorString(ce),
                                __FILE__, __LINE__);
        } else {
            ncclResult_t r = ncclCommInitRank(&n->nccl, h->size, id, h->rank);
            if (r != ncclSuccess) {
                mine = nccl_fail(h, NULL, what, "ncclCommInitRank", r);
                n->nccl = NULL;
            }
        }
        s = ap_comm_all_ok(h, mine);
    }
    if (s != AUTOPAR_OK) {
        if (n && n->nccl) (void)ncclCommAbort(n->nccl);
        free(n);
        if (c) {
            c->ctx = NULL;
            c->host = NULL;
            c->iface = NULL;
            ap_comm_free(c);
        }
        ap_comm_free(h);
        return s;
    }
    *out = c;
    return AUTOPAR_OK;
}

ap_status ap_comm_nccl_new(ap_comm *parent, ap_cuda_ctx *cuda, ap_comm **out) {
    const char *what = "ap_comm_nccl_new";
    if (out) *out = NULL;
    if (!parent || !parent->host)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: parent communicator is NULL", what);
    ap_status s = AUTOPAR_OK;
    if (!cuda || !out)
        s = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: %s is NULL", what, cuda ? "out" : "cuda");
    TRY(ap_comm_all_ok(parent, s));
    /* A private MPI communicator over the parent's group: the NCCL communicator owns it. */
    ap_comm *h = NULL;
    TRY(ap_comm_split(parent->host, 0, parent->host->rank, &h));
    return nccl_create(h, cuda, parent, out);
}
