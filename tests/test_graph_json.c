/*
 * Graph JSON serialisation: exact round trips (hand-built and model graphs, forward and
 * training), one case per reader error (status and message), NULL arguments, files, and
 * robustness against truncated / corrupted documents.
 */
#define _POSIX_C_SOURCE 200809L

#include "autopar.h"
#include "internal.h"
#include "models.h"

#include <cjson/cJSON.h>

#include <float.h>
#include <locale.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        checks++;                                                                              \
        if (cond) {                                                                            \
            printf("ok   ");                                                                   \
        } else {                                                                               \
            printf("FAIL ");                                                                   \
            failures++;                                                                        \
        }                                                                                      \
        printf(__VA_ARGS__);                                                                   \
        printf("\n");                                                                          \
        fflush(stdout);                                                                        \
    } while (0)

/* ---- helpers ---------------------------------------------------------------------------------- */

static int node_id(autopar_tensor *t) { return t ? ((ap_node *)t)->id : -1; }

/* Every field of two graphs equal (floats bitwise). Prints the first difference. */
static int graphs_equal(const autopar_graph *a, const autopar_graph *b) {
#define DIFF(...) do { printf("    difference: " __VA_ARGS__); printf("\n"); return 0; } while (0)
    if (a->n_nodes != b->n_nodes) DIFF("n_nodes %d vs %d", a->n_nodes, b->n_nodes);
    if (a->loss != b->loss) DIFF("loss %d vs %d", a->loss, b->loss);
    if (a->current_layer != b->current_layer)
        DIFF("current_layer %d vs %d", a->current_layer, b->current_layer);
    if (a->has_optimizer != b->has_optimizer) DIFF("has_optimizer");
    if (a->status != b->status) DIFF("status %d vs %d", a->status, b->status);
    if (a->has_optimizer) {
        const autopar_optimizer *x = &a->optimizer, *y = &b->optimizer;
        if (x->kind != y->kind) DIFF("optimizer kind");
        if (memcmp(&x->lr, &y->lr, sizeof x->lr) || memcmp(&x->momentum, &y->momentum, sizeof(float)) ||
            memcmp(&x->beta1, &y->beta1, sizeof(float)) || memcmp(&x->beta2, &y->beta2, sizeof(float)) ||
            memcmp(&x->eps, &y->eps, sizeof(float)) ||
            memcmp(&x->weight_decay, &y->weight_decay, sizeof(float)))
            DIFF("optimizer hyper-parameters");
    }
    for (int i = 0; i < a->n_nodes; i++) {
        const ap_node *p = a->nodes[i], *q = b->nodes[i];
        if (p->id != q->id) DIFF("node %d id", i);
        if (p->op != q->op) DIFF("node %d op", i);
        if (p->dtype != q->dtype) DIFF("node %d dtype", i);
        if (!ap_shape_equal(&p->shape, &q->shape)) DIFF("node %d shape", i);
        if (strcmp(p->name, q->name) != 0) DIFF("node %d name '%s' vs '%s'", i, p->name, q->name);
        if (p->kind != q->kind) DIFF("node %d '%s' kind %d vs %d", i, p->name, p->kind, q->kind);
        if (p->phase != q->phase) DIFF("node %d '%s' phase", i, p->name);
        if (p->layer != q->layer) DIFF("node %d '%s' layer %d vs %d", i, p->name, p->layer, q->layer);
        if (p->n_src != q->n_src) DIFF("node %d n_src", i);
        for (int k = 0; k < p->n_src; k++)
            if (p->src[k] != q->src[k]) DIFF("node %d src[%d]", i, k);
        for (int k = 0; k < AP_MAX_IATTR; k++)
            if (p->attrs.i[k] != q->attrs.i[k]) DIFF("node %d '%s' iattrs[%d]", i, p->name, k);
        for (int k = 0; k < AP_MAX_FATTR; k++)
            if (memcmp(&p->attrs.f[k], &q->attrs.f[k], sizeof(double)) != 0)
                DIFF("node %d '%s' fattrs[%d] %.17g vs %.17g", i, p->name, k, p->attrs.f[k],
                     q->attrs.f[k]);
        if (p->grad != q->grad) DIFF("node %d '%s' grad %d vs %d", i, p->name, p->grad, q->grad);
        if (p->assign_to != q->assign_to) DIFF("node %d '%s' assign_to", i, p->name);
    }
    return 1;
#undef DIFF
}

/* to_json -> from_json -> to_json: identical text and identical structs. */
static void check_round_trip(const char *label, const autopar_graph *g) {
    char *t1 = NULL, *t2 = NULL;
    autopar_graph *g2 = NULL;
    autopar_status s = autopar_graph_to_json(g, &t1);
    CHECK(s == AUTOPAR_OK && t1, "%s: to_json (%d nodes, %zu bytes) %s", label, autopar_graph_size(g),
          t1 ? strlen(t1) : 0, s ? autopar_last_error() : "");
    if (s != AUTOPAR_OK) return;
    s = autopar_graph_from_json(t1, &g2);
    CHECK(s == AUTOPAR_OK && g2, "%s: from_json %s", label, s ? autopar_last_error() : "");
    if (s == AUTOPAR_OK) {
        s = autopar_graph_to_json(g2, &t2);
        CHECK(s == AUTOPAR_OK && t2 && strcmp(t1, t2) == 0, "%s: second to_json is identical", label);
        CHECK(graphs_equal(g, g2), "%s: every node field equal after the round trip", label);
        CHECK(autopar_graph_validate(g2) == AUTOPAR_OK, "%s: reread graph validates", label);
    }
    free(t1);
    free(t2);
    autopar_graph_free(g2);
}

