/*
 * Public sessions (include/autopar.h section 8): a plan run on the ranks of an MPI job.
 *
 * A session runs its plan through the pipeline runtime (runtime/pipeline.h): each rank runs
 * its stage's SPMD program (runtime/spmd.h) and follows its stage's instruction list of the
 * plan's schedule; a plan of one stage is the SPMD program alone. The session keeps its own
 * copy of the plan (rank 0's, broadcast as JSON), so every rank runs exactly the same plan.
 * With B > 1 micro-batches, or more than one stage, the session keeps the global batch of every
 * input written (B micro-batches stacked along the leading dim) and feeds micro-batch k's rows
 * of the inputs its stage reads when the schedule runs forward k. Gradients are accumulated over
 * the micro-batches and the optimizer applied once on their mean.
 *
 * MPI lifetime: one library-held world communicator (ap_comm_world), reference-counted by
 * autopar_world (one reference until autopar_finalize) and by every live session. Freeing the
 * last reference frees the communicator, which finalises MPI when this library initialised it
 * (comm.h).
 */
#include "autopar.h"
#include "backend.h"
#include "comm.h"
#include "internal.h"
#include "mesh.h"
#include "pipeline.h"
#include "plan.h"
#include "spmd.h"

#include <stdlib.h>
#include <string.h>

struct autopar_session {
    autopar_plan *plan;      /* owned: rank 0's plan                                          */
    ap_comm      *world;     /* the library world (a reference)                               */
    ap_comm      *nccl;      /* owned, CUDA backend only                                      */
    ap_backend   *backend;   /* owned                                                          */
    ap_pipeline  *pipe;      /* owned                                                          */
    ap_spmd      *spmd;      /* this rank's stage program (the pipeline's)                     */
    double        flops;     /* per step                                                       */
    /* B > 1 micro-batches or several stages: per node id, the global batch last written to an
     * input (n x B elements of 4 bytes), fed one micro-batch at a time by the step. */
    void        **batch;
};

/* ------------------------------------------------------------------------------------------ */
/* The library's world                                                                         */
/* ------------------------------------------------------------------------------------------ */

static ap_comm *g_world;
static int      g_world_refs;
static bool     g_user_ref;   /* autopar_world holds a reference                                */

static ap_status world_acquire(ap_comm **out) {
    if (!g_world) {
        ap_status st = ap_comm_world(&g_world);
        if (st) {
            g_world = NULL;
            return st;
        }
    }
    g_world_refs++;
    *out = g_world;
    return AUTOPAR_OK;
}

static void world_release(void) {
    if (g_world_refs <= 0) return;
    if (--g_world_refs == 0) {
        ap_comm_free(g_world);   /* finalises MPI when ap_comm_world initialised it */
        g_world = NULL;
    }
}

AUTOPAR_API autopar_status autopar_world(int *rank, int *size) {
    if (!g_user_ref) {
        ap_comm *w = NULL;
        ap_status st = world_acquire(&w);
        if (st) return st;
        g_user_ref = true;
    }
    if (rank) *rank = ap_comm_rank(g_world);
    if (size) *size = ap_comm_size(g_world);
    return AUTOPAR_OK;
}

AUTOPAR_API void autopar_finalize(void) {
    if (!g_user_ref) return;
    g_user_ref = false;
    world_release();
}

