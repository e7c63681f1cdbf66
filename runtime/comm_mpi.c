/*
 * Communicators (runtime/comm.h): the generic wrappers (argument checks, dispatch through the
 * vtable), the host-side agreement helpers, world creation, and the MPI implementation.
 *
 * Every MPI call goes through MPI_TRY, which turns a failure into AUTOPAR_ERR_MPI with the
 * operation, the group rank/size, the world rank and MPI's error string. Every communicator made
 * here has MPI_ERRORS_RETURN, so MPI reports failures instead of aborting the job.
 */
#include "comm.h"

#include <mpi.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One tag for all point-to-point traffic: MPI does not overtake messages between a pair of ranks
 * on one communicator with one tag, which gives the "match in posting order" rule of comm.h (the
 * same rule NCCL follows, so the two implementations behave alike). */
#define AP_COMM_TAG 17

/* ------------------------------------------------------------------------------------------ */
/* Process-wide MPI state. Communicators are created and freed from one thread (comm.h), so    */
/* plain variables suffice.                                                                    */
/* ------------------------------------------------------------------------------------------ */

static bool g_we_initialized;   /* ap_comm_world called MPI_Init_thread                     */
static int  g_live_comms;       /* MPI communicators made here and not yet freed            */

typedef struct mpi_ctx {
    MPI_Comm comm;
} mpi_ctx;

static MPI_Comm mpi_of(const ap_comm *c) { return ((const mpi_ctx *)c->ctx)->comm; }

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */

size_t ap_comm_dtype_size(ap_comm_dtype t) {
    switch (t) {
    case AP_COMM_F32: return sizeof(float);
    case AP_COMM_F64: return sizeof(double);
    case AP_COMM_I32: return sizeof(int32_t);
    case AP_COMM_U8:  return 1;
    default:          return 0;
    }
}

static const char *dtype_name(ap_comm_dtype t) {
    switch (t) {
    case AP_COMM_F32: return "f32";
    case AP_COMM_F64: return "f64";
    case AP_COMM_I32: return "i32";
    case AP_COMM_U8:  return "u8";
    default:          return "?";
    }
}

static MPI_Datatype mpi_dtype(ap_comm_dtype t) {
    switch (t) {
    case AP_COMM_F32: return MPI_FLOAT;
    case AP_COMM_F64: return MPI_DOUBLE;
    case AP_COMM_I32: return MPI_INT32_T;
    default:          return MPI_UINT8_T;
    }
}

static MPI_Op mpi_op(ap_comm_op op) {
    switch (op) {
    case AP_COMM_MAX: return MPI_MAX;
    case AP_COMM_MIN: return MPI_MIN;
    default:          return MPI_SUM;
    }
}

/* Formats a failed MPI call; always returns AUTOPAR_ERR_MPI. */
static ap_status mpi_fail(const ap_comm *c, const char *what, const char *call, int err) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(err, text, &len) != MPI_SUCCESS)
        snprintf(text, sizeof text, "MPI error code %d", err);
    else
        text[len < MPI_MAX_ERROR_STRING ? len : MPI_MAX_ERROR_STRING - 1] = '\0';
    if (c)
        return ap_error(AUTOPAR_ERR_MPI,
                        "MPI communicator, %s on rank %d of %d (world rank %d): %s failed: %s",
                        what, c->rank, c->size, c->world_rank, call, text);
    return ap_error(AUTOPAR_ERR_MPI, "MPI, %s: %s failed: %s", what, call, text);
}

#define MPI_TRY(c, what, call, expr)                                                            \
    do {                                                                                        \
        int ap_e_ = (expr);                                                                     \
        if (ap_e_ != MPI_SUCCESS) return mpi_fail((c), (what), (call), ap_e_);                  \
    } while (0)

/* MPI counts are int. */
static ap_status mpi_count(const ap_comm *c, const char *what, size_t count, int *out) {
    if (count > AP_COMM_MPI_MAX_COUNT)
        return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                        "MPI communicator, %s on rank %d: %zu elements exceed the %zu an MPI "
                        "call takes",
                        what, c->rank, count, AP_COMM_MPI_MAX_COUNT);
    *out = (int)count;
    return AUTOPAR_OK;
}

static bool overlaps(const void *a, size_t a_bytes, const void *b, size_t b_bytes) {
    if (!a || !b || a_bytes == 0 || b_bytes == 0) return false;
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + b_bytes && y < x + a_bytes;
}

/* recv[i] = ((tmp[0][i] + tmp[1][i]) + tmp[2][i]) + ... over n blocks of count elements: the
 * rank-order sum of deterministic mode (comm.h). Accumulates in the element type, as the
 * single-device run and the NCCL kernel do. */
static void sum_blocks(const void *tmp, void *recv, size_t count, int n, ap_comm_dtype t) {
    if (t == AP_COMM_F32) {
        const float *in = (const float *)tmp;
        float *out = (float *)recv;
        for (size_t i = 0; i < count; i++) {
            float acc = in[i];
            for (int r = 1; r < n; r++) acc += in[(size_t)r * count + i];
            out[i] = acc;
        }
    } else {
        const double *in = (const double *)tmp;
        double *out = (double *)recv;
        for (size_t i = 0; i < count; i++) {
            double acc = in[i];
            for (int r = 1; r < n; r++) acc += in[(size_t)r * count + i];
            out[i] = acc;
        }
    }
}

