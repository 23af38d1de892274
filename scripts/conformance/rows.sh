# shellcheck shell=bash
# Sourced by scripts/conformance.sh: reads rows.txt into arrays, applies --only.
# Row i: R_PROG[i] R_RANKS[i] R_ARGS[i] ("" for none) R_NOTE[i] R_ENV[i]; SEL: selected indices
# in file order (= priority order).

trim() { local s="$1"; s="${s#"${s%%[![:space:]]*}"}"; printf '%s' "${s%"${s##*[![:space:]]}"}"; }

# The key --only matches and the logs are named after: "PROGRAM rRANKS ARGS".
row_key() { local i="$1"; printf '%s r%s%s' "${R_PROG[i]}" "${R_RANKS[i]}" "${R_ARGS[i]:+ ${R_ARGS[i]}}"; }

# A file-name-safe form of the key, prefixed by the row number: 007-ep_bench-r1-algorithm-ll-...
row_id() {
  local i="$1" s
  s="$(row_key "$i" | tr -c 'A-Za-z0-9_.\n' '-' | tr -s '-')"
  s="${s%-}"
  printf '%03d-%s' "$i" "${s:0:100}"
}

load_rows() {
  local file="$1" line prog ranks args note env n=0 bad=0
  R_PROG=() R_RANKS=() R_ARGS=() R_NOTE=() R_ENV=() SEL=()
  while IFS= read -r line || [[ -n "$line" ]]; do
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    IFS='|' read -r prog ranks args note env <<<"$line"
    prog="$(trim "$prog")" ranks="$(trim "$ranks")" args="$(trim "$args")"
    note="$(trim "$note")" env="$(trim "${env:-}")"
    [[ "$args" == "-" ]] && args=""
    if [[ -z "$prog" || ! "$ranks" =~ ^[1-9][0-9]*$ ]]; then
      echo "rows.txt: bad row: $line" >&2; bad=1; continue
    fi
    n=$((n + 1))
    R_PROG[n]="$prog" R_RANKS[n]="$ranks" R_ARGS[n]="$args" R_NOTE[n]="$note" R_ENV[n]="$env"
    if [[ -z "$ONLY" ]] || [[ "$(row_key "$n")" =~ $ONLY ]]; then SEL+=("$n"); fi
  done <"$file"
  ROWS_TOTAL=$n
  ((bad == 0)) || return 1
  ((${#SEL[@]} > 0)) || { echo "conformance: no row matches --only '$ONLY'" >&2; return 1; }
}

list_rows() {
  local i
  echo "${#SEL[@]} of $ROWS_TOTAL rows selected (ep_bench rows add: $EP_BENCH_COMMON)"
  for i in "${SEL[@]}"; do
    printf '%3d  %s%s%s\n' "$i" "$(row_key "$i")" "${R_NOTE[i]:+   [${R_NOTE[i]}]}" \
      "${R_ENV[i]:+   {${R_ENV[i]}\}}"
  done
}