/* from_json must fail with `want`, set *out to NULL and mention every non-NULL needle. */
static void expect_error(const char *label, const char *json, autopar_status want, const char *n1,
                         const char *n2) {
    autopar_graph *g = (autopar_graph *)(uintptr_t)1;  /* must be overwritten with NULL */
    autopar_clear_error();
    autopar_status s = autopar_graph_from_json(json, &g);
    const char *m = autopar_last_error();
    int ok = s == want && g == NULL && (!n1 || strstr(m, n1)) && (!n2 || strstr(m, n2));
    CHECK(ok, "%s -> %s (got %s): \"%s\"", label, autopar_status_str(want), autopar_status_str(s), m);
    if (s == AUTOPAR_OK && g) autopar_graph_free(g);
}

/* A copy of json with one field of node `id` (or of the top level when id < 0) replaced by
 * `val` (deleted when val is NULL). Returns malloc'ed text. */
static char *mutate(const char *json, int id, const char *key, cJSON *val) {
    cJSON *root = cJSON_Parse(json);
    if (!root) { cJSON_Delete(val); return NULL; }
    cJSON *obj = root;
    if (id >= 0) obj = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(root, "nodes"), id);
    if (!obj) { cJSON_Delete(val); cJSON_Delete(root); return NULL; }
    if (val) {
        if (cJSON_GetObjectItemCaseSensitive(obj, key))
            cJSON_ReplaceItemInObjectCaseSensitive(obj, key, val);
        else
            cJSON_AddItemToObject(obj, key, val);
    } else {
        cJSON_DeleteItemFromObjectCaseSensitive(obj, key);
    }
    char *p = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!p) return NULL;
    char *copy = malloc(strlen(p) + 1);
    if (copy) strcpy(copy, p);
    cJSON_free(p);
    return copy;
}

static cJSON *int_array(int n, const int64_t *v) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber((double)v[i]));
    return a;
}

static void expect_mutation(const char *label, const char *json, int id, const char *key,
                            cJSON *val, autopar_status want, const char *n1, const char *n2) {
    char *m = mutate(json, id, key, val);
    CHECK(m != NULL, "%s: mutated document built", label);
    if (m) expect_error(label, m, want, n1, n2);
    free(m);
}

/* ---- graphs ------------------------------------------------------------------------------------ */

typedef struct mlp_handles {
    autopar_tensor *x, *w0, *h, *relu, *loss;
} mlp_handles;

/* x[4,16] -> dense 64 -> relu -> dense 16 -> MSE; a pipeline boundary after the first layer. */
static autopar_graph *build_mlp(mlp_handles *hd) {
    autopar_graph *g = NULL;
    if (autopar_graph_new(&g) != AUTOPAR_OK) return NULL;
    int64_t xs[2] = {4, 16}, w0s[2] = {16, 64}, b0s[1] = {64}, w1s[2] = {64, 16}, b1s[1] = {16};
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, xs, 0);
    autopar_tensor *y = autopar_input(g, "y", AUTOPAR_F32, 2, xs, 0);
    autopar_tensor *w0 = autopar_param(g, "w0", 2, w0s, AUTOPAR_INIT_NORMAL, 0.02f);
    autopar_tensor *b0 = autopar_param(g, "b0", 1, b0s, AUTOPAR_INIT_ZEROS, 0.0f);
    autopar_tensor *w1 = autopar_param(g, "w1", 2, w1s, AUTOPAR_INIT_UNIFORM, 0.0f);
    autopar_tensor *b1 = autopar_param(g, "b1", 1, b1s, AUTOPAR_INIT_ZEROS, 0.0f);
    autopar_tensor *h = autopar_matmul(g, x, w0);
    autopar_tensor *hb = autopar_add(g, h, b0);
    autopar_tensor *r = autopar_relu(g, hb);
    autopar_mark_pipeline_boundary(g);
    autopar_tensor *o = autopar_add(g, autopar_matmul(g, r, w1), b1);
    autopar_tensor *loss = autopar_mse_loss(g, o, y);
    if (hd) {
        hd->x = x; hd->w0 = w0; hd->h = h; hd->relu = r; hd->loss = loss;
    }
    if (autopar_graph_status(g) != AUTOPAR_OK) {
        printf("    build_mlp: %s\n", autopar_graph_error(g));
        autopar_graph_free(g);
        return NULL;
    }
    return g;
}

typedef struct gpt_handles {
    autopar_tensor *tokens, *emb, *logits, *loss;
} gpt_handles;

