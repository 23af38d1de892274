# shellcheck shell=bash
# Sourced by scripts/conformance.sh: the run phase (every selected row against both libraries,
# judged from exit codes and the programs' own validation output) and the report.
#
# Each row runs NVIDIA's library ("upstream") and ours at the same time, the same binary with
# LD_LIBRARY_PATH=<dir holding that libnccl_ep.so.0>:<NCCL lib>:...; every rank of every run
# shares GPU (local rank % GPUs), hence NCCL_MULTI_RANK_GPU_ENABLE=1.

SIDES=(upstream ours)

side_libdir() {
  case "$1" in
    upstream) echo "$BUILD/upstream/lib" ;;
    baseline) echo "$WORK/baseline-lib" ;;  # the perf phase's --perf-baseline library
    *) echo "$WORK/ours-lib" ;;
  esac
}

side_ldpath() {
  local p
  p="$(side_libdir "$1"):$BUILD/nccl/lib:$CUDA_HOME/lib64"
  [[ -n "$CUPTI_LIBDIR" && "$CUPTI_LIBDIR" != "$CUDA_HOME/lib64" ]] && p+=":$CUPTI_LIBDIR"
  [[ -n "$MPI_LD" ]] && p+=":$MPI_LD"
  echo "$p${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

prog_kind() {
  case "$1" in
    ep_bench) echo bench ;; ep_test) echo mpitest ;; ep_test.py) echo py ;; test_*) echo gtest ;;
    *) echo unknown ;;
  esac
}

prog_path() {
  case "$(prog_kind "$1")" in
    bench|mpitest) echo "$BUILD/bin/$1" ;; gtest) echo "$BUILD/gtest/$1" ;; py) echo "$BUILD/py/ep_test.py" ;;
  esac
}

# The row's VAR=value words (its directives start with @).
# shellcheck disable=SC2086 # the words of the row's last field
row_envs() { local w; for w in ${R_ENV[$1]}; do [[ "$w" == *=* ]] && echo "$w"; done; return 0; }
row_has() { [[ " ${R_ENV[$1]} " == *" $2 "* ]]; }

# The CSV's config: the program's arguments, then the row's variables in brackets.
row_config() {
  local i="$1" env
  env="$(row_envs "$i" | tr '\n' ' ')"; env="${env% }"
  local c="${R_ARGS[i]:--}"
  [[ -n "$env" ]] && c+=" [$env]"
  echo "$c"
}

read_manifest_value() { sed -n "s/^$1=//p" "$BUILD/manifest.txt" 2>/dev/null | head -1; }

setup_run() {
  if [[ -z "$OURS" ]] || { ((!DRY)) && [[ ! -f "$OURS" ]]; }; then
    echo "run: --ours must name our libnccl_ep.so ('$OURS')"; return 1
  fi
  if ((!DRY)) && [[ ! -f "$BUILD/manifest.txt" ]]; then
    echo "run: no build at $BUILD (run the build phase, or give --prebuilt)"; return 1
  fi
  CUPTI_LIBDIR="$(read_manifest_value cupti_libdir)"
  MPI_LD="$(read_manifest_value mpi_libdirs | tr ' ' ':')"
  read -ra MPIRUN <<<"mpirun --allow-run-as-root --oversubscribe --bind-to none $MPIRUN_ARGS"
  STDBUF=()
  command -v stdbuf >/dev/null 2>&1 && STDBUF=(stdbuf -oL -eL)
  # The same environment for both libraries but the library dir and the JIT cache dir (both
  # libraries read NCCL_EP_JIT_CACHE_DIR). NCCL_EP_JIT_*: NVIDIA's JIT finds its headers in this
  # tree even when it was built elsewhere (--prebuilt); our library ignores them.
  ENV_COMMON=(NCCL_MULTI_RANK_GPU_ENABLE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
    NVSHMEM_DISABLE_NVLS=1 "CUDA_HOME=$CUDA_HOME"
    "NCCL_EP_JIT_SOURCE_DIR=$BUILD/upstream/include/nccl_ep"
    "NCCL_EP_JIT_BUILD_INCLUDE_DIR=$BUILD/nccl/include"
    "NCCL_EP_JIT_CUDA_INCLUDE_DIR=$CUDA_HOME/include"
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    OMPI_MCA_btl_vader_single_copy_mechanism=none PMIX_MCA_gds=hash)
  x rm -rf "$WORK/ours-lib" "$RES" "$WORK/tmp" || return 1
  x mkdir -p "$WORK/ours-lib" "$RES" "$WORK/tmp" "$LOGS" "$WORK/jit/upstream" "$WORK/jit/ours" || return 1
  x cp "$OURS" "$WORK/ours-lib/libnccl_ep.so.0" && x ln -s libnccl_ep.so.0 "$WORK/ours-lib/libnccl_ep.so" || return 1
  ((DRY)) && { echo "+ ldd check of both libraries"; return 0; }
  rm -f "$LOGS"/[0-9][0-9][0-9]-*.log "$LOGS/ldd.txt"
  local soname
  soname="$(readelf -d "$OURS" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p')"
  [[ "$soname" == libnccl_ep.so.0 ]] || echo "run: WARNING: --ours has SONAME '${soname:-none}', not libnccl_ep.so.0"
  nm -D --defined-only "$WORK/ours-lib/libnccl_ep.so.0" | awk 'NF >= 3 {print $3}' | sed 's/@.*//' |
    sort -u >"$WORK/ours-symbols.txt"
  ldd_check || return 1
  # What the logs may need to explain a failure: the GPU, MPI, the room NCCL has in /dev/shm.
  echo "run: $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi'); $(mpirun --version 2>/dev/null | head -1);" \
    "$(nproc) cores; /dev/shm $(df -h /dev/shm 2>/dev/null | awk 'NR == 2 {print $4 " free"}')"
  PY_STATE="no wheels"
  if [[ -n "$WHEELS" ]]; then
    rm -rf "$WORK/py-site"
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/py-site" \
      "$WHEELS"/*.whl >"$LOGS/pip.log" 2>&1; then
      PY_STATE=ok
    else
      PY_STATE="wheel install failed (see pip.log)"
    fi
    echo "run: Python wheels from $WHEELS: $PY_STATE"
  fi
  return 0
}