static bool rank_order_sum(const ap_comm *c, ap_comm_dtype t, ap_comm_op op) {
    return c->deterministic && op == AP_COMM_SUM && c->size > 1 &&
           (t == AP_COMM_F32 || t == AP_COMM_F64);
}

/* ------------------------------------------------------------------------------------------ */
/* The MPI implementation                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Wraps an MPI communicator we own (errhandler already set); frees it on failure. */
static ap_status mpi_wrap(MPI_Comm mc, const ap_comm *like, int world_rank, ap_comm **out);

static void mpi_free(ap_comm *c) {
    mpi_ctx *m = (mpi_ctx *)c->ctx;
    if (m) {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (!finalized && m->comm != MPI_COMM_NULL) (void)MPI_Comm_free(&m->comm);
        free(m);
    }
    c->ctx = NULL;
    if (g_live_comms > 0 && --g_live_comms == 0 && g_we_initialized) {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (!finalized) (void)MPI_Finalize();
    }
}

static ap_status mpi_split(ap_comm *c, int color, int key, ap_comm **out) {
    MPI_Comm mc = MPI_COMM_NULL;
    MPI_TRY(c, "split", "MPI_Comm_split",
            MPI_Comm_split(mpi_of(c), color < 0 ? MPI_UNDEFINED : color, key, &mc));
    if (mc == MPI_COMM_NULL) return AUTOPAR_OK;
    int e = MPI_Comm_set_errhandler(mc, MPI_ERRORS_RETURN);
    if (e != MPI_SUCCESS) {
        (void)MPI_Comm_free(&mc);
        return mpi_fail(c, "split", "MPI_Comm_set_errhandler", e);
    }
    return mpi_wrap(mc, c, c->world_rank, out);
}

static ap_status mpi_all_reduce(ap_comm *c, const void *send, void *recv, size_t count,
                                ap_comm_dtype t, ap_comm_op op) {
    const char *what = "all_reduce";
    int n = 0;
    ap_status s = mpi_count(c, what, count, &n);
    if (s != AUTOPAR_OK) return s;
    if (rank_order_sum(c, t, op)) {
        void *tmp = malloc(ap_comm_dtype_size(t) * count * (size_t)c->size);
        if (!tmp)
            return ap_error(AUTOPAR_ERR_NOMEM, "MPI communicator, %s: out of host memory", what);
        int e = MPI_Allgather(send, n, mpi_dtype(t), tmp, n, mpi_dtype(t), mpi_of(c));
        if (e == MPI_SUCCESS) sum_blocks(tmp, recv, count, c->size, t);
        free(tmp);
        if (e != MPI_SUCCESS) return mpi_fail(c, what, "MPI_Allgather", e);
        return AUTOPAR_OK;
    }
    MPI_TRY(c, what, "MPI_Allreduce",
            MPI_Allreduce(send == recv ? MPI_IN_PLACE : send, recv, n, mpi_dtype(t), mpi_op(op),
                          mpi_of(c)));
    return AUTOPAR_OK;
}

static ap_status mpi_all_gather(ap_comm *c, const void *send, void *recv, size_t count,
                                ap_comm_dtype t) {
    const char *what = "all_gather";
    int n = 0;
    ap_status s = mpi_count(c, what, count, &n);
    if (s != AUTOPAR_OK) return s;
    bool in_place = send == (const char *)recv + (size_t)c->rank * count * ap_comm_dtype_size(t);
    MPI_TRY(c, what, "MPI_Allgather",
            MPI_Allgather(in_place ? MPI_IN_PLACE : send, in_place ? 0 : n,
                          in_place ? MPI_DATATYPE_NULL : mpi_dtype(t), recv, n, mpi_dtype(t),
                          mpi_of(c)));
    return AUTOPAR_OK;
}

static ap_status mpi_reduce_scatter(ap_comm *c, const void *send, void *recv, size_t count,
                                    ap_comm_dtype t, ap_comm_op op) {
    const char *what = "reduce_scatter";
    int n = 0;
    ap_status s = mpi_count(c, what, count, &n);
    if (s != AUTOPAR_OK) return s;
    size_t es = ap_comm_dtype_size(t);
    if (rank_order_sum(c, t, op)) {
        /* Rank r's block k goes to rank k: an all-to-all gives this rank every contribution to
         * its block, in rank order. */
        void *tmp = malloc(es * count * (size_t)c->size);
        if (!tmp)
            return ap_error(AUTOPAR_ERR_NOMEM, "MPI communicator, %s: out of host memory", what);
        int e = MPI_Alltoall(send, n, mpi_dtype(t), tmp, n, mpi_dtype(t), mpi_of(c));
        if (e == MPI_SUCCESS) sum_blocks(tmp, recv, count, c->size, t);
        free(tmp);
        if (e != MPI_SUCCESS) return mpi_fail(c, what, "MPI_Alltoall", e);
        return AUTOPAR_OK;
    }
    if ((const char *)send + (size_t)c->rank * count * es == (const char *)recv) {
        /* comm.h's in-place form (recv is this rank's block of send, as NCCL defines it).
         * MPI's in-place form leaves the result at the start of the buffer instead, so use that
         * and move the block into place. */
        MPI_TRY(c, what, "MPI_Reduce_scatter_block",
                MPI_Reduce_scatter_block(MPI_IN_PLACE, (void *)send, n, mpi_dtype(t), mpi_op(op),
                                         mpi_of(c)));
        memmove(recv, send, count * es);
        return AUTOPAR_OK;
    }
    MPI_TRY(c, what, "MPI_Reduce_scatter_block",
            MPI_Reduce_scatter_block(send, recv, n, mpi_dtype(t), mpi_op(op), mpi_of(c)));
    return AUTOPAR_OK;
}

