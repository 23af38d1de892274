#!/usr/bin/env bash
# Multi-rank runs of the prebuilt test binary of tests/gpu_multi.rs (issues 7 and 11); builds
# nothing.
#
#   scripts/multi_gpu.sh DIR [N]
#
# DIR holds `gpu_multi` (the cargo test binary target/release/deps/gpu_multi-<hash>, copied under
# that name; it links the library statically) and may hold `libnccl_ep.so` (not used here: it is
# for `make bench` with NCCL_EP_LIB=DIR/libnccl_ep.so). Its `multi_gpu` test is #[ignore]d (it
# needs a GPU), so every run here passes --include-ignored. N = ranks, one process each (default:
# every visible GPU). N may exceed the GPUs: then several processes share each GPU (one
# communicator; NCCL >= 2.30 with NCCL_MULTI_RANK_GPU_ENABLE=1, which this script sets; the
# processes time-slice the GPU, so this checks correctness, not speed). It runs
#   1. N processes, every step of the suite: `mpirun --allow-run-as-root --oversubscribe -np N`
#      when mpirun is Open MPI's (MULTI_GPU_LAUNCHER=plain: background processes with
#      EP_RANK/EP_WORLD instead); the NCCL unique id goes through a fresh directory
#      (EP_BOOTSTRAP_DIR) under the log directory;
#   2. one process with one thread per GPU (ncclCommInitAll over min(N, GPUs) GPUs);
#   3. (N >= 2) the kill test: N plain background processes with EP_MULTI_ONLY=mask_kill; rank
#      N-1 raises SIGKILL on itself before a dispatch (never under mpirun, which would end the
#      whole job); its exit status must be 137 and its log must say it killed itself, every
#      other rank must finish within the mask timeout and report PASS;
# then prints one line per rank (PASS/FAIL) and exits 1 if anything failed.
#
# Logs: $OUT/multi-gpu/rank-R.log, threads.log and kill-rank-R.log (OUT unset: build/multi-gpu
# under the repo); MULTI_GPU_TAR=1 packs them into $OUT/multi-gpu.tar.gz instead. The end of
# every failing log is printed.
# Several "nodes" on one machine (issue 14, docs/MULTINODE.md): MULTI_GPU_NODE_SIZE=k exports
# NCCL_EP_NODE_SIZE=k (each block of k ranks is a node, every other rank remote: staging + NCCL
# point-to-point), NCCL_P2P_DISABLE=1 and NCCL_SHM_DISABLE=1 (NCCL carries that traffic over its
# network transport, sockets here), runs the LL steps and the HT steps ht_rounds,
# ht_graph_replays and ht_growth (EP_MULTI_ONLY, unless set) in step 1 only (steps 2 and 3 off
# unless MULTI_GPU_THREADS / MULTI_GPU_KILL say otherwise; the kill step across nodes checks the
# remote-exchange watchdog, with NCCL_EP_REVOKE_ON_REMOTE_TIMEOUT=1).
# MULTI_GPU_HOST_SIZE=k runs the same steps with "hosts" instead: each rank exports
# NCCL_HOSTID=ep-host-<rank / k> (no NCCL_EP_NODE_SIZE, no P2P/SHM switches), so NCCL and this
# library both take each block of k ranks for a host: the remote ranks come from the host table
# that group creation all-gathers (docs/MULTINODE.md, "Who is remote"). Both modes set
# NCCL_EP_DEBUG=INFO and check every rank's group-creation lines: each must report the ranks
# outside its block remote ("[split]" lines of the summary).
# Environment: MULTI_GPU_LAUNCHER=auto|mpirun|plain, MULTI_GPU_PROCS=0 (skip step 1),
#   MULTI_GPU_THREADS=0 (skip step 2), MULTI_GPU_KILL=0|1|only (skip step 3 / run / run it
#   alone), MULTI_GPU_TIMEOUT (seconds per step, default 900), MULTI_GPU_MPIRUN_ARGS (extra
#   mpirun arguments), EP_NCCL_LIB (the libnccl.so.2 to load; else $NCCL_HOME/lib/libnccl.so.2,
#   else the loader's, else the nvidia-nccl-cu* wheel of python3), NCCL_MAX_CTAS (default 4
#   when more than 2 ranks share a GPU, as NCCL's documentation advises), NCCL_EP_TIMEOUT_MS
#   (passed on when set; it overrides every group's timeout, the 2 s of the mask steps too), and
#   the test's own EP_MULTI_QUICK, EP_MULTI_ONLY, EP_MULTI_SEED, EP_MULTI_KEEP_GOING,
#   EP_MULTI_MASK_SLACK_MS (tests/gpu_multi.rs).
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
case "${EP_MULTI_ONLY:-}" in
  *mask_kill*)
    echo "multi_gpu.sh: the kill test runs in step 3 only (MULTI_GPU_KILL=only runs it alone); drop mask_kill from EP_MULTI_ONLY" >&2
    exit 2 ;;
