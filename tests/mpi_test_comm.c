/*
 * Communicators (runtime/comm.h) under mpirun with 1, 2, 4 and 8 ranks.
 *
 * For every collective and point-to-point operation, on the world and on split groups (the
 * row and column lines of a 2 x (P/2) "mesh", an irregular split with reversed keys, and a split
 * that leaves rank 0 out), with f32, f64, i32 and u8 data built from (rank, index), the result is
 * compared with the value computed locally from the same formula. Sums are of small integers, so
 * every comparison is exact; deterministic mode is checked bit for bit against a rank-order sum
 * of non-integer values. Also: a ring where every rank sends to rank+1 and receives from rank-1
 * at once (large messages, so a naive blocking send would deadlock), a pipeline chain with open
 * ends, all-pairs batched exchanges, FIFO matching; the agreement helpers (one rank fails, every
 * rank gets its status and message); argument errors; local rank; and that MPI is finalised
 * after the last communicator is freed (this layer initialised it).
 *
 * The checks are written against a small memory interface so that mpi_test_nccl.c runs the same
 * suite on device buffers through NCCL (it defines COMM_TEST_NO_MAIN and includes this file).
 * A failing check prints "rank R: FAIL ..." and the run goes on (every rank still runs every
 * collective, so a wrong value never turns into a hang); the exit code is non-zero on every rank
 * when any rank failed.
 */
#include "comm.h"

#include <mpi.h>

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Harness                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Where communication buffers live: host memory for MPI, device memory for NCCL. download must
 * wait for the communicator's pending operations (the CUDA copies are stream-ordered). */
typedef struct test_mem {
    void      *ctx;
    ap_status (*alloc)(void *ctx, size_t bytes, void **out);
    void      (*release)(void *ctx, void *p);
    ap_status (*upload)(void *ctx, void *dst, const void *src, size_t bytes);
    ap_status (*download)(void *ctx, void *dst, const void *src, size_t bytes);
} test_mem;

static int g_failures;
static int g_world_rank;

