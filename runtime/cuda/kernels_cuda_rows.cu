/*
 * CUDA kernels, part 2: ops that reduce along rows or columns: layernorm (+ both backward ops),
 * softmax (+ backward), sum / mean / sum_to, mse loss, cross entropy (+ backward), embedding
 * (+ backward). Entry point: ap_cuda_run_rows, called by ap_cuda_run (kernels_cuda.cu).
 *
 * Determinism: no float atomics anywhere. Every reduction has a fixed summation order that
 * depends only on the tensor shapes (block sizes and chunk counts are functions of the shape,
 * never of the device), so two runs give bitwise-identical results:
 *   - in-block sums: per-thread strided partial sums, an xor-butterfly warp reduction, then the
 *     per-warp partials added in warp order by every thread (block_sum);
 *   - long reductions: a fixed number of chunks reduced independently into scratch, then the
 *     chunk partials added in chunk order (reduce_sum);
 *   - embedding_back: ids are stably radix-sorted (cub) with their positions, and each
 *     (vocab row, channel) sums its gradients in increasing position order: the same order as
 *     a sequential CPU loop over positions.
 *
 * Out-of-range ids / labels: a kernel cannot fail synchronously without a host round trip, so
 * it records the first bad index in the context's device flag (ap_cuda_report_bad_index), never
 * reads out of bounds (embedding / cross-entropy rows with a bad index get zeros, a bad id adds
 * nothing in embedding_back), and ap_cuda_synchronize turns the flag into
 * AUTOPAR_ERR_INVALID_ARG with a message naming the op, tensor, value, range and position.
 */
#include "cuda_common.cuh"

#include <cub/device/device_radix_sort.cuh>

#include <limits.h>
#include <math.h>

#define BLOCK 256

/* ------------------------------------------------------------------------------------------ */
/* Device helpers                                                                              */
/* ------------------------------------------------------------------------------------------ */

// Sum / max over a warp; every lane gets the same (bitwise) result since a+b == b+a.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum / max over the block (blockDim.x a multiple of 32, every thread must call); the result is
// returned to every thread. The leading barrier lets consecutive calls reuse the buffer.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) s += part[w];
    return s;
}
__device__ float block_max(float v) {
    __shared__ float part[32];
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = -INFINITY;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) m = fmaxf(m, part[w]);
    return m;
}

// Threads per block for a kernel that gives one block to each row of n elements.
static int row_threads(i64 n) {
    if (n >= 8192) return 512;
    int t = 32;
    while (t < BLOCK && t < n) t *= 2;
    return t;
}

/* ------------------------------------------------------------------------------------------ */
/* Generic deterministic sum: out[o, i] = scale * sum_k load((o * n + k) * inner + i)          */
/* ------------------------------------------------------------------------------------------ */

struct plain_load {
    const float *x;
    __device__ float operator()(i64 idx) const { return x[idx]; }
};
struct sq_diff_load { // (a - b)^2
    const float *a, *b;
    __device__ float operator()(i64 idx) const {
        float d = a[idx] - b[idx];
        return d * d;
    }
};
struct ln_gain_load { // dY * xhat, rows of C with per-row mean / rstd
    const float *dy, *x, *mean, *rstd;
    i64 C;
    __device__ float operator()(i64 idx) const {
        i64 r = idx / C;
        return dy[idx] * ((x[idx] - mean[r]) * rstd[r]);
    }
};

// inner == 1: one block per (o, chunk); out[o * nchunk + chunk] = scale * sum over the chunk
template <class Load>
__global__ void reduce_rows_kernel(float *out, Load ld, i64 n, i64 chunk_len, i64 nchunk,
                                   float scale) {
    i64 o = blockIdx.x / nchunk, ch = blockIdx.x % nchunk;
    i64 k0 = ch * chunk_len, k1 = min(n, k0 + chunk_len);
    float s = 0.0f;
    for (i64 k = k0 + threadIdx.x; k < k1; k += blockDim.x) s += ld(o * n + k);
    s = block_sum(s);
    if (threadIdx.x == 0) out[blockIdx.x] = s * scale;
}

// inner > 1: one thread per (o, chunk, i) summing its chunk in order;
// out[(o * nchunk + chunk) * inner + i] = scale * sum
template <class Load>
__global__ void reduce_cols_kernel(float *out, Load ld, i64 outer, i64 n, i64 inner,
                                   i64 chunk_len, i64 nchunk, float scale) {
    i64 total = outer * nchunk * inner;
    AP_GRID_LOOP(t, total) {
        i64 i = t % inner, rest = t / inner, ch = rest % nchunk, o = rest / nchunk;
        i64 k0 = ch * chunk_len, k1 = min(n, k0 + chunk_len);
        float s = 0.0f;
        for (i64 k = k0; k < k1; k++) s += ld((o * n + k) * inner + i);
        out[t] = s * scale;
    }
}

