"""Test helpers (the input makers live in refiner.testing so benchmarks share them)."""
from refiner.testing import random_attn, random_dla, train_args  # noqa: F401


def relu6_flips(numel: int) -> int:
    """Elements a correct fp32 gradient may get wrong against an fp64 reference on a large map: a
    pre-activation within rounding of 0 or 6 (about one per ~10^7 expanded pixels) flips a relu6 mask,
    which moves that pixel's gradient and its k x k neighbours' by O(1) of the scale. Measured on the
    CPU kernels (same fp32 arithmetic): up to ~100 elements of 7.9M at B=17, N=197 (max error 1.1 on a
    scale of 85) and up to 20 of 2.1M at N=1025. A real bug (a tile edge, a block's second tile, a
    partial tile) touches far more than 16 + 2e-5 of the elements."""
    return 16 + numel // 50_000
