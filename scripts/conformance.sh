#!/usr/bin/env bash
# Conformance harness (issue 11): NVIDIA's own programs -- ep_bench, ep_test, the gtests of
# nccl_ep/tests and, with wheels, ep_test.py -- built once against NVIDIA's headers and library,
# then run against NVIDIA's libnccl_ep.so ("upstream") and ours, row by row
# (scripts/conformance/rows.txt). Output: one table, a CSV (program,config,ranks,upstream,ours,note)
# and one log per run. docs/BUILDING.md, "Conformance harness", says how to run it.
#
# Phases: build (NCCL, NVIDIA's library, the programs; or unpack --prebuilt), run, report.
# Nothing of NVIDIA's is committed: the sources come in by directory and are copied (and the copy
# patched) under --work.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CONF="$HERE/conformance"

usage() {
  cat <<'EOF'
usage: scripts/conformance.sh [options]

inputs (directories; nothing of them is committed)
  --ep-src DIR        NVIDIA nccl-extensions checkout (DIR/nccl_ep, DIR/makefiles)
  --nccl-src DIR      NCCL >= 2.30 source: built into WORK/build/nccl (make src.build)
  --nccl-build DIR    or a prebuilt NCCL (DIR/lib/libnccl.so, DIR/include/nccl.h)
  --gtest PATH        googletest: its source dir (src/gtest-all.cc), a tree holding
                      usr/src/googletest/googletest, or Debian's googletest .deb (dpkg -x)
  --ours PATH         our libnccl_ep.so (run phase)
  --wheels DIR        nccl4py wheels for ep_test.py (optional; without: its rows are SKIP)
  --prebuilt DIR      reuse a build: a WORK/build directory or a --pack directory (tar parts)
work and output
  --work DIR          scratch (default: build/conformance in the repo)
  --pack DIR          after the build, write the build as xz tar parts of <= 15 MiB into DIR
  --csv FILE          default bench/results/conformance-<gpu>-<date>.csv
  --logs DIR          per-run logs (default WORK/logs)
selection and pacing
  --phases LIST       comma list of prepare,build,run,report,perf,perf-report (default
                      build,run,report; build includes prepare: copying and patching the
                      sources; perf: NVIDIA's ep_bench timing both libraries, issue 15)
  --only REGEX        rows whose key "PROGRAM rRANKS ARGS" matches (bash =~, extended regex)
  --jobs N            rows at a time (default 4); each row runs upstream and ours together
  --max-ranks N       processes in flight over all rows, both libraries (default 32)
  --timeout S         per run (default 240); a timeout is FAIL "timeout"
  --deadline S        seconds after the run phase starts; rows not started by then are SKIP
                      "deadline", and a run's timeout is cut to what is left (default 0: none)
  --mpirun-args STR   extra mpirun arguments (word-split)
  --gencode STR       default -gencode=arch=compute_90,code=sm_90
  --make-jobs N       default nproc
  --list              print the selected rows and exit
perf phase (scripts/conformance/perf.sh)
  --perf-runs N       runs per library and configuration, alternating (default 2)
  --perf-only REGEX   configurations "MODE LAYOUT TOKENS HIDDEN" that match (e.g. '^ll em')
  --perf-warmup N     ep_bench --warmup (default 10)
  --perf-iters N      ep_bench --iters (default 50)
  --perf-csv FILE     default bench/results/vs-upstream-<gpu>-<date>.csv
  --perf-baseline SO  also time this libnccl_ep.so (an older build of ours) in the same runs
  --dry-run           print every build and run command; run nothing
EOF
}

EP_SRC="" NCCL_SRC="" NCCL_BUILD="" GTEST="" OURS="" WHEELS="" PREBUILT="" PACK=""
WORK="" CSV="" LOGS="" ONLY="" JOBS=4 MAX_RANKS=32 TIMEOUT=240 DEADLINE=0
MPIRUN_ARGS="" GENCODE="-gencode=arch=compute_90,code=sm_90" PHASES="build,run,report"
MAKE_JOBS="$(nproc 2>/dev/null || echo 8)" DRY=0 LIST=0
PERF_RUNS=2 PERF_ONLY="" PERF_WARMUP=10 PERF_ITERS=50 PERF_CSV="" PERF_BASELINE=""
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

die() { echo "conformance: $*" >&2; exit 2; }
while (($#)); do
  opt="$1"; val=""
  case "$opt" in
    --*=*) val="${opt#*=}"; opt="${opt%%=*}"; shift ;;
    --dry-run|--list|-h|--help) shift ;;
    --*) (($# >= 2)) || die "$opt: unknown option or missing value (--help)"; val="$2"; shift 2 ;;
    *) die "unknown argument '$opt' (--help)" ;;
  esac
  case "$opt" in
    --ep-src) EP_SRC="$val" ;;          --nccl-src) NCCL_SRC="$val" ;;
    --nccl-build) NCCL_BUILD="$val" ;;  --gtest) GTEST="$val" ;;
    --ours) OURS="$val" ;;              --wheels) WHEELS="$val" ;;
    --prebuilt) PREBUILT="$val" ;;      --pack) PACK="$val" ;;
    --work) WORK="$val" ;;              --csv) CSV="$val" ;;
    --logs) LOGS="$val" ;;              --only) ONLY="$val" ;;
    --jobs) JOBS="$val" ;;              --max-ranks) MAX_RANKS="$val" ;;
    --timeout) TIMEOUT="$val" ;;        --deadline) DEADLINE="$val" ;;
    --mpirun-args) MPIRUN_ARGS="$val" ;; --gencode) GENCODE="$val" ;;
    --phases) PHASES="$val" ;;          --make-jobs) MAKE_JOBS="$val" ;;
    --perf-runs) PERF_RUNS="$val" ;;    --perf-only) PERF_ONLY="$val" ;;
    --perf-warmup) PERF_WARMUP="$val" ;; --perf-iters) PERF_ITERS="$val" ;;
    --perf-csv) PERF_CSV="$val" ;;      --perf-baseline) PERF_BASELINE="$val" ;;
    --dry-run) DRY=1 ;;                 --list) LIST=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$opt' (--help)" ;;
  esac
