"""End-to-end: the training CLI trains, checkpoints, resumes; validate reads the checkpoint."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch

from refiner import train, validate
from test_train_data import TINY_KWARGS, make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model-kwargs"] + [f"{k}={v}" for k, v in TINY_KWARGS.items()] + [
    "--img-size", "32", "--batch-size", "4", "--workers", "0", "--no-amp", "--lr", "1e-3",
    "--warmup-epochs", "0", "--model-ema-decay", "0.9", "--device", "cpu"]


def test_help_subprocess():
    r = subprocess.run([sys.executable, "-m", "refiner.train", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--token-labels" in r.stdout and "--cos-reg" in r.stdout


def test_train_resume_validate(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "data"), classes=3, per_class=4, size=40)
    out = str(tmp_path / "out")
    base = ["-c", os.path.join(ROOT, "configs", "refiner_s.yaml"), "--data", data, "--output", out,
            "--steps-per-epoch", "2"] + TINY
    rows = train.main(base + ["--epochs", "2"])
    assert [r["epoch"] for r in rows] == [0, 1]
    for f in ("last.pth", "best.pth", "summary.csv", "summary.json", "curves.png", "args.yaml"):
        assert os.path.exists(os.path.join(out, f)), f
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=False)
    assert ck["epoch"] == 1 and ck["state_dict_ema"] is not None and ck["metric_source"] in ("model", "ema")
    assert "aux_head.weight" not in ck["state_dict"]
    with open(os.path.join(out, "summary.csv")) as f:
        header = f.readline()
    assert all(k in header for k in ("train_loss", "val_top1", "val_top5", "ema_top1"))
    # resume: the epoch counter continues at 2 and the log keeps the earlier rows
    rows = train.main(base + ["--epochs", "3", "--resume", os.path.join(out, "last.pth"), "--no-plot"])
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert "continuing at epoch 2" in capsys.readouterr().out
    with open(os.path.join(out, "summary.json")) as f:
        assert len(json.load(f)) == 3
    res = validate.main(["--data", os.path.join(data, "val"), "--checkpoint", os.path.join(out, "last.pth"),
                         "--workers", "0", "--use-ema", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" in printed
    assert 0 <= res["top1"] <= 100 and res["top5"] == 100.0  # 3 classes: top-5 covers all
    assert res["images"] == 6


def test_token_labelling_train_validate(tmp_path, capsys):
    """The *_tl config with generated label maps: dense head, MixToken, Mixup, cos-reg (the maps come out
    of checkpointed blocks), layer-wise lr decay."""
    data = make_image_folder(str(tmp_path / "data"), classes=3, per_class=4, size=40,
                             labels_root=str(tmp_path / "labels"))
    out = str(tmp_path / "out")
    rows = train.main(["-c", os.path.join(ROOT, "configs", "refiner_s_tl.yaml"), "--data", data, "--output", out,
                       "--epochs", "1", "--token-labels", str(tmp_path / "labels"), "--cos-reg", "0.1",
                       "--grad-checkpointing", "--layer-decay", "0.75", "--no-plot"] + TINY)
    assert len(rows) == 1 and math.isfinite(rows[0]["train_loss"])
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=False)
    assert "aux_head.weight" in ck["state_dict"]
    res = validate.main(["--data", os.path.join(data, "val"), "--checkpoint", os.path.join(out, "best.pth"),
                         "--workers", "0", "--device", "cpu"])
    assert res["images"] == 6 and "top-1" in capsys.readouterr().out


def test_make_label_maps(tmp_path):
    """Label maps from a (random, offline) timm CNN teacher, in the layout the dataset reads."""
    from refiner import token_labeling
    data = make_image_folder(str(tmp_path / "data"), classes=3, per_class=2, size=40)
    labels = str(tmp_path / "labels")
    token_labeling.main(["--data", os.path.join(data, "train"), "--out", labels, "--teacher", "resnet10t",
                         "--no-pretrained", "--num-classes", "3", "--img-size", "64", "--topk", "3",
                         "--workers", "0", "--device", "cpu"])
    m = torch.load(os.path.join(labels, "class1", "img_0.pt"))
    assert m.dtype == torch.float16 and m.shape == (2, 3, 2, 2)
    assert set(m[1].unique().tolist()) <= {0., 1., 2.}
    tf = token_labeling.TokenLabelTransform(32)
    ds = token_labeling.TokenLabelDataset(os.path.join(data, "train"), labels, tf)
    x, (y, lm, meta) = ds[3]
    assert x.shape == (3, 32, 32) and lm.shape == (2, 3, 2, 2) and meta.shape == (11,)
    assert int(y) == 1 and ds.num_classes == 3


def test_train_fused_torchcompile(tmp_path):
    """--fused --torchcompile: the training step runs compiled (the fused ops inside the graph) and
    trains; aot_eager_decomp_partition traces what inductor would without minutes of C++ compiling."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    data = make_image_folder(str(tmp_path / "data"), classes=3, per_class=4, size=40)
    torch._dynamo.reset()
    counters.clear()
    rows = train.main(["-c", os.path.join(ROOT, "configs", "refiner_s.yaml"), "--data", data,
                       "--output", str(tmp_path / "out"), "--steps-per-epoch", "2", "--epochs", "1", "--fused",
                       "--torchcompile", "aot_eager_decomp_partition", "--no-plot", "--no-model-ema"] + TINY)
    torch._dynamo.reset()
    assert len(rows) == 1 and math.isfinite(rows[0]["train_loss"]) and "val_top1" in rows[0]
    assert counters["stats"]["unique_graphs"] >= 1  # something was compiled
    # validate --fused --torchcompile gives the eager accuracy on the same checkpoint
    ck = os.path.join(tmp_path, "out", "last.pth")
    args = ["--data", os.path.join(data, "val"), "--checkpoint", ck, "--workers", "0", "--device", "cpu", "--fused"]
    counters.clear()
    compiled = validate.main(args + ["--torchcompile", "aot_eager_decomp_partition"])
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] >= 1
    assert compiled == validate.main(args)
