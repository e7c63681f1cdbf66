/*
 * The inter-operator pass end to end (autopar_parallelize, include/autopar.h section 7):
 *   (a) automatic layers through the entry point: L = K blocks gives one block per layer,
 *       L = K/2 two, with backward and optimizer nodes following their forward layer;
 *   (b) Alpa's insight on a 2 hosts x 4 devices cluster with a fast intra-host and a slow
 *       inter-host link: a model whose state does not fit one host under the memory budget is
 *       pipelined across the hosts with intra-operator parallelism inside each; a small model
 *       with a large batch is trained data parallel in one stage;
 *   (c) the manual stage option reproduces the stages given; invalid manual stages are
 *       rejected with messages naming the problem; uniform stages; single-stage methods;
 *   (d) plans round-trip through JSON exactly (text and fields), also through files;
 *   (e) errors: NULL arguments, a graph without backward or optimizer, bad options, a memory
 *       budget nothing fits (naming the budget needed).
 * Small models and meshes keep the whole test to a few seconds.
 */
#include "autopar.h"
#include "check.h"
#include "internal.h"
#include "models.h"
#include "plan.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 2 hosts x 4 devices: 100 GB/s inside a host, 1 GB/s between hosts. */
static autopar_cluster *cluster_2x4(double memory) {
    char buf[1024];
    snprintf(buf, sizeof buf,
             "{\"name\": \"test-2x4\", \"hosts\": 2, \"devices_per_host\": 4, \"device\": "
             "{\"memory_bytes\": %.0f, \"peak_flops_f32\": 1e13, \"peak_flops_f16\": 1e14, "
             "\"memory_bandwidth\": 1e12}, \"intra_host\": {\"bandwidth\": 1e11, \"latency\": "
             "1e-6}, \"inter_host\": {\"bandwidth\": 1e9, \"latency\": 1e-5}}",
             memory);
    autopar_cluster *c = NULL;
    autopar_status st = autopar_cluster_from_json(buf, &c);
    CHECK(st == AUTOPAR_OK, "cluster: %s", autopar_last_error());
    return c;
}

/* A GPT training graph (AdamW). */
static autopar_graph *gpt(int K, int64_t hidden, int64_t seq, int64_t batch, int64_t vocab,
                          int mark_layers) {
    gpt_config c = {.layers = K, .hidden = hidden, .heads = 4, .seq = seq, .vocab = vocab,
                    .batch = batch, .mark_layers = mark_layers};
    autopar_graph *g = NULL;
    autopar_tensor *loss = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    if (autopar_graph_new(&g) != AUTOPAR_OK || model_gpt_build(g, &c, &loss) != AUTOPAR_OK ||
        autopar_build_training(g, loss, &o) != AUTOPAR_OK) {
        CHECK(0, "gpt: %s", autopar_last_error());
        autopar_graph_free(g);
        return NULL;
    }
    return g;
}

static int layer_of(const autopar_graph *g, const char *name) {
    const autopar_tensor *t = autopar_graph_find(g, name);
    return t ? autopar_tensor_layer(t) : -100;
}

/* Every stage's figures are finite, its memory within the budget, its devices distinct, and
 * the stages together use every device once and cover the layers in order. */