/* A one-block GPT-like decoder exercising most forward ops. */
static autopar_graph *build_gpt(gpt_handles *hd) {
    const int64_t B = 2, T = 4, C = 8, V = 16, H = 2, D = C / H;
    autopar_graph *g = NULL;
    if (autopar_graph_new(&g) != AUTOPAR_OK) return NULL;
    int64_t bt[2] = {B, T}, vc[2] = {V, C}, tc[2] = {T, C}, c1[1] = {C}, cq[2] = {C, 3 * C},
            cc[2] = {C, C}, cf[2] = {C, 4 * C}, fc[2] = {4 * C, C}, c4[1] = {4 * C};
    autopar_tensor *tokens = autopar_input(g, "tokens", AUTOPAR_I32, 2, bt, 0);
    autopar_tensor *targets = autopar_input(g, "targets", AUTOPAR_I32, 2, bt, 0);
    autopar_tensor *wte = autopar_param(g, "wte", 2, vc, AUTOPAR_INIT_NORMAL, 0.02f);
    autopar_tensor *wpe = autopar_param(g, "wpe", 2, tc, AUTOPAR_INIT_NORMAL, 0.01f);
    autopar_tensor *emb = autopar_embedding(g, wte, tokens);
    autopar_tensor *x = autopar_add(g, emb, wpe);
    autopar_tensor *g1 = autopar_param(g, "ln1.g", 1, c1, AUTOPAR_INIT_ONES, 0.0f);
    autopar_tensor *b1 = autopar_param(g, "ln1.b", 1, c1, AUTOPAR_INIT_ZEROS, 0.0f);
    autopar_tensor *h = autopar_layernorm(g, x, g1, b1, 1e-5f);
    autopar_tensor *wqkv = autopar_param(g, "attn.wqkv", 2, cq, AUTOPAR_INIT_NORMAL, 0.0f);
    autopar_tensor *qkv = autopar_matmul(g, h, wqkv);
    autopar_tensor *parts[3] = {NULL, NULL, NULL};
    autopar_split(g, qkv, -1, 3, parts);
    int64_t heads[4] = {B, T, H, D};
    int perm[4] = {0, 2, 1, 3};
    autopar_tensor *q = autopar_permute(g, autopar_reshape(g, parts[0], 4, heads), perm);
    autopar_tensor *k = autopar_permute(g, autopar_reshape(g, parts[1], 4, heads), perm);
    autopar_tensor *v = autopar_permute(g, autopar_reshape(g, parts[2], 4, heads), perm);
    autopar_tensor *att = autopar_scale(g, autopar_batch_matmul(g, q, k, 0, 1), 0.5f);
    att = autopar_softmax(g, att, 1);
    autopar_tensor *y = autopar_batch_matmul(g, att, v, 0, 0);
    int64_t btc[3] = {B, T, C};
    y = autopar_reshape(g, autopar_permute(g, y, perm), 3, btc);
    autopar_tensor *wo = autopar_param(g, "attn.wo", 2, cc, AUTOPAR_INIT_NORMAL, 0.0f);
    x = autopar_add(g, x, autopar_matmul(g, y, wo));
    autopar_mark_pipeline_boundary(g);
    autopar_tensor *g2 = autopar_param(g, "ln2.g", 1, c1, AUTOPAR_INIT_ONES, 0.0f);
    autopar_tensor *b2 = autopar_param(g, "ln2.b", 1, c1, AUTOPAR_INIT_ZEROS, 0.0f);
    autopar_tensor *wf = autopar_param(g, "mlp.wfc", 2, cf, AUTOPAR_INIT_NORMAL, 0.0f);
    autopar_tensor *bf = autopar_param(g, "mlp.bfc", 1, c4, AUTOPAR_INIT_ZEROS, 0.0f);
    autopar_tensor *wp = autopar_param(g, "mlp.wproj", 2, fc, AUTOPAR_INIT_NORMAL, 0.0f);
    autopar_tensor *m = autopar_gelu(g, autopar_add(g, autopar_matmul(g, autopar_layernorm(g, x, g2, b2, 1e-5f), wf), bf));
    x = autopar_add(g, x, autopar_matmul(g, m, wp));
    /* concat of two swapped slices, then an elementwise product and a difference */
    autopar_tensor *lo = autopar_slice(g, x, 2, 0, C / 2), *hi = autopar_slice(g, x, 2, C / 2, C / 2);
    autopar_tensor *sw[2] = {hi, lo};
    autopar_tensor *c = autopar_concat(g, 2, sw, -1);
    x = autopar_sub(g, x, autopar_scale(g, autopar_mul(g, c, x), 0.125f));
    autopar_tensor *logits = autopar_matmul_ex(g, x, wte, 0, 1);
    autopar_tensor *loss = autopar_cross_entropy(g, logits, targets);
    if (hd) {
        hd->tokens = tokens; hd->emb = emb; hd->logits = logits; hd->loss = loss;
    }
    if (autopar_graph_status(g) != AUTOPAR_OK) {
        printf("    build_gpt: %s\n", autopar_graph_error(g));
        autopar_graph_free(g);
        return NULL;
    }
    return g;
}

/* Reductions, transposed matmuls and special float values in attributes. */
static autopar_graph *build_misc(void) {
    autopar_graph *g = NULL;
    if (autopar_graph_new(&g) != AUTOPAR_OK) return NULL;
    int64_t s[3] = {3, 5, 7}, w[2] = {7, 5}, w2[2] = {6, 15};
    autopar_tensor *x = autopar_input(g, "x \"quoted\" \\ name\t\xc3\xa9", AUTOPAR_F32, 3, s, -1);
    autopar_tensor *p = autopar_param(g, "p", 2, w, AUTOPAR_INIT_UNIFORM, 1e-45f);
    autopar_tensor *a = autopar_matmul_ex(g, x, p, 0, 0);           /* [3,5,5] */
    autopar_tensor *p2 = autopar_param(g, "p2", 2, w2, AUTOPAR_INIT_ONES, 0.0f);
    autopar_tensor *t = autopar_matmul_ex(g, x, p2, 1, 1);          /* [7,6]   */
    autopar_tensor *r1 = autopar_sum(g, a, 1);
    autopar_tensor *r2 = autopar_mean(g, a, -1);
    autopar_tensor *r3 = autopar_sum_all(g, t);
    autopar_tensor *r4 = autopar_mean_all(g, autopar_transpose(g, t));
    autopar_tensor *z1 = autopar_scale(g, r1, -0.0f);
    autopar_tensor *z2 = autopar_scale(g, r2, 0.1f);
    autopar_tensor *z3 = autopar_scale(g, r3, INFINITY);
    autopar_tensor *z4 = autopar_scale(g, r4, -INFINITY);
    autopar_tensor *z5 = autopar_scale(g, z4, NAN);
    autopar_tensor *z6 = autopar_scale(g, z5, FLT_MAX);
    (void)z1; (void)z2; (void)z3; (void)z6;
    if (autopar_graph_status(g) != AUTOPAR_OK) {
        printf("    build_misc: %s\n", autopar_graph_error(g));
        autopar_graph_free(g);
        return NULL;
    }
    /* Unused attribute slots (no op reads them) carry awkward doubles and big integers. */
    ap_node *n = (ap_node *)z2;
    n->attrs.f[1] = 0.1;
    n->attrs.f[2] = 1.0 / 3.0;
    n->attrs.f[3] = DBL_MIN;
    n->attrs.f[4] = DBL_MAX;
    n->attrs.f[5] = 4.9406564584124654e-324; /* smallest subnormal */
    n->attrs.i[5] = 9007199254740991LL;       /* 2^53 - 1 */
    n->attrs.i[6] = -9007199254740991LL;
    n->attrs.i[7] = 123456789012345LL;
    return g;
}

