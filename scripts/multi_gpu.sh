#!/usr/bin/env bash
# Multi-GPU runs of the prebuilt test binary of tests/gpu_multi.rs (issue 7); builds nothing.
#
#   scripts/multi_gpu.sh DIR [N]
#
# DIR holds `gpu_multi` (the cargo test binary target/release/deps/gpu_multi-<hash>, copied under
# that name; it links the library statically) and may hold `libnccl_ep.so` (not used here: it is
# for `make bench` with NCCL_EP_LIB=DIR/libnccl_ep.so). N = ranks, one process and one GPU each
# (default: every visible GPU). It runs
#   1. N processes: `mpirun -np N` when mpirun is on PATH (MULTI_GPU_LAUNCHER=plain: background
#      processes with EP_RANK/EP_WORLD instead); the NCCL unique id goes through a fresh
#      directory (EP_BOOTSTRAP_DIR) under the log directory;
#   2. one process with one thread per GPU (ncclCommInitAll over the first N GPUs);
# then prints one line per rank (PASS/FAIL) and exits 1 if anything failed.
#
# Logs: $OUT/multi-gpu/rank-R.log and threads.log (OUT unset: build/multi-gpu under the repo);
# MULTI_GPU_TAR=1 packs them into $OUT/multi-gpu.tar.gz instead. The end of every failing log is
# printed.
# Environment: MULTI_GPU_LAUNCHER=auto|mpirun|plain, MULTI_GPU_THREADS=0 (skip step 2),
#   MULTI_GPU_PROCS=0 (skip step 1), MULTI_GPU_TIMEOUT (seconds per step, default 900),
#   MULTI_GPU_MPIRUN_ARGS (extra mpirun arguments), EP_NCCL_LIB (the libnccl.so.2 to load),
#   NCCL_EP_TIMEOUT_MS (default here 10000), and the test's own EP_MULTI_QUICK, EP_MULTI_ONLY,
#   EP_MULTI_SEED, EP_MULTI_KEEP_GOING (tests/gpu_multi.rs).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 || ! -d "$1" ]]; then
  echo "usage: scripts/multi_gpu.sh DIR [N]   (DIR holds the prebuilt gpu_multi test binary)" >&2
  exit 2
fi
DIR="$(cd "$1" && pwd)"
BIN="$DIR/gpu_multi"
if [[ ! -x "$BIN" ]]; then
  echo "multi_gpu.sh: no executable $BIN (copy target/release/deps/gpu_multi-<hash> there)" >&2
  exit 2
fi
NGPU=0
if command -v nvidia-smi >/dev/null 2>&1; then
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
N="${2:-$NGPU}"
if [[ "$NGPU" -eq 0 ]]; then
  echo "multi_gpu.sh: no NVIDIA GPU found (nvidia-smi -L); the multi-GPU runs need at least one" >&2
  exit 1
fi
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
  echo "multi_gpu.sh: N must be a positive number of ranks, not '$N'" >&2
  exit 2
fi
if [[ "$N" -gt "$NGPU" ]]; then
  echo "multi_gpu.sh: warning: $N ranks on $NGPU GPU(s): NCCL refuses two ranks of one communicator on one GPU"
fi

LOGDIR="${OUT:-$ROOT/build}/multi-gpu"
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
T="${MULTI_GPU_TIMEOUT:-900}"
export NCCL_NVLS_ENABLE=0                       # never NVLink multicast (shared machines)
export NCCL_EP_TIMEOUT_MS="${NCCL_EP_TIMEOUT_MS:-10000}"
export EP_MULTI_TIMEOUT_S="$T"                  # the test's own watchdog
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

# Find libnccl.so.2 when the loader would not: the nvidia-nccl-cu* wheel of the python3 here.
if [[ -z "${EP_NCCL_LIB:-}" ]] && ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so\.2 '; then
  found=""
  IFS=: read -r -a lpath <<<"${LD_LIBRARY_PATH:-}"
  for d in "${lpath[@]}"; do [[ -n "$d" && -f "$d/libnccl.so.2" ]] && found="$d/libnccl.so.2" && break; done
  if [[ -z "$found" ]] && command -v python3 >/dev/null 2>&1; then
    d=$(python3 -c 'import importlib.util as u; s = u.find_spec("nvidia.nccl"); print(list(s.submodule_search_locations)[0] if s else "")' 2>/dev/null || true)
    [[ -n "$d" && -f "$d/lib/libnccl.so.2" ]] && found="$d/lib/libnccl.so.2"
  fi
  if [[ -n "$found" ]]; then
    export EP_NCCL_LIB="$found"
  fi
fi
echo "== multi_gpu.sh: $N rank(s) on $NGPU visible GPU(s); NCCL: ${EP_NCCL_LIB:-libnccl.so.2 from the loader path}; logs in $LOGDIR"

# The rank and world variables a parent launcher may have left here must not leak into the runs.
unset EP_RANK EP_WORLD EP_LOCAL_RANK

rc=0
summary=()   # one line per rank

