"""Dense supervision of DETR's encoder output, used only while training the built-in model from scratch.

A DETR whose backbone starts random sits on a long plateau where the encoder output is nearly the same for
every token and every query predicts the mean box: the Hungarian loss gives the backbone almost no signal
about *where* objects are. This head adds that signal directly. Each encoder token (one cell of the
feature-map grid) is asked for the class of the object whose centre falls in its cell (or "no object") and,
for those cells, for the object's box. The head is thrown away after training, so the saved model is a
plain ``DetrForObjectDetection``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cell_targets(targets: list[dict], grid_h: int, grid_w: int, num_labels: int):
    """Per image and grid cell: the class of the object centred there (``num_labels`` = none) and its
    normalised (cx, cy, w, h) box. Where two centres share a cell the smaller object wins, since the larger
    one still covers neighbouring cells in the encoder's attention."""
    labels = torch.full((len(targets), grid_h * grid_w), num_labels, dtype=torch.long)
    boxes = torch.zeros(len(targets), grid_h * grid_w, 4)
    for i, t in enumerate(targets):
        b, c = t["boxes"], t["class_labels"]
        if len(c) == 0:
            continue
        order = torch.argsort(b[:, 2] * b[:, 3], descending=True)  # large first: small ones overwrite
        b, c = b[order], c[order]
        col = (b[:, 0] * grid_w).long().clamp_(0, grid_w - 1)
        row = (b[:, 1] * grid_h).long().clamp_(0, grid_h - 1)
        cell = row * grid_w + col
        labels[i, cell] = c
        boxes[i, cell] = b
    return labels, boxes


class EncoderDenseHead(nn.Module):
    """Linear class and box heads on every encoder token."""

    def __init__(self, d_model: int, num_labels: int, background_weight: float = 0.1):
        super().__init__()
        self.num_labels = num_labels
        self.cls = nn.Linear(d_model, num_labels + 1)
        self.box = nn.Linear(d_model, 4)
        weight = torch.ones(num_labels + 1)
        weight[num_labels] = background_weight  # most cells are empty; DETR down-weights "no object" the same way
        self.register_buffer("class_weight", weight)

    def loss(self, memory: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """``memory``: the encoder's last hidden state (batch, cells, d_model) of a square feature map."""
        n_cells = memory.shape[1]
        side = round(n_cells**0.5)
        if side * side != n_cells:
            raise ValueError(f"encoder output has {n_cells} tokens; the dense head needs a square feature map")
        labels, boxes = cell_targets(targets, side, side, self.num_labels)
        labels, boxes = labels.to(memory.device), boxes.to(memory.device)
        logits = self.cls(memory)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), weight=self.class_weight)
        positive = labels != self.num_labels
        if positive.any():
            pred = self.box(memory[positive]).sigmoid()
            loss = loss + 5.0 * F.l1_loss(pred, boxes[positive])  # DETR's own L1 box weight
        return loss
