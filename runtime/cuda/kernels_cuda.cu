/*
 * CUDA kernels, part 1: ap_cuda_run (checks + dispatch), matrix products (cuBLAS), elementwise
 * ops with suffix broadcasting, activations and their backward, data movement (reshape,
 * permute, slice, slice_back, concat, expand, fill) and the optimizer updates.
 * Part 2 (kernels_cuda_rows.cu): layernorm, softmax, reductions, losses, embedding.
 *
 * Semantics are those of src/internal.h and the CPU reference (runtime/cpu/kernels_cpu.c),
 * float only. Every op is enqueued on the context's stream; nothing waits for the device.
 *
 * Matrix products: cuBLAS is column-major, so a row-major C[m,n] = op(A)·op(B) is computed as
 * the column-major product C^T = op(B)^T · op(A)^T (swap the operands, keep the transposes).
 * The handle uses CUBLAS_DEFAULT_MATH (no TF32 for SGEMM) and disallows atomics (cuda_ctx.cu),
 * so products match the CPU within ~1e-5 relative and are bitwise reproducible on one GPU.
 */
#include "cuda_common.cuh"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define BLOCK 256

/* ------------------------------------------------------------------------------------------ */
/* CUDA kernels                                                                                */
/* ------------------------------------------------------------------------------------------ */

// out[i] = f(a[i]); out, a are (n)
template <class F>
__global__ void map1_kernel(float *out, const float *a, i64 n, F f) {
    AP_GRID_LOOP(i, n)
        out[i] = f(a[i]);
}

// out[i] = f(a[i], b[i % nb]); out, a are (n); b is (nb), a suffix of a's shape (nb divides n)
template <class F>
__global__ void map2_kernel(float *out, const float *a, const float *b, i64 n, i64 nb, F f) {
    AP_GRID_LOOP(i, n)
        out[i] = f(a[i], b[nb == n ? i : i % nb]);
}

// out[i] = f(a[i], b[i], c[i]); all (n)
template <class F>
__global__ void map3_kernel(float *out, const float *a, const float *b, const float *c, i64 n,
                            F f) {
    AP_GRID_LOOP(i, n)
        out[i] = f(a[i], b[i], c[i]);
}

// out[i] = bits; out is (n) 4-byte words (FILL of F32 or I32)
__global__ void fill_kernel(uint32_t *out, i64 n, uint32_t bits) {
    AP_GRID_LOOP(i, n)
        out[i] = bits;
}

// dst[r, dst_off + k] = src[r, src_off + k] for r < rows, k < w; row strides in words.
// Used by slice, slice_back and concat (viewed as [outer, axis*inner]).
__global__ void copy_rows_kernel(uint32_t *dst, i64 dst_stride, i64 dst_off, const uint32_t *src,
                                 i64 src_stride, i64 src_off, i64 rows, i64 w) {
    i64 n = rows * w;
    AP_GRID_LOOP(t, n) {
        i64 r = t / w, k = t % w;
        dst[r * dst_stride + dst_off + k] = src[r * src_stride + src_off + k];
    }
}

// out (out_dim[0..ndim)) = in permuted; in_stride[d] = stride in `in` of the input dim that
// becomes output dim d.
struct permute_args {
    int ndim;
    i64 out_dim[AP_MAX_DIMS];
    i64 in_stride[AP_MAX_DIMS];
};
__global__ void permute_kernel(uint32_t *out, const uint32_t *in, i64 n, permute_args p) {
    AP_GRID_LOOP(t, n) {
        i64 rem = t, src = 0;
        for (int d = p.ndim - 1; d >= 0; d--) {
            i64 coord = rem % p.out_dim[d];
            rem /= p.out_dim[d];
            src += coord * p.in_stride[d];
        }
        out[t] = in[src];
    }
}

// out is (outer, n, inner), in is (outer, inner): out[o, k, i] = in[o, i] * f
__global__ void expand_kernel(float *out, const float *in, i64 total, i64 n, i64 inner, float f) {
    AP_GRID_LOOP(t, total) {
        i64 o = t / (n * inner), i = t % inner;
        out[t] = in[o * inner + i] * f;
    }
}