static void check_plan_sane(const autopar_plan *p, const autopar_cluster *c, double budget,
                            const char *what) {
    int S = autopar_plan_num_stages(p), D = autopar_cluster_hosts(c) *
                                             autopar_cluster_devices_per_host(c);
    CHECK(S >= 1, "%s: %d stages", what, S);
    int *seen = calloc((size_t)D, sizeof(int));
    int next_layer = 0;
    for (int s = 0; s < S && seen; s++) {
        autopar_stage_info info;
        CHECK(autopar_plan_stage_info(p, s, &info) == AUTOPAR_OK, "%s", what);
        CHECK(info.first_layer == next_layer, "%s: stage %d starts at layer %d, expected %d", what,
              s, info.first_layer, next_layer);
        next_layer = info.last_layer + 1;
        CHECK(isfinite(info.forward_time) && info.forward_time > 0 &&
                  isfinite(info.backward_time) && info.backward_time > 0,
              "%s: stage %d times %g %g", what, s, info.forward_time, info.backward_time);
        CHECK(budget < 0 || info.memory_bytes <= budget, "%s: stage %d memory %g > budget %g",
              what, s, info.memory_bytes, budget);
        CHECK(info.mesh_shape[0] * info.mesh_shape[1] == info.n_devices &&
                  info.submesh_hosts * info.submesh_devices == info.n_devices,
              "%s: stage %d mesh %dx%d submesh %dx%d devices %d", what, s, info.mesh_shape[0],
              info.mesh_shape[1], info.submesh_hosts, info.submesh_devices, info.n_devices);
        int n;
        const int *dev = autopar_plan_stage_devices(p, s, &n);
        CHECK(dev && n == info.n_devices, "%s: stage %d device list", what, s);
        for (int i = 0; dev && i < n; i++) {
            CHECK(dev[i] >= 0 && dev[i] < D && !seen[dev[i]], "%s: device %d used twice", what,
                  dev[i]);
            if (dev[i] >= 0 && dev[i] < D) seen[dev[i]] = 1;
        }
        const int *nodes = autopar_plan_stage_nodes(p, s, &n);
        CHECK(nodes && n > 0, "%s: stage %d has no nodes", what, s);
        char *js = NULL;
        CHECK(autopar_plan_stage_sharding_json(p, s, &js) == AUTOPAR_OK && js,
              "%s: stage %d sharding JSON: %s", what, s, autopar_last_error());
        free(js);
    }
    CHECK(next_layer == autopar_plan_num_layers(p), "%s: stages end at layer %d of %d", what,
          next_layer, autopar_plan_num_layers(p));
    for (int d = 0; seen && d < D; d++) CHECK(seen[d], "%s: device %d unused", what, d);
    free(seen);
    autopar_plan_estimate e;
    CHECK(autopar_plan_get_estimate(p, &e) == AUTOPAR_OK, "%s", what);
    CHECK(e.step_time > 0 && isfinite(e.step_time), "%s: step time %g", what, e.step_time);
    double parts = e.compute + e.communication + e.grad_sync + e.apply + e.bubble;
    CHECK(fabs(parts - e.step_time) <= 1e-9 * e.step_time + 1e-15, "%s: breakdown %g != %g",
          what, parts, e.step_time);
    CHECK(e.simulated_step_time > 0, "%s: simulated %g", what, e.simulated_step_time);
}

/* ---- (a) layers ------------------------------------------------------------------------------ */

static void test_layers(void) {
    const int K = 4;
    autopar_graph *g = gpt(K, 64, 16, 4, 64, 0);
    autopar_cluster *c = NULL;
    CHECK(autopar_cluster_preset("cpu", 1, 2, &c) == AUTOPAR_OK, "%s", autopar_last_error());
    if (!g || !c) goto done;
    for (int L = K; L >= K / 2; L /= 2) {
        autopar_options o;
        autopar_options_default(&o);
        o.num_layers = L;
        o.num_micro_batches = 2;
        autopar_plan *p = NULL;
        autopar_status st = autopar_parallelize(g, c, &o, &p);
        CHECK(st == AUTOPAR_OK, "layers L=%d: %s", L, autopar_last_error());
        if (st) continue;
        CHECK(autopar_plan_num_layers(p) == L, "L=%d: plan has %d layers", L,
              autopar_plan_num_layers(p));
        const autopar_graph *pg = autopar_plan_graph(p);
        int per = K / L;
        for (int b = 0; b < K; b++) {
            char name[64];
            snprintf(name, sizeof name, "h%d.attn.qkv.w", b);
            int l = layer_of(pg, name);
            CHECK(l == b / per, "L=%d: %s in layer %d, expected %d", L, name, l, b / per);
            snprintf(name, sizeof name, "h%d.mlp.proj.w", b);
            CHECK(layer_of(pg, name) == b / per, "L=%d: %s in layer %d", L, name,
                  layer_of(pg, name));
            /* The gradient and the optimizer update follow the forward layer. */
            snprintf(name, sizeof name, "h%d.mlp.fc.w", b);
            const autopar_tensor *w = autopar_graph_find(pg, name);
            const autopar_tensor *gw = w ? autopar_grad(pg, w) : NULL;
            CHECK(gw && autopar_tensor_layer(gw) == b / per, "L=%d: gradient of %s", L, name);
            for (int i = 0; w && i < autopar_graph_size(pg); i++) {
                const ap_node *v = pg->nodes[i];
                if (v->assign_to >= 0 && pg->nodes[v->assign_to] == (const ap_node *)w)
                    CHECK(v->layer == b / per, "L=%d: update of %s in layer %d", L, name,
                          v->layer);
            }
        }
        /* The caller's graph keeps its own layers. */
        CHECK(layer_of(g, "h3.attn.qkv.w") == 0, "the input graph was modified");
        check_plan_sane(p, c, -1, "layers");
        autopar_plan_free(p);
    }
    /* Manual boundaries (one per block) are used when num_layers is 0. */
    autopar_graph *gm = gpt(K, 64, 16, 4, 64, 1);
    if (gm) {
        autopar_options o;
        autopar_options_default(&o);
        autopar_plan *p = NULL;
        CHECK(autopar_parallelize(gm, c, &o, &p) == AUTOPAR_OK, "manual layers: %s",
              autopar_last_error());
        CHECK(autopar_plan_num_layers(p) == K, "manual layers: %d", autopar_plan_num_layers(p));
        autopar_plan_free(p);
        autopar_graph_free(gm);
    }
done:
    autopar_graph_free(g);
    autopar_cluster_free(c);
}