# Which libnccl_ep.so.0 and libnccl.so.2 each side's programs load (logged; a wrong one stops the run).
ldd_check() {
  local probe="" b side out got want
  for b in "$BUILD/bin/ep_bench" "$BUILD/bin/ep_test" "$BUILD/gtest/test_public_struct_abi"; do
    [[ -x "$b" ]] && { probe="$b"; break; }
  done
  [[ -n "$probe" ]] || { echo "run: no program was built (see the build phase)"; return 0; }
  for side in "${SIDES[@]}"; do
    out="$(env LD_LIBRARY_PATH="$(side_ldpath "$side")" ldd "$probe" 2>&1)"
    printf '== %s: LD_LIBRARY_PATH=%s ldd %s\n%s\n' "$side" "$(side_ldpath "$side")" "$probe" "$out" >>"$LOGS/ldd.txt"
    got="$(awk '$1 == "libnccl_ep.so.0" {print $3}' <<<"$out")"
    want="$(side_libdir "$side")/libnccl_ep.so.0"
    if [[ -z "$got" || "$(readlink -f "$got")" != "$(readlink -f "$want")" ]]; then
      echo "run: ERROR: for $side, $(basename "$probe") loads libnccl_ep.so.0 from '${got:-nowhere}', not $want (ldd.txt)"
      return 1
    fi
    echo "run: $side: libnccl_ep.so.0 -> $(readlink -f "$got"); libnccl.so.2 -> $(awk '$1 == "libnccl.so.2" {print $3}' <<<"$out")"
  done
}

# side_env SIDE ROW: prints the env words of one run.
side_env() {
  local side="$1" i="$2"
  printf '%s\n' "${ENV_COMMON[@]}" "LD_LIBRARY_PATH=$(side_ldpath "$side")" "NCCL_EP_JIT_CACHE_DIR=$WORK/jit/$side"
  if [[ "$(prog_kind "${R_PROG[i]}")" == py ]]; then
    printf '%s\n' "PYTHONPATH=$WORK/py-site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
      "LD_PRELOAD=$BUILD/nccl/lib/libnccl.so.2:$(side_libdir "$side")/libnccl_ep.so.0"
  fi
  row_envs "$i"
}