static ap_status mpi_all_to_all(ap_comm *c, const void *send, void *recv, size_t count,
                                ap_comm_dtype t) {
    const char *what = "all_to_all";
    int n = 0;
    ap_status s = mpi_count(c, what, count, &n);
    if (s != AUTOPAR_OK) return s;
    MPI_TRY(c, what, "MPI_Alltoall",
            MPI_Alltoall(send, n, mpi_dtype(t), recv, n, mpi_dtype(t), mpi_of(c)));
    return AUTOPAR_OK;
}

static ap_status mpi_broadcast(ap_comm *c, void *buf, size_t count, ap_comm_dtype t, int root) {
    const char *what = "broadcast";
    int n = 0;
    ap_status s = mpi_count(c, what, count, &n);
    if (s != AUTOPAR_OK) return s;
    MPI_TRY(c, what, "MPI_Bcast", MPI_Bcast(buf, n, mpi_dtype(t), root, mpi_of(c)));
    return AUTOPAR_OK;
}

/* A completed receive must have carried exactly `expected` elements. */
static ap_status check_received(const ap_comm *c, const char *what, MPI_Status *st,
                                ap_comm_dtype t, size_t expected, int peer) {
    int got = 0;
    MPI_TRY(c, what, "MPI_Get_count", MPI_Get_count(st, mpi_dtype(t), &got));
    if (got < 0 || (size_t)got != expected)
        return ap_error(AUTOPAR_ERR_MPI,
                        "MPI communicator, %s on rank %d of %d (world rank %d): expected %zu %s "
                        "elements from rank %d, received %d",
                        what, c->rank, c->size, c->world_rank, expected, dtype_name(t), peer, got);
    return AUTOPAR_OK;
}

static ap_status mpi_send(ap_comm *c, const void *buf, size_t count, ap_comm_dtype t, int peer) {
    const char *what = "send";
    int n = 0;
    ap_status s = mpi_count(c, what, count, &n);
    if (s != AUTOPAR_OK) return s;
    MPI_TRY(c, what, "MPI_Send", MPI_Send(buf, n, mpi_dtype(t), peer, AP_COMM_TAG, mpi_of(c)));
    return AUTOPAR_OK;
}

static ap_status mpi_recv(ap_comm *c, void *buf, size_t count, ap_comm_dtype t, int peer) {
    const char *what = "recv";
    int n = 0;
    ap_status s = mpi_count(c, what, count, &n);
    if (s != AUTOPAR_OK) return s;
    MPI_Status st;
    MPI_TRY(c, what, "MPI_Recv",
            MPI_Recv(buf, n, mpi_dtype(t), peer, AP_COMM_TAG, mpi_of(c), &st));
    return check_received(c, what, &st, t, count, peer);
}

static ap_status mpi_send_recv(ap_comm *c, const void *send, size_t send_count, int dest,
                               void *recv, size_t recv_count, int src, ap_comm_dtype t) {
    const char *what = "send_recv";
    int ns = 0, nr = 0;
    ap_status s = mpi_count(c, what, send_count, &ns);
    if (s == AUTOPAR_OK) s = mpi_count(c, what, recv_count, &nr);
    if (s != AUTOPAR_OK) return s;
    MPI_Status st;
    MPI_TRY(c, what, "MPI_Sendrecv",
            MPI_Sendrecv(send, ns, mpi_dtype(t), dest < 0 ? MPI_PROC_NULL : dest, AP_COMM_TAG,
                         recv, nr, mpi_dtype(t), src < 0 ? MPI_PROC_NULL : src, AP_COMM_TAG,
                         mpi_of(c), &st));
    if (src < 0) return AUTOPAR_OK;
    return check_received(c, what, &st, t, recv_count, src);
}

