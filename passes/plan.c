/*
 * The plan object: lifetime, accessors, printing and JSON (see plan.h, docs/inter-op.md).
 *
 * JSON exactness. Numbers of the plan's own fields are written in the shortest form that reads
 * back to the same double (written as raw text, because cJSON's printer may drop the last digit
 * of a double). The embedded graph, cluster and per-stage sharding documents are the texts their
 * own writers produce, inserted verbatim, and read back from the exact byte range they occupy
 * (a small scanner over the already-validated document finds it), so nothing is reformatted.
 */
#include "plan.h"

#include "stage_dp.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Names and formatting                                                                        */
/* ------------------------------------------------------------------------------------------ */

static const char *const k_method_names[AUTOPAR_METHOD_COUNT] = {"pipeshard", "shard",
                                                                 "data_parallel", "zero2"};
static const char *const k_stage_names[AUTOPAR_STAGE_OPTION_COUNT] = {"auto", "uniform",
                                                                      "manual"};
static const char *const k_schedule_names[AUTOPAR_SCHEDULE_COUNT] = {"gpipe", "1f1b"};

AP_INTERNAL const char *ap_method_name(autopar_method m) {
    return (int)m >= 0 && m < AUTOPAR_METHOD_COUNT ? k_method_names[m] : "?";
}
AP_INTERNAL const char *ap_stage_option_name(autopar_stage_option s) {
    return (int)s >= 0 && s < AUTOPAR_STAGE_OPTION_COUNT ? k_stage_names[s] : "?";
}
AP_INTERNAL const char *ap_schedule_name(autopar_schedule s) {
    return (int)s >= 0 && s < AUTOPAR_SCHEDULE_COUNT ? k_schedule_names[s] : "?";
}

AP_INTERNAL const char *ap_fmt_bytes(double b, char *buf, size_t len) {
    static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int u = 0;
    double a = fabs(b);
    while (a >= 1024.0 && u < 5) {
        a /= 1024.0;
        b /= 1024.0;
        u++;
    }
    snprintf(buf, len, u == 0 ? "%.0f %s" : "%.2f %s", b, unit[u]);
    return buf;
}

AP_INTERNAL const char *ap_fmt_time(double s, char *buf, size_t len) {
    double a = fabs(s);
    if (!isfinite(s))
        snprintf(buf, len, "%g s", s);
    else if (a >= 1.0 || a == 0.0)
        snprintf(buf, len, "%.3f s", s);
    else if (a >= 1e-3)
        snprintf(buf, len, "%.3f ms", s * 1e3);
    else
        snprintf(buf, len, "%.3f us", s * 1e6);
    return buf;
}

/* ------------------------------------------------------------------------------------------ */
/* Lifetime and accessors                                                                      */
/* ------------------------------------------------------------------------------------------ */

AP_INTERNAL ap_status ap_plan_alloc(autopar_plan **out) {
    *out = calloc(1, sizeof **out);
    return *out ? AUTOPAR_OK : ap_error(AUTOPAR_ERR_NOMEM, "plan: out of memory");
}

AUTOPAR_API void autopar_plan_free(autopar_plan *p) {
    if (!p) return;
    for (int s = 0; s < p->n_stages && p->stages; s++) {
        free(p->stages[s].devices);
        free(p->stages[s].nodes);
        ap_shard_plan_free(p->stages[s].shard);
    }
    free(p->stages);
    free(p->transfers);
    autopar_graph_free(p->graph);
    autopar_cluster_free(p->cluster);
    free(p);
}

static bool stage_ok(const autopar_plan *p, int s) { return p && s >= 0 && s < p->n_stages; }

AUTOPAR_API int autopar_plan_num_stages(const autopar_plan *p) { return p ? p->n_stages : 0; }
AUTOPAR_API int autopar_plan_num_micro_batches(const autopar_plan *p) {
    return p ? p->n_micro_batches : 0;
}
AUTOPAR_API int autopar_plan_num_layers(const autopar_plan *p) { return p ? p->n_layers : 0; }
AUTOPAR_API autopar_schedule autopar_plan_schedule(const autopar_plan *p) {
    return p ? p->schedule : AUTOPAR_SCHEDULE_1F1B;
}
AUTOPAR_API const autopar_graph *autopar_plan_graph(const autopar_plan *p) {
    return p ? p->graph : NULL;
}
AUTOPAR_API const autopar_cluster *autopar_plan_cluster(const autopar_plan *p) {
    return p ? p->cluster : NULL;
}

AUTOPAR_API autopar_status autopar_plan_get_estimate(const autopar_plan *p,
                                                     autopar_plan_estimate *out) {
    if (!p || !out)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_get_estimate: plan or out is NULL");
    *out = p->estimate;
    return AUTOPAR_OK;
}

