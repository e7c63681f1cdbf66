/*
 * CUDA backend: device discovery, per-rank context (device, one stream, cuBLAS handle, scratch,
 * error flag), device memory and copies, synchronisation.
 *
 * Every CUDA / cuBLAS call goes through AP_CUDA_TRY / AP_CUBLAS_TRY (cuda_common.cuh), which turn
 * a failure into AUTOPAR_ERR_BACKEND with the error string, file:line and the tensor or function
 * at fault. Nothing here exits or aborts.
 */
#include "cuda_common.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                      */
/* ------------------------------------------------------------------------------------------ */

ap_status ap_cuda_fail(const char *what, const char *expr, const char *err_name,
                       const char *err_str, const char *file, int line) {
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    /* Name only the function called, not its (long) argument list. */
    const char *paren = strchr(expr, '(');
    int len = paren ? (int)(paren - expr) : (int)strlen(expr);
    return ap_error(AUTOPAR_ERR_BACKEND, "CUDA backend, %s: %.*s failed: %s: %s (%s:%d)",
                    what ? what : "?", len, expr, err_name ? err_name : "?",
                    err_str ? err_str : "?", base, line);
}

/* ------------------------------------------------------------------------------------------ */
/* Devices and contexts                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* Why the last ap_cuda_device_count() found none: a driver older than the toolkit must not read
 * like "no GPU" in skip messages. Written by every query, so not thread-safe: the runtime asks
 * for the count from each rank's main thread only. */
static char no_device_reason[256];

int ap_cuda_device_count(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* no driver / no device: clear the error, report none */
        snprintf(no_device_reason, sizeof no_device_reason, "cudaGetDeviceCount: %s: %s",
                 cudaGetErrorName(e), cudaGetErrorString(e));
        return 0;
    }
    if (n <= 0) {
        snprintf(no_device_reason, sizeof no_device_reason, "cudaGetDeviceCount: 0 devices");
        return 0;
    }
    no_device_reason[0] = '\0';
    return n;
}

const char *ap_cuda_no_device_reason(void) { return no_device_reason; }

/* Releases whatever part of a context was created; safe on a partly built one. */
static void ctx_destroy(ap_cuda_ctx *ctx) {
    if (!ctx) return;
    if (cudaSetDevice(ctx->device) == cudaSuccess) {
        if (ctx->scratch) {
            if (ctx->async_alloc) (void)cudaFreeAsync(ctx->scratch, ctx->stream);
            else (void)cudaFree(ctx->scratch);
        }
        if (ctx->stream) (void)cudaStreamSynchronize(ctx->stream);
        if (ctx->flag) (void)cudaFree(ctx->flag);
        if (ctx->blas) (void)cublasDestroy(ctx->blas);
        if (ctx->stream) (void)cudaStreamDestroy(ctx->stream);
    }
    (void)cudaGetLastError();
    free(ctx);
}

static ap_status ctx_init(ap_cuda_ctx *ctx) {
    const char *what = "ap_cuda_ctx_new";
    AP_CUDA_TRY(what, cudaSetDevice(ctx->device));
    AP_CUDA_TRY(what, cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking));
    AP_CUBLAS_TRY(what, cublasCreate(&ctx->blas));
    AP_CUBLAS_TRY(what, cublasSetStream(ctx->blas, ctx->stream));
    /* FP32 GEMMs in full single precision: CUBLAS_DEFAULT_MATH never uses TF32 tensor cores for
     * cublasSgemm* (that needs CUBLAS_TF32_TENSOR_OP_MATH), so results match the CPU kernels
     * within ~1e-5 relative. Atomics stay disallowed so GEMMs are bitwise reproducible. */
    AP_CUBLAS_TRY(what, cublasSetMathMode(ctx->blas, CUBLAS_DEFAULT_MATH));
    AP_CUBLAS_TRY(what, cublasSetAtomicsMode(ctx->blas, CUBLAS_ATOMICS_NOT_ALLOWED));
    AP_CUBLAS_TRY(what, cublasSetPointerMode(ctx->blas, CUBLAS_POINTER_MODE_HOST));
    int pools = 0;
    AP_CUDA_TRY(what, cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported,
                                             ctx->device));
    ctx->async_alloc = pools != 0;
    AP_CUDA_TRY(what, cudaMalloc((void **)&ctx->flag, sizeof(ap_cuda_flag)));
    AP_CUDA_TRY(what, cudaMemsetAsync(ctx->flag, 0, sizeof(ap_cuda_flag), ctx->stream));
    AP_CUDA_TRY(what, cudaStreamSynchronize(ctx->stream));
    return AUTOPAR_OK;
}

