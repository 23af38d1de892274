#!/usr/bin/env bash
# `make test`: installs the test dependencies (scripts/deps.sh), runs the Rust tests (cargo test
# --release), builds and runs the C tests (ctest in build/c-tests), and ends with ONE line
# "N passed, M failed, K skipped" over both. Exits non-zero if anything failed or did not build.
# Environment: NCCL_EP_SKIP_CARGO=1 skips cargo test (the library is still built);
#              CTEST_PARALLEL_LEVEL (default 2).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOGS="$ROOT/build/test-logs"
mkdir -p "$LOGS"
rm -f "$LOGS"/cargo.log "$LOGS"/ctest.xml
start=$(date +%s)
broken=()   # steps that failed without test counts of their own

section() { printf '\n==== %s ====\n' "$*"; }

section "dependencies (scripts/deps.sh)"
if ! scripts/deps.sh; then
  echo "0 passed, 1 failed"
  echo "make test: scripts/deps.sh failed" >&2
  exit 1
fi
# shellcheck source=/dev/null
source "$ROOT/.deps/env.sh"
# The NVRTC test compiles every kernel variant with the wheel's libnvrtc; without it, it fails.
export LD_LIBRARY_PATH="$NCCL_EP_DEPS_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_EP_REQUIRE_NVRTC=1

section "cargo build --release"
cargo build --release 2>&1 | tee "$LOGS/cargo-build.log"
build_rc=${PIPESTATUS[0]}
[[ $build_rc -eq 0 ]] || broken+=("cargo build --release")

cargo_rc=0
if [[ "${NCCL_EP_SKIP_CARGO:-0}" != 1 ]]; then
  section "cargo test --release"
  cargo test --release 2>&1 | tee "$LOGS/cargo.log"
  cargo_rc=${PIPESTATUS[0]}
fi

ctest_ran=0
LIB="$ROOT/target/release/libnccl_ep.so"
if [[ $build_rc -eq 0 && -f "$LIB" ]]; then
  section "C tests: configure and build (build/c-tests)"
  # The Rust GPU tests run under ctest too (label gpu), from the binary cargo built.
  GPU_LL=$(ls -t target/release/deps/gpu_ll-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
  GPU_HT=$(ls -t target/release/deps/gpu_ht-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
  if cmake -S c-tests -B build/c-tests -DNCCL_EP_LIB="$LIB" -DNCCL_EP_INCLUDE="$ROOT/include" \
       -DNCCL_EP_RUST_GPU_TESTS="$GPU_LL" -DNCCL_EP_RUST_GPU_HT_TESTS="$GPU_HT" \
       -DNCCL_EP_DEPS_INCLUDE="$NCCL_EP_DEPS_NCCL_INCLUDE;$NCCL_EP_DEPS_CUDA_INCLUDE" \
       -DNCCL_EP_SOURCE_DIR="$ROOT" &&
     cmake --build build/c-tests -j "${CTEST_PARALLEL_LEVEL:-2}"; then
    section "C tests: ctest"
    ctest --test-dir build/c-tests --output-on-failure -j "${CTEST_PARALLEL_LEVEL:-2}" \
      --output-junit "$LOGS/ctest.xml"
    ctest_ran=1
  else
    broken+=("C tests configure/build")
  fi
fi

section "summary"
args=(--elapsed "$(( $(date +%s) - start ))")
[[ -f "$LOGS/cargo.log" ]] && args+=(--cargo "$LOGS/cargo.log" --cargo-rc "$cargo_rc")
[[ $ctest_ran -eq 1 ]] && args+=(--junit "$LOGS/ctest.xml")
for b in "${broken[@]}"; do args+=(--broken "$b"); done
python3 scripts/test_summary.py "${args[@]}"
