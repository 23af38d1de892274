# shellcheck shell=bash
# Sourced by scripts/conformance.sh: the perf phase (issue 15). NVIDIA's own ep_bench, without
# --validate, against NVIDIA's library ("upstream") and ours, one run at a time on the GPU (never
# two at once: the times would disturb each other), alternating the libraries: run r of a config
# starts with upstream when r is odd and with ours when r is even, so a slow drift of the machine
# (clocks, temperature) does not favour one side.
#
# The configurations are generated here (perf_configs), not read from rows.txt: LL {em, rm} x
# tokens {1, 32, 128, 256, 512} x hidden {2048, 4096, 7168} and HT {flat, em} x tokens
# {1024, 4096, 8192} at hidden 7168; top-k 8, 256 experts, 1 rank (the one GPU). Then the
# dispatch recipes (issue 13) at the LL anchor, dispatch only (ep_bench has no combine after
# them): bf16 ("plain"), DeepSeek FP8 ("ds-fp8": the library quantises) and MXFP8 scales-forward
# ("mxfp8": E4M3 tokens + UE8M0 scales, the caller quantised); they go to a separate CSV.
# Last, the forced-remote rows (issue 14, docs/MULTINODE.md), tagged "remote-<R>n<K>": R processes
# on the one GPU, NCCL_EP_NODE_SIZE=K, NCCL's P2P and SHM transports off, so ours moves every
# remote rank's traffic over NCCL's socket transport (time-sliced processes on one GPU and
# loopback sockets: a check that the path runs and what it costs here, not a network figure);
# NVIDIA's library ignores the variable (its remote path needs GIN), so its column is whatever it
# does with P2P/SHM off. They go to a separate CSV (-remote.csv).
# Every run has scripts/conformance/host_timer.c preloaded (built here with cc): it times each
# ncclEpDispatch / ncclEpCombine / ncclEpComplete call on a CPU clock inside ep_bench, whichever
# library answers it, and prints the medians at exit ("warm": the warmup calls, without CUPTI;
# "timed": the timed calls, CUPTI on) into the same log: issue 15's host time per call.
# Each run's log is LOGS/perf/<config id>.<side>.<run>.log; scripts/conformance/perf_report.py
# turns the logs into bench/results/vs-upstream-<gpu>-<date>.csv (+ -detail.csv, + .png).

PERF_TOPK=8
PERF_EXPERTS=256

# One line per configuration: "mode layout tokens hidden [recipe]".
perf_configs() {
  local layout t h r
  for layout in em rm; do
    for h in 2048 4096 7168; do
      for t in 1 32 128 256 512; do echo "ll $layout $t $h"; done
    done
  done
  for layout in flat em; do
    for t in 1024 4096 8192; do echo "ht $layout $t 7168"; done
  done
  for layout in em rm; do
    for r in plain ds-fp8 mxfp8; do echo "ll $layout 128 7168 $r"; done
  done
  echo "ll em 128 7168 remote-2n1"
  echo "ll rm 128 7168 remote-2n1"
  echo "ll em 128 7168 remote-4n2"
  echo "ht flat 1024 7168 remote-2n1"
}

# ep_bench arguments of a recipe (dispatch only: ep_bench runs no combine after these recipes).
recipe_args() {
  case "$1" in
    "") ;;
    plain) echo "--dispatch-only" ;;
    ds-fp8) echo "--dispatch-quantization ds-fp8e3m4 --dispatch-only" ;;
    mxfp8) echo "--mxfp8 --dispatch-only" ;;
    remote-*) ;;  # both phases; the processes and the environment come from perf_cmd
    *) echo "perf: unknown recipe '$1'" >&2; return 1 ;;
  esac
}

perf_id() { echo "$1-$2-t$3-h$4${5:+-$5}"; }

# perf_cmd SIDE MODE LAYOUT TOKENS HIDDEN RECIPE TIMEOUT: sets CMD to one ep_bench run.
perf_cmd() {
  local side="$1" mode="$2" layout="$3" tokens="$4" hidden="$5" recipe="$6" t="$7" envw=() extra=() np=1 remote=()
  read -ra extra <<<"$(recipe_args "$recipe")"
  if [[ "$recipe" =~ ^remote-([0-9]+)n([0-9]+)$ ]]; then
    np="${BASH_REMATCH[1]}"
    remote=("NCCL_EP_NODE_SIZE=${BASH_REMATCH[2]}" NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1)
    ((np > 2)) && remote+=(NCCL_MAX_CTAS=4)  # several ranks per GPU: NCCL's advice
  fi
  mapfile -t envw < <(printf '%s\n' "${ENV_COMMON[@]}" "${remote[@]}" "LD_LIBRARY_PATH=$(side_ldpath "$side")" \
    "NCCL_EP_JIT_CACHE_DIR=$WORK/jit/$side" "LD_PRELOAD=$WORK/host_timer.so" "EP_HOST_TIMER_SPLIT=$PERF_WARMUP")
  CMD=(env "${envw[@]}" timeout -k 10 "$t" "${MPIRUN[@]}" -np "$np" "${STDBUF[@]}" "$BUILD/bin/ep_bench"
    --algorithm "$mode" --layout "$layout" --tokens "$tokens" --hidden "$hidden"
    --top-k "$PERF_TOPK" --experts "$PERF_EXPERTS" --warmup "$PERF_WARMUP" --iters "$PERF_ITERS" "${extra[@]}")
}

