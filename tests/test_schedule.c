/*
 * Pipeline schedules (passes/schedule.h): clock tables (structure, dependencies, memory, the
 * GPipe closed form, a hand-derived 1F1B table), instruction lists (order, matching, grad sync
 * and apply), the simulation (no deadlock under the execution rule, deadlock detection, exact
 * makespans, bounds, the latency model), printing and error cases.
 *
 * Makespan with equal stage times t_f, t_b and free links: (B + S - 1)(t_f + t_b) for both
 * schedules. Derivation:
 *   lower bound (any schedule): the last stage cannot start before micro-batch 0 went through
 *   the S - 1 forwards before it, then has B (t_f + t_b) of work, and the gradient of its last
 *   backward must still go through S - 1 backwards: (S - 1) t_f + B (t_f + t_b) + (S - 1) t_b.
 *   upper bound: the simulation starts every instruction as early as possible, so any timing
 *   that respects each stage's order and the data dependencies ends no earlier. GPipe: forwards
 *   and backwards are two flow shops of identical jobs, (S + B - 1) t_f + (S + B - 1) t_b.
 *   1F1B: start forward k on stage s at s t_f + k t_f when it is a warm-up forward
 *   (k < w_s = min(S - s - 1, B)), else at s t_f + k (t_f + t_b); backward k on stage s at
 *   (s + 1) t_f + (S - 1 - s + k)(t_f + t_b). Forward k on s - 1 ends exactly when (or before)
 *   forward k on s starts, backward k on s + 1 ends exactly when backward k on s starts, a
 *   stage's tasks do not overlap (the steady forward k + 1 starts when backward k - w_s ends),
 *   and the last task, backward B - 1 on stage 0, ends at t_f + (S + B - 2)(t_f + t_b) + t_b
 *   = (B + S - 1)(t_f + t_b). Both bounds meet. test_equal_times checks it for S <= 6,
 *   B <= 10, and the model sum t_i + (B - 1) max t_i gives the same number.
 *
 * Random stage times are small integers so every sum is exact in double and times compare with
 * ==.
 */
#include "schedule.h"
#include "check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static int rng_int(int lo, int hi) { return lo + (int)(rng_next() % (uint64_t)(hi - lo + 1)); }

static const ap_schedule_kind kinds[] = {AP_SCHEDULE_GPIPE, AP_SCHEDULE_1F1B};
#define MAXS 16
#define MAXB 32

static int imin(int a, int b) { return a < b ? a : b; }
static double dmax(double a, double b) { return a > b ? a : b; }

static ap_schedule *build(ap_schedule_kind kind, int S, int B) {
    ap_schedule *sc = NULL;
    ap_status st = ap_schedule_build(kind, S, B, &sc);
    CHECK(st == AUTOPAR_OK && sc, "build %s S=%d B=%d: %s", ap_schedule_kind_name(kind), S, B,
          autopar_last_error());
    return st == AUTOPAR_OK ? sc : NULL;
}

/* ---- clock table ------------------------------------------------------------------------- */

/* Every (stage, micro-batch) runs one forward and one backward, in dependency order; APPLY only
 * in the last clock; 2 (B + S - 1) compute clocks; stored micro-batches per stage bounded. */
static void check_table(const ap_schedule *sc) {
    int S = sc->n_stages, B = sc->n_micro_batches;
    const char *kn = ap_schedule_kind_name(sc->kind);
    int fclk[MAXS][MAXB], bclk[MAXS][MAXB], fcnt[MAXS][MAXB], bcnt[MAXS][MAXB];
    memset(fcnt, 0, sizeof fcnt);
    memset(bcnt, 0, sizeof bcnt);
    CHECK(sc->n_clocks == 2 * (B + S - 1) + 1, "%s S=%d B=%d: %d clocks, want %d", kn, S, B,
          sc->n_clocks, 2 * (B + S - 1) + 1);
    int live[MAXS] = {0}, peak[MAXS] = {0};
    for (int c = 0; c < sc->n_clocks; c++)
        for (int s = 0; s < S; s++) {
            ap_sched_task t = ap_schedule_task(sc, c, s);
            bool last = c == sc->n_clocks - 1;
            CHECK((t.type == AP_TASK_APPLY) == last, "%s S=%d B=%d: clock %d stage %d type %d", kn,
                  S, B, c, s, (int)t.type);
            if (t.type == AP_TASK_FORWARD || t.type == AP_TASK_BACKWARD) {
                if (t.micro_batch < 0 || t.micro_batch >= B) {
                    CHECK(0, "%s: micro-batch %d out of range", kn, t.micro_batch);
                    continue;
                }
                if (t.type == AP_TASK_FORWARD) {
                    fclk[s][t.micro_batch] = c;
                    fcnt[s][t.micro_batch]++;
                    if (++live[s] > peak[s]) peak[s] = live[s];
                } else {
                    bclk[s][t.micro_batch] = c;
                    bcnt[s][t.micro_batch]++;
                    live[s]--;
                }
            } else {
                CHECK(t.micro_batch == -1, "%s: idle/apply cell with micro-batch %d", kn,
                      t.micro_batch);
            }
        }
    for (int s = 0; s < S; s++)
        for (int k = 0; k < B; k++) {
            CHECK(fcnt[s][k] == 1 && bcnt[s][k] == 1, "%s S=%d B=%d: stage %d mb %d runs %d "
                  "forwards, %d backwards", kn, S, B, s, k, fcnt[s][k], bcnt[s][k]);
            if (fcnt[s][k] != 1 || bcnt[s][k] != 1) continue;
            if (s > 0)
                CHECK(fclk[s][k] > fclk[s - 1][k], "%s S=%d B=%d: F%d on stage %d at clock %d, "
                      "on stage %d at %d", kn, S, B, k, s, fclk[s][k], s - 1, fclk[s - 1][k]);
            if (s < S - 1)
                CHECK(bclk[s][k] > bclk[s + 1][k], "%s S=%d B=%d: B%d on stage %d at clock %d, "
                      "on stage %d at %d", kn, S, B, k, s, bclk[s][k], s + 1, bclk[s + 1][k]);
            CHECK(bclk[s][k] > fclk[s][k], "%s: B%d before F%d on stage %d", kn, k, k, s);
        }
    /* 1F1B: a forward always runs in the clock right after the stage's previous task (the first
     * one in clock s). Alpa's PipeDreamFlush places forwards exactly there without checking
     * their input, and backwards, like the clock simulation, in the first clock after the next
     * stage's backward of that micro-batch; so the two tables are the same. */
    if (sc->kind == AP_SCHEDULE_1F1B)
        for (int s = 0; s < S; s++) {
            int prev = s - 1;
            for (int c = 0; c < sc->n_clocks - 1; c++) {
                ap_sched_task t = ap_schedule_task(sc, c, s);
                if (t.type == AP_TASK_IDLE) continue;
                if (t.type == AP_TASK_FORWARD)
                    CHECK(c == prev + 1, "1f1b S=%d B=%d stage %d: F%d at clock %d, previous "
                          "task at %d", S, B, s, t.micro_batch, c, prev);
                prev = c;
            }
        }
    for (int s = 0; s < S; s++) {
        int want = sc->kind == AP_SCHEDULE_GPIPE ? B : imin(S - s, B);
        CHECK(peak[s] == want, "%s S=%d B=%d: stage %d holds up to %d micro-batches, want %d", kn,
              S, B, s, peak[s], want);
        CHECK(sc->peak_activations[s] == want, "%s S=%d B=%d: schedule says stage %d peak %d, "
              "want %d", kn, S, B, s, sc->peak_activations[s], want);
    }
}

