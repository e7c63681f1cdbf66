#!/usr/bin/env bash
# GPU check of the CUDA backend, for a machine with an NVIDIA GPU, the CUDA toolkit and NCCL:
#   1. configures and builds a Release build with the CUDA backend into build-gpu/
#   2. runs the CUDA tests: every CUDA kernel against the CPU reference, CUDA training steps,
#      the backend registry and the NCCL communicator (as many ranks as there are GPUs)
#   2b. trains mpi_test_session's plans on the CUDA backend (1 rank) against the CPU reference
#   3. runs the GPU benchmarks, if any exist (bench/bench_*cuda*, bench/bench_gpu*)
#   4. prints a results table
# Exits 0 only if the backend was built, every CUDA test ran (none skipped) and passed, and
# every benchmark exited 0.
#
#   scripts/gpu-check.sh
#   AUTOPAR_CUDA_ARCHS="90" scripts/gpu-check.sh     (default "80;90"; "native" also works)
#   AUTOPAR_BENCH_TIMEOUT=900 scripts/gpu-check.sh   (seconds per benchmark, default 300)
# Without network, first run `bash scripts/gpu-deps.sh fetch` on a machine with apt and carry
# .deps/debs along: this script then unpacks and uses those packages where the system lacks them.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

dir=build-gpu
archs=${AUTOPAR_CUDA_ARCHS:-80;90}
bench_timeout=${AUTOPAR_BENCH_TIMEOUT:-300}
jobs=$(nproc 2>/dev/null || echo 2)
log=$dir/gpu-check.log
rows=()   # "name|status|seconds|detail"
failed=0

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
add_row() { rows+=("$1|$2|$3|$4"); }

print_table() {
  echo
  echo "== gpu-check results =="
  printf '%-34s %-8s %9s  %s\n' "step" "status" "seconds" "detail"
  printf '%-34s %-8s %9s  %s\n' "----" "------" "-------" "------"
  local r
  for r in "${rows[@]}"; do
    IFS='|' read -r name status secs detail <<<"$r"
    printf '%-34s %-8s %9s  %s\n' "$name" "$status" "$secs" "$detail"
  done
  echo
  if [ "$failed" -eq 0 ]; then echo "gpu-check: PASS"; else echo "gpu-check: FAIL (log: $log)"; fi
}

finish() { print_table; exit "$failed"; }

mkdir -p "$dir"
: >"$log"

# -- 0. dependencies ---------------------------------------------------------------------------
# A machine without network (the lent GPU machines) gets the Debian dependencies as .debs that
# `bash scripts/gpu-deps.sh fetch` downloaded elsewhere into .deps/debs; env unpacks those the
# system lacks into .deps/root and exports their paths, and finds a pip wheel's NCCL.
deps="the system's"
if [ -d .deps/debs ]; then
  if ! deps_env=$(bash scripts/gpu-deps.sh env); then
    add_row "dependencies" "FAIL" "-" "scripts/gpu-deps.sh env failed"
    failed=1
    finish
  fi
  eval "$deps_env"
  if [ -n "${AUTOPAR_DEPS_ROOT:-}" ]; then
    deps="unpacked .debs in $AUTOPAR_DEPS_ROOT ($(cat .deps/debs/source.txt 2>/dev/null))"
  fi
fi
[ -n "${NCCL_ROOT:-}" ] && deps="$deps; NCCL_ROOT $NCCL_ROOT"
echo "dependencies: $deps; mpicc: $(command -v mpicc || echo none)"
add_row "dependencies" "info" "-" "$deps"

if command -v nvidia-smi >/dev/null 2>&1; then
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
        head -n 1)
  echo "GPU: ${gpu:-nvidia-smi found but reports no GPU}"
else
  echo "GPU: nvidia-smi not found (the CUDA tests will skip if there is no device)"
fi

# -- 1. configure + build ----------------------------------------------------------------------
t0=$(now)
if ! cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DAUTOPAR_CUDA=ON \
     "-DCMAKE_CUDA_ARCHITECTURES=$archs" >>"$log" 2>&1; then
  add_row "configure" "FAIL" "$(elapsed "$t0" "$(now)")" "cmake failed, see $log"
  failed=1
  tail -n 30 "$log"
  finish
fi
if ! grep -q "CUDA backend ON" "$log"; then
  why=$(grep -o "CUDA backend OFF[^\"]*" "$log" | head -n 1)
  add_row "configure" "FAIL" "$(elapsed "$t0" "$(now)")" "${why:-CUDA backend not enabled}"
  failed=1
  finish
