/*
 * The backend interface (runtime/backend.h) and the graph runner (runtime/graph_runner.h).
 *
 * Independent reference: the single-process reference executor (autopar_executor_*, which calls
 * the CPU kernels directly and shares no code with the backend layer but the kernels and the
 * parameter-initialisation formula). Checked:
 *   - registry: CPU always; AUTO picks CUDA only when it is built and a device is visible, else
 *     the CPU; CUDA requested without support / without a device gives AUTOPAR_ERR_UNSUPPORTED
 *     with the message naming the reason; bad kinds and device indices are rejected.
 *   - buffers on the CPU backend: upload / download / copy / fill_zero at byte offsets, range and
 *     overlap errors naming the tensor, zero-byte operations, supports_op, leaf calls rejected.
 *   - the wrappers' defaults for the optional slots (copy, fill_zero, supports_op, synchronize),
 *     through a minimal backend defined here that fills only the required slots.
 *   - the graph runner on the CPU backend against the reference executor, bit for bit: the MLP
 *     and the GPT (examples/models.h, small configurations), 3 AdamW steps with a new batch each
 *     step: every loss, then every parameter and optimizer state, then every tensor of the graph
 *     after one more forward+backward. Also in F64 precision (MLP), and on the minimal backend.
 *   - runner errors: unsupported precision (named op and backend), writes to computed tensors,
 *     wrong element counts, foreign tensors, a graph without optimizer, and an out-of-range token
 *     id, after which the step count and the parameters are unchanged.
 * Exit 0 on success, 1 on failure.
 */
