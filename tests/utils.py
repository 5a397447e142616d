"""Test helpers (the input makers live in refiner.testing so benchmarks share them)."""
import torch
import torch.nn.functional as F

from refiner import reference as R
from refiner.testing import random_attn, random_dla, train_args  # noqa: F401


def relu6_flips(numel: int) -> int:
    """Elements a correct fp32 gradient may get wrong against an fp64 reference on a large map: a
    pre-activation within rounding of 0 or 6 (about one per ~10^7 expanded pixels) flips a relu6 mask,
    which moves that pixel's gradient and its k x k neighbours' by O(1) of the scale. Measured on the
    CPU kernels (same fp32 arithmetic): up to ~100 elements of 7.9M at B=17, N=197 (max error 1.1 on a
    scale of 85) and up to 20 of 2.1M at N=1025. A real bug (a tile edge, a block's second tile, a
    partial tile) touches far more than 16 + 2e-5 of the elements."""
    return 16 + numel // 50_000


def assert_no_worse_than(got, want, half, names, slack=1e-3, factor=1.0, floor=0.0):
    """Gradients (or outputs) of a kernel with TF32 or bf16 dots: each is at least as close (2-norm) to the fp32/fp64
    reference `want` as the reference's own gradients computed in the half type (`half`), up to
    `slack` of the reference's norm. Elementwise tolerances do not fit: a relu6 whose input lies
    within TF32 rounding of 0 or 6 gates its gradient the other way, and under training-mode
    BatchNorm that one entry moves dA by O(10%) of its scale (~1% of the entries at N = 20-200);
    the half-type reference flips several times as many. A real bug (a tile, a channel chunk, a
    term of the BatchNorm backward) gives a norm error far above the half type's. Passes where
    |got - want| <= factor |half - want| + slack |want| + floor (floor: for values ~0 in exact
    arithmetic, whose error is all rounding)."""
    for n, a, b, h in zip(names, got, want, half):
        b = b.double()
        err, base = (a.double() - b).norm().item(), (h.double() - b).norm().item()
        assert err <= factor * base + slack * b.norm().item() + floor, \
            f"{n}: |kernel - ref| = {err:.3e} > |half-type ref - ref| = {base:.3e} (|ref| = {b.norm().item():.3e})"


def assert_train_no_worse_than(out, stats, rout, rstats, hout, hstats):
    """refine_train's output and BN batch statistics (mean, var of each BN), each no worse (2-norm)
    than the reference's own computed in bf16 (hout, hstats): the bar for bf16 dots."""
    names, got, want, half = zip(*[(f"{m}{i}", getattr(s, m), getattr(r, m), getattr(h, m))
                                   for i, (s, r, h) in enumerate(zip(stats, rstats, hstats)) if r is not None
                                   for m in ("mean", "var")])
    assert_no_worse_than((out,) + got, (rout,) + want, (hout,) + half, ("out",) + names)


def _switch_off_then_on(run, monkeypatch, *args):
    """run(*args) with REFINER_CUDA_TENSOR_CORES=0 (CUDA-core kernels), then =1 (tensor cores)."""
    monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "0")
    off = run(*args)
    monkeypatch.setenv("REFINER_CUDA_TENSOR_CORES", "1")
    return off, run(*args)


