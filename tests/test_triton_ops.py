"""Triton backend (refiner_kernels) against refiner.reference.

Without a GPU, conftest sets TRITON_INTERPRET=1 and the kernels run on CPU tensors under the
Triton interpreter (slow: shapes are kept small). fp32 comparisons are tight (the kernels
accumulate in fp32 with IEEE dots). fp16 cases compare against the fp32 reference evaluated on
the same fp16-rounded inputs: the kernels compute in fp32 and round only the stored results to
fp16 (relative error <= 2^-11 per element, plus the rounding of a stored intermediate map for
softmax_block), so rtol = 2e-3 and atol = 2e-3 * max|ref| hold with margin.
bf16 is only tested on a GPU (the interpreter gets bf16 wrong; see DESIGN section 5).
"""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from utils import random_attn, random_dla, train_args

import refiner_kernels as rk
from refiner import reference as ref

pytestmark = pytest.mark.skipif(not rk.AVAILABLE, reason=f"triton backend unavailable: {rk.UNAVAILABLE_REASON}")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _close(a, b, dtype=torch.float32, name=""):
    a = a.float()
    b = b.float()
    if dtype == torch.float32:
        rtol, atol = 1e-4, 1e-5 * max(1.0, b.abs().max().item())
    else:
        rtol, atol = 2e-3, 2e-3 * max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _grads(outs, ins, gouts):
    outs = [o for o in outs]
    g = torch.autograd.grad(outs, [t for t in ins if t is not None], gouts, allow_unused=True)
    return [torch.zeros_like(t) if x is None else x for x, t in zip(g, [t for t in ins if t is not None])]


def _leaf(t, dtype=torch.float32):
    return t.detach().to(DEV, dtype).clone().requires_grad_(True)


# ----------------------------------------------------------------------------- softmax_block

