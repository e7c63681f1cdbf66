/*
 * Bad input to the graph API: every case must return the specific status, leave a message that
 * names the op / tensor / shape at fault, and never crash. Also: the sticky error, topological
 * order, layer and phase tags.
 */
#include "autopar.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...)                                                                         \
    do {                                                                                         \
        if (!(cond)) {                                                                           \
            printf("FAIL line %d: ", __LINE__);                                                  \
            printf(__VA_ARGS__);                                                                 \
            printf("\n");                                                                        \
            failures++;                                                                          \
        }                                                                                        \
    } while (0)

/* The status is `want` and the message contains every given fragment. */
static void expect_error(const char *label, autopar_status got, autopar_status want,
                         const char *msg, const char *frag1, const char *frag2) {
    bool ok = got == want && strstr(msg, frag1) && (!frag2 || strstr(msg, frag2));
    if (!ok) {
        printf("FAIL %s: status %s (want %s), message \"%s\" (want \"%s\"%s%s)\n", label,
               autopar_status_str(got), autopar_status_str(want), msg, frag1, frag2 ? ", " : "",
               frag2 ? frag2 : "");
        failures++;
    } else {
        printf("ok   %-40s %s: %s\n", label, autopar_status_str(got), msg);
    }
}

static autopar_graph *fresh(void) {
    autopar_graph *g = NULL;
    CHECK(autopar_graph_new(&g) == AUTOPAR_OK && g, "graph_new");
    return g;
}