static ap_status mpi_exchange(ap_comm *c, const ap_comm_p2p *ops, int n_ops) {
    const char *what = "exchange";
    for (int i = 0; i < n_ops; i++) {
        int n = 0;
        ap_status s = mpi_count(c, what, ops[i].count, &n);
        if (s != AUTOPAR_OK) return s;
    }
    MPI_Request *req = (MPI_Request *)malloc(sizeof(MPI_Request) * (size_t)n_ops);
    MPI_Status *st = (MPI_Status *)malloc(sizeof(MPI_Status) * (size_t)n_ops);
    if (!req || !st) {
        free(req);
        free(st);
        return ap_error(AUTOPAR_ERR_NOMEM, "MPI communicator, %s: out of host memory", what);
    }
    for (int i = 0; i < n_ops; i++) req[i] = MPI_REQUEST_NULL;
    ap_status s = AUTOPAR_OK;
    /* Receives first, so that every send finds its receive already posted. */
    for (int pass = 0; pass < 2 && s == AUTOPAR_OK; pass++) {
        for (int i = 0; i < n_ops && s == AUTOPAR_OK; i++) {
            const ap_comm_p2p *o = &ops[i];
            int e;
            if (pass == 0 && o->kind == AP_COMM_P2P_RECV) {
                e = MPI_Irecv(o->buf, (int)o->count, mpi_dtype(o->dtype), o->peer, AP_COMM_TAG,
                              mpi_of(c), &req[i]);
                if (e != MPI_SUCCESS) s = mpi_fail(c, what, "MPI_Irecv", e);
            } else if (pass == 1 && o->kind == AP_COMM_P2P_SEND) {
                e = MPI_Isend(o->buf, (int)o->count, mpi_dtype(o->dtype), o->peer, AP_COMM_TAG,
                              mpi_of(c), &req[i]);
                if (e != MPI_SUCCESS) s = mpi_fail(c, what, "MPI_Isend", e);
            }
        }
    }
    if (s != AUTOPAR_OK) {
        /* Do not leave receives pointing into the caller's buffers. */
        for (int i = 0; i < n_ops; i++) {
            if (req[i] == MPI_REQUEST_NULL) continue;
            if (ops[i].kind == AP_COMM_P2P_RECV) (void)MPI_Cancel(&req[i]);
            (void)MPI_Request_free(&req[i]);
        }
        free(req);
        free(st);
        return s;
    }
    int e = MPI_Waitall(n_ops, req, st);
    if (e == MPI_ERR_IN_STATUS) {
        for (int i = 0; i < n_ops; i++)
            if (st[i].MPI_ERROR != MPI_SUCCESS && st[i].MPI_ERROR != MPI_ERR_PENDING) {
                e = st[i].MPI_ERROR;
                break;
            }
    }
    if (e != MPI_SUCCESS) s = mpi_fail(c, what, "MPI_Waitall", e);
    for (int i = 0; i < n_ops && s == AUTOPAR_OK; i++)
        if (ops[i].kind == AP_COMM_P2P_RECV)
            s = check_received(c, what, &st[i], ops[i].dtype, ops[i].count, ops[i].peer);
    free(req);
    free(st);
    return s;
}

static ap_status mpi_barrier(ap_comm *c) {
    MPI_TRY(c, "barrier", "MPI_Barrier", MPI_Barrier(mpi_of(c)));
    return AUTOPAR_OK;
}

static const ap_comm_i mpi_iface = {
    .name           = "mpi",
    .device_buffers = false,
    .free           = mpi_free,
    .split          = mpi_split,
    .all_reduce     = mpi_all_reduce,
    .all_gather     = mpi_all_gather,
    .reduce_scatter = mpi_reduce_scatter,
    .all_to_all     = mpi_all_to_all,
    .broadcast      = mpi_broadcast,
    .send           = mpi_send,
    .recv           = mpi_recv,
    .exchange       = mpi_exchange,
    .send_recv      = mpi_send_recv,
    .barrier        = mpi_barrier,
    .synchronize    = NULL,
};