/* ------------------------------------------------------------------------------------------ */
/* Creation                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Rank 0's plan, on every rank (through its JSON). Collective; agreed. */
static ap_status plan_bcast(ap_comm *w, const autopar_plan *mine, autopar_plan **out) {
    *out = NULL;
    char *json = NULL;
    ap_status st = AUTOPAR_OK;
    int rank = ap_comm_rank(w);
    if (rank == 0) st = autopar_plan_to_json(mine, &json);
    if ((st = ap_comm_bcast_error(w, 0, st))) return st;
    uint64_t len = rank == 0 ? (uint64_t)strlen(json) + 1 : 0;
    if ((st = ap_comm_broadcast(w, &len, sizeof len, AP_COMM_U8, 0))) {
        free(json);
        return st;
    }
    if (rank != 0) {
        json = malloc((size_t)len);
        if (!json)
            st = ap_error(AUTOPAR_ERR_NOMEM, "autopar_session_new: no memory for the plan's "
                          "JSON (%llu bytes)", (unsigned long long)len);
    }
    if ((st = ap_comm_all_ok(w, st))) {
        free(json);
        return st;
    }
    st = ap_comm_broadcast(w, json, (size_t)len, AP_COMM_U8, 0);
    if (!st) st = autopar_plan_from_json(json, out);
    free(json);
    return ap_comm_all_ok(w, st);
}

static ap_status make_backend(autopar_session *s, autopar_backend_kind kind) {
    ap_status st = AUTOPAR_OK;
    ap_backend_kind k = (ap_backend_kind)kind;
    if (k == AP_BACKEND_AUTO)
        k = ap_backend_cuda_compiled() && ap_backend_cuda_device_count() > 0 ? AP_BACKEND_CUDA
                                                                            : AP_BACKEND_CPU;
    /* Every rank must run the same kind (a rank without a GPU cannot join NCCL). */
    if ((st = ap_comm_check_same(s->world, (uint64_t)k, "autopar_session_new: backend kind")))
        return st;
    int dev = 0;
    if (k == AP_BACKEND_CUDA) {
        int n = ap_backend_cuda_device_count();
        dev = ap_comm_local_device(s->world, n);
        if (dev < 0)
            st = ap_error(AUTOPAR_ERR_UNSUPPORTED, "autopar_session_new: rank %d sees no CUDA "
                          "device (%s)", ap_comm_rank(s->world),
                          ap_backend_cuda_no_device_reason());
    }
    if (!st) st = ap_backend_new(k, dev, &s->backend);
    if ((st = ap_comm_all_ok(s->world, st))) return st;
    if (k == AP_BACKEND_CUDA) {
        st = ap_comm_nccl_new(s->world, ap_backend_cuda_ctx(s->backend), &s->nccl);
        st = ap_comm_all_ok(s->world, st);
    }
    return st;
}

AUTOPAR_API autopar_status autopar_session_new(const autopar_plan *plan,
                                               autopar_backend_kind backend, uint64_t seed,
                                               autopar_session **out) {
    const char *fn = "autopar_session_new";
    if (out) *out = NULL;
    autopar_session *s = calloc(1, sizeof *s);
    if (!s) return ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
    ap_status st = world_acquire(&s->world);
    if (st) {
        free(s);
        return st;
    }
    /* Argument checks are local, but agreed before the first collective: a rank whose plan
     * failed to load or to be made (NULL here) must not leave the others waiting for it. */
    if (!plan || !out) {
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: %s is NULL%s", fn, !plan ? "plan" : "out",
                      !plan ? " on this rank (did loading or planning fail here?)" : "");
    } else if ((int)backend < 0 || backend >= AUTOPAR_BACKEND_KIND_COUNT) {
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: bad backend kind %d", fn, (int)backend);
    } else {
        const autopar_cluster *cl = plan->cluster;
        int want = autopar_cluster_hosts(cl) * autopar_cluster_devices_per_host(cl);
        int have = ap_comm_size(s->world);
        if (want != have)
            st = ap_error(AUTOPAR_ERR_INVALID_ARG,
                          "%s: the plan is for %d devices (%d hosts x %d) but the MPI world has "
                          "%d rank%s; run it with mpirun -np %d (rank r runs device r)", fn, want,
                          autopar_cluster_hosts(cl), autopar_cluster_devices_per_host(cl), have,
                          have == 1 ? "" : "s", want);
    }
    if ((st = ap_comm_all_ok(s->world, st))) goto fail;
    if ((st = plan_bcast(s->world, plan, &s->plan))) goto fail;
    const autopar_plan *p = s->plan;
    if (p->n_micro_batches > 1 || p->n_stages > 1) {
        s->batch = calloc((size_t)p->graph->n_nodes + 1, sizeof *s->batch);
        if (!s->batch) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
        if ((st = ap_comm_all_ok(s->world, st))) goto fail;
    }
    if ((st = make_backend(s, backend))) goto fail;
    ap_spmd_options o;
    ap_spmd_options_default(&o);
    o.seed = seed;
    o.precision = AUTOPAR_PRECISION_F32;
    if ((st = ap_pipeline_new(p, s->backend, s->world, s->nccl ? s->nccl : s->world, &o,
                              &s->pipe)))
        goto fail;
    s->spmd = ap_pipeline_spmd(s->pipe);
    /* forward and backward once per micro-batch, the optimizer once per step */
    for (int id = 0; id < p->graph->n_nodes; id++) {
        const ap_node *nd = p->graph->nodes[id];
        s->flops += ap_node_flops(p->graph, nd) *
                    (nd->phase == AUTOPAR_PHASE_APPLY ? 1 : p->n_micro_batches);
    }
    *out = s;
    return AUTOPAR_OK;
