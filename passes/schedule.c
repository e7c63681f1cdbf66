/*
 * Pipeline schedules: clock tables, instruction lists, their simulation and the latency model
 * (see schedule.h for the contract and the execution rule).
 */
#include "schedule.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Names                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static const char *const kind_names[AP_SCHEDULE_KIND_COUNT] = {
    [AP_SCHEDULE_GPIPE] = "gpipe",
    [AP_SCHEDULE_1F1B]  = "1f1b",
};

const char *ap_schedule_kind_name(ap_schedule_kind k) {
    if ((int)k < 0 || k >= AP_SCHEDULE_KIND_COUNT) return "?";
    return kind_names[k];
}

ap_status ap_schedule_kind_from_name(const char *name, ap_schedule_kind *out) {
    if (!name || !out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule kind: NULL argument");
    for (int k = 0; k < AP_SCHEDULE_KIND_COUNT; k++)
        if (strcmp(name, kind_names[k]) == 0) {
            *out = (ap_schedule_kind)k;
            return AUTOPAR_OK;
        }
    return ap_error(AUTOPAR_ERR_INVALID_ARG, "unknown pipeline schedule '%s' (known: gpipe, 1f1b)",
                    name);
}

static const char *const op_names[AP_INST_OP_COUNT] = {
    [AP_INST_RUN_FORWARD]     = "RUN_FORWARD",
    [AP_INST_RUN_BACKWARD]    = "RUN_BACKWARD",
    [AP_INST_SEND_ACTIVATION] = "SEND_ACTIVATION",
    [AP_INST_RECV_ACTIVATION] = "RECV_ACTIVATION",
    [AP_INST_SEND_GRAD]       = "SEND_GRAD",
    [AP_INST_RECV_GRAD]       = "RECV_GRAD",
    [AP_INST_FREE]            = "FREE",
    [AP_INST_GRAD_SYNC]       = "GRAD_SYNC",
    [AP_INST_APPLY]           = "APPLY",
};

const char *ap_inst_op_name(ap_inst_op op) {
    if ((int)op < 0 || op >= AP_INST_OP_COUNT) return "?";
    return op_names[op];
}

static const char *const mode_names[AP_SEND_MODE_COUNT] = {
    [AP_SEND_ASYNC]      = "async",
    [AP_SEND_GROUPED]    = "grouped",
    [AP_SEND_RENDEZVOUS] = "rendezvous",
};

const char *ap_send_mode_name(ap_send_mode m) {
    if ((int)m < 0 || m >= AP_SEND_MODE_COUNT) return "?";
    return mode_names[m];
}

static bool is_comm(ap_inst_op op) {
    return op == AP_INST_SEND_ACTIVATION || op == AP_INST_RECV_ACTIVATION ||
           op == AP_INST_SEND_GRAD || op == AP_INST_RECV_GRAD;
}

/* ------------------------------------------------------------------------------------------ */
/* Clock table                                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Stage s's task order. GPipe: all forwards, then all backwards (both increasing). 1F1B: w
 * warm-up forwards, then (forward, backward) pairs, then w cool-down backwards. */
static void task_order(ap_schedule_kind kind, int S, int B, int s, ap_sched_task *order) {
    int n = 0;
    if (kind == AP_SCHEDULE_GPIPE) {
        for (int k = 0; k < B; k++) order[n++] = (ap_sched_task){AP_TASK_FORWARD, k};
        for (int k = 0; k < B; k++) order[n++] = (ap_sched_task){AP_TASK_BACKWARD, k};
        return;
    }
    int w = S - s - 1 < B ? S - s - 1 : B;
    for (int k = 0; k < w; k++) order[n++] = (ap_sched_task){AP_TASK_FORWARD, k};
    for (int r = 0; r < B - w; r++) {
        order[n++] = (ap_sched_task){AP_TASK_FORWARD, w + r};
        order[n++] = (ap_sched_task){AP_TASK_BACKWARD, r};
    }
    for (int k = B - w; k < B; k++) order[n++] = (ap_sched_task){AP_TASK_BACKWARD, k};
}

/* Simulates the clock: in each clock every stage runs its next task if the task's inputs were
 * produced in earlier clocks. Writes the compute clocks into *table (allocated here, with room
 * for the APPLY clock) and their count into *n_compute. fclk / bclk record the clock of each
 * (stage, micro-batch) task (INT_MAX = not run yet). */
static ap_status simulate_clock(ap_schedule_kind kind, int S, int B, ap_sched_task **table,
                                int *n_compute) {
    size_t SB = (size_t)S * (size_t)B;
    /* Both schedules need exactly 2 (B + S - 1) clocks (the test checks it); the table is
     * sized for that, and running past it is reported instead of written out of bounds. */
    size_t max_clocks = (size_t)2 * (size_t)(B + S - 1);
    ap_sched_task *order = malloc(2 * SB * sizeof *order);
    int *fclk = malloc(2 * SB * sizeof *fclk);
    int *pos = calloc((size_t)S, sizeof *pos);
    ap_sched_task *tab = malloc((max_clocks + 1) * (size_t)S * sizeof *tab);
    if (!order || !fclk || !pos || !tab) {
        free(order), free(fclk), free(pos), free(tab);
        return ap_error(AUTOPAR_ERR_NOMEM, "pipeline schedule: out of memory (%d stages, %d "
                        "micro-batches)", S, B);
    }
    int *bclk = fclk + SB;
    for (size_t i = 0; i < 2 * SB; i++) fclk[i] = INT32_MAX;
    for (int s = 0; s < S; s++) task_order(kind, S, B, s, order + (size_t)s * 2 * (size_t)B);

    int done = 0, c = 0;
    while (done < S) {
        if ((size_t)c >= max_clocks) {
            /* Not reachable for the two schedules (the test checks the clock count); kept so a
             * bad task order cannot write out of bounds. */
            free(order), free(fclk), free(pos), free(tab);
            return ap_error(AUTOPAR_ERR_GRAPH, "pipeline schedule %s: clock simulation did not "
                            "finish in %zu clocks (S = %d, B = %d)", ap_schedule_kind_name(kind),
                            max_clocks, S, B);
        }
        ap_sched_task *row = tab + (size_t)c * (size_t)S;
        for (int s = 0; s < S; s++) {
            row[s] = (ap_sched_task){AP_TASK_IDLE, -1};
            if (pos[s] == 2 * B) continue;
            ap_sched_task t = order[(size_t)s * 2 * (size_t)B + (size_t)pos[s]];
            size_t i = (size_t)s * (size_t)B + (size_t)t.micro_batch;
            bool ready;
            /* "< c": an input produced in this same clock is not available yet. */
            if (t.type == AP_TASK_FORWARD)
                ready = s == 0 || fclk[i - (size_t)B] < c;
            else
                ready = fclk[i] < c && (s == S - 1 || bclk[i + (size_t)B] < c);
            if (!ready) continue;
            row[s] = t;
            if (t.type == AP_TASK_FORWARD) fclk[i] = c;
            else bclk[i] = c;
            if (++pos[s] == 2 * B) done++;
        }
        c++;
    }
    free(order), free(fclk), free(pos);
    *table = tab;
    *n_compute = c;
    return AUTOPAR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Instruction lists                                                                           */
/* ------------------------------------------------------------------------------------------ */

static ap_inst inst(ap_inst_op op, int mb, int peer, int clock, unsigned flags) {
    return (ap_inst){op, mb, peer, clock, flags};
}

/* Emits stage s's list from the table into out (room for count_insts(...) entries); returns the
 * count. Also computes the stage's peak of stored micro-batches. */
static int emit_stage(const ap_schedule *sc, int s, ap_inst *out, int *peak) {
    int S = sc->n_stages, B = sc->n_micro_batches, n = 0, live = 0, seen_b = 0;
    *peak = 0;
    for (int c = 0; c < sc->n_clocks; c++) {
        ap_sched_task t = ap_schedule_task(sc, c, s);
        int k = t.micro_batch;
        switch (t.type) {
        case AP_TASK_IDLE: break;
        case AP_TASK_FORWARD:
            if (s > 0) out[n++] = inst(AP_INST_RECV_ACTIVATION, k, s - 1, c, 0);
            out[n++] = inst(AP_INST_RUN_FORWARD, k, -1, c, 0);
            if (++live > *peak) *peak = live;
            /* Sent right after it is produced: with non-blocking sends the next stage can start
             * as early as the data allows. */
            if (s < S - 1) out[n++] = inst(AP_INST_SEND_ACTIVATION, k, s + 1, c, 0);
            break;
        case AP_TASK_BACKWARD: {
            if (s < S - 1) out[n++] = inst(AP_INST_RECV_GRAD, k, s + 1, c, 0);
            unsigned flags = (seen_b == 0 ? AP_INST_FIRST_MB : 0u) |
                             (seen_b == B - 1 ? AP_INST_LAST_MB : 0u);
            out[n++] = inst(AP_INST_RUN_BACKWARD, k, -1, c, flags);
            /* FREE before the SEND: the sent gradient is not among the freed buffers, and the
             * SEND then sits next to the following RECV, which lets a runtime that posts
             * consecutive transfers together (AP_SEND_GROUPED) pair them. */
            out[n++] = inst(AP_INST_FREE, k, -1, c, 0);
            live--;
            if (s > 0) out[n++] = inst(AP_INST_SEND_GRAD, k, s - 1, c, 0);
            /* Synchronise once, after the last micro-batch (Alpa: skip_grad_sync elsewhere). */
            if (++seen_b == B) out[n++] = inst(AP_INST_GRAD_SYNC, -1, -1, c, 0);
            break;
        }
        case AP_TASK_APPLY: out[n++] = inst(AP_INST_APPLY, -1, -1, c, 0); break;
        }
    }
    return n;
}

ap_status ap_schedule_build(ap_schedule_kind kind, int n_stages, int n_micro_batches,
                            ap_schedule **out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_schedule_build: out is NULL");
    *out = NULL;
    if ((int)kind < 0 || kind >= AP_SCHEDULE_KIND_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "pipeline schedule: bad kind %d (known: "
                        "AP_SCHEDULE_GPIPE, AP_SCHEDULE_1F1B)", (int)kind);
    if (n_stages < 1 || n_stages > AP_SCHEDULE_MAX_STAGES)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "pipeline schedule: %d stages (must be in "
                        "1..%d)", n_stages, AP_SCHEDULE_MAX_STAGES);
    if (n_micro_batches < 1 || n_micro_batches > AP_SCHEDULE_MAX_MICRO_BATCHES)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "pipeline schedule: %d micro-batches (must be "
                        "in 1..%d)", n_micro_batches, AP_SCHEDULE_MAX_MICRO_BATCHES);
    int S = n_stages, B = n_micro_batches;
    size_t cells = ((size_t)2 * (size_t)(B + S - 1) + 1) * (size_t)S;
    if (cells > AP_SCHEDULE_MAX_TABLE)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "pipeline schedule: %d stages x %d micro-batches "
                        "need a %zu-cell clock table (limit %zu)", S, B, cells,
                        AP_SCHEDULE_MAX_TABLE);

    ap_schedule *sc = calloc(1, sizeof *sc);
    if (!sc) return ap_error(AUTOPAR_ERR_NOMEM, "pipeline schedule: out of memory");
    sc->kind = kind;
    sc->n_stages = S;
    sc->n_micro_batches = B;
    int n_compute = 0;
    ap_status st = simulate_clock(kind, S, B, &sc->table, &n_compute);
    if (st != AUTOPAR_OK) {
        free(sc);
        return st;
    }
    /* The apply clock: Alpa runs apply_grad in one extra clock after the last backward. */
    sc->n_clocks = n_compute + 1;
    for (int s = 0; s < S; s++)
        sc->table[(size_t)n_compute * (size_t)S + (size_t)s] = (ap_sched_task){AP_TASK_APPLY, -1};

    /* Per stage at most B x (RECV, RUN, SEND) forwards, B x (RECV, RUN, FREE, SEND) backwards,
     * one GRAD_SYNC and one APPLY. */
    size_t per_stage = (size_t)7 * (size_t)B + 2;
    sc->inst_begin = malloc(((size_t)S + 1) * sizeof *sc->inst_begin);
    sc->insts = malloc(per_stage * (size_t)S * sizeof *sc->insts);
    sc->peak_activations = malloc((size_t)S * sizeof *sc->peak_activations);
    if (!sc->inst_begin || !sc->insts || !sc->peak_activations) {
        ap_schedule_free(sc);
        return ap_error(AUTOPAR_ERR_NOMEM, "pipeline schedule: out of memory for instruction "
                        "lists (%d stages, %d micro-batches)", S, B);
    }
    int n = 0;
    for (int s = 0; s < S; s++) {
        sc->inst_begin[s] = n;
        n += emit_stage(sc, s, sc->insts + n, &sc->peak_activations[s]);
    }
    sc->inst_begin[S] = n;
    /* Give back the unused tail (S = 1 has no transfers); a failed shrink keeps the block. */
    ap_inst *shrunk = realloc(sc->insts, (size_t)(n > 0 ? n : 1) * sizeof *shrunk);
    if (shrunk) sc->insts = shrunk;
    *out = sc;
    return AUTOPAR_OK;
}

