/*
 * The graph runner (graph_runner.h): the reference executor's algorithm on any backend. Kernel
 * calls are built once per node at creation (shapes, attrs, precision) and only their buffer
 * addresses and the step number are filled in per step, so a step costs the host one pass over
 * the node list.
 */
#include "graph_runner.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct ap_graph_runner {
    const autopar_graph *g;
    ap_backend          *b;
    autopar_precision    precision;
    uint64_t             seed;
    ap_buffer           *buf;    /* one per node, indexed by node id                         */
    ap_kernel_call      *calls;  /* one per node (leaves unused), buffers filled per run     */
    int64_t              steps;  /* completed optimizer steps                                */
};

static bool is_leaf(ap_op op) {
    return op == AP_OP_INPUT || op == AP_OP_PARAM || op == AP_OP_OPT_STATE;
}

static const char *precision_name(autopar_precision p) {
    return p == AUTOPAR_PRECISION_F32 ? "f32" : p == AUTOPAR_PRECISION_F64 ? "f64" : "?";
}

/* Bytes of node n's buffer: at least one 4-byte word, so that every tensor has an address. */
static size_t node_bytes(const ap_node *n, autopar_precision p) {
    size_t bytes = (size_t)ap_shape_numel(&n->shape) * ap_elem_size(n->dtype, p);
    return bytes ? bytes : 4;
}

size_t ap_graph_runner_bytes_needed(const autopar_graph *g, autopar_precision p) {
    if (!g) return 0;
    size_t total = 0;
    for (int i = 0; i < g->n_nodes; i++) total += node_bytes(g->nodes[i], p);
    return total;
}

/* ------------------------------------------------------------------------------------------ */
/* Parameter initialisation                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Initialises every parameter through one host staging block (the largest parameter's size). */
static ap_status init_params(ap_graph_runner *r) {
    const autopar_graph *g = r->g;
    size_t max_bytes = 0;
    for (int i = 0; i < g->n_nodes; i++)
        if (g->nodes[i]->op == AP_OP_PARAM) {
            size_t bytes = node_bytes(g->nodes[i], r->precision);
            if (bytes > max_bytes) max_bytes = bytes;
        }
    if (max_bytes == 0) return AUTOPAR_OK;
    void *host = malloc(max_bytes);
    if (!host)
        return ap_error(AUTOPAR_ERR_NOMEM, "ap_graph_runner_new: cannot allocate %zu bytes of "
                        "host memory to initialise parameters", max_bytes);
    ap_status st = AUTOPAR_OK;
    for (int i = 0; i < g->n_nodes && !st; i++) {
        const ap_node *n = g->nodes[i];
        if (n->op != AP_OP_PARAM) continue;
        int64_t count = ap_shape_numel(&n->shape);
        ap_param_init_host(n, r->seed, r->precision, 0, count, host);
        st = ap_backend_upload(r->b, &r->buf[i], 0, host,
                               (size_t)count * ap_elem_size(n->dtype, r->precision), n->name);
    }
    free(host);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Creation                                                                                    */
/* ------------------------------------------------------------------------------------------ */

ap_status ap_graph_runner_new(const autopar_graph *g, ap_backend *b, uint64_t seed,
                              autopar_precision p, ap_graph_runner **out) {
    const char *fn = "ap_graph_runner_new";
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!g) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: graph is NULL", fn);
    if (!b) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: backend is NULL", fn);
    if ((int)p < 0 || p >= AUTOPAR_PRECISION_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: precision %d is not valid", fn, (int)p);
    if (g->status != AUTOPAR_OK)
        return ap_error(AUTOPAR_ERR_GRAPH, "%s: the graph has an error: %s", fn, g->error);
    /* Refuse unsupported work before allocating anything. */
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        if (is_leaf(n->op) || ap_backend_supports_op(b, n->op, p)) continue;
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "%s: op %s (tensor '%s') is not supported in "
                        "%s precision by the %s backend", fn, ap_op_name(n->op), n->name,
                        precision_name(p), ap_backend_name(b));
    }

    ap_graph_runner *r = calloc(1, sizeof *r);
    if (!r) return ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
    r->g = g;
    r->b = b;
    r->precision = p;
    r->seed = seed;
    size_t n_nodes = (size_t)g->n_nodes;
    r->buf = calloc(n_nodes + 1, sizeof *r->buf);
    r->calls = calloc(n_nodes + 1, sizeof *r->calls);
    if (!r->buf || !r->calls) {
        ap_graph_runner_free(r);
        return ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory (%d nodes)", fn, g->n_nodes);
    }
    ap_status st = AUTOPAR_OK;
    for (int i = 0; i < g->n_nodes && !st; i++) {
        const ap_node *n = g->nodes[i];
        size_t bytes = node_bytes(n, p);
        st = ap_backend_buffer_alloc(b, bytes, n->name, &r->buf[i]);
        /* Everything starts at zero, as the reference executor's calloc'ed buffers do. */
        if (!st) st = ap_backend_fill_zero(b, &r->buf[i], 0, bytes, n->name);
        if (!st && !is_leaf(n->op)) ap_kernel_call_from_node(g, n, p, &r->calls[i]);
    }
    if (!st) st = init_params(r);
    if (!st) st = ap_backend_synchronize(b);
    if (st) {
        ap_graph_runner_free(r);
        return st;
    }
    *out = r;
    return AUTOPAR_OK;
}