static void fail_at(int line, const char *fmt, ...) AP_PRINTF(2, 3);
static void fail_at(int line, const char *fmt, ...) {
    char msg[1400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (g_failures < 40) fprintf(stderr, "rank %d: FAIL line %d: %s\n", g_world_rank, line, msg);
    g_failures++;
}

#define EXPECT(cond, ...)                                                                       \
    do {                                                                                        \
        if (!(cond)) fail_at(__LINE__, __VA_ARGS__);                                            \
    } while (0)

#define EXPECT_OK(expr)                                                                         \
    do {                                                                                        \
        ap_status s_ = (expr);                                                                  \
        if (s_ != AUTOPAR_OK)                                                                   \
            fail_at(__LINE__, "%s -> %s: %s", #expr, autopar_status_str(s_),                    \
                    autopar_last_error());                                                      \
    } while (0)

#define EXPECT_STATUS(expr, want)                                                               \
    do {                                                                                        \
        ap_status s_ = (expr);                                                                  \
        if (s_ != (want))                                                                       \
            fail_at(__LINE__, "%s -> %s, expected %s (%s)", #expr, autopar_status_str(s_),      \
                    autopar_status_str(want), autopar_last_error());                            \
    } while (0)

/* A typed buffer: a host mirror plus the communication buffer. */
typedef struct tbuf {
    ap_comm_dtype t;
    size_t        n;
    void         *host;
    void         *buf;
} tbuf;

static tbuf tb_new(const test_mem *m, ap_comm_dtype t, size_t n) {
    tbuf b = {t, n, NULL, NULL};
    size_t bytes = n * ap_comm_dtype_size(t);
    b.host = calloc(n ? n : 1, ap_comm_dtype_size(t));
    if (!b.host || m->alloc(m->ctx, bytes ? bytes : 1, &b.buf) != AUTOPAR_OK || !b.buf)
        fail_at(__LINE__, "allocation of %zu bytes failed", bytes);
    return b;
}

static void tb_free(const test_mem *m, tbuf *b) {
    free(b->host);
    if (b->buf) m->release(m->ctx, b->buf);
    b->host = b->buf = NULL;
}

static void tb_set(tbuf *b, size_t i, double v) {
    switch (b->t) {
    case AP_COMM_F32: ((float *)b->host)[i] = (float)v; break;
    case AP_COMM_F64: ((double *)b->host)[i] = v; break;
    case AP_COMM_I32: ((int32_t *)b->host)[i] = (int32_t)v; break;
    default:          ((uint8_t *)b->host)[i] = (uint8_t)v; break;
    }
}

static double tb_get(const tbuf *b, size_t i) {
    switch (b->t) {
    case AP_COMM_F32: return ((const float *)b->host)[i];
    case AP_COMM_F64: return ((const double *)b->host)[i];
    case AP_COMM_I32: return ((const int32_t *)b->host)[i];
    default:          return ((const uint8_t *)b->host)[i];
    }
}

static void tb_push(const test_mem *m, tbuf *b) {
    if (b->buf && b->host)
        EXPECT_OK(m->upload(m->ctx, b->buf, b->host, b->n * ap_comm_dtype_size(b->t)));
}

static void tb_pull(const test_mem *m, tbuf *b) {
    if (b->buf && b->host)
        EXPECT_OK(m->download(m->ctx, b->host, b->buf, b->n * ap_comm_dtype_size(b->t)));
}

/* Address of element i of the communication buffer. */
static void *tb_at(const tbuf *b, size_t i) {
    return (char *)b->buf + i * ap_comm_dtype_size(b->t);
}

static void tb_fill(tbuf *b, double v) {
    for (size_t i = 0; i < b->n; i++) tb_set(b, i, v);
}

static const char *tname(ap_comm_dtype t) {
    static const char *names[] = {"f32", "f64", "i32", "u8"};
    return (unsigned)t < AP_COMM_DTYPE_COUNT ? names[t] : "?";
}

/* The data: small integers (non-negative for u8), so sums over 8 ranks are exact in every type. */
static double ival(ap_comm_dtype t, int r, size_t i, int salt) {
    int v = (int)(((long)r * 31 + (long)i * 7 + (long)salt * 13) % 23);
    return t == AP_COMM_U8 ? v : v - 11;
}

/* Non-integer data for deterministic mode. */
static double fval(int r, size_t i) {
    return (double)((r * 37 + (long)i * 11) % 101) * 0.0137 + r * 1e-3 + 0.5;
}

static double *want_new(size_t n) {
    double *w = (double *)calloc(n ? n : 1, sizeof *w);
    if (!w) fail_at(__LINE__, "out of memory");
    return w;
}

/* Compares elements [off, off + n) of b (host mirror, after tb_pull) with want[0..n): exactly when
 * rtol == 0, else |got - want| <= rtol * |want|. Reports the first mismatch. */
static void check_vals(const tbuf *b, size_t off, const double *want, size_t n, double rtol,
                       int line, const char *fmt, ...) AP_PRINTF(7, 8);
static void check_vals(const tbuf *b, size_t off, const double *want, size_t n, double rtol,
                       int line, const char *fmt, ...) {
    if (!b->host || !want) return;
    for (size_t i = 0; i < n; i++) {
        double got = tb_get(b, off + i), w = want[i];
        bool ok = rtol == 0 ? got == w : !(fabs(got - w) > rtol * fabs(w));
        if (!ok) {
            char where[300];
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(where, sizeof where, fmt, ap);
            va_end(ap);
            fail_at(line, "%s: element %zu is %.17g, expected %.17g", where, i, got, w);
            return;
        }
    }
}

#define CHECK_EXACT(b, off, want, n, ...)                                                       \
    check_vals((b), (off), (want), (n), 0.0, __LINE__, __VA_ARGS__)

/* ------------------------------------------------------------------------------------------ */
/* Collectives                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static void test_collectives(ap_comm *c, const test_mem *m, ap_comm_dtype t, size_t n,
                             const char *label) {
    const int rank = ap_comm_rank(c), size = ap_comm_size(c);
    const size_t sn = n * (size_t)size;
    const char *tn = tname(t);
    double *w = want_new(sn);
    tbuf s = tb_new(m, t, n), r = tb_new(m, t, n), g = tb_new(m, t, sn), h = tb_new(m, t, sn);
    if (!w || !s.buf || !r.buf || !g.buf || !h.buf) goto done;

    /* all_reduce, sum, out of place then in place */
    for (size_t i = 0; i < n; i++) {
        tb_set(&s, i, ival(t, rank, i, 1));
        w[i] = 0;
        for (int q = 0; q < size; q++) w[i] += ival(t, q, i, 1);
    }
    tb_fill(&r, 99);
    tb_push(m, &s);
    tb_push(m, &r);
    EXPECT_OK(ap_comm_all_reduce(c, s.buf, r.buf, n, t, AP_COMM_SUM));
    tb_pull(m, &r);
    CHECK_EXACT(&r, 0, w, n, "%s %s all_reduce sum n=%zu", label, tn, n);
    EXPECT_OK(ap_comm_all_reduce(c, s.buf, s.buf, n, t, AP_COMM_SUM));
    tb_pull(m, &s);
    CHECK_EXACT(&s, 0, w, n, "%s %s all_reduce sum in place n=%zu", label, tn, n);

    /* all_reduce, max and min (in place) */
    for (int op = AP_COMM_MAX; op <= AP_COMM_MIN; op++) {
        for (size_t i = 0; i < n; i++) {
            tb_set(&s, i, ival(t, rank, i, 2));
            w[i] = ival(t, 0, i, 2);
            for (int q = 1; q < size; q++) {
                double v = ival(t, q, i, 2);
                if (op == AP_COMM_MAX ? v > w[i] : v < w[i]) w[i] = v;
            }
        }
        tb_push(m, &s);
        EXPECT_OK(ap_comm_all_reduce(c, s.buf, s.buf, n, t, (ap_comm_op)op));
        tb_pull(m, &s);
        CHECK_EXACT(&s, 0, w, n, "%s %s all_reduce %s n=%zu", label, tn,
                    op == AP_COMM_MAX ? "max" : "min", n);
    }

    /* all_gather, out of place then in place */
    for (size_t i = 0; i < n; i++) tb_set(&s, i, ival(t, rank, i, 3));
    for (int q = 0; q < size; q++)
        for (size_t i = 0; i < n; i++) w[(size_t)q * n + i] = ival(t, q, i, 3);
    tb_fill(&g, 99);
    tb_push(m, &s);
    tb_push(m, &g);
    EXPECT_OK(ap_comm_all_gather(c, s.buf, g.buf, n, t));
    tb_pull(m, &g);
    CHECK_EXACT(&g, 0, w, sn, "%s %s all_gather n=%zu", label, tn, n);
    tb_fill(&g, 99);
    for (size_t i = 0; i < n; i++) tb_set(&g, (size_t)rank * n + i, ival(t, rank, i, 3));
    tb_push(m, &g);
    EXPECT_OK(ap_comm_all_gather(c, tb_at(&g, (size_t)rank * n), g.buf, n, t));
    tb_pull(m, &g);
    CHECK_EXACT(&g, 0, w, sn, "%s %s all_gather in place n=%zu", label, tn, n);

    /* reduce_scatter: sum out of place, sum in place, max */
    for (int variant = 0; variant < 3; variant++) {
        int salt = 5 + variant;
        ap_comm_op op = variant == 2 ? AP_COMM_MAX : AP_COMM_SUM;
        for (size_t k = 0; k < sn; k++) tb_set(&g, k, ival(t, rank, k, salt));
        for (size_t i = 0; i < n; i++) {
            size_t k = (size_t)rank * n + i;
            w[i] = ival(t, 0, k, salt);
            for (int q = 1; q < size; q++) {
                double v = ival(t, q, k, salt);
                w[i] = op == AP_COMM_SUM ? w[i] + v : (v > w[i] ? v : w[i]);
            }
        }
        tb_fill(&r, 99);
        tb_push(m, &g);
        tb_push(m, &r);
        if (variant == 1) {
            EXPECT_OK(ap_comm_reduce_scatter(c, g.buf, tb_at(&g, (size_t)rank * n), n, t, op));
            tb_pull(m, &g);
            CHECK_EXACT(&g, (size_t)rank * n, w, n, "%s %s reduce_scatter in place n=%zu", label,
                        tn, n);
        } else {
            EXPECT_OK(ap_comm_reduce_scatter(c, g.buf, r.buf, n, t, op));
            tb_pull(m, &r);
            CHECK_EXACT(&r, 0, w, n, "%s %s reduce_scatter %s n=%zu", label, tn,
                        variant ? "max" : "sum", n);
        }
    }

    /* all_to_all */
    for (size_t k = 0; k < sn; k++) tb_set(&g, k, ival(t, rank, k, 8));
    for (int q = 0; q < size; q++)
        for (size_t i = 0; i < n; i++)
            w[(size_t)q * n + i] = ival(t, q, (size_t)rank * n + i, 8);
    tb_fill(&h, 99);
    tb_push(m, &g);
    tb_push(m, &h);
    EXPECT_OK(ap_comm_all_to_all(c, g.buf, h.buf, n, t));
    tb_pull(m, &h);
    CHECK_EXACT(&h, 0, w, sn, "%s %s all_to_all n=%zu", label, tn, n);

    /* broadcast from the first, last and middle rank */
    int roots[3] = {0, size - 1, size / 2};
    for (int k = 0; k < 3; k++) {
        int root = roots[k];
        for (size_t i = 0; i < n; i++) {
            w[i] = ival(t, root, i, 9 + root);
            tb_set(&s, i, rank == root ? w[i] : 99);
        }
        tb_push(m, &s);
        EXPECT_OK(ap_comm_broadcast(c, s.buf, n, t, root));
        tb_pull(m, &s);
        CHECK_EXACT(&s, 0, w, n, "%s %s broadcast root %d n=%zu", label, tn, root, n);
    }

done:
    free(w);
    tb_free(m, &s);
    tb_free(m, &r);
    tb_free(m, &g);
    tb_free(m, &h);
}

