/* Status strings and the per-thread last-error message. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[1024];

static const char *const status_text[AUTOPAR_STATUS_COUNT] = {
    [AUTOPAR_OK]              = "ok",
    [AUTOPAR_ERR_INVALID_ARG] = "invalid argument",
    [AUTOPAR_ERR_SHAPE]       = "shape mismatch",
    [AUTOPAR_ERR_DTYPE]       = "wrong dtype",
    [AUTOPAR_ERR_NOMEM]       = "out of host memory",
    [AUTOPAR_ERR_PARSE]       = "parse error",
    [AUTOPAR_ERR_UNKNOWN_OP]  = "unknown op",
    [AUTOPAR_ERR_GRAPH]       = "invalid graph",
    [AUTOPAR_ERR_INFEASIBLE]  = "infeasible",
    [AUTOPAR_ERR_IO]          = "I/O error",
    [AUTOPAR_ERR_MPI]         = "MPI error",
    [AUTOPAR_ERR_BACKEND]     = "backend error",
    [AUTOPAR_ERR_UNSUPPORTED] = "unsupported",
    [AUTOPAR_ERR_NOT_FOUND]   = "not found",
};

const char *autopar_status_str(autopar_status s) {
    if ((int)s < 0 || s >= AUTOPAR_STATUS_COUNT) return "unknown status";
    return status_text[s];
}

const char *autopar_last_error(void) { return last_error; }

void autopar_clear_error(void) { last_error[0] = '\0'; }

ap_status ap_error(ap_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return s;
}

ap_status ap_graph_fail(autopar_graph *g, ap_status s, const char *fmt, ...) {
    char msg[sizeof last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (g && g->status == AUTOPAR_OK) {
        g->status = s;
        snprintf(g->error, sizeof g->error, "%s", msg);
    }
    memcpy(last_error, msg, sizeof last_error);
    return s;
}

const char *ap_shape_str(const ap_shape *s, char *buf, size_t len) {
    size_t used = 0;
    used += (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < s->ndim && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, i ? ", %lld" : "%lld", (long long)s->dim[i]);
    if (used < len) snprintf(buf + used, len - used, "]");
    return buf;
}
