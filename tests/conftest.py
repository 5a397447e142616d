"""Test set-up: without a GPU, run Triton kernels under the interpreter.

TRITON_INTERPRET must be set before triton (or refiner_kernels) is imported,
which is why this happens at conftest import time.
"""
import os
import subprocess


def _gpu_present() -> bool:
    # Do not import torch.cuda state here; ask the driver tool instead, cheaply.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not _gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
