/*
 * Private declarations shared by the CUDA backend's translation units (the .cu files in
 * runtime/cuda): the context struct, error-checking macros, scratch memory and the device
 * error flag.
 * Never included from C.
 *
 * defines: struct ap_cuda_ctx, AP_CUDA_TRY, AP_CUBLAS_TRY, AP_CUDA_LAUNCHED, ap_cuda_scratch,
 *          ap_cuda_flag, ap_cuda_flag_code, ap_cuda_report_bad_index
 */
#ifndef AUTOPAR_CUDA_COMMON_CUH
#define AUTOPAR_CUDA_COMMON_CUH

/* internal.h is a C header without extern "C" guards. */
extern "C" {
#include "internal.h"
}
#include "kernels_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

/* Device-side record of the first out-of-range index (embedding id or cross-entropy label) seen
 * since the last ap_cuda_synchronize. code = 0: nothing happened; else the sequence number of the
 * launch that saw it (see ap_cuda_flag_code). The other fields are written by the thread that
 * won the atomicCAS on code; the host reads them after a stream synchronisation. */
typedef struct ap_cuda_flag {
    int       code;
    int       value;     /* the offending id / label                                            */
    int       limit;     /* valid range is [0, limit)                                           */
    int       pad;
    long long position;  /* flat index of the id / row of the label                             */
} ap_cuda_flag;

/* Names of the launches that may raise the flag, kept on the host in a ring so the message can
 * name the tensor without a device round trip at launch time. */
#define AP_CUDA_FLAG_RING 64

struct ap_cuda_ctx {
    int            device;
    cudaStream_t   stream;          /* the only stream: every kernel, copy and cuBLAS call     */
    cublasHandle_t blas;            /* bound to stream                                          */
    bool           async_alloc;     /* stream-ordered allocator available (cudaMallocAsync)    */
    void          *scratch;         /* grows on demand, never shrinks; stream-ordered           */
    size_t         scratch_bytes;
    ap_cuda_flag  *flag;            /* device memory, zeroed                                     */
    int            flag_seq;        /* last sequence number handed out (1-based, wraps)        */
    char           flag_names[AP_CUDA_FLAG_RING][AP_MAX_NAME];
    char           flag_ops[AP_CUDA_FLAG_RING][24];
};

/* Formats a failed CUDA / cuBLAS call as AUTOPAR_ERR_BACKEND (message: tensor name, the call,
 * the library's error string, file:line). Always returns AUTOPAR_ERR_BACKEND. */
AP_INTERNAL ap_status ap_cuda_fail(const char *what, const char *expr, const char *err_name,
                                   const char *err_str, const char *file, int line);

#define AP_CUDA_TRY(what, expr)                                                                 \
    do {                                                                                        \
        cudaError_t ap_e_ = (expr);                                                             \
        if (ap_e_ != cudaSuccess) {                                                             \
            (void)cudaGetLastError(); /* a non-sticky error must not fail the next launch */   \
            return ap_cuda_fail((what), #expr, cudaGetErrorName(ap_e_),                         \
                                cudaGetErrorString(ap_e_), __FILE__, __LINE__);                 \
        }                                                                                       \
    } while (0)

#define AP_CUBLAS_TRY(what, expr)                                                               \
    do {                                                                                        \
        cublasStatus_t ap_s_ = (expr);                                                          \
        if (ap_s_ != CUBLAS_STATUS_SUCCESS)                                                     \
            return ap_cuda_fail((what), #expr, "cuBLAS", cublasGetStatusString(ap_s_),          \
                                __FILE__, __LINE__);                                            \
    } while (0)

/* After a kernel launch: reports launch-configuration errors (asynchronous faults surface at
 * ap_cuda_synchronize / ap_cuda_download). */
#define AP_CUDA_LAUNCHED(what) AP_CUDA_TRY((what), cudaGetLastError())

/* Returns a device buffer of at least `bytes` bytes, valid for kernels enqueued on ctx->stream
 * until the next call (it may be reallocated, stream-ordered, by the next request). */
AP_INTERNAL ap_status ap_cuda_scratch(ap_cuda_ctx *ctx, size_t bytes, void **out,
                                      const char *what);

/* Registers a launch that may raise the error flag; returns its code (> 0) for the kernel. */
AP_INTERNAL int ap_cuda_flag_code(ap_cuda_ctx *ctx, const char *op, const char *name);

/* Called by a kernel thread that found index `value` outside [0, limit) at `position`. */
__device__ __forceinline__ void ap_cuda_report_bad_index(ap_cuda_flag *f, int code, int value,
                                                         int limit, long long position) {
    if (atomicCAS(&f->code, 0, code) == 0) {
        f->value = value;
        f->limit = limit;
        f->position = position;
    }
}

/* Runs the row-wise, reduction, loss and embedding ops (kernels_cuda_rows.cu): LAYERNORM*,
 * SOFTMAX*, SUM, MEAN, SUM_TO, MSE_LOSS, CROSS_ENTROPY*, EMBEDDING*. The caller
 * (ap_cuda_run) has already checked precision, operand count, dtypes and non-NULL buffers. */
AP_INTERNAL ap_status ap_cuda_run_rows(ap_cuda_ctx *ctx, const ap_kernel_call *c,
                                       const char *what);

/* Shared helpers for the kernel files. */
typedef int64_t i64;
#define AP_CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

/* for (i64 i = global thread index; i < n; i += total threads) */
#define AP_GRID_LOOP(i, n)                                                                      \
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (n);                           \
         i += (i64)gridDim.x * blockDim.x)

/* Grid for a grid-stride loop over n elements with `block` threads per block. */
static inline unsigned ap_cuda_grid(i64 n, int block) {
    i64 g = AP_CEIL_DIV(n, (i64)block);
    if (g > (1 << 20)) g = 1 << 20;
    return g < 1 ? 1u : (unsigned)g;
}

#endif
