"""Helpers for the training tests: a tiny image folder with dense label maps, a tiny config."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

TINY_KWARGS = {"embed_dim": 48, "depth": 4, "num_heads": 4, "patch_size": 16}


def make_image_folder(root, classes=3, per_class=8, size=48, labels_root=None, label_hw=(3, 3), seed=0):
    """root/<split>/<class>/img_i.png for split train and val, class-dependent colours so it is
    learnable; with labels_root, a [2, 5, h, w] fp16 label map per training image."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class if split == "train" else max(per_class // 2, 2)):
                base = np.zeros((size, size, 3), np.float32)
                base[..., c % 3] = 200
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"img_{i}.png"))
                if labels_root and split == "train":
                    ld = os.path.join(labels_root, f"class{c}")
                    os.makedirs(ld, exist_ok=True)
                    h, w = label_hw
                    idx = torch.stack([(torch.full((h, w), c) + k) % classes for k in range(5)]).float()
                    logits = torch.tensor([5., 2., 1., 0., -1.])[:, None, None].expand(5, h, w)
                    torch.save(torch.stack([logits, idx]).half(), os.path.join(ld, f"img_{i}.pt"))
    return root
