/*
 * Graph serialisation: autopar_graph_to_json / autopar_graph_from_json / _save / _load.
 *
 * Format (also documented in docs/graph-json.md). One JSON object:
 *
 *   {
 *     "format": "autopar-graph",        required, exactly this string
 *     "version": 1,                     required, exactly 1
 *     "current_layer": 0,               pipeline layer new ops would get (integer >= 0)
 *     "loss": 17,                       id of the loss node, or -1 (before autopar_backward)
 *     "optimizer": null,                or {"kind": "sgd"|"momentum"|"adamw", "lr": x,
 *                                           "momentum": x, "beta1": x, "beta2": x, "eps": x,
 *                                           "weight_decay": x}  (all seven keys required)
 *     "nodes": [                        in topological order; node i has "id": i
 *       {"id": 0, "op": "input", "name": "x", "dtype": "f32", "shape": [8, 16],
 *        "kind": "input", "phase": "forward", "layer": 0, "src": [],
 *        "iattrs": [0, 0, 0, 0, 0, 0, 0, 0], "fattrs": [0, 0, 0, 0, 0, 0],
 *        "grad": -1, "assign_to": -1},
 *       ...
 *     ]
 *   }
 *
 * Node fields (all required): "op" is the op-table name (ap_op_name); "dtype" is "f32" or "i32";
 * "shape" has 0..AUTOPAR_MAX_DIMS integers (rank 0 = scalar); "kind" is one of "input", "param",
 * "constant", "activation", "gradient", "opt_state", "update"; "phase" one of "forward",
 * "backward", "apply"; "src" lists 0..AUTOPAR_MAX_SRC operand ids, each smaller than the node's
 * id; "iattrs" has exactly 8 integers, "fattrs" exactly 6 numbers; "grad" is the id of the
 * node's gradient or -1; "assign_to" the id of the leaf an APPLY result replaces, or -1.
 * Unknown keys are ignored.
 *
 * Numbers. Integers are written in decimal and must satisfy |v| < 2^53 so that they survive
 * cJSON's double representation exactly (a graph holding a larger shape dim or integer attribute
 * cannot be written: AUTOPAR_ERR_UNSUPPORTED). Doubles (fattrs) are written with the fewest of
 * 15, 16 or 17 significant digits that parse back to the identical bit pattern; float fields
 * (optimizer) with the fewest of 1..9 digits that give back the identical float. -0 is written
 * as "-0". Non-finite values, which JSON numbers cannot hold, are written as the strings "nan",
 * "inf" and "-inf" (and read back from them). The decimal separator is always '.', whatever the
 * C locale. So to_json(from_json(to_json(g))) is byte-identical to to_json(g).
 *
 * Not stored: the graph's transient build state (current_phase is FORWARD and current_fwd -1
 * after reading).
 *
 * Layout of the text written: one top-level key per line and one node per line.
 *
 * Reading rebuilds every node through ap_graph_add (the builders' own operand checks and
 * shape/dtype inference) with the node's layer and phase as the graph's current ones, then
 * compares the inferred shape and dtype with the stored ones, and finally restores kind, phase,
 * layer, grad and assign_to from the document. After the last node the whole graph goes through
 * autopar_graph_validate. Errors (each message names the node by id and name, and the field):
 *   malformed JSON, trailing text, not an object, wrong "format"/"version", a missing field,
 *   a field of the wrong JSON type, an unknown dtype/kind/phase/optimizer name, a name too long,
 *   a non-integer or out-of-range integer                              -> AUTOPAR_ERR_PARSE
 *   an unknown op name                                                 -> AUTOPAR_ERR_UNKNOWN_OP
 *   ids not 0..n-1 in order, an operand id >= the node's id or < 0, grad / assign_to / loss
 *   outside -1..n-1                                                    -> AUTOPAR_ERR_GRAPH
 *   more than AUTOPAR_MAX_DIMS dims, stored shape != inferred shape,
 *   a loss that is not a scalar                                        -> AUTOPAR_ERR_SHAPE
 *   stored dtype != inferred dtype                                     -> AUTOPAR_ERR_DTYPE
 *   any error from ap_graph_add / autopar_graph_validate               -> that error's status
 * On failure the partial graph is freed and *out is NULL.
 */
#include "internal.h"

#include <cjson/cJSON.h>

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define AP_JSON_FORMAT  "autopar-graph"
#define AP_JSON_VERSION 1
/* Integers must satisfy |v| < 2^53 to be exact as doubles. */
#define AP_JSON_INT_LIMIT 9007199254740992.0