/* ---- (b) Alpa's insight -------------------------------------------------------------------- */

static void test_insight(void) {
    /* A wide model and a small batch: its parameters, gradients and AdamW state need more than
     * a host's 4 devices can hold under a 200 MiB budget even perfectly sharded. */
    const double budget = 200.0 * 1024 * 1024;
    autopar_graph *g = gpt(4, 1024, 64, 8, 1024, 0);
    autopar_cluster *c = cluster_2x4(16e9);
    if (g && c) {
        autopar_options o;
        autopar_options_default(&o);
        o.num_micro_batches = 8;
        o.memory_budget = budget;
        autopar_plan *p = NULL;
        autopar_status st = autopar_parallelize(g, c, &o, &p);
        CHECK(st == AUTOPAR_OK, "big model: %s", autopar_last_error());
        if (!st) {
            double state = 0;
            for (int s = 0; s < p->n_stages; s++) {
                const ap_stage_cost *k = &p->stages[s].cost;
                state += (k->params + k->opt_state + k->grads) * p->stages[s].n_devices;
            }
            CHECK(state / 4 > budget, "the model's state (%g bytes) fits one host", state);
            CHECK(autopar_plan_num_stages(p) == 2, "big model: %d stages",
                  autopar_plan_num_stages(p));
            for (int s = 0; s < autopar_plan_num_stages(p); s++) {
                autopar_stage_info info;
                autopar_plan_stage_info(p, s, &info);
                CHECK(info.submesh_hosts == 1 && info.submesh_devices == 4,
                      "big model: stage %d on submesh %dx%d, expected one whole host", s,
                      info.submesh_hosts, info.submesh_devices);
                CHECK(info.host_begin == s, "big model: stage %d on host %d", s, info.host_begin);
            }
            check_plan_sane(p, c, budget, "big model");
            autopar_plan_print(p, stdout);
        }
        autopar_plan_free(p);
        /* A budget nothing fits names the budget needed. */
        o.memory_budget = 100.0 * 1024 * 1024;
        st = autopar_parallelize(g, c, &o, &p);
        CHECK(st == AUTOPAR_ERR_INFEASIBLE && !p, "tiny budget: status %d", st);
        CHECK(strstr(autopar_last_error(), "needs") && strstr(autopar_last_error(), "MiB"),
              "tiny budget message: %s", autopar_last_error());
        printf("tiny budget: %s\n", autopar_last_error());
    }
    autopar_graph_free(g);

    /* A small model and a large batch: data parallel over all 8 devices in one stage. */
    g = gpt(2, 256, 64, 256, 1024, 0);
    if (g && c) {
        autopar_options o;
        autopar_options_default(&o);
        o.num_micro_batches = 4;
        autopar_plan *p = NULL;
        autopar_status st = autopar_parallelize(g, c, &o, &p);
        CHECK(st == AUTOPAR_OK, "small model: %s", autopar_last_error());
        if (!st) {
            CHECK(autopar_plan_num_stages(p) == 1, "small model: %d stages",
                  autopar_plan_num_stages(p));
            autopar_stage_info info;
            autopar_plan_stage_info(p, 0, &info);
            CHECK(info.n_devices == 8 && info.mesh_shape[0] == 8 && info.mesh_shape[1] == 1 &&
                      info.force_batch_dim_to_axis0,
                  "small model: mesh %dx%d (batch forced %d), expected 8x1 data parallel",
                  info.mesh_shape[0], info.mesh_shape[1], info.force_batch_dim_to_axis0);
            /* Pure data parallelism: every parameter replicated, inputs split over the batch. */
            const ap_shard_plan *sp = p->stages[0].shard;
            const autopar_graph *pg = p->graph;
            for (int i = 0; i < pg->n_nodes; i++) {
                const ap_node *v = pg->nodes[i];
                if (v->kind == AUTOPAR_KIND_PARAM) {
                    char b[AP_SPEC_STR_MAX];
                    ap_spec r = ap_spec_replicated(v->shape.ndim);
                    CHECK(ap_spec_equal(&sp->node[i].spec, &r), "small model: %s is %s", v->name,
                          ap_spec_str(&sp->node[i].spec, b, sizeof b));
                }
            }
            check_plan_sane(p, c, -1, "small model");
        }
        autopar_plan_free(p);
    }
    autopar_graph_free(g);
    autopar_cluster_free(c);
}

