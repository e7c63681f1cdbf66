/*
 * Model builders shared by the examples, the tests and the benchmarks (see models.h).
 *
 * Everything here goes through the public API (autopar.h) only. Builders build the whole model
 * and check the graph's sticky status once at the end: a failed op returns NULL, later ops given
 * NULL operands return NULL too, and autopar_graph_status() names the first failure.
 */
#include "models.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Helpers                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/*
 * Records a configuration error on the graph. The public API has no call that stores a
 * caller's message, so we make a builder fail on purpose in a way whose library message quotes
 * our text: an input whose name is too long (>= AUTOPAR_MAX_NAME characters) is rejected with
 * AUTOPAR_ERR_INVALID_ARG and a message that quotes the name. The text is padded to that length.
 * The graph's sticky status is then set, as for any other builder error. Returns that status.
 */
static autopar_status model_fail(autopar_graph *g, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return autopar_graph_fail(g, AUTOPAR_ERR_INVALID_ARG, "%s", msg);
}

/* Builds "fmt" into a name buffer (tensor names are at most AUTOPAR_MAX_NAME - 1 chars). */
static const char *model_name(char *buf, size_t len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
    return buf;
}

/* x·w + b with w [in, out] (init NORMAL with `scale`) and b [out] (zeros). */
static autopar_tensor *model_dense(autopar_graph *g, autopar_tensor *x, const char *wname,
                                   const char *bname, int64_t in, int64_t out, float scale) {
    int64_t wshape[2] = {in, out};
    int64_t bshape[1] = {out};
    autopar_tensor *w = autopar_param(g, wname, 2, wshape, AUTOPAR_INIT_NORMAL, scale);
    autopar_tensor *b = autopar_param(g, bname, 1, bshape, AUTOPAR_INIT_ZEROS, 0.0f);
    return autopar_add(g, autopar_matmul(g, x, w), b);
}

/* ------------------------------------------------------------------------------------------ */
/* Counter-based random numbers (splitmix64 + Box-Muller)                                      */
/* ------------------------------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* A stream key from a seed and a stream number (distinct streams give unrelated numbers). */
static uint64_t rng_key(uint64_t seed, uint64_t stream) {
    return splitmix64(splitmix64(seed) ^ (stream * 0xD1B54A32D192ED03ull));
}

/* Uniform in (0, 1]: never 0, so log() below is finite. */
static double rng_uniform(uint64_t key, uint64_t counter) {
    uint64_t r = splitmix64(key ^ splitmix64(counter));
    return ((double)(r >> 11) + 1.0) * (1.0 / 9007199254740992.0);
}

/* Standard normal number `index` of the stream `key` (Box-Muller; each pair of uniforms gives
 * two normals, cos for even and sin for odd indices). */
static double rng_normal(uint64_t key, uint64_t index) {
    const double two_pi = 6.283185307179586;
    uint64_t pair = index >> 1;
    double u1 = rng_uniform(key, 2 * pair);
    double u2 = rng_uniform(key, 2 * pair + 1);
    double r = sqrt(-2.0 * log(u1));
    return (index & 1) ? r * sin(two_pi * u2) : r * cos(two_pi * u2);
}

/* ------------------------------------------------------------------------------------------ */
/* MLP                                                                                         */
/* ------------------------------------------------------------------------------------------ */

