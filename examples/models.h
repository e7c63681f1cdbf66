/*
 * Model builders shared by the examples, the tests and the benchmarks. Each builds a forward
 * graph through the public API only and returns its scalar loss.
 */
#ifndef AUTOPAR_MODELS_H
#define AUTOPAR_MODELS_H

#include "autopar.h"

/* The Alpa tutorial MLP: dense dim -> 4·dim -> dim -> 4·dim -> dim with ReLU between layers
 * (none after the last), MSE loss against a target. Inputs "x" [batch, dim] and "y" [batch, dim]
 * (batch dim 0). Parameters "w0".."w3" and "b0".."b3". With mark_layers != 0 a pipeline
 * boundary is marked after each dense layer but the last. */
typedef struct mlp_config {
    int64_t batch;
    int64_t dim;
    int     mark_layers;
} mlp_config;

autopar_status model_mlp_build(autopar_graph *g, const mlp_config *c, autopar_tensor **loss);

/* A batch of the regression task y = W·x + b with a fixed random "teacher" W, b drawn from
 * teacher_seed (the same for every step) and x ~ N(0, 1) drawn from (batch_seed, step).
 * x and y are [batch, dim] row-major. */
void model_mlp_batch(const mlp_config *c, uint64_t teacher_seed, uint64_t batch_seed, int64_t step,
                     float *x, float *y);

/* A GPT-2 style decoder: token + learned position embeddings, `layers` pre-LN blocks (causal
 * multi-head attention with a fused qkv projection whose columns are grouped per head
 * ([H][q|k|v][D], as in Megatron), GELU MLP of width 4·hidden, residuals), final
 * LayerNorm, LM head tied to the token embedding, cross-entropy. Inputs "tokens" and "targets"
 * (I32, [batch, seq], batch dim 0). With mark_layers != 0 a pipeline boundary follows each
 * block. */
typedef struct gpt_config {
    int     layers;
    int64_t hidden;
    int     heads;
    int64_t seq;
    int64_t vocab;
    int64_t batch;
    int     mark_layers;
} gpt_config;

autopar_status model_gpt_build(autopar_graph *g, const gpt_config *c, autopar_tensor **loss);

/* Byte-level tokenizer over a text: vocab 256. */
#define MODEL_BYTE_VOCAB 256

/* Loads a text file into a malloc'ed byte buffer (*len bytes). */
autopar_status model_text_load(const char *path, unsigned char **text, int64_t *len);

/* Fills tokens/targets [batch, seq] with windows of the text starting at positions drawn from
 * (seed, step); targets are the tokens shifted by one. */
void model_text_batch(const unsigned char *text, int64_t len, int64_t batch, int64_t seq,
                      uint64_t seed, int64_t step, int32_t *tokens, int32_t *targets);

#endif
