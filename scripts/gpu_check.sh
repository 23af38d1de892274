#!/usr/bin/env bash
# One call on a GPU machine without Rust: runs the prebuilt GPU tests and the benchmark.
#   scripts/gpu_check.sh DIR [tests|bench|all] [extra ep_bench args...]
# DIR holds libnccl_ep.so, gpu_ll and gpu_ht (the cargo test binaries of tests/gpu_ll.rs and
# tests/gpu_ht.rs), built elsewhere, optionally gpu_ll_destroy (tests/gpu_ll_destroy.rs) and nvrtc_compile (tests/nvrtc_compile.rs: its
# GPU selftest runs too). The GPU tests are #[ignore]d (cargo counts them as ignored where there
# is no GPU), so they run here with --include-ignored; ht_full_matrix (minutes) only with
# NCCL_EP_HT_FULL=1.
# Logs and CSV files go to $OUT (or build/gpu-check).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(cd "$1" && pwd)"; shift
WHAT="${1:-all}"; shift || true
OUTDIR="${OUT:-$ROOT/build/gpu-check}"
mkdir -p "$OUTDIR"
rc=0
if [[ "$WHAT" == tests || "$WHAT" == all ]]; then
  ht_skip=(--skip ht_full_matrix)
  [[ "${NCCL_EP_HT_FULL:-0}" == 1 ]] && ht_skip=()
  echo "== GPU tests (tests/gpu_ll.rs)"
  timeout 900 "$DIR/gpu_ll" --include-ignored --test-threads=1 --nocapture >"$OUTDIR/gpu_ll.log" 2>&1 || rc=1
  grep -E '^(ll_|test result|test .*FAILED)' "$OUTDIR/gpu_ll.log" | cut -c1-300
  if [[ -x "$DIR/gpu_ht" ]]; then
    echo "== GPU tests (tests/gpu_ht.rs)"
    NCCL_EP_TIMEOUT_MS=10000 timeout 900 "$DIR/gpu_ht" --include-ignored "${ht_skip[@]}" --test-threads=1 --nocapture \
      >"$OUTDIR/gpu_ht.log" 2>&1 || rc=1
    grep -E '^(ht_.*(passed|FAIL)|test result|test .*FAILED)' "$OUTDIR/gpu_ht.log" | cut -c1-300
  fi
  if [[ -x "$DIR/gpu_ll_destroy" ]]; then
    echo "== GPU tests (tests/gpu_ll_destroy.rs)"
    NCCL_EP_TIMEOUT_MS=10000 timeout 300 "$DIR/gpu_ll_destroy" --include-ignored --test-threads=1 --nocapture \
      >"$OUTDIR/gpu_ll_destroy.log" 2>&1 || rc=1
    grep -E '^(ll_|test result|test .*FAILED)' "$OUTDIR/gpu_ll_destroy.log" | cut -c1-300
  fi
  if [[ -x "$DIR/nvrtc_compile" ]]; then
    echo "== GPU selftest (tests/nvrtc_compile.rs)"
    timeout 300 "$DIR/nvrtc_compile" --ignored --exact selftest_kernel_runs_on_a_gpu --nocapture \
      >"$OUTDIR/nvrtc_compile.log" 2>&1 || rc=1
    grep -E '^(test result|test .*FAILED)' "$OUTDIR/nvrtc_compile.log" | cut -c1-300
  fi
fi
if [[ "$WHAT" == bench || "$WHAT" == all ]]; then
  echo "== benchmark"
  NCCL_EP_LIB="$DIR/libnccl_ep.so" EP_BENCH_OUT="$OUTDIR" "$ROOT/scripts/bench.sh" >"$OUTDIR/bench.log" 2>&1 || rc=1
  B="$ROOT/build/bench/ep_bench"
  for ranks in 1 8; do
    for lay in em rm; do
      "$B" --local-ranks $ranks --tokens 128 --hidden 7168 --top-k 8 --experts 256 --layout $lay --graph \
        --csv "$OUTDIR/anchor-graph-$ranks-$lay.csv" "$@" >>"$OUTDIR/bench.log" 2>&1 || rc=1
    done
  done
  grep -E '^ +[0-9]' "$OUTDIR/bench.log" | head -20
fi
exit $rc