autopar_status model_mlp_build(autopar_graph *g, const mlp_config *c, autopar_tensor **loss) {
    if (loss) *loss = NULL;
    if (!g) return AUTOPAR_ERR_INVALID_ARG;
    if (autopar_graph_status(g) != AUTOPAR_OK) return autopar_graph_status(g);
    if (!c || !loss) return model_fail(g, "model_mlp_build: config or loss is NULL");
    /* Non-positive batch or dim: the inputs below fail with a message naming the dim. */

    int64_t shape[2] = {c->batch, c->dim};
    autopar_tensor *x = autopar_input(g, "x", AUTOPAR_F32, 2, shape, 0);
    autopar_tensor *y = autopar_input(g, "y", AUTOPAR_F32, 2, shape, 0);

    /* dim -> 4dim -> dim -> 4dim -> dim */
    const int64_t width[5] = {c->dim, 4 * c->dim, c->dim, 4 * c->dim, c->dim};
    autopar_tensor *h = x;
    for (int i = 0; i < 4; i++) {
        char wname[16], bname[16];
        model_name(wname, sizeof wname, "w%d", i);
        model_name(bname, sizeof bname, "b%d", i);
        h = model_dense(g, h, wname, bname, width[i], width[i + 1], 0.0f);  /* 1/sqrt(fan_in) */
        if (i < 3) {
            h = autopar_relu(g, h);
            if (c->mark_layers && autopar_graph_status(g) == AUTOPAR_OK)
                (void)autopar_mark_pipeline_boundary(g);
        }
    }
    autopar_tensor *l = autopar_mse_loss(g, h, y);

    autopar_status s = autopar_graph_status(g);
    if (s != AUTOPAR_OK) return s;
    *loss = l;
    return AUTOPAR_OK;
}

