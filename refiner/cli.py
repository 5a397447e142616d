"""Argument checks shared by the command-line scripts (refiner.* and benchmarks/*).

Each ``argparse`` type below raises ``ArgumentTypeError``, so a bad value ends in
``SystemExit(2)`` with ``argument --flag: <what was expected>``, before any model is
built or any data is read. Path types let ``""`` through: several scripts use it
(and YAML configs may too) for "not given".
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable, Optional

import torch

__all__ = ["positive_int", "nonnegative_int", "float_in", "positive_float", "nonnegative_float", "probability",
           "existing_file", "existing_dir", "output_dir", "device", "device_or_auto", "model_name", "auto_augment",
           "compile_backend", "check_img_size"]


def _int(s) -> int:
    try:
        return int(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def positive_int(s) -> int:
    v = _int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def nonnegative_int(s) -> int:
    v = _int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def float_in(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite float between ``lo`` and ``hi``, each end included unless ``*_open``.
    nan and +-inf are always refused: no option means anything by them (a nan lr trains a model of
    nans), and a bare ``v < lo`` test would let nan through (every comparison with nan is False)."""
    if math.isinf(hi):
        want = f"a number {'>' if lo_open else '>='} {lo:g}" if math.isfinite(lo) else "a finite number"
    elif math.isinf(lo):
        want = f"a number {'<' if hi_open else '<='} {hi:g}"
    else:
        want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(s) -> float:
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}")
        return v
    return check


positive_float = float_in(0, lo_open=True)
nonnegative_float = float_in(0)
probability = float_in(0, 1)


def existing_file(s: str) -> str:
    if s and not os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"no such file: {s!r}" if not os.path.exists(s) else
                                         f"{s!r} is not a file")
    return s


def existing_dir(s: str) -> str:
    if s and not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"no such directory: {s!r}" if not os.path.exists(s) else
                                         f"{s!r} is not a directory")
    return s


def output_dir(s: str) -> str:
    """A folder that may not exist yet, but is not a file: found before the run, not after it."""
    if s and os.path.exists(s) and not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s!r} exists and is not a directory")
    return s