esac

# Several "nodes" (by NCCL_EP_NODE_SIZE) or "hosts" (by a per-rank NCCL_HOSTID): the same steps.
if [[ -n "${MULTI_GPU_NODE_SIZE:-}" ]]; then
  if ! [[ "$MULTI_GPU_NODE_SIZE" =~ ^[1-9][0-9]*$ ]]; then
    echo "multi_gpu.sh: MULTI_GPU_NODE_SIZE must be a positive number of ranks, not '$MULTI_GPU_NODE_SIZE'" >&2
    exit 2
  fi
  export NCCL_EP_NODE_SIZE="$MULTI_GPU_NODE_SIZE" NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1
  split_size="$MULTI_GPU_NODE_SIZE" split_by="NCCL_EP_NODE_SIZE"
  split="nodes of $MULTI_GPU_NODE_SIZE rank(s): NCCL_EP_NODE_SIZE=$NCCL_EP_NODE_SIZE NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1"
fi
if [[ -n "${MULTI_GPU_HOST_SIZE:-}" ]]; then
  if ! [[ "$MULTI_GPU_HOST_SIZE" =~ ^[1-9][0-9]*$ ]] || [[ -n "${MULTI_GPU_NODE_SIZE:-}" ]]; then
    echo "multi_gpu.sh: MULTI_GPU_HOST_SIZE must be a positive number of ranks, without MULTI_GPU_NODE_SIZE" >&2
    exit 2
  fi
  unset NCCL_EP_NODE_SIZE NCCL_HOSTID
  export EP_HOST_SIZE="$MULTI_GPU_HOST_SIZE"   # read by the launch wrapper below, per rank
  split_size="$MULTI_GPU_HOST_SIZE" split_by="hosts"
  split="hosts of $MULTI_GPU_HOST_SIZE rank(s): NCCL_HOSTID=ep-host-<rank / $MULTI_GPU_HOST_SIZE> per rank"
fi
if [[ -n "${split:-}" ]]; then
  export EP_MULTI_ONLY="${EP_MULTI_ONLY:-ll_matrix,ll_quant,ll_nvfp4,ll_send_only,ll_two_handles,ll_growth,ll_graph_replays,ll_mask_host,ht_rounds,ht_graph_replays,ht_growth}"
  : "${MULTI_GPU_THREADS:=0}" "${MULTI_GPU_KILL:=0}"
  # Group creation then logs how many ranks it reaches remotely and what decided it; checked
  # below on every rank (check_remote_sets), so a split that silently fell back to one node fails.
  export NCCL_EP_DEBUG="${NCCL_EP_DEBUG:-INFO}"
  echo "== $split; steps: $EP_MULTI_ONLY"
fi

LOGDIR="${OUT:-$ROOT/build}/multi-gpu"
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
T="${MULTI_GPU_TIMEOUT:-900}"
export NCCL_NVLS_ENABLE=0                       # never NVLink multicast (shared machines)
export EP_MULTI_TIMEOUT_S="$T"                  # the test's own watchdog
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

