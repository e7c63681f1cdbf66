/*
 * CUDA kernels against the CPU reference: for every op with a kernel, random inputs (fixed
 * seed, odd sizes, broadcasting, transposes, causal softmax, rank-4 permute, chunked
 * reductions, repeated embedding ids, ...) go through ap_cpu_run (float precision) on host
 * buffers and ap_cuda_run on device copies; the results must agree within a per-case tolerance
 * |gpu - cpu| <= atol + rtol * |cpu|. Each case also runs twice on the GPU and must give
 * bitwise-identical results (the kernels are deterministic). Also checked: the device error
 * flag for an out-of-range embedding id / cross-entropy label, and the UNSUPPORTED answers.
 *
 * Exits 77 (skipped) when the CUDA backend is not built or no CUDA device is present.
 */
#include "internal.h"

#include <stdio.h>

#ifndef AUTOPAR_USE_CUDA

int main(void) {
    printf("CUDA backend not built: skipping\n");
    return 77;
}

#else

#include "cpu/kernels_cpu.h"
#include "cuda/kernels_cuda.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Random inputs                                                                               */
/* ------------------------------------------------------------------------------------------ */

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint32_t next_u32(void) { /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (uint32_t)((rng * 0x2545F4914F6CDD1Dull) >> 32);
}
static float frand(float lo, float hi) {
    return lo + (hi - lo) * (float)(next_u32() >> 8) / 16777216.0f;
}
static int irand(int lo, int hi) { return lo + (int)(next_u32() % (uint32_t)(hi - lo)); }

/* shp(ndim, d0, d1, ...) */
static ap_shape shp(int ndim, ...) {
    ap_shape s;
    memset(&s, 0, sizeof s);
    s.ndim = ndim;
    va_list ap;
    va_start(ap, ndim);
    for (int i = 0; i < ndim; i++) s.dim[i] = va_arg(ap, int);
    va_end(ap);
    return s;
}

/* ------------------------------------------------------------------------------------------ */
/* One test case: built with begin / src_* / attributes, then run by finish                    */
/* ------------------------------------------------------------------------------------------ */

static ap_kernel_call T;            /* the case being built (host buffers in T.src)          */
static const char *T_label;
static void *T_host[AP_MAX_SRC];
static int n_failed, n_run;

static void begin(ap_op op, const char *label, ap_shape out) {
    memset(&T, 0, sizeof T);
    memset(T_host, 0, sizeof T_host);
    T.op = op;
    T.precision = AUTOPAR_PRECISION_F32;
    T.out_shape = out;
    T.out_dtype = AUTOPAR_F32;
    T.name = label;
    T_label = label;
}

static void add_src(ap_shape s, ap_dtype dt, void *data) {
    int k = T.n_src++;
    T.src_shape[k] = s;
    T.src_dtype[k] = dt;
    T.src[k] = data;
    T_host[k] = data;
}