void ap_schedule_free(ap_schedule *s) {
    if (!s) return;
    free(s->table);
    free(s->inst_begin);
    free(s->insts);
    free(s->peak_activations);
    free(s);
}

/* ------------------------------------------------------------------------------------------ */
/* Printing                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static void task_label(ap_sched_task t, char *buf, size_t len) {
    switch (t.type) {
    case AP_TASK_FORWARD: snprintf(buf, len, "F%d", t.micro_batch); break;
    case AP_TASK_BACKWARD: snprintf(buf, len, "B%d", t.micro_batch); break;
    case AP_TASK_APPLY: snprintf(buf, len, "APPLY"); break;
    default: snprintf(buf, len, "."); break;
    }
}

void ap_schedule_print_table(const ap_schedule *s, FILE *f) {
    if (!s || !f) return;
    char buf[32];
    /* Column width: the widest of "stage N", "F<B-1>" and "APPLY". */
    int w = snprintf(buf, sizeof buf, "stage %d", s->n_stages - 1);
    int wl = snprintf(buf, sizeof buf, "F%d", s->n_micro_batches - 1);
    if (wl > w) w = wl;
    int wc = snprintf(buf, sizeof buf, "%d", s->n_clocks - 1);
    if (wc < 5) wc = 5;
    fprintf(f, "%*s", wc, "clock");
    for (int st = 0; st < s->n_stages; st++) {
        snprintf(buf, sizeof buf, "stage %d", st);
        fprintf(f, " | %-*s", st + 1 < s->n_stages ? w : 0, buf);
    }
    fprintf(f, "\n");
    for (int c = 0; c < s->n_clocks; c++) {
        fprintf(f, "%*d", wc, c);
        for (int st = 0; st < s->n_stages; st++) {
            task_label(ap_schedule_task(s, c, st), buf, sizeof buf);
            /* No padding after the last column: no trailing blanks. */
            fprintf(f, " | %-*s", st + 1 < s->n_stages ? w : 0, buf);
        }
        fprintf(f, "\n");
    }
}