#include "autopar.h"
#include "check.h"
#include "backend.h"
#include "cpu/kernels_cpu.h"
#include "graph_runner.h"
#include "models.h"
#include "train_feeds.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Expects status `want` and a last-error message containing `needle`. */
#define EXPECT_ERR(call, want, needle)                                                     \
    do {                                                                                   \
        autopar_status s_ = (call);                                                        \
        CHECK(s_ == (want), "%s -> %s, want %s (%s)", #call, autopar_status_str(s_),       \
              autopar_status_str(want), autopar_last_error());                             \
        CHECK(strstr(autopar_last_error(), (needle)) != NULL,                              \
              "%s: message \"%s\" lacks \"%s\"", #call, autopar_last_error(), (needle));   \
    } while (0)

static autopar_optimizer adamw(float lr) {
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    o.kind = AUTOPAR_OPT_ADAMW;
    o.lr = lr;
    o.weight_decay = 0.01f; /* exercise the decay term too */
    return o;
}

/* ------------------------------------------------------------------------------------------ */
/* Registry                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static void test_registry(void) {
    ap_backend *b = NULL;
    TRY(ap_backend_new(AP_BACKEND_CPU, 0, &b));
    CHECK(ap_backend_get_kind(b) == AP_BACKEND_CPU, "CPU backend kind %d", (int)ap_backend_get_kind(b));
    CHECK(strcmp(ap_backend_name(b), "cpu") == 0, "CPU backend name '%s'", ap_backend_name(b));
    CHECK(ap_backend_cuda_ctx(b) == NULL, "a CPU backend has no CUDA context");
    ap_backend_free(b);
    b = NULL;

    /* AUTO: CUDA only when compiled in and a device is visible. */
    bool cuda_usable = ap_backend_cuda_compiled() && ap_backend_cuda_device_count() > 0;
    TRY(ap_backend_new(AP_BACKEND_AUTO, 0, &b));
    CHECK(ap_backend_get_kind(b) == (cuda_usable ? AP_BACKEND_CUDA : AP_BACKEND_CPU),
          "AUTO chose %s (CUDA compiled %d, devices %d)", ap_backend_name(b),
          (int)ap_backend_cuda_compiled(), ap_backend_cuda_device_count());
    printf("registry: AUTO -> %s (CUDA compiled: %s, visible devices: %d)\n", ap_backend_name(b),
           ap_backend_cuda_compiled() ? "yes" : "no", ap_backend_cuda_device_count());
    ap_backend_free(b);
    b = NULL;

    /* CUDA explicitly. */
    autopar_status s = ap_backend_new(AP_BACKEND_CUDA, 0, &b);
    if (!ap_backend_cuda_compiled()) {
        CHECK(s == AUTOPAR_ERR_UNSUPPORTED && b == NULL, "CUDA without support: %s",
              autopar_status_str(s));
        CHECK(strstr(autopar_last_error(),
                     "CUDA backend requested but this build has no CUDA support") != NULL,
              "message: %s", autopar_last_error());
        CHECK(ap_backend_cuda_device_count() == 0, "stub device count");
    } else if (ap_backend_cuda_device_count() == 0) {
        CHECK(s == AUTOPAR_ERR_UNSUPPORTED && b == NULL, "CUDA without device: %s",
              autopar_status_str(s));
        CHECK(strstr(autopar_last_error(), "CUDA backend requested but no CUDA device is visible")
                  != NULL, "message: %s", autopar_last_error());
    } else {
        CHECK(s == AUTOPAR_OK && b != NULL, "CUDA with a device: %s (%s)", autopar_status_str(s),
              autopar_last_error());
        CHECK(ap_backend_cuda_ctx(b) != NULL, "CUDA backend exposes its context");
        CHECK(!ap_backend_supports_op(b, AP_OP_MATMUL, AUTOPAR_PRECISION_F64),
              "CUDA has no F64 kernels");
        CHECK(ap_backend_supports_op(b, AP_OP_MATMUL, AUTOPAR_PRECISION_F32), "CUDA F32 matmul");
        ap_backend_free(b);
        b = NULL;
        ap_backend *bad = NULL;
        EXPECT_ERR(ap_backend_new(AP_BACKEND_CUDA, ap_backend_cuda_device_count(), &bad),
                   AUTOPAR_ERR_INVALID_ARG, "device");
        CHECK(bad == NULL, "no backend on failure");
    }
    ap_backend_free(b);
    b = NULL;

    EXPECT_ERR(ap_backend_new((ap_backend_kind)17, 0, &b), AUTOPAR_ERR_INVALID_ARG, "17");
    EXPECT_ERR(ap_backend_new(AP_BACKEND_CPU, 0, NULL), AUTOPAR_ERR_INVALID_ARG, "out");
    CHECK(strcmp(ap_backend_kind_name(AP_BACKEND_CUDA), "cuda") == 0, "kind name");
    ap_backend_free(NULL); /* NULL-safe */
cleanup:
    ap_backend_free(b);
}

/* ------------------------------------------------------------------------------------------ */
/* A minimal backend: only the required slots (host memory, ap_cpu_run)                       */
/* ------------------------------------------------------------------------------------------ */

static int min_uploads, min_downloads;

static const char *min_name(void *ctx) { (void)ctx; return "minimal"; }
static void min_free(void *ctx) { (void)ctx; }
static ap_status min_alloc(void *ctx, size_t bytes, void **out) {
    (void)ctx;
    *out = malloc(bytes);
    return *out ? AUTOPAR_OK : ap_error(AUTOPAR_ERR_NOMEM, "minimal: out of memory");
}
static void min_buffer_free(void *ctx, void *p) { (void)ctx; free(p); }
static ap_status min_upload(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    min_uploads++;
    memcpy(dst, src, bytes);
    return AUTOPAR_OK;
}
static ap_status min_download(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    min_downloads++;
    memcpy(dst, src, bytes);
    return AUTOPAR_OK;
}
static ap_status min_run(void *ctx, const ap_kernel_call *call) { (void)ctx; return ap_cpu_run(call); }

static const ap_backend_i min_iface = {
    .name = min_name, .free = min_free, .buffer_alloc = min_alloc,
    .buffer_free = min_buffer_free, .upload = min_upload, .download = min_download,
    .copy = NULL, .fill_zero = NULL, .run = min_run, .supports_op = NULL, .synchronize = NULL,
};

