# shellcheck shell=bash
# Sourced by scripts/conformance.sh: the build phase (and --pack / --prebuilt).
#
# Layout of BUILD (= WORK/build, or the tree a --prebuilt pack unpacks to):
#   nccl/{lib,include}          NCCL (built here, or a link to --nccl-build)
#   upstream/{lib,include}      NVIDIA's libnccl_ep.so.0 and its staged JIT headers (make lib)
#   bin/ep_bench, bin/ep_test   NVIDIA's programs, linked to libnccl_ep.so.0 with no rpath to it
#   gtest/test_*, test_*.info   NVIDIA's gtests; .info: launch mode, internal includes, the
#                               libnccl_ep symbols each binary needs (decides SKIP for ours)
#   py/ep_test.py               NVIDIA's Python test (patched copy)
#   manifest.txt, logs/         what was built from what; one log per build step

GENCODE_ARGS=()
NVCC="$CUDA_HOME/bin/nvcc"
HOST_CXX="${CXX:-g++}"
SRC="$WORK/src"

# step NAME CMD...: run CMD with its output in BUILD/logs/NAME.log; on failure print the log's end.
step() {
  local name="$1"; shift
  if ((DRY)); then printf '+'; printf ' %q' "$@"; printf '   # > logs/%s.log\n' "$name"; return 0; fi
  mkdir -p "$BUILD/logs"
  local t0=$SECONDS rc=0
  "$@" >"$BUILD/logs/$name.log" 2>&1 || rc=$?
  if ((rc == 0)); then
    echo "build: $name ok ($((SECONDS - t0)) s)"
  else
    echo "build: $name FAILED (exit $rc after $((SECONDS - t0)) s); end of $BUILD/logs/$name.log:"
    tail -n 25 "$BUILD/logs/$name.log" | sed 's/^/    /'
  fi
  return "$rc"
}

# sed_patch FILE OLD SED-EXPR MARKER: OLD must occur exactly once before, MARKER exactly once and
# OLD not at all after (so a changed upstream source fails loudly instead of running unpatched).
sed_patch() {
  local f="$1" old="$2" expr="$3" marker="$4" n
  if ((DRY)); then printf '+ sed -i %q %q\n' "$expr" "$f"; return 0; fi
  n="$(grep -cF -- "$old" "$f")"
  [[ "$n" == 1 ]] || { echo "prepare: expected one '$old' in $f, found $n"; return 1; }
  sed -i "$expr" "$f"
  if [[ "$(grep -cF -- "$marker" "$f")" != 1 || "$(grep -cF -- "$old" "$f")" != 0 ]]; then
    echo "prepare: patching '$old' in $f failed"; return 1
  fi
  echo "prepare: patched $(basename "$f"): $marker"
}