def check_tensor_core_refine(run, monkeypatch, args, expand):
    """The compiled refine_eval's tensor-core forward (csrc/cuda/refine_eval_tc.cuh, H <= 16) against
    fp64 and next to the CUDA-core kernel (REFINER_CUDA_TENSOR_CORES=0); `run(args)` calls the op.
    fp16/bf16 maps: its extra error is TF32's rounding (2^-11 relative, as fp16's own) of the
    weights, E, D and R; elements must stay within 4e-3 of the output's scale for fp16 (the half
    tolerance of the CUDA-core kernel) and 3e-2 for bf16, whose output rounding (2^-8) dominates.
    fp32 maps (3xTF32): within the fp32 tolerance (1e-5 relative, 2e-5 of the scale). The 2-norm
    error relative to the output's: at most 2e-3 for fp16 (four TF32 roundings, 4 x 2^-11), 8e-3
    for bf16 (two of its own), 2e-6 for fp32; the worst of 300 random shapes on the emulator:
    8.1e-4, 2.1e-3 and 6.2e-7 (up to 4.6x the CUDA-core kernel's error, which rounds less).
    Returns (tensor-core output, CUDA-core output)."""
    from test_compiled_ops import assert_close  # here: test_compiled_ops imports this module
    r_out = R.refine_eval(*[t.double() for t in args], expand)
    fp32, out = _switch_off_then_on(run, monkeypatch, args)
    assert out.dtype == args[0].dtype
    rtol, atol = {torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}.get(out.dtype, (1e-5, 2e-5))
    assert_close(out, r_out, rtol, atol, "out")
    # relative to the output's magnitude (|terms| summed: R and out cancel at times, e.g. N = 1, where
    # the long profile found a 2-norm error of 3e-6 of an output mostly cancelled)
    rel = ((out.double() - r_out).norm() / refine_eval_out_scale(args, expand).norm().clamp_min(1e-30)).item()
    bound = {torch.float16: 2e-3, torch.bfloat16: 8e-3}.get(out.dtype, 2e-6)
    assert rel <= bound, f"tensor-core relative 2-norm error {rel:.3e} > {bound:.0e}"
    return out, fp32


REFINE_NAMES = ["attn", "v", "w_exp", "b_exp", "w_dw", "b_dw", "w_pro", "b_pro", "alpha", "beta"]


def _refine_eval_maps(args, expand):
    """refine_eval's arguments in fp64 and its maps E, the pre-activation of D (a graph leaf's function:
    differentiable) and D."""
    attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta = [t.double() for t in args]
    u = R.head_mix(attn, w_exp) + b_exp[:, None, None] if expand else None
    e = F.relu6(u) if expand else attn
    pre_d = R.attn_dwconv(e.detach().requires_grad_(), w_dw) + b_dw[:, None, None]
    return (attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta), u, e, pre_d, F.relu6(pre_d)


def refine_eval_out_scale(args, expand):
    """refine_eval's output with every term taken by its absolute value (fp64): the scale of its rounding."""
    (attn, v, _, _, _, _, w_pro, b_pro, alpha, beta), _, _, _, d = _refine_eval_maps(args, expand)
    col = lambda t: t[:, None, None]  # noqa: E731
    r = col(alpha.abs()) * (attn.abs() + R.head_mix(d.abs(), w_pro.abs()) + col(b_pro.abs())) + col(beta.abs())
    return (r @ v.abs()).detach()


