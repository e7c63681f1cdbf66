/*
 * Layer construction of the inter-operator pass (reference/alpa-notes.md §2.2, DESIGN.md §6):
 * every node of a training graph gets a pipeline layer in node->layer, either from the user's
 * autopar_mark_pipeline_boundary calls (ap_layer_manual) or from Alpa's clustering DP over the
 * forward operations (ap_layer_cluster). Stages are later built from contiguous layer ranges.
 *
 * Terms used below:
 *   forward op    a node of phase FORWARD with operands (n_src > 0), in id (= topological) order;
 *   leaf          a node without operands: input, parameter, constant fill, optimizer state;
 *   heavy op      AP_OP_MATMUL or AP_OP_BATCH_MATMUL (Alpa's "non-trivial" dot/conv ops).
 *
 * Layer rules every function here establishes (and ap_layer_check verifies):
 *   1. forward ops: layers are non-decreasing in id order, start at 0 and skip none;
 *   2. forward leaves (inputs, parameters, constants) take the smallest layer among their
 *      forward consumers: a parameter belongs to the first layer that reads it, which is where
 *      its gradient and update are computed (a parameter created up front but used in layer 3
 *      belongs to layer 3). A leaf without forward consumers takes the layer of the next forward
 *      op in id order (the last layer when none follows);
 *   3. backward nodes take the layer of the forward node whose gradient rule created them (the
 *      mirror of Alpa's backward layer 2L-1-i), so backward layers are non-increasing in id order;
 *   4. optimizer states and updates (phase APPLY) take the layer of their parameter.
 */
#ifndef AUTOPAR_LAYER_CLUSTER_H
#define AUTOPAR_LAYER_CLUSTER_H

#include "internal.h"

#include <stdbool.h>
#include <stdio.h>

/* Per-layer figures (Alpa's print_auto_layer_stats). */
typedef struct ap_layer_stats {
    int    n_ops;       /* forward ops in the layer                                            */
    int    n_heavy;     /* of which heavy ops                                                  */
    double flops;       /* sum of ap_node_flops over the layer's forward ops                   */
    double bytes_in;    /* bytes of activations made by forward ops of earlier layers and read */
                        /* by this layer, each tensor counted once (leaves count 0)             */
    int    first_op;    /* id of the layer's first and last forward op                        */
    int    last_op;
} ap_layer_stats;

/* How backward and apply nodes get their layers from the forward layers (rules 3 and 4). */
typedef enum ap_layer_propagation {
    /* REPLAY when it reproduces the graph, else DERIVE. */
    AP_LAYER_PROPAGATE_AUTO = 0,
    /* Exact. The IR does not record which forward node a backward node was created for, so the
     * training part is rebuilt: the forward nodes are copied into a scratch graph with their new
     * layers, autopar_backward (and autopar_apply_optimizer when the graph has an optimizer) run
     * on it, and, since both are deterministic, node i of the copy is node i of the graph; the
     * copy's layers (inherited from the forward node being differentiated, graph.c) are taken
     * over. Checked node by node (op, operands, phase, assign_to); a graph whose training part
     * was not built by these functions (edited JSON, nodes added afterwards) does not match. */
    AP_LAYER_PROPAGATE_REPLAY,
    /* Approximate, for graphs REPLAY cannot reproduce. A backward node's layer is at least the
     * layer of every forward value it reads and of every forward node whose final gradient it
     * is (each of those is an operand of, or is, the node being differentiated); along the
     * backward part, layers can only decrease with the id. The smallest assignment meeting both
     * is the running maximum of those lower bounds taken from the end of the graph backwards.
     * It can be one layer low on boundary nodes that read nothing of their own layer (e.g. a
     * tied parameter's partial gradient). Apply nodes follow their parameter via assign_to and
     * the optimizer-state link (attrs.i[0]). */
    AP_LAYER_PROPAGATE_DERIVE,
    AP_LAYER_PROPAGATE_COUNT
} ap_layer_propagation;

/* True for the ops counted as heavy (matmul, batched matmul). */
AP_INTERNAL bool ap_op_is_heavy(ap_op op);