fail:
    autopar_session_free(s);
    return st;
}

AUTOPAR_API void autopar_session_free(autopar_session *s) {
    if (!s) return;
    ap_pipeline_free(s->pipe);
    if (s->batch && s->plan)
        for (int id = 0; id < s->plan->graph->n_nodes; id++) free(s->batch[id]);
    free(s->batch);
    ap_comm_free(s->nccl);
    ap_backend_free(s->backend);
    autopar_plan_free(s->plan);
    if (s->world) world_release();
    free(s);
}

/* ------------------------------------------------------------------------------------------ */
/* Steps, inputs, reads                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* The node called `name` in the session's graph, or NULL with the error set (local). */
static const ap_node *find_node(const autopar_session *s, const char *fn, const char *name) {
    if (!name) {
        ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: name is NULL", fn);
        return NULL;
    }
    const autopar_tensor *t = autopar_graph_find(s->plan->graph, name);
    if (!t) {
        ap_error(AUTOPAR_ERR_NOT_FOUND, "%s: the plan's graph has no tensor '%s'", fn, name);
        return NULL;
    }
    return (const ap_node *)t;
}

static void shape_str(const ap_shape *sh, char *buf, size_t len) {
    size_t o = 0;
    o += (size_t)snprintf(buf + o, len - o, "[");
    for (int d = 0; d < sh->ndim && o < len; d++)
        o += (size_t)snprintf(buf + o, len - o, "%s%lld", d ? ", " : "", (long long)sh->dim[d]);
    if (o < len) snprintf(buf + o, len - o, "]");
}

AUTOPAR_API autopar_status autopar_session_write_input(autopar_session *s, const char *name,
                                                       const void *data, int64_t n) {
    const char *fn = "autopar_session_write_input";
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    ap_status st = AUTOPAR_OK;
    const ap_node *nd = find_node(s, fn, name);
    if (!nd) st = name ? AUTOPAR_ERR_NOT_FOUND : AUTOPAR_ERR_INVALID_ARG;
    if (!st && nd->op != AP_OP_INPUT)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: '%s' is not an input of the graph", fn,
                      name);
    if (!st && !data) st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: data is NULL", fn);
    if (!st) {
        int64_t numel = ap_shape_numel(&nd->shape);
        int64_t want = numel * s->plan->n_micro_batches;
        if (n != want) {
            char sh[96];
            shape_str(&nd->shape, sh, sizeof sh);
            st = ap_error(AUTOPAR_ERR_SHAPE,
                          "%s: input '%s' takes the global batch of a step, %lld elements (%d "
                          "micro-batch%s x %s), got %lld", fn, name, (long long)want,
                          s->plan->n_micro_batches, s->plan->n_micro_batches == 1 ? "" : "es",
                          sh, (long long)n);
        }
    }
    if ((st = ap_comm_all_ok(s->world, st))) return st;
    if (!s->batch) return ap_spmd_set_input(s->spmd, (const autopar_tensor *)nd, data, n);
    /* Micro-batches: the global batch is kept (local) and fed slice by slice by the step. */
    void *copy = malloc((size_t)n * 4);
    if (!copy)
        st = ap_error(AUTOPAR_ERR_NOMEM, "%s: no memory for the global batch of '%s'", fn, name);
    else {
        memcpy(copy, data, (size_t)n * 4);
        free(s->batch[nd->id]);
        s->batch[nd->id] = copy;
    }
    return ap_comm_all_ok(s->world, st);
}

