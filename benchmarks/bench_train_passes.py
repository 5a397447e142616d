"""Where Triton's refine_train spends a forward+backward: the time of each of its passes.

    python benchmarks/bench_train_passes.py                 # GPU: B=32, H=12, N=197 577, d=32, bf16
    TRITON_INTERPRET=1 python benchmarks/bench_train_passes.py --device cpu   # a smoke run, B=1, N=13
    python benchmarks/bench_train_passes.py --env REFINER_TRITON_TRAIN_DOT=ieee

Each pass (kernels_refine_train: F1-F6 in the forward, B0-B4 in the backward, one row per pass
name) is timed by CUDA events around its launches (kernels_refine_train.PASS_TIMER), summed over
its calls in one forward+backward, median over the timed repeats; "host and small ops" is the
step's total (events around the whole call) less the passes: the float64 statistics, the packing
of the per-channel constants, the allocations. On the CPU (interpreter) the times are wall-clock
and only the table's shape means anything.
Writes bench_train_passes_<device>_<UTC time>.json under benchmarks/results (and latest_<device>.json).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from benchmarks.bench_ops import Case  # noqa: E402

import torch  # noqa: E402

from refiner import cli  # noqa: E402

TOTAL = "total (forward+backward)"
HOST = "host and small ops"


class _Timer:
    """PASS_TIMER: CUDA events (GPU) or wall-clock (CPU) around each pass, by label."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, label: str):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.spans[label].append((a, b))
        else:
            t = time.perf_counter()
            yield
            self.spans[label].append(time.perf_counter() - t)

    def collect(self) -> dict:
        """ms per label, summed over its spans since the last collect."""
        if self.cuda:
            torch.cuda.synchronize()
            out = {k: sum(a.elapsed_time(b) for a, b in v) for k, v in self.spans.items()}
        else:
            out = {k: 1e3 * sum(v) for k, v in self.spans.items()}
        self.spans.clear()
        return out


def time_passes(case: Case, device: torch.device, repeats: int, warmup: int) -> dict:
    """{pass label: median ms per forward+backward}, with TOTAL and HOST."""
    from refiner_kernels import kernels_refine_train as T
    step = case.fn("refine_train", "fwd+bwd", "triton")
    timer = _Timer(device)
    for _ in range(warmup):  # compile and autotune untimed
        step()
    runs = []
    before = T.PASS_TIMER
    T.PASS_TIMER = timer
    try:
        for _ in range(repeats):
            timer.collect()
            with timer(TOTAL):
                step()
            runs.append(timer.collect())
    finally:
        T.PASS_TIMER = before
    labels = sorted({k for r in runs for k in r if k != TOTAL})
    med = {k.removeprefix(T.PROFILE_PREFIX): statistics.median(r.get(k, 0.0) for r in runs) for k in labels}
    med[TOTAL] = statistics.median(r[TOTAL] for r in runs)
    med[HOST] = statistics.median(r[TOTAL] - sum(v for k, v in r.items() if k != TOTAL) for r in runs)
    return med


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", type=cli.device_or_auto, help="auto | cpu | cuda")
    p.add_argument("--batch", type=cli.positive_int, default=None, help="B (default: 32 on GPU, 1 on CPU)")
    p.add_argument("--n", type=cli.positive_int, nargs="+", default=None, help="N (default: 197 577 on GPU, 13 on CPU)")
    p.add_argument("--heads", type=cli.positive_int, default=12)
    p.add_argument("--head-dim", type=cli.positive_int, default=32)
    p.add_argument("--dtype", choices=sorted(C.DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--env", nargs="+", default=[], metavar="NAME=VALUE",
                   help="environment settings for the whole run (e.g. REFINER_TRITON_TRAIN_DOT=ieee)")
    p.add_argument("--repeats", type=cli.positive_int, default=None, help="timed steps (default: 10 GPU, 1 CPU)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=None, help="untimed steps (default: 3 GPU, 1 CPU)")
    p.add_argument("--out", type=cli.output_dir, default=None, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = C.pick_device(args.device)
    gpu = device.type == "cuda"
    for assign in args.env:
        name, sep, value = assign.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env: expected NAME=VALUE, got {assign!r}")
        os.environ[name] = value
    import refiner_kernels as rk
    if not rk.AVAILABLE:
        raise SystemExit(f"bench_train_passes: no Triton backend: {rk.UNAVAILABLE_REASON}")
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench_train_passes: on the CPU, run with TRITON_INTERPRET=1 (a smoke run)")
    B = args.batch or (32 if gpu else 1)
    dtype = C.DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    repeats, warmup = args.repeats or (10 if gpu else 1), args.warmup if args.warmup is not None else (3 if gpu else 1)
    meta = C.run_metadata(device, "bench_train_passes", vars(args))
    meta["env"] = {k: v for k, v in os.environ.items() if k.startswith("REFINER_")}
    rows = []
    for N in args.n or ([197, 577] if gpu else [13]):
        case = Case(B, args.heads, N, args.head_dim, dtype, device)
        med = time_passes(case, device, repeats, warmup)
        total = med[TOTAL]
        for name, ms in med.items():
            rows.append(dict(B=B, H=args.heads, N=N, d=args.head_dim, dtype=args.dtype or ("bf16" if gpu else "fp32"),
                             part=name, ms=ms, share=ms / total if total else None))
        del case
    print(f"[{C.device_label(device)}] refine_train (Triton) forward+backward by pass, median of {repeats} "
          f"(env: {meta['env'] or 'defaults'})")
    print(C.format_table([[r["N"], r["part"], C.fmt(r["ms"], ".3f"), C.fmt(100 * r["share"], ".1f")] for r in rows],
                         ["N", "pass", "ms", "%"]))
    doc = {"meta": meta, "rows": rows, "targets": []}
    path, latest = C.write_results(doc, args.out, device)
    print(f"\nresults: {path}\n         {latest}")
    return doc


if __name__ == "__main__":
    main()