// Number of chunks the reduced axis is cut into (a function of the shape only).
static i64 reduce_chunks(i64 outer, i64 n, i64 inner) {
    if (inner == 1) {
        if (n <= 8192 || outer >= 256) return 1;
        i64 c = AP_CEIL_DIV(n, (i64)4096);
        return c > 1024 ? 1024 : c;
    }
    i64 threads = outer * inner;
    if (n <= 64 || threads >= 65536) return 1;
    i64 c = AP_CEIL_DIV(n, (i64)64), want = AP_CEIL_DIV((i64)65536, threads);
    return c < want ? c : want;
}

// Scratch floats reduce_sum needs for its partial sums.
static i64 reduce_scratch(i64 outer, i64 n, i64 inner) {
    i64 c = reduce_chunks(outer, n, inner);
    return c > 1 ? outer * c * inner : 0;
}

template <class Load>
static ap_status launch_reduce(ap_cuda_ctx *ctx, const char *what, float *out, Load ld,
                               i64 outer, i64 n, i64 inner, i64 nchunk, float scale) {
    i64 chunk_len = nchunk > 1 ? AP_CEIL_DIV(n, nchunk) : n;
    if (inner == 1) {
        reduce_rows_kernel<<<(unsigned)(outer * nchunk), row_threads(chunk_len), 0,
                             ctx->stream>>>(out, ld, n, chunk_len, nchunk, scale);
    } else {
        i64 total = outer * nchunk * inner;
        reduce_cols_kernel<<<ap_cuda_grid(total, BLOCK), BLOCK, 0, ctx->stream>>>(
            out, ld, outer, n, inner, chunk_len, nchunk, scale);
    }
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

// out (outer, inner) = scale * sum over k of load at (o, k, i); partial: reduce_scratch floats.
template <class Load>
static ap_status reduce_sum(ap_cuda_ctx *ctx, const char *what, float *out, Load ld, i64 outer,
                            i64 n, i64 inner, float scale, float *partial) {
    if (outer * inner == 0) return AUTOPAR_OK;
    if (outer > INT_MAX)
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: more than INT_MAX rows", what);
    i64 nchunk = reduce_chunks(outer, n, inner);
    if (nchunk == 1) return launch_reduce(ctx, what, out, ld, outer, n, inner, 1, scale);
    ap_status s = launch_reduce(ctx, what, partial, ld, outer, n, inner, nchunk, 1.0f);
    if (s != AUTOPAR_OK) return s;
    return launch_reduce(ctx, what, out, plain_load{partial}, outer, nchunk, inner, 1, scale);
}

/* Scratch carving: regions aligned to 256 bytes. */
static size_t align256(size_t b) { return (b + 255) & ~(size_t)255; }

/* ------------------------------------------------------------------------------------------ */
/* Row kernels (one block per row)                                                             */
/* ------------------------------------------------------------------------------------------ */

// x is (rows, C); mean and rstd of row blockIdx.x over all threads (two-pass variance).
__device__ void row_stats(const float *xr, i64 C, float eps, float *mean, float *rstd) {
    float s = 0.0f;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) s += xr[c];
    float m = block_sum(s) / (float)C;
    float v = 0.0f;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
        float d = xr[c] - m;
        v += d * d;
    }
    float var = block_sum(v) / (float)C;
    *mean = m;
    *rstd = 1.0f / sqrtf(var + eps);
}

// x row of n values; every thread of the block gets its max and the sum of exp(x - max) (the
// numerically stable softmax / log-sum-exp statistics; max = -inf and sum = 0 for n = 0).
__device__ void row_max_sum_exp(const float *xr, i64 n, float *max_out, float *sum_out) {
    float m = -INFINITY;
    for (i64 c = threadIdx.x; c < n; c += blockDim.x) m = fmaxf(m, xr[c]);
    m = block_max(m);
    float s = 0.0f;
    for (i64 c = threadIdx.x; c < n; c += blockDim.x) s += expf(xr[c] - m);
    *max_out = m;
    *sum_out = block_sum(s);
}

// out, x are (rows, C); gain, bias are (C)
__global__ void layernorm_kernel(float *out, const float *x, const float *gain,
                                 const float *bias, i64 C, float eps) {
    const float *xr = x + blockIdx.x * C;
    float *outr = out + blockIdx.x * C;
    float mean, rstd;
    row_stats(xr, C, eps, &mean, &rstd);
    for (i64 c = threadIdx.x; c < C; c += blockDim.x)
        outr[c] = (xr[c] - mean) * rstd * gain[c] + bias[c];
}

// x is (rows, C); mean, rstd are (rows)
__global__ void layernorm_stats_kernel(float *mean, float *rstd, const float *x, i64 C,
                                       float eps) {
    float m, r;
    row_stats(x + blockIdx.x * C, C, eps, &m, &r);
    if (threadIdx.x == 0) {
        mean[blockIdx.x] = m;
        rstd[blockIdx.x] = r;
    }
}

