"""Refiner-ViT models: sizes, state-dict layout, timm registration and interface, MixToken,
resolutions, gradient checkpointing, layer-wise lr decay."""
import copy
from unittest import mock

import numpy as np
import pytest
import timm
import torch

import refiner  # noqa: F401  (registers the models with timm)
from refiner import models
from refiner.models import RefinerViT, mixtoken_box


def tiny(**kw):
    args = dict(img_size=32, patch_size=16, embed_dim=24, depth=4, num_heads=4, num_classes=5)
    args.update(kw)
    return RefinerViT(**args)


@pytest.mark.parametrize("name,millions", [("refiner_vit_s", 25.02), ("refiner_vit_m", 55.03),
                                           ("refiner_vit_l", 80.64)])
def test_parameter_counts_without_dense_head(name, millions):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_released_state_dict_layout():
    keys = set(timm.create_model("refiner_vit_s", return_dense=True).state_dict())
    for k in ["cls_token", "pos_embed", "norm.weight", "head.weight", "aux_head.weight",
              "patch_embed.conv1.weight", "patch_embed.bn1.running_var", "patch_embed.conv3.weight",
              "patch_embed.proj.bias", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
              "blocks.1.attn.DLA.conv_exp.weight", "blocks.1.attn.DLA.bn1.running_mean",
              "blocks.1.attn.DLA.depth_sep_conv.weight", "blocks.1.attn.DLA.bn2.weight",
              "blocks.1.attn.DLA.conv_pro.weight", "blocks.1.attn.DLA.bn3.bias",
              "blocks.1.attn.adapt_bn.num_batches_tracked", "blocks.15.mlp.scale_channel",
              "blocks.3.mlp.fc1.weight", "blocks.3.norm2.bias"]:
        assert k in keys, k
    assert not any(k.startswith("blocks.0.attn.DLA") or k.startswith("blocks.0.attn.adapt_bn") for k in keys)
    sd = timm.create_model("refiner_vit_s").state_dict()
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)  # softmax block: q, k, v
    assert sd["blocks.1.attn.qkv.weight"].shape == (384, 384)      # refine block: v only
    assert sd["blocks.1.attn.DLA.conv_exp.weight"].shape == (36, 12, 1, 1)
    assert sd["blocks.1.attn.DLA.depth_sep_conv.weight"].shape == (36, 1, 3, 3)
    assert sd["blocks.1.attn.DLA.conv_pro.weight"].shape == (12, 36, 1, 1)


def test_timm_create_model_kwargs():
    m = timm.create_model("refiner_vit_s", img_size=64, num_classes=7, drop_path_rate=0.1,
                          return_dense=True, mix_token=True)
    assert m.head.out_features == 7 and m.aux_head.out_features == 7
    assert m.pos_embed.shape == (1, 17, 384)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in m.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.1, 16), rtol=1e-6)
    assert m.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_state_dict_round_trip_is_exact():
    a, b = tiny(return_dense=True), tiny(return_dense=True)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))


def test_forward_at_384_px_interpolates_nothing_and_runs():
    m = timm.create_model("refiner_vit_s", img_size=384, num_classes=10).eval()
    assert m.pos_embed.shape[1] == 577
    with torch.no_grad():
        out = m(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_dynamic_resolution_resamples_position_embedding():
    m = tiny().eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 48, 48))  # 3x3 grid against a 2x2 position embedding
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match="x"):
        tiny(dynamic_img_size=False)(torch.randn(1, 3, 48, 48))


def test_mixtoken_keeps_shapes_and_is_off_in_eval():
    m = tiny(img_size=64, return_dense=True, mix_token=True)
    m.seed_mixtoken(0)
    x = torch.randn(4, 3, 64, 64)
    cls, dense, box = m.train()(x)
    assert cls.shape == (4, 5) and dense.shape == (4, 16, 5) and len(box) == 4
    m.eval()
    out = m(x)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 5)
    # Eval logits: class head + 0.5 * max over tokens of the dense head, no mixing.
    feats = m.forward_features(x)
    torch.testing.assert_close(out, m.head(feats[:, 0]) + 0.5 * m.aux_head(feats[:, 1:]).max(1)[0])


