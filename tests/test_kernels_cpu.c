/*
 * CPU kernels (runtime/cpu/kernels_cpu.c) against naive double-precision references written
 * here independently of the kernel code (plain loops over multi-indices, explicit Jacobians,
 * no max-subtraction tricks), for every op of the IR, in both precisions.
 *
 * Tolerances (normwise relative error: max_i |got_i - ref_i| / max_i |ref_i|):
 *   - F64 kernels: 1e-12 against the reference computed on the same inputs;
 *   - F32 kernels: 1e-5 against the reference computed in double on the same float-rounded
 *     inputs (so only the kernel's float arithmetic is measured).
 * The backward ops are also checked against central finite differences of the forward
 * reference (F64 kernel output, tolerance 1e-6, step 1e-5), which validates the gradient
 * formulas themselves, and the adjoint pairs (SUM_TO/ADD, EXPAND/SUM, SLICE_BACK/SLICE,
 * EMBEDDING_BACK/EMBEDDING) are checked the same way.
 * Error cases: ids / labels out of range (AUTOPAR_ERR_INVALID_ARG, message names the tensor),
 * leaves and unknown ops (AUTOPAR_ERR_UNSUPPORTED), bad operand counts and shapes.
 * Prints one line per case; exits 1 on any failure.
 */
#include "internal.h"
#include "cpu/kernels_cpu.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PI_D 3.14159265358979323846
#define TOL_F64 1e-12
#define TOL_F32 1e-5
#define TOL_FD  1e-6
#define FD_STEP 1e-5

static int g_failures = 0;
static int g_checks = 0;
static bool g_covered[AP_OP_COUNT];

/* ---- random numbers (fixed seed) ----------------------------------------------------------- */

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint64_t rng_next(void) { /* splitmix64 */
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double urand(double lo, double hi) {
    return lo + (hi - lo) * ((double)(rng_next() >> 11) * (1.0 / 9007199254740992.0));
}

/* ---- shapes and indices --------------------------------------------------------------------- */

static ap_shape mk_shape(int nd, const int64_t *d) {
    ap_shape s;
    memset(&s, 0, sizeof s);
    s.ndim = nd;
    for (int i = 0; i < nd; i++) s.dim[i] = d[i];
    return s;
}
#define SH(...) mk_shape((int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), \
                         (int64_t[]){__VA_ARGS__})
static const ap_shape SCALAR = {0, {0}};

static int64_t numel(const ap_shape *s) {
    int64_t n = 1;
    for (int i = 0; i < s->ndim; i++) n *= s->dim[i];
    return n;
}
static void unravel(int64_t i, const ap_shape *s, int64_t *idx) {
    for (int d = s->ndim - 1; d >= 0; d--) {
        idx[d] = i % s->dim[d];
        i /= s->dim[d];
    }
}
static int64_t ravel(const int64_t *idx, const ap_shape *s) {
    int64_t i = 0;
    for (int d = 0; d < s->ndim; d++) i = i * s->dim[d] + idx[d];
    return i;
}
static const char *shape_txt(const ap_shape *s, char *buf, size_t len) {
    size_t u = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < s->ndim && u < len; i++)
        u += (size_t)snprintf(buf + u, len - u, i ? ",%lld" : "%lld", (long long)s->dim[i]);
    if (u < len) snprintf(buf + u, len - u, "]");
    return buf;
}

/* ---- test cases ------------------------------------------------------------------------------ */

typedef struct tcase {
    char          label[160];
    ap_kernel_call call;             /* op, attrs, shapes, dtypes, n_src, step, name           */
    double       *in[AP_MAX_SRC];    /* F32 operand values                                     */
    int32_t      *ids[AP_MAX_SRC];   /* I32 operand values                                     */
    bool          owned[AP_MAX_SRC];
} tcase;

/* Naive reference: fills out (numel of the call's out shape) from in[] / t->ids[]. */
typedef void (*ref_fn)(const tcase *t, double *const *in, double *out);

static void tc_init(tcase *t, ap_op op, const char *label, ap_shape out) {
    memset(t, 0, sizeof *t);
    snprintf(t->label, sizeof t->label, "%s", label);
    t->call.op = op;
    t->call.out_shape = out;
    t->call.out_dtype = AUTOPAR_F32;
    t->call.name = "t_out";
    t->call.step = 1;
}
/* Adds an F32 operand with values uniform in [lo, hi]; returns its values. */
static double *tc_src(tcase *t, ap_shape s, double lo, double hi) {
    int k = t->call.n_src++;
    int64_t n = numel(&s);
    t->call.src_shape[k] = s;
    t->call.src_dtype[k] = AUTOPAR_F32;
    t->in[k] = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) t->in[k][i] = urand(lo, hi);
    t->owned[k] = true;
    return t->in[k];
}
/* Adds an F32 operand aliasing existing values (not freed by tc_free). */
static void tc_alias(tcase *t, ap_shape s, double *v) {
    int k = t->call.n_src++;
    t->call.src_shape[k] = s;
    t->call.src_dtype[k] = AUTOPAR_F32;
    t->in[k] = v;
}
/* Adds an I32 operand with values in [0, hi). */
static int32_t *tc_ids(tcase *t, ap_shape s, int32_t hi) {
    int k = t->call.n_src++;
    int64_t n = numel(&s);
    t->call.src_shape[k] = s;
    t->call.src_dtype[k] = AUTOPAR_I32;
    t->ids[k] = malloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) t->ids[k][i] = (int32_t)(rng_next() % (uint64_t)hi);
    t->owned[k] = true;
    return t->ids[k];
}
static void tc_alias_ids(tcase *t, ap_shape s, int32_t *v) {
    int k = t->call.n_src++;
    t->call.src_shape[k] = s;
    t->call.src_dtype[k] = AUTOPAR_I32;
    t->ids[k] = v;
}
static void tc_free(tcase *t) {
    for (int k = 0; k < t->call.n_src; k++)
        if (t->owned[k]) {
            free(t->in[k]);
            free(t->ids[k]);
        }
}

/* op < 0 or >= AP_OP_COUNT prints "-". */
static void report(bool ok, int op, const char *label, const char *detail) {
    g_checks++;
    if (!ok) g_failures++;
    const char *name = op >= 0 && op < AP_OP_COUNT ? ap_op_name((ap_op)op) : NULL;
    printf("%s %-22s %-44s %s\n", ok ? "ok  " : "FAIL", name ? name : "-", label, detail);
}

/* Runs the kernel in both precisions against ref. Returns a malloc'ed copy of the F64 kernel
 * output when keep_f64 (else NULL). */
static double *check(tcase *t, ref_fn ref, bool keep_f64) {
    const int64_t nout = numel(&t->call.out_shape);
    double err[2] = {0, 0};
    bool ok = true;
    char why[256] = "";
    double *kept = NULL;
    g_covered[t->call.op] = true;
    for (int pi = 0; pi < 2; pi++) {
        const autopar_precision prec = pi == 0 ? AUTOPAR_PRECISION_F64 : AUTOPAR_PRECISION_F32;
        const bool f32 = prec == AUTOPAR_PRECISION_F32;
        double *rin[AP_MAX_SRC] = {0};
        void *buf[AP_MAX_SRC] = {0};
        ap_kernel_call call = t->call;
        call.precision = prec;
        for (int k = 0; k < t->call.n_src; k++) {
            if (t->call.src_dtype[k] == AUTOPAR_I32) {
                call.src[k] = t->ids[k];
                continue;
            }
            int64_t n = numel(&t->call.src_shape[k]);
            rin[k] = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
            buf[k] = malloc((f32 ? sizeof(float) : sizeof(double)) * (size_t)(n > 0 ? n : 1));
            for (int64_t i = 0; i < n; i++) {
                rin[k][i] = f32 ? (double)(float)t->in[k][i] : t->in[k][i];
                if (f32)
                    ((float *)buf[k])[i] = (float)t->in[k][i];
                else
                    ((double *)buf[k])[i] = t->in[k][i];
            }
            call.src[k] = buf[k];
        }
        double *expect = malloc(sizeof(double) * (size_t)(nout > 0 ? nout : 1));
        ref(t, rin, expect);
        void *out = malloc((f32 ? sizeof(float) : sizeof(double)) * (size_t)(nout > 0 ? nout : 1));
        for (int64_t i = 0; i < nout; i++) { /* poison: unwritten outputs show up as NaN */
            if (f32)
                ((float *)out)[i] = NAN;
            else
                ((double *)out)[i] = NAN;
        }
        call.out = out;
        autopar_clear_error();
        ap_status st = ap_cpu_run(&call);
        if (st != AUTOPAR_OK) {
            ok = false;
            snprintf(why, sizeof why, "%s: status %d (%s)", f32 ? "f32" : "f64", (int)st,
                     autopar_last_error());
        } else {
            double maxref = 0, maxerr = 0;
            for (int64_t i = 0; i < nout; i++) {
                double g = f32 ? (double)((float *)out)[i] : ((double *)out)[i];
                double e = fabs(g - expect[i]);
                if (g != g) e = INFINITY;
                if (fabs(expect[i]) > maxref) maxref = fabs(expect[i]);
                if (e > maxerr) maxerr = e;
            }
            err[pi] = maxerr / (maxref > 0 ? maxref : 1.0);
            if (!(err[pi] <= (f32 ? TOL_F32 : TOL_F64))) ok = false;
            if (!f32 && keep_f64) {
                kept = malloc(sizeof(double) * (size_t)(nout > 0 ? nout : 1));
                for (int64_t i = 0; i < nout; i++) kept[i] = ((double *)out)[i];
            }
        }
        free(out);
        free(expect);
        for (int k = 0; k < t->call.n_src; k++) {
            free(rin[k]);
            free(buf[k]);
        }
    }
    char detail[384];
    snprintf(detail, sizeof detail, "f64 err %.1e  f32 err %.1e %s", err[0], err[1], why);
    report(ok, t->call.op, t->label, detail);
    return kept;
}