# run_cmd SIDE ROW TIMEOUT [RANK]: sets CMD to one run's command line.
run_cmd() {
  local side="$1" i="$2" t="$3" rank="${4:-}" envw=() args=()
  mapfile -t envw < <(side_env "$side" "$i")
  read -ra args <<<"${R_ARGS[i]}"
  local bin; bin="$(prog_path "${R_PROG[i]}")"
  CMD=(env "${envw[@]}" timeout -k 10 "$t")
  # EP_CONF_HOST_SIZE=k in a row's environment: each block of k ranks gets its own NCCL_HOSTID,
  # so that NCCL and the EP library both take it for a host (docs/MULTINODE.md, "Who is remote").
  local hosts=()
  if printf '%s\n' "${envw[@]}" | grep -q '^EP_CONF_HOST_SIZE='; then
    # shellcheck disable=SC2016
    hosts=(bash -c 'export NCCL_HOSTID="ep-host-$(( OMPI_COMM_WORLD_RANK / EP_CONF_HOST_SIZE ))"; exec "$@"' ep-host)
  fi
  case "$(prog_kind "${R_PROG[i]}")" in
    bench) read -ra extra <<<"$EP_BENCH_COMMON"; CMD+=("${MPIRUN[@]}" -np "${R_RANKS[i]}" "${hosts[@]}" "${STDBUF[@]}" "$bin" "${args[@]}" "${extra[@]}") ;;
    mpitest) CMD+=("${MPIRUN[@]}" -np "${R_RANKS[i]}" "${hosts[@]}" "${STDBUF[@]}" "$bin" "${args[@]}") ;;
    py) CMD+=("${MPIRUN[@]}" -np "${R_RANKS[i]}" python3 "$bin" "${args[@]}") ;;
    gtest)
      if [[ "$(gtest_mode "${R_PROG[i]}")" == single ]]; then CMD+=("${STDBUF[@]}" "$bin" "${args[@]}")
      else CMD+=("${STDBUF[@]}" "$bin" "--rank=$rank" "--nranks=${R_RANKS[i]}" "--uid-file=$WORK/tmp/$(row_id "$i").$side.uid" "${args[@]}"); fi ;;
  esac
}

gtest_info_value() { sed -n "s/^$2=//p" "$BUILD/gtest/$1.info" 2>/dev/null | head -1; }
gtest_mode() { local m; m="$(gtest_info_value "$1" mode)"; echo "${m:-ranks}"; }

