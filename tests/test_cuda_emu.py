"""The CUDA kernels of csrc/cuda/ops_cuda.cu, run on the CPU emulator (csrc/cuda/emu/cuda_emu.h).

Not a GPU test: the kernel bodies and launchers themselves execute, thread by thread, with CUDA's
barrier and warp-shuffle semantics, an H100's shared-memory limits and a 2-SM grid (so the
grid-stride loops loop). Each op is compared with the fp64 reference, forward and every gradient
(fixed cases, hypothesis-drawn shapes, ratios and kernel sizes, and one image of Refiner-ViT-S).
Race checks:
- every case runs under three fiber orders whose results must be bitwise equal: a read of shared
  memory that another thread writes in the same barrier phase (a missing __syncthreads) changes
  with the order;
- small cases of every kernel run under the write check: no shared-memory word written by two
  threads between two barriers.
Inputs sit between NaN fences, so a read past any input shows up as NaN; `make emu-asan` reruns
this module under AddressSanitizer for out-of-bounds accesses of any tensor. The emulator's own
checks are tested first, on kernels with planted faults. What it cannot see: timing, the memory
model, registers and occupancy; compute-sanitizer on a GPU round covers those.
"""
from __future__ import annotations

import contextlib
import functools
import os
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cuda_emu
from refiner import reference as R
from test_compiled_ops import assert_close, grads, refine_inputs, softmax_inputs
from utils import (REFINE_NAMES, check_tensor_core_refine, check_tensor_core_refine_backward, check_tensor_core_softmax,
                   refine_eval_weight_sum_scales)

pytestmark = pytest.mark.skipif(cuda_emu.UNSUPPORTED is not None, reason=str(cuda_emu.UNSUPPORTED))
# Under `python tests/cuda_emu.py --asan`, ASan's C++ throw interceptor aborts once fibers have switched
# stacks, so the tests whose kernels must raise run only in the plain build.
raises_in_launcher = pytest.mark.skipif(cuda_emu.ASAN, reason="ASan run: C++ exceptions after fiber switches abort")


@pytest.fixture(scope="module")
def E():
    return cuda_emu.load()


def fenced(t):
    """t's values in the middle of a NaN-filled storage (a contiguous view: the launchers do not copy it)."""
    if t is None:
        return None
    pad = 4096
    buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype)
    buf[pad:pad + t.numel()] = t.reshape(-1)
    return buf[pad:pad + t.numel()].view(t.shape)


def on_schedules(E, fn, orders=None):
    """fn() with the fibers of each barrier phase run forward, reversed and shuffled: bitwise equal results.
    Under ASan one order: the orders change no address (the plain run compares them), and the run is 3x shorter."""
    results = []
    try:
        for order in orders or ((0,) if cuda_emu.ASAN else (0, 1, 2)):
            E.set_schedule(order)
            out = fn()
            results.append(out if isinstance(out, (tuple, list)) else (out,))
    finally:
        E.set_schedule(0)
    for order, res in enumerate(results[1:], 1):
        for i, (a, b) in enumerate(zip(results[0], res)):
            assert torch.equal(a, b), f"output {i} differs between fiber orders 0 and {order}: a data race"
    return results[0]


def seeded(check):
    """`check`'s draws from the global torch RNG (inputs, output gradients) seeded by its shape
    arguments, so that a failing hypothesis example replays exactly."""
    @functools.wraps(check)
    def run(*args, **kwargs):
        key = [a for a in (*args, *kwargs.values()) if isinstance(a, (bool, int, torch.dtype))]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(repr(key).encode()))
            return check(*args, **kwargs)
    return run


