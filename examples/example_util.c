#define _POSIX_C_SOURCE 200809L  /* clock_gettime */

#include "example_util.h"

#include <stdio.h>
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
