"""Drop-in fused Refiner attention and model conversion.

    from refiner.fused import RefinerAttention, convert
    layer = RefinerAttention(384, 12, qkv_bias=True, share_atten=True)   # same args + backend=
    convert(model)                      # swap every reference attention in place, keeping weights
    timm.create_model("refiner_vit_s", fused=True)

The fused layer has the reference layer's constructor, state dict and call signature
`(x, prev_attn) -> (out, attn_to_pass_on)`; only the arithmetic runs in fused ops. `convert`
also gives each Refiner-ViT block the bit-identical forward of `Block` (fewer element-wise passes).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import models, ops, reference

__all__ = ["RefinerAttention", "Block", "convert", "revert"]


def _autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class RefinerAttention(reference.RefinerAttention):
    """Refiner attention running on fused kernels; `backend` as in `refiner.ops`.

    Eval mode folds the BatchNorms into the refine kernel's weights; the fold is cached
    and recomputed whenever a parameter or running statistic changes (tracked by the
    tensors' version counters and storage), so it is never stale after `load_state_dict`,
    a step or `p.data = ...`. In-place edits through `p.data` bypass the version counter:
    `train()`/`eval()` drop the cache, so call `model.eval()` after such edits.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        ops.parse_backend(backend)  # a clear error now, not at the first forward
        self.backend = backend
        self._fold_key = None
        self._fold = None

    @classmethod
    def from_reference(cls, ref: reference.RefinerAttention, backend: str = "auto") -> "RefinerAttention":
        new = cls(ref.dim, ref.num_heads, qkv_bias=ref.qkv.bias is not None, qk_scale=ref.scale,
                  attn_drop=ref.attn_drop.p, proj_drop=ref.proj_drop.p, share_atten=ref.share_atten,
                  apply_transform=ref.apply_transform, expand_ratio=ref.expand_ratio,
                  kernel_size=ref.kernel_size, backend=backend)
        p = next(ref.parameters())
        new.to(device=p.device, dtype=p.dtype).train(ref.training)
        new.load_state_dict(ref.state_dict())
        return new

    def train(self, mode: bool = True):
        self._fold_key = None  # refold at the next eval forward (see the class docstring)
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    # -- eval-mode BatchNorm folding -----------------------------------------
    def _folded(self, dtype: torch.dtype) -> reference.FoldedRefine:
        tensors = list(self.DLA.parameters()) + list(self.DLA.buffers()) + \
            list(self.adapt_bn.parameters()) + list(self.adapt_bn.buffers())
        out_scale = self.scale if self.share_atten else 1.0
        if torch.compiler.is_compiling():  # version counters are not traceable; folding is cheap
            return _cast(reference.fold_refine(self.DLA, self.adapt_bn, out_scale), dtype)
        key = (dtype,) + tuple((id(t), t._version, t.data_ptr(), t.device) for t in tensors)
        if key != self._fold_key:
            ops.check_foldable(self.DLA, self.adapt_bn)
            self._fold = _cast(reference.fold_refine(self.DLA, self.adapt_bn, out_scale), dtype)
            self._fold_key = key
        return self._fold

    def forward(self, x: Tensor, prev_attn: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if self.training and (self.attn_drop.p > 0 or self.apply_transform):
            # Attention dropout sits between the softmax and its two uses, and the general
            # mode's training step needs the refined map itself: both run the reference.
            return super().forward(x, prev_attn)
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (B, N, {self.dim}) tokens, got shape {tuple(x.shape)}")
        B, N, C = x.shape
        H, d = self.num_heads, self.head_dim
        if prev_attn is not None and tuple(prev_attn.shape) != (B, H, N, N):
            raise ValueError(f"prev_attn: expected shape {(B, H, N, N)} (B, heads, N, N), "
                             f"got {tuple(prev_attn.shape)}")
        qkv = self.qkv(x)
        # Under autocast the ops run in the autocast dtype (their inputs must share a dtype).
        dtype = _autocast_dtype(x) or qkv.dtype
        if self.share_atten:
            if prev_attn is None:
                raise ValueError("prev_attn: a refine block (share_atten=True) needs the previous "
                                 "block's attention map, got None")
            # a view of qkv: refiner.ops copies it for the backends that need dense inputs
            v = qkv.reshape(B, N, H, d).permute(0, 2, 1, 3).to(dtype)
            a = prev_attn.to(dtype)
            if ops.uses_batch_stats(self.DLA, self.adapt_bn):
                out = ops.refine_block(a, v, self.DLA, self.adapt_bn, self.scale, backend=self.backend)
            else:
                out = ops.refine_eval(a, v, self._folded(dtype), backend=self.backend)
            attn_next = prev_attn
        else:
            # views of qkv: ops.softmax_block copies them for backends that need dense inputs
            q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).to(dtype)
            prev = prev_attn.to(dtype) if prev_attn is not None else None
            out, attn_next = ops.softmax_block(q, k, v, prev, self.scale, backend=self.backend)
            if self.apply_transform:  # eval, general mode: refine the block's own map and pass it on
                attn_next = self.adapt_bn(self.DLA(attn_next))
                out = attn_next @ v.to(attn_next.dtype)
        x = out.transpose(1, 2).reshape(B, N, C)  # a view where out is token-major (the Triton ops')
        return self.proj_drop(self.proj(x)), attn_next


class Block(models.Block):
    """The released block with its 0.5 scalings folded away: LN(a x; eps) == LN(x; eps / a^2) and
    x + y / a == x + (1/a) y hold bit for bit when a is a power of two (every scaling is then exact,
    and LayerNorm's mean, variance and rsqrt scale with it), so the four passes over the tokens that
    scale them (x * a twice, y / a twice) go, in the forward and in the backward. `convert` swaps
    the class of a block in place (same parameters and state dict); other ratios run the original."""

    def forward(self, x: Tensor, attn: Optional[Tensor] = None):
        a = self.adjust_ratio
        if math.frexp(a)[0] != 0.5:  # not a power of two: the rewrite would round differently
            return super().forward(x, attn)
        x_new, attn = self.attn(_layer_norm(self.norm1, x, a), attn)
        x = torch.add(x, self.drop_path(x_new), alpha=1 / a)
        x = torch.add(x, self.drop_path(self.mlp(_layer_norm(self.norm2, x, a))), alpha=1 / a)
        return x, attn


def _layer_norm(norm: nn.LayerNorm, x: Tensor, a: float) -> Tensor:
    """norm(x * a) without the product: LayerNorm is scale-equivariant up to its eps."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps / (a * a))


def _cast(f: reference.FoldedRefine, dtype: torch.dtype) -> reference.FoldedRefine:
    return reference.FoldedRefine(*(t.to(dtype) for t in f.args()[:-1]), expand=f.expand)


def _swap(model: nn.Module, make) -> nn.Module:
    """make(m) for the model, then for its children where it returned None (recursively); a module
    it returns replaces m. Returns the model, or its replacement (a bare layer given)."""
    new = make(model)
    if new is not None:
        return new
    for name, child in list(model.named_children()):
        new = _swap(child, make)
        if new is not child:
            setattr(model, name, new)
    return model


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every reference RefinerAttention in `model` by the fused one, in place, keeping weights,
    and give every Refiner-ViT block the forward of `Block` (its class swapped, nothing else). Returns
    the model; given a bare RefinerAttention, its fused replacement (use the return value)."""
    def make(m):
        if type(m) is reference.RefinerAttention:
            return RefinerAttention.from_reference(m, backend)
        if isinstance(m, RefinerAttention):
            ops.parse_backend(backend)
            m.backend = backend
            return m
        if type(m) is models.Block:
            m.__class__ = Block  # then on into its children
        return None
    return _swap(model, make)


def revert(model: nn.Module) -> nn.Module:
    """Inverse of `convert`: back to reference attention layers with the same weights (returns the model,
    or a bare layer's reference replacement)."""
    def make(m):
        if isinstance(m, RefinerAttention):
            ref = reference.RefinerAttention(
                m.dim, m.num_heads, qkv_bias=m.qkv.bias is not None, qk_scale=m.scale, attn_drop=m.attn_drop.p,
                proj_drop=m.proj_drop.p, share_atten=m.share_atten, apply_transform=m.apply_transform,
                expand_ratio=m.expand_ratio, kernel_size=m.kernel_size)
            p = next(m.parameters())
            ref.to(device=p.device, dtype=p.dtype).train(m.training)
            ref.load_state_dict(m.state_dict())
            return ref
        if type(m) is Block:
            m.__class__ = models.Block
        return None
    return _swap(model, make)