/* grad[i] must equal d/dx_i sum_j w[j] * fwd(x)_j, x = operand `wrt` of the forward case
 * (central differences on the double reference). */
static void fd_check(tcase *fwd, ref_fn fref, int wrt, const double *w, const double *grad,
                     ap_op grad_op, const char *label) {
    if (!grad) {
        report(false, grad_op, label, "no kernel output to check");
        return;
    }
    int64_t nx = numel(&fwd->call.src_shape[wrt]), ny = numel(&fwd->call.out_shape);
    double *y = malloc(sizeof(double) * (size_t)(ny > 0 ? ny : 1));
    double *x = fwd->in[wrt];
    double maxg = 0, maxerr = 0;
    for (int64_t i = 0; i < nx; i++) {
        double x0 = x[i], lp = 0, lm = 0;
        x[i] = x0 + FD_STEP;
        fref(fwd, fwd->in, y);
        for (int64_t j = 0; j < ny; j++) lp += w[j] * y[j];
        x[i] = x0 - FD_STEP;
        fref(fwd, fwd->in, y);
        for (int64_t j = 0; j < ny; j++) lm += w[j] * y[j];
        x[i] = x0;
        double num = (lp - lm) / (2 * FD_STEP);
        if (fabs(grad[i]) > maxg) maxg = fabs(grad[i]);
        double e = fabs(num - grad[i]);
        if (e > maxerr || e != e) maxerr = e != e ? INFINITY : e;
    }
    free(y);
    double rel = maxerr / (maxg > 0 ? maxg : 1.0);
    char detail[128];
    snprintf(detail, sizeof detail, "finite-difference err %.1e", rel);
    report(rel <= TOL_FD, grad_op, label, detail);
}

/* ---- naive references ------------------------------------------------------------------------ */

static void ref_fill(const tcase *t, double *const *in, double *out) {
    (void)in;
    for (int64_t i = 0; i < numel(&t->call.out_shape); i++) out[i] = t->call.attrs.f[0];
}

/* Element (i, j) of op(X) for X stored [r, c] row-major. */
static double opel(const double *X, int64_t c, bool tr, int64_t i, int64_t j) {
    return tr ? X[j * c + i] : X[i * c + j];
}

static void ref_matmul(const tcase *t, double *const *in, double *out) {
    const ap_shape *sa = &t->call.src_shape[0], *sb = &t->call.src_shape[1];
    bool ta = t->call.attrs.i[0], tb = t->call.attrs.i[1];
    int64_t ca = sa->dim[sa->ndim - 1], ra = numel(sa) / ca;
    int64_t cb = sb->dim[sb->ndim - 1], rb = numel(sb) / cb;
    int64_t m = ta ? ca : ra, k = ta ? ra : ca, n = tb ? rb : cb;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double s = 0;
            for (int64_t p = 0; p < k; p++) s += opel(in[0], ca, ta, i, p) * opel(in[1], cb, tb, p, j);
            out[i * n + j] = s;
        }
}

static void ref_bmm(const tcase *t, double *const *in, double *out) {
    const ap_shape *sa = &t->call.src_shape[0], *sb = &t->call.src_shape[1];
    bool ta = t->call.attrs.i[0], tb = t->call.attrs.i[1];
    int64_t ra = sa->dim[sa->ndim - 2], ca = sa->dim[sa->ndim - 1];
    int64_t rb = sb->dim[sb->ndim - 2], cb = sb->dim[sb->ndim - 1];
    int64_t m = ta ? ca : ra, k = ta ? ra : ca, n = tb ? rb : cb;
    int64_t batch = numel(sa) / (ra * ca);
    for (int64_t b = 0; b < batch; b++)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                double s = 0;
                for (int64_t p = 0; p < k; p++)
                    s += opel(in[0] + b * ra * ca, ca, ta, i, p) *
                         opel(in[1] + b * rb * cb, cb, tb, p, j);
                out[b * m * n + i * n + j] = s;
            }
}

static void ref_binary(const tcase *t, double *const *in, double *out) {
    const ap_shape *sa = &t->call.src_shape[0], *sb = &t->call.src_shape[1];
    int64_t idx[AP_MAX_DIMS];
    for (int64_t i = 0; i < numel(sa); i++) {
        unravel(i, sa, idx);
        double a = in[0][i], b = in[1][ravel(idx + (sa->ndim - sb->ndim), sb)];
        out[i] = t->call.op == AP_OP_ADD ? a + b : t->call.op == AP_OP_SUB ? a - b : a * b;
    }
}

static double gelu(double x) {
    return 0.5 * x * (1 + tanh(sqrt(2 / PI_D) * (x + 0.044715 * x * x * x)));
}
static double gelu_grad(double x) { /* written with sech^2 = 1 / cosh^2 */
    double u = sqrt(2 / PI_D) * (x + 0.044715 * x * x * x), ch = cosh(u);
    return 0.5 * (1 + tanh(u)) + 0.5 * x * sqrt(2 / PI_D) * (1 + 3 * 0.044715 * x * x) / (ch * ch);
}

static void ref_unary(const tcase *t, double *const *in, double *out) {
    const double *f = t->call.attrs.f;
    for (int64_t i = 0; i < numel(&t->call.out_shape); i++) {
        double a = in[0][i], b = t->call.n_src > 1 ? in[1][i] : 0;
        switch (t->call.op) {
        case AP_OP_SCALE: out[i] = a * f[0]; break;
        case AP_OP_RELU: out[i] = a > 0 ? a : 0; break;
        case AP_OP_GELU: out[i] = gelu(a); break;
        case AP_OP_RELU_BACK: out[i] = b > 0 ? a : 0; break;
        case AP_OP_GELU_BACK: out[i] = a * gelu_grad(b); break;
        case AP_OP_SGD_UPDATE: out[i] = a - f[0] * (b + f[1] * a); break;
        case AP_OP_MOMENTUM_UPDATE: out[i] = f[0] * a + b; break;
        case AP_OP_ADAM_M: out[i] = f[0] * a + (1 - f[0]) * b; break;
        case AP_OP_ADAM_V: out[i] = f[0] * a + (1 - f[0]) * b * b; break;
        case AP_OP_ADAMW_UPDATE: {
            double tt = (double)t->call.step;
            double mhat = b / (1 - pow(f[1], tt)), vhat = in[2][i] / (1 - pow(f[2], tt));
            out[i] = a - f[0] * (mhat / (sqrt(vhat) + f[3]) + f[4] * a);
            break;
        }
        default: out[i] = NAN;
        }
    }
}

/* Row statistics, naive two-pass. */
static void naive_stats(const double *x, int64_t C, double eps, double *mean, double *rstd) {
    double s = 0;
    for (int64_t j = 0; j < C; j++) s += x[j];
    double m = s / (double)C, v = 0;
    for (int64_t j = 0; j < C; j++) v += (x[j] - m) * (x[j] - m);
    *mean = m;
    *rstd = 1 / sqrt(v / (double)C + eps);
}

static void ref_layernorm(const tcase *t, double *const *in, double *out) {
    const ap_shape *s = &t->call.src_shape[0];
    int64_t C = s->dim[s->ndim - 1], rows = numel(s) / C;
    for (int64_t r = 0; r < rows; r++) {
        double m, rs;
        naive_stats(in[0] + r * C, C, t->call.attrs.f[0], &m, &rs);
        for (int64_t j = 0; j < C; j++)
            out[r * C + j] = (in[0][r * C + j] - m) * rs * in[1][j] + in[2][j];
    }
}

/* dX through the explicit Jacobian d xhat_j / d x_i = rstd (delta_ij - 1/C - xhat_i xhat_j / C). */
static void ref_layernorm_back(const tcase *t, double *const *in, double *out) {
    const ap_shape *s = &t->call.src_shape[1];
    int64_t C = s->dim[s->ndim - 1], rows = numel(s) / C;
    for (int64_t r = 0; r < rows; r++) {
        const double *x = in[1] + r * C, *dy = in[0] + r * C;
        double m, rs;
        naive_stats(x, C, t->call.attrs.f[0], &m, &rs);
        for (int64_t i = 0; i < C; i++) {
            double xi = (x[i] - m) * rs, acc = 0;
            for (int64_t j = 0; j < C; j++) {
                double xj = (x[j] - m) * rs;
                acc += in[2][j] * dy[j] * rs * ((i == j) - 1.0 / (double)C - xi * xj / (double)C);
            }
            out[r * C + i] = acc;
        }
    }
}

static void ref_layernorm_back_gain(const tcase *t, double *const *in, double *out) {
    const ap_shape *s = &t->call.src_shape[1];
    int64_t C = s->dim[s->ndim - 1], rows = numel(s) / C;
    for (int64_t j = 0; j < C; j++) out[j] = 0;
    for (int64_t r = 0; r < rows; r++) {
        double m, rs;
        naive_stats(in[1] + r * C, C, t->call.attrs.f[0], &m, &rs);
        for (int64_t j = 0; j < C; j++) out[j] += in[0][r * C + j] * (in[1][r * C + j] - m) * rs;
    }
}

