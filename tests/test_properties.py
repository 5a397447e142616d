"""Property tests: random shapes, ratios, kernel sizes and dtypes, every backend vs the reference.

Forward outputs and every gradient. Profiles (conftest.py): "ci" (default, few examples) and "long"
(REFINER_HYPOTHESIS_PROFILE=long, for GPU rounds; REFINER_CPU_PORTABLE=1 picks the CPU path with
the CUDA kernels' arithmetic).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refiner import ops, reference
from backends import DEVICE, backend_params
from utils import random_attn, random_dla, train_args

BACKENDS = backend_params(include_reference=False)
# Half-precision tolerances: inputs are rounded first, so the only differences are the
# kernels' own roundings (fp32 accumulation) vs the reference's, a few ulps of the output.
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-3), torch.bfloat16: (5e-2, 2e-2)}


def _dtypes(backend):
    if backend == "triton" and DEVICE == "cpu":
        return [torch.float32, torch.float16]  # the interpreter is wrong for bf16 (DESIGN.md)
    return [torch.float32, torch.float16, torch.bfloat16]


shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 40), st.integers(1, 40))


def _laid_out(q, k, v, layout):
    """The same values with other strides: views of one (B, N, 3, H, d) projection as the fused layer
    passes them ("qkv"), or (B, N, H, d) memory ("tokens")."""
    if layout == "qkv":
        qkv = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).contiguous()
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "tokens":
        return [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@given(shape=shapes, dt=st.integers(0, 2), with_prev=st.booleans(),
       layout=st.sampled_from(["contiguous", "qkv", "tokens"]))
def test_softmax_block_property(backend, shape, dt, with_prev, layout):
    dtype = _dtypes(backend)[dt % len(_dtypes(backend))]
    B, H, N, d = shape
    q, k, v = _laid_out(*(torch.randn(3, B, H, N, d, device=DEVICE)).to(dtype).unbind(0), layout)
    prev = random_attn(B, H, N, dtype, DEVICE) if with_prev else None
    out, attn = ops.softmax_block(q, k, v, prev, d ** -0.5, backend=backend)
    f32 = lambda t: t.float() if t is not None else None  # noqa: E731
    want_out, want_attn = reference.softmax_block(f32(q), f32(k), f32(v), f32(prev), d ** -0.5)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(attn.float(), want_attn, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.float(), want_out, rtol=rtol, atol=atol * 4)


@pytest.mark.parametrize("backend", BACKENDS)
@given(B=st.integers(1, 2), H=st.integers(1, 5), N=st.integers(1, 30), d=st.integers(1, 36),
       ratio=st.integers(1, 6), kernel=st.sampled_from([1, 3, 5, 7]), dt=st.integers(0, 2),
       training=st.booleans(), v_tokens=st.booleans())
def test_refine_property(backend, B, H, N, d, ratio, kernel, dt, training, v_tokens):
    dtype = _dtypes(backend)[dt % len(_dtypes(backend))]
    dla, abn = random_dla(H, ratio, kernel, device=DEVICE)
    a = random_attn(B, H, N, dtype, DEVICE)
    v = torch.randn(B, H, N, d, device=DEVICE).to(dtype)
    if v_tokens:  # v in (B, N, H, d) memory, as the fused layer's view of its projection
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    rtol, atol = TOL[dtype]
    if training:
        if B * N * N < 2:
            return  # BatchNorm needs more than one value per channel in training
        params = [p.detach().to(dtype) for p in train_args(dla, abn)]
        out, stats = ops.refine_train(a, v, *params, eps=1e-5, scale=0.3, expand=ratio != 1, backend=backend)
        want, _ = reference.refine_train(a.float(), v.float(), *[p.float() for p in params], 1e-5, 0.3, ratio != 1)
        # Batch-normalised outputs amplify half-precision rounding of small variances.
        rtol, atol = rtol * 4, atol * 20
    else:
        f = reference.fold_refine(dla.eval(), abn.eval(), 0.3)
        fd = reference.FoldedRefine(*(t.to(dtype) for t in f.args()[:-1]), expand=f.expand)
        out = ops.refine_eval(a, v, fd, backend=backend)
        want = reference.refine_eval(a.float(), v.float(), *(t.float() for t in fd.args()[:-1]), f.expand)
        atol = atol * 10  # sums over up to rH * k * k products of O(1) terms
    torch.testing.assert_close(out.float(), want, rtol=rtol, atol=atol)


def _as_accurate(got, ref32, want, name, floor=0.0):
    """got (fp32) is about as close to want (fp64) as the fp32 reference is: gradients are sums whose
    terms can cancel (e.g. a tap gradient where relu6 masks out most pixels), so the error scales with
    the terms, not with the result; the fp32 reference's own error measures that scale."""
    err = (got.double() - want).abs().max().item()
    ref_err = (ref32.double() - want).abs().max().item()
    bound = 8 * ref_err + 1e-5 * want.abs().max().item() + floor
    assert err <= bound, f"{name}: max err {err:.3e}, fp32 reference's {ref_err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@given(B=st.integers(1, 2), H=st.integers(1, 5), N=st.integers(1, 24), d=st.integers(1, 12),
       ratio=st.integers(1, 6), kernel=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2 ** 16))
