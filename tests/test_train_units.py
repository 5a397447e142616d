"""Unit tests of the training pieces: label-map alignment, MixToken, losses, config precedence."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from refiner.cos_reg import attention_cosine, cos_reg_loss, distinct_maps
from refiner.models import RefinerViT, mixtoken_box
from refiner.token_labeling import (DenseMixup, TokenLabelLoss, TokenLabelTransform, crop_label_map,
                                    dense_targets, mixtoken_targets, soft_cross_entropy, topk_to_dense)
from refiner.train import TrainWrapper, scaled_lr, train_step
from refiner.train_config import parse_args
from test_train_data import TINY_KWARGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- label-map alignment

def _onehot_map(h, w):
    """(1, h*w, h, w): class r*w + c at (row r, col c), probability 1."""
    idx = torch.arange(h * w).reshape(1, 1, h, w)
    return torch.zeros(1, h * w, h, w).scatter_(1, idx, 1.0)


def test_roi_crop_picks_region_x_is_column():
    dense = _onehot_map(8, 8)
    # crop columns 4..8 (x) and rows 0..4 (y), 2x downsampled to 2x2: each cell = mean of a 2x2 block
    box = torch.tensor([[0.5, 0.0, 1.0, 0.5]])
    out = crop_label_map(dense, box, (2, 2))[0]  # (64, 2, 2)
    for r in range(2):
        for c in range(2):
            want = torch.zeros(64)
            for dr in range(2):
                for dc in range(2):
                    want[(2 * r + dr) * 8 + 4 + 2 * c + dc] = 0.25
            torch.testing.assert_close(out[:, r, c], want)


def test_roi_full_box_is_identity():
    dense = torch.rand(2, 5, 6, 7)
    out = crop_label_map(dense, torch.tensor([[0., 0., 1., 1.]] * 2), (6, 7))
    torch.testing.assert_close(out, dense)


def test_topk_to_dense_softmax_over_k():
    lm = torch.zeros(1, 2, 3, 1, 1)
    lm[0, 0, :, 0, 0] = torch.tensor([2., 1., 0.])
    lm[0, 1, :, 0, 0] = torch.tensor([4., 0., 2.])
    d = topk_to_dense(lm, 5)[0, :, 0, 0]
    p = torch.tensor([2., 1., 0.]).softmax(0)
    torch.testing.assert_close(d, torch.tensor([p[1], 0., p[2], 0., p[0]]))
    with pytest.raises(ValueError, match="out of range"):
        topk_to_dense(lm, 4)


def _block_image_and_labels(blocks=8, px=8):
    """An image whose (R, C) block of px x px pixels has class id R*blocks + C written in its red
    channel (4 * id) and the matching top-5 label map (top-1 = the block's class)."""
    ids = np.arange(blocks * blocks).reshape(blocks, blocks)
    red = np.kron(ids * 4, np.ones((px, px), dtype=np.int64)).astype(np.uint8)
    img = Image.fromarray(np.stack([red, np.zeros_like(red), np.zeros_like(red)], -1))
    t = torch.from_numpy(ids).float()
    idx = torch.stack([(t + k) % (blocks * blocks) for k in range(5)])
    logits = torch.tensor([10., 0., 0., 0., 0.])[:, None, None].expand(5, blocks, blocks)
    return img, torch.stack([logits, idx]).half()[None]


def _decode_ids(x, grid):
    """Class id at the centre of each grid cell of a normalised (mean=std=0.5) image tensor."""
    g = x.shape[-1] // grid
    red = x[0, g // 2::g, g // 2::g] * 0.5 + 0.5
    return torch.round(red * 255 / 4).long()


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_transform_crop_and_flip_keep_labels_aligned(flip):
    img, label_map = _block_image_and_labels()  # 64 x 64 px, 8 x 8 label map
    tf = TokenLabelTransform(32, hflip=flip, interpolation="nearest", auto_augment=None, re_prob=0.0)
    # rows 16..48, columns 32..48 of the image: label rows 2..6, columns 4..6
    tf.rrc.get_params = lambda im, scale, ratio: (16, 32, 32, 16)
    x, meta = tf(img)
    torch.testing.assert_close(meta, torch.tensor([0.5, 0.25, 0.75, 0.75, flip, 1., 0., 0., 0., 1., 0.]))
    tgt = dense_targets(label_map, meta[None], 64, (4, 4))  # (1, 16, 64)
    got = tgt[0].argmax(-1).reshape(4, 4)
    want = torch.tensor([[(2 + r) * 8 + 4 + c // 2 for c in range(4)] for r in range(4)])
    if flip:
        want = want.flip(-1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_decode_ids(x, 4), want)  # the image agrees with its labels
    torch.testing.assert_close(tgt.sum(-1), torch.ones(1, 16))


@pytest.mark.parametrize("op", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_randaugment_geometry_moves_labels_with_the_image(op):
    """A geometric RandAugment op moves the dense targets as it moves the image: where the target
    is confident (away from block edges) its class is the class the image shows there."""
    from timm.data.auto_augment import AugmentOp
    img, label_map = _block_image_and_labels()  # 64 x 64 px, 8 x 8 blocks
    checked = 0
    for seed in range(4):
        random.seed(seed)
        tf = TokenLabelTransform(64, hflip=0.0, interpolation="nearest", auto_augment="rand-n1-m9", re_prob=0.0)
        tf.rrc.get_params = lambda im, scale, ratio: (0, 0, 64, 64)
        hp = dict(tf.ra.ops[0].hparams, interpolation=Image.NEAREST)
        tf.ra.ops = [AugmentOp(op, prob=1.0, magnitude=9, hparams=hp)]
        tf.ra.ops[0].aug_fn = tf._recording(op, tf.ra.ops[0].aug_fn)
        x, meta = tf(img)
        assert (meta[5:] - torch.tensor([1., 0., 0., 0., 1., 0.])).abs().max() > 0.05
        tgt = dense_targets(label_map, meta[None], 64, (8, 8))[0].reshape(8, 8, 64)
        ids = _decode_ids(x, 8)
        # max weight > 0.6 of a bilinear sample: the source point lies > 0.1 cell inside its block
        conf = tgt.max(-1).values > 0.6
        assert conf.sum() >= 8
        torch.testing.assert_close(tgt.argmax(-1)[conf], ids[conf])
        checked += int(conf.sum())
        # targets that left the image are empty
        assert ((tgt.sum(-1) > 0.99) | (tgt.sum(-1) < 1e-6)).all()
    assert checked >= 60


def test_flip_mirrors_targets():
    _, label_map = _block_image_and_labels()
    meta = torch.tensor([[0.1, 0.2, 0.7, 0.9, 0.0], [0.1, 0.2, 0.7, 0.9, 1.0]])
    t = dense_targets(label_map.expand(2, -1, -1, -1, -1), meta, 64, (3, 3)).reshape(2, 3, 3, 64)
    torch.testing.assert_close(t[1], t[0].flip(1))


def test_transform_random_geometry_runs():
    img, label_map = _block_image_and_labels()
    tf = TokenLabelTransform(32)  # the released recipe: random crop, flip, RandAugment, erasing
    for _ in range(5):
        x, meta = tf(img)
        assert x.shape == (3, 32, 32)
        assert 0 <= meta[0] < meta[2] <= 1 and 0 <= meta[1] < meta[3] <= 1


# --------------------------------------------------------------------------- MixToken and Mixup

def test_mixtoken_targets_hand():
    t = torch.tensor([[1., 0., 0.], [0., 1., 0.], [0., 0., 1.]])
    dense = torch.arange(3 * 4 * 3, dtype=torch.float32).reshape(3, 4, 3)  # B=3, 2x2 grid
    box = (0, 1, 1, 2)  # row 0, column 1: token 1; lam' = 1 - 1/4
    cls, d = mixtoken_targets(t, dense, box, (2, 2))
    torch.testing.assert_close(cls, 0.75 * t + 0.25 * t[[2, 1, 0]])
    assert d is dense  # our model un-mixes its dense logits: dense targets stay
    _, d2 = mixtoken_targets(t, dense, box, (2, 2), dense_unmixed=False)
    want = dense.clone()
    want[:, 1] = dense[[2, 1, 0], 1]
    torch.testing.assert_close(d2, want)
    cls0, _ = mixtoken_targets(t, dense, (0, 0, 0, 0), (2, 2))
    assert cls0 is t


def test_mixtoken_box_rows_then_columns():
    rng = np.random.default_rng(0)
    for lam in (0.1, 0.5, 0.9):
        x1, y1, x2, y2 = mixtoken_box(4, 6, lam, rng)
        assert 0 <= x1 <= x2 <= 4 and 0 <= y1 <= y2 <= 6


def test_model_unmixes_dense_logits_so_targets_need_no_mixing():
    """With no blocks each token's output depends on its own patch only: after the model's
    un-mixing, the dense logits of a MixToken forward equal those of an unmixed forward."""
    kw = dict(img_size=32, patch_size=8, embed_dim=16, depth=0, num_heads=2, num_classes=3, return_dense=True)
    plain = RefinerViT(**kw).train()
    mixed = RefinerViT(**kw, mix_token=True).train()
    mixed.load_state_dict(plain.state_dict())
    mixed.seed_mixtoken(3)
    x = torch.randn(4, 3, 32, 32)
    _, d_plain, _ = plain(x)
    for _ in range(5):
        _, d_mix, box = mixed(x)
        torch.testing.assert_close(d_mix, d_plain)
    assert box != (0, 0, 0, 0)


def test_mixtoken_box_is_rows_x_columns_y():
    """The box (x1, y1, x2, y2) mixes rows x1:x2 and columns y1:y2 of the patch grid in from the
    flipped batch: seen on the aux head's input (before un-mixing) of a block-free model."""
    kw = dict(img_size=32, patch_size=8, embed_dim=16, depth=0, num_heads=2, num_classes=3, return_dense=True)
    plain = RefinerViT(**kw).train()
    mixed = RefinerViT(**kw, mix_token=True).train()
    mixed.load_state_dict(plain.state_dict())
    seen = {}
    plain.aux_head.register_forward_hook(lambda m, i, o: seen.__setitem__("plain", i[0]))
    mixed.aux_head.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed", i[0]))
    x = torch.randn(3, 3, 32, 32)
    plain(x)
    tp = seen["plain"].reshape(3, 4, 4, -1)
    for seed in range(20):
        mixed.seed_mixtoken(seed)
        _, _, (x1, y1, x2, y2) = mixed(x)
        if (x2 - x1) in (0, 4) or (y2 - y1) in (0, 4) or (x2 - x1) == (y2 - y1):
            continue  # want a box that is neither empty, full, nor square (so rows/columns differ)
        want = tp.clone()
        want[:, x1:x2, y1:y2] = tp.flip(0)[:, x1:x2, y1:y2]
        torch.testing.assert_close(seen["mixed"].reshape(3, 4, 4, -1), want)
        cls_t, _ = mixtoken_targets(torch.eye(3), None, (x1, y1, x2, y2), (4, 4))
        lam = 1 - (x2 - x1) * (y2 - y1) / 16
        torch.testing.assert_close(cls_t.diagonal(), torch.full((3,), lam).index_put_((torch.tensor([1]),),
                                                                                     torch.tensor(1.)))
        return
    pytest.fail("no non-square box drawn")


def test_dense_mixup_cutmix_fraction():
    torch.manual_seed(0)
    m = DenseMixup(mixup_alpha=0., cutmix_alpha=1.0, num_classes=3, label_smoothing=0.)
    m.last_box, m.last_lam = (0, 8, 4, 12), 0.9  # rows 0..8, cols 4..12 of a 16x16 image
    dense = torch.rand(2, 4, 3)  # 2x2 grid of 8 px patches
    out = m.mix_dense(dense, (2, 2), (16, 16))
    # token (0,0): half inside; token (0,1): half inside; row 1: outside
    torch.testing.assert_close(out[:, 0], 0.5 * dense[:, 0] + 0.5 * dense.flip(0)[:, 0])
    torch.testing.assert_close(out[:, 1], 0.5 * dense[:, 1] + 0.5 * dense.flip(0)[:, 1])
    torch.testing.assert_close(out[:, 2:], dense[:, 2:])
    m.last_box, m.last_lam = None, 0.7
    torch.testing.assert_close(m.mix_dense(dense, (2, 2), (16, 16)), 0.7 * dense + 0.3 * dense.flip(0))
    x = torch.randn(2, 3, 16, 16)
    x2, t = m(x.clone(), torch.tensor([0, 1]))  # records the box it used
    if m.last_box is not None:
        yl, yh, xl, xh = m.last_box
        torch.testing.assert_close(x2[:, :, yl:yh, xl:xh], x.flip(0)[:, :, yl:yh, xl:xh])


# --------------------------------------------------------------------------- losses

def test_token_label_loss_hand():
    torch.manual_seed(1)
    B, C, h, w = 2, 3, 2, 2
    cls_logits, dense_logits = torch.randn(B, C), torch.randn(B, h * w, C)
    t_cls = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]])
    t_dense = torch.rand(B, h * w, C)
    t_dense /= t_dense.sum(-1, keepdim=True)
    box = (1, 0, 2, 2)  # row 1, both columns: 2 of 4 tokens -> lam' = 0.5
    loss = TokenLabelLoss(dense_weight=0.5)((cls_logits, dense_logits, box), t_cls, t_dense)
    lam = 0.5
    hand_cls = 0.
    for b in range(B):
        tb = lam * t_cls[b] + (1 - lam) * t_cls[B - 1 - b]
        p = torch.exp(cls_logits[b]) / torch.exp(cls_logits[b]).sum()
        hand_cls += -(tb * torch.log(p)).sum() / B
    hand_dense = 0.
    for b in range(B):
        for n in range(h * w):
            p = torch.exp(dense_logits[b, n]) / torch.exp(dense_logits[b, n]).sum()
            hand_dense += -(t_dense[b, n] * torch.log(p)).sum() / (B * h * w)
    torch.testing.assert_close(loss, hand_cls + 0.5 * hand_dense)
    # a model that does not un-mix its dense logits: the box's targets come from the flipped batch
    l3 = TokenLabelLoss(0.5, dense_unmixed=False)((cls_logits, dense_logits, box), t_cls, t_dense)
    t_mixed = t_dense.clone()
    t_mixed[:, 2:] = t_dense.flip(0)[:, 2:]  # row 1 = tokens 2, 3
    torch.testing.assert_close(l3, hand_cls + 0.5 * soft_cross_entropy(dense_logits, t_mixed))
    # without dense targets every token gets the (pre-MixToken) image target
    l2 = TokenLabelLoss(0.5)((cls_logits, dense_logits, (0, 0, 0, 0)), t_cls, None)
    torch.testing.assert_close(l2, soft_cross_entropy(cls_logits, t_cls)
                               + 0.5 * soft_cross_entropy(dense_logits, t_cls[:, None].expand(B, 4, C)))


def test_cos_reg_hand():
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    a[0, 0] = torch.tensor([[1., 0.], [0., 0.]])
    b[0, 0] = torch.tensor([[1., 1.], [0., 0.]])  # cos = 1/sqrt(2)
    a[0, 1] = torch.tensor([[1., 0.], [0., 1.]])
    b[0, 1] = torch.tensor([[0., 1.], [1., 0.]])  # cos = 0
    want = (1 / math.sqrt(2) + 0.) / 2
    torch.testing.assert_close(attention_cosine(a, b), torch.tensor(want))
    torch.testing.assert_close(cos_reg_loss([a, b], 0.1), torch.tensor(0.1 * want))
    # a map passed on unchanged (a refine block) is the same tensor: counted once
    torch.testing.assert_close(cos_reg_loss([a, a, b, b], 0.1), torch.tensor(0.1 * want))
    c = b.clone()
    c[0, 0] = torch.tensor([[0., 0.], [1., 0.]])  # cos(b0, c0) = 0, cos(b1, c1) = 1
    torch.testing.assert_close(cos_reg_loss([a, b, c], 1.0), torch.tensor((want + 0.5) / 2))
    assert float(cos_reg_loss([a], 0.1)) == 0.


def test_cos_reg_on_model_maps_has_gradient():
    model = RefinerViT(img_size=32, num_classes=5, **TINY_KWARGS)
    _, maps = model.forward_features(torch.randn(2, 3, 32, 32), return_attn=True)
    assert len(maps) == 4 and len(distinct_maps(maps)) == 2
    loss = cos_reg_loss(maps, 0.1)
    loss.backward()
    assert model.blocks[2].attn.qkv.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- config

def test_yaml_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"drop_path": 0.3, "lr_base": 1e-3, "epochs": 10, "mixup": 0.5,
                                   "model_kwargs": {"depth": 4}}))
    args, _ = parse_args(["-c", str(cfg)])
    assert (args.drop_path, args.lr_base, args.epochs, args.mixup) == (0.3, 1e-3, 10, 0.5)
    assert args.weight_decay == 0.05 and args.model_kwargs == {"depth": 4}  # default kept where YAML is silent
    # an explicit flag wins, even when it repeats the parser default
    args, _ = parse_args(["-c", str(cfg), "--drop-path", "0.05", "--epochs", "300", "--no-model-ema"])
    assert (args.drop_path, args.epochs, args.lr_base, args.model_ema) == (0.05, 300, 1e-3, False)
    args, _ = parse_args(["--drop-path", "0.2"])  # no YAML: defaults < flags
    assert args.drop_path == 0.2 and args.epochs == 300
    cfg.write_text("drop_pth: 0.1\n")
    with pytest.raises(SystemExit):
        parse_args(["-c", str(cfg)])