# Why ours does not run a gtest, or nothing: NVIDIA's internal test hooks (ncclEp*_test_*, C++
# symbols of its namespace) are not part of the API; a public ncclEp* we lack is a failure to see.
gtest_ours_skip() {
  local t="$1" syms s missing=()
  syms="$(gtest_info_value "$t" ep_symbols)"
  [[ -n "$syms" ]] || { echo "calls nothing in libnccl_ep (tests NVIDIA internals)"; return; }
  for s in $syms; do
    grep -qxF "$s" "$WORK/ours-symbols.txt" && continue
    [[ "$s" == *_test_* || "$s" == _Z* || "$s" != ncclEp* ]] && missing+=("$s")
  done
  ((${#missing[@]})) && echo "needs NVIDIA-internal symbols: ${missing[*]:0:3}$( ((${#missing[@]} > 3)) && echo " +$((${#missing[@]} - 3))")"
  return 0
}

# Run one side of a row; the log is LOGS/<id>.<side>.log, the exit status WORK/tmp/<id>.<side>.rc
# (gtests: one per rank, .rank<r>.rc / .rank<r>.log, then joined into the one log).
run_side() {
  local side="$1" i="$2" t="$3" id log r pids=()
  id="$(row_id "$i")"; log="$LOGS/$id.$side.log"
  if [[ "$(prog_kind "${R_PROG[i]}")" == gtest && "$(gtest_mode "${R_PROG[i]}")" == ranks ]]; then
    rm -f "$WORK/tmp/$id.$side.uid"
    for ((r = 0; r < R_RANKS[i]; r++)); do
      run_cmd "$side" "$i" "$t" "$r"
      {
        { printf '# %s\n' "${CMD[*]}"; "${CMD[@]}"; } >"$WORK/tmp/$id.$side.rank$r.log" 2>&1
        echo $? >"$WORK/tmp/$id.$side.rank$r.rc"
      } &
      pids+=($!)
    done
    wait "${pids[@]}"
    : >"$log"
    for ((r = 0; r < R_RANKS[i]; r++)); do
      printf '===== rank %d: exit %s =====\n' "$r" "$(cat "$WORK/tmp/$id.$side.rank$r.rc")" >>"$log"
      cat "$WORK/tmp/$id.$side.rank$r.log" >>"$log"
    done
  else
    run_cmd "$side" "$i" "$t"
    { printf '# %s\n' "${CMD[*]}"; "${CMD[@]}"; } >"$log" 2>&1
    echo $? >"$WORK/tmp/$id.$side.rc"
  fi
}

# The first line of LOG that looks like the reason for a failure (the note's detail).
first_error() {
  local l
  l="$(grep -av '^# ' "$1" | grep -m1 -aE '[Ff]ailed|[Ee]rror|FAILED|mismatch|[Aa]ssert|Segmentation|core dumped|[Ss]ignal|what\(\)|undefined symbol|cannot open shared|WARN' |
    tr -s ' \t' ' ' | cut -c1-150)"
  echo "${l:-no error line, see the log}"
}

# timeout(1) exits 124 when it stopped the run, 137 when the run also needed SIGKILL (-k 10 s);
# 137 may also be the kernel's OOM killer, hence the wording.
is_timeout() { [[ "$1" == 124 || "$1" == 137 ]]; }
timeout_note() { if [[ "$1" == 124 ]]; then echo timeout; else echo "timeout or killed (exit 137)"; fi; }

# judge_* print "STATUS|reason". ep_bench: exit 2 on a validation mismatch, exit 1 on setup
# errors, and "Global validation: Dispatch=..., Combine=..." from rank 0; --mask-test prints its
# checks as PASSED/FAILED lines without changing the exit status, so any FAILED line fails the row.
judge_bench() {
  local log="$1" rc="$2" i="$3" l w
  is_timeout "$rc" && { echo "FAIL|$(timeout_note "$rc")"; return; }
  l="$(grep -m1 -a 'FAILED' "$log" | tr -s ' ' | cut -c1-150)"
  [[ -n "$l" ]] && { echo "FAIL|$l"; return; }
  ((rc == 0)) || { echo "FAIL|exit $rc: $(first_error "$log")"; return; }
  grep -qa 'Global validation:' "$log" || { echo "FAIL|exit 0 without 'Global validation:'"; return; }
  if [[ " ${R_ARGS[i]} " == *" --mask-test "* ]] && ! grep -qa 'Active-Mask Test Complete' "$log"; then
    echo "FAIL|mask test did not complete"; return
  fi
  w="$(grep -ac 'validation warning' "$log")"
  echo "PASS|$( ((w > 0)) && echo "$w validation warnings")"
}

# ep_test / ep_test.py: every failed check exits non-zero; success is "[MPI Rank r] Success" from
# every rank. @refuse rows pass on upstream's own guard message.
judge_mpi_test() {
  local log="$1" rc="$2" i="$3" n
  if row_has "$i" @refuse; then
    grep -qa 'nRanks must be 2 or a multiple of 4' "$log" && echo "PASS|" || echo "FAIL|no guard refusal (exit $rc)"
    return
  fi
  is_timeout "$rc" && { echo "FAIL|$(timeout_note "$rc")"; return; }
  n="$(grep -aoE '\[MPI Rank [0-9]+\] Success' "$log" | sort -u | wc -l)"
  if ((rc == 0 && n == R_RANKS[i])); then echo "PASS|"; return; fi
  echo "FAIL|exit $rc, Success from $n/${R_RANKS[i]} ranks: $(first_error "$log")"
}

# gtests: every rank must exit 0 and end with "[  PASSED  ] N tests" (N > 0) and no
# "[  FAILED  ]"; their bootstrap prints "SKIP: ..." and exits 0 on too few ranks or an old GPU,
# and also exits 0, silently, when it cannot create its group: no summary is a failure.
judge_gtest() {
  local id="$1" side="$2" i="$3" r rc f fails="" skip="" passed=0 ran=0 skipped=0 n bad="" names=() silent=""
  local prefix="$WORK/tmp/$id.$side"
  local nr="${R_RANKS[i]}"
  [[ "$(gtest_mode "${R_PROG[i]}")" == single ]] && nr=1
  for ((r = 0; r < nr; r++)); do
    if [[ "$(gtest_mode "${R_PROG[i]}")" == single ]]; then f="$LOGS/$id.$side.log"; rc="$(cat "$prefix.rc")"
    else f="$prefix.rank$r.log"; rc="$(cat "$prefix.rank$r.rc" 2>/dev/null || echo 255)"; fi
    is_timeout "$rc" && { echo "FAIL|$(timeout_note "$rc") (rank $r)"; return; }
    fails+="$(grep -aE '^\[  FAILED  \] [A-Za-z_]' "$f" | grep -v ' listed below' | sed 's/^\[  FAILED  \] //; s/ (.*//' | tr '\n' ' ')"
    [[ -z "$skip" ]] && skip="$(grep -m1 -a '^SKIP: ' "$f" | cut -c1-120)"
    n="$(grep -m1 -aoE '^\[  PASSED  \] [0-9]+' "$f" | grep -oE '[0-9]+$')"
    if [[ -n "$n" ]]; then ran=$((ran + 1)); ((n > passed)) && passed=$n
    elif [[ -z "$silent" ]]; then silent="rank $r: $(first_error "$f")"; fi
    n="$(grep -m1 -aoE '^\[  SKIPPED \] [0-9]+' "$f" | grep -oE '[0-9]+$')"
    [[ -n "$n" ]] && ((n > skipped)) && skipped=$n
    ((rc == 0)) || [[ -n "$bad" ]] || bad="rank $r exit $rc: $(first_error "$f")"
  done
  if [[ -n "$fails" ]]; then
    read -ra names <<<"$fails"
    echo "FAIL|failed: $(printf '%s\n' "${names[@]}" | sort -u | head -3 | tr '\n' ' ')"; return
  fi
  [[ -n "$bad" ]] && { echo "FAIL|$bad"; return; }
  if ((ran == 0)); then
    [[ -n "$skip" ]] && { echo "SKIP|$skip"; return; }
    echo "FAIL|no gtest summary: $(first_error "$LOGS/$id.$side.log")"; return
  fi
  ((ran < nr)) && { echo "FAIL|gtest summary from $ran/$nr ranks; $silent"; return; }
  ((passed == 0 && skipped > 0)) && { echo "SKIP|all $skipped tests skipped"; return; }
  echo "PASS|$( ((skipped > 0)) && echo "$skipped skipped")"
}

judge_side() {
  local side="$1" i="$2" id rc log
  id="$(row_id "$i")"; log="$LOGS/$id.$side.log"
  rc="$(cat "$WORK/tmp/$id.$side.rc" 2>/dev/null || echo 255)"
  case "$(prog_kind "${R_PROG[i]}")" in
    bench) judge_bench "$log" "$rc" "$i" ;;
    mpitest|py) judge_mpi_test "$log" "$rc" "$i" ;;
    gtest) judge_gtest "$id" "$side" "$i" ;;
  esac
}