static void ref_softmax(const tcase *t, double *const *in, double *out) {
    const ap_shape *s = &t->call.src_shape[0];
    int64_t C = s->dim[s->ndim - 1], rows = numel(s) / C;
    int64_t idx[AP_MAX_DIMS];
    for (int64_t r = 0; r < rows; r++) {
        unravel(r * C, s, idx);
        int64_t i = (s->ndim >= 2 ? idx[s->ndim - 2] : 0) + t->call.attrs.i[1];   /* row offset */
        double sum = 0;
        for (int64_t j = 0; j < C; j++) {
            bool masked = t->call.attrs.i[0] && j > i;
            out[r * C + j] = masked ? 0 : exp(in[0][r * C + j]);
            sum += out[r * C + j];
        }
        for (int64_t j = 0; j < C; j++) out[r * C + j] /= sum;
    }
}

/* dx_i = sum_j dy_j * dy_j/dx_i with the softmax Jacobian y_j (delta_ij - y_i). */
static void ref_softmax_back(const tcase *t, double *const *in, double *out) {
    const ap_shape *s = &t->call.src_shape[0];
    int64_t C = s->dim[s->ndim - 1], rows = numel(s) / C;
    for (int64_t r = 0; r < rows; r++) {
        const double *y = in[0] + r * C, *dy = in[1] + r * C;
        for (int64_t i = 0; i < C; i++) {
            double acc = 0;
            for (int64_t j = 0; j < C; j++) acc += dy[j] * y[j] * ((i == j) - y[i]);
            out[r * C + i] = acc;
        }
    }
}

static void ref_copy(const tcase *t, double *const *in, double *out) {
    for (int64_t i = 0; i < numel(&t->call.out_shape); i++) out[i] = in[0][i];
}

static void ref_permute(const tcase *t, double *const *in, double *out) {
    const ap_shape *so = &t->call.out_shape, *si = &t->call.src_shape[0];
    int64_t oi[AP_MAX_DIMS], ii[AP_MAX_DIMS];
    for (int64_t i = 0; i < numel(so); i++) {
        unravel(i, so, oi);
        for (int d = 0; d < so->ndim; d++) ii[t->call.attrs.i[d]] = oi[d];
        out[i] = in[0][ravel(ii, si)];
    }
}

static void ref_slice(const tcase *t, double *const *in, double *out) {
    const ap_shape *so = &t->call.out_shape, *si = &t->call.src_shape[0];
    int64_t idx[AP_MAX_DIMS] = {0}, ax = t->call.attrs.i[0];
    for (int64_t i = 0; i < numel(so); i++) {
        unravel(i, so, idx);
        idx[ax] += t->call.attrs.i[1];
        out[i] = in[0][ravel(idx, si)];
    }
}

static void ref_slice_back(const tcase *t, double *const *in, double *out) {
    const ap_shape *so = &t->call.out_shape, *si = &t->call.src_shape[0];
    int64_t idx[AP_MAX_DIMS] = {0}, ax = t->call.attrs.i[0], start = t->call.attrs.i[1];
    for (int64_t i = 0; i < numel(so); i++) {
        unravel(i, so, idx);
        int64_t p = idx[ax] - start;
        if (p < 0 || p >= si->dim[ax]) {
            out[i] = 0;
        } else {
            idx[ax] = p;
            out[i] = in[0][ravel(idx, si)];
        }
    }
}

static void ref_concat(const tcase *t, double *const *in, double *out) {
    const ap_shape *so = &t->call.out_shape;
    int64_t idx[AP_MAX_DIMS] = {0}, ax = t->call.attrs.i[0];
    for (int64_t i = 0; i < numel(so); i++) {
        unravel(i, so, idx);
        int k = 0;
        while (idx[ax] >= t->call.src_shape[k].dim[ax]) idx[ax] -= t->call.src_shape[k++].dim[ax];
        out[i] = in[k][ravel(idx, &t->call.src_shape[k])];
    }
}

/* With attrs.i[1] > 0 the table is rows [attrs.i[0], + rows) of the vocabulary. */
static void ref_embedding(const tcase *t, double *const *in, double *out) {
    int64_t C = t->call.src_shape[0].dim[1], n = numel(&t->call.src_shape[1]);
    int64_t rows = t->call.src_shape[0].dim[0], v0 = t->call.attrs.i[1] > 0 ? t->call.attrs.i[0] : 0;
    for (int64_t p = 0; p < n; p++) {
        int64_t r = t->ids[1][p] - v0;
        for (int64_t j = 0; j < C; j++) out[p * C + j] = r >= 0 && r < rows ? in[0][r * C + j] : 0;
    }
}

static void ref_embedding_back(const tcase *t, double *const *in, double *out) {
    int64_t V = t->call.out_shape.dim[0], C = t->call.out_shape.dim[1];
    int64_t n = numel(&t->call.src_shape[1]);
    for (int64_t v = 0; v < V; v++)
        for (int64_t j = 0; j < C; j++) {
            double s = 0;
            for (int64_t p = 0; p < n; p++)
                if (t->ids[1][p] == v) s += in[0][p * C + j];
            out[v * C + j] = s;
        }
}

static void ref_sum_mean(const tcase *t, double *const *in, double *out) {
    const ap_shape *si = &t->call.src_shape[0];
    int64_t ax = t->call.attrs.i[0], idx[AP_MAX_DIMS], oidx[AP_MAX_DIMS];
    int64_t no = numel(&t->call.out_shape);
    for (int64_t i = 0; i < no; i++) out[i] = 0;
    for (int64_t i = 0; i < numel(si); i++) {
        if (ax < 0) {
            out[0] += in[0][i];
            continue;
        }
        unravel(i, si, idx);
        int d2 = 0;
        for (int d = 0; d < si->ndim; d++)
            if (d != ax) oidx[d2++] = idx[d];
        out[ravel(oidx, &t->call.out_shape)] += in[0][i];
    }
    if (t->call.op == AP_OP_MEAN) {
        double cnt = ax < 0 ? (double)numel(si) : (double)si->dim[ax];
        for (int64_t i = 0; i < no; i++) out[i] /= cnt;
    }
}

static void ref_sum_to(const tcase *t, double *const *in, double *out) {
    const ap_shape *si = &t->call.src_shape[0], *so = &t->call.out_shape;
    int64_t idx[AP_MAX_DIMS];
    for (int64_t i = 0; i < numel(so); i++) out[i] = 0;
    for (int64_t i = 0; i < numel(si); i++) {
        unravel(i, si, idx);
        out[ravel(idx + (si->ndim - so->ndim), so)] += in[0][i];
    }
}

static void ref_expand(const tcase *t, double *const *in, double *out) {
    const ap_shape *so = &t->call.out_shape, *si = &t->call.src_shape[0];
    int64_t ax = t->call.attrs.i[0], idx[AP_MAX_DIMS] = {0}, aidx[AP_MAX_DIMS] = {0};
    for (int64_t i = 0; i < numel(so); i++) {
        if (ax < 0) {
            out[i] = in[0][0] * t->call.attrs.f[0];
            continue;
        }
        unravel(i, so, idx);
        int d2 = 0;
        for (int d = 0; d < so->ndim; d++)
            if (d != ax) aidx[d2++] = idx[d];
        out[i] = in[0][ravel(aidx, si)] * t->call.attrs.f[0];
    }
}

static void ref_mse(const tcase *t, double *const *in, double *out) {
    int64_t n = numel(&t->call.src_shape[0]);
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (in[0][i] - in[1][i]) * (in[0][i] - in[1][i]);
    out[0] = s / (double)n;
}

static void ref_mse_back(const tcase *t, double *const *in, double *out) {
    int64_t n = numel(&t->call.out_shape);
    for (int64_t i = 0; i < n; i++) out[i] = in[0][0] * 2 * (in[1][i] - in[2][i]) / (double)n;
}

static void ref_ce(const tcase *t, double *const *in, double *out) {
    const ap_shape *s = &t->call.src_shape[0];
    int64_t V = s->dim[s->ndim - 1], rows = numel(s) / V;
    double tot = 0;
    for (int64_t r = 0; r < rows; r++) {
        double z = 0;
        for (int64_t j = 0; j < V; j++) z += exp(in[0][r * V + j]);
        tot += -log(exp(in[0][r * V + t->ids[1][r]]) / z);
    }
    out[0] = tot / (double)rows;
}

static void ref_ce_back(const tcase *t, double *const *in, double *out) {
    const ap_shape *s = &t->call.src_shape[1];
    int64_t V = s->dim[s->ndim - 1], rows = numel(s) / V;
    for (int64_t r = 0; r < rows; r++) {
        double z = 0;
        for (int64_t j = 0; j < V; j++) z += exp(in[1][r * V + j]);
        for (int64_t j = 0; j < V; j++)
            out[r * V + j] = in[0][0] *
                             (exp(in[1][r * V + j]) / z - (j == t->ids[2][r] ? 1.0 : 0.0)) /
                             (double)rows;
    }
}

