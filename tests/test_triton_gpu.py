"""Triton backend on a GPU: bf16 (wrong under the interpreter, so GPU only), realistic shapes
(N = 197, 50; head sizes 32, 35) and the autotuned launch paths. Skipped without a GPU.

bf16 tolerance: the kernels compute in fp32 and round only stored results to bf16 (relative
error <= 2^-8 per element), so rtol = atol/max|ref| = 1e-2 against the fp32 reference on the
same bf16-rounded inputs.

The tests run the built-in defaults (REFINER_TUNED_SETTINGS=0): a value tuned for this GPU model
(refiner_kernels/tuned_settings.json) is one of the candidates, tested by name below, and
benchmarks/decide_settings.py records none whose test cases did not pass.
"""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from utils import assert_no_worse_than, assert_train_no_worse_than, random_attn, random_dla, train_args

pytestmark = requires_cuda

import refiner_kernels as rk  # noqa: E402
from refiner import reference as ref  # noqa: E402
from refiner_kernels.kernels_refine_train import _dot_precision  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _builtin_defaults(monkeypatch):
    monkeypatch.setenv("REFINER_TUNED_SETTINGS", "0")


def _close(a, b, dtype, name):
    t = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=t, atol=t * max(1.0, b.abs().max().item()),
                               msg=lambda m: f"{name}: {m}")


def _leaf(t, dtype):
    return t.detach().to("cuda", dtype).clone().requires_grad_(True)


def _pair(ts, dtype):
    xs = [None if t is None else _leaf(t, dtype) for t in ts]
    rs = [None if t is None else t.detach().float().clone().requires_grad_(True) for t in xs]
    return xs, rs