# Copy NVIDIA's sources under WORK/src and patch the copy: one GPU serves every rank
# (device = local rank % device count; upstream: cudaSetDevice(localRank)), and ep_test's
# "2 or a multiple of 4 ranks" guard lets 1 rank through when EP_CONFORMANCE_ALLOW_1RANK is set.
prepare_sources() {
  if [[ ! -d "$EP_SRC/nccl_ep" || ! -f "$EP_SRC/makefiles/common.mk" ]]; then
    echo "prepare: --ep-src must be an nccl-extensions checkout (nccl_ep/ and makefiles/common.mk): '$EP_SRC'"
    return 1
  fi
  x rm -rf "$SRC" || return 1
  x mkdir -p "$SRC" || return 1
  x cp -a "$EP_SRC/nccl_ep" "$EP_SRC/makefiles" "$SRC/" || return 1
  EP_COMMIT="${EP_COMMIT:-$(git -C "$EP_SRC" rev-parse HEAD 2>/dev/null || echo unknown)}"
  local d="$SRC/nccl_ep" n
  for prog in ep_bench ep_test; do
    if ((!DRY)); then
      n="$(grep -c 'cudaSetDevice' "$d/$prog.cu")"
      [[ "$n" == 1 ]] || { echo "prepare: expected one cudaSetDevice in $prog.cu, found $n"; return 1; }
    fi
    sed_patch "$d/$prog.cu" 'CUDACHECK(cudaSetDevice(localRank));' \
      's/CUDACHECK(cudaSetDevice(localRank));/{ int conformance_ndev = 1; CUDACHECK(cudaGetDeviceCount(\&conformance_ndev)); CUDACHECK(cudaSetDevice(localRank % conformance_ndev)); }/' \
      'cudaSetDevice(localRank % conformance_ndev)' || return 1
  done
  sed_patch "$d/ep_test.cu" 'if (nRanks != 2 && nRanks % 4 != 0) {' \
    's/if (nRanks != 2 && nRanks % 4 != 0) {/if (nRanks != 2 \&\& nRanks % 4 != 0 \&\& !(nRanks == 1 \&\& getenv("EP_CONFORMANCE_ALLOW_1RANK") != NULL)) {/' \
    'EP_CONFORMANCE_ALLOW_1RANK' || return 1
  if ((DRY)) || [[ -f "$d/ep_test.py" ]]; then
    sed_patch "$d/ep_test.py" 'Device(local_rank)' \
      's/Device(local_rank)/Device(local_rank % max(1, cudart.cudaGetDeviceCount()[1]))/' \
      'cudart.cudaGetDeviceCount()[1]' || return 1
  fi
}

nccl_version() {
  local h="$1/include/nccl.h"
  [[ -f "$h" ]] || { echo unknown; return; }
  awk '/^#define NCCL_(MAJOR|MINOR|PATCH) /{v[$2]=$3} END{print v["NCCL_MAJOR"]"."v["NCCL_MINOR"]"."v["NCCL_PATCH"]}' "$h"
}

build_nccl() {
  local dir="$BUILD/nccl"
  if [[ -n "$NCCL_BUILD" ]]; then
    if ((!DRY)) && ! { [[ -f "$NCCL_BUILD/include/nccl.h" ]] && compgen -G "$NCCL_BUILD/lib/libnccl.so*" >/dev/null; }; then
      echo "build: --nccl-build needs lib/libnccl.so and include/nccl.h: '$NCCL_BUILD'"; return 1
    fi
    x rm -rf "$dir" && x ln -s "$NCCL_BUILD" "$dir" || return 1
  elif [[ -n "$NCCL_SRC" ]]; then
    [[ -L "$dir" ]] && x rm -f "$dir"
    step nccl make -C "$NCCL_SRC" -j"$MAKE_JOBS" src.build BUILDDIR="$dir" \
      "NVCC_GENCODE=$GENCODE" CUDA_HOME="$CUDA_HOME" || return 1
  else
    echo "build: give --nccl-src or --nccl-build"; return 1
  fi
  ((DRY)) && return 0
  local v; v="$(nccl_version "$dir")"
  echo "build: NCCL $v at $(readlink -f "$dir")"
  if [[ "$v" =~ ^([0-9]+)\.([0-9]+) ]] && ((BASH_REMATCH[1] == 2 && BASH_REMATCH[2] < 30)); then
    echo "build: WARNING: NVIDIA's EP v2 expects NCCL >= 2.30 (found $v)"
  fi
}

build_upstream_lib() {
  step upstream-lib make -C "$SRC/nccl_ep" -j"$MAKE_JOBS" lib NCCL_HOME="$BUILD/nccl" \
    BUILDDIR="$BUILD/upstream" "NVCC_GENCODE=$GENCODE" CUDA_HOME="$CUDA_HOME" || return 1
  ((DRY)) || [[ -e "$BUILD/upstream/lib/libnccl_ep.so.0" ]] ||
    { echo "build: make lib produced no $BUILD/upstream/lib/libnccl_ep.so.0"; return 1; }
}