/* Sum over ranks 0..size-1 of fval(q, k), accumulated in rank order in type t (f32 or f64). */
static double rank_order_sum(ap_comm_dtype t, int size, size_t k) {
    if (t == AP_COMM_F32) {
        float acc = (float)fval(0, k);
        for (int q = 1; q < size; q++) acc += (float)fval(q, k);
        return acc;
    }
    double acc = fval(0, k);
    for (int q = 1; q < size; q++) acc += fval(q, k);
    return acc;
}

static void test_deterministic(ap_comm *c, const test_mem *m, ap_comm_dtype t, size_t n,
                               const char *label) {
    const int rank = ap_comm_rank(c), size = ap_comm_size(c);
    const size_t sn = n * (size_t)size;
    const char *tn = tname(t);
    double *w = want_new(sn);
    tbuf s = tb_new(m, t, n), r = tb_new(m, t, n), g = tb_new(m, t, sn);
    if (!w || !s.buf || !r.buf || !g.buf) goto done;

    for (int det = 1; det >= 0; det--) {
        /* Bit-exact against the rank-order sum when deterministic; within rounding otherwise. */
        double rtol = det ? 0.0 : 1e-5;
        ap_comm_set_deterministic(c, det != 0);
        for (size_t i = 0; i < n; i++) {
            tb_set(&s, i, fval(rank, i));
            w[i] = rank_order_sum(t, size, i);
        }
        tb_fill(&r, 99);
        tb_push(m, &s);
        tb_push(m, &r);
        EXPECT_OK(ap_comm_all_reduce(c, s.buf, r.buf, n, t, AP_COMM_SUM));
        tb_pull(m, &r);
        check_vals(&r, 0, w, n, rtol, __LINE__, "%s %s all_reduce deterministic=%d", label, tn,
                   det);
        EXPECT_OK(ap_comm_all_reduce(c, s.buf, s.buf, n, t, AP_COMM_SUM));
        tb_pull(m, &s);
        check_vals(&s, 0, w, n, rtol, __LINE__, "%s %s all_reduce in place deterministic=%d",
                   label, tn, det);

        for (size_t k = 0; k < sn; k++) tb_set(&g, k, fval(rank, k));
        for (size_t i = 0; i < n; i++) w[i] = rank_order_sum(t, size, (size_t)rank * n + i);
        tb_fill(&r, 99);
        tb_push(m, &g);
        tb_push(m, &r);
        EXPECT_OK(ap_comm_reduce_scatter(c, g.buf, r.buf, n, t, AP_COMM_SUM));
        tb_pull(m, &r);
        check_vals(&r, 0, w, n, rtol, __LINE__, "%s %s reduce_scatter deterministic=%d", label,
                   tn, det);
        EXPECT_OK(ap_comm_reduce_scatter(c, g.buf, tb_at(&g, (size_t)rank * n), n, t,
                                         AP_COMM_SUM));
        tb_pull(m, &g);
        check_vals(&g, (size_t)rank * n, w, n, rtol, __LINE__,
                   "%s %s reduce_scatter in place deterministic=%d", label, tn, det);
    }

done:
    ap_comm_set_deterministic(c, false);
    free(w);
    tb_free(m, &s);
    tb_free(m, &r);
    tb_free(m, &g);
}

