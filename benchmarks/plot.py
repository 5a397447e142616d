"""Plots of benchmark results (matplotlib, Agg): regenerate them from a results JSON.

    python benchmarks/plot.py benchmarks/results/latest_cpu.json [--out-dir DIR]

bench_ops runs give `<stem>_time_vs_N.png` (op time against N, one line per backend
and dtype, one panel per op and mode) and `<stem>_memory_vs_N.png`; bench_models runs
give `<stem>_throughput.png` (images/s bars) and `<stem>_memory.png` (peak memory bars).
Every title carries the device label ("CPU" for CPU runs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from refiner import cli  # noqa: E402


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception as e:  # the GPU machine may lack matplotlib: JSON and tables still come out
        print(f"plots skipped: matplotlib unavailable ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _title(run: dict, what: str) -> str:
    m = run["meta"]
    dev = "CPU" if m["device"] == "cpu" else m["device_name"]
    return f"{what} [{dev}] torch {m['torch']}, {m['timestamp'][:10]}, {m['git_commit'][:8]}"


def _save(plt, fig, run: dict, what: str, stem: Path, suffix: str) -> Path:
    """Title, lay out, write `<stem>_<suffix>.png` and close the figure."""
    fig.suptitle(_title(run, what), fontsize=10)
    fig.tight_layout()
    path = Path(f"{stem}_{suffix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ops(run: dict, stem: Path) -> List[Path]:
    plt = _plt()
    if plt is None:
        return []
    rows = [r for r in run["rows"] if r["status"] == "ok"]
    panels = sorted({(r["op"], r["mode"]) for r in rows if r["op"] != "sdpa"})
    if not panels:
        return []
    H0, d0 = rows[0]["H"], rows[0]["d"]  # one (H, d) per figure: the first of the grid
    out = []
    for metric, ylabel, suffix in (("time_ms", "median time (ms)", "time_vs_N"),
                                   ("peak_mem_mib", "peak memory (MiB)", "memory_vs_N")):
        n = len(panels)
        cols = min(2, n)
        nrows = (n + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.8 * nrows), squeeze=False)
        styles = {"fp32": "-", "bf16": "--", "fp16": ":"}
        for ax, (op, mode) in zip(axes.flat, panels):
            sel = [r for r in rows if r["H"] == H0 and r["d"] == d0 and r["mode"] == mode
                   and r["op"] in (op, "sdpa") and r.get(metric) is not None]
            for (be, dt) in sorted({(r["backend"] if r["op"] != "sdpa" else "SDPA", r["dtype"]) for r in sel}):
                pts = sorted((r["N"], r[metric]) for r in sel
                             if (r["backend"] if r["op"] != "sdpa" else "SDPA") == be and r["dtype"] == dt)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(dt, "-"), marker="o",
                        label=f"{be} {dt}")
            B = sel[0]["B"] if sel else "?"
            ax.set_title(f"{op} {mode} (B={B}, H={H0}, d={d0})", fontsize=9)
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        out.append(_save(plt, fig, run, "Refiner ops", stem, suffix))
    return out


def plot_models(run: dict, stem: Path) -> List[Path]:
    plt = _plt()
    if plt is None:
        return []
    rows = [r for r in run["rows"] if r["status"] == "ok"]
    if not rows:
        return []
    out = []
    for metric, ylabel, suffix in (("images_per_s", "images/s", "throughput"),
                                   ("peak_mem_mib", "peak memory (MiB)", "memory")):
        groups = sorted({(r["img"], r["mode"]) for r in rows})
        fig, axes = plt.subplots(1, len(groups), figsize=(max(6.0, 0.55 * len(rows) + 3), 4.8), squeeze=False)
        for ax, (img, mode) in zip(axes.flat, groups):
            sel = [r for r in rows if r["img"] == img and r["mode"] == mode]
            names = [f"{r['model'].replace('refiner_vit_', 'refiner-').replace('vit_', 'vit-')}\n{r['variant']}"
                     for r in sel]
            vals = [r.get(metric) or 0.0 for r in sel]
            colors = ["tab:green" if r["variant"].startswith("fused") else
                      "tab:blue" if r["variant"].startswith("reference") else "tab:gray" for r in sel]
            ax.bar(range(len(sel)), vals, color=colors)
            ax.set_xticks(range(len(sel)))
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{mode}, {img} px, batch {sel[0]['batch']}", fontsize=9)
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y", alpha=0.3)
        out.append(_save(plt, fig, run, "Models", stem, suffix))
    return out


def plot_run(run: dict, stem: Path) -> List[Path]:
    """The plots of one run (bench_ops or bench_models), written as `<stem>_*.png`."""
    kind = run["meta"]["script"]
    return plot_ops(run, stem) if kind == "bench_ops" else plot_models(run, stem)


def main(argv=None) -> List[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=cli.existing_file, help="a results JSON (one run, or a merged latest_<device>.json)")
    p.add_argument("--out-dir", type=cli.output_dir, default=None, help="default: next to the JSON")
    args = p.parse_args(argv)
    args.json = Path(args.json)
    args.out_dir = Path(args.out_dir) if args.out_dir else None
    try:
        runs = C.load_runs(args.json)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        p.error(f"json: {args.json} is not a readable results JSON ({e})")
    if not runs or not all(isinstance(r.get("meta"), dict) and isinstance(r["rows"], list) for r in runs):
        # else: no plots and no word why, or a KeyError deep in a plot
        p.error(f"json: {args.json} holds no benchmark run (expected 'meta' and 'rows', as bench_ops.py and "
                f"bench_models.py write)")
    out = []
    for run in runs:
        stem_name = Path(run.get("file", args.json.name)).stem
        stem = (args.out_dir or args.json.parent) / stem_name
        stem.parent.mkdir(parents=True, exist_ok=True)
        for png in plot_run(run, stem):
            print(png)
            out.append(png)
    return out


if __name__ == "__main__":
    main()