/* GPipe: forward clock c runs F(c - s) on stage s; backward clock c' runs B(c' - (S - 1 - s)):
 * Alpa's mirrored clocks, micro-batch 0 first on the last stage. */
static void check_gpipe_closed_form(const ap_schedule *sc) {
    int S = sc->n_stages, B = sc->n_micro_batches, F = B + S - 1;
    for (int c = 0; c < 2 * F; c++)
        for (int s = 0; s < S; s++) {
            ap_sched_task t = ap_schedule_task(sc, c, s);
            int k = c < F ? c - s : (c - F) - (S - 1 - s);
            ap_task_type want = (k >= 0 && k < B) ? (c < F ? AP_TASK_FORWARD : AP_TASK_BACKWARD)
                                                  : AP_TASK_IDLE;
            CHECK(t.type == want && (want == AP_TASK_IDLE || t.micro_batch == k),
                  "gpipe S=%d B=%d clock %d stage %d: got type %d mb %d, want type %d mb %d", S, B,
                  c, s, (int)t.type, t.micro_batch, (int)want, k);
        }
}

/* 1F1B, S = 3, B = 4, derived by hand (the first 7 clocks are the example in Alpa's
 * PipeDreamFlush docstring). */
static void test_1f1b_hand(void) {
    static const char *const want[12][3] = {
        {"F0", ".", "."},   {"F1", "F0", "."},  {"F2", "F1", "F0"}, {".", ".", "B0"},
        {".", "B0", "F1"},  {"B0", "F2", "B1"}, {"F3", "B1", "F2"}, {"B1", "F3", "B2"},
        {".", "B2", "F3"},  {"B2", ".", "B3"},  {".", "B3", "."},   {"B3", ".", "."},
    };
    ap_schedule *sc = build(AP_SCHEDULE_1F1B, 3, 4);
    if (!sc) return;
    CHECK(sc->n_clocks == 13, "1f1b 3x4: %d clocks", sc->n_clocks);
    for (int c = 0; c < 12 && c < sc->n_clocks; c++)
        for (int s = 0; s < 3; s++) {
            ap_sched_task t = ap_schedule_task(sc, c, s);
            char buf[16];
            if (t.type == AP_TASK_FORWARD) snprintf(buf, sizeof buf, "F%d", t.micro_batch);
            else if (t.type == AP_TASK_BACKWARD) snprintf(buf, sizeof buf, "B%d", t.micro_batch);
            else snprintf(buf, sizeof buf, ".");
            CHECK(strcmp(buf, want[c][s]) == 0, "1f1b 3x4 clock %d stage %d: %s, want %s", c, s,
                  buf, want[c][s]);
        }
    ap_schedule_free(sc);
}

/* ---- instruction lists ------------------------------------------------------------------- */

static bool is_send(ap_inst_op op) {
    return op == AP_INST_SEND_ACTIVATION || op == AP_INST_SEND_GRAD;
}