/* ---- tests ------------------------------------------------------------------------------------- */

static void test_round_trips(void) {
    printf("== round trips\n");
    mlp_handles mh;
    autopar_graph *g = build_mlp(&mh);
    CHECK(g != NULL, "hand-built MLP");
    if (g) {
        check_round_trip("mlp forward", g);
        autopar_optimizer o;
        autopar_optimizer_default(&o);
        o.kind = AUTOPAR_OPT_MOMENTUM;
        o.lr = 0.05f;
        o.momentum = 0.9f;
        o.weight_decay = 1e-4f;
        autopar_status s = autopar_build_training(g, mh.loss, &o);
        CHECK(s == AUTOPAR_OK, "mlp training graph (momentum) %s", s ? autopar_last_error() : "");
        if (s == AUTOPAR_OK) check_round_trip("mlp training (momentum)", g);
        autopar_graph_free(g);
    }

    g = build_mlp(&mh);
    if (g) {
        autopar_optimizer o;
        autopar_optimizer_default(&o);
        o.kind = AUTOPAR_OPT_SGD;
        o.lr = 0.1f;
        autopar_status s = autopar_build_training(g, mh.loss, &o);
        CHECK(s == AUTOPAR_OK, "mlp training graph (sgd) %s", s ? autopar_last_error() : "");
        if (s == AUTOPAR_OK) check_round_trip("mlp training (sgd)", g);
        autopar_graph_free(g);
    }

    gpt_handles gh;
    g = build_gpt(&gh);
    CHECK(g != NULL, "hand-built GPT-like graph");
    if (g) {
        check_round_trip("gpt forward", g);
        autopar_optimizer o;
        autopar_optimizer_default(&o);
        o.lr = 3e-4f;
        o.weight_decay = 0.01f;
        autopar_status s = autopar_build_training(g, gh.loss, &o);
        CHECK(s == AUTOPAR_OK, "gpt training graph (adamw) %s", s ? autopar_last_error() : "");
        if (s == AUTOPAR_OK) check_round_trip("gpt training (adamw)", g);
        autopar_graph_free(g);
    }

    g = build_misc();
    CHECK(g != NULL, "graph with reductions and special float attributes");
    if (g) {
        check_round_trip("misc (nan/inf/-0/subnormal/2^53-1)", g);
        char *t = NULL;
        if (autopar_graph_to_json(g, &t) == AUTOPAR_OK) {
            CHECK(strstr(t, "\"nan\"") && strstr(t, "\"inf\"") && strstr(t, "\"-inf\"") &&
                      strstr(t, "-0,") && strstr(t, "9007199254740991"),
                  "misc: non-finite values written as strings, -0 and 2^53-1 written exactly");
            free(t);
        }
        /* 2^53 cannot be stored exactly */
        ap_node *last = g->nodes[g->n_nodes - 1];
        last->attrs.i[7] = 9007199254740992LL;
        char *u = (char *)1;
        autopar_status s = autopar_graph_to_json(g, &u);
        CHECK(s == AUTOPAR_ERR_UNSUPPORTED && u == NULL && strstr(autopar_last_error(), "iattrs[7]") &&
                  strstr(autopar_last_error(), last->name),
              "to_json of an integer attribute 2^53 -> unsupported: \"%s\"", autopar_last_error());
        autopar_graph_free(g);
    }

    /* empty graph */
    autopar_graph *e = NULL;
    if (autopar_graph_new(&e) == AUTOPAR_OK) {
        check_round_trip("empty graph", e);
        autopar_graph_free(e);
    }

    /* the shared model builders */
    g = NULL;
    if (autopar_graph_new(&g) == AUTOPAR_OK) {
        mlp_config mc = {.batch = 8, .dim = 16, .mark_layers = 1};
        autopar_tensor *loss = NULL;
        autopar_status s = model_mlp_build(g, &mc, &loss);
        CHECK(s == AUTOPAR_OK, "model_mlp_build %s", s ? autopar_last_error() : "");
        if (s == AUTOPAR_OK) {
            check_round_trip("model mlp forward", g);
            autopar_optimizer o;
            autopar_optimizer_default(&o);
            s = autopar_build_training(g, loss, &o);
            CHECK(s == AUTOPAR_OK, "model mlp training %s", s ? autopar_last_error() : "");
            if (s == AUTOPAR_OK) check_round_trip("model mlp training (adamw)", g);
        }
        autopar_graph_free(g);
    }
    g = NULL;
    if (autopar_graph_new(&g) == AUTOPAR_OK) {
        gpt_config gc = {.layers = 2, .hidden = 16, .heads = 2, .seq = 8, .vocab = 32, .batch = 2,
                         .mark_layers = 1};
        autopar_tensor *loss = NULL;
        autopar_status s = model_gpt_build(g, &gc, &loss);
        CHECK(s == AUTOPAR_OK, "model_gpt_build %s", s ? autopar_last_error() : "");
        if (s == AUTOPAR_OK) {
            check_round_trip("model gpt forward", g);
            autopar_optimizer o;
            autopar_optimizer_default(&o);
            o.weight_decay = 0.1f;
            s = autopar_build_training(g, loss, &o);
            CHECK(s == AUTOPAR_OK, "model gpt training %s", s ? autopar_last_error() : "");
            if (s == AUTOPAR_OK) check_round_trip("model gpt training (adamw)", g);
        }
        autopar_graph_free(g);
    }
}

