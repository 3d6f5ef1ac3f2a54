"""The plain reference semantics of a tree FF layer: compute every node, then mask the path.

Slow (it costs as much as a dense MLP of width trees * nodes) and obvious; every fast path is tested
against it.
"""
from __future__ import annotations

import torch

from .activations import get_activation


def route_dense(z_all: torch.Tensor, depth: int) -> torch.Tensor:
    """Heap-order paths from all pre-activations.

    z_all: (M, T, N). Returns node indices (M, T, depth+1): the root, then child 2i+1 when z <= 0
    and 2i+2 when z > 0, down to a leaf.
    """
    m, t, _ = z_all.shape
    node = torch.zeros(m, t, dtype=torch.long, device=z_all.device)
    path = []
    for _ in range(depth + 1):
        path.append(node)
        z = z_all.gather(-1, node.unsqueeze(-1)).squeeze(-1)
        node = 2 * node + 1 + (z > 0).long()
    return torch.stack(path, dim=-1)


def tree_ff_masked(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    depth: int,
    activation: str,
    act_position: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, d). Returns (y (M, d_out), leaves (M, T)) where leaves are heap indices minus the
    number of internal nodes."""
    act = get_activation(activation)
    z_all = torch.einsum("md,tnd->mtn", x, w_in)
    if b_in is not None:
        z_all = z_all + b_in
    paths = route_dense(z_all.detach(), depth)  # routing carries no gradient
    mask = torch.zeros_like(z_all).scatter_(-1, paths, 1.0)
    if act_position == "node":
        y = torch.einsum("mtn,tnd->md", mask * act(z_all), w_out)
    else:
        h = torch.einsum("mtn,tnd->mtd", mask * z_all, w_out)
        y = act(h).sum(dim=1)
    leaves = paths[..., -1] - (2**depth - 1)
    return y, leaves
