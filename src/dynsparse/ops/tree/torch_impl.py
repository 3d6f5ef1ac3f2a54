"""The tree ops' ``torch`` backend: the sparse algorithm in plain torch ops, for any device and dtype.

Forward gathers only the path rows of each token (one ``index_select`` per level) and sums their
outputs with ``embedding_bag``; backward re-gathers the same rows and scatters their gradients with
``index_add_``, so the cost scales with trees * (depth + 1), not with the number of nodes, and rows no
token visited get exactly zero gradient. Tokens run in chunks to bound the memory of the gathered rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...activations import by_code

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


def tree_train_forward_torch(x, w_in, b_in, w_out, depth, act_code, act_on_path):
    """(y (M, d_out), idx (M, T, depth+1) flat node indices, zs (same) pre-activations in x's dtype)."""
    trees, nodes, d = w_in.shape
    d_out = w_out.shape[-1]
    act = by_code(act_code).fn
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
        if act_on_path:
            y[sl] = act(_path_sums(ci, cz, flat_out)).sum(1)
        else:
            y[sl] = _path_sums(ci, act(cz), flat_out).sum(1)
    return y, idx, zs


def tree_infer_torch(x, w_in, b_in, w_out, depth, act_code, act_on_path):
    y, idx, _ = tree_train_forward_torch(x, w_in, b_in, w_out, depth, act_code, act_on_path)
    nodes = w_in.shape[1]
    return y, idx[:, :, -1] % nodes - (2**depth - 1)


def tree_train_backward_torch(grad_y, x, w_in, b_in, w_out, idx, zs, act_code, act_on_path):
    """(g_x, g_w_in, g_b_in or None, g_w_out); fp16/bf16 gradients accumulate in fp32."""
    act, act_grad = by_code(act_code).fn, by_code(act_code).grad
    trees, nodes, d = w_in.shape
    d_out = w_out.shape[-1]
    flat_in = w_in.reshape(trees * nodes, d)
    flat_out = w_out.reshape(trees * nodes, d_out)
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    g_in = torch.zeros(trees * nodes, d, dtype=acc, device=x.device)
    g_out = torch.zeros(trees * nodes, d_out, dtype=acc, device=x.device)
    g_b = torch.zeros(trees * nodes, dtype=acc, device=x.device)
    g_x = torch.empty_like(x)
    length = idx.shape[2]
    grad_y = grad_y.to(x.dtype)
    zs = zs.to(x.dtype)
    for sl in _chunks(x.shape[0], trees * length * max(d, d_out)):
        ci, cz, gy, cx = idx[sl], zs[sl], grad_y[sl], x[sl]
        m = ci.shape[0]
        flat_idx = ci.reshape(-1)
        rows_out = flat_out.index_select(0, flat_idx).view(m, trees * length, d_out)
        if act_on_path:
            h = _path_sums(ci, cz, flat_out)  # (m, trees, d_out)
            g_h = act_grad(h) * gy.unsqueeze(1)
            dz = (rows_out.view(m, trees, length, d_out) * g_h.unsqueeze(2)).sum(-1)
            contrib = (cz.unsqueeze(-1) * g_h.unsqueeze(2)).reshape(m, trees * length, d_out)
        else:
            coeff = act(cz)
            # dL/dcoeff[m, k] = w_out[idx[m, k]] . grad_y[m]
            d_coeff = torch.bmm(rows_out, gy.unsqueeze(-1)).view(m, trees, length)
            dz = act_grad(cz) * d_coeff
            contrib = coeff.reshape(m, trees * length, 1) * gy.unsqueeze(1)
        g_out.index_add_(0, flat_idx, contrib.reshape(-1, d_out).to(acc))
        rows_in = flat_in.index_select(0, flat_idx).view(m, trees * length, d)
        dz_flat = dz.reshape(m, trees * length)
        g_x[sl] = torch.bmm(dz_flat.unsqueeze(1), rows_in).squeeze(1)
        g_in.index_add_(0, flat_idx, (dz_flat.unsqueeze(-1) * cx.unsqueeze(1)).reshape(-1, d).to(acc))
        g_b.index_add_(0, flat_idx, dz_flat.reshape(-1).to(acc))
    return (
        g_x,
        g_in.view(trees, nodes, d).to(w_in.dtype),
        None if b_in is None else g_b.view(trees, nodes).to(b_in.dtype),
        g_out.view(trees, nodes, d_out).to(w_out.dtype),
    )
