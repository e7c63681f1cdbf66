/*
 * Layer construction (see layer_cluster.h): Alpa's clustering DP over the forward ops, manual
 * layers, and the propagation of forward layers to leaves, backward and apply nodes.
 */
#include "layer_cluster.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

bool ap_op_is_heavy(ap_op op) { return op == AP_OP_MATMUL || op == AP_OP_BATCH_MATMUL; }

static bool is_forward_op(const ap_node *n) {
    return n->phase == AUTOPAR_PHASE_FORWARD && n->n_src > 0;
}
static bool is_forward_leaf(const ap_node *n) {
    return n->phase == AUTOPAR_PHASE_FORWARD && n->n_src == 0;
}

static double tensor_bytes(const ap_node *n) {
    return (double)ap_shape_numel(&n->shape) * (double)ap_dtype_size(n->dtype);
}

static ap_status check_graph(const autopar_graph *g, const char *who) {
    if (!g) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: graph is NULL", who);
    if (g->status != AUTOPAR_OK)
        return ap_error(g->status, "%s: the graph has an earlier error: %s", who, g->error);
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Rule 2: forward leaves                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Smallest layer among the forward consumers of every node, or INT32_MAX. Caller frees. */
static int *min_forward_consumer(const autopar_graph *g) {
    int *minc = malloc((size_t)(g->n_nodes > 0 ? g->n_nodes : 1) * sizeof *minc);
    if (!minc) return NULL;
    for (int i = 0; i < g->n_nodes; i++) minc[i] = INT32_MAX;
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        if (!is_forward_op(n)) continue;
        for (int k = 0; k < n->n_src; k++)
            if (n->layer < minc[n->src[k]]) minc[n->src[k]] = n->layer;
    }
    return minc;
}

static ap_status place_leaves(autopar_graph *g, int n_layers) {
    int *minc = min_forward_consumer(g);
    if (!minc) return ap_error(AUTOPAR_ERR_NOMEM, "layer construction: out of memory");
    /* Unused leaves follow the next forward op; scan backwards to know it. */
    int next_layer = n_layers - 1;
    for (int i = g->n_nodes - 1; i >= 0; i--) {
        ap_node *n = g->nodes[i];
        if (is_forward_op(n)) {
            next_layer = n->layer;
        } else if (is_forward_leaf(n)) {
            n->layer = minc[i] != INT32_MAX ? minc[i] : next_layer;
        }
    }
    free(minc);
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Rules 3 and 4: propagation                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Layer of the parameter behind an apply node or optimizer state, or -1. */
static int param_layer_of(const autopar_graph *g, const ap_node *n) {
    int target = -1;
    if (n->op == AP_OP_OPT_STATE) target = (int)n->attrs.i[0];
    else if (n->assign_to >= 0) target = n->assign_to;
    if (target < 0 || target >= g->n_nodes) return -1;
    const ap_node *t = g->nodes[target];
    if (t->op == AP_OP_OPT_STATE) {
        int p = (int)t->attrs.i[0];
        if (p < 0 || p >= g->n_nodes) return -1;
        t = g->nodes[p];
    }
    return t->op == AP_OP_PARAM ? t->layer : -1;
}

/* Lower bounds of rule 3 (see AP_LAYER_PROPAGATE_DERIVE) for every backward node; -1 = none. */
static int *backward_lower_bounds(const autopar_graph *g) {
    int *lb = malloc((size_t)(g->n_nodes > 0 ? g->n_nodes : 1) * sizeof *lb);
    if (!lb) return NULL;
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        lb[i] = -1;
        if (n->phase != AUTOPAR_PHASE_BACKWARD) continue;
        for (int k = 0; k < n->n_src; k++) {
            const ap_node *s = g->nodes[n->src[k]];
            if (s->phase == AUTOPAR_PHASE_FORWARD && s->layer > lb[i]) lb[i] = s->layer;
        }
    }
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *f = g->nodes[i];
        if (f->phase != AUTOPAR_PHASE_FORWARD || f->grad < 0 || f->grad >= g->n_nodes) continue;
        if (g->nodes[f->grad]->phase == AUTOPAR_PHASE_BACKWARD && f->layer > lb[f->grad])
            lb[f->grad] = f->layer;
    }
    return lb;
}

