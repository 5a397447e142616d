"""Front door to the fused Refiner ops: input checks and backend dispatch.

Backends (all with the signatures of the functional reference in `refiner.reference`):
  "cuda"      compiled CUDA kernels (refiner._C), tensors on a GPU
  "cpu"       compiled C++ kernels (refiner._C), tensors on the CPU
  "triton"    Triton kernels (refiner_kernels); on CPU only under TRITON_INTERPRET=1
  "reference" plain PyTorch
"auto" takes the fastest one usable for the tensors' device; when it has to fall back
it says so at debug level, and `available_backends()` tells why a backend is missing.
A backend may also be chosen per op: "triton,refine_eval=cuda" runs refine_eval on the CUDA
kernels and every other op on Triton (names from OPS; see `parse_backend`).
"""
from __future__ import annotations

import logging
import math
import os
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import reference

__all__ = ["BACKENDS", "OPS", "available_backends", "describe_backends", "load_backends", "parse_backend",
           "resolve_backend", "uses_batch_stats",
           "softmax_block", "refine_eval", "refine_train", "refine_block",
           "head_mix", "attn_dwconv", "row_softmax", "attn_value"]

log = logging.getLogger(__name__)
BACKENDS = ("cuda", "triton", "cpu", "reference")
OPS = ("softmax_block", "refine_eval", "refine_train", "head_mix", "attn_dwconv", "row_softmax", "attn_value")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


_LOADED: Dict[str, Tuple[Optional[ModuleType], str]] = {}


def _load(name: str) -> Tuple[Optional[ModuleType], str]:
    """Import a backend module once: (module or None, reason it is unusable)."""
    if name not in _LOADED:
        _LOADED[name] = _import_backend(name)
    return _LOADED[name]


def _import_backend(name: str) -> Tuple[Optional[ModuleType], str]:
    try:
        if name in ("cpu", "cuda"):
            from . import _compiled as mod
        elif name == "triton":
            import refiner_kernels as mod
        else:
            return reference, ""
    except Exception as e:  # an absent or broken backend must never break `import refiner`
        return None, f"import failed: {type(e).__name__}: {e}"
    if not getattr(mod, "AVAILABLE", False):
        return None, getattr(mod, "UNAVAILABLE_REASON", "not available")
    if name == "cuda" and not getattr(mod, "HAS_CUDA", False):
        return None, "refiner._C was built without its CUDA part (no nvcc or CPU-only torch at build time)"
    return mod, ""


def _usable(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tuple[Optional[ModuleType], str]:
    mod, why = _load(name)
    if mod is None:
        return None, why
    dtypes = getattr(mod, "CUDA_DTYPES" if name == "cuda" else "DTYPES", None)  # Triton, CUDA: no float64
    if dtype is not None and dtypes is not None and dtype not in dtypes:
        return None, f"its kernels take {', '.join(map(str, dtypes))} tensors, not {dtype}"
    if name == "cuda" and device.type != "cuda":
        return None, "tensors are not on a CUDA device"
    if name == "cpu" and device.type != "cpu":
        return None, "tensors are not on the CPU"
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, "Triton runs on the CPU only under TRITON_INTERPRET=1"
    return mod, ""


def available_backends(device: Optional[torch.device | str] = None) -> Dict[str, str]:
    """Backend name -> "ok" or the reason it can't be used (for `device`, default: CUDA if present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: (why or "ok") for name in BACKENDS for _, why in [_usable(name, device)]}


def load_backends() -> Dict[str, str]:
    """Register every installed backend's torch ops now; op namespace -> "ok" or why not.
    `import refiner` loads a backend on its first use only, but `torch.export.load` of a program
    exported from a fused model needs its ops (refiner::*, refiner_triton::*) registered first."""
    compiled, why = _load("cpu")  # refiner._C holds the CPU and the CUDA kernels of refiner::*
    status = {"refiner": "ok" if compiled is not None else why}
    try:  # refiner_triton::* registers on import, GPU or not
        import refiner_kernels.ops  # noqa: F401
        status["refiner_triton"] = "ok"
    except Exception as e:
        status["refiner_triton"] = f"import failed: {type(e).__name__}: {e}"
    return status


def describe_backends() -> str:
    lines = []
    for dev in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        for name, status in available_backends(dev).items():
            lines.append(f"  [{dev}] {name:9s} {status}")
    return "refiner backends:\n" + "\n".join(lines)


# On CPU the Triton interpreter is far slower than anything else: never pick it by "auto". On a GPU
# Triton first: the first H100 round (2026-11-26, benchmarks/results) measured Refiner-ViT-S bf16
# inference at 3034 img/s with Triton against 700 with the CUDA kernels (fp32 CUDA-core code).
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
# Per-op exceptions to _AUTO_ORDER, {op: {device type: order}}, for an op whose fastest backend
# differs from the rest's: none measured yet (the CUDA backend's tensor-core refine_eval, forward and
# backward, awaits its first GPU timing: gpu_round.sh quick, bench_ops_cuda and bench_models_infer).
_AUTO_ORDER_BY_OP: Dict[str, Dict[str, Tuple[str, ...]]] = {}


def parse_backend(backend: str) -> Tuple[str, Tuple[Tuple[str, str], ...]]:
    """"auto", one of BACKENDS, or that followed by per-op choices, "DEFAULT,OP=NAME,...":
    (default, ((op, name), ...)). Raises ValueError naming `backend` for anything else."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    names = ("auto",) + BACKENDS
    if backend in names:  # the common case, on every op call
        return backend, ()
    default, *rest = [part.strip() for part in backend.split(",")]
    if default not in names:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, optionally followed by ',OP=NAME' "
                         f"per-op choices, got {backend!r}")
    per_op = {}
    for part in rest:
        op, eq, name = (x.strip() for x in part.partition("="))
        if not eq or op not in OPS or name not in names:
            raise ValueError(f"backend: per-op choice {part!r} in {backend!r} must be OP=NAME with OP one of {OPS} "
                             f"and NAME 'auto' or one of {BACKENDS}")
        if op in per_op:
            raise ValueError(f"backend: {op!r} is chosen twice in {backend!r}")
        per_op[op] = name
    return default, tuple(per_op.items())


