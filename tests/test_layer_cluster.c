/*
 * Layer construction (passes/layer_cluster.h): automatic clustering of chains of identical
 * blocks (hand-built post-LN blocks and the GPT builder) must cut exactly at block boundaries;
 * backward and optimizer nodes must get the layers autodiff gives them under the equivalent
 * manual boundaries; manual layers are validated; error cases.
 */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime */
#include "layer_cluster.h"
#include "check.h"
#include "models.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- a chain of post-LN blocks ----------------------------------------------------------------
 * x[R, C] -> K x (h = x W1 [R, 4C]; g = gelu(h); m = g W2 [R, C]; a = m + x; x = layernorm(a))
 * -> mse(x, target). Parameters of block b are named "b<b>.*". With boundaries != 0 a pipeline
 * boundary is marked after every `boundaries` blocks (not after the last). */
static autopar_tensor *build_chain(autopar_graph *g, int K, int64_t R, int64_t C, int boundaries) {
    const int64_t rc[2] = {R, C}, c4[2] = {C, 4 * C}, c4t[2] = {4 * C, C}, c1[1] = {C};
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, rc, 0);
    autopar_tensor *y = autopar_input(g, "target", AUTOPAR_F32, 2, rc, 0);
    for (int b = 0; b < K; b++) {
        char n1[32], n2[32], n3[32], n4[32];
        snprintf(n1, sizeof n1, "b%d.w1", b);
        snprintf(n2, sizeof n2, "b%d.w2", b);
        snprintf(n3, sizeof n3, "b%d.ln.g", b);
        snprintf(n4, sizeof n4, "b%d.ln.b", b);
        autopar_tensor *w1 = autopar_param(g, n1, 2, c4, AUTOPAR_INIT_NORMAL, 0.0f);
        autopar_tensor *w2 = autopar_param(g, n2, 2, c4t, AUTOPAR_INIT_NORMAL, 0.0f);
        autopar_tensor *gain = autopar_param(g, n3, 1, c1, AUTOPAR_INIT_ONES, 0.0f);
        autopar_tensor *bias = autopar_param(g, n4, 1, c1, AUTOPAR_INIT_ZEROS, 0.0f);
        autopar_tensor *h = autopar_gelu(g, autopar_matmul(g, x, w1));
        autopar_tensor *a = autopar_add(g, autopar_matmul(g, h, w2), x);
        x = autopar_layernorm(g, a, gain, bias, 1e-5f);
        if (boundaries && (b + 1) % boundaries == 0 && b + 1 < K)
            autopar_mark_pipeline_boundary(g);
    }
    return autopar_mse_loss(g, x, y);
}

/* Block index of a parameter named "<prefix><b>.*", or -1. */
static int block_of(const char *name, const char *prefix) {
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) return -1;
    char *end = NULL;
    long b = strtol(name + n, &end, 10);
    return end && *end == '.' ? (int)b : -1;
}

/* Every forward consumer of every block parameter lies in layer block / per_layer. */
static void check_block_params(const autopar_graph *g, const char *prefix, int per_layer,
                               const char *what) {
    int checked = 0;
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *p = g->nodes[i];
        if (p->op != AP_OP_PARAM) continue;
        int b = block_of(p->name, prefix);
        if (b < 0) continue;
        CHECK(p->layer == b / per_layer, "%s: parameter %s has layer %d, expected %d", what,
              p->name, p->layer, b / per_layer);
        for (int j = i + 1; j < g->n_nodes; j++) {
            const ap_node *n = g->nodes[j];
            if (n->phase != AUTOPAR_PHASE_FORWARD) continue;
            for (int k = 0; k < n->n_src; k++)
                if (n->src[k] == i) {
                    checked++;
                    CHECK(n->layer == b / per_layer, "%s: '%s' reads %s (block %d) but has layer "
                          "%d, expected %d", what, n->name, p->name, b, n->layer, b / per_layer);
                }
        }
    }
    CHECK(checked > 0, "%s: no block parameter found", what);
}