# The NCCL to load: EP_NCCL_LIB, else a source build under NCCL_HOME, else what the loader finds,
# else the nvidia-nccl-cu* wheel of the python3 here.
if [[ -z "${EP_NCCL_LIB:-}" && -n "${NCCL_HOME:-}" && -f "$NCCL_HOME/lib/libnccl.so.2" ]]; then
  export EP_NCCL_LIB="$NCCL_HOME/lib/libnccl.so.2"
fi
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
if [[ -n "${EP_NCCL_LIB:-}" ]]; then
  if [[ ! -f "$EP_NCCL_LIB" ]]; then
    echo "multi_gpu.sh: EP_NCCL_LIB=$EP_NCCL_LIB does not exist" >&2
    exit 2
  fi
  # Its directory first on the loader path: anything that loads libnccl.so.2 by name gets it.
  nccl_dir=$(dirname "$EP_NCCL_LIB")
  export LD_LIBRARY_PATH="$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# Several ranks per GPU: NCCL >= 2.30 and its opt-in (the test checks both again).
PER_GPU=$(( (N + NGPU - 1) / NGPU ))
if [[ "$PER_GPU" -gt 1 ]]; then
  export NCCL_MULTI_RANK_GPU_ENABLE=1
  if [[ "$PER_GPU" -gt 2 && -z "${NCCL_MAX_CTAS:-}" ]]; then
    export NCCL_MAX_CTAS=4                      # NCCL's advice beyond 2 ranks per GPU
  fi
  real=$(readlink -f "${EP_NCCL_LIB:-/nonexistent}" 2>/dev/null || true)
  if [[ "$real" =~ libnccl\.so\.2\.([0-9]+)\.([0-9]+) ]] && [[ "${BASH_REMATCH[1]}" -lt 30 ]]; then
    echo "multi_gpu.sh: $N ranks on $NGPU GPU(s) need NCCL >= 2.30; $real is older (docs/BUILDING.md, \"Multi-GPU runs\")" >&2
    exit 2
  fi
  echo "== $PER_GPU rank(s) per GPU: NCCL_MULTI_RANK_GPU_ENABLE=1${NCCL_MAX_CTAS:+ NCCL_MAX_CTAS=$NCCL_MAX_CTAS}; the processes time-slice the GPU"
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

# Starts N background processes of BIN with EP_RANK/EP_WORLD; logs to $LOGDIR/PREFIXrank-R.log;
# fills `statuses` with their exit statuses.
run_plain() {
  local prefix="$1" pids=() r
  statuses=()
  for ((r = 0; r < N; r++)); do
    local hid=()
    [[ -n "${EP_HOST_SIZE:-}" ]] && hid=("NCCL_HOSTID=ep-host-$((r / EP_HOST_SIZE))")
    EP_RANK=$r EP_WORLD=$N EP_LOCAL_RANK=$r env "${hid[@]}" timeout "$((T + 60))" "$BIN" --include-ignored --nocapture \
      >"$LOGDIR/${prefix}rank-$r.log" 2>&1 &
    pids+=($!)
  done
  for ((r = 0; r < N; r++)); do
    wait "${pids[$r]}"
    statuses+=("$?")
  done
}

# In a split run, every group a rank created must have found the other blocks' ranks remote: its
# INFO line "group: rank R/N ..., M remote rank(s) (BY)" with M = N minus the rank's own block
# and BY the split's source (NCCL_EP_NODE_SIZE or hosts).
check_remote_sets() {
  local prefix="$1" r log lines bad want start
  [[ -n "${split_size:-}" ]] || return 0
  for ((r = 0; r < N; r++)); do
    log="$LOGDIR/${prefix}rank-$r.log"
    start=$(( r / split_size * split_size ))
    want=$(( N - (N - start < split_size ? N - start : split_size) ))
    lines=$(grep -c "NCCL EP INFO group: rank $r/$N " "$log" 2>/dev/null || true)
    bad=$(grep "NCCL EP INFO group: rank $r/$N " "$log" 2>/dev/null | grep -vc ", $want remote rank(s) ($split_by)" || true)
    if [[ "${lines:-0}" -eq 0 || "${bad:-0}" -ne 0 ]]; then
      summary+=("[split] rank $r/$N: FAIL: $lines group(s) logged, $bad without '$want remote rank(s) ($split_by)'")
      grep -m3 "NCCL EP INFO group: rank $r/$N " "$log" 2>/dev/null | sed 's/^/    /'
      rc=1
    else
      summary+=("[split] rank $r/$N: PASS ($lines group(s), each with $want remote rank(s) by $split_by)")
    fi
  done
}