/* ------------------------------------------------------------------------------------------ */
/* Point to point                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* Elements rank p sends to rank q in the all-pairs exchange. */
static size_t pair_count(int p, int q) { return 1 + (size_t)((p + 2 * q) % 5); }

static void test_p2p(ap_comm *c, const test_mem *m, ap_comm_dtype t, const char *label) {
    const int rank = ap_comm_rank(c), size = ap_comm_size(c);
    const char *tn = tname(t);
    const int next = (rank + 1) % size, prev = (rank + size - 1) % size;
    double *w = want_new(20000);
    if (!w) return;

    /* Blocking pairs: even ranks send first, odd ranks receive first. */
    {
        const size_t n = 9;
        tbuf s = tb_new(m, t, n), r = tb_new(m, t, n);
        int partner = rank % 2 == 0 ? rank + 1 : rank - 1;
        if (partner < size && s.buf && r.buf) {
            for (size_t i = 0; i < n; i++) {
                tb_set(&s, i, ival(t, rank, i, 20 + rank % 2));
                w[i] = ival(t, partner, i, 20 + partner % 2);
            }
            tb_fill(&r, 99);
            tb_push(m, &s);
            tb_push(m, &r);
            if (rank % 2 == 0) {
                EXPECT_OK(ap_comm_send(c, s.buf, n, t, partner));
                EXPECT_OK(ap_comm_recv(c, r.buf, n, t, partner));
            } else {
                EXPECT_OK(ap_comm_recv(c, r.buf, n, t, partner));
                EXPECT_OK(ap_comm_send(c, s.buf, n, t, partner));
            }
            tb_pull(m, &r);
            CHECK_EXACT(&r, 0, w, n, "%s %s send/recv with rank %d", label, tn, partner);
        }
        tb_free(m, &s);
        tb_free(m, &r);
    }

    /* Ring: everybody sends to rank+1 and receives from rank-1 at once. 20000 elements is far
     * above MPI's eager limit, so a send-then-receive ring would deadlock. */
    {
        const size_t n = 20000;
        tbuf s = tb_new(m, t, n), r = tb_new(m, t, n);
        if (s.buf && r.buf) {
            for (size_t i = 0; i < n; i++) {
                tb_set(&s, i, ival(t, rank, i, 22));
                w[i] = ival(t, prev, i, 22);
            }
            tb_fill(&r, 99);
            tb_push(m, &s);
            tb_push(m, &r);
            EXPECT_OK(ap_comm_send_recv(c, s.buf, n, next, r.buf, n, prev, t));
            tb_pull(m, &r);
            CHECK_EXACT(&r, 0, w, n, "%s %s ring send_recv", label, tn);
        }
        tb_free(m, &s);
        tb_free(m, &r);
    }

    /* Pipeline chain with open ends: rank 0 only sends, the last rank only receives. */
    {
        const size_t n = 300;
        int dest = rank + 1 < size ? rank + 1 : AP_COMM_NO_PEER;
        int src = rank > 0 ? rank - 1 : AP_COMM_NO_PEER;
        tbuf s = tb_new(m, t, n), r = tb_new(m, t, n);
        if (s.buf && r.buf) {
            for (size_t i = 0; i < n; i++) {
                tb_set(&s, i, ival(t, rank, i, 23));
                w[i] = src == AP_COMM_NO_PEER ? 99 : ival(t, src, i, 23);
            }
            tb_fill(&r, 99);
            tb_push(m, &s);
            tb_push(m, &r);
            EXPECT_OK(ap_comm_send_recv(c, s.buf, n, dest, r.buf, n, src, t));
            tb_pull(m, &r);
            CHECK_EXACT(&r, 0, w, n, "%s %s chain send_recv", label, tn);
        }
        tb_free(m, &s);
        tb_free(m, &r);
    }

    /* All pairs in one batch (self included), receives posted in reverse order. */
    {
        tbuf *s = (tbuf *)calloc((size_t)size, sizeof *s);
        tbuf *r = (tbuf *)calloc((size_t)size, sizeof *r);
        ap_comm_p2p *ops = (ap_comm_p2p *)calloc(2 * (size_t)size, sizeof *ops);
        if (s && r && ops) {
            int k = 0;
            for (int q = size - 1; q >= 0; q--) {
                r[q] = tb_new(m, t, pair_count(q, rank));
                tb_fill(&r[q], 99);
                tb_push(m, &r[q]);
                ops[k++] = (ap_comm_p2p){AP_COMM_P2P_RECV, q, r[q].buf, r[q].n, t};
            }
            for (int q = 0; q < size; q++) {
                s[q] = tb_new(m, t, pair_count(rank, q));
                for (size_t i = 0; i < s[q].n; i++)
                    tb_set(&s[q], i, ival(t, rank, (size_t)q * 100 + i, 24));
                tb_push(m, &s[q]);
                ops[k++] = (ap_comm_p2p){AP_COMM_P2P_SEND, q, s[q].buf, s[q].n, t};
            }
            EXPECT_OK(ap_comm_exchange(c, ops, k));
            for (int q = 0; q < size; q++) {
                tb_pull(m, &r[q]);
                for (size_t i = 0; i < r[q].n; i++) w[i] = ival(t, q, (size_t)rank * 100 + i, 24);
                CHECK_EXACT(&r[q], 0, w, r[q].n, "%s %s exchange from rank %d", label, tn, q);
            }
            for (int q = 0; q < size; q++) {
                tb_free(m, &s[q]);
                tb_free(m, &r[q]);
            }
        } else {
            fail_at(__LINE__, "out of memory");
        }
        free(s);
        free(r);
        free(ops);
    }

    /* Two messages to the same peer match in posting order (3 then 5 elements). */
    {
        tbuf sa = tb_new(m, t, 3), sb = tb_new(m, t, 5), ra = tb_new(m, t, 3), rb = tb_new(m, t, 5);
        if (sa.buf && sb.buf && ra.buf && rb.buf) {
            for (size_t i = 0; i < 5; i++) {
                if (i < 3) tb_set(&sa, i, ival(t, rank, i, 25));
                tb_set(&sb, i, ival(t, rank, i, 26));
            }
            tb_push(m, &sa);
            tb_push(m, &sb);
            ap_comm_p2p ops[4] = {
                {AP_COMM_P2P_SEND, next, sa.buf, 3, t},
                {AP_COMM_P2P_RECV, prev, ra.buf, 3, t},
                {AP_COMM_P2P_SEND, next, sb.buf, 5, t},
                {AP_COMM_P2P_RECV, prev, rb.buf, 5, t},
            };
            EXPECT_OK(ap_comm_exchange(c, ops, 4));
            tb_pull(m, &ra);
            tb_pull(m, &rb);
            for (size_t i = 0; i < 3; i++) w[i] = ival(t, prev, i, 25);
            CHECK_EXACT(&ra, 0, w, 3, "%s %s first message from rank %d", label, tn, prev);
            for (size_t i = 0; i < 5; i++) w[i] = ival(t, prev, i, 26);
            CHECK_EXACT(&rb, 0, w, 5, "%s %s second message from rank %d", label, tn, prev);
        }
        tb_free(m, &sa);
        tb_free(m, &sb);
        tb_free(m, &ra);
        tb_free(m, &rb);
    }

    EXPECT_OK(ap_comm_barrier(c));
    EXPECT_OK(ap_comm_synchronize(c));
    free(w);
}