/* Node-by-node layer equality of two graphs built the same way. */
static int compare_layers(const autopar_graph *a, const autopar_graph *b, const char *what,
                          int report) {
    if (a->n_nodes != b->n_nodes) {
        CHECK(0, "%s: %d vs %d nodes", what, a->n_nodes, b->n_nodes);
        return -1;
    }
    int diff = 0;
    for (int i = 0; i < a->n_nodes; i++)
        if (a->nodes[i]->layer != b->nodes[i]->layer) {
            if (report && diff < 5)
                fprintf(stderr, "  %s: node %d '%s' (%s, %s): layer %d vs %d\n", what, i,
                        a->nodes[i]->name, ap_op_name(a->nodes[i]->op),
                        ap_phase_name(a->nodes[i]->phase), a->nodes[i]->layer, b->nodes[i]->layer);
            diff++;
        }
    return diff;
}

static autopar_graph *chain_graph(int K, int boundaries, int optimizer) {
    autopar_graph *g = NULL;
    if (autopar_graph_new(&g) != AUTOPAR_OK) return NULL;
    autopar_tensor *loss = build_chain(g, K, 16, 32, boundaries);
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    if (!loss || (optimizer ? autopar_build_training(g, loss, &o) : autopar_backward(g, loss))) {
        fprintf(stderr, "chain build failed: %s\n", autopar_last_error());
        autopar_graph_free(g);
        return NULL;
    }
    return g;
}

/* Automatic layers on K post-LN blocks. Cut points of least bytes_in are right after a block's
 * residual add or after its layernorm (one [R, C] tensor either way; block 0 also after its
 * second matmul, as its residual is an input); the FLOP balance tie-break picks the layernorm
 * side, since any other choice moves a layernorm's FLOPs into a layer that already has the
 * most (the last layer also holds the loss). */
static void test_chain(int K, int per_layer) {
    char what[64];
    snprintf(what, sizeof what, "chain K=%d L=%d", K, K / per_layer);
    autopar_graph *g = chain_graph(K, 0, 1), *ref = chain_graph(K, per_layer, 1);
    CHECK(g && ref, "%s: build", what);
    if (!g || !ref) {
        autopar_graph_free(g);
        autopar_graph_free(ref);
        return;
    }
    const int L = K / per_layer;
    ap_layer_stats *stats = calloc((size_t)L, sizeof *stats);
    ap_status st = ap_layer_cluster(g, L, 0.5, stats);
    CHECK(st == AUTOPAR_OK, "%s: %s", what, autopar_last_error());
    int n_ref = 0;
    CHECK(ap_layer_manual(ref, &n_ref) == AUTOPAR_OK && n_ref == L, "%s: manual %d: %s", what,
          n_ref, autopar_last_error());
    if (st == AUTOPAR_OK) {
        check_block_params(g, "b", per_layer, what);
        int diff = compare_layers(g, ref, what, 1);
        CHECK(diff == 0, "%s: %d nodes differ from the manual-boundary graph", what, diff);
        CHECK(ap_layer_check(g, L) == AUTOPAR_OK, "%s: check: %s", what, autopar_last_error());
        const double resid = 16.0 * 32.0 * 4.0;
        for (int l = 0; l < L; l++) {
            CHECK(stats[l].n_heavy == 2 * per_layer, "%s: layer %d has %d heavy ops", what, l,
                  stats[l].n_heavy);
            CHECK(stats[l].bytes_in == (l == 0 ? 0.0 : resid), "%s: layer %d reads %g bytes", what,
                  l, stats[l].bytes_in);
        }
        /* The loss belongs to the last layer, the gradient seed and optimizer nodes of block b's
         * parameters to block b's layer (covered by compare_layers); spot-check the loss. */
        const ap_node *loss = g->nodes[g->loss];
        CHECK(loss->layer == L - 1, "%s: loss in layer %d", what, loss->layer);
    }
    free(stats);
    autopar_graph_free(g);
    autopar_graph_free(ref);
}

/* GPT builder: pre-LN blocks; the least-bytes cuts are at block ends and after the attention
 * residual add. With a small vocabulary (the head's FLOPs below one attention half-block) the
 * balance tie-break puts each boundary at a block end, which is what mark_layers does. */
