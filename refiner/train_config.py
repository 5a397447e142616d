"""Command line and YAML configuration of ``refiner.train``.

Precedence: parser defaults < YAML file (``-c/--config``) < flags given on the command
line. YAML keys are the flags' ``dest`` names (``--drop-path`` -> ``drop_path``); an
unknown key is an error, so a typo does not silently fall back to a default.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence, Tuple

import yaml
from timm.utils import ParseKwargs

from .cli import (auto_augment, compile_backend, device, existing_dir, existing_file, float_in, model_name,
                  nonnegative_float, nonnegative_int, output_dir, positive_float, positive_int, probability)

__all__ = ["build_parser", "parse_args"]

# Adam-style betas in [0, 1) as torch checks them; a --scale end is a fraction of the image's area
# (above 1 the crop would not fit, torchvision silently falls back to a centre crop)
beta = float_in(0, 1, hi_open=True)
area_fraction = float_in(0, 1, lo_open=True)

# timm schedulers that step per update (train.py calls step_update); 'plateau' steps per epoch only.
SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "poly", "wsd", "rsqrt")
# What timm 1.0 acts on; anything else it takes silently as a default (Mixup: 'batch', RandomErasing:
# 'const') or fails on late (interpolation, a KeyError when the loader is built).
RE_MODES = ("const", "rand", "pixel")  # timm.data.RandomErasing
MIXUP_MODES = ("batch", "pair", "elem")  # timm.data.Mixup ('half' is FastCollateMixup's, not used here)
INTERPOLATIONS = ("random", "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm.data.transforms


def optimizer_name(s: str) -> str:
    """timm optimiser name, optionally 'lookahead_'-prefixed (create_optimizer_v2 reads only the last
    '_' part and a leading 'lookahead', so 'foo_adamw' would silently be plain adamw)."""
    from timm.optim import list_optimizers
    *prefix, name = s.lower().split("_")
    if name not in list_optimizers() or prefix not in ([], ["lookahead"]):
        raise argparse.ArgumentTypeError(f"unknown optimiser {s!r} (e.g. adamw, sgd, lamb, lookahead_adamw; see "
                                         f"timm.optim.list_optimizers())")
    return s


def seed(s) -> int:
    """timm's random_seed seeds numpy, which takes [0, 2**32) only (with seed + rank)."""
    v = nonnegative_int(s)
    if v >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"expected an integer < 2**32, got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m refiner.train",
                                description="Train Refiner-ViT (timm building blocks). "
                                            "Precedence: defaults < YAML (-c) < command-line flags.")
    B = argparse.BooleanOptionalAction
    p.add_argument("-c", "--config", default="", type=existing_file,
                   help="YAML file of defaults (keys = option dest names)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="", type=existing_dir,
                   help="dataset root holding <train-split>/ and <val-split>/ image folders")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val", help="'' to skip validation")
    g.add_argument("--token-labels", default="", type=existing_dir,
                   help="root of the dense label maps (mirrors the train folder); turns on token labelling")
    g.add_argument("--workers", type=nonnegative_int, default=8)
    g.add_argument("--pin-mem", action=B, default=True)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="refiner_vit_s", type=model_name)
    g.add_argument("--num-classes", type=positive_int, default=None, help="default: number of class folders")
    g.add_argument("--img-size", type=positive_int, default=224)
    # no upper bound: above 1 timm resizes below --img-size and pads, as refiner_vit_l's own 1.13 does
    g.add_argument("--crop-pct", type=positive_float, default=None,
                   help="eval crop; default: the model's pretrained_cfg")
    g.add_argument("--drop", type=probability, default=0.0)
    g.add_argument("--drop-path", type=probability, default=0.1)
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra model kwargs, e.g. embed_dim=48 depth=4")
    g.add_argument("--return-dense", action=B, default=False, help="dense aux head (token labelling)")
    g.add_argument("--mix-token", action=B, default=False, help="MixToken (needs --return-dense)")
    g.add_argument("--dense-weight", type=nonnegative_float, default=0.5)
    g.add_argument("--label-affine", action=B, default=True,
                   help="token labels follow RandAugment's rotate/shear/translate (--no-label-affine: only crop "
                        "and flip, as the original TokenLabeling)")
    g.add_argument("--cos-reg", type=nonnegative_float, default=0.0,
                   help="weight of the attention-map cosine regulariser")
    g.add_argument("--fused", action=B, default=False, help="convert to the fused kernels (refiner.fused)")
    g.add_argument("--grad-checkpointing", action=B, default=False,
                   help="recompute the blocks' activations in the backward (less memory, ~1 more forward)")
    g.add_argument("--initial-checkpoint", default="", type=existing_file,
                   help="load model weights (not training state)")
    g = p.add_argument_group("optimiser and schedule")
    g.add_argument("--opt", default="adamw", type=optimizer_name)
    g.add_argument("--lr", type=positive_float, default=None,
                   help="absolute lr; default lr-base * global_batch / lr-base-size")
    g.add_argument("--lr-base", type=positive_float, default=5e-4)
    g.add_argument("--lr-base-size", type=positive_int, default=1024)
    g.add_argument("--weight-decay", type=nonnegative_float, default=0.05)
    g.add_argument("--layer-decay", type=float_in(0, 1, lo_open=True), default=None,
                   help="layer-wise lr decay per block (fine-tuning; None: off)")
    g.add_argument("--opt-eps", type=positive_float, default=None)
    g.add_argument("--opt-betas", type=beta, nargs="+", default=None, help="as many as --opt takes (Adam: 2)")
    g.add_argument("--momentum", type=float_in(0, 1), default=0.9)
    g.add_argument("--clip-grad", type=positive_float, default=None, help="gradient norm clipping (None: off)")
    g.add_argument("--sched", default="cosine", choices=SCHEDULERS)
    g.add_argument("--epochs", type=positive_int, default=300)
    g.add_argument("--warmup-epochs", type=nonnegative_int, default=5)
    # 0 is a usual warmup start and annealing floor (timm's own min_lr default): only these two may be 0
    g.add_argument("--warmup-lr", type=nonnegative_float, default=1e-6)
    g.add_argument("--min-lr", type=nonnegative_float, default=1e-5)
    g.add_argument("--cooldown-epochs", type=nonnegative_int, default=0)
    g.add_argument("--batch-size", "-b", type=positive_int, default=128, help="per process")
    g.add_argument("--val-batch-size", type=positive_int, default=None)
    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", type=auto_augment,
                   help="timm auto_augment string ('' for none)")
    g.add_argument("--reprob", type=probability, default=0.25)
    g.add_argument("--remode", default="pixel", choices=RE_MODES)
    # RandomErasing takes max_count=0 as 1: --reprob 0 turns erasing off
    g.add_argument("--recount", type=positive_int, default=1)
    g.add_argument("--scale", type=area_fraction, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
                   help="area fraction range of the random crop")
    g.add_argument("--ratio", type=positive_float, nargs=2, default=[3. / 4., 4. / 3.], metavar=("MIN", "MAX"),
                   help="aspect ratio range of the random crop")
    g.add_argument("--hflip", type=probability, default=0.5)
    g.add_argument("--color-jitter", type=nonnegative_float, default=0.4)
    g.add_argument("--train-interpolation", default="random", choices=INTERPOLATIONS)
    g.add_argument("--mixup", type=nonnegative_float, default=0.8, help="mixup Beta alpha (0: off)")
    g.add_argument("--cutmix", type=nonnegative_float, default=1.0, help="cutmix Beta alpha (0: off)")
    g.add_argument("--mixup-prob", type=probability, default=1.0)
    g.add_argument("--mixup-switch-prob", type=probability, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=MIXUP_MODES)
    g.add_argument("--smoothing", type=float_in(0, 1, hi_open=True), default=0.1)  # timm asserts < 1
    g.add_argument("--model-ema", action=B, default=True)
    g.add_argument("--model-ema-decay", type=float_in(0, 1), default=0.99996)
    g.add_argument("--model-ema-warmup", action=B, default=False,
                   help="ramp the EMA decay up (timm ModelEmaV3 warmup); useful for short runs")
    g = p.add_argument_group("run")
    g.add_argument("--output", default="", type=output_dir, help="output dir (default output/<model>-<time>)")
    g.add_argument("--resume", default="", type=existing_file,
                   help="checkpoint to resume model, optimiser, EMA, scaler, epoch")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, type=compile_backend,
                   help="torch.compile the training step's forward and backward with this backend (inductor when "
                        "given bare); with --fused the compiler keeps the fused ops whole and fuses the work "
                        "between them. Validation runs eager")
    g.add_argument("--amp", action=B, default=True, help="bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    g.add_argument("--amp-dtype", default=None, choices=[None, "float16", "bfloat16"])
    g.add_argument("--device", default=None, type=device, help="default: cuda if available else cpu")
    g.add_argument("--seed", type=seed, default=42)
    g.add_argument("--steps-per-epoch", type=positive_int, default=None,
                   help="cap on steps per epoch (smoke tests)")
    g.add_argument("--log-interval", type=positive_int, default=50)
    g.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, dict]:
    """Returns (args, yaml_dict). Defaults < YAML < explicit flags."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    cfg = {}
    if pre.config:
        where = f"-c/--config {pre.config}"
        try:
            with open(pre.config) as f:
                cfg = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            parser.error(f"{where}: not a readable YAML file ({e})")
        cfg = {} if cfg is None else cfg
        if not isinstance(cfg, dict):
            parser.error(f"{where}: expected a mapping of option names to values, got a {type(cfg).__name__}")
        # args.yaml of an earlier run names its own config: it does not chain, so it is dropped
        cfg.pop("config", None)
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        unknown = sorted(str(k) for k in set(cfg) - set(actions))
        if unknown:
            parser.error(f"{where}: unknown keys {unknown}")
        for key, value in cfg.items():
            try:
                cfg[key] = _yaml_value(actions[key], value)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                parser.error(f"{where}: {key} (--{key.replace('_', '-')}): {e}")
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    if args.mix_token and not args.return_dense:
        parser.error("--mix-token needs --return-dense")
    if args.token_labels and not args.return_dense:
        parser.error("--token-labels needs --return-dense (use a *_tl.yaml config)")
    if args.token_labels and args.aa and not args.aa.startswith("rand"):
        parser.error(f"--aa {args.aa}: token labelling (--token-labels) supports RandAugment ('rand-...') only")
    if args.token_labels and args.mixup_mode != "batch" and (args.mixup > 0 or args.cutmix > 0):
        parser.error(f"--mixup-mode {args.mixup_mode}: token labelling (--token-labels) mixes per batch only")
    if not args.train_split:  # '' would train on --data itself, its val/ folder a class
        parser.error("--train-split: expected a folder name under --data, got ''")
    _check_opt_kwargs(parser, args)
    # after parsing: each end is checked by the flag's type, the order needs both (from a flag or the YAML)
    for flag, (lo, hi) in (("--scale", args.scale), ("--ratio", args.ratio)):
        if lo > hi:
            parser.error(f"{flag} {lo:g} {hi:g}: expected MIN <= MAX")
    return args, cfg


def _check_opt_kwargs(parser, args):
    """create_optimizer_v2 silently drops betas / eps an optimiser does not take; too few betas fail
    only when the optimiser is built (after the data and model), too many AdamW silently cuts to 2."""
    from timm.optim import get_optimizer_info
    info = get_optimizer_info(args.opt.lower().split("_")[-1])
    if args.opt_betas is not None:
        given = f"--opt-betas {' '.join(f'{b:g}' for b in args.opt_betas)}"
        if not info.has_betas:
            parser.error(f"{given}: --opt {args.opt} takes no betas")
        if len(args.opt_betas) != info.num_betas:
            parser.error(f"{given}: --opt {args.opt} takes {info.num_betas} betas, got {len(args.opt_betas)}")
    if args.opt_eps is not None and not info.has_eps:
        parser.error(f"--opt-eps {args.opt_eps:g}: --opt {args.opt} takes no eps")


def _yaml_value(action: argparse.Action, value):
    """A YAML value checked as the flag's own would be: argparse converts and checks only
    string defaults, so without this ``batch_size: -4`` or ``epochs: 2.5`` would pass."""
    if action.nargs == 0:  # switches: store_true, --x/--no-x
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping (e.g. {{embed_dim: 48, depth: 4}}), got {value!r}")
        return value
    if value is None:  # null: "not set", for the options whose default is that (clip_grad, lr, ...)
        if action.default is not None:
            raise ValueError("expected a value (null only for options that default to it), got null")
        return None
    many = action.nargs not in (None, "?")
    if many:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ValueError(f"expected {action.nargs} values, got {len(value)}")
    out = []
    for v in value if many else [value]:
        if isinstance(v, (dict, list)) or (action.type is None and not isinstance(v, str)):
            raise ValueError(f"expected a {'string' if action.type is None else 'single value'}, got {v!r}")
        # str() first: the flag's type sees what the command line would give it (true -> 'True' is no int)
        v = action.type(str(v)) if action.type is not None else v
        if action.choices is not None and v not in action.choices:
            raise ValueError(f"{v!r} is not one of {list(action.choices)}")
        out.append(v)
    return out if many else out[0]