static void check_insts(const ap_schedule *sc) {
    int S = sc->n_stages, B = sc->n_micro_batches;
    const char *kn = ap_schedule_kind_name(sc->kind);
    /* sends[kind][from][to-side boundary][mb] and the same for receives. */
    static int sent[2][MAXS][MAXB], recvd[2][MAXS][MAXB];
    memset(sent, 0, sizeof sent);
    memset(recvd, 0, sizeof recvd);
    for (int s = 0; s < S; s++) {
        int n;
        const ap_inst *in = ap_schedule_stage_insts(sc, s, &n);
        int n_f[MAXB] = {0}, n_b[MAXB] = {0}, n_free[MAXB] = {0};
        int n_sync = 0, n_apply = 0, last_bwd = -1, sync_at = -1, apply_at = -1, n_bwd = 0;
        int prev_clock = -1;
        for (int i = 0; i < n; i++) {
            const ap_inst *x = &in[i];
            int k = x->micro_batch;
            CHECK(x->clock >= prev_clock, "%s S=%d B=%d stage %d #%d: clock %d after %d", kn, S,
                  B, s, i, x->clock, prev_clock);
            prev_clock = x->clock;
            bool has_mb = x->op != AP_INST_GRAD_SYNC && x->op != AP_INST_APPLY;
            CHECK(has_mb ? (k >= 0 && k < B) : k == -1, "%s stage %d #%d %s: micro-batch %d", kn,
                  s, i, ap_inst_op_name(x->op), k);
            if (has_mb && (k < 0 || k >= B)) continue;
            /* The instruction's clock is its task's clock in the table. */
            ap_sched_task t = ap_schedule_task(sc, x->clock, s);
            switch (x->op) {
            case AP_INST_RUN_FORWARD:
            case AP_INST_RUN_BACKWARD: {
                bool fwd = x->op == AP_INST_RUN_FORWARD;
                CHECK(t.type == (fwd ? AP_TASK_FORWARD : AP_TASK_BACKWARD) &&
                      t.micro_batch == k, "%s stage %d #%d: %s mb %d at clock %d", kn, s, i,
                      ap_inst_op_name(x->op), k, x->clock);
                /* The receive right before, the send (backward: FREE, then send) right after. */
                bool want_recv = fwd ? s > 0 : s < S - 1;
                bool want_send = fwd ? s < S - 1 : s > 0;
                ap_inst_op rop = fwd ? AP_INST_RECV_ACTIVATION : AP_INST_RECV_GRAD;
                ap_inst_op sop = fwd ? AP_INST_SEND_ACTIVATION : AP_INST_SEND_GRAD;
                int speer = fwd ? s + 1 : s - 1, rpeer = fwd ? s - 1 : s + 1;
                if (want_recv)
                    CHECK(i > 0 && in[i - 1].op == rop && in[i - 1].micro_batch == k &&
                          in[i - 1].peer == rpeer, "%s S=%d B=%d stage %d #%d: %s mb %d not "
                          "preceded by its receive", kn, S, B, s, i, ap_inst_op_name(x->op), k);
                else
                    CHECK(i == 0 || in[i - 1].op != rop, "%s stage %d: receive on an end stage",
                          kn, s);
                int j = fwd ? i + 1 : i + 2;
                if (!fwd)
                    CHECK(i + 1 < n && in[i + 1].op == AP_INST_FREE && in[i + 1].micro_batch == k,
                          "%s stage %d #%d: RUN_BACKWARD mb %d not followed by FREE", kn, s, i, k);
                if (want_send)
                    CHECK(j < n && in[j].op == sop && in[j].micro_batch == k &&
                          in[j].peer == speer, "%s S=%d B=%d stage %d #%d: %s mb %d not followed "
                          "by its send", kn, S, B, s, i, ap_inst_op_name(x->op), k);
                else
                    CHECK(j >= n || in[j].op != sop, "%s stage %d: send on an end stage", kn, s);
                if (fwd) {
                    n_f[k]++;
                } else {
                    CHECK(n_f[k] == 1, "%s stage %d: backward mb %d before its forward", kn, s,
                          k);
                    unsigned want = (n_bwd == 0 ? AP_INST_FIRST_MB : 0u) |
                                    (n_bwd == B - 1 ? AP_INST_LAST_MB : 0u);
                    CHECK(x->flags == want, "%s S=%d B=%d stage %d backward #%d: flags %u, want "
                          "%u", kn, S, B, s, n_bwd, x->flags, want);
                    n_b[k]++;
                    n_bwd++;
                    last_bwd = i;
                }
                break;
            }
            case AP_INST_SEND_ACTIVATION:
            case AP_INST_SEND_GRAD:
            case AP_INST_RECV_ACTIVATION:
            case AP_INST_RECV_GRAD: {
                int kind = (x->op == AP_INST_SEND_ACTIVATION || x->op == AP_INST_RECV_ACTIVATION)
                               ? 0 : 1;
                bool snd = is_send(x->op);
                int want_peer = (kind == 0) == snd ? s + 1 : s - 1;
                CHECK(x->peer == want_peer && x->peer >= 0 && x->peer < S, "%s stage %d #%d %s: "
                      "peer %d", kn, s, i, ap_inst_op_name(x->op), x->peer);
                if (x->peer < 0 || x->peer >= S) break;
                int b = s < x->peer ? s : x->peer;
                if (snd) sent[kind][b][k]++;
                else recvd[kind][b][k]++;
                CHECK(x->flags == 0, "%s: flags on a transfer", kn);
                break;
            }
            case AP_INST_FREE:
                CHECK(n_b[k] == 1 && n_free[k] == 0, "%s stage %d #%d: FREE mb %d (backwards %d, "
                      "frees %d)", kn, s, i, k, n_b[k], n_free[k]);
                n_free[k]++;
                break;
            case AP_INST_GRAD_SYNC: n_sync++, sync_at = i; break;
            case AP_INST_APPLY: n_apply++, apply_at = i; break;
            default: CHECK(0, "%s stage %d #%d: bad op %d", kn, s, i, (int)x->op);
            }
        }
        for (int k = 0; k < B; k++)
            CHECK(n_f[k] == 1 && n_b[k] == 1 && n_free[k] == 1, "%s S=%d B=%d stage %d mb %d: %d "
                  "forwards, %d backwards, %d frees", kn, S, B, s, k, n_f[k], n_b[k], n_free[k]);
        CHECK(n_sync == 1 && n_apply == 1, "%s S=%d B=%d stage %d: %d GRAD_SYNC, %d APPLY", kn, S,
              B, s, n_sync, n_apply);
        CHECK(sync_at > last_bwd && apply_at > sync_at && apply_at == n - 1, "%s S=%d B=%d stage "
              "%d: last backward #%d, GRAD_SYNC #%d, APPLY #%d of %d", kn, S, B, s, last_bwd,
              sync_at, apply_at, n);
    }
    /* Every SEND has exactly one matching RECV (same kind, micro-batch, boundary) and back. */
    for (int kind = 0; kind < 2; kind++)
        for (int b = 0; b < S; b++)
            for (int k = 0; k < B; k++) {
                int want = b < S - 1 ? 1 : 0;
                CHECK(sent[kind][b][k] == want && recvd[kind][b][k] == want, "%s S=%d B=%d: %s "
                      "mb %d boundary %d: %d sends, %d receives", kn, S, B,
                      kind ? "gradient" : "activation", k, b, sent[kind][b][k],
                      recvd[kind][b][k]);
            }
}

