"""CPU benchmark: fused refiner._C ops vs the PyTorch reference, side by side.

    python benchmarks/bench_cpu_ops.py [--repeats 15] [--threads 2]

Prints median wall time (ms) per op at B=8, H=12, N=197, d=32, fp32. Baseline and fused runs are
interleaved so that both see the same background load. The last rows compare refine_train's
default (streamed passes, Y3 kept for the backward) with the ATen chunk passes
(REFINER_TRAIN_PATH=chunk) and with the backward's own Y3 pass (REFINER_TRAIN_SAVE_Y3=0).
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.common import gc_paused  # noqa: E402
from refiner import _compiled as C  # noqa: E402
from refiner import cli  # noqa: E402
from refiner import reference as R  # noqa: E402
from refiner.testing import random_dla, train_args  # noqa: E402


def paired_ms(fn_base, fn_fused, repeats, warmup=1):
    """Median ms of each, runs interleaved (base, fused, base, ...) so both see the same machine load."""
    for _ in range(warmup):
        fn_base()
        fn_fused()
    tb, tf = [], []
    with gc_paused():
        for _ in range(repeats):
            for fn, ts in ((fn_base, tb), (fn_fused, tf)):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(tb), statistics.median(tf)


def with_env(name, value, fn):
    """fn run with the environment variable set (the compiled ops read their switches at each call)."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=cli.positive_int, default=15)
    ap.add_argument("--threads", type=cli.positive_int, default=2)
    ap.add_argument("--B", type=cli.positive_int, default=8)
    ap.add_argument("--H", type=cli.positive_int, default=12)
    ap.add_argument("--N", type=cli.positive_int, default=197)
    ap.add_argument("--d", type=cli.positive_int, default=32)
    ap.add_argument("--no-train", action="store_true")
    a = ap.parse_args(argv)
    if not C.AVAILABLE:
        sys.exit(C.UNAVAILABLE_REASON)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    B, H, N, d = a.B, a.H, a.N, a.d
    s = d ** -0.5
    attn = torch.randn(B, H, N, N).softmax(-1)
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    dla, bn = [m.eval() for m in random_dla(H, 3, 3)]
    f = R.fold_refine(dla, bn, s)
    rows = []
    with torch.no_grad():
        rows.append(("refine eval fwd", "module adapt_bn(DLA(A))*s@v",
                     *paired_ms(lambda: (bn(dla(attn)) * s) @ v, lambda: C.refine_eval(attn, v, *f.args()), a.repeats)))
        rows.append(("refine eval fwd", "reference.refine_eval (folded)",
                     *paired_ms(lambda: R.refine_eval(attn, v, *f.args()), lambda: C.refine_eval(attn, v, *f.args()),
                                a.repeats)))
        rows.append(("softmax block fwd", "reference.softmax_block",
                     *paired_ms(lambda: R.softmax_block(q, k, v, attn, s), lambda: C.softmax_block(q, k, v, attn, s),
                                a.repeats)))

    # forward + backward
    def fb(fn, inputs):
        def run():
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out.sum(), inputs)
        return run

    A = attn.clone().requires_grad_()
    V = v.clone().requires_grad_()
    P = [t.clone().requires_grad_() for t in f.args()[:-1]]
    nb = max(3, a.repeats // 3)
    rows.append(("refine eval fwd+bwd", "reference.refine_eval (folded)",
                 *paired_ms(fb(lambda: R.refine_eval(A, V, *P, True), [A, V] + P),
                            fb(lambda: C.refine_eval(A, V, *P, True), [A, V] + P), nb)))
    Q, K, Vq = (t.clone().requires_grad_() for t in (q, k, v))
    rows.append(("softmax block fwd+bwd", "reference.softmax_block",
                 *paired_ms(fb(lambda: R.softmax_block(Q, K, Vq, A, s), [Q, K, Vq, A]),
                            fb(lambda: C.softmax_block(Q, K, Vq, A, s), [Q, K, Vq, A]), nb)))
    if not a.no_train and hasattr(torch.ops.refiner, "refine_train"):
        dla_t, bn_t = [m.eval() for m in random_dla(H, 3, 3)]
        W = [t.detach().clone().requires_grad_() for t in train_args(dla_t, bn_t)]
        fused_train = fb(lambda: C.refine_train(A, V, *W, 1e-5, s, True), [A, V] + W)
        rows.append(("refine train fwd+bwd", "reference.refine_train",
                     *paired_ms(fb(lambda: R.refine_train(A, V, *W, 1e-5, s, True), [A, V] + W), fused_train, nb)))
        rows.append(("refine train fwd+bwd", "fused, REFINER_TRAIN_PATH=chunk",
                     *paired_ms(with_env("REFINER_TRAIN_PATH", "chunk", fused_train), fused_train, nb)))
        rows.append(("refine train fwd+bwd", "fused, REFINER_TRAIN_SAVE_Y3=0",
                     *paired_ms(with_env("REFINER_TRAIN_SAVE_Y3", "0", fused_train), fused_train, nb)))

    print(f"CPU, torch {torch.__version__}, threads={torch.get_num_threads()}, B={B} H={H} N={N} d={d} fp32, "
          f"median of {a.repeats} (fwd) / {nb} (fwd+bwd) interleaved runs, malloc {cli.malloc_mode()}")
    print(f"| {'op':22s} | {'baseline':32s} | {'baseline ms':>11s} | {'fused ms':>9s} | {'speed-up':>8s} |")
    print(f"|{'-' * 24}|{'-' * 34}|{'-' * 13}|{'-' * 11}|{'-' * 10}|")
    for op, base, tb, tf in rows:
        print(f"| {op:22s} | {base:32s} | {tb:11.2f} | {tf:9.2f} | {tb / tf:7.2f}x |")


if __name__ == "__main__":
    cli.run_benchmark(main)