/* Automatic layer construction: clusters the forward ops (id order) into n_layers contiguous
 * layers with Alpa's DP, then applies rules 2-4 to every other node.
 *
 * Objective: minimise the largest bytes_in of any layer (activations made before the layer and
 * read inside it; inputs, parameters and constants count 0 because they are not activations
 * that a stage boundary would have to ship between stages), then the sum of bytes_in over the
 * layers, then the imbalance sum over layers of flops^2 (equal layers minimise it).
 * Admissible layers (with bound = (1 + eps) * total forward FLOPs / n_layers and h_min = min(3,
 * heavy ops / n_layers), Alpa's LAYER_HEAVY_OP_LOWER_BOUND rule):
 *   - at least h_min heavy ops, unless the layer's FLOPs already reach the bound;
 *   - FLOPs at most the bound, unless the layer has at most h_min heavy ops (a single huge
 *     matmul cannot be split, so it may exceed the bound on its own).
 * The minimax is solved exactly first; the tie-breaks are then an exact lexicographic DP over
 * layers whose bytes_in does not exceed that minimum. Remaining ties: the earliest boundaries.
 *
 * Reads: g's forward ops, ap_node_flops, tensor sizes. Writes: node->layer of every node; stats
 * (NULL, or room for n_layers entries) receives the per-layer figures.
 * Errors: AUTOPAR_ERR_INVALID_ARG (g NULL, n_layers < 1, eps negative or not finite, no forward
 * op, more layers than forward ops, n_layers > 1 with fewer heavy ops than layers (the message
 * gives the most layers possible), no clustering meets the FLOP bound (the message suggests a
 * larger eps)), the graph's sticky status, AUTOPAR_ERR_NOMEM, and the errors of
 * ap_layer_propagate / ap_layer_check. On error node layers may have been partly rewritten. */
AP_INTERNAL ap_status ap_layer_cluster(autopar_graph *g, int n_layers, double eps,
                                       ap_layer_stats *stats);

/* Manual layers: keeps the forward ops' layers set by autopar_mark_pipeline_boundary, validates
 * rule 1, and applies rules 2-4 to the other nodes (parameters created in an earlier layer than
 * their first use move to it, with their updates). Writes *n_layers (the last forward op's layer
 * + 1) and node->layer of leaves, backward and apply nodes.
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL argument, no forward op), AUTOPAR_ERR_GRAPH (a layer
 * without forward ops, e.g. a boundary before the first op or two boundaries in a row; layers
 * decreasing along the forward ops), the graph's sticky status, and the errors of
 * ap_layer_propagate / ap_layer_check. */
AP_INTERNAL ap_status ap_layer_manual(autopar_graph *g, int *n_layers);

/* Applies rules 3 and 4 from the current layers of the forward nodes (rule 2 must hold for the
 * forward leaves already: DERIVE reads their layers). Writes node->layer of every backward and
 * apply node, and *used (may be NULL) tells which method ran. A graph without backward or apply
 * nodes is left unchanged. The thread's last-error message is left as it was on success.
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL graph, bad mode), the graph's sticky status,
 * AUTOPAR_ERR_GRAPH (REPLAY could not reproduce the graph; the message names the first
 * difference), AUTOPAR_ERR_NOMEM. */
AP_INTERNAL ap_status ap_layer_propagate(autopar_graph *g, ap_layer_propagation mode,
                                         ap_layer_propagation *used);

/* Verifies rules 1-4 for n_layers layers (rule 3 as: layers non-increasing along backward nodes
 * and at least the DERIVE lower bound), and that every node's layer is in [0, n_layers).
 * Reads g only. Errors: AUTOPAR_ERR_INVALID_ARG (NULL graph, n_layers < 1), AUTOPAR_ERR_GRAPH
 * naming the first node that breaks a rule. */
AP_INTERNAL ap_status ap_layer_check(const autopar_graph *g, int n_layers);

/* Per-layer figures of the current forward layers into stats[0..n_layers-1].
 * Errors: AUTOPAR_ERR_INVALID_ARG (NULL argument, n_layers < 1, a forward op's layer outside
 * [0, n_layers)). */
AP_INTERNAL ap_status ap_layer_stats_compute(const autopar_graph *g, int n_layers,
                                             ap_layer_stats *stats);

/* Prints one line per layer: ops, heavy ops, GFLOP, MB in, first and last op ids. */
AP_INTERNAL void ap_layer_stats_print(const ap_layer_stats *stats, int n_layers, FILE *f);

#endif /* AUTOPAR_LAYER_CLUSTER_H */