/* Same, but claims no F64 kernels (as CUDA does). */
static bool f32_only(void *ctx, ap_op op, autopar_precision p) {
    (void)ctx;
    (void)op;
    return p == AUTOPAR_PRECISION_F32;
}
static const ap_backend_i f32_iface = {
    .name = min_name, .free = min_free, .buffer_alloc = min_alloc,
    .buffer_free = min_buffer_free, .upload = min_upload, .download = min_download,
    .copy = NULL, .fill_zero = NULL, .run = min_run, .supports_op = f32_only, .synchronize = NULL,
};

/* Heap-allocated so ap_backend_free can release it like any other backend. */
static ap_backend *minimal_backend(const ap_backend_i *iface) {
    ap_backend *b = calloc(1, sizeof *b);
    if (b) {
        b->iface = iface;
        b->kind = AP_BACKEND_CPU;
    }
    return b;
}

/* ------------------------------------------------------------------------------------------ */
/* Buffers and copies                                                                          */
/* ------------------------------------------------------------------------------------------ */

/* Exercises the memory functions of backend b (its own slots or the defaults). */
static void check_buffers(ap_backend *b) {
    const char *bn = ap_backend_name(b);
    ap_buffer x = {0}, y = {0}, e = {0};
    float host[16], back[16];
    for (int i = 0; i < 16; i++) host[i] = (float)i + 0.5f;
    TRY(ap_backend_buffer_alloc(b, sizeof host, "x", &x));
    TRY(ap_backend_buffer_alloc(b, sizeof host, "y", &y));
    CHECK(x.data && x.bytes == sizeof host, "%s: buffer x", bn);
    TRY(ap_backend_buffer_alloc(b, 0, "empty", &e));
    CHECK(e.data == NULL && e.bytes == 0, "%s: zero bytes give the empty buffer", bn);

    /* Whole upload and download. */
    TRY(ap_backend_upload(b, &x, 0, host, sizeof host, "x"));
    memset(back, 0, sizeof back);
    TRY(ap_backend_download(b, back, &x, 0, sizeof back, "x"));
    CHECK(memcmp(back, host, sizeof host) == 0, "%s: round trip", bn);

    /* Zero y, copy x[4..12) to y[2..10), overwrite y[0..2) by an upload at offset 0 of host[14..16). */
    TRY(ap_backend_fill_zero(b, &y, 0, y.bytes, "y"));
    TRY(ap_backend_copy(b, &y, 2 * sizeof(float), &x, 4 * sizeof(float), 8 * sizeof(float), "y"));
    TRY(ap_backend_upload(b, &y, 0, host + 14, 2 * sizeof(float), "y"));
    /* and zero y[12..14) after setting it through a copy of x[0..4) to y[11..15). */
    TRY(ap_backend_copy(b, &y, 11 * sizeof(float), &x, 0, 4 * sizeof(float), "y"));
    TRY(ap_backend_fill_zero(b, &y, 12 * sizeof(float), 2 * sizeof(float), "y"));
    TRY(ap_backend_download(b, back, &y, 0, sizeof back, "y"));
    float want[16] = {14.5f, 15.5f, 4.5f, 5.5f, 6.5f, 7.5f, 8.5f, 9.5f, 10.5f, 11.5f,
                      0.0f,  0.5f,  0.0f, 0.0f, 3.5f, 0.0f};
    CHECK(memcmp(back, want, sizeof want) == 0, "%s: offsets: y = %g %g %g ... %g %g %g", bn,
          back[0], back[1], back[2], back[13], back[14], back[15]);
    /* Download at an offset. */
    float two[2];
    TRY(ap_backend_download(b, two, &x, 6 * sizeof(float), sizeof two, "x"));
    CHECK(two[0] == 6.5f && two[1] == 7.5f, "%s: download at offset: %g %g", bn, two[0], two[1]);

    /* Zero-byte operations are no-ops, even on the empty buffer. */
    TRY(ap_backend_upload(b, &e, 0, NULL, 0, "empty"));
    TRY(ap_backend_copy(b, &e, 0, &x, 0, 0, "empty"));
    TRY(ap_backend_fill_zero(b, &e, 0, 0, "empty"));

    /* Ranges outside a buffer name the tensor and the sizes. */
    EXPECT_ERR(ap_backend_upload(b, &x, 60, host, 8, "wq"), AUTOPAR_ERR_INVALID_ARG, "'wq'");
    EXPECT_ERR(ap_backend_download(b, back, &x, 0, 65, "wk"), AUTOPAR_ERR_INVALID_ARG,
               "65 bytes at offset 0 exceed the source buffer of 64 bytes");
    EXPECT_ERR(ap_backend_copy(b, &y, 0, &x, 8, 64, "wv"), AUTOPAR_ERR_INVALID_ARG, "source");
    EXPECT_ERR(ap_backend_fill_zero(b, &y, (size_t)-8, 16, "wo"), AUTOPAR_ERR_INVALID_ARG, "'wo'");
    EXPECT_ERR(ap_backend_copy(b, &x, 0, &x, 8, 16, "self"), AUTOPAR_ERR_INVALID_ARG, "overlap");
    EXPECT_ERR(ap_backend_upload(b, &e, 0, host, 4, "empty"), AUTOPAR_ERR_INVALID_ARG, "empty");
    EXPECT_ERR(ap_backend_upload(b, &x, 0, NULL, 4, "x"), AUTOPAR_ERR_INVALID_ARG, "NULL");
    EXPECT_ERR(ap_backend_upload(NULL, &x, 0, host, 4, "x"), AUTOPAR_ERR_INVALID_ARG, "NULL");

    /* Kernels: leaves are refused, a real op runs on backend buffers. */
    CHECK(!ap_backend_supports_op(b, AP_OP_PARAM, AUTOPAR_PRECISION_F32), "%s: leaves", bn);
    CHECK(!ap_backend_supports_op(b, AP_OP_COUNT, AUTOPAR_PRECISION_F32), "%s: bad op", bn);
    CHECK(ap_backend_supports_op(b, AP_OP_ADD, AUTOPAR_PRECISION_F32), "%s: add", bn);
    ap_kernel_call call;
    memset(&call, 0, sizeof call);
    call.op = AP_OP_INPUT;
    call.name = "leaf";
    EXPECT_ERR(ap_backend_run(b, &call), AUTOPAR_ERR_INVALID_ARG, "'leaf' is a leaf");
    call.op = AP_OP_ADD;
    call.name = "sum";
    call.precision = AUTOPAR_PRECISION_F32;
    call.out_shape.ndim = 1;
    call.out_shape.dim[0] = 16;
    call.out_dtype = AUTOPAR_F32;
    call.n_src = 2;
    call.src_shape[0] = call.src_shape[1] = call.out_shape;
    call.src_dtype[0] = call.src_dtype[1] = AUTOPAR_F32;
    ap_buffer z = {0};
    TRY(ap_backend_buffer_alloc(b, sizeof host, "sum", &z));
    call.out = z.data;
    call.src[0] = x.data;
    call.src[1] = y.data;
    TRY(ap_backend_run(b, &call));
    TRY(ap_backend_synchronize(b));
    TRY(ap_backend_download(b, back, &z, 0, sizeof back, "sum"));
    bool ok = true;
    for (int i = 0; i < 16; i++) ok = ok && back[i] == host[i] + want[i];
    CHECK(ok, "%s: add through ap_backend_run", bn);
    ap_backend_buffer_free(b, &z);

cleanup:
    ap_backend_buffer_free(b, &x);
    ap_backend_buffer_free(b, &y);
    ap_backend_buffer_free(b, &e);
    CHECK(x.data == NULL && x.bytes == 0, "freed buffers are reset");
    ap_backend_buffer_free(b, NULL); /* NULL-safe */
}