void ap_graph_runner_free(ap_graph_runner *r) {
    if (!r) return;
    if (r->buf) {
        /* Let enqueued kernels finish before their buffers go (the CUDA free also waits). */
        (void)ap_backend_synchronize(r->b);
        for (int i = 0; i < r->g->n_nodes; i++) ap_backend_buffer_free(r->b, &r->buf[i]);
    }
    free(r->buf);
    free(r->calls);
    free(r);
}

/* ------------------------------------------------------------------------------------------ */
/* Reading and writing tensors                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Checks that t is a tensor of the runner's graph holding n elements. */
static ap_status check_tensor(const ap_graph_runner *r, const autopar_tensor *t, int64_t n,
                              const char *fn) {
    if (!r || !t) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: runner or tensor is NULL", fn);
    return ap_graph_check_tensor(r->g, t, n, fn, "runner's");
}

ap_status ap_graph_runner_write(ap_graph_runner *r, const autopar_tensor *t, const void *data,
                                int64_t n) {
    const char *fn = "ap_graph_runner_write";
    ap_status st = check_tensor(r, t, n, fn);
    if (st) return st;
    const ap_node *node = (const ap_node *)t;
    if (!is_leaf(node->op))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: tensor '%s' is computed by op %s; only "
                        "inputs, parameters and optimizer state can be written", fn, node->name,
                        ap_op_name(node->op));
    if (n == 0) return AUTOPAR_OK;
    if (!data) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: data for '%s' is NULL", fn, node->name);
    const ap_buffer *dst = &r->buf[node->id];
    if (node->dtype == AUTOPAR_I32 || r->precision == AUTOPAR_PRECISION_F32)
        return ap_backend_upload(r->b, dst, 0, data, (size_t)n * 4, node->name);
    double *tmp = malloc((size_t)n * sizeof *tmp);
    if (!tmp)
        return ap_error(AUTOPAR_ERR_NOMEM, "%s: cannot allocate host memory for '%s'", fn,
                        node->name);
    for (int64_t i = 0; i < n; i++) tmp[i] = ((const float *)data)[i];
    st = ap_backend_upload(r->b, dst, 0, tmp, (size_t)n * sizeof *tmp, node->name);
    free(tmp);
    return st;
}

ap_status ap_graph_runner_read(ap_graph_runner *r, const autopar_tensor *t, void *data,
                               int64_t n) {
    const char *fn = "ap_graph_runner_read";
    ap_status st = check_tensor(r, t, n, fn);
    if (st) return st;
    const ap_node *node = (const ap_node *)t;
    if (n == 0) return AUTOPAR_OK;
    if (!data) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: data for '%s' is NULL", fn, node->name);
    const ap_buffer *src = &r->buf[node->id];
    if (node->dtype == AUTOPAR_I32 || r->precision == AUTOPAR_PRECISION_F32)
        return ap_backend_download(r->b, data, src, 0, (size_t)n * 4, node->name);
    double *tmp = malloc((size_t)n * sizeof *tmp);
    if (!tmp)
        return ap_error(AUTOPAR_ERR_NOMEM, "%s: cannot allocate host memory for '%s'", fn,
                        node->name);
    st = ap_backend_download(r->b, tmp, src, 0, (size_t)n * sizeof *tmp, node->name);
    if (!st)
        for (int64_t i = 0; i < n; i++) ((float *)data)[i] = (float)tmp[i];
    free(tmp);
    return st;
}