clean_note() { tr '\t\n' '  ' <<<"$1" | tr -s ' ' | sed 's/^ //; s/ $//; s/^; //'; }

write_result() {
  local i="$1" up="$2" ours="$3" note
  note="$(clean_note "$4")"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "${R_PROG[i]}" "$(row_config "$i")" "${R_RANKS[i]}" "$up" "$ours" "$note" \
    >"$RES/$(printf '%03d' "$i").tsv"
}

# Effective timeout: --timeout, cut to what is left before --deadline (at least 30 s).
row_timeout() {
  local t="$TIMEOUT" left
  if ((DEADLINE_AT > 0)); then
    left=$((DEADLINE_AT - SECONDS))
    ((left < 30)) && left=30
    ((left < t)) && t=$left
  fi
  echo "$t"
}

run_row() {
  local i="$1" n="$2" total="$3" t0=$SECONDS kind bin t id up="" ours="" jup jours note="${R_NOTE[$1]}"
  kind="$(prog_kind "${R_PROG[i]}")"; bin="$(prog_path "${R_PROG[i]}")"; id="$(row_id "$i")"
  t="$(row_timeout)"
  if [[ "$kind" == unknown ]]; then up=ERROR ours=ERROR note+="; unknown program"
  elif [[ "$kind" == py && "$PY_STATE" != ok ]]; then
    if [[ "$PY_STATE" == "no wheels" ]]; then up=SKIP ours=SKIP; else up=ERROR ours=ERROR; fi
    note+="; $PY_STATE"
  elif [[ ! -e "$bin" ]]; then up=ERROR ours=ERROR note+="; not built (see the build logs)"
  fi
  if [[ -z "$up" ]]; then
    local skip_ours=""
    [[ "$kind" == gtest ]] && skip_ours="$(gtest_ours_skip "${R_PROG[i]}")"
    run_side upstream "$i" "$t" &
    local p1=$! p2=""
    if [[ -z "$skip_ours" ]]; then run_side ours "$i" "$t" & p2=$!; fi
    wait "$p1" ${p2:+"$p2"}
    # The note: the row's own, then each side's reason (a failure's first line, skipped tests).
    jup="$(judge_side upstream "$i")"; up="${jup%%|*}"
    [[ -n "${jup#*|}" ]] && note+="; upstream: ${jup#*|}"
    if [[ -n "$skip_ours" ]]; then
      ours=SKIP note+="; ours: $skip_ours"
    else
      jours="$(judge_side ours "$i")"; ours="${jours%%|*}"
      [[ -n "${jours#*|}" ]] && note+="; ours: ${jours#*|}"
    fi
    if [[ "$kind" == gtest && "$ours" != SKIP ]]; then
      local inc; inc="$(gtest_info_value "${R_PROG[i]}" internal)"
      [[ -n "$inc" ]] && note+="; includes NVIDIA-internal $inc, public API at run time"
    fi
    ((t < TIMEOUT)) && [[ "$note" == *timeout* ]] && note+=" (cut to ${t} s by --deadline)"
  fi
  write_result "$i" "$up" "$ours" "$note"
  printf '[%3d/%d] %-64.64s upstream %-5s ours %-5s %4d s\n' "$n" "$total" "$(row_key "$i")" "$up" "$ours" \
    $((SECONDS - t0))
}

