/*
 * CUDA kernels: the same ops and semantics as the CPU kernels (runtime/cpu/kernels_cpu.h,
 * src/internal.h), on device buffers, float precision only. Included from C and CUDA.
 */
#ifndef AUTOPAR_KERNELS_CUDA_H
#define AUTOPAR_KERNELS_CUDA_H

#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Opaque per-rank CUDA context: device, stream, cuBLAS handle, scratch memory. */
typedef struct ap_cuda_ctx ap_cuda_ctx;

/* Number of visible CUDA devices (0 when none or when the driver is missing or too old). Never
 * fails and leaves autopar_last_error() alone. */
AP_INTERNAL int ap_cuda_device_count(void);
/* Why the last ap_cuda_device_count() returned 0 (the CUDA error, e.g. a driver older than the
 * toolkit); "" after it found devices. */
AP_INTERNAL const char *ap_cuda_no_device_reason(void);

/* Creates a context on device `device` with its own stream and cuBLAS handle. */
AP_INTERNAL ap_status ap_cuda_ctx_new(int device, ap_cuda_ctx **out);
AP_INTERNAL void ap_cuda_ctx_free(ap_cuda_ctx *ctx);

/* Device memory helpers (bytes); errors become AUTOPAR_ERR_BACKEND with the CUDA message. */
AP_INTERNAL ap_status ap_cuda_alloc(ap_cuda_ctx *ctx, size_t bytes, void **out);
AP_INTERNAL void      ap_cuda_free(ap_cuda_ctx *ctx, void *p);
AP_INTERNAL ap_status ap_cuda_upload(ap_cuda_ctx *ctx, void *dst, const void *src, size_t bytes);
AP_INTERNAL ap_status ap_cuda_download(ap_cuda_ctx *ctx, void *dst, const void *src, size_t bytes);
AP_INTERNAL ap_status ap_cuda_synchronize(ap_cuda_ctx *ctx);

/* Enqueues one op on ctx's stream (asynchronous; no host round trip). call->precision must be
 * AUTOPAR_PRECISION_F32 (else AUTOPAR_ERR_UNSUPPORTED). Buffers are device pointers. */
AP_INTERNAL ap_status ap_cuda_run(ap_cuda_ctx *ctx, const ap_kernel_call *call);

#ifdef __cplusplus
}
#endif

#endif