def resolve_backend(backend: str, device: torch.device, op: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None) -> ModuleType:
    """The backend module for `backend` (see `parse_backend`), a device and, for per-op choices, the op;
    with a dtype, "auto" passes over backends that can't compute in it (Triton for float64)."""
    default, per_op = parse_backend(backend)
    backend = dict(per_op).get(op, default)
    if backend == "auto":
        order = _AUTO_ORDER_BY_OP.get(op, {}).get(device.type) or _AUTO_ORDER.get(device.type, ("reference",))
        for name in order:
            mod, why = _usable(name, device, dtype)
            if mod is not None:
                return mod
            log.debug("refiner: backend %r skipped for %s: %s", name, device, why)
        return reference
    mod, why = _usable(backend, device, dtype)
    if mod is None:
        what = f"{device} tensors" if dtype is None else f"{dtype} tensors on {device}"
        raise RuntimeError(f"backend: {backend!r} is not usable for {what}: {why}")
    return mod


# ----------------------------------------------------------------------------
# Input checks shared by every backend (the compiled ones check again in C++)
# ----------------------------------------------------------------------------

def _check_tensor(name: str, t, ndim: int, like: Optional[Tensor] = None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32/float16/bfloat16/float64 tensor, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name}: on {t.device}, but the other inputs are on {like.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from the other inputs' {like.dtype}")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, prev_attn: Optional[Tensor]):
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4, q)
    _check_tensor("v", v, 4, q)
    if k.shape != q.shape:
        raise ValueError(f"k: shape {tuple(k.shape)} must equal q's {tuple(q.shape)} (B, H, N, d)")
    if v.shape != q.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} must equal q's {tuple(q.shape)} (B, H, N, d)")
    if prev_attn is not None:
        _check_tensor("prev_attn", prev_attn, 4, q)
        B, H, N, _ = q.shape
        if tuple(prev_attn.shape) != (B, H, N, N):
            raise ValueError(f"prev_attn: expected shape {(B, H, N, N)} (B, H, N, N), got {tuple(prev_attn.shape)}")


def _check_map_and_v(attn: Tensor, v: Tensor):
    _check_tensor("attn", attn, 4)
    _check_tensor("v", v, 4, attn)
    B, H, N, M = attn.shape
    if N != M:
        raise ValueError(f"attn: expected square maps (B, H, N, N), got {tuple(attn.shape)}")
    if tuple(v.shape[:3]) != (B, H, N):
        raise ValueError(f"v: expected shape ({B}, {H}, {N}, d) to match attn, got {tuple(v.shape)}")


def _check_weights(H: int, w_exp: Tensor, w_dw: Tensor, w_pro: Tensor):
    hidden = w_dw.shape[0] if w_dw.ndim == 3 else -1
    if w_dw.ndim != 3 or w_dw.shape[1] != w_dw.shape[2] or w_dw.shape[1] % 2 == 0:
        raise ValueError(f"w_dw: expected (rH, k, k) with odd k, got {tuple(w_dw.shape)}")
    if w_exp.ndim != 2 or tuple(w_exp.shape) != (hidden, H):
        raise ValueError(f"w_exp: expected shape ({hidden}, {H}) (rH, H), got {tuple(w_exp.shape)}")
    if w_pro.ndim != 2 or tuple(w_pro.shape) != (H, hidden):
        raise ValueError(f"w_pro: expected shape ({H}, {hidden}) (H, rH), got {tuple(w_pro.shape)}")
    if hidden % H != 0:
        raise ValueError(f"w_dw: rH={hidden} must be a multiple of H={H}")