// out, p, t are (n); dl is a device scalar: out = dl * 2 (p - t) / n
__global__ void mse_back_kernel(float *out, const float *dl, const float *p, const float *t,
                                i64 n, float inv_n) {
    float g = 2.0f * dl[0] * inv_n;
    AP_GRID_LOOP(i, n)
        out[i] = g * (p[i] - t[i]);
}

/* Elementwise functors. */
#define GELU_SCALING_FACTOR 0.7978845608028654f /* sqrt(2 / pi) */
struct add_f { __device__ float operator()(float a, float b) const { return a + b; } };
struct sub_f { __device__ float operator()(float a, float b) const { return a - b; } };
struct mul_f { __device__ float operator()(float a, float b) const { return a * b; } };
struct scale_f {
    float s;
    __device__ float operator()(float a) const { return a * s; }
};
struct relu_f { __device__ float operator()(float x) const { return x > 0.0f ? x : 0.0f; } };
struct gelu_f {
    __device__ float operator()(float x) const {
        // 0.5 x (1 + tanh u) = x * sigmoid(2u): no cancellation for negative x (as the CPU)
        float u = GELU_SCALING_FACTOR * (x + 0.044715f * x * x * x);
        return x / (1.0f + expf(-2.0f * u));
    }
};
// (dY, X) -> dY * (X > 0)
struct relu_back_f {
    __device__ float operator()(float dy, float x) const { return x > 0.0f ? dy : 0.0f; }
};
// (dY, X) -> dY * gelu'(X)
struct gelu_back_f {
    __device__ float operator()(float dy, float x) const {
        // s = sigmoid(2u) = 0.5 (1 + tanh u), 2 s (1 - s) = 0.5 (1 - tanh^2 u), as the CPU
        float u = GELU_SCALING_FACTOR * (x + 0.044715f * x * x * x);
        float e = expf(-2.0f * u), s = 1.0f / (1.0f + e), oms = 1.0f / (1.0f + 1.0f / e);
        float du = GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
        return dy * (s + 2.0f * x * s * oms * du);
    }
};
// (P, G) -> P - lr (G + wd P)
struct sgd_f {
    float lr, wd;
    __device__ float operator()(float p, float g) const { return p - lr * (g + wd * p); }
};
// (V, G) -> mu V + G
struct momentum_f {
    float mu;
    __device__ float operator()(float v, float g) const { return mu * v + g; }
};
// (M, G) -> b1 M + c1 G, c1 = 1 - b1 (computed in double on the host, as on the CPU)
struct adam_m_f {
    float b1, c1;
    __device__ float operator()(float m, float g) const { return b1 * m + c1 * g; }
};
// (V, G) -> b2 V + c2 G^2, c2 = 1 - b2
struct adam_v_f {
    float b2, c2;
    __device__ float operator()(float v, float g) const { return b2 * v + c2 * (g * g); }
};
// (P, M', V') -> P - lr (mhat / (sqrt(vhat) + eps) + wd P); mhat = M' ib1, vhat = V' ib2 with
// ib1 = 1 / (1 - b1^t), ib2 = 1 / (1 - b2^t)
struct adamw_f {
    float lr, eps, wd, ib1, ib2;
    __device__ float operator()(float p, float m, float v) const {
        float mhat = m * ib1, vhat = v * ib2;
        return p - lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
    }
};

/* ------------------------------------------------------------------------------------------ */
/* Kernel launchers                                                                            */
/* ------------------------------------------------------------------------------------------ */

static i64 numel(const ap_shape *s) { return ap_shape_numel(s); }

