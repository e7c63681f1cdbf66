/*
 * Logical device meshes and sharding specs. Contracts in mesh.h.
 */
#include "mesh.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Meshes                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static ap_status mesh_alloc(int n0, int n1, ap_mesh **out) {
    *out = NULL;
    if (n0 < 1 || n1 < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "mesh: shape %d x %d; both sizes must be >= 1",
                        n0, n1);
    if ((int64_t)n0 * n1 > AP_CLUSTER_MAX_DEVICES)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "mesh: shape %d x %d exceeds %d devices", n0, n1,
                        AP_CLUSTER_MAX_DEVICES);
    ap_mesh *m = calloc(1, sizeof *m);
    if (!m) return ap_error(AUTOPAR_ERR_NOMEM, "mesh: out of memory");
    m->devices = malloc(sizeof(int) * (size_t)n0 * (size_t)n1);
    if (!m->devices) {
        free(m);
        return ap_error(AUTOPAR_ERR_NOMEM, "mesh: out of memory for %d x %d devices", n0, n1);
    }
    m->shape[0] = n0;
    m->shape[1] = n1;
    m->n_devices = n0 * n1;
    *out = m;
    return AUTOPAR_OK;
}

AP_INTERNAL void ap_mesh_free(ap_mesh *m) {
    if (!m) return;
    free(m->devices);
    free(m);
}

/* Device of member k of group g along an axis: axis-0 groups are the columns (fixed i1),
 * axis-1 groups the rows (fixed i0), the flat axis is one group of every device. */
static int group_member(const ap_mesh *m, ap_mesh_axis axis, int g, int k) {
    switch (axis) {
    case AP_AXIS_0: return m->devices[k * m->shape[1] + g];
    case AP_AXIS_1: return m->devices[g * m->shape[1] + k];
    default: return m->devices[k];
    }
}

/* Fills alpha/beta/crosses_hosts of one axis from the cluster's links (rules in mesh.h).
 * mark and count are scratch arrays of c->hosts entries. */
static void axis_links(const autopar_cluster *c, ap_mesh *m, ap_mesh_axis axis, int *mark,
                       int *count) {
    int n_groups = axis == AP_AXIS_0 ? m->shape[1] : axis == AP_AXIS_1 ? m->shape[0] : 1;
    int size = ap_mesh_axis_size(m, axis);
    m->alpha[axis] = 0;
    m->beta[axis] = 0;
    m->crosses_hosts[axis] = false;
    if (size <= 1) return;   /* nothing moves over an axis of one device */

    for (int h = 0; h < c->hosts; h++) {
        mark[h] = -1;
        count[h] = 0;
    }
    bool intra_used = false, spans = false;
    for (int g = 0; g < n_groups; g++) {
        int n_hosts = 0;
        for (int k = 0; k < size; k++) {
            int h = ap_cluster_host_of(c, group_member(m, axis, g, k));
            if (mark[h] == g) {
                intra_used = true;   /* two members of this group share host h */
            } else {
                mark[h] = g;
                n_hosts++;
            }
        }
        if (n_hosts > 1) {
            spans = true;
            /* Second pass with a mark no first pass uses, so each host counts this group once. */
            for (int k = 0; k < size; k++) {
                int h = ap_cluster_host_of(c, group_member(m, axis, g, k));
                if (mark[h] != n_groups + g) {
                    mark[h] = n_groups + g;
                    count[h]++;
                }
            }
        }
    }
    int k_max = 0;
    for (int h = 0; h < c->hosts; h++)
        if (count[h] > k_max) k_max = count[h];
    if (intra_used) {
        m->alpha[axis] = c->intra_host.latency;
        m->beta[axis] = 1.0 / c->intra_host.bandwidth;
    }
    if (spans) {
        double beta_inter = (double)k_max / c->inter_host.bandwidth;
        if (c->inter_host.latency > m->alpha[axis]) m->alpha[axis] = c->inter_host.latency;
        if (beta_inter > m->beta[axis]) m->beta[axis] = beta_inter;
        m->crosses_hosts[axis] = true;
    }
}