AUTOPAR_API autopar_status autopar_plan_stage_info(const autopar_plan *p, int s,
                                                   autopar_stage_info *out) {
    if (!p || !out)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_stage_info: plan or out is NULL");
    if (!stage_ok(p, s))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_stage_info: stage %d out of range "
                        "(the plan has %d)", s, p->n_stages);
    const ap_plan_stage *st = &p->stages[s];
    memset(out, 0, sizeof *out);
    out->first_layer = st->first_layer;
    out->last_layer = st->last_layer;
    out->submesh_hosts = st->submesh[0];
    out->submesh_devices = st->submesh[1];
    out->host_begin = st->host_begin;
    out->device_begin = st->device_begin;
    out->mesh_shape[0] = st->mesh_shape[0];
    out->mesh_shape[1] = st->mesh_shape[1];
    out->force_batch_dim_to_axis0 = st->force_batch_axis == 0;
    out->n_devices = st->n_devices;
    out->n_nodes = st->n_nodes;
    out->forward_time = st->cost.forward;
    out->backward_time = st->cost.backward;
    out->send_time = st->cost.send;
    out->grad_sync_time = st->cost.grad_sync + st->cost.step_send;
    out->apply_time = st->cost.apply;
    out->memory_bytes = st->memory;
    out->micro_batches_in_flight = st->in_flight;
    return AUTOPAR_OK;
}

AUTOPAR_API const int *autopar_plan_stage_devices(const autopar_plan *p, int s, int *n) {
    if (n) *n = stage_ok(p, s) ? p->stages[s].n_devices : 0;
    return stage_ok(p, s) ? p->stages[s].devices : NULL;
}

AUTOPAR_API const int *autopar_plan_stage_nodes(const autopar_plan *p, int s, int *n) {
    if (n) *n = stage_ok(p, s) ? p->stages[s].n_nodes : 0;
    return stage_ok(p, s) ? p->stages[s].nodes : NULL;
}

AUTOPAR_API autopar_status autopar_plan_stage_sharding_json(const autopar_plan *p, int s,
                                                            char **out) {
    if (!out)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_stage_sharding_json: out is NULL");
    *out = NULL;
    if (!stage_ok(p, s) || !p->stages[s].shard)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_stage_sharding_json: no stage %d "
                        "(the plan has %d)", s, p ? p->n_stages : 0);
    return ap_shard_plan_to_json(p->stages[s].shard, p->graph, out);
}

AP_INTERNAL ap_status ap_plan_stage_mesh(const autopar_plan *p, int s, ap_mesh **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_plan_stage_mesh: out is NULL");
    *out = NULL;
    if (!stage_ok(p, s))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_plan_stage_mesh: no stage %d", s);
    const ap_plan_stage *st = &p->stages[s];
    return ap_mesh_new(p->cluster, st->mesh_shape[0], st->mesh_shape[1], st->devices, out);
}

