#!/usr/bin/env bash
# Runs bench/bench_runtime on 1 rank (OpenBLAS with 1 and with 2 threads) and on 2 ranks
# (1 BLAS thread per rank), then prints per model: throughput scaling np2 / np1 (1 BLAS
# thread; goal >= 1.7x for the data-parallel MLP), runtime overhead share (goal < 5%) and the
# error of the plan's predicted step time ("cpu" preset, and CLUSTER if given; goal within 15%).
#
#   scripts/bench-runtime.sh [BUILD_DIR=build-bench] [STEPS=10] [CLUSTER=docs/clusters/local-2core.json]
#
# Environment: BUILD_DIR, STEPS, WARMUP (2), CLUSTER (a 2-device cluster JSON; a 1-device copy is
# made for the 1-rank run; empty: none), LOG_DIR (kept logs; default a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-bench}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
CLUSTER=${CLUSTER-docs/clusters/local-2core.json}
BIN=$BUILD_DIR/bench/bench_runtime
[ -x "$BIN" ] || { echo "bench-runtime: $BIN not built (cmake --build $BUILD_DIR --target bench_runtime)" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"

c1=(); c2=()
if [ -n "$CLUSTER" ]; then
  sed 's/"devices_per_host": *[0-9]*/"devices_per_host": 1/; s/"hosts": *[0-9]*/"hosts": 1/' \
    "$CLUSTER" > "$LOG_DIR/cluster-1dev.json"
  c1=(--cluster "$LOG_DIR/cluster-1dev.json"); c2=(--cluster "$CLUSTER")
fi

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
echo "load:    $(uptime)"
run() {  # name np threads args...
  local name=$1 np=$2 thr=$3; shift 3
  echo "running: OPENBLAS_NUM_THREADS=$thr mpirun -np $np $BIN --steps $STEPS --warmup $WARMUP $*" >&2
  OPENBLAS_NUM_THREADS=$thr mpirun -np "$np" --oversubscribe --bind-to none "$BIN" \
    --steps "$STEPS" --warmup "$WARMUP" "$@" > "$LOG_DIR/$name.log" 2>&1 ||
    { cat "$LOG_DIR/$name.log" >&2; exit 1; }
}
run np1-t1 1 1 --calibrate "${c1[@]}"
run np1-t2 1 2 --calibrate "${c1[@]}"
run np2-t1 2 1 --calibrate "${c2[@]}"
echo "logs:    $LOG_DIR"
for f in np1-t1 np1-t2 np2-t1; do grep '^calibration' "$LOG_DIR/$f.log" | sed "s/^/$f /"; done

field() { grep "^RESULT model=$2 " "$LOG_DIR/$1.log" | tr ' ' '\n' | grep "^$3=" | cut -d= -f2; }
echo
printf '| model | run | step mean (ms) | step best (ms) | samples/s | tokens/s | GFLOP/s | kernels | comm | overhead | predicted "cpu" (err) | predicted %s (err) |\n' "${CLUSTER:+$(basename "$CLUSTER" .json)}"
echo '|---|---|---|---|---|---|---|---|---|---|---|---|'
for m in mlp gpt; do
  for f in np1-t1 np1-t2 np2-t1; do
    s=$(field $f $m step_ms)
    pct() { awk -v a="$1" -v b="$s" 'BEGIN{printf "%.1f%%", 100*a/b}'; }
    printf '| %s | %s | %.1f | %.1f | %.0f | %.0f | %.1f | %s | %s | %s | %.0f ms (%+.0f%%) | %s |\n' \
      "$m" "$f" "$s" "$(field $f $m best_ms)" "$(field $f $m samples_s)" "$(field $f $m tokens_s)" \
      "$(field $f $m gflops)" "$(pct "$(field $f $m kernel_ms)")" "$(pct "$(field $f $m comm_ms)")" \
      "$(pct "$(field $f $m overhead_ms)")" "$(field $f $m pred_ms)" "$(field $f $m pred_err_pct)" \
      "$(awk -v p="$(field $f $m pred2_ms)" -v e="$(field $f $m pred2_err_pct)" 'BEGIN{if (p<0) print "-"; else printf "%.0f ms (%+.0f%%)", p, e}')"
  done
done
echo
for m in mlp gpt; do
  a=$(field np1-t1 $m samples_s); b=$(field np2-t1 $m samples_s); c=$(field np1-t2 $m samples_s)
  awk -v m=$m -v a="$a" -v b="$b" -v c="$c" -v o="$(field np2-t1 $m overhead_pct)" \
      -v e="$(field np2-t1 $m pred_err_pct)" -v e2="$(field np2-t1 $m pred2_err_pct)" -v cl="$CLUSTER" 'BEGIN{
    printf "%s: scaling np2/np1 %.2fx (1 BLAS thread; goal >= 1.7x for the MLP), np2 vs np1 with 2 BLAS threads %.2fx; overhead %.2f%% at np2 (goal < 5%%); prediction error at np2 %+.0f%% (\"cpu\")", m, b/a, b/c, o, e
    if (cl != "") printf ", %+.0f%% (%s)", e2, cl
    printf " (goal within 15%%)\n" }'
done
# The 2-stage pipeline (np2 only): against the data-parallel MLP of the same global batch.
if grep -q '^RESULT model=pipe ' "$LOG_DIR/np2-t1.log"; then
  awk -v s="$(field np2-t1 pipe step_ms)" -v d="$(field np2-t1 mlp step_ms)" \
      -v o="$(field np2-t1 pipe overhead_pct)" -v c="$(field np2-t1 pipe comm_ms)" \
      -v e="$(field np2-t1 pipe pred_err_pct)" -v e2="$(field np2-t1 pipe pred2_err_pct)" -v cl="$CLUSTER" 'BEGIN{
    printf "pipe: 2-stage 1F1B MLP (4 micro-batches) at np2 %.1f ms/step (data-parallel %.1f ms), comm+wait %.1f%%, overhead %.2f%%; prediction error %+.0f%% (\"cpu\")", s, d, 100*c/s, o, e
    if (cl != "") printf ", %+.0f%% (%s)", e2, cl
    printf "\n" }'
fi