void ap_schedule_print_insts(const ap_schedule *s, FILE *f) {
    if (!s || !f) return;
    for (int st = 0; st < s->n_stages; st++) {
        int n;
        const ap_inst *in = ap_schedule_stage_insts(s, st, &n);
        fprintf(f, "stage %d: %d instructions, at most %d micro-batches stored\n", st, n,
                s->peak_activations[st]);
        for (int i = 0; i < n; i++) {
            const ap_inst *x = &in[i];
            bool more = x->micro_batch >= 0;   /* GRAD_SYNC and APPLY end the line */
            fprintf(f, "  %4d  clock %-4d %-*s", i, x->clock, more ? 16 : 0,
                    ap_inst_op_name(x->op));
            if (x->micro_batch >= 0) fprintf(f, " mb %d", x->micro_batch);
            if (x->op == AP_INST_SEND_ACTIVATION || x->op == AP_INST_SEND_GRAD)
                fprintf(f, " -> stage %d", x->peer);
            else if (x->op == AP_INST_RECV_ACTIVATION || x->op == AP_INST_RECV_GRAD)
                fprintf(f, " <- stage %d", x->peer);
            if (x->flags & AP_INST_FIRST_MB) fprintf(f, " (first: writes accumulators)");
            if (x->flags & AP_INST_LAST_MB) fprintf(f, " (last: grad sync follows)");
            fprintf(f, "\n");
        }
    }
}

