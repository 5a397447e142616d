"""Test set-up: without a GPU, run Triton kernels under the interpreter (with TF32 dots emulated);
hypothesis profiles.

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

if os.environ.get("TRITON_INTERPRET") == "1":
    try:  # TF32 dots round their operands as on the GPU (tests/tf32_emulation.py)
        import tf32_emulation
        tf32_emulation.install()
    except ImportError:  # no Triton: its tests skip
        pass

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property-test profiles: "ci" (default) and "long" (REFINER_HYPOTHESIS_PROFILE=long, for GPU rounds).
settings.register_profile("ci", max_examples=6, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("REFINER_HYPOTHESIS_PROFILE", "ci"))

# Under pytest-xdist each worker takes its share of the cores (no oversubscription of 2 cores).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# On a GPU, torch's own convolutions (the stems, the reference's DLA convs) run in full fp32:
# cuDNN defaults to TF32 for them, and rounding two nearly equal inputs to TF32 can split them by
# 2^-11: eager against compiled models differed by 1e-3 of a gradient's scale (H200, torch 2.11).
torch.backends.cudnn.allow_tf32 = False

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