/* ---- (c) manual and uniform stages, single-stage methods ------------------------------------ */

static autopar_status run_manual(const autopar_graph *g, const autopar_cluster *c,
                                 const autopar_manual_stage *st, int n, autopar_plan **p) {
    autopar_options o;
    autopar_options_default(&o);
    o.num_layers = 4;
    o.num_micro_batches = 4;
    o.stage_option = AUTOPAR_STAGE_MANUAL;
    o.num_manual_stages = n;
    o.manual_stages = st;
    return autopar_parallelize(g, c, &o, p);
}

static void expect_manual_error(const autopar_graph *g, const autopar_cluster *c,
                                const autopar_manual_stage *st, int n, const char *needle,
                                const char *what) {
    autopar_plan *p = NULL;
    autopar_status s = run_manual(g, c, st, n, &p);
    CHECK(s == AUTOPAR_ERR_INVALID_ARG && !p, "%s: status %d", what, s);
    CHECK(strstr(autopar_last_error(), needle), "%s: message '%s' lacks '%s'", what,
          autopar_last_error(), needle);
    autopar_plan_free(p);
}

static autopar_plan *g_manual_plan;   /* kept for the JSON test */

static void test_manual(void) {
    autopar_graph *g = gpt(4, 128, 32, 8, 256, 0);
    autopar_cluster *c = cluster_2x4(16e9);
    if (!g || !c) goto done;
    autopar_manual_stage ms[3] = {
        {.first_layer = 0, .last_layer = 0, .submesh_hosts = 1, .submesh_devices = 2,
         .mesh_dp = 2, .mesh_mp = 1, .force_batch_dim_to_axis0 = 1},
        {.first_layer = 1, .last_layer = 2, .submesh_hosts = 1, .submesh_devices = 2,
         .mesh_dp = 1, .mesh_mp = 2, .force_batch_dim_to_axis0 = 0},
        {.first_layer = 3, .last_layer = 3, .submesh_hosts = 1, .submesh_devices = 4,
         .mesh_dp = 0, .mesh_mp = 0, .force_batch_dim_to_axis0 = -1},
    };
    autopar_plan *p = NULL;
    autopar_status st = run_manual(g, c, ms, 3, &p);
    CHECK(st == AUTOPAR_OK, "manual: %s", autopar_last_error());
    if (!st) {
        CHECK(autopar_plan_num_stages(p) == 3, "manual: %d stages", autopar_plan_num_stages(p));
        for (int s = 0; s < 3 && s < autopar_plan_num_stages(p); s++) {
            autopar_stage_info info;
            autopar_plan_stage_info(p, s, &info);
            CHECK(info.first_layer == ms[s].first_layer && info.last_layer == ms[s].last_layer,
                  "manual stage %d: layers %d-%d", s, info.first_layer, info.last_layer);
            CHECK(info.submesh_hosts == ms[s].submesh_hosts &&
                      info.submesh_devices == ms[s].submesh_devices,
                  "manual stage %d: submesh %dx%d", s, info.submesh_hosts, info.submesh_devices);
            if (ms[s].mesh_dp)
                CHECK(info.mesh_shape[0] == ms[s].mesh_dp && info.mesh_shape[1] == ms[s].mesh_mp &&
                          info.force_batch_dim_to_axis0 == ms[s].force_batch_dim_to_axis0,
                      "manual stage %d: mesh %dx%d force %d", s, info.mesh_shape[0],
                      info.mesh_shape[1], info.force_batch_dim_to_axis0);
        }
        /* The whole-host stage is placed first (Alpa's placement), the (1, 2) pieces after. */
        autopar_stage_info last;
        autopar_plan_stage_info(p, 2, &last);
        CHECK(last.host_begin == 0 && last.device_begin == 0, "manual: stage 2 at host %d dev %d",
              last.host_begin, last.device_begin);
        check_plan_sane(p, c, -1, "manual");
        g_manual_plan = p;
    }

    /* Invalid manual stages. */
    autopar_manual_stage bad[3];
    memcpy(bad, ms, sizeof bad);
    bad[1].first_layer = 0;   /* overlaps stage 0 */
    expect_manual_error(g, c, bad, 3, "overlap", "overlapping ranges");
    memcpy(bad, ms, sizeof bad);
    bad[1].first_layer = 2;   /* layer 1 in no stage */
    expect_manual_error(g, c, bad, 3, "belong to no stage", "gap");
    memcpy(bad, ms, sizeof bad);
    bad[2].last_layer = 2;
    bad[2].first_layer = 3;   /* empty range */
    expect_manual_error(g, c, bad, 3, "empty", "empty range");
    memcpy(bad, ms, sizeof bad);
    bad[2].last_layer = 4;    /* no layer 4 */
    expect_manual_error(g, c, bad, 3, "does not exist", "layer out of range");
    memcpy(bad, ms, sizeof bad);
    bad[2].submesh_devices = 2;   /* 6 of 8 devices */
    expect_manual_error(g, c, bad, 3, "tile the cluster", "not tiling");
    memcpy(bad, ms, sizeof bad);
    bad[0].submesh_devices = 3;
    bad[0].mesh_dp = 3;
    expect_manual_error(g, c, bad, 3, "invalid submesh", "bad submesh shape");
    memcpy(bad, ms, sizeof bad);
    bad[1].mesh_dp = 4;
    expect_manual_error(g, c, bad, 3, "logical mesh", "bad logical mesh");
    memcpy(bad, ms, sizeof bad);
    expect_manual_error(g, c, bad, 2, "belong to no stage", "stages end early");
    /* Two (1, 4) pieces and a (1, 2) piece: 10 devices. */
    autopar_manual_stage over[3] = {ms[2], ms[2], ms[0]};
    over[0].first_layer = 0, over[0].last_layer = 1;
    over[1].first_layer = 2, over[1].last_layer = 2;
    over[2].first_layer = 3, over[2].last_layer = 3;
    expect_manual_error(g, c, over, 3, "tile the cluster", "too many devices");

    /* Uniform stages: 2 stages of 2 layers on one host each, one logical mesh for both. */
    autopar_options o;
    autopar_options_default(&o);
    o.num_layers = 4;
    o.num_micro_batches = 4;
    o.stage_option = AUTOPAR_STAGE_UNIFORM;
    o.uniform_num_stages = 2;
    autopar_plan *u = NULL;
    st = autopar_parallelize(g, c, &o, &u);
    CHECK(st == AUTOPAR_OK, "uniform: %s", autopar_last_error());
    if (!st) {
        CHECK(autopar_plan_num_stages(u) == 2, "uniform: %d stages", autopar_plan_num_stages(u));
        autopar_stage_info a, b;
        autopar_plan_stage_info(u, 0, &a);
        autopar_plan_stage_info(u, 1, &b);
        CHECK(a.last_layer == 1 && b.first_layer == 2, "uniform: layers %d | %d", a.last_layer,
              b.first_layer);
        CHECK(a.n_devices == 4 && b.n_devices == 4 && a.mesh_shape[0] == b.mesh_shape[0] &&
                  a.mesh_shape[1] == b.mesh_shape[1],
              "uniform: meshes %dx%d and %dx%d", a.mesh_shape[0], a.mesh_shape[1],
              b.mesh_shape[0], b.mesh_shape[1]);
        check_plan_sane(u, c, -1, "uniform");
    }
    autopar_plan_free(u);
    /* The automatic plan is never worse than the uniform one under the same cost model. */
    autopar_options_default(&o);
    o.num_layers = 4;
    o.num_micro_batches = 4;
    autopar_plan *a = NULL;
    o.stage_option = AUTOPAR_STAGE_UNIFORM;
    st = autopar_parallelize(g, c, &o, &u);
    o.stage_option = AUTOPAR_STAGE_AUTO;
    autopar_status st2 = autopar_parallelize(g, c, &o, &a);
    CHECK(!st && !st2, "auto vs uniform: %s", autopar_last_error());
    if (!st && !st2) {
        autopar_plan_estimate eu, ea;
        autopar_plan_get_estimate(u, &eu);
        autopar_plan_get_estimate(a, &ea);
        CHECK(ea.step_time <= eu.step_time * (1 + 1e-12), "auto %g > best uniform %g",
              ea.step_time, eu.step_time);
    }
    autopar_plan_free(u);
    autopar_plan_free(a);

    /* Data parallel: one stage, the whole cluster as an 8 x 1 mesh with the batch forced. */
    autopar_options_default(&o);
    o.method = AUTOPAR_METHOD_DATA_PARALLEL;
    o.num_micro_batches = 2;
    st = autopar_parallelize(g, c, &o, &u);
    CHECK(st == AUTOPAR_OK, "data parallel: %s", autopar_last_error());
    if (!st) {
        autopar_stage_info info;
        autopar_plan_stage_info(u, 0, &info);
        CHECK(autopar_plan_num_stages(u) == 1 && info.mesh_shape[0] == 8 &&
                  info.mesh_shape[1] == 1 && info.force_batch_dim_to_axis0,
              "data parallel: %d stages, mesh %dx%d", autopar_plan_num_stages(u),
              info.mesh_shape[0], info.mesh_shape[1]);
        check_plan_sane(u, c, -1, "data parallel");
    }
    autopar_plan_free(u);
    /* GPipe: every stage holds all B micro-batches. */
    st = run_manual(g, c, ms, 3, &u);
    autopar_options_default(&o);
    o.num_layers = 4;
    o.num_micro_batches = 4;
    o.stage_option = AUTOPAR_STAGE_MANUAL;
    o.num_manual_stages = 3;
    o.manual_stages = ms;
    o.schedule = AUTOPAR_SCHEDULE_GPIPE;
    autopar_plan *gp = NULL;
    st2 = autopar_parallelize(g, c, &o, &gp);
    CHECK(!st && !st2, "gpipe: %s", autopar_last_error());
    if (!st && !st2) {
        for (int s = 0; s < 3; s++) {
            autopar_stage_info i1, i2;
            autopar_plan_stage_info(u, s, &i1);
            autopar_plan_stage_info(gp, s, &i2);
            CHECK(i1.micro_batches_in_flight == (3 - s < 4 ? 3 - s : 4) &&
                      i2.micro_batches_in_flight == 4,
                  "stage %d in flight: 1F1B %d, GPipe %d", s, i1.micro_batches_in_flight,
                  i2.micro_batches_in_flight);
            CHECK(i2.memory_bytes >= i1.memory_bytes, "stage %d: GPipe memory %g < 1F1B %g", s,
                  i2.memory_bytes, i1.memory_bytes);
        }
    }
    autopar_plan_free(u);
    autopar_plan_free(gp);
done:
    autopar_graph_free(g);
    autopar_cluster_free(c);
}