static void test_errors(void) {
    printf("== reader errors\n");
    mlp_handles mh;
    gpt_handles gh;
    autopar_graph *mlp = build_mlp(&mh);
    autopar_graph *gpt = build_gpt(&gh);
    char *mj = NULL, *gj = NULL;
    if (!mlp || !gpt || autopar_graph_to_json(mlp, &mj) != AUTOPAR_OK ||
        autopar_graph_to_json(gpt, &gj) != AUTOPAR_OK) {
        CHECK(0, "error tests: base documents");
        goto out;
    }
    const int h = node_id(mh.h), relu = node_id(mh.relu);
    const char *hname = autopar_tensor_name(mh.h);
    const char *embname = autopar_tensor_name(gh.emb);

    /* malformed JSON */
    {
        size_t len = strlen(mj);
        char *tr = malloc(len / 2 + 1);
        if (tr) {
            memcpy(tr, mj, len / 2);
            tr[len / 2] = '\0';
            expect_error("truncated JSON", tr, AUTOPAR_ERR_PARSE, "malformed JSON", "end of input");
            free(tr);
        }
        expect_error("bad token", "{\"format\": \"autopar-graph\", \"version\": 1,, }",
                     AUTOPAR_ERR_PARSE, "malformed JSON", "line 1, column");
        expect_error("empty string", "", AUTOPAR_ERR_PARSE, "malformed JSON", NULL);
        char *trail = malloc(len + 3);
        if (trail) {
            snprintf(trail, len + 3, "%sx", mj);
            expect_error("trailing text after the document", trail, AUTOPAR_ERR_PARSE,
                         "malformed JSON", NULL);
            free(trail);
        }
        /* very deep nesting must not overflow the stack */
        size_t depth = 200000;
        char *deep = malloc(2 * depth + 1);
        if (deep) {
            memset(deep, '[', depth);
            memset(deep + depth, ']', depth);
            deep[2 * depth] = '\0';
            expect_error("200000 nested arrays", deep, AUTOPAR_ERR_PARSE, "malformed JSON", NULL);
            free(deep);
        }
    }
    expect_error("not an object", "[1, 2, 3]", AUTOPAR_ERR_PARSE, "object", NULL);
    expect_error("a bare string", "\"autopar-graph\"", AUTOPAR_ERR_PARSE, "object", NULL);
    expect_mutation("missing \"nodes\"", mj, -1, "nodes", NULL, AUTOPAR_ERR_PARSE, "\"nodes\"",
                    "missing");
    expect_mutation("\"nodes\" is an object", mj, -1, "nodes", cJSON_CreateObject(),
                    AUTOPAR_ERR_PARSE, "\"nodes\"", "array");
    expect_mutation("missing \"format\"", mj, -1, "format", NULL, AUTOPAR_ERR_PARSE, "\"format\"",
                    NULL);
    expect_mutation("wrong format", mj, -1, "format", cJSON_CreateString("onnx"), AUTOPAR_ERR_PARSE,
                    "\"format\"", "onnx");
    expect_mutation("version 2", mj, -1, "version", cJSON_CreateNumber(2), AUTOPAR_ERR_PARSE,
                    "\"version\"", NULL);
    expect_mutation("loss out of range", mj, -1, "loss", cJSON_CreateNumber(1000),
                    AUTOPAR_ERR_GRAPH, "\"loss\"", "1000");
    expect_mutation("loss not a scalar", mj, -1, "loss", cJSON_CreateNumber(h), AUTOPAR_ERR_SHAPE,
                    "\"loss\"", hname);
    expect_mutation("current_layer is a string", mj, -1, "current_layer", cJSON_CreateString("1"),
                    AUTOPAR_ERR_PARSE, "\"current_layer\"", "string");
    {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "kind", "adam");
        expect_mutation("unknown optimizer kind", mj, -1, "optimizer", o, AUTOPAR_ERR_PARSE,
                        "optimizer", "adam");
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "kind", "sgd");
        cJSON_AddNumberToObject(o, "lr", 0.1);
        expect_mutation("optimizer missing fields", mj, -1, "optimizer", o, AUTOPAR_ERR_PARSE,
                        "optimizer", "\"momentum\"");
    }

    /* node-level */
    expect_mutation("unknown op \"matmulx\"", mj, h, "op", cJSON_CreateString("matmulx"),
                    AUTOPAR_ERR_UNKNOWN_OP, "matmulx", hname);
    expect_mutation("kernel-only op \"ce_partial\"", mj, h, "op",
                    cJSON_CreateString("ce_partial"), AUTOPAR_ERR_UNSUPPORTED,
                    "runtime's lowering", hname);
    expect_mutation("op is a number", mj, h, "op", cJSON_CreateNumber(4), AUTOPAR_ERR_PARSE,
                    "\"op\"", hname);
    {
        int64_t bad[2] = {4, 65};
        expect_mutation("stored shape [4, 65] for a [4, 64] matmul", mj, h, "shape",
                        int_array(2, bad), AUTOPAR_ERR_SHAPE, hname, "[4, 65]");
        char *m = mutate(mj, h, "shape", int_array(2, bad));
        if (m) {
            autopar_graph *g = NULL;
            autopar_graph_from_json(m, &g);
            CHECK(strstr(autopar_last_error(), "[4, 64]") != NULL,
                  "shape mismatch message shows the inferred shape too");
            free(m);
        }
        int64_t big[5] = {1, 2, 3, 4, 5};
        expect_mutation("rank 5 shape", mj, 0, "shape", int_array(5, big), AUTOPAR_ERR_SHAPE,
                        "\"shape\"", "'x'");
        cJSON *huge = cJSON_CreateArray();
        for (int i = 0; i < 100000; i++) cJSON_AddItemToArray(huge, cJSON_CreateNumber(1));
        expect_mutation("shape with 100000 dims", mj, 0, "shape", huge, AUTOPAR_ERR_SHAPE,
                        "\"shape\"", NULL);
        int64_t neg[2] = {4, -16};
        expect_mutation("negative input dim", mj, 0, "shape", int_array(2, neg), AUTOPAR_ERR_SHAPE,
                        "'x'", "positive");
        cJSON *mixed = cJSON_CreateArray();
        cJSON_AddItemToArray(mixed, cJSON_CreateNumber(4));
        cJSON_AddItemToArray(mixed, cJSON_CreateString("16"));
        expect_mutation("a string in a shape", mj, 0, "shape", mixed, AUTOPAR_ERR_PARSE,
                        "shape[1]", "string");
        expect_mutation("fractional dim", mj, 0, "shape", cJSON_CreateDoubleArray((double[]){4, 16.5}, 2),
                        AUTOPAR_ERR_PARSE, "shape[1]", NULL);
    }
    expect_mutation("stored dtype i32 for a matmul", mj, h, "dtype", cJSON_CreateString("i32"),
                    AUTOPAR_ERR_DTYPE, hname, "i32");
    expect_mutation("unknown dtype f16", mj, h, "dtype", cJSON_CreateString("f16"),
                    AUTOPAR_ERR_PARSE, "\"dtype\"", "f16");
    expect_mutation("embedding ids stored as f32", gj, node_id(gh.tokens), "dtype",
                    cJSON_CreateString("f32"), AUTOPAR_ERR_DTYPE, embname, "tokens");
    expect_mutation("unknown kind", mj, h, "kind", cJSON_CreateString("weights"), AUTOPAR_ERR_PARSE,
                    "\"kind\"", hname);
    expect_mutation("unknown phase", mj, h, "phase", cJSON_CreateString("sideways"),
                    AUTOPAR_ERR_PARSE, "\"phase\"", "sideways");
    expect_mutation("layer is a string", mj, h, "layer", cJSON_CreateString("0"), AUTOPAR_ERR_PARSE,
                    "\"layer\"", hname);
    expect_mutation("layer negative", mj, h, "layer", cJSON_CreateNumber(-3), AUTOPAR_ERR_PARSE,
                    "\"layer\"", "-3");
    {
        int64_t fwd[2] = {h + 1, 2};
        expect_mutation("operand refers to a later node (not topological)", mj, h, "src",
                        int_array(2, fwd), AUTOPAR_ERR_GRAPH, "src[0]", hname);
        int64_t self[2] = {0, h};
        expect_mutation("operand refers to the node itself", mj, h, "src", int_array(2, self),
                        AUTOPAR_ERR_GRAPH, "src[1]", "topological");
        int64_t neg[2] = {-1, 2};
        expect_mutation("negative operand id", mj, h, "src", int_array(2, neg), AUTOPAR_ERR_GRAPH,
                        "src[0]", NULL);
        int64_t nine[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        expect_mutation("9 operands", mj, h, "src", int_array(9, nine), AUTOPAR_ERR_GRAPH,
                        "\"src\"", "8");
        int64_t one[1] = {0};
        expect_mutation("matmul with 1 operand", mj, h, "src", int_array(1, one),
                        AUTOPAR_ERR_INVALID_ARG, hname, "operand");
    }
    expect_mutation("id out of order", mj, 3, "id", cJSON_CreateNumber(7), AUTOPAR_ERR_GRAPH,
                    "\"id\"", "7");
    expect_mutation("missing id", mj, 3, "id", NULL, AUTOPAR_ERR_PARSE, "\"id\"", "node 3");
    expect_mutation("missing name", mj, 3, "name", NULL, AUTOPAR_ERR_PARSE, "\"name\"", "node 3");
    {
        char longname[200];
        memset(longname, 'n', sizeof longname - 1);
        longname[sizeof longname - 1] = '\0';
        expect_mutation("name of 199 characters", mj, 3, "name", cJSON_CreateString(longname),
                        AUTOPAR_ERR_PARSE, "\"name\"", "node 3");
        expect_mutation("duplicate name", mj, 1, "name", cJSON_CreateString("x"),
                        AUTOPAR_ERR_INVALID_ARG, "node 1", "'x'");
    }
    expect_mutation("iattrs with 7 entries", mj, h, "iattrs",
                    cJSON_CreateIntArray((int[]){0, 0, 0, 0, 0, 0, 0}, 7), AUTOPAR_ERR_PARSE,
                    "\"iattrs\"", hname);
    expect_mutation("iattrs[0] = 1e300", mj, h, "iattrs",
                    cJSON_CreateDoubleArray((double[]){1e300, 0, 0, 0, 0, 0, 0, 0}, 8),
                    AUTOPAR_ERR_PARSE, "iattrs[0]", "2^53");
    {
        cJSON *fa = cJSON_CreateArray();
        for (int i = 0; i < 6; i++)
            cJSON_AddItemToArray(fa, i == 2 ? cJSON_CreateTrue() : cJSON_CreateNumber(0));
        expect_mutation("fattrs[2] = true", mj, h, "fattrs", fa, AUTOPAR_ERR_PARSE, "fattrs[2]",
                        "boolean");
        fa = cJSON_CreateArray();
        for (int i = 0; i < 6; i++)
            cJSON_AddItemToArray(fa, i == 0 ? cJSON_CreateString("infinity") : cJSON_CreateNumber(0));
        expect_mutation("fattrs[0] = \"infinity\"", mj, h, "fattrs", fa, AUTOPAR_ERR_PARSE,
                        "fattrs[0]", NULL);
    }
    expect_mutation("grad out of range", mj, h, "grad", cJSON_CreateNumber(9999), AUTOPAR_ERR_GRAPH,
                    "\"grad\"", hname);
    expect_mutation("assign_to out of range", mj, h, "assign_to", cJSON_CreateNumber(-2),
                    AUTOPAR_ERR_GRAPH, "\"assign_to\"", hname);
    expect_mutation("assign_to names an input (fails validation)", mj, relu, "assign_to",
                    cJSON_CreateNumber(0), AUTOPAR_ERR_GRAPH, "assign_to", NULL);
    {
        char *m = mutate(mj, -1, "nodes", NULL);
        cJSON *root = cJSON_Parse(mj);
        if (root) {
            cJSON *nodes = cJSON_GetObjectItemCaseSensitive(root, "nodes");
            cJSON_ReplaceItemInArray(nodes, 2, cJSON_CreateNumber(5));
            char *p = cJSON_PrintUnformatted(root);
            if (p) expect_error("a node that is a number", p, AUTOPAR_ERR_PARSE, "node 2", "number");
            cJSON_free(p);
            cJSON_Delete(root);
        }
        free(m);
    }

    /* NULL arguments */
    {
        autopar_graph *g = (autopar_graph *)(uintptr_t)1;
        autopar_status s = autopar_graph_from_json(NULL, &g);
        CHECK(s == AUTOPAR_ERR_INVALID_ARG && g == NULL && strstr(autopar_last_error(), "json"),
              "from_json(NULL text) -> invalid argument: \"%s\"", autopar_last_error());
        s = autopar_graph_from_json(mj, NULL);
        CHECK(s == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "out"),
              "from_json(out NULL) -> invalid argument: \"%s\"", autopar_last_error());
        char *t = (char *)1;
        s = autopar_graph_to_json(NULL, &t);
        CHECK(s == AUTOPAR_ERR_INVALID_ARG && t == NULL && strstr(autopar_last_error(), "graph"),
              "to_json(NULL graph) -> invalid argument: \"%s\"", autopar_last_error());
        s = autopar_graph_to_json(mlp, NULL);
        CHECK(s == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "out"),
              "to_json(out NULL) -> invalid argument: \"%s\"", autopar_last_error());
        s = autopar_graph_save(NULL, "/tmp/x.json");
        CHECK(s == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "graph"),
              "save(NULL graph) -> invalid argument: \"%s\"", autopar_last_error());
        s = autopar_graph_save(mlp, NULL);
        CHECK(s == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "path"),
              "save(NULL path) -> invalid argument: \"%s\"", autopar_last_error());
        g = (autopar_graph *)(uintptr_t)1;
        s = autopar_graph_load(NULL, &g);
        CHECK(s == AUTOPAR_ERR_INVALID_ARG && g == NULL && strstr(autopar_last_error(), "path"),
              "load(NULL path) -> invalid argument: \"%s\"", autopar_last_error());
        s = autopar_graph_load("/tmp/x.json", NULL);
        CHECK(s == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "out"),
              "load(out NULL) -> invalid argument: \"%s\"", autopar_last_error());
    }

    /* a graph with a sticky error cannot be written */
    {
        autopar_graph *g = build_mlp(NULL);
        if (g) {
            int64_t sh[2] = {3, 3};
            autopar_tensor *a = autopar_input(g, "a", AUTOPAR_F32, 2, sh, 0);
            autopar_matmul(g, a, autopar_graph_find(g, "w0")); /* [3,3] x [16,64]: shape error */
            char *t = (char *)1;
            autopar_status s = autopar_graph_to_json(g, &t);
            CHECK(s == AUTOPAR_ERR_GRAPH && t == NULL && strstr(autopar_last_error(), "sticky"),
                  "to_json of a graph with a sticky error -> graph error: \"%s\"",
                  autopar_last_error());
            autopar_graph_free(g);
        }
    }