static ap_status mpi_wrap(MPI_Comm mc, const ap_comm *like, int world_rank, ap_comm **out) {
    int rank = 0, size = 1, e;
    if ((e = MPI_Comm_rank(mc, &rank)) != MPI_SUCCESS ||
        (e = MPI_Comm_size(mc, &size)) != MPI_SUCCESS) {
        (void)MPI_Comm_free(&mc);
        return mpi_fail(like, "split", "MPI_Comm_rank/size", e);
    }
    mpi_ctx *m = (mpi_ctx *)malloc(sizeof *m);
    if (!m) {
        (void)MPI_Comm_free(&mc);
        return ap_error(AUTOPAR_ERR_NOMEM, "MPI communicator: out of host memory");
    }
    m->comm = mc;
    ap_comm *c = NULL;
    ap_status s = ap_comm_wrap(&mpi_iface, m, rank, size, like, NULL, &c);
    if (s != AUTOPAR_OK) {
        (void)MPI_Comm_free(&mc);
        free(m);
        return s;
    }
    c->host = c;
    c->world_rank = world_rank;
    g_live_comms++;
    *out = c;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* World                                                                                       */
/* ------------------------------------------------------------------------------------------ */

ap_status ap_comm_world(ap_comm **out) {
    const char *what = "ap_comm_world";
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: out is NULL", what);
    *out = NULL;
    int inited = 0, finalized = 0;
    MPI_TRY(NULL, what, "MPI_Finalized", MPI_Finalized(&finalized));
    if (finalized)
        return ap_error(AUTOPAR_ERR_MPI,
                        "%s: MPI has already been finalised (it cannot be initialised again; "
                        "keep one world communicator for the life of the process)",
                        what);
    MPI_TRY(NULL, what, "MPI_Initialized", MPI_Initialized(&inited));
    if (!inited) {
        int provided = 0;
        MPI_TRY(NULL, what, "MPI_Init_thread",
                MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided));
        g_we_initialized = true;
        /* We own MPI now, so its world may report errors instead of aborting too. */
        (void)MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    }
    int world_rank = 0;
    MPI_TRY(NULL, what, "MPI_Comm_rank", MPI_Comm_rank(MPI_COMM_WORLD, &world_rank));
    MPI_Comm mc = MPI_COMM_NULL;
    MPI_TRY(NULL, what, "MPI_Comm_dup", MPI_Comm_dup(MPI_COMM_WORLD, &mc));
    int e = MPI_Comm_set_errhandler(mc, MPI_ERRORS_RETURN);
    /* Ranks on this host, numbered in world order: the basis of device selection. */
    MPI_Comm local = MPI_COMM_NULL;
    int local_rank = 0, local_size = 1;
    const char *call = "MPI_Comm_set_errhandler";
    if (e == MPI_SUCCESS) {
        call = "MPI_Comm_split_type";
        e = MPI_Comm_split_type(mc, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL, &local);
    }
    if (e == MPI_SUCCESS) {
        call = "MPI_Comm_rank/size";
        if ((e = MPI_Comm_rank(local, &local_rank)) == MPI_SUCCESS)
            e = MPI_Comm_size(local, &local_size);
    }
    if (local != MPI_COMM_NULL) (void)MPI_Comm_free(&local);
    if (e != MPI_SUCCESS) {
        (void)MPI_Comm_free(&mc);
        return mpi_fail(NULL, what, call, e);
    }
    ap_comm like;
    memset(&like, 0, sizeof like);
    like.rank = world_rank;
    like.world_rank = world_rank;
    like.local_rank = local_rank;
    like.local_size = local_size;
    return mpi_wrap(mc, &like, world_rank, out);
}

ap_status ap_comm_wrap(const ap_comm_i *iface, void *ctx, int rank, int size, const ap_comm *like,
                       ap_comm *host, ap_comm **out) {
    ap_comm *c = (ap_comm *)calloc(1, sizeof *c);
    if (!c) return ap_error(AUTOPAR_ERR_NOMEM, "communicator: out of host memory");
    c->iface = iface;
    c->ctx = ctx;
    c->rank = rank;
    c->size = size;
    c->host = host;
    if (like) {
        c->world_rank = like->world_rank;
        c->local_rank = like->local_rank;
        c->local_size = like->local_size;
        c->deterministic = like->deterministic;
    } else {
        c->local_size = 1;
    }
    *out = c;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Generic wrappers                                                                            */
/* ------------------------------------------------------------------------------------------ */

void ap_comm_free(ap_comm *comm) {
    if (!comm) return;
    if (comm->iface && comm->iface->free) comm->iface->free(comm);
    free(comm);
}

int ap_comm_rank(const ap_comm *comm) { return comm ? comm->rank : 0; }
int ap_comm_size(const ap_comm *comm) { return comm ? comm->size : 1; }
int ap_comm_world_rank(const ap_comm *comm) { return comm ? comm->world_rank : 0; }
int ap_comm_local_rank(const ap_comm *comm) { return comm ? comm->local_rank : 0; }
int ap_comm_local_size(const ap_comm *comm) { return comm ? comm->local_size : 1; }
int ap_comm_local_device(const ap_comm *comm, int device_count) {
    if (device_count < 1) return -1;
    return ap_comm_local_rank(comm) % device_count;
}
const char *ap_comm_backend_name(const ap_comm *comm) {
    return comm && comm->iface ? comm->iface->name : "none";
}
bool ap_comm_device_buffers(const ap_comm *comm) {
    return comm && comm->iface && comm->iface->device_buffers;
}
void ap_comm_set_deterministic(ap_comm *comm, bool on) {
    if (comm) comm->deterministic = on;
}

/* Checks shared by every operation. */
static ap_status check_comm(const ap_comm *c, const char *what) {
    if (!c || !c->iface) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: communicator is NULL", what);
    return AUTOPAR_OK;
}

static ap_status check_buf(const ap_comm *c, const char *what, const char *name, const void *p,
                           size_t count, ap_comm_dtype t) {
    if ((unsigned)t >= AP_COMM_DTYPE_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s (rank %d): bad element type %d", what,
                        c->rank, (int)t);
    if (count > 0 && !p)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s (rank %d): %s buffer is NULL for %zu elements",
                        what, c->rank, name, count);
    return AUTOPAR_OK;
}

static ap_status check_op(const ap_comm *c, const char *what, ap_comm_op op) {
    if ((unsigned)op >= AP_COMM_OP_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s (rank %d): bad reduction %d", what, c->rank,
                        (int)op);
    return AUTOPAR_OK;
}

static ap_status check_peer(const ap_comm *c, const char *what, const char *name, int peer,
                            bool allow_none) {
    if (allow_none && peer == AP_COMM_NO_PEER) return AUTOPAR_OK;
    if (peer < 0 || peer >= c->size)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s (rank %d): %s %d outside the group of %d",
                        what, c->rank, name, peer, c->size);
    return AUTOPAR_OK;
}