/* ------------------------------------------------------------------------------------------ */
/* Name tables                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static const char *const dtype_names[AUTOPAR_DTYPE_COUNT] = {
    [AUTOPAR_F32] = "f32",
    [AUTOPAR_I32] = "i32",
};

static const char *const kind_names[AUTOPAR_KIND_COUNT] = {
    [AUTOPAR_KIND_INPUT]      = "input",
    [AUTOPAR_KIND_PARAM]      = "param",
    [AUTOPAR_KIND_CONSTANT]   = "constant",
    [AUTOPAR_KIND_ACTIVATION] = "activation",
    [AUTOPAR_KIND_GRADIENT]   = "gradient",
    [AUTOPAR_KIND_OPT_STATE]  = "opt_state",
    [AUTOPAR_KIND_UPDATE]     = "update",
};

static const char *const phase_names[AUTOPAR_PHASE_COUNT] = {
    [AUTOPAR_PHASE_FORWARD]  = "forward",
    [AUTOPAR_PHASE_BACKWARD] = "backward",
    [AUTOPAR_PHASE_APPLY]    = "apply",
};

static const char *const opt_names[AUTOPAR_OPT_COUNT] = {
    [AUTOPAR_OPT_SGD]      = "sgd",
    [AUTOPAR_OPT_MOMENTUM] = "momentum",
    [AUTOPAR_OPT_ADAMW]    = "adamw",
};

static int name_lookup(const char *const *table, int count, const char *s) {
    for (int i = 0; i < count; i++)
        if (table[i] && strcmp(table[i], s) == 0) return i;
    return -1;
}

/* "a", "b" or "c" for error messages. */
static void name_list(const char *const *table, int count, char *buf, size_t len) {
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < count && used < len; i++) {
        int k = snprintf(buf + used, len - used, "%s\"%s\"",
                         i == 0 ? "" : (i + 1 == count ? " or " : ", "), table[i]);
        if (k < 0) break;
        used += (size_t)k;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Writing                                                                                     */
/* ------------------------------------------------------------------------------------------ */

typedef struct sbuf {
    char  *p;
    size_t len, cap;
    bool   oom;
} sbuf;

static void sb_append(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (n >= b->cap - b->len || b->p == NULL) {
        size_t need = b->len + n + 1;
        if (need < b->len) { b->oom = true; return; }  /* overflow */
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < need) {
            if (cap > SIZE_MAX / 2) { cap = need; break; }
            cap *= 2;
        }
        char *p = realloc(b->p, cap);
        if (!p) { b->oom = true; return; }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s) { sb_append(b, s, strlen(s)); }

static void sb_printf(sbuf *b, const char *fmt, ...) AP_PRINTF(2, 3);
static void sb_printf(sbuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0) { b->oom = true; return; }
    if ((size_t)k < sizeof tmp) { sb_append(b, tmp, (size_t)k); return; }
    char *big = malloc((size_t)k + 1);
    if (!big) { b->oom = true; return; }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)k + 1, fmt, ap);
    va_end(ap);
    sb_append(b, big, (size_t)k);
    free(big);
}

/* A JSON string literal. Bytes >= 0x80 pass through unchanged (cJSON reads them back as is). */
static void sb_json_string(sbuf *b, const char *s) {
    sb_append(b, "\"", 1);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        switch (*c) {
        case '"':  sb_append(b, "\\\"", 2); break;
        case '\\': sb_append(b, "\\\\", 2); break;
        case '\b': sb_append(b, "\\b", 2); break;
        case '\f': sb_append(b, "\\f", 2); break;
        case '\n': sb_append(b, "\\n", 2); break;
        case '\r': sb_append(b, "\\r", 2); break;
        case '\t': sb_append(b, "\\t", 2); break;
        default:
            if (*c < 0x20) sb_printf(b, "\\u%04x", (unsigned)*c);
            else sb_append(b, (const char *)c, 1);
        }
    }
    sb_append(b, "\"", 1);
}

/* Replaces the locale's decimal separator (when it is not '.') by '.'. */
static void fix_decimal_point(char *s) {
    const struct lconv *lc = localeconv();
    char dp = (lc && lc->decimal_point && lc->decimal_point[0]) ? lc->decimal_point[0] : '.';
    if (dp == '.') return;
    char *q = strchr(s, dp);
    if (q) *q = '.';
}

/* A double as a JSON value that reads back bit-identically. */
static void sb_double(sbuf *b, double v) {
    if (isnan(v)) { sb_puts(b, "\"nan\""); return; }
    if (isinf(v)) { sb_puts(b, v > 0 ? "\"inf\"" : "\"-inf\""); return; }
    char tmp[64];
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*g", prec, v);
        double back = strtod(tmp, NULL);  /* same locale as the snprintf above */
        if (memcmp(&back, &v, sizeof v) == 0) break;
    }
    fix_decimal_point(tmp);
    sb_puts(b, tmp);
}

/* A float as a JSON value that reads back (as a double, then rounded to float) identically. */
static void sb_float(sbuf *b, float v) {
    if (isnan(v)) { sb_puts(b, "\"nan\""); return; }
    if (isinf(v)) { sb_puts(b, v > 0 ? "\"inf\"" : "\"-inf\""); return; }
    char tmp[64];
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(tmp, sizeof tmp, "%.*g", prec, (double)v);
        float back = (float)strtod(tmp, NULL);
        if (memcmp(&back, &v, sizeof v) == 0) break;
    }
    fix_decimal_point(tmp);
    sb_puts(b, tmp);
}

static bool int_exact(int64_t v) { return v > -(int64_t)9007199254740992LL && v < (int64_t)9007199254740992LL; }