const ap_buffer *ap_graph_runner_buffer(const ap_graph_runner *r, int id) {
    if (!r || id < 0 || id >= r->g->n_nodes) return NULL;
    return &r->buf[id];
}

int64_t ap_graph_runner_steps(const ap_graph_runner *r) { return r ? r->steps : 0; }

/* ------------------------------------------------------------------------------------------ */
/* Running                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Runs (or enqueues) every computed node whose phase is in [first, last], in topological order,
 * then waits for the backend so that deferred device errors belong to this call. */
static ap_status run_phases(ap_graph_runner *r, autopar_phase first, autopar_phase last) {
    const autopar_graph *g = r->g;
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        if (is_leaf(n->op) || n->phase < first || n->phase > last) continue;
        ap_kernel_call *call = &r->calls[i];
        call->out = r->buf[i].data;
        for (int k = 0; k < n->n_src; k++) call->src[k] = r->buf[n->src[k]].data;
        call->step = r->steps + 1;
        ap_status st = ap_backend_run(r->b, call);
        if (st) {
            /* Drain the backend, keeping the first error's message (the one to report). */
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", autopar_last_error());
            if (ap_backend_synchronize(r->b) != AUTOPAR_OK) (void)ap_error(st, "%s", msg);
            return st;
        }
    }
    return ap_backend_synchronize(r->b);
}

/* The loss (one scalar download), or 0 when the graph has none. */
static ap_status read_loss(ap_graph_runner *r, double *loss) {
    if (!loss) return AUTOPAR_OK;
    *loss = 0.0;
    int id = r->g->loss;
    if (id < 0) return AUTOPAR_OK;
    const char *name = r->g->nodes[id]->name;
    if (r->precision == AUTOPAR_PRECISION_F64)
        return ap_backend_download(r->b, loss, &r->buf[id], 0, sizeof(double), name);
    float f = 0.0f;
    ap_status st = ap_backend_download(r->b, &f, &r->buf[id], 0, sizeof f, name);
    if (!st) *loss = f;
    return st;
}

static ap_status check_ready(const ap_graph_runner *r, const char *fn, bool need_loss) {
    if (!r) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: runner is NULL", fn);
    if (need_loss && r->g->loss < 0)
        return ap_error(AUTOPAR_ERR_GRAPH, "%s: the graph has no backward pass "
                        "(call autopar_backward or autopar_build_training)", fn);
    return AUTOPAR_OK;
}

ap_status ap_graph_runner_forward(ap_graph_runner *r, double *loss) {
    ap_status st = check_ready(r, "ap_graph_runner_forward", false);
    if (!st) st = run_phases(r, AUTOPAR_PHASE_FORWARD, AUTOPAR_PHASE_FORWARD);
    if (!st) st = read_loss(r, loss);
    return st;
}

ap_status ap_graph_runner_forward_backward(ap_graph_runner *r, double *loss) {
    ap_status st = check_ready(r, "ap_graph_runner_forward_backward", true);
    if (!st) st = run_phases(r, AUTOPAR_PHASE_FORWARD, AUTOPAR_PHASE_BACKWARD);
    if (!st) st = read_loss(r, loss);
    return st;
}

ap_status ap_graph_runner_step(ap_graph_runner *r, double *loss) {
    ap_status st = check_ready(r, "ap_graph_runner_step", true);
    if (st) return st;
    if (!r->g->has_optimizer)
        return ap_error(AUTOPAR_ERR_GRAPH, "ap_graph_runner_step: the graph has no optimizer "
                        "(call autopar_apply_optimizer or autopar_build_training)");
    if ((st = run_phases(r, AUTOPAR_PHASE_FORWARD, AUTOPAR_PHASE_APPLY))) return st;
    if ((st = read_loss(r, loss))) return st;
    /* Updates replace their targets by swapping buffers (as the reference executor does): the
     * update's old buffer is rewritten by the next step before anything reads it. */
    for (int i = 0; i < r->g->n_nodes; i++) {
        int target = r->g->nodes[i]->assign_to;
        if (target < 0) continue;
        ap_buffer tmp = r->buf[target];
        r->buf[target] = r->buf[i];
        r->buf[i] = tmp;
    }
    r->steps++;
    return AUTOPAR_OK;
}
