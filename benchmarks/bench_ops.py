"""Benchmark the fused Refiner ops on every usable backend against the reference ops and SDPA.

    python benchmarks/bench_ops.py              # full grid (GPU) / small fp32 grid (CPU)
    python benchmarks/bench_ops.py --quick      # one shape, seconds
    python benchmarks/bench_ops.py --n 197 577 --heads 12 --head-dim 32 --dtypes bf16 --batch 64

Ops: `softmax_block` (with a previous map), `refine_eval` (folded BatchNorms) and
`refine_train` (batch statistics), each forward ("fwd") and forward+backward
("fwd+bwd"), through `refiner.ops` with `backend=` every backend that
`ops.available_backends()` reports "ok" (the reference backend included, which is the
baseline of the "vs ref" column), plus `torch.nn.functional.scaled_dot_product_attention`
on the same q, k, v (the "vs SDPA" column: op time / SDPA time of the same mode).
Triton is never benchmarked on CPU (interpreter). See benchmarks/README.md for columns.
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402  (puts the repo root on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from refiner import cli, ops, reference  # noqa: E402

OPS = ("softmax_block", "refine_eval", "refine_train")
MODES = ("fwd", "fwd+bwd")
EXPAND, KERNEL = 3, 3  # released Refiner-ViT refine blocks: expansion ratio 3, 3x3 stencil


# ----------------------------------------------------------------------------
# Work and traffic, counted analytically
# ----------------------------------------------------------------------------

def flops(op: str, mode: str, B: int, H: int, N: int, d: int, r: int = EXPAND, k: int = KERNEL) -> float:
    """Floating-point operations of one call (a multiply-add counts 2).

    sdpa           fwd = 4 B H N^2 d                      (S = q k^T and S @ v: 2 B H N^2 d each)
    softmax_block  fwd = 4 B H N^2 d + 7 B H N^2          (the two matmuls; softmax ~5 and the
                                                           residual + s*prev 2 per map element)
    refine_eval    fwd = B N^2 (2 H rH + 2 k^2 rH + 2 rH H) + 2 B H N^2 d
                         (per map pixel: expansion H -> rH, k x k depthwise stencil over rH maps,
                          reduction rH -> H; then R @ v. Biases, relu6 and the affine residual,
                          ~4 rH + 4 H per pixel, are not counted. Refiner-ViT-S, N=197, B=1:
                          92 MFLOP for the DLA, matching DESIGN.md's 0.74 GFLOP for eight.)
    refine_train   fwd = refine_eval fwd                  (BatchNorm statistics not counted)
    any op         fwd+bwd = 3 x fwd                      (backward: a gradient for each input of
                                                           each matmul/stencil = 2 x fwd; no
                                                           recomputation counted)
    """
    if op == "sdpa":
        fwd = 4.0 * B * H * N * N * d
    elif op == "softmax_block":
        fwd = 4.0 * B * H * N * N * d + 7.0 * B * H * N * N
    elif op in ("refine_eval", "refine_train"):
        rH = r * H
        fwd = B * N * N * (2.0 * H * rH + 2.0 * k * k * rH + 2.0 * rH * H) + 2.0 * B * H * N * N * d
    else:
        raise ValueError(op)
    return fwd if mode == "fwd" else 3.0 * fwd


def min_bytes(op: str, mode: str, B: int, H: int, N: int, d: int, elt: int) -> float:
    """Fewest bytes one call must move through memory: each input read once, each output
    written once (weights and BN statistics are negligible and not counted).

    with  M = B H N^2 (a map)  and  T = B H N d (one of q, k, v, out):
    sdpa           fwd 4T (q, k, v in; out)         bwd 8T (q, k, v, out, dout in; dq, dk, dv)
    softmax_block  fwd 4T + 2M (+prev in, attn out) bwd 7T + 3M (q, k, v, dout; attn, dattn in;
                                                    dq, dk, dv, dprev out)
    refine_eval    fwd 2T + M (attn, v in; out)     bwd 3T + 2M (attn, v, dout in; dattn, dv out)
    refine_train   same as refine_eval
    fwd+bwd = fwd + bwd.
    """
    M, T = B * H * N * N, B * H * N * d
    table = {"sdpa": (4 * T, 8 * T), "softmax_block": (4 * T + 2 * M, 7 * T + 3 * M),
             "refine_eval": (2 * T + M, 3 * T + 2 * M), "refine_train": (2 * T + M, 3 * T + 2 * M)}
    fwd, bwd = table[op]
    return float(elt * (fwd if mode == "fwd" else fwd + bwd))


# ----------------------------------------------------------------------------
# Inputs and the functions timed
# ----------------------------------------------------------------------------

class Case:
    """Inputs of one (B, H, N, d, dtype) point, shared by every backend and SDPA."""

    def __init__(self, B: int, H: int, N: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)          # module parameters
        gd = torch.Generator(device=device).manual_seed(seed)        # the large tensors, made in place
        self.shape = (B, H, N, d)
        self.scale = d ** -0.5
        mk = lambda *s: torch.randn(*s, generator=gd, device=device).to(dtype)  # noqa: E731
        self.q, self.k, self.v = mk(B, H, N, d), mk(B, H, N, d), mk(B, H, N, d)
        self.attn = torch.randn(B, H, N, N, generator=gd, device=device).softmax(-1).to(dtype)
        with torch.random.fork_rng(devices=[]):  # the convolutions' initial weights: the same every run
            torch.manual_seed(seed)
            dla = reference.DLA(H, EXPAND, KERNEL)
        abn = torch.nn.BatchNorm2d(H)
        with torch.no_grad():  # non-trivial BN statistics and affines
            for bn in (dla.bn1, dla.bn2, dla.bn3, abn):
                bn.running_mean.normal_(0, 0.1, generator=g)
                bn.running_var.uniform_(0.5, 1.5, generator=g)
                bn.weight.normal_(1, 0.2, generator=g)
                bn.bias.normal_(0, 0.1, generator=g)
        dla.eval(), abn.eval()
        f = reference.fold_refine(dla, abn, self.scale)
        self.folded = reference.FoldedRefine(*(t.to(device=device, dtype=dtype) for t in f.args()[:-1]),
                                             expand=f.expand)
        # refine_train's flat parameters, in the order ops.refine_block passes them.
        self.train_params = tuple(p.detach().to(device=device, dtype=dtype) for p in (
            dla.conv_exp.weight[:, :, 0, 0], dla.depth_sep_conv.weight[:, 0], dla.conv_pro.weight[:, :, 0, 0],
            dla.bn1.weight, dla.bn1.bias, dla.bn2.weight, dla.bn2.bias, dla.bn3.weight, dla.bn3.bias,
            abn.weight, abn.bias))
        self.eps = abn.eps
        self.dout = mk(B, H, N, d)
        self.dattn = torch.randn(B, H, N, N, generator=gd, device=device).mul(1e-3).to(dtype)

    def upcast(self) -> "Case":
        """The same inputs, exactly, in fp32: the yardstick of the low-precision gradients."""
        c = copy.copy(self)
        for name, val in vars(self).items():
            if torch.is_tensor(val):
                setattr(c, name, val.float())
        c.folded = reference.FoldedRefine(*(t.float() for t in self.folded.args()[:-1]), expand=self.folded.expand)
        c.train_params = tuple(t.float() for t in self.train_params)
        return c

    def call(self, op: str, backend: str, grad: bool):
        """(function of the inputs returning the differentiable outputs, inputs, output grads)."""
        q, k, v, a = self.q, self.k, self.v, self.attn
        if op == "sdpa":
            return (lambda q, k, v: (F.scaled_dot_product_attention(q, k, v, scale=self.scale),),
                    (q, k, v), (self.dout,))
        if op == "softmax_block":
            return (lambda q, k, v, a: ops.softmax_block(q, k, v, a, self.scale, backend=backend),
                    (q, k, v, a), (self.dout, self.dattn))
        if op == "refine_eval":  # fwd+bwd: gradients w.r.t. the map and v (BatchNorms frozen)
            return (lambda a, v: (ops.refine_eval(a, v, self.folded, backend=backend),), (a, v), (self.dout,))
        if op == "refine_train":  # fwd+bwd: gradients w.r.t. the map, v and every parameter
            return (lambda a, v, *p: (ops.refine_train(a, v, *p, eps=self.eps, scale=self.scale, expand=True,
                                                       backend=backend)[0],),
                    (a, v) + self.train_params, (self.dout,))
        raise ValueError(op)

    def fn(self, op: str, mode: str, backend: str, compile_backend: Optional[str] = None):
        """compile_backend: torch.compile the op (the reference: what the compiler makes of plain PyTorch)."""
        f, inputs, gouts = self.call(op, backend, mode != "fwd")
        if compile_backend:
            torch._dynamo.reset()  # each case compiles afresh: no recompile limit across shapes and ops
            f = torch.compile(f, backend=compile_backend, dynamic=False)
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return f(*inputs)
            return run
        leaves = [x.detach().requires_grad_(True) for x in inputs]

        def run_bwd():
            outs = f(*leaves)
            return torch.autograd.grad(outs, leaves, gouts[:len(outs)], allow_unused=True)
        return run_bwd


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

def grad_rel_errs(grads, ref_grads) -> List[Optional[float]]:
    """||g - ref|| / ||ref|| of each gradient (each on its own scale: the
    parameters' gradients sum over the whole map, the map's do not; the norm and not the largest
    element, because a ReLU6 input within rounding of 0 or 6 gates its gradient the other way in
    one of the two: a few map positions off by percents, refine_train in fp32 on the CPU), with
    ||ref|| at least a thousandth of the largest gradient's (refine_train's db3 is 0 in exact
    arithmetic, BN_a's backward removing dZ's mean: only rounding is left of it)."""
    norms = [r.double().norm().item() for r in ref_grads if r is not None]
    floor = 1e-3 * max(norms, default=1.0)
    return [None if g is None or r is None
            else (g.double() - r.double()).norm().item() / max(r.double().norm().item(), floor)
            for g, r in zip(grads, ref_grads)]


def fp32_grads(case: Case, op: str, mode: str):
    """The reference's gradients on the same inputs in fp32, for a bf16/fp16 case (None otherwise): the
    low-precision reference's own rounding is then an error like any backend's, in its own row; measured
    against it instead, a gradient that is 0 in exact arithmetic (refine_train's db3) reads as
    100% off wherever a backend rounds it closer to 0 than the reference does."""
    if mode == "fwd" or op == "sdpa" or case.q.dtype == torch.float32:
        return None
    try:
        return case.upcast().fn(op, mode, "reference")()
    except torch.cuda.OutOfMemoryError:
        return None


def _measure(case: Case, op: str, mode: str, backend: str, device, args, peaks, ref_out=None,
             compile_backend: Optional[str] = None) -> dict:
    B, H, N, d = case.shape
    dtype_name = args._dtype_name
    row = dict(device=C.device_label(device), op=op, mode=mode, backend=backend if op != "sdpa" else "torch",
               dtype=dtype_name, B=B, H=H, N=N, d=d, time_ms=None, tflops=None, pct_peak_flops=None,
               gbs=None, pct_peak_bw=None, peak_mem_mib=None, max_abs_err=None, grad_rel_err=None, status="ok")
    first = None
    try:
        fn = case.fn(op, mode, backend, compile_backend)
        mem = None
        if device.type == "cpu" and not args.no_memory:  # first call: memory estimate and warm-up
            mem, out = C.peak_memory(fn, device)
        else:
            out = fn()  # GPU: compiles / autotunes before the timing
        first = out[0] if mode == "fwd" else out
        if ref_out is not None and mode == "fwd":
            row["max_abs_err"] = (first.float() - ref_out.float()).abs().max().item()
        elif ref_out is not None:  # the gradients: autotuned backward launches are checked nowhere else
            row["grad_rel_errs"] = grad_rel_errs(first, ref_out)
            row["grad_rel_err"] = max((e for e in row["grad_rel_errs"] if e is not None), default=None)
        del out
        t = C.median_time(fn, device, repeats=args.repeats, warmup=args.warmup, rep_ms=args.rep_ms)
        row["time_ms"] = t * 1e3
        fl = flops(op, mode, B, H, N, d)
        by = min_bytes(op, mode, B, H, N, d, torch.finfo(C.DTYPES[dtype_name]).bits // 8)
        row["flop"], row["bytes"] = fl, by
        row["tflops"], row["gbs"] = fl / t / 1e12, by / t / 1e9
        if peaks:
            row["pct_peak_flops"] = 100 * row["tflops"] / peaks[dtype_name]
            row["pct_peak_bw"] = 100 * row["gbs"] / (peaks["tb_s"] * 1e3)
        if device.type == "cuda" and not args.no_memory:
            mem = C.peak_memory(fn, device)[0]
        row["peak_mem_mib"] = C.mib(mem)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # a backend that fails one case must not end the run
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row, first


def run(args, device) -> List[dict]:
    backends, skipped = C.usable_backends(device, args.backends)
    for name, why in skipped.items():
        print(f"skipping backend {name!r}: {why}")
    if "reference" not in backends:
        backends.append("reference")  # always the baseline
    backends = ["reference"] + [b for b in backends if b != "reference"]
    usable = C.usable_backends(device)[0]
    variants = [v for v in args.env_variants if v.backend in usable]
    for v in args.env_variants:
        if v not in variants:
            print(f"skipping env variant {v.label!r}: backend {v.backend!r} not usable here")
    peaks = C.device_peaks(C.device_name(device)) if device.type == "cuda" else None
    grid = [(dt, H, d, N) for dt in args.dtypes for H in args.heads for d in args.head_dim for N in args.n]
    jobs = [(op, mode) for op in args.ops for mode in args.modes]
    rows: List[dict] = []
    total = len(grid) * (len(jobs) * (len(backends) + (args.compile_backend != "skip")) + len(args.modes)
                         + sum(v.applies(op) for op, _ in jobs for v in variants))
    bar = C.progress(range(total), desc="bench_ops", unit="case")
    it = iter(bar)
    try:
        for dt, H, d, N in grid:
            args._dtype_name = dt
            case = Case(args.batch, H, N, d, C.DTYPES[dt], device)
            sdpa = {}
            for mode in args.modes:
                next(it, None)
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"sdpa {mode} {dt} H={H} d={d} N={N}")
                r, _ = _measure(case, "sdpa", mode, "torch", device, args, peaks)
                sdpa[mode] = r["time_ms"]
                rows.append(r)
            for op, mode in jobs:
                ref_out = fp32_grads(case, op, mode)  # low precision: every backend's gradients against it
                ref_time = None

                def measure(label, backend, compile_backend=None):
                    """One row of this op and mode, labelled, with its ratios to the reference and SDPA."""
                    next(it, None)
                    if hasattr(bar, "set_postfix_str"):
                        bar.set_postfix_str(f"{op} {mode} {label} {dt} H={H} d={d} N={N}")
                    r, out = _measure(case, op, mode, backend, device, args, peaks, ref_out, compile_backend)
                    r["backend"] = label
                    r["vs_reference"] = (ref_time / r["time_ms"]) if ref_time and r["time_ms"] else None
                    r["vs_sdpa"] = (r["time_ms"] / sdpa[mode]) if sdpa.get(mode) and r["time_ms"] else None
                    rows.append(r)
                    if r["status"] != "ok":
                        C.progress_write(f"  {op} {mode} {label} {dt} H={H} d={d} N={N}: {r['status']}")
                    return r, out

                for be in backends:
                    r, out = measure(be, be)
                    if be == "reference":  # (its own row's ratio: 1)
                        ref_time = r["time_ms"]
                        r["vs_reference"] = 1.0 if ref_time else None
                        ref_out = ref_out if ref_out is not None else out
                    del out
                if args.compile_backend != "skip":  # the reference under torch.compile: the compiler's fusions
                    measure(f"reference compiled[{args.compile_backend}]", "reference", args.compile_backend)
                for var in variants:  # candidates beside the default, same inputs and reference
                    if var.applies(op):
                        with var.active():
                            measure(var.label, var.backend)
            del case
            gc.collect()
    except KeyboardInterrupt:  # e.g. `timeout -s INT` in gpu_round.sh: keep what was measured
        C.progress_write("interrupted: writing the rows measured so far")
        args._interrupted = True
    finally:
        if hasattr(bar, "close"):
            bar.close()
    return rows


def targets(rows: List[dict]) -> List[dict]:
    """Refine op eval (bf16, H=12, d=32) at N=197 and 577: best fused backend time <= 2x SDPA (the
    backends as shipped: env-variant rows, candidates, do not count)."""
    out = []
    for N in (197, 577):
        sel = [r for r in rows if r["op"] == "refine_eval" and r["mode"] == "fwd" and r["dtype"] == "bf16"
               and r["H"] == 12 and r["d"] == 32 and r["N"] == N and not r["backend"].startswith("reference")
               and "=" not in r["backend"]
               and r["status"] == "ok" and r.get("vs_sdpa")]
        if sel:
            best = min(sel, key=lambda r: r["time_ms"])
            out.append(C.target_line(f"refine_eval fwd N={N} time / SDPA time", best["vs_sdpa"], 2.0, False,
                                     f"{best['backend']}, B={best['B']}, bf16, H=12, d=32"))
    return out


HEADERS = ["op", "mode", "backend", "dtype", "B", "H", "N", "d", "ms", "TFLOP/s", "%peak", "GB/s", "%BW",
           "peak MiB", "vs ref", "vs SDPA", "max|err|", "status"]


def table_rows(rows: List[dict]) -> List[list]:
    return [[r["op"], r["mode"], r["backend"], r["dtype"], r["B"], r["H"], r["N"], r["d"],
             C.fmt(r["time_ms"], "g"), C.fmt(r["tflops"], "g"), C.fmt(r["pct_peak_flops"], ".1f"),
             C.fmt(r["gbs"], "g"), C.fmt(r["pct_peak_bw"], ".1f"), C.fmt(r["peak_mem_mib"], "g"),
             C.fmt(r.get("vs_reference"), ".2f") + ("x" if r.get("vs_reference") else ""),
             C.fmt(r.get("vs_sdpa"), ".2f"), _err(r), r["status"][:60]]
            for r in rows]


def _err(r: dict) -> str:
    """fwd: max |out - ref|; fwd+bwd: the gradients' worst relative error (grad_rel_err), marked r."""
    if r.get("grad_rel_err") is not None:
        return C.fmt(r["grad_rel_err"], ".1e", "-") + "r"
    return C.fmt(r.get("max_abs_err"), ".1e", "-")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small shape: B=2 (GPU 32), N=197, H=12, d=32")
    p.add_argument("--device", default="auto", type=cli.device_or_auto, help="auto | cpu | cuda")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--batch", type=cli.positive_int, default=None, help="B (default: 32 on GPU, 2 on CPU)")
    p.add_argument("--n", type=cli.positive_int, nargs="+", default=None,
                   help="tokens N (default GPU: 197 577 785; CPU: 197 577)")
    p.add_argument("--heads", type=cli.positive_int, nargs="+", default=None,
                   help="heads H (default GPU: 12 16; CPU: 12)")
    p.add_argument("--head-dim", type=cli.positive_int, nargs="+", default=None,
                   help="head size d (default GPU: 32 35; CPU: 32)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(C.DTYPES), default=None,
                   help="default GPU: fp32 bf16 fp16; CPU: fp32")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--backends", nargs="+", choices=ops.BACKENDS, default=None,
                   help="subset of backends (default: every usable one)")
    p.add_argument("--env-variants", nargs="+", type=C.env_variant, default=[], metavar="BACKEND:NAME=VALUE[@OPS]",
                   help="also time BACKEND with these environment variables set, e.g. "
                        "triton:REFINER_TRITON_REFINE_FWD=tile@refine_eval (rows labelled backend[NAME=VALUE])")
    p.add_argument("--compile-backend", default="skip",
                   help="also time the reference ops under torch.compile with this backend (e.g. inductor; rows "
                        "'reference compiled[...]', not counted for targets); default skip")
    p.add_argument("--repeats", type=cli.positive_int, default=None, help="timed calls (CPU, and GPU without Triton)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=0,
                   help="extra untimed calls (the first call, for the error check and memory, is one already)")
    p.add_argument("--rep-ms", type=cli.positive_float, default=100.0,
                   help="GPU: do_bench measurement window per case")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", type=cli.output_dir, default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    for v in args.env_variants:
        if v.ops and not set(v.ops) <= set(OPS):
            p.error(f"--env-variants {v}: ops after '@' must be among {OPS}")
    if args.compile_backend != "skip":  # a typo would only show as an error in every compiled row
        try:
            cli.compile_backend(args.compile_backend)
        except argparse.ArgumentTypeError as e:
            p.error(f"--compile-backend: {e}, or 'skip'")
    args._device = device = C.pick_device(args.device)
    gpu = device.type == "cuda"
    quick = args.quick
    args.batch = args.batch or (32 if gpu else 2)
    args.n = args.n or ([197] if quick else ([197, 577, 785] if gpu else [197, 577]))
    args.heads = args.heads or ([12] if quick or not gpu else [12, 16])
    args.head_dim = args.head_dim or ([32] if quick or not gpu else [32, 35])
    # bf16 first: the rows the targets need come early if a time limit interrupts the run.
    args.dtypes = args.dtypes or (["bf16"] if quick and gpu else (["bf16", "fp16", "fp32"] if gpu else ["fp32"]))
    args.repeats = args.repeats or (20 if gpu else (3 if quick else 5))
    args._interrupted = False
    return args


