"""The plain reference semantics of a tree FF layer: compute every node, then mask the path.

Slow (it costs as much as a dense MLP of width trees * nodes) and obvious; every fast path is tested
against it.
"""
from __future__ import annotations

import torch

from ...activations import by_code
from ...activations import fn as get_activation


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


# ---------------------------------------------------------------- the ops' ``reference`` backend
def _masked_from_paths(x, w_in, b_in, w_out, paths, act, act_on_path):
    """y for given heap paths (M, T, depth+1), every node computed and masked."""
    z_all = torch.einsum("md,tnd->mtn", x, w_in)
    if b_in is not None:
        z_all = z_all + b_in
    mask = torch.zeros_like(z_all).scatter_(-1, paths, 1.0)
    if act_on_path:
        return act(torch.einsum("mtn,tnd->mtd", mask * z_all, w_out)).sum(dim=1), z_all
    return torch.einsum("mtn,tnd->md", mask * act(z_all), w_out), z_all


def tree_infer_reference(x, w_in, b_in, w_out, depth, act_code, act_on_path):
    return tree_ff_masked(x, w_in, b_in, w_out, depth, by_code(act_code).name, "path" if act_on_path else "node")


def tree_train_forward_reference(x, w_in, b_in, w_out, depth, act_code, act_on_path):
    z_all = torch.einsum("md,tnd->mtn", x, w_in)
    if b_in is not None:
        z_all = z_all + b_in
    paths = route_dense(z_all, depth)
    y, _ = _masked_from_paths(x, w_in, b_in, w_out, paths, by_code(act_code).fn, act_on_path)
    offsets = torch.arange(w_in.shape[0], device=x.device).view(1, -1, 1) * w_in.shape[1]
    return y, paths + offsets, z_all.gather(-1, paths)


def tree_train_backward_reference(grad_y, x, w_in, b_in, w_out, idx, zs, act_code, act_on_path):
    """The chain rule through the masked computation, written out densely (custom ops run below
    autograd): every node's gradient is computed and the mask zeroes the unvisited ones."""
    act = by_code(act_code)
    paths = idx % w_in.shape[1]
    z_all = torch.einsum("md,tnd->mtn", x, w_in)
    if b_in is not None:
        z_all = z_all + b_in
    mask = torch.zeros_like(z_all).scatter_(-1, paths, 1.0)
    gy = grad_y.to(x.dtype)
    if act_on_path:
        h = torch.einsum("mtn,tnd->mtd", mask * z_all, w_out)
        g_h = act.grad(h) * gy.unsqueeze(1)
        g_out = torch.einsum("mtn,mtd->tnd", mask * z_all, g_h)
        dz = mask * torch.einsum("mtd,tnd->mtn", g_h, w_out)
    else:
        g_out = torch.einsum("mtn,md->tnd", mask * act.fn(z_all), gy)
        dz = mask * act.grad(z_all) * torch.einsum("md,tnd->mtn", gy, w_out)
    g_x = torch.einsum("mtn,tnd->md", dz, w_in)
    g_in = torch.einsum("mtn,md->tnd", dz, x)
    return g_x, g_in, (dz.sum(0) if b_in is not None else None), g_out
