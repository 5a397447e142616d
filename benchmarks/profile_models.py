"""Where the time goes: torch.profiler over Refiner-ViT inference and training steps.

    python benchmarks/profile_models.py                  # GPU: refiner_vit_s, 224 px, batch 256, bf16 autocast
    python benchmarks/profile_models.py --device cpu     # CPU: batch 2, fp32
    python benchmarks/profile_models.py --fused-backends cuda --batch 64 --modes infer

For each variant (fused[<backend>] for every usable backend, reference eager) and mode (infer:
eval forward; train: forward, cross-entropy, backward, AdamW step), after warm-up steps, a few
steps are profiled. Op-level accounting: the self time of every operator (on a GPU, the device
time of the kernels it launched itself; on CPU, its own CPU time), so the shares add up to the
step. Reported per step: the profiled total, the inclusive time of each refiner op (compiled
`refiner::*` and Triton `refiner_triton::*`) and their share, within the Triton refine_train the
time of each of its passes (profiler ranges), and the top operators by self time.
Profiling adds overhead: these are shares, not throughput (that is bench_models.py).
Writes profile_models_<device>_<UTC time>.json under benchmarks/results (and latest_<device>.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_models  # noqa: E402
from benchmarks import common as C  # noqa: E402

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from refiner import cli  # noqa: E402

REFINER_OPS = ("refiner::", "refiner_triton::")
PASSES = "refine_train pass "  # = refiner_kernels.kernels_refine_train.PROFILE_PREFIX (a test reads one with the other)


def _self_time(e, on_gpu: bool) -> float:  # microseconds
    if on_gpu:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return e.self_cpu_time_total


def _total_time(e, on_gpu: bool) -> float:
    if on_gpu:
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
    return e.cpu_time_total


def op_label(key: str) -> str:
    """The profiler's name of an operator, made plain where it misleads. A custom op with registered
    autograd runs its forward inside an autograd.Function whose range is named after the Function
    class, "GeneratedBackwardFor_<ns>_<op>_default", in the forward; the backward node's own range
    ends in "Backward". Kernels launched outside any ATen op (Triton's) count as that range's self
    time: on the H100 (round 3) the Triton refine_train forward's 61 ms per step looked like
    backward time under that name."""
    prefix = "GeneratedBackwardFor_"
    if key.startswith(prefix) and not key.endswith("Backward"):
        return f"fwd of {key[len(prefix):]} (Function)"
    return key


def summarize(events, on_gpu: bool, steps: int, top: int) -> Dict:
    """Per-step times (ms) from profiler key averages: the operators (CPU-side events) only, so that
    a kernel is counted once, under the operator that launched it."""
    ops = [e for e in events if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]
    total = sum(_self_time(e, on_gpu) for e in ops) / 1e3 / steps
    # inclusive times; no refiner op calls another through the dispatcher, so they add up
    refiner_ops = {e.key: _total_time(e, on_gpu) / 1e3 / steps for e in ops if e.key.startswith(REFINER_OPS)}
    # inside those ops: the training passes of the Triton backend (inclusive, per step). On a GPU a
    # range also appears as a device-side annotation spanning its kernels; the H100 round 3 saw the
    # CPU-side ranges with 0 device time for all passes but one, so the larger of the two counts.
    passes = {}
    for e in events:
        if e.key.startswith(PASSES):
            p = passes.setdefault(e.key[len(PASSES):], {"calls": 0.0, "ms": 0.0})
            if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU:
                p["calls"] = e.count / steps
            p["ms"] = max(p["ms"], _total_time(e, on_gpu) / 1e3 / steps)
    ranked = sorted(ops, key=lambda e: _self_time(e, on_gpu), reverse=True)[:top]
    return {
        "total_ms": total,
        "refiner_ops_ms": refiner_ops,
        "refine_train_passes": passes,
        "refiner_share": (sum(refiner_ops.values()) / total) if total else None,
        "top": [{"op": op_label(e.key), "calls": e.count / steps, "self_ms": _self_time(e, on_gpu) / 1e3 / steps,
                 "share": (_self_time(e, on_gpu) / 1e3 / steps / total) if total else None} for e in ranked],
    }


def profile_variant(name: str, label: str, how, mode: str, device, args) -> Dict:
    row = dict(model=name, variant=label, mode=mode, img=args.img, batch=args.batch, amp=args.amp, status="ok")
    try:
        model = bench_models.build(name, how, args.img, device)
        model.train(mode == "train")
        x = torch.randn(args.batch, 3, args.img, args.img, device=device)
        y = torch.randint(0, 1000, (args.batch,), device=device)
        infer, train, _ = bench_models._step_fns(model, model, x, y, bench_models.AMP[args.amp], device)
        fn = infer if mode == "infer" else train
        for _ in range(args.warmup):
            fn()
        C._sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with C._silent_stderr_fd(), profile(activities=acts) as prof:  # (Kineto's start/stop lines)
            for _ in range(args.steps):
                fn()
            C._sync(device)
        row.update(summarize(prof.key_averages(), device.type == "cuda", args.steps, args.top))
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # one failing variant must not lose the others' rows
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return row


def print_row(row: Dict, device):
    head = f"{row['model']} {row['variant']} {row['mode']} (batch {row['batch']}, {row['img']} px)"
    if row["status"] != "ok":
        print(f"\n{head}: {row['status']}")
        return
    where = "device time of the kernels launched" if device.type == "cuda" else "CPU time"
    share = C.fmt(100 * row["refiner_share"], ".1f") if row["refiner_share"] is not None else "n/a"
    print(f"\n{head}: {row['total_ms']:.2f} ms per profiled step ({where}); refiner ops {share}%")
    for op, ms in sorted(row["refiner_ops_ms"].items(), key=lambda kv: -kv[1]):
        print(f"    {op:<40} {ms:9.3f} ms (inclusive)")
    for name, p in sorted(row.get("refine_train_passes", {}).items(), key=lambda kv: -kv[1]["ms"]):
        print(f"      pass {name:<35} {p['ms']:9.3f} ms in {p['calls']:.0f} calls")
    print(C.format_table([[t["op"][:60], C.fmt(t["calls"], ".0f"), C.fmt(t["self_ms"], ".3f"),
                           C.fmt(100 * t["share"], ".1f") if t["share"] is not None else "n/a"] for t in row["top"]],
                         ["operator (by self time)", "calls/step", "self ms/step", "%"]))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="auto", type=cli.device_or_auto, help="auto | cpu | cuda")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--models", nargs="+", default=["refiner_vit_s"], choices=bench_models.REFINER)
    p.add_argument("--img", type=cli.positive_int, default=224)
    p.add_argument("--batch", type=cli.positive_int, default=None, help="default: 256 on GPU, 2 on CPU")
    p.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    p.add_argument("--amp", choices=sorted(bench_models.AMP), default=None, help="default GPU bf16, CPU none")
    p.add_argument("--fused-backends", nargs="+", default=None, choices=bench_models.FUSED_BACKENDS)
    p.add_argument("--no-reference", action="store_true", help="profile the fused variants only")
    p.add_argument("--warmup", type=cli.positive_int, default=2, help="steps before profiling (Triton compiles)")
    p.add_argument("--steps", type=cli.positive_int, default=2, help="profiled steps")
    p.add_argument("--top", type=cli.positive_int, default=15, help="operators listed per row")
    p.add_argument("--out", type=cli.output_dir, default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.img % bench_models.PATCH:
        p.error(f"--img must be a multiple of {bench_models.PATCH}, got {args.img}")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    device = C.pick_device(args.device)
    threads_before = C.env_threads(args.threads)
    try:
        args.batch = args.batch or (256 if device.type == "cuda" else 2)
        args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
        meta = C.run_metadata(device, "profile_models", {k: v for k, v in vars(args).items()})
        args.compile_backend = "skip"  # bench_models' variants: fused backends and reference eager
        rows: List[Dict] = []
        for name in args.models:
            variants = [(label, how) for label, how in bench_models.variants(name, device, args)
                        if not (args.no_reference and how == "reference")]
            for label, how in variants:
                for mode in args.modes:
                    row = profile_variant(name, label, how, mode, device, args)
                    print_row(row, device)
                    rows.append(row)
        doc = {"meta": meta, "rows": rows, "targets": []}
        path, latest = C.write_results(doc, args.out, device)
        print(f"\nresults: {path}\n         {latest}")
        return doc
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
