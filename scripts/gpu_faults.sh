#!/usr/bin/env bash
# One call on a GPU machine without Rust: the fault-tolerance tests (masks, timeouts, trap), the
# LL stress test, compute-sanitizer memcheck and racecheck on short runs, then the rest of
# tests/gpu_ll.rs. Each step has its own time limit; logs go to $OUT (or build/gpu-check).
# STRESS_SECONDS > 0 stops the stress test after that long (it reports how many rounds ran).
#   scripts/gpu_faults.sh DIR [STRESS_ROUNDS [STRESS_SECONDS]]
# DIR holds gpu_ll (the cargo test binary of tests/gpu_ll.rs), built elsewhere. Its tests are
# #[ignore]d (they need a GPU), so every step runs with --include-ignored.
set -uo pipefail
DIR="$(cd "$1" && pwd)"
ROUNDS="${2:-10000}"
SECS="${3:-0}"
OUTDIR="${OUT:-build/gpu-check}"
mkdir -p "$OUTDIR"
B="$DIR/gpu_ll"
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
unset NCCL_EP_TIMEOUT_MS
rc=0
step() { # name limit command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local r=$?
  echo "== $name: exit $r after $((SECONDS - t0)) s"
  grep -E '^(ll_|test result|test .*FAILED|NCCL EP|=========)' "$OUTDIR/$name.log" | cut -c1-400 | head -40
  [[ $r == 0 ]] || rc=1
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step faults 90 "$B" --include-ignored --test-threads=1 --nocapture ll_mask ll_timeout_without_mask_traps
NCCL_EP_STRESS_ROUNDS=$ROUNDS NCCL_EP_STRESS_SECONDS=$SECS \
  step stress "$((SECS > 0 ? SECS + 40 : 400))" "$B" --include-ignored --test-threads=1 --nocapture --exact ll_stress
step suite 150 "$B" --include-ignored --test-threads=1 --nocapture --skip ll_mask --skip ll_stress --skip ll_timeout_without_mask_traps
if [[ -n "$SAN" ]]; then
  export NCCL_EP_TIMEOUT_MS=4000 NCCL_EP_TEST_LOOSE_TIMING=1
  NCCL_EP_STRESS_ROUNDS=60 NCCL_EP_STRESS_RANKS=1 \
    step memcheck_1rank 60 "$SAN" --tool memcheck --error-exitcode 9 "$B" --include-ignored --test-threads=1 --nocapture --exact ll_stress
  NCCL_EP_STRESS_ROUNDS=30 NCCL_EP_STRESS_RANKS=2,4 \
    step memcheck_multi 60 "$SAN" --tool memcheck --error-exitcode 9 "$B" --include-ignored --test-threads=1 --nocapture ll_stress ll_mask
  NCCL_EP_STRESS_ROUNDS=20 NCCL_EP_STRESS_RANKS=1,2 \
    step racecheck 60 "$SAN" --tool racecheck --error-exitcode 9 "$B" --include-ignored --test-threads=1 --nocapture --exact ll_stress
  unset NCCL_EP_TIMEOUT_MS NCCL_EP_TEST_LOOSE_TIMING
else
  echo "== compute-sanitizer not found"
  rc=1
fi
exit $rc
