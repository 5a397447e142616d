"""Shared helpers of the Triton backend: availability, launch configuration."""
from __future__ import annotations

import inspect
import os

import torch

try:  # Triton is optional: the package imports without it, AVAILABLE says why not.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    _TRITON_ERROR = None
except Exception as e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _TRITON_ERROR = f"triton is not importable: {type(e).__name__}: {e}"


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability() -> tuple[bool, str]:
    """(available, reason). Only asks torch whether a GPU exists; makes no Triton driver call."""
    if _TRITON_ERROR is not None:
        return False, _TRITON_ERROR
    if interpreting():
        return True, ""
    if torch.cuda.is_available():
        return True, ""
    return False, "no CUDA GPU visible and TRITON_INTERPRET=1 is not set (the Triton interpreter is off)"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# What the kernels compute in: fp32 accumulation of fp32/fp16/bf16 inputs. float64 would come back
# with float32's accuracy, so it is refused (refiner.ops' "auto" picks another backend for it).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(*tensors) -> None:
    """Device and dtype of the tensors a kernel is given (None skipped)."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not interpreting():
            raise RuntimeError("refiner_triton: CPU tensors need TRITON_INTERPRET=1 (set before importing "
                               "triton); use the 'cpu' or 'reference' backend instead")
        if t.dtype not in DTYPES:
            raise TypeError(f"refiner_triton: {t.dtype} tensors are not supported (the Triton kernels compute "
                            "in float32); for float64 use the 'cpu' backend (CPU) or 'reference'")


MAX_IMAGE_MAP = 2 ** 31 - 1  # elements of one image's (H, N, N) maps the refine kernels index in int32


def check_image_map(attn) -> None:
    """The refine kernels address one image's maps with int32 offsets from a 64-bit image base (an
    int32 offset tensor costs half the registers of a 64-bit pointer tensor): H N^2 must fit."""
    H, N = attn.shape[1], attn.shape[2]
    if H * N * N > MAX_IMAGE_MAP:
        raise ValueError(f"attn: one image's maps hold H*N*N = {H * N * N} elements, more than the Triton "
                         f"refine kernels' int32 offsets address (2^31 - 1); use backend='reference'")


def num_warps_for(elems: int) -> int:
    """A simple warps heuristic by tile size (GPU only; ignored by the interpreter)."""
    if interpreting():
        return 1
    if elems >= 4096:
        return 8
    if elems >= 1024:
        return 4
    return 2


def autotuning() -> bool:
    """GPU autotuning is on unless REFINER_TRITON_AUTOTUNE=0 (GPU test runs: every new shape would
    otherwise compile and time each config, minutes over a test suite)."""
    return os.environ.get("REFINER_TRITON_AUTOTUNE", "1") != "0"


# Constexprs that the launchers derive from the tensors' dtypes, which Triton keys on itself. They
# hold a tl.dtype, which Triton's on-disk tuning cache (TRITON_CACHE_AUTOTUNING=1) cannot write:
# json.dumps of the key raised "Object of type dtype is not JSON serializable" at every launch
# (H200, Triton 3.6).
FROM_DTYPES = ("DOT_T",)


def tuning_key(fn, configs, key) -> list:
    """key, then every constexpr parameter of fn that no config sets: a switch such as the dot
    precision (PREC) changes what the kernel does, so its timings must not share a tuning-cache
    entry (in memory, and on disk with Triton's TRITON_CACHE_AUTOTUNING=1) with another value's.
    Constexprs that follow from the key (HP from H) add nothing, but nothing has to be remembered.
    Triton adds the tensors' dtypes itself (FROM_DTYPES stay out)."""
    jit = getattr(fn, "fn", fn)  # JITFunction / InterpretedFunction -> the Python function
    by_config = set().union(*(cfg.kwargs for cfg in configs))
    switches = [n for n, p in inspect.signature(jit).parameters.items()
                if "constexpr" in str(p.annotation) and n not in by_config and n not in key
                and n not in FROM_DTYPES]
    return list(key) + switches


def gpu_autotune(configs, key):
    """``triton.autotune`` for the GPU; returns None under the interpreter (or without Triton, or
    with REFINER_TRITON_AUTOTUNE=0), where callers launch the plain kernel with one fixed
    configuration. Decided from the environment only: no driver call at import. key: the shape
    arguments; the constexpr switches are added (tuning_key)."""
    def deco(fn):
        full_key = tuning_key(fn, configs, key)
        AUTOTUNE_SPECS[fn.__name__] = (fn, configs, full_key)
        if triton is None or interpreting() or not autotuning():
            return None
        tuned = triton.autotune(configs=configs, key=full_key)(fn)
        _TUNED[fn.__name__] = tuned
        return tuned
    return deco


_TUNED = {}  # kernel name -> its autotuner (GPU only)
# kernel name -> (kernel, configs, key), also where nothing is tuned: a typo in a key would only
# make the GPU's tuning cache coarser, silently (tests/test_triton_ops.py checks every name)
AUTOTUNE_SPECS = {}


def tuned_configs() -> dict:
    """The configurations the autotuners picked so far: {kernel: {key values: config}} (strings, for
    benchmark metadata: which tile shapes won on this GPU)."""
    return {name: {str(k): str(cfg) for k, cfg in getattr(t, "cache", {}).items()} for name, t in _TUNED.items()}


def use_tuned(tuned, *tensors) -> bool:
    return tuned is not None and all(t is None or t.is_cuda for t in tensors)


SCRATCH_BUDGET = 64 << 20  # bytes of per-program scratch one backward launch may use
FORCE_SCRATCH_BUDGET = None  # tests: force chunking under the interpreter too


def batch_chunks(B: int, progs_per_image: int, scratch_bytes_per_prog: int):
    """Split the batch so a launch's per-program scratch stays under SCRATCH_BUDGET bytes (GPU);
    one chunk under the interpreter unless FORCE_SCRATCH_BUDGET is set. Yields (lo, hi)."""
    budget = FORCE_SCRATCH_BUDGET or SCRATCH_BUDGET
    if interpreting() and FORCE_SCRATCH_BUDGET is None:
        yield 0, B
        return
    per = max(1, budget // max(1, progs_per_image * scratch_bytes_per_prog))
    for b0 in range(0, B, per):
        yield b0, min(B, b0 + per)


def token_major(B: int, H: int, N: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, D) tensor laid out as (B, N, H, D): the attention outputs of softmax_block and
    the refine ops, whose transpose to (B, N, H * D) tokens is then a view (the fused layer's
    projection input, no copy)."""
    return like.new_empty(B, N, H, D).transpose(1, 2)


def unit_head_stride(t: torch.Tensor) -> torch.Tensor:
    """q, k or v as the kernels read them: any batch, head and token strides, a unit-stride head
    dim (copied otherwise)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def bhn_strides(t: torch.Tensor):
    """(batch, head, token) strides of a (B, H, N, D) tensor with a unit-stride head dim."""
    return t.stride(0), t.stride(1), t.stride(2)