/* Checks a node before writing it; returns AUTOPAR_OK or an error naming it. */
static ap_status check_node_for_write(const autopar_graph *g, const ap_node *n, int i) {
    if (!n) return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: node %d is NULL", i);
    const char *nm = n->name;
    if (memchr(n->name, '\0', sizeof n->name) == NULL)
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: node %d: name is not NUL-terminated", i);
    if (n->id != i)
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: node %d ('%s'): stored id is %d", i, nm,
                        n->id);
    if ((int)n->op < 0 || n->op >= AP_OP_COUNT)
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: node %d ('%s'): invalid op %d", i, nm,
                        (int)n->op);
    if ((int)n->dtype < 0 || n->dtype >= AUTOPAR_DTYPE_COUNT)
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: node %d ('%s'): invalid dtype %d", i,
                        nm, (int)n->dtype);
    if ((int)n->kind < 0 || n->kind >= AUTOPAR_KIND_COUNT)
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: node %d ('%s'): invalid kind %d", i, nm,
                        (int)n->kind);
    if ((int)n->phase < 0 || n->phase >= AUTOPAR_PHASE_COUNT)
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: node %d ('%s'): invalid phase %d", i,
                        nm, (int)n->phase);
    if (n->shape.ndim < 0 || n->shape.ndim > AP_MAX_DIMS)
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: node %d ('%s'): invalid rank %d", i, nm,
                        n->shape.ndim);
    if (n->n_src < 0 || n->n_src > AP_MAX_SRC)
        return ap_error(AUTOPAR_ERR_GRAPH,
                        "graph to JSON: node %d ('%s'): invalid operand count %d", i, nm,
                        n->n_src);
    for (int k = 0; k < n->n_src; k++)
        if (n->src[k] < 0 || n->src[k] >= i)
            return ap_error(AUTOPAR_ERR_GRAPH,
                            "graph to JSON: node %d ('%s'): operand %d has id %d (not topological)",
                            i, nm, k, n->src[k]);
    if (n->grad < -1 || n->grad >= g->n_nodes)
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: node %d ('%s'): grad id %d out of range",
                        i, nm, n->grad);
    if (n->assign_to < -1 || n->assign_to >= g->n_nodes)
        return ap_error(AUTOPAR_ERR_GRAPH,
                        "graph to JSON: node %d ('%s'): assign_to id %d out of range", i, nm,
                        n->assign_to);
    for (int d = 0; d < n->shape.ndim; d++)
        if (!int_exact(n->shape.dim[d]))
            return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                            "graph to JSON: node %d ('%s'): shape[%d] = %" PRId64
                            " cannot be stored exactly in JSON (|value| must be < 2^53)",
                            i, nm, d, n->shape.dim[d]);
    for (int k = 0; k < AP_MAX_IATTR; k++)
        if (!int_exact(n->attrs.i[k]))
            return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                            "graph to JSON: node %d ('%s'): iattrs[%d] = %" PRId64
                            " cannot be stored exactly in JSON (|value| must be < 2^53)",
                            i, nm, k, n->attrs.i[k]);
    return AUTOPAR_OK;
}

static void write_node(sbuf *b, const ap_node *n) {
    sb_printf(b, "{\"id\": %d, \"op\": ", n->id);
    sb_json_string(b, ap_op_name(n->op));
    sb_puts(b, ", \"name\": ");
    sb_json_string(b, n->name);
    sb_printf(b, ", \"dtype\": \"%s\", \"shape\": [", dtype_names[n->dtype]);
    for (int d = 0; d < n->shape.ndim; d++)
        sb_printf(b, d ? ", %" PRId64 : "%" PRId64, n->shape.dim[d]);
    sb_printf(b, "], \"kind\": \"%s\", \"phase\": \"%s\", \"layer\": %d, \"src\": [",
              kind_names[n->kind], phase_names[n->phase], n->layer);
    for (int k = 0; k < n->n_src; k++) sb_printf(b, k ? ", %d" : "%d", n->src[k]);
    sb_puts(b, "], \"iattrs\": [");
    for (int k = 0; k < AP_MAX_IATTR; k++) sb_printf(b, k ? ", %" PRId64 : "%" PRId64, n->attrs.i[k]);
    sb_puts(b, "], \"fattrs\": [");
    for (int k = 0; k < AP_MAX_FATTR; k++) {
        if (k) sb_puts(b, ", ");
        sb_double(b, n->attrs.f[k]);
    }
    sb_printf(b, "], \"grad\": %d, \"assign_to\": %d}", n->grad, n->assign_to);
}

