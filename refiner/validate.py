"""Top-1 / top-5 of a Refiner-ViT checkpoint on an image folder.

    python -m refiner.validate --data DIR/val --checkpoint output/run/best.pth [--use-ema]
    python -m refiner.validate --data DIR/val --checkpoint weights.pth --model refiner_vit_s --num-classes 1000

Preprocessing is the model's own (``timm.data.resolve_data_config``: crop_pct, interpolation,
mean/std from its pretrained_cfg, overridable with --img-size/--crop-pct). Checkpoints written by
``refiner.train`` carry the model name, its kwargs and the class count; plain state dicts need
--model and --num-classes.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import torch
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import create_model
from timm.utils import AverageMeter, ParseKwargs, accuracy
from tqdm import tqdm

import refiner  # noqa: F401
from . import cli

__all__ = ["main", "build_parser"]


def build_parser():
    p = argparse.ArgumentParser(prog="python -m refiner.validate", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=cli.existing_dir, help="image folder (<class>/<image>)")
    p.add_argument("--checkpoint", required=True, type=cli.existing_file)
    p.add_argument("--model", default=None, type=cli.model_name,
                   help="default: from the checkpoint, else refiner_vit_s")
    p.add_argument("--num-classes", type=cli.positive_int, default=None)
    p.add_argument("--model-kwargs", nargs="*", default=None, action=ParseKwargs)
    p.add_argument("--img-size", type=cli.positive_int, default=None)
    p.add_argument("--crop-pct", type=cli.positive_float, default=None)
    p.add_argument("--batch-size", "-b", type=cli.positive_int, default=64)
    p.add_argument("--workers", type=cli.nonnegative_int, default=4)
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--fused", action="store_true", help="convert to the fused kernels (refiner.fused)")
    p.add_argument("--torchcompile", nargs="?", const="inductor", default=None, type=cli.compile_backend,
                   help="torch.compile the model with this backend (inductor when given bare)")
    p.add_argument("--device", default=None, type=cli.device)
    p.add_argument("--amp", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling a foreign or truncated file raises any of several types
        raise SystemExit(f"--checkpoint {args.checkpoint}: not a readable PyTorch checkpoint "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(ck, dict):
        raise SystemExit(f"--checkpoint {args.checkpoint}: expected a state dict or a refiner.train checkpoint, "
                         f"got a {type(ck).__name__}")
    targs = {}
    if "state_dict" in ck:
        targs = ck.get("args") or {}
        if args.use_ema and ck.get("state_dict_ema") is None:  # else the result would claim EMA weights
            raise SystemExit(f"--use-ema: {args.checkpoint} has no EMA weights (trained with --no-model-ema?)")
        sd = ck["state_dict_ema"] if args.use_ema else ck["state_dict"]
    elif args.use_ema:
        raise SystemExit(f"--use-ema: {args.checkpoint} is a plain state dict, without EMA weights")
    else:
        sd = ck
    model_name = args.model or ck.get("model") or targs.get("model") or "refiner_vit_s"
    num_classes = args.num_classes or ck.get("num_classes") or targs.get("num_classes") or 1000
    kwargs = dict(targs.get("model_kwargs") or {})
    kwargs.update(args.model_kwargs or {})
    if "aux_head.weight" in sd:
        kwargs["return_dense"] = True
    img_size = args.img_size or targs.get("img_size")
    if img_size:
        kwargs["img_size"] = img_size
    try:
        model = create_model(model_name, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:  # e.g. a misspelt or mistyped --model-kwargs entry
        raise SystemExit(f"--model-kwargs {kwargs}: cannot build {model_name} with them ({e})") from e
    if hasattr(model, "patch_embed"):
        cli.check_img_size(img_size, model.patch_embed.patch_size)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise SystemExit(f"--checkpoint {args.checkpoint} does not fit {model_name} with num_classes={num_classes} "
                         f"and {kwargs or 'no model kwargs'} (give the --model, --num-classes and --model-kwargs it "
                         f"was trained with): {' '.join(ln.strip() for ln in lines[:3])[:500]}") from e
    if args.fused:
        try:
            import refiner.fused as fused
        except ImportError as e:
            raise SystemExit(f"--fused: refiner.fused is not available ({e})")
        fused.convert(model)
    model.to(device).eval()

    cfg = resolve_data_config({"img_size": img_size, "crop_pct": args.crop_pct}, model=model)
    ds = create_dataset("", root=args.data, is_training=False)
    n_folders = len(getattr(ds.reader, "class_to_idx", {}))
    if n_folders > num_classes:  # labels past the head's classes could never be right: accuracy silently low
        raise SystemExit(f"--data {args.data}: {n_folders} class folders, but the model has {num_classes} classes "
                         f"(--num-classes / the checkpoint's)")
    loader = create_loader(ds, input_size=cfg["input_size"], batch_size=args.batch_size, is_training=False,
                           interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                           crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode"), num_workers=args.workers,
                           device=device, use_prefetcher=False, persistent_workers=False)
    top1, top5 = AverageMeter(), AverageMeter()
    ac = torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16) \
        if args.amp else torch.autocast(device.type, enabled=False)
    run = torch.compile(model, backend=args.torchcompile) if args.torchcompile else model
    with torch.no_grad(), ac:
        for x, y in tqdm(loader, desc="validate"):
            x, y = x.to(device), y.to(device)
            out = run(x).float()
            a1, a5 = accuracy(out, y, topk=(1, min(5, out.shape[-1])))
            top1.update(a1.item(), x.size(0))
            top5.update(a5.item(), x.size(0))
    res = {"model": model_name, "checkpoint": args.checkpoint, "ema": bool(args.use_ema), "images": top1.count,
           "top1": round(top1.avg, 3), "top5": round(top5.avg, 3), "crop_pct": cfg["crop_pct"],
           "input_size": list(cfg["input_size"])}
    print(f"top-1 {res['top1']:.3f}  top-5 {res['top5']:.3f}  ({res['images']} images, {model_name})")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
