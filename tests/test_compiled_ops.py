"""The compiled backend (refiner._C, CPU kernels) against the functional reference.

Every op: forward and every gradient vs `refiner.reference`, fp32 tight, fp16/bf16 against the
fp32 reference evaluated on the same rounded inputs, float64 gradcheck on tiny shapes,
torch.library.opcheck, and input validation.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from refiner import _compiled as C
from refiner import reference as R
from utils import REFINE_NAMES, random_attn, random_dla

pytestmark = pytest.mark.skipif(not C.AVAILABLE, reason=f"refiner._C not available: {C.UNAVAILABLE_REASON}")

DEVICE = "cpu"


# ----------------------------------------------------------------------------- helpers
def assert_close(actual, expected, rtol, atol, name="", abs_tol=0.0):
    """Element-wise |a - e| <= atol * max|e| + rtol * |e| + abs_tol (atol relative to the tensor's scale)."""
    assert actual is not None and expected is not None, name
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item() or 1.0
    err = (a - e).abs()
    bound = atol * scale + rtol * e.abs() + abs_tol
    over = int((err > bound).sum()) + int(err.isnan().sum())
    assert over == 0, (f"{name}: max abs err {err.max().item():.3e} (scale {scale:.3e}) exceeds tolerance "
                       f"at {over} elements")


def grads(fn, inputs, gouts):
    """Run fn(*inputs), backprop the given output grads, return (outputs, grads of inputs)."""
    ins = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
           for x in inputs]
    outs = fn(*ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [x for x in ins if isinstance(x, torch.Tensor) and x.requires_grad]
    gs = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for o, g in zip(outs, gouts)], allow_unused=True)
    return [o.detach() for o in outs], list(gs)


def compare(fused, ref, inputs, rtol, atol, ref_inputs=None, names=None, abs_tol=0.0, skip=()):
    """Forward + all gradients of fused vs ref. ref runs on ref_inputs (default: inputs)."""
    ref_inputs = inputs if ref_inputs is None else ref_inputs
    with torch.no_grad():
        r_out = ref(*ref_inputs)
    r_out = r_out if isinstance(r_out, tuple) else (r_out,)
    gouts = [torch.randn(o.shape, dtype=torch.float64, device=o.device).to(inputs[0].dtype) for o in r_out]
    f_o, f_g = grads(fused, inputs, gouts)
    r_o, r_g = grads(ref, ref_inputs, gouts)
    for i, (a, e) in enumerate(zip(f_o, r_o)):
        assert a.dtype == inputs[0].dtype
        assert_close(a, e.to(a.dtype), rtol, atol, f"output {i}")
    for i, (a, e) in enumerate(zip(f_g, r_g)):
        nm = names[i] if names else str(i)
        if e is None:
            assert a is None or a.abs().max() == 0, f"grad {nm} should be None/zero"
            continue
        assert a is not None, f"grad {nm} missing"
        assert a.dtype == inputs[0].dtype
        if nm in skip:
            continue
        assert a.dtype == inputs[0].dtype
        assert_close(a, e.to(a.dtype), rtol, atol, f"grad {nm}", abs_tol)
    return dict(zip(names or [], f_g))


def refine_inputs(B, H, N, d, ratio, k, dtype=torch.float64, seed=0, device=DEVICE, dyadic=False):
    """Folded refine_eval arguments. dyadic: A, w_exp, b_exp, w_dw and b_dw on coarse binary grids
    (A: multiples of 2^-10 in [0, 1); w_exp, b_exp: of 2^-4 within +-2; w_dw: of 2^-2 within +-1;
    b_dw: of 2^-2 within +-2), so every pre-activation of E and D is exact in fp32 (at most 22
    significant bits, in any summation order): fp32 kernels and an fp64 reference then take the
    same relu6 branches, and large shapes compare tightly (no relu6_flips outliers)."""
    dla, bn = random_dla(H, ratio, k, seed=seed)
    f = R.fold_refine(dla, bn, d ** -0.5)
    attn = random_attn(B, H, N).double()
    v = torch.randn(B, H, N, d, dtype=torch.float64)
    params = [t.double() for t in f.args()[:-1]]
    if dyadic:
        def grid(t, step, lim):
            return (t / step).round().mul(step).clamp(-lim, lim)
        attn = torch.randint(0, 1024, attn.shape, dtype=torch.float64) / 1024
        params[:4] = [grid(params[0], 2 ** -4, 2), grid(params[1], 2 ** -4, 2), grid(params[2], 2 ** -2, 1),
                      grid(params[3], 2 ** -2, 2)]
    return [t.to(device=device, dtype=dtype) for t in [attn, v] + params], f.expand


def softmax_inputs(B, H, N, d, prev, dtype=torch.float64, device=DEVICE):
    q, k, v = (torch.randn(B, H, N, d, dtype=torch.float64) for _ in range(3))
    p = random_attn(B, H, N).double() if prev else None
    ts = [q, k, v, p]
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in ts]


# ----------------------------------------------------------------------------- basic facts
def test_flags():
    assert C.AVAILABLE is True and isinstance(C.HAS_CUDA, bool) and C.UNAVAILABLE_REASON == ""
    assert C.HAS_CUDA == torch.ops.refiner.has_cuda()  # the dispatcher-table query and the op agree