int main(void) {
    /* NULL handles */
    CHECK(autopar_graph_new(NULL) == AUTOPAR_ERR_INVALID_ARG, "graph_new(NULL)");
    CHECK(autopar_matmul(NULL, NULL, NULL) == NULL, "matmul on NULL graph");
    CHECK(strstr(autopar_last_error(), "graph is NULL"), "message for NULL graph");
    CHECK(autopar_graph_status(NULL) == AUTOPAR_ERR_INVALID_ARG, "status(NULL)");
    autopar_graph_free(NULL);
    autopar_executor_free(NULL);

    autopar_graph *g = fresh();
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){8, 16}, 0);
    CHECK(autopar_add(g, x, NULL) == NULL, "add with NULL operand");
    expect_error("NULL operand", autopar_graph_status(g), AUTOPAR_ERR_INVALID_ARG,
                 autopar_graph_error(g), "operand 1 is NULL", NULL);
    autopar_graph_free(g);

    /* shape mismatch names op, tensors and shapes; the error is sticky */
    g = fresh();
    x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){8, 16}, 0);
    autopar_tensor *w = autopar_param(g, "w1", 2, (int64_t[]){32, 4}, AUTOPAR_INIT_NORMAL, 0);
    autopar_tensor *h = autopar_matmul(g, x, w);
    CHECK(h == NULL, "matmul [8,16] x [32,4] must fail");
    expect_error("matmul inner dims", autopar_graph_status(g), AUTOPAR_ERR_SHAPE,
                 autopar_graph_error(g), "'w1' [32, 4]", "'x' [8, 16]");
    autopar_tensor *r = autopar_relu(g, h);
    CHECK(r == NULL, "builders after an error return NULL");
    autopar_tensor *ok_op = autopar_relu(g, x);
    CHECK(ok_op == NULL, "sticky: even valid ops fail after the first error");
    expect_error("sticky keeps first error", autopar_graph_status(g), AUTOPAR_ERR_SHAPE,
                 autopar_graph_error(g), "matmul", "w1");
    autopar_executor *ex = NULL;
    expect_error("executor on failed graph", autopar_executor_new(g, 1, AUTOPAR_PRECISION_F32, &ex),
                 AUTOPAR_ERR_GRAPH, autopar_last_error(), "matmul", NULL);
    CHECK(ex == NULL, "out set to NULL on failure");
    autopar_graph_free(g);

    /* dtypes */
    g = fresh();
    autopar_tensor *table = autopar_param(g, "wte", 2, (int64_t[]){10, 4}, AUTOPAR_INIT_NORMAL, 0);
    autopar_tensor *fid = autopar_input(g, "ids_f", AUTOPAR_F32, 1, (int64_t[]){6}, 0);
    CHECK(autopar_embedding(g, table, fid) == NULL, "embedding with f32 ids");
    expect_error("embedding f32 ids", autopar_graph_status(g), AUTOPAR_ERR_DTYPE,
                 autopar_graph_error(g), "ids_f", "i32");
    autopar_graph_free(g);

    g = fresh();
    autopar_tensor *logits = autopar_input(g, "logits", AUTOPAR_F32, 2, (int64_t[]){4, 10}, 0);
    autopar_tensor *lab = autopar_input(g, "labels", AUTOPAR_F32, 1, (int64_t[]){4}, 0);
    CHECK(autopar_cross_entropy(g, logits, lab) == NULL, "cross entropy with f32 labels");
    expect_error("cross entropy f32 labels", autopar_graph_status(g), AUTOPAR_ERR_DTYPE,
                 autopar_graph_error(g), "labels", NULL);
    autopar_graph_free(g);

    g = fresh();
    autopar_tensor *ids = autopar_input(g, "ids", AUTOPAR_I32, 1, (int64_t[]){6}, 0);
    CHECK(autopar_relu(g, ids) == NULL, "relu of i32");
    expect_error("relu of i32", autopar_graph_status(g), AUTOPAR_ERR_DTYPE, autopar_graph_error(g),
                 "'ids'", NULL);
    autopar_graph_free(g);

    g = fresh();
    CHECK(autopar_input(g, "bad", (autopar_dtype)7, 1, (int64_t[]){3}, 0) == NULL, "bad dtype");
    expect_error("invalid dtype value", autopar_graph_status(g), AUTOPAR_ERR_DTYPE,
                 autopar_graph_error(g), "bad", NULL);
    autopar_graph_free(g);

    /* other shape errors */
    struct {
        const char *label;
        int which;
        autopar_status want;
        const char *frag;
    } shape_cases[] = {
        {"add non-suffix bias", 0, AUTOPAR_ERR_SHAPE, "suffix"},
        {"reshape element count", 1, AUTOPAR_ERR_SHAPE, "96 elements"},
        {"split not divisible", 2, AUTOPAR_ERR_SHAPE, "cannot be split into 5"},
        {"axis out of range", 3, AUTOPAR_ERR_INVALID_ARG, "axis 3"},
        {"causal softmax non-square", 4, AUTOPAR_ERR_SHAPE, "square"},
        {"rank above 4", 5, AUTOPAR_ERR_SHAPE, "rank 5"},
        {"zero dim", 6, AUTOPAR_ERR_SHAPE, "dims must be positive"},
        {"duplicate name", 7, AUTOPAR_ERR_INVALID_ARG, "already exists"},
        {"bad permutation", 8, AUTOPAR_ERR_INVALID_ARG, "permutation"},
        {"layernorm gain shape", 9, AUTOPAR_ERR_SHAPE, "'g'"},
        {"batch_matmul batch dims", 10, AUTOPAR_ERR_SHAPE, "batch dim 0"},
        {"concat mismatch", 11, AUTOPAR_ERR_SHAPE, "operand 1"},
        {"bad batch dim", 12, AUTOPAR_ERR_INVALID_ARG, "batch_dim"},
    };
    for (size_t i = 0; i < sizeof shape_cases / sizeof shape_cases[0]; i++) {
        g = fresh();
        autopar_tensor *a = autopar_input(g, "a", AUTOPAR_F32, 3, (int64_t[]){4, 6, 4}, 0);
        autopar_tensor *parts[5];
        switch (shape_cases[i].which) {
        case 0: autopar_add(g, a, autopar_param(g, "b", 1, (int64_t[]){6}, 0, 0)); break;
        case 1: autopar_reshape(g, a, 2, (int64_t[]){10, 10}); break;
        case 2: autopar_split(g, a, 1, 5, parts); break;
        case 3: autopar_sum(g, a, 3); break;
        case 4: autopar_softmax(g, a, 1); break;
        case 5: autopar_input(g, "r5", AUTOPAR_F32, 5, (int64_t[]){1, 2, 3, 4, 5}, 0); break;
        case 6: autopar_param(g, "z", 2, (int64_t[]){3, 0}, 0, 0); break;
        case 7: autopar_input(g, "a", AUTOPAR_F32, 1, (int64_t[]){3}, 0); break;
        case 8: autopar_permute(g, a, (int[]){0, 0, 1}); break;
        case 9: autopar_layernorm(g, a, autopar_param(g, "g", 1, (int64_t[]){5}, 1, 0),
                                  autopar_param(g, "bb", 1, (int64_t[]){4}, 0, 0), 1e-5f); break;
        case 10: autopar_batch_matmul(g, a, autopar_input(g, "c", AUTOPAR_F32, 3,
                                                          (int64_t[]){3, 4, 6}, 0), 0, 0); break;
        case 11: autopar_concat(g, 2, (autopar_tensor *[]){a, autopar_input(g, "d", AUTOPAR_F32, 3,
                                (int64_t[]){4, 5, 5}, 0)}, 2); break;
        case 12: autopar_input(g, "e", AUTOPAR_F32, 2, (int64_t[]){3, 3}, 2); break;
        }
        expect_error(shape_cases[i].label, autopar_graph_status(g), shape_cases[i].want,
                     autopar_graph_error(g), shape_cases[i].frag, NULL);
        autopar_graph_free(g);
    }

    /* autodiff / optimizer misuse */
    g = fresh();
    x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){4, 3}, 0);
    w = autopar_param(g, "w", 2, (int64_t[]){3, 2}, AUTOPAR_INIT_NORMAL, 0);
    h = autopar_matmul(g, x, w);
    expect_error("backward of non-scalar", autopar_backward(g, h), AUTOPAR_ERR_SHAPE,
                 autopar_last_error(), "must be an f32 scalar", NULL);
    autopar_graph_free(g);

    g = fresh();
    x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){4, 3}, 0);
    autopar_tensor *l = autopar_mean_all(g, x);
    expect_error("no parameter reaches loss", autopar_backward(g, l), AUTOPAR_ERR_GRAPH,
                 autopar_last_error(), "no parameter", NULL);
    autopar_graph_free(g);

    g = fresh();
    x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){4, 3}, 0);
    w = autopar_param(g, "w", 2, (int64_t[]){3, 2}, AUTOPAR_INIT_NORMAL, 0);
    l = autopar_mean_all(g, autopar_matmul(g, x, w));
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    expect_error("optimizer before backward", autopar_apply_optimizer(g, &o), AUTOPAR_ERR_GRAPH,
                 autopar_last_error(), "autopar_backward first", NULL);
    autopar_graph_free(g);

    g = fresh();
    x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){4, 3}, 0);
    w = autopar_param(g, "w", 2, (int64_t[]){3, 2}, AUTOPAR_INIT_NORMAL, 0);
    l = autopar_mean_all(g, autopar_matmul(g, x, w));
    o.lr = -1.0f;
    expect_error("negative learning rate", autopar_build_training(g, l, &o),
                 AUTOPAR_ERR_INVALID_ARG, autopar_last_error(), "lr", NULL);
    autopar_graph_free(g);

    /* a correct training graph: tags, order, validation, executor argument checks */
    g = fresh();
    x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){4, 3}, 0);
    w = autopar_param(g, "w", 2, (int64_t[]){3, 5}, AUTOPAR_INIT_NORMAL, 0);
    h = autopar_relu(g, autopar_matmul(g, x, w));
    CHECK(autopar_mark_pipeline_boundary(g) == AUTOPAR_OK, "boundary");
    autopar_tensor *w2 = autopar_param(g, "w2", 2, (int64_t[]){5, 1}, AUTOPAR_INIT_NORMAL, 0);
    autopar_tensor *y = autopar_input(g, "y", AUTOPAR_F32, 2, (int64_t[]){4, 1}, 0);
    l = autopar_mse_loss(g, autopar_matmul(g, h, w2), y);
    autopar_optimizer_default(&o);
    CHECK(autopar_build_training(g, l, &o) == AUTOPAR_OK, "build training: %s", autopar_last_error());
    CHECK(autopar_graph_validate(g) == AUTOPAR_OK, "validate: %s", autopar_last_error());
    CHECK(autopar_tensor_layer(w) == 0 && autopar_tensor_layer(w2) == 1, "layers of params");
    autopar_tensor *gw = autopar_grad(g, w), *gw2 = autopar_grad(g, w2);
    CHECK(gw && gw2 && strcmp(autopar_tensor_name(gw), "w.grad") == 0, "gradient named w.grad");
    CHECK(gw && autopar_tensor_layer(gw) == 0 && autopar_tensor_phase(gw) == AUTOPAR_PHASE_BACKWARD,
          "gradient of w: layer 0, backward phase");
    CHECK(gw2 && autopar_tensor_layer(gw2) == 1, "gradient of w2 in layer 1");
    int n_update = 0, n_state = 0;
    for (int i = 0; i < autopar_graph_size(g); i++) {
        autopar_tensor *t = autopar_graph_tensor(g, i);
        n_update += autopar_tensor_kind(t) == AUTOPAR_KIND_UPDATE;
        n_state += autopar_tensor_kind(t) == AUTOPAR_KIND_OPT_STATE;
    }
    CHECK(n_update == 6 && n_state == 4, "AdamW: 3 updates and 2 states per parameter, got %d, %d",
          n_update, n_state);
    CHECK(autopar_graph_find(g, "w.adam_m") != NULL, "optimizer state named");
    CHECK(autopar_graph_find(g, "nope") == NULL, "find missing");
    expect_error("find missing name", AUTOPAR_ERR_NOT_FOUND, AUTOPAR_ERR_NOT_FOUND,
                 autopar_last_error(), "'nope'", NULL);
    expect_error("backward twice", autopar_backward(g, l), AUTOPAR_ERR_GRAPH, autopar_last_error(),
                 "already built", NULL);
    autopar_graph_free(g);

    g = fresh();
    x = autopar_input(g, "x", AUTOPAR_F32, 2, (int64_t[]){4, 3}, 0);
    w = autopar_param(g, "w", 2, (int64_t[]){3, 2}, AUTOPAR_INIT_NORMAL, 0);
    l = autopar_mean_all(g, autopar_matmul(g, x, w));
    autopar_build_training(g, l, &o);
    CHECK(autopar_executor_new(g, 1, AUTOPAR_PRECISION_F32, &ex) == AUTOPAR_OK, "executor");
    float buf[12] = {0};
    expect_error("write wrong element count", autopar_executor_write(ex, x, buf, 5),
                 AUTOPAR_ERR_SHAPE, autopar_last_error(), "'x' [4, 3] has 12 elements", NULL);
    expect_error("write a computed tensor", autopar_executor_write(ex, autopar_grad(g, w), buf, 6),
                 AUTOPAR_ERR_INVALID_ARG, autopar_last_error(), "w.grad", NULL);
    expect_error("write NULL tensor", autopar_executor_write(ex, NULL, buf, 5),
                 AUTOPAR_ERR_INVALID_ARG, autopar_last_error(), "NULL", NULL);
    autopar_executor_free(ex);
    autopar_graph_free(g);

    /* an out-of-range token id is an execution error naming the tensor, not a crash */
    g = fresh();
    table = autopar_param(g, "wte", 2, (int64_t[]){10, 4}, AUTOPAR_INIT_NORMAL, 0);
    ids = autopar_input(g, "tokens", AUTOPAR_I32, 1, (int64_t[]){3}, 0);
    autopar_tensor *emb = autopar_embedding(g, table, ids);
    l = autopar_mean_all(g, emb);
    CHECK(autopar_backward(g, l) == AUTOPAR_OK, "backward");
    CHECK(autopar_executor_new(g, 1, AUTOPAR_PRECISION_F32, &ex) == AUTOPAR_OK, "executor");
    int32_t bad_ids[3] = {1, 12, 3};
    autopar_executor_write(ex, ids, bad_ids, 3);
    expect_error("token id out of range", autopar_executor_forward(ex, NULL),
                 AUTOPAR_ERR_INVALID_ARG, autopar_last_error(), autopar_tensor_name(emb), "12");
    autopar_executor_free(ex);
    autopar_graph_free(g);

    printf("%d failures\n", failures);
    return failures ? 1 : 0;
}
