/*
 * Intra-operator pass benchmark: ILP size and build / solve time on GPT training stages.
 *
 * GPT (examples/models.h) with hidden 2048 (16 heads) and 8192 (64 heads, the GPT-39B shape),
 * seq 1024, vocab 51200, micro-batch 8, AdamW, one pipeline layer per block; stages of 1, 2, 8,
 * 24 and 48 blocks (a stage of L blocks = the whole model with L blocks: embedding, blocks,
 * head, loss) on the (1,8), (2,4) and (8,1) logical meshes of one p3.16xlarge host (8 V100),
 * compute cost model, no memory budget. Columns: nodes of the training graph, merged ILP
 * nodes / columns (binary) / rows / nonzeros of the largest ILP solved, ILPs solved, layers
 * whose strategy was reused, build and solve seconds, wall seconds of ap_shard_stage, the
 * plan's objective (estimated step time, s) and per-device peak memory. Rows marked "flat"
 * solve the whole stage as one ILP (no layer reuse) for comparison; they stop at 8 blocks
 * (a 48-block flat ILP takes minutes: DESIGN.md §5).
 *
 * Goal (DESIGN.md §9): a GPT-39B stage on 8 devices in < 1 s on one core.
 * Usage: bench_shard_ilp [max_layers]   (default 48)
 */
#include "autopar.h"
#include "cluster.h"
#include "mesh.h"
#include "models.h"
#include "sharding.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void machine(void) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256], model[256] = "unknown CPU";
    int cores = 0;
    if (f) {
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, "model name", 10) == 0) {
                char *c = strchr(line, ':');
                if (c && cores == 0) {
                    snprintf(model, sizeof model, "%s", c + 2);
                    model[strcspn(model, "\n")] = '\0';
                }
                cores++;
            }
        }
        fclose(f);
    }
    printf("machine: %s, %d logical CPU(s); the pass runs on one core\n", model, cores);
}

static autopar_graph *gpt(int layers, int64_t hidden) {
    autopar_graph *g;
    if (autopar_graph_new(&g)) return NULL;
    gpt_config c = {.layers = layers, .hidden = hidden, .heads = (int)(hidden / 128),
                    .seq = 1024, .vocab = 51200, .batch = 8, .mark_layers = 1};
    autopar_tensor *loss = NULL;
    autopar_optimizer o;
    autopar_optimizer_default(&o);
    if (model_gpt_build(g, &c, &loss) || autopar_build_training(g, loss, &o)) {
        fprintf(stderr, "GPT %d x %lld: %s\n", layers, (long long)hidden, autopar_last_error());
        autopar_graph_free(g);
        return NULL;
    }
    return g;
}