void ap_schedule_print(const ap_schedule *s, FILE *f) {
    if (!s || !f) return;
    fprintf(f, "pipeline schedule %s: %d stages, %d micro-batches, %d clocks (%d compute + apply)\n",
            ap_schedule_kind_name(s->kind), s->n_stages, s->n_micro_batches, s->n_clocks,
            s->n_clocks - 1);
    ap_schedule_print_table(s, f);
    ap_schedule_print_insts(s, f);
}

/* ------------------------------------------------------------------------------------------ */
/* Simulation                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* A message: activation or gradient k over boundary b (between stages b and b + 1). */
typedef struct sim_msg {
    bool   send_posted, recv_posted, recv_done;
    double send_time, recv_time;   /* when each side posted it                               */
    double end;                    /* transfer end, < 0 until the transfer is scheduled       */
} sim_msg;

typedef struct sim {
    const ap_schedule            *sc;
    const ap_schedule_sim_params *p;
    int                           S, B;
    sim_msg                      *msg;        /* [2][S-1][B]: kind 0 = activation, 1 = grad  */
    double                       *link_free;  /* [2][S-1]                                     */
    /* Per stage. */
    int    *pc, *live, *group_end;            /* group_end > pc while a group is posted       */
    double *t, *busy;
    int    *peak;
    bool   *stored;                           /* [S][B]: forwarded and not freed              */
} sim;

