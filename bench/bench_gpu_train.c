/*
 * Training-step throughput on one GPU: the graph runner (runtime/graph_runner.h) on the CUDA
 * backend runs whole AdamW training steps (forward + backward + update, one kernel per graph
 * node, one host synchronisation and one loss download per step) of
 *   - GPT-2 124M: 12 layers, hidden 768, 12 heads, seq 1024, vocab 50257 (tied LM head),
 *     random tokens, batch --gpt-batch (default 8; halved until the graph fits in memory);
 *   - the MLP of examples/models.h with dim 1024, batch 2048.
 *
 *   ./bench_gpu_train [--model all|gpt|mlp] [--steps 10] [--warmup 2] [--device 0]
 *                     [--gpt-batch 8] [--gpt-seq 1024] [--gpt-layers 12] [--gpt-hidden 768]
 *                     [--gpt-heads 12] [--gpt-vocab 50257] [--mlp-dim 1024] [--mlp-batch 2048]
 *                     [--peak-tflops X] [--backend cuda|cpu]
 *
 * Printed per model: ms/step (fastest of --steps timed steps after --warmup untimed ones, and the
 * mean), tokens/s (GPT; samples/s for the MLP), model TFLOP per step and achieved TFLOP/s, and
 * the model-FLOPs utilisation (MFU) against the GPU's peak.
 *
 * FLOPs (matrix products only, a multiply-add = 2 FLOPs, backward = 2x forward):
 *   GPT, M = B*T tokens: 6*M*(12*L*C^2 + C*V) + 12*L*B*T^2*C (the PaLM / llm.c estimate; the
 *     causal mask is not discounted, layernorm/softmax/GELU/AdamW are not counted).
 *   MLP, batch B, dim D: 88*B*D^2 (layers D->4D->D->4D->D; no input gradient for layer 0).
 *
 * Peak: our kernels run in FP32 (cuBLAS SGEMM with CUBLAS_DEFAULT_MATH, i.e. no TF32 tensor
 * cores: runtime/cuda/cuda_ctx.cu), so MFU is reported against the GPU's dense FP32 (non-tensor)
 * peak from NVIDIA's datasheets: H100 SXM / H200 / GH200 66.9 TFLOP/s (BF16 dense 989), H100
 * PCIe 51.2 (756), H100/H200 NVL 60 (835), A100 19.5 (312). The BF16 figure is printed only to
 * put llm.c's BF16 numbers in context. Unknown GPUs: pass --peak-tflops (FP32).
 *
 * Reference figure (llm.c, karpathy/llm.c scripts/run_gpt2_124M.sh): GPT-2 124M, BF16 with cuDNN
 * flash attention, B=64 x T=1024 per GPU, "8X A100 80GB SXM ... ~300ms/iter" for 524,288-token
 * steps, i.e. about 218K tokens/s per A100; discussion #481 calls this "up to ~60% model flops
 * utilization". We found no published single-H100 llm.c figure, so none is printed.
 *
 * --backend cpu runs the same flow on the CPU backend: a dry run of this program on machines
 * without a GPU (use small --gpt-* / --mlp-* sizes; MFU needs --peak-tflops there).
 * Without a CUDA backend or device it prints "no CUDA device" and exits 0. Exit 1 on a library
 * error (printing autopar_last_error()), 2 on bad flags.
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime */

#include "autopar.h"
#include "backend.h"
#include "graph_runner.h"
#include "models.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* llm.c's published GPT-2 124M throughput (see the top of this file). */
#define LLMC_TOKENS_PER_STEP   524288.0
#define LLMC_SECONDS_PER_STEP  0.300
#define LLMC_GPUS              8.0
#define LLMC_TOKENS_PER_S_GPU  (LLMC_TOKENS_PER_STEP / LLMC_SECONDS_PER_STEP / LLMC_GPUS)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------------------------------ */
/* Peaks                                                                                       */
/* ------------------------------------------------------------------------------------------ */