ap_status ap_cuda_ctx_new(int device, ap_cuda_ctx **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cuda_ctx_new: out is NULL");
    *out = NULL;
    int count = ap_cuda_device_count();
    if (count == 0)
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "ap_cuda_ctx_new: no CUDA device is available");
    if (device < 0 || device >= count)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "ap_cuda_ctx_new: device %d out of range (%d visible devices)", device,
                        count);
    ap_cuda_ctx *ctx = (ap_cuda_ctx *)calloc(1, sizeof(*ctx));
    if (!ctx) return ap_error(AUTOPAR_ERR_NOMEM, "ap_cuda_ctx_new: out of host memory");
    ctx->device = device;
    ap_status s = ctx_init(ctx);
    if (s != AUTOPAR_OK) {
        ctx_destroy(ctx);
        return s;
    }
    *out = ctx;
    return AUTOPAR_OK;
}

void ap_cuda_ctx_free(ap_cuda_ctx *ctx) { ctx_destroy(ctx); }

/* ------------------------------------------------------------------------------------------ */
/* Memory                                                                                      */
/* ------------------------------------------------------------------------------------------ */

ap_status ap_cuda_alloc(ap_cuda_ctx *ctx, size_t bytes, void **out) {
    if (!ctx || !out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cuda_alloc: NULL argument");
    *out = NULL;
    if (bytes == 0) return AUTOPAR_OK;
    char what[64];
    snprintf(what, sizeof what, "ap_cuda_alloc(%zu bytes)", bytes);
    AP_CUDA_TRY(what, cudaSetDevice(ctx->device));
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        /* an out-of-memory error is not sticky: clear it, so that the next CUDA call (a
         * smaller allocation, a kernel launch checked with cudaGetLastError) does not report
         * it again */
        (void)cudaGetLastError();
        return ap_cuda_fail(what, "cudaMalloc", cudaGetErrorName(e), cudaGetErrorString(e),
                            __FILE__, __LINE__);
    }
    *out = p;
    return AUTOPAR_OK;
}

void ap_cuda_free(ap_cuda_ctx *ctx, void *p) {
    if (!ctx || !p) return;
    /* cudaFree waits for the device, so kernels still using p finish first. */
    if (cudaSetDevice(ctx->device) == cudaSuccess) (void)cudaFree(p);
    (void)cudaGetLastError();
}

ap_status ap_cuda_scratch(ap_cuda_ctx *ctx, size_t bytes, void **out, const char *what) {
    if (bytes > ctx->scratch_bytes) {
        size_t grow = ctx->scratch_bytes + ctx->scratch_bytes / 2;
        size_t want = bytes > grow ? bytes : grow;
        want = (want + 0xFFFFF) & ~(size_t)0xFFFFF; /* whole MiB */
        if (ctx->async_alloc) {
            /* Stream-ordered: kernels already enqueued keep using the old block until done. */
            if (ctx->scratch) AP_CUDA_TRY(what, cudaFreeAsync(ctx->scratch, ctx->stream));
            ctx->scratch = NULL;
            ctx->scratch_bytes = 0;
            AP_CUDA_TRY(what, cudaMallocAsync(&ctx->scratch, want, ctx->stream));
        } else {
            AP_CUDA_TRY(what, cudaStreamSynchronize(ctx->stream));
            if (ctx->scratch) AP_CUDA_TRY(what, cudaFree(ctx->scratch));
            ctx->scratch = NULL;
            ctx->scratch_bytes = 0;
            AP_CUDA_TRY(what, cudaMalloc(&ctx->scratch, want));
        }
        ctx->scratch_bytes = want;
    }
    *out = ctx->scratch;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Copies and synchronisation                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Both copies are ordered on the context's stream (after every kernel enqueued before) and
 * return when the copy is complete, so the host buffer may be reused immediately. */
ap_status ap_cuda_upload(ap_cuda_ctx *ctx, void *dst, const void *src, size_t bytes) {
    if (!ctx) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cuda_upload: ctx is NULL");
    if (bytes == 0) return AUTOPAR_OK;
    if (!dst || !src) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cuda_upload: NULL buffer");
    const char *what = "ap_cuda_upload";
    AP_CUDA_TRY(what, cudaSetDevice(ctx->device));
    AP_CUDA_TRY(what, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx->stream));
    AP_CUDA_TRY(what, cudaStreamSynchronize(ctx->stream));
    return AUTOPAR_OK;
}

