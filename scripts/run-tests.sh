#!/usr/bin/env bash
# Builds libautopar and runs the whole test suite with CTest. Used by README and by CI (.ci/run).
#   scripts/run-tests.sh               Release build in build/, all tests
#   AUTOPAR_SANITIZE=1 scripts/run-tests.sh   ASan + UBSan build in build-asan/
#   AUTOPAR_VALGRIND=1 scripts/run-tests.sh   valgrind memcheck of a Debug build in build-valgrind/
#                                             (the slowest tests left out; MPI tests at 2 ranks)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

# MPI tests run as root in CI containers.
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
jobs=$(nproc 2>/dev/null || echo 2)

if [ "${AUTOPAR_SANITIZE:-0}" = "1" ]; then
  dir=build-asan
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Debug -DAUTOPAR_SANITIZE=ON -DAUTOPAR_CUDA=OFF
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  export LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp:print_suppressions=0"
elif [ "${AUTOPAR_VALGRIND:-0}" = "1" ]; then
  dir=build-valgrind
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Debug -DAUTOPAR_VALGRIND=ON -DAUTOPAR_CUDA=OFF
else
  dir=build
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release
fi
cmake --build "$dir" -j "$jobs"
ctest --test-dir "$dir" --output-on-failure -j "$jobs"
