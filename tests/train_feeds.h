/*
 * Shared by tests/test_backend.c (graph runner on the CPU backend) and tests/test_cuda_train.c
 * (graph runner on the CUDA backend): the MLP and GPT test models with their deterministic
 * batches, written into runners and reference executors through a `feed`.
 * Include after autopar.h and models.h.
 */
#ifndef AUTOPAR_TRAIN_FEEDS_H
#define AUTOPAR_TRAIN_FEEDS_H

#include <stdint.h>
#include <stdlib.h>

/* Up to 4 inputs written each step. */
typedef struct feed {
    int             n;
    autopar_tensor *t[4];
    const void     *data[4];
    int64_t         count[4];
} feed;

typedef void (*make_feed_fn)(void *model, int step, feed *f);

/* The MLP's batches (model_mlp_batch with teacher seed 1234 and batch_seed). */
typedef struct mlp_model {
    mlp_config      c;
    uint64_t        batch_seed;
    autopar_tensor *x, *y;
    float          *xb, *yb;
} mlp_model;

__attribute__((unused)) static void mlp_feed(void *model, int step, feed *f) {
    mlp_model *m = model;
    model_mlp_batch(&m->c, 1234, m->batch_seed, step, m->xb, m->yb);
    int64_t n = m->c.batch * m->c.dim;
    *f = (feed){.n = 2, .t = {m->x, m->y}, .data = {m->xb, m->yb}, .count = {n, n}};
}

/* The GPT's batches: a random token stream in [0, vocab) from seed + step * stride, targets =
 * tokens shifted by one. With bad_token set, token bad_pos (-1: the middle one) is
 * vocab + bad_excess, out of range. */
typedef struct gpt_model {
    gpt_config      c;
    uint64_t        seed, stride;
    autopar_tensor *tokens, *targets;
    int32_t        *tok, *tgt;
    int             bad_token;
    int64_t         bad_pos;
    int32_t         bad_excess;
} gpt_model;

static uint64_t feed_lcg(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

__attribute__((unused)) static void gpt_feed(void *model, int step, feed *f) {
    gpt_model *m = model;
    int64_t n = m->c.batch * m->c.seq;
    uint64_t s = m->seed + (uint64_t)step * m->stride;
    int32_t prev = (int32_t)(feed_lcg(&s) % (uint64_t)m->c.vocab);
    for (int64_t i = 0; i < n; i++) {
        m->tok[i] = prev;
        prev = (int32_t)(feed_lcg(&s) % (uint64_t)m->c.vocab);
        m->tgt[i] = prev;
    }
    if (m->bad_token) m->tok[m->bad_pos < 0 ? n / 2 : m->bad_pos] = (int32_t)m->c.vocab + m->bad_excess;
    *f = (feed){.n = 2, .t = {m->tokens, m->targets}, .data = {m->tok, m->tgt}, .count = {n, n}};
}

/* Builds the training graph of m (batch buffers allocated, inputs found) with optimizer o.
 * Errors: those of the builders, AUTOPAR_ERR_NOMEM, AUTOPAR_ERR_NOT_FOUND (an input missing). */
__attribute__((unused)) static autopar_status mlp_model_build(mlp_model *m,
                                                              const autopar_optimizer *o,
                                                              autopar_graph **g) {
    autopar_tensor *loss = NULL;
    int64_t n = m->c.batch * m->c.dim;
    *g = NULL;
    m->xb = malloc((size_t)n * sizeof(float));
    m->yb = malloc((size_t)n * sizeof(float));
    if (!m->xb || !m->yb) return AUTOPAR_ERR_NOMEM;
    autopar_status s = autopar_graph_new(g);
    if (!s) s = model_mlp_build(*g, &m->c, &loss);
    if (!s) s = autopar_build_training(*g, loss, o);
    if (s) return s;
    m->x = autopar_graph_find(*g, "x");
    m->y = autopar_graph_find(*g, "y");
    return m->x && m->y ? AUTOPAR_OK : AUTOPAR_ERR_NOT_FOUND;
}

__attribute__((unused)) static autopar_status gpt_model_build(gpt_model *m,
                                                              const autopar_optimizer *o,
                                                              autopar_graph **g) {
    autopar_tensor *loss = NULL;
    int64_t n = m->c.batch * m->c.seq;
    *g = NULL;
    m->tok = malloc((size_t)n * sizeof(int32_t));
    m->tgt = malloc((size_t)n * sizeof(int32_t));
    if (!m->tok || !m->tgt) return AUTOPAR_ERR_NOMEM;
    autopar_status s = autopar_graph_new(g);
    if (!s) s = model_gpt_build(*g, &m->c, &loss);
    if (!s) s = autopar_build_training(*g, loss, o);
    if (s) return s;
    m->tokens = autopar_graph_find(*g, "tokens");
    m->targets = autopar_graph_find(*g, "targets");
    return m->tokens && m->targets ? AUTOPAR_OK : AUTOPAR_ERR_NOT_FOUND;
}

__attribute__((unused)) static void mlp_model_free(mlp_model *m) {
    free(m->xb);
    free(m->yb);
}

__attribute__((unused)) static void gpt_model_free(gpt_model *m) {
    free(m->tok);
    free(m->tgt);
}

#endif
