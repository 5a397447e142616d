"""The compiled backend (`refiner._C`): fake impls, autograd, and reference-signature wrappers.

Importing this module never raises: when the extension is missing or fails to load,
``AVAILABLE`` is False and ``UNAVAILABLE_REASON`` says why.

Every op accepts tensors of any strides (the C++ side makes them contiguous) and returns
contiguous tensors. Inputs must share one dtype (fp32, fp16, bf16; fp64 on CPU) and device.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import BNStats

AVAILABLE = False
UNAVAILABLE_REASON = ""
HAS_CUDA = False

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.refiner.*)
    AVAILABLE = True
    # Asked of the dispatcher's table, not by calling the has_cuda op: this import may first run
    # inside a trace (torch.export, torch.compile), which would record the call in the graph.
    HAS_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key("refiner::softmax_block", "CUDA")
except Exception as _e:  # ImportError, OSError (undefined symbols: built against another torch), ...
    UNAVAILABLE_REASON = (f"refiner._C could not be loaded ({type(_e).__name__}: {_e}); build it with "
                          "`pip install --no-build-isolation .` or `python setup.py build_ext --inplace`")

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "HAS_CUDA", "softmax_block", "refine_eval", "refine_train",
           "head_mix", "attn_dwconv", "row_softmax", "attn_value"]


def _require():
    if not AVAILABLE:
        raise RuntimeError(UNAVAILABLE_REASON)


CUDA_MAX_HEAD_SIZE = 128  # the CUDA kernels' limit (kMaxHeadDimCuda in csrc/checks.h)
# The CUDA kernels' dtypes (check_common in csrc/checks.h: float64 on the CPU only)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_cuda_head_size(name: str, t: Tensor):
    """Checked here as well as in C++: the H100 round of b7ff105 saw the process die (SIGSEGV) where
    the CUDA softmax_block's own check (head size 129) should have raised; see
    test_compiled_cuda.test_cuda_op_check_raises_in_a_subprocess."""
    if isinstance(t, Tensor) and t.is_cuda and t.dim() == 4 and t.shape[-1] > CUDA_MAX_HEAD_SIZE:
        raise ValueError(f"{name}: head size must be <= {CUDA_MAX_HEAD_SIZE} on CUDA, got {t.shape[-1]} "
                         f"(use backend='triton' or 'reference')")


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _register():
    """Fake impls and autograd of every refiner:: op (raises if the library lacks one)."""
    _lib = "refiner::"

    def _fake(name):
        return torch.library.register_fake(_lib + name)

    # ------------------------------------------------------------------ fake (meta) impls
    @_fake("softmax_block")
    def _(q, k, v, prev_attn, scale):
        B, H, N, d = q.shape
        return q.new_empty((B, H, N, d)), q.new_empty((B, H, N, N))

    @_fake("softmax_block_backward")
    def _(grad_out, grad_attn, q, k, v, attn, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), attn.new_empty(attn.shape)

    @_fake("refine_eval")
    def _(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand):
        return v.new_empty(v.shape)

    @_fake("refine_eval_backward")
    def _(grad_out, attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand):
        return tuple(t.new_empty(t.shape) for t in (attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta))

    @_fake("head_mix")
    def _(x, w):
        return x.new_empty((x.shape[0], w.shape[0], x.shape[2], x.shape[3]))

    @_fake("head_mix_backward")
    def _(grad, x, w):
        return x.new_empty(x.shape), w.new_empty(w.shape)

    @_fake("attn_dwconv")
    def _(x, w):
        return x.new_empty(x.shape)

    @_fake("attn_dwconv_backward")
    def _(grad, x, w):
        return x.new_empty(x.shape), w.new_empty(w.shape)

    @_fake("row_softmax")
    def _(x):
        return x.new_empty(x.shape)

    @_fake("row_softmax_backward")
    def _(grad, y):
        return y.new_empty(y.shape)

    @_fake("attn_value")
    def _(a, v):
        return a.new_empty((a.shape[0], a.shape[1], a.shape[2], v.shape[3]))

    @_fake("attn_value_backward")
    def _(grad, a, v):
        return a.new_empty(a.shape), v.new_empty(v.shape)

    @_fake("refine_train")
    def _(attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, eps, scale, expand, keep_y3=True):
        rH, H = w_dw.shape[0], attn.shape[1]
        y3_dtype = torch.float64 if attn.dtype == torch.float64 else torch.float32  # the compute dtype
        y3 = attn.new_empty(attn.shape if keep_y3 else (0,), dtype=y3_dtype)
        return (v.new_empty(v.shape), *(attn.new_empty((c,)) for c in (rH, rH, rH, rH, H, H, H, H)), y3)

    @_fake("refine_train_backward")
    def _(grad_out, attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, m1, v1, m2, v2, m3, v3, ma, va,
          y3, eps, scale, expand):
        return tuple(t.new_empty(t.shape) for t in (attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba))

    # ------------------------------------------------------------------ autograd
    def _sb_setup(ctx, inputs, output):
        q, k, v, prev_attn, scale = inputs
        ctx.scale = scale
        ctx.has_prev = prev_attn is not None
        ctx.save_for_backward(q, k, v, output[1])

    def _sb_backward(ctx, g_out, g_attn):
        q, k, v, attn = ctx.saved_tensors
        g_out = _zeros_if_none(g_out, q)
        g_attn = _zeros_if_none(g_attn, attn)
        gq, gk, gv, ga = torch.ops.refiner.softmax_block_backward(g_out, g_attn, q, k, v, attn, ctx.scale)
        return gq, gk, gv, (ga * ctx.scale if ctx.has_prev else None), None

    torch.library.register_autograd(_lib + "softmax_block", _sb_backward, setup_context=_sb_setup)

    def _re_setup(ctx, inputs, output):
        ctx.expand = inputs[-1]
        ctx.save_for_backward(*inputs[:-1])

    def _re_backward(ctx, g):
        saved = ctx.saved_tensors
        grads = list(torch.ops.refiner.refine_eval_backward(g, *saved, ctx.expand))
        if not ctx.expand:  # w_exp, b_exp are unused
            grads[2] = grads[3] = None
        return (*grads, None)

    torch.library.register_autograd(_lib + "refine_eval", _re_backward, setup_context=_re_setup)

    def _rt_setup(ctx, inputs, output):  # output: out, 8 batch statistics, y3 (empty without keep_y3)
        tensors = inputs[:13]  # setup_context sees every argument, defaults filled in
        ctx.eps, ctx.scale, ctx.expand = inputs[13:16]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # else the backward gets an A-sized zero gradient of y3
        ctx.save_for_backward(*tensors, *output[1:])

    def _rt_backward(ctx, g, *_stat_grads):
        saved = ctx.saved_tensors
        if g is None:
            g = torch.zeros_like(saved[1])
        grads = list(torch.ops.refiner.refine_train_backward(g, *saved, ctx.eps, ctx.scale, ctx.expand))
        if not ctx.expand:  # w_exp, g1, b1 are unused
            grads[2] = grads[5] = grads[6] = None
        # the dispatcher drops keep_y3 when it equals its default; torch <= 2.13 wants exactly one
        # gradient per input it saw
        return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))

    torch.library.register_autograd(_lib + "refine_train", _rt_backward, setup_context=_rt_setup)

    def _two_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _hm_backward(ctx, g):
        return tuple(torch.ops.refiner.head_mix_backward(g, *ctx.saved_tensors))

    def _dw_backward(ctx, g):
        return tuple(torch.ops.refiner.attn_dwconv_backward(g, *ctx.saved_tensors))

    def _av_backward(ctx, g):
        return tuple(torch.ops.refiner.attn_value_backward(g, *ctx.saved_tensors))

    torch.library.register_autograd(_lib + "head_mix", _hm_backward, setup_context=_two_setup)
    torch.library.register_autograd(_lib + "attn_dwconv", _dw_backward, setup_context=_two_setup)
    torch.library.register_autograd(_lib + "attn_value", _av_backward, setup_context=_two_setup)

    def _rs_setup(ctx, inputs, output):
        ctx.save_for_backward(output)

    def _rs_backward(ctx, g):
        (y,) = ctx.saved_tensors
        return torch.ops.refiner.row_softmax_backward(g, y)

    torch.library.register_autograd(_lib + "row_softmax", _rs_backward, setup_context=_rs_setup)

    # The backward ops have no derivative of their own. Unregistered, torch's autograd fallback would
    # only warn and give a gradient of a gradient (create_graph=True, e.g. a gradient penalty) of zero.
    def _no_double_backward(name):
        def backward(ctx, *grads):
            raise RuntimeError(f"refiner::{name}: the fused kernels have no double backward (a gradient of "
                               "a gradient through them); use backend='reference' for higher-order gradients")

        torch.library.register_autograd(_lib + name, backward, setup_context=lambda ctx, inputs, output: None)

    for name in ("softmax_block", "refine_eval", "refine_train", "head_mix", "attn_dwconv", "row_softmax",
                 "attn_value"):
        _no_double_backward(name + "_backward")


if AVAILABLE:
    try:
        _register()
    except Exception as _e:  # e.g. a stale build without some op
        AVAILABLE = False
        HAS_CUDA = False
        UNAVAILABLE_REASON = (f"refiner._C is loaded but incomplete ({type(_e).__name__}: {_e}); rebuild it with "
                              "`pip install --no-build-isolation .`")


# ---------------------------------------------------------------------- public functions
def softmax_block(q: Tensor, k: Tensor, v: Tensor, prev_attn: Optional[Tensor],
                  scale: float) -> Tuple[Tensor, Tensor]:
    """(B,H,N,d) x3 [, (B,H,N,N)] -> out (B,H,N,d), attn (B,H,N,N). See `reference.softmax_block`."""
    _require()
    _check_cuda_head_size("q", q)
    out, attn = torch.ops.refiner.softmax_block(q, k, v, prev_attn, float(scale))
    return out, attn


def refine_eval(attn: Tensor, v: Tensor, w_exp: Tensor, b_exp: Tensor, w_dw: Tensor, b_dw: Tensor,
                w_pro: Tensor, b_pro: Tensor, alpha: Tensor, beta: Tensor, expand: bool) -> Tensor:
    """Fused eval-mode refine block (BNs folded). See `reference.refine_eval`."""
    _require()
    _check_cuda_head_size("v", v)
    return torch.ops.refiner.refine_eval(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta,
                                         bool(expand))


def train_keeps_y3() -> bool:
    """REFINER_TRAIN_SAVE_Y3=1 (the default): refine_train's forward returns its Y3 map (an fp32
    A-sized tensor; fp64 for fp64 maps) and autograd keeps it for the backward, which then skips one
    of a training step's six streamed passes over the expanded maps, with the same results. 0: the
    backward recomputes Y3 (the memory-lean choice). The Triton backend's switch is
    REFINER_TRITON_TRAIN_SAVE_Y3."""
    mode = os.environ.get("REFINER_TRAIN_SAVE_Y3", "1")
    if mode not in ("0", "1"):
        raise ValueError(f"REFINER_TRAIN_SAVE_Y3: expected '0' or '1', got {mode!r}")
    return mode == "1"


def refine_train(attn: Tensor, v: Tensor, w_exp: Tensor, w_dw: Tensor, w_pro: Tensor,
                 g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor, g3: Tensor, b3: Tensor,
                 ga: Tensor, ba: Tensor, eps: float, scale: float, expand: bool
                 ) -> Tuple[Tensor, Tuple[Optional[BNStats], BNStats, BNStats, BNStats]]:
    """Training-mode refine block with batch statistics. See `reference.refine_train`."""
    _require()
    _check_cuda_head_size("v", v)
    res = torch.ops.refiner.refine_train(attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba,
                                         float(eps), float(scale), bool(expand), train_keeps_y3())
    out, m1, v1, m2, v2, m3, v3, ma, va, _y3 = res  # y3: autograd's, for the backward
    s1 = BNStats(m1, v1) if expand else None
    return out, (s1, BNStats(m2, v2), BNStats(m3, v3), BNStats(ma, va))


def head_mix(x: Tensor, w: Tensor) -> Tensor:
    """1x1 conv over heads: (B,C,N,M), (C2,C) -> (B,C2,N,M)."""
    _require()
    return torch.ops.refiner.head_mix(x, w)


def attn_dwconv(x: Tensor, w: Tensor) -> Tensor:
    """k x k depthwise conv with zero 'same' padding: (B,C,N,M), (C,k,k)."""
    _require()
    return torch.ops.refiner.attn_dwconv(x, w)


def row_softmax(x: Tensor) -> Tensor:
    """Softmax over the last dim."""
    _require()
    return torch.ops.refiner.row_softmax(x)


def attn_value(a: Tensor, v: Tensor) -> Tensor:
    """(B,H,N,M) @ (B,H,M,d) -> (B,H,N,d)."""
    _require()
    return torch.ops.refiner.attn_value(a, v)
