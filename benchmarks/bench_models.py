"""Images/s and peak memory of Refiner-ViT (fused, reference; eager and compiled) and timm ViTs.

    python benchmarks/bench_models.py            # GPU: S/M/L + ViT-S/B at 224 (batch 256) and 384 (batch 64);
                                                 # CPU: Refiner-ViT-S and ViT-S, batch 2, 224 px
    python benchmarks/bench_models.py --quick    # CPU smoke run: Refiner-ViT-S, batch 2, 224 px, < 1 minute
    python benchmarks/bench_models.py --models refiner_vit_s vit_small_patch16_224 --img 224 --batch 128

Variants, side by side in one run, same batch and resolution:
  fused[<backend>]     timm.create_model(name, fused=<backend>) for every usable compiled/Triton
                       backend (on a machine with none: fused[auto->reference], the fused layer on
                       reference ops); with --env-variants also fused[<backend>[NAME=VALUE]], the
                       same with runtime switches set (a candidate kernel beside the default)
  reference eager      the pure-PyTorch model
  reference compiled   torch.compile of it (GPU default; on CPU only with --compile-backend)
  fused compiled[<backend>]  torch.compile of the fused model (fullgraph: the fused ops are custom ops
                       the compiler keeps whole, it fuses what lies between them: the blocks' 0.5
                       scalings, LayerNorm, residual adds, casts); with the reference compiled rows
                       (--compile-variants)
  timm (SDPA)          vit_small_patch16_224 / vit_base_patch16_224 (F.scaled_dot_product_attention)
  <variant> grad_checkpointing=on   with --grad-checkpointing, training rows of the fused defaults and
                       the reference eager model with model.set_grad_checkpointing(): the memory saved
                       and the recompute's cost (candidates: not counted for the targets)
Modes: "infer" (eval, no_grad) and "train" (one step: forward, cross-entropy, backward,
AdamW step), both under torch.autocast(bf16) on GPU (--amp none for fp32); CPU runs are fp32.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402  (puts the repo root on sys.path)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import refiner  # noqa: E402,F401  (registers refiner_vit_s/m/l with timm)
from refiner import cli  # noqa: E402

REFINER = ("refiner_vit_s", "refiner_vit_m", "refiner_vit_l")
TIMM = ("vit_small_patch16_224", "vit_base_patch16_224")
# Target rows first, so that a time limit cuts the least useful rows.
DEFAULT_MODELS = ("refiner_vit_s", "vit_small_patch16_224", "vit_base_patch16_224", "refiner_vit_m", "refiner_vit_l")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
PATCH = 16  # every model above: the --img sizes must be multiples of it
FUSED_BACKENDS = ("cuda", "triton", "cpu")


def variants(name: str, device, args) -> List[tuple]:
    """(variant label, how to build) for one model name."""
    if name not in REFINER:
        return [("timm (SDPA)", "timm")]
    out, mixed = [], []
    fused_backends, _ = C.usable_backends(device, FUSED_BACKENDS)
    if args.fused_backends is not None:
        fused_backends = [b for b in fused_backends if b in args.fused_backends]
    if fused_backends:
        out += [(f"fused[{b}]", ("fused", b)) for b in fused_backends]
        # candidates beside the default (--env-variants; a backend not usable here is left out)
        out += [(f"fused[{v.label}]", ("fused", v.backend, v)) for v in getattr(args, "env_variants", ())
                if v.backend in fused_backends]
        # per-op backend choices (--mixed-backends), where every backend they name is usable here
        usable = set(C.usable_backends(device)[0]) | {"auto"}
        mixed = [spec for spec in getattr(args, "mixed_backends", ()) if set(C.backends_named(spec)) <= usable]
        out += [(f"fused[{spec}]", ("fused", spec)) for spec in mixed]
    else:
        out.append((f"fused[auto->{C.auto_backend(device)}]", ("fused", "auto")))
    out.append(("reference eager", "reference"))
    if getattr(args, "grad_checkpointing", False):
        out += [(f"{label} {CKPT}", ("ckpt", how)) for label, how in list(out)
                if not _candidate(how) and (label.startswith("fused[") or label == "reference eager")]
    if args.compile_backend != "skip" and (args.compile_models == ["all"] or name in args.compile_models):
        if "fused" in args.compile_variants:  # (a mix naming the reference leaves that op to the compiler)
            out += [(f"fused compiled[{b}]", ("fused", b, "compiled")) for b in fused_backends]
            out += [(f"fused compiled[{spec}]", ("fused", spec, "compiled")) for spec in mixed]
        if "reference" in args.compile_variants:
            out.append((f"reference compiled[{args.compile_backend}]", "compiled"))
    return out


CKPT = "grad_checkpointing=on"  # label suffix ('=': never a target's row, see _find)


def _candidate(how) -> bool:
    """A candidate row: fused under --env-variants (("fused", backend, EnvVariant)), a per-op mix, or
    a gradient-checkpointed model (("ckpt", how))."""
    return _checkpointed(how) or (isinstance(how, tuple) and how[0] == "fused"
                                  and ((len(how) == 3 and isinstance(how[2], C.EnvVariant)) or "," in how[1]))


def _checkpointed(how) -> bool:
    return isinstance(how, tuple) and how[0] == "ckpt"


def _compiled(how) -> bool:
    """A torch.compile row: reference compiled, or fused compiled (("fused", backend, "compiled"))."""
    return how == "compiled" or (isinstance(how, tuple) and how[-1] == "compiled")


def build(name: str, how, img: int, device):
    if _checkpointed(how):
        model = build(name, how[1], img, device)
        model.set_grad_checkpointing()
        return model
    torch.manual_seed(0)
    kw = dict(img_size=img, num_classes=1000)
    if how == "timm" or how == "reference" or how == "compiled":
        model = timm.create_model(name, **kw)
    else:
        model = timm.create_model(name, fused=how[1], **kw)
    return model.to(device)


def _step_fns(model, run_model, x, y, amp, device):
    dev = device.type
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def infer():
        with torch.no_grad(), torch.autocast(dev, dtype=amp, enabled=amp is not None):
            return run_model(x)

    def train():
        with torch.autocast(dev, dtype=amp, enabled=amp is not None):
            out = run_model(x)
            loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return infer, train, opt


def measure(name: str, label: str, how, img: int, batch: int, mode: str, device, args) -> dict:
    if isinstance(how, tuple) and len(how) == 3 and not _compiled(how):  # an env variant: set for the whole row
        with how[2].active():
            return measure(name, label, how[:2], img, batch, mode, device, args)
    row = dict(device=C.device_label(device), model=name, variant=label, img=img, batch=batch, mode=mode,
               amp=args.amp, images_per_s=None, ms_per_iter=None, peak_mem_mib=None, vs_reference=None,
               status="ok")
    model = opt = None
    try:
        model = build(name, how, img, device)
        model.train(mode == "train")
        run_model = model
        if _compiled(how):  # fullgraph: a graph break in the fused model is an error, not a slow row
            run_model = torch.compile(model, backend=args.compile_backend, fullgraph=how != "compiled")
        x = torch.randn(batch, 3, img, img, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        amp = AMP[args.amp]
        infer, train, opt = _step_fns(model, run_model, x, y, amp, device)
        fn = infer if mode == "infer" else train
        mem = None
        measure_mem = not args.no_memory and not (_compiled(how) and device.type == "cpu")
        warmup = args.warmup + (1 if _compiled(how) else 0)
        repeats = args.repeats if mode == "infer" else max(1, (args.repeats + 1) // 2)
        if device.type == "cpu" and measure_mem:  # the memory estimate's call is the first warm-up
            mem = C.peak_memory(fn, device, absolute=True)[0]
            warmup -= 1
        t = C.median_time(fn, device, repeats=repeats, warmup=max(0, warmup), use_do_bench=False)
        row["ms_per_iter"] = t * 1e3
        row["images_per_s"] = batch / t
        if device.type == "cuda" and measure_mem:  # absolute peak: weights, optimizer state, activations
            mem = C.peak_memory(fn, device, absolute=True)[0]
        row["peak_mem_mib"] = C.mib(mem)
        if _compiled(how) and device.type == "cpu":
            row["mem_note"] = "n/a: the CPU estimate does not trace compiled graphs"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if _compiled(how):
            torch._dynamo.reset()
    return row


def plan(args, device) -> List[tuple]:
    """The rows to measure, (model, label, how, img, batch, mode): those every target needs first
    (fused defaults, reference, compiled, timm), the candidates after them, so that a time limit
    (SIGINT: the rows so far are written) cuts candidates rather than a target's rows."""
    jobs = [(name, label, how, img, batch, mode) for img, batch in zip(args.img, args.batch)
            for name in args.models for label, how in variants(name, device, args) for mode in args.modes
            if mode == "train" or not _checkpointed(how)]  # (infer: no graph, nothing to recompute)
    return sorted(jobs, key=lambda job: _candidate(job[2]))  # stable


