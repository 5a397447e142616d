"""Bad input gets a clear Python exception naming the argument, on every backend."""
import copy

import pytest
import torch

from refiner import fused, ops, reference
from backends import DEVICE, backend_params
from utils import random_attn, random_dla

BACKENDS = backend_params()


def qkv(B=2, H=3, N=9, d=8, dtype=torch.float32):
    return [torch.randn(B, H, N, d, dtype=dtype, device=DEVICE) for _ in range(3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_block_bad_shapes_dtypes_and_devices(backend):
    q, k, v = qkv()
    cases = [
        ((q[0], k, v), "q", ValueError),
        ((q, k[:, :2], v), "k", ValueError),
        ((q, k, v[..., :4]), "v", ValueError),
        ((q, k, v.half()), "v", TypeError),
        ((q, k, v.int()), "v", TypeError),
        ((q, k, v, torch.zeros(2, 3, 9, 8, device=DEVICE)), "prev_attn", ValueError),
        ((q, k, v, torch.zeros(2, 4, 9, 9, device=DEVICE)), "prev_attn", ValueError),
        ((q, k, [1.0]), "v", TypeError),
    ]
    for args, name, exc in cases:
        with pytest.raises(exc, match=name):
            ops.softmax_block(*args, backend=backend)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="scale"):
            ops.softmax_block(q, k, v, None, bad, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-mix check needs a CUDA device")
def test_device_mix_is_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k"):
        ops.softmax_block(q, k.cpu(), v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_eval_bad_shapes(backend):
    H = 4
    dla, abn = random_dla(H, 3, 3, device=DEVICE)
    dla.eval(), abn.eval()
    folded = reference.fold_refine(dla, abn, 0.5)
    a = random_attn(2, H, 9, device=DEVICE)
    v = torch.randn(2, H, 9, 8, device=DEVICE)
    with pytest.raises(ValueError, match="attn"):
        ops.refine_eval(a[..., :5], v, folded, backend=backend)
    with pytest.raises(ValueError, match="v"):
        ops.refine_eval(a, v[:, :2], folded, backend=backend)
    wrong_heads = reference.fold_refine(*random_dla(5, 3, 3, device=DEVICE), 0.5)
    with pytest.raises(ValueError, match="w_exp"):
        ops.refine_eval(a, v, wrong_heads, backend=backend)
    even = reference.FoldedRefine(*(list(folded.args()[:2]) + [folded.w_dw[:, :2, :2]] + list(folded.args()[3:])))
    with pytest.raises(ValueError, match="w_dw"):
        ops.refine_eval(a, v, even, backend=backend)


def test_non_finite_bn_parameters_are_rejected_when_folding():
    layer = fused.RefinerAttention(32, 4, qkv_bias=True, share_atten=True, backend="reference").eval()
    with torch.no_grad():
        layer.DLA.bn2.running_var[1] = float("nan")
    x, a = torch.randn(1, 9, 32), random_attn(1, 4, 9)
    with pytest.raises(ValueError, match="DLA.bn2.running_var"):
        layer(x, a)
    with torch.no_grad():
        layer.DLA.bn2.running_var.fill_(1.0)
        layer.adapt_bn.weight[0] = float("inf")
    with pytest.raises(ValueError, match="adapt_bn.weight"):
        layer(x, a)


def test_fused_layer_bad_inputs():
    layer = fused.RefinerAttention(32, 4, qkv_bias=True, backend="reference")
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(2, 9, 31))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(9, 32))
    with pytest.raises(ValueError, match="prev_attn"):
        layer(torch.randn(2, 9, 32), torch.randn(2, 4, 9, 8))
    with pytest.raises(ValueError, match="dim"):
        fused.RefinerAttention(30, 4)


def test_unknown_backend_is_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend"):
        ops.softmax_block(q, k, v, backend="fastest")


def test_unusable_backend_says_why():
    status = ops.available_backends("cpu")
    q, k, v = [t.cpu() for t in qkv()]
    with pytest.raises(RuntimeError, match="backend: 'cuda'"):
        ops.softmax_block(q, k, v, backend="cuda")
    assert status["cuda"] != "ok"


@pytest.mark.skipif(ops.available_backends(DEVICE)["triton"] != "ok", reason="triton backend not usable here")
def test_float64_is_never_computed_in_float32_by_triton():
    # The Triton kernels compute in float32: asked for float64 by name they refuse, and "auto" passes
    # over them (CPU: the CPU kernels' float64 instances; GPU: the reference, as the CUDA kernels take
    # no float64). Called directly, the kernel package refuses too.
    import refiner_kernels
    q, k, v = [t.double() for t in qkv()]
    with pytest.raises(RuntimeError, match="backend: 'triton'.*float64"):
        ops.softmax_block(q, k, v, backend="triton")
    if ops.available_backends("cuda")["cuda"] == "ok":  # an extension built with CUDA: no GPU needed
        with pytest.raises(RuntimeError, match="backend: 'cuda' is not usable for torch.float64"):
            ops.resolve_backend("cuda", torch.device("cuda"), "softmax_block", torch.float64)
        assert ops.resolve_backend("auto", torch.device("cuda"), "softmax_block", torch.float64) is reference
    assert ops.resolve_backend("auto", q.device, "softmax_block", torch.float64) is not refiner_kernels
    out, attn = ops.softmax_block(q, k, v)
    assert out.dtype == attn.dtype == torch.float64
    torch.testing.assert_close(out, reference.softmax_block(q, k, v, None, 8 ** -0.5)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="refiner_triton: torch.float64"):
        refiner_kernels.softmax_block(q, k, v, None, 0.5)


def test_model_bad_images():
    from refiner.models import RefinerViT
    m = RefinerViT(img_size=32, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(3, 32, 32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_or_is_right(backend):
    # A gradient of a gradient (create_graph=True, e.g. a gradient penalty): the fused ops have none,
    # and must raise rather than hand back zeros (torch's fallback for an op without a derivative
    # only warns); the reference differentiates twice, as torch does.
    torch.manual_seed(0)
    H, N = 2, 6
    dla, abn = random_dla(H)
    dla, abn = dla.to(DEVICE), abn.to(DEVICE)
    q, k, v = [t.requires_grad_() for t in qkv(1, H, N, 4)]
    attn = random_attn(1, H, N, device=DEVICE).requires_grad_()
    x = torch.randn(1, H, N, N, device=DEVICE, requires_grad=True)
    w, w3 = (torch.randn(s, device=DEVICE) for s in ((3, H), (H, 3, 3)))
    cases = {
        "softmax_block": lambda be: ops.softmax_block(q, k, v, None, 0.5, backend=be)[0],
        "refine_eval": lambda be: ops.refine_block(attn, v, dla.eval(), abn.eval(), 0.5, backend=be),
        "refine_train": lambda be: ops.refine_block(attn, v, dla.train(), abn.train(), 0.5, backend=be),
        "head_mix": lambda be: ops.head_mix(x, w, backend=be),
        "attn_dwconv": lambda be: ops.attn_dwconv(x, w3, backend=be),
        "row_softmax": lambda be: ops.row_softmax(x, backend=be),
        "attn_value": lambda be: ops.attn_value(x, v, backend=be),
    }
    for name, fn in cases.items():
        inputs = [t for t in (q, k, v, attn, x) if t.grad_fn is None]
        first = torch.autograd.grad(fn(backend).square().sum(), inputs, create_graph=True, allow_unused=True)
        penalty = sum(g.square().sum() for g in first if g is not None)
        if backend == "reference":
            assert penalty.requires_grad, name
            continue
        with pytest.raises(RuntimeError, match="backward|autograd"):
            torch.autograd.grad(penalty, inputs, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_batchnorm_modes(backend):
    # The fused refine ops normalise all four BatchNorms one way. Frozen BatchNorms (timm's
    # freeze_batch_norm_2d: FrozenBatchNorm2d, running statistics in training too) run the folded path
    # in a training step and match the reference; a mix of batch- and running-statistics BNs, another
    # eps in training, or a SyncBatchNorm in training (statistics across processes) raises naming the
    # module instead of running one wrong.
    from timm.layers import freeze_batch_norm_2d
    torch.manual_seed(0)
    H, N = 4, 7
    ref = reference.RefinerAttention(16, H, share_atten=True).to(DEVICE)
    dla, abn = random_dla(H)
    ref.DLA.load_state_dict(dla.state_dict()), ref.adapt_bn.load_state_dict(abn.state_dict())
    x = torch.randn(2, N, 16, device=DEVICE)
    prev = random_attn(2, H, N, device=DEVICE)
    frozen = freeze_batch_norm_2d(fused.convert(copy.deepcopy(ref), backend=backend)).train()
    ref_frozen = freeze_batch_norm_2d(copy.deepcopy(ref)).train()
    torch.testing.assert_close(frozen(x, prev)[0], ref_frozen(x, prev)[0], rtol=1e-4, atol=1e-5)
    layer = fused.convert(copy.deepcopy(ref), backend=backend).train()
    layer.DLA.bn2.eval()
    with pytest.raises(ValueError, match="DLA.bn2: running statistics"):
        layer(x, prev)
    layer.eval()
    layer.DLA.bn3.train()
    with pytest.raises(ValueError, match="DLA.bn3: batch statistics"):
        layer(x, prev)
    layer.train()
    layer.DLA.bn1.eps = 1e-3
    with pytest.raises(ValueError, match="DLA.bn1: eps"):
        layer(x, prev)
    layer.DLA.bn1.eps = 1e-5
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(layer)  # DDP's cross-process statistics
    with pytest.raises(ValueError, match="DLA.bn1: a SyncBatchNorm"):
        synced(x, prev)