# MPI_INCDIRS / MPI_LIBDIRS from Open MPI's wrapper (as the Makefile's MPI_HOME would give).
mpi_probe() {
  local w="" c
  MPI_INCDIRS=() MPI_LIBDIRS=()
  for c in mpicxx mpic++ mpicc; do command -v "$c" >/dev/null 2>&1 && { w="$c"; break; }; done
  if [[ -z "$w" ]]; then
    ((DRY)) && { MPI_INCDIRS=("<mpicxx --showme:incdirs>") MPI_LIBDIRS=("<mpicxx --showme:libdirs>"); return 0; }
    echo "build: no mpicxx/mpicc on PATH: ep_bench and ep_test need MPI"; return 1
  fi
  read -ra MPI_INCDIRS <<<"$("$w" --showme:incdirs 2>/dev/null)"
  read -ra MPI_LIBDIRS <<<"$("$w" --showme:libdirs 2>/dev/null)"
  echo "build: MPI ($w): include ${MPI_INCDIRS[*]:-(default)}, lib ${MPI_LIBDIRS[*]:-(default)}"
}

# As the Makefile: -DHAVE_CUPTI and -lcupti when cupti.h is there (and here: its library too).
cupti_probe() {
  local d l
  CUPTI_CFLAGS=() CUPTI_LDFLAGS=() CUPTI_LIBDIR=""
  for d in "$CUDA_HOME/include" "$CUDA_HOME/extras/CUPTI/include"; do
    [[ -f "$d/cupti.h" ]] || continue
    for l in "$CUDA_HOME/lib64" "$CUDA_HOME/extras/CUPTI/lib64" "$CUDA_HOME/targets/x86_64-linux/lib"; do
      if compgen -G "$l/libcupti.so*" >/dev/null; then
        CUPTI_CFLAGS=(-DHAVE_CUPTI "-I$d") CUPTI_LDFLAGS=("-L$l" -lcupti) CUPTI_LIBDIR="$l"
        echo "build: CUPTI: $d/cupti.h, $l"; return 0
      fi
    done
  done
  echo "build: no CUPTI (ep_bench without kernel timing, as upstream's Makefile does then)"
}

# The link line of NVIDIA's programs minus its rpath to NVIDIA's EP lib dir: -L to it at link
# time only, so LD_LIBRARY_PATH picks the library at run time. An rpath to NCCL's lib dir stays.
prog_ldflags() {
  PROG_LDFLAGS=("-L$BUILD/upstream/lib" -lnccl_ep "-L$BUILD/nccl/lib" -Xlinker --no-as-needed -lnccl
    -Xlinker --as-needed -Xlinker -rpath -Xlinker "$BUILD/nccl/lib" "${MPI_LIBDIRS[@]/#/-L}" -lmpi
    -lpthread -lrt -ldl "-L$CUDA_HOME/lib64/stubs" -lcuda)
}

# The Makefile's EP_BENCH_NVCUFLAGS / EP_TEST_NVCUFLAGS, plus OMPI_SKIP_MPICXX/MPICH_SKIP_MPICXX:
# Open MPI 4's mpi.h otherwise pulls in its C++ bindings, which -lmpi alone does not link.
prog_nvflags() {
  local name="$1"
  PROG_NVFLAGS=("${GENCODE_ARGS[@]}" "-I$BUILD/upstream/include" "-I$BUILD/nccl/include" -DMPI_SUPPORT
    -DOMPI_SKIP_MPICXX=1 -DMPICH_SKIP_MPICXX=1 "${MPI_INCDIRS[@]/#/-I}" -Xcompiler -fPIC
    -ccbin "$HOST_CXX" -std=c++17)
  [[ "$name" == ep_bench ]] && PROG_NVFLAGS+=("${CUPTI_CFLAGS[@]}")
}

compile_program() {
  local name="$1"
  prog_nvflags "$name"
  x rm -f "$BUILD/bin/$name" "$BUILD/bin/$name.o"
  step "$name-compile" "$NVCC" -o "$BUILD/bin/$name.o" "${PROG_NVFLAGS[@]}" -c "$SRC/nccl_ep/$name.cu"
}