autopar_status autopar_graph_to_json(const autopar_graph *g, char **out) {
    if (out) *out = NULL;
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_to_json: out is NULL");
    if (!g) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_to_json: graph is NULL");
    if (g->status != AUTOPAR_OK)
        return ap_error(AUTOPAR_ERR_GRAPH,
                        "autopar_graph_to_json: the graph has a sticky error (%s): %s",
                        autopar_status_str(g->status), g->error);
    if (g->n_nodes < 0 || (g->n_nodes > 0 && !g->nodes))
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: invalid node array");
    if (g->loss < -1 || g->loss >= g->n_nodes)
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: loss id %d out of range", g->loss);
    if (g->has_optimizer && ((int)g->optimizer.kind < 0 || g->optimizer.kind >= AUTOPAR_OPT_COUNT))
        return ap_error(AUTOPAR_ERR_GRAPH, "graph to JSON: invalid optimizer kind %d",
                        (int)g->optimizer.kind);
    for (int i = 0; i < g->n_nodes; i++) {
        ap_status s = check_node_for_write(g, g->nodes[i], i);
        if (s != AUTOPAR_OK) return s;
    }

    sbuf b = {0};
    sb_printf(&b, "{\n  \"format\": \"%s\",\n  \"version\": %d,\n  \"current_layer\": %d,\n"
                  "  \"loss\": %d,\n  \"optimizer\": ",
              AP_JSON_FORMAT, AP_JSON_VERSION, g->current_layer, g->loss);
    if (g->has_optimizer) {
        const autopar_optimizer *o = &g->optimizer;
        sb_printf(&b, "{\"kind\": \"%s\", \"lr\": ", opt_names[o->kind]);
        sb_float(&b, o->lr);
        sb_puts(&b, ", \"momentum\": ");
        sb_float(&b, o->momentum);
        sb_puts(&b, ", \"beta1\": ");
        sb_float(&b, o->beta1);
        sb_puts(&b, ", \"beta2\": ");
        sb_float(&b, o->beta2);
        sb_puts(&b, ", \"eps\": ");
        sb_float(&b, o->eps);
        sb_puts(&b, ", \"weight_decay\": ");
        sb_float(&b, o->weight_decay);
        sb_puts(&b, "}");
    } else {
        sb_puts(&b, "null");
    }
    sb_puts(&b, ",\n  \"nodes\": [");
    for (int i = 0; i < g->n_nodes; i++) {
        sb_puts(&b, i ? ",\n    " : "\n    ");
        write_node(&b, g->nodes[i]);
    }
    sb_puts(&b, g->n_nodes ? "\n  ]\n}\n" : "]\n}\n");
    if (b.oom || !b.p) {
        free(b.p);
        return ap_error(AUTOPAR_ERR_NOMEM, "graph to JSON: out of memory building the text (%d nodes)",
                        g->n_nodes);
    }
    *out = b.p;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Reading                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Where an error is: the document's label ("graph JSON" or the file path) and, once known, the
 * node's index and name. */
typedef struct rd_ctx {
    const char *label;
    int         node;      /* -1 at top level */
    const char *name;      /* NULL until read */
} rd_ctx;

static ap_status rd_fail(const rd_ctx *c, ap_status s, const char *fmt, ...) AP_PRINTF(3, 4);
static ap_status rd_fail(const rd_ctx *c, ap_status s, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (c->node < 0) return ap_error(s, "%s: %s", c->label, msg);
    if (c->name) return ap_error(s, "%s: node %d ('%s'): %s", c->label, c->node, c->name, msg);
    return ap_error(s, "%s: node %d: %s", c->label, c->node, msg);
}

static const char *json_type_name(const cJSON *v) {
    if (!v) return "nothing";
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    return "an invalid value";
}

static ap_status rd_field(const rd_ctx *c, const cJSON *obj, const char *key, const cJSON **v) {
    *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!*v) return rd_fail(c, AUTOPAR_ERR_PARSE, "missing field \"%s\"", key);
    return AUTOPAR_OK;
}

/* An integer in [lo, hi] from a JSON number. `what` names the field ("layer", "src[2]"). */
static ap_status rd_int_value(const rd_ctx *c, const cJSON *v, const char *what, int64_t lo,
                              int64_t hi, int64_t *out) {
    if (!cJSON_IsNumber(v))
        return rd_fail(c, AUTOPAR_ERR_PARSE, "field \"%s\": expected an integer, got %s", what,
                       json_type_name(v));
    double d = v->valuedouble;
    if (!isfinite(d) || d != floor(d) || d <= -AP_JSON_INT_LIMIT || d >= AP_JSON_INT_LIMIT)
        return rd_fail(c, AUTOPAR_ERR_PARSE,
                       "field \"%s\": %.17g is not an integer with |value| < 2^53", what, d);
    int64_t x = (int64_t)d;
    if (x < lo || x > hi)
        return rd_fail(c, AUTOPAR_ERR_PARSE, "field \"%s\": %" PRId64 " is outside [%" PRId64
                       ", %" PRId64 "]", what, x, lo, hi);
    *out = x;
    return AUTOPAR_OK;
}

static ap_status rd_int(const rd_ctx *c, const cJSON *obj, const char *key, int64_t lo,
                        int64_t hi, int64_t *out) {
    const cJSON *v = NULL;
    ap_status s = rd_field(c, obj, key, &v);
    if (s != AUTOPAR_OK) return s;
    return rd_int_value(c, v, key, lo, hi, out);
}

/* A double from a JSON number or one of the strings "nan", "inf", "-inf". */
static ap_status rd_double_value(const rd_ctx *c, const cJSON *v, const char *what, double *out) {
    if (cJSON_IsNumber(v)) { *out = v->valuedouble; return AUTOPAR_OK; }
    if (cJSON_IsString(v) && v->valuestring) {
        if (strcmp(v->valuestring, "nan") == 0) { *out = NAN; return AUTOPAR_OK; }
        if (strcmp(v->valuestring, "inf") == 0) { *out = INFINITY; return AUTOPAR_OK; }
        if (strcmp(v->valuestring, "-inf") == 0) { *out = -INFINITY; return AUTOPAR_OK; }
    }
    return rd_fail(c, AUTOPAR_ERR_PARSE,
                   "field \"%s\": expected a number (or \"nan\", \"inf\", \"-inf\"), got %s", what,
                   json_type_name(v));
}