AP_INTERNAL ap_status ap_plan_canonicalize(autopar_plan *p) {
    for (int s = 0; s < p->n_stages; s++) {
        char *text = NULL;
        ap_shard_plan *q = NULL;
        ap_status st = ap_shard_plan_to_json(p->stages[s].shard, p->graph, &text);
        if (!st) st = ap_shard_plan_from_json(text, p->graph, &q);
        free(text);
        if (st) return st;
        ap_shard_plan_free(p->stages[s].shard);
        p->stages[s].shard = q;
    }
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Printing                                                                                    */
/* ------------------------------------------------------------------------------------------ */

AUTOPAR_API void autopar_plan_print(const autopar_plan *p, FILE *f) {
    if (!p || !f) return;
    char a[32], b[32], c[32], d[32], e[32], h[32];
    const autopar_cluster *cl = p->cluster;
    fprintf(f, "autopar plan: %d stage%s, method %s", p->n_stages, p->n_stages == 1 ? "" : "s",
            ap_method_name(p->method));
    if (p->method == AUTOPAR_METHOD_PIPESHARD)
        fprintf(f, " (stages %s)", ap_stage_option_name(p->stage_option));
    fprintf(f, ", schedule %s, %d micro-batch%s per step, %d layer%s\n",
            ap_schedule_name(p->schedule), p->n_micro_batches,
            p->n_micro_batches == 1 ? "" : "es", p->n_layers, p->n_layers == 1 ? "" : "s");
    if (cl)
        fprintf(f, "cluster '%s': %d host%s x %d devices, %s per device; memory budget %s\n",
                cl->name, cl->hosts, cl->hosts == 1 ? "" : "s", cl->devices_per_host,
                ap_fmt_bytes((double)cl->device_memory, a, sizeof a),
                p->memory_budget < 0 ? "none" : ap_fmt_bytes(p->memory_budget, b, sizeof b));
    for (int s = 0; s < p->n_stages; s++) {
        const ap_plan_stage *st = &p->stages[s];
        const ap_stage_cost *k = &st->cost;
        fprintf(f, "stage %d: layers %d-%d, submesh %dx%d (hosts %d-%d, devices %d-%d), logical "
                "mesh %dx%d%s, %d nodes\n", s, st->first_layer, st->last_layer, st->submesh[0],
                st->submesh[1], st->host_begin, st->host_begin + st->submesh[0] - 1,
                st->device_begin, st->device_begin + st->submesh[1] - 1, st->mesh_shape[0],
                st->mesh_shape[1], st->force_batch_axis == 0 ? " (batch on axis 0)" : "",
                st->n_nodes);
        fprintf(f, "    per micro-batch: forward %s (compute %s), backward %s (compute %s), "
                "send %s\n", ap_fmt_time(k->forward, a, sizeof a),
                ap_fmt_time(k->forward_compute, b, sizeof b), ap_fmt_time(k->backward, c, sizeof c),
                ap_fmt_time(k->backward_compute, d, sizeof d), ap_fmt_time(k->send, e, sizeof e));
        fprintf(f, "    per step: gradient sync %s, optimizer apply %s, once-per-step sends %s\n",
                ap_fmt_time(k->grad_sync, a, sizeof a), ap_fmt_time(k->apply, b, sizeof b),
                ap_fmt_time(k->step_send, c, sizeof c));
        fprintf(f, "    memory per device: %s = params %s + optimizer state %s + gradients %s",
                ap_fmt_bytes(st->memory, a, sizeof a), ap_fmt_bytes(k->params, b, sizeof b),
                ap_fmt_bytes(k->opt_state, c, sizeof c), ap_fmt_bytes(k->grads, d, sizeof d));
        fprintf(f, " + %d x activations %s + transient %s", st->in_flight,
                ap_fmt_bytes(k->activations, e, sizeof e),
                ap_fmt_bytes(k->transient, h, sizeof h));
        if (k->step_recv > 0) fprintf(f, " + received %s", ap_fmt_bytes(k->step_recv, a, sizeof a));
        fputc('\n', f);
        if (st->shard)
            fprintf(f, "    sharding: %d collectives, ILP %s\n", st->shard->n_coll,
                    st->shard->optimal ? "optimal" : "time limit reached (best found kept)");
    }
    const autopar_plan_estimate *x = &p->estimate;
    fprintf(f, "estimated step time %s = compute %s + communication %s + gradient sync %s + "
            "apply %s + pipeline bubble %s (critical stage %d)\n",
            ap_fmt_time(x->step_time, a, sizeof a), ap_fmt_time(x->compute, b, sizeof b),
            ap_fmt_time(x->communication, c, sizeof c), ap_fmt_time(x->grad_sync, d, sizeof d),
            ap_fmt_time(x->apply, e, sizeof e), ap_fmt_time(x->bubble, h, sizeof h),
            x->critical_stage);
    fprintf(f, "simulated %s schedule: %s per step\n", ap_schedule_name(p->schedule),
            ap_fmt_time(x->simulated_step_time, a, sizeof a));
    int per_step = 0;
    for (int t = 0; t < p->n_transfers; t++) per_step += p->transfers[t].per_step;
    fprintf(f, "tensors crossing stages: %d per micro-batch, %d per step\n",
            p->n_transfers - per_step, per_step);
    const ap_plan_stats *q = &p->stats;
    fprintf(f, "planning: %s (layers %s, per-layer ILP %s: %d solves for %d unit types over %d "
            "units x %d meshes, stages %s, stage plans %s)\n",
            ap_fmt_time(q->total_seconds, a, sizeof a), ap_fmt_time(q->layers_seconds, b, sizeof b),
            ap_fmt_time(q->ilp_seconds, c, sizeof c), q->n_solves, q->n_unit_types, q->n_units,
            q->n_mesh_configs, ap_fmt_time(q->dp_seconds, d, sizeof d),
            ap_fmt_time(q->stage_seconds, e, sizeof e));
}

/* ------------------------------------------------------------------------------------------ */
/* JSON writing                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* A number in the shortest text that reads back to the same double; non-finite values as the
 * strings "inf", "-inf", "nan". */
static cJSON *jexact(double d) {
    if (isnan(d)) return cJSON_CreateString("nan");
    if (isinf(d)) return cJSON_CreateString(d > 0 ? "inf" : "-inf");
    char buf[40];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, d);
        if (strtod(buf, NULL) == d) break;
    }
    return cJSON_CreateRaw(buf);
}

static cJSON *jint(long long v) {
    char buf[32];
    snprintf(buf, sizeof buf, "%lld", v);
    return cJSON_CreateRaw(buf);
}

static cJSON *jint_array(const int *v, int n) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < n; i++) {
        cJSON *x = jint(v[i]);
        if (!x || !cJSON_AddItemToArray(a, x)) {
            cJSON_Delete(x);
            cJSON_Delete(a);
            return NULL;
        }
    }
    return a;
}

#define ADD(obj, key, item)                                                                      \
    do {                                                                                         \
        cJSON *it_ = (item);                                                                     \
        if (!it_ || !(obj) || !cJSON_AddItemToObject((obj), (key), it_)) {                       \
            cJSON_Delete(it_);                                                                   \
            ok = false;                                                                          \
        }                                                                                        \
    } while (0)

