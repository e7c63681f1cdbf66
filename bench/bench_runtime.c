/*
 * Distributed runtime benchmark: trains the MLP and a small GPT through sessions on as many MPI
 * ranks as it is started with, and prints (rank 0) per model: the plan shape, step time,
 * throughput, achieved GFLOP/s (autopar_session_flops_per_step), the step split into kernels /
 * communication / runtime overhead (autopar_session_stats_get), memory (predicted / measured
 * peak) and the plan's predicted step time next to the measured one.
 *
 *   mpirun -np 2 ./bench_runtime [--steps 10] [--warmup 2] [--model mlp|gpt|pipe|all]
 *                                [--cluster FILE.json] [--calibrate]
 *
 * Models: MLP dim 1024, global batch 2048, method data-parallel; GPT 2 layers, hidden 256,
 * 4 heads, seq 128, vocab 256, batch 16, method shard (the automatic intra-op plan, one stage);
 * "pipe" (2+ ranks, even count): the same MLP as a 2-stage 1F1B pipeline (layers 0-1 | 2-3 on
 * half the ranks each) over 4 micro-batches of 512 rows.
 * Plans are made for the "cpu" preset with one host of world-size devices (what the run uses);
 * --cluster FILE.json (world-size devices) adds a second prediction from that cluster.
 * --calibrate also measures this machine's figures for a cluster file: 1-thread sgemm GFLOP/s
 * (1024^3), memcpy bandwidth (64 MiB) and, with 2+ ranks, MPI all-reduce bus bandwidth (16 MiB).
 * Each model ends with one "RESULT key=value ..." line that scripts/bench-runtime.sh parses.
 * Exits 1 on a library error.
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime */

#include "autopar.h"
#include "models.h"

#include <cblas.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const char *method_name(autopar_method m) {
    switch (m) {
    case AUTOPAR_METHOD_PIPESHARD: return "auto";
    case AUTOPAR_METHOD_SHARD: return "shard";
    case AUTOPAR_METHOD_DATA_PARALLEL: return "data-parallel";
    case AUTOPAR_METHOD_ZERO2: return "zero2";
    default: return "?";
    }
}