def _dense(*ts):
    """Kernels assume dense row-major tensors: non-contiguous and channels-last inputs are copied."""
    return tuple(t.contiguous() if t is not None else None for t in ts)


def _dense_unless_views(mod, *ts):
    """q, k, v (softmax_block) or v (refine ops) as they are for a backend that reads them through
    their strides (TAKES_VIEWS: Triton), so the fused layer's views of its projections are not
    copied; dense copies for the others."""
    return ts if getattr(mod, "TAKES_VIEWS", False) else _dense(*ts)


# ----------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------

def softmax_block(q: Tensor, k: Tensor, v: Tensor, prev_attn: Optional[Tensor] = None,
                  scale: Optional[float] = None, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Kind-1 block core: attn = softmax(s q k^T) [+ s * prev_attn]; returns (attn @ v, attn)."""
    _check_qkv(q, k, v, prev_attn)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not abs(scale) < math.inf:  # (not math.isfinite: torch.compile(dynamic=True) makes scale a SymFloat)
        raise ValueError(f"scale: must be finite, got {scale}")
    mod = resolve_backend(backend, q.device, "softmax_block", q.dtype)
    q, k, v = _dense_unless_views(mod, q, k, v)
    (prev_attn,) = _dense(prev_attn)
    return mod.softmax_block(q, k, v, prev_attn, scale)


def refine_eval(attn: Tensor, v: Tensor, folded: reference.FoldedRefine, backend: str = "auto") -> Tensor:
    """Eval-mode refine block with folded BatchNorms (see `reference.fold_refine`)."""
    _check_map_and_v(attn, v)
    _check_weights(attn.shape[1], folded.w_exp, folded.w_dw, folded.w_pro)
    mod = resolve_backend(backend, attn.device, "refine_eval", attn.dtype)
    (attn,), (v,) = _dense(attn), _dense_unless_views(mod, v)
    return mod.refine_eval(attn, v, *folded.args())


def refine_train(attn: Tensor, v: Tensor, *params: Tensor, eps: float, scale: float, expand: bool,
                 backend: str = "auto"):
    """Training-mode refine block: (out, batch statistics); see `reference.refine_train`."""
    _check_map_and_v(attn, v)
    _check_weights(attn.shape[1], *params[:3])
    mod = resolve_backend(backend, attn.device, "refine_train", attn.dtype)
    attn, *params = _dense(attn, *params)
    (v,) = _dense_unless_views(mod, v)
    return mod.refine_train(attn, v, *params, eps, scale, expand)


def _bns(dla: reference.DLA, adapt_bn: nn.Module):
    """(name, module) of the refine block's BatchNorms (no BN1 without expansion)."""
    named = [("DLA.bn1", getattr(dla, "bn1", None)), ("DLA.bn2", dla.bn2), ("DLA.bn3", dla.bn3),
             ("adapt_bn", adapt_bn)]
    return [(name, bn) for name, bn in named if bn is not None]


def _bn_check(bn: nn.Module, name: str):
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        if not bn.affine or not bn.track_running_stats:
            raise ValueError(f"{name}: fused refine ops need affine BatchNorms with running statistics")
    elif not all(hasattr(bn, a) for a in ("weight", "bias", "running_mean", "running_var", "eps")):
        raise TypeError(f"{name}: expected an nn.BatchNorm2d or a frozen one (weight, bias, running "
                        f"statistics, eps), got {type(bn).__name__}")


def uses_batch_stats(dla: reference.DLA, adapt_bn: nn.Module) -> bool:
    """Whether the refine block's BatchNorms normalise with batch statistics (training mode) or with
    their running ones (eval mode, or frozen, e.g. timm's FrozenBatchNorm2d). The fused ops run all
    of them one way, and in training with adapt_bn's eps: a mix raises instead of being run wrong."""
    named = _bns(dla, adapt_bn)
    for name, bn in named:
        _bn_check(bn, name)
    batch = {name: isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training for name, bn in named}
    if len(set(batch.values())) > 1:
        raise ValueError("; ".join(f"{n}: {'batch' if b else 'running'} statistics" for n, b in batch.items())
                         + ": the fused refine ops normalise with one kind for all four BatchNorms (set their "
                         "modes alike, or use backend='reference')")
    if batch["adapt_bn"]:
        for name, bn in named:
            if isinstance(bn, nn.SyncBatchNorm):
                raise ValueError(f"{name}: a SyncBatchNorm in training; the fused refine ops compute this "
                                 "process's batch statistics only (use nn.BatchNorm2d, or backend='reference')")
            if bn.eps != adapt_bn.eps:
                raise ValueError(f"{name}: eps {bn.eps} differs from adapt_bn's {adapt_bn.eps}; the fused "
                                 "training step uses one eps for the four BatchNorms")
    return batch["adapt_bn"]


def check_foldable(dla: reference.DLA, adapt_bn: nn.BatchNorm2d) -> None:
    """Eval-mode BatchNorm parameters must be finite (and variances >= 0) to be folded.

    Called once per fold, not per forward: the check syncs with the device.
    """
    for name, bn in _bns(dla, adapt_bn):
        _bn_check(bn, name)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, attr)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}.{attr}: non-finite values; cannot fold the BatchNorm")
        if bool((bn.running_var < 0).any()):
            raise ValueError(f"{name}.running_var: negative variance")