@contextlib.contextmanager
def tensor_cores(on):
    """REFINER_CUDA_TENSOR_CORES for the block: the forwards' tensor-core kernels or CUDA-core kernels."""
    before = os.environ.get("REFINER_CUDA_TENSOR_CORES")
    os.environ["REFINER_CUDA_TENSOR_CORES"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["REFINER_CUDA_TENSOR_CORES"]
        else:
            os.environ["REFINER_CUDA_TENSOR_CORES"] = before


def both_forwards(E, fn):
    """fn() (a forward, on_schedules) on the tensor-core kernel (the default) and on the CUDA-core kernel."""
    with tensor_cores(True):
        tc = fn()
    with tensor_cores(False):
        cc = fn()
    return tc, cc


def check_grads(names, got, ref, rtol, atol, sum_scales=None):
    # fp32 kernels against fp64: gradients sum fp32 products over up to B N^2 pixels (weights) or
    # rH k^2 terms (maps); 1e-4 relative (+ a fraction of the tensor's scale) covers that rounding, and
    # where sum_scales gives a weight's sums of |terms| (utils.refine_eval_weight_sum_scales), 4e-6 of
    # those (~4 sqrt(256) 2^-24: fp32 accumulation over a tile's pixels) covers cancellation
    for name, a, e in zip(names, got, ref):
        assert a.dtype == torch.float32 and not a.isnan().any(), name
        floor = 4e-6 * sum_scales[name] if sum_scales and name in sum_scales else 0.0
        assert_close(a, e, rtol, atol, f"grad {name}", abs_tol=floor)


# ----------------------------------------------------------------------------- the emulator itself
def test_emulator_shuffle_sum(E):
    out = E.selftest("sum", 64)
    x = torch.arange(128.0).view(4, 32)  # 2 blocks x 2 warps
    assert torch.equal(out[:4], x.sum(1))


def test_emulator_mma(E):
    """The emulated mma.sync m16n8k8 (TF32) with the fragment layouts of csrc/cuda/mma.cuh is A B + C."""
    i = torch.arange(128)
    a = ((i * 7) % 13 - 6).float().mul(0.25).view(16, 8)  # as mma_inputs() in ops_cuda_emu.cpp
    b = ((i[:64] * 5) % 11 - 5).float().mul(0.5).view(8, 8)
    out = E.selftest("mma", 32)
    assert torch.equal(out.view(16, 8), a @ b + 1)


@pytest.mark.parametrize("case,message", [
    ("divergent_sync", "__syncthreads reached by 64 of the 128 threads"),
    ("divergent_shfl", "__shfl_xor_sync reached by 16 of the 32 lanes"),
    ("mma_divergent", "mma_tf32 reached by 16 of the 32 lanes"),
    ("mma_unrounded", "lane 5 passed an operand that is not a TF32 value"),
    ("smem_overflow", "wrote past its 512 bytes of dynamic shared memory"),
    ("big_smem", "need cudaFuncSetAttribute"),
])
@raises_in_launcher
def test_emulator_reports_faults(E, case, message):
    with pytest.raises(RuntimeError, match=message):
        E.selftest(case, 128)


def test_emulator_exposes_races_and_uninitialised_shared_memory(E):
    with pytest.raises(AssertionError, match="data race"):
        on_schedules(E, lambda: E.selftest("race", 64), orders=(0, 1, 2))
    with pytest.raises(AssertionError, match="data race"):  # across warp collectives (warp skew)
        on_schedules(E, lambda: E.selftest("skew_race", 64), orders=(0, 1, 2))
    assert E.selftest("uninit", 64)[:64].isnan().all()


@pytest.fixture
def write_check(E):
    E.set_write_check(True)
    yield
    E.set_write_check(False)


@raises_in_launcher
def test_emulator_write_check(E, write_check):
    """Two threads writing then reading one word: invisible to the fiber orders (no interleaving
    within a phase), reported by the write check."""
    E.set_write_check(False)
    on_schedules(E, lambda: E.selftest("write_race", 64))
    E.set_write_check(True)
    with pytest.raises(RuntimeError, match="threads 0 and 1 of block 0 both wrote shared-memory byte 0"):
        E.selftest("write_race", 64)


# ----------------------------------------------------------------------------- softmax block
# N = 300: five key tiles; d = 128, the largest head size; N = d = 1.
@seeded
def check_softmax_block(E, B, H, N, d, prev):
    q, k, v, p = softmax_inputs(B, H, N, d, prev, torch.float32)
    s = d ** -0.5
    tc, cc = both_forwards(E, lambda: on_schedules(E, lambda: E.softmax_block(*map(fenced, (q, k, v, p)), s)))
    out, attn = cc
    gout, gattn = torch.randn_like(out), torch.randn_like(attn)
    gq, gk, gv, ga = on_schedules(E, lambda: E.softmax_block_backward(*map(fenced, (gout, gattn, q, k, v, attn)), s))
    ins = [t.double() for t in (q, k, v)] + ([p.double()] if prev else [])
    (r_out, r_attn), r_g = grads(lambda q, k, v, p=None: R.softmax_block(q, k, v, p, s), ins,
                                 [gout.double(), gattn.double()])
    for (o, a), name in zip((tc, cc), (" (tensor cores, 3xTF32)", " (CUDA cores)")):
        assert_close(a, r_attn, 1e-5, 1e-6, "attn" + name)
        assert_close(o, r_out, 1e-5, 1e-5, "out" + name)
    got = [gq, gk, gv] + ([ga * s] if prev else [])
    check_grads(["q", "k", "v", "prev_attn"], got, r_g, 1e-4, 2e-5)


# N = 300: five key tiles; d = 128, the largest head size; N = d = 1.
@pytest.mark.parametrize("B,H,N,d,prev", [(1, 1, 1, 1, True), (2, 3, 17, 35, True), (1, 2, 50, 32, False),
                                          (1, 1, 300, 8, True), (1, 1, 33, 128, False)])
def test_softmax_block(E, B, H, N, d, prev):
    check_softmax_block(E, B, H, N, d, prev)


@pytest.mark.parametrize("rows", [1, 5, 32])
def test_softmax_block_tile_rows(E, monkeypatch, rows):
    """Query rows per block (REFINER_CUDA_SOFTMAX_ROWS; default 16): one, a partial last tile, all of N."""
    monkeypatch.setenv("REFINER_CUDA_SOFTMAX_ROWS", str(rows))
    check_softmax_block(E, 1, 2, 23, 35, True)
    check_softmax_block(E, 2, 1, 70, 8, False)  # two key tiles, the second partial


@given(B=st.integers(1, 2), H=st.integers(1, 4), N=st.integers(1, 40), d=st.integers(1, 40), prev=st.booleans())
def test_softmax_block_property(E, B, H, N, d, prev):
    check_softmax_block(E, B, H, N, d, prev)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_softmax_block_half(E, dtype, tol):
    # the kernel reads fp16/bf16 and accumulates in fp32: the error is the rounding of attn and out
    q, k, v, p = softmax_inputs(2, 3, 50, 35, True, dtype)
    out, attn = on_schedules(E, lambda: E.softmax_block(*map(fenced, (q, k, v, p)), 0.25))
    r_out, r_attn = R.softmax_block(*(t.double() for t in (q, k, v, p)), 0.25)
    assert out.dtype == attn.dtype == dtype
    assert_close(attn, r_attn, tol, tol, "attn")
    assert_close(out, r_out, tol, tol, "out")


@seeded
def check_softmax_block_tc(E, monkeypatch, B, H, N, d, prev, dtype):
    args = softmax_inputs(B, H, N, d, prev, dtype)
    check_tensor_core_softmax(lambda a, s: on_schedules(E, lambda: E.softmax_block(*map(fenced, a), s)),
                              monkeypatch, args, d ** -0.5)


# N = 17: a partial 16-row tile; 65, 300: partial key tiles; d = 35: padded to 40; d = 128: 2 items a warp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,N,d,prev", [(1, 1, 1, 1, True), (2, 3, 17, 35, True), (1, 2, 65, 32, False),
                                          (1, 1, 300, 8, True), (1, 1, 33, 128, False)])