int main(int argc, char **argv) {
    int max_layers = argc > 1 ? atoi(argv[1]) : 48;
    machine();
    autopar_cluster *cl = NULL;
    if (autopar_cluster_preset("p3.16xlarge", 1, 8, &cl)) {
        fprintf(stderr, "%s\n", autopar_last_error());
        return 1;
    }
    static const int layers[] = {1, 2, 8, 24, 48};
    static const int64_t hiddens[] = {2048, 8192};
    static const int meshes[][2] = {{1, 8}, {2, 4}, {8, 1}};
    printf("\n| hidden | blocks | mesh | mode | nodes | ILP nodes | columns (binary) | rows | "
           "nonzeros | ILPs | reused | build s | solve s | wall s | objective s | peak GB |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (int hi = 0; hi < 2; hi++) {
        for (int li = 0; li < 5; li++) {
            if (layers[li] > max_layers) continue;
            autopar_graph *g = gpt(layers[li], hiddens[hi]);
            if (!g) return 1;
            for (int mi = 0; mi < 3; mi++) {
                ap_mesh *m = NULL;
                if (ap_mesh_new_block(cl, 0, 1, 0, 8, meshes[mi][0], meshes[mi][1], &m)) {
                    fprintf(stderr, "%s\n", autopar_last_error());
                    return 1;
                }
                for (int flat = 0; flat < 2; flat++) {
                    if (flat && layers[li] > 8) continue;
                    if (flat && layers[li] < 2) continue;   /* one block: already one ILP */
                    ap_shard_options opt;
                    ap_shard_options_default(&opt);
                    opt.solve_per_layer = !flat;
                    ap_shard_plan *p = NULL;
                    double t0 = now();
                    ap_status st = ap_shard_stage(g, NULL, 0, m, cl, &opt, &p);
                    double wall = now() - t0;
                    if (st) {
                        printf("| %lld | %d | %dx%d | %s | %d | error: %s |\n",
                               (long long)hiddens[hi], layers[li], meshes[mi][0], meshes[mi][1],
                               flat ? "flat" : "layers", g->n_nodes, autopar_last_error());
                        continue;
                    }
                    printf("| %lld | %d | %dx%d | %s | %d | %d | %d (%d) | %d | %d | %d | %d | "
                           "%.3f | %.3f | %.3f | %.4g | %.2f |\n",
                           (long long)hiddens[hi], layers[li], meshes[mi][0], meshes[mi][1],
                           flat ? "flat" : "layers", g->n_nodes, p->n_groups, p->n_cols,
                           p->n_int_cols, p->n_rows, p->n_nonzeros, p->n_solves,
                           p->n_layers_reused, p->build_seconds, p->solve_seconds, wall,
                           p->objective, p->peak_memory / 1e9);
                    fflush(stdout);
                    ap_shard_plan_free(p);
                }
                ap_mesh_free(m);
            }
            autopar_graph_free(g);
        }
    }
    /* With the V100's 16 GB: a stage of a few blocks fits, a longer one does not and the pass
     * must say so quickly (the inter-op pass asks about many such stages). */
    printf("\nWith the 16 GB device memory of a V100 (hidden 8192):\n\n"
           "| blocks | mesh | result | ILPs | wall s |\n|---|---|---|---|---|\n");
    static const int mem_layers[] = {2, 6, 8, 48};
    for (int li = 0; li < 4; li++) {
        if (mem_layers[li] > max_layers) continue;
        autopar_graph *g = gpt(mem_layers[li], 8192);
        if (!g) return 1;
        for (int mi = 0; mi < 3; mi++) {
            ap_mesh *m = NULL;
            if (ap_mesh_new_block(cl, 0, 1, 0, 8, meshes[mi][0], meshes[mi][1], &m)) return 1;
            ap_shard_options opt;
            ap_shard_options_default(&opt);
            opt.memory_budget = 0;   /* the cluster's device memory */
            ap_shard_plan *p = NULL;
            double t0 = now();
            ap_status st = ap_shard_stage(g, NULL, 0, m, cl, &opt, &p);
            double wall = now() - t0;
            if (st == AUTOPAR_OK) {
                printf("| %d | %dx%d | %.4g s, peak %.2f GB | %d | %.3f |\n", mem_layers[li],
                       meshes[mi][0], meshes[mi][1], p->objective, p->peak_memory / 1e9,
                       p->n_solves, wall);
            } else {
                const char *e = autopar_last_error(), *at = strstr(e, "smallest budget that fits is ");
                double need = at ? atof(at + strlen("smallest budget that fits is ")) : 0;
                printf("| %d | %dx%d | %s, needs %.2f GB | - | %.3f |\n", mem_layers[li],
                       meshes[mi][0], meshes[mi][1], st == AUTOPAR_ERR_INFEASIBLE ? "infeasible"
                       : "error", need / 1e9, wall);
            }
            fflush(stdout);
            ap_shard_plan_free(p);
            ap_mesh_free(m);
        }
        autopar_graph_free(g);
    }

    /* The inter-op pass's use: many stage queries sharing a cache. */
    if (max_layers >= 48) {
        autopar_graph *g = gpt(48, 8192);
        ap_mesh *m = NULL;
        ap_shard_cache *cache = NULL;
        if (!g || ap_mesh_new_block(cl, 0, 1, 0, 8, 2, 4, &m) || ap_shard_cache_new(&cache))
            return 1;
        ap_shard_options opt;
        ap_shard_options_default(&opt);
        opt.cache = cache;
        double t0 = now();
        int queries = 0;
        for (int first = 0; first < 48; first += 6) {
            int *nodes = malloc(sizeof(int) * (size_t)g->n_nodes), n = 0;
            for (int id = 0; id < g->n_nodes; id++)
                if (g->nodes[id]->layer >= first && g->nodes[id]->layer < first + 6) nodes[n++] = id;
            ap_shard_plan *p = NULL;
            if (ap_shard_stage(g, nodes, n, m, cl, &opt, &p) == AUTOPAR_OK) queries++;
            else fprintf(stderr, "stage %d: %s\n", first, autopar_last_error());
            ap_shard_plan_free(p);
            free(nodes);
        }
        int entries, hits;
        ap_shard_cache_stats(cache, &entries, &hits);
        printf("\n8 stages of 6 blocks of GPT-39B on 2x4 with a shared cache: %d queries in %.3f s "
               "(%d cached layer solutions, %d cache hits)\n", queries, now() - t0, entries, hits);
        ap_shard_cache_free(cache);
        ap_mesh_free(m);
        autopar_graph_free(g);
    }
    autopar_cluster_free(cl);
    return 0;
}