/* ---- simulation -------------------------------------------------------------------------- */

typedef struct times {
    double tf[MAXS], tb[MAXS], la[MAXS], lg[MAXS], sync[MAXS], apply[MAXS];
} times;

static ap_status simulate(const ap_schedule *sc, const times *t, ap_send_mode mode,
                          bool with_sync, ap_schedule_sim_result *r) {
    ap_schedule_sim_params p = {
        .t_forward = t->tf, .t_backward = t->tb, .t_send_activation = t->la,
        .t_send_grad = t->lg, .mode = mode,
        .t_grad_sync = with_sync ? t->sync : NULL, .t_apply = with_sync ? t->apply : NULL,
    };
    return ap_schedule_simulate(sc, &p, r);
}

/* max_s [sum_{i<s} (tf_i + tb_i + la_i + lg_i) + B (tf_s + tb_s)]: a bound any schedule obeys. */
static double lower_bound(int S, int B, const times *t) {
    double best = 0.0, prefix = 0.0;
    for (int s = 0; s < S; s++) {
        best = dmax(best, prefix + B * (t->tf[s] + t->tb[s]));
        prefix += t->tf[s] + t->tb[s] + (s < S - 1 ? t->la[s] + t->lg[s] : 0.0);
    }
    return best;
}

/* Clock-synchronous time: each compute clock as long as its slowest task plus the slowest link.
 * The simulation with asynchronous sends never exceeds it (every task of clock c starts by the
 * start of clock c, by induction on c). */
static double lockstep_bound(const ap_schedule *sc, const times *t) {
    int S = sc->n_stages;
    double lmax = 0.0, total = 0.0;
    for (int b = 0; b < S - 1; b++) lmax = dmax(lmax, dmax(t->la[b], t->lg[b]));
    for (int c = 0; c < sc->n_clocks - 1; c++) {
        double d = 0.0;
        for (int s = 0; s < S; s++) {
            ap_sched_task k = ap_schedule_task(sc, c, s);
            if (k.type == AP_TASK_FORWARD) d = dmax(d, t->tf[s]);
            if (k.type == AP_TASK_BACKWARD) d = dmax(d, t->tb[s]);
        }
        total += d + lmax;
    }
    return total;
}

/* GPipe, asynchronous sends: two flow shops of identical jobs (stages and links as machines). */
static double gpipe_exact(int S, int B, const times *t) {
    double sf = 0, sb = 0, mf = 0, mb = 0;
    for (int s = 0; s < S; s++) {
        sf += t->tf[s], sb += t->tb[s];
        mf = dmax(mf, t->tf[s]), mb = dmax(mb, t->tb[s]);
        if (s < S - 1) {
            sf += t->la[s], sb += t->lg[s];
            mf = dmax(mf, t->la[s]), mb = dmax(mb, t->lg[s]);
        }
    }
    return sf + sb + (B - 1) * (mf + mb);
}

static double model(int S, int B, const times *t) {
    double st[MAXS], out = -1;
    for (int s = 0; s < S; s++) st[s] = t->tf[s] + t->tb[s];
    ap_status rc = ap_pipeline_latency(st, S, B, &out);
    CHECK(rc == AUTOPAR_OK, "ap_pipeline_latency: %s", autopar_last_error());
    return out;
}

/* Equal stage times, free links: both schedules take (B + S - 1)(t_f + t_b) = the model (see the
 * file comment); with grad sync and apply times, stage 0 ends last, that much later. */