static void test_gpt(int K) {
    gpt_config c = {.layers = K, .hidden = 32, .heads = 2, .seq = 8, .vocab = 16, .batch = 2};
    autopar_graph *g = NULL, *ref = NULL;
    autopar_tensor *loss = NULL, *loss_ref = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    CHECK(autopar_graph_new(&g) == AUTOPAR_OK && autopar_graph_new(&ref) == AUTOPAR_OK, "new");
    CHECK(model_gpt_build(g, &c, &loss) == AUTOPAR_OK, "gpt: %s", autopar_last_error());
    c.mark_layers = 1;
    CHECK(model_gpt_build(ref, &c, &loss_ref) == AUTOPAR_OK, "gpt: %s", autopar_last_error());
    CHECK(autopar_build_training(g, loss, &o) == AUTOPAR_OK, "train: %s", autopar_last_error());
    CHECK(autopar_build_training(ref, loss_ref, &o) == AUTOPAR_OK, "train: %s",
          autopar_last_error());
    char what[64];
    snprintf(what, sizeof what, "gpt K=%d L=%d", K, K);
    ap_status st = ap_layer_cluster(g, K, 0.5, NULL);
    CHECK(st == AUTOPAR_OK, "%s: %s", what, autopar_last_error());
    int n_ref = 0;
    CHECK(ap_layer_manual(ref, &n_ref) == AUTOPAR_OK && n_ref == K, "%s: manual: %s", what,
          autopar_last_error());
    if (st == AUTOPAR_OK) {
        check_block_params(g, "h", 1, what);
        int diff = compare_layers(g, ref, what, 1);
        CHECK(diff == 0, "%s: %d nodes differ from the mark_layers graph", what, diff);
        /* Tied embedding: wte is first read by the embedding (layer 0), so it and its update
         * live in layer 0; the head in the last layer reads it as a parameter (0 bytes). */
        const ap_node *wte = (const ap_node *)autopar_graph_find(g, "wte");
        CHECK(wte && wte->layer == 0, "%s: wte layer %d", what, wte ? wte->layer : -1);
    }
    /* Two blocks per layer. */
    if (K % 2 == 0) {
        snprintf(what, sizeof what, "gpt K=%d L=%d", K, K / 2);
        st = ap_layer_cluster(g, K / 2, 0.5, NULL);
        CHECK(st == AUTOPAR_OK, "%s: %s", what, autopar_last_error());
        if (st == AUTOPAR_OK) {
            check_block_params(g, "h", 2, what);
            CHECK(ap_layer_check(g, K / 2) == AUTOPAR_OK, "%s: %s", what, autopar_last_error());
        }
    }
    autopar_graph_free(g);
    autopar_graph_free(ref);
}

/* DERIVE (no replay) against the exact replay on the same graphs. */
static void test_derive(void) {
    gpt_config c = {.layers = 4, .hidden = 32, .heads = 2, .seq = 8, .vocab = 16, .batch = 2,
                    .mark_layers = 1};
    autopar_graph *g = NULL, *h = chain_graph(6, 2, 1);
    autopar_tensor *loss = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    CHECK(autopar_graph_new(&g) == AUTOPAR_OK && model_gpt_build(g, &c, &loss) == AUTOPAR_OK &&
          autopar_build_training(g, loss, &o) == AUTOPAR_OK && h, "build");
    autopar_graph *graphs[2] = {g, h};
    const char *names[2] = {"gpt", "chain"};
    for (int k = 0; k < 2; k++) {
        autopar_graph *x = graphs[k];
        if (!x) continue;
        int L = 0;
        CHECK(ap_layer_manual(x, &L) == AUTOPAR_OK, "manual: %s", autopar_last_error());
        int *exact = malloc((size_t)x->n_nodes * sizeof *exact);
        if (!exact) continue;
        for (int i = 0; i < x->n_nodes; i++) exact[i] = x->nodes[i]->layer;
        ap_layer_propagation used = AP_LAYER_PROPAGATE_COUNT;
        CHECK(ap_layer_propagate(x, AP_LAYER_PROPAGATE_DERIVE, &used) == AUTOPAR_OK &&
              used == AP_LAYER_PROPAGATE_DERIVE, "derive");
        int diff = 0, n_bwd = 0, heavy_diff = 0, apply_diff = 0;
        for (int i = 0; i < x->n_nodes; i++) {
            const ap_node *n = x->nodes[i];
            n_bwd += n->phase == AUTOPAR_PHASE_BACKWARD;
            if (n->layer == exact[i]) continue;
            diff++;
            heavy_diff += ap_op_is_heavy(n->op);
            apply_diff += n->phase == AUTOPAR_PHASE_APPLY;
            CHECK(n->layer == exact[i] - 1, "%s derive: '%s' layer %d, exact %d (off by more "
                  "than one)", names[k], n->name, n->layer, exact[i]);
        }
        printf("derive vs replay (%s, %d layers): %d of %d backward nodes differ (%d heavy), "
               "%d apply nodes differ\n", names[k], L, diff - apply_diff, n_bwd, heavy_diff,
               apply_diff);
        CHECK(apply_diff == 0 && heavy_diff == 0, "%s: derive misplaces heavy or apply nodes",
              names[k]);
        CHECK(ap_layer_check(x, L) == AUTOPAR_OK, "%s derive check: %s", names[k],
              autopar_last_error());
        free(exact);
    }
    autopar_graph_free(g);
    autopar_graph_free(h);
}

