/*
 * Cluster descriptions: JSON reading and writing, presets, validation, printing.
 * Schema: docs/cluster.md. Private struct: cluster.h.
 */
#include "cluster.h"

#include <cjson/cJSON.h>

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Presets                                                                                     */
/* ------------------------------------------------------------------------------------------ */

#define GIB ((int64_t)1 << 30)

typedef struct cluster_preset {
    const char     *name;
    int             max_devices_per_host;   /* devices a real host of this kind has; 0 = any  */
    autopar_cluster base;                   /* hosts / devices_per_host filled by the caller  */
} cluster_preset;

/*
 * Sources (see /work/shared/reference/hardware.md and alpa-notes.md §1.1; [D] = derived there):
 *
 * p3.16xlarge (the Alpa paper's testbed, 8 hosts x 8 V100 SXM2 16 GB):
 *   - 15.7 TFLOP/s fp32, 125 TFLOP/s fp16 tensor cores, 900 GB/s HBM2 (AWS P3 launch post,
 *     NVIDIA V100 figures quoted in hardware.md §4).
 *   - 16 GB HBM2 per GPU; the card has 16 GiB (CUDA reports slightly less usable memory; the
 *     planner's memory budget option covers the reserve).
 *   - NVLink2: 300 GB/s aggregate per GPU, i.e. ~150 GB/s per direction; used as the per-device
 *     bus bandwidth of collectives inside a host.
 *   - 25 Gbit/s network per host = 3.125 GB/s (alpa-notes §1.1 [D]).
 *   - Latencies are estimates, not measurements: NCCL small-message all-reduce inside a node
 *     takes ~10-35 us (nccl-tests issue #123, 2..8 GPUs of a DGX-A100); across hosts over TCP on
 *     25 GbE (no EFA on p3) we assume ~50 us.
 *
 * dgx-h100 (8 x H100 SXM5 80 GB, NVLink4 + NVSwitch, 8 x 400 Gbit/s InfiniBand NDR):
 *   - 66.9 TFLOP/s fp32, 989.4 TFLOP/s dense bf16 (not the 1979 sparse figure), 3.35 TB/s HBM3,
 *     80 GB = 80 GiB (hardware.md §4).
 *   - NVLink: ring all-reduce busBw ~370 GB/s on 8 GPUs (450 GB/s per direction minus protocol
 *     overhead; NVLS reaches ~480 GB/s only for very large messages) (hardware.md, nccl-tests
 *     #212).
 *   - InfiniBand: 46-48 GB/s busBw per NDR NIC, 8 NICs per node -> ~370 GB/s per host
 *     (hardware.md, nccl-tests #290 [D]).
 *   - Latencies: estimates in line with NCCL's own tuning model (~6-14 us base plus a few us
 *     per hop, nccl issue #1334); 10 us inside a node, 20 us across nodes.
 *
 * cpu (MPI ranks on the cores of ordinary machines, used for tests and small runs):
 *   - Rough round numbers, not measurements: 50 GFLOP/s per core (a few AVX2/AVX-512 FMA units
 *     at ~3 GHz, well below peak for real GEMM sizes), 10 GB/s of memory bandwidth per rank when
 *     all cores stream at once, 5 GB/s / 5 us between ranks of one host (MPI over shared
 *     memory), 1.25 GB/s / 50 us between hosts (10 GbE, TCP), 4 GiB of memory per rank.
 *   - A calibration tool that measures GEMM rate and collective bandwidth on the real ranks
 *     is meant to replace these figures with a measured cluster JSON.
 */
static const cluster_preset k_presets[] = {
    {
        "p3.16xlarge", 8,
        {
            .name = "p3.16xlarge",
            .device_memory = 16 * GIB,
            .peak_flops_f32 = 15.7e12,
            .peak_flops_f16 = 125e12,
            .memory_bandwidth = 900e9,
            .intra_host = {.bandwidth = 150e9, .latency = 10e-6},
            .inter_host = {.bandwidth = 3.125e9, .latency = 50e-6},
        },
    },
    {
        "dgx-h100", 8,
        {
            .name = "dgx-h100",
            .device_memory = 80 * GIB,
            .peak_flops_f32 = 66.9e12,
            .peak_flops_f16 = 989.4e12,
            .memory_bandwidth = 3.35e12,
            .intra_host = {.bandwidth = 370e9, .latency = 10e-6},
            .inter_host = {.bandwidth = 370e9, .latency = 20e-6},
        },
    },
    {
        "cpu", 0,
        {
            .name = "cpu",
            .device_memory = 4 * GIB,
            .peak_flops_f32 = 50e9,
            .peak_flops_f16 = 50e9,   /* no native half arithmetic: same as fp32 */
            .memory_bandwidth = 10e9,
            .intra_host = {.bandwidth = 5e9, .latency = 5e-6},
            .inter_host = {.bandwidth = 1.25e9, .latency = 50e-6},
        },
    },
};
#define N_PRESETS ((int)(sizeof k_presets / sizeof k_presets[0]))