link_program() {
  local name="$1"
  ((DRY)) || [[ -f "$BUILD/bin/$name.o" ]] || return 1
  prog_nvflags "$name"; prog_ldflags
  [[ "$name" == ep_bench ]] && PROG_LDFLAGS+=("${CUPTI_LDFLAGS[@]}")
  step "$name-link" "$NVCC" -o "$BUILD/bin/$name" "${PROG_NVFLAGS[@]}" "$BUILD/bin/$name.o" \
    "${PROG_LDFLAGS[@]}" || return 1
  check_rpath "$BUILD/bin/$name"
}

# No RPATH/RUNPATH entry may hold a libnccl_ep (upstream's or ours): the binary is removed if one
# does, so its rows say ERROR rather than silently testing one library twice.
check_rpath() {
  local bin="$1" dyn p
  if ((DRY)); then printf '+ readelf -d %q   # no RPATH/RUNPATH to an EP library dir\n' "$bin"; return 0; fi
  dyn="$(readelf -d "$bin" 2>/dev/null | grep -E '\((RPATH|RUNPATH)\)')"
  echo "$(basename "$bin"): ${dyn:-no RPATH/RUNPATH}" | tr -s ' ' >>"$BUILD/logs/rpath.txt"
  while IFS= read -r p; do
    [[ -z "$p" ]] && continue
    if compgen -G "$p/libnccl_ep.so*" >/dev/null ||
      [[ "$(readlink -f "$p")" == "$(readlink -f "$BUILD/upstream/lib")" ]]; then
      echo "build: $bin has an rpath to an EP library dir ($p): removed"
      rm -f "$bin"; return 1
    fi
  done < <(sed -n 's/.*\[\(.*\)\].*/\1/p' <<<"$dyn" | tr ':' '\n')
}

# GT (the googletest dir with src/gtest-all.cc) and GT_INC from --gtest.
resolve_gtest() {
  local base="$GTEST" c
  GT="" GT_INC=""
  [[ -n "$base" ]] || { echo "build: no --gtest: the gtest rows will say ERROR"; return 1; }
  if [[ "$base" == *.deb ]]; then
    x rm -rf "$WORK/gtest-deb" && x dpkg -x "$base" "$WORK/gtest-deb" || return 1
    base="$WORK/gtest-deb"
  fi
  for c in "$base" "$base/googletest" "$base/usr/src/googletest/googletest" "$base/usr/src/gtest"; do
    [[ -f "$c/src/gtest-all.cc" ]] && { GT="$c"; break; }
  done
  if [[ -z "$GT" ]]; then
    ((DRY)) && GT="$base/usr/src/googletest/googletest"
    [[ -n "$GT" ]] || { echo "build: no src/gtest-all.cc under '$base'"; return 1; }
  fi
  for c in "$GT/include" "$base/usr/include" /usr/include; do
    [[ -f "$c/gtest/gtest.h" ]] && { GT_INC="$c"; break; }
  done
  GT_INC="${GT_INC:-$GT/include}"
  ((DRY)) || echo "build: googletest $GT (headers $GT_INC)"
}

gtest_names() {
  local f
  for f in "$SRC"/nccl_ep/tests/test_*.cu; do
    [[ -f "$f" ]] && basename "$f" .cu
  done
  ((DRY)) && [[ ! -d "$SRC/nccl_ep/tests" ]] && echo "test_public_struct_abi"
  return 0
}

gtest_nvflags() {
  # shellcheck disable=SC2054 # -Xcompiler takes a comma list
  GT_NVFLAGS=("${GENCODE_ARGS[@]}" "-I$BUILD/upstream/include" "-I$BUILD/upstream/include/nccl_ep"
    "-I$SRC/nccl_ep" "-I$BUILD/nccl/include" "-I$GT_INC" --expt-relaxed-constexpr
    -Xcompiler -fPIC,-pthread -ccbin "$HOST_CXX" -std=c++17)
}