/* The tie-breaks in order: least largest bytes_in, then least sum of bytes_in, then balance.
 * Chain of 7 matmuls m_k = m_{k-1} W_k, m_k of shape [4, C_k] with C_0..C_7 = 8 8 8 16 16 16 8 8,
 * then an MSE loss. A cut after m_k ships 4 * C_k * 4 bytes (128 for width 8, 256 for 16). Three
 * layers need >= 2 matmuls each (h_min = min(3, 7 / 3) = 2; eps = 10 makes the FLOP bound
 * moot), so the boundaries (after m_b1, after m_b2) are (2,4), (2,5) or (3,5):
 *            largest cut   sum of cuts   layer FLOPs (2*4*C_{k-1}*C_k each; loss 96)   sum sq
 *   (2,4)        256        128+256=384   1024 | 3072 | 3680                          24.03M
 *   (2,5)        256        128+256=384   1024 | 5120 | 1632                          29.93M
 *   (3,5)        256        256+256=512   2048 | 4096 | 1632                          23.63M
 * All tie on the largest cut; the sum picks (2,4) or (2,5), the balance then (2,4). Balance
 * alone would pick (3,5). */
static void test_tie_breaks(void) {
    static const int64_t C[8] = {8, 8, 8, 16, 16, 16, 8, 8};
    autopar_graph *g = NULL;
    CHECK(autopar_graph_new(&g) == AUTOPAR_OK, "new");
    const int64_t xs[2] = {4, C[0]}, ts[2] = {4, C[7]};
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, xs, 0);
    autopar_tensor *t = autopar_input(g, "t", AUTOPAR_F32, 2, ts, 0);
    autopar_tensor *m[8] = {x};
    for (int k = 1; k <= 7; k++) {
        char nm[16];
        snprintf(nm, sizeof nm, "w%d", k);
        const int64_t ws[2] = {C[k - 1], C[k]};
        m[k] = autopar_matmul(g, m[k - 1], autopar_param(g, nm, 2, ws, AUTOPAR_INIT_NORMAL, 0));
    }
    autopar_mse_loss(g, m[7], t);
    ap_layer_stats st[3];
    CHECK(ap_layer_cluster(g, 3, 10.0, st) == AUTOPAR_OK, "%s", autopar_last_error());
    static const int expect[8] = {-1, 0, 0, 1, 1, 2, 2, 2};
    for (int k = 1; k <= 7; k++)
        CHECK(((ap_node *)m[k])->layer == expect[k], "m%d in layer %d, expected %d", k,
              ((ap_node *)m[k])->layer, expect[k]);
    CHECK(st[1].bytes_in == 128.0 && st[2].bytes_in == 256.0, "bytes in %g %g", st[1].bytes_in,
          st[2].bytes_in);
    autopar_graph_free(g);
}

/* ---- random small DAGs against exhaustive enumeration ---------------------------------------- */