/* ------------------------------------------------------------------------------------------ */
/* Validation                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Field names are spelled as in the JSON document, so a message about a preset or a cluster
 * built in code reads the same as one about a file. */
static ap_status check_positive(const char *src, const char *field, double v, const char *unit) {
    if (!isfinite(v) || !(v > 0))
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s: field '%s' must be a positive number of %s, got %.17g", src, field,
                        unit, v);
    return AUTOPAR_OK;
}

static ap_status check_non_negative(const char *src, const char *field, double v,
                                    const char *unit) {
    if (!isfinite(v) || v < 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s: field '%s' must be a non-negative number of %s, got %.17g", src,
                        field, unit, v);
    return AUTOPAR_OK;
}

static ap_status validate_fields(const autopar_cluster *c, const char *src) {
    ap_status st;
    if (c->name[0] == '\0')
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: field 'name' must not be empty", src);
    if (c->hosts < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: field 'hosts' must be >= 1, got %d", src,
                        c->hosts);
    if (c->devices_per_host < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s: field 'devices_per_host' must be >= 1, got %d", src,
                        c->devices_per_host);
    if ((int64_t)c->hosts * c->devices_per_host > AP_CLUSTER_MAX_DEVICES)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s: fields 'hosts' x 'devices_per_host' = %d x %d exceed the limit of "
                        "%d devices",
                        src, c->hosts, c->devices_per_host, AP_CLUSTER_MAX_DEVICES);
    if (c->device_memory <= 0)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s: field 'device.memory_bytes' must be > 0, got %" PRId64, src,
                        c->device_memory);
    if ((st = check_positive(src, "device.peak_flops_f32", c->peak_flops_f32, "FLOP/s")) ||
        (st = check_positive(src, "device.peak_flops_f16", c->peak_flops_f16, "FLOP/s")) ||
        (st = check_positive(src, "device.memory_bandwidth", c->memory_bandwidth, "bytes/s")) ||
        (st = check_positive(src, "intra_host.bandwidth", c->intra_host.bandwidth, "bytes/s")) ||
        (st = check_non_negative(src, "intra_host.latency", c->intra_host.latency, "seconds")) ||
        (st = check_positive(src, "inter_host.bandwidth", c->inter_host.bandwidth, "bytes/s")) ||
        (st = check_non_negative(src, "inter_host.latency", c->inter_host.latency, "seconds")))
        return st;
    return AUTOPAR_OK;
}

AP_INTERNAL ap_status ap_cluster_validate(const autopar_cluster *c) {
    if (!c) return ap_error(AUTOPAR_ERR_INVALID_ARG, "cluster: NULL cluster");
    if (memchr(c->name, '\0', sizeof c->name) == NULL)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "cluster: field 'name' is not NUL-terminated");
    return validate_fields(c, "cluster");
}

