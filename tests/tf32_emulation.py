"""TF32 tensor-core dots under the Triton interpreter, so that the CPU tests see the GPU's numerics.

The interpreter computes every `tl.dot` on fp32 operands in full fp32, whatever its
input_precision. On the GPU, input_precision="tf32" gives the tensor cores TF32 operands (sign,
exponent, 10 mantissa bits) and accumulates in fp32. `install()` makes the interpreter drop each
fp32 operand's 13 low mantissa bits before its fp32 matmul (truncation, the coarser of truncation
and rounding); "ieee" dots are untouched. The kernels round their TF32 operands to nearest first
(refiner_kernels.kernels_refine_eval.tf32_round), so for them the emulation is exact.
"tf32x3" dots run as Triton compiles them (its F32DotTC pass, "3xTF32"): x = big + small with big
= x rounded to nearest TF32 (cvt.rna) and small = x - big in fp32, then three TF32 dots, small(a)
big(b) + big(a) small(b) + big(a) big(b) (the small operands truncated as above); a NaN in the sum
of the first two is taken as 0, as newer Triton versions do.
bf16 operands (which the interpreter holds as raw uint16 bits, and would multiply as integers) are
widened to fp32 exactly; the products of two bf16 values are exact in fp32, so the fp32 matmul is
the tensor cores' bf16 dot with fp32 accumulation (up to the order of the sums). A cast of fp32 to
bf16 (x.to(tl.bfloat16)) rounds to nearest, ties to even, as the GPU's does; the interpreter's own
truncates.
"""
from __future__ import annotations

import numpy as np

_installed = False


def tf32(x: np.ndarray) -> np.ndarray:
    """x (float32) with its 13 low mantissa bits cleared (other dtypes unchanged)."""
    if x.dtype != np.float32:
        return x
    return (np.ascontiguousarray(x).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def tf32_rna(x: np.ndarray) -> np.ndarray:
    """x (float32) rounded to the nearest TF32 value, ties away from zero (cvt.rna); NaN stays NaN."""
    u = np.ascontiguousarray(x).view(np.uint32)
    r = ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(np.isnan(x), x, r)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 x rounded to the nearest bf16, ties to even (the GPU's cvt.rn.bf16.f32), as uint16 bit
    patterns; NaN stays NaN (quiet, its sign kept)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = ((u >> np.uint32(16)) & np.uint32(0x8000) | np.uint32(0x7FC0)).astype(np.uint16)
    return np.where(np.isnan(x), nan, r)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 values held as uint16 bit patterns -> the same values in float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def install() -> None:
    global _installed
    if _installed:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    plain = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        mode = str(input_precision).upper()  # the enum prints as InputPrecision.TF32 / .TF32x3
        if a.data.dtype == np.uint16 and b.data.dtype == np.uint16:  # bf16 x bf16
            a = interpreter.TensorHandle(bf16_to_f32(a.data), tl.float32)
            b = interpreter.TensorHandle(bf16_to_f32(b.data), tl.float32)
            return plain(self, a, b, d, "ieee", max_num_imprecise_acc)
        if mode.endswith("TF32X3") and a.data.dtype == np.float32 and b.data.dtype == np.float32:
            def dot(x, y, acc):  # one TF32 dot (operands truncated) accumulating onto acc
                x, y = interpreter.TensorHandle(tf32(x), a.dtype), interpreter.TensorHandle(tf32(y), b.dtype)
                return plain(self, x, y, acc, input_precision, max_num_imprecise_acc)
            with np.errstate(invalid="ignore", over="ignore"):
                a_big, b_big = tf32_rna(a.data), tf32_rna(b.data)
                a_small, b_small = a.data - a_big, b.data - b_big
            zero = interpreter.TensorHandle(np.zeros_like(d.data), d.dtype)
            corr = dot(a_big, b_small, dot(a_small, b_big, zero))
            corr = interpreter.TensorHandle(np.where(np.isnan(corr.data), np.float32(0), corr.data), corr.dtype)
            big = dot(a_big, b_big, corr)
            return interpreter.TensorHandle((big.data + d.data).astype(d.data.dtype), d.dtype)
        if mode.endswith("TF32"):
            a = interpreter.TensorHandle(tf32(a.data), a.dtype)
            b = interpreter.TensorHandle(tf32(b.data), b.dtype)
        return plain(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    plain_trunc = builder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):  # x.to(tl.bfloat16): the interpreter's own truncates
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(f32_to_bf16(src.data).reshape(src.data.shape), dst_type.scalar)
        return plain_trunc(self, src, dst_type)

    builder.create_fp_trunc = create_fp_trunc
    _installed = True