static ap_status propagate_derive(autopar_graph *g) {
    int *lb = backward_lower_bounds(g);
    if (!lb) return ap_error(AUTOPAR_ERR_NOMEM, "layer propagation: out of memory");
    int running = -1;
    for (int i = g->n_nodes - 1; i >= 0; i--) {
        ap_node *n = g->nodes[i];
        if (n->phase != AUTOPAR_PHASE_BACKWARD) continue;
        if (lb[i] > running) running = lb[i];
        n->layer = running < 0 ? 0 : running;
    }
    free(lb);
    for (int i = 0; i < g->n_nodes; i++) {
        ap_node *n = g->nodes[i];
        if (n->phase != AUTOPAR_PHASE_APPLY) continue;
        int l = param_layer_of(g, n);
        if (l < 0) {
            /* Not tied to a parameter: follow the largest operand layer. */
            l = 0;
            for (int k = 0; k < n->n_src; k++)
                if (g->nodes[n->src[k]]->layer > l) l = g->nodes[n->src[k]]->layer;
        }
        n->layer = l;
    }
    return AUTOPAR_OK;
}

/* First index of a non-forward node; every later node must be non-forward too, else -1. */
static int forward_prefix(const autopar_graph *g) {
    int n_fwd = 0;
    while (n_fwd < g->n_nodes && g->nodes[n_fwd]->phase == AUTOPAR_PHASE_FORWARD) n_fwd++;
    for (int i = n_fwd; i < g->n_nodes; i++)
        if (g->nodes[i]->phase == AUTOPAR_PHASE_FORWARD) return -1;
    return n_fwd;
}

static ap_status propagate_replay(autopar_graph *g) {
    int n_fwd = forward_prefix(g);
    if (n_fwd < 0)
        return ap_error(AUTOPAR_ERR_GRAPH, "layer replay: forward nodes follow backward or apply "
                        "nodes, so the training part was not built by autopar_backward alone");
    if (n_fwd == g->n_nodes) return AUTOPAR_OK;
    if (g->loss < 0 || g->loss >= n_fwd)
        return ap_error(AUTOPAR_ERR_GRAPH, "layer replay: the graph has backward or apply nodes "
                        "but no loss from autopar_backward");
    autopar_graph *c = NULL;
    ap_status st = autopar_graph_new(&c);
    if (st != AUTOPAR_OK) return st;
    for (int i = 0; i < n_fwd && st == AUTOPAR_OK; i++) {
        const ap_node *n = g->nodes[i];
        c->current_layer = n->layer;
        ap_node *m = ap_graph_add(c, n->op, n->n_src, n->src, &n->attrs, &n->shape, n->dtype,
                                  n->name);
        if (!m) st = c->status ? c->status : AUTOPAR_ERR_GRAPH;
        else if (!ap_shape_equal(&m->shape, &n->shape) || m->dtype != n->dtype)
            st = ap_error(AUTOPAR_ERR_GRAPH, "layer replay: node '%s' does not rebuild to the same "
                          "shape", n->name);
    }
    if (st == AUTOPAR_OK) st = autopar_backward(c, (autopar_tensor *)c->nodes[g->loss]);
    if (st == AUTOPAR_OK && g->has_optimizer) st = autopar_apply_optimizer(c, &g->optimizer);
    if (st == AUTOPAR_OK && c->n_nodes != g->n_nodes)
        st = ap_error(AUTOPAR_ERR_GRAPH, "layer replay: rebuilding the training part gives %d "
                      "nodes, the graph has %d", c->n_nodes, g->n_nodes);
    for (int i = n_fwd; i < g->n_nodes && st == AUTOPAR_OK; i++) {
        const ap_node *a = g->nodes[i], *b = c->nodes[i];
        bool same = a->op == b->op && a->n_src == b->n_src && a->phase == b->phase &&
                    a->assign_to == b->assign_to;
        for (int k = 0; same && k < a->n_src; k++) same = a->src[k] == b->src[k];
        if (!same)
            st = ap_error(AUTOPAR_ERR_GRAPH, "layer replay: node %d ('%s', %s) differs from the "
                          "rebuilt node ('%s', %s)", i, a->name, ap_op_name(a->op), b->name,
                          ap_op_name(b->op));
    }
    if (st == AUTOPAR_OK)
        for (int i = n_fwd; i < g->n_nodes; i++) g->nodes[i]->layer = c->nodes[i]->layer;
    autopar_graph_free(c);
    return st;
}