AP_INTERNAL ap_status ap_mesh_new(const autopar_cluster *c, int n0, int n1, const int *devices,
                                  ap_mesh **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_mesh_new: out is NULL");
    *out = NULL;
    if (!c) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_mesh_new: cluster is NULL");
    ap_status st = ap_cluster_validate(c);
    if (st) return st;
    int total = ap_cluster_num_devices(c);
    if (n0 >= 1 && n1 >= 1 && (int64_t)n0 * n1 > total)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "mesh: shape %d x %d needs %lld devices; cluster '%s' has %d", n0, n1,
                        (long long)n0 * n1, c->name, total);
    ap_mesh *m;
    if ((st = mesh_alloc(n0, n1, &m))) return st;

    /* used[] also catches repeated ids: a device cannot sit at two mesh coordinates. */
    unsigned char *used = calloc((size_t)total, 1);
    int *mark = malloc(sizeof(int) * (size_t)c->hosts);
    int *count = malloc(sizeof(int) * (size_t)c->hosts);
    if (!used || !mark || !count) {
        st = ap_error(AUTOPAR_ERR_NOMEM, "mesh: out of memory");
        goto fail;
    }
    for (int i = 0; i < m->n_devices; i++) {
        int d = devices ? devices[i] : i;
        if (d < 0 || d >= total) {
            st = ap_error(AUTOPAR_ERR_INVALID_ARG,
                          "mesh: device id %d (position %d) is outside cluster '%s' (0..%d)", d,
                          i, c->name, total - 1);
            goto fail;
        }
        if (used[d]) {
            st = ap_error(AUTOPAR_ERR_INVALID_ARG, "mesh: device id %d appears twice", d);
            goto fail;
        }
        used[d] = 1;
        m->devices[i] = d;
    }
    for (int a = 0; a < AP_AXIS_COUNT; a++) axis_links(c, m, (ap_mesh_axis)a, mark, count);
    free(used);
    free(mark);
    free(count);
    *out = m;
    return AUTOPAR_OK;
fail:
    free(used);
    free(mark);
    free(count);
    ap_mesh_free(m);
    return st;
}

AP_INTERNAL ap_status ap_mesh_new_block(const autopar_cluster *c, int host0, int n_hosts,
                                        int dev0, int n_dev, int n0, int n1, ap_mesh **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_mesh_new_block: out is NULL");
    *out = NULL;
    if (!c) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_mesh_new_block: cluster is NULL");
    if (host0 < 0 || n_hosts < 1 || host0 > c->hosts - n_hosts || dev0 < 0 || n_dev < 1 ||
        dev0 > c->devices_per_host - n_dev)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "mesh: block hosts [%d, +%d) x devices [%d, +%d) is outside cluster '%s' "
                        "(%d x %d)",
                        host0, n_hosts, dev0, n_dev, c->name, c->hosts, c->devices_per_host);
    if ((int64_t)n0 * n1 != (int64_t)n_hosts * n_dev)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "mesh: shape %d x %d does not have the %d x %d devices of the block", n0,
                        n1, n_hosts, n_dev);
    int *ids = malloc(sizeof(int) * (size_t)n_hosts * (size_t)n_dev);
    if (!ids) return ap_error(AUTOPAR_ERR_NOMEM, "mesh: out of memory");
    for (int h = 0; h < n_hosts; h++)
        for (int d = 0; d < n_dev; d++)
            ids[h * n_dev + d] = (host0 + h) * c->devices_per_host + dev0 + d;
    ap_status st = ap_mesh_new(c, n0, n1, ids, out);
    free(ids);
    return st;
}

AP_INTERNAL ap_status ap_mesh_new_custom(int n0, int n1, const double alpha[2],
                                         const double beta[2], ap_mesh **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_mesh_new_custom: out is NULL");
    *out = NULL;
    if (!alpha || !beta)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_mesh_new_custom: alpha or beta is NULL");
    for (int a = 0; a < 2; a++)
        if (!isfinite(alpha[a]) || alpha[a] < 0 || !isfinite(beta[a]) || beta[a] < 0)
            return ap_error(AUTOPAR_ERR_INVALID_ARG,
                            "mesh: axis %d has alpha %g, beta %g; both must be finite and >= 0",
                            a, alpha[a], beta[a]);
    ap_mesh *m;
    ap_status st = mesh_alloc(n0, n1, &m);
    if (st) return st;
    for (int i = 0; i < m->n_devices; i++) m->devices[i] = i;
    for (int a = 0; a < 2; a++) {
        m->alpha[a] = alpha[a];
        m->beta[a] = beta[a];
    }
    m->alpha[AP_AXIS_FLAT] = alpha[0] > alpha[1] ? alpha[0] : alpha[1];
    m->beta[AP_AXIS_FLAT] = beta[0] > beta[1] ? beta[0] : beta[1];
    *out = m;
    return AUTOPAR_OK;
}