out:
    free(mj);
    free(gj);
    autopar_graph_free(mlp);
    autopar_graph_free(gpt);
}

/* Every prefix and many single-byte corruptions of a document: never a crash, and whatever
 * is accepted writes back to a document that is accepted again. */
static void test_robustness(void) {
    printf("== robustness\n");
    autopar_graph *g = build_mlp(NULL);
    char *j = NULL;
    if (!g || autopar_graph_to_json(g, &j) != AUTOPAR_OK) {
        CHECK(0, "robustness: base document");
        autopar_graph_free(g);
        return;
    }
    size_t len = strlen(j);
    char *buf = malloc(len + 1);
    if (!buf) { free(j); autopar_graph_free(g); return; }
    int prefix_bad = 0;
    for (size_t n = 0; n < len; n++) {
        memcpy(buf, j, n);
        buf[n] = '\0';
        autopar_graph *r = NULL;
        autopar_status s = autopar_graph_from_json(buf, &r);
        /* only a prefix that still holds the complete object (whitespace trimmed) may succeed */
        if (s == AUTOPAR_OK) {
            size_t k = len;
            while (k > 0 && (j[k - 1] == '\n' || j[k - 1] == ' ')) k--;
            if (n < k) prefix_bad++;
        } else if (r != NULL || autopar_last_error()[0] == '\0') {
            prefix_bad++;
        }
        autopar_graph_free(r);
    }
    CHECK(prefix_bad == 0, "every proper prefix of a %zu-byte document is rejected with a message", len);

    uint64_t rng = 0x9e3779b97f4a7c15ULL;
    const char alphabet[] = "{}[],:\"0123456789-.eE \\ntruefalsnul";
    int accepted = 0, rejected = 0, bad = 0;
    for (int it = 0; it < 20000; it++) {
        memcpy(buf, j, len + 1);
        int edits = 1 + (int)(it % 3);
        for (int e = 0; e < edits; e++) {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            size_t pos = (size_t)(rng % len);
            buf[pos] = alphabet[(rng >> 32) % (sizeof alphabet - 1)];
        }
        autopar_graph *r = NULL;
        autopar_status s = autopar_graph_from_json(buf, &r);
        if (s == AUTOPAR_OK) {
            accepted++;
            char *t = NULL;
            autopar_graph *r2 = NULL;
            if (autopar_graph_to_json(r, &t) != AUTOPAR_OK || autopar_graph_from_json(t, &r2) != AUTOPAR_OK ||
                !graphs_equal(r, r2))
                bad++;
            free(t);
            autopar_graph_free(r2);
        } else {
            rejected++;
            if (r != NULL || autopar_last_error()[0] == '\0') bad++;
        }
        autopar_graph_free(r);
    }
    CHECK(bad == 0, "20000 corrupted documents: %d accepted (and round-trip), %d rejected, %d bad",
          accepted, rejected, bad);
    free(buf);
    free(j);
    autopar_graph_free(g);
}