/* ---- (d) JSON ------------------------------------------------------------------------------- */

static void test_json(void) {
    autopar_plan *p = g_manual_plan;
    if (!p) {
        CHECK(0, "json: no plan from the manual test");
        return;
    }
    char *a = NULL, *b = NULL;
    autopar_plan *q = NULL;
    CHECK(autopar_plan_to_json(p, &a) == AUTOPAR_OK, "to_json: %s", autopar_last_error());
    CHECK(autopar_plan_from_json(a, &q) == AUTOPAR_OK, "from_json: %s", autopar_last_error());
    if (q) {
        CHECK(autopar_plan_to_json(q, &b) == AUTOPAR_OK, "to_json 2: %s", autopar_last_error());
        CHECK(a && b && strcmp(a, b) == 0, "JSON round trip changed the text");
        CHECK(q->n_stages == p->n_stages && q->n_micro_batches == p->n_micro_batches &&
                  q->schedule == p->schedule && q->n_layers == p->n_layers &&
                  q->memory_budget == p->memory_budget && q->n_transfers == p->n_transfers,
              "round trip: plan fields differ");
        CHECK(memcmp(&q->estimate, &p->estimate, sizeof p->estimate) == 0,
              "round trip: estimate differs");
        CHECK(memcmp(&q->stats, &p->stats, sizeof p->stats) == 0, "round trip: stats differ");
        for (int s = 0; s < p->n_stages && s < q->n_stages; s++) {
            const ap_plan_stage *x = &p->stages[s], *y = &q->stages[s];
            CHECK(memcmp(&x->cost, &y->cost, sizeof x->cost) == 0, "stage %d cost differs", s);
            CHECK(x->n_nodes == y->n_nodes && x->n_devices == y->n_devices &&
                      memcmp(x->nodes, y->nodes, sizeof(int) * (size_t)x->n_nodes) == 0 &&
                      memcmp(x->devices, y->devices, sizeof(int) * (size_t)x->n_devices) == 0 &&
                      x->memory == y->memory && x->in_flight == y->in_flight &&
                      x->first_layer == y->first_layer && x->last_layer == y->last_layer &&
                      x->mesh_shape[0] == y->mesh_shape[0] && x->mesh_shape[1] == y->mesh_shape[1],
                  "stage %d differs", s);
            const ap_shard_plan *sx = x->shard, *sy = y->shard;
            CHECK(sx->n_coll == sy->n_coll && sx->objective == sy->objective &&
                      sx->peak_memory == sy->peak_memory,
                  "stage %d shard plan differs", s);
            for (int i = 0; i < sx->n_nodes && i < sy->n_nodes; i++) {
                if (!sx->node[i].in_stage) continue;
                CHECK(ap_spec_equal(&sx->node[i].spec, &sy->node[i].spec) &&
                          sx->node[i].compute == sy->node[i].compute,
                      "stage %d node %d differs", s, i);
            }
        }
        for (int t = 0; t < p->n_transfers && t < q->n_transfers; t++)
            CHECK(p->transfers[t].tensor == q->transfers[t].tensor &&
                      p->transfers[t].from_stage == q->transfers[t].from_stage &&
                      p->transfers[t].to_stage == q->transfers[t].to_stage &&
                      p->transfers[t].per_step == q->transfers[t].per_step &&
                      p->transfers[t].bytes == q->transfers[t].bytes,
                  "transfer %d differs", t);
        CHECK(autopar_graph_size(q->graph) == autopar_graph_size(p->graph),
              "graph sizes differ");
        for (int i = 0; i < autopar_graph_size(p->graph); i++)
            CHECK(q->graph->nodes[i]->layer == p->graph->nodes[i]->layer, "node %d layer", i);
    }
    autopar_plan_free(q);
    q = NULL;
    /* Files. */
    const char *path = "test_parallelize_plan.json";
    CHECK(autopar_plan_save(p, path) == AUTOPAR_OK, "save: %s", autopar_last_error());
    CHECK(autopar_plan_load(path, &q) == AUTOPAR_OK, "load: %s", autopar_last_error());
    char *c = NULL;
    if (q) CHECK(autopar_plan_to_json(q, &c) == AUTOPAR_OK && !strcmp(a, c), "file round trip");
    remove(path);
    autopar_plan_free(q);
    free(c);
    q = NULL;
    CHECK(autopar_plan_load("/nonexistent/plan.json", &q) == AUTOPAR_ERR_IO && !q, "load missing");
    /* Malformed and wrong documents. */
    CHECK(autopar_plan_from_json("{", &q) == AUTOPAR_ERR_PARSE && !q, "malformed");
    CHECK(autopar_plan_from_json("{\"format\": \"autopar-graph\"}", &q) == AUTOPAR_ERR_PARSE,
          "wrong format");
    if (a) {
        /* A stage whose layers do not follow the previous stage's. */
        char *bad = malloc(strlen(a) + 1);
        if (bad) memcpy(bad, a, strlen(a) + 1);
        char *pos = bad ? strstr(bad, "\"layers\":\t[1, 2]") : NULL;
        CHECK(pos != NULL, "stage 1 layers text not found");
        if (pos) {
            memcpy(pos, "\"layers\":\t[2, 2]", strlen("\"layers\":\t[2, 2]"));
            CHECK(autopar_plan_from_json(bad, &q) == AUTOPAR_ERR_PARSE && !q,
                  "inconsistent stages accepted");
            CHECK(strstr(autopar_last_error(), "stages[1]"), "message: %s", autopar_last_error());
        }
        free(bad);
    }
    autopar_plan_print(p, stdout);
    free(a);
    free(b);
    autopar_plan_free(p);
    g_manual_plan = NULL;
}