// dx, dy, x are (rows, C); gain is (C):
// dx = rstd * (dy*g - mean(dy*g) - xhat * mean(dy*g * xhat))
__global__ void layernorm_back_kernel(float *dx, const float *dy, const float *x,
                                      const float *gain, i64 C, float eps) {
    const float *xr = x + blockIdx.x * C, *dyr = dy + blockIdx.x * C;
    float *dxr = dx + blockIdx.x * C;
    float mean, rstd;
    row_stats(xr, C, eps, &mean, &rstd);
    float s1 = 0.0f, s2 = 0.0f;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
        float dn = dyr[c] * gain[c];
        s1 += dn;
        s2 += dn * ((xr[c] - mean) * rstd);
    }
    float mean_dn = block_sum(s1) / (float)C;
    float mean_dn_xhat = block_sum(s2) / (float)C;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
        float xhat = (xr[c] - mean) * rstd;
        dxr[c] = rstd * (dyr[c] * gain[c] - mean_dn - xhat * mean_dn_xhat);
    }
}

// out, x are (rows, C); row r sits at index i = r % T + row0 of the second-to-last dim (row0:
// the global index of local row 0); causal: only columns j <= i are kept (the others are 0)
__global__ void softmax_kernel(float *out, const float *x, i64 C, i64 T, int causal, i64 row0) {
    const float *xr = x + blockIdx.x * C;
    float *outr = out + blockIdx.x * C;
    i64 valid = C;
    if (causal) {
        i64 i = blockIdx.x % T + row0;
        valid = i + 1 < C ? i + 1 : C;
    }
    float m, s;
    row_max_sum_exp(xr, valid, &m, &s);
    float inv = 1.0f / s;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x)
        outr[c] = c < valid ? expf(xr[c] - m) * inv : 0.0f;
}

// out, y, dy are (rows, C): out = y * (dy - sum(dy * y))
__global__ void softmax_back_kernel(float *out, const float *y, const float *dy, i64 C) {
    const float *yr = y + blockIdx.x * C, *dyr = dy + blockIdx.x * C;
    float *outr = out + blockIdx.x * C;
    float s = 0.0f;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) s += dyr[c] * yr[c];
    s = block_sum(s);
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) outr[c] = yr[c] * (dyr[c] - s);
}

// logits are (rows, V), labels (rows); loss[r] = logsumexp(logits[r]) - logits[r, label]
// (0 and the error flag for a label outside [0, V))
__global__ void cross_entropy_kernel(float *loss, const float *logits, const int *labels, i64 V,
                                     ap_cuda_flag *flag, int code) {
    const float *xr = logits + blockIdx.x * V;
    int label = labels[blockIdx.x];
    bool ok = label >= 0 && label < V;
    float m, s;
    row_max_sum_exp(xr, V, &m, &s);
    if (threadIdx.x == 0) {
        if (!ok) ap_cuda_report_bad_index(flag, code, label, (int)V, (long long)blockIdx.x);
        loss[blockIdx.x] = ok ? logf(s) + m - xr[label] : 0.0f;
    }
}

// dx, logits are (rows, V), labels (rows), dl a device scalar:
// dx = dl * (softmax(logits) - onehot(label)) / rows (a row with a bad label gets zeros)
__global__ void cross_entropy_back_kernel(float *dx, const float *dl, const float *logits,
                                          const int *labels, i64 V, float inv_rows,
                                          ap_cuda_flag *flag, int code) {
    const float *xr = logits + blockIdx.x * V;
    float *dxr = dx + blockIdx.x * V;
    int label = labels[blockIdx.x];
    bool ok = label >= 0 && label < V;
    float m, s;
    row_max_sum_exp(xr, V, &m, &s);
    if (!ok && threadIdx.x == 0)
        ap_cuda_report_bad_index(flag, code, label, (int)V, (long long)blockIdx.x);
    float g = dl[0] * inv_rows, inv = 1.0f / s;
    for (i64 c = threadIdx.x; c < V; c += blockDim.x) {
        float p = expf(xr[c] - m) * inv;
        dxr[c] = ok ? g * (p - (c == label ? 1.0f : 0.0f)) : 0.0f;
    }
}

// Vocabulary-parallel cross-entropy (internal.h). ce_partial: logits (rows, Vl) are columns
// [v0, v0 + Vl) of a vocabulary V; part[r] = (max, sum of exp(x - max), x at the label or 0).
__global__ void ce_partial_kernel(float *part, const float *logits, const int *labels, i64 Vl,
                                  i64 v0, i64 V, ap_cuda_flag *flag, int code) {
    const float *xr = logits + blockIdx.x * Vl;
    int label = labels[blockIdx.x];
    float m, s;
    row_max_sum_exp(xr, Vl, &m, &s);
    if (threadIdx.x == 0) {
        if (label < 0 || label >= V)
            ap_cuda_report_bad_index(flag, code, label, (int)V, (long long)blockIdx.x);
        i64 t = (i64)label - v0;
        float *o = part + 3 * (i64)blockIdx.x;
        o[0] = m;
        o[1] = s;
        o[2] = t >= 0 && t < Vl ? xr[t] : 0.0f;
    }
}

