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


def assert_no_worse_than(got, want, half, names, slack=1e-3):
    """Gradients of a kernel with TF32 dots: each is at least as close (2-norm) to the fp32/fp64
    reference `want` as the reference's own gradients computed in the half type (`half`), up to
    `slack` of the reference's norm. Elementwise tolerances do not fit: a relu6 whose input lies
    within TF32 rounding of 0 or 6 gates its gradient the other way, and under training-mode
    BatchNorm that one entry moves dA by O(10%) of its scale (~1% of the entries at N = 20-200);
    the half-type reference flips several times as many. A real bug (a tile, a channel chunk, a
    term of the BatchNorm backward) gives a norm error far above the half type's."""
    for n, a, b, h in zip(names, got, want, half):
        b = b.double()
        err, base = (a.double() - b).norm().item(), (h.double() - b).norm().item()
        assert err <= base + slack * b.norm().item(), \
            f"d{n}: |kernel - ref| = {err:.3e} > |half-type ref - ref| = {base:.3e} (|ref| = {b.norm().item():.3e})"