static ap_status rd_float(const rd_ctx *c, const cJSON *obj, const char *key, float *out) {
    const cJSON *v = NULL;
    double d = 0.0;
    ap_status s = rd_field(c, obj, key, &v);
    if (s == AUTOPAR_OK) s = rd_double_value(c, v, key, &d);
    if (s != AUTOPAR_OK) return s;
    if (isfinite(d) && fabs(d) > (double)FLT_MAX)
        return rd_fail(c, AUTOPAR_ERR_PARSE, "field \"%s\": %.17g is outside the float range", key,
                       d);
    *out = (float)d;
    return AUTOPAR_OK;
}

static ap_status rd_string(const rd_ctx *c, const cJSON *obj, const char *key, const char **out) {
    const cJSON *v = NULL;
    ap_status s = rd_field(c, obj, key, &v);
    if (s != AUTOPAR_OK) return s;
    if (!cJSON_IsString(v) || !v->valuestring)
        return rd_fail(c, AUTOPAR_ERR_PARSE, "field \"%s\": expected a string, got %s", key,
                       json_type_name(v));
    *out = v->valuestring;
    return AUTOPAR_OK;
}

/* A string field that must be one of table's names. */
static ap_status rd_enum(const rd_ctx *c, const cJSON *obj, const char *key,
                         const char *const *table, int count, int *out) {
    const char *str = NULL;
    ap_status s = rd_string(c, obj, key, &str);
    if (s != AUTOPAR_OK) return s;
    int k = name_lookup(table, count, str);
    if (k < 0) {
        char list[256];
        name_list(table, count, list, sizeof list);
        return rd_fail(c, AUTOPAR_ERR_PARSE, "field \"%s\": unknown value \"%.64s\" (expected %s)",
                       key, str, list);
    }
    *out = k;
    return AUTOPAR_OK;
}

/* An array field with between min_n and max_n elements. */
static ap_status rd_array(const rd_ctx *c, const cJSON *obj, const char *key, int min_n, int max_n,
                          ap_status too_long, const cJSON **arr, int *n) {
    const cJSON *v = NULL;
    ap_status s = rd_field(c, obj, key, &v);
    if (s != AUTOPAR_OK) return s;
    if (!cJSON_IsArray(v))
        return rd_fail(c, AUTOPAR_ERR_PARSE, "field \"%s\": expected an array, got %s", key,
                       json_type_name(v));
    /* Count without walking a huge list to its end. */
    int count = 0;
    for (const cJSON *e = v->child; e; e = e->next) {
        if (count > max_n) break;
        count++;
    }
    if (count > max_n)
        return rd_fail(c, too_long, "field \"%s\": more than %d elements", key, max_n);
    if (count < min_n)
        return rd_fail(c, AUTOPAR_ERR_PARSE,
                       min_n == max_n ? "field \"%s\": %d elements, expected %d"
                                      : "field \"%s\": %d elements, expected at least %d",
                       key, count, min_n);
    *arr = v;
    *n = count;
    return AUTOPAR_OK;
}

/* Everything one node entry says. */
typedef struct rd_node {
    ap_op         op;
    const char   *name;
    ap_dtype      dtype;
    ap_shape      shape;
    autopar_kind  kind;
    autopar_phase phase;
    int           layer;
    int           n_src;
    int           src[AP_MAX_SRC];
    ap_attrs      attrs;
    int           grad, assign_to;
} rd_node;

