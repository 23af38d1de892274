#!/usr/bin/env bash
# `make bench`, the main job: builds the library and ep_bench, then runs the anchor configs
# (LL: bf16, H=7168, K=8, E=256, 128 tokens per rank; HT: FLAT and expert-major, the same with
# 4096 tokens per rank) on the GPU that is present:
#   - in one process: 1 rank, then 8 local ranks on this GPU;
#   - under MPI (mpirun -np N make bench, or EP_BENCH_MPI=1): one rank per process, one GPU each
#     (ep_bench_mpi: needs MPI's headers and library at build time; the ranks build in turn).
# Environment: NCCL_EP_LIB=path uses a prebuilt libnccl_ep.so (no cargo needed);
#              EP_BENCH_ARGS adds ep_bench options; EP_BENCH_OUT=dir keeps the CSV files there;
#              EP_BENCH_BUILD_ONLY=1 only builds build/bench/ep_bench (and ep_bench_mpi
#              with EP_BENCH_MPI=1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "make bench: no NVIDIA GPU found; the benchmark needs one"
  exit 1
fi
MPI=0
[[ -n "${OMPI_COMM_WORLD_SIZE:-}${PMI_SIZE:-}" || "${EP_BENCH_MPI:-0}" == 1 ]] && MPI=1
# Under `mpirun -np N make bench` every rank runs this script: the build steps below take turns
# (the first rank builds, the others find everything up to date).
mkdir -p "$ROOT/build"
exec 9>"$ROOT/build/.bench-build.lock"
flock 9 2>/dev/null || true
LIB="${NCCL_EP_LIB:-}"
if [[ -z "$LIB" ]]; then
  cargo build --release
  LIB="$ROOT/target/release/libnccl_ep.so"
fi
# Headers: the system's CUDA and NCCL when present, else the PyPI wheels (scripts/deps.sh).
CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
NCCL_INC=""
for d in /usr/include /usr/local/include "${NCCL_HOME:-/nonexistent}/include"; do
  [[ -f "$d/nccl.h" ]] && NCCL_INC="$d" && break
done
if [[ ! -f "$CUDA_INC/cuda_runtime.h" || -z "$NCCL_INC" ]]; then
  scripts/deps.sh >/dev/null
  # shellcheck source=/dev/null
  source .deps/env.sh
  CUDA_INC="$NCCL_EP_DEPS_CUDA_INCLUDE"
  NCCL_INC="$NCCL_EP_DEPS_NCCL_INCLUDE"
fi
BUILD="$ROOT/build/bench"
cmake -S c-tests -B "$BUILD" -DNCCL_EP_LIB="$LIB" -DNCCL_EP_INCLUDE="$ROOT/include" \
  -DNCCL_EP_DEPS_INCLUDE="$NCCL_INC;$CUDA_INC" -DNCCL_EP_SOURCE_DIR="$ROOT" >"$BUILD.log" 2>&1 ||
  { cat "$BUILD.log"; exit 1; }
cmake --build "$BUILD" --target ep_bench -j 4 >>"$BUILD.log" 2>&1 || { cat "$BUILD.log"; exit 1; }
if [[ $MPI == 1 ]]; then
  cmake --build "$BUILD" --target ep_bench_mpi -j 4 >>"$BUILD.log" 2>&1 ||
    { cat "$BUILD.log"; echo "make bench: no ep_bench_mpi (it needs MPI's C headers and library: mpicc)"; exit 1; }
fi
flock -u 9 2>/dev/null || true
[[ "${EP_BENCH_BUILD_ONLY:-0}" == 1 ]] && exit 0
OUTDIR="${EP_BENCH_OUT:-$ROOT/build/bench-results}"
mkdir -p "$OUTDIR"
export EP_BENCH_SCRIPTS="$ROOT/scripts"
ANCHOR=(--algorithm ll --tokens 128 --hidden 7168 --top-k 8 --experts 256 --warmup 10 --iters 50)
HT=(--mode ht --tokens 4096 --hidden 7168 --top-k 8 --experts 256 --warmup 3 --iters 10)
if [[ $MPI == 1 ]]; then
  for lay in em rm; do
    "$BUILD/ep_bench_mpi" "${ANCHOR[@]}" --layout "$lay" --csv "$OUTDIR/anchor-mpi-$lay.csv" ${EP_BENCH_ARGS:-}
  done
  for lay in flat em; do
    "$BUILD/ep_bench_mpi" "${HT[@]}" --layout "$lay" --csv "$OUTDIR/ht-mpi-$lay.csv" ${EP_BENCH_ARGS:-}
  done
  exit 0
fi
for ranks in 1 8; do
  for lay in em rm; do
    "$BUILD/ep_bench" --local-ranks "$ranks" "${ANCHOR[@]}" --layout "$lay" \
      --csv "$OUTDIR/anchor-$ranks-$lay.csv" ${EP_BENCH_ARGS:-}
  done
done
# High throughput (skip with EP_BENCH_HT=0).
if [[ "${EP_BENCH_HT:-1}" != 0 ]]; then
  for ranks in 1 8; do
    for lay in flat em; do
      "$BUILD/ep_bench" --local-ranks "$ranks" "${HT[@]}" --layout "$lay" \
        --csv "$OUTDIR/ht-$ranks-$lay.csv" ${EP_BENCH_ARGS:-}
    done
  done
fi