// parts (P, rows, 3) -> per row (m, s) combined over P; loss[r] = log s + m - sum xt when
// `loss` is given, else stats[r] = (m, s). One thread per row.
__global__ void ce_combine_kernel(float *loss, float *stats, const float *parts, i64 P,
                                  i64 rows) {
    i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float m = -INFINITY, s = 0.0f, xt = 0.0f;
    for (i64 p = 0; p < P; p++) m = fmaxf(m, parts[(p * rows + r) * 3]);
    for (i64 p = 0; p < P; p++) {
        const float *q = parts + (p * rows + r) * 3;
        if (q[1] > 0.0f) s += q[1] * expf(q[0] - m);
        xt += q[2];
    }
    if (loss) loss[r] = logf(s) + m - xt;
    else {
        stats[2 * r] = m;
        stats[2 * r + 1] = s;
    }
}

// dx = dl * (exp(x - m) / s - onehot(label - v0)) / rows on the device's columns
__global__ void ce_back_partial_kernel(float *dx, const float *dl, const float *logits,
                                       const int *labels, const float *stats, i64 Vl, i64 v0,
                                       float inv_rows) {
    const float *xr = logits + blockIdx.x * Vl;
    float *dxr = dx + blockIdx.x * Vl;
    i64 t = (i64)labels[blockIdx.x] - v0;
    float m = stats[2 * (i64)blockIdx.x], inv = 1.0f / stats[2 * (i64)blockIdx.x + 1];
    float g = dl[0] * inv_rows;
    for (i64 c = threadIdx.x; c < Vl; c += blockDim.x)
        dxr[c] = g * (expf(xr[c] - m) * inv - (c == t ? 1.0f : 0.0f));
}

/* ------------------------------------------------------------------------------------------ */
/* Embedding                                                                                   */
/* ------------------------------------------------------------------------------------------ */

// out is (N, C), table (rows, C) = rows [v0, v0 + rows) of a vocabulary V, ids (N):
// out[s] = table[ids[s] - v0], zeros for an id outside the local rows (flag when outside [0, V))
__global__ void embedding_kernel(float *out, const float *table, const int *ids, i64 N, i64 C,
                                 int V, i64 v0, i64 rows, ap_cuda_flag *flag, int code) {
    i64 total = N * C;
    AP_GRID_LOOP(t, total) {
        i64 s = t / C, c = t % C;
        int id = ids[s];
        i64 r = (i64)id - v0;
        if (id < 0 || id >= V) {
            if (c == 0) ap_cuda_report_bad_index(flag, code, id, V, (long long)s);
            out[t] = 0.0f;
        } else {
            out[t] = r >= 0 && r < rows ? table[r * C + c] : 0.0f;
        }
    }
}

// pos[k] = k; flags ids outside [0, V)
__global__ void iota_check_kernel(int *pos, const int *ids, int N, int V, ap_cuda_flag *flag,
                                  int code) {
    AP_GRID_LOOP(k, N) {
        pos[k] = (int)k;
        int id = ids[k];
        if (id < 0 || id >= V) ap_cuda_report_bad_index(flag, code, id, V, (long long)k);
    }
}

