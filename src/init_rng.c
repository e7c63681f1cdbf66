/*
 * Counter-based random numbers for parameter initialisation. A value depends only on
 * (seed, parameter name, element index), never on the order in which elements are produced,
 * so every rank can initialise exactly its shard and match a single-device run bit for bit.
 */
#include "internal.h"

#include <math.h>

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

uint64_t ap_hash_name(const char *name) {
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* Uniform in (0, 1): 53 random bits, offset by half a step so 0 never occurs. */
static double uniform01(uint64_t key, uint64_t counter) {
    uint64_t r = splitmix64(key ^ splitmix64(counter));
    return ((double)(r >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

double ap_init_value(autopar_init init, double scale, int64_t fan_in, uint64_t seed,
                     uint64_t name_hash, int64_t index) {
    if (scale == 0.0) scale = 1.0 / sqrt((double)(fan_in > 0 ? fan_in : 1));
    uint64_t key = splitmix64(seed) ^ name_hash;
    switch (init) {
    case AUTOPAR_INIT_ZEROS: return 0.0;
    case AUTOPAR_INIT_ONES: return 1.0;
    case AUTOPAR_INIT_UNIFORM: return scale * (2.0 * uniform01(key, (uint64_t)index) - 1.0);
    case AUTOPAR_INIT_NORMAL: {
        /* Box-Muller on two independent counters per element. */
        double u1 = uniform01(key, 2 * (uint64_t)index), u2 = uniform01(key, 2 * (uint64_t)index + 1);
        return scale * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
    }
    default: return 0.0;
    }
}

void ap_param_init_host(const ap_node *n, uint64_t seed, autopar_precision p, int64_t first,
                        int64_t count, void *dst) {
    int64_t fan_in = n->shape.ndim > 0 ? n->shape.dim[0] : 1;
    uint64_t h = ap_hash_name(n->name);
    autopar_init init = (autopar_init)n->attrs.i[0];
    for (int64_t k = 0; k < count; k++) {
        double v = ap_init_value(init, n->attrs.f[0], fan_in, seed, h, first + k);
        if (p == AUTOPAR_PRECISION_F64)
            ((double *)dst)[k] = v;
        else
            ((float *)dst)[k] = (float)v;
    }
}