static float *src_f32(ap_shape s, float lo, float hi) {
    int64_t n = ap_shape_numel(&s);
    float *x = malloc((size_t)(n ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = frand(lo, hi);
    add_src(s, AUTOPAR_F32, x);
    return x;
}

static int32_t *src_i32(ap_shape s, int lo, int hi) {
    int64_t n = ap_shape_numel(&s);
    int32_t *x = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++) x[i] = irand(lo, hi);
    add_src(s, AUTOPAR_I32, x);
    return x;
}

static void free_case(void) {
    for (int k = 0; k < AP_MAX_SRC; k++) free(T_host[k]);
    memset(T_host, 0, sizeof T_host);
}

#define CHECK_OK(expr)                                                                          \
    do {                                                                                        \
        ap_status s_ = (expr);                                                                  \
        if (s_ != AUTOPAR_OK) {                                                                 \
            printf("FAIL %-30s %s: %s\n", T_label, #expr, autopar_last_error());                \
            ok = 0;                                                                             \
            goto done;                                                                          \
        }                                                                                       \
    } while (0)

/* Runs the case on the CPU and (twice) on the GPU and compares. */
static void finish(ap_cuda_ctx *ctx, double atol, double rtol) {
    int ok = 1;
    n_run++;
    int64_t n = ap_shape_numel(&T.out_shape);
    size_t out_bytes = (size_t)(n ? n : 1) * 4;
    float *ref = calloc(1, out_bytes), *gpu = calloc(1, out_bytes), *gpu2 = calloc(1, out_bytes);
    void *dsrc[AP_MAX_SRC] = {0};
    void *dout = NULL, *dout2 = NULL;
    ap_kernel_call cpu = T, dev = T;

    cpu.out = ref;
    CHECK_OK(ap_cpu_run(&cpu));

    for (int k = 0; k < T.n_src; k++) {
        size_t b = (size_t)ap_shape_numel(&T.src_shape[k]) * 4;
        CHECK_OK(ap_cuda_alloc(ctx, b, &dsrc[k]));
        CHECK_OK(ap_cuda_upload(ctx, dsrc[k], T.src[k], b));
        dev.src[k] = dsrc[k];
    }
    CHECK_OK(ap_cuda_alloc(ctx, out_bytes, &dout));
    CHECK_OK(ap_cuda_alloc(ctx, out_bytes, &dout2));
    dev.out = dout;
    CHECK_OK(ap_cuda_run(ctx, &dev));
    dev.out = dout2;
    CHECK_OK(ap_cuda_run(ctx, &dev));
    CHECK_OK(ap_cuda_synchronize(ctx));
    CHECK_OK(ap_cuda_download(ctx, gpu, dout, (size_t)n * 4));
    CHECK_OK(ap_cuda_download(ctx, gpu2, dout2, (size_t)n * 4));

    double max_abs = 0, max_rel = 0, worst = 0;
    int64_t worst_i = -1;
    for (int64_t i = 0; i < n; i++) {
        double r = ref[i], g = gpu[i], d = fabs(g - r);
        if (!isfinite(r) || !isfinite(g)) d = (isnan(r) && isnan(g)) || r == g ? 0 : INFINITY;
        if (d > max_abs) max_abs = d;
        if (fabs(r) > 1e-6 && d / fabs(r) > max_rel) max_rel = d / fabs(r);
        /* never NaN (inf / inf): a NaN worst would be overwritten by the next element */
        double ratio = d == 0 ? 0 : isinf(d) ? INFINITY : d / (atol + rtol * fabs(r));
        if (!(ratio <= worst)) {
            worst = ratio;
            worst_i = i;
        }
    }
    int same = memcmp(gpu, gpu2, (size_t)n * 4) == 0;
    ok = worst <= 1.0 && same;
    printf("%s %-30s n=%-7lld max_abs=%.2e max_rel=%.2e (atol %.0e, rtol %.0e)%s\n",
           ok ? "ok  " : "FAIL", T_label, (long long)n, max_abs, max_rel, atol, rtol,
           same ? "" : " NOT DETERMINISTIC");
    if (worst > 1.0 && worst_i >= 0)
        printf("     worst at %lld: cpu %.9g gpu %.9g\n", (long long)worst_i,
               (double)ref[worst_i], (double)gpu[worst_i]);
done:
    if (!ok) n_failed++;
    for (int k = 0; k < T.n_src; k++) ap_cuda_free(ctx, dsrc[k]);
    ap_cuda_free(ctx, dout);
    ap_cuda_free(ctx, dout2);
    free(ref);
    free(gpu);
    free(gpu2);
    free_case();
}

/* Tolerances (|gpu - cpu| <= atol + rtol |cpu|). Same-formula elementwise ops differ only by
 * rounding (FMA contraction, tanhf/expf ulps); products and reductions also by summation order. */
#define EW_ATOL 1e-6
#define EW_RTOL 1e-5
#define MM_ATOL 1e-5
#define MM_RTOL 1e-4
#define RED_ATOL 1e-5
#define RED_RTOL 1e-4

/* ------------------------------------------------------------------------------------------ */
/* Cases                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static void matmul_case(ap_cuda_ctx *ctx, const char *label, ap_shape a, ap_shape b, int ta,
                        int tb) {
    int64_t ca = a.dim[a.ndim - 1], ra = ap_shape_numel(&a) / ca;
    int64_t cb = b.dim[b.ndim - 1], rb = ap_shape_numel(&b) / cb;
    int64_t n = tb ? rb : cb;
    ap_shape out;
    if (ta) {
        out = shp(2, (int)ca, (int)n);
    } else {
        out = a;
        out.dim[out.ndim - 1] = n;
    }
    (void)ra;
    begin(AP_OP_MATMUL, label, out);
    src_f32(a, -1, 1);
    src_f32(b, -1, 1);
    T.attrs.i[0] = ta;
    T.attrs.i[1] = tb;
    finish(ctx, MM_ATOL, MM_RTOL);
}

static void bmm_case(ap_cuda_ctx *ctx, const char *label, ap_shape a, ap_shape b, int ta,
                     int tb) {
    ap_shape out = a;
    int nd = a.ndim;
    out.dim[nd - 2] = ta ? a.dim[nd - 1] : a.dim[nd - 2];
    out.dim[nd - 1] = tb ? b.dim[nd - 2] : b.dim[nd - 1];
    begin(AP_OP_BATCH_MATMUL, label, out);
    src_f32(a, -1, 1);
    src_f32(b, -1, 1);
    T.attrs.i[0] = ta;
    T.attrs.i[1] = tb;
    finish(ctx, MM_ATOL, MM_RTOL);
}

static void binary_case(ap_cuda_ctx *ctx, ap_op op, const char *label, ap_shape a, ap_shape b) {
    begin(op, label, a);
    src_f32(a, -2, 2);
    src_f32(b, -2, 2);
    finish(ctx, EW_ATOL, EW_RTOL);
}

static void unary_case(ap_cuda_ctx *ctx, ap_op op, const char *label, ap_shape a, double f0) {
    begin(op, label, a);
    src_f32(a, -4, 4);
    T.attrs.f[0] = f0;
    finish(ctx, EW_ATOL, EW_RTOL);
}

static void layernorm_cases(ap_cuda_ctx *ctx, const char *label, ap_shape x) {
    int64_t C = x.dim[x.ndim - 1];
    char l[64];
    snprintf(l, sizeof l, "layernorm %s", label);
    begin(AP_OP_LAYERNORM, l, x);
    src_f32(x, -3, 2);
    src_f32(shp(1, (int)C), 0.5f, 1.5f);
    src_f32(shp(1, (int)C), -0.5f, 0.5f);
    T.attrs.f[0] = 1e-5;
    finish(ctx, 1e-5, 1e-4);

    snprintf(l, sizeof l, "layernorm_back %s", label);
    begin(AP_OP_LAYERNORM_BACK, l, x);
    src_f32(x, -1, 1);
    src_f32(x, -3, 2);
    src_f32(shp(1, (int)C), 0.5f, 1.5f);
    T.attrs.f[0] = 1e-5;
    finish(ctx, 1e-5, 1e-4);

    snprintf(l, sizeof l, "layernorm_back_gain %s", label);
    begin(AP_OP_LAYERNORM_BACK_GAIN, l, shp(1, (int)C));
    src_f32(x, -1, 1);
    src_f32(x, -3, 2);
    T.attrs.f[0] = 1e-5;
    finish(ctx, 1e-4, 1e-4);
}

static void softmax_case(ap_cuda_ctx *ctx, const char *label, ap_shape x, int causal) {
    begin(AP_OP_SOFTMAX, label, x);
    src_f32(x, -5, 5);
    T.attrs.i[0] = causal;
    finish(ctx, 1e-6, 1e-4);
}

static void permute_case(ap_cuda_ctx *ctx, const char *label, ap_shape a, const int *perm) {
    ap_shape out = a;
    for (int i = 0; i < a.ndim; i++) out.dim[i] = a.dim[perm[i]];
    begin(AP_OP_PERMUTE, label, out);
    for (int i = 0; i < a.ndim; i++) T.attrs.i[i] = perm[i];
    src_f32(a, -1, 1);
    finish(ctx, 0, 0);
}

static void slice_case(ap_cuda_ctx *ctx, const char *label, ap_shape a, int axis, int start,
                       int len) {
    ap_shape out = a;
    out.dim[axis] = len;
    begin(AP_OP_SLICE, label, out);
    src_f32(a, -1, 1);
    T.attrs.i[0] = axis;
    T.attrs.i[1] = start;
    T.attrs.i[2] = len;
    finish(ctx, 0, 0);
}

static void slice_back_case(ap_cuda_ctx *ctx, const char *label, ap_shape dy, int axis,
                            int start, int full) {
    ap_shape out = dy;
    out.dim[axis] = full;
    begin(AP_OP_SLICE_BACK, label, out);
    src_f32(dy, -1, 1);
    T.attrs.i[0] = axis;
    T.attrs.i[1] = start;
    T.attrs.i[2] = full;
    finish(ctx, 0, 0);
}

static void concat_case(ap_cuda_ctx *ctx, const char *label, int axis, int n, const ap_shape *s) {
    ap_shape out = s[0];
    out.dim[axis] = 0;
    for (int k = 0; k < n; k++) out.dim[axis] += s[k].dim[axis];
    begin(AP_OP_CONCAT, label, out);
    for (int k = 0; k < n; k++) src_f32(s[k], -1, 1);
    T.attrs.i[0] = axis;
    finish(ctx, 0, 0);
}

static void reduce_case(ap_cuda_ctx *ctx, ap_op op, const char *label, ap_shape a, int axis,
                        double atol, double rtol) {
    ap_shape out;
    if (axis < 0) {
        out = shp(0);
    } else {
        out = shp(0);
        for (int i = 0; i < a.ndim; i++)
            if (i != axis) out.dim[out.ndim++] = a.dim[i];
    }
    begin(op, label, out);
    src_f32(a, -1, 1);
    T.attrs.i[0] = axis;
    finish(ctx, atol, rtol);
}

static void sum_to_case(ap_cuda_ctx *ctx, const char *label, ap_shape a, ap_shape out,
                        double atol) {
    begin(AP_OP_SUM_TO, label, out);
    src_f32(a, -1, 1);
    finish(ctx, atol, RED_RTOL);
}

static void expand_case(ap_cuda_ctx *ctx, const char *label, ap_shape a, ap_shape out, int axis,
                        double f) {
    begin(AP_OP_EXPAND, label, out);
    src_f32(a, -1, 1);
    T.attrs.i[0] = axis;
    T.attrs.f[0] = f;
    finish(ctx, EW_ATOL, EW_RTOL);
}

static void embedding_back_case(ap_cuda_ctx *ctx, const char *label, ap_shape ids, int V,
                                int C) {
    ap_shape dy = ids;
    dy.dim[dy.ndim++] = C;
    begin(AP_OP_EMBEDDING_BACK, label, shp(2, V, C));
    src_f32(dy, -1, 1);
    src_i32(ids, 0, V);
    T.attrs.i[0] = V;
    finish(ctx, 1e-5, 1e-5);
}

static void cross_entropy_cases(ap_cuda_ctx *ctx, const char *label, ap_shape logits) {
    ap_shape lab = logits;
    lab.ndim--;
    int V = (int)logits.dim[logits.ndim - 1];
    char l[64];
    snprintf(l, sizeof l, "cross_entropy %s", label);
    begin(AP_OP_CROSS_ENTROPY, l, shp(0));
    src_f32(logits, -4, 4);
    src_i32(lab, 0, V);
    finish(ctx, 1e-5, RED_RTOL);

    snprintf(l, sizeof l, "cross_entropy_back %s", label);
    begin(AP_OP_CROSS_ENTROPY_BACK, l, logits);
    src_f32(shp(0), 0.5f, 1.5f);
    src_f32(logits, -4, 4);
    src_i32(lab, 0, V);
    finish(ctx, 1e-7, 1e-4);
}

/* Vocabulary-parallel cross-entropy pieces: a device holding columns [v0, v0 + Vl) of V. */
static void ce_parallel_cases(ap_cuda_ctx *ctx, int rows, int Vl, int v0, int V, int P) {
    char l[80];
    snprintf(l, sizeof l, "ce_partial [%d,%d] cols %d.. of %d", rows, Vl, v0, V);
    begin(AP_OP_CE_PARTIAL, l, shp(2, rows, 3));
    src_f32(shp(2, rows, Vl), -4, 4);
    src_i32(shp(1, rows), v0 > 10 ? v0 - 10 : 0, v0 + Vl + 10 < V ? v0 + Vl + 10 : V);
    T.attrs.i[0] = v0;
    T.attrs.i[1] = V;
    finish(ctx, 1e-5, RED_RTOL);

    for (int mode = 0; mode < 2; mode++) {
        snprintf(l, sizeof l, "ce_combine %s P %d rows %d", mode ? "stats" : "loss", P, rows);
        begin(AP_OP_CE_COMBINE, l, mode ? shp(2, rows, 2) : shp(0));
        float *parts = src_f32(shp(3, P, rows, 3), -4, 4);
        for (int i = 0; i < P * rows; i++) parts[3 * i + 1] = 1.0f + fabsf(parts[3 * i + 1]) * 50;
        T.attrs.i[0] = mode;
        finish(ctx, 1e-5, RED_RTOL);
    }

    snprintf(l, sizeof l, "ce_back_partial [%d,%d] cols %d..", rows, Vl, v0);
    begin(AP_OP_CE_BACK_PARTIAL, l, shp(2, rows, Vl));
    src_f32(shp(0), 0.5f, 1.5f);
    src_f32(shp(2, rows, Vl), -4, 4);
    src_i32(shp(1, rows), v0 > 10 ? v0 - 10 : 0, v0 + Vl + 10 < V ? v0 + Vl + 10 : V);
    float *st = src_f32(shp(2, rows, 2), 3, 4);   /* m near the max, s >= Vl / e^8 */
    for (int r = 0; r < rows; r++) st[2 * r + 1] = (float)Vl * (1.0f + st[2 * r + 1]);
    T.attrs.i[0] = v0;
    finish(ctx, 1e-7, 1e-4);
}

/* An out-of-range id / label: the kernel runs, ap_cuda_synchronize reports INVALID_ARG naming
 * the tensor, and the flag is cleared afterwards. */
static void bad_index_case(ap_cuda_ctx *ctx, ap_op op) {
    const char *label = op == AP_OP_EMBEDDING ? "bad_embedding_id" : "bad_cross_entropy_label";
    int ok = 1;
    n_run++;
    T_label = label;
    ap_kernel_call c;
    memset(&c, 0, sizeof c);
    c.op = op;
    c.precision = AUTOPAR_PRECISION_F32;
    c.out_dtype = AUTOPAR_F32;
    c.name = label;
    c.n_src = 2;
    int32_t ids[5] = {0, 3, 7, 2, 1};
    float table[7 * 4];
    for (int i = 0; i < 7 * 4; i++) table[i] = (float)i;
    void *dtab = NULL, *dids = NULL, *dout = NULL;
    if (op == AP_OP_EMBEDDING) {
        c.out_shape = shp(2, 5, 4);
        c.src_shape[0] = shp(2, 7, 4);                 /* V = 7: id 7 is out of range */
    } else {
        ids[2] = -1;                                    /* label -1 */
        c.out_shape = shp(0);
        c.src_shape[0] = shp(2, 5, 7);
    }
    c.src_dtype[0] = AUTOPAR_F32;
    c.src_shape[1] = shp(1, 5);
    c.src_dtype[1] = AUTOPAR_I32;
    CHECK_OK(ap_cuda_alloc(ctx, sizeof table, &dtab));
    CHECK_OK(ap_cuda_alloc(ctx, sizeof ids, &dids));
    CHECK_OK(ap_cuda_alloc(ctx, 5 * 4 * 4, &dout));
    CHECK_OK(ap_cuda_upload(ctx, dtab, table, sizeof table));
    CHECK_OK(ap_cuda_upload(ctx, dids, ids, sizeof ids));
    c.src[0] = dtab;
    c.src[1] = dids;
    c.out = dout;
    CHECK_OK(ap_cuda_run(ctx, &c));
    ap_status s = ap_cuda_synchronize(ctx);
    const char *msg = autopar_last_error();
    if (s != AUTOPAR_ERR_INVALID_ARG || !msg || !strstr(msg, label)) {
        printf("FAIL %-30s synchronize returned %d (%s), want INVALID_ARG naming the tensor\n",
               label, (int)s, msg ? msg : "");
        ok = 0;
        goto done;
    }
    printf("ok   %-30s reported at synchronize: %s\n", label, msg);
    if (ap_cuda_synchronize(ctx) != AUTOPAR_OK) {
        printf("FAIL %-30s the flag was not cleared: %s\n", label, autopar_last_error());
        ok = 0;
    }
done:
    if (!ok) n_failed++;
    ap_cuda_free(ctx, dtab);
    ap_cuda_free(ctx, dids);
    ap_cuda_free(ctx, dout);
}

static void unsupported_cases(ap_cuda_ctx *ctx) {
    n_run++;
    ap_kernel_call c;
    memset(&c, 0, sizeof c);
    c.op = AP_OP_RELU;
    c.precision = AUTOPAR_PRECISION_F64;
    c.name = "f64_relu";
    c.n_src = 1;
    c.out_shape = c.src_shape[0] = shp(1, 3);
    ap_status s1 = ap_cuda_run(ctx, &c);
    c.op = AP_OP_INPUT;
    c.precision = AUTOPAR_PRECISION_F32;
    c.n_src = 0;
    c.name = "input_leaf";
    ap_status s2 = ap_cuda_run(ctx, &c);
    int ok = s1 == AUTOPAR_ERR_UNSUPPORTED && s2 == AUTOPAR_ERR_UNSUPPORTED;
    printf("%s %-30s f64 -> %d, INPUT leaf -> %d (want %d)\n", ok ? "ok  " : "FAIL",
           "unsupported", (int)s1, (int)s2, (int)AUTOPAR_ERR_UNSUPPORTED);
    if (!ok) n_failed++;
}

static void run_all(ap_cuda_ctx *ctx) {
    /* FILL */
    begin(AP_OP_FILL, "fill", shp(3, 3, 5, 7));
    T.attrs.f[0] = 1.25;
    finish(ctx, 0, 0);

    /* MATMUL: rank-3 A, all transposes, a larger product */
    matmul_case(ctx, "matmul nn", shp(3, 3, 5, 37), shp(2, 37, 29), 0, 0);
    matmul_case(ctx, "matmul nt", shp(3, 3, 5, 37), shp(2, 29, 37), 0, 1);
    matmul_case(ctx, "matmul tn", shp(3, 2, 19, 13), shp(2, 38, 21), 1, 0);
    matmul_case(ctx, "matmul tt", shp(3, 2, 19, 13), shp(2, 21, 38), 1, 1);
    matmul_case(ctx, "matmul 65x301x129", shp(2, 65, 301), shp(2, 301, 129), 0, 0);

    /* BATCH_MATMUL */
    bmm_case(ctx, "batch_matmul nn", shp(4, 2, 3, 17, 33), shp(4, 2, 3, 33, 19), 0, 0);
    bmm_case(ctx, "batch_matmul nt", shp(4, 2, 3, 17, 33), shp(4, 2, 3, 19, 33), 0, 1);
    bmm_case(ctx, "batch_matmul tn", shp(4, 2, 3, 33, 17), shp(4, 2, 3, 33, 19), 1, 0);
    bmm_case(ctx, "batch_matmul tt", shp(3, 4, 33, 17), shp(3, 4, 19, 33), 1, 1);

    /* ADD / SUB / MUL with suffix broadcasting */
    binary_case(ctx, AP_OP_ADD, "add bcast [35]", shp(3, 4, 6, 35), shp(1, 35));
    binary_case(ctx, AP_OP_ADD, "add bcast scalar", shp(2, 5, 9), shp(0));
    binary_case(ctx, AP_OP_SUB, "sub bcast [6,35]", shp(3, 4, 6, 35), shp(2, 6, 35));
    binary_case(ctx, AP_OP_SUB, "sub same", shp(2, 13, 11), shp(2, 13, 11));
    binary_case(ctx, AP_OP_MUL, "mul same", shp(3, 4, 6, 35), shp(3, 4, 6, 35));
    binary_case(ctx, AP_OP_MUL, "mul bcast [7]", shp(2, 9, 7), shp(1, 7));

    /* SCALE / RELU / GELU and backward */
    unary_case(ctx, AP_OP_SCALE, "scale", shp(2, 17, 23), 0.37);
    unary_case(ctx, AP_OP_RELU, "relu", shp(2, 17, 23), 0);
    unary_case(ctx, AP_OP_GELU, "gelu", shp(3, 3, 7, 41), 0);
    binary_case(ctx, AP_OP_RELU_BACK, "relu_back", shp(2, 17, 23), shp(2, 17, 23));
    binary_case(ctx, AP_OP_GELU_BACK, "gelu_back", shp(3, 3, 7, 41), shp(3, 3, 7, 41));

    /* LAYERNORM and both backward ops (small rows, 4 values per thread, 512-thread rows,
     * chunked gain reduction) */
    layernorm_cases(ctx, "[3,7,77]", shp(3, 3, 7, 77));
    layernorm_cases(ctx, "[4,1000]", shp(2, 4, 1000));
    layernorm_cases(ctx, "[3,8200]", shp(2, 3, 8200));
    layernorm_cases(ctx, "[300,40]", shp(2, 300, 40));

    /* SOFTMAX (plain, causal square, causal with more rows than columns, long rows) */
    softmax_case(ctx, "softmax [2,3,9,13]", shp(4, 2, 3, 9, 13), 0);
    softmax_case(ctx, "softmax causal [2,3,11,11]", shp(4, 2, 3, 11, 11), 1);
    softmax_case(ctx, "softmax causal [2,13,9]", shp(3, 2, 13, 9), 1);
    softmax_case(ctx, "softmax causal [3,5,40]", shp(3, 3, 5, 40), 1);
    softmax_case(ctx, "softmax [5,9000]", shp(2, 5, 9000), 0);
    begin(AP_OP_SOFTMAX, "softmax causal [2,5,40] query rows from 20", shp(3, 2, 5, 40));
    src_f32(shp(3, 2, 5, 40), -5, 5);
    T.attrs.i[0] = 1;
    T.attrs.i[1] = 20;
    finish(ctx, 1e-6, 1e-4);
    begin(AP_OP_SOFTMAX_BACK, "softmax_back", shp(4, 2, 3, 9, 13));
    src_f32(shp(4, 2, 3, 9, 13), 0, 1);
    src_f32(shp(4, 2, 3, 9, 13), -1, 1);
    finish(ctx, 1e-6, 1e-4);

    /* RESHAPE */
    begin(AP_OP_RESHAPE, "reshape", shp(2, 12, 5));
    src_f32(shp(3, 3, 4, 5), -1, 1);
    T.attrs.i[0] = 2;
    T.attrs.i[1] = 12;
    T.attrs.i[2] = 5;
    finish(ctx, 0, 0);

    /* PERMUTE */
    {
        const int p4[4] = {2, 0, 3, 1}, p3[3] = {2, 1, 0}, p2[2] = {1, 0}, p4b[4] = {0, 2, 1, 3};
        permute_case(ctx, "permute rank4 [2,0,3,1]", shp(4, 3, 4, 5, 6), p4);
        permute_case(ctx, "permute rank4 [0,2,1,3]", shp(4, 2, 7, 5, 9), p4b);
        permute_case(ctx, "permute rank3 [2,1,0]", shp(3, 5, 7, 9), p3);
        permute_case(ctx, "permute rank2", shp(2, 7, 11), p2);
    }

    /* SLICE / SLICE_BACK / CONCAT */
    slice_case(ctx, "slice axis1", shp(3, 3, 10, 7), 1, 2, 5);
    slice_case(ctx, "slice axis0", shp(2, 9, 4), 0, 3, 4);
    slice_case(ctx, "slice last axis", shp(3, 3, 4, 11), 2, 5, 6);
    slice_back_case(ctx, "slice_back axis1", shp(3, 3, 5, 7), 1, 2, 10);
    slice_back_case(ctx, "slice_back last axis", shp(3, 3, 4, 6), 2, 5, 11);
    slice_back_case(ctx, "slice_back axis0", shp(2, 4, 4), 0, 0, 9);
    {
        ap_shape a[3] = {shp(3, 3, 4, 7), shp(3, 3, 2, 7), shp(3, 3, 5, 7)};
        concat_case(ctx, "concat axis1 x3", 1, 3, a);
        ap_shape b[2] = {shp(2, 2, 5), shp(2, 3, 5)};
        concat_case(ctx, "concat axis0", 0, 2, b);
        ap_shape c[3] = {shp(2, 4, 3), shp(2, 4, 1), shp(2, 4, 6)};
        concat_case(ctx, "concat last axis", 1, 3, c);
    }

    /* EMBEDDING / EMBEDDING_BACK (many repeated ids; rows without ids) */
    begin(AP_OP_EMBEDDING, "embedding", shp(3, 3, 7, 24));
    src_f32(shp(2, 50, 24), -1, 1);
    src_i32(shp(2, 3, 7), 0, 50);
    finish(ctx, 0, 0);
    begin(AP_OP_EMBEDDING, "embedding rows [50,100) of 120", shp(3, 3, 7, 24));
    src_f32(shp(2, 50, 24), -1, 1);
    src_i32(shp(2, 3, 7), 30, 120);
    T.attrs.i[0] = 50;
    T.attrs.i[1] = 120;
    finish(ctx, 0, 0);
    embedding_back_case(ctx, "embedding_back V=10", shp(2, 3, 7), 10, 24);
    embedding_back_case(ctx, "embedding_back V=50", shp(2, 5, 33), 50, 16);
    embedding_back_case(ctx, "embedding_back 4096 ids V=100", shp(2, 8, 512), 100, 64);

    /* SUM / MEAN (every axis, all, long rows chunked, long columns chunked) */
    reduce_case(ctx, AP_OP_SUM, "sum axis0", shp(3, 4, 6, 35), 0, RED_ATOL, RED_RTOL);
    reduce_case(ctx, AP_OP_SUM, "sum axis1", shp(3, 4, 6, 35), 1, RED_ATOL, RED_RTOL);
    reduce_case(ctx, AP_OP_SUM, "sum axis2", shp(3, 4, 6, 35), 2, RED_ATOL, RED_RTOL);
    reduce_case(ctx, AP_OP_SUM, "sum all", shp(3, 4, 6, 35), -1, RED_ATOL, RED_RTOL);
    reduce_case(ctx, AP_OP_SUM, "sum all n=100003", shp(1, 100003), -1, 2e-3, 2e-4);
    reduce_case(ctx, AP_OP_SUM, "sum last axis [3,20000]", shp(2, 3, 20000), 1, 1e-3, 2e-4);
    reduce_case(ctx, AP_OP_SUM, "sum axis0 [700,90]", shp(2, 700, 90), 0, 1e-4, 2e-4);
    reduce_case(ctx, AP_OP_MEAN, "mean axis1", shp(3, 4, 6, 35), 1, RED_ATOL, RED_RTOL);
    reduce_case(ctx, AP_OP_MEAN, "mean axis2", shp(3, 4, 6, 35), 2, RED_ATOL, RED_RTOL);
    reduce_case(ctx, AP_OP_MEAN, "mean all n=100003", shp(1, 100003), -1, 1e-7, 2e-4);

    /* SUM_TO */
    sum_to_case(ctx, "sum_to [35]", shp(3, 4, 6, 35), shp(1, 35), RED_ATOL);
    sum_to_case(ctx, "sum_to [6,35]", shp(3, 4, 6, 35), shp(2, 6, 35), RED_ATOL);
    sum_to_case(ctx, "sum_to [17] from 3000 rows", shp(2, 3000, 17), shp(1, 17), 1e-3);
    sum_to_case(ctx, "sum_to same shape", shp(2, 5, 7), shp(2, 5, 7), RED_ATOL);

    /* EXPAND */
    expand_case(ctx, "expand axis1", shp(2, 4, 35), shp(3, 4, 6, 35), 1, 0.5);
    expand_case(ctx, "expand axis0", shp(2, 6, 35), shp(3, 4, 6, 35), 0, 1.0);
    expand_case(ctx, "expand last axis", shp(2, 4, 6), shp(3, 4, 6, 35), 2, 1.0 / 35);
    expand_case(ctx, "expand scalar", shp(0), shp(2, 3, 5), -1, 2.0);

    /* MSE_LOSS / MSE_LOSS_BACK */
    begin(AP_OP_MSE_LOSS, "mse_loss [7,33]", shp(0));
    src_f32(shp(2, 7, 33), -1, 1);
    src_f32(shp(2, 7, 33), -1, 1);
    finish(ctx, 1e-6, RED_RTOL);
    begin(AP_OP_MSE_LOSS, "mse_loss n=100003", shp(0));
    src_f32(shp(1, 100003), -1, 1);
    src_f32(shp(1, 100003), -1, 1);
    finish(ctx, 1e-6, 2e-4);
    begin(AP_OP_MSE_LOSS_BACK, "mse_loss_back", shp(2, 7, 33));
    src_f32(shp(0), 0.5f, 1.5f);
    src_f32(shp(2, 7, 33), -1, 1);
    src_f32(shp(2, 7, 33), -1, 1);
    finish(ctx, 1e-7, EW_RTOL);

    /* CROSS_ENTROPY / CROSS_ENTROPY_BACK */
    cross_entropy_cases(ctx, "[3,5,37]", shp(3, 3, 5, 37));
    cross_entropy_cases(ctx, "[6,9000]", shp(2, 6, 9000));
    ce_parallel_cases(ctx, 5, 37, 20, 77, 2);
    ce_parallel_cases(ctx, 6, 4500, 4500, 9000, 4);
    ce_parallel_cases(ctx, 3, 0, 7, 7, 2);   /* a device holding no columns: (-inf, 0, 0) rows */

    /* Optimizer updates */
    begin(AP_OP_SGD_UPDATE, "sgd_update", shp(1, 1001));
    src_f32(shp(1, 1001), -1, 1);
    src_f32(shp(1, 1001), -1, 1);
    T.attrs.f[0] = 0.1;
    T.attrs.f[1] = 0.01;
    finish(ctx, EW_ATOL, EW_RTOL);
    begin(AP_OP_MOMENTUM_UPDATE, "momentum_update", shp(1, 1001));
    src_f32(shp(1, 1001), -1, 1);
    src_f32(shp(1, 1001), -1, 1);
    T.attrs.f[0] = 0.9;
    finish(ctx, EW_ATOL, EW_RTOL);
    begin(AP_OP_ADAM_M, "adam_m", shp(2, 33, 31));
    src_f32(shp(2, 33, 31), -1, 1);
    src_f32(shp(2, 33, 31), -1, 1);
    T.attrs.f[0] = 0.9;
    finish(ctx, EW_ATOL, EW_RTOL);
    begin(AP_OP_ADAM_V, "adam_v", shp(2, 33, 31));
    src_f32(shp(2, 33, 31), 0, 1);
    src_f32(shp(2, 33, 31), -1, 1);
    T.attrs.f[0] = 0.999;
    finish(ctx, EW_ATOL, EW_RTOL);
    begin(AP_OP_ADAMW_UPDATE, "adamw_update step 3", shp(2, 33, 31));
    src_f32(shp(2, 33, 31), -1, 1);
    src_f32(shp(2, 33, 31), -0.1f, 0.1f);
    src_f32(shp(2, 33, 31), 0.001f, 0.01f);
    T.attrs.f[0] = 1e-3;
    T.attrs.f[1] = 0.9;
    T.attrs.f[2] = 0.999;
    T.attrs.f[3] = 1e-8;
    T.attrs.f[4] = 0.01;
    T.step = 3;
    finish(ctx, EW_ATOL, EW_RTOL);

    /* Errors */
    bad_index_case(ctx, AP_OP_EMBEDDING);
    bad_index_case(ctx, AP_OP_CROSS_ENTROPY);
    unsupported_cases(ctx);
}

int main(void) {
    if (ap_cuda_device_count() == 0) {
        printf("no CUDA device (%s): skipping\n", ap_cuda_no_device_reason());
        return 77;
    }
    ap_cuda_ctx *ctx = NULL;
    if (ap_cuda_ctx_new(0, &ctx) != AUTOPAR_OK) {
        printf("FAIL ap_cuda_ctx_new: %s\n", autopar_last_error());
        return 1;
    }
    run_all(ctx);
    ap_cuda_ctx_free(ctx);
    printf("%d of %d CUDA op checks passed\n", n_run - n_failed, n_run);
    return n_failed ? 1 : 0;
}

#endif /* AUTOPAR_USE_CUDA */
