"""Pure-PyTorch reference of Refiner attention: the ground truth for every kernel.

Two layers of reference live here:

* Modules (`DLA`, `RefinerAttention`) laid out exactly like the released
  Refiner-ViT implementation (same sub-module names, hence the same state-dict
  keys, and the same arithmetic order).
* Functional ops (`softmax_block`, `refine_eval`, `refine_train`, `head_mix`,
  `attn_dwconv`, `row_softmax`, `attn_value`) with the exact signatures the
  compiled (`refiner._C`) and Triton (`refiner_kernels`) backends implement.
  Tests compare every backend against these, and these against the modules.

Shapes: B batch, H heads, N tokens, d head size, r expansion ratio, k kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DLA", "RefinerAttention", "BNStats", "FoldedRefine", "fold_refine",
    "softmax_block", "refine_eval", "refine_train", "head_mix", "attn_dwconv",
    "row_softmax", "attn_value", "update_running_stats",
]


# ----------------------------------------------------------------------------
# Modules (state-dict compatible with the released implementation)
# ----------------------------------------------------------------------------

class DLA(nn.Module):
    """Distributed local attention: refines an H-channel attention map.

    x + BN3(W_p relu6(BN2(dw_k(relu6(BN1(W_e x))))))  with W_e: H -> rH 1x1 conv,
    dw_k a k x k depthwise conv with zero 'same' padding, W_p: rH -> H 1x1 conv.
    With expand_ratio == 1 the expansion stage (conv_exp, bn1, relu6) is absent,
    as in the released code.
    """

    def __init__(self, heads: int, expand_ratio: int = 3, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        hidden = round(heads * expand_ratio)
        self.expand_ratio = expand_ratio
        self.kernel_size = kernel_size
        if expand_ratio != 1:
            self.conv_exp = nn.Conv2d(heads, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
        # Symmetric padding k // 2 equals the released 'same' padding for odd k.
        self.depth_sep_conv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2,
                                        groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv_pro = nn.Conv2d(hidden, heads, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(heads)
        self.relu = nn.ReLU6(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.expand_ratio != 1:
            y = self.relu(self.bn1(self.conv_exp(y)))
        y = self.relu(self.bn2(self.depth_sep_conv(y)))
        y = self.bn3(self.conv_pro(y))
        return y + x


class RefinerAttention(nn.Module):
    """Refiner attention, reference implementation.

    share_atten=False ("softmax" block, kind 1): qkv makes q, k, v;
        A = softmax(sqrt(s) q (sqrt(s) k)^T) [+ s * A_prev]; out = proj(A @ v); passes A on.
        With apply_transform=True (the paper's general form) A is refined first:
        R = adapt_bn(DLA(A)); out = proj(R @ v); passes R on.
    share_atten=True ("refine" block, kind 2): qkv makes only v;
        R = adapt_bn(DLA(A_prev)) * s; out = proj(R @ v); passes A_prev on unchanged.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 share_atten: bool = False, apply_transform: bool = False,
                 expand_ratio: int = 3, kernel_size: int = 3):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.share_atten = share_atten
        self.apply_transform = apply_transform and not share_atten
        self.expand_ratio = expand_ratio
        self.kernel_size = kernel_size
        if share_atten or apply_transform:
            self.DLA = DLA(num_heads, expand_ratio, kernel_size)
            self.adapt_bn = nn.BatchNorm2d(num_heads)
        self.qkv = nn.Linear(dim, dim if share_atten else 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, prev_attn: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        B, N, C = x.shape
        H, d = self.num_heads, self.head_dim
        if self.share_atten:
            if prev_attn is None:
                raise ValueError("prev_attn: a refine block (share_atten=True) needs the previous "
                                 "block's attention map, got None")
            attn = self.adapt_bn(self.DLA(prev_attn)) * self.scale
            v = self.qkv(x).reshape(B, N, H, d).permute(0, 2, 1, 3)
            attn_next = prev_attn
        else:
            q, k, v = self.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
            # The released code scales q and k by sqrt(s) each, not the product by s.
            rs = math.sqrt(self.scale)
            attn = ((rs * q) @ (rs * k).transpose(-2, -1)).softmax(dim=-1)
            if prev_attn is not None:
                attn = attn + prev_attn * self.scale
            attn = self.attn_drop(attn)
            if self.apply_transform:
                attn = self.adapt_bn(self.DLA(attn))
            attn_next = attn
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        return x, attn_next


# ----------------------------------------------------------------------------
# Functional ops: the contract every backend implements
# ----------------------------------------------------------------------------

@dataclass
class BNStats:
    """Batch statistics of one BatchNorm in a training step: mean and biased variance."""
    mean: Tensor
    var: Tensor


def softmax_block(q: Tensor, k: Tensor, v: Tensor, prev_attn: Optional[Tensor],
                  scale: float) -> Tuple[Tensor, Tensor]:
    """(B,H,N,d) x3 [, (B,H,N,N)] -> out (B,H,N,d), attn (B,H,N,N)."""
    rs = math.sqrt(scale)
    attn = ((rs * q) @ (rs * k).transpose(-2, -1)).softmax(dim=-1)
    if prev_attn is not None:
        attn = attn + prev_attn * scale
    return attn @ v, attn


def head_mix(x: Tensor, w: Tensor) -> Tensor:
    """1x1 convolution over the head (channel) dim: (B,C,N,M), (C2,C) -> (B,C2,N,M)."""
    return torch.einsum("oc,bcnm->bonm", w, x)


def attn_dwconv(x: Tensor, w: Tensor) -> Tensor:
    """k x k depthwise convolution of each (N,M) map, zero 'same' padding: (B,C,N,M), (C,k,k)."""
    k = w.shape[-1]
    return F.conv2d(x, w.unsqueeze(1), padding=k // 2, groups=x.shape[1])


def row_softmax(x: Tensor) -> Tensor:
    """Softmax over the last dim (keys)."""
    return x.softmax(dim=-1)


def attn_value(a: Tensor, v: Tensor) -> Tensor:
    """(B,H,N,M) @ (B,H,M,d) -> (B,H,N,d)."""
    return a @ v


def _affine(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return x * w[:, None, None] + b[:, None, None]


def refine_eval(attn: Tensor, v: Tensor, w_exp: Tensor, b_exp: Tensor, w_dw: Tensor, b_dw: Tensor,
                w_pro: Tensor, b_pro: Tensor, alpha: Tensor, beta: Tensor, expand: bool) -> Tensor:
    """Evaluation-mode refine block with every BatchNorm folded (see `fold_refine`).

        E = relu6(w_exp A + b_exp)            (E = A when expand is False)
        D = relu6(dw_k(E) + b_dw)             zero padding of E
        R = alpha * (A + w_pro D + b_pro) + beta
        out = R @ v
    Shapes: attn (B,H,N,N), v (B,H,N,d), w_exp (rH,H), b_exp (rH), w_dw (rH,k,k), b_dw (rH),
    w_pro (H,rH), b_pro (H), alpha (H), beta (H).
    """
    e = F.relu6(head_mix(attn, w_exp) + b_exp[:, None, None]) if expand else attn
    dd = F.relu6(attn_dwconv(e, w_dw) + b_dw[:, None, None])
    r = _affine(attn + head_mix(dd, w_pro) + b_pro[:, None, None], alpha, beta)
    return r @ v


def _bn_train(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tuple[Tensor, BNStats]:
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    y = (x - mean[:, None, None]) * torch.rsqrt(var + eps)[:, None, None]
    return _affine(y, w, b), BNStats(mean, var)


def refine_train(attn: Tensor, v: Tensor, w_exp: Tensor, w_dw: Tensor, w_pro: Tensor,
                 g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor, g3: Tensor, b3: Tensor,
                 ga: Tensor, ba: Tensor, eps: float, scale: float, expand: bool
                 ) -> Tuple[Tensor, Tuple[BNStats, ...]]:
    """Training-mode refine block with batch statistics (differentiable through them).

        E = relu6(BN1(w_exp A))  (E = A when expand is False; g1, b1 unused)
        D = relu6(BN2(dw_k(E)))
        Z = A + BN3(w_pro D)
        out = (BN_a(Z) * scale) @ v
    Returns out and the batch statistics (mean, biased var) of BN1 (None when not expand),
    BN2, BN3 and BN_a, for the running-statistic update (`update_running_stats`).
    """
    s1 = None
    e = attn
    if expand:
        e, s1 = _bn_train(head_mix(attn, w_exp), g1, b1, eps)
        e = F.relu6(e)
    dd, s2 = _bn_train(attn_dwconv(e, w_dw), g2, b2, eps)
    dd = F.relu6(dd)
    y3, s3 = _bn_train(head_mix(dd, w_pro), g3, b3, eps)
    r, sa = _bn_train(attn + y3, ga, ba, eps)
    return (r * scale) @ v, (s1, s2, s3, sa)


def update_running_stats(bn: nn.BatchNorm2d, stats: BNStats, count: int) -> None:
    """The running-statistic update nn.BatchNorm2d makes in training (unbiased running var)."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        unbiased = stats.var * (count / max(count - 1, 1))
        bn.running_mean.mul_(1 - m).add_(stats.mean.to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)


@dataclass
class FoldedRefine:
    """Eval-mode refine parameters with BatchNorms folded in (arguments of `refine_eval`)."""
    w_exp: Tensor
    b_exp: Tensor
    w_dw: Tensor
    b_dw: Tensor
    w_pro: Tensor
    b_pro: Tensor
    alpha: Tensor
    beta: Tensor
    expand: bool

    def args(self):
        return (self.w_exp, self.b_exp, self.w_dw, self.b_dw, self.w_pro, self.b_pro,
                self.alpha, self.beta, self.expand)


def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """y = x * g + c for an eval-mode BatchNorm."""
    g = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return g, bn.bias - bn.running_mean * g


@torch.no_grad()
def fold_refine(dla: DLA, adapt_bn: nn.BatchNorm2d, out_scale: float = 1.0) -> FoldedRefine:
    """Fold the four eval-mode BatchNorms of a DLA + adapt_bn into `refine_eval` parameters.

    out_scale multiplies R (the refine block's `* s`; 1.0 in the general mode).
    """
    expand = dla.expand_ratio != 1
    w_dw = dla.depth_sep_conv.weight[:, 0]
    if expand:
        g1, c1 = _bn_affine(dla.bn1)
        w_exp = dla.conv_exp.weight[:, :, 0, 0] * g1[:, None]
        b_exp = c1
    else:
        w_exp = torch.zeros(w_dw.shape[0], w_dw.shape[0], dtype=w_dw.dtype, device=w_dw.device)
        b_exp = torch.zeros(w_dw.shape[0], dtype=w_dw.dtype, device=w_dw.device)
    g2, c2 = _bn_affine(dla.bn2)
    g3, c3 = _bn_affine(dla.bn3)
    ga, ca = _bn_affine(adapt_bn)
    return FoldedRefine(
        w_exp=w_exp.contiguous(), b_exp=b_exp.contiguous(),
        w_dw=(w_dw * g2[:, None, None]).contiguous(), b_dw=c2.contiguous(),
        w_pro=(dla.conv_pro.weight[:, :, 0, 0] * g3[:, None]).contiguous(), b_pro=c3.contiguous(),
        alpha=(ga * out_scale).contiguous(), beta=(ca * out_scale).contiguous(), expand=expand)