static ap_status read_node_fields(rd_ctx *c, const cJSON *obj, int n_nodes, rd_node *r) {
    ap_status s = AUTOPAR_OK;
    int64_t x = 0;
    int e = 0;
    const cJSON *arr = NULL;
    int cnt = 0;
    char what[32];

    memset(r, 0, sizeof *r);
    if (!cJSON_IsObject(obj))
        return rd_fail(c, AUTOPAR_ERR_PARSE, "expected an object, got %s", json_type_name(obj));

    /* The name first, so that every later message names the node. */
    if ((s = rd_string(c, obj, "name", &r->name)) != AUTOPAR_OK) return s;
    if (r->name[0] == '\0') return rd_fail(c, AUTOPAR_ERR_PARSE, "field \"name\": empty name");
    if (strlen(r->name) >= AP_MAX_NAME)
        return rd_fail(c, AUTOPAR_ERR_PARSE,
                       "field \"name\": \"%.40s...\" is longer than %d characters", r->name,
                       AP_MAX_NAME - 1);
    c->name = r->name;

    const cJSON *idv = NULL;
    if ((s = rd_field(c, obj, "id", &idv)) != AUTOPAR_OK) return s;
    if ((s = rd_int_value(c, idv, "id", INT_MIN, INT_MAX, &x)) != AUTOPAR_OK) return s;
    if (x != c->node)
        return rd_fail(c, AUTOPAR_ERR_GRAPH,
                       "field \"id\": %" PRId64 " at position %d (ids must be 0..n-1 in order)", x,
                       c->node);

    const char *op = NULL;
    if ((s = rd_string(c, obj, "op", &op)) != AUTOPAR_OK) return s;
    r->op = ap_op_from_name(op);
    if ((int)r->op < 0 || r->op >= AP_OP_COUNT)
        return rd_fail(c, AUTOPAR_ERR_UNKNOWN_OP, "field \"op\": unknown op \"%.64s\"", op);

    if ((s = rd_enum(c, obj, "dtype", dtype_names, AUTOPAR_DTYPE_COUNT, &e)) != AUTOPAR_OK)
        return s;
    r->dtype = (ap_dtype)e;

    if ((s = rd_array(c, obj, "shape", 0, AP_MAX_DIMS, AUTOPAR_ERR_SHAPE, &arr, &cnt)) != AUTOPAR_OK)
        return s;
    r->shape.ndim = cnt;
    {
        int k = 0;
        for (const cJSON *v = arr->child; v && k < cnt; v = v->next, k++) {
            snprintf(what, sizeof what, "shape[%d]", k);
            if ((s = rd_int_value(c, v, what, INT64_MIN, INT64_MAX, &r->shape.dim[k])) != AUTOPAR_OK)
                return s;
        }
        /* The element count must fit in int64 (ap_shape_numel and the passes multiply dims). */
        int64_t numel = 1;
        for (int d = 0; d < cnt; d++) {
            int64_t v = r->shape.dim[d];
            if (v > 0 && numel > INT64_MAX / v)
                return rd_fail(c, AUTOPAR_ERR_SHAPE,
                               "field \"shape\": the element count overflows int64");
            if (v > 0) numel *= v;
        }
    }

    if ((s = rd_enum(c, obj, "kind", kind_names, AUTOPAR_KIND_COUNT, &e)) != AUTOPAR_OK) return s;
    r->kind = (autopar_kind)e;
    if ((s = rd_enum(c, obj, "phase", phase_names, AUTOPAR_PHASE_COUNT, &e)) != AUTOPAR_OK)
        return s;
    r->phase = (autopar_phase)e;
    if ((s = rd_int(c, obj, "layer", 0, INT_MAX, &x)) != AUTOPAR_OK) return s;
    r->layer = (int)x;

    if ((s = rd_array(c, obj, "src", 0, AP_MAX_SRC, AUTOPAR_ERR_GRAPH, &arr, &cnt)) != AUTOPAR_OK)
        return s;
    r->n_src = cnt;
    {
        int k = 0;
        for (const cJSON *v = arr->child; v && k < cnt; v = v->next, k++) {
            snprintf(what, sizeof what, "src[%d]", k);
            if ((s = rd_int_value(c, v, what, INT_MIN, INT_MAX, &x)) != AUTOPAR_OK) return s;
            if (x < 0 || x >= c->node)
                return rd_fail(c, AUTOPAR_ERR_GRAPH,
                               "field \"%s\": operand id %" PRId64
                               " is not an earlier node (must be in [0, %d): graph not "
                               "topological or id out of range)",
                               what, x, c->node);
            r->src[k] = (int)x;
        }
    }

    if ((s = rd_array(c, obj, "iattrs", AP_MAX_IATTR, AP_MAX_IATTR, AUTOPAR_ERR_PARSE, &arr, &cnt)) !=
        AUTOPAR_OK)
        return s;
    {
        int k = 0;
        for (const cJSON *v = arr->child; v && k < cnt; v = v->next, k++) {
            snprintf(what, sizeof what, "iattrs[%d]", k);
            if ((s = rd_int_value(c, v, what, INT64_MIN, INT64_MAX, &r->attrs.i[k])) != AUTOPAR_OK)
                return s;
        }
    }
    if ((s = rd_array(c, obj, "fattrs", AP_MAX_FATTR, AP_MAX_FATTR, AUTOPAR_ERR_PARSE, &arr, &cnt)) !=
        AUTOPAR_OK)
        return s;
    {
        int k = 0;
        for (const cJSON *v = arr->child; v && k < cnt; v = v->next, k++) {
            snprintf(what, sizeof what, "fattrs[%d]", k);
            if ((s = rd_double_value(c, v, what, &r->attrs.f[k])) != AUTOPAR_OK) return s;
        }
    }

    const cJSON *gv = NULL, *av = NULL;
    if ((s = rd_field(c, obj, "grad", &gv)) != AUTOPAR_OK) return s;
    if ((s = rd_int_value(c, gv, "grad", INT_MIN, INT_MAX, &x)) != AUTOPAR_OK) return s;
    if (x < -1 || x >= n_nodes)
        return rd_fail(c, AUTOPAR_ERR_GRAPH, "field \"grad\": id %" PRId64 " outside [-1, %d)", x,
                       n_nodes);
    r->grad = (int)x;
    if ((s = rd_field(c, obj, "assign_to", &av)) != AUTOPAR_OK) return s;
    if ((s = rd_int_value(c, av, "assign_to", INT_MIN, INT_MAX, &x)) != AUTOPAR_OK) return s;
    if (x < -1 || x >= n_nodes)
        return rd_fail(c, AUTOPAR_ERR_GRAPH, "field \"assign_to\": id %" PRId64 " outside [-1, %d)",
                       x, n_nodes);
    r->assign_to = (int)x;
    return AUTOPAR_OK;
}

