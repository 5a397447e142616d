"""refine_train's CUDA passes (csrc/cuda/train_cuda.cu) on the CPU emulator, and the CPU's streamed passes.

Each pass of train_pass.h (Y2 moments, Y3, gw_pro with BN2's sums, gw_dw with BN1's sums or gA, gw_exp
with gA) against an fp64 plain-PyTorch statement of the same pass, for the emulated CUDA kernel (NaN-fenced
inputs, three fiber orders bitwise equal, the write check on small shapes) and for the CPU registration.
Then refine_train end to end with its passes on the emulator (REFINER_TRAIN_PASS_OP): output, every
gradient and the batch statistics against the reference module.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import cuda_emu
from test_compiled_ops import _train_fns, assert_close, check_train, check_train_stats, train_inputs
from test_cuda_emu import fenced, on_schedules, raises_in_launcher

pytestmark = pytest.mark.skipif(cuda_emu.UNSUPPORTED is not None, reason=str(cuda_emu.UNSUPPORTED))
PASSES = ["y2_moments", "y3", "pro_grad", "dw_grad", "exp_grad"]
PARAM_NAMES = ["w_exp", "w_dw", "w_pro", "s1", "m1", "b1", "s2", "m2", "b2", "k2", "c1_2", "c2_2", "k1", "c1_1", "c2_1"]


@pytest.fixture(scope="module")
def E():
    return cuda_emu.load()


def relu6_mask(x):
    return (x > 0) & (x < 6)


def pass_inputs(B, H, N, ratio, k, dtype=torch.float64, seed=0, dyadic=False):
    """A, the 15 parameters of train_pass.h (BN in centred form, relu6 clipping on both sides), gY3, gZ.
    dyadic: A and what feeds the pre-activations of E and D on coarse binary grids (A, m1: multiples of
    2^-5; w_exp, s1, b1, s2, b2: 2^-2; w_dw, m2: 2^-4), so that those are exact in fp32 (at most 24
    significant bits for H <= 16, k <= 7) and every kernel takes the fp64 statement's relu6 branches."""
    g = torch.Generator().manual_seed(seed)
    rH = H * ratio
    r = lambda *s, lo=-1.0, hi=1.0: (torch.rand(*s, generator=g, dtype=torch.float64) * (hi - lo) + lo)  # noqa: E731
    p = dict(w_exp=r(rH, H), w_dw=r(rH, k, k) / k, w_pro=r(H, rH), s1=r(rH, lo=2, hi=8), m1=r(rH, lo=-.1, hi=.1),
             b1=r(rH, lo=0, hi=4), s2=r(rH, lo=1, hi=4), m2=r(rH, lo=-.5, hi=.5), b2=r(rH, lo=0, hi=4),
             k2=r(rH, lo=.5, hi=2), c1_2=r(rH, lo=-.1, hi=.1), c2_2=r(rH, lo=-.3, hi=.3), k1=r(rH, lo=.5, hi=2),
             c1_1=r(rH, lo=-.1, hi=.1), c2_1=r(rH, lo=-.3, hi=.3))
    if ratio == 1:
        for n in ("w_exp", "s1", "m1", "b1", "k1", "c1_1", "c2_1"):
            p[n] = None
    A = torch.rand(B, H, N, N, generator=g, dtype=torch.float64)
    if dyadic:
        grid = lambda t, step: None if t is None else (t / step).round() * step  # noqa: E731
        A = grid(A, 2 ** -5)
        for n, step in (("w_exp", 2 ** -2), ("w_dw", 2 ** -4), ("s1", 2 ** -2), ("m1", 2 ** -5), ("b1", 2 ** -2),
                        ("s2", 2 ** -2), ("m2", 2 ** -4), ("b2", 2 ** -2)):
            p[n] = grid(p[n], step)
    gy3, gz = torch.randn(B, H, N, N, generator=g, dtype=torch.float64), torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(A), {n: cast(t) for n, t in p.items()}, cast(gy3), cast(gz)