compile_gtest_lib() {
  local o="$BUILD/gtest/obj"
  step gtest-all "$HOST_CXX" -std=c++17 -pthread -isystem "$GT_INC" "-I$GT" -c "$GT/src/gtest-all.cc" \
    -o "$o/gtest-all.o" || return 1
  step gtest-main "$HOST_CXX" -std=c++17 -pthread -isystem "$GT_INC" "-I$GT" -c "$GT/src/gtest_main.cc" \
    -o "$o/gtest_main.o" || return 1
  step gtest-ar-all ar rcs "$BUILD/gtest/lib/gtest.a" "$o/gtest-all.o" || return 1
  step gtest-ar-main ar rcs "$BUILD/gtest/lib/gtest_main.a" "$o/gtest-all.o" "$o/gtest_main.o"
}

compile_gtest() {
  local t="$1"
  gtest_nvflags
  x rm -f "$BUILD/gtest/$t" "$BUILD/gtest/obj/$t.o" "$BUILD/gtest/$t.info"
  step "gtest-$t-compile" "$NVCC" "${GT_NVFLAGS[@]}" -c "$SRC/nccl_ep/tests/$t.cu" -o "$BUILD/gtest/obj/$t.o"
}

# The tests/Makefile link line (it has no rpath at all), then the .info file.
link_gtest() {
  local t="$1"
  ((DRY)) || [[ -f "$BUILD/gtest/obj/$t.o" && -f "$BUILD/gtest/lib/gtest_main.a" ]] || return 1
  gtest_nvflags
  step "gtest-$t-link" "$NVCC" "${GT_NVFLAGS[@]}" "$BUILD/gtest/obj/$t.o" "-L$BUILD/upstream/lib" -lnccl_ep \
    "-L$BUILD/nccl/lib" -lnccl -lpthread -lrt -ldl "-L$CUDA_HOME/lib64/stubs" -lcuda \
    "$BUILD/gtest/lib/gtest.a" "$BUILD/gtest/lib/gtest_main.a" -o "$BUILD/gtest/$t" || return 1
  check_rpath "$BUILD/gtest/$t" || return 1
  gtest_info "$t"
}

# mode=ranks (test_common.h's --rank/--nranks/--uid-file) or single (gtest_main, one process);
# internal=the quoted includes besides test_common.h (NVIDIA-internal headers);
# ep_symbols=what the binary needs from NVIDIA's libnccl_ep (nm: undefined here, defined there).
gtest_info() {
  local t="$1" src="$SRC/nccl_ep/tests/$1.cu" bin="$BUILD/gtest/$1" lib="$BUILD/upstream/lib/libnccl_ep.so.0"
  if ((DRY)); then printf '+ nm -D --undefined-only %q; nm -D --defined-only %q   # > gtest/%s.info\n' "$bin" "$lib" "$t"; return 0; fi
  local mode=single internal syms
  grep -qE 'test_common\.h|ep_parse_args|--nranks=' "$src" && mode=ranks
  internal="$(grep -oE '^[[:space:]]*#[[:space:]]*include[[:space:]]+"[^"]+"' "$src" | sed 's/.*"\(.*\)"/\1/' |
    grep -v '^test_common\.h$' | xargs -r -n1 basename | tr '\n' ' ')"
  syms="$(comm -12 <(nm -D --undefined-only "$bin" | awk '{print $NF}' | sed 's/@.*//' | sort -u) \
    <(nm -D --defined-only "$lib" | awk 'NF >= 3 {print $3}' | sed 's/@.*//' | sort -u) | tr '\n' ' ')"
  printf 'mode=%s\ninternal=%s\nep_symbols=%s\n' "$mode" "${internal% }" "${syms% }" >"$BUILD/gtest/$t.info"
}