fi
add_row "configure (archs $archs)" "ok" "$(elapsed "$t0" "$(now)")" ""

t0=$(now)
if ! cmake --build "$dir" -j "$jobs" >>"$log" 2>&1; then
  add_row "build" "FAIL" "$(elapsed "$t0" "$(now)")" "see $log"
  failed=1
  grep -E "error|Error" "$log" | head -n 30
  finish
fi
add_row "build" "ok" "$(elapsed "$t0" "$(now)")" ""

# -- 2. CUDA tests -----------------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
t0=$(now)
ctest_out=$dir/ctest-cuda.log
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
nccl_np="mpi_test_nccl_np1"   # more ranks than GPUs would skip (= FAIL below)
for np in 2 4 8; do [ "${ngpu:-0}" -ge "$np" ] && nccl_np="$nccl_np|mpi_test_nccl_np$np"; done
(cd "$dir" && ctest -R "cuda|^test_backend\$|^($nccl_np)\$" --output-on-failure) >"$ctest_out" 2>&1
ctest_rc=$?
cat "$ctest_out"
secs=$(elapsed "$t0" "$(now)")
n_tests=$(grep -cE "^ *[0-9]+/[0-9]+ Test +#" "$ctest_out")
n_skipped=$(grep -cE "\*\*\*Skipped|Not Run" "$ctest_out")
if [ "$n_tests" -eq 0 ]; then
  add_row "ctest -R cuda" "FAIL" "$secs" "no CUDA tests found"
  failed=1
elif [ "$ctest_rc" -ne 0 ]; then
  add_row "ctest -R cuda" "FAIL" "$secs" "$(grep -E 'tests passed' "$ctest_out" | head -n 1)"
  failed=1
elif [ "$n_skipped" -gt 0 ]; then
  add_row "ctest -R cuda" "SKIPPED" "$secs" "$n_skipped of $n_tests skipped: no usable GPU?"
  failed=1
else
  add_row "ctest -R cuda" "ok" "$secs" "$n_tests tests passed"
fi
# Per-op lines of the kernel comparison, for the record.
if [ -x "$dir/tests/test_cuda_ops" ] && [ "$n_skipped" -eq 0 ]; then
  summary=$("$dir/tests/test_cuda_ops" 2>&1 | tail -n 1)
  add_row "  test_cuda_ops" "info" "-" "$summary"
fi

# -- 2b. sessions on the CUDA backend (one GPU: one rank) --------------------------------------
# mpi_test_session's plans trained on the CUDA backend against the CPU reference executor.
if [ -x "$dir/tests/mpi_test_session" ] && [ "$n_skipped" -eq 0 ]; then
  t0=$(now)
  out=$dir/session-cuda.log
  AUTOPAR_TEST_BACKEND=cuda timeout 300 mpirun --oversubscribe -np 1 \
    "$dir/tests/mpi_test_session" >"$out" 2>&1
  rc=$?
  cat "$out"
  if [ "$rc" -eq 0 ]; then
    add_row "sessions on cuda (np 1)" "ok" "$(elapsed "$t0" "$(now)")" "$(tail -n 1 "$out")"
  else
    add_row "sessions on cuda (np 1)" "FAIL" "$(elapsed "$t0" "$(now)")" "exit $rc, see $out"
    failed=1
  fi
fi

# -- 3. GPU benchmarks (optional) --------------------------------------------------------------
shopt -s nullglob
benches=()
for b in "$dir"/bench/bench_*cuda* "$dir"/bench/bench_gpu*; do
  [ -f "$b" ] && [ -x "$b" ] && benches+=("$b")
done
if [ "${#benches[@]}" -eq 0 ]; then
  add_row "benchmarks" "-" "-" "none (no bench_*cuda* / bench_gpu* programs)"
fi
for b in "${benches[@]}"; do
  name=$(basename "$b")
  t0=$(now)
  out=$dir/$name.log
  timeout "$bench_timeout" "$b" >"$out" 2>&1
  rc=$?
  secs=$(elapsed "$t0" "$(now)")
  echo "---- $name (exit $rc) ----"
  cat "$out"
  if [ "$rc" -eq 0 ]; then
    add_row "$name" "ok" "$secs" "$(tail -n 1 "$out" | cut -c1-140)"
  elif [ "$rc" -eq 77 ]; then
    add_row "$name" "SKIPPED" "$secs" "exit 77"
    failed=1
  else
    add_row "$name" "FAIL" "$secs" "exit $rc"
    failed=1
  fi
done

finish