def test_softmax_block_tensor_cores(E, monkeypatch, B, H, N, d, prev, dtype):
    check_softmax_block_tc(E, monkeypatch, B, H, N, d, prev, dtype)


def test_softmax_block_tensor_cores_fallback_for_long_rows(E, monkeypatch):
    """N = 3600: 16 rows of scores need more shared memory than a block has; the CUDA-core kernel
    (fewer rows per block) runs instead: bitwise the switch-off result, and right."""
    q, k, v, p = softmax_inputs(1, 1, 3600, 8, True, torch.float16)
    out, attn = E.softmax_block(q, k, v, p, 0.3)
    monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "0")
    out0, attn0 = E.softmax_block(q, k, v, p, 0.3)
    assert torch.equal(out, out0) and torch.equal(attn, attn0)
    r_out, r_attn = R.softmax_block(q.double(), k.double(), v.double(), p.double(), 0.3)
    assert_close(attn, r_attn, 4e-3, 4e-3, "attn")
    assert_close(out, r_out, 4e-3, 4e-3, "out")


@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 80), d=st.integers(1, 64), prev=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_softmax_block_tensor_cores_property(E, B, H, N, d, prev, dtype):
    with pytest.MonkeyPatch.context() as mp:
        check_softmax_block_tc(E, mp, B, H, N, d, prev, dtype)


