"""Attention-map cosine regulariser (``--cos-reg``).

Given the attention maps the blocks pass on, ``A_0, ..., A_{L-1}``, each ``(B, H, N, N)``,
keep the *distinct* ones in order (a refine block passes its input map on unchanged, the
very same tensor, so consecutive identical objects are dropped: their similarity is the
constant 1 and carries no gradient), ``M_0, ..., M_{K-1}``. Then

    cos_reg = weight * mean_{l=0..K-2} mean_{b, h} cos( vec(M_l[b, h]), vec(M_{l+1}[b, h]) )

where ``vec`` flattens the ``N x N`` map of one (image, head) and ``cos(u, v) =
u.v / max(|u| |v|, eps)`` (``torch.nn.functional.cosine_similarity``, eps 1e-8). The term is
added to the loss; minimising it pushes consecutive layers' maps apart. 0 when K < 2.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["distinct_maps", "attention_cosine", "cos_reg_loss"]


def distinct_maps(maps: Sequence[torch.Tensor]) -> list:
    out = []
    for m in maps:
        if out and m is out[-1]:
            continue
        out.append(m)
    return out


def attention_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, head) of the cosine similarity of two (B, H, N, N) maps, flattened per (b, h)."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"attention maps: expected two (B, H, N, N) maps of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.float().flatten(2), b.float().flatten(2), dim=-1).mean()


def cos_reg_loss(maps: Sequence[torch.Tensor], weight: float = 0.1) -> torch.Tensor:
    maps = distinct_maps(maps)
    if len(maps) < 2:
        return maps[0].new_zeros(()) if maps else torch.zeros(())
    sims = [attention_cosine(maps[i], maps[i + 1]) for i in range(len(maps) - 1)]
    return weight * torch.stack(sims).mean()
