/*
 * CPU reference kernels (see kernels_cpu.h; every op's contract is in src/internal.h).
 *
 * Layout:
 *   - this file: argument checks common to all ops, the data-movement ops (RESHAPE, PERMUTE,
 *     SLICE, SLICE_BACK, CONCAT), which are dtype-generic (they move 4- or 8-byte elements, so
 *     they also work on I32 tensors), FILL of I32 tensors, and the dispatch on precision;
 *   - kernels_cpu_impl.inc: every arithmetic kernel, written once on a type REAL and included
 *     twice (REAL = float, suffix f32; REAL = double, suffix f64).
 *
 * Conventions and decisions (where internal.h leaves room):
 *   - Sizes always come from call->out_shape / call->src_shape[] (they may be local shard
 *     shapes). Attributes are only used for what shapes cannot say (axes, slice start, flags,
 *     scalars). In particular SLICE takes its length from the output shape, SLICE_BACK its
 *     slice length from dY's shape and the full length from the output shape, EMBEDDING_BACK
 *     takes V from the output shape; ia[2] of SLICE/SLICE_BACK and ia[0] of EMBEDDING_BACK are
 *     not consulted.
 *   - Axis attributes are non-negative (the graph builders normalise negative axes). For
 *     SUM/MEAN the value -1 means "all elements"; for EXPAND -1 means "A is a scalar".
 *   - Operands are checked by element count (not exact shape) wherever that is what memory
 *     safety needs; broadcast ADD/SUB/MUL only need numel(B) to divide numel(A) (B index =
 *     out index mod numel(B), which equals the suffix broadcast when B's shape is a suffix).
 *   - Causal SOFTMAX: the row index i is the index along the last-but-one dim; entries with
 *     j > i are exactly 0. The last two dims need not be square (the mask is still j > i).
 *   - Reductions (sums, means, layer-norm statistics, softmax / log-sum-exp sums, losses,
 *     LAYERNORM_BACK_GAIN) accumulate in double in both precisions, in a fixed order
 *     (8 interleaved partial sums combined in a fixed tree for contiguous sums; rows in
 *     increasing order for column sums). EMBEDDING_BACK scatter-adds in REAL directly in the
 *     output (a double copy of a [V, C] table would be too large), in index order.
 *   - MEAN over zero elements, MSE_LOSS of empty tensors and CROSS_ENTROPY with zero rows give
 *     0 (not NaN).
 *   - ADAMW_UPDATE requires call->step >= 1 (else AUTOPAR_ERR_INVALID_ARG).
 *   - Ids / labels out of range are AUTOPAR_ERR_INVALID_ARG naming call->name, the bad value,
 *     its position and the range (also for EMBEDDING_BACK and CROSS_ENTROPY_BACK).
 *   - Leaves (INPUT, PARAM, OPT_STATE) have no kernel (AUTOPAR_ERR_UNSUPPORTED): the executor
 *     owns their buffers. FILL is a kernel.
 *   - GELU / GELU_BACK evaluate the tanh form through the identity 0.5 (1 + tanh u) =
 *     sigmoid(2u) (same function; no cancellation for negative x; one exp per element).
 *   - Float kernels use ap_expf below (vectorisable, ~1.4 ulp) instead of libm's expf; double
 *     kernels use libm's exp. Matrix products: cblas_sgemm / cblas_dgemm, row-major.
 *   - Performance note: GCC vectorises the ADAMW_UPDATE loop (sqrt) only with
 *     -fno-math-errno; every other elementwise / row loop vectorises with the default flags.
 */
#include "cpu/kernels_cpu.h"

#include <cblas.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Shared helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */

static const char *call_name(const ap_kernel_call *c) { return c->name ? c->name : "(unnamed)"; }

static const char *op_str(ap_op op) {
    const char *s = ((int)op >= 0 && op < AP_OP_COUNT) ? ap_op_name(op) : NULL;
    return s ? s : "?";
}