void model_mlp_batch(const mlp_config *c, uint64_t teacher_seed, uint64_t batch_seed, int64_t step,
                     float *x, float *y) {
    if (!c || !x || !y || c->batch <= 0 || c->dim <= 0) return;
    const int64_t B = c->batch, D = c->dim;

    /* x ~ N(0, 1), a fresh stream per step. */
    const uint64_t xkey = rng_key(batch_seed, 0x100000000ull + (uint64_t)step);
    for (int64_t i = 0; i < B * D; i++) x[i] = (float)rng_normal(xkey, (uint64_t)i);

    /* y = x·W + b with W [D, D] ~ N(0, 1/D) and b [D] ~ N(0, 0.1^2), fixed by teacher_seed.
     * W is regenerated row by row (no allocation); y accumulates in i-k-j order. */
    const uint64_t wkey = rng_key(teacher_seed, 1);
    const uint64_t bkey = rng_key(teacher_seed, 2);
    const double wstd = 1.0 / sqrt((double)D);
    for (int64_t j = 0; j < D; j++) {
        float bj = (float)(0.1 * rng_normal(bkey, (uint64_t)j));
        for (int64_t i = 0; i < B; i++) y[i * D + j] = bj;
    }
    float *wrow = malloc((size_t)D * sizeof *wrow);
    if (wrow) {
        for (int64_t k = 0; k < D; k++) {
            for (int64_t j = 0; j < D; j++)
                wrow[j] = (float)(wstd * rng_normal(wkey, (uint64_t)(k * D + j)));
            for (int64_t i = 0; i < B; i++) {
                const float xik = x[i * D + k];
                float *yi = y + i * D;
                for (int64_t j = 0; j < D; j++) yi[j] += xik * wrow[j];
            }
        }
        free(wrow);
    } else {
        /* No memory for one row: generate every W element where it is used. */
        for (int64_t i = 0; i < B; i++)
            for (int64_t k = 0; k < D; k++)
                for (int64_t j = 0; j < D; j++)
                    y[i * D + j] += x[i * D + k] *
                                    (float)(wstd * rng_normal(wkey, (uint64_t)(k * D + j)));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* GPT                                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* Causal multi-head self-attention on h [B, T, C] (fused qkv projection), before the residual. */
static autopar_tensor *gpt_attention(autopar_graph *g, const gpt_config *c, int l,
                                     autopar_tensor *h, float proj_std) {
    const int64_t B = c->batch, T = c->seq, C = c->hidden, H = c->heads, D = C / H;
    char wn[AUTOPAR_MAX_NAME], bn[AUTOPAR_MAX_NAME];

    autopar_tensor *qkv = model_dense(g, h, model_name(wn, sizeof wn, "h%d.attn.qkv.w", l),
                                      model_name(bn, sizeof bn, "h%d.attn.qkv.b", l), C, 3 * C,
                                      0.02f);                                   /* [B, T, 3C] */
    /* The fused projection's columns are laid out per head, [H][q|k|v][D] (Megatron's layout),
     * so splitting q, k and v happens on an unsharded last dim and the head dim can be sharded:
     * that is what makes head-parallel (tensor-parallel) attention expressible. */
    const int64_t bth3d[4] = {B, T, H, 3 * D};
    autopar_tensor *per_head = autopar_reshape(g, qkv, 4, bth3d);              /* [B,T,H,3D] */
    autopar_tensor *parts[3] = {NULL, NULL, NULL};
    (void)autopar_split(g, per_head, 3, 3, parts);                              /* 3 x [B,T,H,D] */

    const int to_heads[4] = {0, 2, 1, 3};                       /* [B,T,H,D] <-> [B,H,T,D] */
    autopar_tensor *qkvh[3];
    for (int i = 0; i < 3; i++) qkvh[i] = autopar_permute(g, parts[i], to_heads);

    autopar_tensor *att = autopar_batch_matmul(g, qkvh[0], qkvh[1], 0, 1);     /* [B,H,T,T] */
    att = autopar_scale(g, att, (float)(1.0 / sqrt((double)D)));
    att = autopar_softmax(g, att, 1);
    autopar_tensor *y = autopar_batch_matmul(g, att, qkvh[2], 0, 0);           /* [B,H,T,D] */
    y = autopar_permute(g, y, to_heads);                                       /* [B,T,H,D] */
    const int64_t btc[3] = {B, T, C};
    y = autopar_reshape(g, y, 3, btc);
    return model_dense(g, y, model_name(wn, sizeof wn, "h%d.attn.proj.w", l),
                       model_name(bn, sizeof bn, "h%d.attn.proj.b", l), C, C, proj_std);
}

static autopar_tensor *gpt_layernorm(autopar_graph *g, autopar_tensor *x, int64_t C,
                                     const char *gname, const char *bname) {
    int64_t shape[1] = {C};
    autopar_tensor *gain = autopar_param(g, gname, 1, shape, AUTOPAR_INIT_ONES, 0.0f);
    autopar_tensor *bias = autopar_param(g, bname, 1, shape, AUTOPAR_INIT_ZEROS, 0.0f);
    return autopar_layernorm(g, x, gain, bias, 1e-5f);
}

autopar_status model_gpt_build(autopar_graph *g, const gpt_config *c, autopar_tensor **loss) {
    if (loss) *loss = NULL;
    if (!g) return AUTOPAR_ERR_INVALID_ARG;
    if (autopar_graph_status(g) != AUTOPAR_OK) return autopar_graph_status(g);
    if (!c || !loss) return model_fail(g, "model_gpt_build: config or loss is NULL");
    if (c->layers < 0) return model_fail(g, "model_gpt_build: layers %d < 0", c->layers);
    if (c->heads <= 0 || c->hidden % c->heads != 0)
        return model_fail(g, "model_gpt_build: heads %d must be > 0 and divide hidden %lld",
                          c->heads, (long long)c->hidden);
    /* Non-positive batch, seq, vocab or hidden: the inputs and parameters below fail with a
     * message naming the tensor and the dim. */

    const int64_t B = c->batch, T = c->seq, C = c->hidden, V = c->vocab;
    const float proj_std = (float)(0.02 / sqrt(2.0 * (c->layers > 0 ? c->layers : 1)));
    char n1[AUTOPAR_MAX_NAME], n2[AUTOPAR_MAX_NAME];

    const int64_t bt[2] = {B, T};
    autopar_tensor *tokens = autopar_input(g, "tokens", AUTOPAR_I32, 2, bt, 0);
    autopar_tensor *targets = autopar_input(g, "targets", AUTOPAR_I32, 2, bt, 0);
    const int64_t vc[2] = {V, C}, tc[2] = {T, C};
    autopar_tensor *wte = autopar_param(g, "wte", 2, vc, AUTOPAR_INIT_NORMAL, 0.02f);
    autopar_tensor *wpe = autopar_param(g, "wpe", 2, tc, AUTOPAR_INIT_NORMAL, 0.01f);
    autopar_tensor *x = autopar_add(g, autopar_embedding(g, wte, tokens), wpe);   /* [B, T, C] */

    for (int l = 0; l < c->layers; l++) {
        autopar_tensor *h = gpt_layernorm(g, x, C, model_name(n1, sizeof n1, "h%d.ln1.g", l),
                                          model_name(n2, sizeof n2, "h%d.ln1.b", l));
        x = autopar_add(g, x, gpt_attention(g, c, l, h, proj_std));

        h = gpt_layernorm(g, x, C, model_name(n1, sizeof n1, "h%d.ln2.g", l),
                          model_name(n2, sizeof n2, "h%d.ln2.b", l));
        h = model_dense(g, h, model_name(n1, sizeof n1, "h%d.mlp.fc.w", l),
                        model_name(n2, sizeof n2, "h%d.mlp.fc.b", l), C, 4 * C, 0.02f);
        h = autopar_gelu(g, h);
        h = model_dense(g, h, model_name(n1, sizeof n1, "h%d.mlp.proj.w", l),
                        model_name(n2, sizeof n2, "h%d.mlp.proj.b", l), 4 * C, C, proj_std);
        x = autopar_add(g, x, h);

        /* A boundary after every block but the last: the final LayerNorm and the tied head
         * join the last block's layer, so the graph has max(layers, 1) pipeline layers. */
        if (c->mark_layers && l + 1 < c->layers && autopar_graph_status(g) == AUTOPAR_OK)
            (void)autopar_mark_pipeline_boundary(g);
    }

    x = gpt_layernorm(g, x, C, "lnf.g", "lnf.b");
    autopar_tensor *logits = autopar_matmul_ex(g, x, wte, 0, 1);                 /* [B, T, V] */
    autopar_tensor *l = autopar_cross_entropy(g, logits, targets);

    autopar_status s = autopar_graph_status(g);
    if (s != AUTOPAR_OK) return s;
    *loss = l;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Text data                                                                                   */
/* ------------------------------------------------------------------------------------------ */

autopar_status model_text_load(const char *path, unsigned char **text, int64_t *len) {
    if (text) *text = NULL;
    if (len) *len = 0;
    if (!path || !text || !len) return AUTOPAR_ERR_INVALID_ARG;
    FILE *f = fopen(path, "rb");
    if (!f) return AUTOPAR_ERR_IO;

    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = malloc(cap);
    if (!buf) {
        fclose(f);
        return AUTOPAR_ERR_NOMEM;
    }
    for (;;) {
        if (n == cap) {
            unsigned char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                fclose(f);
                return AUTOPAR_ERR_NOMEM;
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err || n == 0) {
        free(buf);
        return AUTOPAR_ERR_IO;
    }
    *text = buf;
    *len = (int64_t)n;
    return AUTOPAR_OK;
}

void model_text_batch(const unsigned char *text, int64_t len, int64_t batch, int64_t seq,
                      uint64_t seed, int64_t step, int32_t *tokens, int32_t *targets) {
    if (!tokens || !targets || batch <= 0 || seq <= 0) return;
    if (!text || len <= 0) {
        memset(tokens, 0, (size_t)(batch * seq) * sizeof *tokens);
        memset(targets, 0, (size_t)(batch * seq) * sizeof *targets);
        return;
    }
    /* Windows of seq+1 bytes lie inside the text when it is long enough; otherwise they wrap. */
    const uint64_t starts = len > seq + 1 ? (uint64_t)(len - seq) : (uint64_t)len;
    const uint64_t key = rng_key(seed, 0x200000000ull + (uint64_t)step);
    for (int64_t b = 0; b < batch; b++) {
        const int64_t start = (int64_t)(splitmix64(key ^ splitmix64((uint64_t)b)) % starts);
        for (int64_t t = 0; t < seq; t++) {
            tokens[b * seq + t] = text[(start + t) % len];
            targets[b * seq + t] = text[(start + t + 1) % len];
        }
    }
}