// first index k in sorted keys[0..n) with keys[k] >= v
__device__ int lower_bound(const int *keys, int n, int v) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (keys[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// dtable is (V, C), dy (N, C); keys/pos: ids stably sorted with their positions. One block per
// vocab row v: dtable[v, c] = sum of dy[p, c] over positions p with id v, in increasing p.
__global__ void embedding_back_kernel(float *dtable, const float *dy, const int *keys,
                                      const int *pos, int N, i64 C) {
    __shared__ int range[2];
    int v = blockIdx.x;
    if (threadIdx.x == 0) {
        range[0] = lower_bound(keys, N, v);
        range[1] = lower_bound(keys, N, v + 1);
    }
    __syncthreads();
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int k = range[0]; k < range[1]; k++) acc += dy[(i64)pos[k] * C + c];
        dtable[(i64)v * C + c] = acc;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Launchers                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static i64 numel(const ap_shape *s) { return ap_shape_numel(s); }
static i64 last_dim(const ap_shape *s) { return s->ndim > 0 ? s->dim[s->ndim - 1] : 1; }
/* Product of all dims but the last (as the CPU's lead_rows; 1 for rank 0 and 1). */
static i64 lead_rows(const ap_shape *s) {
    i64 r = 1;
    for (int i = 0; i + 1 < s->ndim; i++) r *= s->dim[i];
    return r;
}

static ap_status bad_shapes(const char *what, const char *why) {
    return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: %s", what, why);
}

/* Rows of the last dim for row kernels: rows fit a 1-D grid. */
static ap_status check_rows(const char *what, i64 rows) {
    if (rows > INT_MAX)
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: %lld rows exceed the grid", what,
                        (long long)rows);
    return AUTOPAR_OK;
}

static ap_status run_layernorm(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    i64 C = last_dim(&c->src_shape[0]), n = numel(&c->src_shape[0]);
    if (numel(&c->out_shape) != n || numel(&c->src_shape[1]) != C || numel(&c->src_shape[2]) != C)
        return bad_shapes(what, "want A[..., C], gain[C], bias[C] and an output of A's size");
    i64 rows = C ? n / C : 0;
    if (rows == 0 || C == 0) return AUTOPAR_OK;
    ap_status s = check_rows(what, rows);
    if (s != AUTOPAR_OK) return s;
    layernorm_kernel<<<(unsigned)rows, row_threads(C), 0, ctx->stream>>>(
        (float *)c->out, (const float *)c->src[0], (const float *)c->src[1],
        (const float *)c->src[2], C, (float)c->attrs.f[0]);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

static ap_status run_layernorm_back(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    i64 C = last_dim(&c->src_shape[1]), n = numel(&c->src_shape[1]);
    if (numel(&c->out_shape) != n || numel(&c->src_shape[0]) != n || numel(&c->src_shape[2]) != C)
        return bad_shapes(what, "want dY and X of one shape [..., C], gain[C]");
    i64 rows = C ? n / C : 0;
    if (rows == 0 || C == 0) return AUTOPAR_OK;
    ap_status s = check_rows(what, rows);
    if (s != AUTOPAR_OK) return s;
    layernorm_back_kernel<<<(unsigned)rows, row_threads(C), 0, ctx->stream>>>(
        (float *)c->out, (const float *)c->src[0], (const float *)c->src[1],
        (const float *)c->src[2], C, (float)c->attrs.f[0]);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

static ap_status run_layernorm_back_gain(ap_cuda_ctx *ctx, const ap_kernel_call *c,
                                         const char *what) {
    i64 C = last_dim(&c->src_shape[1]), n = numel(&c->src_shape[1]);
    if (numel(&c->src_shape[0]) != n || numel(&c->out_shape) != C)
        return bad_shapes(what, "want dY and X of one shape [..., C] and an output [C]");
    i64 rows = C ? n / C : 0;
    if (C == 0) return AUTOPAR_OK;
    if (rows == 0) {
        AP_CUDA_TRY(what, cudaMemsetAsync(c->out, 0, (size_t)C * 4, ctx->stream));
        return AUTOPAR_OK;
    }
    ap_status s = check_rows(what, rows);
    if (s != AUTOPAR_OK) return s;
    size_t stats = align256((size_t)rows * 4);
    size_t part = align256((size_t)reduce_scratch(1, rows, C) * 4);
    void *scratch;
    if ((s = ap_cuda_scratch(ctx, 2 * stats + part, &scratch, what)) != AUTOPAR_OK) return s;
    float *mean = (float *)scratch, *rstd = (float *)((char *)scratch + stats);
    float *partial = (float *)((char *)scratch + 2 * stats);
    layernorm_stats_kernel<<<(unsigned)rows, row_threads(C), 0, ctx->stream>>>(
        mean, rstd, (const float *)c->src[1], C, (float)c->attrs.f[0]);
    AP_CUDA_LAUNCHED(what);
    ln_gain_load ld = {(const float *)c->src[0], (const float *)c->src[1], mean, rstd, C};
    return reduce_sum(ctx, what, (float *)c->out, ld, 1, rows, C, 1.0f, partial);
}

static ap_status run_softmax(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    const ap_shape *sa = &c->src_shape[0];
    i64 C = last_dim(sa), n = numel(sa);
    if (numel(&c->out_shape) != n) return bad_shapes(what, "output size differs from A's");
    if (c->attrs.i[0] != 0 && sa->ndim < 2)
        return bad_shapes(what, "causal softmax needs rank >= 2");
    i64 rows = C ? n / C : 0;
    if (rows == 0 || C == 0) return AUTOPAR_OK;
    ap_status s = check_rows(what, rows);
    if (s != AUTOPAR_OK) return s;
    i64 T = sa->ndim >= 2 ? sa->dim[sa->ndim - 2] : 1;
    if (c->attrs.i[1] < 0) return bad_shapes(what, "negative row offset");
    softmax_kernel<<<(unsigned)rows, row_threads(C), 0, ctx->stream>>>(
        (float *)c->out, (const float *)c->src[0], C, T, c->attrs.i[0] != 0, c->attrs.i[1]);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

static ap_status run_softmax_back(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    i64 C = last_dim(&c->src_shape[0]), n = numel(&c->src_shape[0]);
    if (numel(&c->src_shape[1]) != n || numel(&c->out_shape) != n)
        return bad_shapes(what, "want Y, dY and the output of one size");
    i64 rows = C ? n / C : 0;
    if (rows == 0 || C == 0) return AUTOPAR_OK;
    ap_status s = check_rows(what, rows);
    if (s != AUTOPAR_OK) return s;
    softmax_back_kernel<<<(unsigned)rows, row_threads(C), 0, ctx->stream>>>(
        (float *)c->out, (const float *)c->src[0], (const float *)c->src[1], C);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

/* SUM / MEAN over axis ia[0] (removed), or over everything when -1; SUM_TO over leading dims. */
static ap_status run_sum(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    const ap_shape *sa = &c->src_shape[0], *so = &c->out_shape;
    i64 outer = 1, n, inner = 1;
    if (c->op == AP_OP_SUM_TO) { /* as on the CPU, only numel(out) | numel(A) is checked */
        inner = numel(so);
        if (inner == 0) return AUTOPAR_OK;
        if (numel(sa) % inner != 0)
            return bad_shapes(what, "operand is not a broadcast of the output");
        n = numel(sa) / inner;
    } else if (c->attrs.i[0] == -1) {
        n = numel(sa);
        if (numel(so) != 1) return bad_shapes(what, "a full reduction has a scalar output");
    } else {
        i64 axis = c->attrs.i[0];
        if (axis < 0 || axis >= sa->ndim) return bad_shapes(what, "axis out of range");
        for (int i = 0; i < axis; i++) outer *= sa->dim[i];
        for (int i = (int)axis + 1; i < sa->ndim; i++) inner *= sa->dim[i];
        n = sa->dim[axis];
        if (numel(so) != outer * inner)
            return bad_shapes(what, "output size is not the operand's without the axis");
    }
    float scale = c->op != AP_OP_MEAN ? 1.0f : n > 0 ? (float)(1.0 / (double)n) : 0.0f;
    void *scratch = NULL;
    ap_status s = ap_cuda_scratch(ctx, (size_t)reduce_scratch(outer, n, inner) * 4, &scratch,
                                  what);
    if (s != AUTOPAR_OK) return s;
    return reduce_sum(ctx, what, (float *)c->out, plain_load{(const float *)c->src[0]}, outer,
                      n, inner, scale, (float *)scratch);
}

static ap_status run_mse_loss(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    i64 n = numel(&c->src_shape[0]);
    if (numel(&c->src_shape[1]) != n || numel(&c->out_shape) != 1)
        return bad_shapes(what, "want P and T of one size and a scalar output");
    void *scratch = NULL;
    ap_status s = ap_cuda_scratch(ctx, (size_t)reduce_scratch(1, n, 1) * 4, &scratch, what);
    if (s != AUTOPAR_OK) return s;
    sq_diff_load ld = {(const float *)c->src[0], (const float *)c->src[1]};
    return reduce_sum(ctx, what, (float *)c->out, ld, 1, n, 1,
                      n > 0 ? (float)(1.0 / (double)n) : 0.0f, (float *)scratch);
}

/* Scratch for one loss per row (*loss) and the reduction of their mean (*partial). */
static ap_status row_loss_scratch(ap_cuda_ctx *ctx, i64 rows, const char *what, float **loss,
                                  float **partial) {
    size_t losses = align256((size_t)rows * 4);
    void *scratch;
    ap_status s = ap_cuda_scratch(ctx, losses + (size_t)reduce_scratch(1, rows, 1) * 4,
                                  &scratch, what);
    if (s != AUTOPAR_OK) return s;
    *loss = (float *)scratch;
    *partial = (float *)((char *)scratch + losses);
    return AUTOPAR_OK;
}

/* out = the mean of the per-row losses (rows > 0), deterministically. */
static ap_status mean_of_row_losses(ap_cuda_ctx *ctx, const char *what, float *out,
                                    const float *loss, float *partial, i64 rows) {
    return reduce_sum(ctx, what, out, plain_load{loss}, 1, rows, 1, (float)(1.0 / (double)rows),
                      partial);
}

static ap_status run_cross_entropy(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    bool back = c->op == AP_OP_CROSS_ENTROPY_BACK;
    const ap_shape *sx = &c->src_shape[back ? 1 : 0], *sl = &c->src_shape[back ? 2 : 1];
    i64 V = last_dim(sx), n = numel(sx);
    i64 rows = V ? n / V : 0;
    if (sx->ndim < 1 || numel(sl) != rows || (back && numel(&c->src_shape[0]) != 1) ||
        numel(&c->out_shape) != (back ? n : 1))
        return bad_shapes(what, back ? "want (scalar dL, logits[..., V], labels[...]) and an "
                                       "output of the logits' size"
                                     : "want logits[..., V], labels[...] and a scalar output");
    ap_status s = check_rows(what, rows);
    if (s != AUTOPAR_OK) return s;
    if (V > INT_MAX) return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: V beyond INT_MAX", what);
    if (rows == 0 || V == 0) { /* zero rows: loss 0 (as on the CPU), empty gradient */
        if (!back) AP_CUDA_TRY(what, cudaMemsetAsync(c->out, 0, 4, ctx->stream));
        return AUTOPAR_OK;
    }
    int code = ap_cuda_flag_code(ctx, ap_op_name(c->op), c->name);
    if (back) {
        cross_entropy_back_kernel<<<(unsigned)rows, row_threads(V), 0, ctx->stream>>>(
            (float *)c->out, (const float *)c->src[0], (const float *)c->src[1],
            (const int *)c->src[2], V, (float)(1.0 / (double)rows), ctx->flag, code);
        AP_CUDA_LAUNCHED(what);
        return AUTOPAR_OK;
    }
    float *loss, *partial;
    if ((s = row_loss_scratch(ctx, rows, what, &loss, &partial)) != AUTOPAR_OK) return s;
    cross_entropy_kernel<<<(unsigned)rows, row_threads(V), 0, ctx->stream>>>(
        loss, (const float *)c->src[0], (const int *)c->src[1], V, ctx->flag, code);
    AP_CUDA_LAUNCHED(what);
    return mean_of_row_losses(ctx, what, (float *)c->out, loss, partial, rows);
}

static ap_status run_ce_parallel(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    ap_status s;
    if (c->op == AP_OP_CE_PARTIAL) {
        const ap_shape *sx = &c->src_shape[0];
        i64 Vl = last_dim(sx), rows = lead_rows(sx), v0 = c->attrs.i[0];
        i64 V = c->attrs.i[1];
        if (sx->ndim < 1 || numel(&c->src_shape[1]) != rows || numel(&c->out_shape) != 3 * rows)
            return bad_shapes(what, "want logits[..., Vl], labels[...] and an output [..., 3]");
        if (v0 < 0 || V < v0 + Vl || V > INT_MAX)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: columns [%lld, %lld) outside a "
                            "vocabulary of %lld", what, (long long)v0, (long long)(v0 + Vl),
                            (long long)V);
        if ((s = check_rows(what, rows)) != AUTOPAR_OK) return s;
        if (rows == 0) return AUTOPAR_OK; /* Vl == 0: rows of (-inf, 0, 0), as on the CPU */
        int code = ap_cuda_flag_code(ctx, ap_op_name(c->op), c->name);
        ce_partial_kernel<<<(unsigned)rows, row_threads(Vl), 0, ctx->stream>>>(
            (float *)c->out, (const float *)c->src[0], (const int *)c->src[1], Vl, v0, V,
            ctx->flag, code);
        AP_CUDA_LAUNCHED(what);
        return AUTOPAR_OK;
    }
    if (c->op == AP_OP_CE_COMBINE) {
        const ap_shape *sp = &c->src_shape[0];
        bool stats = c->attrs.i[0] == 1;
        i64 P = sp->ndim >= 2 ? sp->dim[0] : 0, rows = P ? numel(sp) / (3 * P) : 0;
        if (sp->ndim < 2 || last_dim(sp) != 3 || numel(&c->out_shape) != (stats ? 2 * rows : 1))
            return bad_shapes(what, "want parts [P, ..., 3] and a scalar or [..., 2] output");
        if (rows == 0) {
            if (!stats) AP_CUDA_TRY(what, cudaMemsetAsync(c->out, 0, 4, ctx->stream));
            return AUTOPAR_OK;
        }
        unsigned grid = (unsigned)((rows + BLOCK - 1) / BLOCK);
        if (stats) {
            ce_combine_kernel<<<grid, BLOCK, 0, ctx->stream>>>(NULL, (float *)c->out,
                                                                (const float *)c->src[0], P, rows);
            AP_CUDA_LAUNCHED(what);
            return AUTOPAR_OK;
        }
        float *loss, *partial;
        if ((s = row_loss_scratch(ctx, rows, what, &loss, &partial)) != AUTOPAR_OK) return s;
        ce_combine_kernel<<<grid, BLOCK, 0, ctx->stream>>>(loss, NULL, (const float *)c->src[0], P,
                                                            rows);
        AP_CUDA_LAUNCHED(what);
        return mean_of_row_losses(ctx, what, (float *)c->out, loss, partial, rows);
    }
    /* CE_BACK_PARTIAL: (dL, logits, labels, stats) */
    const ap_shape *sx = &c->src_shape[1];
    i64 Vl = last_dim(sx), n = numel(sx), rows = lead_rows(sx);
    if (sx->ndim < 1 || numel(&c->src_shape[0]) != 1 || numel(&c->src_shape[2]) != rows ||
        numel(&c->src_shape[3]) != 2 * rows || numel(&c->out_shape) != n)
        return bad_shapes(what, "want (scalar dL, logits[..., Vl], labels[...], stats[..., 2]) "
                                "and an output of the logits' size");
    if ((s = check_rows(what, rows)) != AUTOPAR_OK) return s;
    if (rows == 0 || Vl == 0) return AUTOPAR_OK;
    ce_back_partial_kernel<<<(unsigned)rows, row_threads(Vl), 0, ctx->stream>>>(
        (float *)c->out, (const float *)c->src[0], (const float *)c->src[1],
        (const int *)c->src[2], (const float *)c->src[3], Vl, c->attrs.i[0],
        (float)(1.0 / (double)rows));
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

static ap_status run_embedding(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    const ap_shape *st = &c->src_shape[0];
    i64 C = last_dim(st), rows = C ? numel(st) / C : 0, N = numel(&c->src_shape[1]);
    i64 v0 = c->attrs.i[1] > 0 ? c->attrs.i[0] : 0, V = c->attrs.i[1] > 0 ? c->attrs.i[1] : rows;
    if (numel(&c->out_shape) != N * C) return bad_shapes(what, "output is not ids' shape + [C]");
    if (V > INT_MAX) return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: V beyond INT_MAX", what);
    if (v0 < 0 || V < v0 + rows)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: table rows [%lld, %lld) outside a "
                        "vocabulary of %lld", what, (long long)v0, (long long)(v0 + rows),
                        (long long)V);
    if (N * C == 0) return AUTOPAR_OK;
    int code = ap_cuda_flag_code(ctx, ap_op_name(c->op), c->name);
    embedding_kernel<<<ap_cuda_grid(N * C, BLOCK), BLOCK, 0, ctx->stream>>>(
        (float *)c->out, (const float *)c->src[0], (const int *)c->src[1], N, C, (int)V, v0,
        rows, ctx->flag, code);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

static ap_status run_embedding_back(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    /* V and C from the output shape (ia[0] is not consulted, as on the CPU). */
    const ap_shape *so = &c->out_shape;
    i64 C = last_dim(so), V = C ? numel(so) / C : 0, N = numel(&c->src_shape[1]);
    if (numel(&c->src_shape[0]) != N * C) return bad_shapes(what, "dY is not ids' shape + [C]");
    if (V > INT_MAX - 1 || N > INT_MAX)
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: V or the id count beyond INT_MAX", what);
    if (V * C == 0) return AUTOPAR_OK;
    if (N == 0) {
        AP_CUDA_TRY(what, cudaMemsetAsync(c->out, 0, (size_t)(V * C) * 4, ctx->stream));
        return AUTOPAR_OK;
    }
    const int *ids = (const int *)c->src[1];
    size_t temp_bytes = 0;
    AP_CUDA_TRY(what, cub::DeviceRadixSort::SortPairs(NULL, temp_bytes, ids, (int *)NULL,
                                                      (const int *)NULL, (int *)NULL, (int)N, 0,
                                                      32, ctx->stream));
    size_t ints = align256((size_t)N * 4);
    void *scratch;
    ap_status s = ap_cuda_scratch(ctx, 3 * ints + temp_bytes, &scratch, what);
    if (s != AUTOPAR_OK) return s;
    int *pos_in = (int *)scratch, *keys = (int *)((char *)scratch + ints);
    int *pos = (int *)((char *)scratch + 2 * ints);
    void *temp = (char *)scratch + 3 * ints;
    int code = ap_cuda_flag_code(ctx, ap_op_name(c->op), c->name);
    iota_check_kernel<<<ap_cuda_grid(N, BLOCK), BLOCK, 0, ctx->stream>>>(pos_in, ids, (int)N,
                                                                        (int)V, ctx->flag, code);
    AP_CUDA_LAUNCHED(what);
    AP_CUDA_TRY(what, cub::DeviceRadixSort::SortPairs(temp, temp_bytes, ids, keys,
                                                      (const int *)pos_in, pos, (int)N, 0, 32,
                                                      ctx->stream));
    embedding_back_kernel<<<(unsigned)V, row_threads(C), 0, ctx->stream>>>(
        (float *)c->out, (const float *)c->src[0], keys, pos, (int)N, C);
    AP_CUDA_LAUNCHED(what);
    return AUTOPAR_OK;
}

ap_status ap_cuda_run_rows(ap_cuda_ctx *ctx, const ap_kernel_call *c, const char *what) {
    switch (c->op) {
    case AP_OP_LAYERNORM: return run_layernorm(ctx, c, what);
    case AP_OP_LAYERNORM_BACK: return run_layernorm_back(ctx, c, what);
    case AP_OP_LAYERNORM_BACK_GAIN: return run_layernorm_back_gain(ctx, c, what);
    case AP_OP_SOFTMAX: return run_softmax(ctx, c, what);
    case AP_OP_SOFTMAX_BACK: return run_softmax_back(ctx, c, what);
    case AP_OP_SUM: case AP_OP_MEAN: case AP_OP_SUM_TO: return run_sum(ctx, c, what);
    case AP_OP_MSE_LOSS: return run_mse_loss(ctx, c, what);
    case AP_OP_CROSS_ENTROPY: case AP_OP_CROSS_ENTROPY_BACK: return run_cross_entropy(ctx, c, what);
    case AP_OP_CE_PARTIAL: case AP_OP_CE_COMBINE: case AP_OP_CE_BACK_PARTIAL:
        return run_ce_parallel(ctx, c, what);
    case AP_OP_EMBEDDING: return run_embedding(ctx, c, what);
    case AP_OP_EMBEDDING_BACK: return run_embedding_back(ctx, c, what);
    default:
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: no CUDA kernel for this op", what);
    }
}