/* Product of all dims but the last (1 for rank 0 and 1). */
static int64_t lead_rows(const ap_shape *s) {
    int64_t n = 1;
    for (int i = 0; i + 1 < s->ndim; i++) n *= s->dim[i];
    return n;
}
/* The last dim (1 for rank 0). */
static int64_t last_dim(const ap_shape *s) { return s->ndim > 0 ? s->dim[s->ndim - 1] : 1; }
/* Product of dims [from, to). */
static int64_t dims_prod(const ap_shape *s, int from, int to) {
    int64_t n = 1;
    for (int i = from; i < to; i++) n *= s->dim[i];
    return n;
}

#define BAD_ARG(c, ...) bad_arg_impl((c), __VA_ARGS__)

static ap_status bad_arg_impl(const ap_kernel_call *c, const char *fmt, ...) AP_PRINTF(2, 3);

static ap_status bad_arg_impl(const ap_kernel_call *c, const char *fmt, ...) {
    char msg[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ap_error(AUTOPAR_ERR_INVALID_ARG, "cpu kernel %s for tensor '%s': %s", op_str(c->op),
                    call_name(c), msg);
}

/* Operand count of each op with a CPU kernel; -1 = variadic (1..AP_MAX_SRC); -2 = no kernel. */
static int expected_n_src(ap_op op) {
    switch (op) {
    case AP_OP_INPUT: case AP_OP_PARAM: case AP_OP_OPT_STATE: return -2;
    case AP_OP_FILL: return 0;
    case AP_OP_SCALE: case AP_OP_RELU: case AP_OP_GELU: case AP_OP_SOFTMAX: case AP_OP_RESHAPE:
    case AP_OP_PERMUTE: case AP_OP_SLICE: case AP_OP_SUM: case AP_OP_MEAN: case AP_OP_SLICE_BACK:
    case AP_OP_SUM_TO: case AP_OP_EXPAND: case AP_OP_CE_COMBINE:
        return 1;
    case AP_OP_CONCAT: return -1;
    case AP_OP_LAYERNORM: case AP_OP_LAYERNORM_BACK: case AP_OP_MSE_LOSS_BACK:
    case AP_OP_CROSS_ENTROPY_BACK: case AP_OP_ADAMW_UPDATE:
        return 3;
    case AP_OP_MATMUL: case AP_OP_BATCH_MATMUL: case AP_OP_ADD: case AP_OP_SUB: case AP_OP_MUL:
    case AP_OP_EMBEDDING: case AP_OP_MSE_LOSS: case AP_OP_CROSS_ENTROPY: case AP_OP_RELU_BACK:
    case AP_OP_GELU_BACK: case AP_OP_LAYERNORM_BACK_GAIN: case AP_OP_SOFTMAX_BACK:
    case AP_OP_EMBEDDING_BACK: case AP_OP_SGD_UPDATE: case AP_OP_MOMENTUM_UPDATE:
    case AP_OP_ADAM_M: case AP_OP_ADAM_V: case AP_OP_CE_PARTIAL:
        return 2;
    case AP_OP_CE_BACK_PARTIAL: return 4;
    case AP_OP_COUNT: break;
    }
    return -2;
}

/* Data-movement ops: any dtype, out dtype = operands' dtype. */
static bool is_movement(ap_op op) {
    return op == AP_OP_RESHAPE || op == AP_OP_PERMUTE || op == AP_OP_SLICE ||
           op == AP_OP_SLICE_BACK || op == AP_OP_CONCAT;
}

/* Whether operand k of op is an I32 tensor (ids / labels). */
static bool src_is_i32(ap_op op, int k) {
    return ((op == AP_OP_EMBEDDING || op == AP_OP_EMBEDDING_BACK || op == AP_OP_CROSS_ENTROPY ||
             op == AP_OP_CE_PARTIAL) &&
            k == 1) ||
           ((op == AP_OP_CROSS_ENTROPY_BACK || op == AP_OP_CE_BACK_PARTIAL) && k == 2);
}

static ap_status check_shape(const ap_kernel_call *c, const ap_shape *s, const char *what, int k) {
    if (s->ndim < 0 || s->ndim > AP_MAX_DIMS)
        return BAD_ARG(c, "%s %d has rank %d (must be 0..%d)", what, k, s->ndim, AP_MAX_DIMS);
    for (int i = 0; i < s->ndim; i++)
        if (s->dim[i] < 0)
            return BAD_ARG(c, "%s %d has negative dim %d (%" PRId64 ")", what, k, i, s->dim[i]);
    return AUTOPAR_OK;
}

/* Checks common to every op: operand count, ranks, dtypes, non-NULL buffers. */
static ap_status check_call(const ap_kernel_call *c) {
    int want = expected_n_src(c->op);
    if (want == -1 ? (c->n_src < 1 || c->n_src > AP_MAX_SRC) : c->n_src != want)
        return BAD_ARG(c, "%d operands given, expected %d", c->n_src, want);
    ap_status st = check_shape(c, &c->out_shape, "output", 0);
    if (st) return st;
    if (c->out_dtype != AUTOPAR_F32 && c->out_dtype != AUTOPAR_I32)
        return BAD_ARG(c, "bad output dtype %d", (int)c->out_dtype);
    if (!c->out && ap_shape_numel(&c->out_shape) > 0) return BAD_ARG(c, "output buffer is NULL");
    bool movement = is_movement(c->op);
    if (!movement && c->op != AP_OP_FILL && c->out_dtype != AUTOPAR_F32)
        return ap_error(AUTOPAR_ERR_DTYPE, "cpu kernel %s for tensor '%s': output must be F32",
                        op_str(c->op), call_name(c));
    for (int k = 0; k < c->n_src; k++) {
        st = check_shape(c, &c->src_shape[k], "operand", k);
        if (st) return st;
        if (!c->src[k] && ap_shape_numel(&c->src_shape[k]) > 0)
            return BAD_ARG(c, "operand %d buffer is NULL", k);
        ap_dtype want_dt = movement ? c->out_dtype : src_is_i32(c->op, k) ? AUTOPAR_I32 : AUTOPAR_F32;
        if (c->src_dtype[k] != want_dt)
            return ap_error(AUTOPAR_ERR_DTYPE,
                            "cpu kernel %s for tensor '%s': operand %d must be %s", op_str(c->op),
                            call_name(c), k, want_dt == AUTOPAR_I32 ? "I32" : "F32");
    }
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Data movement (dtype-generic: elements of esz = 4 or 8 bytes)                               */
/* ------------------------------------------------------------------------------------------ */

static ap_status mv_reshape(const ap_kernel_call *c, size_t esz) {
    int64_t n = ap_shape_numel(&c->out_shape);
    if (ap_shape_numel(&c->src_shape[0]) != n)
        return BAD_ARG(c, "element counts differ (%" PRId64 " vs %" PRId64 ")",
                       ap_shape_numel(&c->src_shape[0]), n);
    if (n > 0) memcpy(c->out, c->src[0], (size_t)n * esz);
    return AUTOPAR_OK;
}

/* Strided 4-D copy: out[i0,i1,i2,i3] (contiguous, dims od[]) = src[sum ik * ss[k]]. */
#define DEFINE_PERMUTE_COPY(T)                                                                 \
    static void permute_copy_##T(T *restrict out, const T *restrict src, const int64_t od[4],   \
                                 const int64_t ss[4]) {                                         \
        for (int64_t i0 = 0; i0 < od[0]; i0++)                                                  \
            for (int64_t i1 = 0; i1 < od[1]; i1++)                                              \
                for (int64_t i2 = 0; i2 < od[2]; i2++) {                                        \
                    const T *s = src + i0 * ss[0] + i1 * ss[1] + i2 * ss[2];                    \
                    const int64_t st = ss[3], n3 = od[3];                                       \
                    if (st == 1)                                                                \
                        for (int64_t i3 = 0; i3 < n3; i3++) out[i3] = s[i3];                    \
                    else                                                                        \
                        for (int64_t i3 = 0; i3 < n3; i3++) out[i3] = s[i3 * st];               \
                    out += n3;                                                                  \
                }                                                                               \
    }
DEFINE_PERMUTE_COPY(uint32_t)
DEFINE_PERMUTE_COPY(uint64_t)

static ap_status mv_permute(const ap_kernel_call *c, size_t esz) {
    const ap_shape *is = &c->src_shape[0], *os = &c->out_shape;
    int r = is->ndim;
    if (os->ndim != r) return BAD_ARG(c, "rank %d permuted to rank %d", r, os->ndim);
    bool seen[AP_MAX_DIMS] = {false};
    int64_t sstride[AP_MAX_DIMS];
    int64_t st = 1;
    for (int i = r - 1; i >= 0; i--) {
        sstride[i] = st;
        st *= is->dim[i];
    }
    int64_t od[4] = {1, 1, 1, 1}, ss[4] = {0, 0, 0, 0};
    for (int i = 0; i < r; i++) {
        int64_t p = c->attrs.i[i];
        if (p < 0 || p >= r || seen[p])
            return BAD_ARG(c, "attribute %d (%" PRId64 ") does not make a permutation of %d dims",
                           i, p, r);
        seen[p] = true;
        if (os->dim[i] != is->dim[p])
            return BAD_ARG(c, "output dim %d is %" PRId64 ", operand dim %" PRId64 " is %" PRId64,
                           i, os->dim[i], p, is->dim[p]);
        od[4 - r + i] = os->dim[i];
        ss[4 - r + i] = sstride[p];
    }
    if (ap_shape_numel(os) == 0) return AUTOPAR_OK;
    if (esz == 8)
        permute_copy_uint64_t(c->out, c->src[0], od, ss);
    else
        permute_copy_uint32_t(c->out, c->src[0], od, ss);
    return AUTOPAR_OK;
}

/* Checks that a and b agree on every dim but `axis` (same rank). */
static ap_status same_but_axis(const ap_kernel_call *c, const ap_shape *a, const ap_shape *b,
                               int axis) {
    if (a->ndim != b->ndim) return BAD_ARG(c, "ranks differ (%d vs %d)", a->ndim, b->ndim);
    for (int i = 0; i < a->ndim; i++)
        if (i != axis && a->dim[i] != b->dim[i])
            return BAD_ARG(c, "dim %d differs (%" PRId64 " vs %" PRId64 ")", i, a->dim[i],
                           b->dim[i]);
    return AUTOPAR_OK;
}

/* SLICE (big = operand, small = out) and SLICE_BACK (small = operand, big = out). */
static ap_status mv_slice(const ap_kernel_call *c, size_t esz, bool back) {
    const ap_shape *big = back ? &c->out_shape : &c->src_shape[0];
    const ap_shape *small = back ? &c->src_shape[0] : &c->out_shape;
    int64_t axis = c->attrs.i[0], start = c->attrs.i[1];
    if (axis < 0 || axis >= big->ndim)
        return BAD_ARG(c, "axis %" PRId64 " out of range for rank %d", axis, big->ndim);
    ap_status st = same_but_axis(c, big, small, (int)axis);
    if (st) return st;
    int64_t full = big->dim[axis], len = small->dim[axis];
    if (start < 0 || start > full - len)
        return BAD_ARG(c, "slice [%" PRId64 ", %" PRId64 ") outside [0, %" PRId64 ")", start,
                       start + len, full);
    int64_t outer = dims_prod(big, 0, (int)axis), inner = dims_prod(big, (int)axis + 1, big->ndim);
    size_t blk = (size_t)(len * inner) * esz, bigrow = (size_t)(full * inner) * esz;
    size_t off = (size_t)(start * inner) * esz;
    char *out = c->out;
    const char *src = c->src[0];
    if (back && ap_shape_numel(big) > 0) memset(out, 0, (size_t)ap_shape_numel(big) * esz);
    if (blk == 0) return AUTOPAR_OK;
    for (int64_t o = 0; o < outer; o++) {
        if (back)
            memcpy(out + (size_t)o * bigrow + off, src + (size_t)o * blk, blk);
        else
            memcpy(out + (size_t)o * blk, src + (size_t)o * bigrow + off, blk);
    }
    return AUTOPAR_OK;
}

static ap_status mv_concat(const ap_kernel_call *c, size_t esz) {
    const ap_shape *os = &c->out_shape;
    int64_t axis = c->attrs.i[0];
    if (axis < 0 || axis >= os->ndim)
        return BAD_ARG(c, "axis %" PRId64 " out of range for rank %d", axis, os->ndim);
    int64_t total = 0;
    for (int k = 0; k < c->n_src; k++) {
        ap_status st = same_but_axis(c, os, &c->src_shape[k], (int)axis);
        if (st) return st;
        total += c->src_shape[k].dim[axis];
    }
    if (total != os->dim[axis])
        return BAD_ARG(c, "operand lengths along axis %" PRId64 " sum to %" PRId64
                          ", output has %" PRId64, axis, total, os->dim[axis]);
    int64_t outer = dims_prod(os, 0, (int)axis), inner = dims_prod(os, (int)axis + 1, os->ndim);
    char *out = c->out;
    for (int64_t o = 0; o < outer; o++)
        for (int k = 0; k < c->n_src; k++) {
            size_t blk = (size_t)(c->src_shape[k].dim[axis] * inner) * esz;
            if (blk == 0) continue;
            memcpy(out, (const char *)c->src[k] + (size_t)o * blk, blk);
            out += blk;
        }
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Arithmetic kernels in both precisions                                                        */
/* ------------------------------------------------------------------------------------------ */

/* Order-preserving integer keys of float / double bit patterns: key(a) < key(b) iff a < b for
 * non-NaN values (-0 ranks just below +0). The map is its own inverse. A NaN with the sign bit
 * clear ranks above +inf, one with it set below -inf. Used where a float compare-and-select
 * would stop GCC from vectorising (max reductions; clamps under the default
 * -ftrapping-math). */
static inline int32_t ap_key32(int32_t b) {
    return b ^ (-(int32_t)((uint32_t)b >> 31) & INT32_MAX);
}
static inline int64_t ap_key64(int64_t b) {
    return b ^ (-(int64_t)((uint64_t)b >> 63) & INT64_MAX);
}
static inline int32_t ap_fbits(float f) {
    int32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

/* exp for the float kernels: Cephes' expf (Cody-Waite reduction, degree-6 polynomial, about
 * 1-2 ulp), written with plain arithmetic and bit operations so that loops calling it
 * vectorise (libm's expf is a scalar call). x > 88 saturates at exp(88) ~ 1.65e38 (libm: up
 * to FLT_MAX, then inf), x < -87.3 gives +0 (libm: a denormal or 0), NaN gives NaN. The
 * kernels call it on x - max(x) <= 0 (softmax, cross-entropy) and in GELU's sigmoid, where
 * the saturation is harmless. The double kernels use libm's exp.
 * The clamps and the final fix-ups are bit masks, not selects: under the default
 * -ftrapping-math GCC will not if-convert a select whose arms hold floating-point work. */
static inline float ap_expf(float x) {
    const int32_t xb = ap_fbits(x), k = ap_key32(xb);
    const int32_t hi_b = ap_fbits(88.0f), lo_b = ap_fbits(-87.3f);
    const int32_t m_hi = -(int32_t)(k > hi_b);                /* all ones when x > 88     */
    const int32_t m_lo = -(int32_t)(k < ap_key32(lo_b));      /* all ones when x < -87.3  */
    const int32_t m_nan = -(int32_t)((xb & INT32_MAX) > 0x7F800000);
    int32_t cb = (hi_b & m_hi) | (xb & ~m_hi);
    cb = (lo_b & m_lo) | (cb & ~m_lo);
    float xc;
    memcpy(&xc, &cb, sizeof xc);
    const float t = xc * 1.44269504088896341f + 12582912.0f; /* + 1.5 * 2^23: round to int */
    const float n = t - 12582912.0f;
    const int32_t ni = ap_fbits(t) - 0x4B400000; /* n as an integer, in [-126, 127] */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t eb = (ni + 127) * 8388608; /* 2^n as float bits */
    float sc;
    memcpy(&sc, &eb, sizeof sc);
    int32_t rb = ap_fbits(p * sc) & ~m_lo;   /* underflow: +0   */
    rb = (rb & ~m_nan) | (xb & m_nan);       /* NaN: x itself   */
    float res;
    memcpy(&res, &rb, sizeof res);
    return res;
}

#define AP_CAT_(a, b) a##_##b
#define AP_CAT(a, b) AP_CAT_(a, b)
#define FN(n) AP_CAT(n, SFX)

#define REAL float
#define SFX f32
#define R_INT int32_t
#define R_KEY ap_key32
#define R_EXP ap_expf
#define R_SQRT sqrtf
#define R_GEMM cblas_sgemm
#include "kernels_cpu_impl.inc"
#undef REAL
#undef SFX
#undef R_INT
#undef R_KEY
#undef R_EXP
#undef R_SQRT
#undef R_GEMM

#define REAL double
#define SFX f64
#define R_INT int64_t
#define R_KEY ap_key64
#define R_EXP exp
#define R_SQRT sqrt
#define R_GEMM cblas_dgemm
#include "kernels_cpu_impl.inc"
#undef REAL
#undef SFX
#undef R_INT
#undef R_KEY
#undef R_EXP
#undef R_SQRT
#undef R_GEMM

#undef FN

/* ------------------------------------------------------------------------------------------ */
/* Entry point                                                                                  */
/* ------------------------------------------------------------------------------------------ */

ap_status ap_cpu_run(const ap_kernel_call *call) {
    if (!call) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cpu_run: call is NULL");
    const ap_kernel_call *c = call;
    if ((int)c->op < 0 || c->op >= AP_OP_COUNT)
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "cpu kernel for tensor '%s': unknown op %d",
                        call_name(c), (int)c->op);
    if (expected_n_src(c->op) == -2)
        return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                        "cpu kernel for tensor '%s': op %s is a leaf without a kernel (its "
                        "buffer is owned by the executor)", call_name(c), op_str(c->op));
    if (c->precision != AUTOPAR_PRECISION_F32 && c->precision != AUTOPAR_PRECISION_F64)
        return BAD_ARG(c, "bad precision %d", (int)c->precision);
    ap_status st = check_call(c);
    if (st) return st;

    if (is_movement(c->op)) {
        size_t esz = ap_elem_size(c->out_dtype, c->precision);
        switch (c->op) {
        case AP_OP_RESHAPE: return mv_reshape(c, esz);
        case AP_OP_PERMUTE: return mv_permute(c, esz);
        case AP_OP_SLICE: return mv_slice(c, esz, false);
        case AP_OP_SLICE_BACK: return mv_slice(c, esz, true);
        case AP_OP_CONCAT: return mv_concat(c, esz);
        default: break;
        }
    }
    if (c->op == AP_OP_FILL && c->out_dtype == AUTOPAR_I32) {
        int64_t n = ap_shape_numel(&c->out_shape);
        double f = c->attrs.f[0];
        int32_t *o = c->out;
        int32_t v = f != f ? 0 : f >= 2147483647.0 ? INT32_MAX : f <= -2147483648.0 ? INT32_MIN : (int32_t)f;
        for (int64_t i = 0; i < n; i++) o[i] = v;
        return AUTOPAR_OK;
    }
    return c->precision == AUTOPAR_PRECISION_F64 ? run_f64(c) : run_f32(c);
}
