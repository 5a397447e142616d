"""Bad input gets a clear Python exception naming the argument, on every backend."""
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


def test_model_bad_images():
    from refiner.models import RefinerViT
    m = RefinerViT(img_size=32, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(3, 32, 32))