static bool finite_nonneg(double v) { return isfinite(v) && v >= 0.0; }

static ap_status check_times(const double *a, int n, const char *what) {
    for (int i = 0; i < n; i++)
        if (!finite_nonneg(a[i]))
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule simulation: %s[%d] = %g (must be "
                            "finite and >= 0)", what, i, a[i]);
    return AUTOPAR_OK;
}

/* Message of a SEND/RECV instruction of stage s, after checking the instruction. */
static ap_status msg_of(sim *m, int s, int pc, const ap_inst *x, sim_msg **out, int *kind,
                        int *boundary) {
    bool act = x->op == AP_INST_SEND_ACTIVATION || x->op == AP_INST_RECV_ACTIVATION;
    bool send = x->op == AP_INST_SEND_ACTIVATION || x->op == AP_INST_SEND_GRAD;
    /* Activations flow down the pipeline, gradients up. */
    int want = (act == send) ? s + 1 : s - 1;
    if (want < 0 || want >= m->S)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule simulation: stage %d instruction %d "
                        "%s (peer %d): there is no stage %s stage %d", s, pc,
                        ap_inst_op_name(x->op), x->peer, want > s ? "after" : "before", s);
    if (x->peer != want)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule simulation: stage %d instruction %d "
                        "%s has peer %d (must be the stage %s, %d)", s, pc, ap_inst_op_name(x->op),
                        x->peer, want == s + 1 ? "after" : "before", want);
    if (x->micro_batch < 0 || x->micro_batch >= m->B)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule simulation: stage %d instruction %d "
                        "%s: micro-batch %d out of range", s, pc, ap_inst_op_name(x->op),
                        x->micro_batch);
    *kind = act ? 0 : 1;
    *boundary = s < x->peer ? s : x->peer;
    *out = &m->msg[((size_t)*kind * (size_t)(m->S - 1) + (size_t)*boundary) * (size_t)m->B +
                   (size_t)x->micro_batch];
    return AUTOPAR_OK;
}

static double link_time(const sim *m, int kind, int b) {
    const double *a = kind == 0 ? m->p->t_send_activation : m->p->t_send_grad;
    return a ? a[b] : m->p->t_send;
}

/* Schedules the transfer of a message when the mode allows it: asynchronous sends go as soon as
 * they are posted, the other modes need the receive posted too. Each (kind, boundary) link
 * carries one message at a time; with one sender per link, transfers are scheduled in the
 * sender's order. */
static void try_transfer(sim *m, sim_msg *g, int kind, int b) {
    if (g->end >= 0.0 || !g->send_posted) return;
    if (m->p->mode != AP_SEND_ASYNC && !g->recv_posted) return;
    double *lf = &m->link_free[(size_t)kind * (size_t)(m->S - 1) + (size_t)b];
    double start = g->send_time;
    if (m->p->mode != AP_SEND_ASYNC && g->recv_time > start) start = g->recv_time;
    if (*lf > start) start = *lf;
    g->end = start + link_time(m, kind, b);
    *lf = g->end;
}