fresh_bootstrap() {
  export EP_BOOTSTRAP_DIR="$LOGDIR/bootstrap-$1"
  EP_BOOTSTRAP_TAG="$$-$1-$(date +%s)"
  export EP_BOOTSTRAP_TAG
  mkdir -p "$EP_BOOTSTRAP_DIR"
}

KILL="${MULTI_GPU_KILL:-1}"

if [[ "${MULTI_GPU_PROCS:-1}" != 0 && "$KILL" != only ]]; then
  launcher="${MULTI_GPU_LAUNCHER:-auto}"
  if [[ "$launcher" == auto ]]; then
    if command -v mpirun >/dev/null 2>&1; then launcher=mpirun; else launcher=plain; fi
  fi
  fresh_bootstrap procs
  echo "== $N process(es), launcher: $launcher"
  start=$(date +%s)
  if [[ "$launcher" == mpirun ]]; then
    margs=()
    if mpirun --version 2>&1 | grep -q 'Open MPI'; then
      # No MPI library is used: mpirun only starts the processes (and passes these variables).
      margs+=(--allow-run-as-root --oversubscribe --bind-to none)
      for v in EP_BOOTSTRAP_DIR EP_BOOTSTRAP_TAG NCCL_NVLS_ENABLE NCCL_EP_TIMEOUT_MS EP_MULTI_TIMEOUT_S \
               EP_NCCL_LIB EP_MULTI_QUICK EP_MULTI_ONLY EP_MULTI_SEED EP_MULTI_KEEP_GOING \
               EP_MULTI_MASK_SLACK_MS NCCL_MULTI_RANK_GPU_ENABLE NCCL_MAX_CTAS NCCL_DEBUG \
               NCCL_DEBUG_SUBSYS NCCL_EP_DEBUG NCCL_HOSTID RUST_BACKTRACE LD_LIBRARY_PATH \
               NCCL_EP_NODE_SIZE NCCL_P2P_DISABLE NCCL_SHM_DISABLE EP_HOST_SIZE; do
        [[ -n "${!v:-}" ]] && margs+=(-x "$v")
      done
    fi
    # shellcheck disable=SC2086,SC2016
    # Each rank logs to rank-R.log. The test reads Open MPI's or PMI's rank variables itself;
    # under a launcher that sets only PMIX_RANK the wrapper hands it over as EP_RANK/EP_WORLD.
    timeout "$((T + 60))" mpirun "${margs[@]}" ${MULTI_GPU_MPIRUN_ARGS:-} -np "$N" bash -c '
      r=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${PMIX_RANK:-}}}
      if [ -z "$r" ]; then echo "the launcher set no rank variable" >"$1/rank-unknown-$$.log"; exit 3; fi
      if [ -z "${OMPI_COMM_WORLD_RANK:-}${PMI_RANK:-}" ]; then export EP_RANK=$r EP_WORLD=$2; fi
      if [ -n "${EP_HOST_SIZE:-}" ]; then export NCCL_HOSTID="ep-host-$((r / EP_HOST_SIZE))"; fi
      exec "$0" --include-ignored --nocapture >"$1/rank-$r.log" 2>&1' \
      "$BIN" "$LOGDIR" "$N" >"$LOGDIR/mpirun.log" 2>&1
    status=$?
    for ((r = 0; r < N; r++)); do
      summarize "$LOGDIR/rank-$r.log" "[procs]" "$status"
    done
    check_remote_sets ""
    [[ $status -eq 0 ]] || { echo "---- mpirun exit status $status; mpirun.log:"; tail -n 15 "$LOGDIR/mpirun.log"; rc=1; }
  else
    run_plain ""
    for ((r = 0; r < N; r++)); do
      summarize "$LOGDIR/rank-$r.log" "[procs]" "${statuses[$r]}"
    done
    check_remote_sets ""
  fi
  rmdir "$EP_BOOTSTRAP_DIR" 2>/dev/null   # rank 0 removes the id file once every rank has joined
  echo "   ($(( $(date +%s) - start )) s)"
