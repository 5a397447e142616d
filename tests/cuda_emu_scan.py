"""Worst errors of the compiled refine_eval backward over random shapes, on the CUDA emulator.

    python tests/cuda_emu_scan.py [--shapes 120] [--seed 7] [--train]

For each random shape (B <= 2, H <= 16, N <= 40, d <= 40, ratio 1-6, k 1-7, a random dtype;
dyadic maps and weights, so no relu6 gate flips against fp64) it runs refine_eval_backward on the
tensor-core kernel and on the CUDA-core kernel (REFINER_CUDA_TENSOR_CORES=1 / 0) and prints, per
dtype and kernel, the worst relative 2-norm error of a gradient against the fp64 reference (the
figures in docs/cuda_kernels.md and the criteria of tests/utils.check_tensor_core_refine_backward).

--train: refine_train's passes instead (fp32, B <= 2, H <= 16, N <= 40, ratio 1-6, k 1-7, random
inputs), each on the tensor-core and the CUDA-core kernel: per pass, the worst relative 2-norm error
of an output against the fp64 statement of the pass (tests/test_cuda_emu_train.pass_ref).
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_emu  # noqa: E402
from test_compiled_ops import refine_inputs  # noqa: E402
from utils import REFINE_NAMES  # noqa: E402
from refiner import reference as R  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=int, default=120)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--train", action="store_true", help="refine_train's passes instead")
    args = p.parse_args(argv)
    E = cuda_emu.load()
    rng = random.Random(args.seed)
    if args.train:
        return scan_train(E, rng, args.shapes)
    worst = {}
    for i in range(args.shapes):
        shape = (rng.randint(1, 2), rng.randint(1, 16), rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 6),
                 rng.choice([1, 3, 5, 7]))
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        torch.manual_seed(i)
        ins, expand = refine_inputs(*shape, dtype, seed=i, dyadic=True)
        gout = torch.randn_like(ins[1])
        ref = [t.double().requires_grad_() for t in ins]
        R.refine_eval(*ref, expand).backward(gout.double())
        for kernel, switch in (("tensor cores", "1"), ("CUDA cores", "0")):
            os.environ["REFINER_CUDA_TENSOR_CORES"] = switch
            for name, g, t in zip(REFINE_NAMES, E.refine_eval_backward(gout, *ins, expand), ref):
                if t.grad is None:
                    continue
                err = ((g.double() - t.grad).norm() / t.grad.norm().clamp_min(1e-30)).item()
                key = (str(dtype).split(".")[-1], kernel)
                if err > worst.get(key, (0.0,))[0]:
                    worst[key] = (err, name, shape)
    for (dtype, kernel), (err, name, shape) in sorted(worst.items()):
        print(f"{dtype:9s} {kernel:12s} worst {err:.2e} (grad {name}, B H N d ratio k = {shape})")


def scan_train(E, rng, shapes: int) -> None:
    from test_cuda_emu_train import NAMES, PASSES, pass_inputs, pass_ref, run_pass
    worst = {}
    for i in range(shapes):
        shape = (rng.randint(1, 2), rng.randint(1, 16), rng.randint(1, 40), rng.randint(1, 6), rng.choice([1, 3, 5, 7]))
        expand = shape[3] != 1
        A, p, gy3, gz = pass_inputs(*shape, torch.float32, seed=i)
        for which in PASSES[:4] + (PASSES[4:] if expand else []):
            ref = pass_ref(which, A, p, gy3, gz, expand)
            for kernel, switch in (("tensor cores", "1"), ("CUDA cores", "0")):
                os.environ["REFINER_CUDA_TENSOR_CORES"] = switch
                for name, got, e in zip(NAMES, run_pass(E._train_pass, which, A, p, gy3, gz, expand), ref):
                    if e is None:
                        continue
                    err = ((got.double() - e).norm() / e.norm().clamp_min(1e-30)).item()
                    if err > worst.get((which, kernel), (0.0,))[0]:
                        worst[(which, kernel)] = (err, name, shape)
    for (which, kernel), (err, name, shape) in sorted(worst.items()):
        print(f"{which:10s} {kernel:12s} worst {err:.2e} ({name}, B H N ratio k = {shape})")


if __name__ == "__main__":
    main()
