/*
 * Internals of the intra-operator pass shared by strategies.c (strategy generation and
 * follower merging), shard_ilp.c (cost assembly, memory rows, GLPK) and shard_plan.c (plans,
 * layer reuse, JSON). Not used outside passes/shard*.c and passes/strategies.c.
 *
 * Vocabulary:
 *  - node strategy (ap_nstrat): what one node does under one strategy of its group: output
 *    spec, operand specs, compute / own-communication / penalty cost, output bytes per device.
 *  - group: a root node and the followers merged into it (Alpa §1.6). All members share one
 *    strategy index: member v's strategy j is derived from its followed node's strategy j. The
 *    ILP has one one-hot vector per group.
 *  - problem: the groups of one ILP with their aggregated costs, the cross-group edge cost
 *    matrices and the memory rows.
 */
#ifndef AUTOPAR_SHARD_INTERNAL_H
#define AUTOPAR_SHARD_INTERNAL_H

#include "sharding.h"

#include <math.h>
#include <stdint.h>

/* Role of a node id in a problem. */
enum { AP_ROLE_NONE = 0, AP_ROLE_STAGE = 1, AP_ROLE_EXTERNAL = 2 };

/* Most specs of one tensor on a 2-D mesh: (rank + 1)^2 axis placements. */
#define AP_SHARD_MAX_SPECS ((AP_MAX_DIMS + 1) * (AP_MAX_DIMS + 1))

typedef struct ap_nstrat {
    ap_spec  out;                 /* output spec                                           */
    ap_spec  aux;                 /* PARAM: state / update-compute spec; else == out        */
    ap_spec  in[AP_MAX_SRC];      /* spec each operand is read in                           */
    double   compute;             /* s                                                      */
    double   penalty;             /* s, replicated penalty (communication-only)             */
    double   comm;                /* s, the op's own collectives                            */
    double   mem;                 /* bytes per device of the output                         */
    int      own_first;           /* the op's own collectives: prob->own[own_first ..]      */
    uint8_t  n_own;
    bool     ok;                  /* false: not realisable for this node                    */
} ap_nstrat;

typedef struct ap_group {
    int      root;                /* node id                                                */
    int      n_strat;
    int      first_member, n_members;   /* node ids in prob->members[]                      */
    int      fixed;               /* -1, or the only strategy allowed (layer reuse)         */
    double  *cost;                /* per strategy: members' costs + intra-group resharding  */
    uint8_t *ok;                  /* per strategy: realisable                               */
} ap_group;

/* Cross-group edge: cost[i * k_b + j] for group a strategy i and group b strategy j (a < b);
 * INFINITY = forbidden pair. Several node edges between the same groups are summed. */
typedef struct ap_gedge {
    int     a, b;
    double *cost;
} ap_gedge;

/* One memory row: const + sum over strategies (global index group_off[g] + j) <= budget. */
typedef struct ap_memrow {
    double  cnst;
    int     nnz;
    int    *var;
    double *coef;
    int     at;                   /* node id at which this live set occurs                  */
} ap_memrow;

typedef struct ap_reshard_cache ap_reshard_cache;

struct ap_shard_problem {
    const autopar_graph   *g;
    const ap_mesh         *mesh;
    const autopar_cluster *cluster;
    ap_shard_options       opt;
    double                 budget;        /* resolved; < 0 = none                           */
    double                 penalty_value; /* Alpa's replicated_penalty (comm-only), else 0  */
    int                    n;             /* g->n_nodes                                     */
    uint8_t               *role;          /* AP_ROLE_* per node id                          */
    int                   *order;         /* stage node ids ascending                       */
    int                    n_order;
    int                   *pos;           /* position in order[], -1 when not in the stage  */
    int                   *layer;         /* layer per node id                              */
    int                   *alias;         /* operand remap for periodic layers, -1 = none   */
    uint8_t               *read;          /* per node id: some node of the graph reads it   */
    int                   *follow;        /* followed node id, -1 = root                    */
    int                   *group;         /* group index per node id, -1                    */
    ap_nstrat            **st;            /* per node id: n_strat entries, NULL if absent   */
    /* Periodic (per-layer) solve: instead of liveness rows, one row
     * reps * sum_{held v} mem_v <= budget - reserve, where held nodes are the layer's
     * parameters, optimizer state and forward tensors kept for the backward pass. */
    bool                  *periodic_held;
    double                 periodic_reps, periodic_reserve;
    /* Layer reuse: per node id, the strategy its group must take when it is a root (-1 = free)
     * and the group size that index refers to (a mismatch is an error). NULL = none. */
    int                   *fixed_by_root;
    int                   *fixed_size_by_root;
    int                    n_groups;
    ap_group              *groups;
    int                   *members;
    int                   *group_off;     /* first global strategy index of each group      */
    int                    n_strat_total;
    ap_collective         *own;           /* pool of the ops' own collectives               */
    int                    n_own, cap_own;
    ap_gedge              *edges;
    int                    n_edges, cap_edges;
    int                   *edge_hash;     /* open addressing over (a, b), -1 = empty        */
    int                    edge_hash_cap;
    ap_memrow             *rows;
    int                    n_rows;
    ap_reshard_cache      *rc;
    bool                   verbose;
    /* statistics of the last solve */
    int                    n_cols, n_int_cols, n_lp_rows, n_nonzeros;
    bool                   optimal;
    bool                   solve_timed_out;   /* last solve hit the time limit unsolved     */
    bool                   hit_time_limit;    /* last solve stopped at the time limit        */
    double                 build_seconds, solve_seconds;
};