@pytest.mark.parametrize("N,d,has_prev", [(17, 35, True), (50, 32, True), (17, 32, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softmax_block(N, d, has_prev, dtype):
    B, H = 1, 3
    scale = d ** -0.5
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    prev = random_attn(B, H, N) if has_prev else None
    # the same rounded inputs for both; the reference runs in fp32
    xs = [_leaf(t, dtype) for t in (q, k, v)] + ([_leaf(prev, dtype)] if has_prev else [None])
    rs = [None if t is None else _leaf(t.detach().float()) for t in xs]
    out, attn = rk.softmax_block(*xs, scale)
    rout, rattn = ref.softmax_block(*rs, scale)
    assert out.dtype == dtype and attn.dtype == dtype
    _close(out, rout, dtype, "out")
    _close(attn, rattn, dtype, "attn")
    go, ga = torch.randn_like(rout), torch.randn_like(rattn)
    g = _grads((out, attn), xs, (go.to(dtype), ga.to(dtype)))
    gr = _grads((rout, rattn), rs, (go.to(dtype).float(), ga.to(dtype).float()))
    for name, a, b in zip(["dq", "dk", "dv", "dprev"], g, gr):
        _close(a, b, dtype, name)


# ----------------------------------------------------------------------------- refine_eval

def _folded(H, ratio, ks, d):
    dla, bn = random_dla(H, ratio, ks)
    dla.eval()
    bn.eval()
    return ref.fold_refine(dla, bn, d ** -0.5)


@pytest.mark.parametrize("N,d,ratio,ks,dtype", [
    (17, 35, 3, 3, torch.float32),
    (17, 32, 3, 5, torch.float32),
    (50, 32, 3, 3, torch.float32),
    (17, 35, 1, 3, torch.float32),
    (17, 32, 3, 3, torch.float16),
])
def test_refine_eval(N, d, ratio, ks, dtype):
    B, H = 1, 12
    f = _folded(H, ratio, ks, d)
    params = [_leaf(t, dtype) for t in f.args()[:-1]]
    rparams = [_leaf(t.detach().float()) for t in params]
    attn = _leaf(random_attn(B, H, N), dtype)
    v = _leaf(torch.randn(B, H, N, d), dtype)
    rattn, rv = _leaf(attn.detach().float()), _leaf(v.detach().float())
    out = rk.refine_eval(attn, v, *params, f.expand)
    rout = ref.refine_eval(rattn, rv, *rparams, f.expand)
    assert out.dtype == dtype
    _close(out, rout, dtype, "out")
    go = torch.randn_like(rout).to(dtype)
    g = _grads([out], [attn, v] + params, [go])
    gr = _grads([rout], [rattn, rv] + rparams, [go.float()])
    names = "attn v w_exp b_exp w_dw b_dw w_pro b_pro alpha beta".split()
    for name, a, b in zip(names, g, gr):
        _close(a, b, dtype, "d" + name)


def test_refine_eval_border_padding():
    """Padded E is 0 at the border, not relu6(b_exp): a large positive b_exp exposes it."""
    B, H, N, d = 1, 4, 17, 16
    f = _folded(H, 3, 3, d)
    b_exp = torch.full_like(f.b_exp, 3.0)
    args = list(f.args()[:-1])
    args[1] = b_exp
    attn = random_attn(B, H, N)
    v = torch.randn(B, H, N, d)
    torch.testing.assert_close(rk.refine_eval(attn, v, *args, True), ref.refine_eval(attn, v, *args, True),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- opcheck / compile

def _opcheck(op, args):
    torch.library.opcheck(op, args)


def test_opcheck_softmax_block():
    from refiner_kernels import ops
    B, H, N, d = 1, 2, 9, 16
    q, k, v = (torch.randn(B, H, N, d, device=DEV, requires_grad=True) for _ in range(3))
    prev = random_attn(B, H, N, device=DEV).requires_grad_(True)
    _opcheck(ops.softmax_block_op, (q, k, v, prev, 0.25))
    _opcheck(ops.softmax_block_op, (q, k, v, None, 0.25))


def test_opcheck_refine_eval():
    from refiner_kernels import ops
    B, H, N, d = 1, 4, 7, 16
    f = _folded(H, 3, 3, d)
    params = [t.to(DEV).requires_grad_(True) for t in f.args()[:-1]]
    attn = random_attn(B, H, N, device=DEV).requires_grad_(True)
    v = torch.randn(B, H, N, d, device=DEV, requires_grad=True)
    _opcheck(ops.refine_eval_op, (attn, v, *params, True))


class _Tiny(torch.nn.Module):
    def __init__(self, f, scale):
        super().__init__()
        self.f = f
        self.scale = scale

    def forward(self, q, k, v, v2):
        out, attn = rk.softmax_block(q, k, v, None, self.scale)
        out2 = rk.refine_eval(attn, v2, *self.f.args())
        return out + out2


def test_torch_compile_fullgraph():
    B, H, N, d = 1, 4, 9, 16
    f = _folded(H, 3, 3, d)
    f = ref.FoldedRefine(*[t.to(DEV) for t in f.args()[:-1]], f.expand)
    m = _Tiny(f, d ** -0.5)
    xs = [torch.randn(B, H, N, d, device=DEV, requires_grad=True) for _ in range(4)]
    eager = m(*xs)
    g_eager = torch.autograd.grad(eager.sum(), xs)
    # inductor on CPU spends ~50 s compiling C++ here; aot_eager traces the same graph
    # (fake impls + registered autograd, fullgraph=True: no graph break) in a second.
    backend = "inductor" if DEV == "cuda" else "aot_eager"
    compiled = torch.compile(m, fullgraph=True, backend=backend)(*xs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    g_comp = torch.autograd.grad(compiled.sum(), xs)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    r_out, r_attn = ref.softmax_block(*xs[:3], None, d ** -0.5)
    torch.testing.assert_close(eager, r_out + ref.refine_eval(r_attn, xs[3], *f.args()), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- building blocks

def _check_block(fn, rfn, inputs, dtype):
    xs = [_leaf(t, dtype) for t in inputs]
    rs = [_leaf(t.detach().float()) for t in xs]
    y = fn(*xs)
    ry = rfn(*rs)
    assert y.dtype == dtype
    _close(y, ry, dtype, "fwd")
    gy = torch.randn_like(ry).to(dtype)
    for name, a, b in zip(range(len(xs)), _grads([y], xs, [gy]), _grads([ry], rs, [gy.float()])):
        _close(a, b, dtype, f"grad{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_mix(dtype):
    _check_block(rk.head_mix, ref.head_mix, [torch.randn(2, 12, 17, 17), torch.randn(36, 12) * 0.3], dtype)


@pytest.mark.parametrize("ks", [3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attn_dwconv(ks, dtype):
    _check_block(rk.attn_dwconv, ref.attn_dwconv, [torch.randn(1, 6, 17, 17), torch.randn(6, ks, ks) * 0.3], dtype)


@pytest.mark.parametrize("N", [17, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_softmax(N, dtype):
    _check_block(rk.row_softmax, ref.row_softmax, [torch.randn(2, 3, N, N) * 3], dtype)


@pytest.mark.parametrize("N,d", [(17, 35), (50, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attn_value(N, d, dtype):
    _check_block(rk.attn_value, ref.attn_value, [random_attn(1, 3, N), torch.randn(1, 3, N, d)], dtype)


def test_opcheck_blocks():
    from refiner_kernels import ops
    x = torch.randn(1, 4, 7, 7, device=DEV, requires_grad=True)
    _opcheck(ops.head_mix_op, (x, torch.randn(6, 4, device=DEV, requires_grad=True)))
    _opcheck(ops.attn_dwconv_op, (x, torch.randn(4, 3, 3, device=DEV, requires_grad=True)))
    _opcheck(ops.row_softmax_op, (x,))
    _opcheck(ops.attn_value_op, (x, torch.randn(1, 4, 7, 16, device=DEV, requires_grad=True)))
