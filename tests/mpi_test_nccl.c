/*
 * NCCL communicators (runtime/cuda/comm_nccl.cu) under mpirun: the suite of mpi_test_comm.c
 * (every collective and point-to-point operation on the world and on split groups, f32/f64/i32/u8,
 * exact comparisons with locally computed values, deterministic mode bit for bit, ring and chain
 * exchanges, agreement helpers, argument errors) on device buffers, one GPU per rank
 * (ap_comm_local_device), operations enqueued on the CUDA context's stream.
 *
 * Exits 77 (skipped) when the CUDA backend is not built, when no CUDA device is present, or when
 * a host runs more ranks than it has GPUs (NCCL needs one GPU per rank; every rank agrees on it).
 */
#include "internal.h"

#include <stdio.h>

#ifndef AUTOPAR_USE_CUDA

int main(void) {
    printf("CUDA backend not built: skipping\n");
    return 77;
}

#else

#define COMM_TEST_NO_MAIN
#include "mpi_test_comm.c"

#include "cuda/kernels_cuda.h"

static ap_status dev_alloc(void *ctx, size_t bytes, void **out) {
    return ap_cuda_alloc((ap_cuda_ctx *)ctx, bytes, out);
}
static void dev_release(void *ctx, void *p) { ap_cuda_free((ap_cuda_ctx *)ctx, p); }
/* Both copies are ordered on the context's stream, after the NCCL operations enqueued there,
 * and wait for completion. */
static ap_status dev_upload(void *ctx, void *dst, const void *src, size_t bytes) {
    return ap_cuda_upload((ap_cuda_ctx *)ctx, dst, src, bytes);
}
static ap_status dev_download(void *ctx, void *dst, const void *src, size_t bytes) {
    return ap_cuda_download((ap_cuda_ctx *)ctx, dst, src, bytes);
}

int main(void) {
    const int devices = ap_cuda_device_count();
    if (devices == 0) {
        printf("no CUDA device (%s): skipping\n", ap_cuda_no_device_reason());
        return 77;
    }
    ap_comm *world = NULL;
    ap_status s = ap_comm_world(&world);
    if (s != AUTOPAR_OK) {
        fprintf(stderr, "ap_comm_world: %s: %s\n", autopar_status_str(s), autopar_last_error());
        return 1;
    }
    g_world_rank = ap_comm_world_rank(world);

    ap_cuda_ctx *cuda = NULL;
    s = ap_comm_all_ok(world, ap_cuda_ctx_new(ap_comm_local_device(world, devices), &cuda));
    ap_comm *nccl = NULL;
    if (s == AUTOPAR_OK) s = ap_comm_nccl_new(world, cuda, &nccl);
    if (s != AUTOPAR_OK) {
        int code = s == AUTOPAR_ERR_UNSUPPORTED ? 77 : 1;
        if (g_world_rank == 0)
            printf("%s: %s\n", code == 77 ? "skipping" : "FAIL", autopar_last_error());
        ap_cuda_ctx_free(cuda);
        ap_comm_free(world);
        return code;
    }
    EXPECT(strcmp(ap_comm_backend_name(nccl), "nccl") == 0 && ap_comm_device_buffers(nccl),
           "NCCL backend reports %s", ap_comm_backend_name(nccl));
    EXPECT(ap_comm_rank(nccl) == ap_comm_rank(world) && ap_comm_size(nccl) == ap_comm_size(world),
           "NCCL world is rank %d of %d", ap_comm_rank(nccl), ap_comm_size(nccl));

    const test_mem dev = {cuda, dev_alloc, dev_release, dev_upload, dev_download};
    test_world_info(world);
    run_suite(nccl, &dev);

    int total = total_failures(world);
    if (g_world_rank == 0)
        printf("mpi_test_nccl: %d ranks, %d failure%s\n", ap_comm_size(world), total,
               total == 1 ? "" : "s");
    ap_comm_free(nccl);
    ap_cuda_ctx_free(cuda);
    ap_comm_free(world);
    return total == 0 ? 0 : 1;
}

#endif
