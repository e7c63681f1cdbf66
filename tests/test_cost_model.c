/*
 * Cost model and sharding specs: collective formulas against hand-computed numbers, roofline,
 * spec notation, local shapes and tiles (brute-force partition checks), the resharding table of
 * reference/alpa-notes.md §1.2, and properties of the resharding search over every pair of
 * specs (zero cost exactly for pure slicing, triangle inequality, each step a well-formed
 * collective whose device groups really exchange the tiles it claims).
 */
#include "autopar.h"
#include "check_cond.h"
#include "cluster.h"
#include "cost_model.h"
#include "mesh.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int close_to(double a, double b) { return fabs(a - b) <= 1e-9 * fabs(b) + 1e-18; }

#define CHECK_CLOSE(a, b)                                                                  \
    do {                                                                                   \
        double a_ = (a), b_ = (b);                                                         \
        if (!close_to(a_, b_)) {                                                           \
            fprintf(stderr, "%s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__, #a, \
                    a_, b_);                                                               \
            g_failures++;                                                                  \
        }                                                                                  \
    } while (0)

static ap_spec spec(const char *text) {
    ap_spec s = ap_spec_replicated(0);
    if (ap_spec_parse(text, &s) != AUTOPAR_OK) {
        fprintf(stderr, "bad spec in test: %s (%s)\n", text, autopar_last_error());
        g_failures++;
    }
    return s;
}

static ap_shape shape2(int64_t a, int64_t b) {
    ap_shape s = {.ndim = 2, .dim = {a, b}};
    return s;
}

/* ------------------------------------------------------------------------------------------ */

static void test_collective_formulas(void) {
    /* n = 4, alpha = 10 us, beta = 1 ns/byte (1 GB/s), B = 1 MB:
     *   all-reduce     1e-5 + 2*3/4 * 1e6 * 1e-9 = 1e-5 + 1.5e-3   = 1.51e-3
     *   all-gather     1e-5 +   3/4 * 1e6 * 1e-9 = 1e-5 + 7.5e-4   = 7.6e-4
     *   reduce-scatter the same                                    = 7.6e-4
     *   all-to-all     1e-5 +  3/16 * 1e6 * 1e-9 = 1e-5 + 1.875e-4 = 1.975e-4
     *   send-recv      1e-5 +         1e6 * 1e-9 = 1e-5 + 1e-3     = 1.01e-3 */
    CHECK_CLOSE(ap_collective_time(AP_COLL_ALL_REDUCE, 4, 1e-5, 1e-9, 1e6), 1.51e-3);
    CHECK_CLOSE(ap_collective_time(AP_COLL_ALL_GATHER, 4, 1e-5, 1e-9, 1e6), 7.6e-4);
    CHECK_CLOSE(ap_collective_time(AP_COLL_REDUCE_SCATTER, 4, 1e-5, 1e-9, 1e6), 7.6e-4);
    CHECK_CLOSE(ap_collective_time(AP_COLL_ALL_TO_ALL, 4, 1e-5, 1e-9, 1e6), 1.975e-4);
    CHECK_CLOSE(ap_collective_time(AP_COLL_SEND_RECV, 4, 1e-5, 1e-9, 1e6), 1.01e-3);
    /* n = 2, alpha = 0, beta = 0.5 ns, B = 8000: AR = 2*1/2*8000*0.5e-9 = 4e-6; A2A = 1/4*... = 1e-6 */
    CHECK_CLOSE(ap_collective_time(AP_COLL_ALL_REDUCE, 2, 0, 0.5e-9, 8000), 4e-6);
    CHECK_CLOSE(ap_collective_time(AP_COLL_ALL_TO_ALL, 2, 0, 0.5e-9, 8000), 1e-6);
    /* One device: nothing moves. */
    for (int k = 0; k < AP_COLL_KIND_COUNT; k++)
        CHECK(ap_collective_time((ap_coll_kind)k, 1, 1e-5, 1e-9, 1e6) == 0.0);
    CHECK(strcmp(ap_coll_kind_name(AP_COLL_ALL_TO_ALL), "all-to-all") == 0);

    /* On a mesh: 2 x 4, axis 0 (1e-5, 1e-9), axis 1 (2e-6, 1e-10); flat takes the max of each.
     * all-gather of 1e6 bytes on axis 1: 2e-6 + 3/4*1e6*1e-10 = 2e-6 + 7.5e-5 = 7.7e-5.
     * all-reduce of 1e6 on the flat mesh (n = 8): 1e-5 + 2*7/8*1e6*1e-9 = 1.76e-3. */
    ap_mesh *m = NULL;
    CHECK(ap_mesh_new_custom(2, 4, (const double[]){1e-5, 2e-6}, (const double[]){1e-9, 1e-10},
                             &m) == AUTOPAR_OK);
    if (m) {
        CHECK_CLOSE(ap_mesh_collective_time(m, AP_COLL_ALL_GATHER, AP_AXIS_1, 1e6), 7.7e-5);
        CHECK_CLOSE(ap_mesh_collective_time(m, AP_COLL_ALL_REDUCE, AP_AXIS_FLAT, 1e6), 1.76e-3);
        CHECK(ap_mesh_axis_size(m, AP_AXIS_FLAT) == 8);
    }
    ap_mesh_free(m);
    CHECK(ap_mesh_new_custom(2, 2, (const double[]){-1, 0}, (const double[]){0, 0}, &m) ==
          AUTOPAR_ERR_INVALID_ARG);
}

static void test_compute_time(void) {
    autopar_cluster *p3 = NULL;
    CHECK(autopar_cluster_preset("p3.16xlarge", 1, 8, &p3) == AUTOPAR_OK);
    if (!p3) return;
    /* 15.7e12 FLOPs at 15.7 TFLOP/s = 1 s (compute-bound: 1e9 bytes take 1/900 s). */
    CHECK_CLOSE(ap_compute_time(p3, 15.7e12, 1e9, AP_FLOPS_F32, 1.0), 1.0);
    /* At 50% efficiency: 2 s. */
    CHECK_CLOSE(ap_compute_time(p3, 15.7e12, 1e9, AP_FLOPS_F32, 0.5), 2.0);
    /* fp16: 125e12 FLOPs at 125 TFLOP/s = 1 s. */
    CHECK_CLOSE(ap_compute_time(p3, 125e12, 0, AP_FLOPS_F16, 1.0), 1.0);
    /* Memory-bound: 1.8e12 bytes at 900 GB/s = 2 s, 1 GFLOP is negligible. */
    CHECK_CLOSE(ap_compute_time(p3, 1e9, 1.8e12, AP_FLOPS_F32, 1.0), 2.0);
    /* A bad efficiency is treated as 1, never as free. */
    CHECK_CLOSE(ap_compute_time(p3, 15.7e12, 0, AP_FLOPS_F32, 0.0), 1.0);
    CHECK_CLOSE(ap_compute_time(p3, 15.7e12, 0, AP_FLOPS_F32, 7.0), 1.0);
    autopar_cluster_free(p3);
}

/* ------------------------------------------------------------------------------------------ */

static void test_spec_notation(void) {
    char buf[AP_SPEC_STR_MAX];
    static const char *const ok[] = {"S0R", "RS01", "S0S1", "S1S0", "S01R", "RR", "RR+P1",
                                     "R+P01", "-", "-+P0", "S0RR+P1", "RRRS01", "S1+P0"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        ap_spec s;
        CHECK(ap_spec_parse(ok[i], &s) == AUTOPAR_OK);
        CHECK(strcmp(ap_spec_str(&s, buf, sizeof buf), ok[i]) == 0);
    }
    ap_spec s = spec("RS01");
    CHECK(s.ndim == 2 && s.dim[0] == AP_DIM_R && s.dim[1] == AP_DIM_S01 && s.partial == 0);
    s = spec("S0R+P1");
    CHECK(s.ndim == 2 && s.dim[0] == AP_DIM_S0 && s.partial == AP_PARTIAL_1);

    /* A mesh axis used twice, or split and pending a sum at once: invalid. */
    static const char *const bad[] = {"S0S0", "S01S1", "S0S01", "S0R+P0", "RS01+P1", "S1+P01",
                                      "X", "S2", "", "RRRRR", "RR+P2", "RR+", "R-"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ap_spec t;
        CHECK(ap_spec_parse(bad[i], &t) == AUTOPAR_ERR_INVALID_ARG);
    }
    CHECK(ap_spec_parse("S0S0", &s) == AUTOPAR_ERR_INVALID_ARG &&
          strstr(autopar_last_error(), "axis 0") != NULL);
    ap_spec raw = ap_spec_replicated(2);
    raw.dim[1] = 9;
    CHECK(ap_spec_validate(&raw) == AUTOPAR_ERR_INVALID_ARG);
    /* Size-1 axes may be used (pointless but valid). */
    ap_mesh *m = NULL;
    CHECK(ap_mesh_new_custom(1, 4, (const double[]){0, 0}, (const double[]){0, 0}, &m) ==
          AUTOPAR_OK);
    if (m) {
        ap_shape full = shape2(3, 8), local;
        s = spec("S0S1");
        CHECK(ap_spec_local_shape(m, &s, &full, &local) == AUTOPAR_OK);
        CHECK(local.dim[0] == 3 && local.dim[1] == 2);
    }
    ap_mesh_free(m);
}

/* Every valid spec of rank nd (with all partial combinations). Returns the count. */
static int all_specs(int nd, ap_spec *out, int cap) {
    int n = 0, combos = 1;
    for (int d = 0; d < nd; d++) combos *= AP_DIM_SPEC_COUNT;
    for (int code = 0; code < combos; code++)
        for (int p = 0; p < 4; p++) {
            ap_spec s = ap_spec_replicated(nd);
            int c = code;
            for (int d = 0; d < nd; d++) {
                s.dim[d] = (uint8_t)(c % AP_DIM_SPEC_COUNT);
                c /= AP_DIM_SPEC_COUNT;
            }
            s.partial = (uint8_t)p;
            if (ap_spec_validate(&s) == AUTOPAR_OK && n < cap) out[n++] = s;
        }
    return n;
}

/* For every spec on a mesh and a shape: tiles of all devices cover every element exactly
 * (devices / tiles) times, distinct tiles number ap_spec_num_tiles, extents equal the local
 * shape; non-divisible specs fail with AUTOPAR_ERR_SHAPE exactly when a dim does not divide. */
static void check_partition(int n0, int n1, const ap_shape *full) {
    ap_mesh *m = NULL;
    CHECK(ap_mesh_new_custom(n0, n1, (const double[]){1e-6, 1e-6}, (const double[]){1e-9, 1e-9},
                             &m) == AUTOPAR_OK);
    if (!m) return;
    ap_spec specs[1024];
    int n_specs = all_specs(full->ndim, specs, 1024);
    int64_t numel = ap_shape_numel(full);
    int *cover = malloc(sizeof(int) * (size_t)numel);
    int64_t *offs = malloc(sizeof(int64_t) * AP_MAX_DIMS * (size_t)m->n_devices);
    CHECK(cover && offs);
    for (int si = 0; si < n_specs && cover && offs; si++) {
        const ap_spec *s = &specs[si];
        char buf[AP_SPEC_STR_MAX];
        int divisible = 1;
        for (int d = 0; d < full->ndim; d++)
            if (full->dim[d] % ap_spec_dim_parts(m, s, d) != 0) divisible = 0;
        ap_shape local;
        ap_status st = ap_spec_local_shape(m, s, full, &local);
        CHECK(st == (divisible ? AUTOPAR_OK : AUTOPAR_ERR_SHAPE));
        if (!divisible) {
            CHECK(strstr(autopar_last_error(), "divisible") != NULL);
            continue;
        }
        memset(cover, 0, sizeof(int) * (size_t)numel);
        int distinct = 0;
        for (int i0 = 0; i0 < n0; i0++)
            for (int i1 = 0; i1 < n1; i1++) {
                int64_t off[AP_MAX_DIMS] = {0}, ext[AP_MAX_DIMS] = {0};
                CHECK(ap_spec_tile(m, s, full, i0, i1, off, ext) == AUTOPAR_OK);
                int dev = i0 * n1 + i1, seen = 0;
                for (int d = 0; d < full->ndim; d++) CHECK(ext[d] == local.dim[d]);
                for (int e = 0; e < dev && !seen; e++)
                    if (memcmp(&offs[e * AP_MAX_DIMS], off, sizeof off) == 0) seen = 1;
                memcpy(&offs[dev * AP_MAX_DIMS], off, sizeof off);
                distinct += !seen;
                /* Mark every element of the tile (row-major index over the full shape). */
                int64_t idx[AP_MAX_DIMS] = {0}, count = ap_shape_numel(&local);
                for (int64_t k = 0; k < count; k++) {
                    int64_t flat = 0;
                    for (int d = 0; d < full->ndim; d++) flat = flat * full->dim[d] + off[d] + idx[d];
                    cover[flat]++;
                    for (int d = full->ndim - 1; d >= 0; d--) {
                        if (++idx[d] < ext[d]) break;
                        idx[d] = 0;
                    }
                }
            }
        int64_t tiles = ap_spec_num_tiles(m, s);
        int replicas = (int)(m->n_devices / tiles);
        CHECK(distinct == tiles);
        int bad = 0;
        for (int64_t e = 0; e < numel; e++) bad += cover[e] != replicas;
        if (bad)
            fprintf(stderr, "  spec %s on %dx%d: %d elements not covered %d times\n",
                    ap_spec_str(s, buf, sizeof buf), n0, n1, bad, replicas);
        CHECK(bad == 0);
        double bytes = -1;
        CHECK(ap_spec_device_bytes(m, s, full, 4, &bytes) == AUTOPAR_OK);
        CHECK(bytes == 4.0 * (double)numel / (double)tiles);
    }
    free(cover);
    free(offs);
    ap_mesh_free(m);
}

static void test_local_shapes_and_tiles(void) {
    ap_mesh *m = NULL;
    CHECK(ap_mesh_new_custom(2, 4, (const double[]){0, 0}, (const double[]){0, 0}, &m) ==
          AUTOPAR_OK);
    if (m) {
        ap_shape full = shape2(64, 128), local;
        ap_spec s = spec("S0S1");
        CHECK(ap_spec_local_shape(m, &s, &full, &local) == AUTOPAR_OK);
        CHECK(local.ndim == 2 && local.dim[0] == 32 && local.dim[1] == 32);
        s = spec("S01R");
        CHECK(ap_spec_local_shape(m, &s, &full, &local) == AUTOPAR_OK && local.dim[0] == 8 &&
              local.dim[1] == 128);
        s = spec("RS01");
        CHECK(ap_spec_local_shape(m, &s, &full, &local) == AUTOPAR_OK && local.dim[1] == 16);
        CHECK(ap_spec_num_tiles(m, &s) == 8);
        /* Device (1, 2) of S01: part 1*4+2 = 6 of 8 -> columns [96, 112). */
        int64_t off[2], ext[2];
        CHECK(ap_spec_tile(m, &s, &full, 1, 2, off, ext) == AUTOPAR_OK);
        CHECK(off[0] == 0 && ext[0] == 64 && off[1] == 96 && ext[1] == 16);
        CHECK(ap_spec_tile(m, &s, &full, 2, 0, off, ext) == AUTOPAR_ERR_INVALID_ARG);
        double bytes = 0;
        CHECK(ap_spec_parse("S0S1+P0", &s) == AUTOPAR_ERR_INVALID_ARG);
        s = spec("RS1+P0");
        CHECK(ap_spec_device_bytes(m, &s, &full, 4, &bytes) == AUTOPAR_OK && bytes == 8192.0);
        /* Rank mismatch. */
        s = spec("S0");
        CHECK(ap_spec_local_shape(m, &s, &full, &local) == AUTOPAR_ERR_INVALID_ARG);
    }
    ap_mesh_free(m);

    /* Non-divisible shapes are rejected with a message naming the dim. */
    CHECK(ap_mesh_new_custom(4, 1, (const double[]){0, 0}, (const double[]){0, 0}, &m) ==
          AUTOPAR_OK);
    if (m) {
        ap_shape full = shape2(6, 4), local;
        ap_spec s = spec("S0R");
        CHECK(ap_spec_local_shape(m, &s, &full, &local) == AUTOPAR_ERR_SHAPE);
        CHECK(strstr(autopar_last_error(), "dim 0") != NULL);
        s = spec("RS0");
        CHECK(ap_spec_local_shape(m, &s, &full, &local) == AUTOPAR_OK && local.dim[1] == 1);
    }
    ap_mesh_free(m);
    CHECK(ap_mesh_new_custom(2, 3, (const double[]){0, 0}, (const double[]){0, 0}, &m) ==
          AUTOPAR_OK);
    if (m) {
        ap_shape full = shape2(6, 4), local;
        ap_spec s = spec("RS01");
        CHECK(ap_spec_local_shape(m, &s, &full, &local) == AUTOPAR_ERR_SHAPE);
        CHECK(strstr(autopar_last_error(), "dim 1") != NULL);
    }
    ap_mesh_free(m);

    /* Brute-force partitions on every mesh and a few shapes. */
    static const int meshes[][2] = {{2, 2}, {1, 4}, {4, 1}, {2, 3}};
    const ap_shape shapes[] = {
        {.ndim = 0, .dim = {0}},
        {.ndim = 1, .dim = {12}},
        {.ndim = 2, .dim = {12, 24}},
        {.ndim = 2, .dim = {6, 4}},   /* many specs do not divide: exercised as errors */
        {.ndim = 3, .dim = {6, 12, 4}},
    };
    for (int i = 0; i < 4; i++)
        for (size_t j = 0; j < sizeof shapes / sizeof shapes[0]; j++)
            check_partition(meshes[i][0], meshes[i][1], &shapes[j]);
}

/* ------------------------------------------------------------------------------------------ */

/* Resharding of one tensor; returns the status, fills r. */
static ap_status reshard(const ap_mesh *m, const char *src, const char *dst, double bytes,
                         ap_reshard *r) {
    ap_spec a = spec(src), b = spec(dst);
    ap_shape full = shape2(64, 128);
    return ap_reshard_cost(m, &a, &b, a.ndim == 2 ? &full : NULL, bytes, r);
}

static void test_reshard_table(void) {
    /* Uniform mesh 2 x 4: alpha = 1e-5 s and beta = 1e-9 s/B on both axes (the flat axis gets the
     * same). Tensor [64, 128] float: M = 32768 bytes. On this mesh the table's routes are the
     * cheapest; each case lists the runner-up it must beat where one is close. */
    ap_mesh *m = NULL;
    CHECK(ap_mesh_new_custom(2, 4, (const double[]){1e-5, 1e-5}, (const double[]){1e-9, 1e-9},
                             &m) == AUTOPAR_OK);
    if (!m) return;
    const double M = 32768;
    ap_reshard r;

    /* Same spec, and only new splits: 0, nothing listed. */
    CHECK(reshard(m, "S0S1", "S0S1", M, &r) == AUTOPAR_OK && r.time == 0 && r.n_steps == 0);
    CHECK(reshard(m, "RR", "S0S1", M, &r) == AUTOPAR_OK && r.time == 0 && r.n_steps == 0);
    CHECK(reshard(m, "RR", "S01R", M, &r) == AUTOPAR_OK && r.time == 0 && r.n_steps == 0);
    CHECK(reshard(m, "S0R", "S01R", M, &r) == AUTOPAR_OK && r.time == 0 && r.n_steps == 0);
    CHECK(reshard(m, "RR+P0", "RS1+P0", M, &r) == AUTOPAR_OK && r.time == 0);

    /* S0R -> RR: all-gather(M, axis 0) = 1e-5 + 1/2 * 32768e-9 = 2.6384e-5
     * (gathering over the flat mesh after a slice: 1e-5 + 7/8 * 32768e-9 = 3.8672e-5). */
    CHECK(reshard(m, "S0R", "RR", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_ALL_GATHER && r.step[0].axis == AP_AXIS_0);
    CHECK_CLOSE(r.step[0].bytes, M);
    CHECK_CLOSE(r.time, 2.6384e-5);

    /* S0S1 -> S0R: all-gather(M/n0, axis 1) = 1e-5 + 3/4 * 16384e-9 = 2.2288e-5. */
    CHECK(reshard(m, "S0S1", "S0R", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_ALL_GATHER && r.step[0].axis == AP_AXIS_1);
    CHECK_CLOSE(r.step[0].bytes, M / 2);
    CHECK_CLOSE(r.time, 2.2288e-5);

    /* S0R -> RS0: all-to-all on axis 0. B is the group's total, n0 * (M/n0) = M (each device
     * sends (n0-1)/n0 of its M/n0): 1e-5 + 1/4 * 32768e-9 = 1.8192e-5. */
    CHECK(reshard(m, "S0R", "RS0", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_ALL_TO_ALL && r.step[0].axis == AP_AXIS_0);
    CHECK_CLOSE(r.step[0].bytes, M);
    CHECK_CLOSE(r.time, 1.8192e-5);

    /* S0S1 -> S01R: all-to-all on axis 1 over the axis-1 group's M/n0 bytes (each device holds
     * M/(n0*n1), the table's figure): 1e-5 + 3/16 * 16384e-9 = 1.3072e-5. */
    CHECK(reshard(m, "S0S1", "S01R", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_ALL_TO_ALL && r.step[0].axis == AP_AXIS_1);
    CHECK_CLOSE(r.step[0].bytes, M / 2);
    CHECK_CLOSE(r.time, 1.3072e-5);

    /* Partial -> R: all-reduce(M, axis 0) = 1e-5 + 2 * 1/2 * 32768e-9 = 4.2768e-5
     * (reduce-scatter + all-gather: 2 * 2.6384e-5 = 5.2768e-5). */
    CHECK(reshard(m, "RR+P0", "RR", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_ALL_REDUCE && r.step[0].axis == AP_AXIS_0);
    CHECK_CLOSE(r.step[0].bytes, M);
    CHECK_CLOSE(r.time, 4.2768e-5);
    /* ... over axis 1: 1e-5 + 2 * 3/4 * 32768e-9 = 5.9152e-5 (slice over axis 0, all-reduce
     * M/2 over axis 1, all-gather M over axis 0: 3.4576e-5 + 2.6384e-5 = 6.096e-5). */
    CHECK(reshard(m, "RR+P1", "RR", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_ALL_REDUCE && r.step[0].axis == AP_AXIS_1);
    CHECK_CLOSE(r.time, 5.9152e-5);

    /* Partial -> split on that axis: reduce-scatter(M, axis 0) = 1e-5 + 1/2 * 32768e-9. */
    CHECK(reshard(m, "RR+P0", "S0R", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_REDUCE_SCATTER && r.step[0].axis == AP_AXIS_0);
    CHECK_CLOSE(r.step[0].bytes, M);
    CHECK_CLOSE(r.time, 2.6384e-5);

    /* Partial over axis 1 -> split on axis 0: slice first (free, a slice of addends is an
     * addend of the slice), then all-reduce the M/2 shard over axis 1:
     * 1e-5 + 2 * 3/4 * 16384e-9 = 3.4576e-5. */
    CHECK(reshard(m, "RR+P1", "S0R", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_ALL_REDUCE && r.step[0].axis == AP_AXIS_1);
    CHECK(ap_spec_equal(&r.step[0].from, &(ap_spec){.ndim = 2, .dim = {AP_DIM_S0, AP_DIM_R},
                                                    .partial = AP_PARTIAL_1}));
    CHECK_CLOSE(r.step[0].bytes, M / 2);
    CHECK_CLOSE(r.time, 3.4576e-5);

    /* Partial over both axes -> R: one all-reduce over the flat mesh (n = 8),
     * 1e-5 + 2 * 7/8 * 32768e-9 = 6.7344e-5, beats AR(M, 0) + AR(M, 1) = 1.0192e-4 and the
     * hierarchical RS + AR + AG = 8.7296e-5. */
    CHECK(reshard(m, "RR+P01", "RR", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_ALL_REDUCE && r.step[0].axis == AP_AXIS_FLAT);
    CHECK_CLOSE(r.time, 6.7344e-5);

    /* S01R -> RR: one flat all-gather, 1e-5 + 7/8 * 32768e-9 = 3.8672e-5, beats per axis
     * AG(M/2, 1) + AG(M, 0) = 2.2288e-5 + 2.6384e-5 = 4.8672e-5. */
    CHECK(reshard(m, "S01R", "RR", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_ALL_GATHER && r.step[0].axis == AP_AXIS_FLAT);
    CHECK_CLOSE(r.time, 3.8672e-5);

    /* A dim moving to the other mesh axis: S0R -> S1R = all-gather(M, axis 0) + local slice,
     * 2.6384e-5 (the route through S0S1, all-gather M/4 over axis 0 and an all-to-all of M over
     * axis 1, costs 1.4096e-5 + 1.6144e-5 = 3.024e-5). */
    CHECK(reshard(m, "S0R", "S1R", M, &r) == AUTOPAR_OK && r.n_steps == 1);
    CHECK(r.step[0].kind == AP_COLL_ALL_GATHER && r.step[0].axis == AP_AXIS_0);
    CHECK_CLOSE(r.time, 2.6384e-5);

    /* Impossible: a pending sum cannot be created. Never a silent 0. */
    CHECK(reshard(m, "RR", "RR+P0", M, &r) == AUTOPAR_ERR_UNSUPPORTED);
    CHECK(strstr(autopar_last_error(), "partial") != NULL);
    CHECK(reshard(m, "RR+P1", "RR+P01", M, &r) == AUTOPAR_ERR_UNSUPPORTED);

    /* Bad arguments. */
    CHECK(reshard(m, "S0R", "S0", M, &r) == AUTOPAR_ERR_INVALID_ARG);
    CHECK(reshard(m, "S0R", "RR", -1, &r) == AUTOPAR_ERR_INVALID_ARG);
    {
        ap_spec a = spec("S01R"), b = spec("RR");
        ap_shape bad = shape2(12, 8);   /* 12 is not divisible by 8 */
        CHECK(ap_reshard_cost(m, &a, &b, &bad, 384, &r) == AUTOPAR_ERR_SHAPE);
    }
    ap_mesh_free(m);

    /* Skewed mesh 2 x 4: axis 0 slow (alpha 1e-5, beta 1e-9), axis 1 fast (2e-6, 1e-10), as
     * hosts x GPUs. The search then finds hierarchical routes that move less over axis 0. */
    CHECK(ap_mesh_new_custom(2, 4, (const double[]){1e-5, 2e-6}, (const double[]){1e-9, 1e-10},
                             &m) == AUTOPAR_OK);
    if (m) {
        /* S0R -> RR: slice dim 1 over axis 1 (free), all-gather M/4 over axis 0, all-gather M
         * over axis 1: (1e-5 + 1/2 * 8192e-9) + (2e-6 + 3/4 * 32768e-10)
         * = 1.4096e-5 + 4.4576e-6 = 1.85536e-5 < the direct all-gather 2.6384e-5. */
        CHECK(reshard(m, "S0R", "RR", M, &r) == AUTOPAR_OK && r.n_steps == 2);
        CHECK(r.step[0].kind == AP_COLL_ALL_GATHER && r.step[0].axis == AP_AXIS_0);
        CHECK_CLOSE(r.step[0].bytes, M / 4);
        CHECK(r.step[1].kind == AP_COLL_ALL_GATHER && r.step[1].axis == AP_AXIS_1);
        CHECK_CLOSE(r.time, 1.85536e-5);
        /* Partial over both axes -> R: reduce-scatter over the fast axis, all-reduce the
         * quarter over the slow one, all-gather over the fast one:
         *   (2e-6 + 3/4*32768e-10) + (1e-5 + 2*1/2*8192e-9) + (2e-6 + 3/4*32768e-10)
         *   = 4.4576e-6 + 1.8192e-5 + 4.4576e-6 = 2.71072e-5
         * against AR(M, 0) + AR(M, 1) = 4.96832e-5 and a flat AR = 6.7344e-5. */
        CHECK(reshard(m, "RR+P01", "RR", M, &r) == AUTOPAR_OK && r.n_steps == 3);
        CHECK_CLOSE(r.time, 2.71072e-5);
        CHECK(r.step[0].kind == AP_COLL_REDUCE_SCATTER && r.step[0].axis == AP_AXIS_1);
        CHECK(r.step[1].kind == AP_COLL_ALL_REDUCE && r.step[1].axis == AP_AXIS_0);
        CHECK(r.step[2].kind == AP_COLL_ALL_GATHER && r.step[2].axis == AP_AXIS_1);
        CHECK_CLOSE(r.step[1].bytes, M / 4);
        ap_reshard_print(&r, stdout);
    }
    ap_mesh_free(m);

    /* On a (1, 4) mesh a sum over axis 0 is already complete: RR -> RR+P0 is free. */
    CHECK(ap_mesh_new_custom(1, 4, (const double[]){1e-5, 1e-5}, (const double[]){1e-9, 1e-9},
                             &m) == AUTOPAR_OK);
    if (m) {
        CHECK(reshard(m, "RR", "RR+P0", M, &r) == AUTOPAR_OK && r.time == 0);
        /* Gathering over the size-1 axis moves nothing and lists nothing. */
        CHECK(reshard(m, "S0R", "RR", M, &r) == AUTOPAR_OK && r.time == 0 && r.n_steps == 0);
    }
    ap_mesh_free(m);
}

/* ------------------------------------------------------------------------------------------ */
/* Properties over every pair of specs                                                         */
/* ------------------------------------------------------------------------------------------ */

/* True when b is a by reached local slicing only: same partial flags and each dim's split axes
 * in a are a prefix of those in b (R < S0 < S01, R < S1). */
static int is_refinement(const ap_spec *a, const ap_spec *b) {
    if (a->partial != b->partial || a->ndim != b->ndim) return 0;
    for (int d = 0; d < a->ndim; d++) {
        uint8_t x = a->dim[d], y = b->dim[d];
        int ok = x == y || x == AP_DIM_R || (x == AP_DIM_S0 && y == AP_DIM_S01);
        if (!ok) return 0;
    }
    return 1;
}

/* Whether the device at flat index e belongs to the group of device dev along axis. */
static int same_group(const ap_mesh *m, ap_mesh_axis axis, int dev, int e) {
    int n1 = m->shape[1];
    if (axis == AP_AXIS_0) return dev % n1 == e % n1;
    if (axis == AP_AXIS_1) return dev / n1 == e / n1;
    return 1;
}

/* Count, for the group of device dev, how often each element is held under spec s. */
static void group_cover(const ap_mesh *m, const ap_spec *s, const ap_shape *full,
                        ap_mesh_axis axis, int dev, int *cover) {
    memset(cover, 0, sizeof(int) * (size_t)ap_shape_numel(full));
    for (int e = 0; e < m->n_devices; e++) {
        if (!same_group(m, axis, dev, e)) continue;
        int64_t off[2] = {0}, ext[2] = {0};
        ap_spec_tile(m, s, full, e / m->shape[1], e % m->shape[1], off, ext);
        for (int64_t i = off[0]; i < off[0] + ext[0]; i++)
            for (int64_t j = off[1]; j < off[1] + ext[1]; j++) cover[i * full->dim[1] + j]++;
    }
}

/* Checks that one step is a well-formed collective of its kind: flags and sizes, and on the
 * element level that the group's tiles before and after relate as the collective does:
 *   all-gather: my new tile = disjoint union of the group's old tiles;
 *   all-to-all: the group's old tiles and new tiles are both exact partitions of one region;
 *   all-reduce: tiles unchanged, the axis's partial flag cleared;
 *   reduce-scatter: the group's old tiles are one region, its new tiles partition it. */
static int check_step(const ap_mesh *m, const ap_shape *full, double full_bytes,
                      const ap_collective *c) {
    int ok = 1;
    int n = ap_mesh_axis_size(m, c->axis);
    int64_t t_from = ap_spec_num_tiles(m, &c->from), t_to = ap_spec_num_tiles(m, &c->to);
    double shard = full_bytes / (double)t_from;
    unsigned axis_bits = c->axis == AP_AXIS_FLAT ? 3u : 1u << c->axis;
    ok &= n > 1;
    ok &= close_to(c->time, ap_mesh_collective_time(m, c->kind, c->axis, c->bytes));
    switch (c->kind) {
    case AP_COLL_ALL_GATHER:
        ok &= t_to * n == t_from && c->to.partial == c->from.partial;
        ok &= close_to(c->bytes, shard * n);
        break;
    case AP_COLL_ALL_TO_ALL:
        ok &= t_to == t_from && c->to.partial == c->from.partial;
        ok &= close_to(c->bytes, shard * n);
        break;
    case AP_COLL_ALL_REDUCE:
        ok &= memcmp(c->from.dim, c->to.dim, sizeof c->from.dim) == 0;
        ok &= t_to == t_from && (c->from.partial & axis_bits) == axis_bits;
        ok &= c->to.partial == (c->from.partial & ~axis_bits);
        ok &= close_to(c->bytes, shard);
        break;
    case AP_COLL_REDUCE_SCATTER:
        ok &= t_to == t_from * n && (c->from.partial & axis_bits) == axis_bits;
        ok &= c->to.partial == (c->from.partial & ~axis_bits);
        ok &= close_to(c->bytes, shard);
        break;
    default: ok = 0;
    }
    if (!ok) return 0;

    int64_t numel = ap_shape_numel(full);
    int *before = malloc(sizeof(int) * (size_t)numel), *after = malloc(sizeof(int) * (size_t)numel);
    if (!before || !after) {
        free(before);
        free(after);
        return 0;
    }
    for (int dev = 0; dev < m->n_devices && ok; dev++) {
        group_cover(m, &c->from, full, c->axis, dev, before);
        group_cover(m, &c->to, full, c->axis, dev, after);
        int64_t off[2], ext[2];
        ap_spec_tile(m, &c->to, full, dev / m->shape[1], dev % m->shape[1], off, ext);
        for (int64_t e = 0; e < numel && ok; e++) {
            int64_t i = e / full->dim[1], j = e % full->dim[1];
            int mine = i >= off[0] && i < off[0] + ext[0] && j >= off[1] && j < off[1] + ext[1];
            switch (c->kind) {
            case AP_COLL_ALL_GATHER: ok &= before[e] == (mine ? 1 : 0); break;
            case AP_COLL_ALL_TO_ALL: ok &= before[e] <= 1 && before[e] == after[e]; break;
            case AP_COLL_ALL_REDUCE:   /* every member holds my tile, before and after */
                ok &= before[e] == (mine ? n : 0) && after[e] == before[e];
                break;
            case AP_COLL_REDUCE_SCATTER:   /* one common tile, cut into n new ones; mine in it */
                ok &= (before[e] == 0 || before[e] == n) && after[e] == (before[e] ? 1 : 0);
                ok &= !mine || before[e] == n;
                break;
            default: break;
            }
        }
    }
    free(before);
    free(after);
    return ok;
}

static void check_all_pairs(int n0, int n1) {
    ap_mesh *m = NULL;
    CHECK(ap_mesh_new_custom(n0, n1, (const double[]){3e-6, 1e-6}, (const double[]){2e-9, 1e-10},
                             &m) == AUTOPAR_OK);
    if (!m) return;
    const ap_shape full = shape2(12, 24);
    const double bytes = 4.0 * 12 * 24;
    ap_spec specs[64];
    int n = all_specs(2, specs, 64);
    double *cost = malloc(sizeof(double) * (size_t)n * (size_t)n);
    CHECK(cost != NULL);
    int bad_steps = 0;
    for (int a = 0; a < n && cost; a++)
        for (int b = 0; b < n; b++) {
            ap_reshard r;
            ap_status st = ap_reshard_cost(m, &specs[a], &specs[b], &full, bytes, &r);
            cost[a * n + b] = -1;
            char sa[AP_SPEC_STR_MAX], sb[AP_SPEC_STR_MAX];
            ap_spec_str(&specs[a], sa, sizeof sa);
            ap_spec_str(&specs[b], sb, sizeof sb);
            unsigned big = (n0 > 1 ? 1u : 0u) | (n1 > 1 ? 2u : 0u);
            int creates = (specs[b].partial & ~specs[a].partial & big) != 0;
            if (creates) {
                CHECK(st == AUTOPAR_ERR_UNSUPPORTED);
                continue;
            }
            CHECK(st == AUTOPAR_OK);
            if (st != AUTOPAR_OK) {
                fprintf(stderr, "  %s -> %s: %s\n", sa, sb, autopar_last_error());
                continue;
            }
            cost[a * n + b] = r.time;
            /* Free exactly when it is pure slicing (every axis here has size > 1). */
            /* Collectives over a size-1 axis are free and unlisted, so the slicing-only chain
             * checks apply when both axes have several devices. */
            int strict = n0 > 1 && n1 > 1;
            if (strict) CHECK((r.time == 0) == is_refinement(&specs[a], &specs[b]));
            /* The chain: src -(slices)-> step0.from, step0.to -(slices)-> step1.from, ... */
            ap_spec prev = specs[a];
            double sum = 0;
            for (int k = 0; k < r.n_steps; k++) {
                const ap_collective *c = &r.step[k];
                int ok = (!strict || is_refinement(&prev, &c->from)) &&
                         check_step(m, &full, bytes, c);
                if (!ok) {
                    char f[AP_SPEC_STR_MAX], t[AP_SPEC_STR_MAX];
                    fprintf(stderr, "  %s -> %s: bad step %d %s on axis %d: %s -> %s\n", sa, sb,
                            k, ap_coll_kind_name(c->kind), (int)c->axis,
                            ap_spec_str(&c->from, f, sizeof f), ap_spec_str(&c->to, t, sizeof t));
                    bad_steps++;
                }
                sum += c->time;
                prev = c->to;
            }
            CHECK(!strict || is_refinement(&prev, &specs[b]));
            CHECK_CLOSE(sum, r.time);
        }
    CHECK(bad_steps == 0);
    /* Shortest paths obey the triangle inequality. */
    int violations = 0;
    for (int a = 0; a < n && cost; a++)
        for (int b = 0; b < n; b++)
            for (int c = 0; c < n; c++) {
                double ab = cost[a * n + b], bc = cost[b * n + c], ac = cost[a * n + c];
                if (ab < 0 || bc < 0) continue;
                if (ac < 0 || ac > (ab + bc) * (1 + 1e-9) + 1e-18) violations++;
            }
    CHECK(violations == 0);
    free(cost);
    ap_mesh_free(m);
}

static void test_reshard_properties(void) {
    check_all_pairs(2, 2);
    check_all_pairs(2, 3);
    check_all_pairs(3, 2);
    check_all_pairs(1, 4);
    check_all_pairs(4, 1);
}

/* Costs with a mesh built from a cluster: 2 x p3.16xlarge, mesh 2 x 8. */
static void test_cluster_mesh_costs(void) {
    autopar_cluster *p3 = NULL;
    ap_mesh *m = NULL;
    CHECK(autopar_cluster_preset("p3.16xlarge", 2, 8, &p3) == AUTOPAR_OK);
    CHECK(p3 && ap_mesh_new(p3, 2, 8, NULL, &m) == AUTOPAR_OK);
    if (m) {
        /* All-reduce of 1 GB over axis 0 (2 hosts, 8 groups sharing 3.125 GB/s per host):
         * 50e-6 + 2 * 1/2 * 1e9 * 8 / 3.125e9 = 50e-6 + 2.56 s. Over axis 1 (8 GPUs, NVLink):
         * 10e-6 + 2 * 7/8 * 1e9 / 150e9 = 10e-6 + 0.0116667 s. */
        CHECK_CLOSE(ap_mesh_collective_time(m, AP_COLL_ALL_REDUCE, AP_AXIS_0, 1e9),
                    50e-6 + 2.56);
        CHECK_CLOSE(ap_mesh_collective_time(m, AP_COLL_ALL_REDUCE, AP_AXIS_1, 1e9),
                    10e-6 + 1.75e9 / 150e9);
    }
    ap_mesh_free(m);
    autopar_cluster_free(p3);
}

int main(void) {
    test_collective_formulas();
    test_compute_time();
    test_spec_notation();
    test_local_shapes_and_tiles();
    test_reshard_table();
    test_reshard_properties();
    test_cluster_mesh_costs();
    if (g_failures) {
        fprintf(stderr, "test_cost_model: %d check(s) failed\n", g_failures);
        return 1;
    }
    printf("test_cost_model: all checks passed\n");
    return 0;
}
