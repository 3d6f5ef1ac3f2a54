"""COCO-format detection data (an annotation JSON + an image folder), preprocessed by the HF image processor.

Category ids in COCO files are arbitrary integers; DETR wants contiguous labels 0..K-1 (K = "no object").
``CocoDetection`` maps them in category-id order and keeps the map, so predictions can be written back
with the file's own ids for pycocotools.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANN_FIELDS = ("id", "image_id", "category_id", "bbox")


def _check_coco(d, path: Path) -> None:
    """Raise a ValueError naming the first missing/invalid field, so a bad file fails before any compute."""
    if not isinstance(d, dict):
        raise ValueError(f"{path}: top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(d.get(key), list):
            raise ValueError(f"{path}: missing or non-list field '{key}'")
    if not d["categories"]:
        raise ValueError(f"{path}: 'categories' is empty")
    for c in d["categories"]:
        if "id" not in c or "name" not in c:
            raise ValueError(f"{path}: a category lacks 'id' or 'name': {c}")
    image_ids = set()
    for im in d["images"]:
        missing = [f for f in _IMAGE_FIELDS if f not in im]
        if missing:
            raise ValueError(f"{path}: image entry {im.get('id', '?')} lacks field(s) {missing}")
        image_ids.add(im["id"])
    cat_ids = {c["id"] for c in d["categories"]}
    for a in d["annotations"]:
        missing = [f for f in _ANN_FIELDS if f not in a]
        if missing:
            raise ValueError(f"{path}: annotation {a.get('id', '?')} lacks field(s) {missing}")
        if a["image_id"] not in image_ids:
            raise ValueError(f"{path}: annotation {a['id']} refers to unknown image_id {a['image_id']}")
        if a["category_id"] not in cat_ids:
            raise ValueError(f"{path}: annotation {a['id']} has unknown category_id {a['category_id']}")
        if not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4):
            raise ValueError(f"{path}: annotation {a['id']} bbox must be [x, y, w, h]")


def coco_paths(root: str | os.PathLike, split: str = "val") -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split`` in the standard layout root/annotations/instances_<split>.json
    and root/<split>/."""
    root = Path(root)
    ann, img_dir = root / "annotations" / f"instances_{split}.json", root / split
    if not ann.is_file():
        raise FileNotFoundError(f"no COCO annotation file {ann}")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"no image folder {img_dir}")
    return ann, img_dir


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None


class CocoDetection(torch.utils.data.Dataset):
    """Items are (PIL image, {"image_id", "annotations"}) in the form the DETR image processor takes."""

    def __init__(self, root: str | os.PathLike, split: str = "val", limit: int | None = None):
        self.ann_file, self.img_dir = coco_paths(root, split)
        try:
            d = json.loads(self.ann_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.ann_file}: not valid JSON ({e})") from None
        _check_coco(d, self.ann_file)
        self.categories = sorted(d["categories"], key=lambda c: c["id"])
        self.cat_to_label = {c["id"]: i for i, c in enumerate(self.categories)}
        self.label_to_cat = [c["id"] for c in self.categories]
        self.images = sorted(d["images"], key=lambda im: im["id"])[:limit]
        self.anns: dict[int, list] = {im["id"]: [] for im in self.images}
        for a in d["annotations"]:
            if a["image_id"] in self.anns:
                a = dict(a)
                a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
                a.setdefault("iscrowd", 0)
                a["category_id"] = self.cat_to_label[a["category_id"]]  # contiguous label for the model
                self.anns[a["image_id"]].append(a)

    @property
    def id2label(self) -> dict[int, str]:
        return {i: c["name"] for i, c in enumerate(self.categories)}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        im = self.images[i]
        image = load_image(self.img_dir / im["file_name"])
        if image.size != (im["width"], im["height"]):
            raise ValueError(f"{im['file_name']}: JSON says {im['width']}x{im['height']}, image is "
                             f"{image.size[0]}x{image.size[1]}")
        return image, {"image_id": im["id"], "annotations": self.anns[im["id"]]}


def make_collate(processor, with_labels: bool = True):
    """Collate (image, target) items into a batch with pixel_values, pixel_mask, labels, image ids and
    original sizes (h, w) for post-processing."""

    def collate(items):
        images = [im for im, _ in items]
        targets = [t for _, t in items]
        enc = processor(images=images, annotations=targets if with_labels else None, return_tensors="pt")
        batch = {"pixel_values": enc["pixel_values"], "pixel_mask": enc["pixel_mask"]}
        if with_labels:
            batch["labels"] = enc["labels"]
        batch["image_ids"] = [t["image_id"] for t in targets]
        batch["orig_sizes"] = torch.tensor([[im.height, im.width] for im in images])
        return batch

    return collate