# ----------------------------------------------------------------------------- refine (eval)
# N = 1 (map smaller than the kernel); N = 70 crosses the forward's 64-column tiles and N = 33, 40
# the backward's 32-column ones; ratio 1 (no expansion) with k = 7; H = 12 r = 3 (Refiner-ViT-S);
# H = 16 r = 6 k = 7 needs more than 48 KiB of shared memory in the backward (the opt-in path).
EMU_REFINE_CASES = [(1, 1, 1, 1, 3, 3), (2, 3, 17, 35, 3, 3), (1, 2, 70, 8, 2, 5), (1, 4, 33, 16, 1, 7),
                    (1, 12, 40, 32, 3, 3), (1, 16, 20, 8, 6, 7), (2, 2, 9, 4, 2, 1)]


@seeded
def check_refine_eval(E, B, H, N, d, ratio, k, seed=0, dyadic=False):
    args, expand = refine_inputs(B, H, N, d, ratio, k, torch.float32, seed=seed, dyadic=dyadic)
    outs = both_forwards(E, lambda: on_schedules(E, lambda: E.refine_eval(*map(fenced, args), expand))[0])
    gout = torch.randn_like(outs[0])
    # the backward recomputes R by the forward kernel: 3xTF32 (tensor cores) or IEEE (CUDA cores)
    gots = both_forwards(E, lambda: on_schedules(E, lambda: E.refine_eval_backward(fenced(gout), *map(fenced, args),
                                                                                   expand)))
    (r_out,), r_g = grads(lambda *a: R.refine_eval(*a, expand), [t.double() for t in args], [gout.double()])
    for out, name in zip(outs, ("out (tensor cores, 3xTF32)", "out (CUDA cores)")):
        assert_close(out, r_out, 1e-5, 2e-5, name)
    for got in gots:
        names, ref = REFINE_NAMES, r_g
        if not expand:  # w_exp, b_exp unused: their gradients are zero
            assert got[2].abs().max() == 0 and got[3].abs().max() == 0
            got, ref, names = got[:2] + got[4:], r_g[:2] + r_g[4:], REFINE_NAMES[:2] + REFINE_NAMES[4:]
        check_grads(names, got, ref, 1e-4, 5e-5, refine_eval_weight_sum_scales(args, gout, expand))


@pytest.mark.parametrize("B,H,N,d,ratio,k", EMU_REFINE_CASES)
def test_refine_eval(E, B, H, N, d, ratio, k):
    check_refine_eval(E, B, H, N, d, ratio, k)


@given(B=st.integers(1, 2), H=st.integers(1, 5), N=st.integers(1, 40), d=st.integers(1, 40),
       ratio=st.integers(1, 6), k=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2 ** 16))
def test_refine_eval_property(E, B, H, N, d, ratio, k, seed):
    # Dyadic maps and expansion/stencil weights (exact pre-activations): over the long profile's
    # examples, a random pre-activation within fp32 rounding of 0 or 6 flips a relu6 gate against
    # fp64 now and then (one failed gradient in ~1,400 examples, not reproduced), as in
    # test_compiled_cuda's large cases.
    check_refine_eval(E, B, H, N, d, ratio, k, seed, dyadic=True)


@pytest.mark.parametrize("rows", [1, 3, 32])
def test_refine_eval_tile_rows(E, monkeypatch, rows):
    """Rows per block (REFINER_CUDA_TILE_ROWS; default 4): one row, a partial last tile, more rows than N."""
    monkeypatch.setenv("REFINER_CUDA_TILE_ROWS", str(rows))
    check_refine_eval(E, 2, 3, 17, 8, 3, 3)
    check_refine_eval(E, 1, 2, 10, 4, 1, 5)