write_manifest() {
  ((DRY)) && { echo "+ write $BUILD/manifest.txt"; return 0; }
  {
    echo "format=1"
    echo "date=$(date -u +%FT%TZ)"
    echo "host=$(hostname 2>/dev/null)"
    echo "ep_src=$EP_SRC"
    echo "ep_commit=$EP_COMMIT"
    echo "nccl=$(readlink -f "$BUILD/nccl")"
    echo "nccl_version=$(nccl_version "$BUILD/nccl")"
    echo "gencode=$GENCODE"
    echo "nvcc=$("$NVCC" --version 2>/dev/null | grep -m1 release)"
    echo "cupti_libdir=$CUPTI_LIBDIR"
    echo "mpi_libdirs=${MPI_LIBDIRS[*]}"
  } >"$BUILD/manifest.txt"
}

# pool_wait N: wait until fewer than N background jobs of this shell run.
pool_wait() { while (($(jobs -rp | wc -l) >= $1)); do wait -n 2>/dev/null || true; done; }

build_all() {
  local t0=$SECONDS names=() t ok=0
  read -ra GENCODE_ARGS <<<"$GENCODE"
  x mkdir -p "$BUILD/logs" "$BUILD/bin" "$BUILD/gtest/obj" "$BUILD/gtest/lib" || return 1
  ((DRY)) || rm -f "$BUILD/manifest.txt" "$BUILD/logs/rpath.txt"
  prepare_sources || return 1
  build_nccl || return 1
  build_upstream_lib || return 1
  mpi_probe; cupti_probe
  mapfile -t names < <(gtest_names)
  local have_gt=0
  resolve_gtest && have_gt=1
  # Every compile at once (one nvcc or g++ each, at most --make-jobs), then every link. A step
  # prints its own result, and the end of its log when it fails.
  local par=$((DRY ? 1 : MAKE_JOBS))
  pool_wait "$par"; compile_program ep_bench &
  pool_wait "$par"; compile_program ep_test &
  if ((have_gt)); then
    pool_wait "$par"; compile_gtest_lib &
    for t in "${names[@]}"; do pool_wait "$par"; compile_gtest "$t" & done
  fi
  wait
  for t in ep_bench ep_test; do
    pool_wait "$par"; link_program "$t" &
  done
  if ((have_gt)); then
    for t in "${names[@]}"; do pool_wait "$par"; link_gtest "$t" & done
  fi
  wait
  for t in "${names[@]}"; do ((DRY)) || [[ -x "$BUILD/gtest/$t" ]] && ok=$((ok + 1)); done
  if ((DRY)) || [[ -f "$SRC/nccl_ep/ep_test.py" ]]; then
    x mkdir -p "$BUILD/py" && x cp "$SRC/nccl_ep/ep_test.py" "$BUILD/py/ep_test.py"
  fi
  write_manifest
  ((DRY)) && return 0
  echo "build: done in $((SECONDS - t0)) s: ep_bench $([[ -x $BUILD/bin/ep_bench ]] && echo ok || echo MISSING)," \
    "ep_test $([[ -x $BUILD/bin/ep_test ]] && echo ok || echo MISSING), gtests $ok/${#names[@]}"
  [[ -f "$BUILD/logs/rpath.txt" ]] && sed 's/^/build: rpath: /' "$BUILD/logs/rpath.txt"
  local info
  for info in "$BUILD"/gtest/test_*.info; do
    [[ -f "$info" ]] || continue
    echo "build: $(basename "$info" .info): $(grep '^mode=' "$info"), includes: $(sed -n 's/^internal=//p' "$info")"
  done
  return 0
}

