"""Token labelling (re-labelling) for Refiner-ViT: dataset, label-map transforms, targets, loss.

Label maps
----------
One file per training image, mirroring the image tree: the image
``TRAIN/<class>/<name>.jpg`` has its map at ``LABELS/<class>/<name>.pt``. A map is
an fp16 tensor of shape ``[2, 5, h, w]``: ``map[0]`` the top-5 logits of a strong
teacher at each of the ``h x w`` locations, ``map[1]`` their class indices (stored
as floats). Any ``k`` in place of 5 works.

Alignment with the image
------------------------
The dataset applies the geometric transforms to the image and *records* them
(crop box in normalised image coordinates and the flip flag); the dense targets
are then built on the whole batch (on the training device) by
:func:`dense_targets`: top-k logits -> softmax over the k -> scattered into a
``(C, h, w)`` probability map -> ``torchvision.ops.roi_align`` of the crop box
onto the model's patch grid -> horizontal flip where the image was flipped ->
renormalised to sum to 1. torchvision boxes are ``(x1, y1, x2, y2)`` with
``x`` = column and ``y`` = row, in label-map pixels (``aligned=True``: pixel
``i`` covers ``[i, i+1)``; adaptive sampling, ``ceil(bin size)`` samples per bin side, so
a crop of the whole map at its own size is the identity and a 2x downsampling averages
2x2 blocks).

RandAugment's geometric ops (Rotate, ShearX/Y, TranslateX/Y[Rel]) are recorded too:
the transform composes the affine maps PIL applied (output pixel -> input pixel) and
:func:`dense_targets` applies the same map to the cropped, flipped target with
``grid_sample`` (bilinear; tokens whose centre falls outside the source image get an
all-zero target, i.e. no dense loss, as the image shows fill colour there). ``label_affine=False`` gives the original
TokenLabeling/Refiner behaviour, where only the crop and the flip reach the labels.
Photometric ops and random erasing act on the image only; Mixup/CutMix are applied
to the dense targets by :class:`DenseMixup`.
"""
from __future__ import annotations

import math
import os
import random
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup, create_dataset
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

__all__ = ["TokenLabelTransform", "TokenLabelDataset", "label_path_for", "dense_targets", "crop_label_map",
           "topk_to_dense", "make_label_maps",
           "DenseMixup", "mixtoken_targets", "soft_cross_entropy", "TokenLabelLoss"]


# --------------------------------------------------------------------------- transforms

class TokenLabelTransform:
    """Training transform that records the geometry the label map must follow.

    ``__call__(img) -> (tensor, meta)`` with ``meta`` float32 of 11 values: the crop box
    ``x1, y1, x2, y2`` normalised to [0, 1] of the (original) image width/height, the flip flag,
    and the 2x3 ``affine_grid`` matrix (output -> input, normalised coordinates) of RandAugment's
    geometric ops (identity when none ran or ``label_affine=False``).
    Same pipeline as timm's training transform: RandomResizedCrop (timm's, with
    ``interpolation='random'`` support) -> hflip -> RandAugment -> ToTensor ->
    Normalize -> RandomErasing (pixel mode).
    """

    def __init__(self, img_size: int = 224, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), hflip: float = 0.5,
                 interpolation: str = "random", auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), re_prob: float = 0.25, re_mode: str = "pixel",
                 re_count: int = 1, rand_augment_transforms: Optional[Sequence[str]] = None,
                 label_affine: bool = True):
        self.size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.rrc = RandomResizedCropAndInterpolation(self.size, scale=scale, ratio=ratio,
                                                     interpolation=interpolation)
        self.hflip = hflip
        self.ra = None
        if auto_augment:
            if not auto_augment.startswith("rand"):
                raise ValueError(f"auto_augment: token labelling supports RandAugment ('rand-...'), "
                                 f"got {auto_augment!r}")
            hp = dict(translate_const=int(min(self.size) * 0.45),
                      img_mean=tuple(min(255, round(255 * m)) for m in mean))
            hp["interpolation"] = str_to_pil_interp("bicubic")
            self.ra = rand_augment_transform(auto_augment, hp, transforms=rand_augment_transforms)
            if label_affine:
                for op in self.ra.ops:
                    if op.name in _GEOMETRIC_OPS:
                        op.aug_fn = self._recording(op.name, op.aug_fn)
        self._m = np.eye(3)
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device="cpu") if re_prob > 0 else None

    def _recording(self, name, fn):
        def wrapped(img, *args, **kwargs):
            self._m = self._m @ _pil_affine(name, img.size, *args)
            return fn(img, *args, **kwargs)
        return wrapped

    def __call__(self, img: Image.Image):
        self._m = np.eye(3)
        W, H = img.size
        i, j, h, w = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
        interp = self.rrc.interpolation
        if isinstance(interp, (tuple, list)):
            interp = random.choice(interp)
        img = TF.resized_crop(img, i, j, h, w, list(self.size), interp)
        flipped = random.random() < self.hflip
        if flipped:
            img = TF.hflip(img)
        if self.ra is not None:
            img = self.ra(img)
        x = self.to_tensor(img)
        if self.erase is not None:
            x = self.erase(x)
        theta = _to_normalised(self._m, *self.size)
        meta = torch.tensor([j / W, i / H, (j + w) / W, (i + h) / H, float(flipped), *theta.reshape(-1)],
                            dtype=torch.float32)
        return x, meta


