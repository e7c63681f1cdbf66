/*
 * The single-process reference executor: every tensor of the graph gets its own host buffer,
 * ops run in topological order through the CPU kernels, and at the end of a step each update
 * result is swapped into the parameter or state it replaces. It is the numerical reference every
 * parallel plan is compared against, so it favours plainness over memory reuse.
 */
#include "cpu/kernels_cpu.h"
#include "internal.h"

#include <stdlib.h>
#include <string.h>

struct autopar_executor {
    const autopar_graph *g;
    autopar_precision    precision;
    uint64_t             seed;
    void               **buf;    /* one buffer per node */
    int64_t              steps;  /* completed optimizer steps */
};

static bool is_leaf(ap_op op) {
    return op == AP_OP_INPUT || op == AP_OP_PARAM || op == AP_OP_OPT_STATE;
}

autopar_status autopar_executor_new(const autopar_graph *g, uint64_t seed,
                                    autopar_precision precision, autopar_executor **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_executor_new: out is NULL");
    *out = NULL;
    if (!g) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_executor_new: graph is NULL");
    if ((int)precision < 0 || precision >= AUTOPAR_PRECISION_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_executor_new: precision %d is not valid",
                        (int)precision);
    if (g->status != AUTOPAR_OK)
        return ap_error(AUTOPAR_ERR_GRAPH, "autopar_executor_new: the graph has an error: %s",
                        g->error);
    autopar_executor *ex = calloc(1, sizeof *ex);
    if (!ex) return ap_error(AUTOPAR_ERR_NOMEM, "autopar_executor_new: out of memory");
    ex->g = g;
    ex->precision = precision;
    ex->seed = seed;
    ex->buf = calloc((size_t)g->n_nodes + 1, sizeof *ex->buf);
    if (!ex->buf) {
        free(ex);
        return ap_error(AUTOPAR_ERR_NOMEM, "autopar_executor_new: out of memory");
    }
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        size_t bytes = (size_t)ap_shape_numel(&n->shape) * ap_elem_size(n->dtype, precision);
        ex->buf[i] = calloc(bytes ? bytes : 1, 1);
        if (!ex->buf[i]) {
            autopar_executor_free(ex);
            return ap_error(AUTOPAR_ERR_NOMEM, "autopar_executor_new: cannot allocate %zu bytes "
                            "for tensor '%s'", bytes, n->name);
        }
        if (n->op == AP_OP_PARAM)
            ap_param_init_host(n, seed, precision, 0, ap_shape_numel(&n->shape), ex->buf[i]);
    }
    *out = ex;
    return AUTOPAR_OK;
}

void autopar_executor_free(autopar_executor *ex) {
    if (!ex) return;
    if (ex->buf)
        for (int i = 0; i < ex->g->n_nodes; i++) free(ex->buf[i]);
    free(ex->buf);
    free(ex);
}

/* Checks that t is a tensor of the executor's graph holding n elements. */
static ap_status check_tensor(const autopar_executor *ex, const autopar_tensor *t, int64_t n,
                              const char *fn) {
    if (!ex || !t) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: executor or tensor is NULL", fn);
    return ap_graph_check_tensor(ex->g, t, n, fn, "executor's");
}

static ap_status check_writable(const ap_node *n, const char *fn) {
    if (!is_leaf(n->op))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: tensor '%s' is computed by op %s; only "
                        "inputs, parameters and optimizer state can be written", fn, n->name,
                        ap_op_name(n->op));
    return AUTOPAR_OK;
}

autopar_status autopar_executor_write(autopar_executor *ex, const autopar_tensor *t,
                                      const void *data, int64_t n) {
    ap_status st = check_tensor(ex, t, n, "autopar_executor_write");
    if (st) return st;
    const ap_node *node = (const ap_node *)t;
    if ((st = check_writable(node, "autopar_executor_write"))) return st;
    if (!data && n) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_executor_write: data is NULL");
    if (node->dtype == AUTOPAR_I32 || ex->precision == AUTOPAR_PRECISION_F32) {
        memcpy(ex->buf[node->id], data, (size_t)n * 4);
    } else {
        for (int64_t i = 0; i < n; i++)
            ((double *)ex->buf[node->id])[i] = ((const float *)data)[i];
    }
    return AUTOPAR_OK;
}

autopar_status autopar_executor_read(const autopar_executor *ex, const autopar_tensor *t,
                                     void *data, int64_t n) {
    ap_status st = check_tensor(ex, t, n, "autopar_executor_read");
    if (st) return st;
    if (!data && n) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_executor_read: data is NULL");
    const ap_node *node = (const ap_node *)t;
    if (node->dtype == AUTOPAR_I32 || ex->precision == AUTOPAR_PRECISION_F32) {
        memcpy(data, ex->buf[node->id], (size_t)n * 4);
    } else {
        for (int64_t i = 0; i < n; i++)
            ((float *)data)[i] = (float)((const double *)ex->buf[node->id])[i];
    }
    return AUTOPAR_OK;
}