@pytest.mark.parametrize("value", ["0", "33", "four"])
@raises_in_launcher
def test_refine_eval_tile_rows_invalid(E, monkeypatch, value):
    monkeypatch.setenv("REFINER_CUDA_TILE_ROWS", value)
    monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "0")  # the tensor-core kernel has fixed tiles
    args, expand = refine_inputs(1, 2, 5, 4, 2, 3, torch.float32)
    with pytest.raises(RuntimeError, match="REFINER_CUDA_TILE_ROWS must be an integer in"):
        E.refine_eval(*args, expand)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_refine_eval_half(E, dtype, tol):
    """Half inputs are read as they are (the backward converts A's tiles as they load): the kernels
    compute in fp32 from the same rounded values as the fp64 reference; only the outputs' rounding
    to the input dtype differs."""
    args, expand = refine_inputs(2, 3, 17, 35, 3, 3, dtype)
    out = on_schedules(E, lambda: E.refine_eval(*map(fenced, args), expand))[0]
    assert out.dtype == dtype
    gout = torch.randn_like(out)
    got = on_schedules(E, lambda: E.refine_eval_backward(fenced(gout), *map(fenced, args), expand))
    (r_out,), r_g = grads(lambda *a: R.refine_eval(*a, expand), [t.double() for t in args], [gout.double()])
    assert_close(out, r_out, tol, tol, "out")
    for name, a, e in zip(REFINE_NAMES, got, r_g):
        assert a.dtype == dtype, name
        assert_close(a, e, tol, tol, f"grad {name}")


# The tensor-core forward (fp16/bf16, H <= 16; criteria in utils.check_tensor_core_refine). N = 40 and
# 70 cross the 32-column tiles, N = 17 the 8-row ones; d = 128 gives a warp 5 (head, 16 rows of d) items.
TC_CASES = [c for c in EMU_REFINE_CASES if c[1] <= 16] + [(1, 5, 40, 128, 2, 3)]


@seeded
def check_refine_eval_tc(E, monkeypatch, B, H, N, d, ratio, k, dtype, seed=0):
    args, expand = refine_inputs(B, H, N, d, ratio, k, dtype, seed=seed)
    return check_tensor_core_refine(lambda a: on_schedules(E, lambda: E.refine_eval(*map(fenced, a), expand))[0],
                                    monkeypatch, args, expand)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,N,d,ratio,k", TC_CASES)
def test_refine_eval_tensor_cores(E, monkeypatch, B, H, N, d, ratio, k, dtype):
    out, fp32 = check_refine_eval_tc(E, monkeypatch, B, H, N, d, ratio, k, dtype)
    if dtype != torch.bfloat16 and N > 8 and ratio > 1:  # the rounding differs in the last bits: the path ran
        assert not torch.equal(out, fp32)