template <class F>
static ap_status launch_map1(ap_cuda_ctx *ctx, const char *what, float *out, const float *a,
                             i64 n, F f) {
    if (n == 0) return AUTOPAR_OK;
    map1_kernel<<<ap_cuda_grid(n, BLOCK), BLOCK, 0, ctx->stream>>>(out, a, n, f);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

template <class F>
static ap_status launch_map2(ap_cuda_ctx *ctx, const char *what, float *out, const float *a,
                             const float *b, i64 n, i64 nb, F f) {
    if (n == 0) return AUTOPAR_OK;
    map2_kernel<<<ap_cuda_grid(n, BLOCK), BLOCK, 0, ctx->stream>>>(out, a, b, n, nb, f);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

template <class F>
static ap_status launch_map3(ap_cuda_ctx *ctx, const char *what, float *out, const float *a,
                             const float *b, const float *c, i64 n, F f) {
    if (n == 0) return AUTOPAR_OK;
    map3_kernel<<<ap_cuda_grid(n, BLOCK), BLOCK, 0, ctx->stream>>>(out, a, b, c, n, f);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

static ap_status launch_copy_rows(ap_cuda_ctx *ctx, const char *what, void *dst, i64 dst_stride,
                                  i64 dst_off, const void *src, i64 src_stride, i64 src_off,
                                  i64 rows, i64 w) {
    if (rows * w == 0) return AUTOPAR_OK;
    copy_rows_kernel<<<ap_cuda_grid(rows * w, BLOCK), BLOCK, 0, ctx->stream>>>(
        (uint32_t *)dst, dst_stride, dst_off, (const uint32_t *)src, src_stride, src_off, rows, w);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

static bool fits_int(i64 v) { return v >= 0 && v <= INT_MAX; }

/* Binary elementwise op whose second operand's shape is a suffix of the first's: B index =
 * out index mod numel(B). As on the CPU only numel(B) dividing numel(A) is checked. */
template <class F>
static ap_status run_broadcast(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what, F f) {
    i64 n = numel(&c->src_shape[0]), nb = numel(&c->src_shape[1]);
    if (numel(&c->out_shape) != n)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: output and first operand sizes differ",
                        what);
    if (n == 0) return AUTOPAR_OK;
    if (nb == 0 || n % nb != 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s: second operand (%lld elements) does not broadcast over the first "
                        "(%lld)", what, (long long)nb, (long long)n);
    return launch_map2(ctx, what, (float *)c->out, (const float *)c->src[0],
                       (const float *)c->src[1], n, nb, f);
}

/* Elementwise op on operands that all have the output's size. */
static ap_status check_same_size(const ap_kernel_call *c, const char *what) {
    i64 n = numel(&c->out_shape);
    for (int k = 0; k < c->n_src; k++)
        if (numel(&c->src_shape[k]) != n)
            return ap_error(AUTOPAR_ERR_INVALID_ARG,
                            "%s: operand %d has %lld elements, the output %lld", what, k,
                            (long long)numel(&c->src_shape[k]), (long long)n);
    return AUTOPAR_OK;
}

/* MATMUL: C[m,n] = op(A2) op(B2), operands viewed 2-D (all dims but the last flattened). */
static ap_status run_matmul(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    const ap_shape *sa = &c->src_shape[0], *sb = &c->src_shape[1];
    bool ta = c->attrs.i[0] != 0, tb = c->attrs.i[1] != 0;
    i64 ca = sa->ndim > 0 ? sa->dim[sa->ndim - 1] : 1, ra = 1;
    i64 cb = sb->ndim > 0 ? sb->dim[sb->ndim - 1] : 1, rb = 1;
    for (int i = 0; i < sa->ndim - 1; i++) ra *= sa->dim[i];
    for (int i = 0; i < sb->ndim - 1; i++) rb *= sb->dim[i];
    i64 m = ta ? ca : ra, k = ta ? ra : ca, kb = tb ? cb : rb, n = tb ? rb : cb;
    i64 out_last = c->out_shape.ndim > 0 ? c->out_shape.dim[c->out_shape.ndim - 1] : 1;
    if (k != kb || numel(&c->out_shape) != m * n || out_last != n)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s: inner dimensions %lld and %lld or output size %lld (want [%lld, "
                        "%lld]) do not fit", what, (long long)k, (long long)kb,
                        (long long)numel(&c->out_shape), (long long)m, (long long)n);
    if (m == 0 || n == 0) return AUTOPAR_OK;
    if (k == 0) {
        AP_CUDA_TRY(what, cudaMemsetAsync(c->out, 0, (size_t)(m * n) * 4, ctx->stream));
        return AUTOPAR_OK;
    }
    if (!fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(ca) || !fits_int(cb))
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: matrix dimension beyond INT_MAX", what);
    const float one = 1.0f, zero = 0.0f;
    // column-major C^T[n,m] = op(B2)^T[n,k] op(A2)^T[k,m]; a row-major buffer of row length L is
    // the column-major transpose with leading dimension L.
    AP_CUBLAS_TRY(what, cublasSgemm(ctx->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                    ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m, (int)k, &one,
                                    (const float *)c->src[1], (int)cb, (const float *)c->src[0],
                                    (int)ca, &zero, (float *)c->out, (int)n));
    return AUTOPAR_OK;
}

/* BATCH_MATMUL: per batch index, C = op(A) op(B) on the last two dims. */
static ap_status run_batch_matmul(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    const ap_shape *sa = &c->src_shape[0], *sb = &c->src_shape[1], *so = &c->out_shape;
    if (sa->ndim < 2 || sb->ndim < 2 || so->ndim < 2)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: operands and output need rank >= 2", what);
    i64 batch = 1, batch_b = 1, batch_o = 1;
    for (int i = 0; i < sa->ndim - 2; i++) batch *= sa->dim[i];
    for (int i = 0; i < sb->ndim - 2; i++) batch_b *= sb->dim[i];
    for (int i = 0; i < so->ndim - 2; i++) batch_o *= so->dim[i];
    bool ta = c->attrs.i[0] != 0, tb = c->attrs.i[1] != 0;
    i64 ra = sa->dim[sa->ndim - 2], ca = sa->dim[sa->ndim - 1];
    i64 rb = sb->dim[sb->ndim - 2], cb = sb->dim[sb->ndim - 1];
    i64 m = ta ? ca : ra, k = ta ? ra : ca, kb = tb ? cb : rb, n = tb ? rb : cb;
    if (k != kb || batch_b != batch || batch_o != batch || so->dim[so->ndim - 2] != m ||
        so->dim[so->ndim - 1] != n)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s: inner dimensions (%lld vs %lld), batch sizes or output shape do "
                        "not fit", what, (long long)k, (long long)kb);
    if (batch == 0 || m == 0 || n == 0) return AUTOPAR_OK;
    if (k == 0) {
        AP_CUDA_TRY(what, cudaMemsetAsync(c->out, 0, (size_t)(batch * m * n) * sizeof(float),
                                          ctx->stream));
        return AUTOPAR_OK;
    }
    if (!fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(ca) || !fits_int(cb) ||
        !fits_int(batch))
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: matrix dimension beyond INT_MAX", what);
    const float one = 1.0f, zero = 0.0f;
    AP_CUBLAS_TRY(what, cublasSgemmStridedBatched(
                            ctx->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                            ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m, (int)k, &one,
                            (const float *)c->src[1], (int)cb, (long long)(rb * cb),
                            (const float *)c->src[0], (int)ca, (long long)(ra * ca), &zero,
                            (float *)c->out, (int)n, (long long)(m * n), (int)batch));
    return AUTOPAR_OK;
}

/* An axis attribute as an int, or -1 when outside [0, ndim) (the graph builders normalise
 * negative axes, so kernels take non-negative axes only, as on the CPU). */
static int check_axis(i64 axis, int ndim) { return axis >= 0 && axis < ndim ? (int)axis : -1; }

/* a and b have the same rank and agree on every dim but `axis`. */
static bool same_but_axis(const ap_shape *a, const ap_shape *b, int axis) {
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++)
        if (i != axis && a->dim[i] != b->dim[i]) return false;
    return true;
}

/* Products of the dims before and after `axis`. */
static void split_at(const ap_shape *s, int axis, i64 *outer, i64 *inner) {
    *outer = 1;
    *inner = 1;
    for (int i = 0; i < axis; i++) *outer *= s->dim[i];
    for (int i = axis + 1; i < s->ndim; i++) *inner *= s->dim[i];
}

/* SLICE (big = operand, small = output) and SLICE_BACK (small = dY, big = output, zeros
 * elsewhere): ia[0] = axis, ia[1] = start; as on the CPU the lengths come from the shapes
 * (ia[2] is not consulted). */
static ap_status run_slice(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what,
                           bool back) {
    const ap_shape *big = back ? &c->out_shape : &c->src_shape[0];
    const ap_shape *small = back ? &c->src_shape[0] : &c->out_shape;
    int axis = check_axis(c->attrs.i[0], big->ndim);
    if (axis < 0 || !same_but_axis(big, small, axis))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: bad axis %lld or shapes", what,
                        (long long)c->attrs.i[0]);
    i64 full = big->dim[axis], len = small->dim[axis], start = c->attrs.i[1];
    if (start < 0 || start > full - len)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: slice [%lld, %lld) outside [0, %lld)",
                        what, (long long)start, (long long)(start + len), (long long)full);
    i64 outer, inner;
    split_at(big, axis, &outer, &inner);
    if (!back)
        return launch_copy_rows(ctx, what, c->out, len * inner, 0, c->src[0], full * inner,
                                start * inner, outer, len * inner);
    if (numel(big) > 0)
        AP_CUDA_TRY(what, cudaMemsetAsync(c->out, 0, (size_t)numel(big) * 4, ctx->stream));
    return launch_copy_rows(ctx, what, c->out, full * inner, start * inner, c->src[0],
                            len * inner, 0, outer, len * inner);
}