/* Feeds micro-batch k: every input of this rank's stage written so far gets rows
 * [k m, (k + 1) m) of its global batch (B micro-batches stacked along the leading dim: a
 * contiguous slice). Collective over the stage. */
static ap_status feed_micro(void *ctx, int k) {
    autopar_session *s = ctx;
    const autopar_graph *g = s->plan->graph;
    ap_status st = AUTOPAR_OK;
    for (int id = 0; id < g->n_nodes && !st; id++) {
        /* the same on every rank of the stage: written collectively */
        if (!s->batch[id] || ap_spmd_role(s->spmd, id) != 1) continue;
        const ap_node *nd = g->nodes[id];
        int64_t m = ap_shape_numel(&nd->shape);
        st = ap_spmd_set_input(s->spmd, (const autopar_tensor *)nd,
                               (const char *)s->batch[id] + (size_t)(k * m) * 4, m);
    }
    return st;
}

AUTOPAR_API autopar_status autopar_session_step(autopar_session *s, double *loss) {
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_session_step: session is NULL");
    return ap_pipeline_step(s->pipe, s->batch ? feed_micro : NULL, s, loss);
}

AUTOPAR_API autopar_status autopar_session_read_param(autopar_session *s, const char *name,
                                                      float *out, int64_t n) {
    const char *fn = "autopar_session_read_param";
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    ap_status st = AUTOPAR_OK;
    const ap_node *nd = find_node(s, fn, name);
    if (!nd) st = name ? AUTOPAR_ERR_NOT_FOUND : AUTOPAR_ERR_INVALID_ARG;
    if (!st && nd->op != AP_OP_PARAM && nd->op != AP_OP_OPT_STATE)
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: '%s' is not a parameter or optimizer state",
                      fn, name);
    if (!st && !out) st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: out is NULL", fn);
    if (!st && n != ap_shape_numel(&nd->shape)) {
        char sh[96];
        shape_str(&nd->shape, sh, sizeof sh);
        st = ap_error(AUTOPAR_ERR_SHAPE, "%s: '%s' %s has %lld elements, got n = %lld", fn, name,
                      sh, (long long)ap_shape_numel(&nd->shape), (long long)n);
    }
    if ((st = ap_comm_all_ok(s->world, st))) return st;
    return ap_pipeline_read(s->pipe, (const autopar_tensor *)nd, out, n);
}

AUTOPAR_API int autopar_session_rank(const autopar_session *s) {
    return s ? ap_comm_rank(s->world) : -1;
}

AUTOPAR_API int autopar_session_size(const autopar_session *s) {
    return s ? ap_comm_size(s->world) : 0;
}

AUTOPAR_API int64_t autopar_session_steps(const autopar_session *s) {
    return s ? ap_pipeline_steps(s->pipe) : 0;
}

AUTOPAR_API double autopar_session_flops_per_step(const autopar_session *s) {
    return s ? s->flops : 0.0;
}

