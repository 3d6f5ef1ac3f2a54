"""The gather execution path: only the nodes on each token's path are read, forward and backward.

A custom autograd function saves only the input, the visited node indices and their pre-activations;
the backward pass re-gathers the few weight rows it needs and scatters their gradients with
``index_add_``, so the cost scales with trees * (depth + 1), not with the number of nodes, and nodes no
token visited get exactly zero gradient. Tokens are processed in chunks to bound the memory of the
gathered rows.

On CPU in float32 the same function runs numba kernels (``dynsparse.kernels.tree_train``) that never
copy weight rows per token and accumulate each node's gradient in one thread; other dtypes and
devices use the torch ops below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.tree_train import train_kernels_apply, tree_train_backward, tree_train_forward
from .activations import ACTIVATION_CODES, get_activation

# Elements of gathered weight rows held at once (per chunk of tokens): ~64 MB of fp32.
_CHUNK_ELEMENTS = 1 << 24


def _chunks(m: int, per_token: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_token, 1))
    for start in range(0, m, step):
        yield slice(start, min(m, start + step))


def route_gather(x, flat_in, flat_b, trees, nodes, depth):
    """Walk every tree for every token of x (m, d). Returns flat node indices into the (trees*nodes)
    row tables, shape (m, trees, depth+1), and the pre-activations z at them, same shape."""
    m, d = x.shape
    offsets = torch.arange(trees, device=x.device) * nodes
    node = torch.zeros(m, trees, dtype=torch.long, device=x.device)
    idx = torch.empty(m, trees, depth + 1, dtype=torch.long, device=x.device)
    zs = torch.empty(m, trees, depth + 1, dtype=x.dtype, device=x.device)
    for level in range(depth + 1):
        flat = node + offsets
        rows = flat_in.index_select(0, flat.reshape(-1)).view(m, trees, d)
        z = torch.bmm(rows, x.unsqueeze(-1)).squeeze(-1)
        if flat_b is not None:
            z = z + flat_b.index_select(0, flat.reshape(-1)).view(m, trees)
        idx[:, :, level] = flat
        zs[:, :, level] = z
        node = 2 * node + 1 + (z > 0).long()
    return idx, zs


def _path_sums(idx, coeff, flat_out):
    """Per (token, tree) sums of coeff * w_out over the path: (m, trees, d_out)."""
    m, trees, length = idx.shape
    h = F.embedding_bag(
        idx.reshape(m * trees, length), flat_out, per_sample_weights=coeff.reshape(m * trees, length), mode="sum"
    )
    return h.view(m, trees, -1)


def _act_grad(act, z, grad_out):
    """d act(z)/dz * grad_out, for any activation in the table (autograd on a detached copy)."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(act(zz), zz, grad_out)
    return g


class TreeGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, depth, activation, act_position):
        ctx.has_bias = b_in is not None
        ctx.config = (depth, activation, act_position)
        ctx.numba = train_kernels_apply(x, w_in, b_in, w_out)
        if ctx.numba:
            y, idx, zs = tree_train_forward(
                x, w_in, b_in, w_out, depth, ACTIVATION_CODES[activation], act_position == "path"
            )
            ctx.save_for_backward(x, w_in, w_out, idx, zs)
            ctx.mark_non_differentiable(idx)
            return y, idx
        trees, nodes, d = w_in.shape
        d_out = w_out.shape[-1]
        act = get_activation(activation)
        flat_in = w_in.reshape(trees * nodes, d)
        flat_out = w_out.reshape(trees * nodes, d_out)
        flat_b = None if b_in is None else b_in.reshape(trees * nodes)
        m = x.shape[0]
        y = x.new_empty(m, d_out)
        idx = torch.empty(m, trees, depth + 1, dtype=torch.long, device=x.device)
        zs = x.new_empty(m, trees, depth + 1)
        for sl in _chunks(m, trees * max(d, d_out)):
            ci, cz = route_gather(x[sl], flat_in, flat_b, trees, nodes, depth)
            idx[sl], zs[sl] = ci, cz
            if act_position == "node":
                y[sl] = _path_sums(ci, act(cz), flat_out).sum(1)
            else:
                y[sl] = act(_path_sums(ci, cz, flat_out)).sum(1)
        ctx.save_for_backward(x, w_in, b_in if b_in is not None else torch.empty(0), w_out, idx, zs)
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, grad_y, _grad_idx):
        depth, activation, act_position = ctx.config
        if ctx.numba:
            x, w_in, w_out, idx, zs = ctx.saved_tensors
            g_x, g_in, g_b, g_out = tree_train_backward(
                grad_y, x, w_in, w_out, idx, zs, ACTIVATION_CODES[activation], act_position == "path"
            )
            return g_x, g_in, g_b if ctx.has_bias else None, g_out, None, None, None
        x, w_in, b_in, w_out, idx, zs = ctx.saved_tensors
        act = get_activation(activation)
        trees, nodes, d = w_in.shape
        d_out = w_out.shape[-1]
        flat_in = w_in.reshape(trees * nodes, d)
        flat_out = w_out.reshape(trees * nodes, d_out)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        g_in = torch.zeros(trees * nodes, d, dtype=acc, device=x.device)
        g_out = torch.zeros(trees * nodes, d_out, dtype=acc, device=x.device)
        g_b = torch.zeros(trees * nodes, dtype=acc, device=x.device)
        g_x = torch.empty_like(x)
        length = depth + 1
        for sl in _chunks(x.shape[0], trees * length * max(d, d_out)):
            ci, cz, gy, cx = idx[sl], zs[sl], grad_y[sl], x[sl]
            m = ci.shape[0]
            flat_idx = ci.reshape(-1)
            rows_out = flat_out.index_select(0, flat_idx).view(m, trees * length, d_out)
            if act_position == "node":
                coeff = act(cz)
                # dL/dcoeff[m, k] = w_out[idx[m, k]] . grad_y[m]
                d_coeff = torch.bmm(rows_out, gy.unsqueeze(-1)).view(m, trees, length)
                dz = _act_grad(act, cz, d_coeff)
                contrib = coeff.reshape(m, trees * length, 1) * gy.unsqueeze(1)
            else:
                h = _path_sums(ci, cz, flat_out)  # (m, trees, d_out)
                g_h = _act_grad(act, h, gy.unsqueeze(1).expand_as(h))
                dz = (rows_out.view(m, trees, length, d_out) * g_h.unsqueeze(2)).sum(-1)
                contrib = (cz.unsqueeze(-1) * g_h.unsqueeze(2)).reshape(m, trees * length, d_out)
            g_out.index_add_(0, flat_idx, contrib.reshape(-1, d_out).to(acc))
            rows_in = flat_in.index_select(0, flat_idx).view(m, trees * length, d)
            dz_flat = dz.reshape(m, trees * length)
            g_x[sl] = torch.bmm(dz_flat.unsqueeze(1), rows_in).squeeze(1)
            g_in.index_add_(0, flat_idx, (dz_flat.unsqueeze(-1) * cx.unsqueeze(1)).reshape(-1, d).to(acc))
            g_b.index_add_(0, flat_idx, dz_flat.reshape(-1).to(acc))
        grad_b = g_b.view(trees, nodes).to(w_in.dtype) if ctx.has_bias else None
        return (
            g_x,
            g_in.view(trees, nodes, d).to(w_in.dtype),
            grad_b,
            g_out.view(trees, nodes, d_out).to(w_out.dtype),
            None,
            None,
            None,
        )


def tree_ff_gather(x, w_in, b_in, w_out, depth, activation, act_position):
    """x: (M, d) -> (y (M, d_out), leaves (M, T)). Differentiable in x, w_in, b_in and w_out."""
    y, idx = TreeGatherFunction.apply(x, w_in, b_in, w_out, depth, activation, act_position)
    nodes = w_in.shape[1]
    leaves = idx[:, :, -1] % nodes - (2**depth - 1)
    return y, leaves
