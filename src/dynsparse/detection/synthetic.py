"""A synthetic COCO-format detection set: coloured shapes on textured backgrounds.

No COCO download is possible here, so the built-in DETR is trained and evaluated on this set. The class of
an object is its *shape* (colour is random), so the detector has to look at geometry, not just colour;
the textured backgrounds keep the task from being solved by a colour threshold. Everything is derived
from one seed, so the same call always writes the same files.

Layout written under ``root`` (the standard COCO layout, so every COCO tool reads it)::

    root/train/000000.png ...           root/annotations/instances_train.json
    root/val/000000.png ...             root/annotations/instances_val.json
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_dir

CLASSES = ("circle", "square", "triangle", "cross")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-contrast texture: a smooth colour gradient, random stripes or checks, and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    t = (xx * math.cos(rng.uniform(0, math.pi)) + yy * math.sin(rng.uniform(0, math.pi)))[..., None]
    img = c0 * (1 - t) + c1 * t
    kind = rng.integers(3)
    period = rng.uniform(6, 20)
    if kind == 0:  # stripes
        pattern = np.sin(2 * math.pi * (xx * math.cos(rng.uniform(0, math.pi)) + yy) * size / period)
    elif kind == 1:  # checks
        pattern = np.sign(np.sin(2 * math.pi * xx * size / period) * np.sin(2 * math.pi * yy * size / period))
    else:  # blobs
        pattern = np.sin(xx * rng.uniform(5, 15)) * np.cos(yy * rng.uniform(5, 15))
    img = img + pattern[..., None] * rng.uniform(10, 30)
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, cls: str, x: float, y: float, s: float, colour) -> None:
    if cls == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=colour)
    elif cls == "square":
        draw.rectangle([x, y, x + s, y + s], fill=colour)
    elif cls == "triangle":
        draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=colour)
    else:  # cross: two bars of a third of the size
        t = s / 3
        draw.rectangle([x + t, y, x + 2 * t, y + s], fill=colour)
        draw.rectangle([x, y + t, x + s, y + 2 * t], fill=colour)


def _iou(a, b) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax2, bx2) - max(a[0], b[0])), max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def make_image(rng: np.random.Generator, size: int, min_objects: int = 1, max_objects: int = 6,
               min_side: int = 14, max_side: int = 48):
    """One image and its objects as (category index, [x, y, w, h], pixel area)."""
    img = Image.fromarray(_background(rng, size))
    boxes: list[list[float]] = []
    objects = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _attempt in range(20):  # place without heavy overlap, so every object stays visible
            s = float(rng.uniform(min_side, max_side))
            x, y = float(rng.uniform(0, size - s - 1)), float(rng.uniform(0, size - s - 1))
            if all(_iou([x, y, s, s], b) < 0.2 for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(len(CLASSES)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        mask = Image.new("L", (size, size))
        _draw_shape(ImageDraw.Draw(mask), CLASSES[cls], x, y, s, 255)
        m = np.asarray(mask) > 0
        ys, xs = np.nonzero(m)
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        _draw_shape(ImageDraw.Draw(img), CLASSES[cls], x, y, s, colour)
        boxes.append(box)
        objects.append((cls, box, int(m.sum())))
    # later shapes may cover earlier ones a little; boxes stay those of the full shapes (as COCO's amodal boxes)
    return img, objects


def _split(root: Path, split: str, n: int, size: int, rng: np.random.Generator) -> None:
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        img, objects = make_image(rng, size)
        fname = f"{i:06d}.png"
        img.save(root / split / fname)
        images.append({"id": i + 1, "file_name": fname, "width": size, "height": size})
        for cls, box, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": [round(v, 2) for v in box], "area": float(area), "iscrowd": 0})
    coco = {
        "info": {"description": "dynsparse synthetic shapes", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def make_synthetic_coco(root: str | os.PathLike, n_train: int = 3000, n_val: int = 400, image_size: int = 128,
                        seed: int = 0, overwrite: bool = False) -> Path:
    """Write the synthetic set under ``root`` and return it. Built in a temporary sibling directory and
    moved into place at the end, so an interrupted run never leaves a half-written set behind."""
    root = Path(root)
    if n_train < 0 or n_val < 1 or image_size < 64:
        raise ValueError(f"need n_train >= 0, n_val >= 1, image_size >= 64; got {n_train}, {n_val}, {image_size}")
    if root.exists():
        if not overwrite:
            raise FileExistsError(f"{root} already exists (pass overwrite=True to replace it)")
    with atomic_dir(root) as tmp:
        rng = np.random.default_rng(seed)
        if n_train:
            _split(tmp, "train", n_train, image_size, rng)
        _split(tmp, "val", n_val, image_size, rng)
    return root


def default_synthetic_root() -> Path:
    """Where commands keep the built-in synthetic set (the exact set the built-in DETR was trained and
    validated on: same generator, n_train=3000, n_val=400, seed 0), generated on first use."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dynsparse"
    root = base / "synth_coco_v1"
    if not (root / "annotations" / "instances_val.json").is_file():
        make_synthetic_coco(root, 3000, 400, seed=0, overwrite=True)
    return root