AP_INTERNAL ap_status ap_cluster_clone(const autopar_cluster *c, autopar_cluster **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_cluster_clone: out is NULL");
    *out = NULL;
    ap_status st = ap_cluster_validate(c);
    if (st) return st;
    autopar_cluster *copy = malloc(sizeof *copy);
    if (!copy) return ap_error(AUTOPAR_ERR_NOMEM, "cluster: out of memory copying a cluster");
    *copy = *c;
    *out = copy;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* JSON reading                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* Describes a JSON value for an error message: its type, and its text when short. */
static const char *json_describe(const cJSON *item, char *buf, size_t len) {
    const char *type = cJSON_IsString(item) ? "string"
                     : cJSON_IsBool(item)   ? "boolean"
                     : cJSON_IsNull(item)   ? "null"
                     : cJSON_IsArray(item)  ? "array"
                     : cJSON_IsObject(item) ? "object"
                     : cJSON_IsNumber(item) ? "number"
                                            : "value";
    char *text = cJSON_PrintUnformatted(item);
    if (text && strlen(text) <= 40)
        snprintf(buf, len, "%s %s", type, text);
    else
        snprintf(buf, len, "%s", type);
    free(text);
    return buf;
}

/* Builds "parent.key" (or "key" at the top level) for messages. */
static const char *field_path(char *buf, size_t len, const char *parent, const char *key) {
    if (parent)
        snprintf(buf, len, "%s.%s", parent, key);
    else
        snprintf(buf, len, "%s", key);
    return buf;
}

/* Rejects unknown and duplicated keys: a typo in an optional-looking field would otherwise be
 * ignored silently and the cluster would be planned with a wrong figure. */
static ap_status check_keys(const char *src, const cJSON *obj, const char *parent,
                            const char *const *known, int n_known) {
    char path[128];
    for (const cJSON *it = obj->child; it; it = it->next) {
        const char *key = it->string ? it->string : "";
        int found = 0;
        for (int i = 0; i < n_known; i++)
            if (strcmp(key, known[i]) == 0) found = 1;
        if (!found)
            return ap_error(AUTOPAR_ERR_PARSE, "%s: unknown field '%s'", src,
                            field_path(path, sizeof path, parent, key));
        for (const cJSON *prev = obj->child; prev != it; prev = prev->next)
            if (prev->string && strcmp(prev->string, key) == 0)
                return ap_error(AUTOPAR_ERR_PARSE, "%s: duplicate field '%s'", src,
                                field_path(path, sizeof path, parent, key));
    }
    return AUTOPAR_OK;
}

static ap_status get_member(const char *src, const cJSON *obj, const char *parent,
                            const char *key, const cJSON **out) {
    char path[128];
    *out = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!*out)
        return ap_error(AUTOPAR_ERR_PARSE, "%s: missing field '%s'", src,
                        field_path(path, sizeof path, parent, key));
    return AUTOPAR_OK;
}

static ap_status get_object(const char *src, const cJSON *obj, const char *key,
                            const cJSON **out) {
    ap_status st = get_member(src, obj, NULL, key, out);
    if (st) return st;
    if (!cJSON_IsObject(*out)) {
        char desc[64];
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: field '%s' must be an object, got %s", src,
                        key, json_describe(*out, desc, sizeof desc));
    }
    return AUTOPAR_OK;
}

static ap_status get_number(const char *src, const cJSON *obj, const char *parent,
                            const char *key, double *out) {
    const cJSON *item;
    ap_status st = get_member(src, obj, parent, key, &item);
    if (st) return st;
    if (!cJSON_IsNumber(item)) {
        char path[128], desc[64];
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: field '%s' must be a number, got %s", src,
                        field_path(path, sizeof path, parent, key),
                        json_describe(item, desc, sizeof desc));
    }
    *out = item->valuedouble;
    return AUTOPAR_OK;
}

/* Integers travel as JSON numbers (doubles); anything non-integral or beyond [lo, hi] is refused
 * here because converting it to a C integer would be undefined or lossy. */
static ap_status get_integer(const char *src, const cJSON *obj, const char *parent,
                             const char *key, double lo, double hi, double *out) {
    ap_status st = get_number(src, obj, parent, key, out);
    if (st) return st;
    if (!isfinite(*out) || floor(*out) != *out || *out < lo || *out > hi) {
        char path[128];
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s: field '%s' must be an integer in [%.17g, %.17g], got %.17g", src,
                        field_path(path, sizeof path, parent, key), lo, hi, *out);
    }
    return AUTOPAR_OK;
}

static ap_status parse_link(const char *src, const cJSON *root, const char *key, ap_link *link) {
    static const char *const known[] = {"bandwidth", "latency"};
    const cJSON *obj;
    ap_status st;
    if ((st = get_object(src, root, key, &obj)) ||
        (st = check_keys(src, obj, key, known, 2)) ||
        (st = get_number(src, obj, key, "bandwidth", &link->bandwidth)) ||
        (st = get_number(src, obj, key, "latency", &link->latency)))
        return st;
    return AUTOPAR_OK;
}