def run(args, device) -> List[dict]:
    jobs = plan(args, device)
    skipped_fused = C.usable_backends(device, FUSED_BACKENDS)[1]
    for b, why in skipped_fused.items():
        print(f"fused backend {b!r} not benchmarked: {why}")
    if args.compile_backend == "skip":
        print("reference compiled: skipped (--compile-backend skip; the CPU default)")
    rows: List[dict] = []
    bar = C.progress(jobs, desc="bench_models", unit="row")
    try:
        for name, label, how, img, batch, mode in bar:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"{name} {label} {img}px {mode}")
            r = measure(name, label, how, img, batch, mode, device, args)
            rows.append(r)
            # each row in the log as soon as measured: a run killed before its table keeps its figures
            C.progress_write(f"  {name} {label} {img}px {mode}: " + (
                f"{r['images_per_s']:.1f} img/s, peak {C.fmt(r['peak_mem_mib'], '.0f')} MiB"
                if r["status"] == "ok" and r.get("images_per_s") else r["status"]))
    except KeyboardInterrupt:
        C.progress_write("interrupted: writing the rows measured so far")
        args._interrupted = True
    finally:
        if hasattr(bar, "close"):
            bar.close()
    for r in rows:  # speed-up against the reference eager model of the same name, size and mode
        ref = _find(rows, r["model"], "reference eager", r["img"], r["mode"])
        if ref and ref["images_per_s"] and r["images_per_s"] and r["model"] in REFINER:
            r["vs_reference"] = r["images_per_s"] / ref["images_per_s"]
    return rows


