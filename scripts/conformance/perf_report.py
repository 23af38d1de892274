#!/usr/bin/env python3
"""Turns the perf phase's ep_bench logs (scripts/conformance/perf.sh) into the vs-upstream files.

- CSV (the issue-15 header): mode,layout,tokens,hidden,topk,experts,ranks,phase,upstream_us,ours_us,ratio
  with kernel-only times (CUPTI, as ep_bench prints them), the median over the runs of each
  library, ratio = ours / upstream.
- <csv stem>-detail.csv: per library, the median kernel and host-observed times, the EP-induced
  memory ep_bench reports (rank 0), how many runs gave a number, and the failed runs.
- <csv stem>-recipes.csv: the dispatch recipes at the LL anchor (perf.sh: plain bf16, ds-fp8,
  mxfp8; dispatch only), header mode,layout,tokens,hidden,topk,experts,ranks,recipe,phase,
  upstream_us,ours_us,ratio.
- <csv stem>-remote.csv for the forced-remote rows (recipe tag "remote-<R>n<K>": R processes on
  one GPU, NCCL_EP_NODE_SIZE=K, over NCCL's sockets), header
  mode,layout,tokens,hidden,topk,experts,ranks,node_size,phase,upstream_kernel_us,ours_kernel_us,
  upstream_host_us,ours_host_us,host_ratio. The host-observed time is the measure here: our EP
  kernels do not wait for remote peers (NCCL's own kernels carry that traffic and CUPTI's EP kernel
  time leaves them out), while NVIDIA's kernel spins until its time-sliced peers have run, so the
  kernel columns compare different things (an empty time: no run gave one; -detail.csv says why).
- <csv stem>-baseline.csv when the runs include a "baseline" library (--perf-baseline, an older
  build of ours): ours against it per row and phase, ratio = ours / baseline.
- <csv stem>-host.csv: the host time of one call (perf.sh preloads scripts/conformance/host_timer.c,
  a CPU clock around each ncclEpDispatch / ncclEpCombine / ncclEpComplete inside ep_bench), the
  median over runs of each run's median over the warmup calls (CUPTI off: what a caller sees),
  header mode,layout,tokens,hidden,recipe,fn,upstream_call_us,ours_call_us,ratio; with several
  processes, the median over the processes of a run.
- <csv stem>.png when matplotlib is there: the ratio per row, dispatch and combine.
- A Markdown table on stdout (README's performance table is made from it).

What a "phase" time is: LL prints one kernel-only time per phase. HT prints the dispatch kernel and,
separately, a "DispatchEpilogue" (NVIDIA's expert-major permute kernels) and, for combine, a
"CombinePrologue"; the HT phase time here is kernel + epilogue (dispatch) and kernel + prologue
(combine), so that work a library does in an extra kernel still counts. A kernel time of 0.00 means
ep_bench found no kernel with the name it looks for; it is reported as missing, never as 0.
"""
import argparse
import csv
import os
import re
import statistics
import sys

NUM = r"([-+]?[0-9]+(?:\.[0-9]+)?)"
CALL_FNS = ("dispatch", "combine", "complete")


def section(text, title):
    """The lines after a '--- title ---' line up to the next '---' or '===' line."""
    i = text.find(title)
    if i < 0:
        return ""
    rest = text[i + len(title):]
    m = re.search(r"\n(---|===)", rest)
    return rest[: m.start()] if m else rest


