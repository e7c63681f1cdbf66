/*
 * Backend registry and the wrappers every caller goes through: argument and range checks, the
 * defaults of the optional vtable slots, and the CUDA stubs of builds without CUDA (the only
 * place that tests AUTOPAR_USE_CUDA, so callers never do).
 */
#include "backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef AUTOPAR_USE_CUDA
#include "cuda/kernels_cuda.h"
#endif

/* ------------------------------------------------------------------------------------------ */
/* CUDA presence: real answers or stubs                                                        */
/* ------------------------------------------------------------------------------------------ */

#ifdef AUTOPAR_USE_CUDA

bool ap_backend_cuda_compiled(void) { return true; }
int ap_backend_cuda_device_count(void) { return ap_cuda_device_count(); }
const char *ap_backend_cuda_no_device_reason(void) { return ap_cuda_no_device_reason(); }

#else

bool ap_backend_cuda_compiled(void) { return false; }
int ap_backend_cuda_device_count(void) { return 0; }
const char *ap_backend_cuda_no_device_reason(void) { return "this build has no CUDA backend"; }

ap_status ap_backend_cuda_new(int device, ap_backend **out) {
    (void)device;
    if (out) *out = NULL;
    return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                    "CUDA backend requested but this build has no CUDA support (configure with "
                    "the CUDA toolkit and NCCL installed and -DAUTOPAR_CUDA=ON)");
}

struct ap_cuda_ctx *ap_backend_cuda_ctx(const ap_backend *b) {
    (void)b;
    return NULL;
}

#endif

/* ------------------------------------------------------------------------------------------ */
/* Registry                                                                                    */
/* ------------------------------------------------------------------------------------------ */

const char *ap_backend_kind_name(ap_backend_kind k) {
    switch (k) {
    case AP_BACKEND_AUTO: return "auto";
    case AP_BACKEND_CPU: return "cpu";
    case AP_BACKEND_CUDA: return "cuda";
    default: return "?";
    }
}

/* A CUDA backend, or the reason there is none. */
static ap_status new_cuda(int device, ap_backend **out) {
    if (!ap_backend_cuda_compiled()) return ap_backend_cuda_new(device, out); /* the stub's message */
    int count = ap_backend_cuda_device_count();
    if (count <= 0)
        return ap_error(AUTOPAR_ERR_UNSUPPORTED,
                        "CUDA backend requested but no CUDA device is visible (%s; driver "
                        "missing or older than the toolkit, no GPU, or CUDA_VISIBLE_DEVICES "
                        "hides them)", ap_backend_cuda_no_device_reason());
    if (device < 0 || device >= count)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "CUDA backend requested on device %d, but the visible devices are "
                        "0..%d", device, count - 1);
    return ap_backend_cuda_new(device, out);
}

ap_status ap_backend_new(ap_backend_kind kind, int device, ap_backend **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_backend_new: out is NULL");
    *out = NULL;
    switch (kind) {
    case AP_BACKEND_CPU: return ap_backend_cpu_new(out);
    case AP_BACKEND_CUDA: return new_cuda(device, out);
    case AP_BACKEND_AUTO:
        if (ap_backend_cuda_compiled() && ap_backend_cuda_device_count() > 0)
            return new_cuda(device, out);
        return ap_backend_cpu_new(out);
    default:
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_backend_new: backend kind %d is not valid",
                        (int)kind);
    }
}

void ap_backend_free(ap_backend *b) {
    if (!b) return;
    if (b->iface && b->iface->free) b->iface->free(b->ctx);
    free(b);
}

/* ------------------------------------------------------------------------------------------ */
/* Queries                                                                                     */
/* ------------------------------------------------------------------------------------------ */

const char *ap_backend_name(const ap_backend *b) {
    if (!b) return "(null)";
    const char *n = b->iface->name(b->ctx);
    return n ? n : "?";
}

ap_backend_kind ap_backend_get_kind(const ap_backend *b) { return b ? b->kind : AP_BACKEND_AUTO; }

static bool is_leaf(ap_op op) {
    return op == AP_OP_INPUT || op == AP_OP_PARAM || op == AP_OP_OPT_STATE;
}