_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


def _pil_affine(name: str, size, arg) -> np.ndarray:
    """3x3 output->input pixel map of timm's geometric RandAugment op ``name`` (PIL convention:
    continuous coordinates, pixel i covers [i, i+1))."""
    w, h = size
    a = [1., 0., 0., 0., 1., 0.]
    if name == "ShearX":
        a[1] = arg
    elif name == "ShearY":
        a[3] = arg
    elif name in ("TranslateX", "TranslateXRel"):
        a[2] = arg * w if name.endswith("Rel") else arg
    elif name in ("TranslateY", "TranslateYRel"):
        a[5] = arg * h if name.endswith("Rel") else arg
    elif name == "Rotate":  # PIL Image.rotate(degrees) about the centre, no expand
        t = -math.radians(arg)
        cx, cy = w / 2.0, h / 2.0
        c, s = math.cos(t), math.sin(t)
        a = [c, s, 0., -s, c, 0.]
        a[2] = c * -cx + s * -cy + cx
        a[5] = -s * -cx + c * -cy + cy
    else:
        raise ValueError(name)
    return np.array([a[0:3], a[3:6], [0., 0., 1.]])


def _to_normalised(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixel output->input map -> ``affine_grid`` theta (2x3) in [-1, 1] coordinates (align_corners=False)."""
    n = np.array([[2. / w, 0., -1.], [0., 2. / h, -1.], [0., 0., 1.]])  # pixel -> normalised
    return (n @ m @ np.linalg.inv(n))[:2]


def label_path_for(image_path: str, image_root: str, label_root: str, ext: str = ".pt") -> str:
    """``image_root/<class>/<name>.jpg`` -> ``label_root/<class>/<name>.pt``."""
    rel = os.path.relpath(image_path, image_root)
    return os.path.join(label_root, os.path.splitext(rel)[0] + ext)


class TokenLabelDataset(torch.utils.data.Dataset):
    """An image folder (scanned by ``timm.data.create_dataset``) plus per-image dense label maps.

    Returns ``(image, (class_index, label_map [2, k, h, w] fp16, meta [5]))``; see
    :class:`TokenLabelTransform` for ``meta`` and :func:`dense_targets` to turn a batch
    of maps into per-token soft targets.
    """

    def __init__(self, root: str, label_root: str, transform: TokenLabelTransform, class_map=None):
        self.root = root
        self.label_root = label_root
        self.base = create_dataset("", root=root, is_training=True, class_map=class_map)
        self.base.transform = None
        self.transform = transform
        missing = [p for p in (self.label_path(k) for k in range(min(len(self.base), 16))) if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"token labels: no label map {missing[0]!r} for its image; the label tree "
                                    f"must mirror {root!r} (e.g. labels/<class>/<name>.pt)")

    @property
    def num_classes(self) -> int:
        return len(self.base.reader.class_to_idx)

    def label_path(self, index: int) -> str:
        return label_path_for(self.base.filename(index, absolute=True), os.path.abspath(self.root),
                              self.label_root)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, target = self.base[index]
        label_map = torch.load(self.label_path(index), map_location="cpu", weights_only=True)
        if label_map.ndim != 4 or label_map.shape[0] != 2:
            raise ValueError(f"label map {self.label_path(index)!r}: expected shape [2, k, h, w], "
                             f"got {tuple(label_map.shape)}")
        x, meta = self.transform(img)
        return x, (torch.as_tensor(target), label_map.to(torch.float16), meta)


# --------------------------------------------------------------------------- dense targets

def topk_to_dense(label_maps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 2, k, h, w) top-k logits/indices -> (B, C, h, w) probabilities (softmax over the k)."""
    logits = label_maps[:, 0].float()
    idx = label_maps[:, 1].round().long()
    if idx.min() < 0 or idx.max() >= num_classes:
        raise ValueError(f"label maps: class index out of range [0, {num_classes}) "
                         f"(got {int(idx.min())}..{int(idx.max())})")
    probs = logits.softmax(1)
    B, k, h, w = probs.shape
    out = probs.new_zeros(B, num_classes, h, w)
    return out.scatter_add_(1, idx, probs)


def crop_label_map(dense: torch.Tensor, boxes: torch.Tensor, out_size: Tuple[int, int]) -> torch.Tensor:
    """RoI-align normalised crop boxes (B, 4) = (x1, y1, x2, y2) (x = column) of (B, C, h, w) maps."""
    B, C, h, w = dense.shape
    scale = boxes.new_tensor([w, h, w, h])
    rois = torch.cat([torch.arange(B, dtype=boxes.dtype, device=boxes.device)[:, None], boxes * scale], 1)
    return roi_align(dense, rois.to(dense.dtype), output_size=out_size, spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)


def dense_targets(label_maps: torch.Tensor, meta: torch.Tensor, num_classes: int,
                  grid: Tuple[int, int]) -> torch.Tensor:
    """Per-token soft targets (B, gh*gw, C) on the model's patch grid from a batch of label maps.

    ``label_maps`` (B, 2, k, h, w), ``meta`` (B, 5) or (B, 11) from :class:`TokenLabelTransform`:
    crop (RoI-align), then flip, then the recorded affine map (``grid_sample``), then renormalise.
    """
    dense = topk_to_dense(label_maps, num_classes)
    out = crop_label_map(dense, meta[:, :4].to(dense.device), grid)  # (B, C, gh, gw)
    flip = meta[:, 4].to(out.device) > 0.5
    if flip.any():
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if meta.shape[1] >= 11:
        theta = meta[:, 5:11].to(out.device, torch.float32).reshape(-1, 2, 3)
        eye = torch.tensor([[1., 0., 0.], [0., 1., 0.]], device=out.device)
        moved = (theta - eye).abs().amax((1, 2)) > 1e-6
        if moved.any():
            g = F.affine_grid(theta[moved], [int(moved.sum()), *out.shape[1:]], align_corners=False)
            inside = (g.abs() <= 1).all(-1)[:, None].to(out.dtype)  # token centre maps into the source
            out = out.clone()
            out[moved] = F.grid_sample(out[moved], g, mode="bilinear", padding_mode="border",
                                       align_corners=False) * inside
    out = out / out.sum(1, keepdim=True).clamp_min(1e-8)
    return out.flatten(2).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- mixing

class DenseMixup(Mixup):
    """timm ``Mixup`` (batch mode) that also mixes per-token dense targets consistently.

    Call as usual (``x, target = mixup(x, target)``), then ``mix_dense(dense, grid, img_hw)``
    with the (B, gh*gw, C) dense targets: a blend mixes them with the same ``lam``; a CutMix
    box mixes each token by the fraction of its patch inside the box.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mode != "batch":
            raise ValueError("DenseMixup: token labelling needs mixup mode 'batch'")
        self.last_lam, self.last_box = 1.0, None

    def _mix_batch(self, x):
        from timm.data.mixup import cutmix_bbox_and_lam
        lam, use_cutmix = self._params_per_batch()
        self.last_lam, self.last_box = 1.0, None
        if lam == 1.:
            return 1.
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(x.shape, lam, ratio_minmax=self.cutmix_minmax,
                                                        correct_lam=self.correct_lam)
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
            self.last_box = (yl, yh, xl, xh)
        else:
            x_flipped = x.flip(0).mul_(1. - lam)
            x.mul_(lam).add_(x_flipped)
        self.last_lam = lam
        return lam

    def mix_dense(self, dense: torch.Tensor, grid: Tuple[int, int], img_hw: Tuple[int, int]) -> torch.Tensor:
        if self.last_lam == 1. and self.last_box is None:
            return dense
        if self.last_box is None:
            return self.last_lam * dense + (1 - self.last_lam) * dense.flip(0)
        yl, yh, xl, xh = self.last_box
        gh, gw = grid
        H, W = img_hw
        ph, pw = H / gh, W / gw
        r0 = torch.arange(gh, dtype=torch.float32) * ph
        c0 = torch.arange(gw, dtype=torch.float32) * pw
        fr = ((torch.clamp(r0 + ph, max=yh) - torch.clamp(r0, min=yl)).clamp_min(0) / ph)
        fc = ((torch.clamp(c0 + pw, max=xh) - torch.clamp(c0, min=xl)).clamp_min(0) / pw)
        frac = (fr[:, None] * fc[None, :]).reshape(1, gh * gw, 1).to(dense)
        return (1 - frac) * dense + frac * dense.flip(0)


def mixtoken_targets(cls_target: torch.Tensor, dense_target: Optional[torch.Tensor], box, grid: Tuple[int, int],
                     dense_unmixed: bool = True):
    """Targets for a MixToken batch. ``box = (x1, y1, x2, y2)`` on the patch grid: rows x1:x2,
    columns y1:y2, mixed in from the flipped batch (``batch.flip(0)``).

    Class token: ``lam' * t + (1 - lam') * t.flip(0)`` with ``lam' = 1 - box_area / (h*w)``.
    Dense: :class:`refiner.models.RefinerViT` already un-mixes its dense logits (token (b, box)
    is moved back to image b), so with ``dense_unmixed=True`` (our model) the dense targets stay
    as they are; for a model returning *mixed* dense logits pass ``False`` and the targets in the
    box are taken from the flipped batch, mirroring the token mix.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    h, w = grid
    area = max(x2 - x1, 0) * max(y2 - y1, 0)
    if area == 0:
        return cls_target, dense_target
    lam = 1. - area / float(h * w)
    cls_target = lam * cls_target + (1. - lam) * cls_target.flip(0)
    if dense_target is not None and not dense_unmixed:
        B, N, C = dense_target.shape
        d = dense_target.reshape(B, h, w, C)
        mixed = d.clone()
        mixed[:, x1:x2, y1:y2] = d.flip(0)[:, x1:x2, y1:y2]
        dense_target = mixed.reshape(B, N, C)
    return cls_target, dense_target


