#!/usr/bin/env python3
"""The conformance report (scripts/conformance.sh, report phase; Python 3 standard library only).

Reads WORK/results: selected.tsv (every selected row, in priority order) and NNN.tsv (one per row
that finished: index, program, config, ranks, upstream, ours, note). Writes the CSV with exactly
the header program,config,ranks,upstream,ours,note, prints one table and the summary line

    conformance: N rows, M where upstream PASS and ours not

and exits 1 when one of those M is FAIL or ERROR (ours SKIP: NVIDIA-internal tests). A selected row without a result (the run was stopped) reads ERROR/ERROR.
"""

import argparse
import csv
import os
import sys

STATUSES = ("PASS", "FAIL", "SKIP", "ERROR")
HEADER = ["program", "config", "ranks", "upstream", "ours", "note"]


def read_tsv(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def load(results):
    rows = []
    for sel in read_tsv(os.path.join(results, "selected.tsv")):
        idx, program, config, ranks = sel[:4]
        note = sel[4] if len(sel) > 4 else ""
        path = os.path.join(results, "%03d.tsv" % int(idx))
        if os.path.exists(path):
            got = read_tsv(path)[0]
            got += [""] * (7 - len(got))
            _, program, config, ranks, up, ours, note = got[:7]
        else:
            up, ours = "ERROR", "ERROR"
            note = "; ".join(x for x in (note, "no result: the run stopped before this row ended") if x)
        for status in (up, ours):
            if status not in STATUSES:
                raise SystemExit("report: bad status %r in row %s" % (status, idx))
        rows.append({"idx": int(idx), "program": program, "config": config, "ranks": ranks,
                     "upstream": up, "ours": ours, "note": note})
    return rows


def table(rows):
    cols = HEADER
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    width["config"] = min(width["config"], 70)
    width["program"] = min(width["program"], 26)
    line = "  ".join("%-*s" % (width[c], c) for c in cols[:-1]) + "  note"
    out = [line, "-" * min(len(line) + 40, 200)]
    for r in rows:
        cells = []
        for c in cols[:-1]:
            v = str(r[c])
            if len(v) > width[c]:
                v = v[: width[c] - 1] + "~"
            cells.append("%-*s" % (width[c], v))
        out.append("  ".join(cells) + "  " + r["note"])
    return "\n".join(out)


def counts(rows, side):
    return ", ".join("%d %s" % (sum(r[side] == s for r in rows), s) for s in STATUSES
                     if any(r[side] == s for r in rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--logs", default="")
    a = ap.parse_args()
    rows = load(a.results)
    os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
    with open(a.csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        for r in rows:
            w.writerow([r[c] for c in HEADER])
    print(table(rows))
    print()
    regress = [r for r in rows if r["upstream"] == "PASS" and r["ours"] != "PASS"]
    print("upstream: %s; ours: %s" % (counts(rows, "upstream"), counts(rows, "ours")))
    ranks = sorted({int(r["ranks"]) for r in rows})
    print("ranks covered: %s; csv: %s%s" % (", ".join(map(str, ranks)), a.csv,
                                             "; logs: " + a.logs if a.logs else ""))
    for r in regress:
        print("  upstream PASS, ours %s: %s r%s %s" % (r["ours"], r["program"], r["ranks"], r["config"]))
    # Ours SKIP where upstream passes is by design for NVIDIA's internal tests (the note says
    # which internal symbols they need); the exit status counts only FAIL and ERROR.
    failing = [r for r in regress if r["ours"] in ("FAIL", "ERROR")]
    detail = ""
    if regress:
        detail = " (%d FAIL or ERROR, %d SKIP)" % (len(failing), len(regress) - len(failing))
    print("conformance: %d rows, %d where upstream PASS and ours not%s" % (len(rows), len(regress), detail))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