/* Vocabulary-parallel pieces: columns [v0, v0 + Vl) of a vocabulary attrs.i[1]. */
static void ref_ce_partial(const tcase *t, double *const *in, double *out) {
    const ap_shape *s = &t->call.src_shape[0];
    int64_t Vl = s->dim[s->ndim - 1], rows = numel(s) / Vl, v0 = t->call.attrs.i[0];
    for (int64_t r = 0; r < rows; r++) {
        double m = -INFINITY, z = 0;
        for (int64_t j = 0; j < Vl; j++) m = fmax(m, in[0][r * Vl + j]);
        for (int64_t j = 0; j < Vl; j++) z += exp(in[0][r * Vl + j] - m);
        int64_t c = t->ids[1][r] - v0;
        out[3 * r] = m;
        out[3 * r + 1] = z;
        out[3 * r + 2] = c >= 0 && c < Vl ? in[0][r * Vl + c] : 0.0;
    }
}

static void ref_ce_combine(const tcase *t, double *const *in, double *out) {
    const ap_shape *s = &t->call.src_shape[0];
    int64_t P = s->dim[0], rows = numel(s) / (3 * P);
    double tot = 0;
    for (int64_t r = 0; r < rows; r++) {
        double m = -INFINITY, z = 0, xt = 0;
        for (int64_t p = 0; p < P; p++) m = fmax(m, in[0][(p * rows + r) * 3]);
        for (int64_t p = 0; p < P; p++) {
            z += in[0][(p * rows + r) * 3 + 1] * exp(in[0][(p * rows + r) * 3] - m);
            xt += in[0][(p * rows + r) * 3 + 2];
        }
        if (t->call.attrs.i[0] == 1) {
            out[2 * r] = m;
            out[2 * r + 1] = z;
        }
        tot += log(z) + m - xt;
    }
    if (t->call.attrs.i[0] == 0) out[0] = tot / (double)rows;
}

static void ref_ce_back_partial(const tcase *t, double *const *in, double *out) {
    const ap_shape *s = &t->call.src_shape[1];
    int64_t Vl = s->dim[s->ndim - 1], rows = numel(s) / Vl, v0 = t->call.attrs.i[0];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < Vl; j++)
            out[r * Vl + j] = in[0][0] *
                              (exp(in[1][r * Vl + j] - in[3][2 * r]) / in[3][2 * r + 1] -
                               (j + v0 == t->ids[2][r] ? 1.0 : 0.0)) / (double)rows;
}

/* ---- test groups ------------------------------------------------------------------------------ */

static void simple(ap_op op, const char *label, ap_shape out, ref_fn ref, int n_src,
                   const ap_shape *srcs, double lo, double hi) {
    tcase t;
    tc_init(&t, op, label, out);
    for (int k = 0; k < n_src; k++) tc_src(&t, srcs[k], lo, hi);
    check(&t, ref, false);
    tc_free(&t);
}

static void test_fill(void) {
    tcase t;
    tc_init(&t, AP_OP_FILL, "[3,5] = 1.25", SH(3, 5));
    t.call.attrs.f[0] = 1.25;
    check(&t, ref_fill, false);
    tc_init(&t, AP_OP_FILL, "rank 0 = -0.5", SCALAR);
    t.call.attrs.f[0] = -0.5;
    check(&t, ref_fill, false);
}

static void mm_case(ap_op op, ap_shape a, ap_shape b, ap_shape out, int ta, int tb) {
    char l[160], s1[32], s2[32];
    snprintf(l, sizeof l, "%s%s %s x %s", ta ? "T" : "N", tb ? "T" : "N", shape_txt(&a, s1, 32),
             shape_txt(&b, s2, 32));
    tcase t;
    tc_init(&t, op, l, out);
    t.call.attrs.i[0] = ta;
    t.call.attrs.i[1] = tb;
    tc_src(&t, a, -1, 1);
    tc_src(&t, b, -1, 1);
    check(&t, op == AP_OP_MATMUL ? ref_matmul : ref_bmm, false);
    tc_free(&t);
}

static void test_matmul(void) {
    mm_case(AP_OP_MATMUL, SH(5, 7), SH(7, 3), SH(5, 3), 0, 0);
    mm_case(AP_OP_MATMUL, SH(2, 3, 7), SH(7, 5), SH(2, 3, 5), 0, 0);
    mm_case(AP_OP_MATMUL, SH(7, 5), SH(7, 3), SH(5, 3), 1, 0);
    mm_case(AP_OP_MATMUL, SH(3, 3, 5), SH(9, 3), SH(5, 3), 1, 0); /* x^T dy on rank-3 x */
    mm_case(AP_OP_MATMUL, SH(5, 7), SH(3, 7), SH(5, 3), 0, 1);
    mm_case(AP_OP_MATMUL, SH(2, 3, 7), SH(5, 7), SH(2, 3, 5), 0, 1); /* dy W^T */
    mm_case(AP_OP_MATMUL, SH(7, 5), SH(3, 7), SH(5, 3), 1, 1);
    mm_case(AP_OP_MATMUL, SH(7), SH(7, 3), SH(3), 0, 0); /* rank-1 A is a [1, 7] row */
    mm_case(AP_OP_MATMUL, SH(33, 65), SH(65, 17), SH(33, 17), 0, 0);
    mm_case(AP_OP_BATCH_MATMUL, SH(3, 5, 7), SH(3, 7, 4), SH(3, 5, 4), 0, 0);
    mm_case(AP_OP_BATCH_MATMUL, SH(3, 5, 7), SH(3, 4, 7), SH(3, 5, 4), 0, 1);
    mm_case(AP_OP_BATCH_MATMUL, SH(3, 7, 5), SH(3, 7, 4), SH(3, 5, 4), 1, 0);
    mm_case(AP_OP_BATCH_MATMUL, SH(3, 7, 5), SH(3, 4, 7), SH(3, 5, 4), 1, 1);
    mm_case(AP_OP_BATCH_MATMUL, SH(2, 3, 5, 7), SH(2, 3, 7, 4), SH(2, 3, 5, 4), 0, 0);
    mm_case(AP_OP_BATCH_MATMUL, SH(2, 3, 5, 7), SH(2, 3, 5, 7), SH(2, 3, 5, 5), 0, 1); /* q k^T */
    mm_case(AP_OP_BATCH_MATMUL, SH(2, 3, 5, 7), SH(2, 3, 5, 4), SH(2, 3, 7, 4), 1, 0);
}

static void bin_case(ap_op op, ap_shape a, ap_shape b) {
    char l[160], s1[32], s2[32];
    snprintf(l, sizeof l, "%s with %s", shape_txt(&a, s1, 32), shape_txt(&b, s2, 32));
    ap_shape srcs[2] = {a, b};
    simple(op, l, a, ref_binary, 2, srcs, -1, 1);
}

static void test_binary(void) {
    bin_case(AP_OP_ADD, SH(3, 5, 7), SH(3, 5, 7));
    bin_case(AP_OP_ADD, SH(3, 5, 7), SH(7));
    bin_case(AP_OP_ADD, SH(3, 5, 7), SCALAR);
    bin_case(AP_OP_ADD, SH(2, 3, 5, 7), SH(5, 7));
    bin_case(AP_OP_SUB, SH(3, 5, 7), SH(3, 5, 7));
    bin_case(AP_OP_SUB, SH(3, 5, 7), SH(5, 7));
    bin_case(AP_OP_MUL, SH(3, 5, 7), SH(3, 5, 7));
    bin_case(AP_OP_MUL, SH(3, 5, 7), SH(7));
    bin_case(AP_OP_MUL, SH(5, 7), SCALAR);
}

static void test_elementwise(void) {
    ap_shape s = SH(3, 5, 7), ss[3] = {SH(3, 5, 7), SH(3, 5, 7), SH(3, 5, 7)};
    tcase t;
    tc_init(&t, AP_OP_SCALE, "[3,5,7] * -0.75", s);
    t.call.attrs.f[0] = -0.75;
    tc_src(&t, s, -1, 1);
    check(&t, ref_unary, false);
    tc_free(&t);
    simple(AP_OP_RELU, "[3,5,7]", s, ref_unary, 1, ss, -1, 1);
    simple(AP_OP_GELU, "[3,5,7] in [-4,4]", s, ref_unary, 1, ss, -4, 4);
    simple(AP_OP_GELU, "[101] in [-4,4]", SH(101), ref_unary, 1, (ap_shape[]){SH(101)}, -4, 4);
    simple(AP_OP_GELU, "[3,5,7] in [-30,30] (saturation)", s, ref_unary, 1, ss, -30, 30);
    simple(AP_OP_RELU_BACK, "[3,5,7]", s, ref_unary, 2, ss, -1, 1);
    simple(AP_OP_GELU_BACK, "[3,5,7] in [-4,4]", s, ref_unary, 2, ss, -4, 4);
    simple(AP_OP_GELU_BACK, "[3,5,7] in [-30,30] (saturation)", s, ref_unary, 2, ss, -30, 30);

    /* GELU_BACK against finite differences of GELU. */
    tc_init(&t, AP_OP_GELU_BACK, "fd check vs gelu", s);
    double *dy = tc_src(&t, s, -1, 1), *x = tc_src(&t, s, -4, 4);
    double *g = check(&t, ref_unary, true);
    tcase f;
    tc_init(&f, AP_OP_GELU, "", s);
    tc_alias(&f, s, x);
    fd_check(&f, ref_unary, 0, dy, g, AP_OP_GELU_BACK, "finite differences of gelu");
    free(g);
    tc_free(&t);
}