/* ------------------------------------------------------------------------------------------ */
/* Agreement and argument errors                                                               */
/* ------------------------------------------------------------------------------------------ */

static void test_agreement(ap_comm *c, const int *members, const char *label) {
    const int rank = ap_comm_rank(c), size = ap_comm_size(c), last = size - 1;
    char want[256];

    EXPECT_STATUS(ap_comm_all_ok(c, AUTOPAR_OK), AUTOPAR_OK);

    /* The last rank fails: every rank gets its status and message. */
    ap_status local = AUTOPAR_OK;
    if (rank == last)
        local = ap_error(AUTOPAR_ERR_SHAPE, "bad input on purpose (group rank %d)", rank);
    ap_status s = ap_comm_all_ok(c, local);
    snprintf(want, sizeof want, "rank %d: bad input on purpose (group rank %d)", members[last],
             last);
    EXPECT(s == AUTOPAR_ERR_SHAPE, "%s: all_ok gave %s", label, autopar_status_str(s));
    EXPECT(strcmp(autopar_last_error(), want) == 0, "%s: all_ok message '%s', expected '%s'",
           label, autopar_last_error(), want);
    /* Agreeing on an agreed error keeps the message as it is. */
    s = ap_comm_all_ok(c, s);
    EXPECT(s == AUTOPAR_ERR_SHAPE && strcmp(autopar_last_error(), want) == 0,
           "%s: re-agreed message '%s'", label, autopar_last_error());

    /* Two failing ranks: the lowest one wins. */
    if (size > 1) {
        local = AUTOPAR_OK;
        if (rank == 0) local = ap_error(AUTOPAR_ERR_IO, "first failure");
        if (rank == last) local = ap_error(AUTOPAR_ERR_SHAPE, "second failure");
        s = ap_comm_all_ok(c, local);
        snprintf(want, sizeof want, "rank %d: first failure", members[0]);
        EXPECT(s == AUTOPAR_ERR_IO && strcmp(autopar_last_error(), want) == 0,
               "%s: two failures gave %s '%s'", label, autopar_status_str(s), autopar_last_error());
    }

    /* Broadcast of the root's error. */
    local = rank == last ? ap_error(AUTOPAR_ERR_NOT_FOUND, "root says no") : AUTOPAR_OK;
    s = ap_comm_bcast_error(c, last, local);
    snprintf(want, sizeof want, "rank %d: root says no", members[last]);
    EXPECT(s == AUTOPAR_ERR_NOT_FOUND && strcmp(autopar_last_error(), want) == 0,
           "%s: bcast_error gave %s '%s'", label, autopar_status_str(s), autopar_last_error());
    EXPECT_STATUS(ap_comm_bcast_error(c, 0, AUTOPAR_OK), AUTOPAR_OK);

    /* Same-value checks. */
    EXPECT_STATUS(ap_comm_check_same(c, 42, "the answer"), AUTOPAR_OK);
    s = ap_comm_check_same(c, (uint64_t)rank * 3, "the rank");
    if (size == 1) {
        EXPECT(s == AUTOPAR_OK, "%s: check_same on one rank gave %s", label, autopar_status_str(s));
    } else {
        snprintf(want, sizeof want, "ranks disagree on the rank: rank %d has 0, rank %d has %d",
                 members[0], members[last], 3 * last);
        EXPECT(s == AUTOPAR_ERR_MPI && strcmp(autopar_last_error(), want) == 0,
               "%s: check_same gave %s '%s', expected '%s'", label, autopar_status_str(s),
               autopar_last_error(), want);
    }
}

