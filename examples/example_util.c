#define _POSIX_C_SOURCE 200809L  /* clock_gettime */

#include "example_util.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

double example_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int example_parse_method(const char *text, autopar_method *out) {
    if (!strcmp(text, "auto")) *out = AUTOPAR_METHOD_PIPESHARD;
    else if (!strcmp(text, "shard")) *out = AUTOPAR_METHOD_SHARD;
    else if (!strcmp(text, "dp")) *out = AUTOPAR_METHOD_DATA_PARALLEL;
    else if (!strcmp(text, "zero2")) *out = AUTOPAR_METHOD_ZERO2;
    else return 1;
    return 0;
}

/* Stores text into flag f; returns whether the whole text was a valid value. */
static int set_flag(const example_flag *f, const char *text) {
    char *end = NULL;
    switch (f->kind) {
    case EXAMPLE_INT: *(int *)f->dst = (int)strtol(text, &end, 10); break;
    case EXAMPLE_I64: *(int64_t *)f->dst = (int64_t)strtoll(text, &end, 10); break;
    case EXAMPLE_U64: *(uint64_t *)f->dst = (uint64_t)strtoull(text, &end, 10); break;
    case EXAMPLE_DOUBLE: *(double *)f->dst = strtod(text, &end); break;
    case EXAMPLE_STRING: *(const char **)f->dst = text; return 1;
    case EXAMPLE_METHOD: return example_parse_method(text, (autopar_method *)f->dst) == 0;
    }
    return end && end != text && *end == '\0';
}

int example_parse_flags(int argc, char **argv, const example_flag *flags, int n) {
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i];
        if (!strcmp(name, "-h") || !strcmp(name, "--help")) return 1;
        const example_flag *f = NULL;
        for (int k = 0; k < n && !f; k++)
            if (!strcmp(flags[k].name, name)) f = &flags[k];
        if (!f) {
            fprintf(stderr, "%s: unknown flag %s\n", argv[0], name);
            return 1;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: missing value for %s\n", argv[0], name);
            return 1;
        }
        const char *v = argv[++i];
        if (!set_flag(f, v)) {
            fprintf(stderr, "%s: bad value '%s' for %s\n", argv[0], v, name);
            return 1;
        }
    }
    return 0;
}

autopar_status example_plan(const autopar_graph *g, const char *cluster_path,
                            autopar_method method, int micro, int size,
                            autopar_cluster **cl, autopar_plan **plan) {
    *cl = NULL;
    *plan = NULL;
    autopar_status s = cluster_path ? autopar_cluster_load(cluster_path, cl)
                                    : autopar_cluster_preset("cpu", 1, size, cl);
    autopar_options o;
    autopar_options_default(&o);
    o.method = method;
    o.num_micro_batches = micro;
    if (!s) s = autopar_parallelize(g, *cl, &o, plan);
    if (s) {
        autopar_cluster_free(*cl);
        *cl = NULL;
    }
    return s;
}
