"""torch.library custom ops of the Triton backend (namespace ``refiner_triton``).

Each op is a ``torch.library.custom_op`` (not ``triton_op``: see DESIGN section 5) with a
fake implementation and a registered autograd formula whose backward is itself a custom op,
so the ops work eagerly, under torch.compile (no graph break) and pass opcheck.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import kernels_softmax as _sb
from ._common import token_major

_lib = "refiner_triton"


# ----------------------------------------------------------------------------- softmax_block

@torch.library.custom_op(f"{_lib}::softmax_block", mutates_args=())
def softmax_block_op(q: Tensor, k: Tensor, v: Tensor, prev_attn: Optional[Tensor],
                     scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (out, attn, lse); lse (B,H,N) fp32 is the row log-sum-exp kept for the backward."""
    return _sb.softmax_block_fwd(q, k, v, prev_attn, scale)


@softmax_block_op.register_fake
def _(q, k, v, prev_attn, scale):
    B, H, N, D = q.shape
    return (token_major(B, H, N, D, q), q.new_empty(B, H, N, N),
            q.new_empty(B, H, N, dtype=torch.float32))


@torch.library.custom_op(f"{_lib}::softmax_block_bwd", mutates_args=())
def softmax_block_bwd_op(dout: Tensor, dattn: Tensor, q: Tensor, k: Tensor, v: Tensor,
                         prev_attn: Optional[Tensor], lse: Tensor, scale: float
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dprev = _sb.softmax_block_bwd(dout, dattn, q, k, v, prev_attn, lse, scale)
    if dprev is None:
        dprev = q.new_empty(0)
    return dq, dk, dv, dprev


@softmax_block_bwd_op.register_fake
def _(dout, dattn, q, k, v, prev_attn, lse, scale):
    # contiguous gradients whatever q, k, v's strides (the kernels run on contiguous copies)
    dprev = prev_attn.new_empty(prev_attn.shape) if prev_attn is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dprev


def _sb_setup(ctx, inputs, output):
    q, k, v, prev_attn, scale = inputs
    ctx.scale = scale
    ctx.has_prev = prev_attn is not None
    ctx.save_for_backward(q, k, v, prev_attn, output[2])


def _sb_backward(ctx, dout, dattn, dlse):
    q, k, v, prev_attn, lse = ctx.saved_tensors
    dq, dk, dv, dprev = softmax_block_bwd_op(dout, dattn, q, k, v, prev_attn, lse, ctx.scale)
    return dq, dk, dv, (dprev if ctx.has_prev else None), None


softmax_block_op.register_autograd(_sb_backward, setup_context=_sb_setup)


# ----------------------------------------------------------------------------- refine_eval

from . import kernels_refine_eval as _re  # noqa: E402


@torch.library.custom_op(f"{_lib}::refine_eval", mutates_args=())
def refine_eval_op(attn: Tensor, v: Tensor, w_exp: Tensor, b_exp: Tensor, w_dw: Tensor,
                   b_dw: Tensor, w_pro: Tensor, b_pro: Tensor, alpha: Tensor, beta: Tensor,
                   expand: bool) -> Tensor:
    return _re.refine_eval_fwd(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand)


@refine_eval_op.register_fake
def _(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand):
    B, H, N, _ = attn.shape
    return token_major(B, H, N, v.shape[-1], v)


@torch.library.custom_op(f"{_lib}::refine_eval_bwd", mutates_args=())
def refine_eval_bwd_op(dout: Tensor, attn: Tensor, v: Tensor, w_exp: Tensor, b_exp: Tensor,
                       w_dw: Tensor, b_dw: Tensor, w_pro: Tensor, b_pro: Tensor, alpha: Tensor,
                       beta: Tensor, expand: bool) -> List[Tensor]:
    return list(_re.refine_eval_bwd(dout, attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro,
                                    alpha, beta, expand))


@refine_eval_bwd_op.register_fake
def _(dout, attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand):
    # contiguous gradients whatever the inputs' strides
    return [t.new_empty(t.shape) for t in (attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta)]


def _re_setup(ctx, inputs, output):
    ctx.expand = inputs[-1]
    ctx.save_for_backward(*inputs[:-1])


def _re_backward(ctx, dout):
    grads = refine_eval_bwd_op(dout, *ctx.saved_tensors, ctx.expand)
    return (*grads, None)


refine_eval_op.register_autograd(_re_backward, setup_context=_re_setup)


# ----------------------------------------------------------------------------- building blocks

from . import blocks as _bl  # noqa: E402


@torch.library.custom_op(f"{_lib}::head_mix", mutates_args=())
def head_mix_op(x: Tensor, w: Tensor) -> Tensor:
    return _bl.head_mix_fwd(x, w)


@head_mix_op.register_fake
def _(x, w):
    B, C, N, M = x.shape
    return x.new_empty(B, w.shape[0], N, M)


@torch.library.custom_op(f"{_lib}::head_mix_bwd", mutates_args=())
def head_mix_bwd_op(dy: Tensor, x: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    return _bl.head_mix_bwd(dy, x, w)


@head_mix_bwd_op.register_fake
def _(dy, x, w):
    return torch.empty_like(x), torch.empty_like(w)


def _save_all(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


head_mix_op.register_autograd(lambda ctx, dy: head_mix_bwd_op(dy, *ctx.saved_tensors), setup_context=_save_all)


@torch.library.custom_op(f"{_lib}::attn_dwconv", mutates_args=())
def attn_dwconv_op(x: Tensor, w: Tensor) -> Tensor:
    return _bl.attn_dwconv_fwd(x, w)


@attn_dwconv_op.register_fake
def _(x, w):
    return torch.empty_like(x)


@torch.library.custom_op(f"{_lib}::attn_dwconv_bwd", mutates_args=())
def attn_dwconv_bwd_op(dy: Tensor, x: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    return _bl.attn_dwconv_bwd(dy, x, w)


@attn_dwconv_bwd_op.register_fake
def _(dy, x, w):
    return torch.empty_like(x), torch.empty_like(w)


attn_dwconv_op.register_autograd(lambda ctx, dy: attn_dwconv_bwd_op(dy, *ctx.saved_tensors),
                                 setup_context=_save_all)


@torch.library.custom_op(f"{_lib}::row_softmax", mutates_args=())
def row_softmax_op(x: Tensor) -> Tensor:
    return _bl.row_softmax_fwd(x)


@row_softmax_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op(f"{_lib}::row_softmax_bwd", mutates_args=())
def row_softmax_bwd_op(dy: Tensor, y: Tensor) -> Tensor:
    return _bl.row_softmax_bwd(dy, y)


@row_softmax_bwd_op.register_fake
def _(dy, y):
    return torch.empty_like(y)


def _save_out(ctx, inputs, output):
    ctx.save_for_backward(output)


row_softmax_op.register_autograd(lambda ctx, dy: row_softmax_bwd_op(dy, ctx.saved_tensors[0]),
                                 setup_context=_save_out)


@torch.library.custom_op(f"{_lib}::attn_value", mutates_args=())
def attn_value_op(a: Tensor, v: Tensor) -> Tensor:
    return _bl.attn_value_fwd(a, v)


@attn_value_op.register_fake
def _(a, v):
    return a.new_empty(*a.shape[:-1], v.shape[-1], dtype=torch.result_type(a, v))


@torch.library.custom_op(f"{_lib}::attn_value_bwd", mutates_args=())
def attn_value_bwd_op(dout: Tensor, a: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    return _bl.attn_value_bwd(dout, a, v)


@attn_value_bwd_op.register_fake
def _(dout, a, v):
    return torch.empty_like(a), torch.empty_like(v)


attn_value_op.register_autograd(lambda ctx, dy: attn_value_bwd_op(dy, *ctx.saved_tensors),
                                setup_context=_save_all)


# ----------------------------------------------------------------------------- refine_train

from . import kernels_refine_train as _rt  # noqa: E402


@torch.library.custom_op(f"{_lib}::refine_train", mutates_args=())
def refine_train_op(attn: Tensor, v: Tensor, w_exp: Tensor, w_dw: Tensor, w_pro: Tensor,
                    g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor, g3: Tensor, b3: Tensor,
                    ga: Tensor, ba: Tensor, eps: float, scale: float, expand: bool,
                    keep_y3: bool = True) -> List[Tensor]:
    """Returns [out, mean1, var1, mean2, var2, mean3, var3, mean_a, var_a, aux, y3].

    The statistics are the biased batch statistics (non-differentiable; mean1/var1 are zeros when
    not expand); aux (fp32) carries the moments the backward needs, y3 the forward's Y3 buffer when
    keep_y3 (refiner_kernels.refine_train passes kernels_refine_train.save_y3()), else empty; the
    output shapes then follow the arguments alone, as torch.compile's fake tensors need."""
    out, st, aux, y3 = _rt.refine_train_fwd(attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba,
                                            eps, scale, expand, keep_y3)
    stats = [st[k].to(attn.dtype) for k in ("mu1", "var1", "mu2", "var2", "mu3", "var3", "muZ", "varZ")]
    return [out] + stats + [aux, y3]


@refine_train_op.register_fake
def _(attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, eps, scale, expand, keep_y3=True):
    B, H, N, _ = attn.shape
    RH = w_dw.shape[0]
    out = token_major(B, H, N, v.shape[-1], v)
    stats = [attn.new_empty(RH)] * 4 + [attn.new_empty(H)] * 4
    y3 = attn.new_empty(attn.shape if keep_y3 else (0,), dtype=torch.float32)
    return [out] + [s.clone() for s in stats] + [attn.new_empty(_rt.aux_size(H, RH), dtype=torch.float32), y3]


@torch.library.custom_op(f"{_lib}::refine_train_bwd", mutates_args=())
def refine_train_bwd_op(dout: Tensor, attn: Tensor, v: Tensor, w_exp: Tensor, w_dw: Tensor, w_pro: Tensor,
                        g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor, g3: Tensor, b3: Tensor,
                        ga: Tensor, ba: Tensor, aux: Tensor, y3: Tensor, eps: float, scale: float,
                        expand: bool) -> List[Tensor]:
    return _rt.refine_train_bwd(dout, attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, aux, y3,
                                eps, scale, expand)


@refine_train_bwd_op.register_fake
def _(dout, attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, aux, y3, eps, scale, expand):
    # contiguous gradients whatever the inputs' strides
    return [t.new_empty(t.shape) for t in (attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba)]


def _one_per_input(ctx, grads):
    """grads, then None for each other input the op was called with: torch's dispatcher drops an
    argument equal to its default (keep_y3=True) before autograd sees it, and torch <= 2.13 wants
    exactly one gradient per input it saw (newer releases trim the extras)."""
    return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))


def _rt_setup(ctx, inputs, output):
    ctx.eps, ctx.scale, ctx.expand = inputs[13], inputs[14], inputs[15]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else the backward gets an A-sized fp32 zero gradient of y3
    ctx.save_for_backward(*inputs[:13], output[-2], output[-1])


def _rt_backward(ctx, grads):
    *ins, aux, y3 = ctx.saved_tensors
    dout = grads[0] if grads[0] is not None else torch.zeros_like(ins[1])  # (out unused)
    g = refine_train_bwd_op(dout, *ins, aux, y3, ctx.eps, ctx.scale, ctx.expand)
    return _one_per_input(ctx, g)


refine_train_op.register_autograd(_rt_backward, setup_context=_rt_setup)