def _find(rows, model, variant_prefix, img, mode) -> Optional[dict]:
    """The fastest row of that variant kind; env variants (candidates, labels with '=') never count."""
    sel = [r for r in rows if r["model"] == model and r["variant"].startswith(variant_prefix)
           and "=" not in r["variant"] and r["img"] == img and r["mode"] == mode and r["status"] == "ok"
           and r["images_per_s"]]
    return max(sel, key=lambda r: r["images_per_s"]) if sel else None


def targets(rows: List[dict]) -> List[dict]:
    """The H100 targets (bf16 autocast, batch 256, 224 px), from whichever rows this run has."""
    out = []
    s, img = "refiner_vit_s", 224
    fi, ft = _find(rows, s, "fused", img, "infer"), _find(rows, s, "fused", img, "train")
    ri, rt = _find(rows, s, "reference eager", img, "infer"), _find(rows, s, "reference eager", img, "train")
    ci = _find(rows, s, "reference compiled", img, "infer")
    ti = _find(rows, "vit_small_patch16_224", "timm", img, "infer")

    def add(name, a, b, goal, higher, key="images_per_s"):
        if a and b and a.get(key) and b.get(key):
            out.append(C.target_line(name, a[key] / b[key], goal, higher,
                                     f"{a['variant']} vs {b['variant']}, batch {a['batch']}, amp {a['amp']}"))
        elif a or b:  # say why a target that has half its rows can't be computed (OOM, error)
            failed = [f"{r['variant']} {r['mode']}: {r['status']}" for r in rows
                      if r["model"] in (s, "vit_small_patch16_224") and r["img"] == img and r["status"] != "ok"]
            out.append(C.target_line(name, None, goal, higher, "; ".join(failed)[:120] or "rows missing"))
    # "fused": the fastest fused row, eager or compiled (its label says which); where that is a compiled
    # one, the same target again with the fastest eager fused row ("fused eager"), so both are on record
    fei, fet = _find(rows, s, "fused[", img, "infer"), _find(rows, s, "fused[", img, "train")
    for tag, i, t in (("fused", fi, ft), ("fused eager", fei, fet)):
        again = tag == "fused eager"
        if not (again and i is fi):
            add(f"S infer: {tag} / reference eager img/s", i, ri, 2.5, True)
            add(f"S infer: {tag} / reference compiled img/s", i, ci, 1.5, True)
            add(f"S infer: {tag} / timm ViT-S img/s", i, ti, 0.55, True)
        if not (again and t is ft):
            add(f"S train: {tag} / reference eager img/s", t, rt, 1.8, True)
            add(f"S train: {tag} / reference eager peak memory", t, rt, 0.5, False, key="peak_mem_mib")
    return out


HEADERS = ["model", "variant", "img", "batch", "mode", "amp", "img/s", "ms/iter", "peak MiB", "vs ref", "status"]