def test_mixtoken_box_mixes_the_flipped_batch_and_unmixes_dense_logits():
    m = tiny(img_size=64, return_dense=True, mix_token=True, depth=2)
    # Make the model a per-token identity-ish map so mixing is visible: zero all blocks' output.
    with torch.no_grad():
        for b in m.blocks:
            b.attn.proj.weight.zero_(), b.attn.proj.bias.zero_(), b.mlp.scale_channel.zero_()
        m.pos_embed.zero_()
    m.train()
    m.seed_mixtoken(3)
    x = torch.randn(2, 3, 64, 64)
    _, dense, (x1, y1, x2, y2) = m(x)
    # Unmixed dense logits equal those of the unmixed forward pass (stem BN is in train mode in both).
    m.mix_token = False
    _, plain, _ = m(x)
    torch.testing.assert_close(dense, plain, rtol=1e-5, atol=1e-5)


def test_mixtoken_box_rule():
    rng = np.random.default_rng(0)
    for lam in [0.0, 0.3, 0.9, 1.0]:
        x1, y1, x2, y2 = mixtoken_box(14, 14, lam, rng)
        assert 0 <= x1 <= x2 <= 14 and 0 <= y1 <= y2 <= 14
        assert x2 - x1 <= int(14 * np.sqrt(1 - lam)) and y2 - y1 <= int(14 * np.sqrt(1 - lam))


def test_mix_token_needs_dense_head():
    with pytest.raises(ValueError, match="return_dense"):
        tiny(mix_token=True)


def test_attention_maps_passed_on_alternate_between_kinds():
    m = tiny().eval()
    with torch.no_grad():
        _, maps = m.forward_features(torch.randn(1, 3, 32, 32), return_attn=True)
    assert len(maps) == 4 and maps[1] is maps[0] and maps[3] is maps[2]
    assert maps[0].shape == (1, 4, 5, 5)


@pytest.mark.parametrize("dense", [False, True])
def test_timm_forward_features_then_head_is_forward(dense):
    # timm's generic code (feature extraction, pre-logits embeddings) calls these two in a row
    torch.manual_seed(0)
    m = tiny(return_dense=dense, mix_token=dense).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out, feats = m(x), m.forward_features(x)
        torch.testing.assert_close(m.forward_head(feats), out, rtol=0, atol=0)
        pre = m.forward_head(feats, pre_logits=True)
    assert feats.shape == (3, 5, 24)
    torch.testing.assert_close(pre, feats[:, 0], rtol=0, atol=0)
    if not dense:  # the logits are the head of the pre-logits features
        torch.testing.assert_close(m.head(pre), out, rtol=0, atol=0)
    else:  # training: the pair of heads, no MixToken in forward_features
        m.train()
        cls, aux = m.forward_head(feats)
        assert cls.shape == (3, 5) and aux.shape == (3, 4, 5)


@pytest.mark.parametrize("dense", [False, True])
def test_no_classes_gives_the_class_token_features(dense):
    # timm's num_classes=0 / reset_classifier(0): forward returns the pooled (class-token) features
    torch.manual_seed(0)
    m = tiny(return_dense=dense).eval()
    x = torch.randn(2, 3, 32, 32)
    m.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.forward_features(x)[:, 0], rtol=0, atol=0)
    assert m(x).shape == (2, 24) and isinstance(m.get_classifier(), torch.nn.Identity)
    m.train()
    assert m(x).shape == (2, 24)  # no dense head without classes, in training too
    m.reset_classifier(7, global_pool="token")
    assert m.eval()(x).shape == (2, 7)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(7, global_pool="max")
    with pytest.raises(ValueError, match="global_pool"):
        tiny(global_pool="")
    backbone = timm.create_model("refiner_vit_s", img_size=32, depth=2, num_classes=0).eval()
    with torch.no_grad():
        assert backbone(x).shape == (2, 384)


def test_average_pooling_feeds_the_mean_patch_token():
    # global_pool="avg" (timm's ViT option): the class head sees the mean of the patch tokens
    torch.manual_seed(0)
    m = timm.create_model("refiner_vit_s", img_size=32, depth=2, num_classes=6, global_pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.forward_features(x)
        torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1), rtol=0, atol=0)
        torch.testing.assert_close(m(x), m.head(feats[:, 1:].mean(1)), rtol=0, atol=0)
        m.reset_classifier(0, global_pool="token")
        torch.testing.assert_close(m(x), feats[:, 0], rtol=0, atol=0)