ap_status ap_layer_propagate(autopar_graph *g, ap_layer_propagation mode,
                             ap_layer_propagation *used) {
    ap_status st = check_graph(g, "ap_layer_propagate");
    if (st != AUTOPAR_OK) return st;
    if ((int)mode < 0 || mode >= AP_LAYER_PROPAGATE_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_propagate: bad mode %d", (int)mode);
    /* The replay runs public functions that set or clear the last error; a successful
     * propagation leaves the caller's message alone. */
    char saved[1024];
    snprintf(saved, sizeof saved, "%s", autopar_last_error());
    ap_layer_propagation ran = mode;
    if (mode == AP_LAYER_PROPAGATE_DERIVE) {
        st = propagate_derive(g);
    } else {
        st = propagate_replay(g);
        ran = AP_LAYER_PROPAGATE_REPLAY;
        if (st != AUTOPAR_OK && st != AUTOPAR_ERR_NOMEM && mode == AP_LAYER_PROPAGATE_AUTO) {
            st = propagate_derive(g);
            ran = AP_LAYER_PROPAGATE_DERIVE;
        }
    }
    if (st != AUTOPAR_OK) return st;
    ap_error(AUTOPAR_OK, "%s", saved);
    if (used) *used = ran;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Checks and statistics                                                                       */
/* ------------------------------------------------------------------------------------------ */

ap_status ap_layer_check(const autopar_graph *g, int n_layers) {
    if (!g || n_layers < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_check: NULL graph or %d layers",
                        n_layers);
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        if (n->layer < 0 || n->layer >= n_layers)
            return ap_error(AUTOPAR_ERR_GRAPH, "layer check: node '%s' has layer %d, outside "
                            "[0, %d)", n->name, n->layer, n_layers);
    }
    /* Rule 1. */
    int expect = 0, prev_op = -1;
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        if (!is_forward_op(n)) continue;
        if (n->layer < expect - 1 || (prev_op < 0 && n->layer != 0) || n->layer > expect)
            return ap_error(AUTOPAR_ERR_GRAPH, "layer check: forward op '%s' has layer %d after "
                            "'%s' of layer %d (forward layers must be contiguous from 0)",
                            n->name, n->layer, prev_op >= 0 ? g->nodes[prev_op]->name : "(none)",
                            prev_op >= 0 ? g->nodes[prev_op]->layer : -1);
        if (n->layer == expect) expect++;
        prev_op = i;
    }
    if (expect != n_layers)
        return ap_error(AUTOPAR_ERR_GRAPH, "layer check: the forward ops use %d layers, expected "
                        "%d", expect, n_layers);
    /* Rule 2. */
    int *minc = min_forward_consumer(g);
    if (!minc) return ap_error(AUTOPAR_ERR_NOMEM, "layer check: out of memory");
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        if (is_forward_leaf(n) && minc[i] != INT32_MAX && n->layer != minc[i]) {
            int l = minc[i];
            free(minc);
            return ap_error(AUTOPAR_ERR_GRAPH, "layer check: '%s' has layer %d but is first read "
                            "in layer %d", n->name, n->layer, l);
        }
    }
    free(minc);
    /* Rule 3. */
    int *lb = backward_lower_bounds(g);
    if (!lb) return ap_error(AUTOPAR_ERR_NOMEM, "layer check: out of memory");
    int prev_bwd = -1;
    ap_status st = AUTOPAR_OK;
    for (int i = 0; i < g->n_nodes && st == AUTOPAR_OK; i++) {
        const ap_node *n = g->nodes[i];
        if (n->phase != AUTOPAR_PHASE_BACKWARD) continue;
        if (prev_bwd >= 0 && n->layer > g->nodes[prev_bwd]->layer)
            st = ap_error(AUTOPAR_ERR_GRAPH, "layer check: backward node '%s' (layer %d) follows "
                          "'%s' (layer %d); backward layers must not increase", n->name, n->layer,
                          g->nodes[prev_bwd]->name, g->nodes[prev_bwd]->layer);
        else if (n->layer < lb[i])
            st = ap_error(AUTOPAR_ERR_GRAPH, "layer check: backward node '%s' has layer %d but "
                          "reads (or is the gradient of) a forward tensor of layer %d", n->name,
                          n->layer, lb[i]);
        prev_bwd = i;
    }
    free(lb);
    /* Rule 4. */
    for (int i = 0; i < g->n_nodes && st == AUTOPAR_OK; i++) {
        const ap_node *n = g->nodes[i];
        if (n->phase != AUTOPAR_PHASE_APPLY) continue;
        int l = param_layer_of(g, n);
        if (l >= 0 && n->layer != l)
            st = ap_error(AUTOPAR_ERR_GRAPH, "layer check: optimizer node '%s' has layer %d, its "
                          "parameter has layer %d", n->name, n->layer, l);
    }
    return st;
}