/* ---- (e) errors ----------------------------------------------------------------------------- */

static void test_errors(void) {
    autopar_cluster *c = cluster_2x4(16e9);
    autopar_graph *g = gpt(2, 64, 16, 8, 64, 0);
    autopar_plan *p = (autopar_plan *)&p;   /* must be set to NULL on failure */
    autopar_options o;
    autopar_options_default(&o);
    CHECK(autopar_parallelize(NULL, c, &o, &p) == AUTOPAR_ERR_INVALID_ARG && !p, "NULL graph");
    CHECK(strstr(autopar_last_error(), "graph"), "message: %s", autopar_last_error());
    CHECK(autopar_parallelize(g, NULL, &o, &p) == AUTOPAR_ERR_INVALID_ARG, "NULL cluster");
    CHECK(autopar_parallelize(g, c, &o, NULL) == AUTOPAR_ERR_INVALID_ARG, "NULL out");
    o.num_micro_batches = 0;
    CHECK(autopar_parallelize(g, c, &o, &p) == AUTOPAR_ERR_INVALID_ARG, "B = 0");
    CHECK(strstr(autopar_last_error(), "num_micro_batches"), "message: %s", autopar_last_error());
    autopar_options_default(&o);
    o.ilp_time_limit = 0;
    CHECK(autopar_parallelize(g, c, &o, &p) == AUTOPAR_ERR_INVALID_ARG, "time limit 0");
    autopar_options_default(&o);
    o.method = (autopar_method)42;
    CHECK(autopar_parallelize(g, c, &o, &p) == AUTOPAR_ERR_INVALID_ARG, "bad method");
    autopar_options_default(&o);
    o.stage_option = AUTOPAR_STAGE_MANUAL;
    CHECK(autopar_parallelize(g, c, &o, &p) == AUTOPAR_ERR_INVALID_ARG, "manual without stages");
    autopar_options_default(&o);
    o.num_layers = 100;
    CHECK(autopar_parallelize(g, c, &o, &p) == AUTOPAR_ERR_INVALID_ARG, "too many layers: %s",
          autopar_last_error());

    /* Forward-only graph, and a graph with backward but no optimizer. */
    gpt_config gc = {.layers = 1, .hidden = 32, .heads = 2, .seq = 8, .vocab = 16, .batch = 2};
    autopar_graph *f = NULL;
    autopar_tensor *loss = NULL;
    autopar_graph_new(&f);
    model_gpt_build(f, &gc, &loss);
    CHECK(autopar_parallelize(f, c, NULL, &p) == AUTOPAR_ERR_GRAPH && !p, "forward-only graph");
    CHECK(strstr(autopar_last_error(), "autopar_build_training"), "message: %s",
          autopar_last_error());
    autopar_backward(f, loss);
    CHECK(autopar_parallelize(f, c, NULL, &p) == AUTOPAR_ERR_GRAPH && !p, "no optimizer");
    CHECK(strstr(autopar_last_error(), "optimizer"), "message: %s", autopar_last_error());
    autopar_graph_free(f);

    /* Infeasible memory: the message names the budget and what is needed. */
    autopar_options_default(&o);
    o.memory_budget = 64 * 1024;
    CHECK(autopar_parallelize(g, c, &o, &p) == AUTOPAR_ERR_INFEASIBLE && !p, "64 KiB budget");
    CHECK(strstr(autopar_last_error(), "64.00 KiB") && strstr(autopar_last_error(), "needs"),
          "message: %s", autopar_last_error());
    /* Same through manual stages: the message names the stage. */
    autopar_manual_stage ms[1] = {{.first_layer = 0, .last_layer = 1, .submesh_hosts = 2,
                                   .submesh_devices = 4, .mesh_dp = 8, .mesh_mp = 1,
                                   .force_batch_dim_to_axis0 = 1}};
    o.stage_option = AUTOPAR_STAGE_MANUAL;
    o.num_layers = 2;
    o.num_manual_stages = 1;
    o.manual_stages = ms;
    CHECK(autopar_parallelize(g, c, &o, &p) == AUTOPAR_ERR_INFEASIBLE && !p, "manual 64 KiB");
    CHECK(strstr(autopar_last_error(), "manual stage 0") && strstr(autopar_last_error(), "needs"),
          "message: %s", autopar_last_error());

    /* NULL-safe accessors. */
    autopar_plan_free(NULL);
    autopar_plan_print(NULL, stdout);
    CHECK(autopar_plan_num_stages(NULL) == 0 && autopar_plan_stage_devices(NULL, 0, NULL) == NULL,
          "NULL accessors");
    autopar_stage_info info;
    CHECK(autopar_plan_stage_info(NULL, 0, &info) == AUTOPAR_ERR_INVALID_ARG, "NULL stage info");
    autopar_graph_free(g);
    autopar_cluster_free(c);
}