def pass_ref(which, A, p, gy3, gz, expand, magnitude=False):
    """The pass in plain fp64 PyTorch: (mean, m2, gw, sum_g, sum_gx, map, gA) with None for what it leaves.
    magnitude: gw as the sums of the |terms| instead (the scale of its rounding error)."""
    A, gy3, gz = A.double(), gy3.double(), gz.double()
    p = {n: None if t is None else t.double() for n, t in p.items()}
    col = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    mix = lambda w, x: torch.einsum("oc,bcyx->boyx", w, x)  # noqa: E731
    mag = (lambda t: t.abs()) if magnitude else (lambda t: t)  # noqa: E731
    wsum = lambda g, x: torch.einsum("bcyx,bdyx->cd", mag(g), mag(x))  # noqa: E731
    k = p["w_dw"].shape[-1]
    U = mix(p["w_exp"], A) if expand else None
    Ein = (col(p["s1"]) * (U - col(p["m1"])) + col(p["b1"])).clamp(0, 6) if expand else A
    Y2 = F.conv2d(Ein, p["w_dw"].unsqueeze(1), padding=k // 2, groups=Ein.shape[1])
    if which == "y2_moments":
        mean = Y2.mean((0, 2, 3))
        return mean, ((Y2 - col(mean)) ** 2).sum((0, 2, 3)), None, None, None, None, None
    D = (col(p["s2"]) * (Y2 - col(p["m2"])) + col(p["b2"])).clamp(0, 6)
    if which == "y3":
        return None, None, None, None, None, mix(p["w_pro"], D), None
    gate = lambda g, x: torch.where(relu6_mask(x), g, 0.0)  # noqa: E731  (hardtanh_backward: a select, NaN-free)
    gd2 = gate(mix(p["w_pro"].t(), gy3), D)
    if which == "pro_grad":
        return None, None, wsum(gy3, D), gd2.sum((0, 2, 3)), (gd2 * (Y2 - col(p["m2"]))).sum((0, 2, 3)), None, None
    gy2 = col(p["k2"]) * ((gd2 - col(p["c2_2"]) * (Y2 - col(p["m2"]))) - col(p["c1_2"]))
    ge = torch.nn.grad.conv2d_input(Ein.shape, p["w_dw"].unsqueeze(1), gy2, padding=k // 2, groups=Ein.shape[1])
    gw_dw = torch.nn.grad.conv2d_weight(mag(Ein), p["w_dw"].unsqueeze(1).shape, mag(gy2), padding=k // 2,
                                        groups=Ein.shape[1]).squeeze(1)
    if which == "dw_grad" and not expand:
        return None, None, gw_dw, None, None, None, gz + ge
    ge1 = gate(ge, Ein)
    if which == "dw_grad":
        return None, None, gw_dw, ge1.sum((0, 2, 3)), (ge1 * (U - col(p["m1"]))).sum((0, 2, 3)), None, None
    gu = col(p["k1"]) * ((ge1 - col(p["c2_1"]) * (U - col(p["m1"]))) - col(p["c1_1"]))
    return None, None, wsum(gu, A), None, None, None, gz + mix(p["w_exp"].t(), gu)


def run_pass(op, which, A, p, gy3, gz, expand, fence=False):
    """op(...) on fresh copies of map / gA: (mean, m2, gw, sum_g, sum_gx, map, gA), None where unused."""
    i = PASSES.index(which)
    f = fenced if fence else (lambda t: t)
    mp = None if which == "y2_moments" else (torch.zeros_like(A) if which == "y3" else gy3.clone())
    ga = gz.clone() if which == "exp_grad" or (which == "dw_grad" and not expand) else None
    mp, ga = f(mp), f(ga)
    outs = op(i, f(A), [None if p[n] is None else f(p[n]) for n in PARAM_NAMES], mp, ga, expand)
    outs = [o if o.numel() else None for o in outs]
    return (*outs, mp if which == "y3" else None, ga)


NAMES = ["mean", "m2", "gw", "sum_g", "sum_gx", "map", "gA"]


def check_pass(op, which, B, H, N, ratio, k, dtype, seed=0, schedules=None, dyadic=False):
    expand = ratio != 1
    A, p, gy3, gz = pass_inputs(B, H, N, ratio, k, dtype, seed, dyadic)
    run = lambda: tuple(t for t in run_pass(op, which, A, p, gy3, gz, expand, fence=schedules is not None)  # noqa: E731
                        if t is not None)
    got = schedules(run) if schedules else run()
    full = pass_ref(which, A, p, gy3, gz, expand)
    ref, names = [t for t in full if t is not None], [n for n, t in zip(NAMES, full) if t is not None]
    # fp64: rounding only. fp32: maps from sums of H (+ k^2) products, sums over B N^2 pixels in fp64 of
    # fp32 products, and relu6 masks that may flip where a pre-activation rounds across 0 or 6. gw sums
    # products over every pixel, on the tensor cores in fp32 over a tile's 256 pixels: its rounding
    # scales with the sum of the |terms|, which cancellation can leave far above the result (the long
    # profile found gw_pro = 0.009 from terms of ~1, off by 8e-7): a floor of 4e-6 of it (~4 sqrt(256) 2^-24).
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    gw_mag = pass_ref(which, A, p, gy3, gz, expand, magnitude=True)[2]
    floor = 0.0 if dtype == torch.float64 or gw_mag is None else 4e-6 * gw_mag
    assert len(got) == len(ref)
    for n, a, e in zip(names, got, ref):
        assert not a.isnan().any(), n
        assert_close(a, e, tol, tol, f"{which} {n}", abs_tol=floor if n == "gw" else 0.0)
    return got


PASS_CASES = [  # B, H, N, ratio, k: N = 1 (smaller than the kernel), 33 and 40 (partial 32-column and
    (1, 1, 1, 3, 3), (2, 3, 17, 2, 3), (1, 2, 33, 1, 5), (1, 4, 40, 2, 7), (2, 2, 9, 3, 1), (1, 3, 5, 1, 3)]


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("B,H,N,ratio,k", PASS_CASES)
def test_cuda_train_pass(E, which, B, H, N, ratio, k):
    """The emulated CUDA pass in fp64 (tight) and fp32, three fiber orders bitwise equal."""
    if which == "exp_grad" and ratio == 1:
        pytest.skip("no expansion: the pass does not exist")
    check_pass(E._train_pass, which, B, H, N, ratio, k, torch.float64, schedules=lambda f: on_schedules(E, f))
    check_pass(E._train_pass, which, B, H, N, ratio, k, torch.float32)


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("B,H,N,ratio,k", PASS_CASES)
def test_cpu_train_pass(which, B, H, N, ratio, k):
    """The CPU's streamed pass (torch.ops.refiner._train_pass) against the same statement."""
    if which == "exp_grad" and ratio == 1:
        pytest.skip("no expansion: the pass does not exist")
    for dtype in (torch.float64, torch.float32):
        check_pass(torch.ops.refiner._train_pass, which, B, H, N, ratio, k, dtype)


@given(which=st.sampled_from(PASSES), B=st.integers(1, 2), H=st.integers(1, 16), N=st.integers(1, 40),
       ratio=st.integers(1, 6), k=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_cuda_train_pass_property(E, which, B, H, N, ratio, k, seed, dtype):
    """fp64: the CUDA-core kernel; fp32: the tensor-core kernel (H <= 16), on dyadic inputs (random ones
    flip a relu6 gate against fp64 now and then: a gE1 off by one pixel's value in ~1 of 1,000 long-profile
    examples, on all three kernels alike)."""
    if which == "exp_grad" and ratio == 1:
        which = "dw_grad"
    check_pass(E._train_pass, which, B, H, N, ratio, k, dtype, seed, dyadic=dtype == torch.float32)


@pytest.mark.parametrize("rows", [1, 3, 32])
def test_cuda_train_pass_tile_rows(E, monkeypatch, rows):
    monkeypatch.setenv("REFINER_CUDA_TILE_ROWS", str(rows))
    for which in PASSES:
        check_pass(E._train_pass, which, 2, 2, 11, 2, 3, torch.float64)


@pytest.mark.parametrize("rows,dtype", [(1, torch.float64), (3, torch.float64), (4, torch.float32)])
def test_cuda_train_pass_write_conflicts(E, monkeypatch, rows, dtype):
    """No shared-memory word written by two threads between two barriers, in any pass: the CUDA-core
    kernel (fp64; tiles of 1 and 3 rows) and the tensor-core kernel (fp32)."""
    monkeypatch.setenv("REFINER_CUDA_TILE_ROWS", str(rows))
    E.set_write_check(True)
    try:
        for which in PASSES:
            check_pass(E._train_pass, which, 1, 2, 7, 2, 3, dtype)
        check_pass(E._train_pass, "dw_grad", 1, 2, 7, 1, 5, dtype)
    finally:
        E.set_write_check(False)


@raises_in_launcher
def test_cuda_train_pass_missing_tensor(E):
    A, p, gy3, gz = pass_inputs(1, 2, 5, 2, 3)
    p["k2"] = None
    with pytest.raises(RuntimeError, match="pass 3 needs k2"):
        run_pass(E._train_pass, "dw_grad", A, p, gy3, gz, True)


# ----------------------------------------------------------------------------- the tensor-core passes
# fp32 maps with H <= 16 and k <= 7 run on csrc/cuda/train_tc.cuh (3xTF32) unless
# REFINER_CUDA_TENSOR_CORES=0. N = 17 and 40 cross the 8-row and 32-column tiles; (12, ratio 3) is
# Refiner-ViT-S's shape (36 channels: a partial last 16-channel chunk), (16, ratio 6) six chunks of
# a full m16 tile of heads; N = 1 is smaller than the kernel.
TC_PASS_CASES = [(2, 12, 17, 3, 3), (1, 16, 40, 6, 5), (1, 4, 33, 1, 3), (2, 3, 9, 2, 7), (1, 5, 20, 3, 1),
                 (1, 1, 1, 3, 3), (1, 16, 12, 1, 7)]


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("B,H,N,ratio,k", TC_PASS_CASES)
def test_cuda_train_pass_tensor_cores(E, monkeypatch, which, B, H, N, ratio, k):
    """fp32 against fp64 with the CUDA-core kernel's tolerance, three fiber orders bitwise equal (no
    missing barrier between the warps' mma steps), beside the CUDA-core kernel's result."""
    if which == "exp_grad" and ratio == 1:
        pytest.skip("no expansion: the pass does not exist")
    monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "1")
    tc = check_pass(E._train_pass, which, B, H, N, ratio, k, torch.float32, schedules=lambda f: on_schedules(E, f))
    monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "0")
    core = check_pass(E._train_pass, which, B, H, N, ratio, k, torch.float32)
    if N > 8:  # the rounding differs in the last bits: the tensor-core path ran
        assert any(not torch.equal(a, b) for a, b in zip(tc, core))


@pytest.mark.parametrize("kernel", ["tensor cores", "CUDA cores", "CPU"])
def test_cuda_train_pass_non_finite(E, monkeypatch, kernel):
    """A NaN and an Inf in the map and an Inf in gY3 (fp32): each pass's outputs are non-finite exactly
    where the fp64 statement's are, on the emulated CUDA kernels (3xTF32's correction products must
    not add a NaN) and the CPU's streamed passes."""
    monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "1" if kernel == "tensor cores" else "0")
    op = torch.ops.refiner._train_pass if kernel == "CPU" else E._train_pass
    A, p, gy3, gz = pass_inputs(1, 3, 20, 2, 3, torch.float32)
    A[0, 1, 6, 7], A[0, 2, 12, 3] = float("nan"), float("inf")
    gy3[0, 0, 3, 2] = float("inf")
    for which in PASSES:
        ref = pass_ref(which, A, p, gy3, gz, True)
        for name, got, want in zip(NAMES, run_pass(op, which, A, p, gy3, gz, True), ref):
            if want is not None:
                assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), \
                    f"{which} {name}"