static void test_files(void) {
    printf("== files\n");
    gpt_handles gh;
    autopar_graph *g = build_gpt(&gh);
    if (!g) { CHECK(0, "files: graph"); return; }
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    if (autopar_build_training(g, gh.loss, &o) != AUTOPAR_OK) {
        CHECK(0, "files: training graph: %s", autopar_last_error());
        autopar_graph_free(g);
        return;
    }
    const char *tmpdir = getenv("TMPDIR");
    char path[512];
    snprintf(path, sizeof path, "%s/autopar_graph_XXXXXX", tmpdir && *tmpdir ? tmpdir : "/tmp");
    int fd = mkstemp(path);
    CHECK(fd >= 0, "temporary file %s", path);
    if (fd < 0) { autopar_graph_free(g); return; }
    close(fd);

    autopar_status s = autopar_graph_save(g, path);
    CHECK(s == AUTOPAR_OK, "save to %s %s", path, s ? autopar_last_error() : "");
    autopar_graph *l = NULL;
    s = autopar_graph_load(path, &l);
    CHECK(s == AUTOPAR_OK && l, "load from %s %s", path, s ? autopar_last_error() : "");
    if (l) {
        CHECK(graphs_equal(g, l), "loaded graph equals the saved one");
        char *a = NULL, *b = NULL;
        autopar_graph_to_json(g, &a);
        autopar_graph_to_json(l, &b);
        CHECK(a && b && strcmp(a, b) == 0, "loaded graph writes the same JSON");
        /* the file holds exactly to_json's text */
        FILE *f = fopen(path, "rb");
        if (f && a) {
            size_t n = strlen(a);
            char *c = malloc(n + 2);
            size_t r = c ? fread(c, 1, n + 1, f) : 0;
            CHECK(c && r == n && memcmp(a, c, n) == 0, "file content is the to_json text");
            free(c);
        }
        if (f) fclose(f);
        free(a);
        free(b);
        autopar_graph_free(l);
    }

    /* a file with a NUL byte, and a file with an error: the message names the path */
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite("{\"format\"\0}", 1, 11, f);
        fclose(f);
        l = (autopar_graph *)(uintptr_t)1;
        s = autopar_graph_load(path, &l);
        CHECK(s == AUTOPAR_ERR_PARSE && l == NULL && strstr(autopar_last_error(), path),
              "load of a file with a NUL byte -> parse error: \"%s\"", autopar_last_error());
    }
    f = fopen(path, "wb");
    if (f) {
        fputs("{\"format\": \"autopar-graph\", \"version\": 1, \"current_layer\": 0, \"loss\": -1,\n"
              " \"optimizer\": null, \"nodes\": [\n"
              " {\"id\": 0, \"op\": \"conv2d\", \"name\": \"c\", \"dtype\": \"f32\", \"shape\": [1]}]}\n",
              f);
        fclose(f);
        s = autopar_graph_load(path, &l);
        CHECK(s == AUTOPAR_ERR_UNKNOWN_OP && strstr(autopar_last_error(), path) &&
                  strstr(autopar_last_error(), "conv2d"),
              "load of a file with an unknown op: \"%s\"", autopar_last_error());
    }
    remove(path);

    l = (autopar_graph *)(uintptr_t)1;
    s = autopar_graph_load("/nonexistent-autopar-dir/graph.json", &l);
    CHECK(s == AUTOPAR_ERR_IO && l == NULL &&
              strstr(autopar_last_error(), "/nonexistent-autopar-dir/graph.json") &&
              strstr(autopar_last_error(), "No such file"),
          "load of a missing path -> I/O error: \"%s\"", autopar_last_error());
    s = autopar_graph_save(g, "/nonexistent-autopar-dir/graph.json");
    CHECK(s == AUTOPAR_ERR_IO && strstr(autopar_last_error(), "/nonexistent-autopar-dir/graph.json"),
          "save into a missing directory -> I/O error: \"%s\"", autopar_last_error());
    s = autopar_graph_load(tmpdir && *tmpdir ? tmpdir : "/tmp", &l);
    CHECK(s == AUTOPAR_ERR_IO && l == NULL, "load of a directory -> I/O error: \"%s\"",
          autopar_last_error());
    autopar_graph_free(g);
}

