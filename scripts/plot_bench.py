#!/usr/bin/env python3
"""Plots ep_bench CSV files: latency and bandwidth against tokens per rank.

usage: plot_bench.py OUT.png CSV [CSV ...]      (ep_bench --plot calls it as: CSV OUT.png)

One line per (ranks, layout, hidden); the left panel shows dispatch and combine median latency,
the right panel the per-rank bandwidth by upstream ep_bench's definition.
"""
import csv
import sys
from collections import defaultdict


def main(argv):
    if len(argv) >= 3 and argv[1].endswith(".csv") and argv[2].endswith(".png"):
        csvs, out = [argv[1]], argv[2]
    elif len(argv) >= 3:
        out, csvs = argv[1], argv[2:]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_bench.py: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 1
    series = defaultdict(list)
    gpu = ""
    for path in csvs:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                gpu = row["gpu"]
                key = (int(row["ranks"]), row["layout"], int(row["hidden"]), row.get("label", ""))
                series[key].append(row)
    fig, (ax_l, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    for (ranks, layout, hidden, label), rows in sorted(series.items()):
        rows.sort(key=lambda r: int(r["tokens"]))
        if len({int(r["tokens"]) for r in rows}) < 2:
            continue
        t = [int(r["tokens"]) for r in rows]
        name = f"{ranks}r {layout} H={hidden}" + (f" {label}" if label else "")
        line = ax_l.plot(t, [float(r["dispatch_us_p50"]) for r in rows], marker="o", label=f"{name} dispatch")
        ax_l.plot(t, [float(r["combine_us_p50"]) for r in rows], marker="s", linestyle="--",
                  color=line[0].get_color(), label=f"{name} combine")
        ax_b.plot(t, [float(r["dispatch_gbs"]) for r in rows], marker="o", color=line[0].get_color(),
                  label=f"{name} dispatch")
        ax_b.plot(t, [float(r["combine_gbs"]) for r in rows], marker="s", linestyle="--",
                  color=line[0].get_color(), label=f"{name} combine")
    for ax, title, unit in ((ax_l, "latency (median)", "µs"), (ax_b, "bandwidth per rank (ep_bench definition)", "GB/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"nccl-ep-rs low-latency dispatch/combine — {gpu}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
