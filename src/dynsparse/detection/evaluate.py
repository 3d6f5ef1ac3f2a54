"""COCO evaluation of a DETR model with pycocotools (the official COCO API; we never compute AP ourselves).

Protocol (as in the DETR papers): post-process with score threshold 0 and keep every query's prediction,
boxes rescaled to the original image sizes, and the same batch size for every model compared (padding in
a batch changes the encoder's input, hence AP).
"""
from __future__ import annotations

import contextlib
import io
import time

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class ModuleTimer:
    """Wall-clock seconds spent inside the given submodules (forward pre/post hooks)."""

    def __init__(self, modules):
        self.seconds = 0.0
        self._t = 0.0
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._start))
            self._handles.append(m.register_forward_hook(self._stop))

    def _start(self, *args):
        self._t = time.perf_counter()

    def _stop(self, *args):
        self.seconds += time.perf_counter() - self._t

    def remove(self):
        for h in self._handles:
            h.remove()


@torch.no_grad()
def predict_coco(model, processor, dataset, batch_size: int = 8, progress=None, timing: dict | None = None,
                 mlp_names: list[str] | None = None) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox [x, y, w, h], score) for every query of every image.
    With ``timing`` (a dict) it receives model_seconds (forward passes only) and, with ``mlp_names`` (the
    MLP blocks' module names), mlp_seconds."""
    from .coco import make_collate

    collate = make_collate(processor, with_labels=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    model.eval()
    results = []
    timer = ModuleTimer([model.get_submodule(n) for n in mlp_names]) if mlp_names else None
    model_seconds = 0.0
    for batch in loader:
        t0 = time.perf_counter()
        out = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        model_seconds += time.perf_counter() - t0
        dets = processor.post_process_object_detection(out, threshold=0.0, target_sizes=batch["orig_sizes"])
        for image_id, det in zip(batch["image_ids"], dets):
            for score, label, box in zip(det["scores"].tolist(), det["labels"].tolist(), det["boxes"].tolist()):
                x0, y0, x1, y1 = box
                results.append({"image_id": image_id, "category_id": dataset.label_to_cat[label],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
        if progress is not None:
            progress(len(batch["image_ids"]))
    if timer is not None:
        timer.remove()
    if timing is not None:
        timing["model_seconds"] = model_seconds
        if timer is not None:
            timing["mlp_seconds"] = timer.seconds
    return results


def coco_evaluate(ann_file, results: list[dict], image_ids=None, verbose: bool = True) -> dict[str, float]:
    """Run COCOeval (bbox); print its summary exactly as pycocotools does when ``verbose``; return the 12 stats."""
    if not results:
        raise ValueError("no detections to evaluate (empty result list)")
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() chatters about index creation
        gt = COCO(str(ann_file))
        dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, iouType="bbox")
    if image_ids is not None:
        ev.params.imgIds = list(image_ids)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        summary = buf.getvalue()
        print(summary[summary.index(" Average Precision"):] if " Average Precision" in summary else summary, end="")
    return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}


def evaluate_detr(model, processor, dataset, batch_size: int = 8, verbose: bool = True, timing: dict | None = None,
                  mlp_names: list[str] | None = None) -> dict[str, float]:
    results = predict_coco(model, processor, dataset, batch_size, timing=timing, mlp_names=mlp_names)
    return coco_evaluate(dataset.ann_file, results, image_ids=[im["id"] for im in dataset.images], verbose=verbose)