def _check_grads(outs, routs, xs, rs, dtype, names):
    gos = [torch.randn_like(r) for r in routs]
    xs_ = [x for x in xs if x is not None]
    rs_ = [r for r in rs if r is not None]
    g = torch.autograd.grad(outs, xs_, [go.to(o.dtype) for go, o in zip(gos, outs)], allow_unused=True)
    gr = torch.autograd.grad(routs, rs_, [go.to(dtype).float() for go in gos], allow_unused=True)
    floor = max(x.abs().max().item() for x in gr if x is not None)
    for n, a, b in zip(names, g, gr):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a, dtype=torch.float32) if b is None else b
        t = TOL[dtype] * (5 if dtype == torch.float32 else 1)
        torch.testing.assert_close(a.float(), b, rtol=t, atol=t * max(1.0, b.abs().max().item(),
                                                                      floor if n == "b3" else 0.0),
                                   msg=lambda m: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,d", [(197, 32), (50, 35)])
def test_softmax_block_gpu(N, d, dtype):
    B, H = 2, 12
    xs, rs = _pair([torch.randn(B, H, N, d) for _ in range(3)] + [random_attn(B, H, N)], dtype)
    out, attn = rk.softmax_block(*xs, d ** -0.5)
    rout, rattn = ref.softmax_block(*rs, d ** -0.5)
    _close(out, rout, dtype, "out")
    _close(attn, rattn, dtype, "attn")
    _check_grads([out, attn], [rout, rattn], xs, rs, dtype, ["q", "k", "v", "prev"])


@pytest.mark.parametrize("N,d", [(197, 32), (50, 35)])
def test_softmax_block_gpu_bf16_backward_dots(monkeypatch, N, d):
    """The backward's candidate REFINER_TRITON_SOFTMAX_BWD_DOT=bf16 (dq's and dk's dots on bf16
    operands, bf16 inputs): the gradients within bf16's tolerance of the fp32 reference, as the
    reference's own bf16 backward rounds dS."""
    monkeypatch.setenv("REFINER_TRITON_SOFTMAX_BWD_DOT", "bf16")
    test_softmax_block_gpu(N, d, torch.bfloat16)


def _eval_case(N, d, ratio, ks, dtype, B=2, H=12):
    """A folded refine block (eval BatchNorms) and its inputs: (fold, GPU tensors in dtype, fp32 leaves)."""
    dla, bn = random_dla(H, ratio, ks)
    dla.eval()
    bn.eval()
    f = ref.fold_refine(dla, bn, d ** -0.5)
    xs, rs = _pair([random_attn(B, H, N), torch.randn(B, H, N, d)] + list(f.args()[:-1]), dtype)
    return f, xs, rs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,d,ratio,ks", [(197, 32, 3, 3), (50, 35, 3, 5), (50, 32, 1, 3)])
def test_refine_eval_gpu(N, d, ratio, ks, dtype):
    f, xs, rs = _eval_case(N, d, ratio, ks, dtype)
    out = rk.refine_eval(*xs, f.expand)
    rout = ref.refine_eval(*rs, f.expand)
    _close(out, rout, dtype, "out")
    _check_grads([out], [rout], xs, rs, dtype,
                 "attn v w_exp b_exp w_dw b_dw w_pro b_pro alpha beta".split())


@pytest.mark.parametrize("N,d,ratio,ks", [(197, 32, 3, 3), (50, 35, 3, 5)])
@pytest.mark.parametrize("env", ["REFINER_TRITON_REFINE_DOT=bf16",
                                 "REFINER_TRITON_REFINE_DOT=bf16,REFINER_TRITON_REFINE_FWD=tile"])
def test_refine_eval_gpu_bf16_dots(monkeypatch, env, N, d, ratio, ks):
    """The forward's candidate bf16 dots on bf16 maps (both forwards): the output no worse (2-norm)
    than the reference's own computed in bf16; the gradients as test_refine_eval_gpu's (the backward
    recomputes R in IEEE fp32)."""
    for assign in env.split(","):
        monkeypatch.setenv(*assign.split("="))
    f, xs, rs = _eval_case(N, d, ratio, ks, torch.bfloat16)
    out = rk.refine_eval(*xs, f.expand)
    rout = ref.refine_eval(*rs, f.expand)
    with torch.no_grad():
        hout = ref.refine_eval(*[x.detach() for x in xs], f.expand)
    assert_no_worse_than([out.detach()], [rout.detach()], [hout], ["out"])
    _check_grads([out], [rout], xs, rs, torch.bfloat16, "attn v w_exp b_exp w_dw b_dw w_pro b_pro alpha beta".split())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,d,ratio,ks", [(197, 32, 3, 3), (50, 35, 3, 5)])
def test_refine_eval_gpu_tile_forward(monkeypatch, N, d, ratio, ks, dtype):
    """The other forward (REFINER_TRITON_REFINE_FWD=tile; the default is split), also the backward's
    R recompute."""
    monkeypatch.setenv("REFINER_TRITON_REFINE_FWD", "tile")
    test_refine_eval_gpu(N, d, ratio, ks, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,d,ratio,ks", [(197, 32, 3, 3), (50, 35, 3, 5), (50, 32, 1, 3), (577, 32, 3, 3)])
def test_refine_eval_gpu_gather_forward(monkeypatch, N, d, ratio, ks, dtype):
    """The candidate forward REFINER_TRITON_REFINE_FWD=gather (one kernel; the column shifts by
    tl.gather, warp shuffles at 32 columns), also the backward's R recompute."""
    monkeypatch.setenv("REFINER_TRITON_REFINE_FWD", "gather")
    test_refine_eval_gpu(N, d, ratio, ks, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tm,warps", [(2, 2), (4, 2), (8, 4), (8, 8)])
def test_refine_eval_gpu_gather_forms(monkeypatch, tm, warps, dtype):
    """The gather forward's tiles that GPU autotuning may pick (the tests run untuned: 4 rows, 4
    warps), at N=197."""
    from refiner_kernels import kernels_refine_eval
    monkeypatch.setattr(kernels_refine_eval, "GATHER_TM", tm)
    monkeypatch.setattr(kernels_refine_eval, "GATHER_WARPS", warps)
    monkeypatch.setenv("REFINER_TRITON_REFINE_FWD", "gather")
    test_refine_eval_gpu(197, 32, 3, 3, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unroll,cc", [(True, 16), (True, 1), (False, 1)])
def test_refine_eval_gpu_split_forms(monkeypatch, unroll, cc, dtype):
    """The split forward's stencil-pass forms that GPU autotuning may pick (the tests run untuned:
    rolled, 16 channels a step), at N=197."""
    from refiner_kernels import kernels_refine_eval
    monkeypatch.setattr(kernels_refine_eval, "SPLIT_UNROLL", unroll)
    monkeypatch.setattr(kernels_refine_eval, "SPLIT_CC", cc)
    test_refine_eval_gpu(197, 32, 3, 3, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,d,ratio,ks", [(197, 32, 3, 3), (50, 35, 3, 5), (50, 32, 1, 3)])
def test_refine_train_gpu(N, d, ratio, ks, dtype):
    B, H = 2, 12
    dla, bn = random_dla(H, ratio, ks)
    expand = ratio != 1
    xs, rs = _pair([random_attn(B, H, N), torch.randn(B, H, N, d)] + list(train_args(dla, bn)), dtype)
    out, stats = rk.refine_train(*xs, 1e-5, d ** -0.5, expand)
    rout, rstats = ref.refine_train(*rs, 1e-5, d ** -0.5, expand)
    prec = _dot_precision(xs[0])
    if prec != "ieee":  # the reference itself in bf16: the accuracy that TF32 and bf16 dots are held to
        hs = [None if x is None else x.detach().bfloat16().requires_grad_(True) for x in xs]
        hout, hstats = ref.refine_train(*hs, 1e-5, d ** -0.5, expand)
    if prec == "bf16":  # bf16 operands: outputs and statistics no worse than the bf16 reference's
        assert_train_no_worse_than(out, stats, rout, rstats, hout, hstats)
    else:
        _close(out, rout, dtype, "out")
        for s, r in zip(stats, rstats):
            if r is not None:
                _close(s.mean, r.mean, dtype, "mean")
                _close(s.var, r.var, dtype, "var")
    names = "attn v w_exp w_dw w_pro g1 b1 g2 b2 g3 b3 ga ba".split()
    if prec == "ieee":
        _check_grads([out], [rout], xs, rs, dtype, names)
        return
    # TF32 or bf16 dots: gradients no worse than the reference's own in bf16
    go = torch.randn_like(rout)
    keep = [i for i, x in enumerate(xs) if x is not None]

    def grads(o, ins, g):
        ins = [ins[i] for i in keep]
        gs = torch.autograd.grad([o], ins, [g], allow_unused=True)
        return [torch.zeros_like(x) if gx is None else gx for gx, x in zip(gs, ins)]

    assert_no_worse_than(grads(out, xs, go.to(dtype)), grads(rout, rs, go.to(dtype).float()),
                         grads(hout, hs, go.bfloat16()), [f"d{names[i]}" for i in keep])


@pytest.mark.parametrize("N,ks", [(197, 3), (50, 5)])
@pytest.mark.parametrize("env", ["REFINER_TRITON_TRAIN_DOT=ieee", "REFINER_TRITON_TRAIN_DOT=tf32",
                                 "REFINER_TRITON_TRAIN_DOT=tf32x3",
                                 "REFINER_TRITON_TRAIN_SAVE_Y3=0", "REFINER_TRITON_TRAIN_X2=halo",
                                 "REFINER_TRITON_TRAIN_X2=gather"])
def test_refine_train_gpu_candidates(monkeypatch, N, ks, env):
    """refine_train's other settings on bf16 maps: IEEE dots (elementwise bf16 tolerances), TF32
    dots asked for explicitly, 3xTF32 dots, Y3 recomputed in the backward, the X2 passes on halo
    tiles, and on gather tiles."""
    for assign in env.split(","):
        monkeypatch.setenv(*assign.split("="))
    test_refine_train_gpu(N, 32, 3, ks, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_gpu(dtype):
    x = torch.randn(2, 12, 197, 197)
    for fn, rfn, ins in [(rk.head_mix, ref.head_mix, [x, torch.randn(36, 12) * 0.3]),
                         (rk.attn_dwconv, ref.attn_dwconv, [x, torch.randn(12, 3, 3) * 0.3]),
                         (rk.row_softmax, ref.row_softmax, [x]),
                         (rk.attn_value, ref.attn_value, [x.softmax(-1), torch.randn(2, 12, 197, 35)])]:
        xs, rs = _pair(ins, dtype)
        _close(fn(*xs), rfn(*rs), dtype, fn.__name__)
        _check_grads([fn(*xs)], [rfn(*rs)], xs, rs, dtype, [str(i) for i in range(len(xs))])


def test_large_grid_int64_offsets():
    """B*H*N*N > 2^31 elements of A is too large for one GPU test; check a grid with B*H > 65535
    rows on the batch axis instead (the batch*heads axis is grid axis 1 / 2)."""
    B, H, N, d = 5500, 12, 9, 16
    q, k, v = (torch.randn(B, H, N, d, device="cuda") for _ in range(3))
    out, attn = rk.softmax_block(q, k, v, None, 0.25)
    rout, rattn = ref.softmax_block(q, k, v, None, 0.25)
    torch.testing.assert_close(out, rout, rtol=1e-4, atol=1e-5)
