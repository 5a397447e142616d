"""`make demo`: a correctness check and a short benchmark on whatever device is present.

    python -m refiner.demo [--model refiner_vit_s] [--batch 8] [--img 224]

Builds the reference model and its fused conversion with the same weights, checks
they agree (eval and one training step), then times both, plus each fused op on
every usable backend against the reference op, and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import timm

import refiner  # noqa: F401  (registers the models)
from refiner import cli, fused, ops, reference
from refiner.models import MODEL_ARGS


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def format_table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _loss(model, x):
    return model(x).double().square().mean()  # (double: the float64 yardstick keeps its precision)


def _grads(model, x):
    """All parameter gradients of one training step's loss, flattened into one vector. Compared by
    the norm over all of them: some are exactly zero in exact arithmetic (e.g. BN3's bias, cancelled
    by adapt_bn's batch mean), so per-tensor ratios would be noise."""
    model.zero_grad(set_to_none=True)
    _loss(model, x).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def model_check(name: str, batch: int, img: int, device: str, repeats: int):
    torch.manual_seed(0)
    ref = timm.create_model(name, img_size=img).to(device)
    fm = fused.convert(copy.deepcopy(ref), backend="auto")
    x = torch.randn(batch, 3, img, img, device=device)
    rows = []
    with torch.no_grad():
        ref.eval(), fm.eval()
        a, b = ref(x), fm(x)
        err = (a - b).abs().max().item()
        t_ref, t_fused = timeit(lambda: ref(x), repeats), timeit(lambda: fm(x), repeats)
    rows.append([f"{name} eval", f"{err:.2e}", f"{batch / t_ref:.1f}", f"{batch / t_fused:.1f}",
                 f"{t_ref / t_fused:.2f}x"])
    ref.train(), fm.train()
    # The yardstick: the same step in float64. A randomly initialised 16-block model with train-mode
    # BatchNorm over a few images is ill-conditioned: the reference's own fp32 gradients are ~1e-3
    # off their float64 values (CPU, batch 2, 224 px: 3.6e-3, the fused model's 6.7e-3).
    # (on at most 8 images: the float64 step holds twice the fp32 step's activations)
    xg = x[:8]
    g_64 = _grads(copy.deepcopy(ref).double(), xg.double())
    g_ref, g_fused = _grads(ref, xg), _grads(fm, xg)
    rel = lambda g: f"{((g.double() - g_64).norm() / g_64.norm()).item():.2e}"  # noqa: E731
    step = lambda m: _loss(m, x).backward()  # noqa: E731
    t_ref, t_fused = timeit(lambda: step(ref), max(1, repeats // 2)), timeit(lambda: step(fm), max(1, repeats // 2))
    rows.append([f"{name} train step", f"grads {rel(g_fused)} (ref: {rel(g_ref)})", f"{batch / t_ref:.1f}",
                 f"{batch / t_fused:.1f}", f"{t_ref / t_fused:.2f}x"])
    return rows


def op_check(device: str, B: int, H: int, N: int, d: int, repeats: int):
    torch.manual_seed(0)
    from refiner.reference import DLA
    dla, abn = DLA(H).to(device).eval(), torch.nn.BatchNorm2d(H).to(device).eval()
    with torch.no_grad():
        for bn in (dla.bn1, dla.bn2, dla.bn3, abn):
            bn.running_var.uniform_(0.5, 1.5)
            bn.running_mean.normal_(0, 0.1)
    q, k, v = torch.randn(3, B, H, N, d, device=device).unbind(0)
    a = torch.randn(B, H, N, N, device=device).softmax(-1)
    s = d ** -0.5
    folded = reference.fold_refine(dla, abn, s)
    cases = {
        "softmax_block": (lambda be: ops.softmax_block(q, k, v, a, s, backend=be)[0]),
        "refine eval": (lambda be: ops.refine_eval(a, v, folded, backend=be)),
    }
    status = ops.available_backends(device)
    rows = []
    with torch.no_grad():
        # The unfused module path, as a user of the released code runs it.
        t_mod = timeit(lambda: (abn(dla(a)) * s) @ v, repeats)
        for op, fn in cases.items():
            want = fn("reference")
            t_ref = timeit(lambda: fn("reference"), repeats)
            extra = f" (module path {t_mod * 1e3:.1f} ms)" if op == "refine eval" else ""
            for be in ("cuda", "cpu", "triton"):
                if status[be] != "ok" or (be == "triton" and device == "cpu"):
                    continue
                err = (fn(be) - want).abs().max().item()
                t = timeit(lambda: fn(be), repeats)
                rows.append([op, be, f"{err:.2e}", f"{t_ref * 1e3:.2f}{extra}", f"{t * 1e3:.2f}", f"{t_ref / t:.2f}x"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="refiner_vit_s", choices=sorted(MODEL_ARGS))  # fused.convert: Refiner only
    p.add_argument("--batch", type=cli.positive_int, default=None)
    p.add_argument("--img", type=cli.positive_int, default=224)
    p.add_argument("--repeats", type=cli.positive_int, default=None)
    args = p.parse_args(argv)
    cli.check_img_size(args.img, MODEL_ARGS[args.model].get("patch_size", 16), "--img", error=p.error)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    batch = args.batch or (64 if gpu else 4)
    repeats = args.repeats or (20 if gpu else 3)
    name = torch.cuda.get_device_name() if gpu else "CPU (no GPU visible)"
    print(f"device: {name}; torch {torch.__version__}; timm {timm.__version__}")
    print(ops.describe_backends())
    if gpu:  # the Triton switches a GPU round measured fastest on this GPU model (refiner_kernels/settings.py)
        from refiner_kernels import settings
        print(f"triton settings tuned for this GPU: {settings.tuned_for(torch.device(device)) or 'none (defaults)'}")
    print()
    print(format_table(model_check(args.model, batch, args.img, device, repeats),
                 ["model", "error (eval: max |fused - ref|; train: rel. to float64)", "ref img/s",
                  "fused img/s", "speed-up"]))
    print()
    B, H, N, d = (64, 12, 197, 32) if gpu else (8, 12, 197, 32)
    rows = op_check(device, B, H, N, d, repeats * 2)
    print(f"ops at B={B}, H={H}, N={N}, d={d}, fp32 (median of {repeats * 2}):")
    print(format_table(rows, ["op", "backend", "max |err|", "reference ms", "fused ms", "speed-up"]) if rows
          else "  no compiled backend usable on this device: nothing to compare")


if __name__ == "__main__":
    cli.reexec_with_steady_malloc()
    main()
