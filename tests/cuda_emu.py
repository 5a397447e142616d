"""Build and load csrc/cuda/*.cu on the CPU emulator (csrc/cuda/emu): torch.ops.refiner_cuda_emu.

The CUDA kernels and their launchers compiled as C++ against cuda_emu.h, so that their own code
(shared-memory layouts, thread striding, barriers, shuffles, grid-stride loops, launch sizes) runs in
the tests of a machine without a GPU. Built once into build/cuda_emu (ninja, ~30 s on 2 cores).

`python tests/cuda_emu.py --asan` runs tests/test_cuda_emu*.py again with the emulated kernels built
under AddressSanitizer: an out-of-bounds read or write of global memory (the tensors) stops it with
a report naming the kernel line, the CPU stand-in for compute-sanitizer's memcheck (~8 min on 2 cores;
one fiber order per case, see test_cuda_emu.on_schedules).

The emulated device has 2 SMs, so grid-stride launchers give each block many tiles; set
REFINER_EMU_SMS=132 to launch the H100's grids instead (e.g. to replay a GPU-only failure).
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNSUPPORTED = None if sys.platform.startswith("linux") else "the emulator's fibers need Linux (ucontext)"
# Set by --asan for its child process: build with AddressSanitizer (its runtime is preloaded).
ASAN = os.environ.get("REFINER_EMU_ASAN") == "1"


def load():
    """torch.ops.refiner_cuda_emu, building it if needed (a build error raises)."""
    if not hasattr(torch.ops.refiner_cuda_emu, "refine_eval"):
        from torch.utils.cpp_extension import load as load_extension
        build_dir = os.path.join(ROOT, "build", "cuda_emu_asan" if ASAN else "cuda_emu")
        os.makedirs(build_dir, exist_ok=True)
        # -ffp-contract=fast: a*b+c as one FMA, as nvcc compiles the kernels
        flags = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else ["-O2"]
        load_extension(name="refiner_cuda_emu", sources=[os.path.join(ROOT, "csrc/cuda/emu/ops_cuda_emu.cpp")],
                       extra_include_paths=[os.path.join(ROOT, "csrc")], extra_cflags=flags + ["-ffp-contract=fast"],
                       extra_ldflags=["-fsanitize=address"] if ASAN else [], build_directory=build_dir,
                       is_python_module=False)
    return torch.ops.refiner_cuda_emu


def _run_under_asan() -> int:
    from asan import run_pytest
    return run_pytest(["test_cuda_emu.py", "test_cuda_emu_train.py"], env={"REFINER_EMU_ASAN": "1"})


if __name__ == "__main__":
    if sys.argv[1:] != ["--asan"]:
        sys.exit("usage: python tests/cuda_emu.py --asan")
    sys.exit(_run_under_asan())
