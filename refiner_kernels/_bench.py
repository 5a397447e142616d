"""GPU timing and peak memory of the Triton ops against the reference (GPU only).

    python -m refiner_kernels._bench [--batch 8] [--dtype bf16] [--n 197] [--json out.json]

Prints forward and forward+backward times (median of CUDA-event timings) and the peak extra
memory of a training step of the refine block, for Refiner-ViT-S shapes (H = 12, d = 32).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch


def _time(fn, reps=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def main():
    import refiner_kernels as rk
    from refiner import reference as ref
    from refiner.reference import DLA

    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n", type=int, default=197)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--ratio", type=int, default=3)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    B, H, N, d = a.batch, a.heads, a.n, a.d
    dev = "cuda"
    s = d ** -0.5
    q, k, v = (torch.randn(B, H, N, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    prev = torch.randn(B, H, N, N, device=dev).softmax(-1).to(dt).requires_grad_(True)
    dla = DLA(H, a.ratio, a.kernel).to(dev)
    bn = torch.nn.BatchNorm2d(H).to(dev)
    dla.eval()
    bn.eval()
    f = ref.fold_refine(dla, bn, s)
    fargs = [t.to(dt) for t in f.args()[:-1]]
    expand = f.expand
    targs = [t.detach().to(dt).requires_grad_(True) for t in (
        dla.conv_exp.weight[:, :, 0, 0], dla.depth_sep_conv.weight[:, 0], dla.conv_pro.weight[:, :, 0, 0],
        dla.bn1.weight, dla.bn1.bias, dla.bn2.weight, dla.bn2.bias, dla.bn3.weight, dla.bn3.bias,
        bn.weight, bn.bias)]
    rows = []

    def bench(name, fwd):
        with torch.no_grad():
            t_f = _time(fwd)

        def step():
            out = fwd()
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()
        t_fb = _time(step, reps=10, warmup=3)
        mem = _peak(step)
        rows.append(dict(op=name, fwd_ms=t_f, fwd_bwd_ms=t_fb, peak_mib=mem))
        print(f"{name:34s} fwd {t_f:8.3f} ms   fwd+bwd {t_fb:8.3f} ms   peak {mem:8.1f} MiB", flush=True)

    bench("softmax_block triton", lambda: rk.softmax_block(q, k, v, prev, s))
    bench("softmax_block reference", lambda: ref.softmax_block(q, k, v, prev, s))
    bench("refine_eval triton", lambda: rk.refine_eval(prev, v, *fargs, expand))
    bench("refine_eval reference", lambda: ref.refine_eval(prev, v, *fargs, expand))
    bench("refine_train triton", lambda: rk.refine_train(prev, v, *targs, 1e-5, s, expand))
    bench("refine_train reference", lambda: ref.refine_train(prev, v, *targs, 1e-5, s, expand))
    a_mib = prev.numel() * prev.element_size() / 2 ** 20
    print(f"(size of A: {a_mib:.1f} MiB; B={B} H={H} N={N} d={d} k={a.kernel} r={a.ratio} {a.dtype}, "
          f"{torch.cuda.get_device_name()})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(config=vars(a), size_of_A_mib=a_mib, device=torch.cuda.get_device_name(), rows=rows),
                      fh, indent=1)


if __name__ == "__main__":
    main()
