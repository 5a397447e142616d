"""Train Refiner-ViT on an image folder with timm's building blocks.

    python -m refiner.train -c configs/refiner_s.yaml --data DIR [--flags that override the YAML]
    torchrun --nproc_per_node=8 -m refiner.train -c configs/refiner_s.yaml --data DIR

DIR holds ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``. With ``--token-labels LABELS``
(the ``*_tl.yaml`` configs) each training image needs a dense label map
``LABELS/<class>/<name>.pt`` (see :mod:`refiner.token_labeling`).

Writes to the output dir: ``last.pth`` (each epoch), ``best.pth`` (best validation top-1 of
the model or its EMA, whichever is higher; the checkpoint's ``metric_source`` says which),
``summary.csv`` and ``summary.json`` (one row per epoch),
``curves.png`` (loss and accuracy) and ``args.yaml``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import yaml
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.data.mixup import mixup_target
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, AverageMeter, random_seed
from tqdm import tqdm

import refiner  # noqa: F401  (registers the models)
from .checkpoint import CheckpointError, load_checkpoint
from .cli import check_img_size
from .cos_reg import cos_reg_loss
from .token_labeling import DenseMixup, TokenLabelDataset, TokenLabelLoss, TokenLabelTransform, dense_targets
from .train_config import parse_args

__all__ = ["main", "train_step", "build_model", "scaled_lr", "TrainWrapper"]


# --------------------------------------------------------------------------- set-up helpers

def init_distributed(device_arg: Optional[str]):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, world, rank


def scaled_lr(args, world: int = 1) -> float:
    """``--lr`` if given, else ``lr_base * (batch_size * world) / lr_base_size`` (linear scaling)."""
    if args.lr is not None:
        return args.lr
    return args.lr_base * args.batch_size * world / args.lr_base_size


def build_model(args, num_classes: int):
    kwargs = dict(args.model_kwargs or {})
    if args.return_dense:
        kwargs.update(return_dense=True, mix_token=args.mix_token)
    try:
        model = create_model(args.model, num_classes=num_classes, img_size=args.img_size, drop_rate=args.drop,
                             drop_path_rate=args.drop_path, **kwargs)
    except (TypeError, ValueError) as e:  # e.g. a misspelt or mistyped --model-kwargs entry
        raise SystemExit(f"--model-kwargs {kwargs}: cannot build {args.model} with them ({e})") from e
    if args.initial_checkpoint:
        try:
            load_checkpoint(args.initial_checkpoint, model)
        except (CheckpointError, FileNotFoundError) as e:
            raise SystemExit(f"--initial-checkpoint: {e} (model {args.model}, --model-kwargs {kwargs})") from e
    if args.fused:
        try:
            import refiner.fused as fused
        except ImportError as e:
            raise SystemExit(f"--fused: refiner.fused is not available ({e}); build the kernels or drop --fused")
        fused.convert(model)
    model.set_grad_checkpointing(args.grad_checkpointing)
    return model


class TrainWrapper(nn.Module):
    """Training forward that also returns the attention maps (for --cos-reg); DDP wraps this."""

    def __init__(self, model: nn.Module, want_maps: bool):
        super().__init__()
        self.model, self.want_maps = model, want_maps

    def forward(self, x):
        if not self.want_maps:
            return self.model(x), []
        return self.model(x, return_attn=True)


def _autocast(device: torch.device, args):
    if not args.amp:
        return nullcontext
    dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else (
        torch.float16 if device.type == "cuda" else torch.bfloat16)
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def train_step(wrapper, batch, *, optimizer, loss_fn, device, num_classes, mixup=None, cos_reg=0.0,
               autocast=nullcontext, scaler=None, clip_grad=None, token_labels=False, grid=None, smoothing=0.0):
    """One optimisation step; returns the loss (float). ``batch = (x, target)`` from the loader
    (``target = (cls, label_map, meta)`` with token labels)."""
    x, target = batch
    x = x.to(device, non_blocking=True)
    dense_t = None
    if token_labels:
        cls, label_maps, meta = target
        cls = cls.to(device)
        dense_t = dense_targets(label_maps.to(device), meta.to(device), num_classes, grid)
    else:
        cls = target.to(device)
    if mixup is not None:
        x, cls_t = mixup(x, cls)
        if dense_t is not None:
            dense_t = mixup.mix_dense(dense_t, grid, x.shape[-2:])
    else:
        # soft (smoothed) targets for the token-labelling loss; class indices for the others
        cls_t = mixup_target(cls, num_classes, 1.0, smoothing) if isinstance(loss_fn, TokenLabelLoss) else cls
    with autocast():
        out, maps = wrapper(x)
        if isinstance(loss_fn, TokenLabelLoss):
            loss = loss_fn(out, cls_t, dense_t, grid=grid)
        else:
            loss = loss_fn(out, cls_t)
        if cos_reg > 0:
            loss = loss + cos_reg_loss(maps, cos_reg)
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss is {loss.item()}, stopping")
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, loader, device, autocast, show=True):
    model.eval()
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    ce = nn.CrossEntropyLoss()
    for x, y in tqdm(loader, desc="  val", leave=False, disable=not show):
        x, y = x.to(device), y.to(device)
        with autocast():
            out = model(x)
        out = out.float()
        k = min(5, out.shape[-1])
        a1, a5 = accuracy(out, y, topk=(1, k))
        loss_m.update(ce(out, y).item(), x.size(0))
        top1_m.update(a1.item(), x.size(0))
        top5_m.update(a5.item(), x.size(0))
    return {"loss": loss_m.avg, "top1": top1_m.avg, "top5": top5_m.avg}


def _reduce(meters: dict, world: int, device) -> dict:
    if world <= 1:
        return meters
    t = torch.tensor(list(meters.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(meters, (t / world).tolist()))


def save_plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    if any("val_loss" in r for r in rows):
        a.plot(ep, [r.get("val_loss", np.nan) for r in rows], "o-", label="val")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=.3)
    for key in ("val_top1", "val_top5", "ema_top1"):
        if any(key in r for r in rows):
            b.plot(ep, [r.get(key, np.nan) for r in rows], "o-", label=key)
    b.set_xlabel("epoch"), b.set_ylabel("accuracy (%)"), b.legend(), b.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_logs(rows, out_dir, plot=True):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if plot:
        save_plot(rows, os.path.join(out_dir, "curves.png"))


def _unwrap(m):
    return m.module if hasattr(m, "module") and not isinstance(m, TrainWrapper) else m


# --------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None):
    args, _ = parse_args(argv)
    device, world, rank = init_distributed(args.device)
    main_proc = rank == 0
    random_seed(args.seed, rank)
    if not args.data:
        raise SystemExit("--data: give the dataset root (with train/ and val/ image folders)")

    # ---- data
    tl = bool(args.token_labels)
    train_dir = os.path.join(args.data, args.train_split)
    # A flat --data (no train/ inside) is the training folder itself; a split asked for by name
    # must exist, else its parent's split folders would silently become the classes.
    for flag, split, default in (("--train-split", args.train_split, "train"), ("--val-split", args.val_split, "val")):
        if split and split != default and not os.path.isdir(os.path.join(args.data, split)):
            raise SystemExit(f"{flag} {split!r}: no folder {os.path.join(args.data, split)!r}")
    train_root = train_dir if os.path.isdir(train_dir) else args.data
    ds_train = create_dataset("", root=train_root, is_training=True)
    num_classes = args.num_classes or len(ds_train.reader.class_to_idx)

    model = build_model(args, num_classes).to(device)
    check_img_size(args.img_size, model.patch_embed.patch_size)
    if getattr(model, "mix_token", False) and hasattr(model, "seed_mixtoken"):
        model.seed_mixtoken(args.seed + rank)
    data_cfg = resolve_data_config(vars(args), model=model, verbose=main_proc)
    data_cfg["input_size"] = (3, args.img_size, args.img_size)
    grid = (args.img_size // model.patch_embed.patch_size,) * 2

    if tl:
        tf = TokenLabelTransform(args.img_size, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                                 interpolation=args.train_interpolation, auto_augment=args.aa or None,
                                 mean=data_cfg["mean"], std=data_cfg["std"], re_prob=args.reprob,
                                 re_mode=args.remode, re_count=args.recount, label_affine=args.label_affine)
        ds_train = TokenLabelDataset(train_root, args.token_labels, tf)
        sampler = torch.utils.data.distributed.DistributedSampler(ds_train) if world > 1 else None
        loader_train = torch.utils.data.DataLoader(
            ds_train, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
            num_workers=args.workers, pin_memory=args.pin_mem and device.type == "cuda",
            persistent_workers=args.workers > 0)
    else:
        loader_train = create_loader(
            ds_train, input_size=data_cfg["input_size"], batch_size=args.batch_size, is_training=True,
            no_aug=False, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale,
            ratio=args.ratio, hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa or None,
            interpolation=args.train_interpolation, mean=data_cfg["mean"], std=data_cfg["std"],
            num_workers=args.workers, distributed=world > 1, pin_memory=args.pin_mem and device.type == "cuda",
            device=device, use_prefetcher=False, persistent_workers=args.workers > 0)
    loader_val = None
    val_dir = os.path.join(args.data, args.val_split) if args.val_split else ""
    if val_dir and os.path.isdir(val_dir):
        ds_val = create_dataset("", root=val_dir, is_training=False)
        loader_val = create_loader(
            ds_val, input_size=data_cfg["input_size"], batch_size=args.val_batch_size or args.batch_size,
            is_training=False, interpolation=data_cfg["interpolation"], mean=data_cfg["mean"], std=data_cfg["std"],
            crop_pct=data_cfg["crop_pct"], num_workers=args.workers, distributed=False,
            pin_memory=args.pin_mem and device.type == "cuda", device=device, use_prefetcher=False,
            persistent_workers=False)

    # ---- optimisation
    global_batch = args.batch_size * world
    lr = scaled_lr(args, world)
    opt_kw = {}
    if args.opt_eps is not None:
        opt_kw["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kw["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay, **opt_kw)
    if len(loader_train) == 0:
        raise SystemExit(f"{len(ds_train)} training images is fewer than one batch (--batch-size {args.batch_size})")
    steps = len(loader_train) if args.steps_per_epoch is None else min(args.steps_per_epoch, len(loader_train))
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
        step_on_epochs=False, updates_per_epoch=max(steps, 1))
    autocast = _autocast(device, args)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" and (
        args.amp_dtype in (None, "float16")) else None
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        if args.batch_size % 2:
            raise SystemExit(f"--batch-size {args.batch_size}: Mixup/CutMix need an even batch size")
        mix_cls = DenseMixup if tl else Mixup
        mixup = mix_cls(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                        num_classes=num_classes)
    if args.return_dense:
        loss_fn = TokenLabelLoss(dense_weight=args.dense_weight)
    elif mixup is not None:
        loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()

    # ---- resume
    start_epoch, best, rows = 0, None, []
    if args.resume:
        try:
            ck = torch.load(args.resume, map_location="cpu", weights_only=False)
            model.load_state_dict(ck["state_dict"])
            optimizer.load_state_dict(ck["optimizer"])
        except Exception as e:  # unreadable file, a foreign dict, another model size or optimiser
            msg = str(e).strip().splitlines()
            raise SystemExit(f"--resume {args.resume}: not a refiner.train checkpoint of this model and optimiser "
                             f"(model {args.model}, --opt {args.opt}): {type(e).__name__}: "
                             f"{' '.join(msg[:3])[:500]}") from e
        if ema is not None and ck.get("state_dict_ema") is not None:
            ema.module.load_state_dict(ck["state_dict_ema"])
        if scaler is not None and ck.get("scaler") is not None:
            scaler.load_state_dict(ck["scaler"])
        start_epoch, best, rows = ck["epoch"] + 1, ck.get("best"), ck.get("log", [])
        scheduler.step_update(num_updates=start_epoch * steps)
        if main_proc:
            print(f"resumed {args.resume}: continuing at epoch {start_epoch}")

    out_dir = args.output or os.path.join("output", f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if main_proc:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "args.yaml"), "w") as f:
            yaml.safe_dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}, f)
        print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
              f"{num_classes} classes, lr {lr:.3g} (global batch {global_batch}), {num_epochs} epochs, "
              f"token labels: {tl}, output: {out_dir}")

    wrapper = TrainWrapper(model, want_maps=args.cos_reg > 0)
    if world > 1:
        wrapper = nn.parallel.DistributedDataParallel(wrapper, device_ids=[device] if device.type == "cuda" else None)
    if args.torchcompile:  # not fullgraph: MixToken draws its box on the host, a graph break
        wrapper = torch.compile(wrapper, backend=args.torchcompile)

    for epoch in range(start_epoch, num_epochs):
        if world > 1 and hasattr(loader_train, "sampler") and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        model.train()
        loss_m = AverageMeter()
        t0 = time.time()
        bar = tqdm(loader_train, total=steps, desc=f"epoch {epoch}", disable=not main_proc, leave=False)
        for i, batch in enumerate(bar):
            if i >= steps:
                break
            loss = train_step(wrapper, batch, optimizer=optimizer, loss_fn=loss_fn, device=device,
                              num_classes=num_classes, mixup=mixup, cos_reg=args.cos_reg, autocast=autocast,
                              scaler=scaler, clip_grad=args.clip_grad, token_labels=tl, grid=grid,
                              smoothing=args.smoothing)
            if ema is not None:
                ema.update(model, step=epoch * steps + i)
            scheduler.step_update(num_updates=epoch * steps + i + 1)
            loss_m.update(loss, batch[0].size(0))
            bar.set_postfix(loss=f"{loss_m.avg:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        scheduler.step(epoch + 1)
        row = {"epoch": epoch, "train_loss": _reduce({"l": loss_m.avg}, world, device)["l"],
               "lr": optimizer.param_groups[0]["lr"], "time_s": round(time.time() - t0, 2)}
        metric, source = None, None
        if loader_val is not None:
            m = evaluate(model, loader_val, device, autocast, show=main_proc)
            row.update({f"val_{k}": v for k, v in m.items()})
            metric, source = m["top1"], "model"
            if ema is not None:
                me = evaluate(ema.module, loader_val, device, autocast, show=main_proc)
                row.update({f"ema_{k}": v for k, v in me.items()})
                if me["top1"] > metric:  # best.pth: the better of model and EMA
                    metric, source = me["top1"], "ema"
        rows.append(row)
        if main_proc:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            is_best = metric is not None and (best is None or metric > best)
            if is_best:
                best = metric
            ck = {"epoch": epoch, "model": args.model, "num_classes": num_classes,
                  "args": {k: v for k, v in vars(args).items()}, "state_dict": model.state_dict(),
                  "state_dict_ema": ema.module.state_dict() if ema is not None else None,
                  "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                  "best": best, "metric": metric, "metric_source": source, "log": rows}
            torch.save(ck, os.path.join(out_dir, "last.pth"))
            if is_best:
                torch.save(ck, os.path.join(out_dir, "best.pth"))
            write_logs(rows, out_dir, plot=not args.no_plot)
    if world > 1:
        torch.distributed.destroy_process_group()
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