AP_INTERNAL int ap_mesh_axis_size(const ap_mesh *m, ap_mesh_axis axis) {
    switch (axis) {
    case AP_AXIS_0: return m->shape[0];
    case AP_AXIS_1: return m->shape[1];
    case AP_AXIS_FLAT: return m->n_devices;
    default: return 0;
    }
}

AP_INTERNAL int ap_mesh_device_at(const ap_mesh *m, int i0, int i1) {
    if (i0 < 0 || i0 >= m->shape[0] || i1 < 0 || i1 >= m->shape[1]) return -1;
    return m->devices[i0 * m->shape[1] + i1];
}

AP_INTERNAL ap_status ap_mesh_coord_of(const ap_mesh *m, int device, int *i0, int *i1) {
    for (int i = 0; i < m->n_devices; i++) {
        if (m->devices[i] == device) {
            if (i0) *i0 = i / m->shape[1];
            if (i1) *i1 = i % m->shape[1];
            return AUTOPAR_OK;
        }
    }
    return ap_error(AUTOPAR_ERR_NOT_FOUND, "mesh %d x %d: device %d is not in the mesh",
                    m->shape[0], m->shape[1], device);
}

AP_INTERNAL void ap_mesh_print(const ap_mesh *m, FILE *f) {
    if (!f) return;
    if (!m) {
        fprintf(f, "mesh (null)\n");
        return;
    }
    fprintf(f, "mesh %d x %d [", m->shape[0], m->shape[1]);
    /* Long device lists are cut: a 1024-device mesh on one line helps nobody. */
    int shown = m->n_devices <= 16 ? m->n_devices : 16;
    for (int i = 0; i < shown; i++) fprintf(f, "%s%d", i ? " " : "", m->devices[i]);
    if (shown < m->n_devices) fprintf(f, " ... %d", m->devices[m->n_devices - 1]);
    fprintf(f, "]");
    static const char *const names[] = {"axis 0", "axis 1", "flat"};
    for (int a = 0; a < AP_AXIS_COUNT; a++)
        fprintf(f, ", %s: alpha %.3g s, %.4g GB/s%s", names[a], m->alpha[a],
                m->beta[a] > 0 ? 1e-9 / m->beta[a] : 0.0,
                m->crosses_hosts[a] ? " (inter-host)" : "");
    fprintf(f, "\n");
}

/* ------------------------------------------------------------------------------------------ */
/* Sharding specs                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* Mesh axes a dim spec occupies, as AP_PARTIAL_* style bits (bit a = axis a). */
static unsigned dim_axes(uint8_t d) {
    switch (d) {
    case AP_DIM_S0: return 1u;
    case AP_DIM_S1: return 2u;
    case AP_DIM_S01: return 3u;
    default: return 0u;
    }
}

AP_INTERNAL ap_spec ap_spec_replicated(int ndim) {
    ap_spec s;
    memset(&s, 0, sizeof s);
    s.ndim = ndim < 0 ? 0 : ndim > AP_MAX_DIMS ? AP_MAX_DIMS : ndim;
    return s;
}

AP_INTERNAL bool ap_spec_equal(const ap_spec *a, const ap_spec *b) {
    if (a->ndim != b->ndim || a->partial != b->partial) return false;
    for (int d = 0; d < a->ndim; d++)
        if (a->dim[d] != b->dim[d]) return false;
    return true;
}

/* Writes the spec without validating it (unknown values print as '?'), so that error messages
 * about bad specs can show them. */
AP_INTERNAL const char *ap_spec_str(const ap_spec *s, char *buf, size_t len) {
    static const char *const tok[] = {"R", "S0", "S1", "S01"};
    char tmp[64];
    size_t n = 0;
    tmp[0] = '\0';
    int nd = s->ndim < 0 ? 0 : s->ndim > AP_MAX_DIMS ? AP_MAX_DIMS : s->ndim;
    if (nd == 0) n += (size_t)snprintf(tmp + n, sizeof tmp - n, "-");
    for (int d = 0; d < nd; d++)
        n += (size_t)snprintf(tmp + n, sizeof tmp - n, "%s",
                              s->dim[d] < AP_DIM_SPEC_COUNT ? tok[s->dim[d]] : "?");
    if (s->partial)
        snprintf(tmp + n, sizeof tmp - n, "+P%s%s", (s->partial & AP_PARTIAL_0) ? "0" : "",
                 (s->partial & AP_PARTIAL_1) ? "1" : "");
    if (len > 0) snprintf(buf, len, "%s", tmp);
    return buf;
}