static uint64_t rng_state = 0x2545f4914f6cdd1dull;
static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static int rng_int(int lo, int hi) { return lo + (int)(rng_next() % (uint64_t)(hi - lo + 1)); }

typedef struct layering_cost {
    int    ok;
    double max, sum, sq;
} layering_cost;

/* Independent evaluation of one layering (bounds[0] = 0 < ... < bounds[L] = n over the forward
 * ops) with the rules of layer_cluster.h. */
static layering_cost eval_layering(const autopar_graph *g, const int *ops, const int *bounds,
                                   int L, double bound, int h_min) {
    layering_cost r = {1, 0.0, 0.0, 0.0};
    int *layer_of = malloc((size_t)g->n_nodes * sizeof *layer_of);
    for (int i = 0; i < g->n_nodes; i++) layer_of[i] = -1;
    for (int q = 0; q < L; q++)
        for (int e = bounds[q]; e < bounds[q + 1]; e++) layer_of[ops[e]] = q;
    for (int q = 0; q < L && r.ok; q++) {
        double flops = 0.0, cross = 0.0;
        int heavy = 0;
        for (int e = bounds[q]; e < bounds[q + 1]; e++) {
            const ap_node *op = g->nodes[ops[e]];
            flops += ap_node_flops(g, op);
            heavy += ap_op_is_heavy(op->op);
        }
        /* bytes_in: distinct forward ops of earlier layers read by this layer. */
        for (int i = 0; i < g->n_nodes; i++) {
            if (layer_of[i] < 0 || layer_of[i] >= q) continue;
            int read = 0;
            for (int e = bounds[q]; e < bounds[q + 1] && !read; e++)
                for (int k = 0; k < g->nodes[ops[e]]->n_src; k++) read |= g->nodes[ops[e]]->src[k] == i;
            if (read) cross += (double)ap_shape_numel(&g->nodes[i]->shape) * 4.0;
        }
        int adm = (heavy >= h_min || flops >= bound) && (flops <= bound || heavy <= h_min);
        if (!adm) r.ok = 0;
        if (cross > r.max) r.max = cross;
        r.sum += cross;
        r.sq += flops * flops;
    }
    free(layer_of);
    return r;
}