def test_set_input_size_resamples_the_position_embedding_once():
    # timm's set_input_size: the model's own resolution, the same numbers as resampling per call
    torch.manual_seed(0)
    m = tiny(depth=2, dynamic_img_size=False).eval()
    dyn = copy.deepcopy(m)
    dyn.dynamic_img_size = True
    x = torch.randn(2, 3, 64, 48)
    with pytest.raises(ValueError, match="px image"):
        m(x)
    m.set_input_size((64, 48))
    assert m.pos_embed.shape == (1, 1 + 4 * 3, 24) and m.patch_embed.grid_size == (4, 3)
    with torch.no_grad():
        torch.testing.assert_close(m(x), dyn(x), rtol=0, atol=0)
    again = tiny(depth=2, img_size=(64, 48))
    again.load_state_dict(m.state_dict())  # the layout of a model built at that size
    m.set_input_size(32)  # and back: the class token's row is kept, the grid resampled
    torch.testing.assert_close(m.pos_embed[:, 0], dyn.pos_embed[:, 0], rtol=0, atol=0)
    assert m.pos_embed.shape == dyn.pos_embed.shape and m.pos_embed.requires_grad
    for bad in (0, 8, (64,), 64.0, "64", (64, 48, 3)):
        with pytest.raises(ValueError, match="img_size"):
            m.set_input_size(bad)
    with pytest.raises(ValueError, match="patch_size"):
        m.set_input_size(64, patch_size=8)
    with pytest.raises(ValueError, match="img_size"):
        tiny(img_size=8)


def test_forward_returns_the_maps_it_used():
    # forward(x, return_attn=True) (the training loop's --cos-reg): the same outputs, MixToken
    # included, and the maps of that very pass
    torch.manual_seed(0)
    m = tiny(return_dense=True, mix_token=True).train()
    x = torch.randn(4, 3, 32, 32)
    m.seed_mixtoken(5)
    torch.manual_seed(1)
    cls, aux, box = m(x)
    m.seed_mixtoken(5)
    torch.manual_seed(1)
    (cls2, aux2, box2), maps = m(x, return_attn=True)
    assert box2 == box and len(maps) == 4 and maps[0].shape == (4, 4, 5, 5)
    torch.testing.assert_close(cls2, cls, rtol=0, atol=0)
    torch.testing.assert_close(aux2, aux, rtol=0, atol=0)


def _grad_step(model, x, seed=1):
    """Forward (same random draws: drop path, MixToken) and backward of a loss on every output."""
    torch.manual_seed(seed)
    model.seed_mixtoken(seed)
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else out[0] + out[1].mean(1)
    out.square().sum().backward()
    return out.detach()


@pytest.mark.parametrize("kw", [dict(drop_path_rate=0.2), dict(return_dense=True, mix_token=True, drop_rate=0.1)],
                         ids=["drop_path", "mixtoken_dropout"])
def test_grad_checkpointing_step_is_the_plain_step(kw):
    # Recomputing the blocks in the backward must change nothing a step produces: outputs, every
    # gradient, and the BatchNorm running statistics (the recompute runs the blocks' BNs in training
    # mode a second time; their buffers are put back) -- bit for bit, over two steps.
    torch.manual_seed(0)
    plain = tiny(**kw).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x = torch.randn(3, 3, 32, 32)
    for step in range(2):
        for m in (plain, ckpt):
            m.zero_grad(set_to_none=True)
        torch.testing.assert_close(_grad_step(ckpt, x, step), _grad_step(plain, x, step), rtol=0, atol=0)
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=lambda m: f"step {step}, {name}: {m}")
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    counts = {n: b.item() for n, b in ckpt.named_buffers() if n.endswith("num_batches_tracked")}
    assert any(".attn." in n for n in counts) and set(counts.values()) == {2}, counts


def test_grad_checkpointing_lowers_training_memory():
    # What the switch is for: the blocks' activations are not kept for the backward. Peak CPU
    # allocator bytes of a forward + backward (profiler memory events), depth 8 at N = 65.
    from benchmarks.common import peak_memory
    torch.manual_seed(0)
    plain = tiny(img_size=64, patch_size=8, depth=8, embed_dim=48).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x = torch.randn(4, 3, 64, 64)
    peaks = [peak_memory(lambda m=m: _grad_step(m, x), torch.device("cpu"))[0] for m in (plain, ckpt)]
    assert peaks[1] < 0.6 * peaks[0], peaks