/* Executes one compute instruction of stage s. */
static ap_status run_compute(sim *m, int s, int pc, const ap_inst *x) {
    const ap_schedule_sim_params *p = m->p;
    bool *stored = m->stored + (size_t)s * (size_t)m->B;
    if (x->op == AP_INST_RUN_FORWARD || x->op == AP_INST_RUN_BACKWARD || x->op == AP_INST_FREE) {
        if (x->micro_batch < 0 || x->micro_batch >= m->B)
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule simulation: stage %d instruction "
                            "%d %s: micro-batch %d out of range", s, pc, ap_inst_op_name(x->op),
                            x->micro_batch);
    }
    double dt = 0.0;
    switch (x->op) {
    case AP_INST_RUN_FORWARD:
        dt = p->t_forward[s];
        if (!stored[x->micro_batch]) {
            stored[x->micro_batch] = true;
            if (++m->live[s] > m->peak[s]) m->peak[s] = m->live[s];
        }
        break;
    case AP_INST_RUN_BACKWARD: dt = p->t_backward[s]; break;
    case AP_INST_FREE:
        if (!stored[x->micro_batch])
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule simulation: stage %d instruction "
                            "%d frees micro-batch %d, which is not stored", s, pc,
                            x->micro_batch);
        stored[x->micro_batch] = false;
        m->live[s]--;
        break;
    case AP_INST_GRAD_SYNC: dt = p->t_grad_sync ? p->t_grad_sync[s] : 0.0; break;
    case AP_INST_APPLY: dt = p->t_apply ? p->t_apply[s] : 0.0; break;
    default:
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule simulation: stage %d instruction %d "
                        "has bad op %d", s, pc, (int)x->op);
    }
    m->t[s] += dt;
    m->busy[s] += dt;
    return AUTOPAR_OK;
}

/* Advances stage s as far as it can. Sets *progress when anything happened. */
static ap_status advance(sim *m, int s, bool *progress) {
    int n;
    const ap_inst *in = ap_schedule_stage_insts(m->sc, s, &n);
    for (;;) {
        int pc = m->pc[s];
        if (pc >= n) return AUTOPAR_OK;
        if (m->group_end[s] <= pc) {
            if (!is_comm(in[pc].op)) {
                ap_status st = run_compute(m, s, pc, &in[pc]);
                if (st != AUTOPAR_OK) return st;
                m->pc[s]++;
                *progress = true;
                continue;
            }
            /* Post a group: one transfer, or in grouped mode the whole run of transfers. */
            int end = pc + 1;
            if (m->p->mode == AP_SEND_GROUPED)
                while (end < n && is_comm(in[end].op)) end++;
            for (int i = pc; i < end; i++) {
                sim_msg *g;
                int kind, b;
                ap_status st = msg_of(m, s, i, &in[i], &g, &kind, &b);
                if (st != AUTOPAR_OK) return st;
                bool send = in[i].op == AP_INST_SEND_ACTIVATION || in[i].op == AP_INST_SEND_GRAD;
                if (send ? g->send_posted : g->recv_posted)
                    return ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule simulation: stage %d "
                                    "instruction %d: %s of micro-batch %d appears twice", s, i,
                                    ap_inst_op_name(in[i].op), in[i].micro_batch);
                if (send) {
                    g->send_posted = true;
                    g->send_time = m->t[s];
                } else {
                    g->recv_posted = true;
                    g->recv_time = m->t[s];
                }
                try_transfer(m, g, kind, b);
            }
            m->group_end[s] = end;
            *progress = true;
        }
        /* Wait for the posted group: every message transferred (an asynchronous send is done
         * when posted). */
        double done_at = m->t[s];
        for (int i = pc; i < m->group_end[s]; i++) {
            sim_msg *g;
            int kind, b;
            ap_status st = msg_of(m, s, i, &in[i], &g, &kind, &b);
            if (st != AUTOPAR_OK) return st;
            try_transfer(m, g, kind, b);
            bool send = in[i].op == AP_INST_SEND_ACTIVATION || in[i].op == AP_INST_SEND_GRAD;
            if (send && m->p->mode == AP_SEND_ASYNC) continue;
            if (g->end < 0.0) return AUTOPAR_OK;   /* blocked */
            if (g->end > done_at) done_at = g->end;
        }
        for (int i = pc; i < m->group_end[s]; i++) {
            sim_msg *g;
            int kind, b;
            (void)msg_of(m, s, i, &in[i], &g, &kind, &b);
            if (in[i].op == AP_INST_RECV_ACTIVATION || in[i].op == AP_INST_RECV_GRAD)
                g->recv_done = true;
        }
        m->t[s] = done_at;
        m->pc[s] = m->group_end[s];
        *progress = true;
    }
}

