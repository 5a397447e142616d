"""Build the refiner._C extension (C++ CPU kernels always, CUDA kernels when possible).

Environment switches:
  REFINER_CUDA=auto|0|1   auto (default): build the CUDA part when nvcc and a CUDA build of
                          torch are present (a visible GPU is not needed); 0: never; 1: always
                          (fail if impossible).
  MAX_JOBS                parallel compile jobs (ninja), as in torch.utils.cpp_extension.
  TORCH_CUDA_ARCH_LIST    defaults to "8.0;9.0" when unset and no GPU is visible.
  CUDA_HOME               defaults to /usr/local/cuda when that exists.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    mode = os.environ.get("REFINER_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = None
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
    elif shutil.which("nvcc"):
        nvcc = shutil.which("nvcc")
    ok = nvcc is not None and torch.version.cuda is not None
    if mode in ("1", "on", "true", "yes"):
        if not ok:
            sys.exit(f"REFINER_CUDA=1 but cannot build CUDA: nvcc={nvcc}, torch.version.cuda={torch.version.cuda}")
        return True
    return ok


WITH_CUDA = _want_cuda()
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    try:
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # pragma: no cover
        visible = False
    if not visible:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
# -fopenmp: at::parallel_for is an inline template (ATen/ParallelOpenMP.h); without OpenMP enabled
# in *this* compilation its `#pragma omp parallel` is ignored and every driver runs single-threaded.
# -ffp-contract=fast: a*b+c becomes one FMA in the CPU micro-kernels (as nvcc does by default)
cxx_flags = ["-O3", "-DNDEBUG", "-ffp-contract=fast"] + (["-fopenmp"] if sys.platform.startswith("linux") else [])
link_flags = ["-fopenmp"] if sys.platform.startswith("linux") else []


def _torch_libstdcxx():
    """The libstdc++ shared library this process (which imported torch) has mapped, or None.

    Linked by path, it is the extension's libstdc++ whatever the compiler's default: a g++ that
    links libstdc++ statically (the one on the lent H100 machines does) gives the extension a second
    copy of the library whose std::locale facet ids differ from torch's, and the first integer
    streamed into an error message built by c10 (TORCH_CHECK) then crashed the process."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


_LIBSTDCXX = _torch_libstdcxx() if sys.platform.startswith("linux") else None
if _LIBSTDCXX:
    link_flags.append(_LIBSTDCXX)
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    ext = CUDAExtension(
        "refiner._C", sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("REFINER_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-DNDEBUG", "-lineinfo"]},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("refiner._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

# Metadata and packages live in pyproject.toml; this file only adds the extension.
setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