@pytest.mark.parametrize("name,model,dp,tl", [
    ("refiner_s", "refiner_vit_s", 0.1, False), ("refiner_s_tl", "refiner_vit_s", 0.2, True),
    ("refiner_m", "refiner_vit_m", 0.2, False), ("refiner_m_tl", "refiner_vit_m", 0.2, True),
    ("refiner_l", "refiner_vit_l", 0.2, False), ("refiner_l_tl", "refiner_vit_l", 0.25, True)])
def test_shipped_configs(name, model, dp, tl):
    args, _ = parse_args(["-c", os.path.join(ROOT, "configs", f"{name}.yaml")])
    assert args.model == model and args.drop_path == dp
    assert (args.opt, args.weight_decay, args.epochs, args.warmup_epochs, args.sched) == ("adamw", 0.05, 300, 5,
                                                                                            "cosine")
    assert (args.mixup, args.cutmix, args.smoothing, args.model_ema_decay) == (0.8, 1.0, 0.1, 0.99996)
    assert (args.aa, args.reprob, args.img_size) == ("rand-m9-mstd0.5-inc1", 0.25, 224)
    assert args.return_dense == tl and args.mix_token == tl and args.dense_weight == 0.5
    assert scaled_lr(args, world=8) == pytest.approx(5e-4 * args.batch_size * 8 / 1024)
    args.batch_size = 64
    assert scaled_lr(args, world=4) == pytest.approx(5e-4 / 4)