ap_status ap_layer_stats_compute(const autopar_graph *g, int n_layers, ap_layer_stats *stats) {
    if (!g || !stats || n_layers < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_stats_compute: NULL argument or %d "
                        "layers", n_layers);
    for (int l = 0; l < n_layers; l++)
        stats[l] = (ap_layer_stats){0, 0, 0.0, 0.0, -1, -1};
    int *counted = malloc((size_t)(g->n_nodes > 0 ? g->n_nodes : 1) * sizeof *counted);
    if (!counted) return ap_error(AUTOPAR_ERR_NOMEM, "ap_layer_stats_compute: out of memory");
    for (int i = 0; i < g->n_nodes; i++) counted[i] = -1;
    ap_status st = AUTOPAR_OK;
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        if (!is_forward_op(n)) continue;
        int l = n->layer;
        if (l < 0 || l >= n_layers) {
            st = ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_stats_compute: forward op '%s' has "
                          "layer %d, outside [0, %d)", n->name, l, n_layers);
            break;
        }
        ap_layer_stats *s = &stats[l];
        s->n_ops++;
        s->n_heavy += ap_op_is_heavy(n->op);
        s->flops += ap_node_flops(g, n);
        if (s->first_op < 0) s->first_op = i;
        s->last_op = i;
        for (int k = 0; k < n->n_src; k++) {
            const ap_node *src = g->nodes[n->src[k]];
            if (!is_forward_op(src) || src->layer >= l || counted[src->id] == l) continue;
            counted[src->id] = l;
            s->bytes_in += tensor_bytes(src);
        }
    }
    free(counted);
    return st;
}

void ap_layer_stats_print(const ap_layer_stats *stats, int n_layers, FILE *f) {
    if (!stats || !f) return;
    for (int l = 0; l < n_layers; l++)
        fprintf(f, "layer %3d: %5d ops, %3d heavy, %10.4f GFLOP, %10.4f MB in, nodes %d..%d\n", l,
                stats[l].n_ops, stats[l].n_heavy, stats[l].flops * 1e-9, stats[l].bytes_in * 1e-6,
                stats[l].first_op, stats[l].last_op);
}

/* ------------------------------------------------------------------------------------------ */
/* Manual layers                                                                               */
/* ------------------------------------------------------------------------------------------ */

