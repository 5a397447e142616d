"""TF32 tensor-core dots under the Triton interpreter, so that the CPU tests see the GPU's numerics.

The interpreter computes every `tl.dot` on fp32 operands in full fp32, whatever its
input_precision. On the GPU, input_precision="tf32" gives the tensor cores TF32 operands (sign,
exponent, 10 mantissa bits) and accumulates in fp32. `install()` makes the interpreter drop each
fp32 operand's 13 low mantissa bits before its fp32 matmul (truncation, the coarser of truncation
and rounding); "tf32x3" and "ieee" dots are untouched. The kernels round their TF32 operands to
nearest first (refiner_kernels.kernels_refine_eval.tf32_round), so for them the emulation is exact.
"""
from __future__ import annotations

import numpy as np

_installed = False


def tf32(x: np.ndarray) -> np.ndarray:
    """x (float32) with its 13 low mantissa bits cleared (other dtypes unchanged)."""
    if x.dtype != np.float32:
        return x
    return (np.ascontiguousarray(x).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def install() -> None:
    global _installed
    if _installed:
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    plain = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if str(input_precision).upper().endswith("TF32"):  # the enum prints as InputPrecision.TF32
            a = interpreter.TensorHandle(tf32(a.data), a.dtype)
            b = interpreter.TensorHandle(tf32(b.data), b.dtype)
        return plain(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    _installed = True