static void test_equal_times(const ap_schedule *sc) {
    int S = sc->n_stages, B = sc->n_micro_batches;
    const char *kn = ap_schedule_kind_name(sc->kind);
    static const double pairs[][2] = {{1, 2}, {3, 3}, {5, 1}};
    for (int q = 0; q < 3; q++) {
        times t = {0};
        for (int s = 0; s < S; s++) {
            t.tf[s] = pairs[q][0], t.tb[s] = pairs[q][1];
            t.sync[s] = 0.5, t.apply[s] = 0.25;
        }
        double want = (B + S - 1) * (pairs[q][0] + pairs[q][1]);
        for (int with_sync = 0; with_sync < 2; with_sync++) {
            ap_schedule_sim_result r;
            ap_status st = simulate(sc, &t, AP_SEND_ASYNC, with_sync, &r);
            CHECK(st == AUTOPAR_OK && !r.deadlocked, "%s S=%d B=%d: %s", kn, S, B,
                  autopar_last_error());
            double w = want + (with_sync ? 0.75 : 0.0);
            CHECK(r.makespan == w, "%s S=%d B=%d tf=%g tb=%g sync=%d: makespan %g, want %g", kn, S,
                  B, pairs[q][0], pairs[q][1], with_sync, r.makespan, w);
            for (int s = 0; s < S; s++)
                CHECK(r.peak_activations[s] == sc->peak_activations[s] &&
                      r.stopped_at[s] == sc->inst_begin[s + 1] - sc->inst_begin[s],
                      "%s S=%d B=%d stage %d: simulated peak %d, schedule %d", kn, S, B, s,
                      r.peak_activations[s], sc->peak_activations[s]);
            ap_schedule_sim_result_clear(&r);
        }
        CHECK(model(S, B, &t) == want, "%s S=%d B=%d: model %g, want %g", kn, S, B,
              model(S, B, &t), want);
    }
}

typedef struct ratio_stats {
    double min, max;
    int n;
} ratio_stats;

/* Random integer times: no deadlock with asynchronous or grouped sends; asynchronous makespans
 * between the lower bound and the lockstep bound; GPipe exact and >= the model. */
static void test_random_times(const ap_schedule *sc, int trials, ratio_stats *vs_model,
                              ratio_stats *grouped_vs_async) {
    int S = sc->n_stages, B = sc->n_micro_batches;
    const char *kn = ap_schedule_kind_name(sc->kind);
    for (int trial = 0; trial < trials; trial++) {
        times t = {0};
        bool links = trial % 2 == 1;
        for (int s = 0; s < S; s++) {
            t.tf[s] = rng_int(1, 20);
            t.tb[s] = rng_int(1, 40);
            t.la[s] = links ? rng_int(0, 10) : 0;
            t.lg[s] = links ? rng_int(0, 10) : 0;
        }
        ap_schedule_sim_result r, g;
        ap_status st = simulate(sc, &t, AP_SEND_ASYNC, false, &r);
        CHECK(st == AUTOPAR_OK && !r.deadlocked, "%s S=%d B=%d async: %s", kn, S, B,
              autopar_last_error());
        ap_status st2 = simulate(sc, &t, AP_SEND_GROUPED, false, &g);
        CHECK(st2 == AUTOPAR_OK && !g.deadlocked, "%s S=%d B=%d grouped: %s", kn, S, B,
              autopar_last_error());
        if (st == AUTOPAR_OK) {
            double lb = lower_bound(S, B, &t), ub = lockstep_bound(sc, &t);
            CHECK(r.makespan >= lb && r.makespan <= ub, "%s S=%d B=%d: makespan %g outside "
                  "[%g, %g]", kn, S, B, r.makespan, lb, ub);
            double busy_max = 0;
            for (int s = 0; s < S; s++) {
                CHECK(r.busy[s] == B * (t.tf[s] + t.tb[s]), "%s: stage %d busy %g", kn, s,
                      r.busy[s]);
                busy_max = dmax(busy_max, r.finish[s]);
            }
            CHECK(busy_max == r.makespan, "%s: makespan %g, largest finish %g", kn, r.makespan,
                  busy_max);
            double m = model(S, B, &t);
            if (sc->kind == AP_SCHEDULE_GPIPE) {
                double ex = gpipe_exact(S, B, &t);
                CHECK(r.makespan == ex, "gpipe S=%d B=%d: makespan %g, flow-shop formula %g", S, B,
                      r.makespan, ex);
                CHECK(r.makespan >= m, "gpipe S=%d B=%d: makespan %g below the model %g", S, B,
                      r.makespan, m);
            }
            if (!links) {
                double q = r.makespan / m;
                if (vs_model->n == 0 || q < vs_model->min) vs_model->min = q;
                if (vs_model->n == 0 || q > vs_model->max) vs_model->max = q;
                vs_model->n++;
            }
        }
        if (st == AUTOPAR_OK && st2 == AUTOPAR_OK) {
            CHECK(g.makespan >= lower_bound(S, B, &t), "%s grouped: below the lower bound", kn);
            double q = g.makespan / r.makespan;
            if (grouped_vs_async->n == 0 || q < grouped_vs_async->min) grouped_vs_async->min = q;
            if (grouped_vs_async->n == 0 || q > grouped_vs_async->max) grouped_vs_async->max = q;
            grouped_vs_async->n++;
        }
        ap_schedule_sim_result_clear(&r);
        ap_schedule_sim_result_clear(&g);
    }
}

/* Rendezvous sends in list order: GPipe survives; 1F1B deadlocks as soon as S >= 2 and B >= 2,
 * and the simulation reports it. */