/* ------------------------------------------------------------------------------------------ */
/* Checkpoints                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static const char ckpt_magic[16] = "AUTOPARCKPT1";

static bool is_leaf_state(const ap_node *n) {
    return n->op == AP_OP_PARAM || n->op == AP_OP_OPT_STATE;
}

AUTOPAR_API autopar_status autopar_session_save(autopar_session *s, const char *path) {
    const char *fn = "autopar_session_save";
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    const autopar_graph *g = s->plan->graph;
    bool root = ap_comm_rank(s->world) == 0;
    ap_status st = AUTOPAR_OK;
    FILE *f = NULL;
    if (!path) st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: path is NULL", fn);
    if (!st && root && !(f = fopen(path, "wb")))
        st = ap_error(AUTOPAR_ERR_IO, "%s: cannot open '%s' for writing", fn, path);
    if ((st = ap_comm_all_ok(s->world, st))) return st;
    int64_t count = 0, steps = ap_pipeline_steps(s->pipe);
    for (int id = 0; id < g->n_nodes; id++) count += is_leaf_state(g->nodes[id]);
    bool io_ok = true;
    if (root)
        io_ok = fwrite(ckpt_magic, 1, 16, f) == 16 && fwrite(&steps, 8, 1, f) == 1 &&
                fwrite(&count, 8, 1, f) == 1;
    for (int id = 0; id < g->n_nodes && !st; id++) {
        const ap_node *n = g->nodes[id];
        if (!is_leaf_state(n)) continue;
        int64_t numel = ap_shape_numel(&n->shape);
        float *buf = malloc((size_t)(numel ? numel : 1) * sizeof *buf);
        st = buf ? AUTOPAR_OK : ap_error(AUTOPAR_ERR_NOMEM, "%s: no memory for '%s'", fn, n->name);
        if ((st = ap_comm_all_ok(s->world, st))) break;
        st = ap_pipeline_read(s->pipe, (const autopar_tensor *)n, buf, numel);
        if (!st && root && io_ok) {
            uint32_t len = (uint32_t)strlen(n->name);
            io_ok = fwrite(&len, 4, 1, f) == 1 && fwrite(n->name, 1, len, f) == len &&
                    fwrite(&numel, 8, 1, f) == 1 &&
                    fwrite(buf, sizeof *buf, (size_t)numel, f) == (size_t)numel;
        }
        free(buf);
    }
    if (f && fclose(f) != 0) io_ok = false;
    if (!st && !io_ok) st = ap_error(AUTOPAR_ERR_IO, "%s: writing '%s' failed", fn, path);
    return ap_comm_all_ok(s->world, st);
}

AUTOPAR_API autopar_status autopar_session_load(autopar_session *s, const char *path) {
    const char *fn = "autopar_session_load";
    if (!s) return ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: session is NULL", fn);
    const autopar_graph *g = s->plan->graph;
    ap_status st = AUTOPAR_OK;
    FILE *f = NULL;
    int64_t steps = 0, count = 0;
    /* Every rank reads the whole file and keeps, per node id, the values' offset in it. */
    long *off = calloc((size_t)g->n_nodes + 1, sizeof *off);
    if (!off) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory", fn);
    if (!st && !path) st = ap_error(AUTOPAR_ERR_INVALID_ARG, "%s: path is NULL", fn);
    if (!st && !(f = fopen(path, "rb")))
        st = ap_error(AUTOPAR_ERR_IO, "%s: cannot open '%s'", fn, path);
    char magic[16];
    if (!st && (fread(magic, 1, 16, f) != 16 || memcmp(magic, ckpt_magic, 16) != 0 ||
                fread(&steps, 8, 1, f) != 1 || fread(&count, 8, 1, f) != 1 || steps < 0 ||
                count < 0))
        st = ap_error(AUTOPAR_ERR_IO, "%s: '%s' is not an autopar checkpoint", fn, path);
    for (int64_t k = 0; !st && k < count; k++) {
        uint32_t len = 0;
        char name[AP_MAX_NAME];
        int64_t numel = 0;
        if (fread(&len, 4, 1, f) != 1 || len >= AP_MAX_NAME || fread(name, 1, len, f) != len ||
            fread(&numel, 8, 1, f) != 1 || numel < 0) {
            st = ap_error(AUTOPAR_ERR_IO, "%s: '%s': truncated or corrupt entry %lld", fn, path,
                          (long long)k);
            break;
        }
        name[len] = '\0';
        long here = ftell(f);
        const ap_node *n = (const ap_node *)autopar_graph_find(g, name);
        if (!n) autopar_clear_error();   /* a tensor this graph lacks is skipped */
        if (n && is_leaf_state(n)) {
            if (numel != ap_shape_numel(&n->shape))
                st = ap_error(AUTOPAR_ERR_PARSE, "%s: '%s': tensor '%s' has %lld elements in the "
                              "file, %lld in the session's graph", fn, path, name,
                              (long long)numel, (long long)ap_shape_numel(&n->shape));
            else
                off[n->id] = here;
        }
        if (!st && fseek(f, (long)(numel * 4), SEEK_CUR) != 0)
            st = ap_error(AUTOPAR_ERR_IO, "%s: '%s': truncated at '%s'", fn, path, name);
    }
    for (int id = 0; !st && id < g->n_nodes; id++)
        if (is_leaf_state(g->nodes[id]) && !off[id])
            st = ap_error(AUTOPAR_ERR_PARSE, "%s: '%s' has no tensor '%s'", fn, path,
                          g->nodes[id]->name);
    st = ap_comm_all_ok(s->world, st);
    for (int id = 0; !st && id < g->n_nodes; id++) {
        const ap_node *n = g->nodes[id];
        if (!is_leaf_state(n)) continue;
        int64_t numel = ap_shape_numel(&n->shape);
        float *buf = malloc((size_t)(numel ? numel : 1) * sizeof *buf);
        if (!buf) st = ap_error(AUTOPAR_ERR_NOMEM, "%s: no memory for '%s'", fn, n->name);
        else if (fseek(f, off[id], SEEK_SET) != 0 ||
                 fread(buf, sizeof *buf, (size_t)numel, f) != (size_t)numel)
            st = ap_error(AUTOPAR_ERR_IO, "%s: '%s': cannot read '%s'", fn, path, n->name);
        if (!(st = ap_comm_all_ok(s->world, st)))
            st = ap_pipeline_write(s->pipe, (const autopar_tensor *)n, buf, numel);
        free(buf);
    }
    if (f) fclose(f);
    free(off);
    if (!st) ap_pipeline_set_steps(s->pipe, steps);
    return st;
}

