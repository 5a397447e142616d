"""Refiner-ViT S/M/L (reference implementation), registered with timm.

Matches the released Refiner-ViT: convolutional stem, blocks alternating a
"softmax" attention block (kind 1) and a "refine" block (kind 2) that refines the
previous map with DLA, the 0.5 residual scaling, the MLP `scale_channel`, and the
optional dense `aux_head` + MixToken used with token labelling. State-dict keys
are those of the released checkpoints.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .reference import RefinerAttention

__all__ = ["RefinerViT", "PatchEmbedStem", "Block", "Mlp", "mixtoken_box",
           "refiner_vit_s", "refiner_vit_m", "refiner_vit_l"]


class PatchEmbedStem(nn.Module):
    """Three convs (7x7/2, 3x3, 3x3) with BN + ReLU, then a (p/2)x(p/2) patchify conv."""

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 384):
        super().__init__()
        self.patch_size = patch_size
        self.set_img_size(img_size)
        self.conv1 = nn.Conv2d(in_chans, 32, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(128, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def set_img_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """The resolution (a side, or (height, width)) and its patch grid."""
        hw = (img_size, img_size) if isinstance(img_size, int) else (
            tuple(img_size) if isinstance(img_size, (tuple, list)) else ())
        if len(hw) != 2 or not all(isinstance(v, int) and v >= self.patch_size for v in hw):
            raise ValueError(f"img_size: expected a side or (height, width) of at least the patch size "
                             f"{self.patch_size}, got {img_size!r}")
        self.img_size = img_size
        self.grid_size = (hw[0] // self.patch_size, hw[1] // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x)  # (B, C, h, w)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> * scale_channel (init 1e-5) -> dropout."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.):
        super().__init__()
        self.scale_channel = nn.Parameter(1e-5 * torch.ones(in_features))
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.scale_channel * self.fc2(x))


class Block(nn.Module):
    """Pre-norm block with the released 0.5 input scaling and 1/0.5 output scaling."""

    adjust_ratio = 0.5

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3., qkv_bias: bool = True,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 share_atten: bool = False, apply_transform: bool = False,
                 expand_ratio: int = 3, kernel_size: int = 3):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinerAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                                     share_atten=share_atten, apply_transform=apply_transform,
                                     expand_ratio=expand_ratio, kernel_size=kernel_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, attn: Optional[torch.Tensor] = None):
        a = self.adjust_ratio
        x_new, attn = self.attn(self.norm1(x * a), attn)
        x = x + self.drop_path(x_new / a)
        x = x + self.drop_path(self.mlp(self.norm2(x * a))) / a
        return x, attn


class _BuffersRestored:
    """Context of a checkpointed block's recomputation in the backward: it puts the block's buffers
    (BatchNorm running statistics and counts) back as they were before, so that a training step
    updates them once, as it does without checkpointing. The outputs are unaffected: the recompute
    normalises by the batch statistics, and the random state is replayed by `checkpoint`."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.kept = [(b, b.clone()) for b in self.module.buffers()]

    def __exit__(self, *exc):  # also when the recompute stops early (checkpoint's early stop)
        with torch.no_grad():
            for b, old in self.kept:
                b.copy_(old)
        self.kept = []
        return False


def _checkpointed(block: nn.Module, x: torch.Tensor, attn: Optional[torch.Tensor]):
    """block(x, attn), its activations recomputed in the backward. Under torch.compile the compiled
    backward recomputes from the functionalized graph, whose buffer updates run once, in the forward
    (and Dynamo takes no custom context_fn)."""
    if torch.compiler.is_compiling():
        return checkpoint(block, x, attn, use_reentrant=False)
    return checkpoint(block, x, attn, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), _BuffersRestored(block)))