static void test_rendezvous(const ap_schedule *sc) {
    int S = sc->n_stages, B = sc->n_micro_batches;
    times t = {0};
    for (int s = 0; s < S; s++) t.tf[s] = 1, t.tb[s] = 2;
    ap_schedule_sim_result r;
    ap_status st = simulate(sc, &t, AP_SEND_RENDEZVOUS, false, &r);
    bool expect_deadlock = sc->kind == AP_SCHEDULE_1F1B && S >= 2 && B >= 2;
    if (expect_deadlock) {
        CHECK(st == AUTOPAR_ERR_INFEASIBLE && r.deadlocked &&
              strstr(autopar_last_error(), "deadlock"), "1f1b S=%d B=%d rendezvous: status %d "
              "(%s)", S, B, (int)st, autopar_last_error());
    } else {
        CHECK(st == AUTOPAR_OK && !r.deadlocked, "%s S=%d B=%d rendezvous: %s",
              ap_schedule_kind_name(sc->kind), S, B, autopar_last_error());
        if (st == AUTOPAR_OK)
            CHECK(r.makespan == (B + S - 1) * 3.0, "%s S=%d B=%d rendezvous: makespan %g",
                  ap_schedule_kind_name(sc->kind), S, B, r.makespan);
    }
    ap_schedule_sim_result_clear(&r);
}

/* A slow first stage hides the rest of a 1F1B pipeline: the makespan is below the model. */
static void test_model_counterexample(void) {
    ap_schedule *sc = build(AP_SCHEDULE_1F1B, 2, 4);
    if (!sc) return;
    times t = {{10, 1}, {10, 1}, {0}, {0}, {0}, {0}};
    ap_schedule_sim_result r;
    ap_status st = simulate(sc, &t, AP_SEND_ASYNC, false, &r);
    CHECK(st == AUTOPAR_OK && r.makespan == 80.0 && model(2, 4, &t) == 82.0,
          "1f1b slow first stage: makespan %g (want 80), model %g (want 82)", r.makespan,
          model(2, 4, &t));
    ap_schedule_sim_result_clear(&r);
    ap_schedule_free(sc);
    sc = build(AP_SCHEDULE_GPIPE, 2, 4);
    if (!sc) return;
    st = simulate(sc, &t, AP_SEND_ASYNC, false, &r);
    CHECK(st == AUTOPAR_OK && r.makespan == 82.0, "gpipe slow first stage: makespan %g (want 82)",
          r.makespan);
    ap_schedule_sim_result_clear(&r);
    ap_schedule_free(sc);
}

/* ---- malformed lists --------------------------------------------------------------------- */

static int find_inst(const ap_schedule *sc, int s, ap_inst_op op, int mb) {
    int n;
    const ap_inst *in = ap_schedule_stage_insts(sc, s, &n);
    for (int i = 0; i < n; i++)
        if (in[i].op == op && in[i].micro_batch == mb) return sc->inst_begin[s] + i;
    return -1;
}

static void test_malformed(void) {
    times t = {0};
    for (int s = 0; s < 4; s++) t.tf[s] = 1, t.tb[s] = 2;
    ap_schedule_sim_result r;

    /* Stage 0 waits for gradient 0 before sending activation 0: a cycle, even with async
     * sends. */
    ap_schedule *sc = build(AP_SCHEDULE_1F1B, 2, 3);
    if (!sc) return;
    int a = find_inst(sc, 0, AP_INST_SEND_ACTIVATION, 0), b = find_inst(sc, 0, AP_INST_RECV_GRAD, 0);
    CHECK(a >= 0 && b > a, "instructions not found");
    /* Move RECV_GRAD 0 to just before SEND_ACTIVATION 0. */
    ap_inst moved = sc->insts[b];
    memmove(&sc->insts[a + 1], &sc->insts[a], (size_t)(b - a) * sizeof moved);
    sc->insts[a] = moved;
    ap_status st = simulate(sc, &t, AP_SEND_ASYNC, false, &r);
    CHECK(st == AUTOPAR_ERR_INFEASIBLE && r.deadlocked && r.stopped_at[0] == a - sc->inst_begin[0],
          "moved receive: status %d, deadlocked %d, stage 0 stopped at %d (%s)", (int)st,
          (int)r.deadlocked, r.stopped_at ? r.stopped_at[0] : -1, autopar_last_error());
    CHECK(strstr(autopar_last_error(), "stage 0 at") && strstr(autopar_last_error(), "stage 1 at"),
          "deadlock message: %s", autopar_last_error());
    ap_schedule_sim_result_clear(&r);
    ap_schedule_free(sc);

    /* A send whose receive was dropped (replaced by a compute instruction that takes no time:
     * the simulation does not check how many GRAD_SYNCs a list has). */
    sc = build(AP_SCHEDULE_GPIPE, 2, 2);
    if (!sc) return;
    int rv = find_inst(sc, 1, AP_INST_RECV_ACTIVATION, 1);
    sc->insts[rv].op = AP_INST_GRAD_SYNC;
    sc->insts[rv].micro_batch = -1;
    sc->insts[rv].peer = -1;
    st = simulate(sc, &t, AP_SEND_ASYNC, false, &r);
    CHECK(st == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "never received"),
          "dropped receive: status %d (%s)", (int)st, autopar_last_error());
    ap_schedule_sim_result_clear(&r);
    /* Under rendezvous the same list deadlocks instead. */
    st = simulate(sc, &t, AP_SEND_RENDEZVOUS, false, &r);
    CHECK(st == AUTOPAR_ERR_INFEASIBLE && r.deadlocked, "dropped receive, rendezvous: %d (%s)",
          (int)st, autopar_last_error());
    ap_schedule_sim_result_clear(&r);
    ap_schedule_free(sc);

    /* Wrong peer; a message received twice; a FREE of a micro-batch not stored. */
    sc = build(AP_SCHEDULE_GPIPE, 3, 2);
    if (!sc) return;
    int sa = find_inst(sc, 1, AP_INST_SEND_ACTIVATION, 0);
    sc->insts[sa].peer = 0;
    st = simulate(sc, &t, AP_SEND_ASYNC, false, &r);
    CHECK(st == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "peer"),
          "wrong peer: %d (%s)", (int)st, autopar_last_error());
    ap_schedule_sim_result_clear(&r);
    sc->insts[sa].peer = 2;
    int r1 = find_inst(sc, 2, AP_INST_RECV_ACTIVATION, 1);
    sc->insts[r1].micro_batch = 0;
    st = simulate(sc, &t, AP_SEND_ASYNC, false, &r);
    CHECK(st == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "twice"),
          "received twice: %d (%s)", (int)st, autopar_last_error());
    ap_schedule_sim_result_clear(&r);
    sc->insts[r1].micro_batch = 1;
    int fr = find_inst(sc, 0, AP_INST_FREE, 0);
    sc->insts[fr].micro_batch = 1;
    st = simulate(sc, &t, AP_SEND_ASYNC, false, &r);
    CHECK(st == AUTOPAR_ERR_INVALID_ARG && strstr(autopar_last_error(), "not stored"),
          "bad free: %d (%s)", (int)st, autopar_last_error());
    ap_schedule_sim_result_clear(&r);
    sc->insts[fr].micro_batch = 0;
    st = simulate(sc, &t, AP_SEND_ASYNC, false, &r);
    CHECK(st == AUTOPAR_OK, "restored list: %s", autopar_last_error());
    ap_schedule_sim_result_clear(&r);
    ap_schedule_free(sc);
}