AP_INTERNAL ap_status ap_spec_validate(const ap_spec *s) {
    char buf[64];
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding spec: NULL");
    if (s->ndim < 0 || s->ndim > AP_MAX_DIMS)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding spec: rank %d is outside 0..%d",
                        s->ndim, AP_MAX_DIMS);
    if (s->partial & ~(AP_PARTIAL_0 | AP_PARTIAL_1))
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding spec '%s': unknown partial bits 0x%x",
                        ap_spec_str(s, buf, sizeof buf), (unsigned)s->partial);
    unsigned used = s->partial;
    for (int d = 0; d < s->ndim; d++) {
        if (s->dim[d] >= AP_DIM_SPEC_COUNT)
            return ap_error(AUTOPAR_ERR_INVALID_ARG,
                            "sharding spec '%s': dim %d has unknown value %d",
                            ap_spec_str(s, buf, sizeof buf), d, s->dim[d]);
        unsigned axes = dim_axes(s->dim[d]);
        if (axes & used) {
            int axis = (axes & used & 1u) ? 0 : 1;
            return ap_error(AUTOPAR_ERR_INVALID_ARG,
                            "sharding spec '%s': mesh axis %d is used twice (by dim %d and by an "
                            "earlier dim or a partial sum)",
                            ap_spec_str(s, buf, sizeof buf), axis, d);
        }
        used |= axes;
    }
    return AUTOPAR_OK;
}

AP_INTERNAL int ap_spec_dim_parts(const ap_mesh *m, const ap_spec *s, int d) {
    switch (s->dim[d]) {
    case AP_DIM_S0: return m->shape[0];
    case AP_DIM_S1: return m->shape[1];
    case AP_DIM_S01: return m->n_devices;
    default: return 1;
    }
}

AP_INTERNAL int64_t ap_spec_num_tiles(const ap_mesh *m, const ap_spec *s) {
    int64_t t = 1;
    for (int d = 0; d < s->ndim; d++) t *= ap_spec_dim_parts(m, s, d);
    return t;
}

AP_INTERNAL ap_status ap_spec_local_shape(const ap_mesh *m, const ap_spec *s, const ap_shape *full,
                                          ap_shape *local) {
    char buf[64], sbuf[96];
    if (!m || !full || !local)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_spec_local_shape: NULL argument");
    ap_status st = ap_spec_validate(s);
    if (st) return st;
    if (s->ndim != full->ndim)
        return ap_error(AUTOPAR_ERR_INVALID_ARG,
                        "sharding spec '%s' has rank %d; the tensor %s has rank %d",
                        ap_spec_str(s, buf, sizeof buf), s->ndim,
                        ap_shape_str(full, sbuf, sizeof sbuf), full->ndim);
    ap_shape out = *full;
    for (int d = 0; d < full->ndim; d++) {
        int parts = ap_spec_dim_parts(m, s, d);
        if (full->dim[d] % parts != 0)
            return ap_error(AUTOPAR_ERR_SHAPE,
                            "sharding spec '%s' on mesh %d x %d: dim %d of %s has size %lld, not "
                            "divisible into %d parts",
                            ap_spec_str(s, buf, sizeof buf), m->shape[0], m->shape[1], d,
                            ap_shape_str(full, sbuf, sizeof sbuf), (long long)full->dim[d],
                            parts);
        out.dim[d] = full->dim[d] / parts;
    }
    *local = out;
    return AUTOPAR_OK;
}

AP_INTERNAL ap_status ap_spec_tile(const ap_mesh *m, const ap_spec *s, const ap_shape *full,
                                   int i0, int i1, int64_t *offset, int64_t *extent) {
    ap_shape local;
    ap_status st = ap_spec_local_shape(m, s, full, &local);
    if (st) return st;
    if (i0 < 0 || i0 >= m->shape[0] || i1 < 0 || i1 >= m->shape[1])
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "mesh %d x %d: coordinate (%d, %d) is outside",
                        m->shape[0], m->shape[1], i0, i1);
    if (!offset || !extent)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_spec_tile: NULL offset or extent");
    for (int d = 0; d < full->ndim; d++) {
        int64_t part;
        switch (s->dim[d]) {
        case AP_DIM_S0: part = i0; break;
        case AP_DIM_S1: part = i1; break;
        case AP_DIM_S01: part = (int64_t)i0 * m->shape[1] + i1; break;
        default: part = 0; break;
        }
        offset[d] = part * local.dim[d];
        extent[d] = local.dim[d];
    }
    return AUTOPAR_OK;
}