# --pack DIR: the build's run-time files (no objects, static libraries or debug info) as an xz tar
# split in parts of 15 MiB, so a later machine can skip the build (--prebuilt DIR).
pack_build() {
  local stage="$WORK/pack-stage" b f nreal size parts
  if ((DRY)); then echo "+ pack $BUILD -> $PACK/conformance-build.tar.xz.part-NN (15 MiB parts)"; return 0; fi
  [[ -f "$BUILD/manifest.txt" ]] || { echo "pack: no finished build at $BUILD"; return 1; }
  rm -rf "$stage"; b="$stage/build"
  mkdir -p "$b"/{nccl/lib,nccl/include,upstream/lib,upstream/include,bin,gtest,py,logs} || return 1
  nreal="$(readlink -f "$BUILD/nccl")"
  if ! { cp -a "$nreal"/lib/libnccl.so* "$b/nccl/lib/" && cp -a "$nreal/include/." "$b/nccl/include/" &&
    cp -a "$BUILD"/upstream/lib/libnccl_ep.so* "$b/upstream/lib/" &&
    cp -a "$BUILD/upstream/include/." "$b/upstream/include/"; }; then
    echo "pack: copying failed"; return 1
  fi
  for f in "$BUILD"/bin/ep_bench "$BUILD"/bin/ep_test "$BUILD"/gtest/test_*; do
    [[ -f "$f" ]] && cp -a "$f" "$b/${f#"$BUILD"/}"
  done
  cp -a "$BUILD/manifest.txt" "$b/" && cp -a "$BUILD/logs/." "$b/logs/"
  [[ -d "$BUILD/py" ]] && cp -a "$BUILD/py/." "$b/py/"
  find "$b" -type f \( -name '*.so*' -o -path '*/bin/*' -o \( -path '*/gtest/*' ! -name '*.info' \) \) \
    -exec strip --strip-debug {} \; 2>/dev/null
  mkdir -p "$PACK" && rm -f "$PACK"/conformance-build.tar.*.part-*
  if command -v xz >/dev/null 2>&1; then
    tar -C "$stage" -cf - build | xz -T0 -6 | split -b 15M -d -a 2 - "$PACK/conformance-build.tar.xz.part-"
  else
    tar -C "$stage" -cf - build | gzip -6 | split -b 15M -d -a 2 - "$PACK/conformance-build.tar.gz.part-"
  fi || { echo "pack: tar failed"; return 1; }
  size="$(cat "$PACK"/conformance-build.tar.*.part-* | wc -c)"
  parts="$(find "$PACK" -maxdepth 1 -name 'conformance-build.tar.*.part-*' | wc -l)"
  echo "pack: $parts part(s), $((size / 1048576)) MiB in $PACK (unstripped build: $(du -sh "$BUILD" | cut -f1))"
  ((size <= 56 * 1048576)) || echo "pack: WARNING: over 56 MiB: more than one device call brings back or carries"
  rm -rf "$stage"
}

# --prebuilt DIR: a build tree (manifest.txt) used in place, or a --pack directory unpacked
# into WORK/prebuilt. Paths baked in at build time (rpaths, the JIT header dir) may differ there:
# the run sets LD_LIBRARY_PATH and NCCL_EP_JIT_* to this tree.
use_prebuilt() {
  local parts=() dec=()
  if [[ -f "$PREBUILT/manifest.txt" ]]; then BUILD="$PREBUILT"; echo "prebuilt: $BUILD"; return 0; fi
  mapfile -t parts < <(find "$PREBUILT" -maxdepth 1 -name 'conformance-build.tar.*.part-*' 2>/dev/null | sort)
  ((${#parts[@]})) || { echo "prebuilt: no manifest.txt and no conformance-build.tar.*.part-* in '$PREBUILT'"; return 1; }
  case "${parts[0]}" in *.tar.xz.part-*) dec=(xz -dc) ;; *) dec=(gzip -dc) ;; esac
  BUILD="$WORK/prebuilt/build"
  if ((DRY)); then echo "+ cat ${parts[*]} | ${dec[*]} | tar -xf - -C $WORK/prebuilt"; return 0; fi
  rm -rf "$WORK/prebuilt" && mkdir -p "$WORK/prebuilt" || return 1
  cat "${parts[@]}" | "${dec[@]}" | tar -xf - -C "$WORK/prebuilt" || { echo "prebuilt: unpacking failed"; return 1; }
  [[ -f "$BUILD/manifest.txt" ]] || { echo "prebuilt: the pack holds no build/manifest.txt"; return 1; }
  echo "prebuilt: unpacked ${#parts[@]} part(s) into $BUILD ($(sed -n 's/^ep_commit=//p' "$BUILD/manifest.txt"))"
}