/* ---- printing ---------------------------------------------------------------------------- */

static void test_print(void) {
    ap_schedule *sc = build(AP_SCHEDULE_1F1B, 3, 4);
    if (!sc) return;
    FILE *f = tmpfile();
    CHECK(f != NULL, "tmpfile");
    if (f) {
        ap_schedule_print(sc, f);
        long len = ftell(f);
        char *buf = malloc((size_t)len + 1);
        CHECK(buf != NULL, "malloc");
        if (buf) {
            rewind(f);
            size_t got = fread(buf, 1, (size_t)len, f);
            buf[got] = '\0';
            CHECK(strstr(buf, "pipeline schedule 1f1b: 3 stages, 4 micro-batches, 13 clocks"),
                  "header:\n%s", buf);
            CHECK(strstr(buf, "clock | stage 0 | stage 1 | stage 2"), "table head:\n%s", buf);
            CHECK(strstr(buf, "    5 | B0      | F2      | B1"), "clock 5 row:\n%s", buf);
            CHECK(strstr(buf, "   12 | APPLY   | APPLY   | APPLY"), "apply row:\n%s", buf);
            CHECK(strstr(buf, "stage 0: 22 instructions, at most 3 micro-batches stored"),
                  "stage header:\n%s", buf);
            CHECK(strstr(buf, "RECV_ACTIVATION  mb 0 <- stage 0"), "receive line:\n%s", buf);
            CHECK(strstr(buf, "RUN_BACKWARD     mb 3 (last: grad sync follows)"),
                  "last backward line:\n%s", buf);
            free(buf);
        }
        fclose(f);
    }
    /* For people reading the test log. */
    ap_schedule_print(sc, stdout);
    ap_schedule_print(NULL, stdout);   /* NULL-safe */
    ap_schedule_free(sc);
}

/* ---- errors ------------------------------------------------------------------------------ */

static void expect_invalid(ap_status st, const char *what) {
    CHECK(st == AUTOPAR_ERR_INVALID_ARG && autopar_last_error()[0] != '\0',
          "%s: status %d, message '%s'", what, (int)st, autopar_last_error());
}