static ap_status parse_cluster(const char *src, const char *json, autopar_cluster *c) {
    static const char *const top_known[] = {"version", "name", "hosts", "devices_per_host",
                                            "device", "intra_host", "inter_host"};
    static const char *const dev_known[] = {"memory_bytes", "peak_flops_f32", "peak_flops_f16",
                                            "memory_bandwidth"};
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json, &end, 1);
    if (!root) return ap_json_parse_error(src, json, end);   /* line and column: easy to fix */

    ap_status st = AUTOPAR_OK;
    const cJSON *dev, *item;
    double v;
    memset(c, 0, sizeof *c);
    if (!cJSON_IsObject(root)) {
        char desc[64];
        st = ap_error(AUTOPAR_ERR_PARSE, "%s: the document must be a JSON object, got %s", src,
                      json_describe(root, desc, sizeof desc));
        goto done;
    }
    if ((st = check_keys(src, root, NULL, top_known, 7))) goto done;

    item = cJSON_GetObjectItemCaseSensitive(root, "version");
    if (item) {
        if ((st = get_number(src, root, NULL, "version", &v))) goto done;
        if (v != AP_CLUSTER_JSON_VERSION) {
            st = ap_error(AUTOPAR_ERR_INVALID_ARG,
                          "%s: field 'version' is %.17g; this library reads version %d", src, v,
                          AP_CLUSTER_JSON_VERSION);
            goto done;
        }
    }

    /* The name is optional: a hand-written file may not need one. */
    item = cJSON_GetObjectItemCaseSensitive(root, "name");
    if (!item) {
        snprintf(c->name, sizeof c->name, "custom");
    } else if (!cJSON_IsString(item)) {
        char desc[64];
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: field 'name' must be a string, got %s", src,
                      json_describe(item, desc, sizeof desc));
        goto done;
    } else if (strlen(item->valuestring) >= sizeof c->name) {
        st = ap_error(AUTOPAR_ERR_INVALID_ARG,
                      "%s: field 'name' is %zu characters long; the limit is %d", src,
                      strlen(item->valuestring), (int)sizeof c->name - 1);
        goto done;
    } else {
        snprintf(c->name, sizeof c->name, "%s", item->valuestring);
    }

    if ((st = get_integer(src, root, NULL, "hosts", INT32_MIN, INT32_MAX, &v))) goto done;
    c->hosts = (int)v;
    if ((st = get_integer(src, root, NULL, "devices_per_host", INT32_MIN, INT32_MAX, &v)))
        goto done;
    c->devices_per_host = (int)v;

    if ((st = get_object(src, root, "device", &dev)) ||
        (st = check_keys(src, dev, "device", dev_known, 4)))
        goto done;
    /* 2^53: the largest range in which every integer is exactly a double. */
    if ((st = get_integer(src, dev, "device", "memory_bytes", -9007199254740992.0,
                          9007199254740992.0, &v)))
        goto done;
    c->device_memory = (int64_t)v;
    if ((st = get_number(src, dev, "device", "peak_flops_f32", &c->peak_flops_f32)) ||
        (st = get_number(src, dev, "device", "peak_flops_f16", &c->peak_flops_f16)) ||
        (st = get_number(src, dev, "device", "memory_bandwidth", &c->memory_bandwidth)) ||
        (st = parse_link(src, root, "intra_host", &c->intra_host)) ||
        (st = parse_link(src, root, "inter_host", &c->inter_host)))
        goto done;

    st = validate_fields(c, src);
done:
    cJSON_Delete(root);
    return st;
}

AUTOPAR_API autopar_status autopar_cluster_from_json(const char *json, autopar_cluster **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_cluster_from_json: out is NULL");
    *out = NULL;
    if (!json)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_cluster_from_json: json is NULL");
    autopar_cluster c;
    ap_status st = parse_cluster("cluster JSON", json, &c);
    if (st) return st;
    autopar_cluster *copy = malloc(sizeof *copy);
    if (!copy) return ap_error(AUTOPAR_ERR_NOMEM, "cluster JSON: out of memory");
    *copy = c;
    *out = copy;
    return AUTOPAR_OK;
}