static void test_buffers(void) {
    ap_backend *cpu = NULL, *mini = NULL;
    TRY(ap_backend_new(AP_BACKEND_CPU, 0, &cpu));
    check_buffers(cpu);
    CHECK(ap_backend_supports_op(cpu, AP_OP_MATMUL, AUTOPAR_PRECISION_F64), "CPU has F64");

    mini = minimal_backend(&min_iface);
    CHECK(mini != NULL, "minimal backend");
    if (!mini) goto cleanup;
    min_uploads = min_downloads = 0;
    check_buffers(mini);
    /* The defaults went through upload/download: copies bounce, fills upload zeros. */
    CHECK(min_uploads > 3 && min_downloads > 3, "defaults used the required slots (%d up, %d down)",
          min_uploads, min_downloads);
    CHECK(ap_backend_supports_op(mini, AP_OP_MATMUL, AUTOPAR_PRECISION_F64),
          "default supports_op: every computed op");
cleanup:
    ap_backend_free(cpu);
    ap_backend_free(mini);
}

/* ------------------------------------------------------------------------------------------ */
/* Graph runner against the reference executor                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Writes the feed to the reference executor and the runner. */
static autopar_status feed_both(const feed *f, autopar_executor *ex, ap_graph_runner *r) {
    for (int i = 0; i < f->n; i++) {
        autopar_status s = autopar_executor_write(ex, f->t[i], f->data[i], f->count[i]);
        if (!s) s = ap_graph_runner_write(r, f->t[i], f->data[i], f->count[i]);
        if (s) return s;
    }
    return AUTOPAR_OK;
}