static void test_random_brute(int n_graphs) {
    int n_ok = 0, n_infeasible = 0;
    for (int it = 0; it < n_graphs; it++) {
        autopar_graph *g = NULL;
        if (autopar_graph_new(&g) != AUTOPAR_OK) continue;
        static const int64_t widths[3] = {4, 8, 16};
        autopar_tensor *vals[32];
        int n_vals = 0;
        const int64_t xs[2] = {2, 8};
        vals[n_vals++] = autopar_input(g, "x", AUTOPAR_F32, 2, xs, 0);
        int n_ops = rng_int(6, 12);
        for (int k = 0; k < n_ops; k++) {
            autopar_tensor *a = vals[rng_int(n_vals > 3 ? n_vals - 3 : 0, n_vals - 1)];
            autopar_tensor *r = NULL;
            int kind = rng_int(0, 3);
            if (kind <= 1) {
                char nm[16];
                snprintf(nm, sizeof nm, "w%d", k);
                const int64_t ws[2] = {autopar_tensor_dim(a, 1), widths[rng_int(0, 2)]};
                r = autopar_matmul(g, a, autopar_param(g, nm, 2, ws, AUTOPAR_INIT_NORMAL, 0));
            } else if (kind == 2) {
                r = rng_int(0, 1) ? autopar_relu(g, a) : autopar_gelu(g, a);
            } else {
                autopar_tensor *b = NULL;   /* a skip connection: any earlier value, same shape */
                for (int t = 0; t < n_vals && !b; t++) {
                    autopar_tensor *c = vals[rng_int(0, n_vals - 1)];
                    if (c != a && autopar_tensor_dim(c, 1) == autopar_tensor_dim(a, 1)) b = c;
                }
                r = b ? autopar_add(g, a, b) : autopar_relu(g, a);
            }
            if (r) vals[n_vals++] = r;
        }
        if (autopar_graph_status(g) != AUTOPAR_OK) {
            CHECK(0, "random graph %d: %s", it, autopar_graph_error(g));
            autopar_graph_free(g);
            continue;
        }
        int ops[32], n = 0, H = 0;
        double total = 0.0;
        for (int i = 0; i < g->n_nodes; i++)
            if (g->nodes[i]->n_src > 0) {
                ops[n++] = i;
                H += ap_op_is_heavy(g->nodes[i]->op);
                total += ap_node_flops(g, g->nodes[i]);
            }
        int L = rng_int(1, 4);
        double eps = rng_int(0, 1) ? 0.5 : 0.2 * rng_int(0, 5);
        if (L > 1 && H < L) L = H > 1 ? H : 1;
        const double bound = (1.0 + eps) * total / L;
        const int h_min = H / L < 3 ? H / L : 3;
        /* Exhaustive: every choice of L - 1 boundaries among n - 1 gaps. */
        layering_cost best = {0, INFINITY, INFINITY, INFINITY};
        int bounds[8];
        int c[8];
        for (int q = 0; q < L - 1; q++) c[q] = q + 1;
        for (;;) {
            bounds[0] = 0;
            for (int q = 0; q < L - 1; q++) bounds[q + 1] = c[q];
            bounds[L] = n;
            layering_cost r = eval_layering(g, ops, bounds, L, bound, h_min);
            if (r.ok && (!best.ok || r.max < best.max ||
                         (r.max == best.max && (r.sum < best.sum ||
                                                (r.sum == best.sum && r.sq < best.sq)))))
                best = r;
            int q = L - 2;
            while (q >= 0 && c[q] == n - 1 - (L - 2 - q)) q--;
            if (q < 0) break;
            c[q]++;
            for (int u = q + 1; u < L - 1; u++) c[u] = c[u - 1] + 1;
        }
        ap_status st = ap_layer_cluster(g, L, eps, NULL);
        if (!best.ok) {
            n_infeasible++;
            CHECK(st == AUTOPAR_ERR_INVALID_ARG, "random graph %d (n=%d, L=%d, eps=%g): brute "
                  "force has no layering, cluster returned %d", it, n, L, eps, st);
        } else {
            n_ok++;
            CHECK(st == AUTOPAR_OK, "random graph %d (n=%d, L=%d, eps=%g): %s", it, n, L, eps,
                  autopar_last_error());
            if (st == AUTOPAR_OK) {
                /* Layers are contiguous (ap_layer_check): layer q starts at its first op. */
                for (int q = 0; q <= L; q++) bounds[q] = n;
                for (int e = n - 1; e >= 0; e--) bounds[g->nodes[ops[e]]->layer] = e;
                layering_cost r = eval_layering(g, ops, bounds, L, bound, h_min);
                CHECK(r.ok && r.max == best.max && r.sum == best.sum &&
                      fabs(r.sq - best.sq) <= 1e-12 * best.sq,
                      "random graph %d (n=%d, L=%d, eps=%g): cluster (%g, %g, %g), brute force "
                      "(%g, %g, %g)", it, n, L, eps, r.max, r.sum, r.sq, best.max, best.sum,
                      best.sq);
                CHECK(ap_layer_check(g, L) == AUTOPAR_OK, "random graph %d: %s", it,
                      autopar_last_error());
            }
        }
        autopar_graph_free(g);
    }
    printf("random graphs: %d clustered, %d without an admissible layering, all as brute force\n",
           n_ok, n_infeasible);
}