/* Does op take its shape from the node (ap_graph_add's `shape` argument)? */
static bool op_shape_from_node(ap_op op) {
    switch (op) {
    case AP_OP_INPUT: case AP_OP_PARAM: case AP_OP_OPT_STATE: case AP_OP_FILL:
    case AP_OP_RESHAPE: case AP_OP_SUM_TO: case AP_OP_EXPAND:
        return true;
    default:
        return false;
    }
}

static ap_status rebuild_node(rd_ctx *c, autopar_graph *g, const rd_node *r) {
    char err[sizeof g->error];
    g->current_layer = r->layer;
    g->current_phase = r->phase;
    g->current_fwd = -1;
    ap_node *n = ap_graph_add(g, r->op, r->n_src, r->src, &r->attrs,
                              op_shape_from_node(r->op) ? &r->shape : NULL, r->dtype, r->name);
    if (!n) {
        ap_status s = g->status != AUTOPAR_OK ? g->status : AUTOPAR_ERR_GRAPH;
        snprintf(err, sizeof err, "%s", g->status != AUTOPAR_OK ? g->error : "ap_graph_add failed");
        return rd_fail(c, s, "op \"%s\" rejected: %s", ap_op_name(r->op), err);
    }
    if (n->id != c->node || g->n_nodes != c->node + 1)
        return rd_fail(c, AUTOPAR_ERR_GRAPH, "rebuilt node got id %d, expected %d", n->id, c->node);
    if (n->dtype != r->dtype)
        return rd_fail(c, AUTOPAR_ERR_DTYPE,
                       "field \"dtype\": stored dtype %s but op \"%s\" infers %s from its operands",
                       dtype_names[r->dtype], ap_op_name(r->op),
                       ((int)n->dtype >= 0 && n->dtype < AUTOPAR_DTYPE_COUNT) ? dtype_names[n->dtype]
                                                                              : "?");
    if (!ap_shape_equal(&n->shape, &r->shape)) {
        char a[96], b[96];
        ap_shape_str(&r->shape, a, sizeof a);
        ap_shape_str(&n->shape, b, sizeof b);
        return rd_fail(c, AUTOPAR_ERR_SHAPE,
                       "field \"shape\": stored shape %s but op \"%s\" infers %s from its operands",
                       a, ap_op_name(r->op), b);
    }
    n->kind = r->kind;
    n->phase = r->phase;
    n->layer = r->layer;
    n->grad = r->grad;
    n->assign_to = r->assign_to;
    return AUTOPAR_OK;
}

static ap_status read_optimizer(rd_ctx *c, const cJSON *root, autopar_graph *g) {
    const cJSON *o = NULL;
    ap_status s = rd_field(c, root, "optimizer", &o);
    if (s != AUTOPAR_OK) return s;
    if (cJSON_IsNull(o)) {
        g->has_optimizer = false;
        return AUTOPAR_OK;
    }
    if (!cJSON_IsObject(o))
        return rd_fail(c, AUTOPAR_ERR_PARSE, "field \"optimizer\": expected null or an object, got %s",
                       json_type_name(o));
    rd_ctx oc = *c;
    char label[300];
    snprintf(label, sizeof label, "%s: optimizer", c->label);
    oc.label = label;
    autopar_optimizer opt;
    memset(&opt, 0, sizeof opt);
    int k = 0;
    if ((s = rd_enum(&oc, o, "kind", opt_names, AUTOPAR_OPT_COUNT, &k)) != AUTOPAR_OK) return s;
    opt.kind = (autopar_optimizer_kind)k;
    if ((s = rd_float(&oc, o, "lr", &opt.lr)) != AUTOPAR_OK) return s;
    if ((s = rd_float(&oc, o, "momentum", &opt.momentum)) != AUTOPAR_OK) return s;
    if ((s = rd_float(&oc, o, "beta1", &opt.beta1)) != AUTOPAR_OK) return s;
    if ((s = rd_float(&oc, o, "beta2", &opt.beta2)) != AUTOPAR_OK) return s;
    if ((s = rd_float(&oc, o, "eps", &opt.eps)) != AUTOPAR_OK) return s;
    if ((s = rd_float(&oc, o, "weight_decay", &opt.weight_decay)) != AUTOPAR_OK) return s;
    g->has_optimizer = true;
    g->optimizer = opt;
    return AUTOPAR_OK;
}