static ap_status check_f32(const ap_node *n, const char *fn) {
    if (n->dtype != AUTOPAR_F32)
        return ap_error(AUTOPAR_ERR_DTYPE, "%s: tensor '%s' is i32; use the int32_t form", fn,
                        n->name);
    return AUTOPAR_OK;
}

autopar_status autopar_executor_write_f64(autopar_executor *ex, const autopar_tensor *t,
                                          const double *data, int64_t n) {
    ap_status st = check_tensor(ex, t, n, "autopar_executor_write_f64");
    if (st) return st;
    const ap_node *node = (const ap_node *)t;
    if ((st = check_writable(node, "autopar_executor_write_f64")) ||
        (st = check_f32(node, "autopar_executor_write_f64")))
        return st;
    if (!data && n) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_executor_write_f64: data is NULL");
    for (int64_t i = 0; i < n; i++) {
        if (ex->precision == AUTOPAR_PRECISION_F64)
            ((double *)ex->buf[node->id])[i] = data[i];
        else
            ((float *)ex->buf[node->id])[i] = (float)data[i];
    }
    return AUTOPAR_OK;
}

autopar_status autopar_executor_read_f64(const autopar_executor *ex, const autopar_tensor *t,
                                         double *data, int64_t n) {
    ap_status st = check_tensor(ex, t, n, "autopar_executor_read_f64");
    if (st) return st;
    const ap_node *node = (const ap_node *)t;
    if ((st = check_f32(node, "autopar_executor_read_f64"))) return st;
    if (!data && n) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_executor_read_f64: data is NULL");
    for (int64_t i = 0; i < n; i++)
        data[i] = ex->precision == AUTOPAR_PRECISION_F64 ? ((const double *)ex->buf[node->id])[i]
                                                         : ((const float *)ex->buf[node->id])[i];
    return AUTOPAR_OK;
}

/* Runs every computed node whose phase is in [first, last], in topological order. */
static ap_status run_phases(autopar_executor *ex, autopar_phase first, autopar_phase last) {
    const autopar_graph *g = ex->g;
    ap_kernel_call call;
    for (int i = 0; i < g->n_nodes; i++) {
        const ap_node *n = g->nodes[i];
        if (is_leaf(n->op) || n->phase < first || n->phase > last) continue;
        ap_kernel_call_from_node(g, n, ex->precision, &call);
        call.out = ex->buf[i];
        for (int k = 0; k < n->n_src; k++) call.src[k] = ex->buf[n->src[k]];
        call.step = ex->steps + 1;
        ap_status st = ap_cpu_run(&call);
        if (st) return st;
    }
    return AUTOPAR_OK;
}

static void read_loss(const autopar_executor *ex, double *loss) {
    if (!loss) return;
    int id = ex->g->loss;
    if (id < 0) {
        *loss = 0.0;
        return;
    }
    *loss = ex->precision == AUTOPAR_PRECISION_F64 ? *(const double *)ex->buf[id]
                                                   : *(const float *)ex->buf[id];
}

static ap_status check_ready(const autopar_executor *ex, const char *fn, bool need_loss) {
    if (!ex) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: executor is NULL", fn);
    if (need_loss && ex->g->loss < 0)
        return ap_error(AUTOPAR_ERR_GRAPH, "%s: the graph has no backward pass "
                        "(call autopar_backward or autopar_build_training)", fn);
    return AUTOPAR_OK;
}

autopar_status autopar_executor_forward(autopar_executor *ex, double *loss) {
    ap_status st = check_ready(ex, "autopar_executor_forward", false);
    if (!st) st = run_phases(ex, AUTOPAR_PHASE_FORWARD, AUTOPAR_PHASE_FORWARD);
    if (!st) read_loss(ex, loss);
    return st;
}

autopar_status autopar_executor_forward_backward(autopar_executor *ex, double *loss) {
    ap_status st = check_ready(ex, "autopar_executor_forward_backward", true);
    if (!st) st = run_phases(ex, AUTOPAR_PHASE_FORWARD, AUTOPAR_PHASE_BACKWARD);
    if (!st) read_loss(ex, loss);
    return st;
}

autopar_status autopar_executor_step(autopar_executor *ex, double *loss) {
    ap_status st = check_ready(ex, "autopar_executor_step", true);
    if (st) return st;
    if (!ex->g->has_optimizer)
        return ap_error(AUTOPAR_ERR_GRAPH, "autopar_executor_step: the graph has no optimizer "
                        "(call autopar_apply_optimizer or autopar_build_training)");
    if ((st = run_phases(ex, AUTOPAR_PHASE_FORWARD, AUTOPAR_PHASE_APPLY))) return st;
    read_loss(ex, loss);
    /* Updates replace their targets by swapping buffers: the update's old buffer is rewritten
     * by the next step before anything reads it. */
    for (int i = 0; i < ex->g->n_nodes; i++) {
        int target = ex->g->nodes[i]->assign_to;
        if (target < 0) continue;
        void *tmp = ex->buf[target];
        ex->buf[target] = ex->buf[i];
        ex->buf[i] = tmp;
    }
    ex->steps++;
    return AUTOPAR_OK;
}

int64_t autopar_executor_steps(const autopar_executor *ex) { return ex ? ex->steps : 0; }
