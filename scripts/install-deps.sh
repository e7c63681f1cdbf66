#!/usr/bin/env bash
# Installs libautopar's build dependencies from Debian packages. Idempotent: packages already
# installed are skipped, so running it again costs a few dpkg queries. Needs root (or sudo).
# The CUDA toolkit (nvcc, cuBLAS, NCCL) is not installed here: when present, CMake finds it and
# builds the CUDA backend; without it the library builds CPU-only.
set -euo pipefail

packages=(build-essential cmake pkg-config git
          libopenmpi-dev openmpi-bin
          libglpk-dev libcjson-dev libopenblas-dev
          valgrind)   # the memcheck test run (AUTOPAR_VALGRIND=1 scripts/run-tests.sh)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all dependencies present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
