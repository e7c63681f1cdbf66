#!/usr/bin/env bash
# Carries libautopar's Debian build dependencies (Open MPI, GLPK, cJSON, OpenBLAS, pkg-config) to
# a machine without network, such as a lent GPU machine that gets a copy of the working tree.
#
#   bash scripts/gpu-deps.sh fetch           on a Debian/Ubuntu machine with apt and network:
#                                            downloads the .debs into .deps/debs (ignored by git;
#                                            carry that folder along with the working tree)
#   eval "$(bash scripts/gpu-deps.sh env)"   on the machine without network: prints nothing for
#                                            dependencies the system already has; otherwise it
#                                            unpacks the .debs into .deps/root (never into /) and
#                                            prints the exports that make CMake, pkg-config,
#                                            mpicc and mpirun use them. Also prints NCCL_ROOT
#                                            when NCCL is not next to the CUDA toolkit but in a
#                                            pip wheel (nvidia-nccl-cu13). Messages go to stderr.
#   GPU_DEPS_FORCE=1 ... env                 unpacks and exports even if the system has them
#
# scripts/gpu-check.sh runs the env step itself when .deps/debs exists.
set -euo pipefail
cd "$(dirname "$0")/.."

deps=$PWD/.deps
debs=$deps/debs
root=$deps/root
max_mib=45   # the device tool carries 64 MiB in all: leave room for the repo and build scripts

say() { echo "gpu-deps: $*" >&2; }
die() { say "$*"; exit 1; }

# What we build against. libopenblas-pthread-dev is named because libopenblas-dev reaches it
# only as a -dev dependency (first of three alternatives); it holds openblas.pc and cblas.h.
# pkgconf: CMake's FindPkgConfig needs a pkg-config program, which bare machines often lack.
roots=(libopenmpi-dev openmpi-bin libglpk-dev libcjson-dev libopenblas-dev
       libopenblas-pthread-dev pkgconf)

# Packages fetch leaves out, because the target machine has its own and ours must never shadow
# them (LD_LIBRARY_PATH would put an older copy in front of the system's):
#  - the C library and the C/C++ toolchain with its runtime libraries: a build machine has a
#    compiler, and gcc brings libgcc-s1, libstdc++6, libgomp1, libatomic1, libquadmath0, ...;
#  - the base system: Essential packages and everything they depend on (computed by
#    essential_closure from this machine; dpkg, coreutils and util-linux pull in zlib1g,
#    libzstd1, libgmp10, libudev1, libuuid1, libselinux1, ...);
#  - tools that only maintainer scripts use (dpkg -x runs none), documentation and JavaScript;
#  - openssh-client: mpirun's agent for remote hosts, never started by a one-host run;
#  - libhwloc-plugins: PCI, OpenCL and X11 discovery, which Open MPI does not need on one host;
#    it would pull in X11, OpenCL and ICU (10 MB) and open the GPU's OpenCL driver in each rank;
#  - -dev packages other than the roots: -dev packages depend on each other for static linking
#    and for headers that ours do not include (mpi.h, glpk.h, cJSON.h, cblas.h are
#    self-contained).
toolchain_re='^(libc6|libc6-dev|libc-dev-bin|libc-bin|linux-libc-dev|libcrypt.*|gcc|gcc-[0-9].*|'
toolchain_re+='g\+\+.*|cpp|cpp-[0-9].*|binutils.*|libbinutils|libctf.*|libgprofng.*|libsframe.*|'
toolchain_re+='gfortran.*|flang.*|lib(gcc|stdc\+\+|gomp|atomic|quadmath|itm|asan|lsan|tsan|'
toolchain_re+='ubsan|hwasan|cc1-|isl|mpc|mpfr)[0-9.-].*|.*-base)$'
tools_re='^(adduser|debconf|cdebconf|dpkg|install-info|perl.*|libperl.*|python.*|passwd|tar|'
tools_re+='debianutils|openssh-client|libjs-.*|libhwloc-plugins)$'