/* The reader shared by from_json and load; label names the source in messages. */
static ap_status graph_from_text(const char *json, const char *label, autopar_graph **out) {
    *out = NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json, &end, 1);
    if (!root) return ap_json_parse_error(label, json, end);

    rd_ctx c = {label, -1, NULL};
    autopar_graph *g = NULL;
    ap_status s = AUTOPAR_OK;
    const char *str = NULL;
    int64_t x = 0;
    const cJSON *nodes = NULL;

    if (!cJSON_IsObject(root)) {
        s = rd_fail(&c, AUTOPAR_ERR_PARSE, "expected a JSON object at top level, got %s",
                    json_type_name(root));
        goto done;
    }
    if ((s = rd_string(&c, root, "format", &str)) != AUTOPAR_OK) goto done;
    if (strcmp(str, AP_JSON_FORMAT) != 0) {
        s = rd_fail(&c, AUTOPAR_ERR_PARSE, "field \"format\": \"%.64s\", expected \"%s\"", str,
                    AP_JSON_FORMAT);
        goto done;
    }
    if ((s = rd_int(&c, root, "version", INT_MIN, INT_MAX, &x)) != AUTOPAR_OK) goto done;
    if (x != AP_JSON_VERSION) {
        s = rd_fail(&c, AUTOPAR_ERR_PARSE, "field \"version\": %" PRId64
                    " is not supported (this library reads version %d)", x, AP_JSON_VERSION);
        goto done;
    }
    if ((s = rd_field(&c, root, "nodes", &nodes)) != AUTOPAR_OK) goto done;
    if (!cJSON_IsArray(nodes)) {
        s = rd_fail(&c, AUTOPAR_ERR_PARSE, "field \"nodes\": expected an array, got %s",
                    json_type_name(nodes));
        goto done;
    }
    int n_nodes = 0;
    for (const cJSON *v = nodes->child; v; v = v->next) {
        if (n_nodes == INT_MAX) {
            s = rd_fail(&c, AUTOPAR_ERR_GRAPH, "field \"nodes\": too many nodes");
            goto done;
        }
        n_nodes++;
    }
    int64_t current_layer = 0, loss = -1;
    if ((s = rd_int(&c, root, "current_layer", 0, INT_MAX, &current_layer)) != AUTOPAR_OK) goto done;
    if ((s = rd_int(&c, root, "loss", INT_MIN, INT_MAX, &loss)) != AUTOPAR_OK) goto done;
    if (loss < -1 || loss >= n_nodes) {
        s = rd_fail(&c, AUTOPAR_ERR_GRAPH, "field \"loss\": id %" PRId64 " outside [-1, %d)", loss,
                    n_nodes);
        goto done;
    }

    if ((s = autopar_graph_new(&g)) != AUTOPAR_OK) goto done;
    if ((s = read_optimizer(&c, root, g)) != AUTOPAR_OK) goto done;

    {
        int i = 0;
        for (const cJSON *v = nodes->child; v; v = v->next, i++) {
            rd_ctx nc = {label, i, NULL};
            rd_node r;
            if ((s = read_node_fields(&nc, v, n_nodes, &r)) != AUTOPAR_OK) goto done;
            if ((s = rebuild_node(&nc, g, &r)) != AUTOPAR_OK) goto done;
        }
    }

    g->current_layer = (int)current_layer;
    g->current_phase = AUTOPAR_PHASE_FORWARD;
    g->current_fwd = -1;
    g->loss = (int)loss;
    if (loss >= 0 && g->nodes[loss]->shape.ndim != 0) {
        char b[96];
        s = rd_fail(&c, AUTOPAR_ERR_SHAPE, "field \"loss\": node %d ('%s') has shape %s, not a scalar",
                    (int)loss, g->nodes[loss]->name, ap_shape_str(&g->nodes[loss]->shape, b, sizeof b));
        goto done;
    }
    s = autopar_graph_validate(g);
    if (s != AUTOPAR_OK) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", autopar_last_error());
        s = rd_fail(&c, s, "graph does not validate: %s", msg);
        goto done;
    }

done:
    cJSON_Delete(root);
    if (s != AUTOPAR_OK) {
        autopar_graph_free(g);
        return s;
    }
    *out = g;
    return AUTOPAR_OK;
}

autopar_status autopar_graph_from_json(const char *json, autopar_graph **out) {
    if (out) *out = NULL;
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_from_json: out is NULL");
    if (!json) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_from_json: json text is NULL");
    return graph_from_text(json, "graph JSON", out);
}

/* ------------------------------------------------------------------------------------------ */
/* Files                                                                                       */
/* ------------------------------------------------------------------------------------------ */

autopar_status autopar_graph_save(const autopar_graph *g, const char *path) {
    if (!g) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_save: graph is NULL");
    if (!path) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_save: path is NULL");
    char *text = NULL;
    ap_status s = autopar_graph_to_json(g, &text);
    if (s != AUTOPAR_OK) return s;
    size_t len = strlen(text);
    errno = 0;
    FILE *f = fopen(path, "wb");
    if (!f) {
        int e = errno;
        free(text);
        return ap_error(AUTOPAR_ERR_IO, "autopar_graph_save: cannot open '%s' for writing: %s", path,
                        strerror(e));
    }
    errno = 0;
    size_t w = fwrite(text, 1, len, f);
    int e = errno;
    free(text);
    if (w != len) {
        fclose(f);
        return ap_error(AUTOPAR_ERR_IO, "autopar_graph_save: cannot write '%s': %s", path,
                        e ? strerror(e) : "short write");
    }
    errno = 0;
    if (fclose(f) != 0) {
        e = errno;
        return ap_error(AUTOPAR_ERR_IO, "autopar_graph_save: cannot write '%s': %s", path,
                        e ? strerror(e) : "close failed");
    }
    return AUTOPAR_OK;
}

autopar_status autopar_graph_load(const char *path, autopar_graph **out) {
    if (out) *out = NULL;
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_load: out is NULL");
    if (!path) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_graph_load: path is NULL");
    char *buf;
    ap_status s = ap_read_text_file("autopar_graph_load", path, (size_t)1 << 31, &buf, NULL);
    if (s) return s;
    s = graph_from_text(buf, path, out);
    free(buf);
    return s;
}