static void test_optimizers(void) {
    ap_shape s = SH(5, 7);
    tcase t;
    tc_init(&t, AP_OP_SGD_UPDATE, "lr 0.1 wd 0.01", s);
    t.call.attrs.f[0] = 0.1;
    t.call.attrs.f[1] = 0.01;
    tc_src(&t, s, -1, 1);
    tc_src(&t, s, -1, 1);
    check(&t, ref_unary, false);
    tc_free(&t);

    tc_init(&t, AP_OP_MOMENTUM_UPDATE, "mu 0.9", s);
    t.call.attrs.f[0] = 0.9;
    tc_src(&t, s, -1, 1);
    tc_src(&t, s, -1, 1);
    check(&t, ref_unary, false);
    tc_free(&t);

    tc_init(&t, AP_OP_ADAM_M, "b1 0.9", s);
    t.call.attrs.f[0] = 0.9;
    tc_src(&t, s, -1, 1);
    tc_src(&t, s, -1, 1);
    check(&t, ref_unary, false);
    tc_free(&t);

    tc_init(&t, AP_OP_ADAM_V, "b2 0.999", s);
    t.call.attrs.f[0] = 0.999;
    tc_src(&t, s, 0, 1);
    tc_src(&t, s, -1, 1);
    check(&t, ref_unary, false);
    tc_free(&t);

    for (int64_t step = 1; step <= 7; step += 6) {
        char l[160];
        snprintf(l, sizeof l, "step %lld lr 1e-2 b 0.9/0.999 eps 1e-8 wd 0.1", (long long)step);
        tc_init(&t, AP_OP_ADAMW_UPDATE, l, s);
        t.call.step = step;
        t.call.attrs.f[0] = 1e-2;
        t.call.attrs.f[1] = 0.9;
        t.call.attrs.f[2] = 0.999;
        t.call.attrs.f[3] = 1e-8;
        t.call.attrs.f[4] = 0.1;
        tc_src(&t, s, -1, 1);
        tc_src(&t, s, -0.1, 0.1);
        tc_src(&t, s, 1e-4, 1e-2);
        check(&t, ref_unary, false);
        tc_free(&t);
    }
}

static void test_layernorm(void) {
    const ap_shape xs[2] = {SH(3, 5, 7), SH(4, 37)};
    for (int v = 0; v < 2; v++) {
        ap_shape x = xs[v], c = SH(x.dim[x.ndim - 1]);
        char l[160], sb[32];
        snprintf(l, sizeof l, "%s eps 1e-5", shape_txt(&x, sb, 32));
        tcase t;
        tc_init(&t, AP_OP_LAYERNORM, l, x);
        t.call.attrs.f[0] = 1e-5;
        double *xv = tc_src(&t, x, -2, 2), *gv = tc_src(&t, c, 0.5, 1.5);
        tc_src(&t, c, -1, 1);
        check(&t, ref_layernorm, false);
        tcase fwd = t; /* forward case for the finite-difference checks (shares t's arrays) */

        tcase b;
        tc_init(&b, AP_OP_LAYERNORM_BACK, l, x);
        b.call.attrs.f[0] = 1e-5;
        double *dy = tc_src(&b, x, -1, 1);
        tc_alias(&b, x, xv);
        tc_alias(&b, c, gv);
        double *dx = check(&b, ref_layernorm_back, true);
        fd_check(&fwd, ref_layernorm, 0, dy, dx, AP_OP_LAYERNORM_BACK,
                 "finite differences of layernorm (x)");
        free(dx);

        tcase bg;
        tc_init(&bg, AP_OP_LAYERNORM_BACK_GAIN, l, c);
        bg.call.attrs.f[0] = 1e-5;
        tc_alias(&bg, x, dy);
        tc_alias(&bg, x, xv);
        double *dg = check(&bg, ref_layernorm_back_gain, true);
        fd_check(&fwd, ref_layernorm, 1, dy, dg, AP_OP_LAYERNORM_BACK_GAIN,
                 "finite differences of layernorm (gain)");
        free(dg);
        tc_free(&b);
        tc_free(&t);
    }
}

static void test_softmax(void) {
    const ap_shape xs[5] = {SH(3, 5, 7), SH(7, 7), SH(2, 3, 5, 5), SH(3, 37), SH(3, 37)};
    const int causal[5] = {0, 1, 1, 0, 0};
    const double range[5] = {3, 3, 3, 3, 100}; /* inputs in [-range, range] */
    for (int v = 0; v < 5; v++) {
        ap_shape x = xs[v];
        char l[160], sb[32];
        snprintf(l, sizeof l, "%s%s in [-%g,%g]", shape_txt(&x, sb, 32), causal[v] ? " causal" : "",
                 range[v], range[v]);
        tcase t;
        tc_init(&t, AP_OP_SOFTMAX, l, x);
        t.call.attrs.i[0] = causal[v];
        double *xv = tc_src(&t, x, -range[v], range[v]);
        check(&t, ref_softmax, false);

        /* SOFTMAX_BACK on Y = softmax(X), also against finite differences of softmax. */
        int64_t n = numel(&x);
        double *y = malloc(sizeof(double) * (size_t)n);
        ref_softmax(&t, t.in, y);
        tcase b;
        tc_init(&b, AP_OP_SOFTMAX_BACK, l, x);
        tc_alias(&b, x, y);
        double *dy = tc_src(&b, x, -1, 1);
        double *dx = check(&b, ref_softmax_back, true);
        fd_check(&t, ref_softmax, 0, dy, dx, AP_OP_SOFTMAX_BACK, "finite differences of softmax");
        (void)xv;
        free(dx);
        free(y);
        tc_free(&b);
        tc_free(&t);
    }
    /* A query-split causal softmax: rows [3, 6) of a [2, 7, 7] one (row offset 3), against the
     * reference with the offset and against those rows of the whole causal softmax. */
    tcase t;
    tc_init(&t, AP_OP_SOFTMAX, "[2,3,7] causal, query rows from 3", SH(2, 3, 7));
    t.call.attrs.i[0] = 1;
    t.call.attrs.i[1] = 3;
    double *xv = tc_src(&t, SH(2, 3, 7), -3, 3);
    double *got = check(&t, ref_softmax, true);
    tcase w;
    tc_init(&w, AP_OP_SOFTMAX, "", SH(2, 7, 7));
    w.call.attrs.i[0] = 1;
    double *xw = tc_src(&w, SH(2, 7, 7), 0, 0);
    for (int b = 0; b < 2; b++)
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 7; j++) xw[(b * 7 + 3 + i) * 7 + j] = xv[(b * 3 + i) * 7 + j];
    double yw[2 * 7 * 7], err = 0;
    ref_softmax(&w, w.in, yw);
    for (int b = 0; got && b < 2; b++)
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 7; j++)
                err = fmax(err, fabs(got[(b * 3 + i) * 7 + j] - yw[(b * 7 + 3 + i) * 7 + j]));
    char d[96];
    snprintf(d, sizeof d, "max err %.3g", err);
    report(got && err <= 1e-15, AP_OP_SOFTMAX, "== rows [3,6) of the whole causal softmax", d);
    free(got);
    tc_free(&w);
    tc_free(&t);
}