bool ap_backend_supports_op(const ap_backend *b, ap_op op, autopar_precision p) {
    if (!b || (int)op < 0 || op >= AP_OP_COUNT || is_leaf(op)) return false;
    if ((int)p < 0 || p >= AUTOPAR_PRECISION_COUNT) return false;
    if (!b->iface->supports_op) return true;
    return b->iface->supports_op(b->ctx, op, p);
}

/* ------------------------------------------------------------------------------------------ */
/* Memory and copies                                                                           */
/* ------------------------------------------------------------------------------------------ */

static const char *or_q(const char *what) { return what ? what : "?"; }

/* Checks that [off, off + bytes) lies inside buf (overflow-safe). */
static ap_status check_range(const ap_backend *b, const ap_buffer *buf, size_t off, size_t bytes,
                             const char *fn, const char *role, const char *what) {
    if (!buf)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s '%s': %s buffer is NULL", fn, or_q(what),
                        role);
    if (bytes == 0) return AUTOPAR_OK;
    if (!buf->data)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s '%s': %s buffer is empty (%s backend)", fn,
                        or_q(what), role, ap_backend_name(b));
    if (off > buf->bytes || bytes > buf->bytes - off)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "%s '%s': %zu bytes at offset %zu exceed the %s buffer of %zu bytes "
                        "(%s backend)", fn, or_q(what), bytes, off, role, buf->bytes,
                        ap_backend_name(b));
    return AUTOPAR_OK;
}

ap_status ap_backend_buffer_alloc(ap_backend *b, size_t bytes, const char *what, ap_buffer *out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_backend_buffer_alloc: out is NULL");
    out->data = NULL;
    out->bytes = 0;
    if (!b) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_backend_buffer_alloc: backend is NULL");
    if (bytes == 0) return AUTOPAR_OK;
    void *p = NULL;
    ap_status st = b->iface->buffer_alloc(b->ctx, bytes, &p);
    if (st != AUTOPAR_OK) {
        /* Prefix the tensor to the implementation's message (it names only the size). */
        char msg[768];
        snprintf(msg, sizeof msg, "%s", autopar_last_error());
        return ap_error(st, "cannot allocate %zu bytes for tensor '%s' on the %s backend: %s",
                        bytes, or_q(what), ap_backend_name(b), msg);
    }
    if (!p)
        return ap_error(AUTOPAR_ERR_BACKEND, "cannot allocate %zu bytes for tensor '%s' on the "
                        "%s backend: the allocator returned NULL", bytes, or_q(what),
                        ap_backend_name(b));
    out->data = p;
    out->bytes = bytes;
    return AUTOPAR_OK;
}

void ap_backend_buffer_free(ap_backend *b, ap_buffer *buf) {
    if (!b || !buf) return;
    if (buf->data) b->iface->buffer_free(b->ctx, buf->data);
    buf->data = NULL;
    buf->bytes = 0;
}

ap_status ap_backend_upload(ap_backend *b, const ap_buffer *dst, size_t dst_off,
                            const void *host_src, size_t bytes, const char *what) {
    const char *fn = "ap_backend_upload";
    if (!b) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s '%s': backend is NULL", fn, or_q(what));
    ap_status st = check_range(b, dst, dst_off, bytes, fn, "destination", what);
    if (st) return st;
    if (bytes == 0) return AUTOPAR_OK;
    if (!host_src)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s '%s': host source is NULL", fn, or_q(what));
    return b->iface->upload(b->ctx, (char *)dst->data + dst_off, host_src, bytes);
}

ap_status ap_backend_download(ap_backend *b, void *host_dst, const ap_buffer *src, size_t src_off,
                              size_t bytes, const char *what) {
    const char *fn = "ap_backend_download";
    if (!b) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s '%s': backend is NULL", fn, or_q(what));
    ap_status st = check_range(b, src, src_off, bytes, fn, "source", what);
    if (st) return st;
    if (bytes == 0) return AUTOPAR_OK;
    if (!host_dst)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s '%s': host destination is NULL", fn,
                        or_q(what));
    return b->iface->download(b->ctx, host_dst, (const char *)src->data + src_off, bytes);
}

/* Host block for the default copy / fill: whole transfers up to 64 MiB, chunks beyond that. */
#define BOUNCE_MAX ((size_t)64 << 20)