static ap_status no_overlap(const ap_comm *c, const char *what, const void *a, size_t a_bytes,
                            const void *b, size_t b_bytes) {
    if (overlaps(a, a_bytes, b, b_bytes))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s (rank %d): send and receive buffers overlap",
                        what, c->rank);
    return AUTOPAR_OK;
}

#define CHECK(expr)                                                                             \
    do {                                                                                        \
        ap_status ap_s_ = (expr);                                                               \
        if (ap_s_ != AUTOPAR_OK) return ap_s_;                                                  \
    } while (0)

/* The checks every collective of equal send and receive counts starts with. */
static ap_status check_collective(const ap_comm *c, const char *what, const void *send,
                                  const void *recv, size_t count, ap_comm_dtype t) {
    CHECK(check_comm(c, what));
    CHECK(check_buf(c, what, "send", send, count, t));
    return check_buf(c, what, "receive", recv, count, t);
}

ap_status ap_comm_split(ap_comm *parent, int color, int key, ap_comm **out) {
    const char *what = "ap_comm_split";
    CHECK(check_comm(parent, what));
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: out is NULL", what);
    *out = NULL;
    if (color < AP_COMM_UNDEFINED)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s (rank %d): color %d is negative", what,
                        parent->rank, color);
    return parent->iface->split(parent, color, key, out);
}

ap_status ap_comm_all_reduce(ap_comm *comm, const void *send, void *recv, size_t count,
                             ap_comm_dtype t, ap_comm_op op) {
    const char *what = "ap_comm_all_reduce";
    CHECK(check_collective(comm, what, send, recv, count, t));
    CHECK(check_op(comm, what, op));
    size_t bytes = count * ap_comm_dtype_size(t);
    if (send != recv) CHECK(no_overlap(comm, what, send, bytes, recv, bytes));
    if (count == 0) return AUTOPAR_OK;
    return comm->iface->all_reduce(comm, send, recv, count, t, op);
}

ap_status ap_comm_all_gather(ap_comm *comm, const void *send, void *recv, size_t count,
                             ap_comm_dtype t) {
    const char *what = "ap_comm_all_gather";
    CHECK(check_collective(comm, what, send, recv, count, t));
    size_t es = ap_comm_dtype_size(t);
    if (send != (const char *)recv + (size_t)comm->rank * count * es)
        CHECK(no_overlap(comm, what, send, count * es, recv, count * es * (size_t)comm->size));
    if (count == 0) return AUTOPAR_OK;
    return comm->iface->all_gather(comm, send, recv, count, t);
}

ap_status ap_comm_reduce_scatter(ap_comm *comm, const void *send, void *recv, size_t count,
                                 ap_comm_dtype t, ap_comm_op op) {
    const char *what = "ap_comm_reduce_scatter";
    CHECK(check_collective(comm, what, send, recv, count, t));
    CHECK(check_op(comm, what, op));
    size_t es = ap_comm_dtype_size(t);
    if ((const char *)send + (size_t)comm->rank * count * es != (const char *)recv)
        CHECK(no_overlap(comm, what, send, count * es * (size_t)comm->size, recv, count * es));
    if (count == 0) return AUTOPAR_OK;
    return comm->iface->reduce_scatter(comm, send, recv, count, t, op);
}

ap_status ap_comm_all_to_all(ap_comm *comm, const void *send, void *recv, size_t count,
                             ap_comm_dtype t) {
    const char *what = "ap_comm_all_to_all";
    CHECK(check_collective(comm, what, send, recv, count, t));
    size_t bytes = count * ap_comm_dtype_size(t) * (size_t)comm->size;
    CHECK(no_overlap(comm, what, send, bytes, recv, bytes));
    if (count == 0) return AUTOPAR_OK;
    return comm->iface->all_to_all(comm, send, recv, count, t);
}

ap_status ap_comm_broadcast(ap_comm *comm, void *buf, size_t count, ap_comm_dtype t, int root) {
    const char *what = "ap_comm_broadcast";
    CHECK(check_comm(comm, what));
    CHECK(check_buf(comm, what, "the", buf, count, t));
    CHECK(check_peer(comm, what, "root", root, false));
    if (count == 0) return AUTOPAR_OK;
    return comm->iface->broadcast(comm, buf, count, t, root);
}

ap_status ap_comm_barrier(ap_comm *comm) {
    CHECK(check_comm(comm, "ap_comm_barrier"));
    return comm->iface->barrier(comm);
}

ap_status ap_comm_synchronize(ap_comm *comm) {
    CHECK(check_comm(comm, "ap_comm_synchronize"));
    return comm->iface->synchronize ? comm->iface->synchronize(comm) : AUTOPAR_OK;
}

/* The checks of a blocking send or receive (role "send" / "receive"): a blocking exchange with
 * itself would deadlock. */