@given(B=st.integers(1, 2), H=st.integers(1, 16), N=st.integers(1, 40), d=st.integers(1, 40),
       ratio=st.integers(1, 6), k=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_refine_eval_tensor_cores_property(E, B, H, N, d, ratio, k, seed, dtype):
    with pytest.MonkeyPatch.context() as mp:
        check_refine_eval_tc(E, mp, B, H, N, d, ratio, k, dtype, seed)


@seeded
def check_refine_eval_backward_tc(E, monkeypatch, B, H, N, d, ratio, k, dtype, seed=0, dyadic=False):
    args, expand = refine_inputs(B, H, N, d, ratio, k, dtype, seed=seed, dyadic=dyadic)
    gout = torch.randn_like(args[1])
    return check_tensor_core_refine_backward(
        lambda g, a: on_schedules(E, lambda: E.refine_eval_backward(fenced(g), *map(fenced, a), expand)),
        monkeypatch, args, gout, expand)


# The backward's gradient kernel (csrc/cuda/refine_eval_bwd_tc.cuh; criteria in
# utils.check_tensor_core_refine_backward). fp32 also runs through test_refine_eval (both switches).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,N,d,ratio,k", TC_CASES)
def test_refine_eval_backward_tensor_cores(E, monkeypatch, B, H, N, d, ratio, k, dtype):
    on, off = check_refine_eval_backward_tc(E, monkeypatch, B, H, N, d, ratio, k, dtype)
    if dtype == torch.float32 and N > 8:  # the rounding differs in the last bits: the path ran
        assert not torch.equal(on[0], off[0])


@given(B=st.integers(1, 2), H=st.integers(1, 16), N=st.integers(1, 40), d=st.integers(1, 40),
       ratio=st.integers(1, 6), k=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_refine_eval_backward_tensor_cores_property(E, B, H, N, d, ratio, k, seed, dtype):
    with pytest.MonkeyPatch.context() as mp:  # dyadic: see test_refine_eval_property
        check_refine_eval_backward_tc(E, mp, B, H, N, d, ratio, k, dtype, seed, dyadic=True)


@pytest.mark.parametrize("H,dtype", [(17, torch.float16), (3, torch.float64)])
def test_refine_eval_tensor_cores_fallback(E, monkeypatch, H, dtype):
    """H > 16 and fp64 run on the CUDA-core kernels (forward and backward): bitwise the switch-off result."""
    args, expand = refine_inputs(1, H, 9, 4, 2, 3, dtype)
    gout = torch.randn_like(args[1])
    run = lambda: [E.refine_eval(*args, expand), *E.refine_eval_backward(gout, *args, expand)]  # noqa: E731
    monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "0")
    off = run()
    monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "1")
    for a, b in zip(run(), off):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_cores_propagate_nan_and_inf_like_the_reference(E, dtype):
    """An Inf in the map: the stencil's relu6 clamps it for the neighbours (finite there), the residual
    keeps it at its pixel. 3xTF32 must not turn it into NaN through its correction terms (a remainder
    of 0 or of the other sign times Inf). A NaN in q: NaN rows of attn and out, as the reference; a
    v just below fp32's largest value: finite outputs, as the reference's."""
    args, expand = refine_inputs(1, 3, 20, 5, 3, 3, dtype)
    args[0][0, 1, 6, 7] = float("inf")
    args[0][0, 2, 12, 3] = float("-inf")
    got = E.refine_eval(*args, expand)
    want = R.refine_eval(*[t.double() for t in args], expand)
    assert torch.equal(got.isfinite(), want.isfinite()) and torch.equal(got.isnan(), want.isnan())
    assert want.isfinite().any() and not want.isfinite().all()
    fin = want.isfinite()
    assert_close(got[fin], want[fin], 3e-2, 3e-2, "finite part")
    # the backward's gradient kernel (3xTF32 for every dtype), with that Inf and a NaN in grad_out
    gout = torch.randn_like(args[1])
    gout[0, 0, 3, 2] = float("nan")
    a64 = [t.double().requires_grad_() for t in args]
    R.refine_eval(*a64, expand).backward(gout.double())
    for name, g, t in zip(REFINE_NAMES, E.refine_eval_backward(gout, *args, expand), a64):
        w = t.grad.to(dtype)
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf()), f"grad {name}"
    q, k, v, _ = softmax_inputs(1, 2, 20, 8, False, dtype)
    q[0, 1, 4, 2] = float("nan")
    k[0, 0, 7, 1] = float("inf")
    if dtype == torch.float32:  # finite, but rounds past the largest TF32 value: 3xTF32 keeps it finite
        v[0, 1, 5, 3] = 3.4025e38
    out, attn = E.softmax_block(q, k, v, None, 0.5)
    w_out, w_attn = R.softmax_block(q.double(), k.double(), v.double(), None, 0.5)
    for a, b in ((attn, w_attn), (out, w_out)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())


@raises_in_launcher
def test_refine_eval_tensor_cores_switch_invalid(E, monkeypatch):
    monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "yes")
    args, expand = refine_inputs(1, 2, 5, 4, 2, 3, torch.float16)
    with pytest.raises(RuntimeError, match="REFINER_CUDA_TENSOR_CORES must be 0 or 1, got 'yes'"):
        E.refine_eval(*args, expand)


