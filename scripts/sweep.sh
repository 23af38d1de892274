#!/usr/bin/env bash
# The issue-4 sweep on a GPU machine: anchor rows for 1 and 8 local ranks (both layouts, eager
# and graph), then tokens per rank 1..256 at H=7168 and hidden 2048..8192 at 128 tokens.
# Writes one CSV ($OUT or build/sweep)/sweep.csv; needs build/bench/ep_bench (scripts/bench.sh).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
B="$ROOT/build/bench/ep_bench"
OUTDIR="${OUT:-$ROOT/build/sweep}"
mkdir -p "$OUTDIR/parts"
COMMON=(--algorithm ll --top-k 8 --experts 256 --warmup 10 --iters 50)
n=0
run() { n=$((n + 1)); timeout 120 "$B" "${COMMON[@]}" "$@" --csv "$OUTDIR/parts/$n.csv" >>"$OUTDIR/sweep.log" 2>&1 || echo "failed: $*"; }
for ranks in 1 8; do
  for lay in em rm; do
    run --local-ranks $ranks --layout $lay --tokens 128 --hidden 7168 --label anchor
    run --local-ranks $ranks --layout $lay --tokens 128 --hidden 7168 --graph --label anchor-graph
    run --local-ranks $ranks --layout $lay --hidden 7168 --sweep-tokens 1,2,4,8,16,32,64,128,256 --label tokens
    run --local-ranks $ranks --layout $lay --tokens 128 --sweep-hidden 2048,4096,6144,7168,8192 --label hidden
  done
done
head -1 "$OUTDIR/parts/1.csv" >"$OUTDIR/sweep.csv"
for f in $(ls "$OUTDIR"/parts/*.csv | sort -V); do tail -n +2 "$f" >>"$OUTDIR/sweep.csv"; done
rm -rf "$OUTDIR/parts"
grep -E '^#|^ +[0-9]' "$OUTDIR/sweep.log" | grep -v '^#' | head -60 >/dev/null
awk -F, 'NR>1 && ($2=="anchor" || $2=="anchor-graph") {printf "%-13s %dr %s disp %7.2f us comb %7.2f us  disp %6.1f GB/s comb %6.1f GB/s  host %5.2f us  buf %5.1f MiB  ratio %.3f %.3f\n", $2, $3, $5, $13, $16, $20, $21, $24, $25, $29, $30}' "$OUTDIR/sweep.csv"