/* Manual layers: validation and leaf placement. */
static void test_manual(void) {
    const int64_t s2[2] = {4, 8}, w[2] = {8, 8};
    autopar_graph *g = NULL;
    int L = -1;
    /* Parameters created up front, used in layers 0, 1, 2. */
    CHECK(autopar_graph_new(&g) == AUTOPAR_OK, "new");
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, s2, 0);
    autopar_tensor *t = autopar_input(g, "t", AUTOPAR_F32, 2, s2, 0);
    autopar_tensor *ws[3];
    for (int k = 0; k < 3; k++) {
        char nm[16];
        snprintf(nm, sizeof nm, "w%d", k);
        ws[k] = autopar_param(g, nm, 2, w, AUTOPAR_INIT_NORMAL, 0.0f);
    }
    for (int k = 0; k < 3; k++) {
        x = autopar_relu(g, autopar_matmul(g, x, ws[k]));
        if (k < 2) autopar_mark_pipeline_boundary(g);
    }
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    o.kind = AUTOPAR_OPT_MOMENTUM;
    CHECK(autopar_build_training(g, autopar_mse_loss(g, x, t), &o) == AUTOPAR_OK, "train: %s",
          autopar_last_error());
    CHECK(((ap_node *)ws[2])->layer == 0, "before: w2 created in layer 0");
    CHECK(ap_layer_manual(g, &L) == AUTOPAR_OK && L == 3, "manual: %d %s", L,
          autopar_last_error());
    for (int k = 0; k < 3; k++) {
        const ap_node *p = (const ap_node *)ws[k];
        CHECK(p->layer == k, "w%d layer %d", k, p->layer);
        CHECK(g->nodes[p->grad]->layer == k, "w%d.grad layer %d", k, g->nodes[p->grad]->layer);
    }
    CHECK(((ap_node *)t)->layer == 2, "target read by the loss in layer 2: %d",
          ((ap_node *)t)->layer);
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        if (n->phase != AUTOPAR_PHASE_APPLY) continue;
        int p = n->op == AP_OP_OPT_STATE ? (int)n->attrs.i[0] : n->assign_to;
        if (g->nodes[p]->op == AP_OP_OPT_STATE) p = (int)g->nodes[p]->attrs.i[0];
        CHECK(n->layer == g->nodes[p]->layer, "apply node '%s' layer %d, param %d", n->name,
              n->layer, g->nodes[p]->layer);
    }
    autopar_graph_free(g);

    /* A boundary before the first op, and two boundaries in a row. */
    for (int variant = 0; variant < 2; variant++) {
        CHECK(autopar_graph_new(&g) == AUTOPAR_OK, "new");
        x = autopar_input(g, "x", AUTOPAR_F32, 2, s2, 0);
        autopar_tensor *w0 = autopar_param(g, "w0", 2, w, AUTOPAR_INIT_NORMAL, 0.0f);
        if (variant == 0) autopar_mark_pipeline_boundary(g);
        x = autopar_matmul(g, x, w0);
        if (variant == 1) {
            autopar_mark_pipeline_boundary(g);
            autopar_mark_pipeline_boundary(g);
        }
        x = autopar_matmul(g, x, w0);
        ap_status st = ap_layer_manual(g, &L);
        CHECK(st == AUTOPAR_ERR_GRAPH && L == 0 && strstr(autopar_last_error(), "no operations"),
              "variant %d: %d %s", variant, st, autopar_last_error());
        autopar_graph_free(g);
    }
}

