"""Reference numerics on hand-checkable cases, and functional ops == modules."""
import math

import pytest
import torch
import torch.nn.functional as F

from refiner import reference as R
from utils import random_attn, random_dla, train_args


def _identity_bn(bn):
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)  # so that sqrt(var + eps) == 1 exactly


def _identity_like_dla(H, r):
    """conv_exp stacks r copies of the heads, depthwise = delta, conv_pro averages the copies."""
    dla = R.DLA(H, r, 3).eval()
    with torch.no_grad():
        dla.conv_exp.weight.copy_(torch.eye(H).repeat(r, 1)[:, :, None, None])
        dla.depth_sep_conv.weight.zero_()
        dla.depth_sep_conv.weight[:, 0, 1, 1] = 1.0
        dla.conv_pro.weight.copy_((torch.eye(H).repeat(1, r) / r)[:, :, None, None])
    for bn in (dla.bn1, dla.bn2, dla.bn3):
        _identity_bn(bn)
    return dla


def test_dla_identity_like_weights_doubles_a_softmax_map():
    # Maps in [0, 1] pass relu6 unchanged, so DLA(x) = x + x.
    x = random_attn(2, 3, 9)
    dla = _identity_like_dla(3, 2)
    torch.testing.assert_close(dla(x), 2 * x, rtol=0, atol=1e-6)


def test_dla_pads_the_expanded_map_with_zeros_not_relu6_of_bias():
    # Ones kernel, BN1 bias 1 on a zero map: E = relu6(0 + 1) = 1 inside the map. The 3x3 sum
    # counts only in-map neighbours: 4 at a corner, 6 on an edge, 9 inside.
    H, N = 1, 5
    dla = _identity_like_dla(H, 2)
    with torch.no_grad():
        dla.bn1.bias.fill_(1.0)
        dla.depth_sep_conv.weight.fill_(1.0)
        dla.bn2.bias.fill_(-6.0)  # relu6(sum - 6): corner 0, edge 0, inside 3
    y = dla(torch.zeros(1, H, N, N))
    expected = torch.zeros(N, N)
    expected[1:-1, 1:-1] = 3.0
    torch.testing.assert_close(y[0, 0], expected)


def test_softmax_block_residual_chain_over_four_softmax_blocks():
    # q = k = 0 -> uniform maps 1/N; A_{l} = P + s * A_{l-1} accumulates a geometric series.
    B, H, N, d = 1, 2, 7, 4
    s = d ** -0.5
    q = torch.zeros(B, H, N, d)
    v = torch.randn(B, H, N, d)
    a = None
    for _ in range(4):
        out, a = R.softmax_block(q, q, v, a, s)
    series = 1 + s + s ** 2 + s ** 3
    torch.testing.assert_close(a, torch.full((B, H, N, N), series / N))
    torch.testing.assert_close(out, a @ v)


def test_softmax_block_scales_q_and_k_by_sqrt_scale():
    q, k, v = torch.randn(3, 2, 3, 5, 8).unbind(0)
    s = 0.37
    out, attn = R.softmax_block(q, k, v, None, s)
    torch.testing.assert_close(attn, (q @ k.transpose(-1, -2) * s).softmax(-1))


def test_module_refine_block_matches_functional_eval_with_folding():
    H, N, d = 4, 10, 6
    dla, abn = random_dla(H, 3, 5)
    layer = R.RefinerAttention(H * d, H, qkv_bias=True, share_atten=True, kernel_size=5).eval()
    layer.DLA.load_state_dict(dla.state_dict())
    layer.adapt_bn.load_state_dict(abn.state_dict())
    x = torch.randn(2, N, H * d)
    a = random_attn(2, H, N)
    out, passed = layer(x, a)
    assert passed is a
    v = layer.qkv(x).reshape(2, N, H, d).permute(0, 2, 1, 3)
    ref = R.refine_eval(a, v, *R.fold_refine(layer.DLA, layer.adapt_bn, layer.scale).args())
    torch.testing.assert_close(out, layer.proj(ref.transpose(1, 2).reshape(2, N, H * d)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", [1, 3])
def test_functional_train_matches_modules_outputs_stats_and_grads(ratio):
    H, N, d = 3, 8, 5
    dla, abn = random_dla(H, ratio, 3)
    dla.train(), abn.train()
    s = d ** -0.5
    a = random_attn(2, H, N).requires_grad_()
    v = torch.randn(2, H, N, d, requires_grad=True)
    before = [b.running_var.clone() for b in (dla.bn2, abn)]
    out_m = (abn(dla(a)) * s) @ v
    out_f, stats = R.refine_train(a, v, *train_args(dla, abn), abn.eps, s, ratio != 1)
    torch.testing.assert_close(out_f, out_m, rtol=1e-5, atol=1e-6)
    # The modules' running-stat update follows from the returned statistics.
    count = 2 * N * N
    for bn, st, old in zip((dla.bn2, abn), stats[1::2], before):
        torch.testing.assert_close(bn.running_var, 0.9 * old + 0.1 * st.var * count / (count - 1))
    g = torch.randn_like(out_m)
    gm = torch.autograd.grad(out_m, [a, v, dla.depth_sep_conv.weight, abn.weight], g)
    gf = torch.autograd.grad(out_f, [a, v, dla.depth_sep_conv.weight, abn.weight], g)
    for x, y in zip(gf, gm):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_update_running_stats_equals_batchnorm():
    x = torch.randn(4, 3, 5, 5)
    bn, mine = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    bn(x)
    R.update_running_stats(mine, R.BNStats(x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)), 4 * 25)
    torch.testing.assert_close(mine.running_mean, bn.running_mean)
    torch.testing.assert_close(mine.running_var, bn.running_var)
    assert int(mine.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def test_building_blocks_match_torch_ops():
    x = torch.randn(2, 3, 7, 7)
    w = torch.randn(5, 3)
    torch.testing.assert_close(R.head_mix(x, w), F.conv2d(x, w[:, :, None, None]), rtol=1e-5, atol=1e-5)
    wd = torch.randn(3, 5, 5)
    ref = F.conv2d(F.pad(x, (2, 2, 2, 2)), wd[:, None], groups=3)
    torch.testing.assert_close(R.attn_dwconv(x, wd), ref, rtol=1e-5, atol=1e-5)


def test_dla_rejects_even_kernel():
    with pytest.raises(ValueError, match="kernel_size"):
        R.DLA(4, 3, 4)


def test_scale_is_head_size_power():
    layer = R.RefinerAttention(420, 12)
    assert layer.head_dim == 35 and math.isclose(layer.scale, 35 ** -0.5)