# Packages env always unpacks when it unpacks at all: what we build against and Open MPI's own
# runtime (PMIx, hwloc, libevent), whose plugin and data paths must all come from one tree.
# Every other library package is unpacked only if the system lacks one of its sonames, so a
# newer system copy wins; pkgconf only if the system has no pkg-config.
core_re='^(openmpi-.*|libopenmpi.*|libpmix.*|libhwloc.*|libevent-.*|libglpk.*|libcjson.*|'
core_re+='libopenblas.*)$'

# ---- fetch -----------------------------------------------------------------------------------
essential_closure() {
  local ess
  ess=$(dpkg-query -W -f='${Package} ${Essential}\n' | awk '$2 == "yes" { print $1 }')
  # shellcheck disable=SC2086  # one package name per word
  apt-cache depends --recurse --installed --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances $ess | grep -v '^[ <]' | sort -u
}

# Direct dependencies of one package, the first of each group of alternatives (as apt would
# choose on a bare system), a virtual package replaced by its first provider.
direct_deps() {
  apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances "$1" | awk '
    NR == 1 { next }
    /^ *\|?(Pre)?Depends:/ {
      name = $2; take = !skip; skip = ($1 ~ /^\|/); pending = 0
      if (take) { if (name ~ /^</) pending = 1; else print name }
      next }
    /^    / { if (pending) { print $1; pending = 0 } }'
}