# Summarises one log: its RESULT lines, or why it has none; shows the end of a failing log.
summarize() {
  local log="$1" label="$2" status="$3" results bad=0
  results=$(grep -E '^RESULT ' "$log" 2>/dev/null | sed 's/^RESULT //')
  if [[ -n "$results" ]]; then
    while IFS= read -r line; do
      summary+=("$label $line")
      [[ "$line" == *": PASS"* ]] || bad=1
    done <<<"$results"
    [[ "$status" -eq 0 ]] || { summary+=("$label exit status $status"); bad=1; }
  elif grep -q '^skipped' "$log" 2>/dev/null; then
    summary+=("$label SKIPPED (counts as a failure here): $(grep -m1 '^skipped' "$log")")
    bad=1
  else
    summary+=("$label FAIL (exit status $status, no RESULT line): $(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -1 | cut -c1-200)")
    bad=1
  fi
  if [[ $bad -ne 0 ]]; then
    rc=1
    echo "---- last lines of $log"
    tail -n 25 "$log" 2>/dev/null | cut -c1-300
  fi
}

if [[ "${MULTI_GPU_PROCS:-1}" != 0 ]]; then
  launcher="${MULTI_GPU_LAUNCHER:-auto}"
  if [[ "$launcher" == auto ]]; then
    if command -v mpirun >/dev/null 2>&1; then launcher=mpirun; else launcher=plain; fi
  fi
  export EP_BOOTSTRAP_DIR="$LOGDIR/bootstrap"
  export EP_BOOTSTRAP_TAG="$$-$(date +%s)"
  mkdir -p "$EP_BOOTSTRAP_DIR"
  echo "== $N process(es), launcher: $launcher"
  start=$(date +%s)
  if [[ "$launcher" == mpirun ]]; then
    margs=()
    if mpirun --version 2>&1 | grep -q 'Open MPI'; then
      margs+=(--bind-to none)
      [[ "$(id -u)" == 0 ]] && margs+=(--allow-run-as-root)
      for v in EP_BOOTSTRAP_DIR EP_BOOTSTRAP_TAG NCCL_NVLS_ENABLE NCCL_EP_TIMEOUT_MS EP_MULTI_TIMEOUT_S \
               EP_NCCL_LIB EP_MULTI_QUICK EP_MULTI_ONLY EP_MULTI_SEED EP_MULTI_KEEP_GOING LD_LIBRARY_PATH; do
        [[ -n "${!v:-}" ]] && margs+=(-x "$v")
      done
    fi
    # shellcheck disable=SC2086
    # Each rank logs to rank-R.log. The test reads Open MPI's or PMI's rank variables itself;
    # under a launcher that sets only PMIX_RANK the wrapper hands it over as EP_RANK/EP_WORLD.
    timeout "$((T + 60))" mpirun "${margs[@]}" ${MULTI_GPU_MPIRUN_ARGS:-} -np "$N" bash -c '
      r=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${PMIX_RANK:-}}}
      if [ -z "$r" ]; then echo "the launcher set no rank variable" >"$1/rank-unknown-$$.log"; exit 3; fi
      if [ -z "${OMPI_COMM_WORLD_RANK:-}${PMI_RANK:-}" ]; then export EP_RANK=$r EP_WORLD=$2; fi
      exec "$0" --nocapture >"$1/rank-$r.log" 2>&1' \
      "$BIN" "$LOGDIR" "$N" >"$LOGDIR/mpirun.log" 2>&1
    status=$?
    for ((r = 0; r < N; r++)); do
      summarize "$LOGDIR/rank-$r.log" "[procs]" "$status"
    done
    [[ $status -eq 0 ]] || { echo "---- mpirun exit status $status; mpirun.log:"; tail -n 15 "$LOGDIR/mpirun.log"; rc=1; }
  else
    pids=()
    for ((r = 0; r < N; r++)); do
      EP_RANK=$r EP_WORLD=$N EP_LOCAL_RANK=$r timeout "$((T + 60))" "$BIN" --nocapture \
        >"$LOGDIR/rank-$r.log" 2>&1 &
      pids+=($!)
    done
    for ((r = 0; r < N; r++)); do
      wait "${pids[$r]}"
      summarize "$LOGDIR/rank-$r.log" "[procs]" "$?"
    done
  fi
  rmdir "$EP_BOOTSTRAP_DIR" 2>/dev/null   # rank 0 removes the id file once every rank has joined
  echo "   ($(( $(date +%s) - start )) s)"
fi

if [[ "${MULTI_GPU_THREADS:-1}" != 0 ]]; then
  echo "== one process, one thread per GPU (ncclCommInitAll over $N GPU(s))"
  start=$(date +%s)
  (unset OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE PMI_RANK PMI_SIZE EP_BOOTSTRAP_DIR EP_BOOTSTRAP_TAG
   EP_MULTI_GPUS=$N timeout "$((T + 60))" "$BIN" --nocapture >"$LOGDIR/threads.log" 2>&1)
  summarize "$LOGDIR/threads.log" "[threads]" "$?"
  echo "   ($(( $(date +%s) - start )) s)"
fi

if [[ "${MULTI_GPU_TAR:-0}" == 1 ]]; then
  # One file instead of N + 2 (for tools that bring back only a few files).
  tar -czf "$LOGDIR.tar.gz" -C "$(dirname "$LOGDIR")" "$(basename "$LOGDIR")" && rm -rf "$LOGDIR" &&
    echo "== logs: $LOGDIR.tar.gz"
fi

echo "== summary"
for line in "${summary[@]}"; do echo "$line"; done
if [[ $rc -eq 0 ]]; then echo "multi_gpu.sh: PASS ($N rank(s))"; else echo "multi_gpu.sh: FAIL"; fi
exit $rc