static void test_movement(void) {
    tcase t;
    tc_init(&t, AP_OP_RESHAPE, "[3,5,7] -> [15,7]", SH(15, 7));
    tc_src(&t, SH(3, 5, 7), -1, 1);
    check(&t, ref_copy, false);
    tc_free(&t);

    struct { ap_shape in; int perm[4]; } pc[] = {
        {SH(5, 7), {1, 0, 0, 0}},
        {SH(3, 5, 7), {2, 0, 1, 0}},
        {SH(3, 5, 7), {0, 2, 1, 0}},
        {SH(2, 3, 5, 7), {0, 2, 1, 3}},
        {SH(2, 3, 5, 7), {3, 1, 0, 2}},
        {SH(2, 3, 5, 7), {0, 1, 3, 2}},
    };
    for (size_t v = 0; v < sizeof pc / sizeof pc[0]; v++) {
        ap_shape o = pc[v].in;
        for (int d = 0; d < o.ndim; d++) o.dim[d] = pc[v].in.dim[pc[v].perm[d]];
        char l[160], sb[32];
        snprintf(l, sizeof l, "%s perm (%d,%d,%d,%d)", shape_txt(&pc[v].in, sb, 32), pc[v].perm[0],
                 pc[v].perm[1], pc[v].perm[2], pc[v].perm[3]);
        l[strlen(l) - 1 - 2 * (4 - o.ndim)] = '\0';
        strcat(l, ")");
        tc_init(&t, AP_OP_PERMUTE, l, o);
        for (int d = 0; d < o.ndim; d++) t.call.attrs.i[d] = pc[v].perm[d];
        tc_src(&t, pc[v].in, -1, 1);
        check(&t, ref_permute, false);
        tc_free(&t);
    }

    struct { ap_shape in; int axis; int64_t start, len; } sc[] = {
        {SH(3, 7, 5), 1, 2, 3}, {SH(7, 5), 0, 0, 4}, {SH(3, 5, 7), 2, 4, 3}, {SH(2, 3, 5, 7), 1, 1, 1},
    };
    for (size_t v = 0; v < sizeof sc / sizeof sc[0]; v++) {
        ap_shape o = sc[v].in;
        o.dim[sc[v].axis] = sc[v].len;
        char l[160], sb[32];
        snprintf(l, sizeof l, "%s axis %d [%lld, +%lld)", shape_txt(&sc[v].in, sb, 32), sc[v].axis,
                 (long long)sc[v].start, (long long)sc[v].len);
        tc_init(&t, AP_OP_SLICE, l, o);
        t.call.attrs.i[0] = sc[v].axis;
        t.call.attrs.i[1] = sc[v].start;
        t.call.attrs.i[2] = sc[v].len;
        double *xv = tc_src(&t, sc[v].in, -1, 1);
        check(&t, ref_slice, false);

        tcase b;
        tc_init(&b, AP_OP_SLICE_BACK, l, sc[v].in);
        b.call.attrs.i[0] = sc[v].axis;
        b.call.attrs.i[1] = sc[v].start;
        b.call.attrs.i[2] = sc[v].in.dim[sc[v].axis];
        double *dy = tc_src(&b, o, -1, 1);
        double *dx = check(&b, ref_slice_back, true);
        fd_check(&t, ref_slice, 0, dy, dx, AP_OP_SLICE_BACK, "adjoint of slice");
        (void)xv;
        free(dx);
        tc_free(&b);
        tc_free(&t);
    }

    struct { int n; ap_shape s[3]; int axis; } cc[] = {
        {3, {SH(3, 2, 5), SH(3, 3, 5), SH(3, 1, 5)}, 1},
        {2, {SH(2, 7), SH(5, 7)}, 0},
        {3, {SH(2, 3, 1), SH(2, 3, 4), SH(2, 3, 2)}, 2},
        {1, {SH(3, 5)}, 1},
    };
    for (size_t v = 0; v < sizeof cc / sizeof cc[0]; v++) {
        ap_shape o = cc[v].s[0];
        for (int k = 1; k < cc[v].n; k++) o.dim[cc[v].axis] += cc[v].s[k].dim[cc[v].axis];
        char l[160], sb[32];
        snprintf(l, sizeof l, "%d operands -> %s axis %d", cc[v].n, shape_txt(&o, sb, 32),
                 cc[v].axis);
        tc_init(&t, AP_OP_CONCAT, l, o);
        t.call.attrs.i[0] = cc[v].axis;
        for (int k = 0; k < cc[v].n; k++) tc_src(&t, cc[v].s[k], -1, 1);
        check(&t, ref_concat, false);
        tc_free(&t);
    }
}

/* Movement ops on I32 tensors (ids reshaped / permuted / sliced / concatenated): exact. */
static void test_movement_i32(void) {
    struct { ap_op op; ap_shape in, out; int64_t a0, a1, a2; ref_fn ref; int n_src; const char *l; } mc[] = {
        {AP_OP_RESHAPE, SH(3, 5), SH(15), 0, 0, 0, ref_copy, 1, "i32 [3,5] -> [15]"},
        {AP_OP_PERMUTE, SH(3, 5, 7), SH(7, 3, 5), 2, 0, 1, ref_permute, 1, "i32 [3,5,7] perm (2,0,1)"},
        {AP_OP_SLICE, SH(3, 7), SH(3, 4), 1, 2, 4, ref_slice, 1, "i32 [3,7] axis 1 [2, +4)"},
        {AP_OP_SLICE_BACK, SH(3, 4), SH(3, 7), 1, 2, 7, ref_slice_back, 1, "i32 [3,4] into [3,7]"},
        {AP_OP_CONCAT, SH(3, 4), SH(6, 4), 0, 0, 0, ref_concat, 2, "i32 2 x [3,4] axis 0"},
    };
    for (size_t v = 0; v < sizeof mc / sizeof mc[0]; v++) {
        tcase t;
        tc_init(&t, mc[v].op, mc[v].l, mc[v].out);
        t.call.out_dtype = AUTOPAR_I32;
        t.call.attrs.i[0] = mc[v].a0;
        t.call.attrs.i[1] = mc[v].a1;
        t.call.attrs.i[2] = mc[v].a2;
        double *dv[AP_MAX_SRC] = {0};
        for (int k = 0; k < mc[v].n_src; k++) {
            int32_t *ids = tc_ids(&t, mc[v].in, 1000000);
            int64_t n = numel(&mc[v].in);
            dv[k] = malloc(sizeof(double) * (size_t)n);
            for (int64_t i = 0; i < n; i++) dv[k][i] = ids[i] - 500000;
            for (int64_t i = 0; i < n; i++) ids[i] -= 500000;
        }
        int64_t no = numel(&mc[v].out);
        double *expect = malloc(sizeof(double) * (size_t)no);
        mc[v].ref(&t, dv, expect);
        bool ok = true;
        for (int pi = 0; pi < 2; pi++) {
            ap_kernel_call call = t.call;
            call.precision = pi ? AUTOPAR_PRECISION_F32 : AUTOPAR_PRECISION_F64;
            for (int k = 0; k < call.n_src; k++) call.src[k] = t.ids[k];
            int32_t *out = malloc(sizeof(int32_t) * (size_t)no);
            for (int64_t i = 0; i < no; i++) out[i] = 12345678;
            call.out = out;
            if (ap_cpu_run(&call) != AUTOPAR_OK) ok = false;
            for (int64_t i = 0; ok && i < no; i++)
                if ((double)out[i] != expect[i]) ok = false;
            free(out);
        }
        report(ok, mc[v].op, mc[v].l, ok ? "exact" : "mismatch or error");
        free(expect);
        for (int k = 0; k < mc[v].n_src; k++) free(dv[k]);
        tc_free(&t);
    }
}

static void test_embedding(void) {
    ap_shape table = SH(7, 5), ids = SH(3, 4), out = SH(3, 4, 5);
    tcase t;
    tc_init(&t, AP_OP_EMBEDDING, "table [7,5] ids [3,4]", out);
    double *tv = tc_src(&t, table, -1, 1);
    int32_t *iv = tc_ids(&t, ids, 7);
    iv[0] = 0;
    iv[1] = 6;
    iv[2] = iv[3] = 3; /* duplicates for the backward */
    check(&t, ref_embedding, false);

    tcase b;
    tc_init(&b, AP_OP_EMBEDDING_BACK, "dY [3,4,5] ids [3,4] -> [7,5]", table);
    b.call.attrs.i[0] = 7;
    double *dy = tc_src(&b, out, -1, 1);
    tc_alias_ids(&b, ids, iv);
    double *dt = check(&b, ref_embedding_back, true);
    fd_check(&t, ref_embedding, 0, dy, dt, AP_OP_EMBEDDING_BACK, "adjoint of embedding");
    free(dt);
    (void)tv;
    tc_free(&b);
    tc_free(&t);

    /* rows [3, 6) of a vocabulary of 7 (vocabulary-parallel lookup): other ids give zeros, and
     * the lookups of the blocks [0, 3), [3, 6), [6, 7) sum to the whole table's */
    tcase p;
    tc_init(&p, AP_OP_EMBEDDING, "rows [3,6) of 7, ids [3,4]", out);
    p.call.attrs.i[0] = 3;
    p.call.attrs.i[1] = 7;
    tc_src(&p, SH(3, 5), -1, 1);
    int32_t *pv = tc_ids(&p, ids, 7);
    pv[0] = 2;
    pv[1] = 3;
    pv[2] = 5;
    pv[3] = 6;
    check(&p, ref_embedding, false);
    tc_free(&p);
    {
        const int64_t cut[4] = {0, 3, 6, 7};
        double whole[60], sum[60] = {0};
        int32_t idv[12];
        for (int i = 0; i < 12; i++) idv[i] = (int32_t)(rng_next() % 7);
        float tab[35];
        for (int i = 0; i < 35; i++) tab[i] = (float)urand(-1, 1);
        bool ran = true;
        for (int b2 = 0; b2 < 3 && ran; b2++) {
            float f[35], o[60];
            int64_t nr = cut[b2 + 1] - cut[b2];
            for (int64_t i = 0; i < nr * 5; i++) f[i] = tab[cut[b2] * 5 + i];
            ap_kernel_call k;
            memset(&k, 0, sizeof k);
            k.op = AP_OP_EMBEDDING;
            k.precision = AUTOPAR_PRECISION_F32;
            k.name = "emb_block";
            k.out_shape = out;
            k.out_dtype = AUTOPAR_F32;
            k.n_src = 2;
            k.src_shape[0] = SH(nr, 5);
            k.src_dtype[0] = AUTOPAR_F32;
            k.src_shape[1] = ids;
            k.src_dtype[1] = AUTOPAR_I32;
            k.src[0] = f;
            k.src[1] = idv;
            k.out = o;
            k.attrs.i[0] = cut[b2];
            k.attrs.i[1] = 7;
            ran = ap_cpu_run(&k) == AUTOPAR_OK;
            for (int i = 0; ran && i < 60; i++) sum[i] += o[i];
        }
        for (int p2 = 0; p2 < 12; p2++)
            for (int j = 0; j < 5; j++) whole[p2 * 5 + j] = (double)tab[idv[p2] * 5 + j];
        double err = 0;
        for (int i = 0; i < 60; i++) err = fmax(err, fabs(sum[i] - whole[i]));
        char d[96];
        snprintf(d, sizeof d, "max err %.3g", err);
        report(ran && err == 0, AP_OP_EMBEDDING, "3 row blocks sum to the whole lookup", d);
    }
}