static cJSON *cost_json(const ap_stage_cost *k, bool *okp) {
    bool ok = true;
    cJSON *o = cJSON_CreateObject();
    ADD(o, "forward", jexact(k->forward));
    ADD(o, "backward", jexact(k->backward));
    ADD(o, "forward_compute", jexact(k->forward_compute));
    ADD(o, "backward_compute", jexact(k->backward_compute));
    ADD(o, "send", jexact(k->send));
    ADD(o, "send_activation", jexact(k->send_activation));
    ADD(o, "send_gradient", jexact(k->send_gradient));
    ADD(o, "grad_sync", jexact(k->grad_sync));
    ADD(o, "apply", jexact(k->apply));
    ADD(o, "step_send", jexact(k->step_send));
    ADD(o, "stage_time", jexact(k->stage_time));
    ADD(o, "params", jexact(k->params));
    ADD(o, "opt_state", jexact(k->opt_state));
    ADD(o, "grads", jexact(k->grads));
    ADD(o, "activations", jexact(k->activations));
    ADD(o, "step_recv", jexact(k->step_recv));
    ADD(o, "transient", jexact(k->transient));
    ADD(o, "max_n_succ", jint(k->max_n_succ));
    if (!ok) {
        cJSON_Delete(o);
        o = NULL;
    }
    *okp = *okp && ok;
    return o;
}

AUTOPAR_API autopar_status autopar_plan_to_json(const autopar_plan *p, char **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_to_json: out is NULL");
    *out = NULL;
    if (!p || !p->graph || !p->cluster)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_to_json: plan is NULL or empty");
    char *graph_text = NULL, *cluster_text = NULL;
    ap_status st = autopar_graph_to_json(p->graph, &graph_text);
    if (!st) st = autopar_cluster_to_json(p->cluster, &cluster_text);
    if (st) {
        free(graph_text);
        return st;
    }
    bool ok = true;
    cJSON *root = cJSON_CreateObject();
    if (!root) ok = false;
    ADD(root, "format", cJSON_CreateString("autopar-plan"));
    ADD(root, "version", jint(AP_PLAN_JSON_VERSION));
    ADD(root, "method", cJSON_CreateString(ap_method_name(p->method)));
    ADD(root, "stage_option", cJSON_CreateString(ap_stage_option_name(p->stage_option)));
    ADD(root, "schedule", cJSON_CreateString(ap_schedule_name(p->schedule)));
    ADD(root, "num_micro_batches", jint(p->n_micro_batches));
    ADD(root, "num_layers", jint(p->n_layers));
    ADD(root, "memory_budget", jexact(p->memory_budget));
    cJSON *est = cJSON_CreateObject();
    ADD(est, "step_time", jexact(p->estimate.step_time));
    ADD(est, "compute", jexact(p->estimate.compute));
    ADD(est, "communication", jexact(p->estimate.communication));
    ADD(est, "grad_sync", jexact(p->estimate.grad_sync));
    ADD(est, "apply", jexact(p->estimate.apply));
    ADD(est, "bubble", jexact(p->estimate.bubble));
    ADD(est, "simulated_step_time", jexact(p->estimate.simulated_step_time));
    ADD(est, "critical_stage", jint(p->estimate.critical_stage));
    ADD(est, "planning_seconds", jexact(p->estimate.planning_seconds));
    ADD(root, "estimate", est);
    cJSON *pl = cJSON_CreateObject();
    ADD(pl, "layers_seconds", jexact(p->stats.layers_seconds));
    ADD(pl, "ilp_seconds", jexact(p->stats.ilp_seconds));
    ADD(pl, "dp_seconds", jexact(p->stats.dp_seconds));
    ADD(pl, "stage_seconds", jexact(p->stats.stage_seconds));
    ADD(pl, "total_seconds", jexact(p->stats.total_seconds));
    ADD(pl, "units", jint(p->stats.n_units));
    ADD(pl, "unit_types", jint(p->stats.n_unit_types));
    ADD(pl, "mesh_configs", jint(p->stats.n_mesh_configs));
    ADD(pl, "solves", jint(p->stats.n_solves));
    ADD(pl, "reused", jint(p->stats.n_cache_hits));
    ADD(root, "planning", pl);
    cJSON *stages = cJSON_CreateArray();
    ADD(root, "stages", stages);
    for (int s = 0; ok && s < p->n_stages; s++) {
        const ap_plan_stage *q = &p->stages[s];
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(stages, o)) {
            cJSON_Delete(o);
            ok = false;
            break;
        }
        int layers[2] = {q->first_layer, q->last_layer};
        ADD(o, "layers", jint_array(layers, 2));
        ADD(o, "submesh", jint_array(q->submesh, 2));
        ADD(o, "host_begin", jint(q->host_begin));
        ADD(o, "device_begin", jint(q->device_begin));
        ADD(o, "mesh", jint_array(q->mesh_shape, 2));
        ADD(o, "force_batch_axis", jint(q->force_batch_axis));
        ADD(o, "devices", jint_array(q->devices, q->n_devices));
        ADD(o, "in_flight", jint(q->in_flight));
        ADD(o, "memory", jexact(q->memory));
        ADD(o, "cost", cost_json(&q->cost, &ok));
        ADD(o, "nodes", jint_array(q->nodes, q->n_nodes));
        char *shard_text = NULL;
        if (ok && ap_shard_plan_to_json(q->shard, p->graph, &shard_text)) ok = false;
        if (ok) ADD(o, "sharding", cJSON_CreateRaw(shard_text));
        free(shard_text);
    }
    cJSON *tr = cJSON_CreateArray();
    ADD(root, "transfers", tr);
    for (int t = 0; ok && t < p->n_transfers; t++) {
        const ap_plan_transfer *x = &p->transfers[t];
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(tr, o)) {
            cJSON_Delete(o);
            ok = false;
            break;
        }
        ADD(o, "tensor", jint(x->tensor));
        ADD(o, "name", cJSON_CreateString(x->tensor >= 0 && x->tensor < p->graph->n_nodes
                                              ? p->graph->nodes[x->tensor]->name : ""));
        ADD(o, "from", jint(x->from_stage));
        ADD(o, "to", jint(x->to_stage));
        ADD(o, "per_step", cJSON_CreateBool(x->per_step));
        ADD(o, "bytes", jexact(x->bytes));
    }
    ADD(root, "cluster", cJSON_CreateRaw(cluster_text));
    ADD(root, "graph", cJSON_CreateRaw(graph_text));
    free(graph_text);
    free(cluster_text);
    char *text = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (!text) return ap_error(AUTOPAR_ERR_NOMEM, "autopar_plan_to_json: out of memory");
    *out = text;
    return AUTOPAR_OK;
}