closure() {
  local -A seen=() base=()
  local p d queue=("${roots[@]}")
  for p in $(essential_closure); do base[$p]=1; done
  for p in "${roots[@]}"; do seen[$p]=1; done
  while [ ${#queue[@]} -gt 0 ]; do
    p=${queue[0]}
    queue=("${queue[@]:1}")
    echo "$p"
    for d in $(direct_deps "$p"); do
      [ -n "${seen[$d]:-}" ] && continue
      seen[$d]=1
      if [ -n "${base[$d]:-}" ] || [[ $d =~ $toolchain_re ]] || [[ $d =~ $tools_re ]] ||
         [[ $d == *-dev ]]; then
        continue
      fi
      queue+=("$d")
    done
  done
}

fetch() {
  if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    die "fetch needs a Debian or Ubuntu machine with apt and network"
  fi
  local pkgs apt_opts=()
  mapfile -t pkgs < <(closure)
  [ "$(id -u)" -eq 0 ] && apt_opts=(-o APT::Sandbox::User=root)   # _apt cannot write here
  rm -rf "$debs"
  mkdir -p "$debs"
  say "downloading ${#pkgs[@]} packages: ${pkgs[*]}"
  if ! (cd "$debs" && apt-get "${apt_opts[@]}" -q download "${pkgs[@]}" >/dev/null); then
    [ "$(id -u)" -eq 0 ] || die "apt-get download failed; run apt-get update and try again"
    say "apt-get download failed; updating the package lists once"
    apt-get -qq update
    (cd "$debs" && apt-get "${apt_opts[@]}" -q download "${pkgs[@]}" >/dev/null)
  fi
  local from bytes files=("$debs"/*.deb)
  # shellcheck source=/dev/null
  from=$(. /etc/os-release && echo "${PRETTY_NAME:-?}")
  echo "$from" >"$debs/source.txt"
  bytes=$(cat "${files[@]}" | wc -c)
  say "${#files[@]} .debs from $from, $((bytes / 1024)) KiB in $debs"
  [ "$bytes" -lt $((max_mib * 1024 * 1024)) ] ||
    die "more than $max_mib MiB: too much to carry to the device machine"
}

# ---- env -------------------------------------------------------------------------------------
# True if CMake would find everything here already: mpicc that builds an MPI program, mpiexec,
# GLPK, and cJSON and OpenBLAS through pkg-config.
system_has_deps() {
  command -v mpicc >/dev/null && command -v mpiexec >/dev/null &&
    command -v pkg-config >/dev/null && pkg-config --exists libcjson openblas || return 1
  local t p rc=0 flags=()
  # GLPK as CMake's find_path/find_library look for it: also under CMAKE_PREFIX_PATH.
  for p in ${CMAKE_PREFIX_PATH:+${CMAKE_PREFIX_PATH//:/ }}; do
    flags+=("-I$p/include" "-L$p/lib/x86_64-linux-gnu" "-L$p/lib")
  done
  t=$(mktemp -d)
  printf '#include <mpi.h>\nint main(void) { return MPI_Init(0, 0); }\n' >"$t/m.c"
  printf '#include <glpk.h>\nint main(void) { return glp_version() == 0; }\n' >"$t/g.c"
  { mpicc "$t/m.c" -o "$t/m" && "${CC:-cc}" "${flags[@]}" "$t/g.c" -o "$t/g" -lglpk; } \
    >/dev/null 2>&1 || rc=1
  rm -rf "$t"
  return "$rc"
}

# Which .debs to unpack here (see core_re); prints their paths, and on stderr the others.
choose_debs() {
  local deb pkg f need sonames cache path
  # The system's libraries: "libfoo.so.1 (libc6,x86-64) => /usr/lib/.../libfoo.so.1".
  cache=$( { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true; } |
           awk '/x86-64/ { print $1, $NF }')
  for deb in "$debs"/*.deb; do
    pkg=$(dpkg-deb -f "$deb" Package)
    need=1
    if [[ $pkg =~ $core_re ]]; then
      need=1
    elif [[ $pkg == pkgconf* ]]; then
      # (not our own pkg-config from an earlier eval)
      f=$(command -v pkg-config || true)
      if [ -n "$f" ] && [[ $f != "$root"/* ]]; then
        need=0
        say "the system has pkg-config ($f): not unpacking $pkg"
      fi
    else
      sonames=$(dpkg-deb -c "$deb" | awk '{ print $6 }' |
                sed -n 's|.*/\(lib[^/]*\.so\.[0-9][0-9]*\)$|\1|p')
      need=0
      [ -n "$sonames" ] || need=1   # no library of the usual name: take it to be safe
      for f in $sonames; do
        path=$(awk -v n="$f" '$1 == n && p == "" { p = $2 } END { print p }' <<<"$cache")
        if [ -z "$path" ] || [ ! -e "$path" ]; then need=1; break; fi
      done
      [ "$need" -eq 1 ] ||
        say "the system has $pkg's libraries (${sonames//$'\n'/ }): not unpacking it"
    fi
    [ "$need" -eq 0 ] || echo "$deb"
  done
}

# Relative symlink from $1 to $2 (both inside the tree), without resolving other links on the
# way (ln -r would, and could leave the tree through a link not fixed yet).
relink() {
  ln -sfn "$(realpath -sm --relative-to="$(dirname "$1")" "$2")" "$1"
}

unpack() {
  local deb link target ctl
  rm -rf "$root"
  mkdir -p "$root"
  ctl=$(mktemp -d)
  for deb in "$@"; do
    dpkg-deb -x "$deb" "$root"
    rm -rf "${ctl:?}"/*
    dpkg-deb -e "$deb" "$ctl"
    # update-alternatives links (mpicc, mpirun, libopenblas.so.0, openblas.pc, ...) are made
    # by maintainer scripts, which dpkg -x does not run: make them from postinst's arguments.
    [ -f "$ctl/postinst" ] || continue
    sed -e ':a' -e '/\\$/{N;s/\\\n/ /;ba' -e '}' "$ctl/postinst" |
      { grep -E 'update-alternatives.*--install' || true; } | while read -r -a w; do
        local i
        for ((i = 0; i < ${#w[@]}; i++)); do
          case ${w[i]} in
            --install|--slave) link=${w[i + 1]:-}; target=${w[i + 3]:-} ;;
            *) continue ;;
          esac
          [[ $link == /* && $target == /* && $link$target != *'$'* ]] || continue
          if [ -e "$root$target" ] && [ ! -e "$root$link" ]; then
            mkdir -p "$(dirname "$root$link")"
            relink "$root$link" "$root$target"
          fi
        done
      done
  done
  rm -rf "$ctl"
  # Absolute links (/usr/...) would lead back to the system's files.
  while IFS= read -r -d '' link; do
    target=$(readlink "$link")
    if [[ $target == /* ]] && { [ -e "$root$target" ] || [ -L "$root$target" ]; }; then
      relink "$link" "$root$target"
    fi
  done < <(find "$root" -type l -print0)
  # Absolute paths in pkg-config files, CMake package files and PMIx's default component path.
  local r
  r=$(printf '%s' "$root" | sed 's/[#&\\]/\\&/g')
  find "$root" -type f \( -name '*.pc' -o -name '*.cmake' -o -name '*-mca-params.conf' \) \
    -exec sed -i -E "s#(^|[=\" (;]|-I|-L)/(usr|etc)(/|\$|[\" ;)])#\\1$r/\\2\\3#g" {} +
  # hwloc would load the system's plugins of another hwloc version from its built-in path.
  mkdir -p "$root/usr/lib/x86_64-linux-gnu/hwloc"
}

# "export NAME=<value>[:$NAME]", quoted for eval.
export_path() {
  # shellcheck disable=SC2016  # the ${...} is for eval to expand
  printf 'export %s=%q"${%s:+:$%s}"\n' "$1" "$2" "$1" "$1"
}

debian_env() {
  if [ -z "${GPU_DEPS_FORCE:-}" ] && system_has_deps; then
    if [[ $(command -v mpicc) == "$root"/* ]]; then
      say "already set up from $root (an earlier eval in this shell)"
    else
      say "the system has mpicc, GLPK, cJSON and OpenBLAS: using them"
    fi
    return
  fi
  compgen -G "$debs/*.deb" >/dev/null ||
    die "no .debs in $debs: run 'bash scripts/gpu-deps.sh fetch' on a machine with network"
  command -v dpkg-deb >/dev/null || die "dpkg-deb is missing: cannot unpack $debs"
  local chosen stamp
  mapfile -t chosen < <(choose_debs)
  # Unpack again when the packages, the folder or this script (the fix-ups) changed.
  stamp=$(printf '%s\n' "$root" "$(cksum <scripts/gpu-deps.sh)" "${chosen[@]##*/}")
  if [ "$(cat "$root/.gpu-deps-stamp" 2>/dev/null)" != "$stamp" ]; then
    unpack "${chosen[@]}"
    printf '%s\n' "$stamp" >"$root/.gpu-deps-stamp"
  fi
  say "using ${#chosen[@]} unpacked packages ($(cat "$debs/source.txt" 2>/dev/null || echo ?))" \
      "from $root"

  local u=$root/usr ma=$root/usr/lib/x86_64-linux-gnu libs
  # Every folder with a shared library but those of plugins opened by path (UCX's modules,
  # rsocket's preload library).
  libs=$( { echo "$ma"; echo "$ma/openmpi/lib"; echo "$ma/pmix2/lib"
            find "$root" \( -type f -o -type l \) -name 'lib*.so.[0-9]*' -printf '%h\n' |
              grep -vE '/(ucx|rsocket)$' | sort -u; } | awk '!seen[$0]++' | paste -sd:)
  printf 'export AUTOPAR_DEPS_ROOT=%q\n' "$root"
  export_path PATH "$u/bin"
  export_path LD_LIBRARY_PATH "$libs"
  export_path CMAKE_PREFIX_PATH "$u"
  export_path PKG_CONFIG_PATH "$ma/pkgconfig:$u/share/pkgconfig"
  # Open MPI 4.1: every directory but sysconfdir is ${prefix}-relative, so OPAL_PREFIX moves
  # libdir, the plugins (pkglibdir), the help files and mpicc's wrapper data (pkgdatadir).
  printf 'export OPAL_PREFIX=%q OPAL_SYSCONFDIR=%q\n' "$u" "$root/etc/openmpi"
  # Debian's external PMIx has absolute directories: name each, and its plugin path (which
  # pmix-mca-params.conf, rewritten above, also names).
  local px=$ma/pmix2
  printf 'export PMIX_PREFIX=%q PMIX_EXEC_PREFIX=%q PMIX_LIBDIR=%q PMIX_INCLUDEDIR=%q\n' \
    "$px" "$px" "$px/lib" "$px/include"
  printf 'export PMIX_DATAROOTDIR=%q PMIX_DATADIR=%q PMIX_SYSCONFDIR=%q\n' \
    "$px/share" "$px/share" "$px/share"
  printf 'export PMIX_PKGDATADIR=%q PMIX_PKGLIBDIR=%q PMIX_MCA_mca_base_component_path=%q\n' \
    "$px/share/pmix" "$px/lib/pmix" "$px/lib/pmix"
  printf 'export HWLOC_PLUGINS_PATH=%q\n' "$ma/hwloc"
  # Sandboxes (gVisor, containers) often refuse process_vm_readv, which Open MPI's shared-memory
  # transport uses for large messages between ranks: copy through shared memory instead.
  echo 'export OMPI_MCA_btl_vader_single_copy_mechanism=none'
  # mpirun refuses to start without ssh or rsh (its agent for other hosts), even for one host;
  # fetch leaves openssh-client out, so launch on this host only.
  if ! command -v ssh >/dev/null && ! command -v rsh >/dev/null; then
    echo 'export OMPI_MCA_plm=isolated'
  fi
}

# NCCL: CMakeLists.txt looks next to the CUDA toolkit and in $NCCL_ROOT/{lib,include}.
nccl_env() {
  [ -n "${NCCL_ROOT:-}" ] && return
  local nvcc cuda d lib="" inc=""
  nvcc=$(command -v nvcc || true)
  [ -n "$nvcc" ] || [ ! -x /usr/local/cuda/bin/nvcc ] || nvcc=/usr/local/cuda/bin/nvcc
  [ -n "$nvcc" ] || return 0   # no toolkit: the CUDA backend is off anyway
  cuda=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  for d in "$cuda/lib64" "$cuda/lib" "$cuda/targets/x86_64-linux/lib" \
           /usr/lib/x86_64-linux-gnu /usr/local/lib /usr/lib; do
    [ -e "$d/libnccl.so" ] || [ -e "$d/libnccl.so.2" ] && { lib=$d; break; }
  done
  for d in "$cuda/include" "$cuda/targets/x86_64-linux/include" /usr/include /usr/local/include
  do
    [ -e "$d/nccl.h" ] && { inc=$d; break; }
  done
  [ -n "$lib" ] && [ -n "$inc" ] && return
  # The nvidia-nccl-cu12/cu13 wheels put it in site-packages/nvidia/nccl/{lib,include}.
  local cands=()
  shopt -s nullglob
  cands=(/opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib/libnccl.so.2
         /opt/*/lib/python3*/site-packages/nvidia/*/lib/libnccl.so.2
         /usr/local/lib/python3*/dist-packages/nvidia/*/lib/libnccl.so.2
         /usr/lib/python3/dist-packages/nvidia/*/lib/libnccl.so.2)
  shopt -u nullglob
  [ ${#cands[@]} -gt 0 ] ||
    mapfile -t cands < <(find /opt /usr/local -maxdepth 10 -name libnccl.so.2 2>/dev/null)
  for lib in "${cands[@]}"; do
    d=$(dirname "$(dirname "$lib")")
    if [ -e "$d/include/nccl.h" ]; then
      say "NCCL is not next to the CUDA toolkit ($cuda): using $d"
      printf 'export NCCL_ROOT=%q\n' "$d"
      export_path LD_LIBRARY_PATH "$d/lib"
      return
    fi
  done
  say "no NCCL (libnccl.so.2 and nccl.h) found: the CUDA backend will be off"
}

case ${1:-} in
  fetch) fetch ;;
  env) debian_env; nccl_env ;;
  *) echo "usage: bash scripts/gpu-deps.sh fetch | eval \"\$(bash scripts/gpu-deps.sh env)\"" >&2
     exit 2 ;;
esac