def refine_eval_weight_sum_scales(args, gout, expand):
    """{name: the sums of the |terms| (fp64)} of refine_eval's parameter gradients, each a sum over every
    pixel of (a gradient map) x (a map): the scale of their rounding in fp32, which cancellation can
    leave far above the gradient itself (the long profile found a grad w_pro of 0.014 from terms of
    ~1, 2.4e-6 off, and a grad w_dw of 4e-4, 7e-7 off)."""
    (attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta), u, e, pre_d, d = _refine_eval_maps(args, expand)
    col = lambda t: t[:, None, None]  # noqa: E731
    x = attn + R.head_mix(d, w_pro) + col(b_pro)
    r = col(alpha) * x + col(beta)
    g_r, g_pre = torch.autograd.grad(r @ v, (r, pre_d), gout.double(), retain_graph=True)
    pix = (0, 2, 3)
    g_x = col(alpha) * g_r
    scales = {"w_pro": torch.einsum("bhyx,bcyx->hc", g_x.abs(), d.abs()), "b_pro": g_x.abs().sum(pix),
              "alpha": (g_r * x).abs().sum(pix), "beta": g_r.abs().sum(pix),
              "w_dw": torch.nn.grad.conv2d_weight(e.abs(), w_dw.unsqueeze(1).shape, g_pre.abs(),
                                                  padding=w_dw.shape[-1] // 2, groups=e.shape[1]).squeeze(1),
              "b_dw": g_pre.abs().sum(pix)}
    if expand:  # the gradient of u = w_exp A + b_exp: dw's transpose of g_pre, gated by relu6'(u)
        g_e = torch.nn.grad.conv2d_input(e.shape, w_dw.unsqueeze(1), g_pre, padding=w_dw.shape[-1] // 2,
                                         groups=e.shape[1])
        g_u = torch.where((u > 0) & (u < 6), g_e, 0.0)
        scales["w_exp"] = torch.einsum("bcyx,bhyx->ch", g_u.abs(), attn.abs())
        scales["b_exp"] = g_u.abs().sum(pix)
    return {n: t.detach() for n, t in scales.items()}


def check_tensor_core_refine_backward(run, monkeypatch, args, gout, expand):
    """The compiled refine_eval backward's tensor-core gradient kernel (csrc/cuda/refine_eval_bwd_tc.cuh,
    H <= 16) against fp64 and next to the CUDA-core kernel (REFINER_CUDA_TENSOR_CORES=0);
    `run(gout, args)` calls refine_eval_backward. Every product is 3xTF32 and every accumulation fp32
    whatever the input type, as in the CUDA-core kernel: fp32 gradients within the fp32 tolerance of
    fp64 (1e-4 relative, 5e-5 of the scale; over 120 random emulator shapes the worst relative
    2-norm error was 1.1e-6, the CUDA-core kernel's 1.7e-6) and within 2e-5 of the scale of the
    CUDA-core kernel's; fp16/bf16 gradients within the half tolerance of fp64 and one rounding of the
    half type (2^-10 / 2^-7 of the scale) of the CUDA-core kernel's. Use relu6-safe (dyadic) inputs
    where shapes are random: both kernels gate on fp32 pre-activations computed in different orders.
    Returns (tensor-core gradients, CUDA-core gradients)."""
    from test_compiled_ops import assert_close  # here: test_compiled_ops imports this module
    a64 = [t.double().requires_grad_() for t in args]
    R.refine_eval(*a64, expand).backward(gout.double())
    off, on = _switch_off_then_on(run, monkeypatch, gout, args)
    dtype = args[0].dtype
    tol, near = {torch.float16: ((4e-3, 4e-3), 2 ** -10), torch.bfloat16: ((3e-2, 3e-2), 2 ** -7)}.get(
        dtype, ((1e-4, 5e-5), 2e-5))
    for name, g_on, g_off, t in zip(REFINE_NAMES, on, off, a64):
        assert g_on.dtype == dtype and g_on.shape == t.shape, name
        if t.grad is None:  # w_exp, b_exp without expansion: zero
            assert g_on.abs().max() == 0 and g_off.abs().max() == 0, name
            continue
        assert_close(g_on, t.grad, *tol, f"grad {name}")
        assert_close(g_on, g_off, near, near, f"grad {name} vs the CUDA-core kernel")
    return on, off


def check_tensor_core_softmax(run, monkeypatch, args, s):
    """The compiled softmax block's tensor-core forward (csrc/cuda/softmax_block_tc.cuh) against fp64
    and next to the CUDA-core kernel (REFINER_CUDA_TENSOR_CORES=0); `run(args, s)` calls the op on
    args = (q, k, v, prev or None). fp16/bf16: the operands (the inputs, the stored attn) are exact
    in TF32 and the products accumulate in fp32, so only the summation order differs from the
    CUDA-core kernel: attn and out may differ from it by one unit in the last place of the half type,
    which is up to 2^-10 / 2^-7 of the larger of the two values: held to twice that of the CUDA-core
    kernel's value (an element of attn rounded up across a power of two failed the single bound,
    H200) and to the half tolerance of fp64. fp32 (3xTF32): within
    1e-5 of fp64 and 4e-6 of the CUDA-core kernel, relative to the scale (measured: up to 1.2e-6
    from fp64, 1.6x the CUDA-core kernel's error in 2-norm)."""
    from test_compiled_ops import assert_close  # here: test_compiled_ops imports this module
    (out32, attn32), (out, attn) = _switch_off_then_on(run, monkeypatch, args, s)
    r_out, r_attn = R.softmax_block(*(t.double() if t is not None else None for t in args), s)
    dtype = args[0].dtype
    tol, near = {torch.float16: (4e-3, 2 ** -10), torch.bfloat16: (3e-2, 2 ** -7)}.get(dtype, (1e-5, 4e-6))
    assert out.dtype == attn.dtype == dtype
    assert_close(attn, r_attn, tol, tol, "attn")
    assert_close(out, r_out, tol, tol, "out")
    ulp = near if dtype == torch.float32 else 2 * near
    assert_close(attn, attn32, ulp, near if dtype == torch.float32 else 0, "attn vs the CUDA-core kernel")
    assert_close(out, out32, ulp, near, "out vs the CUDA-core kernel")
