"""The CPU backend (refiner._C's C++ kernels) built under AddressSanitizer and UBSan, and its tests run
on that build: an out-of-bounds read or write, or undefined behaviour (overflow, misaligned access,
a bad shift) in a driver or a tile function stops the run with a report naming the source line.

    python tests/cpu_asan.py         # (make cpu-asan) ~6 min on 2 cores with the build, 1 min without

The child process builds csrc/*.cpp and csrc/cpu/*.cpp (no CUDA) into build/cpu_asan, loads the
library (it registers torch.ops.refiner.* as refiner._C does) and stands it in for refiner._C.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What runs the CPU kernels: the ops and their checks, extreme shapes and bad inputs, the property tests,
# and the fused models (Triton is hidden under ASan; CUDA is not built: those cases skip).
FILES = ["test_compiled_ops.py", "test_extremes.py", "test_bad_inputs.py", "test_properties.py", "test_fused.py"]
# The libstdc++ link check reads the installed extension's file, which this build stands in for; the
# subprocess cases start a python without the stand-in (and with the preloaded runtime, under which
# Triton aborts); torch.compile cases spend minutes of sanitized tracing on Python code.
DESELECT = "not libstdcxx and not in_a_subprocess and not without_extension and not torch_compile"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-sanitize=vptr"]


def load() -> None:
    """Build (ninja: only what changed) and load the sanitized library; stand it in for refiner._C."""
    import types

    import torch
    from torch.utils.cpp_extension import load as load_extension
    build_dir = os.path.join(ROOT, "build", "cpu_asan")
    os.makedirs(build_dir, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # setup.py's flags but -O1 -g (readable reports, a usable speed), no -DNDEBUG (asserts stay on)
    load_extension(name="refiner_cpu_asan", sources=sources, extra_include_paths=[os.path.join(ROOT, "csrc")],
                   extra_cflags=["-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=fast", "-fopenmp"] + SANITIZE,
                   extra_ldflags=SANITIZE + ["-fopenmp"], build_directory=build_dir, is_python_module=False)
    # the checks are compiled in (a build without them would pass everything): both runtimes' hooks
    hooks = subprocess.run(["nm", "-D", "--undefined-only", os.path.join(build_dir, "refiner_cpu_asan.so")],
                           capture_output=True, text=True, check=True).stdout
    assert "__asan_report_load" in hooks and "__ubsan_handle_" in hooks, "refiner_cpu_asan.so is not instrumented"
    sys.modules["refiner._C"] = types.ModuleType("refiner._C")
    from refiner import _compiled
    assert _compiled.AVAILABLE and not _compiled.HAS_CUDA, _compiled.UNAVAILABLE_REASON


def main() -> int:
    from asan import run_pytest
    prelude = "sys.path.insert(0, '.')\nimport cpu_asan\ncpu_asan.load()\n"
    return run_pytest(FILES, env={"UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}, prelude=prelude,
                      pytest_args=["-k", DESELECT])


if __name__ == "__main__":
    sys.exit(main())
