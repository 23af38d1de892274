#!/usr/bin/env bash
# `make test`: installs the test dependencies (scripts/deps.sh), runs the Rust tests (cargo test
# --release --workspace: the crates under crates/ too), builds and runs the C tests (ctest in
# build/c-tests), and ends with ONE line "N passed, M failed, K skipped" over both. Exits
# non-zero if anything failed or did not build.
# K counts cargo's ignored (and filtered-out) tests plus ctest's skipped ones: a test that did not
# run is never counted as passed.
# The Rust GPU tests (tests/gpu_ll.rs, gpu_ht.rs, gpu_multi.rs, nvrtc_compile.rs's selftest) are
# #[ignore]d and run once, by cargo, only when GPU tests are on: then `cargo test` gets
# --include-ignored (and fails where there is no usable GPU). ctest does not re-run them.
# Environment: NCCL_EP_GPU_TESTS=auto (default: on when `nvidia-smi -L` lists a GPU) | 1 | 0;
#              NCCL_EP_HT_FULL=1 also runs gpu_ht's ht_full_matrix (minutes; else --skip'd);
#              NCCL_EP_GPU_TEST_TIMEOUT (seconds for `cargo test` with GPU tests, default 3600);
#              NCCL_EP_SKIP_CARGO=1 skips cargo test (the library is still built);
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

gpu_tests="${NCCL_EP_GPU_TESTS:-auto}"
case "$gpu_tests" in
  0 | 1) ;;
  auto)
    gpu_tests=0
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
      gpu_tests=1
    fi ;;
  *)
    echo "0 passed, 1 failed"
    echo "make test: NCCL_EP_GPU_TESTS must be auto, 0 or 1, not '$gpu_tests'" >&2
    exit 1 ;;
esac

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
  if [[ "$gpu_tests" == 1 ]]; then
    # The GPU tests serialise themselves per binary (tests/gpu/harness.rs, require_gpu).
    test_args=(-- --include-ignored)
    [[ "${NCCL_EP_HT_FULL:-0}" == 1 ]] || test_args+=(--skip ht_full_matrix)
    section "cargo test --release --workspace ${test_args[*]} (GPU tests on)"
    timeout "${NCCL_EP_GPU_TEST_TIMEOUT:-3600}" cargo test --release --workspace "${test_args[@]}" 2>&1 | tee "$LOGS/cargo.log"
  else
    section "cargo test --release --workspace (GPU tests off: cargo counts them as ignored)"
    cargo test --release --workspace 2>&1 | tee "$LOGS/cargo.log"
  fi
  cargo_rc=${PIPESTATUS[0]}
fi

ctest_ran=0
LIB="$ROOT/target/release/libnccl_ep.so"
if [[ $build_rc -eq 0 && -f "$LIB" ]]; then
  section "C tests: configure and build (build/c-tests)"
  if cmake -S c-tests -B build/c-tests -DNCCL_EP_LIB="$LIB" -DNCCL_EP_INCLUDE="$ROOT/include" \
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