def device(s: str) -> str:
    """'cpu', 'cuda' or 'cuda:N', usable on this machine. Kept a string (args are saved as YAML)."""
    try:
        d = torch.device(s)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {s!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{s!r}: CUDA is not available on this machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{s!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return s


def device_or_auto(s: str) -> str:
    return s if s == "auto" else device(s)


def model_name(s: str) -> str:
    """A model timm can build (``import refiner`` has registered refiner_vit_s/m/l)."""
    import timm
    import refiner  # noqa: F401  (registers the Refiner models)
    if not timm.is_model(s):
        raise argparse.ArgumentTypeError(f"unknown model {s!r} (e.g. refiner_vit_s, refiner_vit_m, refiner_vit_l, "
                                         f"or any timm model name)")
    return s


# Sections after the policy name that timm's parsers (timm 1.0, data/auto_augment.py) act on. They
# skip, without a word, a section with no digit ('rand-foo', 'rand-m9-xyz', 'rand-mstdinf', a trailing
# '-') and RandAugment's 't<set>' for an unknown set (default ops), so those are refused here.
_AA_SECTIONS = {
    "rand": ("RandAugment", r"(mstd|mmax|inc|m|n|p)\d.*|t(weights|3aw|3a)",
             "m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<0|1>, tweights, t3aw, t3a"),
    "augmix": ("AugMix", r"(mstd|m|w|d|a|b)\d.*", "m<int>, w<int>, d<int>, a<float>, b<0|1>, mstd<float>"),
    "": ("AutoAugment", r"mstd\d.*", "mstd<float>"),
}


def auto_augment(s: str) -> str:
    """A timm auto-augment string, or '' for none. Built here with timm's own parser, dispatched on
    the prefix as timm.data.transforms_factory does, so a typo fails now and names the flag instead
    of failing inside timm when the loader is built (or being ignored: see _AA_SECTIONS)."""
    if not s:
        return s
    from timm.data import auto_augment as aa
    kind = "rand" if s.startswith("rand") else "augmix" if s.startswith("augmix") else ""
    name, section, known = _AA_SECTIONS[kind]
    for c in s.split("-")[1:]:
        if not re.fullmatch(section, c):  # the values themselves are checked by timm's int()/float() below
            raise argparse.ArgumentTypeError(f"{s!r}: unknown {name} section {c!r}, which timm would ignore "
                                             f"(auto-augment sections: {known})")
    build = (aa.rand_augment_transform if kind == "rand" else
             aa.augment_and_mix_transform if kind == "augmix" else aa.auto_augment_transform)
    try:
        build(s, dict(translate_const=100, img_mean=(124, 116, 104)))  # placeholder hparams: the string is checked
    except Exception as e:  # timm's parser reports with assert, int()/float() and lookups alike
        raise argparse.ArgumentTypeError(
            f"{s!r} is not a timm auto-augment policy ({str(e) or type(e).__name__}); expected '' for none, "
            f"RandAugment (e.g. rand-m9-mstd0.5-inc1), AugMix (e.g. augmix-m5-w4-d2) or AutoAugment "
            f"(v0, v0r, original, originalr or 3a, e.g. original-mstd0.5)") from None
    return s


def compile_backend(s: str) -> str:
    """A torch.compile backend name (torch._dynamo.list_backends: inductor, aot_eager, eager, ...)."""
    import torch._dynamo  # imported on use: a second or two
    known = torch._dynamo.list_backends(exclude_tags=())
    if s not in known:
        raise argparse.ArgumentTypeError(f"unknown torch.compile backend {s!r} (one of {', '.join(known)})")
    return s


def check_img_size(img_size: Optional[int], patch_size, flag: str = "--img-size",
                   error: Optional[Callable[[str], object]] = None):
    """The patch grid floors ``img_size / patch``: a size that is not a multiple would silently
    drop the image's right and bottom border (and one under the patch fails deep in a conv).
    ``error``: the parser's ``error`` where there is one (exit code 2), else ``SystemExit(msg)``."""
    p = patch_size[0] if isinstance(patch_size, (tuple, list)) else int(patch_size)
    if img_size is not None and img_size % p:
        msg = f"{flag} {img_size}: must be a multiple of the model's patch size {p}"
        if error is not None:
            error(msg)
        raise SystemExit(msg)


# glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mmap'd pages, so
# an op that allocates large temporaries (the reference refine block: (B, rH, N, N) maps) pays a
# page fault per 4 KiB page on every call, while a process whose heap has grown by earlier churn
# does not: on the 2-core dev VM the same reference op took 190-330 ms in a fresh process and
# 63-82 ms after one training step. Benchmarks therefore run with mmap off and no heap trimming
# (the reference's best case, a steady state), unless REFINER_BENCH_MALLOC=default.
STEADY_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def malloc_mode() -> str:
    """How this process's allocator was set up: 'steady' (STEADY_MALLOC) or 'default'."""
    return "steady" if os.environ.get("GLIBC_TUNABLES") == STEADY_MALLOC else "default"


def reexec_with_steady_malloc() -> None:
    """Call first thing under ``if __name__ == "__main__"`` of a benchmark script (never from a
    library or test: it replaces the process). No-op off Linux, when already set, or when
    REFINER_BENCH_MALLOC=default."""
    if (not sys.platform.startswith("linux") or os.environ.get("REFINER_BENCH_MALLOC") == "default"
            or "GLIBC_TUNABLES" in os.environ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=STEADY_MALLOC)
    sys.stdout.flush()
    # orig_argv keeps `-m module` / `-c code` as given (sys.argv has lost them)
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def run_benchmark(main: Callable[[], object]) -> None:
    """A benchmark script's `if __name__ == "__main__"`: the steady allocator, then main();
    Ctrl-C exits with status 130 without a traceback."""
    reexec_with_steady_malloc()
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