def grab(text, pattern):
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def parse_log(path, mode):
    """{dispatch_kernel, combine_kernel, dispatch_host, combine_host, mem_mb}; None where absent."""
    try:
        text = open(path, errors="replace").read()
    except OSError:
        return {}
    out = {"mem_mb": grab(text, r"EP-induced delta:\s+" + NUM + r" MB")}
    if mode == "ll":
        host = section(text, "--- Host-observed performance ---")
        kern = section(text, "--- Kernel-only performance ---")
        out["dispatch_host"] = grab(host, r"Dispatch:\s+avg=" + NUM)
        out["combine_host"] = grab(host, r"Combine:\s+avg=" + NUM)
        out["dispatch_kernel"] = grab(kern, r"Dispatch:\s+avg=" + NUM)
        out["combine_kernel"] = grab(kern, r"Combine:\s+avg=" + NUM)
    else:
        host = section(text, "--- BW based on total time ---")
        kern = section(text, "--- BW based on kernel time ---")
        out["dispatch_host"] = grab(host, r"Dispatch:\s+total=" + NUM)
        out["combine_host"] = grab(host, r"Combine:\s+total=" + NUM)
        dk = grab(kern, r"Dispatch:\s+kernel=" + NUM)
        ck = grab(kern, r"Combine:\s+kernel=" + NUM)
        epi = grab(kern, r"DispatchEpilogue:\s+kernel=" + NUM) or 0.0
        pro = grab(kern, r"CombinePrologue:\s+kernel=" + NUM) or 0.0
        out["dispatch_kernel"] = dk + epi if dk else None
        out["combine_kernel"] = ck + pro if ck else None
    calls = {}
    for m in re.finditer(r"ep-host-timer pid=\d+ fn=ncclEp(\w+) window=(?:warm|all) n=\d+ p10_us=" + NUM
                         + r" p50_us=" + NUM, text):
        calls.setdefault(m.group(1).lower(), []).append(float(m.group(3)))
    for fn in CALL_FNS:
        out[f"{fn}_call"] = median(calls.get(fn, []))
    for k in ("dispatch_kernel", "combine_kernel"):
        if out.get(k) is not None and out[k] <= 0.0:
            out[k] = None
    return out


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def fmt(x, nd=2):
    return "" if x is None else f"{x:.{nd}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True, help="runs.tsv of the perf phase")
    ap.add_argument("--logs", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=1)
    a = ap.parse_args()

    # (mode, layout, tokens, hidden) -> side -> list of parsed runs; failures kept for the detail.
    runs, order, failed = {}, [], {}
    for row in csv.reader(open(a.runs), delimiter="\t"):
        if len(row) < 8:
            continue
        mode, layout, tokens, hidden, side, _run, rc, log = row[:8]
        recipe = row[8] if len(row) > 8 else ""
        key = (mode, layout, int(tokens), int(hidden), recipe)
        if key not in runs:
            runs[key] = {"upstream": [], "ours": [], "baseline": []}
            order.append(key)
        parsed = parse_log(os.path.join(a.logs, log), mode)
        if rc != "0" or parsed.get("dispatch_kernel") is None:
            failed.setdefault((key, side), []).append(f"{log}: exit {rc}")
        if rc == "0":
            runs[key][side].append(parsed)

    stem = a.csv[:-4] if a.csv.endswith(".csv") else a.csv
    os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
    main_rows, detail_rows, recipe_rows, base_rows, remote_rows, host_rows = [], [], [], [], [], []
    for key in order:
        mode, layout, tokens, hidden, recipe = key
        rm = re.fullmatch(r"remote-([0-9]+)n([0-9]+)", recipe)
        ranks = int(rm.group(1)) if rm else a.ranks
        med = {s: {f: median([r.get(f) for r in runs[key][s]]) for f in
                   ("dispatch_kernel", "combine_kernel", "dispatch_host", "combine_host", "mem_mb",
                    "dispatch_call", "combine_call", "complete_call")}
               for s in ("upstream", "ours", "baseline")}
        for fn in CALL_FNS:
            uc, oc = med["upstream"][f"{fn}_call"], med["ours"][f"{fn}_call"]
            if uc is not None or oc is not None:
                host_rows.append([mode, layout, tokens, hidden, recipe or "none", fn, fmt(uc), fmt(oc),
                                  fmt(oc / uc if uc and oc else None, 3)])
        for phase in ("dispatch",) if recipe and not rm else ("dispatch", "combine"):
            up, ours = med["upstream"][f"{phase}_kernel"], med["ours"][f"{phase}_kernel"]
            ratio = ours / up if up and ours else None
            row = [mode, layout, tokens, hidden, a.topk, a.experts, ranks, phase, fmt(up), fmt(ours), fmt(ratio, 3)]
            if rm:
                uh, oh = med["upstream"][f"{phase}_host"], med["ours"][f"{phase}_host"]
                remote_rows.append(row[:7] + [int(rm.group(2)), phase, fmt(up), fmt(ours), fmt(uh), fmt(oh),
                                              fmt(oh / uh if uh and oh else None, 3)])
            elif recipe:
                recipe_rows.append(row[:7] + [recipe] + row[7:])
            else:
                main_rows.append(row)
            base = med["baseline"][f"{phase}_kernel"]
            if runs[key]["baseline"]:
                r = ours / base if base and ours else None
                base_rows.append([mode, layout, tokens, hidden, recipe or "none", phase, fmt(base), fmt(ours), fmt(r, 3)])
        for s in ("upstream", "ours", "baseline"):
            if s == "baseline" and not runs[key][s] and (key, s) not in failed:
                continue
            m = med[s]
            detail_rows.append([mode, layout, tokens, hidden, a.topk, a.experts, ranks, recipe or "none", s,
                                fmt(m["dispatch_kernel"]), fmt(m["combine_kernel"]),
                                fmt(m["dispatch_host"]), fmt(m["combine_host"]), fmt(m["mem_mb"]),
                                fmt(m["dispatch_call"]), fmt(m["combine_call"]), fmt(m["complete_call"]),
                                len([r for r in runs[key][s] if r.get("dispatch_kernel") is not None]),
                                "; ".join(failed.get((key, s), []))])

    write_csv(a.csv, ["mode", "layout", "tokens", "hidden", "topk", "experts", "ranks", "phase",
                      "upstream_us", "ours_us", "ratio"], main_rows)
    write_csv(stem + "-detail.csv", ["mode", "layout", "tokens", "hidden", "topk", "experts", "ranks", "recipe",
                                     "library", "dispatch_kernel_us", "combine_kernel_us", "dispatch_host_us",
                                     "combine_host_us", "ep_memory_mb", "dispatch_call_us", "combine_call_us",
                                     "complete_call_us", "runs_with_times", "failed_runs"], detail_rows)
    if host_rows:
        write_csv(stem + "-host.csv", ["mode", "layout", "tokens", "hidden", "recipe", "fn", "upstream_call_us",
                                       "ours_call_us", "ratio"], host_rows)

    if recipe_rows:
        write_csv(stem + "-recipes.csv", ["mode", "layout", "tokens", "hidden", "topk", "experts", "ranks", "recipe",
                                          "phase", "upstream_us", "ours_us", "ratio"], recipe_rows)

    if remote_rows:
        write_csv(stem + "-remote.csv", ["mode", "layout", "tokens", "hidden", "topk", "experts", "ranks", "node_size",
                                         "phase", "upstream_kernel_us", "ours_kernel_us", "upstream_host_us",
                                         "ours_host_us", "host_ratio"], remote_rows)

    if base_rows:
        write_csv(stem + "-baseline.csv",
                  ["mode", "layout", "tokens", "hidden", "recipe", "phase", "baseline_us", "ours_us", "ratio"], base_rows)
        print("| mode | layout | tokens | hidden | recipe | phase | baseline µs | ours µs | ours / baseline |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in base_rows:
            print("| " + " | ".join(str(v) for v in r) + " |")
        print()

    # Markdown table: one line per configuration.
    print("| mode | layout | tokens | hidden | dispatch up µs | ours | ratio | combine up µs | ours | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i in range(0, len(main_rows), 2):
        d, c = main_rows[i], main_rows[i + 1]
        print(f"| {d[0]} | {d[1]} | {d[2]} | {d[3]} | {d[8]} | {d[9]} | {d[10]} | {c[8]} | {c[9]} | {c[10]} |")
    if remote_rows:
        print("\n| mode | layout | tokens | ranks | node size | phase | host-observed upstream µs | ours µs | ratio |"
              " kernel upstream µs | ours µs |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in remote_rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[6]} | {r[7]} | {r[8]} | {r[11]} | {r[12]} | {r[13]} | {r[9]} | {r[10]} |")
    if recipe_rows:
        print("\n| layout | recipe (dispatch only) | upstream µs | ours µs | ratio |")
        print("|---|---|---|---|---|")
        for r in recipe_rows:
            print(f"| {r[1]} | {r[7]} | {r[9]} | {r[10]} | {r[11]} |")
    if host_rows:
        print("\n| mode | layout | tokens | hidden | recipe | call | upstream host µs | ours µs | ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in host_rows:
            print("| " + " | ".join(str(v) for v in r) + " |")
        ours_d = [float(r[7]) for r in host_rows if r[5] == "dispatch" and r[7]]
        if ours_d:
            print(f"\nours, host time per ncclEpDispatch: median {statistics.median(ours_d):.2f} µs, "
                  f"worst {max(ours_d):.2f} µs over {len(ours_d)} configurations")
    ratios = [float(r[10]) for r in main_rows if r[10]]
    if ratios:
        print(f"\n{len(ratios)} ratios: median {statistics.median(ratios):.3f}, worst {max(ratios):.3f}")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("perf report: no matplotlib, no PNG", file=sys.stderr)
        return 0
    labels = [f"{k[0]} {k[1]} t{k[2]} h{k[3]}" for k in order if not k[4]]
    disp = [float(r[10]) if r[10] else float("nan") for r in main_rows[0::2]]
    comb = [float(r[10]) if r[10] else float("nan") for r in main_rows[1::2]]
    fig, ax = plt.subplots(figsize=(max(8, 0.32 * len(labels)), 4.5))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], disp, 0.4, label="dispatch")
    ax.bar([x + 0.2 for x in xs], comb, 0.4, label="combine")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.8, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("ours / NVIDIA (kernel time)")
    ax.set_title("NVIDIA ep_bench, kernel-only time, ours / NVIDIA's library (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