@pytest.mark.parametrize("H,k", [(17, 3), (2, 9)])
def test_cuda_train_pass_tensor_cores_fallback(E, monkeypatch, H, k):
    """H > 16 and kernel sizes past 7 run on the CUDA-core kernel: bitwise the switch-off result."""
    A, p, gy3, gz = pass_inputs(1, H, 9, 2, k, torch.float32)
    for which in PASSES:
        monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "0")
        off = run_pass(E._train_pass, which, A, p, gy3, gz, True)
        monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "1")
        for a, b in zip(run_pass(E._train_pass, which, A, p, gy3, gz, True), off):
            assert (a is None and b is None) or torch.equal(a, b), which


# ----------------------------------------------------------------------------- refine_train end to end
@pytest.mark.parametrize("B,H,N,d,ratio,k", [(2, 12, 17, 32, 3, 3), (1, 4, 33, 35, 1, 5), (2, 3, 9, 8, 2, 7)])
def test_refine_train_on_emulated_passes(E, monkeypatch, B, H, N, d, ratio, k):
    """C.refine_train with every rH-channel pass on the emulated CUDA kernel and the rest on the ATen
    expressions the CUDA backend runs (REFINER_CPU_PORTABLE): output, gradients and batch statistics
    against the reference."""
    monkeypatch.setenv("REFINER_TRAIN_PASS_OP", "refiner_cuda_emu::_train_pass")
    monkeypatch.setenv("REFINER_CPU_PORTABLE", "1")
    args, expand = train_inputs(B, H, N, d, ratio, k, torch.float32)
    check_train(*_train_fns(expand, d ** -0.5), args)
    check_train_stats(args, expand, 0.2)


@pytest.mark.parametrize("ratio,k", [(3, 1), (3, 3), (1, 3)])
def test_refine_train_on_emulated_passes_zero_variance(E, monkeypatch, ratio, k):
    """A constant map (zero batch variance in every channel with k = 1): the CUDA passes' per-tile
    moments and their Chan merges keep the statistics as exact as the CPU's (see
    test_compiled_ops.test_refine_train_zero_variance)."""
    from test_compiled_ops import _train_case
    monkeypatch.setenv("REFINER_TRAIN_PASS_OP", "refiner_cuda_emu::_train_pass")
    monkeypatch.setenv("REFINER_CPU_PORTABLE", "1")
    a = torch.full((2, 4, 9, 9), 1.0 / 9)
    (out, stats), _, (want, want_stats) = _train_case(a, ratio, k)
    assert torch.isfinite(out).all()
    assert_close(out.double(), want, 1e-5, 1e-6, "out")
    for s, w in zip(stats, want_stats):
        if w is not None:
            assert_close(s.mean.double(), w.mean, 1e-5, 1e-4, "mean")
            assert_close(s.var.double(), w.var, 1e-4, 1e-7, "var")
            if k == 1:
                assert s.var.abs().max() <= 1e-9