ap_status ap_backend_copy(ap_backend *b, const ap_buffer *dst, size_t dst_off,
                          const ap_buffer *src, size_t src_off, size_t bytes, const char *what) {
    const char *fn = "ap_backend_copy";
    if (!b) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s '%s': backend is NULL", fn, or_q(what));
    ap_status st = check_range(b, dst, dst_off, bytes, fn, "destination", what);
    if (!st) st = check_range(b, src, src_off, bytes, fn, "source", what);
    if (st) return st;
    if (bytes == 0) return AUTOPAR_OK;
    char *d = (char *)dst->data + dst_off;
    const char *s = (const char *)src->data + src_off;
    if ((d < s && s < d + bytes) || (s <= d && d < s + bytes))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s '%s': source and destination ranges of %zu "
                        "bytes overlap", fn, or_q(what), bytes);
    if (b->iface->copy) return b->iface->copy(b->ctx, d, s, bytes);
    /* Default: bounce through host memory. */
    size_t chunk = bytes < BOUNCE_MAX ? bytes : BOUNCE_MAX;
    void *tmp = malloc(chunk);
    if (!tmp)
        return ap_error(AUTOPAR_ERR_NOMEM, "%s '%s': cannot allocate a %zu-byte host block", fn,
                        or_q(what), chunk);
    for (size_t done = 0; done < bytes && !st; done += chunk) {
        size_t n = bytes - done < chunk ? bytes - done : chunk;
        st = b->iface->download(b->ctx, tmp, s + done, n);
        if (!st) st = b->iface->upload(b->ctx, d + done, tmp, n);
    }
    free(tmp);
    return st;
}

ap_status ap_backend_fill_zero(ap_backend *b, const ap_buffer *dst, size_t off, size_t bytes,
                               const char *what) {
    const char *fn = "ap_backend_fill_zero";
    if (!b) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s '%s': backend is NULL", fn, or_q(what));
    ap_status st = check_range(b, dst, off, bytes, fn, "destination", what);
    if (st) return st;
    if (bytes == 0) return AUTOPAR_OK;
    char *d = (char *)dst->data + off;
    if (b->iface->fill_zero) return b->iface->fill_zero(b->ctx, d, bytes);
    size_t chunk = bytes < BOUNCE_MAX ? bytes : BOUNCE_MAX;
    void *zeros = calloc(chunk, 1);
    if (!zeros)
        return ap_error(AUTOPAR_ERR_NOMEM, "%s '%s': cannot allocate a %zu-byte host block", fn,
                        or_q(what), chunk);
    for (size_t done = 0; done < bytes && !st; done += chunk) {
        size_t n = bytes - done < chunk ? bytes - done : chunk;
        st = b->iface->upload(b->ctx, d + done, zeros, n);
    }
    free(zeros);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Kernels and synchronisation                                                                 */
/* ------------------------------------------------------------------------------------------ */

static const char *precision_name(autopar_precision p) {
    return p == AUTOPAR_PRECISION_F32 ? "f32" : p == AUTOPAR_PRECISION_F64 ? "f64" : "?";
}

ap_status ap_backend_run(ap_backend *b, const ap_kernel_call *call) {
    if (!b || !call) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_backend_run: NULL argument");
    if ((int)call->op < 0 || call->op >= AP_OP_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_backend_run '%s': op %d is not valid",
                        or_q(call->name), (int)call->op);
    if (is_leaf(call->op))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_backend_run: '%s' is a leaf (%s); leaves "
                        "have no kernel, the runtime fills them", or_q(call->name),
                        ap_op_name(call->op));
    if (!ap_backend_supports_op(b, call->op, call->precision))
        return ap_error(AUTOPAR_ERR_UNSUPPORTED, "op %s '%s': not supported in %s precision by "
                        "the %s backend", ap_op_name(call->op), or_q(call->name),
                        precision_name(call->precision), ap_backend_name(b));
    return b->iface->run(b->ctx, call);
}

ap_status ap_backend_synchronize(ap_backend *b) {
    if (!b) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_backend_synchronize: backend is NULL");
    if (!b->iface->synchronize) return AUTOPAR_OK;
    return b->iface->synchronize(b->ctx);
}
