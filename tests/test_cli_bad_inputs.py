"""Every command-line entry point turns bad input into a clear error naming the flag.

Each case calls a script's ``main(argv)`` in-process and must fail before any real training,
label generation or benchmark starts: argparse errors are ``SystemExit(2)`` with the message
on stderr, checks that need the data or the model are ``SystemExit("<flag> ...")``, and a
library call given a bad value raises its own exception (named in the case).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_cpu_ops, bench_models, bench_ops, plot  # noqa: E402
from refiner import demo, token_labeling, train, validate  # noqa: E402
from refiner.models import RefinerViT  # noqa: E402
from refiner.train_config import parse_args  # noqa: E402
from test_train_data import TINY_KWARGS, make_image_folder  # noqa: E402

MAINS = {"train": train.main, "validate": validate.main, "token_labeling": token_labeling.main,
         "demo": demo.main, "bench_ops": bench_ops.main, "bench_models": bench_models.main, "plot": plot.main,
         "bench_cpu_ops": bench_cpu_ops.main}
USAGE, EXIT = "usage", "exit"  # SystemExit(2) from argparse / SystemExit(message) from a later check
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    data = make_image_folder(str(d / "data"), classes=3, per_class=2, size=32, labels_root=str(d / "labels"))
    torch.manual_seed(0)
    sd = RefinerViT(img_size=32, num_classes=3, **TINY_KWARGS).state_dict()
    torch.save({"state_dict": sd, "state_dict_ema": None, "model": "refiner_vit_s", "num_classes": 3,
                "args": {"model_kwargs": TINY_KWARGS, "img_size": 32}}, d / "ck.pth")
    sd2 = RefinerViT(img_size=32, num_classes=2, **TINY_KWARGS).state_dict()
    torch.save({"state_dict": sd2, "model": "refiner_vit_s", "num_classes": 2,
                "args": {"model_kwargs": TINY_KWARGS, "img_size": 32}}, d / "ck2.pth")
    torch.save(sd, d / "sd.pth")
    torch.save([1, 2, 3], d / "list.pth")
    (d / "garbage.pth").write_text("not a checkpoint")
    texts = {"list.yaml": "- a\n- b\n", "scalar.yaml": "3\n", "broken.yaml": "a: [1, 2\n",
             "unknown.yaml": "drop_pth: 0.1\n", "epochs_str.yaml": "epochs: ten\n",
             "batch_neg.yaml": "batch_size: -4\n", "epochs_float.yaml": "epochs: 2.5\n",
             "kwargs.yaml": "model_kwargs: 3\n", "amp_str.yaml": "amp: 'yes'\n", "model.yaml": "model: nope_vit\n",
             "sched.yaml": "sched: plateau\n", "scale.yaml": "scale: [0.5]\n", "data.yaml": "data: /nonexistent\n",
             "reprob.yaml": "reprob: 1.5\n", "lr_nan.yaml": "lr: .nan\n", "betas.yaml": "opt_betas: [0.9, 1.0]\n",
             "ema.yaml": "model_ema_decay: 1.5\n", "smoothing_str.yaml": "smoothing: high\n",
             "scale_order.yaml": "scale: [0.9, 0.5]\n", "aa.yaml": "aa: rand-m9x\n",
             "aa_section.yaml": "aa: rand-m9-xyz\n", "betas_n.yaml": "opt_betas: [0.9]\n",
             "remode.yaml": "remode: random\n", "interp.yaml": "train_interpolation: cubic\n",
             "mixup_mode.yaml": "mixup_mode: half\n", "recount.yaml": "recount: 0\n", "seed.yaml": "seed: -1\n",
             "compile.yaml": "torchcompile: inductr\n",
             "bad.json": "{not json", "list.json": "[1, 2]", "norows.json": '{"meta": {}}',
             "file.txt": "a file, not a folder"}
    for name, text in texts.items():
        (d / name).write_text(text)
    return {"tmp": str(d), "data": data, "train": str(Path(data) / "train"), "val": str(Path(data) / "val"),
            "labels": str(d / "labels")}


TINY = ["--model-kwargs"] + [f"{k}={v}" for k, v in TINY_KWARGS.items()] + [
    "--img-size", "32", "--batch-size", "2", "--workers", "0", "--no-amp", "--device", "cpu", "--epochs", "1",
    "--no-plot", "--mixup", "0", "--cutmix", "0", "--no-model-ema"]
T = ["--data", "{data}", "--output", "{tmp}/out"] + TINY  # a run that would train (each case breaks it)
V = ["--data", "{val}", "--checkpoint", "{tmp}/ck.pth", "--workers", "0", "--device", "cpu"]
TL = ["--data", "{train}", "--out", "{tmp}/maps", "--teacher", "resnet10t", "--no-pretrained", "--img-size", "32",
      "--workers", "0", "--device", "cpu", "--num-classes", "3", "--topk", "3"]
BO = ["--quick", "--device", "cpu", "--threads", "1", "--repeats", "1", "--no-plots", "--out", "{tmp}/bo"]
BM = ["--quick", "--device", "cpu", "--threads", "1", "--img", "32", "--no-plots", "--out", "{tmp}/bm"]

CASES = [
    # ---- train: config file
    ("train", ["-c", "{tmp}/nope.yaml"], USAGE, ["-c/--config", "no such file"]),
    ("train", ["-c", "{tmp}/list.yaml"], USAGE, ["-c/--config", "mapping"]),
    ("train", ["-c", "{tmp}/scalar.yaml"], USAGE, ["-c/--config", "mapping"]),
    ("train", ["-c", "{tmp}/broken.yaml"], USAGE, ["-c/--config", "YAML"]),
    ("train", ["-c", "{tmp}/unknown.yaml"], USAGE, ["-c/--config", "drop_pth"]),
    ("train", ["-c", "{tmp}/epochs_str.yaml"], USAGE, ["epochs", "'ten'"]),
    ("train", ["-c", "{tmp}/batch_neg.yaml"], USAGE, ["batch_size (--batch-size)", "positive"]),
    ("train", ["-c", "{tmp}/epochs_float.yaml"], USAGE, ["epochs (--epochs)", "integer"]),
    ("train", ["-c", "{tmp}/kwargs.yaml"], USAGE, ["model_kwargs (--model-kwargs)", "mapping"]),
    ("train", ["-c", "{tmp}/amp_str.yaml"], USAGE, ["amp (--amp)", "true or false"]),
    ("train", ["-c", "{tmp}/model.yaml"], USAGE, ["model (--model)", "unknown model"]),
    ("train", ["-c", "{tmp}/sched.yaml"], USAGE, ["sched (--sched)", "plateau"]),
    ("train", ["-c", "{tmp}/scale.yaml"], USAGE, ["scale (--scale)", "2 values"]),
    ("train", ["-c", "{tmp}/data.yaml"], USAGE, ["data (--data)", "no such directory"]),
    ("train", ["-c", "{tmp}/reprob.yaml"], USAGE, ["reprob (--reprob)", "[0, 1]", "'1.5'"]),
    ("train", ["-c", "{tmp}/lr_nan.yaml"], USAGE, ["lr (--lr)", "> 0", "'nan'"]),
    ("train", ["-c", "{tmp}/betas.yaml"], USAGE, ["opt_betas (--opt-betas)", "[0, 1)", "'1.0'"]),
    ("train", ["-c", "{tmp}/ema.yaml"], USAGE, ["model_ema_decay (--model-ema-decay)", "[0, 1]"]),
    ("train", ["-c", "{tmp}/smoothing_str.yaml"], USAGE, ["smoothing (--smoothing)", "expected a number"]),
    ("train", ["-c", "{tmp}/scale_order.yaml"], USAGE, ["--scale 0.9 0.5", "MIN <= MAX"]),
    ("train", ["-c", "{tmp}/aa.yaml"], USAGE, ["aa (--aa)", "'rand-m9x'", "auto-augment"]),
    ("train", ["-c", "{tmp}/aa_section.yaml"], USAGE, ["aa (--aa)", "RandAugment section 'xyz'"]),
    ("train", ["-c", "{tmp}/betas_n.yaml"], USAGE, ["--opt-betas 0.9", "--opt adamw takes 2 betas, got 1"]),
    ("train", ["-c", "{tmp}/remode.yaml"], USAGE, ["remode (--remode)", "'random'", "'pixel'"]),
    ("train", ["-c", "{tmp}/interp.yaml"], USAGE, ["train_interpolation (--train-interpolation)", "'cubic'"]),
    ("train", ["-c", "{tmp}/mixup_mode.yaml"], USAGE, ["mixup_mode (--mixup-mode)", "'half'"]),
    ("train", ["-c", "{tmp}/recount.yaml"], USAGE, ["recount (--recount)", "positive"]),
    ("train", ["-c", "{tmp}/seed.yaml"], USAGE, ["seed (--seed)", ">= 0"]),
    ("train", ["-c", "{tmp}/compile.yaml"], USAGE, ["torchcompile (--torchcompile)", "'inductr'", "inductor"]),
    # ---- train: flags
    ("train", ["--batch-size", "0"], USAGE, ["--batch-size", "positive"]),
    ("train", ["-b", "-2"], USAGE, ["--batch-size", "positive"]),
    ("train", ["--batch-size", "two"], USAGE, ["--batch-size", "integer"]),
    ("train", ["--val-batch-size", "0"], USAGE, ["--val-batch-size"]),
    ("train", ["--epochs", "0"], USAGE, ["--epochs"]),
    ("train", ["--warmup-epochs", "-1"], USAGE, ["--warmup-epochs"]),
    ("train", ["--steps-per-epoch", "0"], USAGE, ["--steps-per-epoch"]),
    ("train", ["--img-size", "0"], USAGE, ["--img-size"]),
    ("train", ["--workers", "-1"], USAGE, ["--workers"]),
    ("train", ["--num-classes", "0"], USAGE, ["--num-classes"]),
    ("train", ["--lr-base-size", "0"], USAGE, ["--lr-base-size"]),
    ("train", ["--crop-pct", "0"], USAGE, ["--crop-pct"]),
    ("train", ["--crop-pct", "-0.9"], USAGE, ["--crop-pct", "> 0"]),
    ("train", ["--crop-pct", "nan"], USAGE, ["--crop-pct", "> 0"]),
    ("train", ["--model", "nope_vit"], USAGE, ["--model", "nope_vit"]),
    ("train", ["--opt", "nope"], USAGE, ["--opt", "nope"]),
    ("train", ["--opt", "foo_adamw"], USAGE, ["--opt", "'foo_adamw'"]),  # timm would run plain adamw
    ("train", ["--remode", "random"], USAGE, ["--remode", "'random'"]),
    ("train", ["--train-interpolation", "cubic"], USAGE, ["--train-interpolation", "'cubic'"]),
    ("train", ["--mixup-mode", "half"], USAGE, ["--mixup-mode", "'half'"]),
    ("train", ["--mixup-mode", "pair", "--token-labels", "{labels}", "--return-dense"], USAGE,
     ["--mixup-mode pair", "--token-labels"]),
    ("train", ["--recount", "0"], USAGE, ["--recount", "positive"]),
    ("train", ["--torchcompile", "nope"], USAGE, ["--torchcompile", "'nope'", "torch.compile backend"]),
    ("train", ["--seed", "-1"], USAGE, ["--seed", ">= 0"]),
    ("train", ["--seed", str(2 ** 32)], USAGE, ["--seed", "2**32"]),
    ("train", ["--train-split", ""], USAGE, ["--train-split", "''"]),
    ("train", ["--sched", "plateau"], USAGE, ["--sched"]),
    ("train", ["--amp-dtype", "fp16"], USAGE, ["--amp-dtype"]),
    ("train", ["--device", "gpu0"], USAGE, ["--device", "gpu0"]),
    pytest.param("train", ["--device", "cuda"], USAGE, ["--device", "CUDA"], marks=no_cuda),
    ("train", ["--data", "{tmp}/nope"], USAGE, ["--data", "no such directory"]),
    ("train", ["--data", "{tmp}/file.txt"], USAGE, ["--data", "not a directory"]),
    ("train", ["--output", "{tmp}/file.txt"], USAGE, ["--output", "not a directory"]),
    ("train", ["--resume", "{tmp}/nope.pth"], USAGE, ["--resume", "no such file"]),
    ("train", ["--initial-checkpoint", "{tmp}/nope.pth"], USAGE, ["--initial-checkpoint", "no such file"]),
    ("train", ["--token-labels", "{tmp}/nope"], USAGE, ["--token-labels", "no such directory"]),
    ("train", ["--token-labels", "{labels}"], USAGE, ["--token-labels", "--return-dense"]),
    ("train", ["--mix-token"], USAGE, ["--mix-token", "--return-dense"]),
    # ---- train: float ranges (nan and inf are never valid)
    ("train", ["--drop", "1.5"], USAGE, ["--drop", "[0, 1]"]),
    ("train", ["--drop-path", "-0.1"], USAGE, ["--drop-path", "[0, 1]"]),
    ("train", ["--dense-weight", "-1"], USAGE, ["--dense-weight", ">= 0"]),
    ("train", ["--cos-reg", "nan"], USAGE, ["--cos-reg", ">= 0"]),
    ("train", ["--lr", "0"], USAGE, ["--lr", "> 0"]),
    ("train", ["--lr", "inf"], USAGE, ["--lr", "> 0"]),
    ("train", ["--lr", "fast"], USAGE, ["--lr", "expected a number"]),
    ("train", ["--lr-base", "-0.0005"], USAGE, ["--lr-base", "> 0"]),
    ("train", ["--weight-decay", "-0.05"], USAGE, ["--weight-decay", ">= 0"]),
    ("train", ["--layer-decay", "0"], USAGE, ["--layer-decay", "(0, 1]"]),
    ("train", ["--layer-decay", "1.5"], USAGE, ["--layer-decay", "(0, 1]"]),
    ("train", ["--opt-eps", "0"], USAGE, ["--opt-eps", "> 0"]),
    ("train", ["--opt-betas", "0.9", "1.0"], USAGE, ["--opt-betas", "[0, 1)"]),
    ("train", ["--opt-betas", "-0.1", "0.999"], USAGE, ["--opt-betas", "[0, 1)"]),
    ("train", ["--opt-betas", "0.9"], USAGE, ["--opt-betas 0.9", "2 betas, got 1"]),
    ("train", ["--opt-betas", "0.9", "0.99", "0.999"], USAGE, ["--opt-betas", "2 betas, got 3"]),
    ("train", ["--opt", "adan", "--opt-betas", "0.9", "0.99"], USAGE, ["--opt-betas", "--opt adan takes 3 betas"]),
    ("train", ["--opt", "sgd", "--opt-betas", "0.9", "0.99"], USAGE, ["--opt-betas", "--opt sgd takes no betas"]),
    ("train", ["--opt", "sgd", "--opt-eps", "1e-8"], USAGE, ["--opt-eps", "--opt sgd takes no eps"]),
    ("train", ["--momentum", "1.5"], USAGE, ["--momentum", "[0, 1]"]),
    ("train", ["--clip-grad", "0"], USAGE, ["--clip-grad", "> 0"]),
    ("train", ["--warmup-lr", "-0.1"], USAGE, ["--warmup-lr", ">= 0"]),
    ("train", ["--min-lr", "nan"], USAGE, ["--min-lr", ">= 0"]),
    ("train", ["--reprob", "1.5"], USAGE, ["--reprob", "[0, 1]"]),
    ("train", ["--scale", "0", "1"], USAGE, ["--scale", "(0, 1]"]),
    ("train", ["--scale", "0.5", "1.5"], USAGE, ["--scale", "(0, 1]"]),
    ("train", ["--scale", "0.9", "0.5"], USAGE, ["--scale 0.9 0.5", "MIN <= MAX"]),
    ("train", ["--ratio", "0", "1"], USAGE, ["--ratio", "> 0"]),
    ("train", ["--ratio", "1.5", "0.5"], USAGE, ["--ratio 1.5 0.5", "MIN <= MAX"]),
    ("train", ["--hflip", "2"], USAGE, ["--hflip", "[0, 1]"]),
    ("train", ["--color-jitter", "-0.4"], USAGE, ["--color-jitter", ">= 0"]),
    ("train", ["--mixup", "-0.8"], USAGE, ["--mixup", ">= 0"]),
    ("train", ["--cutmix", "inf"], USAGE, ["--cutmix", ">= 0"]),
    ("train", ["--mixup-prob", "1.5"], USAGE, ["--mixup-prob", "[0, 1]"]),
    ("train", ["--mixup-switch-prob", "nan"], USAGE, ["--mixup-switch-prob", "[0, 1]"]),
    ("train", ["--smoothing", "1"], USAGE, ["--smoothing", "[0, 1)"]),
    ("train", ["--smoothing", "-0.1"], USAGE, ["--smoothing", "[0, 1)"]),
    ("train", ["--model-ema-decay", "1.01"], USAGE, ["--model-ema-decay", "[0, 1]"]),
    # ---- train: auto-augment policy, parsed by timm at parse time
    ("train", ["--aa", "nope"], USAGE, ["--aa", "'nope'", "auto-augment", "Unknown AA policy"]),
    ("train", ["--aa", "rand-m9x"], USAGE, ["--aa", "'rand-m9x'", "auto-augment"]),
    ("train", ["--aa", "rand-q5"], USAGE, ["--aa", "'rand-q5'", "RandAugment"]),
    ("train", ["--aa", "augmix-z3"], USAGE, ["--aa", "'augmix-z3'", "AugMix"]),
    # sections timm's parsers skip without a word (no digit, unknown 't' set, empty)
    ("train", ["--aa", "rand-foo"], USAGE, ["--aa", "'rand-foo'", "RandAugment section 'foo'"]),
    ("train", ["--aa", "rand-m9-xyz"], USAGE, ["--aa", "RandAugment section 'xyz'"]),
    ("train", ["--aa", "rand-m9-mstdinf"], USAGE, ["--aa", "RandAugment section 'mstdinf'"]),
    ("train", ["--aa", "rand-m9-tfoo"], USAGE, ["--aa", "RandAugment section 'tfoo'"]),
    ("train", ["--aa", "rand-m9-"], USAGE, ["--aa", "RandAugment section ''"]),
    ("train", ["--aa", "augmix-m5-wide"], USAGE, ["--aa", "AugMix section 'wide'"]),
    ("train", ["--aa", "original-x"], USAGE, ["--aa", "AutoAugment section 'x'"]),
    ("train", ["--aa", "augmix-m5", "--token-labels", "{labels}", "--return-dense"], USAGE,
     ["--aa augmix-m5", "--token-labels", "RandAugment"]),
    # ---- train: checks that need the data or the model (exit before the first step)
    ("train", TINY, EXIT, ["--data"]),
    ("train", T + ["--img-size", "40"], EXIT, ["--img-size 40", "multiple", "16"]),
    ("train", T + ["--train-split", "nope"], EXIT, ["--train-split", "nope"]),
    ("train", T + ["--val-split", "nope"], EXIT, ["--val-split", "nope"]),
    ("train", T + ["--model-kwargs", "bogus=1"], EXIT, ["--model-kwargs", "bogus"]),
    ("train", T + ["--model-kwargs", "global_pool=max"], EXIT, ["--model-kwargs", "global_pool", "'max'"]),
    ("train", T + ["--initial-checkpoint", "{tmp}/garbage.pth"], EXIT, ["--initial-checkpoint", "garbage.pth"]),
    ("train", T + ["--initial-checkpoint", "{tmp}/ck2.pth"], EXIT, ["--initial-checkpoint", "shape mismatch"]),
    ("train", T + ["--resume", "{tmp}/garbage.pth"], EXIT, ["--resume", "garbage.pth"]),
    ("train", T + ["--resume", "{tmp}/ck2.pth"], EXIT, ["--resume", "ck2.pth"]),
    ("train", T + ["--mixup", "0.8", "--batch-size", "3"], EXIT, ["--batch-size 3", "even"]),
    # ---- validate
    ("validate", ["--checkpoint", "{tmp}/ck.pth"], USAGE, ["--data"]),
    ("validate", V + ["--checkpoint", "{tmp}/nope.pth"], USAGE, ["--checkpoint", "no such file"]),
    ("validate", V + ["--data", "{tmp}/nope"], USAGE, ["--data", "no such directory"]),
    ("validate", V + ["--torchcompile", "nope"], USAGE, ["--torchcompile", "'nope'"]),
    ("validate", V + ["--model", "nope_vit"], USAGE, ["--model", "nope_vit"]),
    ("validate", V + ["--batch-size", "0"], USAGE, ["--batch-size"]),
    ("validate", V + ["--workers", "-1"], USAGE, ["--workers"]),
    ("validate", V + ["--img-size", "0"], USAGE, ["--img-size"]),
    ("validate", V + ["--num-classes", "-1"], USAGE, ["--num-classes"]),
    ("validate", V + ["--crop-pct", "0"], USAGE, ["--crop-pct"]),
    ("validate", V + ["--device", "gpu0"], USAGE, ["--device"]),
    ("validate", V + ["--checkpoint", "{tmp}/garbage.pth"], EXIT, ["--checkpoint", "not a readable"]),
    ("validate", V + ["--checkpoint", "{tmp}/list.pth"], EXIT, ["--checkpoint", "got a list"]),
    ("validate", V + ["--model-kwargs", "embed_dim=64"], EXIT, ["--checkpoint", "does not fit", "--model-kwargs"]),
    ("validate", V + ["--num-classes", "5"], EXIT, ["--checkpoint", "does not fit", "--num-classes"]),
    ("validate", V + ["--checkpoint", "{tmp}/sd.pth", "--model-kwargs", "depth=4"], EXIT,  # 1000 classes
     ["--checkpoint", "does not fit", "num_classes=1000"]),
    ("validate", V + ["--model-kwargs", "bogus=1"], EXIT, ["--model-kwargs", "bogus"]),
    ("validate", V + ["--img-size", "40"], EXIT, ["--img-size 40", "multiple"]),
    ("validate", V + ["--use-ema"], EXIT, ["--use-ema", "no EMA"]),
    ("validate", V + ["--use-ema", "--checkpoint", "{tmp}/sd.pth", "--model-kwargs"] +
     [f"{k}={v}" for k, v in TINY_KWARGS.items()] + ["--num-classes", "3"], EXIT, ["--use-ema", "plain state dict"]),
    ("validate", V + ["--checkpoint", "{tmp}/ck2.pth"], EXIT, ["--data", "3 class folders", "2 classes"]),
    # ---- token_labeling
    ("token_labeling", ["--out", "{tmp}/maps"], USAGE, ["--data"]),
    ("token_labeling", TL + ["--data", "{tmp}/nope"], USAGE, ["--data", "no such directory"]),
    ("token_labeling", TL + ["--out", "{tmp}/file.txt"], USAGE, ["--out", "not a directory"]),
    ("token_labeling", TL + ["--teacher", "nope_net"], USAGE, ["--teacher", "nope_net"]),
    ("token_labeling", TL + ["--teacher-checkpoint", "{tmp}/nope.pth"], USAGE, ["--teacher-checkpoint"]),
    ("token_labeling", TL + ["--topk", "0"], USAGE, ["--topk", "positive"]),
    ("token_labeling", TL + ["--batch-size", "0"], USAGE, ["--batch-size"]),
    ("token_labeling", TL + ["--workers", "-1"], USAGE, ["--workers"]),
    ("token_labeling", TL + ["--img-size", "0"], USAGE, ["--img-size"]),
    ("token_labeling", TL + ["--num-classes", "0"], USAGE, ["--num-classes"]),
    ("token_labeling", TL + ["--device", "gpu0"], USAGE, ["--device"]),
    ("token_labeling", TL + ["--topk", "10"], ValueError, ["--topk", "3 classes"]),
    # ---- demo
    ("demo", ["--model", "nope_vit"], USAGE, ["--model", "nope_vit"]),
    ("demo", ["--model", "vit_small_patch16_224"], USAGE, ["--model"]),
    ("demo", ["--batch", "0"], USAGE, ["--batch"]),
    ("demo", ["--batch", "-1"], USAGE, ["--batch"]),
    ("demo", ["--img", "0"], USAGE, ["--img"]),
    ("demo", ["--img", "33"], USAGE, ["--img 33", "multiple"]),
    ("demo", ["--repeats", "0"], USAGE, ["--repeats"]),
    # ---- bench_ops
    ("bench_ops", BO + ["--device", "gpu0"], USAGE, ["--device", "gpu0"]),
    pytest.param("bench_ops", BO + ["--device", "cuda"], USAGE, ["--device", "CUDA"], marks=no_cuda),
    ("bench_ops", BO + ["--batch", "0"], USAGE, ["--batch"]),
    ("bench_ops", BO + ["--n", "0"], USAGE, ["--n"]),
    ("bench_ops", BO + ["--n", "197", "-5"], USAGE, ["--n"]),
    ("bench_ops", BO + ["--heads", "0"], USAGE, ["--heads"]),
    ("bench_ops", BO + ["--head-dim", "0"], USAGE, ["--head-dim"]),
    ("bench_ops", BO + ["--repeats", "0"], USAGE, ["--repeats"]),
    ("bench_ops", BO + ["--warmup", "-1"], USAGE, ["--warmup"]),
    ("bench_ops", BO + ["--threads", "0"], USAGE, ["--threads"]),
    ("bench_ops", BO + ["--rep-ms", "0"], USAGE, ["--rep-ms"]),
    ("bench_ops", BO + ["--rep-ms", "nan"], USAGE, ["--rep-ms"]),
    ("bench_ops", BO + ["--dtypes", "float32"], USAGE, ["--dtypes"]),
    ("bench_ops", BO + ["--backends", "mps"], USAGE, ["--backends"]),
    ("bench_ops", BO + ["--out", "{tmp}/file.txt"], USAGE, ["--out", "not a directory"]),
    # ---- bench_models
    ("bench_models", BM + ["--models", "nope"], USAGE, ["--models"]),
    ("bench_models", BM + ["--img", "0"], USAGE, ["--img"]),
    ("bench_models", BM + ["--img", "33"], USAGE, ["--img 33", "multiple"]),
    ("bench_models", BM + ["--batch", "0"], USAGE, ["--batch"]),
    ("bench_models", BM + ["--img", "32", "64", "--batch", "1", "2", "3"], USAGE, ["--batch"]),
    ("bench_models", BM + ["--repeats", "0"], USAGE, ["--repeats"]),
    ("bench_models", BM + ["--warmup", "-1"], USAGE, ["--warmup"]),
    ("bench_models", BM + ["--threads", "0"], USAGE, ["--threads"]),
    ("bench_models", BM + ["--amp", "fp8"], USAGE, ["--amp"]),
    ("bench_models", BM + ["--device", "tpu"], USAGE, ["--device"]),
    ("bench_models", BM + ["--fused-backends", "mps"], USAGE, ["--fused-backends"]),
    ("bench_models", BM + ["--compile-backend", "nope"], USAGE, ["--compile-backend", "nope"]),
    ("bench_models", BM + ["--compile-models", "nope"], USAGE, ["--compile-models"]),
    ("bench_models", BM + ["--out", "{tmp}/file.txt"], USAGE, ["--out", "not a directory"]),
    # ---- plot
    ("plot", ["{tmp}/nope.json"], USAGE, ["json", "no such file"]),
    ("plot", ["{tmp}"], USAGE, ["json", "not a file"]),
    ("plot", ["{tmp}/bad.json"], USAGE, ["json", "not a readable results JSON"]),
    ("plot", ["{tmp}/list.json"], USAGE, ["json", "JSON object"]),
    ("plot", ["{tmp}/norows.json"], USAGE, ["json", "no benchmark run"]),
    ("plot", ["{tmp}/norows.json", "--out-dir", "{tmp}/file.txt"], USAGE, ["--out-dir"]),
    # ---- bench_cpu_ops
    ("bench_cpu_ops", ["--repeats", "0"], USAGE, ["--repeats"]),
    ("bench_cpu_ops", ["--threads", "0"], USAGE, ["--threads"]),
    ("bench_cpu_ops", ["--B", "0"], USAGE, ["--B"]),
    ("bench_cpu_ops", ["--N", "-1"], USAGE, ["--N"]),
    ("bench_cpu_ops", ["--d", "0"], USAGE, ["--d"]),
]


def _id(case):
    script, argv = (case.values if hasattr(case, "values") else case)[:2]
    for base in (T, TINY, V, TL, BO, BM):  # name a case by what it adds to its script's base arguments
        if argv[:len(base)] == base:
            argv = argv[len(base):]
    return f"{script}:{' '.join(argv).replace('{tmp}/', '')}"[:70]


@pytest.mark.parametrize("script,argv,expect,needles", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_named(script, argv, expect, needles, files, capsys):
    argv = [a.format(**files) for a in argv]
    if expect in (USAGE, EXIT):
        with pytest.raises(SystemExit) as ei:
            MAINS[script](argv)
        code = ei.value.code
        if expect == USAGE:
            assert code == 2, code
            msg = capsys.readouterr().err
            assert "error:" in msg
        else:
            assert isinstance(code, str), code  # a message, printed by the interpreter (exit status 1)
            msg = code
    else:
        with pytest.raises(expect) as ei:
            MAINS[script](argv)
        msg = str(ei.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_args_yaml_of_a_run_is_a_valid_config(tmp_path):
    """The YAML checks accept every value a run writes to args.yaml (reused as -c)."""
    args, _ = parse_args(["--model-kwargs", "depth=4", "--clip-grad", "1.0", "--opt-betas", "0.9", "0.99",
                          "--amp-dtype", "bfloat16", "--device", "cpu"])
    cfg = tmp_path / "args.yaml"
    cfg.write_text(yaml.safe_dump(vars(args)))
    again, _ = parse_args(["-c", str(cfg)])
    assert {**vars(again), "config": ""} == vars(args)


@pytest.mark.parametrize("argv,expect", [
    (["--reprob", "0"], {"reprob": 0.0}),
    (["--smoothing", "0.0"], {"smoothing": 0.0}),
    (["--aa", ""], {"aa": ""}),
    (["--aa", "rand-m9-mstd0.5-inc1"], {"aa": "rand-m9-mstd0.5-inc1"}),
    (["--aa", "augmix-m5-w4-d2"], {"aa": "augmix-m5-w4-d2"}),
    (["--aa", "original-mstd0.5"], {"aa": "original-mstd0.5"}),
    (["--scale", "1", "1", "--ratio", "0.5", "0.5"], {"scale": [1.0, 1.0], "ratio": [0.5, 0.5]}),
    (["--warmup-lr", "0", "--min-lr", "0", "--weight-decay", "0"], {"warmup_lr": 0.0, "min_lr": 0.0}),
    (["--drop", "1", "--momentum", "0", "--model-ema-decay", "1"], {"drop": 1.0, "momentum": 0.0}),
    (["--opt-betas", "0", "0.999", "--lr", "1e-3"], {"opt_betas": [0.0, 0.999], "lr": 1e-3}),
    (["--opt-betas", "0.9", "0.999"], {"opt_betas": [0.9, 0.999]}),
    (["--opt", "adan", "--opt-betas", "0.98", "0.92", "0.99"], {"opt_betas": [0.98, 0.92, 0.99]}),
    (["--opt", "lookahead_adamw", "--opt-eps", "1e-8"], {"opt": "lookahead_adamw", "opt_eps": 1e-8}),
    (["--aa", "rand-n3-p0.7-mmax12-mstd101-tweights"], {"aa": "rand-n3-p0.7-mmax12-mstd101-tweights"}),
    (["--aa", "augmix-m5-w4-d2-a1-b1-mstd0.5"], {"aa": "augmix-m5-w4-d2-a1-b1-mstd0.5"}),
    (["--crop-pct", "1.0"], {"crop_pct": 1.0}),
    (["--layer-decay", "1", "--grad-checkpointing"], {"layer_decay": 1.0, "grad_checkpointing": True}),
    (["--crop-pct", "1.13"], {"crop_pct": 1.13}),  # refiner_vit_l's own (timm's volo: 1.15)
    (["--remode", "const", "--mixup-mode", "elem", "--train-interpolation", "lanczos"],
     {"remode": "const", "mixup_mode": "elem", "train_interpolation": "lanczos"}),
    (["--recount", "3", "--seed", "0"], {"recount": 3, "seed": 0}),
    (["--torchcompile"], {"torchcompile": "inductor"}),  # bare: inductor
    (["--torchcompile", "aot_eager"], {"torchcompile": "aot_eager"}),
    ([], {"torchcompile": None}),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_edge_values_still_parse(argv, expect):
    args, _ = parse_args(argv)
    assert {k: getattr(args, k) for k in expect} == expect


def test_edge_values_still_parse_from_yaml(tmp_path):
    cfg = {"reprob": 0, "smoothing": 0.0, "aa": "", "scale": [1, 1], "lr": 1e-3, "min_lr": 0, "opt_betas": [0.9, 0.99],
           "crop_pct": 1.0, "remode": "rand", "mixup_mode": "pair", "train_interpolation": "bicubic", "seed": 0}
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(cfg))
    args, _ = parse_args(["-c", str(tmp_path / "edge.yaml")])
    assert {k: getattr(args, k) for k in cfg} == cfg


def test_choices_are_what_timm_takes():
    """Every value the fixed-set flags accept builds in timm (and the interpolation list is timm's)."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation, _str_to_pil_interpolation
    from refiner.train_config import INTERPOLATIONS, MIXUP_MODES, RE_MODES
    assert set(INTERPOLATIONS) == {"random", *_str_to_pil_interpolation}
    for mode in INTERPOLATIONS:
        RandomResizedCropAndInterpolation(32, interpolation=mode)
    for mode in RE_MODES:
        RandomErasing(0.5, mode=mode, device="cpu")
    x, y = torch.rand(4, 3, 8, 8), torch.arange(4)
    for mode in MIXUP_MODES:
        Mixup(mixup_alpha=1.0, mode=mode, num_classes=4)(x.clone(), y)