#undef ADD

/* ------------------------------------------------------------------------------------------ */
/* JSON reading                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* Raw-text scanner over a document cJSON has already accepted: finds the exact byte range of a
 * value, so embedded documents are handed to their readers unchanged. */
static const char *sk_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}
static const char *sk_string(const char *p) {   /* p at the opening quote */
    p++;
    while (*p && *p != '"') {
        if (*p == '\\' && p[1]) p++;
        p++;
    }
    return *p ? p + 1 : NULL;
}
static const char *sk_value(const char *p) {
    p = sk_ws(p);
    if (*p == '"') return sk_string(p);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (*p) {
            if (*p == '"') {
                if (!(p = sk_string(p))) return NULL;
                continue;
            }
            if (*p == '{' || *p == '[') depth++;
            if (*p == '}' || *p == ']') {
                if (--depth == 0) return p + 1;
            }
            p++;
        }
        return NULL;
    }
    while (*p && *p != ',' && *p != '}' && *p != ']' && !isspace((unsigned char)*p)) p++;
    return p;
}
/* Start of the value of `key` in the object at p, or NULL. */
static const char *sk_find(const char *p, const char *key) {
    p = sk_ws(p);
    if (!p || *p != '{') return NULL;
    p++;
    size_t klen = strlen(key);
    for (;;) {
        p = sk_ws(p);
        if (*p != '"') return NULL;
        const char *ks = p + 1, *ke = sk_string(p);
        if (!ke) return NULL;
        p = sk_ws(ke);
        if (*p != ':') return NULL;
        p = sk_ws(p + 1);
        if ((size_t)(ke - 1 - ks) == klen && memcmp(ks, key, klen) == 0) return p;
        if (!(p = sk_value(p))) return NULL;
        p = sk_ws(p);
        if (*p != ',') return NULL;
        p++;
    }
}
/* Start of element i of the array at p, or NULL. */
static const char *sk_index(const char *p, int i) {
    p = sk_ws(p);
    if (!p || *p != '[') return NULL;
    p = sk_ws(p + 1);
    for (int k = 0; k < i; k++) {
        if (!(p = sk_value(p))) return NULL;
        p = sk_ws(p);
        if (*p != ',') return NULL;
        p = sk_ws(p + 1);
    }
    return *p && *p != ']' ? p : NULL;
}
/* Copy of the value starting at p (malloc'ed), or NULL. */
static char *sk_copy(const char *p) {
    if (!p) return NULL;
    const char *e = sk_value(p);
    if (!e) return NULL;
    char *s = malloc((size_t)(e - p) + 1);
    if (!s) return NULL;
    memcpy(s, p, (size_t)(e - p));
    s[e - p] = '\0';
    return s;
}

static ap_status perr(const char *fmt, const char *what) {
    return ap_error(AUTOPAR_ERR_PARSE, fmt, what);
}

static ap_status rd_num(const cJSON *o, const char *key, const char *where, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsNumber(v)) {
        *out = v->valuedouble;
        return AUTOPAR_OK;
    }
    if (cJSON_IsString(v) && v->valuestring) {
        if (!strcmp(v->valuestring, "inf")) *out = INFINITY;
        else if (!strcmp(v->valuestring, "-inf")) *out = -INFINITY;
        else if (!strcmp(v->valuestring, "nan")) *out = NAN;
        else goto bad;
        return AUTOPAR_OK;
    }
bad:
    return ap_error(AUTOPAR_ERR_PARSE, "plan JSON: %s: field '%s' missing or not a number", where,
                    key);
}

static ap_status rd_int(const cJSON *o, const char *key, const char *where, long long lo,
                        long long hi, int *out) {
    double d = 0;
    ap_status st = rd_num(o, key, where, &d);
    if (st) return st;
    if (!(d == floor(d)) || d < (double)lo || d > (double)hi)
        return ap_error(AUTOPAR_ERR_PARSE, "plan JSON: %s: field '%s' = %g is not an integer in "
                        "%lld..%lld", where, key, d, lo, hi);
    *out = (int)d;
    return AUTOPAR_OK;
}