ap_status ap_layer_manual(autopar_graph *g, int *n_layers) {
    if (n_layers) *n_layers = 0;
    ap_status st = check_graph(g, "ap_layer_manual");
    if (st != AUTOPAR_OK) return st;
    if (!n_layers) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_manual: n_layers is NULL");
    int last = -1, prev = -1;
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        if (!is_forward_op(n)) continue;
        if (prev < 0 && n->layer != 0)
            return ap_error(AUTOPAR_ERR_GRAPH, "ap_layer_manual: layer 0 has no operations: the "
                            "first forward op '%s' is in layer %d (a pipeline boundary was marked "
                            "before any operation)", n->name, n->layer);
        if (prev >= 0 && n->layer < last)
            return ap_error(AUTOPAR_ERR_GRAPH, "ap_layer_manual: forward op '%s' (layer %d) "
                            "follows '%s' (layer %d); layers must not decrease along the graph",
                            n->name, n->layer, g->nodes[prev]->name, last);
        if (prev >= 0 && n->layer > last + 1)
            return ap_error(AUTOPAR_ERR_GRAPH, "ap_layer_manual: layer %d has no operations: "
                            "consecutive pipeline boundaries between '%s' and '%s'", last + 1,
                            g->nodes[prev]->name, n->name);
        last = n->layer;
        prev = i;
    }
    if (prev < 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_manual: the graph has no forward "
                        "operations");
    st = place_leaves(g, last + 1);
    if (st == AUTOPAR_OK) st = ap_layer_propagate(g, AP_LAYER_PROPAGATE_AUTO, NULL);
    if (st == AUTOPAR_OK) st = ap_layer_check(g, last + 1);
    if (st == AUTOPAR_OK) *n_layers = last + 1;
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Automatic clustering                                                                        */
/* ------------------------------------------------------------------------------------------ */

typedef struct cluster_ctx {
    int     n;             /* forward ops                                                    */
    int     L;
    int    *ops;           /* node ids of the forward ops                                    */
    int    *pos;           /* node id -> index in ops, or -1                                 */
    double *flops;
    double *bytes;
    unsigned char *heavy;
    int    *stamp;
    int     h_min;
    double  bound;
} cluster_ctx;

static bool admissible(const cluster_ctx *x, double flops, int heavy) {
    return (heavy >= x->h_min || flops >= x->bound) && (flops <= x->bound || heavy <= x->h_min);
}

/* Segments [a, b) of forward ops from a fixed start a, in increasing b. bytes_in is built
 * incrementally: an op's operand made before a is counted the first time it is read (stamp). */
typedef struct seg_iter {
    int    a, b;
    double cross;    /* bytes_in of [a, b)   */
    double flops;
    int    heavy;
} seg_iter;

static void seg_begin(seg_iter *it, int a) { *it = (seg_iter){a, a, 0.0, 0.0, 0}; }

/* Advances to the next admissible segment; false once no longer segment can be admissible
 * (FLOPs over the bound with more than h_min heavy ops only grows worse). */
static bool seg_next(cluster_ctx *x, const autopar_graph *g, seg_iter *it) {
    while (it->b < x->n) {
        const int e = it->b++;
        const ap_node *op = g->nodes[x->ops[e]];
        it->flops += x->flops[e];
        it->heavy += x->heavy[e];
        for (int k = 0; k < op->n_src; k++) {
            int p = x->pos[op->src[k]];
            if (p >= 0 && p < it->a && x->stamp[p] != it->a) {
                x->stamp[p] = it->a;
                it->cross += x->bytes[p];
            }
        }
        if (it->flops > x->bound && it->heavy > x->h_min) {
            it->b = x->n;
            return false;
        }
        if (admissible(x, it->flops, it->heavy)) return true;
    }
    return false;
}

static void cluster_free(cluster_ctx *x) {
    free(x->ops);
    free(x->pos);
    free(x->flops);
    free(x->bytes);
    free(x->heavy);
    free(x->stamp);
}