/* Compares tensor t of the reference and the runner bit for bit (as float / int32 words).
 * Returns false and reports the first difference. */
static bool same_tensor(const char *label, autopar_tensor *t, const autopar_executor *ex,
                        ap_graph_runner *r) {
    int64_t n = autopar_tensor_numel(t);
    uint32_t *a = malloc((size_t)(n ? n : 1) * 4), *b = malloc((size_t)(n ? n : 1) * 4);
    bool ok = false;
    if (!a || !b) {
        CHECK(false, "%s: out of memory", label);
        goto done;
    }
    autopar_status s1 = autopar_executor_read(ex, t, a, n);
    autopar_status s2 = ap_graph_runner_read(r, t, b, n);
    if (s1 || s2) {
        CHECK(false, "%s: read '%s': %s", label, autopar_tensor_name(t), autopar_last_error());
        goto done;
    }
    ok = true;
    for (int64_t i = 0; i < n; i++)
        if (a[i] != b[i]) {
            float fa, fb;
            memcpy(&fa, &a[i], 4);
            memcpy(&fb, &b[i], 4);
            CHECK(false, "%s: tensor '%s'[%lld]: reference %.9g, runner %.9g", label,
                  autopar_tensor_name(t), (long long)i, fa, fb);
            ok = false;
            break;
        }
done:
    free(a);
    free(b);
    return ok;
}

typedef void (*make_feed_fn)(void *model, int step, feed *f);

/* Trains g for `steps` AdamW steps with the reference executor and a runner on backend b, from
 * the same seed and batches, and requires identical losses, parameters, optimizer state, and
 * then every tensor after one more forward+backward. */
