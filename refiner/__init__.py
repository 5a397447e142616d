"""Refiner attention: reference models and fused kernels.

`import refiner` registers refiner_vit_s/m/l with timm.
"""
__version__ = "0.1.0"

from . import reference  # noqa: F401
from .models import RefinerViT, refiner_vit_l, refiner_vit_m, refiner_vit_s  # noqa: F401
from .checkpoint import CheckpointError, load_checkpoint  # noqa: F401
from . import fused, ops  # noqa: F401,E402
