"""refiner.load_checkpoint: formats, wrappers, resolution change and clear errors."""
import pytest
import torch
from safetensors.torch import save_file

import refiner
from refiner.checkpoint import CheckpointError, infer_model_args
from refiner.models import RefinerViT


def tiny(**kw):
    args = dict(img_size=32, patch_size=16, embed_dim=24, depth=4, num_heads=4, num_classes=5)
    args.update(kw)
    return RefinerViT(**args).eval()


def _same(a, b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "module"])
@pytest.mark.parametrize("suffix", [".pth", ".pth.tar"])
def test_pth_plain_and_wrapped(tmp_path, wrap, suffix):
    src = tiny()
    sd = src.state_dict()
    if wrap == "module":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = sd if wrap is None else {wrap: sd, "epoch": 3}
    path = tmp_path / f"ckpt{suffix}"
    torch.save(obj, path)
    _same(refiner.load_checkpoint(path, tiny()), src)


def test_ema_weights_on_request(tmp_path):
    a, b = tiny(), tiny()
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": a.state_dict(), "state_dict_ema": b.state_dict()}, path)
    _same(refiner.load_checkpoint(path, tiny()), a)
    _same(refiner.load_checkpoint(path, tiny(), use_ema=True), b)


def test_safetensors(tmp_path):
    src = tiny(return_dense=True)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    _same(refiner.load_checkpoint(path, tiny(return_dense=True)), src)


def test_model_inferred_from_state_dict(tmp_path):
    src = tiny(return_dense=True)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    model = refiner.load_checkpoint(path)
    assert isinstance(model, RefinerViT) and model.return_dense and model.embed_dim == 24
    _same(model.eval(), src)
    args = infer_model_args(src.state_dict())
    assert (args["depth"], args["num_heads"], args["expand_ratio"], args["kernel_size"]) == (4, 4, 3, 3)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(tiny(return_dense=True).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: \['aux_head.weight', 'aux_head.bias'\]"):
        refiner.load_checkpoint(path, tiny())
    sd = tiny().state_dict()
    del sd["blocks.1.attn.DLA.bn2.running_var"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys: \['blocks.1.attn.DLA.bn2.running_var'\]"):
        refiner.load_checkpoint(path, tiny())


def test_shape_mismatch_is_named(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(tiny(num_classes=9).state_dict(), path)
    with pytest.raises(CheckpointError, match="head.weight"):
        refiner.load_checkpoint(path, tiny())


def test_position_embedding_resampled_for_higher_resolution(tmp_path):
    src = tiny()
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    big = refiner.load_checkpoint(path, tiny(img_size=64))
    assert big.pos_embed.shape == (1, 17, 24)
    torch.testing.assert_close(big.pos_embed[:, 0], src.pos_embed[:, 0])
    # align_corners=True keeps the grid's corner embeddings.
    g_src = src.pos_embed[0, 1:].reshape(2, 2, 24)
    g_big = big.pos_embed[0, 1:].reshape(4, 4, 24)
    torch.testing.assert_close(g_big[0, 0], g_src[0, 0])
    torch.testing.assert_close(g_big[-1, -1], g_src[-1, -1])


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(tiny().state_dict(), good)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="path"):
        refiner.load_checkpoint(trunc, tiny())
    foreign = tmp_path / "notes.pth"
    foreign.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="path"):
        refiner.load_checkpoint(foreign, tiny())
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="path"):
        refiner.load_checkpoint(bad_st, tiny())
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        refiner.load_checkpoint(tmp_path / "meta.pth", tiny())
    with pytest.raises(FileNotFoundError, match="path"):
        refiner.load_checkpoint(tmp_path / "absent.pth", tiny())