fi

if [[ "${MULTI_GPU_THREADS:-1}" != 0 && "$KILL" != only ]]; then
  NT=$(( N < NGPU ? N : NGPU ))
  echo "== one process, one thread per GPU (ncclCommInitAll over $NT GPU(s))"
  start=$(date +%s)
  (unset OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE PMI_RANK PMI_SIZE EP_BOOTSTRAP_DIR EP_BOOTSTRAP_TAG
   EP_MULTI_GPUS=$NT timeout "$((T + 60))" "$BIN" --include-ignored --nocapture >"$LOGDIR/threads.log" 2>&1)
  summarize "$LOGDIR/threads.log" "[threads]" "$?"
  echo "   ($(( $(date +%s) - start )) s)"
fi

if [[ "$KILL" != 0 && "$N" -ge 2 ]]; then
  VICTIM="${EP_MULTI_KILL_RANK:-$((N - 1))}"
  echo "== kill test: $N plain processes, rank $VICTIM kills itself (SIGKILL) before its dispatch"
  fresh_bootstrap kill
  start=$(date +%s)
  # NCCL_EP_REVOKE_ON_REMOTE_TIMEOUT: across nodes the survivors' dispatch waits inside NCCL for
  # the dead rank, and only the watchdog's revoke ends it (docs/MULTINODE.md); on one node it
  # changes nothing (no exchanges). Only here: elsewhere a slow peer (compiling its kernels,
  # say) past the timeout would revoke the communicator of a healthy run.
  EP_MULTI_ONLY=mask_kill EP_MULTI_KILL_RANK=$VICTIM NCCL_EP_REVOKE_ON_REMOTE_TIMEOUT=1 run_plain "kill-"
  for ((r = 0; r < N; r++)); do
    log="$LOGDIR/kill-rank-$r.log"
    if [[ "$r" -eq "$VICTIM" ]]; then
      if [[ "${statuses[$r]}" -eq 137 ]] && grep -q 'KILLING ITSELF' "$log"; then
        summary+=("[kill] rank $r/$N: killed itself as planned (exit status 137)")
      else
        summary+=("[kill] rank $r/$N: FAIL: expected to kill itself (exit status 137), exit status ${statuses[$r]}")
        rc=1
        echo "---- last lines of $log"
        tail -n 25 "$log" 2>/dev/null | cut -c1-300
      fi
    else
      summarize "$log" "[kill]" "${statuses[$r]}"
    fi
  done
  rm -rf "$EP_BOOTSTRAP_DIR"   # the id file stays: the dead rank may have been the one to remove it
  echo "   ($(( $(date +%s) - start )) s)"
fi

if [[ "${MULTI_GPU_TAR:-0}" == 1 ]]; then
  # One file instead of many (for tools that bring back only a few files).
  tar -czf "$LOGDIR.tar.gz" -C "$(dirname "$LOGDIR")" "$(basename "$LOGDIR")" && rm -rf "$LOGDIR" &&
    echo "== logs: $LOGDIR.tar.gz"
fi

echo "== summary"
for line in "${summary[@]}"; do echo "$line"; done
if [[ ${#summary[@]} -eq 0 ]]; then echo "nothing ran"; rc=1; fi
if [[ $rc -eq 0 ]]; then echo "multi_gpu.sh: PASS ($N rank(s))"; else echo "multi_gpu.sh: FAIL"; fi
exit $rc
