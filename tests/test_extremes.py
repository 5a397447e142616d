"""Extreme but valid inputs, numerical safety, NaN propagation and determinism, per backend."""
import pytest
import torch

from refiner import ops, reference
from backends import DEVICE, backend_params
from utils import random_attn, random_dla, relu6_flips, train_args

BACKENDS = backend_params()


def _eval_fold(H, ratio=3, kernel=3):
    dla, abn = random_dla(H, ratio, kernel, device=DEVICE)
    return reference.fold_refine(dla.eval(), abn.eval(), 0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [1, 2, 3])
def test_tiny_token_counts(backend, N):
    B, H, d = 2, 4, 5
    q, k, v = torch.randn(3, B, H, N, d, device=DEVICE).unbind(0)
    prev = random_attn(B, H, N, device=DEVICE)
    out, attn = ops.softmax_block(q, k, v, prev, 0.4, backend=backend)
    want_out, want_attn = reference.softmax_block(q, k, v, prev, 0.4)
    torch.testing.assert_close(attn, want_attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    f = _eval_fold(H)
    torch.testing.assert_close(ops.refine_eval(prev, v, f, backend=backend),
                               reference.refine_eval(prev, v, *f.args()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_stay_finite(backend):
    B, H, N, d = 1, 2, 17, 8
    q, k, v = torch.randn(3, B, H, N, d, device=DEVICE).unbind(0)
    qb, kb = (q * 1e4).requires_grad_(), (k * 1e4).requires_grad_()
    out, attn = ops.softmax_block(qb, kb, v, None, d ** -0.5, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(attn).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, H, N, device=DEVICE))
    # Logits ~1e8 (ulp 8): every recomputation of P in the backward must agree with the forward's
    # row max bit for bit (no FMA-contracted `s * scale - max`), else exp(s - max) reaches e^16.
    want_out, want_attn = reference.softmax_block(q * 1e4, k * 1e4, v, None, d ** -0.5)
    torch.testing.assert_close(attn, want_attn)
    g_out, g_attn = torch.randn_like(out), torch.randn_like(attn)
    gq, gk = torch.autograd.grad((out * g_out).sum() + (attn * g_attn).sum(), (qb, kb))
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all()
    # Tiny logits: a uniform map.
    _, flat = ops.softmax_block(q * 1e-30, k * 1e-30, v, None, d ** -0.5, backend=backend)
    torch.testing.assert_close(flat, torch.full_like(flat, 1 / N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_the_reference(backend):
    B, H, N, d = 1, 2, 9, 4
    q, k, v = torch.randn(3, B, H, N, d, device=DEVICE).unbind(0)
    q[0, 1, 4, 2] = float("nan")
    out, attn = ops.softmax_block(q, k, v, None, 0.5, backend=backend)
    want_out, want_attn = reference.softmax_block(q, k, v, None, 0.5)
    assert torch.equal(torch.isnan(attn), torch.isnan(want_attn))
    assert torch.equal(torch.isnan(out), torch.isnan(want_out))
    a = random_attn(B, H, N, device=DEVICE)
    a[0, 0, 3, 3] = float("inf")
    f = _eval_fold(H)
    got = ops.refine_eval(a, v, f, backend=backend)
    want = reference.refine_eval(a, v, *f.args())
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    B, H, N, d = 2, 4, 13, 6
    a = random_attn(B, H, N, device=DEVICE).requires_grad_()
    v = torch.randn(B, H, N, d, device=DEVICE, requires_grad=True)
    dla, abn = random_dla(H, device=DEVICE)
    runs = []
    for _ in range(2):
        out, _ = ops.refine_train(a, v, *train_args(dla, abn), eps=1e-5, scale=0.3, expand=True, backend=backend)
        ga, gv = torch.autograd.grad(out.square().sum(), [a, v])
        runs.append((out, ga, gv))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_variance_channels_in_training(backend):
    # A constant map gives zero batch variance in every BN: eps keeps it finite, as in BatchNorm2d.
    B, H, N, d = 2, 3, 7, 4
    a = torch.full((B, H, N, N), 1.0 / N, device=DEVICE)
    v = torch.randn(B, H, N, d, device=DEVICE)
    dla, abn = random_dla(H, kernel=1, device=DEVICE)
    out, stats = ops.refine_train(a, v, *train_args(dla, abn), eps=1e-5, scale=0.3, expand=True, backend=backend)
    # Compare with the reference in float64: with zero variance every BN multiplies rounding
    # noise by 1/sqrt(eps) ~ 316, so the fp32 reference itself is ~1e-4 off the exact result:
    # a backend must be within a few times that.
    want, want_stats = reference.refine_train(a.double(), v.double(), *[p.double() for p in train_args(dla, abn)],
                                              1e-5, 0.3, True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=3e-4)
    for st, ws in zip(stats, want_stats):
        torch.testing.assert_close(st.var.double(), ws.var, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_channels_last_inputs(backend):
    B, H, N, d = 2, 4, 11, 6
    base = torch.randn(B, N, 3, H, d, device=DEVICE)
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) views, not contiguous
    assert not q.is_contiguous()
    out, attn = ops.softmax_block(q, k, v, None, 0.5, backend=backend)
    want_out, want_attn = reference.softmax_block(q, k, v, None, 0.5)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    a = random_attn(B, H, N, device=DEVICE).to(memory_format=torch.channels_last)
    f = _eval_fold(H)
    torch.testing.assert_close(ops.refine_eval(a, v, f, backend=backend),
                               reference.refine_eval(a, v, *f.args()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequences_up_to_1025_tokens(backend):
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("N=1025 under the Triton interpreter takes minutes; run on a GPU")
    B, H, N, d = 1, 2, 1025, 8
    q, k, v = torch.randn(3, B, H, N, d, device=DEVICE).unbind(0)
    out, attn = ops.softmax_block(q, k, v, None, d ** -0.5, backend=backend)
    want_out, want_attn = reference.softmax_block(q, k, v, None, d ** -0.5)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    f = _eval_fold(H)
    torch.testing.assert_close(ops.refine_eval(want_attn, v, f, backend=backend),
                               reference.refine_eval(want_attn, v, *f.args()), rtol=1e-4, atol=1e-4)
    # Training, the output and the gradient of the map, against fp64: BN1 sees a softmax map with
    # var ~1e-6 and multiplies by ~1/sqrt(var + eps) ~ 300, so a statistic a few 1e-5 off flips
    # relu6 masks everywhere (an fp32 Gram matrix did). Bound: the fp32 reference's own error, at
    # its 99.99th percentile, for all but relu6_flips elements: even exact statistics leave a few
    # pre-activations within fp32 rounding of 0 or 6, and each such flip moves a pixel's gradient by
    # up to ~1e3 (seeds 0-11 on the CPU: the fused kernels flip 0-20 elements, the fp32 reference too,
    # for seeds 2 and 8; the H100 run of b7ff105 failed a max-error bound this way, 326 vs 0.006).
    params = train_args(*random_dla(H, device=DEVICE))
    gout = torch.randn(B, H, N, d, device=DEVICE, dtype=torch.float64)

    def run(fn, dt):
        a = want_attn.detach().to(dt).requires_grad_()
        out = fn(a, v.to(dt), *[p.detach().to(dt) for p in params])[0]
        return out, torch.autograd.grad(out, a, gout.to(dt))[0]

    got = run(lambda *t: ops.refine_train(*t, eps=1e-5, scale=0.3, expand=True, backend=backend), torch.float32)
    ref32 = run(lambda *t: reference.refine_train(*t, 1e-5, 0.3, True), torch.float32)
    want = run(lambda *t: reference.refine_train(*t, 1e-5, 0.3, True), torch.float64)
    for name, g, r, w in zip(("out", "grad attn"), got, ref32, want):
        err, ref_err = (g.double() - w).abs().flatten(), (r.double() - w).abs().flatten()
        bound = 4 * ref_err.quantile(0.9999).item() + 1e-6 * w.abs().max().item()
        over = int((err > bound).sum()) + int(err.isnan().sum())
        assert over <= relu6_flips(err.numel()), (f"{name}: {over} elements beyond {bound:.3g} (max {err.max():.3g}; "
                                                 f"the fp32 reference's max {ref_err.max():.3g})")


gpu_backends = [b for b in backend_params(include_reference=False) if b.values[0] in ("cuda", "triton")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (grid limits are a GPU matter)")
@pytest.mark.parametrize("backend", gpu_backends)
def test_batch_times_heads_above_65535(backend):
    B, H, N, d = 5462, 12, 5, 4  # B * H = 65544
    q, k, v = torch.randn(3, B, H, N, d, device="cuda").unbind(0)
    out, attn = ops.softmax_block(q, k, v, None, 0.5, backend=backend)
    want_out, _ = reference.softmax_block(q, k, v, None, 0.5)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    f = _eval_fold(H)
    torch.testing.assert_close(ops.refine_eval(attn, v, f, backend=backend),
                               reference.refine_eval(attn, v, *f.args()), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 60e9,
                    reason="needs a CUDA GPU with >= 60 GB (attention map of > 2^31 elements)")
@pytest.mark.parametrize("backend", gpu_backends)
def test_attention_map_above_2_31_elements(backend):
    B, H, N, d = 9, 16, 4000, 8  # B*H*N*N = 2.3e9 > 2^31 elements (4.6 GB in bf16)
    q, k, v = (torch.randn(3, B, H, N, d, device="cuda", dtype=torch.bfloat16)).unbind(0)
    out, attn = ops.softmax_block(q, k, v, None, d ** -0.5, backend=backend)
    # Check the last batch entry (its offsets are the ones past 2^31) against the reference.
    want_out, want_attn = reference.softmax_block(q[-1:].float(), k[-1:].float(), v[-1:].float(), None, d ** -0.5)
    torch.testing.assert_close(attn[-1:].float(), want_attn, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(out[-1:].float(), want_out, rtol=5e-2, atol=2e-2)