ap_status ap_cuda_download(ap_cuda_ctx *ctx, void *dst, const void *src, size_t bytes) {
    if (!ctx) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cuda_download: ctx is NULL");
    if (bytes == 0) return AUTOPAR_OK;
    if (!dst || !src) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cuda_download: NULL buffer");
    const char *what = "ap_cuda_download";
    AP_CUDA_TRY(what, cudaSetDevice(ctx->device));
    AP_CUDA_TRY(what, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx->stream));
    AP_CUDA_TRY(what, cudaStreamSynchronize(ctx->stream));
    return AUTOPAR_OK;
}

int ap_cuda_flag_code(ap_cuda_ctx *ctx, const char *op, const char *name) {
    ctx->flag_seq = ctx->flag_seq >= 1000000000 ? 1 : ctx->flag_seq + 1;
    int slot = ctx->flag_seq % AP_CUDA_FLAG_RING;
    snprintf(ctx->flag_names[slot], sizeof ctx->flag_names[slot], "%s", name ? name : "?");
    snprintf(ctx->flag_ops[slot], sizeof ctx->flag_ops[slot], "%s", op ? op : "?");
    return ctx->flag_seq;
}

/* Waits for the stream, then checks the device error flag: an out-of-range embedding id or
 * cross-entropy label seen by a kernel since the last call is reported here as
 * AUTOPAR_ERR_INVALID_ARG (kernels cannot report it synchronously without a host round trip).
 * The flag is cleared afterwards. */
ap_status ap_cuda_synchronize(ap_cuda_ctx *ctx) {
    if (!ctx) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cuda_synchronize: ctx is NULL");
    const char *what = "ap_cuda_synchronize";
    AP_CUDA_TRY(what, cudaSetDevice(ctx->device));
    AP_CUDA_TRY(what, cudaStreamSynchronize(ctx->stream));
    ap_cuda_flag f;
    AP_CUDA_TRY(what, cudaMemcpyAsync(&f, ctx->flag, sizeof f, cudaMemcpyDeviceToHost,
                                      ctx->stream));
    AP_CUDA_TRY(what, cudaStreamSynchronize(ctx->stream));
    if (f.code == 0) return AUTOPAR_OK;
    AP_CUDA_TRY(what, cudaMemsetAsync(ctx->flag, 0, sizeof(ap_cuda_flag), ctx->stream));
    AP_CUDA_TRY(what, cudaStreamSynchronize(ctx->stream));
    int slot = f.code % AP_CUDA_FLAG_RING;
    bool known = ctx->flag_seq - f.code < AP_CUDA_FLAG_RING && ctx->flag_seq >= f.code;
    return ap_error(AUTOPAR_ERR_INVALID_ARG,
                    "%s '%s': index %d out of range [0, %d) at position %lld (detected on the "
                    "CUDA device; reported at synchronisation)",
                    known ? ctx->flag_ops[slot] : "op", known ? ctx->flag_names[slot] : "?",
                    f.value, f.limit, f.position);
}