AP_INTERNAL ap_status ap_spec_parse(const char *text, ap_spec *out) {
    if (!text || !out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_spec_parse: NULL argument");
    ap_spec s = ap_spec_replicated(0);
    const char *p = text;
    if (*p == '-') {
        p++;
    } else {
        while (*p && *p != '+') {
            uint8_t d;
            if (p[0] == 'R') {
                d = AP_DIM_R;
                p += 1;
            } else if (p[0] == 'S' && p[1] == '0' && p[2] == '1') {
                d = AP_DIM_S01;
                p += 3;
            } else if (p[0] == 'S' && p[1] == '0') {
                d = AP_DIM_S0;
                p += 2;
            } else if (p[0] == 'S' && p[1] == '1') {
                d = AP_DIM_S1;
                p += 2;
            } else {
                return ap_error(AUTOPAR_ERR_INVALID_ARG,
                                "sharding spec '%s': unexpected '%c' at position %d (expected R, "
                                "S0, S1 or S01)",
                                text, *p, (int)(p - text));
            }
            if (s.ndim == AP_MAX_DIMS)
                return ap_error(AUTOPAR_ERR_INVALID_ARG,
                                "sharding spec '%s': more than %d dims", text, AP_MAX_DIMS);
            s.dim[s.ndim++] = d;
        }
        if (s.ndim == 0)
            return ap_error(AUTOPAR_ERR_INVALID_ARG,
                            "sharding spec '%s': no dims (write '-' for a rank-0 tensor)", text);
    }
    if (*p == '+') {
        if (strcmp(p, "+P0") == 0)
            s.partial = AP_PARTIAL_0;
        else if (strcmp(p, "+P1") == 0)
            s.partial = AP_PARTIAL_1;
        else if (strcmp(p, "+P01") == 0)
            s.partial = AP_PARTIAL_0 | AP_PARTIAL_1;
        else
            return ap_error(AUTOPAR_ERR_INVALID_ARG,
                            "sharding spec '%s': bad partial suffix '%s' (expected +P0, +P1 or "
                            "+P01)",
                            text, p);
    } else if (*p) {
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "sharding spec '%s': trailing text '%s'", text,
                        p);
    }
    ap_status st = ap_spec_validate(&s);
    if (st) return st;
    *out = s;
    return AUTOPAR_OK;
}

bool ap_spec_reshape(const ap_mesh *m, const ap_shape *in, const ap_spec *s, const ap_shape *out,
                     ap_spec *in_ok, ap_spec *out_spec) {
    *in_ok = *s;
    *out_spec = ap_spec_replicated(out->ndim);
    bool exact = true;
    int i = 0, o = 0;
    while (i < in->ndim || o < out->ndim) {
        int gi0 = i, go0 = o;
        int64_t pi = 1, po = 1;
        if (i < in->ndim) pi = in->dim[i++];
        if (o < out->ndim) po = out->dim[o++];
        while (pi != po) {
            if (pi < po && i < in->ndim)
                pi *= in->dim[i++];
            else if (o < out->ndim)
                po *= out->dim[o++];
            else
                break;   /* cannot happen for equal element counts */
        }
        int maj_in = -1, maj_out = -1;
        for (int d = gi0; d < i; d++)
            if (in->dim[d] > 1) { maj_in = d; break; }
        for (int d = go0; d < o; d++)
            if (out->dim[d] > 1) { maj_out = d; break; }
        int n_split = 0, split_dim = -1;
        for (int d = gi0; d < i; d++)
            if (s->dim[d] != AP_DIM_R) {
                n_split++;
                split_dim = d;
            }
        if (n_split == 0) continue;
        uint8_t ds = s->dim[split_dim];
        int parts = ap_spec_dim_parts(m, s, split_dim);
        if (n_split == 1 && split_dim == maj_in && maj_out >= 0 && out->dim[maj_out] % parts == 0) {
            out_spec->dim[maj_out] = ds;
            continue;
        }
        exact = false;
        for (int d = gi0; d < i; d++) in_ok->dim[d] = AP_DIM_R;
        if (n_split == 1 && maj_in >= 0 && maj_out >= 0 && in->dim[maj_in] % parts == 0 &&
            out->dim[maj_out] % parts == 0) {
            in_ok->dim[maj_in] = ds;   /* all-to-all instead of all-gather */
            out_spec->dim[maj_out] = ds;
        }
    }
    return exact;
}