/* Deterministic pseudo-random fill. */
static uint64_t rng(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

typedef struct bench_args {
    int steps, warmup;
    const char *model;
    const char *cluster;
    int calibrate;
} bench_args;

/* Plans g for cluster c with options o; returns the estimated step time (or -1). */
static double predict(const autopar_graph *g, const autopar_cluster *c, const autopar_options *o) {
    autopar_plan *p = NULL;
    if (autopar_parallelize(g, c, o, &p) != AUTOPAR_OK) return -1.0;
    autopar_plan_estimate e;
    double t = autopar_plan_get_estimate(p, &e) == AUTOPAR_OK ? e.step_time : -1.0;
    autopar_plan_free(p);
    return t;
}

/* Runs one model; returns 0 on success. */
static int run_model(const char *name, const bench_args *a, int rank, int size) {
    int rc = 1;
    autopar_graph *g = NULL;
    autopar_cluster *cl = NULL, *cl2 = NULL;
    autopar_plan *plan = NULL;
    autopar_session *sess = NULL;
    void *in0 = NULL, *in1 = NULL;
    const char *in0_name, *in1_name;
    int64_t n = 0, samples = 0, tokens = 0;
    autopar_method method;
    int is_gpt = !strcmp(name, "gpt");
    /* "pipe": the MLP as a 2-stage pipeline (layers 0-1 | 2-3, each stage on half the ranks,
     * logical mesh chosen by the pass), 4 micro-batches of 512 rows, 1F1B */
    int is_pipe = !strcmp(name, "pipe");
    enum { pipe_micro = 4 };
    autopar_manual_stage ms[2] = {{0, 1, 1, size / 2, 0, 0, -1}, {2, 3, 1, size / 2, 0, 0, -1}};

    mlp_config mc = {.batch = is_pipe ? 2048 / pipe_micro : 2048, .dim = 1024,
                     .mark_layers = is_pipe};
    gpt_config gc = {.layers = 2, .hidden = 256, .heads = 4, .seq = 128, .vocab = 256,
                     .batch = 16, .mark_layers = 0};
    autopar_tensor *loss = NULL;
    autopar_optimizer opt;
    autopar_optimizer_default(&opt);
    opt.lr = 1e-3f;

    if (autopar_graph_new(&g) != AUTOPAR_OK) goto fail;
    if (is_gpt) {
        if (model_gpt_build(g, &gc, &loss) != AUTOPAR_OK) goto fail;
        method = AUTOPAR_METHOD_SHARD;
        n = gc.batch * gc.seq;
        samples = gc.batch;
        tokens = n;
        in0_name = "tokens";
        in1_name = "targets";
        in0 = malloc((size_t)n * sizeof(int32_t));
        in1 = malloc((size_t)n * sizeof(int32_t));
        if (!in0 || !in1) goto fail;
        uint64_t s = 42;
        for (int64_t i = 0; i < n; i++) {
            ((int32_t *)in0)[i] = (int32_t)(rng(&s) % (uint64_t)gc.vocab);
            ((int32_t *)in1)[i] = (int32_t)(rng(&s) % (uint64_t)gc.vocab);
        }
    } else {
        if (model_mlp_build(g, &mc, &loss) != AUTOPAR_OK) goto fail;
        method = is_pipe ? AUTOPAR_METHOD_PIPESHARD : AUTOPAR_METHOD_DATA_PARALLEL;
        mlp_config global = mc;
        global.batch = 2048;
        n = global.batch * global.dim;
        samples = global.batch;
        tokens = 0;
        in0_name = "x";
        in1_name = "y";
        in0 = malloc((size_t)n * sizeof(float));
        in1 = malloc((size_t)n * sizeof(float));
        if (!in0 || !in1) goto fail;
        model_mlp_batch(&global, 1234, 42, 0, (float *)in0, (float *)in1);
    }
    if (autopar_build_training(g, loss, &opt) != AUTOPAR_OK) goto fail;
    if (autopar_cluster_preset("cpu", 1, size, &cl) != AUTOPAR_OK) goto fail;
    autopar_options o;
    autopar_options_default(&o);
    o.method = method;
    if (is_pipe) {
        o.num_micro_batches = pipe_micro;
        o.stage_option = AUTOPAR_STAGE_MANUAL;
        o.num_manual_stages = 2;
        o.manual_stages = ms;
    }
    if (autopar_parallelize(g, cl, &o, &plan) != AUTOPAR_OK) goto fail;
    autopar_plan_estimate est;
    if (autopar_plan_get_estimate(plan, &est) != AUTOPAR_OK) goto fail;
    double pred2 = -1.0;
    if (a->cluster) {
        if (autopar_cluster_load(a->cluster, &cl2) != AUTOPAR_OK) goto fail;
        pred2 = predict(g, cl2, &o);
        if (pred2 < 0) goto fail;
    }
    autopar_stage_info si;
    if (autopar_plan_stage_info(plan, 0, &si) != AUTOPAR_OK) goto fail;
    if (rank == 0) {
        printf("== %s on %d rank%s, method %s: %d stage(s), %d micro-batch(es)\n", name, size,
               size == 1 ? "" : "s", method_name(method), autopar_plan_num_stages(plan),
               autopar_plan_num_micro_batches(plan));
        autopar_plan_print(plan, stdout);
        fflush(stdout);
    }
    if (autopar_session_new(plan, AUTOPAR_BACKEND_AUTO, 42, &sess) != AUTOPAR_OK) goto fail;
    if (autopar_session_write_input(sess, in0_name, in0, n) != AUTOPAR_OK) goto fail;
    if (autopar_session_write_input(sess, in1_name, in1, n) != AUTOPAR_OK) goto fail;

    double lossv = 0.0;
    for (int i = 0; i < a->warmup; i++)
        if (autopar_session_step(sess, &lossv) != AUTOPAR_OK) goto fail;
    autopar_session_stats s0, s1;
    if (autopar_session_stats_get(sess, &s0) != AUTOPAR_OK) goto fail;
    double best = 1e30, total = 0.0;
    for (int i = 0; i < a->steps; i++) {
        double t0 = now_s();
        if (autopar_session_step(sess, &lossv) != AUTOPAR_OK) goto fail;
        double dt = now_s() - t0;
        total += dt;
        if (dt < best) best = dt;
    }
    if (autopar_session_stats_get(sess, &s1) != AUTOPAR_OK) goto fail;

    double per = total / a->steps;
    double st = (s1.step_seconds - s0.step_seconds) / a->steps;
    double kt = (s1.kernel_seconds - s0.kernel_seconds) / a->steps;
    double ct = (s1.comm_seconds - s0.comm_seconds) / a->steps;
    double ot = st - kt - ct;
    if (ot < 0) ot = 0;
    double call_oh = per - st;  /* session layer around ap_spmd_step */
    double overhead = ot + (call_oh > 0 ? call_oh : 0);
    double flops = autopar_session_flops_per_step(sess);
    if (rank == 0) {
        printf("%s: %d rank%s, %d timed steps (%d warm-up), loss %.5f\n", name, size,
               size == 1 ? "" : "s", a->steps, a->warmup, lossv);
        printf("  step        %.2f ms mean, %.2f ms best\n", 1e3 * per, 1e3 * best);
        printf("  throughput  %.0f samples/s", (double)samples / per);
        if (tokens) printf(", %.0f tokens/s", (double)tokens / per);
        printf("\n  achieved    %.2f GFLOP/s (%.3g FLOP/step)\n", flops / per * 1e-9, flops);
        printf("  split       kernels %.2f ms (%.1f%%), communication %.2f ms (%.1f%%), "
               "overhead %.3f ms (%.2f%%)\n", 1e3 * kt, 100 * kt / per, 1e3 * ct,
               100 * ct / per, 1e3 * overhead, 100 * overhead / per);
        printf("  collectives %d/step, %.2f MB sent+received/step\n", s1.n_collectives,
               s1.coll_bytes * 1e-6);
        printf("  memory      predicted peak %.1f MB, measured %.1f MB (rank 0); plan %.1f MB\n",
               s1.predicted_peak_bytes * 1e-6, s1.measured_peak_bytes * 1e-6,
               si.memory_bytes * 1e-6);
        printf("  predicted   %.2f ms (\"cpu\" preset: compute %.2f, comm %.2f, grad sync %.2f, "
               "apply %.2f) -> error %+.0f%%\n", 1e3 * est.step_time, 1e3 * est.compute,
               1e3 * est.communication, 1e3 * est.grad_sync, 1e3 * est.apply,
               100 * (est.step_time - per) / per);
        if (pred2 >= 0)
            printf("  predicted   %.2f ms (%s) -> error %+.0f%%\n", 1e3 * pred2, a->cluster,
                   100 * (pred2 - per) / per);
        printf("RESULT model=%s np=%d step_ms=%.3f best_ms=%.3f samples_s=%.1f tokens_s=%.1f "
               "gflops=%.3f kernel_ms=%.3f comm_ms=%.3f overhead_ms=%.3f overhead_pct=%.2f "
               "pred_ms=%.3f pred_err_pct=%.1f pred2_ms=%.3f pred2_err_pct=%.1f\n",
               name, size, 1e3 * per, 1e3 * best, (double)samples / per,
               (double)tokens / per, flops / per * 1e-9, 1e3 * kt, 1e3 * ct, 1e3 * overhead,
               100 * overhead / per, 1e3 * est.step_time, 100 * (est.step_time - per) / per,
               pred2 >= 0 ? 1e3 * pred2 : -1.0,
               pred2 >= 0 ? 100 * (pred2 - per) / per : 0.0);
        fflush(stdout);
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "bench_runtime: rank %d: %s: error: %s\n", rank, name, autopar_last_error());
done:
    free(in0);
    free(in1);
    autopar_session_free(sess);
    autopar_plan_free(plan);
    autopar_cluster_free(cl);
    autopar_cluster_free(cl2);
    autopar_graph_free(g);
    return rc;
}

/* Machine figures for a cluster file (rank 0 prints; every rank joins the MPI part). */
static void calibrate(int rank, int size) {
    const int nn = 1024;
    float *A = malloc((size_t)nn * nn * sizeof *A), *B = malloc((size_t)nn * nn * sizeof *B),
          *C = malloc((size_t)nn * nn * sizeof *C);
    size_t mb = (size_t)64 << 20;
    char *src = malloc(mb), *dst = malloc(mb);
    if (!A || !B || !C || !src || !dst) {
        fprintf(stderr, "bench_runtime: out of memory for calibration\n");
        goto out;
    }
    for (int i = 0; i < nn * nn; i++) A[i] = B[i] = (float)(i % 7) * 0.1f;
    double best = 1e30;
    for (int r = 0; r < 4; r++) {
        double t0 = now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nn, nn, nn, 1.0f, A, nn, B, nn,
                    0.0f, C, nn);
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    double gemm = 2.0 * nn * nn * (double)nn / best;
    memset(src, 1, mb);
    memset(dst, 0, mb);
    best = 1e30;
    for (int r = 0; r < 5; r++) {
        double t0 = now_s();
        memcpy(dst, src, mb);
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    double membw = 2.0 * (double)mb / best;  /* read + write */
    double busbw = 0.0, lat = 0.0;
    if (size > 1) {
        int cnt = 4 << 20;  /* 16 MiB of floats */
        MPI_Barrier(MPI_COMM_WORLD);
        best = 1e30;
        for (int r = 0; r < 5; r++) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = now_s();
            MPI_Allreduce(MPI_IN_PLACE, A, nn * nn < cnt ? nn * nn : cnt, MPI_FLOAT, MPI_SUM,
                          MPI_COMM_WORLD);
            double dt = now_s() - t0;
            if (dt < best) best = dt;
        }
        double bytes = (double)(nn * nn) * 4.0;
        busbw = 2.0 * (size - 1) / size * bytes / best;
        float one = 1.0f;
        best = 1e30;
        for (int r = 0; r < 50; r++) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = now_s();
            MPI_Allreduce(MPI_IN_PLACE, &one, 1, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
            double dt = now_s() - t0;
            if (dt < best) best = dt;
        }
        lat = best;
    }
    if (rank == 0) {
        printf("calibration: sgemm 1024^3 %.1f GFLOP/s (this process's BLAS threads), memcpy "
               "%.1f GB/s (read+write)", gemm * 1e-9, membw * 1e-9);
        if (size > 1)
            printf(", MPI all-reduce 4 MiB bus bandwidth %.2f GB/s, 4-byte latency %.1f us",
                   busbw * 1e-9, lat * 1e6);
        printf("\nCALIB gemm_flops=%.4g membw=%.4g busbw=%.4g latency=%.4g\n", gemm, membw,
               busbw, lat);
        fflush(stdout);
    }
out:
    free(A);
    free(B);
    free(C);
    free(src);
    free(dst);
}

int main(int argc, char **argv) {
    bench_args a = {.steps = 10, .warmup = 2, .model = "all", .cluster = NULL, .calibrate = 0};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--calibrate")) { a.calibrate = 1; continue; }
        if (i + 1 >= argc) { fprintf(stderr, "bench_runtime: missing value for %s\n", argv[i]); return 2; }
        const char *v = argv[++i];
        if (!strcmp(argv[i - 1], "--steps")) a.steps = atoi(v);
        else if (!strcmp(argv[i - 1], "--warmup")) a.warmup = atoi(v);
        else if (!strcmp(argv[i - 1], "--model")) a.model = v;
        else if (!strcmp(argv[i - 1], "--cluster")) a.cluster = v;
        else { fprintf(stderr, "bench_runtime: unknown flag %s\n", argv[i - 1]); return 2; }
    }
    if (a.steps <= 0 || a.warmup < 0) { fprintf(stderr, "bench_runtime: bad --steps/--warmup\n"); return 2; }
    int rank = 0, size = 1;
    if (autopar_world(&rank, &size) != AUTOPAR_OK) {
        fprintf(stderr, "bench_runtime: %s\n", autopar_last_error());
        return 1;
    }
    int rc = 0;
    if (a.calibrate) calibrate(rank, size);
    if (!strcmp(a.model, "mlp") || !strcmp(a.model, "all")) rc |= run_model("mlp", &a, rank, size);
    if (!rc && (!strcmp(a.model, "gpt") || !strcmp(a.model, "all")))
        rc |= run_model("gpt", &a, rank, size);
    if (!rc && size >= 2 && size % 2 == 0 && (!strcmp(a.model, "pipe") || !strcmp(a.model, "all")))
        rc |= run_model("pipe", &a, rank, size);
    autopar_finalize();
    return rc;
}