static ap_status rd_enum(const cJSON *o, const char *key, const char *const *names, int n,
                         int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsString(v) && v->valuestring)
        for (int i = 0; i < n; i++)
            if (!strcmp(v->valuestring, names[i])) {
                *out = i;
                return AUTOPAR_OK;
            }
    return ap_error(AUTOPAR_ERR_PARSE, "plan JSON: field '%s' missing or not one of the known "
                    "names (e.g. '%s')", key, names[0]);
}

/* Reads an int array of exactly n (n >= 0) or any length (n < 0: *len gets it, *out malloc'ed)
 * with every value in [lo, hi]. */
static ap_status rd_int_array(const cJSON *o, const char *key, const char *where, int n,
                              long long lo, long long hi, int **out, int *len) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsArray(a))
        return ap_error(AUTOPAR_ERR_PARSE, "plan JSON: %s: field '%s' missing or not an array",
                        where, key);
    int cnt = cJSON_GetArraySize(a);
    if (n >= 0 && cnt != n)
        return ap_error(AUTOPAR_ERR_PARSE, "plan JSON: %s: field '%s' has %d entries, expected %d",
                        where, key, cnt, n);
    int *v = malloc(sizeof(int) * (size_t)(cnt > 0 ? cnt : 1));
    if (!v) return ap_error(AUTOPAR_ERR_NOMEM, "plan JSON: out of memory");
    int i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, a) {
        double d = cJSON_IsNumber(it) ? it->valuedouble : NAN;
        if (!(d == floor(d)) || d < (double)lo || d > (double)hi) {
            free(v);
            return ap_error(AUTOPAR_ERR_PARSE, "plan JSON: %s: %s[%d] is not an integer in "
                            "%lld..%lld", where, key, i, lo, hi);
        }
        v[i++] = (int)d;
    }
    *out = v;
    if (len) *len = cnt;
    return AUTOPAR_OK;
}

static ap_status read_cost(const cJSON *o, const char *where, ap_stage_cost *k) {
    if (!cJSON_IsObject(o)) return perr("plan JSON: %s: field 'cost' missing", where);
    struct { const char *key; double *dst; } f[] = {
        {"forward", &k->forward},   {"backward", &k->backward},
        {"forward_compute", &k->forward_compute}, {"backward_compute", &k->backward_compute},
        {"send", &k->send},         {"send_activation", &k->send_activation},
        {"send_gradient", &k->send_gradient}, {"grad_sync", &k->grad_sync},
        {"apply", &k->apply},       {"step_send", &k->step_send},
        {"stage_time", &k->stage_time}, {"params", &k->params},
        {"opt_state", &k->opt_state}, {"grads", &k->grads},
        {"activations", &k->activations}, {"step_recv", &k->step_recv},
        {"transient", &k->transient}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        ap_status st = rd_num(o, f[i].key, where, f[i].dst);
        if (st) return st;
    }
    return rd_int(o, "max_n_succ", where, -1, INT_MAX, &k->max_n_succ);
}

static ap_status read_stage(const cJSON *o, const char *raw, autopar_plan *p, int s) {
    char where[32];
    snprintf(where, sizeof where, "stages[%d]", s);
    ap_plan_stage *q = &p->stages[s];
    if (!cJSON_IsObject(o)) return perr("plan JSON: %s is not an object", where);
    int *v = NULL;
    ap_status st;
    const int big = INT_MAX;
    if ((st = rd_int_array(o, "layers", where, 2, 0, p->n_layers - 1, &v, NULL))) return st;
    q->first_layer = v[0];
    q->last_layer = v[1];
    free(v);
    if ((st = rd_int_array(o, "submesh", where, 2, 1, big, &v, NULL))) return st;
    q->submesh[0] = v[0];
    q->submesh[1] = v[1];
    free(v);
    if ((st = rd_int_array(o, "mesh", where, 2, 1, big, &v, NULL))) return st;
    q->mesh_shape[0] = v[0];
    q->mesh_shape[1] = v[1];
    free(v);
    if ((st = rd_int(o, "host_begin", where, 0, p->cluster->hosts - 1, &q->host_begin)) ||
        (st = rd_int(o, "device_begin", where, 0, p->cluster->devices_per_host - 1,
                     &q->device_begin)) ||
        (st = rd_int(o, "force_batch_axis", where, -1, 0, &q->force_batch_axis)) ||
        (st = rd_int(o, "in_flight", where, 0, big, &q->in_flight)) ||
        (st = rd_num(o, "memory", where, &q->memory)))
        return st;
    int n_dev = ap_cluster_num_devices(p->cluster);
    if ((st = rd_int_array(o, "devices", where, -1, 0, n_dev - 1, &q->devices, &q->n_devices)))
        return st;
    if ((long long)q->mesh_shape[0] * q->mesh_shape[1] != q->n_devices ||
        (long long)q->submesh[0] * q->submesh[1] != q->n_devices)
        return ap_error(AUTOPAR_ERR_PARSE, "plan JSON: %s: %d devices for submesh %dx%d and mesh "
                        "%dx%d", where, q->n_devices, q->submesh[0], q->submesh[1],
                        q->mesh_shape[0], q->mesh_shape[1]);
    if ((st = rd_int_array(o, "nodes", where, -1, 0, p->graph->n_nodes - 1, &q->nodes,
                           &q->n_nodes)))
        return st;
    if ((st = read_cost(cJSON_GetObjectItemCaseSensitive(o, "cost"), where, &q->cost))) return st;
    char *text = sk_copy(sk_find(raw, "sharding"));
    if (!text) return perr("plan JSON: %s: field 'sharding' missing", where);
    st = ap_shard_plan_from_json(text, p->graph, &q->shard);
    free(text);
    return st;
}