ap_status ap_layer_cluster(autopar_graph *g, int n_layers, double eps, ap_layer_stats *stats) {
    ap_status st = check_graph(g, "ap_layer_cluster");
    if (st != AUTOPAR_OK) return st;
    if (n_layers < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_cluster: %d layers requested, need "
                        ">= 1", n_layers);
    if (!(eps >= 0.0) || !isfinite(eps))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_cluster: eps %g must be finite and "
                        ">= 0 (Alpa's default is 0.5)", eps);
    cluster_ctx x = {0};
    x.L = n_layers;
    size_t nn = (size_t)(g->n_nodes > 0 ? g->n_nodes : 1);
    x.ops = malloc(nn * sizeof *x.ops);
    x.pos = malloc(nn * sizeof *x.pos);
    x.flops = malloc(nn * sizeof *x.flops);
    x.bytes = malloc(nn * sizeof *x.bytes);
    x.heavy = malloc(nn);
    x.stamp = malloc(nn * sizeof *x.stamp);
    if (!x.ops || !x.pos || !x.flops || !x.bytes || !x.heavy || !x.stamp) {
        cluster_free(&x);
        return ap_error(AUTOPAR_ERR_NOMEM, "ap_layer_cluster: out of memory");
    }
    int n_heavy = 0;
    double total = 0.0;
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *nd = g->nodes[i];
        x.pos[i] = -1;
        if (!is_forward_op(nd)) continue;
        x.pos[i] = x.n;
        x.ops[x.n] = i;
        x.flops[x.n] = ap_node_flops(g, nd);
        x.bytes[x.n] = tensor_bytes(nd);
        x.heavy[x.n] = ap_op_is_heavy(nd->op);
        x.stamp[x.n] = -1;
        n_heavy += x.heavy[x.n];
        total += x.flops[x.n];
        x.n++;
    }
    const int n = x.n, L = n_layers;
    if (n == 0) st = ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_cluster: the graph has no "
                              "forward operations to cluster");
    else if (L > n)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_cluster: %d layers requested but the "
                      "forward graph has only %d operations", L, n);
    else if (L > 1 && n_heavy < L)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_cluster: %d layers requested but the "
                      "forward graph has %d heavy ops (matmuls); every layer needs at least one, "
                      "so at most %d layers are possible", L, n_heavy, n_heavy > 1 ? n_heavy : 1);
    if (st != AUTOPAR_OK) {
        cluster_free(&x);
        return st;
    }
    x.h_min = n_heavy / L < 3 ? n_heavy / L : 3;
    x.bound = (1.0 + eps) * total / L;

    /* DP tables over (layers q, prefix length b), row-major by q. */
    const size_t W = (size_t)n + 1;
    double *mx = malloc((size_t)(L + 1) * W * sizeof *mx);
    double *sum = malloc((size_t)(L + 1) * W * sizeof *sum);
    double *sq = malloc((size_t)(L + 1) * W * sizeof *sq);
    int *arg = malloc((size_t)(L + 1) * W * sizeof *arg);
    int *bounds = malloc((size_t)(L + 1) * sizeof *bounds);
    if (!mx || !sum || !sq || !arg || !bounds) {
        free(mx);
        free(sum);
        free(sq);
        free(arg);
        free(bounds);
        cluster_free(&x);
        return ap_error(AUTOPAR_ERR_NOMEM, "ap_layer_cluster: out of memory (%d ops x %d layers)",
                        n, L);
    }
    for (size_t k = 0; k < (size_t)(L + 1) * W; k++) {
        mx[k] = sum[k] = sq[k] = INFINITY;
        arg[k] = -1;
    }

    /* Pass 1: least possible maximum of bytes_in. Layers q-1 cover prefix a, layer q = [a, b). */
    mx[0] = 0.0;
    for (int a = 0; a < n; a++) {
        int q_lo = 1, q_hi = a + 1 < L ? a + 1 : L;   /* q - 1 layers need q - 1 <= a ops */
        bool any = false;
        for (int q = q_lo; q <= q_hi; q++) any |= isfinite(mx[(size_t)(q - 1) * W + a]);
        if (!any) continue;
        seg_iter it;
        seg_begin(&it, a);
        while (seg_next(&x, g, &it)) {
            for (int q = q_lo; q <= q_hi; q++) {
                double prev = mx[(size_t)(q - 1) * W + a];
                if (!isfinite(prev)) continue;
                double v = prev > it.cross ? prev : it.cross;
                if (v < mx[(size_t)q * W + it.b]) mx[(size_t)q * W + it.b] = v;
            }
        }
    }
    const double best_max = mx[(size_t)L * W + n];
    if (!isfinite(best_max)) {
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_layer_cluster: no clustering of the %d forward "
                      "ops into %d layers keeps every layer within (1 + eps) x the average FLOPs "
                      "(%.4g with eps %g) with at least %d heavy ops per layer; increase eps or "
                      "use fewer layers", n, L, x.bound, eps, x.h_min);
    }

    /* Pass 2: among layerings whose every bytes_in <= best_max, least (sum of bytes_in, sum of
     * flops^2), both additive, so the DP is exact. */
    if (st == AUTOPAR_OK) {
        for (int i = 0; i < n; i++) x.stamp[i] = -1;
        sum[0] = sq[0] = 0.0;
        for (int a = 0; a < n; a++) {
            int q_hi = a + 1 < L ? a + 1 : L;
            bool any = false;
            for (int q = 1; q <= q_hi; q++) any |= isfinite(sum[(size_t)(q - 1) * W + a]);
            if (!any) continue;
            seg_iter it;
            seg_begin(&it, a);
            while (seg_next(&x, g, &it)) {
                if (it.cross > best_max) break;   /* bytes_in only grows with b */
                for (int q = 1; q <= q_hi; q++) {
                    size_t from = (size_t)(q - 1) * W + a, to = (size_t)q * W + it.b;
                    if (!isfinite(sum[from])) continue;
                    double s = sum[from] + it.cross, s2 = sq[from] + it.flops * it.flops;
                    if (s < sum[to] || (s == sum[to] && s2 < sq[to])) {
                        sum[to] = s;
                        sq[to] = s2;
                        arg[to] = a;
                    }
                }
            }
        }
        if (!isfinite(sum[(size_t)L * W + n]))
            st = ap_error(AUTOPAR_ERR_GRAPH, "ap_layer_cluster: internal error: the tie-break "
                          "pass found no layering");
    }
    if (st == AUTOPAR_OK) {
        int b = n;
        for (int q = L; q >= 1; q--) {
            bounds[q] = b;
            b = arg[(size_t)q * W + b];
            if (b < 0) {
                st = ap_error(AUTOPAR_ERR_GRAPH, "ap_layer_cluster: internal error while "
                              "backtracking");
                break;
            }
        }
        bounds[0] = 0;
        if (st == AUTOPAR_OK && b != 0)
            st = ap_error(AUTOPAR_ERR_GRAPH, "ap_layer_cluster: internal error: layers start at "
                          "op %d", b);
    }
    if (st == AUTOPAR_OK)
        for (int q = 0; q < L; q++)
            for (int e = bounds[q]; e < bounds[q + 1]; e++) g->nodes[x.ops[e]]->layer = q;
    free(mx);
    free(sum);
    free(sq);
    free(arg);
    free(bounds);
    cluster_free(&x);
    if (st != AUTOPAR_OK) return st;

    st = place_leaves(g, L);
    if (st == AUTOPAR_OK) st = ap_layer_propagate(g, AP_LAYER_PROPAGATE_AUTO, NULL);
    if (st == AUTOPAR_OK) st = ap_layer_check(g, L);
    if (st == AUTOPAR_OK && stats) st = ap_layer_stats_compute(g, L, stats);
    return st;
}