static void test_reductions(void) {
    const ap_shape s = SH(3, 5, 7);
    for (int op = 0; op < 2; op++)
        for (int ax = -1; ax < 3; ax++) {
            ap_shape o = SCALAR;
            if (ax >= 0) {
                o.ndim = 2;
                for (int d = 0, d2 = 0; d < 3; d++)
                    if (d != ax) o.dim[d2++] = s.dim[d];
            }
            char l[160];
            snprintf(l, sizeof l, "[3,5,7] %s%d", ax < 0 ? "all" : "axis ", ax < 0 ? 0 : ax);
            if (ax < 0) l[strlen(l) - 1] = '\0';
            tcase t;
            tc_init(&t, op ? AP_OP_MEAN : AP_OP_SUM, l, o);
            t.call.attrs.i[0] = ax;
            tc_src(&t, s, -1, 1);
            check(&t, ref_sum_mean, false);
            tc_free(&t);
        }
    tcase t;
    tc_init(&t, AP_OP_SUM, "[3,4,700] axis 1 (wide inner)", SH(3, 700));
    t.call.attrs.i[0] = 1;
    tc_src(&t, SH(3, 4, 700), -1, 1);
    check(&t, ref_sum_mean, false);
    tc_free(&t);
    tc_init(&t, AP_OP_MEAN, "[1003] all", SCALAR);
    t.call.attrs.i[0] = -1;
    tc_src(&t, SH(1003), -1, 1);
    check(&t, ref_sum_mean, false);
    tc_free(&t);

    /* SUM_TO, and as the adjoint of a broadcast ADD (gradient of the broadcast operand). */
    struct { ap_shape a, o; } st[] = {
        {SH(3, 5, 7), SH(7)}, {SH(3, 5, 7), SH(5, 7)}, {SH(3, 5, 7), SH(3, 5, 7)},
        {SH(9, 1100), SH(1100)}, {SH(4, 5), SCALAR},
    };
    for (size_t v = 0; v < sizeof st / sizeof st[0]; v++) {
        char l[160], s1[32], s2[32];
        snprintf(l, sizeof l, "%s -> %s", shape_txt(&st[v].a, s1, 32), shape_txt(&st[v].o, s2, 32));
        tc_init(&t, AP_OP_SUM_TO, l, st[v].o);
        double *w = tc_src(&t, st[v].a, -1, 1);
        double *g = check(&t, ref_sum_to, true);
        tcase f;
        tc_init(&f, AP_OP_ADD, "", st[v].a);
        tc_src(&f, st[v].a, -1, 1);
        tc_src(&f, st[v].o, -1, 1);
        fd_check(&f, ref_binary, 1, w, g, AP_OP_SUM_TO, "adjoint of broadcast add");
        free(g);
        tc_free(&f);
        tc_free(&t);
    }

    /* EXPAND, and as the adjoint of SUM over the same axis (times fa[0]). */
    struct { ap_shape o; int axis; } ec[] = {
        {SH(3, 5, 7), 0}, {SH(3, 5, 7), 1}, {SH(3, 5, 7), 2}, {SH(3, 5), -1},
    };
    for (size_t v = 0; v < sizeof ec / sizeof ec[0]; v++) {
        ap_shape a = SCALAR;
        if (ec[v].axis >= 0) {
            a.ndim = ec[v].o.ndim - 1;
            for (int d = 0, d2 = 0; d < ec[v].o.ndim; d++)
                if (d != ec[v].axis) a.dim[d2++] = ec[v].o.dim[d];
        }
        char l[160], s1[32], s2[32];
        snprintf(l, sizeof l, "%s -> %s axis %d x0.5", shape_txt(&a, s1, 32),
                 shape_txt(&ec[v].o, s2, 32), ec[v].axis);
        tc_init(&t, AP_OP_EXPAND, l, ec[v].o);
        t.call.attrs.i[0] = ec[v].axis;
        t.call.attrs.f[0] = 0.5;
        double *w = tc_src(&t, a, -1, 1);
        double *g = check(&t, ref_expand, true);
        tcase f;
        tc_init(&f, AP_OP_SUM, "", a);
        f.call.attrs.i[0] = ec[v].axis;
        tc_src(&f, ec[v].o, -1, 1);
        double w2[64];
        for (int64_t i = 0; i < numel(&a); i++) w2[i] = 0.5 * w[i];
        fd_check(&f, ref_sum_mean, 0, w2, g, AP_OP_EXPAND, "adjoint of sum (x0.5)");
        free(g);
        tc_free(&f);
        tc_free(&t);
    }
}

static void test_losses(void) {
    ap_shape s = SH(5, 7);
    tcase t;
    tc_init(&t, AP_OP_MSE_LOSS, "[5,7]", SCALAR);
    double *p = tc_src(&t, s, -1, 1);
    double *tg = tc_src(&t, s, -1, 1);
    check(&t, ref_mse, false);

    tcase b;
    tc_init(&b, AP_OP_MSE_LOSS_BACK, "dL 0.7, [5,7]", s);
    double *dl = tc_src(&b, SCALAR, 0.7, 0.7);
    tc_alias(&b, s, p);
    tc_alias(&b, s, tg);
    double *g = check(&b, ref_mse_back, true);
    fd_check(&t, ref_mse, 0, dl, g, AP_OP_MSE_LOSS_BACK, "finite differences of mse");
    free(g);
    tc_free(&b);
    tc_free(&t);

    const ap_shape ls[3] = {SH(3, 5, 7), SH(4, 37), SH(4, 37)};
    const double range[3] = {3, 3, 50}; /* logits in [-range, range] */
    for (int v = 0; v < 3; v++) {
        ap_shape lab = ls[v];
        lab.ndim--;
        int64_t V = ls[v].dim[ls[v].ndim - 1];
        char l[160], sb[32];
        snprintf(l, sizeof l, "logits %s in [-%g,%g]", shape_txt(&ls[v], sb, 32), range[v],
                 range[v]);
        tc_init(&t, AP_OP_CROSS_ENTROPY, l, SCALAR);
        double *x = tc_src(&t, ls[v], -range[v], range[v]);
        int32_t *lv = tc_ids(&t, lab, (int32_t)V);
        lv[0] = 0;
        lv[1] = (int32_t)V - 1;
        check(&t, ref_ce, false);

        tc_init(&b, AP_OP_CROSS_ENTROPY_BACK, l, ls[v]);
        dl = tc_src(&b, SCALAR, 1.3, 1.3);
        tc_alias(&b, ls[v], x);
        tc_alias_ids(&b, lab, lv);
        g = check(&b, ref_ce_back, true);
        fd_check(&t, ref_ce, 0, dl, g, AP_OP_CROSS_ENTROPY_BACK,
                 "finite differences of cross_entropy");
        free(g);
        tc_free(&b);
        tc_free(&t);
    }
}

/* The vocabulary-parallel pieces against their naive references, then composed over column
 * blocks [0, 20) and [20, 37) of logits [4, 37] (F64 kernels): the combined loss, statistics
 * and gradient blocks against the whole-vocabulary references (ref_ce, ref_ce_back). */
static void test_ce_parallel(void) {
    const int64_t R = 4, V = 37, cut[3] = {0, 20, 37};
    double *x = malloc(sizeof(double) * (size_t)(R * V));
    int32_t lab[4] = {0, 36, 19, 20};
    for (int64_t i = 0; i < R * V; i++) x[i] = urand(-4, 4);
    double parts[2 * 4 * 3], dx[4 * 37], stats[4 * 2], loss = 0;
    bool ran = true;
    for (int b = 0; b < 2; b++) {
        int64_t Vl = cut[b + 1] - cut[b];
        tcase t;
        tc_init(&t, AP_OP_CE_PARTIAL, b ? "columns [20,37) of 37" : "columns [0,20) of 37",
                SH(4, 3));
        t.call.attrs.i[0] = cut[b];
        t.call.attrs.i[1] = V;
        double *xb = tc_src(&t, SH(4, Vl), 0, 0);
        for (int64_t r = 0; r < R; r++)
            for (int64_t j = 0; j < Vl; j++) xb[r * Vl + j] = x[r * V + cut[b] + j];
        tc_alias_ids(&t, SH(4), lab);
        double *got = check(&t, ref_ce_partial, true);
        if (got) memcpy(parts + b * R * 3, got, sizeof(double) * (size_t)(R * 3));
        else ran = false;
        free(got);
        tc_free(&t);
    }
    for (int mode = 0; mode < 2 && ran; mode++) {
        tcase t;
        tc_init(&t, AP_OP_CE_COMBINE, mode ? "statistics of 2 blocks" : "loss of 2 blocks",
                mode ? SH(4, 2) : SCALAR);
        t.call.attrs.i[0] = mode;
        tc_alias(&t, SH(2, 4, 3), parts);
        double *got = check(&t, ref_ce_combine, true);
        if (got && mode) memcpy(stats, got, sizeof stats);
        if (got && !mode) loss = got[0];
        if (!got) ran = false;
        free(got);
    }
    /* the whole-vocabulary loss */
    tcase w;
    tc_init(&w, AP_OP_CROSS_ENTROPY, "", SCALAR);
    tc_alias(&w, SH(4, 37), x);
    tc_alias_ids(&w, SH(4), lab);
    double want = 0;
    double *win[AP_MAX_SRC] = {x};
    ref_ce(&w, win, &want);
    char d[160];
    snprintf(d, sizeof d, "combined %.15g, whole %.15g", loss, want);
    report(ran && fabs(loss - want) <= 1e-12 * fabs(want), AP_OP_CE_COMBINE,
           "2 blocks == whole-vocabulary loss", d);
    /* gradient blocks */
    double dl = 1.3;
    for (int b = 0; b < 2 && ran; b++) {
        int64_t Vl = cut[b + 1] - cut[b];
        tcase t;
        tc_init(&t, AP_OP_CE_BACK_PARTIAL, b ? "columns [20,37) of 37" : "columns [0,20) of 37",
                SH(4, Vl));
        t.call.attrs.i[0] = cut[b];
        double *dls = tc_src(&t, SCALAR, dl, dl);
        double *xb = tc_src(&t, SH(4, Vl), 0, 0);
        for (int64_t r = 0; r < R; r++)
            for (int64_t j = 0; j < Vl; j++) xb[r * Vl + j] = x[r * V + cut[b] + j];
        tc_alias_ids(&t, SH(4), lab);
        tc_alias(&t, SH(4, 2), stats);
        double *got = check(&t, ref_ce_back_partial, true);
        for (int64_t r = 0; got && r < R; r++)
            for (int64_t j = 0; j < Vl; j++) dx[r * V + cut[b] + j] = got[r * Vl + j];
        if (!got) ran = false;
        free(got);
        (void)dls;
        tc_free(&t);
    }
    tcase wb;
    tc_init(&wb, AP_OP_CROSS_ENTROPY_BACK, "", SH(4, 37));
    double *dlw = tc_src(&wb, SCALAR, dl, dl);
    tc_alias(&wb, SH(4, 37), x);
    tc_alias_ids(&wb, SH(4), lab);
    double wantg[4 * 37], err = 0, gmax = 0;
    double *bin[AP_MAX_SRC] = {dlw, x};
    ref_ce_back(&wb, bin, wantg);
    for (int64_t i = 0; i < R * V; i++) {
        err = fmax(err, fabs(dx[i] - wantg[i]));
        gmax = fmax(gmax, fabs(wantg[i]));
    }
    snprintf(d, sizeof d, "max abs err %.3g (max |g| %.3g)", err, gmax);
    report(ran && err <= 1e-12 * gmax, AP_OP_CE_BACK_PARTIAL,
           "2 blocks == whole-vocabulary gradient", d);
    tc_free(&wb);
    free(x);
}