#define AP_PATH_LABEL 512

/* autopar_plan_from_json with `label` naming the source in parse errors. */
static ap_status plan_from_text(const char *json, const char *label, autopar_plan **out) {
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json, &end, 1);
    if (!root) return ap_json_parse_error(label, json, end);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return ap_error(AUTOPAR_ERR_PARSE, "%s: not a JSON object", label);
    }
    autopar_plan *p = NULL;
    ap_status st = ap_plan_alloc(&p);
    char *text = NULL;
    int x;
    if (st) goto done;
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(root, "format");
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "autopar-plan") != 0) {
        st = ap_error(AUTOPAR_ERR_PARSE, "plan JSON: field 'format' missing or not "
                      "\"autopar-plan\"");
        goto done;
    }
    if ((st = rd_int(root, "version", "top level", AP_PLAN_JSON_VERSION, AP_PLAN_JSON_VERSION,
                     &x)))
        goto done;
    /* The embedded documents first: stages are checked against them. */
    text = sk_copy(sk_find(json, "graph"));
    if (!text) {
        st = perr("plan JSON: field '%s' missing", "graph");
        goto done;
    }
    if ((st = autopar_graph_from_json(text, &p->graph))) goto done;
    free(text);
    text = sk_copy(sk_find(json, "cluster"));
    if (!text) {
        st = perr("plan JSON: field '%s' missing", "cluster");
        goto done;
    }
    if ((st = autopar_cluster_from_json(text, &p->cluster))) goto done;
    free(text);
    text = NULL;
    if ((st = rd_enum(root, "method", k_method_names, AUTOPAR_METHOD_COUNT, &x))) goto done;
    p->method = (autopar_method)x;
    if ((st = rd_enum(root, "stage_option", k_stage_names, AUTOPAR_STAGE_OPTION_COUNT, &x)))
        goto done;
    p->stage_option = (autopar_stage_option)x;
    if ((st = rd_enum(root, "schedule", k_schedule_names, AUTOPAR_SCHEDULE_COUNT, &x))) goto done;
    p->schedule = (autopar_schedule)x;
    if ((st = rd_int(root, "num_micro_batches", "top level", 1, INT_MAX, &p->n_micro_batches)) ||
        (st = rd_int(root, "num_layers", "top level", 1, INT_MAX, &p->n_layers)) ||
        (st = rd_num(root, "memory_budget", "top level", &p->memory_budget)))
        goto done;
    const cJSON *est = cJSON_GetObjectItemCaseSensitive(root, "estimate");
    autopar_plan_estimate *e = &p->estimate;
    if ((st = rd_num(est, "step_time", "estimate", &e->step_time)) ||
        (st = rd_num(est, "compute", "estimate", &e->compute)) ||
        (st = rd_num(est, "communication", "estimate", &e->communication)) ||
        (st = rd_num(est, "grad_sync", "estimate", &e->grad_sync)) ||
        (st = rd_num(est, "apply", "estimate", &e->apply)) ||
        (st = rd_num(est, "bubble", "estimate", &e->bubble)) ||
        (st = rd_num(est, "simulated_step_time", "estimate", &e->simulated_step_time)) ||
        (st = rd_int(est, "critical_stage", "estimate", 0, INT_MAX, &e->critical_stage)) ||
        (st = rd_num(est, "planning_seconds", "estimate", &e->planning_seconds)))
        goto done;
    const cJSON *pl = cJSON_GetObjectItemCaseSensitive(root, "planning");
    ap_plan_stats *q = &p->stats;
    if ((st = rd_num(pl, "layers_seconds", "planning", &q->layers_seconds)) ||
        (st = rd_num(pl, "ilp_seconds", "planning", &q->ilp_seconds)) ||
        (st = rd_num(pl, "dp_seconds", "planning", &q->dp_seconds)) ||
        (st = rd_num(pl, "stage_seconds", "planning", &q->stage_seconds)) ||
        (st = rd_num(pl, "total_seconds", "planning", &q->total_seconds)) ||
        (st = rd_int(pl, "units", "planning", 0, INT_MAX, &q->n_units)) ||
        (st = rd_int(pl, "unit_types", "planning", 0, INT_MAX, &q->n_unit_types)) ||
        (st = rd_int(pl, "mesh_configs", "planning", 0, INT_MAX, &q->n_mesh_configs)) ||
        (st = rd_int(pl, "solves", "planning", 0, INT_MAX, &q->n_solves)) ||
        (st = rd_int(pl, "reused", "planning", 0, INT_MAX, &q->n_cache_hits)))
        goto done;
    const cJSON *stages = cJSON_GetObjectItemCaseSensitive(root, "stages");
    if (!cJSON_IsArray(stages) || cJSON_GetArraySize(stages) < 1) {
        st = perr("plan JSON: field '%s' missing, not an array or empty", "stages");
        goto done;
    }
    int ns = cJSON_GetArraySize(stages);
    p->stages = calloc((size_t)ns, sizeof *p->stages);
    if (!p->stages) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "plan JSON: out of memory");
        goto done;
    }
    p->n_stages = ns;
    const char *raw_stages = sk_find(json, "stages");
    for (int s = 0; s < ns && !st; s++) {
        const char *raw = sk_index(raw_stages, s);
        if (!raw) {
            st = perr("plan JSON: %s: cannot locate the stage", "stages");
            break;
        }
        st = read_stage(cJSON_GetArrayItem(stages, s), raw, p, s);
        if (!st && s > 0 && p->stages[s].first_layer != p->stages[s - 1].last_layer + 1)
            st = ap_error(AUTOPAR_ERR_PARSE, "plan JSON: stages[%d] starts at layer %d, stage %d "
                          "ends at %d", s, p->stages[s].first_layer, s - 1,
                          p->stages[s - 1].last_layer);
    }
    if (st) goto done;
    if (p->stages[0].first_layer != 0 || p->stages[ns - 1].last_layer != p->n_layers - 1) {
        st = ap_error(AUTOPAR_ERR_PARSE, "plan JSON: the stages cover layers %d..%d, not 0..%d",
                      p->stages[0].first_layer, p->stages[ns - 1].last_layer, p->n_layers - 1);
        goto done;
    }
    const cJSON *tr = cJSON_GetObjectItemCaseSensitive(root, "transfers");
    if (!cJSON_IsArray(tr)) {
        st = perr("plan JSON: field '%s' missing or not an array", "transfers");
        goto done;
    }
    int nt = cJSON_GetArraySize(tr);
    if (nt > 0) {
        p->transfers = calloc((size_t)nt, sizeof *p->transfers);
        if (!p->transfers) {
            st = ap_error(AUTOPAR_ERR_NOMEM, "plan JSON: out of memory");
            goto done;
        }
    }
    p->n_transfers = nt;
    for (int t = 0; t < nt && !st; t++) {
        const cJSON *o = cJSON_GetArrayItem(tr, t);
        ap_plan_transfer *d = &p->transfers[t];
        char where[32];
        snprintf(where, sizeof where, "transfers[%d]", t);
        const cJSON *ps = cJSON_GetObjectItemCaseSensitive(o, "per_step");
        if ((st = rd_int(o, "tensor", where, 0, p->graph->n_nodes - 1, &d->tensor)) ||
            (st = rd_int(o, "from", where, 0, ns - 1, &d->from_stage)) ||
            (st = rd_int(o, "to", where, 0, ns - 1, &d->to_stage)) ||
            (st = rd_num(o, "bytes", where, &d->bytes)))
            break;
        if (!cJSON_IsBool(ps)) {
            st = ap_error(AUTOPAR_ERR_PARSE, "plan JSON: %s: field 'per_step' missing or not a "
                          "boolean", where);
            break;
        }
        d->per_step = cJSON_IsTrue(ps);
    }