# The libraries of a run, rotated by the run number so that none always goes first: upstream and
# ours, plus "baseline" (an older build of ours, --perf-baseline) when given.
perf_sides() {
  local r="$1" all=(upstream ours) i
  [[ -n "$PERF_BASELINE" ]] && all+=(baseline)
  for ((i = 0; i < ${#all[@]}; i++)); do echo "${all[(i + r - 1) % ${#all[@]}]}"; done
}

run_perf() {
  setup_run || return 1
  local dir="$LOGS/perf" cfgs=() line mode layout tokens hidden recipe id r side sides=() n=0 t0 rc
  if [[ -n "$PERF_BASELINE" ]]; then
    ((DRY)) || [[ -f "$PERF_BASELINE" ]] || { echo "perf: --perf-baseline '$PERF_BASELINE' is no file"; return 1; }
    x rm -rf "$WORK/baseline-lib" && x mkdir -p "$WORK/baseline-lib" || return 1
    x cp "$PERF_BASELINE" "$WORK/baseline-lib/libnccl_ep.so.0" || return 1
    x ln -s libnccl_ep.so.0 "$WORK/baseline-lib/libnccl_ep.so" || return 1
    x mkdir -p "$WORK/jit/baseline" || return 1
  fi
  x cc -O2 -shared -fPIC -o "$WORK/host_timer.so" "$CONF/host_timer.c" -ldl ||
    { echo "perf: cannot build the host-time preload (cc)"; return 1; }
  mapfile -t cfgs < <(perf_configs | while read -r line; do
    [[ -z "$PERF_ONLY" || "$line" =~ $PERF_ONLY ]] && echo "$line"
  done)
  ((${#cfgs[@]})) || { echo "perf: no configuration matches --perf-only '$PERF_ONLY'"; return 1; }
  x mkdir -p "$dir" || return 1
  ((DRY)) || rm -f "$dir"/*.log "$dir/runs.tsv"
  echo "perf: ${#cfgs[@]} configurations x $PERF_RUNS runs x 2 libraries, warmup $PERF_WARMUP," \
    "iters $PERF_ITERS, timeout $TIMEOUT s per run"
  for line in "${cfgs[@]}"; do
    recipe=""
    read -r mode layout tokens hidden recipe <<<"$line"
    id="$(perf_id "$mode" "$layout" "$tokens" "$hidden" "$recipe")"
    n=$((n + 1))
    for ((r = 1; r <= PERF_RUNS; r++)); do
      mapfile -t sides < <(perf_sides "$r")
      for side in "${sides[@]}"; do
        perf_cmd "$side" "$mode" "$layout" "$tokens" "$hidden" "$recipe" "$TIMEOUT"
        if ((DRY)); then x "${CMD[@]}"; continue; fi
        t0=$SECONDS
        { printf '# %s\n' "${CMD[*]}"; "${CMD[@]}"; } >"$dir/$id.$side.$r.log" 2>&1
        rc=$?
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$layout" "$tokens" "$hidden" "$side" "$r" "$rc" \
          "$id.$side.$r.log" "$recipe" >>"$dir/runs.tsv"
        printf '[%2d/%d] %-22s run %d %-8s exit %-3s %3d s\n' "$n" "${#cfgs[@]}" "$id" "$r" "$side" "$rc" \
          $((SECONDS - t0))
      done
    done
  done
}

perf_report() {
  local dir="$LOGS/perf" csv
  [[ -f "$dir/runs.tsv" ]] || { echo "perf report: no runs in $dir (perf phase first)"; return 1; }
  csv="${PERF_CSV:-$ROOT/bench/results/vs-upstream-$(gpu_slug)-$(date +%F).csv}"
  python3 "$CONF/perf_report.py" --runs "$dir/runs.tsv" --logs "$dir" --csv "$csv" \
    --topk "$PERF_TOPK" --experts "$PERF_EXPERTS" --ranks 1
}