static ap_status check_blocking_p2p(const ap_comm *comm, const char *what, const char *role,
                                    const void *buf, size_t count, ap_comm_dtype t, int peer) {
    CHECK(check_comm(comm, what));
    CHECK(check_buf(comm, what, role, buf, count, t));
    CHECK(check_peer(comm, what, "peer", peer, false));
    if (peer == comm->rank)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s (rank %d): a blocking %s %s itself would deadlock; use "
                        "ap_comm_send_recv or ap_comm_exchange",
                        what, comm->rank, role, role[0] == 's' ? "to" : "from");
    return AUTOPAR_OK;
}

ap_status ap_comm_send(ap_comm *comm, const void *buf, size_t count, ap_comm_dtype t, int peer) {
    CHECK(check_blocking_p2p(comm, "ap_comm_send", "send", buf, count, t, peer));
    if (count == 0) return AUTOPAR_OK;
    return comm->iface->send(comm, buf, count, t, peer);
}

ap_status ap_comm_recv(ap_comm *comm, void *buf, size_t count, ap_comm_dtype t, int peer) {
    CHECK(check_blocking_p2p(comm, "ap_comm_recv", "receive", buf, count, t, peer));
    if (count == 0) return AUTOPAR_OK;
    return comm->iface->recv(comm, buf, count, t, peer);
}

/* Checks a batch; zero-count operations are dropped (both sides agree on the count, so both
 * drop them) so no implementation has to send empty messages. */
static ap_status check_exchange(const ap_comm *c, const char *what, const ap_comm_p2p *ops,
                                int n_ops) {
    if (n_ops < 0 || (n_ops > 0 && !ops))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s (rank %d): bad operation list (%d)", what,
                        c->rank, n_ops);
    for (int i = 0; i < n_ops; i++) {
        const ap_comm_p2p *o = &ops[i];
        if (o->kind != AP_COMM_P2P_SEND && o->kind != AP_COMM_P2P_RECV)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s (rank %d): operation %d has bad kind %d",
                            what, c->rank, i, (int)o->kind);
        CHECK(check_buf(c, what, o->kind == AP_COMM_P2P_SEND ? "send" : "receive", o->buf,
                        o->count, o->dtype));
        CHECK(check_peer(c, what, "peer", o->peer, false));
    }
    for (int i = 0; i < n_ops; i++) {
        if (ops[i].kind != AP_COMM_P2P_RECV) continue;
        size_t bi = ops[i].count * ap_comm_dtype_size(ops[i].dtype);
        for (int j = 0; j < n_ops; j++) {
            if (j == i) continue;
            size_t bj = ops[j].count * ap_comm_dtype_size(ops[j].dtype);
            if (overlaps(ops[i].buf, bi, ops[j].buf, bj))
                return ap_error(AUTOPAR_ERR_INVALID_ARG,
                                "%s (rank %d): receive buffer of operation %d overlaps the "
                                "buffer of operation %d",
                                what, c->rank, i, j);
        }
    }
    return AUTOPAR_OK;
}

static ap_status exchange_nonempty(ap_comm *comm, const ap_comm_p2p *ops, int n_ops) {
    int n = 0;
    for (int i = 0; i < n_ops; i++) n += ops[i].count > 0;
    if (n == 0) return AUTOPAR_OK;
    if (n == n_ops) return comm->iface->exchange(comm, ops, n_ops);
    ap_comm_p2p *kept = (ap_comm_p2p *)malloc(sizeof *kept * (size_t)n);
    if (!kept) return ap_error(AUTOPAR_ERR_NOMEM, "ap_comm_exchange: out of host memory");
    n = 0;
    for (int i = 0; i < n_ops; i++)
        if (ops[i].count > 0) kept[n++] = ops[i];
    ap_status s = comm->iface->exchange(comm, kept, n);
    free(kept);
    return s;
}

ap_status ap_comm_exchange(ap_comm *comm, const ap_comm_p2p *ops, int n_ops) {
    const char *what = "ap_comm_exchange";
    CHECK(check_comm(comm, what));
    CHECK(check_exchange(comm, what, ops, n_ops));
    return exchange_nonempty(comm, ops, n_ops);
}

ap_status ap_comm_send_recv(ap_comm *comm, const void *send, size_t send_count, int dest,
                            void *recv, size_t recv_count, int src, ap_comm_dtype t) {
    const char *what = "ap_comm_send_recv";
    CHECK(check_comm(comm, what));
    CHECK(check_peer(comm, what, "destination", dest, true));
    CHECK(check_peer(comm, what, "source", src, true));
    if (dest == AP_COMM_NO_PEER) send_count = 0;
    if (src == AP_COMM_NO_PEER) recv_count = 0;
    CHECK(check_buf(comm, what, "send", send, send_count, t));
    CHECK(check_buf(comm, what, "receive", recv, recv_count, t));
    size_t es = ap_comm_dtype_size(t);
    CHECK(no_overlap(comm, what, send, send_count * es, recv, recv_count * es));
    if (send_count == 0) dest = AP_COMM_NO_PEER;
    if (recv_count == 0) src = AP_COMM_NO_PEER;
    if (dest == AP_COMM_NO_PEER && src == AP_COMM_NO_PEER) return AUTOPAR_OK;
    if (comm->iface->send_recv)
        return comm->iface->send_recv(comm, send, send_count, dest, recv, recv_count, src, t);
    ap_comm_p2p ops[2];
    int n = 0;
    if (src != AP_COMM_NO_PEER)
        ops[n++] = (ap_comm_p2p){AP_COMM_P2P_RECV, src, recv, recv_count, t};
    if (dest != AP_COMM_NO_PEER)
        ops[n++] = (ap_comm_p2p){AP_COMM_P2P_SEND, dest, (void *)send, send_count, t};
    return comm->iface->exchange(comm, ops, n);
}