dry_row() {
  local i="$1" side r
  echo "# row $i: $(row_key "$i")${R_NOTE[i]:+   [${R_NOTE[i]}]}   logs: $LOGS/$(row_id "$i").{upstream,ours}.log"
  for side in "${SIDES[@]}"; do
    if [[ "$(prog_kind "${R_PROG[i]}")" == gtest && "$(gtest_mode "${R_PROG[i]}")" == ranks ]]; then
      for ((r = 0; r < R_RANKS[i]; r++)); do run_cmd "$side" "$i" "$TIMEOUT" "$r"; x "${CMD[@]}"; done
    else
      run_cmd "$side" "$i" "$TIMEOUT"; x "${CMD[@]}"
    fi
  done
}

# pids of running rows -> the processes they hold (2 x ranks).
reap() {
  local pid
  for pid in "${!RUNNING[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid" 2>/dev/null
    INFLIGHT=$((INFLIGHT - RUNNING[$pid]))
    unset "RUNNING[$pid]"
  done
}

run_all() {
  setup_run || return 1
  local i n=0 total=${#SEL[@]} need
  if ((DRY)); then
    for i in "${SEL[@]}"; do dry_row "$i"; done
    return 0
  fi
  for i in "${SEL[@]}"; do
    printf '%s\t%s\t%s\t%s\t%s\n' "$i" "${R_PROG[i]}" "$(row_config "$i")" "${R_RANKS[i]}" "$(clean_note "${R_NOTE[i]}")"
  done >"$RES/selected.tsv"
  RUN_T0=$SECONDS
  DEADLINE_AT=0
  ((DEADLINE > 0)) && DEADLINE_AT=$((RUN_T0 + DEADLINE))
  declare -A RUNNING=()
  INFLIGHT=0
  echo "run: ${#SEL[@]} rows, $JOBS at a time, at most $MAX_RANKS processes, timeout $TIMEOUT s," \
    "deadline $( ((DEADLINE > 0)) && echo "$DEADLINE s" || echo none)"
  for i in "${SEL[@]}"; do
    n=$((n + 1))
    need=$((2 * R_RANKS[i]))
    while true; do
      reap
      ((${#RUNNING[@]} == 0)) && break
      ((${#RUNNING[@]} < JOBS && INFLIGHT + need <= MAX_RANKS)) && break
      sleep 0.3
    done
    if ((DEADLINE_AT > 0 && SECONDS >= DEADLINE_AT)); then
      write_result "$i" SKIP SKIP "${R_NOTE[i]:+${R_NOTE[i]}; }deadline"
      continue
    fi
    run_row "$i" "$n" "$total" &
    RUNNING[$!]=$need
    INFLIGHT=$((INFLIGHT + need))
  done
  while ((${#RUNNING[@]})); do reap; sleep 0.3; done
  echo "run: done in $((SECONDS - RUN_T0)) s; logs in $LOGS"
}

gpu_slug() {
  local n
  n="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  n="${n#NVIDIA }"
  n="$(awk '{print tolower($1)}' <<<"$n" | tr -c 'a-z0-9\n' '-')"
  echo "${n:-nogpu}"
}

report() {
  [[ -f "$RES/selected.tsv" ]] || { echo "report: no results in $RES (run phase first)"; return 1; }
  local csv="${CSV:-$ROOT/bench/results/conformance-$(gpu_slug)-$(date +%F).csv}"
  python3 "$CONF/report.py" --results "$RES" --csv "$csv" --logs "$LOGS"
}