static void sim_free(sim *m) {
    free(m->msg);
    free(m->link_free);
    free(m->pc);
    free(m->t);
    free(m->stored);
}

void ap_schedule_sim_result_clear(ap_schedule_sim_result *r) {
    if (!r) return;
    free(r->finish);
    free(r->busy);
    free(r->peak_activations);
    free(r->stopped_at);
    memset(r, 0, sizeof *r);
}

/* Writes the deadlock message: where each unfinished stage waits. */
static ap_status deadlock_error(const sim *m) {
    char buf[768];
    size_t used = 0;
    int shown = 0;
    for (int s = 0; s < m->S && used < sizeof buf; s++) {
        int n;
        const ap_inst *in = ap_schedule_stage_insts(m->sc, s, &n);
        int pc = m->pc[s];
        if (pc >= n) continue;
        if (shown == 6) {
            used += (size_t)snprintf(buf + used, sizeof buf - used, "; ...");
            break;
        }
        used += (size_t)snprintf(buf + used, sizeof buf - used, "%sstage %d at #%d %s mb %d %s "
                                 "stage %d", shown ? "; " : "", s, pc, ap_inst_op_name(in[pc].op),
                                 in[pc].micro_batch,
                                 (in[pc].op == AP_INST_SEND_ACTIVATION ||
                                  in[pc].op == AP_INST_SEND_GRAD) ? "->" : "<-", in[pc].peer);
        shown++;
    }
    return ap_error(AUTOPAR_ERR_INFEASIBLE, "pipeline %s schedule deadlocks with %s sends: %s",
                    ap_schedule_kind_name(m->sc->kind), ap_send_mode_name(m->p->mode), buf);
}