static void test_errors(void) {
    autopar_graph *g = chain_graph(4, 0, 0);
    CHECK(g != NULL, "build");
    if (!g) return;
    ap_status st = ap_layer_cluster(g, 0, 0.5, NULL);
    CHECK(st == AUTOPAR_ERR_INVALID_ARG, "0 layers");
    st = ap_layer_cluster(g, 9, 0.5, NULL);
    CHECK(st == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "at most 8 layers"),
          "9 layers on 8 matmuls: %s", autopar_last_error());
    st = ap_layer_cluster(g, 8, 0.5, NULL);
    CHECK(st == AUTOPAR_OK, "8 layers on 8 matmuls: %s", autopar_last_error());
    st = ap_layer_cluster(g, 2, -0.1, NULL);
    CHECK(st == AUTOPAR_ERR_INVALID_ARG, "negative eps");
    st = ap_layer_cluster(NULL, 2, 0.5, NULL);
    CHECK(st == AUTOPAR_ERR_INVALID_ARG, "NULL graph");
    /* Three layers of 4 blocks: each layer must stay under 1.5 / 3 of the total... with eps = 0
     * every layer must hold exactly a third of the FLOPs, which whole ops cannot do. */
    st = ap_layer_cluster(g, 3, 0.0, NULL);
    CHECK(st == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "increase eps"),
          "eps 0: %d %s", st, autopar_last_error());
    /* With a generous eps, 3 layers of 4 blocks work. */
    st = ap_layer_cluster(g, 3, 0.5, NULL);
    CHECK(st == AUTOPAR_OK && ap_layer_check(g, 3) == AUTOPAR_OK, "3 layers: %s",
          autopar_last_error());
    st = ap_layer_cluster(g, 1, 0.0, NULL);
    CHECK(st == AUTOPAR_OK && ap_layer_check(g, 1) == AUTOPAR_OK, "1 layer: %s",
          autopar_last_error());
    for (int i = 0; i < g->n_nodes; i++)
        CHECK(g->nodes[i]->layer == 0, "1 layer: node %d layer %d", i, g->nodes[i]->layer);
    autopar_graph_free(g);

    /* No forward op. */
    CHECK(autopar_graph_new(&g) == AUTOPAR_OK, "new");
    const int64_t s[1] = {4};
    autopar_param(g, "p", 1, s, AUTOPAR_INIT_ZEROS, 0.0f);
    CHECK(ap_layer_cluster(g, 1, 0.5, NULL) == AUTOPAR_ERR_INVALID_ARG, "no op");
    autopar_graph_free(g);

    /* A graph with nodes added after autopar_backward: replay cannot reproduce it, AUTO falls
     * back to DERIVE, and a successful propagation keeps the caller's last error. */
    g = chain_graph(2, 1, 0);
    CHECK(g != NULL, "build");
    if (!g) return;
    autopar_tensor *extra = autopar_relu(g, autopar_graph_find(g, "b0.w1"));
    CHECK(extra != NULL, "extra node");
    ap_error(AUTOPAR_ERR_IO, "marker message");
    ap_layer_propagation used = AP_LAYER_PROPAGATE_COUNT;
    CHECK(ap_layer_propagate(g, AP_LAYER_PROPAGATE_AUTO, &used) == AUTOPAR_OK &&
          used == AP_LAYER_PROPAGATE_DERIVE, "auto fallback: %d", (int)used);
    CHECK(strcmp(autopar_last_error(), "marker message") == 0, "last error changed to '%s'",
          autopar_last_error());
    CHECK(ap_layer_propagate(g, AP_LAYER_PROPAGATE_REPLAY, &used) == AUTOPAR_ERR_GRAPH,
          "replay must refuse");
    autopar_graph_free(g);
}

/* Speed on a deep GPT (forward ops ~ 30 per block). */
static void test_timing(void) {
    gpt_config c = {.layers = 48, .hidden = 64, .heads = 4, .seq = 16, .vocab = 16, .batch = 2};
    autopar_graph *g = NULL;
    autopar_tensor *loss = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    CHECK(autopar_graph_new(&g) == AUTOPAR_OK && model_gpt_build(g, &c, &loss) == AUTOPAR_OK &&
          autopar_build_training(g, loss, &o) == AUTOPAR_OK, "build: %s", autopar_last_error());
    int n_fwd = 0;
    for (int i = 0; i < g->n_nodes; i++) n_fwd += g->nodes[i]->phase == AUTOPAR_PHASE_FORWARD &&
                                                 g->nodes[i]->n_src > 0;
    const int Ls[3] = {48, 16, 4};
    for (int k = 0; k < 3; k++) {
        double t0 = now_s();
        ap_status st = ap_layer_cluster(g, Ls[k], 0.5, NULL);
        double dt = now_s() - t0;
        CHECK(st == AUTOPAR_OK, "timing L=%d: %s", Ls[k], autopar_last_error());
        if (st == AUTOPAR_OK) check_block_params(g, "h", 48 / Ls[k], "timing");
        printf("timing: GPT 48 blocks (%d forward ops, %d nodes) into %d layers: %.3f s\n", n_fwd,
               g->n_nodes, Ls[k], dt);
    }
    autopar_graph_free(g);
}

int main(void) {
    test_chain(8, 1);
    test_chain(8, 2);
    test_chain(6, 3);
    test_gpt(4);
    test_gpt(6);
    test_derive();
    test_tie_breaks();
    test_random_brute(400);
    test_manual();
    test_errors();
    test_timing();
    if (g_failures) {
        fprintf(stderr, "test_layer_cluster: %d failure(s)\n", g_failures);
        return 1;
    }
    printf("test_layer_cluster: ok\n");
    return 0;
}
