"""Gates in torch: dense logits, compare, nonzero. Any device; the lists come out ascending per token.

This is both the definition and the torch backend: the logits are what any gate must compute (the
low-rank gate's through its rank-r bottleneck), and the mask pass is one compare and one nonzero.
"""
from __future__ import annotations

import torch

from ..mlp.csr import csr_from_mask


def lowrank_logits(x, A, B, c) -> torch.Tensor:
    """(M, d_ff) float32: (x @ A) @ B + c."""
    logits = (x.float() @ A.float()) @ B.float()
    return logits if c is None else logits + c.float()


def grouped_logits(x, G, c) -> torch.Tensor:
    """(M, n_groups) float32: x @ G + c."""
    logits = x.float() @ G.float()
    return logits if c is None else logits + c.float()


def lowrank_gate_indices_reference(x, A, B, c, threshold):
    return csr_from_mask(lowrank_logits(x, A, B, c) > threshold)


def grouped_gate_indices_reference(x, G, c, threshold, group_size: int):
    return csr_from_mask((grouped_logits(x, G, c) > threshold).repeat_interleave(group_size, dim=1))


def grouped_gate_groups_reference(x, G, c, threshold):
    return csr_from_mask(grouped_logits(x, G, c) > threshold)