static void compare_with_reference(const char *label, autopar_graph *g, ap_backend *b,
                                   autopar_precision p, int steps, make_feed_fn make_feed,
                                   void *model) {
    autopar_executor *ex = NULL;
    ap_graph_runner *r = NULL;
    const uint64_t seed = 7;
    TRY(autopar_executor_new(g, seed, p, &ex));
    TRY(ap_graph_runner_new(g, b, seed, p, &r));
    CHECK(ap_graph_runner_steps(r) == 0, "%s: fresh runner", label);
    /* Parameters start equal (shared init formula, different code paths). */
    for (int i = 0; i < autopar_graph_size(g); i++) {
        autopar_tensor *t = autopar_graph_tensor(g, i);
        if (autopar_tensor_kind(t) == AUTOPAR_KIND_PARAM) same_tensor(label, t, ex, r);
    }
    for (int step = 0; step < steps; step++) {
        feed f = {0};
        make_feed(model, step, &f);
        TRY(feed_both(&f, ex, r));
        double l_ref = NAN, l_run = NAN;
        TRY(autopar_executor_step(ex, &l_ref));
        TRY(ap_graph_runner_step(r, &l_run));
        CHECK(l_ref == l_run && isfinite(l_ref), "%s step %d: loss reference %.17g, runner %.17g",
              label, step, l_ref, l_run);
        printf("%s step %d: loss %.9f (reference %.9f)\n", label, step, l_run, l_ref);
    }
    CHECK(ap_graph_runner_steps(r) == steps, "%s: %lld steps", label,
          (long long)ap_graph_runner_steps(r));
    int n_state = 0, n_bad = 0;
    for (int i = 0; i < autopar_graph_size(g); i++) {
        autopar_tensor *t = autopar_graph_tensor(g, i);
        autopar_kind k = autopar_tensor_kind(t);
        if (k != AUTOPAR_KIND_PARAM && k != AUTOPAR_KIND_OPT_STATE) continue;
        n_state++;
        if (!same_tensor(label, t, ex, r)) n_bad++;
    }
    CHECK(n_state > 0 && n_bad == 0, "%s: %d of %d parameters/states differ", label, n_bad, n_state);

    /* One more forward+backward: every tensor, gradients included. */
    {
        feed f = {0};
        make_feed(model, steps, &f);
        TRY(feed_both(&f, ex, r));
        double l_ref = NAN, l_run = NAN;
        TRY(autopar_executor_forward_backward(ex, &l_ref));
        TRY(ap_graph_runner_forward_backward(r, &l_run));
        CHECK(l_ref == l_run, "%s forward_backward: loss %.17g vs %.17g", label, l_ref, l_run);
        n_bad = 0;
        for (int i = 0; i < autopar_graph_size(g); i++)
            if (!same_tensor(label, autopar_graph_tensor(g, i), ex, r)) n_bad++;
        CHECK(n_bad == 0, "%s: %d of %d tensors differ after forward_backward", label, n_bad,
              autopar_graph_size(g));
        double l_fwd = NAN;
        TRY(ap_graph_runner_forward(r, &l_fwd));
        CHECK(l_fwd == l_run, "%s: forward loss %.17g vs %.17g", label, l_fwd, l_run);
    }
    printf("%s: %d parameters/states and %d tensors identical to the reference executor\n", label,
           n_state, autopar_graph_size(g));
cleanup:
    ap_graph_runner_free(r);
    autopar_executor_free(ex);
}

static void test_runner_mlp(ap_backend *b, autopar_precision p, const char *label) {
    autopar_graph *g = NULL;
    mlp_model m = {.c = {.batch = 24, .dim = 16, .mark_layers = 0}, .batch_seed = 99};
    autopar_optimizer o = adamw(3e-3f);
    TRY(mlp_model_build(&m, &o, &g));
    compare_with_reference(label, g, b, p, 3, mlp_feed, &m);
cleanup:
    autopar_graph_free(g);
    mlp_model_free(&m);
}

static void test_runner_gpt(ap_backend *b, const char *label) {
    autopar_graph *g = NULL;
    gpt_model m = {.c = {.layers = 2, .hidden = 32, .heads = 4, .seq = 16, .vocab = 64,
                         .batch = 3, .mark_layers = 1},
                   .seed = 0x5eed, .stride = 7919};
    autopar_optimizer o = adamw(3e-3f);
    TRY(gpt_model_build(&m, &o, &g));
    compare_with_reference(label, g, b, AUTOPAR_PRECISION_F32, 3, gpt_feed, &m);
cleanup:
    autopar_graph_free(g);
    gpt_model_free(&m);
}

