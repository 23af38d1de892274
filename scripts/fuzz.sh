#!/usr/bin/env bash
# `make fuzz`: builds libnccl_ep.so and c-tests/fuzz_abi (the ABI fuzzer, on a stand-in NCCL;
# no GPU needed) and runs it. Its last lines are "fuzz: N calls, 0 crashes, return codes: ...".
# Environment (or make variables):
#   FUZZ_SECONDS  how long to run (default 60, unless only FUZZ_CALLS is given)
#   FUZZ_CALLS    stop after this many calls (whichever limit comes first)
#   FUZZ_SEED     the seed (default: from the clock; the seed used is printed first)
#   FUZZ_VERBOSE=1  print every call and its result
#   FUZZ_CROSS_TYPE=0  skip KNOWN_ISSUES 1 of c-tests/fuzz_abi.c (a live group passed as a handle
#                   and the reverse: crashes the library today)
# Exit status: 0 clean, 1 invariant violation or ncclInternalError, 2 crash (signal; the seed and
# iteration to reproduce it are printed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -f .deps/env.sh ]] || scripts/deps.sh
# shellcheck source=/dev/null
source .deps/env.sh
cargo build --release
LIB="$ROOT/target/release/libnccl_ep.so"
cmake -S c-tests -B build/c-tests -DNCCL_EP_LIB="$LIB" -DNCCL_EP_INCLUDE="$ROOT/include" \
  -DNCCL_EP_DEPS_INCLUDE="$NCCL_EP_DEPS_NCCL_INCLUDE;$NCCL_EP_DEPS_CUDA_INCLUDE" \
  -DNCCL_EP_SOURCE_DIR="$ROOT" >/dev/null
cmake --build build/c-tests --target fuzz_abi -j "${CTEST_PARALLEL_LEVEL:-2}" >/dev/null
args=()
if [[ -n "${FUZZ_CALLS:-}" ]]; then args+=(--calls "$FUZZ_CALLS"); fi
if [[ -n "${FUZZ_SECONDS:-}" || -z "${FUZZ_CALLS:-}" ]]; then args+=(--seconds "${FUZZ_SECONDS:-60}"); fi
if [[ -n "${FUZZ_SEED:-}" ]]; then args+=(--seed "$FUZZ_SEED"); fi
echo "make fuzz: build/c-tests/fuzz_abi ${args[*]}"
# FUZZ_* are passed as arguments; keep the fuzzer from reading them a second time.
exec env -u FUZZ_CALLS -u FUZZ_SECONDS -u FUZZ_SEED build/c-tests/fuzz_abi "${args[@]}"
