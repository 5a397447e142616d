"""One fused op's kernels under Nsight Compute: what bounds each (occupancy, registers, shared
memory, throughput against the peaks, warp stalls), for the work of making them faster.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \\
        python benchmarks/ncu_kernels.py --target refine_eval:fwd:triton
    (benchmarks/gpu_round.sh ncu runs one such process per target, with the sections chosen there)
    TRITON_INTERPRET=1 python benchmarks/ncu_kernels.py --device cpu --target refine_eval:fwd:triton
    (a smoke run: the call, no profiler)

The target (op:mode:backend, as bench_ops names them) runs --warmup times outside the profiled
range (compiling, autotuning), then once between cudaProfilerStart and cudaProfilerStop: with
`--profile-from-start off`, ncu profiles that one call's kernels only. One target per process,
so a report names the call its kernels came from. Default shape: bench_ops' headline point
(B=32, H=12, N=197, d=32, bf16).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from benchmarks.bench_ops import Case  # noqa: E402

import torch  # noqa: E402

from refiner import cli, ops  # noqa: E402

OPS = ("softmax_block", "refine_eval", "refine_train")
MODES = ("fwd", "fwd+bwd")


def target(s: str):
    """op:mode:backend -> a tuple, each part checked."""
    parts = s.split(":")
    if len(parts) != 3 or parts[0] not in OPS or parts[1] not in MODES or parts[2] not in ops.BACKENDS:
        raise argparse.ArgumentTypeError(f"expected op:mode:backend with op in {OPS}, mode in {MODES} and "
                                         f"backend in {ops.BACKENDS}, got {s!r}")
    return tuple(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=target, required=True, metavar="OP:MODE:BACKEND")
    p.add_argument("--device", default="auto", type=cli.device_or_auto, help="auto | cpu | cuda")
    p.add_argument("--batch", type=cli.positive_int, default=None, help="B (default: 32 on GPU, 1 on CPU)")
    p.add_argument("--n", type=cli.positive_int, default=None, help="N (default: 197 on GPU, 13 on CPU)")
    p.add_argument("--heads", type=cli.positive_int, default=12)
    p.add_argument("--head-dim", type=cli.positive_int, default=32)
    p.add_argument("--dtype", choices=sorted(C.DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=2, help="untimed calls before the profiled one")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    device = C.pick_device(args.device)
    gpu = device.type == "cuda"
    op, mode, backend = args.target
    why = ops.available_backends(device)[backend]
    if why != "ok":
        raise SystemExit(f"ncu_kernels: backend {backend!r} is not usable on {device}: {why}")
    B, N = args.batch or (32 if gpu else 1), args.n or (197 if gpu else 13)
    dtype = C.DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    case = Case(B, args.heads, N, args.head_dim, dtype, device)
    run = case.fn(op, mode, backend)
    for _ in range(args.warmup):
        run()
    label = f"{op} {mode} {backend} (B={B}, H={args.heads}, N={N}, d={args.head_dim}, {dtype})"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        with torch.cuda.nvtx.range(label):
            run()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    else:
        run()
    print(f"ncu_kernels: profiled {label}" if gpu else f"ncu_kernels: ran {label} (no profiler on the CPU)")
    return label


if __name__ == "__main__":
    main()