def test_grad_checkpointing_is_off_without_gradients():
    # No autograd graph, nothing to recompute: inference takes the plain loop (no checkpoint call).
    model = tiny().eval()
    model.set_grad_checkpointing()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), mock.patch.object(models, "checkpoint", side_effect=AssertionError("checkpointed")):
        out = model(x)
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_layer_decay_gives_each_block_its_own_rate():
    # timm's layer-wise lr decay reads group_matcher: stem < block 0 < ... < block depth-1 < head, the
    # final norm with the last block (as timm's ViT). Without it, timm falls back to one rate per child.
    from timm.optim import create_optimizer_v2
    model = tiny(depth=4)
    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale_of[p] = g["lr_scale"]
    named = dict(model.named_parameters())
    assert scale_of[named["pos_embed"]] == scale_of[named["patch_embed.conv1.weight"]] == 0.5 ** 5
    for i in range(4):
        assert scale_of[named[f"blocks.{i}.attn.proj.weight"]] == 0.5 ** (4 - i)
    assert scale_of[named["blocks.1.attn.DLA.conv_exp.weight"]] == 0.5 ** 3
    assert scale_of[named["norm.weight"]] == 0.5 and scale_of[named["head.weight"]] == 1.0


def test_forward_intermediates_are_the_blocks_outputs():
    # timm's feature API: the tokens after the chosen blocks, as maps or token lists, prefix apart
    torch.manual_seed(0)
    model = tiny(img_size=64, depth=4).eval()
    x = torch.randn(2, 3, 64, 64)
    tokens = []
    with torch.no_grad():
        hooks = [blk.register_forward_hook(lambda m, i, o: tokens.append(o[0])) for blk in model.blocks]
        feats = model.forward_features(x)
        for hk in hooks:
            hk.remove()
        final, nlc = model.forward_intermediates(x, output_fmt="NLC")
        nchw = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True,
                                            return_prefix_tokens=True, norm=True)
    assert len(nlc) == 4
    torch.testing.assert_close(final, feats, rtol=0, atol=0)
    for i in range(4):
        torch.testing.assert_close(nlc[i], tokens[i][:, 1:], rtol=0, atol=0)
    assert [t.shape for t in nchw] == [(2, 24, 4, 4)] * 2
    for t, i in zip(nchw, [0, 2]):  # (B, C, h, w): row-major patch order, as the tokens
        torch.testing.assert_close(t.flatten(2).transpose(1, 2), nlc[i], rtol=0, atol=0)
    (m2, cls2), (m3, cls3) = early  # the last two blocks, normed, with their class tokens
    torch.testing.assert_close(cls3, model.norm(tokens[3])[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(m2.flatten(2).transpose(1, 2), model.norm(tokens[2])[:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    last = model.forward_intermediates(x, indices=[-1], intermediates_only=True, output_fmt="NLC")
    torch.testing.assert_close(last[0], nlc[3], rtol=0, atol=0)
    for bad in (0, 5, [4], [-5], []):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=bad)


@pytest.mark.parametrize("fused", [False, True])
def test_features_only_backbone(fused):
    # timm.create_model(..., features_only=True): the chosen blocks' maps, the blocks after them pruned
    kw = dict(img_size=64, depth=6, pretrained=False)
    torch.manual_seed(0)
    backbone = timm.create_model("refiner_vit_s", features_only=True, out_indices=(1, 3), fused=fused, **kw).eval()
    assert backbone.feature_info.channels() == [384, 384] and backbone.feature_info.reduction() == [16, 16]
    full = timm.create_model("refiner_vit_s", **kw).eval()
    full.load_state_dict(backbone.model.state_dict(), strict=False)  # the pruned model's weights
    assert len(backbone.model.blocks) == 4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = backbone(x)
        want = full.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [m.shape for m in maps] == [(1, 384, 4, 4)] * 2
    for m, w in zip(maps, want):
        torch.testing.assert_close(m, w, rtol=1e-4, atol=1e-5)