done:
    free(text);
    cJSON_Delete(root);
    if (st) {
        autopar_plan_free(p);
        return st;
    }
    *out = p;
    return AUTOPAR_OK;
}

AUTOPAR_API autopar_status autopar_plan_from_json(const char *json, autopar_plan **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_from_json: out is NULL");
    *out = NULL;
    if (!json) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_from_json: json is NULL");
    return plan_from_text(json, "plan JSON", out);
}

AUTOPAR_API autopar_status autopar_plan_save(const autopar_plan *p, const char *path) {
    if (!path) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_save: path is NULL");
    char *text = NULL;
    ap_status st = autopar_plan_to_json(p, &text);
    if (st) return st;
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(text);
        return ap_error(AUTOPAR_ERR_IO, "cannot open plan file '%s' for writing", path);
    }
    size_t len = strlen(text);
    bool ok = fwrite(text, 1, len, f) == len;
    ok = (fclose(f) == 0) && ok;
    free(text);
    return ok ? AUTOPAR_OK : ap_error(AUTOPAR_ERR_IO, "cannot write plan file '%s'", path);
}

AUTOPAR_API autopar_status autopar_plan_load(const char *path, autopar_plan **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_load: out is NULL");
    *out = NULL;
    if (!path) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_plan_load: path is NULL");
    char *text = NULL;
    ap_status st = ap_read_text_file("plan", path, (size_t)1 << 31, &text, NULL);
    if (st) return st;
    char label[AP_PATH_LABEL];
    snprintf(label, sizeof label, "plan file '%s'", path);
    st = plan_from_text(text, label, out);
    free(text);
    if (st == AUTOPAR_ERR_PARSE && strncmp(autopar_last_error(), label, strlen(label)) != 0) {
        char msg[1024];   /* a field error ("plan JSON: ..."): say which file */
        snprintf(msg, sizeof msg, "%s", autopar_last_error());
        st = ap_error(st, "%s: %s", label, msg);
    }
    return st;
}
