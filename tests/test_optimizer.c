/*
 * Optimizer updates against hand-computed values.
 *
 * The loss is sum(w * c) with an input c, so the gradient of w is exactly c and the expected
 * parameter trajectory follows from the update formulas alone (written out below in double,
 * independently of the kernels). Three steps with a different c each step exercise momentum
 * and Adam state carried across steps and AdamW's bias correction (t = 1, 2, 3).
 * Tolerances: double-precision executor 1e-12 relative; float executor 1e-6 relative.
 * One literal value per optimizer (step 1, element 0) is also checked, computed by hand.
 */
#include "autopar.h"

#include <math.h>
#include <stdio.h>

#define N 3
#define STEPS 3

static const double w0[N] = {1.0, -2.0, 0.5};
static const double grads[STEPS][N] = {{0.3, -0.2, 0.0}, {-0.1, 0.4, 0.25}, {0.2, 0.2, -0.5}};
static int failures;

static void expected(const autopar_optimizer *o, double out[STEPS][N]) {
    double w[N], m[N] = {0}, v[N] = {0};
    for (int i = 0; i < N; i++) w[i] = w0[i];
    for (int t = 1; t <= STEPS; t++) {
        for (int i = 0; i < N; i++) {
            double g = grads[t - 1][i];
            switch (o->kind) {
            case AUTOPAR_OPT_SGD:
                w[i] -= o->lr * (g + o->weight_decay * w[i]);
                break;
            case AUTOPAR_OPT_MOMENTUM:
                m[i] = o->momentum * m[i] + g;
                w[i] -= o->lr * (m[i] + o->weight_decay * w[i]);
                break;
            default: {
                m[i] = o->beta1 * m[i] + (1 - o->beta1) * g;
                v[i] = o->beta2 * v[i] + (1 - o->beta2) * g * g;
                double mhat = m[i] / (1 - pow(o->beta1, t)), vhat = v[i] / (1 - pow(o->beta2, t));
                w[i] -= o->lr * (mhat / (sqrt(vhat) + o->eps) + o->weight_decay * w[i]);
            }
            }
            out[t - 1][i] = w[i];
        }
    }
}

static void run(const char *label, const autopar_optimizer *o, double literal_step1_w0,
                autopar_precision prec) {
    autopar_graph *g;
    autopar_graph_new(&g);
    autopar_tensor *w = autopar_param(g, "w", 1, (int64_t[]){N}, AUTOPAR_INIT_ZEROS, 0);
    autopar_tensor *c = autopar_input(g, "c", AUTOPAR_F32, 1, (int64_t[]){N}, -1);
    autopar_tensor *loss = autopar_sum_all(g, autopar_mul(g, w, c));
    autopar_executor *ex = NULL;
    if (autopar_build_training(g, loss, o) || autopar_executor_new(g, 0, prec, &ex)) {
        printf("FAIL %s: %s\n", label, autopar_last_error());
        failures++;
        autopar_graph_free(g);
        return;
    }
    double want[STEPS][N];
    expected(o, want);
    autopar_executor_write_f64(ex, w, w0, N);
    double tol = prec == AUTOPAR_PRECISION_F64 ? 1e-12 : 1e-6, worst = 0;
    for (int t = 0; t < STEPS; t++) {
        double got[N];
        autopar_executor_write_f64(ex, c, grads[t], N);
        if (autopar_executor_step(ex, NULL)) {
            printf("FAIL %s: step %d: %s\n", label, t + 1, autopar_last_error());
            failures++;
            break;
        }
        autopar_executor_read_f64(ex, w, got, N);
        for (int i = 0; i < N; i++) {
            double err = fabs(got[i] - want[t][i]) / fmax(fabs(want[t][i]), 1e-3);
            if (err > worst) worst = err;
            if (err > tol) {
                printf("FAIL %s (%s): step %d w[%d] = %.15g, expected %.15g\n", label,
                       prec == AUTOPAR_PRECISION_F64 ? "f64" : "f32", t + 1, i, got[i], want[t][i]);
                failures++;
            }
        }
    }
    if (fabs(want[0][0] - literal_step1_w0) > 1e-12) {
        printf("FAIL %s: formula gives %.15g for step 1, hand value %.15g\n", label, want[0][0],
               literal_step1_w0);
        failures++;
    }
    printf("ok   %-9s %s: %d steps, max relative error %.2e\n", label,
           prec == AUTOPAR_PRECISION_F64 ? "f64" : "f32", STEPS, worst);
    autopar_executor_free(ex);
    autopar_graph_free(g);
}

int main(void) {
    autopar_optimizer o;
    for (int p = 0; p < 2; p++) {
        autopar_precision prec = p ? AUTOPAR_PRECISION_F32 : AUTOPAR_PRECISION_F64;
        autopar_optimizer_default(&o);
        o.kind = AUTOPAR_OPT_SGD;
        o.lr = 0.1f;
        o.weight_decay = 0.0f;
        /* 1 - 0.1 * 0.3 = 0.97 */
        run("sgd", &o, 1.0 - (double)0.1f * 0.3, prec);
        o.weight_decay = 0.25f;
        /* 1 - 0.1 * (0.3 + 0.25 * 1) = 0.945 */
        run("sgd+wd", &o, 1.0 - (double)0.1f * (0.3 + 0.25), prec);
        o.kind = AUTOPAR_OPT_MOMENTUM;
        o.momentum = 0.5f;
        o.weight_decay = 0.0f;
        /* first step: v = g, so 1 - 0.1 * 0.3 */
        run("momentum", &o, 1.0 - (double)0.1f * 0.3, prec);
        autopar_optimizer_default(&o);
        o.lr = 0.01f;
        o.weight_decay = 0.1f;
        /* step 1: mhat = g, vhat = g^2: 1 - 0.01 * (0.3 / (0.3 + 1e-8) + 0.1 * 1) */
        run("adamw", &o, 1.0 - (double)0.01f * (0.3 / (0.3 + (double)1e-8f) + (double)0.1f * 1.0),
            prec);
    }
    printf("%d failures\n", failures);
    return failures ? 1 : 0;
}