/* CONCAT: operands placed one after another along ia[0]. */
static ap_status run_concat(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    const ap_shape *so = &c->out_shape;
    int axis = check_axis(c->attrs.i[0], so->ndim);
    if (axis < 0) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: bad axis", what);
    i64 total = 0;
    for (int k = 0; k < c->n_src; k++) {
        if (!same_but_axis(so, &c->src_shape[k], axis))
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: operand %d does not fit", what, k);
        total += c->src_shape[k].dim[axis];
    }
    if (total != so->dim[axis])
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: operand sizes along the axis sum to %lld, "
                        "the output has %lld", what, (long long)total, (long long)so->dim[axis]);
    i64 outer, inner, off = 0;
    split_at(so, axis, &outer, &inner);
    for (int k = 0; k < c->n_src; k++) {
        i64 len = c->src_shape[k].dim[axis];
        ap_status s = launch_copy_rows(ctx, what, c->out, so->dim[axis] * inner, off * inner,
                                       c->src[k], len * inner, 0, outer, len * inner);
        if (s != AUTOPAR_OK) return s;
        off += len;
    }
    return AUTOPAR_OK;
}

/* PERMUTE: out dim i = A dim ia[i]. */
static ap_status run_permute(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    const ap_shape *sa = &c->src_shape[0], *so = &c->out_shape;
    int nd = sa->ndim;
    permute_args p;
    memset(&p, 0, sizeof p);
    p.ndim = nd;
    i64 stride[AP_MAX_DIMS];
    bool seen[AP_MAX_DIMS] = {false};
    bool ok = so->ndim == nd && nd <= AP_MAX_DIMS;
    i64 st = 1;
    for (int i = nd - 1; ok && i >= 0; i--) {
        stride[i] = st;
        st *= sa->dim[i];
    }
    for (int i = 0; ok && i < nd; i++) {
        i64 a = c->attrs.i[i];
        ok = a >= 0 && a < nd && !seen[a] && so->dim[i] == sa->dim[a];
        if (!ok) break;
        seen[a] = true;
        p.out_dim[i] = so->dim[i];
        p.in_stride[i] = stride[a];
    }
    if (!ok)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: attrs are not a permutation that maps the "
                        "operand's shape to the output's", what);
    i64 n = numel(so);
    if (n == 0) return AUTOPAR_OK;
    permute_kernel<<<ap_cuda_grid(n, BLOCK), BLOCK, 0, ctx->stream>>>(
        (uint32_t *)c->out, (const uint32_t *)c->src[0], n, p);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