def test_refine_eval_grad_property(backend, B, H, N, d, ratio, kernel, seed):
    """Every gradient of the eval refine op (fp32) against the fp64 reference's autograd."""
    torch.manual_seed(seed)
    dla, abn = random_dla(H, ratio, kernel, device=DEVICE)
    f = reference.fold_refine(dla.eval(), abn.eval(), 0.3)
    leaves = [random_attn(B, H, N, torch.float32, DEVICE), torch.randn(B, H, N, d, device=DEVICE)]
    leaves += [t.detach().float() for t in f.args()[:-1]]
    gout = torch.randn(B, H, N, d, device=DEVICE, dtype=torch.float64)
    names = ["attn", "v", "w_exp", "b_exp", "w_dw", "b_dw", "w_pro", "b_pro", "alpha", "beta"]
    if not f.expand:  # w_exp, b_exp unused
        del leaves[2:4], names[2:4]

    def run(ts, op):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        w = ts[2:] if f.expand else [f.w_exp.to(ts[0]), f.b_exp.to(ts[0])] + ts[2:]
        out = op(ts[0], ts[1], reference.FoldedRefine(*w, expand=f.expand))
        return torch.autograd.grad(out, ts, gout.to(out.dtype))

    ref = lambda a, v, fd: reference.refine_eval(a, v, *fd.args()[:-1], fd.expand)  # noqa: E731
    got = run(leaves, lambda a, v, fd: ops.refine_eval(a, v, fd, backend=backend))
    ref32 = run(leaves, ref)
    want = run([t.double() for t in leaves], ref)
    for name, g, r, w in zip(names, got, ref32, want):
        _as_accurate(g, r, w, name)


@pytest.mark.parametrize("backend", BACKENDS)
@given(B=st.integers(1, 2), H=st.integers(1, 4), N=st.integers(2, 16), d=st.integers(1, 8),
       ratio=st.integers(1, 4), kernel=st.sampled_from([1, 3, 5]), seed=st.integers(0, 2 ** 16))
def test_refine_train_grad_property(backend, B, H, N, d, ratio, kernel, seed):
    """Every gradient of the training refine op (fp32, batch statistics) against the fp64
    reference's autograd. Small maps make the BatchNorms ill-conditioned at times: the bound is the
    fp32 reference's own error on the same case."""
    torch.manual_seed(seed)
    dla, abn = random_dla(H, ratio, kernel, device=DEVICE)
    expand = ratio != 1
    params = [p.detach().float() for p in train_args(dla, abn)]
    leaves = [random_attn(B, H, N, torch.float32, DEVICE), torch.randn(B, H, N, d, device=DEVICE)] + params
    names = ["attn", "v", "w_exp", "w_dw", "w_pro", "g1", "b1", "g2", "b2", "g3", "b3", "ga", "ba"]
    gout = torch.randn(B, H, N, d, device=DEVICE, dtype=torch.float64)
    used = [i for i, nm in enumerate(names) if expand or nm not in ("w_exp", "g1", "b1")]

    def run(ts, op):
        ts = [t.detach().clone().requires_grad_(i in used) for i, t in enumerate(ts)]
        out = op(ts[0], ts[1], *ts[2:])[0]
        return torch.autograd.grad(out, [ts[i] for i in used], gout.to(out.dtype))

    ref = lambda a, v, *p: reference.refine_train(a, v, *p, 1e-5, 0.3, expand)  # noqa: E731
    got = run(leaves, lambda a, v, *p: ops.refine_train(a, v, *p, eps=1e-5, scale=0.3, expand=expand,
                                                        backend=backend))
    ref32 = run(leaves, ref)
    want = run([t.double() for t in leaves], ref)
    # a sum over the B N N pixels whose exact value is ~0 (b3: the BN_a gradient sums to zero) is
    # rounding noise of terms ~ the attention map's gradient: that is the absolute floor
    floor = 1e-6 * B * N * N * want[0].abs().max().item()
    # W_p's gradient sums dY3 D over the pixels (D <= 6), and dY3 is dZ amplified by BN3's
    # g3 / sigma3: a BN3 over a few nearly equal values (H = 1, a 2 x 2 map) makes W_p's exact
    # gradient ~0 (the output barely depends on W_p's scale) out of terms ~g3/sigma3 larger than
    # dA's (the fp32 reference, which never forms dY3 per pixel, is luckier there)
    s3 = reference.refine_train(*[t.double() for t in leaves], 1e-5, 0.3, expand)[1][2]
    amp3 = (params[7].double().abs() / torch.sqrt(s3.var + 1e-5)).max().item()
    for i, g, r, w in zip(used, got, ref32, want):
        _as_accurate(g, r, w, names[i], floor * max(1.0, 6 * amp3) if names[i] == "w_pro" else floor)


@pytest.mark.parametrize("backend", BACKENDS)
@given(shape=shapes, with_prev=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_softmax_block_grad_property(backend, shape, with_prev, seed):
    """Gradients of q, k, v and the previous map (fp32), from both outputs, against fp64."""
    torch.manual_seed(seed)
    B, H, N, d = shape
    leaves = list(torch.randn(3, B, H, N, d, device=DEVICE).unbind(0))
    if with_prev:
        leaves.append(random_attn(B, H, N, torch.float32, DEVICE))
    gouts = [torch.randn(B, H, N, d, device=DEVICE, dtype=torch.float64),
             torch.randn(B, H, N, N, device=DEVICE, dtype=torch.float64)]

    def run(ts, op):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        outs = op(*ts[:3], ts[3] if with_prev else None, d ** -0.5)
        return torch.autograd.grad(outs, ts, [g.to(o.dtype) for g, o in zip(gouts, outs)])

    ref = reference.softmax_block
    got = run(leaves, lambda *a: ops.softmax_block(*a, backend=backend))
    ref32 = run(leaves, ref)
    want = run([t.double() for t in leaves], ref)
    for name, g, r, w in zip(["q", "k", "v", "prev"], got, ref32, want):
        _as_accurate(g, r, w, name)