/* ---- error cases ------------------------------------------------------------------------------ */

static void expect_error(const char *label, ap_op op, const ap_kernel_call *call, ap_status want,
                         const char *const *needles) {
    autopar_clear_error();
    ap_status st = ap_cpu_run(call);
    const char *msg = autopar_last_error();
    bool ok = st == want;
    for (int i = 0; needles && needles[i]; i++)
        if (!strstr(msg, needles[i])) ok = false;
    char detail[400];
    snprintf(detail, sizeof detail, "status %d: \"%s\"", (int)st, msg);
    report(ok, op, label, detail);
}

static void test_errors(void) {
    float table[7 * 5] = {0}, out[64], logits[3 * 7] = {0}, dl = 1;
    int32_t ids[4] = {1, 2, 9, 0}, neg[4] = {1, -1, 2, 3}, lab[3] = {1, 7, 0};

    for (int pi = 0; pi < 2; pi++) {
        ap_kernel_call c;
        memset(&c, 0, sizeof c);
        c.op = AP_OP_EMBEDDING;
        c.precision = AUTOPAR_PRECISION_F32;
        c.name = "tok_emb";
        c.out_shape = SH(4, 5);
        c.out_dtype = AUTOPAR_F32;
        c.out = out;
        c.n_src = 2;
        c.src_shape[0] = SH(7, 5);
        c.src_shape[1] = SH(4);
        c.src_dtype[1] = AUTOPAR_I32;
        c.src[0] = table;
        c.src[1] = pi ? (const void *)neg : (const void *)ids;
        expect_error(pi ? "id -1 at position 1" : "id 9 >= V 7 at position 2", c.op, &c,
                     AUTOPAR_ERR_INVALID_ARG,
                     (const char *const[]){"tok_emb", pi ? "-1" : "9", pi ? "1" : "2", "7", NULL});
    }
    {
        ap_kernel_call c;
        memset(&c, 0, sizeof c);
        c.op = AP_OP_EMBEDDING_BACK;
        c.name = "tok_emb_grad";
        c.out_shape = SH(7, 5);
        c.out = out;
        c.n_src = 2;
        c.src_shape[0] = SH(4, 5);
        c.src_shape[1] = SH(4);
        c.src_dtype[1] = AUTOPAR_I32;
        c.src[0] = out;
        c.src[1] = ids;
        float dyb[20] = {0};
        c.src[0] = dyb;
        expect_error("id 9 out of range", c.op, &c, AUTOPAR_ERR_INVALID_ARG,
                     (const char *const[]){"tok_emb_grad", "9", NULL});
    }
    {
        ap_kernel_call c;
        memset(&c, 0, sizeof c);
        c.op = AP_OP_CROSS_ENTROPY;
        c.precision = AUTOPAR_PRECISION_F32;
        c.name = "xent";
        c.out_shape = SCALAR;
        c.out = out;
        c.n_src = 2;
        c.src_shape[0] = SH(3, 7);
        c.src_shape[1] = SH(3);
        c.src_dtype[1] = AUTOPAR_I32;
        c.src[0] = logits;
        c.src[1] = lab;
        expect_error("label 7 >= V 7 at position 1", c.op, &c, AUTOPAR_ERR_INVALID_ARG,
                     (const char *const[]){"xent", "7", NULL});
        int32_t lab2[3] = {0, 0, -3};
        c.op = AP_OP_CROSS_ENTROPY_BACK;
        c.name = "xent_grad";
        c.out_shape = SH(3, 7);
        c.n_src = 3;
        c.src_shape[0] = SCALAR;
        c.src_shape[1] = SH(3, 7);
        c.src_shape[2] = SH(3);
        c.src_dtype[1] = AUTOPAR_F32;
        c.src_dtype[2] = AUTOPAR_I32;
        c.src[0] = &dl;
        c.src[1] = logits;
        c.src[2] = lab2;
        expect_error("label -3 at position 2", c.op, &c, AUTOPAR_ERR_INVALID_ARG,
                     (const char *const[]){"xent_grad", "-3", NULL});
    }
    const ap_op leaves[3] = {AP_OP_INPUT, AP_OP_PARAM, AP_OP_OPT_STATE};
    for (int i = 0; i < 3; i++) {
        ap_kernel_call c;
        memset(&c, 0, sizeof c);
        c.op = leaves[i];
        c.name = "leaf";
        c.out_shape = SH(2);
        c.out = out;
        g_covered[leaves[i]] = true;
        expect_error("leaf has no kernel", c.op, &c, AUTOPAR_ERR_UNSUPPORTED,
                     (const char *const[]){"leaf", NULL});
    }
    {
        ap_kernel_call c;
        memset(&c, 0, sizeof c);
        c.op = AP_OP_COUNT;
        c.name = "weird";
        c.out = out;
        autopar_clear_error();
        ap_status st = ap_cpu_run(&c);
        report(st == AUTOPAR_ERR_UNSUPPORTED && strstr(autopar_last_error(), "weird"), -1,
               "unknown op (AP_OP_COUNT) -> unsupported", autopar_last_error());
    }
    {
        ap_kernel_call c;
        memset(&c, 0, sizeof c);
        c.op = AP_OP_MATMUL;
        c.name = "mm";
        c.out_shape = SH(5, 3);
        c.out = out;
        c.n_src = 2;
        c.src_shape[0] = SH(5, 7);
        c.src_shape[1] = SH(6, 3);
        c.src[0] = out;
        c.src[1] = out;
        expect_error("inner dims 7 vs 6", c.op, &c, AUTOPAR_ERR_INVALID_ARG,
                     (const char *const[]){"mm", NULL});
        c.n_src = 1;
        expect_error("one operand", c.op, &c, AUTOPAR_ERR_INVALID_ARG,
                     (const char *const[]){"mm", NULL});
        c.n_src = 2;
        c.src_shape[1] = SH(7, 3);
        c.src_dtype[1] = AUTOPAR_I32;
        expect_error("I32 operand", c.op, &c, AUTOPAR_ERR_DTYPE, (const char *const[]){"mm", NULL});
    }
    {
        ap_kernel_call c;
        memset(&c, 0, sizeof c);
        c.op = AP_OP_ADAMW_UPDATE;
        c.name = "w_new";
        c.out_shape = SH(3);
        c.out = out;
        c.n_src = 3;
        for (int k = 0; k < 3; k++) {
            c.src_shape[k] = SH(3);
            c.src[k] = table;
        }
        c.step = 0;
        expect_error("step 0", c.op, &c, AUTOPAR_ERR_INVALID_ARG,
                     (const char *const[]){"w_new", NULL});
    }
}

int main(void) {
    test_fill();
    test_matmul();
    test_binary();
    test_elementwise();
    test_optimizers();
    test_layernorm();
    test_softmax();
    test_movement();
    test_movement_i32();
    test_embedding();
    test_reductions();
    test_losses();
    test_ce_parallel();
    test_errors();
    for (int op = 0; op < AP_OP_COUNT; op++)
        if (!g_covered[op]) {
            char l[160];
            snprintf(l, sizeof l, "op %d has no test", op);
            report(false, (ap_op)op, l, "");
        }
    printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