# --------------------------------------------------------------------------- training step

def test_loss_goes_down_on_a_fixed_batch():
    torch.manual_seed(0)
    C = 3
    model = RefinerViT(img_size=32, num_classes=C, return_dense=True, mix_token=True, **TINY_KWARGS).train()
    model.seed_mixtoken(0)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    # token labels: the true class at every location, with made-up runner-ups
    lm = torch.zeros(6, 2, 5, 4, 4)
    lm[:, 0] = torch.tensor([4., 1., 0., -1., -2.])[None, :, None, None]
    lm[:, 1] = ((y[:, None] + torch.arange(5)[None]) % C).float()[:, :, None, None]
    meta = torch.tensor([[0., 0., 1., 1., 0.]]).expand(6, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    wrapper = TrainWrapper(model, want_maps=True)
    for _ in range(15):
        losses.append(train_step(wrapper, (x, (y, lm, meta)), optimizer=opt, loss_fn=TokenLabelLoss(0.5),
                                 device=torch.device("cpu"), num_classes=C, cos_reg=0.1, clip_grad=5.0,
                                 token_labels=True, grid=(2, 2)))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_amp_bf16_step_on_cpu():
    from refiner.train import _autocast
    args, _ = parse_args(["--amp"])
    model = RefinerViT(img_size=32, num_classes=3, **TINY_KWARGS).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = train_step(TrainWrapper(model, False), (torch.randn(2, 3, 32, 32), torch.tensor([0, 2])), optimizer=opt,
                      loss_fn=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), num_classes=3,
                      autocast=_autocast(torch.device("cpu"), args), clip_grad=1.0)
    assert math.isfinite(loss)


def test_fused_flag_without_fused_module_exits_clearly(monkeypatch):
    import sys
    from refiner.train import build_model
    monkeypatch.setitem(sys.modules, "refiner.fused", None)  # import refiner.fused -> ImportError
    args, _ = parse_args(["--fused", "--img-size", "32", "--model-kwargs"] +
                         [f"{k}={v}" for k, v in TINY_KWARGS.items()])
    with pytest.raises(SystemExit, match="refiner.fused is not available"):
        build_model(args, 3)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_checkpointing_flag_reaches_the_model(fused):
    from refiner.train import build_model
    argv = (["--fused"] if fused else []) + ["--img-size", "32", "--model-kwargs"] + \
        [f"{k}={v}" for k, v in TINY_KWARGS.items()]
    assert build_model(parse_args(["--grad-checkpointing"] + argv)[0], 3).grad_checkpointing
    assert not build_model(parse_args(argv)[0], 3).grad_checkpointing
