/*
 * Private to runtime/spmd.c and runtime/spmd_lower.c: one rank's SPMD program (instructions on
 * numbered values) and the lowering that builds it. See spmd.h for the contract.
 *
 * A value is one local buffer: a node's shard, or a temporary of a resharding. Persistent values
 * (parameters, optimizer states, inputs) have their own backend buffer for the whole session;
 * every other value is "transient": it lives in the arena at a planned offset, between the first
 * and the last instruction that touches it (update results and the loss until the step's end).
 */
#ifndef AUTOPAR_SPMD_INTERNAL_H
#define AUTOPAR_SPMD_INTERNAL_H

#include "cost_model.h"
#include "spmd.h"

/* Alignment of arena offsets and of the sizes the memory plan counts. */
#define SP_ALIGN ((size_t)64)

typedef enum sp_ins_kind {
    SP_KERNEL = 0,   /* one backend kernel                                                  */
    SP_COLL,         /* one collective on a mesh-axis communicator                          */
    SP_ZERO,         /* zero a value (turning a replicated value into a pending sum)        */
} sp_ins_kind;

typedef struct sp_ins {
    sp_ins_kind    kind;
    int            node;       /* graph node the instruction serves                         */
    int            operand;    /* >= 0: resharding of that operand; -1: the op and its own  */
                               /* collectives; -2: the loss read at the step's end          */
    /* SP_KERNEL: call (shapes, attrs; buffers filled when run), out and src values.        */
    ap_kernel_call call;
    bool           uses_step;  /* call.step = the step number (optimizer ops)               */
    int            out;
    int            src[AP_MAX_SRC];
    /* SP_COLL */
    ap_coll_kind   coll;
    ap_mesh_axis   axis;
    int            send, recv; /* values (equal for an in-place all-reduce)                 */
    size_t         count;      /* elements per rank as the comm.h function takes them       */
    int            comm_dtype; /* ap_comm_dtype                                             */
    /* SP_ZERO: value `out`. */
} sp_ins;

typedef struct sp_value {
    size_t bytes;              /* local bytes (unaligned)                                    */
    int    node;               /* node whose data (or part of it) it holds; -1 none          */
    bool   persistent;
    int    first, last;        /* instruction interval of a transient value (-1: unused)     */
    bool   to_end;             /* live until the end of the program                          */
    size_t offset;             /* arena offset of a transient value                          */
} sp_value;

/* One deviation from the plan, for ap_spmd_print. */
typedef struct sp_note {
    int  node;
    int  operand;              /* -1: the op's result                                        */
    char text[160];
} sp_note;

typedef struct sp_prog {
    sp_ins   *ins;
    int       n_ins, cap_ins;
    sp_value *val;
    int       n_val, cap_val;
    sp_note  *note;
    int       n_note, cap_note;
    int       n_route_plan;    /* reshardings that ran the plan's own route                   */
    int       n_route_fresh;   /* reshardings routed by a fresh ap_reshard_cost               */
    size_t    arena_bytes;     /* from the offset assignment                                 */
    size_t    transient_peak;  /* liveness peak of transient values (aligned sizes)          */
    int       peak_ins;        /* instruction where it occurs                                */
} sp_prog;

/* What the lowering needs to know about this rank and the session. */
typedef struct sp_lower_ctx {
    const autopar_graph *g;
    const ap_shard_plan *plan;
    const ap_mesh       *mesh;
    autopar_precision    precision;
    int                  coord[2];   /* this rank's mesh coordinate                          */
    sp_prog             *prog;
    /* Per node: the value holding its output in spec[] after it ran (persistent for leaves). */
    int                 *node_val;
    ap_spec             *spec;
} sp_lower_ctx;

AP_INTERNAL void sp_prog_free(sp_prog *p);

/* Adds a value; returns its id or -1 (out of memory: the message is set). */
AP_INTERNAL int sp_value_new(sp_prog *p, size_t bytes, int node, bool persistent);

/* Builds the step program: every node of the plan's stage in graph order (leaves and external
 * nodes must already have their persistent values in ctx->node_val; nodes outside the stage are
 * skipped), then the loss brought to a replicated value (*loss_val, or -1 when the graph has no
 * loss or the loss is not in the stage). Errors name the node and operand. */
AP_INTERNAL ap_status sp_lower_step(sp_lower_ctx *ctx, int *loss_val);

/* Appends the instructions that bring value `val` (the shard of a tensor of shape `full` and
 * dtype `dt` laid out as `from`) into layout `to`. steps/n_steps: a route proposed by the plan
 * (may be NULL); it is used when it is consistent, else ap_reshard_cost's. `owned`: val is a
 * temporary that may be overwritten. *out gets the resulting value (val itself when nothing
 * changes). node/operand: for messages and the program listing. */
AP_INTERNAL ap_status sp_emit_reshard(sp_lower_ctx *ctx, int val, bool owned,
                                      const ap_spec *from, const ap_spec *to,
                                      const ap_shape *full, ap_dtype dt,
                                      const ap_collective *steps, int n_steps, int node,
                                      int operand, int *out);

/* Liveness intervals, offsets (greedy by size), arena size and the transient peak. */
AP_INTERNAL ap_status sp_plan_memory(sp_prog *p);

/* The ap_comm_dtype of tensors of dtype dt under precision p. */
AP_INTERNAL int sp_comm_dtype(ap_dtype dt, autopar_precision p);

#endif /* AUTOPAR_SPMD_INTERNAL_H */
