"""Random but well-conditioned Refiner inputs and parameters, for tests and benchmarks."""
from __future__ import annotations

import torch

from .reference import DLA


def random_attn(B, H, N, dtype=torch.float32, device="cpu"):
    """A realistic attention map: row-softmax of random logits."""
    return torch.randn(B, H, N, N, device=device).softmax(-1).to(dtype)


def random_dla(H, ratio=3, kernel=3, device="cpu", seed=0):
    """A DLA + adapt_bn pair with non-trivial weights and running statistics."""
    g = torch.Generator().manual_seed(seed)
    dla = DLA(H, ratio, kernel)
    adapt_bn = torch.nn.BatchNorm2d(H)
    with torch.no_grad():
        for m in list(dla.modules()) + [adapt_bn]:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return dla.to(device), adapt_bn.to(device)


def train_args(dla, adapt_bn):
    """Flat parameter tuple of `refine_train` after (attn, v): weights and BN affines."""
    expand = dla.expand_ratio != 1
    hidden = dla.depth_sep_conv.weight.shape[0]
    ref = dla.depth_sep_conv.weight
    w_exp = dla.conv_exp.weight[:, :, 0, 0] if expand else ref.new_zeros(hidden, hidden)
    g1 = dla.bn1.weight if expand else ref.new_ones(hidden)
    b1 = dla.bn1.bias if expand else ref.new_zeros(hidden)
    return (w_exp, dla.depth_sep_conv.weight[:, 0], dla.conv_pro.weight[:, :, 0, 0],
            g1, b1, dla.bn2.weight, dla.bn2.bias, dla.bn3.weight, dla.bn3.bias,
            adapt_bn.weight, adapt_bn.bias)
