/*
 * Cluster descriptions: presets, exact JSON round trip, every error case of the reader, the
 * example files in docs/clusters, and the per-axis links a mesh derives from a cluster.
 */
#include "autopar.h"
#include "check_cond.h"
#include "cluster.h"
#include "mesh.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Relative comparison for derived figures (products and quotients of the preset values). */
static int close_to(double a, double b) { return fabs(a - b) <= 1e-12 * fabs(b) + 1e-300; }

static int fields_equal(const autopar_cluster *a, const autopar_cluster *b) {
    return strcmp(a->name, b->name) == 0 && a->hosts == b->hosts &&
           a->devices_per_host == b->devices_per_host && a->device_memory == b->device_memory &&
           a->peak_flops_f32 == b->peak_flops_f32 && a->peak_flops_f16 == b->peak_flops_f16 &&
           a->memory_bandwidth == b->memory_bandwidth &&
           a->intra_host.bandwidth == b->intra_host.bandwidth &&
           a->intra_host.latency == b->intra_host.latency &&
           a->inter_host.bandwidth == b->inter_host.bandwidth &&
           a->inter_host.latency == b->inter_host.latency;
}

/* to_json -> from_json -> to_json must give the same bytes and the same fields. */
static void check_round_trip(const autopar_cluster *c) {
    char *j1 = NULL, *j2 = NULL;
    autopar_cluster *back = NULL;
    CHECK(autopar_cluster_to_json(c, &j1) == AUTOPAR_OK);
    if (!j1) return;
    CHECK(autopar_cluster_from_json(j1, &back) == AUTOPAR_OK);
    if (back) {
        CHECK(fields_equal(c, back));
        CHECK(autopar_cluster_to_json(back, &j2) == AUTOPAR_OK);
        if (j2) {
            CHECK(strcmp(j1, j2) == 0);
            if (strcmp(j1, j2) != 0) fprintf(stderr, "first:\n%s\nsecond:\n%s\n", j1, j2);
        }
    }
    free(j1);
    free(j2);
    autopar_cluster_free(back);
}

static void test_presets(void) {
    static const char *const names[] = {"p3.16xlarge", "dgx-h100", "cpu"};
    for (int i = 0; i < 3; i++) {
        autopar_cluster *c = NULL;
        CHECK(autopar_cluster_preset(names[i], 2, 8, &c) == AUTOPAR_OK);
        if (!c) continue;
        CHECK(autopar_cluster_hosts(c) == 2);
        CHECK(autopar_cluster_devices_per_host(c) == 8);
        CHECK(strcmp(c->name, names[i]) == 0);
        CHECK(ap_cluster_validate(c) == AUTOPAR_OK);

        FILE *f = tmpfile();
        CHECK(f != NULL);
        if (f) {
            autopar_cluster_print(c, f);
            char buf[2048] = "";
            rewind(f);
            size_t n = fread(buf, 1, sizeof buf - 1, f);
            buf[n] = '\0';
            fclose(f);
            CHECK(strstr(buf, names[i]) != NULL);
            CHECK(strstr(buf, "2 hosts x 8 devices = 16 devices") != NULL);
        }
        autopar_cluster_print(c, stdout);
        check_round_trip(c);
        autopar_cluster_free(c);
    }

    /* The figures the brief and hardware notes give. */
    autopar_cluster *p3 = NULL, *h100 = NULL;
    CHECK(autopar_cluster_preset("p3.16xlarge", 8, 8, &p3) == AUTOPAR_OK);
    CHECK(autopar_cluster_preset("dgx-h100", 1, 8, &h100) == AUTOPAR_OK);
    if (p3 && h100) {
        CHECK(p3->device_memory == 16LL << 30);
        CHECK(p3->peak_flops_f32 == 15.7e12 && p3->peak_flops_f16 == 125e12);
        CHECK(p3->memory_bandwidth == 900e9);
        CHECK(p3->intra_host.bandwidth == 150e9);
        CHECK(p3->inter_host.bandwidth == 3.125e9);
        CHECK(h100->device_memory == 80LL << 30);
        CHECK(h100->peak_flops_f32 == 66.9e12 && h100->peak_flops_f16 == 989.4e12);
        CHECK(h100->memory_bandwidth == 3.35e12);
        CHECK(h100->intra_host.bandwidth == 370e9 && h100->inter_host.bandwidth == 370e9);
    }
    autopar_cluster_free(p3);
    autopar_cluster_free(h100);

    /* Unknown preset: NOT_FOUND and the message lists the known names. */
    autopar_cluster *c = (autopar_cluster *)&g_failures;   /* must be reset to NULL */
    CHECK(autopar_cluster_preset("tpu-v4", 1, 8, &c) == AUTOPAR_ERR_NOT_FOUND);
    CHECK(c == NULL);
    CHECK(strstr(autopar_last_error(), "tpu-v4") != NULL);
    CHECK(strstr(autopar_last_error(), "p3.16xlarge") != NULL);
    CHECK(strstr(autopar_last_error(), "dgx-h100") != NULL);
    CHECK(strstr(autopar_last_error(), "'cpu'") != NULL);

    CHECK(autopar_cluster_preset("cpu", 0, 4, &c) == AUTOPAR_ERR_INVALID_ARG);
    CHECK(strstr(autopar_last_error(), "hosts") != NULL);
    CHECK(autopar_cluster_preset("cpu", 1, 0, &c) == AUTOPAR_ERR_INVALID_ARG);
    CHECK(strstr(autopar_last_error(), "devices_per_host") != NULL);
    CHECK(autopar_cluster_preset("p3.16xlarge", 1, 16, &c) == AUTOPAR_ERR_INVALID_ARG);
    CHECK(autopar_cluster_preset(NULL, 1, 1, &c) == AUTOPAR_ERR_INVALID_ARG);
    CHECK(autopar_cluster_preset("cpu", 1, 1, NULL) == AUTOPAR_ERR_INVALID_ARG);
    /* A CPU host may run any number of ranks. */
    CHECK(autopar_cluster_preset("cpu", 1, 64, &c) == AUTOPAR_OK);
    autopar_cluster_free(c);
    autopar_cluster_free(NULL);
    CHECK(autopar_cluster_hosts(NULL) == 0 && autopar_cluster_devices_per_host(NULL) == 0);
}