def _take_indices(depth: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    """(the blocks asked for, the last of them): all when None, the last n for an int n, else the list
    (negative counted from the end), as timm's forward_intermediates reads `indices`."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        ok, take = 0 < indices <= depth, list(range(depth - indices, depth))
    else:
        ok, take = len(indices) > 0 and all(-depth <= i < depth for i in indices), [i % depth for i in indices]
    if not ok:
        raise ValueError(f"indices: expected 1 to {depth} blocks, or block indices in [-{depth}, {depth}), "
                         f"got {indices!r}")
    return take, max(take)


def resample_pos_embed(pos: torch.Tensor, new_size: Tuple[int, int],
                       old_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """A (1, 1 + h*w, C) position embedding (class token first) on another patch grid: bilinear with
    aligned corners, as the released interpolation (old_size: the grid, square when not given)."""
    return resample_abs_pos_embed(pos, new_size, old_size=old_size, num_prefix_tokens=1,
                                  interpolation="bilinear", align_corners=True, antialias=False)


def _from_flipped(t: torch.Tensor, box: Tuple[int, int, int, int], row_dim: int) -> torch.Tensor:
    """A copy of t whose MixToken box (rows x1:x2 on dim row_dim, columns y1:y2 on the next) is
    taken from the batch flipped: applying it twice gives t back (MixToken, then its undoing)."""
    x1, y1, x2, y2 = box
    idx = [slice(None)] * t.ndim
    idx[row_dim], idx[row_dim + 1] = slice(x1, x2), slice(y1, y2)
    out = t.clone()
    out[tuple(idx)] = t.flip(0)[tuple(idx)]
    return out


def _check_pool(global_pool: str) -> str:
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool: expected 'token' (the class token, as released) or 'avg' "
                         f"(the mean patch token), got {global_pool!r}")
    return global_pool


def mixtoken_box(h: int, w: int, lam: float, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """CutMix box on an h x w patch grid: (x1, y1, x2, y2), rows x1:x2, columns y1:y2.

    Same rule as the released `rand_bbox`: side ratio sqrt(1 - lam), uniform centre, clipped.
    """
    cut = np.sqrt(1. - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cx, cy = rng.integers(h), rng.integers(w)
    x1, x2 = np.clip(cx - cut_h // 2, 0, h), np.clip(cx + cut_h // 2, 0, h)
    y1, y2 = np.clip(cy - cut_w // 2, 0, w), np.clip(cy + cut_w // 2, 0, w)
    return int(x1), int(y1), int(x2), int(y2)


class RefinerViT(nn.Module):
    """Refiner vision transformer.

    Block i is a refine block (DLA on the previous map) when i is odd, a softmax block
    otherwise; `apply_transform=True` also refines the softmax blocks' own maps (the
    paper's general form, with `head_expand`).

    Outputs: eval -> logits (B, num_classes) (with the dense head: head(cls) +
    0.5 * max_tokens aux_head(patches)); training with `return_dense` ->
    (cls_logits, dense_logits (B, h*w, num_classes), mixtoken box (x1, y1, x2, y2)).
    timm's interface: forward_features -> tokens, forward_head(tokens, pre_logits),
    forward_intermediates, num_classes=0 / reset_classifier(0) for the pooled features.
    `global_pool`: what the class head sees, the class token ("token", as released) or
    the mean of the patch tokens ("avg", for fine-tuning as timm's ViTs allow).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 16, num_heads: int = 12, mlp_ratio: float = 3.,
                 qkv_bias: bool = True, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., apply_transform: bool = False, head_expand: int = 3,
                 expand_ratio: int = 3, kernel_size: int = 3,
                 return_dense: bool = False, mix_token: bool = False, mixtoken_beta: float = 1.0,
                 dynamic_img_size: bool = True, global_pool: str = "token"):
        super().__init__()
        if mix_token and not return_dense:
            raise ValueError("mix_token=True needs return_dense=True (MixToken is undone on the dense logits)")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.return_dense = return_dense
        self.mix_token = mix_token
        self.mixtoken_beta = mixtoken_beta
        self.dynamic_img_size = dynamic_img_size
        self.global_pool = _check_pool(global_pool)
        self.grad_checkpointing = False
        self._rng = np.random.default_rng()

        self.patch_embed = PatchEmbedStem(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], share_atten=(i % 2 == 1), apply_transform=apply_transform,
                  expand_ratio=expand_ratio if i % 2 == 1 else head_expand, kernel_size=kernel_size)
            for i in range(depth)])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if return_dense:
            self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order, as timm's ViT: timm's layer-wise lr decay
        (`create_optimizer_v2(..., layer_decay=)`) then gives each block its own rate."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (timm's
        switch): training memory falls to the blocks' inputs, for one more forward of the blocks.
        Outputs, gradients and BatchNorm running statistics are those of a step without it."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head (and dense head) for `num_classes`; 0 makes forward return the pooled features.
        `global_pool`, when given, changes the pooling ("token" or "avg", see __init__)."""
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.return_dense:
            self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[int] = None) -> None:
        """timm's: make `img_size` the model's resolution, the position embedding resampled to its
        grid once (as forward would at every call; bilinear, aligned corners, as released). Call it
        before building the optimizer (pos_embed is a new parameter). The stem fixes the patch size."""
        if patch_size is not None and patch_size != self.patch_embed.patch_size:
            raise ValueError(f"patch_size: the stem's convolutions fix it at {self.patch_embed.patch_size}, "
                             f"got {patch_size!r}")
        if img_size is None:
            return
        old = self.patch_embed.grid_size
        self.patch_embed.set_img_size(img_size)
        if self.patch_embed.grid_size != old:
            with torch.no_grad():
                pos = resample_pos_embed(self.pos_embed, self.patch_embed.grid_size, old)
            self.pos_embed = nn.Parameter(pos, requires_grad=self.pos_embed.requires_grad)

    def seed_mixtoken(self, seed: int) -> None:
        """Make the MixToken boxes reproducible."""
        self._rng = np.random.default_rng(seed)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        pos = self.pos_embed
        if (h, w) != self.patch_embed.grid_size:
            if not self.dynamic_img_size:
                raise ValueError(f"x: expected a {self.patch_embed.img_size} px image, got a {h}x{w} patch grid")
            pos = resample_pos_embed(pos, (h, w), self.patch_embed.grid_size)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return self.pos_drop(x + pos)

    def _dense(self) -> bool:
        """Whether the dense head is on (with no classes, as after reset_classifier(0), it is not)."""
        return self.return_dense and self.num_classes > 0

    def _embed(self, x: torch.Tensor, mix: bool) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int, int, int]]:
        """Stem, MixToken when `mix`, class token and position embedding: the tokens entering
        the blocks, the patch grid (h, w) and the MixToken box (all zeros when none)."""
        if x.ndim != 4:
            raise ValueError(f"x: expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        box = (0, 0, 0, 0)
        if mix:
            lam = self._rng.beta(self.mixtoken_beta, self.mixtoken_beta)
            box = mixtoken_box(h, w, lam, self._rng)
            x = _from_flipped(x, box, row_dim=2)  # (B, C, h, w)
        return self._pos_embed(x), (h, w), box

    def _encode(self, x: torch.Tensor, return_attn: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The blocks and the final norm; the maps each block passed on when return_attn."""
        maps = []
        for x, attn in self._run_blocks(x, self.blocks):
            if return_attn:
                maps.append(attn)
        return self.norm(x), maps

    def forward_features(self, x: torch.Tensor, return_attn: bool = False):
        """timm's: the normed tokens (B, 1 + h*w, C) of the images as given (no MixToken, as the
        released forward_features); with return_attn also the maps each block passed on."""
        x, _, _ = self._embed(x, mix=False)
        x, maps = self._encode(x, return_attn)
        return (x, maps) if return_attn else x

    def _run_blocks(self, x: torch.Tensor, blocks) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Each block's output tokens and the attention map it passes on, in order."""
        ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        attn = None
        for blk in blocks:
            x, attn = _checkpointed(blk, x, attn) if ckpt else blk(x, attn)
            yield x, attn

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API (`features_only=True` builds on it): the tokens after the blocks `indices`
        (the last n when an int, all when None), as (B, C, h, w) maps ("NCHW") or (B, h*w, C) ("NLC"),
        with the class token beside each when return_prefix_tokens, through the final norm when norm.
        Returns (normed final tokens, intermediates), or the intermediates alone. No MixToken here:
        features for a downstream task see the images as given."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt: expected 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = _take_indices(len(self.blocks), indices)
        x, (h, w), _ = self._embed(x, mix=False)
        B = x.shape[0]
        blocks = self.blocks[:last + 1] if stop_early and not torch.jit.is_scripting() else self.blocks
        inter = []
        for i, (x, _) in enumerate(self._run_blocks(x, blocks)):
            if i in take:
                inter.append(self.norm(x) if norm else x)
        prefix = [y[:, :self.num_prefix_tokens] for y in inter]
        inter = [y[:, self.num_prefix_tokens:] for y in inter]
        if output_fmt == "NCHW":
            inter = [y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        if return_prefix_tokens:
            inter = list(zip(inter, prefix))
        return inter if intermediates_only else (self.norm(x), inter)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last of `indices` (and the norm, the heads); the indices kept."""
        take, last = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """timm's: from forward_features' tokens, the pooled features (pre_logits) or the
        logits. With the dense head: head(cls) + 0.5 * max over tokens of aux_head(patches) in
        eval, the pair (class logits, dense logits (B, h*w, classes)) in training."""
        x_cls = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(1)
        if pre_logits:
            return x_cls
        x_cls = self.head(x_cls)
        if not self._dense():
            return x_cls
        x_aux = self.aux_head(x[:, self.num_prefix_tokens:])
        return (x_cls, x_aux) if self.training else x_cls + 0.5 * x_aux.max(1)[0]

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        """Logits; in training with the dense head (class logits, dense logits, MixToken box), the
        images token-mixed when mix_token and the dense logits unmixed. With return_attn,
        (that, the maps each block passed on) (for the attention-map regulariser)."""
        train_dense = self.training and self._dense()
        x, (h, w), box = self._embed(x, mix=train_dense and self.mix_token)
        x, maps = self._encode(x, return_attn)
        out = self.forward_head(x)
        if train_dense:
            x_cls, x_aux = out
            if box != (0, 0, 0, 0):
                # Undo the token mix on the dense logits so each location's label stays its own.
                x_aux = _from_flipped(x_aux.reshape(x_aux.shape[0], h, w, -1), box, row_dim=1)
                x_aux = x_aux.reshape(x_aux.shape[0], h * w, -1)
            out = (x_cls, x_aux, box)
        return (out, maps) if return_attn else out


def checkpoint_filter_fn(state_dict: dict, model: RefinerViT) -> dict:
    """Adapt a released-layout state dict to `model`: resample pos_embed to its grid."""
    out = dict(state_dict)
    pe = out.get("pos_embed")
    if pe is not None and pe.shape != model.pos_embed.shape:
        out["pos_embed"] = resample_pos_embed(pe, model.patch_embed.grid_size)
    return out


def _cfg(**kwargs):
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": .9,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.conv1", "classifier": "head", **kwargs}


# Crop settings and normalisation of the released configs.
default_cfgs = generate_default_cfgs({
    "refiner_vit_s.untrained": _cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=.9),
    "refiner_vit_m.untrained": _cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0),
    "refiner_vit_l.untrained": _cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.13),
})

MODEL_ARGS = {
    "refiner_vit_s": dict(embed_dim=384, depth=16, num_heads=12, mlp_ratio=3, head_expand=6),
    "refiner_vit_m": dict(embed_dim=420, depth=32, num_heads=12, mlp_ratio=3, head_expand=3),
    "refiner_vit_l": dict(embed_dim=512, depth=32, num_heads=16, mlp_ratio=3, head_expand=3),
}


def _create(variant: str, pretrained: bool = False, fused=False, **kwargs) -> RefinerViT:
    args = dict(MODEL_ARGS[variant], **kwargs)
    out_indices = args.pop("out_indices", 3)  # features_only: the last 3 blocks' maps by default
    model = build_model_with_cfg(RefinerViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)
    if fused:
        from .fused import convert
        convert(model, backend=fused if isinstance(fused, str) else "auto")
    return model


@register_model
def refiner_vit_s(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-S: dim 384, 12 heads, 16 blocks, 25.02 M parameters (no dense head)."""
    return _create("refiner_vit_s", pretrained, **kwargs)


@register_model
def refiner_vit_m(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-M: dim 420, 12 heads (head size 35), 32 blocks, 55.03 M parameters."""
    return _create("refiner_vit_m", pretrained, **kwargs)


@register_model
def refiner_vit_l(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-L: dim 512, 16 heads, 32 blocks, 80.64 M parameters."""
    return _create("refiner_vit_l", pretrained, **kwargs)
