/*
 * CUDA backend: the backend vtable (runtime/backend.h) over one ap_cuda_ctx (device, one stream,
 * cuBLAS handle, error flag; runtime/cuda/cuda_ctx.cu). Buffers are cudaMalloc'ed device memory;
 * kernels (ap_cuda_run), device-to-device copies and fills are enqueued on the context's stream
 * in call order, uploads and downloads wait for it. F32 precision only.
 *
 * Deferred errors: a kernel that finds an out-of-range embedding id or label raises the
 * context's device flag; ap_backend_synchronize (ap_cuda_synchronize) reports it, naming the
 * op and tensor. Asynchronous faults (illegal address, ...) surface at the next synchronising
 * call as AUTOPAR_ERR_BACKEND.
 */
#include "cuda_common.cuh"

extern "C" {
#include "backend.h"
}

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct cuda_backend {
    ap_cuda_ctx *cu;        /* owned */
    char         name[320]; /* "cuda:<device> (<device name>)" */
} cuda_backend;

static cuda_backend *cb(void *ctx) { return (cuda_backend *)ctx; }

static const char *cuda_name(void *ctx) { return cb(ctx)->name; }

static void cuda_free_backend(void *ctx) {
    cuda_backend *s = cb(ctx);
    if (!s) return;
    ap_cuda_ctx_free(s->cu); /* waits for the stream */
    free(s);
}

static ap_status cuda_buffer_alloc(void *ctx, size_t bytes, void **out) {
    ap_status st = ap_cuda_alloc(cb(ctx)->cu, bytes, out);
    /* A failed cudaMalloc is not a sticky error, but it stays the thread's "last error": clear
     * it, or the next kernel's launch check (cudaGetLastError) would report it again after the
     * caller recovered (e.g. by retrying with a smaller batch). */
    if (st != AUTOPAR_OK) (void)cudaGetLastError();
    return st;
}

static void cuda_buffer_free(void *ctx, void *data) { ap_cuda_free(cb(ctx)->cu, data); }

static ap_status cuda_upload(void *ctx, void *dst, const void *host_src, size_t bytes) {
    return ap_cuda_upload(cb(ctx)->cu, dst, host_src, bytes);
}

static ap_status cuda_download(void *ctx, void *host_dst, const void *src, size_t bytes) {
    return ap_cuda_download(cb(ctx)->cu, host_dst, src, bytes);
}

static ap_status cuda_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    ap_cuda_ctx *cu = cb(ctx)->cu;
    const char *what = "ap_backend_copy (cuda)";
    AP_CUDA_TRY(what, cudaSetDevice(cu->device));
    AP_CUDA_TRY(what, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cu->stream));
    return AUTOPAR_OK;
}

static ap_status cuda_fill_zero(void *ctx, void *dst, size_t bytes) {
    ap_cuda_ctx *cu = cb(ctx)->cu;
    const char *what = "ap_backend_fill_zero (cuda)";
    AP_CUDA_TRY(what, cudaSetDevice(cu->device));
    AP_CUDA_TRY(what, cudaMemsetAsync(dst, 0, bytes, cu->stream));
    return AUTOPAR_OK;
}

static ap_status cuda_run(void *ctx, const ap_kernel_call *call) {
    return ap_cuda_run(cb(ctx)->cu, call);
}

static bool cuda_supports_op(void *ctx, ap_op op, autopar_precision p) {
    (void)ctx;
    (void)op; /* every computed op has a CUDA kernel (test_cuda_ops covers each) */
    return p == AUTOPAR_PRECISION_F32;
}

static ap_status cuda_synchronize(void *ctx) { return ap_cuda_synchronize(cb(ctx)->cu); }

static const ap_backend_i cuda_iface = {
    /* .name        = */ cuda_name,
    /* .free        = */ cuda_free_backend,
    /* .buffer_alloc= */ cuda_buffer_alloc,
    /* .buffer_free = */ cuda_buffer_free,
    /* .upload      = */ cuda_upload,
    /* .download    = */ cuda_download,
    /* .copy        = */ cuda_copy,
    /* .fill_zero   = */ cuda_fill_zero,
    /* .run         = */ cuda_run,
    /* .supports_op = */ cuda_supports_op,
    /* .synchronize = */ cuda_synchronize,
};

ap_status ap_backend_cuda_new(int device, ap_backend **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_backend_cuda_new: out is NULL");
    *out = NULL;
    cuda_backend *s = (cuda_backend *)calloc(1, sizeof *s);
    ap_backend *b = (ap_backend *)calloc(1, sizeof *b);
    if (!s || !b) {
        free(s);
        free(b);
        return ap_error(AUTOPAR_ERR_NOMEM, "ap_backend_cuda_new: out of host memory");
    }
    ap_status st = ap_cuda_ctx_new(device, &s->cu); /* checks the device index */
    if (st != AUTOPAR_OK) {
        free(s);
        free(b);
        return st;
    }
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
        prop.name[sizeof prop.name - 1] = '\0';
        snprintf(s->name, sizeof s->name, "cuda:%d (%s)", device, prop.name);
    } else {
        (void)cudaGetLastError();
        snprintf(s->name, sizeof s->name, "cuda:%d", device);
    }
    b->iface = &cuda_iface;
    b->ctx = s;
    b->kind = AP_BACKEND_CUDA;
    b->device = device;
    *out = b;
    return AUTOPAR_OK;
}

struct ap_cuda_ctx *ap_backend_cuda_ctx(const ap_backend *b) {
    if (!b || b->kind != AP_BACKEND_CUDA || !b->ctx) return NULL;
    return cb(b->ctx)->cu;
}