/* EXPAND: A broadcast over the inserted axis ia[0] (or everywhere when -1), times fa[0]. */
static ap_status run_expand(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    const ap_shape *so = &c->out_shape, *sa = &c->src_shape[0];
    i64 total = numel(so), n, inner;
    if (c->attrs.i[0] == -1) {
        if (numel(sa) != 1)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: axis -1 needs a scalar operand", what);
        n = total;
        inner = 1;
    } else {
        int axis = check_axis(c->attrs.i[0], so->ndim);
        i64 outer = 0;
        if (axis >= 0) split_at(so, axis, &outer, &inner);
        if (axis < 0 || numel(sa) != outer * inner)
            return ap_error(AUTOPAR_ERR_INVALID_ARG,
                            "%s: output is not the operand with axis %lld inserted", what,
                            (long long)c->attrs.i[0]);
        n = so->dim[axis];
    }
    if (total == 0) return AUTOPAR_OK;
    expand_kernel<<<ap_cuda_grid(total, BLOCK), BLOCK, 0, ctx->stream>>>(
        (float *)c->out, (const float *)c->src[0], total, n, inner, (float)c->attrs.f[0]);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

/* FILL: every element = fa[0] (converted to the output dtype). */
static ap_status run_fill(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    uint32_t bits;
    if (c->out_dtype == AUTOPAR_I32) {
        double f = c->attrs.f[0]; /* saturating, NaN -> 0, as on the CPU */
        int32_t v = f != f ? 0 : f >= 2147483647.0 ? INT32_MAX
                              : f <= -2147483648.0 ? INT32_MIN : (int32_t)f;
        memcpy(&bits, &v, 4);
    } else {
        float v = (float)c->attrs.f[0];
        memcpy(&bits, &v, 4);
    }
    i64 n = numel(&c->out_shape);
    if (n == 0) return AUTOPAR_OK;
    fill_kernel<<<ap_cuda_grid(n, BLOCK), BLOCK, 0, ctx->stream>>>((uint32_t *)c->out, n, bits);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Dispatch                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Operand count of each op (-1: 1..AP_MAX_SRC) and whether data-movement ops accept I32. */
static int expected_srcs(ap_op op) {
    switch (op) {
    case AP_OP_INPUT: case AP_OP_PARAM: case AP_OP_OPT_STATE: case AP_OP_FILL: return 0;
    case AP_OP_SCALE: case AP_OP_RELU: case AP_OP_GELU: case AP_OP_SOFTMAX: case AP_OP_RESHAPE:
    case AP_OP_PERMUTE: case AP_OP_SLICE: case AP_OP_SUM: case AP_OP_MEAN:
    case AP_OP_SLICE_BACK: case AP_OP_SUM_TO: case AP_OP_EXPAND: case AP_OP_CE_COMBINE: return 1;
    case AP_OP_LAYERNORM: case AP_OP_LAYERNORM_BACK: case AP_OP_MSE_LOSS_BACK:
    case AP_OP_CROSS_ENTROPY_BACK: case AP_OP_ADAMW_UPDATE: return 3;
    case AP_OP_CE_BACK_PARTIAL: return 4;
    case AP_OP_CONCAT: return -1;
    default: return 2;
    }
}

/* dtype operand k must have: I32 for ids and labels, F32 otherwise; data-movement ops take
 * either, equal to the output's (returns -1 for "same as output"). */
static int expected_dtype(ap_op op, int k) {
    switch (op) {
    case AP_OP_RESHAPE: case AP_OP_PERMUTE: case AP_OP_SLICE: case AP_OP_CONCAT:
    case AP_OP_SLICE_BACK: return -1;
    case AP_OP_EMBEDDING: case AP_OP_EMBEDDING_BACK: case AP_OP_CROSS_ENTROPY:
    case AP_OP_CE_PARTIAL:
        return k == 1 ? AUTOPAR_I32 : AUTOPAR_F32;
    case AP_OP_CROSS_ENTROPY_BACK: case AP_OP_CE_BACK_PARTIAL:
        return k == 2 ? AUTOPAR_I32 : AUTOPAR_F32;
    default: return AUTOPAR_F32;
    }
}

static bool moves_data(ap_op op) {
    return op == AP_OP_RESHAPE || op == AP_OP_PERMUTE || op == AP_OP_SLICE ||
           op == AP_OP_CONCAT || op == AP_OP_SLICE_BACK || op == AP_OP_FILL;
}

static bool bad_shape(const ap_shape *s) {
    if (s->ndim < 0 || s->ndim > AP_MAX_DIMS) return true;
    for (int i = 0; i < s->ndim; i++)
        if (s->dim[i] < 0) return true;
    return false;
}

static ap_status check_call(const ap_kernel_call *c, const char *what) {
    int want = expected_srcs(c->op);
    if (want >= 0 ? c->n_src != want : (c->n_src < 1 || c->n_src > AP_MAX_SRC))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: %d operands given", what, c->n_src);
    if (bad_shape(&c->out_shape))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: bad output shape (rank %d)", what,
                        c->out_shape.ndim);
    if (!moves_data(c->op) && c->out_dtype != AUTOPAR_F32)
        return ap_error(AUTOPAR_ERR_DTYPE, "%s: output must be F32", what);
    if (!c->out && numel(&c->out_shape) > 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: output buffer is NULL", what);
    for (int k = 0; k < c->n_src; k++) {
        const ap_shape *s = &c->src_shape[k];
        if (bad_shape(s))
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: bad shape of operand %d (rank %d)",
                            what, k, s->ndim);
        int dt = expected_dtype(c->op, k);
        if (dt >= 0 ? c->src_dtype[k] != (ap_dtype)dt : c->src_dtype[k] != c->out_dtype)
            return ap_error(AUTOPAR_ERR_DTYPE, "%s: operand %d has the wrong dtype", what, k);
        if (!c->src[k] && numel(s) > 0)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: operand %d buffer is NULL", what, k);
    }
    return AUTOPAR_OK;
}

ap_status ap_cuda_run(ap_cuda_ctx *ctx, const ap_kernel_call *c) {
    if (!ctx || !c) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cuda_run: NULL argument");
    if ((int)c->op < 0 || c->op >= AP_OP_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cuda_run: bad op %d", (int)c->op);
    char what[AP_MAX_NAME + 64];
    snprintf(what, sizeof what, "op %s '%s'", ap_op_name(c->op), c->name ? c->name : "?");
    if (c->precision != AUTOPAR_PRECISION_F32)
        return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                        "%s: the CUDA backend supports float32 precision only", what);
    if (c->op == AP_OP_INPUT || c->op == AP_OP_PARAM || c->op == AP_OP_OPT_STATE)
        return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                        "%s: leaves have no kernel (the runtime fills them)", what);
    ap_status s = check_call(c, what);
    if (s != AUTOPAR_OK) return s;
    AP_CUDA_TRY(what, cudaSetDevice(ctx->device));

    const ap_attrs *at = &c->attrs;
    float *out = (float *)c->out;
    const float *a = (const float *)c->src[0], *b = (const float *)c->src[1],
                *d = (const float *)c->src[2];
    i64 n = numel(&c->out_shape);
    switch (c->op) {
    case AP_OP_FILL: return run_fill(ctx, c, what);
    case AP_OP_MATMUL: return run_matmul(ctx, c, what);
    case AP_OP_BATCH_MATMUL: return run_batch_matmul(ctx, c, what);
    case AP_OP_ADD: return run_broadcast(ctx, c, what, add_f());
    case AP_OP_SUB: return run_broadcast(ctx, c, what, sub_f());
    case AP_OP_MUL: return run_broadcast(ctx, c, what, mul_f());
    case AP_OP_RESHAPE:
        if ((s = check_same_size(c, what)) != AUTOPAR_OK) return s;
        if (n > 0 && c->out != c->src[0])
            AP_CUDA_TRY(what, cudaMemcpyAsync(c->out, c->src[0], (size_t)n * 4,
                                              cudaMemcpyDeviceToDevice, ctx->stream));
        return AUTOPAR_OK;
    case AP_OP_PERMUTE: return run_permute(ctx, c, what);
    case AP_OP_SLICE: return run_slice(ctx, c, what, false);
    case AP_OP_SLICE_BACK: return run_slice(ctx, c, what, true);
    case AP_OP_CONCAT: return run_concat(ctx, c, what);
    case AP_OP_EXPAND: return run_expand(ctx, c, what);
    default: break;
    }
    switch (c->op) { /* elementwise ops with operands of the output's size */
    case AP_OP_SCALE: case AP_OP_RELU: case AP_OP_GELU: case AP_OP_RELU_BACK:
    case AP_OP_GELU_BACK: case AP_OP_SGD_UPDATE: case AP_OP_MOMENTUM_UPDATE: case AP_OP_ADAM_M:
    case AP_OP_ADAM_V: case AP_OP_ADAMW_UPDATE:
        if ((s = check_same_size(c, what)) != AUTOPAR_OK) return s;
        break;
    default: break;
    }
    switch (c->op) {
    case AP_OP_SCALE: return launch_map1(ctx, what, out, a, n, scale_f{(float)at->f[0]});
    case AP_OP_RELU: return launch_map1(ctx, what, out, a, n, relu_f());
    case AP_OP_GELU: return launch_map1(ctx, what, out, a, n, gelu_f());
    case AP_OP_RELU_BACK: return launch_map2(ctx, what, out, a, b, n, n, relu_back_f());
    case AP_OP_GELU_BACK: return launch_map2(ctx, what, out, a, b, n, n, gelu_back_f());
    case AP_OP_SGD_UPDATE:
        return launch_map2(ctx, what, out, a, b, n, n, sgd_f{(float)at->f[0], (float)at->f[1]});
    case AP_OP_MOMENTUM_UPDATE:
        return launch_map2(ctx, what, out, a, b, n, n, momentum_f{(float)at->f[0]});
    case AP_OP_ADAM_M:
        return launch_map2(ctx, what, out, a, b, n, n,
                           adam_m_f{(float)at->f[0], (float)(1.0 - at->f[0])});
    case AP_OP_ADAM_V:
        return launch_map2(ctx, what, out, a, b, n, n,
                           adam_v_f{(float)at->f[0], (float)(1.0 - at->f[0])});
    case AP_OP_ADAMW_UPDATE: {
        if (c->step < 1)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: optimizer step %lld (must be >= 1)",
                            what, (long long)c->step);
        double t = (double)c->step;
        double ib1 = 1.0 / (1.0 - pow(at->f[1], t)), ib2 = 1.0 / (1.0 - pow(at->f[2], t));
        adamw_f f = {(float)at->f[0], (float)at->f[3], (float)at->f[4], (float)ib1, (float)ib2};
        return launch_map3(ctx, what, out, a, b, d, n, f);
    }
    case AP_OP_MSE_LOSS_BACK: {
        i64 np = numel(&c->src_shape[1]);
        if (numel(&c->src_shape[0]) != 1 || np != n || numel(&c->src_shape[2]) != n)
            return ap_error(AUTOPAR_ERR_INVALID_ARG,
                            "%s: want (scalar, P, T) with P, T and the output of one size", what);
        if (n == 0) return AUTOPAR_OK;
        mse_back_kernel<<<ap_cuda_grid(n, BLOCK), BLOCK, 0, ctx->stream>>>(out, a, b, d, n,
                                                                          (float)(1.0 / (double)n));
        AP_CUDA_LAUNCHED(what);
        return AUTOPAR_OK;
    }
    default: return ap_cuda_run_rows(ctx, c, what);
    }
}