/* Local argument checks: no communication happens, so each rank may run them alone. */
static void test_arg_errors(ap_comm *c) {
    const int rank = ap_comm_rank(c), size = ap_comm_size(c);
    static char dummy[256];
    void *p = dummy, *q = dummy + 128;
    const ap_status bad = AUTOPAR_ERR_INVALID_ARG;
    EXPECT_STATUS(ap_comm_all_reduce(NULL, p, q, 1, AP_COMM_F32, AP_COMM_SUM), bad);
    EXPECT_STATUS(ap_comm_all_reduce(c, p, q, 1, (ap_comm_dtype)99, AP_COMM_SUM), bad);
    EXPECT_STATUS(ap_comm_all_reduce(c, p, q, 1, AP_COMM_F32, (ap_comm_op)99), bad);
    EXPECT_STATUS(ap_comm_all_reduce(c, NULL, q, 1, AP_COMM_F32, AP_COMM_SUM), bad);
    EXPECT_STATUS(ap_comm_all_reduce(c, p, dummy + 2, 2, AP_COMM_F32, AP_COMM_SUM), bad);
    EXPECT_STATUS(ap_comm_all_gather(c, p, dummy + 4, 1, AP_COMM_F64), bad);
    EXPECT_STATUS(ap_comm_all_to_all(c, p, p, 1, AP_COMM_F32), bad);
    EXPECT_STATUS(ap_comm_broadcast(c, p, 1, AP_COMM_F32, size), bad);
    EXPECT_STATUS(ap_comm_broadcast(c, p, 1, AP_COMM_F32, -1), bad);
    EXPECT_STATUS(ap_comm_send(c, p, 1, AP_COMM_F32, rank), bad);
    EXPECT_STATUS(ap_comm_recv(c, p, 1, AP_COMM_F32, size), bad);
    EXPECT_STATUS(ap_comm_recv(c, p, 1, AP_COMM_F32, AP_COMM_NO_PEER), bad);
    EXPECT_STATUS(ap_comm_send_recv(c, p, 1, size, q, 1, 0, AP_COMM_F32), bad);
    EXPECT_STATUS(ap_comm_send_recv(c, p, 4, 0, dummy + 8, 4, 0, AP_COMM_F32), bad);
    ap_comm *out = (ap_comm *)p;
    EXPECT_STATUS(ap_comm_split(c, -5, 0, &out), bad);
    EXPECT(out == NULL, "split with a bad color left *out set");
    ap_comm_p2p ops[2] = {{AP_COMM_P2P_RECV, 0, p, 4, AP_COMM_F32},
                          {AP_COMM_P2P_RECV, 0, dummy + 8, 4, AP_COMM_F32}};
    EXPECT_STATUS(ap_comm_exchange(c, ops, 2), bad);
    ops[1].buf = q;
    ops[1].kind = (ap_comm_p2p_kind)7;
    EXPECT_STATUS(ap_comm_exchange(c, ops, 2), bad);
    ops[1].kind = AP_COMM_P2P_SEND;
    ops[1].peer = size;
    EXPECT_STATUS(ap_comm_exchange(c, ops, 2), bad);
    EXPECT_STATUS(ap_comm_exchange(c, NULL, 1), bad);
    /* Count 0: nothing to do, NULL buffers allowed (every rank calls it, nothing is sent). */
    EXPECT_OK(ap_comm_all_reduce(c, NULL, NULL, 0, AP_COMM_F32, AP_COMM_SUM));
    EXPECT_OK(ap_comm_exchange(c, NULL, 0));
}