def table_rows(rows):
    return [[r["model"], r["variant"], r["img"], r["batch"], r["mode"], r["amp"], C.fmt(r["images_per_s"], "g"),
             C.fmt(r["ms_per_iter"], "g"), C.fmt(r["peak_mem_mib"], ".0f"),
             C.fmt(r["vs_reference"], ".2f") + ("x" if r["vs_reference"] else ""), r["status"][:60]] for r in rows]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke preset: Refiner-ViT-S (+ ViT-S on GPU), one resolution, small batch, no compile")
    p.add_argument("--device", default="auto", type=cli.device_or_auto, help="auto | cpu | cuda")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--models", nargs="+", default=None, choices=REFINER + TIMM)
    p.add_argument("--img", type=cli.positive_int, nargs="+", default=None,
                   help="resolutions (default GPU: 224 384; CPU: 224)")
    p.add_argument("--batch", type=cli.positive_int, nargs="+", default=None,
                   help="batch per resolution (default GPU: 256 at 224, 64 at 384; CPU: 2)")
    p.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    p.add_argument("--amp", choices=sorted(AMP), default=None, help="autocast dtype (default GPU bf16, CPU none)")
    p.add_argument("--fused-backends", nargs="+", default=None, choices=FUSED_BACKENDS,
                   help="subset of compiled/Triton backends")
    p.add_argument("--env-variants", nargs="+", type=C.env_variant, default=[], metavar="BACKEND:NAME=VALUE",
                   help="also time the model fused on BACKEND with these environment variables set, e.g. "
                        "triton:REFINER_TRITON_REFINE_FWD=tile (rows labelled fused[backend[NAME=VALUE]])")
    p.add_argument("--mixed-backends", nargs="+", type=C.backend_spec, default=[], metavar="DEFAULT,OP=NAME",
                   help="also time the model fused with a backend per op, e.g. triton,refine_eval=cuda "
                        "(refiner.ops.parse_backend; candidates: rows labelled fused[spec], not counted for targets)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="also time training with model.set_grad_checkpointing() (fused defaults, reference eager)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for 'reference compiled' (default GPU inductor; CPU skip); "
                        "'skip' leaves the rows out")
    p.add_argument("--compile-variants", nargs="+", choices=("reference", "fused"), default=["reference", "fused"],
                   help="which models torch.compile times (default both: reference compiled, fused compiled)")
    p.add_argument("--compile-models", nargs="+", default=["refiner_vit_s"], choices=REFINER + ("all",),
                   help="models to compile ('all'; default refiner_vit_s: compiling M/L takes minutes)")
    p.add_argument("--repeats", type=cli.positive_int, default=None, help="timed inference calls (train: half)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=None)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", type=cli.output_dir, default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    for v in args.env_variants:
        if v.ops:
            p.error(f"--env-variants {v}: '@ops' applies to bench_ops only")
    for img in args.img or ():
        cli.check_img_size(img, PATCH, "--img", error=p.error)
    if args.compile_backend not in (None, "skip"):  # a typo would only show as an error in every compiled row
        try:
            cli.compile_backend(args.compile_backend)
        except argparse.ArgumentTypeError as e:
            p.error(f"--compile-backend: {e}, or 'skip'")
    args._device = device = C.pick_device(args.device)
    gpu = device.type == "cuda"
    q = args.quick
    args.models = args.models or (list(DEFAULT_MODELS) if gpu and not q else
                                  ["refiner_vit_s"] if q and not gpu else
                                  ["refiner_vit_s", "vit_small_patch16_224"])  # GPU quick; CPU default
    args.img = args.img or ([224] if q or not gpu else [224, 384])
    default_batch = {224: 256, 384: 64} if gpu and not q else {}
    args.batch = args.batch or [default_batch.get(i, 32 if gpu else 2) for i in args.img]
    if len(args.batch) == 1:
        args.batch = args.batch * len(args.img)
    if len(args.batch) != len(args.img):
        p.error("--batch: give one batch size, or one per --img")
    args.amp = args.amp or ("bf16" if gpu else "none")
    args.compile_backend = args.compile_backend or ("inductor" if gpu and not q else "skip")
    args.repeats = args.repeats or (10 if gpu else (1 if q else 3))
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    args._interrupted = False
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args._device
    threads_before = C.env_threads(args.threads)
    try:
        meta = C.run_metadata(device, "bench_models", {k: v for k, v in vars(args).items()
                                                       if not k.startswith("_") and k != "out"})
        label = C.run_label(device, meta)
        print(f"bench_models on {label}; torch {meta['torch']}, timm {meta['timm']}, triton {meta['triton']}, "
              f"commit {meta['git_commit'][:12]}")
        print(f"timing: median of {args.repeats} inference / {max(1, (args.repeats + 1) // 2)} training calls after "
              f"{args.warmup} warm-up; memory: {meta['memory']}" + (" (absolute)" if device.type == "cuda" else ""))
        rows = run(args, device)
        tg = targets(rows) if device.type == "cuda" else []
        return C.report(args, device, meta, rows, "models (vs ref: images/s over reference eager's, same "
                        "model/size/mode):", HEADERS, table_rows, tg)
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    cli.run_benchmark(main)
