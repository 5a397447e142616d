"""Loading Refiner-ViT weights from released-style or our own checkpoint files."""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "read_state_dict", "infer_model_args", "load_checkpoint"]

_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def _unwrap(obj, path: str, use_ema: bool) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        keys = _WRAPPER_KEYS if use_ema else tuple(k for k in _WRAPPER_KEYS if "ema" not in k)
        for key in keys:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"path: {path} holds no state dict (expected a mapping of names to tensors, "
                              f"optionally under one of {_WRAPPER_KEYS})")
    # Checkpoints saved from DistributedDataParallel carry a 'module.' prefix.
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(path: Union[str, os.PathLike], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read a state dict from `.pth`/`.pth.tar`/`.pt` (plain or wrapped in `state_dict`, `model`
    or, with use_ema, `state_dict_ema`) or `.safetensors`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return _unwrap(load_file(path, device="cpu"), path, use_ema)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"path: {path} is not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"path: {path} is not a readable PyTorch checkpoint (truncated or "
                              f"foreign file?): {e}") from e
    return _unwrap(obj, path, use_ema)


def infer_model_args(state: Dict[str, torch.Tensor]) -> dict:
    """RefinerViT constructor arguments that fit a released-layout state dict."""
    try:
        tokens, dim = state["pos_embed"].shape[-2:]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        heads = next(state[k].shape[0] for k in sorted(state) if k.endswith("attn.adapt_bn.weight"))
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, StopIteration, ValueError, IndexError) as e:
        raise CheckpointError(f"state dict is not a Refiner-ViT layout (missing {e})") from e
    grid = int(round((tokens - 1) ** 0.5))
    args = dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=hidden / dim, img_size=grid * 16,
                num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
                return_dense="aux_head.weight" in state)
    exp = [k for k in state if k.endswith("attn.DLA.conv_exp.weight")]
    if exp:  # refine blocks: expansion ratio and kernel size of their DLA
        blk = exp[0].split(".")[1]
        args["expand_ratio"] = state[exp[0]].shape[0] // heads
        args["kernel_size"] = state[f"blocks.{blk}.attn.DLA.depth_sep_conv.weight"].shape[-1]
    return args


def load_checkpoint(path: Union[str, os.PathLike], model: Optional[nn.Module] = None, strict: bool = True,
                    use_ema: bool = False, filter_fn: Optional[Callable] = None) -> nn.Module:
    """Load a checkpoint into `model` and return it.

    Without a model, builds the RefinerViT the state dict describes (S, M, L or custom).
    The position embedding is resampled to the model's patch grid when the checkpoint
    was trained at another resolution. Raises CheckpointError naming the missing and
    unexpected keys (strict) or mismatched shapes.
    """
    from .models import RefinerViT, checkpoint_filter_fn
    state = read_state_dict(path, use_ema)
    if model is None:
        model = RefinerViT(**infer_model_args(state))
    if filter_fn is None and isinstance(model, RefinerViT):
        filter_fn = checkpoint_filter_fn
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        hint = ""
        if any(k.startswith("aux_head.") for k in unexpected):
            hint = " (the checkpoint has the dense token-labelling head: build the model with return_dense=True)"
        raise CheckpointError(f"{path}: state dict does not match the model{hint}; "
                              f"missing keys: {_head(missing)}; unexpected keys: {_head(unexpected)}")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {len(bad)} tensors: {bad[:5]}")
    model.load_state_dict(state, strict=strict)
    return model


def _head(keys, n=10):
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"
