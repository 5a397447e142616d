"""Triton kernels for Refiner attention (the ``triton`` backend).

Pure Python + Triton; never imports ``refiner._C``. Every function here has exactly the
signature of its counterpart in ``refiner.reference`` and is backed by a
``refiner_triton::*`` torch.library custom op (fake impl + autograd), so it runs eagerly,
under torch.compile and passes opcheck. On CPU tensors the kernels run only under the
Triton interpreter (``TRITON_INTERPRET=1`` set before importing triton).

``AVAILABLE`` / ``UNAVAILABLE_REASON`` are computed lazily on first access (no GPU-driver
call at import time).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from ._common import DTYPES, availability  # noqa: F401  (DTYPES: what refiner.ops may hand it)

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "DTYPES", "softmax_block", "refine_eval", "refine_train",
           "head_mix", "attn_dwconv", "row_softmax", "attn_value"]


def __getattr__(name):
    if name in ("AVAILABLE", "UNAVAILABLE_REASON"):
        ok, why = availability()
        return ok if name == "AVAILABLE" else why
    raise AttributeError(f"module 'refiner_kernels' has no attribute {name!r}")


def _ops():
    from . import ops
    return ops


# softmax_block reads q, k, v, and the refine ops read v, through their strides (unit-stride head
# dim; others are copied), and all three return out in (B, N, H, d) memory: refiner.ops passes the
# fused layer's views of its projections as they are.
TAKES_VIEWS = True


def softmax_block(q: Tensor, k: Tensor, v: Tensor, prev_attn: Optional[Tensor],
                  scale: float) -> Tuple[Tensor, Tensor]:
    """(B,H,N,d) x3 [, (B,H,N,N)] -> out (B,H,N,d) laid out as (B,N,H,d), attn (B,H,N,N)."""
    out, attn, _ = _ops().softmax_block_op(q, k, v, prev_attn, float(scale))
    return out, attn


def refine_eval(attn: Tensor, v: Tensor, w_exp: Tensor, b_exp: Tensor, w_dw: Tensor, b_dw: Tensor,
                w_pro: Tensor, b_pro: Tensor, alpha: Tensor, beta: Tensor, expand: bool) -> Tensor:
    """Evaluation-mode refine block with folded BatchNorms (see refiner.reference.refine_eval)."""
    return _ops().refine_eval_op(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta,
                                 bool(expand))


def head_mix(x: Tensor, w: Tensor) -> Tensor:
    """1x1 convolution over the head (channel) dim: (B,C,N,M), (C2,C) -> (B,C2,N,M)."""
    return _ops().head_mix_op(x, w)


def attn_dwconv(x: Tensor, w: Tensor) -> Tensor:
    """k x k depthwise convolution of each (N,M) map, zero 'same' padding: (B,C,N,M), (C,k,k)."""
    return _ops().attn_dwconv_op(x, w)


def row_softmax(x: Tensor) -> Tensor:
    """Softmax over the last dim (keys)."""
    return _ops().row_softmax_op(x)


def attn_value(a: Tensor, v: Tensor) -> Tensor:
    """(B,H,N,M) @ (B,H,M,d) -> (B,H,N,d)."""
    return _ops().attn_value_op(a, v)


def refine_train(attn: Tensor, v: Tensor, w_exp: Tensor, w_dw: Tensor, w_pro: Tensor,
                 g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor, g3: Tensor, b3: Tensor,
                 ga: Tensor, ba: Tensor, eps: float, scale: float, expand: bool):
    """Training-mode refine block with batch statistics (see refiner.reference.refine_train).

    Returns (out, (BNStats | None, BNStats, BNStats, BNStats)); the statistics are detached."""
    from refiner.reference import BNStats

    from .kernels_refine_train import save_y3
    res = _ops().refine_train_op(attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba,
                                 float(eps), float(scale), bool(expand), save_y3())
    out, m1, v1, m2, v2, m3, v3, ma, va = res[:9]
    s1 = BNStats(m1, v1) if expand else None
    return out, (s1, BNStats(m2, v2), BNStats(m3, v3), BNStats(ma, va))