/* ------------------------------------------------------------------------------------------ */
/* Groups                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Runs everything on group c, whose rank k must be world rank members[k]. */
static void test_group(ap_comm *c, const test_mem *m, const int *members, int n_members,
                       const char *label) {
    const int rank = ap_comm_rank(c), size = ap_comm_size(c);
    EXPECT(size == n_members, "%s: size %d, expected %d", label, size, n_members);
    if (size != n_members) return;
    EXPECT(members[rank] == g_world_rank, "%s: group rank %d is world rank %d, expected %d",
           label, rank, g_world_rank, members[rank]);
    EXPECT(ap_comm_world_rank(c) == g_world_rank, "%s: world rank %d, expected %d", label,
           ap_comm_world_rank(c), g_world_rank);

    /* Membership, seen through the communicator itself. */
    tbuf me = tb_new(m, AP_COMM_I32, 1), all = tb_new(m, AP_COMM_I32, (size_t)size);
    double *w = want_new((size_t)size);
    if (me.buf && all.buf && w) {
        tb_set(&me, 0, g_world_rank);
        tb_push(m, &me);
        EXPECT_OK(ap_comm_all_gather(c, me.buf, all.buf, 1, AP_COMM_I32));
        tb_pull(m, &all);
        for (int k = 0; k < size; k++) w[k] = members[k];
        CHECK_EXACT(&all, 0, w, (size_t)size, "%s membership", label);
    }
    free(w);
    tb_free(m, &me);
    tb_free(m, &all);

    const ap_comm_dtype types[4] = {AP_COMM_F32, AP_COMM_F64, AP_COMM_I32, AP_COMM_U8};
    for (int k = 0; k < 4; k++) {
        test_collectives(c, m, types[k], 1, label);
        test_collectives(c, m, types[k], 37, label);
    }
    test_deterministic(c, m, AP_COMM_F32, 300, label);
    test_deterministic(c, m, AP_COMM_F64, 300, label);
    test_p2p(c, m, AP_COMM_F64, label);
    test_p2p(c, m, AP_COMM_U8, label);
    test_agreement(c, members, label);
    test_arg_errors(c);
}

/* The world (top), the row and column lines of a 2 x (P/2) mesh (1 x P when P is odd), an
 * irregular split with reversed keys, and a group without rank 0. Collective over top, whose
 * ranks must equal world ranks. */
static void run_suite(ap_comm *top, const test_mem *m) {
    const int P = ap_comm_size(top), rank = ap_comm_rank(top);
    int *members = (int *)calloc((size_t)P, sizeof *members);
    if (!members) {
        fail_at(__LINE__, "out of memory");
        return;
    }
    int n;

    for (int k = 0; k < P; k++) members[k] = k;
    test_group(top, m, members, P, "world");

    const int n0 = P % 2 == 0 ? 2 : 1, n1 = P / n0, i0 = rank / n1, i1 = rank % n1;
    ap_comm *row = NULL, *col = NULL, *odd = NULL, *rest = NULL;
    char label[64];

    /* Mesh axis 1 lines (rows): devices sharing i0. */
    EXPECT_OK(ap_comm_split(top, i0, i1, &row));
    for (n = 0; n < n1; n++) members[n] = i0 * n1 + n;
    snprintf(label, sizeof label, "row %d of %dx%d", i0, n0, n1);
    if (row) test_group(row, m, members, n, label);
    else fail_at(__LINE__, "row split gave no communicator");

    /* Mesh axis 0 lines (columns): devices sharing i1. */
    EXPECT_OK(ap_comm_split(top, i1, i0, &col));
    for (n = 0; n < n0; n++) members[n] = n * n1 + i1;
    snprintf(label, sizeof label, "column %d of %dx%d", i1, n0, n1);
    if (col) test_group(col, m, members, n, label);
    else fail_at(__LINE__, "column split gave no communicator");

    /* Colors rank % 3, keys -rank: groups numbered by descending world rank. */
    EXPECT_OK(ap_comm_split(top, rank % 3, -rank, &odd));
    n = 0;
    for (int q = P - 1; q >= 0; q--)
        if (q % 3 == rank % 3) members[n++] = q;
    snprintf(label, sizeof label, "split mod 3 (color %d)", rank % 3);
    if (odd) test_group(odd, m, members, n, label);
    else fail_at(__LINE__, "mod-3 split gave no communicator");

    /* Rank 0 in no group. */
    EXPECT_OK(ap_comm_split(top, rank == 0 ? AP_COMM_UNDEFINED : 5, rank, &rest));
    if (rank == 0) {
        EXPECT(rest == NULL, "rank 0 got a communicator for an undefined color");
    } else {
        for (n = 0; n < P - 1; n++) members[n] = n + 1;
        if (rest) test_group(rest, m, members, n, "all but rank 0");
        else fail_at(__LINE__, "split without rank 0 gave no communicator");
    }

    ap_comm_free(rest);
    ap_comm_free(odd);
    ap_comm_free(col);
    ap_comm_free(row);
    free(members);
}

