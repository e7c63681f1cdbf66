/*
 * CPU backend: buffers are host memory, copies are memcpy/memset, kernels are the reference CPU
 * kernels (ap_cpu_run) in F32 or F64 precision. Everything is synchronous, so the optional
 * synchronize slot is left to its default.
 */
#include "backend.h"
#include "cpu/kernels_cpu.h"

#include <stdlib.h>
#include <string.h>

/* Cache-line alignment: enough for any element type and for vector loads in the kernels. */
#define CPU_ALIGN 64

static const char *cpu_name(void *ctx) {
    (void)ctx;
    return "cpu";
}

static void cpu_free(void *ctx) { (void)ctx; }

static ap_status cpu_buffer_alloc(void *ctx, size_t bytes, void **out) {
    (void)ctx;
    /* aligned_alloc wants a size that is a multiple of the alignment. */
    if (bytes > SIZE_MAX - CPU_ALIGN)
        return ap_error(AUTOPAR_ERR_NOMEM, "cpu backend: %zu bytes is too large", bytes);
    size_t rounded = (bytes + CPU_ALIGN - 1) / CPU_ALIGN * CPU_ALIGN;
    void *p = aligned_alloc(CPU_ALIGN, rounded);
    if (!p) return ap_error(AUTOPAR_ERR_NOMEM, "cpu backend: out of host memory (%zu bytes)", bytes);
    *out = p;
    return AUTOPAR_OK;
}

static void cpu_buffer_free(void *ctx, void *data) {
    (void)ctx;
    free(data);
}

static ap_status cpu_upload(void *ctx, void *dst, const void *host_src, size_t bytes) {
    (void)ctx;
    memcpy(dst, host_src, bytes);
    return AUTOPAR_OK;
}

static ap_status cpu_download(void *ctx, void *host_dst, const void *src, size_t bytes) {
    (void)ctx;
    memcpy(host_dst, src, bytes);
    return AUTOPAR_OK;
}

static ap_status cpu_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    memcpy(dst, src, bytes);
    return AUTOPAR_OK;
}

static ap_status cpu_fill_zero(void *ctx, void *dst, size_t bytes) {
    (void)ctx;
    memset(dst, 0, bytes);
    return AUTOPAR_OK;
}

static ap_status cpu_run(void *ctx, const ap_kernel_call *call) {
    (void)ctx;
    return ap_cpu_run(call);
}

static bool cpu_supports_op(void *ctx, ap_op op, autopar_precision p) {
    (void)ctx;
    (void)op; /* every computed op has a CPU kernel, in both precisions */
    return p == AUTOPAR_PRECISION_F32 || p == AUTOPAR_PRECISION_F64;
}

static const ap_backend_i cpu_iface = {
    .name = cpu_name,
    .free = cpu_free,
    .buffer_alloc = cpu_buffer_alloc,
    .buffer_free = cpu_buffer_free,
    .upload = cpu_upload,
    .download = cpu_download,
    .copy = cpu_copy,
    .fill_zero = cpu_fill_zero,
    .run = cpu_run,
    .supports_op = cpu_supports_op,
    .synchronize = NULL, /* every operation is complete on return */
};

ap_status ap_backend_cpu_new(ap_backend **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_backend_cpu_new: out is NULL");
    *out = NULL;
    ap_backend *b = calloc(1, sizeof *b);
    if (!b) return ap_error(AUTOPAR_ERR_NOMEM, "ap_backend_cpu_new: out of memory");
    b->iface = &cpu_iface;
    b->ctx = NULL; /* stateless */
    b->kind = AP_BACKEND_CPU;
    b->device = 0;
    *out = b;
    return AUTOPAR_OK;
}