/* A valid document with awkward numbers, assembled from parts so each error case below can
 * change exactly one thing. */
#define DOC_HEAD "{\"name\": \"lab \\\"A\\\"\", "
#define DOC_HOSTS "\"hosts\": 3, "
#define DOC_DPH "\"devices_per_host\": 5, "
#define DOC_DEVICE                                                                      \
    "\"device\": {\"memory_bytes\": 12345678901, \"peak_flops_f32\": 0.30000000000000004," \
    " \"peak_flops_f16\": 3.3333333333333335e13, \"memory_bandwidth\": 123456789.123}, "
#define DOC_INTRA "\"intra_host\": {\"bandwidth\": 1e10, \"latency\": 0}, "
#define DOC_INTER "\"inter_host\": {\"bandwidth\": 7.000000000000001e8, \"latency\": 1.1e-7}}"

static void test_round_trip(void) {
    const char *doc = DOC_HEAD DOC_HOSTS DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER;
    autopar_cluster *c = NULL;
    CHECK(autopar_cluster_from_json(doc, &c) == AUTOPAR_OK);
    if (!c) {
        fprintf(stderr, "%s\n", autopar_last_error());
        return;
    }
    CHECK(strcmp(c->name, "lab \"A\"") == 0);
    CHECK(c->hosts == 3 && c->devices_per_host == 5);
    CHECK(c->device_memory == 12345678901LL);
    CHECK(c->peak_flops_f32 == 0.1 + 0.2);   /* the value cJSON's printer would round to 0.3 */
    CHECK(c->peak_flops_f16 == 3.3333333333333335e13);
    CHECK(c->intra_host.latency == 0.0);
    CHECK(c->inter_host.latency == 1.1e-7);
    check_round_trip(c);
    autopar_cluster_free(c);

    /* version and name are optional. */
    const char *bare = "{" DOC_HOSTS DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER;
    CHECK(autopar_cluster_from_json(bare, &c) == AUTOPAR_OK);
    if (c) {
        CHECK(strcmp(c->name, "custom") == 0);
        check_round_trip(c);
    }
    autopar_cluster_free(c);
}

/* Expects status `want` and a message containing every needle (NULL-terminated list). */
static void expect_error(const char *doc, autopar_status want, const char *n1, const char *n2) {
    autopar_cluster *c = (autopar_cluster *)&g_failures;
    autopar_status st = autopar_cluster_from_json(doc, &c);
    CHECK(st == want);
    CHECK(c == NULL);
    const char *msg = autopar_last_error();
    int ok = st == want && (!n1 || strstr(msg, n1)) && (!n2 || strstr(msg, n2));
    if (!ok)
        fprintf(stderr, "  document: %s\n  status %d (want %d), message: %s\n", doc, (int)st,
                (int)want, msg);
    CHECK(ok);
    if (st == AUTOPAR_OK) autopar_cluster_free(c);
}