def test_import_without_extension_never_raises():
    code = ("import sys; sys.modules['refiner._C'] = None\n"
            "import refiner._compiled as C\n"
            "assert not C.AVAILABLE and not C.HAS_CUDA and 'refiner._C' in C.UNAVAILABLE_REASON\n"
            "try:\n    C.row_softmax(None)\nexcept RuntimeError as e:\n    assert 'refiner._C' in str(e)\n"
            "else:\n    raise SystemExit('no error')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- softmax block
@pytest.mark.parametrize("B,H,N,d,prev", [(2, 12, 17, 32, True), (1, 16, 50, 35, False), (2, 12, 197, 32, True)])
def test_softmax_block_fp32(B, H, N, d, prev):
    q, k, v, p = softmax_inputs(B, H, N, d, prev, torch.float32)
    s = d ** -0.5
    compare(lambda q, k, v, p: C.softmax_block(q, k, v, p, s), lambda q, k, v, p: R.softmax_block(q, k, v, p, s),
            [q, k, v, p], rtol=1e-5, atol=2e-5, names=["q", "k", "v", "prev"])


@pytest.mark.parametrize("small_gemm", ["1", "0"])
@pytest.mark.parametrize("B,H,N,d", [(1, 2, 1, 1), (1, 3, 13, 35), (2, 2, 30, 70), (1, 2, 61, 16)])
def test_softmax_block_gemm_paths(monkeypatch, small_gemm, B, H, N, d):
    """fp32 per-head GEMMs: the AVX-512 kernels (cpu/small_gemm.h, where the CPU has AVX-512F) and
    BLAS (REFINER_CPU_SMALL_GEMM=0), forward and backward, against the fp64 reference. Shapes cut
    every tail: rows in blocks of 12, 4 and 1 (N = 1, 13, 30, 61), 32-column blocks and their
    remainders (d = 1, 16, 35, 70; N columns for q k^T), transposed operands in the backward."""
    monkeypatch.setenv("REFINER_CPU_SMALL_GEMM", small_gemm)
    q, k, v, p = softmax_inputs(B, H, N, d, True, torch.float32)
    compare(lambda q, k, v, p: C.softmax_block(q, k, v, p, 0.3), lambda q, k, v, p: R.softmax_block(q, k, v, p, 0.3),
            [q, k, v, p], rtol=1e-5, atol=2e-5, ref_inputs=[t.double() for t in (q, k, v, p)])


@pytest.mark.parametrize("prev", [True, False])
def test_softmax_block_portable_path(monkeypatch, prev):
    """REFINER_CPU_PORTABLE=1: the CPU forward uses the element-wise math of the CUDA kernel."""
    monkeypatch.setenv("REFINER_CPU_PORTABLE", "1")
    q, k, v, p = softmax_inputs(2, 12, 17, 32, prev, torch.float32)
    compare(lambda q, k, v, p: C.softmax_block(q, k, v, p, 0.3), lambda q, k, v, p: R.softmax_block(q, k, v, p, 0.3),
            [q, k, v, p], rtol=1e-5, atol=2e-5)


def test_softmax_block_exp_range():
    """The fp32 CPU path has its own vector exp: scores from far below the underflow point
    (-87.3 below the row max) to the max, rows of 1..17 keys (vector body and scalar tail),
    an all-equal row, and a NaN row staying NaN."""
    for n in (1, 2, 7, 8, 9, 16, 17):
        q = torch.linspace(1.0, 0.5, n).reshape(1, 1, n, 1)  # row spans of 160 .. 80 below the max
        k = torch.linspace(-130, 30, n).reshape(1, 1, n, 1)
        v = torch.randn(1, 1, n, 1)
        out, attn = C.softmax_block(q, k, v, None, 1.0)
        ref_out, ref_attn = R.softmax_block(q.double(), k.double(), v.double(), None, 1.0)
        assert_close(attn.double(), ref_attn, 2e-6, 1e-12, f"attn n={n}")
        assert_close(out.double(), ref_out, 1e-5, 1e-5, f"out n={n}")
    flat = C.softmax_block(torch.zeros(1, 1, 9, 2), torch.zeros(1, 1, 9, 2), torch.ones(1, 1, 9, 2), None, 1.0)[1]
    assert torch.equal(flat, torch.full_like(flat, 1 / 9))
    q = torch.randn(1, 1, 9, 2)
    q[0, 0, 4, 0] = float("nan")
    attn = C.softmax_block(q, torch.randn(1, 1, 9, 2), torch.randn(1, 1, 9, 2), None, 1.0)[1]
    assert attn[0, 0, 4].isnan().all() and not attn[0, 0, torch.arange(9) != 4].isnan().any()


def test_softmax_block_forward_n577():
    q, k, v, p = softmax_inputs(1, 2, 577, 32, True, torch.float32)
    o1, a1 = C.softmax_block(q, k, v, p, 0.2)
    o2, a2 = R.softmax_block(q, k, v, p, 0.2)
    assert_close(a1, a2, 1e-5, 1e-5, "attn")
    assert_close(o1, o2, 1e-5, 1e-5, "out")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_softmax_block_half(dtype, tol):
    # Inputs are rounded to dtype; the reference runs in fp32 on the same rounded values. The
    # kernels accumulate in fp32, so the error is the final rounding of attn/out/grads (~2^-11 for
    # fp16, 2^-8 for bf16) plus the rounded attn feeding attn @ v.
    q, k, v, p = softmax_inputs(2, 12, 50, 32, True, dtype)
    compare(lambda q, k, v, p: C.softmax_block(q, k, v, p, 0.25), lambda q, k, v, p: R.softmax_block(q, k, v, p, 0.25),
            [q, k, v, p], rtol=tol, atol=tol, ref_inputs=[t.float() for t in (q, k, v, p)])


@pytest.mark.parametrize("prev", [True, False])
def test_softmax_block_gradcheck(prev):
    q, k, v, p = softmax_inputs(2, 2, 5, 3, prev)
    ins = [t.requires_grad_() for t in (q, k, v, p) if t is not None]
    fn = (lambda q, k, v, p: C.softmax_block(q, k, v, p, 0.7)) if prev else (
        lambda q, k, v: C.softmax_block(q, k, v, None, 0.7))
    assert torch.autograd.gradcheck(fn, ins)


def test_softmax_block_attn_grad_only():
    """attn feeds the next block: its gradient alone must flow to q, k, prev."""
    q, k, v, p = softmax_inputs(1, 2, 7, 3, True)
    q.requires_grad_()
    p.requires_grad_()
    _, a = C.softmax_block(q, k, v, p, 0.5)
    g1 = torch.autograd.grad(a.square().sum(), [q, p])
    _, a = R.softmax_block(q, k, v, p, 0.5)
    g2 = torch.autograd.grad(a.square().sum(), [q, p])
    for x, y in zip(g1, g2):
        assert_close(x, y, 1e-10, 1e-10)


def softmax_backward_case(N, seed):
    """fp64 (q, k, v, prev, g_out, g_attn) of 4 heads: random scores; scores 160..112 below the row max
    (q[:, 0] in [0.7, 1], k[:, 0] in [-130, 30]: exp underflows; whole key columns underflow in every
    row), keys ascending and descending (the underflowing columns in the vector body and in the
    scalar tail); all-equal rows (q = 0)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, g_out = (torch.randn(1, 4, N, 4, generator=g, dtype=torch.float64) for _ in range(4))
    prev = torch.randn(1, 4, N, N, generator=g, dtype=torch.float64).softmax(-1)
    g_attn = torch.randn(1, 4, N, N, generator=g, dtype=torch.float64)
    for h in (1, 2):
        q[0, h], k[0, h] = 0, 0
        q[0, h, :, 0] = torch.linspace(1.0, 0.7, N, dtype=torch.float64)
        k[0, h, :, 0] = torch.linspace(-130, 30, N, dtype=torch.float64)
    k[0, 2] = k[0, 2].flip(0)
    q[0, 3] = 0
    return q, k, v, prev, g_out, g_attn


def softmax_block_grads(fn, q, k, v, prev, g_out, g_attn):
    """attn and the grads of q, k, v, prev of fn(q, k, v, prev, 1.0) for the output grads (g_out, g_attn)."""
    outs, gs = grads(lambda *a: fn(*a, 1.0), [q, k, v, prev], [g_out, g_attn])
    return [outs[1]] + gs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_block_backward_vector_tails(dtype):
    """The CPU backward recomputes P = softmax(S) in fused rows (fp32: 8-lane vector body + scalar
    tail, the forward's exp): every N from 1 to 33 and larger ones, extreme and all-equal rows, vs
    the fp64 reference's gradients; exact zeros of gS where exp underflows (as the forward's attn);
    NaN positions of every gradient as in the reference."""
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    names = ["attn", "q", "k", "v", "prev"]
    for N in list(range(1, 34)) + [64, 197]:
        case = softmax_backward_case(N, seed=N)
        ins = [t.to(dtype) for t in case]
        got = softmax_block_grads(C.softmax_block, *ins)
        ref = softmax_block_grads(R.softmax_block, *[t.double() for t in ins])
        scales = [e.abs().max().item() for e in ref]
        for nm, a, e in zip(names, got, ref):
            assert a.dtype == dtype
            assert_close(a, e, tol, 2 * tol, f"{nm} N={N}")
        if dtype == torch.float32:
            with torch.no_grad():
                attn0 = C.softmax_block(*ins[:3], None, 1.0)[1]
            gk = got[2]
            for h in (1, 2):  # keys whose P underflows in every row: gS, hence their gk, exactly 0
                cols = (attn0[0, h] == 0).all(0)
                assert cols.any() == (N > 1)
                assert (gk[0, h, cols] == 0).all(), f"gk h={h} N={N}"
        # NaN: a score row (q) of head 0, one grad-of-attn entry of head 3 (the finite rest is
        # compared at the scale of the NaN-free run: heads 0 and 3 of gk are all NaN)
        i = N // 2
        ins[0] = ins[0].clone()
        ins[0][0, 0, i, 0] = float("nan")
        ins[5] = ins[5].clone()
        ins[5][0, 3, i, N - 1] = float("nan")
        got = softmax_block_grads(C.softmax_block, *ins)
        ref = softmax_block_grads(R.softmax_block, *[t.double() for t in ins])
        for nm, a, e, sc in zip(names, got, ref, scales):
            assert torch.equal(a.isnan(), e.isnan()), f"NaN positions of {nm} N={N}"
            assert_close(a.nan_to_num(), e.nan_to_num(), tol, 0, f"{nm} N={N} (NaN case)", abs_tol=2 * tol * sc)


# ----------------------------------------------------------------------------- refine eval
REFINE_CASES = [
    # B, H, N, d, ratio, k
    (2, 12, 17, 32, 3, 3),
    (1, 16, 50, 35, 6, 5),
    (2, 12, 17, 35, 1, 3),
    (1, 12, 50, 32, 3, 7),
    (1, 12, 197, 32, 3, 3),
]


@pytest.mark.parametrize("B,H,N,d,ratio,k", REFINE_CASES)
def test_refine_eval_fp32(B, H, N, d, ratio, k):
    args, expand = refine_inputs(B, H, N, d, ratio, k, torch.float32)
    compare(lambda *a: C.refine_eval(*a, expand), lambda *a: R.refine_eval(*a, expand), args,
            rtol=1e-5, atol=2e-5, names=REFINE_NAMES)


@pytest.mark.parametrize("ratio,k", [(3, 3), (1, 5)])
def test_refine_eval_portable_path(monkeypatch, ratio, k):
    """REFINER_CPU_PORTABLE=1 runs the CUDA kernel's per-channel stage sequence on CPU."""
    monkeypatch.setenv("REFINER_CPU_PORTABLE", "1")
    args, expand = refine_inputs(2, 12, 17, 32, ratio, k, torch.float32)
    compare(lambda *a: C.refine_eval(*a, expand), lambda *a: R.refine_eval(*a, expand), args,
            rtol=1e-5, atol=2e-5, names=REFINE_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio,k", [(3, 3), (1, 3), (2, 5), (3, 7), (2, 1)])
def test_refine_eval_forward_vector_tails(ratio, k, dtype):
    """The streamed CPU forward pads rows to whole vectors (8 fp32 / 4 fp64 lanes), ends with a
    one-vector block, uses 32-row tiles and 6-row head-mix blocks: N around every residue of the
    padded widths N and N + k - 1, N = 33 (a 1-row last tile) and H = 1, 5, 7 (every remainder
    block of the head mixes; H = 1 with N <= 8 once hit an out-of-line epilogue getting garbage)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for H in (1, 5, 7):
        for N in (1, 2, 3, 7, 8, 9, 12, 15, 16, 17, 33):
            args, expand = refine_inputs(2, H, N, 7, ratio, k, dtype, seed=N)
            ref = [t.double() for t in args]
            with torch.no_grad():
                assert_close(C.refine_eval(*args, expand).double(), R.refine_eval(*ref, expand), tol, tol,
                             f"H={H} N={N}")


def test_refine_eval_forward_propagates_nan_locally():
    """A NaN in one attention entry spreads as in the reference (through its k x k neighbourhood
    and the head mixes), not into other rows via padding columns or ring buffers."""
    args, expand = refine_inputs(1, 4, 40, 8, 3, 3, torch.float32)
    args[0][0, 1, 20, 39] = float("nan")
    with torch.no_grad():
        out, ref = C.refine_eval(*args, expand), R.refine_eval(*args, expand)
    assert torch.equal(out.isnan(), ref.isnan())
    assert_close(out.nan_to_num(), ref.nan_to_num(), 1e-5, 2e-5)


def test_refine_eval_forward_n577():
    args, expand = refine_inputs(1, 12, 577, 32, 3, 3, torch.float32)
    with torch.no_grad():
        assert_close(C.refine_eval(*args, expand), R.refine_eval(*args, expand), 1e-5, 1e-5)


def test_refine_eval_matches_module():
    """Folded fused op == the unfolded eval-mode module path adapt_bn(DLA(A)) * s @ v."""
    H, N, d = 12, 17, 32
    dla, bn = random_dla(H, 3, 3)
    dla.eval(), bn.eval()
    s = d ** -0.5
    a = random_attn(2, H, N)
    v = torch.randn(2, H, N, d)
    with torch.no_grad():
        ref = (bn(dla(a)) * s) @ v
        out = C.refine_eval(a, v, *R.fold_refine(dla, bn, s).args())
    assert_close(out, ref, 1e-5, 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_refine_eval_half(dtype, tol):
    args, expand = refine_inputs(2, 12, 17, 32, 3, 3, dtype)
    compare(lambda *a: C.refine_eval(*a, expand), lambda *a: R.refine_eval(*a, expand), args,
            rtol=tol, atol=tol, ref_inputs=[t.float() for t in args], names=REFINE_NAMES)


def set_cpu_path(monkeypatch, portable):
    """Select the CPU path: fast (streamed micro-kernel rows) or portable (CUDA stage sequence)."""
    if portable:
        monkeypatch.setenv("REFINER_CPU_PORTABLE", "1")
    else:
        monkeypatch.delenv("REFINER_CPU_PORTABLE", raising=False)


# refine_train's CPU paths: fast (rows streamed through rings, fused H-channel kernels), portable
# (the same streamed passes, the ATen H-channel code the CUDA backend runs around its own passes),
# chunk (REFINER_TRAIN_PATH=chunk: every map of a chunk of images recomputed with ATen ops).
TRAIN_PATHS = ["fast", "portable", "chunk"]


def set_train_path(monkeypatch, path):
    set_cpu_path(monkeypatch, path != "fast")
    if path == "chunk":
        monkeypatch.setenv("REFINER_TRAIN_PATH", "chunk")
    else:
        monkeypatch.delenv("REFINER_TRAIN_PATH", raising=False)


@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
@pytest.mark.parametrize("B,H,N,d,ratio,k", [
    (2, 12, 17, 32, 3, 3),
    (2, 12, 17, 35, 1, 3),   # no expansion
    (1, 12, 50, 32, 3, 1),   # no halo
    (1, 12, 50, 32, 3, 5),
    (1, 16, 33, 32, 1, 5),   # 3 row tiles, the last of 1 row
])
def test_refine_eval_grad_paths(monkeypatch, portable, B, H, N, d, ratio, k):
    """Both CPU backward paths against the reference (N not a multiple of the 16/32-row tiles)."""
    set_cpu_path(monkeypatch, portable)
    args, expand = refine_inputs(B, H, N, d, ratio, k, torch.float32)
    compare(lambda *a: C.refine_eval(*a, expand), lambda *a: R.refine_eval(*a, expand), args,
            rtol=1e-5, atol=2e-5, names=REFINE_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio,k", [(3, 3), (1, 3), (2, 5), (3, 7), (2, 1)])
def test_refine_eval_backward_vector_tails(monkeypatch, ratio, k, dtype):
    """The streamed CPU backward: rows padded to whole vectors (padding columns zeroed before they
    enter a gradient sum), 4 x 3 weight-gradient blocks and 6-row head-mix blocks (H = 1, 5, 7 hit
    every remainder), rings of k rows with stage lags of k // 2 rows (N = 33, 65: a last tile of
    one row, shorter than the lag for k = 7). Every gradient against the reference in fp64."""
    set_cpu_path(monkeypatch, False)
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    for H in (1, 5, 7):
        for N in (1, 2, 3, 7, 9, 12, 16, 17, 33, 65):
            if N == 65 and H != 5:
                continue
            args, expand = refine_inputs(1 + N % 2, H, N, 7, ratio, k, dtype, seed=N)
            compare(lambda *a: C.refine_eval(*a, expand), lambda *a: R.refine_eval(*a, expand), args,
                    rtol=tol, atol=tol, ref_inputs=[t.double() for t in args], names=REFINE_NAMES)


@pytest.mark.parametrize("ratio", [3, 1])
def test_refine_eval_backward_nan_pattern(monkeypatch, ratio):
    """A NaN in one attention entry gives the reference's NaN pattern in every gradient (the
    relu6 masks drop it from grad attn; the weight sums take it), and nothing leaks through the
    padding columns or ring rows of the streamed backward."""
    set_cpu_path(monkeypatch, False)
    args, expand = refine_inputs(1, 4, 40, 8, ratio, 3, torch.float32)
    args[0][0, 1, 20, 39] = float("nan")
    gout = torch.randn(1, 4, 40, 8)
    f_o, f_g = grads(lambda *a: C.refine_eval(*a, expand), args, [gout])
    r_o, r_g = grads(lambda *a: R.refine_eval(*a, expand), args, [gout])
    for nm, a, e in zip(REFINE_NAMES, f_g, r_g):
        if e is None:
            continue
        assert torch.equal(a.isnan(), e.isnan()), nm
        assert_close(a.nan_to_num(), e.nan_to_num(), 2e-5, 2e-5, nm)


@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
@pytest.mark.parametrize("ratio,k,N", [(2, 3, 6), (1, 3, 6), (2, 5, 6), (2, 3, 18), (1, 5, 18)])
def test_refine_eval_gradcheck(monkeypatch, portable, ratio, k, N):
    set_cpu_path(monkeypatch, portable)
    args, expand = refine_inputs(1, 2, N, 3, ratio, k)
    if not expand:  # w_exp, b_exp unused
        fn = lambda a, v, *w: C.refine_eval(a, v, args[2], args[3], *w, expand)  # noqa: E731
        ins = [args[0], args[1]] + args[4:]
    else:
        fn = lambda *a: C.refine_eval(*a, expand)  # noqa: E731
        ins = args
    ins = [t.clone().requires_grad_() for t in ins]
    assert torch.autograd.gradcheck(fn, ins)


def test_refine_eval_relu6_clipping_exercised():
    """The test weights must put pre-activations on both sides of 0 and 6 (mask paths)."""
    args, expand = refine_inputs(1, 12, 17, 32, 3, 3)
    attn, w_exp, b_exp = args[0], args[2], args[3]
    u = R.head_mix(attn, w_exp) + b_exp[:, None, None]
    assert (u < 0).any() and (u > 0).any()


# ----------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_building_blocks(dtype, tol):
    B, Cc, N, d = 2, 12, 17, 35
    x = torch.randn(B, Cc, N, N).to(dtype)
    w = (torch.randn(36, Cc) * 0.3).to(dtype)
    ref_in = lambda ts: [t.float() for t in ts] if dtype != torch.float32 else None  # noqa: E731
    compare(C.head_mix, R.head_mix, [x, w], tol, tol, ref_inputs=ref_in([x, w]))
    for k in (3, 5):
        wd = (torch.randn(Cc, k, k) * 0.3).to(dtype)
        compare(C.attn_dwconv, R.attn_dwconv, [x, wd], tol, tol, ref_inputs=ref_in([x, wd]))
    compare(C.row_softmax, R.row_softmax, [x], tol, tol, ref_inputs=ref_in([x]))
    a = random_attn(B, Cc, N).to(dtype)
    v = torch.randn(B, Cc, N, d).to(dtype)
    compare(C.attn_value, R.attn_value, [a, v], tol, tol, ref_inputs=ref_in([a, v]))


@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attn_dwconv_paths(monkeypatch, portable, dtype):
    """Both CPU paths of the depthwise block (vector rows on a zero-bordered plane / the CUDA
    kernel's per-pixel arithmetic): output, grad of x (flipped taps) and grad of w (per-plane sums),
    square and non-square maps, widths around the vector width, every kernel size."""
    if portable:
        monkeypatch.setenv("REFINER_CPU_PORTABLE", "1")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for (B, Cc, N, M), k in [((2, 3, 5, 7), 3), ((1, 2, 1, 1), 3), ((2, 2, 9, 16), 5), ((1, 3, 17, 8), 7),
                             ((3, 2, 4, 9), 1), ((1, 1, 2, 33), 7)]:
        x = torch.randn(B, Cc, N, M, dtype=torch.float64)
        w = torch.randn(Cc, k, k, dtype=torch.float64)
        compare(C.attn_dwconv, R.attn_dwconv, [x.to(dtype), w.to(dtype)], tol, tol, ref_inputs=[x, w])


def test_building_blocks_nonsquare_and_gradcheck():
    x = torch.randn(1, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(C.head_mix, [x, torch.randn(4, 3, dtype=torch.float64, requires_grad=True)])
    assert torch.autograd.gradcheck(C.attn_dwconv, [x, torch.randn(3, 3, 3, dtype=torch.float64, requires_grad=True)])
    assert torch.autograd.gradcheck(C.row_softmax, [x])
    a = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(C.attn_value, [a, v])


# ----------------------------------------------------------------------------- layouts
def test_non_contiguous_inputs():
    """Any strides are accepted (made contiguous inside the op); outputs are contiguous."""
    args, expand = refine_inputs(1, 12, 17, 32, 3, 3, torch.float32)
    attn_t = args[0].transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, transposed strides
    v_nc = torch.stack([args[1], args[1]], -1)[..., 0]
    assert not attn_t.is_contiguous() and not v_nc.is_contiguous()
    with torch.no_grad():
        out = C.refine_eval(attn_t, v_nc, *args[2:], expand)
        assert out.is_contiguous()
        assert_close(out, R.refine_eval(*args, expand), 1e-5, 1e-5)
    q, k, v, p = softmax_inputs(1, 2, 9, 4, True, torch.float32)
    o1, a1 = C.softmax_block(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, p, 0.3)
    o2, a2 = R.softmax_block(q, k, v, p, 0.3)
    assert_close(o1, o2, 1e-5, 1e-5)
    assert_close(a1, a2, 1e-5, 1e-5)


# ----------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    args, expand = refine_inputs(1, 2, 5, 3, 2, 3, torch.float32)
    q, k, v, p = softmax_inputs(1, 2, 5, 3, True, torch.float32)
    x = torch.randn(1, 2, 5, 5)
    g4 = torch.randn(1, 2, 5, 3)
    return [
        ("softmax_block", (q, k, v, p, 0.5)),
        ("softmax_block", (q, k, v, None, 0.5)),
        ("softmax_block_backward", (g4, torch.randn(1, 2, 5, 5), q, k, v, p, 0.5)),
        ("refine_eval", (*args, expand)),
        ("refine_eval_backward", (g4, *args, expand)),
        ("head_mix", (x, torch.randn(4, 2))),
        ("head_mix_backward", (torch.randn(1, 4, 5, 5), x, torch.randn(4, 2))),
        ("attn_dwconv", (x, torch.randn(2, 3, 3))),
        ("attn_dwconv_backward", (x, x, torch.randn(2, 3, 3))),
        ("row_softmax", (x,)),
        ("row_softmax_backward", (x, x.softmax(-1))),
        ("attn_value", (x, g4)),
        ("attn_value_backward", (g4, x, g4)),
    ]


@pytest.mark.parametrize("case", range(13))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and not name.endswith("backward") else a
                 for a in args)
    torch.library.opcheck(getattr(torch.ops.refiner, name).default, args)


# ----------------------------------------------------------------------------- validation
def _bad_refine_cases():
    args, expand = refine_inputs(1, 4, 6, 3, 2, 3, torch.float32)
    attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta = args

    def rep(i, t, exp=expand):
        a = list(args)
        a[i] = t
        return (*a, exp)

    return [
        (rep(0, attn[0]), "attn must be 4-D"),
        (rep(0, attn[..., :5]), "attn must be square"),
        (rep(1, v[:, :, :5]), "v must have shape"),
        (rep(1, v.double()), "v has dtype"),
        (rep(1, v.int()), "v must be float32"),
        (rep(4, torch.randn(8, 2, 2)), "kernel size must be odd"),
        (rep(4, torch.randn(8, 9, 9)), "kernel size must be odd"),
        (rep(4, torch.randn(6, 3, 3)), "rH must be a multiple"),
        (rep(4, torch.randn(28, 3, 3)), "ratio r in 1..6"),
        (rep(2, w_exp[:, :3]), "w_exp must have shape"),
        (rep(6, w_pro.t()), "w_pro must have shape"),
        (rep(5, b_dw[:3]), "b_dw must have shape"),
        (rep(8, alpha[:2]), "alpha must have shape"),
        (rep(9, beta[None]), "beta must be 1-D"),
        (rep(4, w_dw, False), "expand=False"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_refine_eval_bad_inputs(case):
    args, msg = _bad_refine_cases()[case]
    with pytest.raises((RuntimeError, ValueError), match=msg):
        C.refine_eval(*args)


def test_softmax_block_bad_inputs():
    q, k, v, p = softmax_inputs(1, 2, 5, 3, True, torch.float32)
    with pytest.raises(RuntimeError, match="q must be 4-D"):
        C.softmax_block(q[0], k, v, p, 0.5)
    with pytest.raises(RuntimeError, match="k must have shape"):
        C.softmax_block(q, k[:, :, :4], v, p, 0.5)
    with pytest.raises(RuntimeError, match="v must have shape"):
        C.softmax_block(q, k, v[..., :2], p, 0.5)
    with pytest.raises(RuntimeError, match="prev_attn must have shape"):
        C.softmax_block(q, k, v, p[..., :4], 0.5)
    with pytest.raises(RuntimeError, match="prev_attn has dtype"):
        C.softmax_block(q, k, v, p.half(), 0.5)
    with pytest.raises(RuntimeError, match="scale must be"):
        C.softmax_block(q, k, v, p, -1.0)


def test_building_block_bad_inputs():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match="head_mix: w must have shape"):
        C.head_mix(x, torch.randn(3, 3))
    with pytest.raises(RuntimeError, match="attn_dwconv: w must have shape"):
        C.attn_dwconv(x, torch.randn(3, 3, 3))
    with pytest.raises(RuntimeError, match="attn_dwconv: w kernel size"):
        C.attn_dwconv(x, torch.randn(2, 4, 4))
    with pytest.raises(RuntimeError, match="attn_value: v must have shape"):
        C.attn_value(x, torch.randn(1, 2, 4, 3))
    with pytest.raises(RuntimeError, match="x must have at least 1 dim|x must be float32"):
        C.row_softmax(torch.tensor(1))


def _elf_needed(path):
    """The DT_NEEDED entries (shared libraries) of an ELF64 little-endian file."""
    import struct
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not an ELF64 LE file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _, sh_type, _, _, off, size, link, _, _, _ in sections:
        if sh_type == 6:  # SHT_DYNAMIC: (tag, value) pairs; its sh_link is the string table
            stroff = sections[link][4]
            for tag, val in struct.iter_unpack("<qQ", data[off:off + size]):
                if tag == 1:  # DT_NEEDED
                    needed.append(data[stroff + val:data.index(b"\0", stroff + val)].decode())
    return needed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF check: Linux only")
def test_extension_shares_the_shared_libstdcxx():
    """refiner._C links libstdc++ as a shared library (setup.py passes the one torch loaded): a
    static copy (a g++ that links it statically, as on the lent H100 machines) crashed the first
    TORCH_CHECK message that streamed an integer."""
    import refiner._C
    assert any(n.startswith("libstdc++.so") for n in _elf_needed(refiner._C.__file__)), \
        _elf_needed(refiner._C.__file__)


def test_integer_in_an_error_message_in_a_subprocess():
    """A check whose message streams an int64 raises (the static libstdc++ build died of SIGSEGV)."""
    code = ("import torch, refiner._compiled as C\n"
            "q = torch.randn(1, 2, 5, 0)\n"
            "try:\n    C.softmax_block(q, q, q, None, 0.5)\n"
            "except RuntimeError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"child exited with {r.returncode}:\n{r.stderr[-3000:]}"
    assert "head size must be >= 1, got 0" in r.stdout, r.stdout


# ----------------------------------------------------------------------------- refine train
TRAIN_NAMES = ["attn", "v", "w_exp", "w_dw", "w_pro", "g1", "b1", "g2", "b2", "g3", "b3", "ga", "ba"]


def train_inputs(B, H, N, d, ratio, k, dtype=torch.float64, device=DEVICE):
    from utils import train_args
    dla, bn = random_dla(H, ratio, k)
    attn = random_attn(B, H, N).double()
    v = torch.randn(B, H, N, d, dtype=torch.float64)
    ps = [t.detach().double() for t in train_args(dla, bn)]
    return [t.to(device=device, dtype=dtype) for t in [attn, v] + ps], ratio != 1


def check_train(fused, ref, args):
    """fp32 fused vs the fp64 reference of the same inputs. The grad of b3 is analytically zero
    (BN_a subtracts the mean of Z = A + BN3(.) over all positions), so in fp32 it is cancellation
    noise of size ~eps * sqrt(B N^2) * |grad|: checked to be small next to the grad of g3 instead."""
    g = compare(fused, ref, args, rtol=1e-4, atol=1e-4, names=TRAIN_NAMES, skip=("b3",),
                ref_inputs=[t.double() for t in args])
    assert g["b3"].abs().max() <= 1e-3 * max(g["g3"].abs().max(), g["ba"].abs().max())


def check_train_stats(args, expand, scale):
    """C.refine_train's batch statistics against the fp64 reference's: to ~1e-10 for fp64 inputs; for
    fp32 the means to 1e-5 and the variances to 1e-4 (relative)."""
    with torch.no_grad():
        s_f = C.refine_train(*args, 1e-5, scale, expand)[1]
        s_r = R.refine_train(*[t.double() for t in args], 1e-5, scale, expand)[1]
    for a, e in zip(s_f, s_r):
        if e is None:
            continue
        if a.mean.dtype == torch.float64:
            assert_close(a.mean, e.mean, 1e-10, 1e-12, "mean")
            assert_close(a.var, e.var, 1e-10, 1e-12, "var")
        else:
            assert_close(a.mean, e.mean.float(), 1e-5, 1e-5, "mean")
            assert_close(a.var, e.var.float(), 1e-4, 1e-5, "var")


def _train_fns(expand, scale, eps=1e-5):
    fused = lambda *a: C.refine_train(*a, eps, scale, expand)[0]  # noqa: E731
    ref = lambda *a: R.refine_train(*a, eps, scale, expand)[0]  # noqa: E731
    return fused, ref


TRAIN_CASES = [
    (2, 12, 17, 32, 3, 3),
    (2, 16, 17, 35, 6, 5),
    (2, 12, 17, 32, 1, 3),
    (1, 12, 50, 35, 3, 3),
]


@pytest.mark.parametrize("B,H,N,d,ratio,k", TRAIN_CASES)
def test_refine_train_fp32(B, H, N, d, ratio, k):
    args, expand = train_inputs(B, H, N, d, ratio, k, torch.float32)
    fused, ref = _train_fns(expand, d ** -0.5)
    check_train(fused, ref, args)


def test_refine_train_n197_fwd_bwd():
    args, expand = train_inputs(2, 12, 197, 32, 3, 3, torch.float32)
    fused, ref = _train_fns(expand, 32 ** -0.5)
    check_train(fused, ref, args)


@pytest.mark.parametrize("path", TRAIN_PATHS)
@pytest.mark.parametrize("B,H,N,d,ratio,k", [
    (2, 3, 1, 5, 2, 7),    # N = 1, below the kernel's halo
    (2, 3, 33, 5, 2, 7),   # two row tiles, the last of one row
    (1, 2, 65, 5, 1, 3),   # three row tiles, no expansion
    (2, 4, 17, 5, 3, 5),
    (2, 3, 40, 5, 2, 1),   # no halo
])
def test_refine_train_paths_fp64(monkeypatch, path, B, H, N, d, ratio, k):
    """Every CPU training path in fp64 against the fp64 reference: output, every gradient and the
    batch statistics to ~1e-10, over row-tile borders, vector tails and maps smaller than the kernel."""
    set_train_path(monkeypatch, path)
    args, expand = train_inputs(B, H, N, d, ratio, k, torch.float64)
    fused, ref = _train_fns(expand, 0.3)
    g = compare(fused, ref, args, rtol=1e-9, atol=1e-10, names=TRAIN_NAMES, skip=("b3",))
    assert g["b3"].abs().max() <= 1e-9 * max(g["g3"].abs().max(), g["ba"].abs().max())  # exactly 0
    check_train_stats(args, expand, 0.3)


@pytest.mark.parametrize("path", TRAIN_PATHS)
@pytest.mark.parametrize("chunk", ["1", "2", "5"])
@pytest.mark.parametrize("ratio", [3, 1])
def test_refine_train_chunked(monkeypatch, path, chunk, ratio):
    """The batch is walked in chunks of images (REFINER_TRAIN_CHUNK overrides the size): one image,
    uneven chunks (2, 2, 1) and the whole batch give the reference's output, grads and stats."""
    set_train_path(monkeypatch, path)
    monkeypatch.setenv("REFINER_TRAIN_CHUNK", chunk)
    args, expand = train_inputs(5, 12, 17, 35, ratio, 3, torch.float32)
    fused, ref = _train_fns(expand, 35 ** -0.5)
    check_train(fused, ref, args)
    check_train_stats(args, expand, 0.2)


@pytest.mark.parametrize("save_y3", ["1", "0"])
@pytest.mark.parametrize("path,bound", [("fast", 4), ("portable", 7), ("chunk", 7)])
def test_refine_train_memory_is_a_few_maps_not_the_expanded_ones(monkeypatch, path, bound, save_y3):
    """fwd+bwd peak CPU allocation (temporaries inside the op included): the reference holds the
    (B, rH, N, N) maps for its backward (~43x A at r=3); the fused op recomputes them (streamed
    passes: no expanded map at all; chunk path: chunk by chunk) and stays near the size of A (the
    returned grad of attn alone is 1x A). The kept Y3 (REFINER_TRAIN_SAVE_Y3=1) adds its own size,
    1x A, and no more (autograd must not hand the backward a materialized zero gradient of it)."""
    set_train_path(monkeypatch, path)
    monkeypatch.setenv("REFINER_TRAIN_SAVE_Y3", save_y3)
    bound += int(save_y3)
    from benchmarks.common import peak_memory
    args, expand = train_inputs(8, 12, 33, 16, 3, 3, torch.float32)
    A = args[0].nbytes

    def step(fn):
        ins = [t.detach().requires_grad_() for t in args]
        fn(*ins, 1e-5, 0.25, expand)[0].sum().backward()

    fused = peak_memory(lambda: step(C.refine_train), torch.device("cpu"))[0]
    ref = peak_memory(lambda: step(R.refine_train), torch.device("cpu"))[0]
    assert ref > 20 * A  # the measurement sees the reference's stored maps
    assert fused < bound * A, f"fused peak {fused / A:.1f}x A"


@pytest.mark.parametrize("var,value", [("REFINER_TRAIN_CHUNK", "0"), ("REFINER_TRAIN_PATH", "rows"),
                                       ("REFINER_TRAIN_SAVE_Y3", "yes")])
def test_refine_train_env_is_checked(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    args, expand = train_inputs(2, 12, 17, 32, 3, 3, torch.float32)
    with pytest.raises((RuntimeError, ValueError), match=var):
        C.refine_train(*args, 1e-5, 0.2, expand)


def _reference_y3(args, eps):
    """Y3 = W_p relu6(BN2(dw(E))) with batch statistics, E = relu6(BN1(W_e A)) (an expanding block),
    from the reference's building blocks (fp64)."""
    attn, _, w_exp, w_dw, w_pro, g1, b1, g2, b2 = [t.double() for t in args[:9]]

    def bn(x, g, b):
        return torch.nn.functional.batch_norm(x, None, None, g, b, training=True, eps=eps)
    e = torch.nn.functional.relu6(bn(R.head_mix(attn, w_exp), g1, b1))
    d = torch.nn.functional.relu6(bn(R.attn_dwconv(e, w_dw), g2, b2))
    return R.head_mix(d, w_pro)


@pytest.mark.parametrize("path", TRAIN_PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_refine_train_saved_y3(monkeypatch, path, dtype):
    """REFINER_TRAIN_SAVE_Y3: the forward returns Y3 (the compute dtype; empty with 0) and the
    backward that uses it in place of its own Y3 pass gives the same output and gradients, bit for
    bit (the pass is deterministic). The returned Y3 is the reference's to fp64/fp32 accuracy."""
    set_train_path(monkeypatch, path)
    args, expand = train_inputs(2, 4, 17, 8, 3, 3, dtype)
    eps, scale = 1e-5, 0.3
    results = {}
    for save in ("1", "0"):
        monkeypatch.setenv("REFINER_TRAIN_SAVE_Y3", save)
        ins = [t.detach().clone().requires_grad_() for t in args]
        res = torch.ops.refiner.refine_train(*ins, eps, scale, expand, C.train_keeps_y3())
        y3 = res[-1]
        assert y3.dtype == dtype and y3.shape == (args[0].shape if save == "1" else (0,))
        grads = torch.autograd.grad(res[0], ins, torch.ones_like(res[0]), allow_unused=True)
        results[save] = (res[0], grads, y3)
    out1, g1, y3 = results["1"]
    out0, g0, _ = results["0"]
    assert torch.equal(out1, out0)
    for name, a, b in zip(TRAIN_NAMES, g1, g0):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(y3, _reference_y3(args, eps).to(dtype), tol, tol, "y3")


@pytest.mark.parametrize("ratio", [3, 1])
def test_refine_train_stats(ratio):
    args, expand = train_inputs(2, 12, 17, 32, ratio, 3, torch.float32)
    with torch.no_grad():
        _, s_f = C.refine_train(*args, 1e-5, 0.2, expand)
        _, s_r = R.refine_train(*args, 1e-5, 0.2, expand)
    assert (s_f[0] is None) == (s_r[0] is None) == (not expand)
    for a, e in zip(s_f, s_r):
        if e is None:
            continue
        assert_close(a.mean, e.mean, 1e-5, 1e-5, "mean")
        assert_close(a.var, e.var, 1e-4, 1e-5, "var")
    # the caller's running-stat update works with our stats
    dla, bn = random_dla(12, ratio, 3)
    bn2 = torch.nn.BatchNorm2d(12)
    bn2.load_state_dict(bn.state_dict())
    R.update_running_stats(bn, s_f[3], 2 * 17 * 17)
    R.update_running_stats(bn2, s_r[3], 2 * 17 * 17)
    assert_close(bn.running_var, bn2.running_var, 1e-5, 1e-6)


@pytest.mark.parametrize("ratio,k", [(2, 3), (1, 3)])
def test_refine_train_gradcheck(ratio, k):
    args, expand = train_inputs(2, 2, 5, 3, ratio, k)
    if expand:
        fn = lambda *a: C.refine_train(*a, 1e-5, 0.6, True)[0]  # noqa: E731
        ins = args
    else:  # w_exp, g1, b1 unused
        fn = lambda a, v, w_dw, w_pro, *bn: C.refine_train(a, v, args[2], w_dw, w_pro, args[5], args[6], *bn,  # noqa: E731
                                                           1e-5, 0.6, False)[0]
        ins = args[:2] + args[3:5] + args[7:]
    ins = [t.clone().requires_grad_() for t in ins]
    assert torch.autograd.gradcheck(fn, ins)


def _train_case(a, ratio, k, seed=0):
    """fp32 inputs around the map a: (C output, C stats), fp32 reference, fp64 reference."""
    from utils import train_args
    torch.manual_seed(seed)
    B, H, N, _ = a.shape
    v = torch.randn(B, H, N, 8)
    dla, bn = random_dla(H, ratio, k)
    ps = [t.detach().float() for t in train_args(dla, bn)]
    expand = ratio != 1
    with torch.no_grad():
        got = C.refine_train(a, v, *ps, 1e-5, 0.3, expand)
        r32 = R.refine_train(a, v, *ps, 1e-5, 0.3, expand)
        r64 = R.refine_train(a.double(), v.double(), *[p.double() for p in ps], 1e-5, 0.3, expand)
    return got, r32, r64


@pytest.mark.parametrize("path", TRAIN_PATHS)
@pytest.mark.parametrize("ratio", [3, 1])
@pytest.mark.parametrize("k", [1, 3])
def test_refine_train_zero_variance(monkeypatch, path, ratio, k):
    # A constant map: every BN channel (with k=1) has zero batch variance, so each BN multiplies
    # rounding noise by 1/sqrt(eps). Statistics are shifted moments and BN_a's come from the very
    # Z values the output uses, so the result is far closer to fp64 than the fp32 reference (~3e-5).
    set_train_path(monkeypatch, path)
    a = torch.full((2, 4, 9, 9), 1.0 / 9)
    (out, stats), _, (want, want_stats) = _train_case(a, ratio, k)
    assert torch.isfinite(out).all()
    assert_close(out.double(), want, 1e-5, 1e-6, "out")
    for s, w in zip(stats, want_stats):
        if w is None:
            assert s is None
            continue
        assert_close(s.mean.double(), w.mean, 1e-5, 1e-4, "mean")  # E = relu6(BN1(.)): fp32 U - m1 times 1/sqrt(eps)
        assert_close(s.var.double(), w.var, 1e-4, 1e-7, "var")
        if k == 1:
            assert s.var.abs().max() <= 1e-9


@pytest.mark.parametrize("path", TRAIN_PATHS)
@pytest.mark.parametrize("k", [1, 3])
def test_refine_train_large_mean_small_spread(monkeypatch, path, k):
    # A = 1000 + 1e-3 * rand: un-shifted E[x^2] - E[x]^2 would lose every digit of var(A) ~ 1e-7.
    # BN1 follows from the (shifted) moments of A in fp64, so it keeps them; BN_a (mean ~1000,
    # spread ~1) is computed from shifted moments of Z. (BN2, BN3 see maps that fp32 arithmetic
    # on inputs ~1000 has already rounded: no tighter than the fp32 reference, not checked here.)
    set_train_path(monkeypatch, path)
    torch.manual_seed(1)
    a = 1000 + 1e-3 * torch.rand(2, 4, 9, 9)
    (_, stats), (_, s32), (_, s64) = _train_case(a, 3, k)
    assert_close(stats[0].mean.double(), s64[0].mean, 1e-7, 0, "mean1")
    assert_close(stats[0].var.double(), s64[0].var, 1e-5, 0, "var1")
    assert (s32[0].var.double() - s64[0].var).abs().max() > 1e-3 * s64[0].var.abs().max()  # fp32 ref can't
    assert_close(stats[3].mean.double(), s64[3].mean, 1e-6, 0, "mean_a")
    assert_close(stats[3].var.double(), s64[3].var, 1e-3, 0, "var_a")
    for s in stats:
        assert torch.isfinite(s.mean).all() and (s.var >= 0).all()

def test_refine_train_half():
    args, expand = train_inputs(2, 12, 17, 32, 3, 3, torch.float16)
    fused, ref = _train_fns(expand, 32 ** -0.5)
    with torch.no_grad():
        assert_close(fused(*args), ref(*[t.float() for t in args]), 1e-2, 1e-2)


@pytest.mark.parametrize("path", ["fast", "portable"])
def test_refine_train_backward_twice(monkeypatch, path):
    """A second backward through the same graph (retain_graph) gives the same gradients: the
    backward leaves the kept Y3 as the forward saved it."""
    set_train_path(monkeypatch, path)
    args, expand = train_inputs(2, 4, 13, 8, 3, 3, torch.float32)
    ins = [t.detach().clone().requires_grad_() for t in args]
    out = C.refine_train(*ins, 1e-5, 0.25, expand)[0]
    go = torch.randn_like(out)
    first = torch.autograd.grad(out, ins, go, retain_graph=True)
    for name, a, b in zip(TRAIN_NAMES, first, torch.autograd.grad(out, ins, go)):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("keep_y3", [True, False])
def test_refine_train_opcheck(keep_y3):
    args, expand = train_inputs(2, 2, 5, 3, 2, 3, torch.float32)
    torch.library.opcheck(torch.ops.refiner.refine_train.default,
                          (*[t.requires_grad_() for t in args], 1e-5, 0.5, expand, keep_y3))


def test_refine_train_bad_inputs():
    args, expand = train_inputs(1, 4, 6, 3, 2, 3, torch.float32)
    bad = list(args)
    bad[9] = args[9][:2]  # g3
    with pytest.raises(RuntimeError, match="g3 must have shape"):
        C.refine_train(*bad, 1e-5, 0.5, expand)
    with pytest.raises(RuntimeError, match="eps must be"):
        C.refine_train(*args, float("nan"), 0.5, expand)
    res = torch.ops.refiner.refine_train(*args, 1e-5, 0.5, expand)
    for y3, msg in [(res[-1][..., :-1], "y3 must be empty or have attn's shape"),
                    (res[-1].half(), "y3 must have dtype Float"),
                    (res[-1].transpose(2, 3), "y3 must be contiguous")]:
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.refiner.refine_train_backward(res[0], *args, *res[1:9], y3, 1e-5, 0.5, expand)