/* Identical layers are solved once per logical mesh. */
static void test_reuse(void) {
    autopar_graph *g = gpt(8, 64, 16, 8, 64, 0);
    autopar_cluster *c = cluster_2x4(16e9);
    autopar_options o;
    autopar_options_default(&o);
    o.num_layers = 8;
    o.num_micro_batches = 4;
    autopar_plan *p = NULL;
    autopar_status st = g && c ? autopar_parallelize(g, c, &o, &p) : AUTOPAR_ERR_INVALID_ARG;
    CHECK(st == AUTOPAR_OK, "reuse: %s", autopar_last_error());
    if (!st) {
        const ap_plan_stats *s = &p->stats;
        CHECK(s->n_units == 8 && s->n_unit_types <= 3, "reuse: %d units of %d types", s->n_units,
              s->n_unit_types);
        /* Two memory variants per (type, mesh) at most, plus the stage plans' re-solves. */
        int bound = 2 * s->n_unit_types * s->n_mesh_configs + s->n_units;
        CHECK(s->n_solves <= bound && s->n_cache_hits > 0,
              "reuse: %d solves (bound %d), %d reused", s->n_solves, bound, s->n_cache_hits);
        printf("reuse: %d units, %d types, %d meshes, %d solves, %d reused, %.3f s\n", s->n_units,
               s->n_unit_types, s->n_mesh_configs, s->n_solves, s->n_cache_hits,
               s->total_seconds);
    }
    autopar_plan_free(p);
    autopar_graph_free(g);
    autopar_cluster_free(c);
}

int main(void) {
    test_layers();
    test_insight();
    test_manual();
    test_json();
    test_errors();
    test_reuse();
    if (g_failures) {
        fprintf(stderr, "test_parallelize: %d failure(s)\n", g_failures);
        return 1;
    }
    printf("test_parallelize: ok\n");
    return 0;
}