# --------------------------------------------------------------------------- loss

def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all leading dims of ``sum_c -target_c * log_softmax(logits)_c``."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class TokenLabelLoss(torch.nn.Module):
    """``cls_weight * CE(cls_logits, t_cls) + dense_weight * mean_tokens CE(dense_logits, t_dense)``.

    ``outputs = (cls_logits (B, C), dense_logits (B, N, C), box)`` as the model returns in
    training; ``cls_target`` (B, C) soft (mixup'd, smoothed) image targets; ``dense_target``
    (B, N, C) soft per-token targets (already aligned and Mixup-mixed). The MixToken box
    is folded in with :func:`mixtoken_targets` (``dense_unmixed``: see there). Without dense targets (``None``) the class
    target is used for every token, as in the released code.
    """

    def __init__(self, dense_weight: float = 0.5, cls_weight: float = 1.0, dense_unmixed: bool = True):
        super().__init__()
        self.dense_weight, self.cls_weight, self.dense_unmixed = dense_weight, cls_weight, dense_unmixed

    def forward(self, outputs, cls_target: torch.Tensor, dense_target: Optional[torch.Tensor] = None,
                grid: Optional[Tuple[int, int]] = None):
        cls_logits, dense_logits, box = outputs
        B, N, C = dense_logits.shape
        if grid is None:
            s = int(round(math.sqrt(N)))
            if s * s != N:
                raise ValueError(f"dense logits: {N} tokens is not a square patch grid; pass grid=(h, w)")
            grid = (s, s)
        h, w = grid
        if dense_target is None:
            dense_target = cls_target[:, None, :].expand(B, N, C)
        cls_target, dense_target = mixtoken_targets(cls_target, dense_target, box, (h, w), self.dense_unmixed)
        return self.cls_weight * soft_cross_entropy(cls_logits, cls_target) + \
            self.dense_weight * soft_cross_entropy(dense_logits, dense_target)