typedef struct gpu_peak {
    const char *match;       /* substring of the device name; first match wins               */
    const char *label;
    double      fp32_tflops; /* dense FP32, CUDA cores                                        */
    double      bf16_tflops; /* dense BF16 tensor cores (no sparsity)                         */
} gpu_peak;

static const gpu_peak peaks[] = {
    {"GH200", "GH200", 67.0, 989.0},
    {"H200 NVL", "H200 NVL", 60.0, 835.0},
    {"H200", "H200 SXM", 66.9, 989.0},
    {"H100 PCIe", "H100 PCIe", 51.2, 756.0},
    {"H100 NVL", "H100 NVL", 60.0, 835.0},
    {"H100", "H100 SXM", 66.9, 989.0},
    {"A100", "A100", 19.5, 312.0},
};

static const gpu_peak *find_peak(const char *device_name) {
    for (size_t i = 0; i < sizeof peaks / sizeof peaks[0]; i++)
        if (strstr(device_name, peaks[i].match)) return &peaks[i];
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Options                                                                                     */
/* ------------------------------------------------------------------------------------------ */

typedef struct opts {
    const char *model;
    bool        cpu;          /* --backend cpu: the same flow on the CPU backend (dry run) */
    int         steps, warmup, device;
    gpt_config  gpt;
    mlp_config  mlp;
    double      peak_tflops;  /* FP32 override, 0 = from the table */
} opts;

static int parse(int argc, char **argv, opts *o) {
    *o = (opts){.model = "all", .steps = 10, .warmup = 2, .device = 0,
                .gpt = {.layers = 12, .hidden = 768, .heads = 12, .seq = 1024, .vocab = 50257,
                        .batch = 8, .mark_layers = 0},
                .mlp = {.batch = 2048, .dim = 1024, .mark_layers = 0}};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) {
            fprintf(stderr, "bench_gpu_train: %s needs a value\n", a);
            return 2;
        }
        const char *v = argv[++i];
        long long n = atoll(v);
        if (!strcmp(a, "--model")) o->model = v;
        else if (!strcmp(a, "--backend") && (!strcmp(v, "cpu") || !strcmp(v, "cuda")))
            o->cpu = !strcmp(v, "cpu");
        else if (!strcmp(a, "--steps")) o->steps = (int)n;
        else if (!strcmp(a, "--warmup")) o->warmup = (int)n;
        else if (!strcmp(a, "--device")) o->device = (int)n;
        else if (!strcmp(a, "--gpt-batch")) o->gpt.batch = n;
        else if (!strcmp(a, "--gpt-seq")) o->gpt.seq = n;
        else if (!strcmp(a, "--gpt-layers")) o->gpt.layers = (int)n;
        else if (!strcmp(a, "--gpt-hidden")) o->gpt.hidden = n;
        else if (!strcmp(a, "--gpt-heads")) o->gpt.heads = (int)n;
        else if (!strcmp(a, "--gpt-vocab")) o->gpt.vocab = n;
        else if (!strcmp(a, "--mlp-dim")) o->mlp.dim = n;
        else if (!strcmp(a, "--mlp-batch")) o->mlp.batch = n;
        else if (!strcmp(a, "--peak-tflops")) o->peak_tflops = atof(v);
        else {
            fprintf(stderr, "bench_gpu_train: unknown flag %s\n", a);
            return 2;
        }
    }
    if (o->steps < 1 || o->warmup < 0 || o->gpt.batch < 1 || o->mlp.batch < 1 ||
        (strcmp(o->model, "all") && strcmp(o->model, "gpt") && strcmp(o->model, "mlp"))) {
        fprintf(stderr, "bench_gpu_train: bad flag values\n");
        return 2;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Timing                                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct timing {
    double best_s, mean_s, first_loss, last_loss;
} timing;

/* Writes the inputs each step (as a training loop would: a few KB), runs warmup + timed steps.
 * Returns 0, or 1 on a library error (message printed). */
static int time_steps(ap_graph_runner *r, const opts *o, int n_inputs, autopar_tensor **in,
                      void **data, const int64_t *count, timing *t) {
    t->best_s = INFINITY;
    double total = 0.0;
    for (int i = 0; i < o->warmup + o->steps; i++) {
        double loss = NAN, t0 = now_s();
        for (int k = 0; k < n_inputs; k++)
            if (ap_graph_runner_write(r, in[k], data[k], count[k]) != AUTOPAR_OK) goto fail;
        if (ap_graph_runner_step(r, &loss) != AUTOPAR_OK) goto fail;
        double dt = now_s() - t0;
        if (i == 0) t->first_loss = loss;
        t->last_loss = loss;
        if (i < o->warmup) continue;
        total += dt;
        if (dt < t->best_s) t->best_s = dt;
    }
    t->mean_s = total / o->steps;
    return 0;
fail:
    fprintf(stderr, "bench_gpu_train: %s\n", autopar_last_error());
    return 1;
}

static void print_mfu(const char *what, double flops, double step_s, const gpu_peak *pk,
                      double peak_override, double *mfu_out) {
    double rate = flops / step_s;
    *mfu_out = NAN;
    printf("%s: %.3f TFLOP/step, %.2f TFLOP/s achieved\n", what, flops * 1e-12, rate * 1e-12);
    double fp32 = peak_override > 0 ? peak_override : pk ? pk->fp32_tflops : 0.0;
    if (fp32 > 0) {
        *mfu_out = rate / (fp32 * 1e12);
        printf("%s: MFU %.1f%% of the FP32 peak %.1f TFLOP/s (%s; our kernels are FP32)\n", what,
               100.0 * *mfu_out, fp32, peak_override > 0 ? "--peak-tflops" : pk->label);
    } else {
        printf("%s: MFU not computed: unknown GPU, pass --peak-tflops <FP32 TFLOP/s>\n", what);
    }
    if (pk)
        printf("%s: for context only: %.1f%% of the %s BF16 dense peak %.0f TFLOP/s\n", what,
               100.0 * rate / (pk->bf16_tflops * 1e12), pk->label, pk->bf16_tflops);
}

/* ------------------------------------------------------------------------------------------ */
/* Models                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static autopar_optimizer adamw(void) {
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    o.kind = AUTOPAR_OPT_ADAMW;
    o.lr = 3e-4f;
    o.weight_decay = 0.1f;
    return o;
}

static int64_t count_params(const autopar_graph *g) {
    int64_t n = 0;
    for (int i = 0; i < autopar_graph_size(g); i++) {
        autopar_tensor *t = autopar_graph_tensor(g, i);
        if (autopar_tensor_kind(t) == AUTOPAR_KIND_PARAM) n += autopar_tensor_numel(t);
    }
    return n;
}

/* Builds the GPT training graph for batch B; returns 0 or 1. */
static int gpt_graph(const gpt_config *c, autopar_graph **g) {
    autopar_tensor *loss = NULL;
    autopar_optimizer o = adamw();
    *g = NULL;
    if (autopar_graph_new(g) || model_gpt_build(*g, c, &loss) ||
        autopar_build_training(*g, loss, &o)) {
        fprintf(stderr, "bench_gpu_train: GPT graph: %s\n", autopar_last_error());
        return 1;
    }
    return 0;
}

static int bench_gpt(ap_backend *b, const opts *o, const gpu_peak *pk, char *summary,
                     size_t summary_len) {
    gpt_config c = o->gpt;
    autopar_graph *g = NULL;
    ap_graph_runner *r = NULL;
    int32_t *tok = NULL, *tgt = NULL;
    int rc = 1;
    /* The runner keeps every tensor (no memory reuse yet): halve the batch until it fits. */
    for (;;) {
        if (gpt_graph(&c, &g)) goto done;
        size_t need = ap_graph_runner_bytes_needed(g, AUTOPAR_PRECISION_F32);
        printf("gpt: batch %lld x seq %lld: %d graph nodes, %.2f GiB of tensors\n",
               (long long)c.batch, (long long)c.seq, autopar_graph_size(g),
               (double)need / 1073741824.0);
        fflush(stdout);
        autopar_status s = ap_graph_runner_new(g, b, 1337, AUTOPAR_PRECISION_F32, &r);
        if (s == AUTOPAR_OK) break;
        printf("gpt: batch %lld does not fit: %s\n", (long long)c.batch, autopar_last_error());
        autopar_graph_free(g);
        g = NULL;
        if (c.batch == 1 || (s != AUTOPAR_ERR_BACKEND && s != AUTOPAR_ERR_NOMEM)) goto done;
        c.batch /= 2;
    }
    const int64_t n = c.batch * c.seq;
    tok = malloc((size_t)n * sizeof *tok);
    tgt = malloc((size_t)n * sizeof *tgt);
    if (!tok || !tgt) {
        fprintf(stderr, "bench_gpu_train: out of host memory\n");
        goto done;
    }
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (int64_t i = 0; i <= n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        int32_t v = (int32_t)((s >> 33) % (uint64_t)c.vocab);
        if (i < n) tok[i] = v;
        if (i > 0) tgt[i - 1] = v;
    }
    autopar_tensor *in[2] = {autopar_graph_find(g, "tokens"), autopar_graph_find(g, "targets")};
    void *data[2] = {tok, tgt};
    int64_t count[2] = {n, n};
    timing t;
    if (time_steps(r, o, 2, in, data, count, &t)) goto done;

    const double L = c.layers, C = (double)c.hidden, V = (double)c.vocab, T = (double)c.seq;
    const double M = (double)n, B = (double)c.batch;
    const double flops = 6.0 * M * (12.0 * L * C * C + C * V) + 12.0 * L * B * T * T * C;
    const double tok_s = M / t.mean_s;
    printf("gpt: GPT-2 %lld layers, hidden %lld, %d heads, vocab %lld: %.1fM parameters\n",
           (long long)c.layers, (long long)c.hidden, c.heads, (long long)c.vocab,
           (double)count_params(g) * 1e-6);
    printf("gpt: loss %.4f (step 1) -> %.4f (step %d); ln(vocab) = %.4f\n", t.first_loss,
           t.last_loss, o->warmup + o->steps, log(V));
    printf("gpt: %.1f ms/step (mean of %d; best %.1f ms), %.0f tokens/s\n", 1e3 * t.mean_s,
           o->steps, 1e3 * t.best_s, tok_s);
    double mfu;
    print_mfu("gpt", flops, t.mean_s, pk, o->peak_tflops, &mfu);
    printf("gpt: llm.c published: ~%.0f tokens/s per A100 80GB SXM (BF16 + cuDNN flash attention, "
           "B=64, T=1024; scripts/run_gpt2_124M.sh: 8 GPUs, ~300 ms per 524,288-token step; "
           "~60%% BF16 MFU per discussion #481); ours / llm.c = %.3f (different GPU and "
           "precision; no published single-H100 llm.c figure found)\n",
           LLMC_TOKENS_PER_S_GPU, tok_s / LLMC_TOKENS_PER_S_GPU);
    const bool gpt2_124m = c.layers == 12 && c.hidden == 768 && c.heads == 12 &&
                           c.seq == 1024 && c.vocab == 50257;
    char label[64];
    snprintf(label, sizeof label, gpt2_124m ? "gpt2-124M" : "gpt L%d C%lld T%lld V%lld",
             c.layers, (long long)c.hidden, (long long)c.seq, (long long)c.vocab);
    snprintf(summary, summary_len, "%s B=%lld %.0f ms %.0f tok/s MFU(fp32) %.1f%%", label,
             (long long)c.batch, 1e3 * t.mean_s, tok_s, 100.0 * mfu);
    rc = 0;
done:
    ap_graph_runner_free(r);
    autopar_graph_free(g);
    free(tok);
    free(tgt);
    return rc;
}

static int bench_mlp(ap_backend *b, const opts *o, const gpu_peak *pk, char *summary,
                     size_t summary_len) {
    const mlp_config *c = &o->mlp;
    autopar_graph *g = NULL;
    ap_graph_runner *r = NULL;
    autopar_tensor *loss = NULL;
    autopar_optimizer opt = adamw();
    const int64_t n = c->batch * c->dim;
    float *x = malloc((size_t)n * sizeof *x), *y = malloc((size_t)n * sizeof *y);
    int rc = 1;
    if (!x || !y) {
        fprintf(stderr, "bench_gpu_train: out of host memory\n");
        goto done;
    }
    if (autopar_graph_new(&g) || model_mlp_build(g, c, &loss) ||
        autopar_build_training(g, loss, &opt) ||
        ap_graph_runner_new(g, b, 42, AUTOPAR_PRECISION_F32, &r)) {
        fprintf(stderr, "bench_gpu_train: MLP: %s\n", autopar_last_error());
        goto done;
    }
    model_mlp_batch(c, 1234, 42, 0, x, y);
    autopar_tensor *in[2] = {autopar_graph_find(g, "x"), autopar_graph_find(g, "y")};
    void *data[2] = {x, y};
    int64_t count[2] = {n, n};
    timing t;
    if (time_steps(r, o, 2, in, data, count, &t)) goto done;
    const double D = (double)c->dim, B = (double)c->batch;
    const double flops = 88.0 * B * D * D;
    printf("mlp: dim %lld, batch %lld: %.1fM parameters; loss %.4f -> %.4f\n", (long long)c->dim,
           (long long)c->batch, (double)count_params(g) * 1e-6, t.first_loss, t.last_loss);
    printf("mlp: %.2f ms/step (mean of %d; best %.2f ms), %.0f samples/s\n", 1e3 * t.mean_s,
           o->steps, 1e3 * t.best_s, B / t.mean_s);
    double mfu;
    print_mfu("mlp", flops, t.mean_s, pk, o->peak_tflops, &mfu);
    snprintf(summary, summary_len, "mlp %.2f ms MFU(fp32) %.1f%%", 1e3 * t.mean_s, 100.0 * mfu);
    rc = 0;
done:
    ap_graph_runner_free(r);
    autopar_graph_free(g);
    free(x);
    free(y);
    return rc;
}

int main(int argc, char **argv) {
    opts o;
    int rc = parse(argc, argv, &o);
    if (rc) return rc;
    if (!o.cpu && (!ap_backend_cuda_compiled() || ap_backend_cuda_device_count() == 0)) {
        printf("no CUDA device (%s): nothing to measure\n", ap_backend_cuda_no_device_reason());
        return 0;
    }
    ap_backend *b = NULL;
    if (ap_backend_new(o.cpu ? AP_BACKEND_CPU : AP_BACKEND_CUDA, o.device, &b) != AUTOPAR_OK) {
        fprintf(stderr, "bench_gpu_train: %s\n", autopar_last_error());
        return 1;
    }
    const char *name = ap_backend_name(b);
    const gpu_peak *pk = find_peak(name);
    printf("device: %s; peak used: %s\n", name,
           o.peak_tflops > 0 ? "--peak-tflops"
           : pk             ? pk->label
                            : "unknown (pass --peak-tflops)");
    char s_gpt[160] = "gpt not run", s_mlp[96] = "mlp not run";
    if (strcmp(o.model, "mlp") != 0) rc |= bench_gpt(b, &o, pk, s_gpt, sizeof s_gpt);
    if (strcmp(o.model, "gpt") != 0) rc |= bench_mlp(b, &o, pk, s_mlp, sizeof s_mlp);
    ap_backend_free(b);
    printf("summary: %s; %s\n", s_gpt, s_mlp);
    return rc;
}