@raises_in_launcher
def test_refine_eval_shared_memory_limit(E):
    """More shared memory than an H100 block has: a clear error naming the op, not a failed launch."""
    args, expand = refine_inputs(1, 64, 3, 4, 6, 7, torch.float32)
    with pytest.raises(RuntimeError, match="refine_eval_backward: needs .* bytes of shared memory per block"):
        E.refine_eval_backward(torch.ones_like(args[1]), *args, expand)


# ----------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("shape,k", [((2, 3, 19, 23), 5), ((1, 2, 1, 1), 3), ((1, 4, 40, 40), 7), ((2, 2, 9, 9), 1)])
def test_attn_dwconv(E, shape, k):
    x, w = torch.randn(shape), torch.randn(shape[1], k, k)
    y = on_schedules(E, lambda: E.attn_dwconv(fenced(x), fenced(w)))[0]
    g = torch.randn_like(y)
    gx, gw = on_schedules(E, lambda: E.attn_dwconv_backward(fenced(g), fenced(x), fenced(w)))
    (r_y,), r_g = grads(R.attn_dwconv, [x.double(), w.double()], [g.double()])
    assert_close(y, r_y, 1e-5, 1e-6, "y")
    check_grads(["x", "w"], [gx, gw], r_g, 1e-4, 1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 300), (2, 17)])
def test_row_softmax(E, shape):
    x = torch.randn(shape) * 30  # large logits: the max shift keeps exp finite
    y = on_schedules(E, lambda: E.row_softmax(fenced(x)))[0]
    g = torch.randn_like(y)
    gx = on_schedules(E, lambda: E.row_softmax_backward(fenced(g), fenced(y)))[0]
    (r_y,), r_g = grads(R.row_softmax, [x.double()], [g.double()])
    assert_close(y, r_y, 1e-5, 1e-7, "y")
    check_grads(["x"], [gx], r_g, 1e-4, 1e-5)


# ----------------------------------------------------------------------------- write-write races
@pytest.mark.parametrize("rows", [1, 3])
def test_no_shared_memory_write_conflicts(E, monkeypatch, write_check, rows):
    """Every kernel with a dynamic shared-memory layout, on small shapes, under the write check."""
    monkeypatch.setenv("REFINER_CUDA_TILE_ROWS", str(rows))
    monkeypatch.setenv("REFINER_CUDA_SOFTMAX_ROWS", str(rows))
    check_softmax_block(E, 1, 2, 9, 5, True)
    check_refine_eval(E, 1, 2, 7, 3, 3, 3)
    check_refine_eval(E, 1, 2, 7, 3, 1, 5)


def test_no_shared_memory_write_conflicts_tensor_cores(E, monkeypatch, write_check):
    check_softmax_block_tc(E, monkeypatch, 1, 1, 20, 9, True, torch.float16)
    check_refine_eval_tc(E, monkeypatch, 1, 3, 10, 5, 3, 3, torch.float16)
    check_refine_eval_tc(E, monkeypatch, 1, 2, 9, 3, 1, 5, torch.bfloat16)
    check_refine_eval_backward_tc(E, monkeypatch, 1, 3, 10, 5, 3, 3, torch.float16)
    check_refine_eval_backward_tc(E, monkeypatch, 1, 2, 9, 3, 1, 5, torch.float32)


# ----------------------------------------------------------------------------- a model's shapes
def test_refiner_vit_s_shapes(E):
    """One image of Refiner-ViT-S at 224 px (H=12, N=197, d=32, ratio 3, k=3): partial last tiles in
    rows (197 = 49 * 4 + 1), forward columns (3 * 64 + 5), backward columns (6 * 32 + 5) and keys."""
    check_refine_eval(E, 1, 12, 197, 32, 3, 3)
    check_softmax_block(E, 1, 12, 197, 32, True)


def test_refiner_vit_s_shapes_tensor_cores(E, monkeypatch):
    """The same image in bf16 on the tensor cores: 197 = 24 * 8 + 5 rows, 6 * 32 + 5 columns."""
    check_refine_eval_tc(E, monkeypatch, 1, 12, 197, 32, 3, 3, torch.bfloat16)
    check_refine_eval_backward_tc(E, monkeypatch, 1, 12, 197, 32, 3, 3, torch.bfloat16, dyadic=True)