/* Sums the failure counts of every rank over an MPI communicator; every rank gets the total. */
static int total_failures(ap_comm *world) {
    int32_t mine = g_failures, total = 0;
    ap_status s = ap_comm_all_reduce(world, &mine, &total, 1, AP_COMM_I32, AP_COMM_SUM);
    if (s != AUTOPAR_OK) {
        fprintf(stderr, "rank %d: cannot sum failures: %s\n", g_world_rank, autopar_last_error());
        return mine + 1;
    }
    return total;
}

/* Checks on the world MPI communicator: local rank/size, device choice, names. */
static void test_world_info(ap_comm *w) {
    const int rank = ap_comm_rank(w), size = ap_comm_size(w);
    const int lr = ap_comm_local_rank(w), ls = ap_comm_local_size(w);
    EXPECT(rank == ap_comm_world_rank(w), "world rank %d != rank %d", ap_comm_world_rank(w), rank);
    EXPECT(0 <= lr && lr < ls && ls <= size, "local rank %d of %d (world size %d)", lr, ls, size);
    /* Each host's local rank 0 counts its host and its ranks: the counts add up to the world. */
    int32_t mine[2] = {lr == 0, lr == 0 ? ls : 0}, sum[2] = {0, 0};
    EXPECT_OK(ap_comm_all_reduce(w, mine, sum, 2, AP_COMM_I32, AP_COMM_SUM));
    EXPECT(sum[0] >= 1 && sum[1] == size, "%d hosts holding %d ranks, world size %d", sum[0],
           sum[1], size);
    EXPECT(ap_comm_local_device(w, 0) == -1, "device for 0 devices");
    EXPECT(ap_comm_local_device(w, 1) == 0, "device for 1 device");
    EXPECT(ap_comm_local_device(w, 3) == lr % 3, "device for 3 devices");
    EXPECT(strcmp(ap_comm_backend_name(w), "mpi") == 0 && !ap_comm_device_buffers(w),
           "world backend %s", ap_comm_backend_name(w));
    EXPECT(ap_comm_rank(NULL) == 0 && ap_comm_size(NULL) == 1, "NULL communicator queries");
    ap_comm_free(NULL);

    /* A second world handle is an independent communicator over the same ranks. */
    ap_comm *w2 = NULL;
    EXPECT_OK(ap_comm_world(&w2));
    if (w2) {
        int32_t v = rank, total = 0;
        EXPECT_OK(ap_comm_all_reduce(w2, &v, &total, 1, AP_COMM_I32, AP_COMM_SUM));
        EXPECT(total == size * (size - 1) / 2, "second world: sum of ranks %d", (int)total);
        ap_comm_free(w2);
    }
}

#ifndef COMM_TEST_NO_MAIN

static ap_status host_alloc(void *ctx, size_t bytes, void **out) {
    (void)ctx;
    *out = malloc(bytes);
    return *out ? AUTOPAR_OK : AUTOPAR_ERR_NOMEM;
}
static void host_release(void *ctx, void *p) {
    (void)ctx;
    free(p);
}
static ap_status host_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    memcpy(dst, src, bytes);
    return AUTOPAR_OK;
}

int main(void) {
    ap_comm *world = NULL;
    ap_status s = ap_comm_world(&world);
    if (s != AUTOPAR_OK) {
        fprintf(stderr, "ap_comm_world: %s: %s\n", autopar_status_str(s), autopar_last_error());
        return 1;
    }
    g_world_rank = ap_comm_world_rank(world);
    const test_mem host = {NULL, host_alloc, host_release, host_copy, host_copy};

    test_world_info(world);
    run_suite(world, &host);

    int total = total_failures(world);
    if (g_world_rank == 0)
        printf("mpi_test_comm: %d ranks, %d failure%s\n", ap_comm_size(world), total,
               total == 1 ? "" : "s");
    ap_comm_free(world);
    /* This layer initialised MPI, so freeing its last communicator finalised it. */
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) {
        fprintf(stderr, "rank %d: FAIL: MPI not finalised after the last communicator\n",
                g_world_rank);
        total++;
    }
    return total == 0 ? 0 : 1;
}

#endif
