#!/usr/bin/env python3
"""Sums cargo test and ctest results for `make test` and prints, as the very last line,
`N passed, M failed, K skipped`. Exits 1 if anything failed.

K is every test that did not run: cargo's "ignored" (the #[ignore]d GPU tests where GPU tests are
off) and "filtered out" (a --skip), and ctest's skipped ones (exit 77, not run). The line before
the last one says how K splits. Nothing that did not run is ever counted as passed.

  --cargo LOG --cargo-rc RC   output of `cargo test` and its exit status
  --junit XML                 ctest --output-junit file
  --broken WHAT               a step that failed without counts of its own (counts as 1 failed)
  --elapsed SECONDS
"""
import argparse
import re
import sys
import xml.etree.ElementTree as ET

RESULT = re.compile(
    r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored; \d+ measured; (\d+) filtered out;"
)
# `test NAME ... ignored` or `test NAME ... ignored, REASON` (#[ignore = "REASON"])
IGNORED = re.compile(r"^test (.+?) \.\.\. ignored(?:, (.*))?$")


def cargo_counts(path, rc):
    p = f = ign = filt = 0
    failed_names = []
    reasons = {}  # ignore reason -> how many tests
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        m = RESULT.match(line.strip())
        if m:
            p, f = p + int(m[1]), f + int(m[2])
            ign, filt = ign + int(m[3]), filt + int(m[4])
            continue
        m = IGNORED.match(line.rstrip())
        if m:
            why = m[2] or "#[ignore] without a reason"
            reasons[why] = reasons.get(why, 0) + 1
        elif line.startswith("test ") and line.rstrip().endswith("... FAILED"):
            failed_names.append(line[5:].rsplit(" ... ", 1)[0])
    notes = [f"cargo: FAILED {n}" for n in failed_names]
    for why, n in sorted(reasons.items()):
        notes.append(f"cargo: {n} ignored ({why})")
    if filt:
        notes.append(f"cargo: {filt} filtered out (--skip)")
    if rc != 0 and f == 0:
        f += 1  # did not compile, or a test binary died without a result line
        notes.append(f"cargo test exited {rc} without a failing test line (build error or crash)")
    return p, f, ign + filt, notes, (ign, filt)


def junit_counts(path):
    p = f = s = 0
    notes = []
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return 0, 1, 0, [f"ctest: cannot read {path}: {e}"]
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        status = case.get("status", "")
        if case.find("failure") is not None or case.find("error") is not None or status == "fail":
            f += 1
            notes.append(f"ctest: FAILED {name}")
        elif case.find("skipped") is not None or status in ("notrun", "disabled", "skipped"):
            s += 1
            notes.append(f"ctest: skipped {name}")
        else:
            p += 1
    return p, f, s, notes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cargo")
    ap.add_argument("--cargo-rc", type=int, default=0)
    ap.add_argument("--junit")
    ap.add_argument("--broken", action="append", default=[])
    ap.add_argument("--elapsed", type=int)
    a = ap.parse_args()
    total = [0, 0, 0]
    notes = []
    parts = []
    skipped_parts = []
    if a.cargo:
        c = cargo_counts(a.cargo, a.cargo_rc)
        ign, filt = c[4]
        parts.append(f"cargo test {c[0]} ok / {c[1]} failed / {ign} ignored / {filt} filtered out")
        notes += c[3]
        total = [x + y for x, y in zip(total, c[:3])]
        if ign:
            skipped_parts.append(f"{ign} ignored by cargo test")
        if filt:
            skipped_parts.append(f"{filt} filtered out by cargo test")
    if a.junit:
        j = junit_counts(a.junit)
        parts.append(f"ctest {j[0]} ok / {j[1]} failed / {j[2]} skipped")
        notes += j[3]
        total = [x + y for x, y in zip(total, j[:3])]
        if j[2]:
            skipped_parts.append(f"{j[2]} skipped by ctest")
    for b in a.broken:
        notes.append(f"FAILED step: {b}")
        total[1] += 1
    if not a.cargo and not a.junit and not a.broken:
        notes.append("no test ran")
        total[1] += 1
    for n in notes:
        print(n)
    if parts:
        print("breakdown: " + "; ".join(parts) + (f"; {a.elapsed} s" if a.elapsed is not None else ""))
    if total[2]:
        print(f"skipped (did not run; never counted as passed): {total[2]} = " + " + ".join(skipped_parts))
    line = f"{total[0]} passed, {total[1]} failed"
    if total[2]:
        line += f", {total[2]} skipped"
    print(line)
    return 1 if total[1] else 0


if __name__ == "__main__":
    sys.exit(main())