/* ------------------------------------------------------------------------------------------ */
/* Runner errors                                                                               */
/* ------------------------------------------------------------------------------------------ */

static void test_runner_errors(ap_backend *cpu) {
    autopar_graph *g = NULL, *g2 = NULL, *fwd = NULL;
    ap_graph_runner *r = NULL, *r2 = NULL;
    ap_backend *f32 = minimal_backend(&f32_iface);
    autopar_tensor *loss = NULL, *loss2 = NULL;
    gpt_model m = {.c = {.layers = 1, .hidden = 16, .heads = 2, .seq = 8, .vocab = 32,
                         .batch = 2, .mark_layers = 0},
                   .seed = 0x5eed, .stride = 7919, .bad_pos = 0, .bad_excess = 0};
    autopar_optimizer o = adamw(1e-3f);
    float *before = NULL, *after = NULL;
    if (!f32) {
        CHECK(false, "out of memory");
        goto cleanup;
    }
    TRY(gpt_model_build(&m, &o, &g));
    loss = autopar_graph_loss(g);
    int64_t n = m.c.batch * m.c.seq;

    /* Argument errors. */
    EXPECT_ERR(ap_graph_runner_new(g, NULL, 1, AUTOPAR_PRECISION_F32, &r), AUTOPAR_ERR_INVALID_ARG,
               "backend");
    EXPECT_ERR(ap_graph_runner_new(NULL, cpu, 1, AUTOPAR_PRECISION_F32, &r),
               AUTOPAR_ERR_INVALID_ARG, "graph");
    EXPECT_ERR(ap_graph_runner_new(g, cpu, 1, AUTOPAR_PRECISION_COUNT, &r),
               AUTOPAR_ERR_INVALID_ARG, "precision");
    CHECK(r == NULL, "no runner on failure");

    /* A backend without F64 kernels refuses an F64 runner up front, naming op and backend. */
    EXPECT_ERR(ap_graph_runner_new(g, f32, 1, AUTOPAR_PRECISION_F64, &r), AUTOPAR_ERR_UNSUPPORTED,
               "precision by the minimal backend");
    CHECK(strstr(autopar_last_error(), "(tensor '") != NULL, "names the tensor: %s",
          autopar_last_error());
    CHECK(r == NULL, "no runner on failure");

    TRY(ap_graph_runner_new(g, cpu, 1, AUTOPAR_PRECISION_F32, &r));
    EXPECT_ERR(ap_graph_runner_write(r, loss, m.tok, 1), AUTOPAR_ERR_INVALID_ARG,
               "only inputs, parameters and optimizer state can be written");
    EXPECT_ERR(ap_graph_runner_write(r, m.tokens, m.tok, n - 1), AUTOPAR_ERR_SHAPE, "'tokens'");
    EXPECT_ERR(ap_graph_runner_read(r, m.tokens, NULL, n), AUTOPAR_ERR_INVALID_ARG, "NULL");
    CHECK(ap_graph_runner_buffer(r, -1) == NULL && ap_graph_runner_buffer(r, 0) != NULL,
          "buffer accessor");
    CHECK(ap_graph_runner_bytes_needed(g, AUTOPAR_PRECISION_F64) >
              ap_graph_runner_bytes_needed(g, AUTOPAR_PRECISION_F32), "bytes_needed");

    /* A tensor of another graph. */
    TRY(autopar_graph_new(&g2));
    TRY(model_gpt_build(g2, &m.c, &loss2));
    EXPECT_ERR(ap_graph_runner_read(r, loss2, m.tok, 1), AUTOPAR_ERR_INVALID_ARG, "not part");

    /* A forward-only graph: forward works (loss 0: no backward pass), step does not. */
    TRY(autopar_graph_new(&fwd));
    autopar_tensor *lf = NULL;
    TRY(model_gpt_build(fwd, &m.c, &lf));
    TRY(ap_graph_runner_new(fwd, cpu, 1, AUTOPAR_PRECISION_F32, &r2));
    double l = -1.0;
    TRY(ap_graph_runner_forward(r2, &l));
    CHECK(l == 0.0, "forward-only graph reports loss 0, got %g", l);
    EXPECT_ERR(ap_graph_runner_step(r2, &l), AUTOPAR_ERR_GRAPH, "no backward pass");
    EXPECT_ERR(ap_graph_runner_forward_backward(r2, &l), AUTOPAR_ERR_GRAPH, "no backward pass");
    ap_graph_runner_free(r2);
    r2 = NULL;
    /* Backward but no optimizer. */
    TRY(autopar_backward(g2, loss2));
    TRY(ap_graph_runner_new(g2, cpu, 1, AUTOPAR_PRECISION_F32, &r2));
    EXPECT_ERR(ap_graph_runner_step(r2, &l), AUTOPAR_ERR_GRAPH, "no optimizer");

    /* An out-of-range token: the step fails naming the tensor; nothing is updated. */
    autopar_tensor *wte = autopar_graph_find(g, "wte");
    int64_t nw = autopar_tensor_numel(wte);
    before = malloc((size_t)nw * sizeof *before);
    after = malloc((size_t)nw * sizeof *after);
    if (!before || !after || !wte) {
        CHECK(false, "wte / out of memory");
        goto cleanup;
    }
    TRY(ap_graph_runner_read(r, wte, before, nw));
    m.bad_token = 1;
    feed f;
    gpt_feed(&m, 0, &f);
    for (int i = 0; i < f.n; i++) TRY(ap_graph_runner_write(r, f.t[i], f.data[i], f.count[i]));
    EXPECT_ERR(ap_graph_runner_step(r, &l), AUTOPAR_ERR_INVALID_ARG, "32");
    printf("out-of-range token: %s\n", autopar_last_error());
    CHECK(ap_graph_runner_steps(r) == 0, "failed step not counted");
    TRY(ap_graph_runner_read(r, wte, after, nw));
    CHECK(memcmp(before, after, (size_t)nw * sizeof *before) == 0, "failed step changed wte");
    /* A good batch afterwards works. */
    m.bad_token = 0;
    gpt_feed(&m, 0, &f);
    for (int i = 0; i < f.n; i++) TRY(ap_graph_runner_write(r, f.t[i], f.data[i], f.count[i]));
    TRY(ap_graph_runner_step(r, &l));
    CHECK(ap_graph_runner_steps(r) == 1 && isfinite(l), "step after a failed one");

    ap_graph_runner_free(NULL); /* NULL-safe */
cleanup:
    ap_graph_runner_free(r);
    ap_graph_runner_free(r2);
    autopar_graph_free(g);
    autopar_graph_free(g2);
    autopar_graph_free(fwd);
    ap_backend_free(f32);
    gpt_model_free(&m);
    free(before);
    free(after);
}

int main(void) {
    test_registry();
    test_buffers();

    ap_backend *cpu = NULL, *mini = NULL;
    TRY(ap_backend_new(AP_BACKEND_CPU, 0, &cpu));
    test_runner_mlp(cpu, AUTOPAR_PRECISION_F32, "mlp/cpu/f32");
    test_runner_mlp(cpu, AUTOPAR_PRECISION_F64, "mlp/cpu/f64");
    test_runner_gpt(cpu, "gpt/cpu/f32");
    mini = minimal_backend(&min_iface);
    if (mini) {
        test_runner_mlp(mini, AUTOPAR_PRECISION_F32, "mlp/minimal/f32");
        test_runner_gpt(mini, "gpt/minimal/f32");
    }
    test_runner_errors(cpu);
cleanup:
    ap_backend_free(cpu);
    ap_backend_free(mini);
    if (g_failures) {
        fprintf(stderr, "test_backend: %d failure(s)\n", g_failures);
        return 1;
    }
    printf("test_backend: all checks passed\n");
    return 0;
}