# --------------------------------------------------------------------------- label-map generation

@torch.no_grad()
def make_label_maps(image_root: str, out_root: str, teacher: str, pretrained: bool = True,
                    teacher_checkpoint: str = "", num_classes: Optional[int] = None, img_size: Optional[int] = None,
                    topk: int = 5, batch_size: int = 32, workers: int = 4, device: Optional[str] = None) -> int:
    """Write ``out_root/<class>/<name>.pt`` ([2, topk, h, w] fp16) for every image under ``image_root``.

    The teacher is any timm CNN whose head is global pooling + a linear (or 1x1 conv) classifier
    (ResNet, NFNet, EfficientNet, ...): the classifier is applied at every location of its final
    feature map, as in TokenLabeling's NFNet-F6 maps. The *whole* image is resized (no crop) so
    the map covers the image the training crops are taken from. The teacher's class indices must
    be the dataset's (timm's image folder: sorted class-folder names). Returns the number of maps.
    """
    import timm
    from timm.data import resolve_data_config
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kw = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(teacher, pretrained=pretrained, **kw)
    if teacher_checkpoint:
        from timm.models import load_checkpoint
        load_checkpoint(model, teacher_checkpoint)
    model.eval().to(dev)
    head = model.get_classifier()
    if not isinstance(head, (torch.nn.Linear, torch.nn.Conv2d)):
        raise ValueError(f"teacher {teacher!r}: classifier {type(head).__name__} is not a Linear / 1x1 conv")
    n_cls = head.out_features if isinstance(head, torch.nn.Linear) else head.out_channels
    if not 1 <= topk <= n_cls:
        raise ValueError(f"topk={topk} (--topk): expected 1 to the teacher's {n_cls} classes")
    cfg = resolve_data_config({}, model=model)
    size = img_size or cfg["input_size"][-1]
    tf = T.Compose([T.Resize((size, size), interpolation=str_to_pil_interp(cfg["interpolation"])), T.ToTensor(),
                    T.Normalize(cfg["mean"], cfg["std"])])
    ds = create_dataset("", root=image_root, is_training=False, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    root = os.path.abspath(image_root)
    n = 0
    from tqdm import tqdm
    for x, _ in tqdm(loader, desc="label maps"):
        f = model.forward_features(x.to(dev))
        if f.ndim != 4:
            raise ValueError(f"teacher {teacher!r}: expected NCHW features, got shape {tuple(f.shape)}")
        if isinstance(head, torch.nn.Linear):
            logits = head(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            logits = head(f)
        val, idx = logits.float().topk(topk, dim=1)  # (B, k, h, w)
        maps = torch.stack([val, idx.float()], 1).half().cpu()
        for m in maps:
            path = label_path_for(ds.filename(n, absolute=True), root, out_root)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(m.clone(), path)
            n += 1
    return n


def main(argv=None):
    import argparse
    from . import cli
    p = argparse.ArgumentParser(prog="python -m refiner.token_labeling",
                                description="Write dense top-k label maps for token labelling with a timm CNN teacher.")
    p.add_argument("--data", required=True, type=cli.existing_dir, help="training image folder (<class>/<image>)")
    p.add_argument("--out", required=True, type=cli.output_dir, help="label root; mirrors --data")
    p.add_argument("--teacher", default="resnet50.a1_in1k", type=cli.model_name, help="timm model name")
    p.add_argument("--no-pretrained", action="store_true", help="don't load the teacher's pretrained weights")
    p.add_argument("--teacher-checkpoint", default="", type=cli.existing_file,
                   help="teacher weights (e.g. fine-tuned on your classes)")
    p.add_argument("--num-classes", type=cli.positive_int, default=None)
    p.add_argument("--img-size", type=cli.positive_int, default=None, help="teacher input size (default: its own)")
    p.add_argument("--topk", type=cli.positive_int, default=5)
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--workers", type=cli.nonnegative_int, default=4)
    p.add_argument("--device", default=None, type=cli.device)
    a = p.parse_args(argv)
    n = make_label_maps(a.data, a.out, a.teacher, pretrained=not a.no_pretrained,
                        teacher_checkpoint=a.teacher_checkpoint, num_classes=a.num_classes, img_size=a.img_size,
                        topk=a.topk, batch_size=a.batch_size, workers=a.workers, device=a.device)
    print(f"wrote {n} label maps under {a.out}")


if __name__ == "__main__":
    main()