/* ------------------------------------------------------------------------------------------ */
/* Agreement                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* The host (MPI) communicator of any communicator. */
static ap_status host_of(ap_comm *comm, const char *what, ap_comm **out) {
    CHECK(check_comm(comm, what));
    if (!comm->host || comm->host->iface != &mpi_iface)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: communicator has no MPI host communicator",
                        what);
    *out = comm->host;
    return AUTOPAR_OK;
}

/* True when msg already starts with "rank <digits>: " (an agreed message being re-agreed). */
static bool has_rank_prefix(const char *msg) {
    if (strncmp(msg, "rank ", 5) != 0) return false;
    const char *p = msg + 5;
    if (*p < '0' || *p > '9') return false;
    while (*p >= '0' && *p <= '9') p++;
    return p[0] == ':' && p[1] == ' ';
}

ap_status ap_comm_bcast_error(ap_comm *comm, int root, ap_status status) {
    const char *what = "ap_comm_bcast_error";
    ap_comm *h = NULL;
    CHECK(host_of(comm, what, &h));
    CHECK(check_peer(h, what, "root", root, false));
    /* One broadcast carries status, origin and message; 1 KiB is the size of the last-error
     * buffer (errors.c). */
    struct {
        int32_t status;
        int32_t world_rank;
        char    msg[1024];
    } payload;
    memset(&payload, 0, sizeof payload);
    if (h->rank == root) {
        payload.status = (int32_t)status;
        payload.world_rank = h->world_rank;
        snprintf(payload.msg, sizeof payload.msg, "%s", autopar_last_error());
    }
    MPI_TRY(h, what, "MPI_Bcast", MPI_Bcast(&payload, (int)sizeof payload, MPI_BYTE, root,
                                            mpi_of(h)));
    payload.msg[sizeof payload.msg - 1] = '\0';
    ap_status s = (ap_status)payload.status;
    if (s == AUTOPAR_OK) return AUTOPAR_OK;
    if ((int)s < 0 || s >= AUTOPAR_STATUS_COUNT) s = AUTOPAR_ERR_MPI;
    if (has_rank_prefix(payload.msg)) return ap_error(s, "%s", payload.msg);
    return ap_error(s, "rank %d: %s", (int)payload.world_rank, payload.msg);
}

ap_status ap_comm_all_ok(ap_comm *comm, ap_status local) {
    const char *what = "ap_comm_all_ok";
    ap_comm *h = NULL;
    CHECK(host_of(comm, what, &h));
    int mine = local != AUTOPAR_OK ? h->rank : h->size, lowest = h->size;
    MPI_TRY(h, what, "MPI_Allreduce",
            MPI_Allreduce(&mine, &lowest, 1, MPI_INT, MPI_MIN, mpi_of(h)));
    if (lowest >= h->size) return AUTOPAR_OK;
    return ap_comm_bcast_error(h, lowest, local);
}

ap_status ap_comm_check_same(ap_comm *comm, uint64_t value, const char *what_value) {
    const char *what = "ap_comm_check_same";
    ap_comm *h = NULL;
    CHECK(host_of(comm, what, &h));
    /* min(v) and min(~v) = ~max(v) in one reduction. */
    uint64_t in[2] = {value, ~value}, ext[2];
    MPI_TRY(h, what, "MPI_Allreduce",
            MPI_Allreduce(in, ext, 2, MPI_UINT64_T, MPI_MIN, mpi_of(h)));
    uint64_t lo = ext[0], hi = ~ext[1];
    if (lo == hi) return AUTOPAR_OK;
    int who[2] = {value == lo ? h->world_rank : INT32_MAX, value == hi ? h->world_rank : INT32_MAX};
    int first[2];
    MPI_TRY(h, what, "MPI_Allreduce", MPI_Allreduce(who, first, 2, MPI_INT, MPI_MIN, mpi_of(h)));
    return ap_error(AUTOPAR_ERR_MPI,
                    "ranks disagree on %s: rank %d has %llu, rank %d has %llu",
                    what_value ? what_value : "a value", first[0], (unsigned long long)lo,
                    first[1], (unsigned long long)hi);
}

/* ------------------------------------------------------------------------------------------ */
/* NCCL stub when the CUDA backend is not built (runtime/cuda/comm_nccl.cu otherwise).         */
/* ------------------------------------------------------------------------------------------ */

#ifndef AUTOPAR_USE_CUDA
ap_status ap_comm_nccl_new(ap_comm *parent, ap_cuda_ctx *cuda, ap_comm **out) {
    (void)parent;
    (void)cuda;
    if (out) *out = NULL;
    return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                    "ap_comm_nccl_new: libautopar was built without CUDA and NCCL");
}
#endif
