"""Test helpers (they live in refiner.testing so benchmarks share them)."""
from refiner.testing import random_attn, random_dla, train_args  # noqa: F401