AUTOPAR_API autopar_status autopar_cluster_load(const char *path, autopar_cluster **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_cluster_load: out is NULL");
    *out = NULL;
    if (!path) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_cluster_load: path is NULL");
    char *text;
    ap_status st = ap_read_text_file("cluster JSON", path, 16u << 20, &text, NULL);
    if (st) return st;
    char src[AP_MAX_NAME + 256];
    snprintf(src, sizeof src, "cluster JSON '%s'", path);
    autopar_cluster c;
    st = parse_cluster(src, text, &c);
    free(text);
    if (st) return st;
    autopar_cluster *copy = malloc(sizeof *copy);
    if (!copy) return ap_error(AUTOPAR_ERR_NOMEM, "cluster JSON '%s': out of memory", path);
    *copy = c;
    *out = copy;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Presets and accessors                                                                       */
/* ------------------------------------------------------------------------------------------ */

AUTOPAR_API autopar_status autopar_cluster_preset(const char *name, int hosts,
                                                  int devices_per_host, autopar_cluster **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_cluster_preset: out is NULL");
    *out = NULL;
    if (!name) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_cluster_preset: name is NULL");
    const cluster_preset *p = NULL;
    for (int i = 0; i < N_PRESETS; i++)
        if (strcmp(name, k_presets[i].name) == 0) p = &k_presets[i];
    if (!p) {
        char known[256] = "";
        for (int i = 0; i < N_PRESETS; i++) {
            size_t used = strlen(known);
            snprintf(known + used, sizeof known - used, "%s'%s'", i ? ", " : "",
                     k_presets[i].name);
        }
        return ap_error(AUTOPAR_ERR_NOT_FOUND, "unknown cluster preset '%s'; known presets: %s",
                        name, known);
    }
    if (hosts < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "cluster preset '%s': hosts must be >= 1, got %d",
                        name, hosts);
    if (devices_per_host < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "cluster preset '%s': devices_per_host must be >= 1, got %d", name,
                        devices_per_host);
    if (p->max_devices_per_host > 0 && devices_per_host > p->max_devices_per_host)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "cluster preset '%s': a host has %d devices, devices_per_host=%d", name,
                        p->max_devices_per_host, devices_per_host);
    autopar_cluster c = p->base;
    c.hosts = hosts;
    c.devices_per_host = devices_per_host;
    return ap_cluster_clone(&c, out);
}

AUTOPAR_API int autopar_cluster_hosts(const autopar_cluster *c) { return c ? c->hosts : 0; }

AUTOPAR_API int autopar_cluster_devices_per_host(const autopar_cluster *c) {
    return c ? c->devices_per_host : 0;
}

AUTOPAR_API void autopar_cluster_free(autopar_cluster *c) { free(c); }

/* ------------------------------------------------------------------------------------------ */
/* JSON writing                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* The shortest text that reads back to exactly v: the exact round trip the header promises.
 * (cJSON's own printer compares with a relative tolerance and may drop the last bit.) Large and
 * tiny figures use exponent form, "1.57e13" and "5e-5", which is how people read bandwidths
 * and latencies. */
static void format_double(double v, char *buf, size_t len) {
    double a = fabs(v);
    bool sci = a != 0 && (a >= 1e6 || a < 1e-3);
    for (int prec = sci ? 0 : 1; prec <= 17; prec++) {
        snprintf(buf, len, sci ? "%.*e" : "%.*g", prec, v);
        /* A program that set LC_NUMERIC may get ',' as the decimal point; JSON needs '.'. */
        for (char *p = buf; *p; p++)
            if (*p == ',') *p = '.';
        if (strtod(buf, NULL) == v) break;
    }
    char *e = strchr(buf, 'e');
    if (!e) return;
    /* "e+13" -> "e13", "e-05" -> "e-5": both are valid JSON and easier to read. */
    char *w = e + 1, *r = e + 1;
    if (*r == '+') r++;
    else if (*r == '-') *w++ = *r++;
    while (*r == '0' && r[1] != '\0') r++;
    memmove(w, r, strlen(r) + 1);
}

/* Appends formatted text to a buffer sized in advance (the schema is fixed, so the caller can
 * bound the length); returns false if it would not fit, which the caller treats as a bug-proof
 * failure rather than truncated output. */
static bool append(char *buf, size_t cap, size_t *len, const char *fmt, ...) AP_PRINTF(4, 5);
static bool append(char *buf, size_t cap, size_t *len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *len, cap - *len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= cap - *len) return false;
    *len += (size_t)n;
    return true;
}