def _tuned_configs() -> dict:
    """The Triton autotuners' picks of this run ({} without Triton or on the CPU)."""
    try:
        from refiner_kernels._common import tuned_configs
    except ImportError:
        return {}
    return tuned_configs()


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args._device
    threads_before = C.env_threads(args.threads)
    try:
        meta = C.run_metadata(device, "bench_ops", {k: v for k, v in vars(args).items()
                                                    if not k.startswith("_") and k != "out"})
        label = C.run_label(device, meta)
        print(f"bench_ops on {label}; torch {meta['torch']}, triton {meta['triton']}, commit {meta['git_commit'][:12]}")
        print(f"peaks: {meta['peaks'] or 'n/a (CPU or unknown GPU): % columns say n/a'}")
        print(f"timing: {meta['timing']}; memory: {meta['memory']}; malloc: {meta['malloc']}")
        rows = run(args, device)
        meta["triton_autotune"] = _tuned_configs()
        for kernel, picks in meta["triton_autotune"].items():
            for key, cfg in picks.items():
                print(f"autotune {kernel} {key}: {cfg}")
        tg = targets(rows) if device.type == "cuda" else []
        return C.report(args, device, meta, rows, "ops, median of repeated calls (vs ref: reference time / "
                        "this time; vs SDPA: this time / SDPA time):", HEADERS, table_rows, tg)
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    cli.run_benchmark(main)