ap_status ap_schedule_simulate(const ap_schedule *s, const ap_schedule_sim_params *p,
                               ap_schedule_sim_result *out) {
    if (!out) return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_schedule_simulate: out is NULL");
    memset(out, 0, sizeof *out);
    if (!s || !p || !p->t_forward || !p->t_backward)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_schedule_simulate: NULL schedule, params or "
                        "stage times");
    if ((int)p->mode < 0 || p->mode >= AP_SEND_MODE_COUNT)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_schedule_simulate: bad send mode %d",
                        (int)p->mode);
    int S = s->n_stages, B = s->n_micro_batches;
    if (S < 1 || B < 1 || !s->inst_begin || !s->insts)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_schedule_simulate: malformed schedule");
    ap_status st = check_times(p->t_forward, S, "t_forward");
    if (st == AUTOPAR_OK) st = check_times(p->t_backward, S, "t_backward");
    if (st == AUTOPAR_OK && p->t_grad_sync) st = check_times(p->t_grad_sync, S, "t_grad_sync");
    if (st == AUTOPAR_OK && p->t_apply) st = check_times(p->t_apply, S, "t_apply");
    if (st == AUTOPAR_OK && p->t_send_activation)
        st = check_times(p->t_send_activation, S - 1, "t_send_activation");
    if (st == AUTOPAR_OK && p->t_send_grad) st = check_times(p->t_send_grad, S - 1, "t_send_grad");
    if (st == AUTOPAR_OK && !finite_nonneg(p->t_send))
        st = ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule simulation: t_send = %g (must be finite "
                      "and >= 0)", p->t_send);
    if (st != AUTOPAR_OK) return st;

    sim m = {.sc = s, .p = p, .S = S, .B = B};
    size_t n_msg = (size_t)2 * (size_t)(S - 1) * (size_t)B;
    m.msg = calloc(n_msg ? n_msg : 1, sizeof *m.msg);
    m.link_free = calloc((size_t)2 * (size_t)S, sizeof *m.link_free);
    /* One block per type for the per-stage arrays. */
    m.pc = calloc((size_t)S * 4, sizeof *m.pc);
    m.t = calloc((size_t)S * 2, sizeof *m.t);
    m.stored = calloc((size_t)S * (size_t)B, sizeof *m.stored);
    out->finish = calloc((size_t)S, sizeof *out->finish);
    out->busy = calloc((size_t)S, sizeof *out->busy);
    out->peak_activations = calloc((size_t)S, sizeof *out->peak_activations);
    out->stopped_at = calloc((size_t)S, sizeof *out->stopped_at);
    if (!m.msg || !m.link_free || !m.pc || !m.t || !m.stored || !out->finish || !out->busy ||
        !out->peak_activations || !out->stopped_at) {
        sim_free(&m);
        ap_schedule_sim_result_clear(out);
        return ap_error(AUTOPAR_ERR_NOMEM, "schedule simulation: out of memory");
    }
    out->n_stages = S;
    for (size_t i = 0; i < n_msg; i++) m.msg[i].end = -1.0;
    m.live = m.pc + S;
    m.group_end = m.pc + 2 * (size_t)S;
    m.peak = m.pc + 3 * (size_t)S;
    m.busy = m.t + S;

    /* Sweep the stages until nothing moves. Every stage's time only grows and a message's
     * transfer is fixed once both of its conditions hold; when each link's messages are sent
     * and received in the same order (as ap_schedule_build emits them) the order of the sweep
     * changes no time, and this is the earliest-start execution of the lists. */
    bool progress = true;
    while (progress) {
        progress = false;
        for (int q = 0; q < S; q++) {
            st = advance(&m, q, &progress);
            if (st != AUTOPAR_OK) goto done;
        }
    }
    bool finished = true;
    for (int q = 0; q < S; q++) {
        out->stopped_at[q] = m.pc[q];
        out->finish[q] = m.t[q];
        out->busy[q] = m.busy[q];
        out->peak_activations[q] = m.peak[q];
        if (m.pc[q] < s->inst_begin[q + 1] - s->inst_begin[q]) finished = false;
    }
    if (!finished) {
        out->deadlocked = true;
        st = deadlock_error(&m);
        goto done;
    }
    /* Every message sent must have been received (asynchronous sends never wait for it). */
    for (size_t i = 0; i < n_msg; i++) {
        const sim_msg *g = &m.msg[i];
        if (g->send_posted != g->recv_done) {
            int kind = (int)(i / ((size_t)(S - 1) * (size_t)B));
            int b = (int)(i / (size_t)B % (size_t)(S - 1)), k = (int)(i % (size_t)B);
            st = ap_error(AUTOPAR_ERR_INVALID_ARG, "schedule simulation: %s of micro-batch %d "
                          "over boundary %d-%d is %s", kind == 0 ? "activation" : "gradient", k,
                          b, b + 1, g->send_posted ? "sent but never received"
                                                   : "received but never sent");
            goto done;
        }
    }
    out->makespan = 0.0;
    for (int q = 0; q < S; q++)
        if (out->finish[q] > out->makespan) out->makespan = out->finish[q];
    st = AUTOPAR_OK;
done:
    sim_free(&m);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Latency model                                                                               */
/* ------------------------------------------------------------------------------------------ */

ap_status ap_pipeline_latency(const double *stage_time, int n_stages, int n_micro_batches,
                              double *out) {
    if (!stage_time || !out)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_pipeline_latency: NULL argument");
    if (n_stages < 1 || n_micro_batches < 1)
        return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_pipeline_latency: %d stages, %d "
                        "micro-batches (both must be >= 1)", n_stages, n_micro_batches);
    double sum = 0.0, mx = 0.0;
    for (int i = 0; i < n_stages; i++) {
        if (!finite_nonneg(stage_time[i]))
            return ap_error(AUTOPAR_ERR_INVALID_ARG, "ap_pipeline_latency: stage %d time %g "
                            "(must be finite and >= 0)", i, stage_time[i]);
        sum += stage_time[i];
        if (stage_time[i] > mx) mx = stage_time[i];
    }
    *out = sum + (double)(n_micro_batches - 1) * mx;
    return AUTOPAR_OK;
}