AUTOPAR_API autopar_status autopar_cluster_to_json(const autopar_cluster *c, char **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_cluster_to_json: out is NULL");
    *out = NULL;
    ap_status st = ap_cluster_validate(c);
    if (st) return st;

    /* cJSON escapes the name (quotes, control characters) exactly as its parser expects. */
    cJSON *name_item = cJSON_CreateString(c->name);
    char *name = name_item ? cJSON_PrintUnformatted(name_item) : NULL;
    cJSON_Delete(name_item);
    if (!name) return ap_error(AUTOPAR_ERR_NOMEM, "autopar_cluster_to_json: out of memory");

    char num[7][40];
    format_double(c->peak_flops_f32, num[0], sizeof num[0]);
    format_double(c->peak_flops_f16, num[1], sizeof num[1]);
    format_double(c->memory_bandwidth, num[2], sizeof num[2]);
    format_double(c->intra_host.bandwidth, num[3], sizeof num[3]);
    format_double(c->intra_host.latency, num[4], sizeof num[4]);
    format_double(c->inter_host.bandwidth, num[5], sizeof num[5]);
    format_double(c->inter_host.latency, num[6], sizeof num[6]);

    size_t cap = strlen(name) + 1024, len = 0;
    char *text = malloc(cap);
    if (!text) {
        cJSON_free(name);
        return ap_error(AUTOPAR_ERR_NOMEM, "autopar_cluster_to_json: out of memory");
    }
    bool ok = append(text, cap, &len,
                     "{\n"
                     "  \"version\": %d,\n"
                     "  \"name\": %s,\n"
                     "  \"hosts\": %d,\n"
                     "  \"devices_per_host\": %d,\n"
                     "  \"device\": {\n"
                     "    \"memory_bytes\": %" PRId64 ",\n"
                     "    \"peak_flops_f32\": %s,\n"
                     "    \"peak_flops_f16\": %s,\n"
                     "    \"memory_bandwidth\": %s\n"
                     "  },\n"
                     "  \"intra_host\": {\"bandwidth\": %s, \"latency\": %s},\n"
                     "  \"inter_host\": {\"bandwidth\": %s, \"latency\": %s}\n"
                     "}\n",
                     AP_CLUSTER_JSON_VERSION, name, c->hosts, c->devices_per_host,
                     c->device_memory, num[0], num[1], num[2], num[3], num[4], num[5], num[6]);
    cJSON_free(name);
    if (!ok) {
        free(text);
        return ap_error(AUTOPAR_ERR_NOMEM, "autopar_cluster_to_json: output buffer too small");
    }
    *out = text;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Printing                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* "15.7 TFLOP/s", "3.125 GB/s": decimal prefixes, as vendors quote these figures. */
static void print_si(FILE *f, double v, const char *unit) {
    static const char *const prefix[] = {"", "K", "M", "G", "T", "P", "E"};
    int i = 0;
    while (fabs(v) >= 1000.0 && i < 6) {
        v /= 1000.0;
        i++;
    }
    fprintf(f, "%.4g %s%s", v, prefix[i], unit);
}

AUTOPAR_API void autopar_cluster_print(const autopar_cluster *c, FILE *f) {
    if (!f) return;
    if (!c) {
        fprintf(f, "cluster: (null)\n");
        return;
    }
    fprintf(f, "cluster '%s': %d host%s x %d device%s = %d devices\n", c->name, c->hosts,
            c->hosts == 1 ? "" : "s", c->devices_per_host, c->devices_per_host == 1 ? "" : "s",
            c->hosts * c->devices_per_host);
    fprintf(f, "  device: %.4g GiB memory, ", (double)c->device_memory / (double)GIB);
    print_si(f, c->peak_flops_f32, "FLOP/s");
    fprintf(f, " fp32, ");
    print_si(f, c->peak_flops_f16, "FLOP/s");
    fprintf(f, " bf16/fp16, ");
    print_si(f, c->memory_bandwidth, "B/s");
    fprintf(f, " memory bandwidth\n  intra-host link: ");
    print_si(f, c->intra_host.bandwidth, "B/s");
    fprintf(f, " per device, %.3g us latency\n  inter-host link: ", c->intra_host.latency * 1e6);
    print_si(f, c->inter_host.bandwidth, "B/s");
    fprintf(f, " per host, %.3g us latency\n", c->inter_host.latency * 1e6);
}