def refine_block(attn: Tensor, v: Tensor, dla: reference.DLA, adapt_bn: nn.BatchNorm2d, scale: float,
                 backend: str = "auto", folded: Optional[reference.FoldedRefine] = None) -> Tensor:
    """`(adapt_bn(dla(attn)) * scale) @ v` with the modules' own BatchNorm semantics.

    Training mode uses batch statistics and updates the running statistics exactly like
    nn.BatchNorm2d; eval mode (or frozen BatchNorms) folds every BatchNorm (pass `folded` to reuse
    a fold). The four BatchNorms must agree on the mode (`uses_batch_stats`).
    """
    if not uses_batch_stats(dla, adapt_bn):
        if folded is None:
            check_foldable(dla, adapt_bn)
            folded = reference.fold_refine(dla, adapt_bn, scale)
        return refine_eval(attn, v, folded, backend)
    expand = dla.expand_ratio != 1
    ref = dla.depth_sep_conv.weight
    hidden = ref.shape[0]
    w_exp = dla.conv_exp.weight[:, :, 0, 0] if expand else ref.new_zeros(hidden, hidden)
    g1 = dla.bn1.weight if expand else ref.new_ones(hidden)
    b1 = dla.bn1.bias if expand else ref.new_zeros(hidden)
    params = (w_exp, ref[:, 0], dla.conv_pro.weight[:, :, 0, 0], g1, b1, dla.bn2.weight, dla.bn2.bias,
              dla.bn3.weight, dla.bn3.bias, adapt_bn.weight, adapt_bn.bias)
    params = tuple(p.to(attn.dtype) for p in params)  # kernels take one dtype (autocast: the map's)
    out, stats = refine_train(attn, v, *params, eps=adapt_bn.eps, scale=scale, expand=expand, backend=backend)
    count = attn.shape[0] * attn.shape[2] * attn.shape[3]
    for bn, st in zip([dla.bn1 if expand else None, dla.bn2, dla.bn3, adapt_bn], stats):
        if bn is not None:
            reference.update_running_stats(bn, st, count)
    return out


def head_mix(x: Tensor, w: Tensor, backend: str = "auto") -> Tensor:
    """1x1 convolution over heads: (B, C, N, M), (C2, C) -> (B, C2, N, M)."""
    _check_tensor("x", x, 4)
    _check_tensor("w", w, 2, x)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w: expected (C2, {x.shape[1]}) to match x's channels, got {tuple(w.shape)}")
    return resolve_backend(backend, x.device, "head_mix", x.dtype).head_mix(*_dense(x, w))


def attn_dwconv(x: Tensor, w: Tensor, backend: str = "auto") -> Tensor:
    """k x k depthwise convolution over each map with zero 'same' padding: (B, C, N, M), (C, k, k)."""
    _check_tensor("x", x, 4)
    _check_tensor("w", w, 3, x)
    if w.shape[0] != x.shape[1] or w.shape[1] != w.shape[2] or w.shape[1] % 2 == 0:
        raise ValueError(f"w: expected ({x.shape[1]}, k, k) with odd k, got {tuple(w.shape)}")
    return resolve_backend(backend, x.device, "attn_dwconv", x.dtype).attn_dwconv(*_dense(x, w))


def row_softmax(x: Tensor, backend: str = "auto") -> Tensor:
    """Softmax over the last dim of a (B, H, N, M) map."""
    _check_tensor("x", x, 4)
    return resolve_backend(backend, x.device, "row_softmax", x.dtype).row_softmax(x.contiguous())


def attn_value(a: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """(B, H, N, M) @ (B, H, M, d) -> (B, H, N, d)."""
    _check_tensor("a", a, 4)
    _check_tensor("v", v, 4, a)
    if tuple(v.shape[:2]) != tuple(a.shape[:2]) or v.shape[2] != a.shape[3]:
        raise ValueError(f"v: expected shape ({a.shape[0]}, {a.shape[1]}, {a.shape[3]}, d), got {tuple(v.shape)}")
    return resolve_backend(backend, a.device, "attn_value", a.dtype).attn_value(*_dense(a, v))