/* Section 9 of autopar.h: this rank's timers and memory figures from the SPMD runtime. */
AUTOPAR_API autopar_status autopar_session_stats_get(const autopar_session *s,
                                                     autopar_session_stats *out) {
    if (!s || !out)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "autopar_session_stats_get: %s is NULL",
                        !s ? "session" : "out");
    ap_spmd_stats st;
    ap_spmd_get_stats(s->spmd, &st);
    memset(out, 0, sizeof *out);
    out->steps = st.timed_steps;
    out->step_seconds = st.step_seconds;
    out->kernel_seconds = st.kernel_seconds;
    out->comm_seconds = st.comm_seconds;
    double rest = st.step_seconds - st.kernel_seconds - st.comm_seconds;
    out->overhead_seconds = rest > 0 ? rest : 0.0;
    out->predicted_peak_bytes = (double)st.predicted_peak;
    out->measured_peak_bytes = (double)st.measured_peak;
    out->n_collectives = st.n_collectives;
    out->coll_bytes = st.coll_bytes;
    ap_pipeline_traffic tr;
    ap_pipeline_get_traffic(s->pipe, &tr);
    out->n_cross_stage_messages = tr.cross_messages;
    out->cross_stage_bytes = tr.cross_bytes;
    out->replica_gather_bytes = tr.gather_bytes;
    return AUTOPAR_OK;
}