done
for n in JOBS MAX_RANKS TIMEOUT DEADLINE MAKE_JOBS PERF_RUNS PERF_WARMUP PERF_ITERS; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || die "--$(tr 'A-Z_' 'a-z-' <<<"$n") needs a number, got '${!n}'"
done
((JOBS >= 1)) || JOBS=1

# Absolute paths: the build runs make -C elsewhere and the run phase starts programs from there.
abspath() { [[ -z "$1" ]] && return 0; [[ "$1" == /* ]] && echo "$1" || echo "$PWD/$1"; }
EP_SRC="$(abspath "$EP_SRC")" NCCL_SRC="$(abspath "$NCCL_SRC")" NCCL_BUILD="$(abspath "$NCCL_BUILD")"
GTEST="$(abspath "$GTEST")" OURS="$(abspath "$OURS")" WHEELS="$(abspath "$WHEELS")"
PREBUILT="$(abspath "$PREBUILT")" PACK="$(abspath "$PACK")" CSV="$(abspath "$CSV")"
PERF_CSV="$(abspath "$PERF_CSV")" PERF_BASELINE="$(abspath "$PERF_BASELINE")"
LOGS="$(abspath "$LOGS")"
WORK="$(abspath "${WORK:-$ROOT/build/conformance}")"
LOGS="${LOGS:-$WORK/logs}"
BUILD="$WORK/build"           # the run phase may point it at a --prebuilt tree instead
RES="$WORK/results"
EP_BENCH_COMMON="--validate --warmup 1 --iters 2"

has_phase() { [[ ",$PHASES," == *",$1,"* ]]; }
for p in ${PHASES//,/ }; do
  case "$p" in prepare|build|run|report|perf|perf-report) ;; *) die "unknown phase '$p'" ;; esac
done

# x CMD...: run, or in --dry-run print, one command (its output is the caller's).
x() {
  if ((DRY)); then printf '+'; printf ' %q' "$@"; printf '\n'; return 0; fi
  "$@"
}

# shellcheck source=scripts/conformance/rows.sh
source "$CONF/rows.sh"
# shellcheck source=scripts/conformance/build.sh
source "$CONF/build.sh"
# shellcheck source=scripts/conformance/run.sh
source "$CONF/run.sh"
# shellcheck source=scripts/conformance/perf.sh
source "$CONF/perf.sh"

load_rows "$CONF/rows.txt" || exit 2
if ((LIST)); then list_rows; exit 0; fi

rc=0
if [[ -n "$PREBUILT" ]]; then
  if has_phase build || has_phase run || has_phase perf || [[ -n "$PACK" ]]; then use_prebuilt || exit 2; fi
elif has_phase build; then
  build_all || rc=1
elif has_phase prepare; then
  prepare_sources || exit 1
fi
[[ -n "$PACK" ]] && { pack_build || rc=1; }
if has_phase run; then run_all || exit 3; fi
if has_phase report && ((!DRY)); then report || rc=1; fi
if has_phase perf; then run_perf || exit 3; fi
if has_phase perf-report && ((!DRY)); then perf_report || rc=1; fi
exit "$rc"