static void test_errors(void) {
    ap_schedule *sc = (ap_schedule *)&sc;   /* must be reset to NULL on failure */
    autopar_clear_error();
    expect_invalid(ap_schedule_build(AP_SCHEDULE_1F1B, 0, 4, &sc), "S = 0");
    CHECK(sc == NULL && strstr(autopar_last_error(), "stages"), "S = 0: %s",
          autopar_last_error());
    autopar_clear_error();
    expect_invalid(ap_schedule_build(AP_SCHEDULE_GPIPE, -3, 4, &sc), "S < 0");
    autopar_clear_error();
    expect_invalid(ap_schedule_build(AP_SCHEDULE_GPIPE, 2, 0, &sc), "B = 0");
    CHECK(strstr(autopar_last_error(), "micro-batches"), "B = 0: %s", autopar_last_error());
    autopar_clear_error();
    expect_invalid(ap_schedule_build(AP_SCHEDULE_1F1B, 2, -1, &sc), "B < 0");
    autopar_clear_error();
    expect_invalid(ap_schedule_build((ap_schedule_kind)7, 2, 2, &sc), "bad kind");
    CHECK(strstr(autopar_last_error(), "kind"), "bad kind: %s", autopar_last_error());
    autopar_clear_error();
    expect_invalid(ap_schedule_build(AP_SCHEDULE_KIND_COUNT, 2, 2, &sc), "kind = COUNT");
    autopar_clear_error();
    expect_invalid(ap_schedule_build((ap_schedule_kind)-1, 2, 2, &sc), "kind = -1");
    autopar_clear_error();
    expect_invalid(ap_schedule_build(AP_SCHEDULE_1F1B, 2, 2, NULL), "out NULL");
    autopar_clear_error();
    expect_invalid(ap_schedule_build(AP_SCHEDULE_1F1B, AP_SCHEDULE_MAX_STAGES, 1 << 19, &sc),
                   "huge table");

    ap_schedule_kind k;
    CHECK(ap_schedule_kind_from_name("1f1b", &k) == AUTOPAR_OK && k == AP_SCHEDULE_1F1B, "1f1b");
    CHECK(ap_schedule_kind_from_name("gpipe", &k) == AUTOPAR_OK && k == AP_SCHEDULE_GPIPE,
          "gpipe");
    expect_invalid(ap_schedule_kind_from_name("pipedream", &k), "unknown name");
    CHECK(strstr(autopar_last_error(), "gpipe, 1f1b"), "name list: %s", autopar_last_error());
    CHECK(strcmp(ap_schedule_kind_name((ap_schedule_kind)9), "?") == 0, "kind name");
    CHECK(strcmp(ap_inst_op_name(AP_INST_OP_COUNT), "?") == 0, "op name");
    CHECK(strcmp(ap_send_mode_name(AP_SEND_GROUPED), "grouped") == 0, "mode name");

    double out, ok_t[2] = {1, 2}, bad_t[2] = {1, -1}, nan_t[2] = {1, NAN}, nan_g[1] = {NAN};
    CHECK(ap_pipeline_latency(ok_t, 2, 3, &out) == AUTOPAR_OK && out == 7.0, "model 1+2+2*2");
    expect_invalid(ap_pipeline_latency(ok_t, 0, 3, &out), "model S = 0");
    expect_invalid(ap_pipeline_latency(ok_t, 2, 0, &out), "model B = 0");
    expect_invalid(ap_pipeline_latency(bad_t, 2, 3, &out), "model negative time");
    expect_invalid(ap_pipeline_latency(nan_t, 2, 3, &out), "model NaN");
    expect_invalid(ap_pipeline_latency(NULL, 2, 3, &out), "model NULL");

    sc = build(AP_SCHEDULE_1F1B, 2, 2);
    if (!sc) return;
    ap_schedule_sim_result r;
    ap_schedule_sim_params p = {.t_forward = ok_t, .t_backward = ok_t};
    expect_invalid(ap_schedule_simulate(NULL, &p, &r), "sim NULL schedule");
    ap_schedule_sim_result_clear(&r);
    expect_invalid(ap_schedule_simulate(sc, NULL, &r), "sim NULL params");
    ap_schedule_sim_result_clear(&r);
    expect_invalid(ap_schedule_simulate(sc, &p, NULL), "sim NULL out");
    p.t_backward = bad_t;
    expect_invalid(ap_schedule_simulate(sc, &p, &r), "sim negative time");
    ap_schedule_sim_result_clear(&r);
    p.t_backward = ok_t;
    p.t_send = NAN;
    expect_invalid(ap_schedule_simulate(sc, &p, &r), "sim NaN link");
    ap_schedule_sim_result_clear(&r);
    p.t_send = 0;
    p.t_send_grad = nan_g;
    expect_invalid(ap_schedule_simulate(sc, &p, &r), "sim NaN grad link");
    ap_schedule_sim_result_clear(&r);
    p.t_send_grad = NULL;
    p.mode = AP_SEND_MODE_COUNT;
    expect_invalid(ap_schedule_simulate(sc, &p, &r), "sim bad mode");
    ap_schedule_sim_result_clear(&r);
    p.mode = AP_SEND_ASYNC;
    p.t_forward = NULL;
    expect_invalid(ap_schedule_simulate(sc, &p, &r), "sim NULL forward times");
    ap_schedule_sim_result_clear(&r);
    ap_schedule_sim_result_clear(NULL);
    ap_schedule_free(NULL);
    ap_schedule_free(sc);
}

int main(void) {
    ratio_stats model_ratio[2] = {{0}}, grouped_ratio[2] = {{0}};
    /* The required range, with the full set of checks. */
    for (int q = 0; q < 2; q++)
        for (int S = 1; S <= 6; S++)
            for (int B = 1; B <= 10; B++) {
                ap_schedule *sc = build(kinds[q], S, B);
                if (!sc) continue;
                check_table(sc);
                if (kinds[q] == AP_SCHEDULE_GPIPE) check_gpipe_closed_form(sc);
                check_insts(sc);
                test_equal_times(sc);
                test_random_times(sc, 20, &model_ratio[q], &grouped_ratio[q]);
                test_rendezvous(sc);
                ap_schedule_free(sc);
            }
    /* A wider range for the claims in schedule.h (clock count, no deadlock when grouped). */
    for (int q = 0; q < 2; q++)
        for (int S = 1; S <= 12; S++)
            for (int B = 1; B <= 24; B++) {
                ap_schedule *sc = build(kinds[q], S, B);
                if (!sc) continue;
                check_table(sc);
                check_insts(sc);
                test_random_times(sc, 2, &model_ratio[q], &grouped_ratio[q]);
                ap_schedule_free(sc);
            }
    test_1f1b_hand();
    test_model_counterexample();
    test_malformed();
    test_print();
    test_errors();
    for (int q = 0; q < 2; q++)
        printf("%s: simulated / model makespan over %d random free-link cases: %.3f .. %.3f; "
               "grouped / async sends over %d cases: %.3f .. %.3f\n",
               ap_schedule_kind_name(kinds[q]), model_ratio[q].n, model_ratio[q].min,
               model_ratio[q].max, grouped_ratio[q].n, grouped_ratio[q].min,
               grouped_ratio[q].max);
    if (g_failures) {
        fprintf(stderr, "test_schedule: %d failure(s)\n", g_failures);
        return 1;
    }
    printf("test_schedule: ok\n");
    return 0;
}