/* ---- strategies.c ---------------------------------------------------------------------- */

/* Every spec of a tensor of shape `shape` on mesh m whose splits divide the shape, using only
 * axes of size > 1, S01 only when allow_s01; the replicated spec first. Returns the count
 * (<= AP_SHARD_MAX_SPECS). */
AP_INTERNAL int ap_shard_enum_specs(const ap_mesh *m, const ap_shape *shape, bool allow_s01,
                                    ap_spec *out);

/* Decides follow[] for every node of the problem (roles, layers and alias already set). */
AP_INTERNAL void ap_shard_pick_follow(ap_shard_problem *p);

/* Generates st[v] for every node of the problem in id order (followers after their followed
 * node) and forms the groups (groups, members, group_off).
 * Errors: AUTOPAR_ERR_NOMEM; AUTOPAR_ERR_INFEASIBLE naming a node with no strategy. */
AP_INTERNAL ap_status ap_shard_gen_strategies(ap_shard_problem *p);

/* Bytes per device of a tensor of shape `shape` (elements of elem bytes) under spec s. */
AP_INTERNAL double ap_shard_local_bytes(const ap_mesh *m, const ap_spec *s, const ap_shape *shape,
                                        double elem);

/* Appends a collective to the problem's pool. Returns its index or -1 (no memory). */
AP_INTERNAL int ap_shard_own_push(ap_shard_problem *p, const ap_collective *c);

/* ---- shard_ilp.c ------------------------------------------------------------------------- */

AP_INTERNAL ap_status ap_reshard_cache_new(ap_reshard_cache **out);
AP_INTERNAL void ap_reshard_cache_free(ap_reshard_cache *c);

/* Cost of moving node u's tensor from spec s to spec d on the problem's mesh, under the
 * options (allow_all_gather, force_batch_dim_to_mesh_axis). Returns false when impossible or
 * forbidden. *route (may be NULL) points at the cached route (valid while the cache lives; NULL
 * for a free move). */
AP_INTERNAL bool ap_shard_reshard(ap_shard_problem *p, int u, const ap_spec *s, const ap_spec *d,
                                  double *time, const ap_reshard **route);

/* Allocates the problem skeleton for graph g (arrays sized g->n_nodes, all roles NONE). */
AP_INTERNAL ap_status ap_shard_problem_alloc(const autopar_graph *g, const ap_mesh *mesh,
                                             const autopar_cluster *cluster,
                                             const ap_shard_options *opt, ap_shard_problem **out);

/* Marks the stage nodes (NULL = all) and their external operands, fills order/pos/layer.
 * Errors: AUTOPAR_ERR_INVALID_ARG (bad id). */
AP_INTERNAL ap_status ap_shard_problem_set_stage(ap_shard_problem *p, const int *nodes,
                                                 int n_nodes);

/* Strategy generation, group formation, cost aggregation and memory rows in one call (after
 * roles, alias and fixed choices are set). Errors as ap_shard_gen_strategies. */
AP_INTERNAL ap_status ap_shard_problem_assemble(ap_shard_problem *p);

/* Solves the assembled problem. mode 0: minimise cost under the budget; mode 1: minimise the
 * peak memory (ignoring the budget), *objective = that peak. choice gets a strategy per
 * group. Errors: AUTOPAR_ERR_INFEASIBLE (no solution; no message set), AUTOPAR_ERR_BACKEND,
 * AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_shard_problem_solve_mode(ap_shard_problem *p, int mode, int *choice,
                                                  double *objective);

/* Per-device peak of live bytes under a choice (liveness over the stage order) and the node at
 * which it occurs. Errors: AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_shard_problem_peak(const ap_shard_problem *p, const int *choice,
                                            double *peak, int *peak_node);

/* Wall-clock time in seconds (C11 timespec_get), for timings only. */
AP_INTERNAL double ap_shard_now(void);

/* True when AUTOPAR_VERBOSE=1. */
AP_INTERNAL bool ap_shard_verbose(void);

#endif /* AUTOPAR_SHARD_INTERNAL_H */