/* The text does not depend on the C locale's decimal separator. */
static void test_locale(void) {
    printf("== locale\n");
    autopar_graph *g = build_misc();
    char *a = NULL, *b = NULL;
    if (!g || autopar_graph_to_json(g, &a) != AUTOPAR_OK) {
        CHECK(0, "locale: base document");
        autopar_graph_free(g);
        return;
    }
    const char *names[] = {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "ru_RU.UTF-8"};
    const char *got = NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !got; i++)
        got = setlocale(LC_NUMERIC, names[i]);
    if (!got) {
        printf("skip no comma-decimal locale installed\n");
    } else {
        autopar_graph *r = NULL;
        autopar_status s = autopar_graph_to_json(g, &b);
        CHECK(s == AUTOPAR_OK && strcmp(a, b) == 0, "to_json under LC_NUMERIC=%s is unchanged", got);
        s = autopar_graph_from_json(a, &r);
        CHECK(s == AUTOPAR_OK && graphs_equal(g, r), "from_json under LC_NUMERIC=%s is exact", got);
        autopar_graph_free(r);
        setlocale(LC_NUMERIC, "C");
    }
    free(a);
    free(b);
    autopar_graph_free(g);
}

int main(void) {
    test_round_trips();
    test_errors();
    test_robustness();
    test_files();
    test_locale();
    printf("%d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