static void test_errors(void) {
    /* Malformed JSON: PARSE with a position. */
    expect_error("{\"hosts\": 2,\n \"devices_per_host\": }", AUTOPAR_ERR_PARSE, "malformed",
                 "line 2");
    expect_error("", AUTOPAR_ERR_PARSE, "malformed", NULL);
    expect_error("[1, 2]", AUTOPAR_ERR_PARSE, "object", NULL);
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER " trailing",
                 AUTOPAR_ERR_PARSE, "malformed", NULL);

    /* Missing fields: PARSE naming the field, nested ones with their path. */
    expect_error(DOC_HEAD DOC_HOSTS DOC_DEVICE DOC_INTRA DOC_INTER, AUTOPAR_ERR_PARSE,
                 "cluster JSON: missing field 'devices_per_host'", NULL);
    expect_error(DOC_HEAD DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER, AUTOPAR_ERR_PARSE,
                 "missing field 'hosts'", NULL);
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH DOC_INTRA DOC_INTER, AUTOPAR_ERR_PARSE,
                 "missing field 'device'", NULL);
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH
                 "\"device\": {\"memory_bytes\": 1, \"peak_flops_f32\": 1, "
                 "\"memory_bandwidth\": 1}, " DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_PARSE, "missing field 'device.peak_flops_f16'", NULL);
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH DOC_DEVICE
                 "\"intra_host\": {\"bandwidth\": 1e10}, " DOC_INTER,
                 AUTOPAR_ERR_PARSE, "missing field 'intra_host.latency'", NULL);
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH DOC_DEVICE
                 "\"intra_host\": {\"bandwidth\": 1e10, \"latency\": 0}}",
                 AUTOPAR_ERR_PARSE, "missing field 'inter_host'", NULL);

    /* Unknown and duplicated fields. */
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH DOC_DEVICE DOC_INTRA
                 "\"inter_host\": {\"bandwidth\": 1, \"latency\": 1, \"bandwith\": 2}}",
                 AUTOPAR_ERR_PARSE, "unknown field 'inter_host.bandwith'", NULL);
    expect_error(DOC_HEAD DOC_HOSTS DOC_HOSTS DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_PARSE, "duplicate field 'hosts'", NULL);

    /* Zero devices, zero hosts: INVALID_ARG naming field and value. */
    expect_error(DOC_HEAD DOC_HOSTS "\"devices_per_host\": 0, " DOC_DEVICE DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'devices_per_host'", "got 0");
    expect_error(DOC_HEAD "\"hosts\": 0, " DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'hosts'", "got 0");
    expect_error(DOC_HEAD "\"hosts\": -2, " DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'hosts'", "-2");
    expect_error(DOC_HEAD "\"hosts\": 2.5, " DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'hosts'", "integer");
    expect_error(DOC_HEAD "\"hosts\": 1e12, " DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'hosts'", NULL);
    expect_error(DOC_HEAD "\"hosts\": 2000, \"devices_per_host\": 2000, " DOC_DEVICE DOC_INTRA
                 DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'devices_per_host'", "limit");

    /* Negative bandwidth and other bad values. */
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH DOC_DEVICE DOC_INTRA
                 "\"inter_host\": {\"bandwidth\": -5, \"latency\": 1e-5}}",
                 AUTOPAR_ERR_INVALID_ARG, "'inter_host.bandwidth'", "-5");
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH DOC_DEVICE
                 "\"intra_host\": {\"bandwidth\": 0, \"latency\": 1e-5}, " DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'intra_host.bandwidth'", "got 0");
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH DOC_DEVICE
                 "\"intra_host\": {\"bandwidth\": 1, \"latency\": -1e-6}, " DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'intra_host.latency'", "-9.99");
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH
                 "\"device\": {\"memory_bytes\": 0, \"peak_flops_f32\": 1, \"peak_flops_f16\": 1,"
                 " \"memory_bandwidth\": 1}, " DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'device.memory_bytes'", "got 0");
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH
                 "\"device\": {\"memory_bytes\": 1, \"peak_flops_f32\": -1, \"peak_flops_f16\": 1,"
                 " \"memory_bandwidth\": 1}, " DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'device.peak_flops_f32'", "-1");
    expect_error("{\"version\": 2, " DOC_HOSTS DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'version'", "2");
    expect_error("{\"name\": \"\", " DOC_HOSTS DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'name'", NULL);

    /* Wrong types: INVALID_ARG naming field and what was found. */
    expect_error(DOC_HEAD "\"hosts\": \"two\", " DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'hosts'", "string \"two\"");
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH DOC_DEVICE
                 "\"intra_host\": {\"bandwidth\": null, \"latency\": 1e-5}, " DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'intra_host.bandwidth'", "null");
    expect_error(DOC_HEAD DOC_HOSTS DOC_DPH "\"device\": 5, " DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'device'", "object");
    expect_error("{\"name\": 7, " DOC_HOSTS DOC_DPH DOC_DEVICE DOC_INTRA DOC_INTER,
                 AUTOPAR_ERR_INVALID_ARG, "'name'", "string");

    /* NULL arguments. */
    autopar_cluster *c = NULL;
    CHECK(autopar_cluster_from_json(NULL, &c) == AUTOPAR_ERR_INVALID_ARG);
    CHECK(autopar_cluster_from_json("{}", NULL) == AUTOPAR_ERR_INVALID_ARG);
    char *text = (char *)"x";
    CHECK(autopar_cluster_to_json(NULL, &text) == AUTOPAR_ERR_INVALID_ARG);
    CHECK(text == NULL);
}

static void test_files(void) {
    static const struct {
        const char *file, *preset;
        int hosts, dph;
    } files[] = {
        {"/docs/clusters/p3.16xlarge-8x8.json", "p3.16xlarge", 8, 8},
        {"/docs/clusters/dgx-h100-2x8.json", "dgx-h100", 2, 8},
    };
    for (int i = 0; i < 2; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s%s", AUTOPAR_SOURCE_DIR, files[i].file);
        autopar_cluster *c = NULL, *p = NULL;
        CHECK(autopar_cluster_load(path, &c) == AUTOPAR_OK);
        CHECK(autopar_cluster_preset(files[i].preset, files[i].hosts, files[i].dph, &p) ==
              AUTOPAR_OK);
        if (!c || !p) {
            fprintf(stderr, "  %s: %s\n", path, autopar_last_error());
        } else {
            CHECK(fields_equal(c, p));
            /* The file is exactly what to_json writes for the preset: regenerate it from the
             * preset when the preset changes. */
            char *json = NULL;
            CHECK(autopar_cluster_to_json(p, &json) == AUTOPAR_OK);
            FILE *f = fopen(path, "rb");
            char buf[4096] = "";
            if (f) {
                size_t n = fread(buf, 1, sizeof buf - 1, f);
                buf[n] = '\0';
                fclose(f);
            }
            CHECK(json && strcmp(json, buf) == 0);
            free(json);
        }
        autopar_cluster_free(c);
        autopar_cluster_free(p);
    }

    autopar_cluster *c = (autopar_cluster *)&g_failures;
    CHECK(autopar_cluster_load("/nonexistent/dir/cluster.json", &c) == AUTOPAR_ERR_IO);
    CHECK(c == NULL);
    CHECK(strstr(autopar_last_error(), "/nonexistent/dir/cluster.json") != NULL);

    /* A file with a bad field: the message carries the path and the field. The file goes to
     * the working directory (the build tree under CTest). */
    const char *path = "test_cluster_tmp.json";
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f) {
        fputs(DOC_HEAD DOC_HOSTS "\"devices_per_host\": 0, " DOC_DEVICE DOC_INTRA DOC_INTER, f);
        fclose(f);
        CHECK(autopar_cluster_load(path, &c) == AUTOPAR_ERR_INVALID_ARG);
        CHECK(strstr(autopar_last_error(), path) != NULL);
        CHECK(strstr(autopar_last_error(), "'devices_per_host'") != NULL);
        remove(path);
    }
}

/* Per-axis links: rules of ap_mesh_new (mesh.h). */
static void test_mesh_links(void) {
    autopar_cluster *p3 = NULL;
    CHECK(autopar_cluster_preset("p3.16xlarge", 2, 8, &p3) == AUTOPAR_OK);
    if (!p3) return;
    const double intra = 1.0 / 150e9, inter = 1.0 / 3.125e9;
    ap_mesh *m = NULL;

    /* 2 x 8 over both hosts: axis 0 = 8 groups {j, 8+j}, each crossing hosts, all 8 sharing
     * each host's NIC: beta = 8 / 3.125e9. Axis 1 stays in a host. The whole mesh is one group:
     * k = 1, the NIC is the bottleneck. */
    CHECK(ap_mesh_new(p3, 2, 8, NULL, &m) == AUTOPAR_OK);
    if (m) {
        CHECK(close_to(m->beta[AP_AXIS_0], 8 * inter) && m->alpha[AP_AXIS_0] == 50e-6);
        CHECK(m->crosses_hosts[AP_AXIS_0] && !m->crosses_hosts[AP_AXIS_1]);
        CHECK(close_to(m->beta[AP_AXIS_1], intra) && m->alpha[AP_AXIS_1] == 10e-6);
        CHECK(close_to(m->beta[AP_AXIS_FLAT], inter) && m->alpha[AP_AXIS_FLAT] == 50e-6);
        CHECK(ap_mesh_device_at(m, 1, 3) == 11);
        int i0 = -1, i1 = -1;
        CHECK(ap_mesh_coord_of(m, 11, &i0, &i1) == AUTOPAR_OK && i0 == 1 && i1 == 3);
        CHECK(ap_mesh_coord_of(m, 99, &i0, &i1) == AUTOPAR_ERR_NOT_FOUND);
        ap_mesh_print(m, stdout);
    }
    ap_mesh_free(m);

    /* 4 x 4 over 2 hosts: columns {j, 4+j, 8+j, 12+j} have two members per host (intra link
     * used) and 4 of them cross from each host: beta = max(intra, 4 / 3.125e9). */
    CHECK(ap_mesh_new(p3, 4, 4, NULL, &m) == AUTOPAR_OK);
    if (m) {
        CHECK(close_to(m->beta[AP_AXIS_0], 4 * inter));
        CHECK(close_to(m->beta[AP_AXIS_1], intra));
    }
    ap_mesh_free(m);

    /* 2 x 1 on one GPU per host gets the host's whole NIC. */
    CHECK(ap_mesh_new(p3, 2, 1, (const int[]){0, 8}, &m) == AUTOPAR_OK);
    if (m) {
        CHECK(close_to(m->beta[AP_AXIS_0], inter));
        CHECK(m->beta[AP_AXIS_1] == 0 && m->alpha[AP_AXIS_1] == 0);   /* size-1 axis */
    }
    ap_mesh_free(m);

    /* A block: host 1, devices 4..7, viewed 2 x 2: all intra-host. */
    CHECK(ap_mesh_new_block(p3, 1, 1, 4, 4, 2, 2, &m) == AUTOPAR_OK);
    if (m) {
        CHECK(m->devices[0] == 12 && m->devices[3] == 15);
        CHECK(close_to(m->beta[AP_AXIS_0], intra) && close_to(m->beta[AP_AXIS_1], intra));
        CHECK(!m->crosses_hosts[AP_AXIS_FLAT]);
    }
    ap_mesh_free(m);

    /* Errors. */
    m = (ap_mesh *)&g_failures;
    CHECK(ap_mesh_new(p3, 0, 4, NULL, &m) == AUTOPAR_ERR_INVALID_ARG && m == NULL);
    CHECK(ap_mesh_new(p3, 4, 8, NULL, &m) == AUTOPAR_ERR_INVALID_ARG);   /* 32 > 16 devices */
    CHECK(ap_mesh_new(p3, 2, 1, (const int[]){3, 3}, &m) == AUTOPAR_ERR_INVALID_ARG);
    CHECK(strstr(autopar_last_error(), "twice") != NULL);
    CHECK(ap_mesh_new(p3, 2, 1, (const int[]){3, 16}, &m) == AUTOPAR_ERR_INVALID_ARG);
    CHECK(ap_mesh_new_block(p3, 1, 2, 0, 8, 2, 8, &m) == AUTOPAR_ERR_INVALID_ARG);
    CHECK(ap_mesh_new_block(p3, 0, 2, 0, 8, 4, 8, &m) == AUTOPAR_ERR_INVALID_ARG);
    autopar_cluster_free(p3);
}

int main(void) {
    test_presets();
    test_round_trip();
    test_errors();
    test_files();
    test_mesh_links();
    if (g_failures) {
        fprintf(stderr, "test_cluster: %d check(s) failed\n", g_failures);
        return 1;
    }
    printf("test_cluster: all checks passed\n");
    return 0;
}
