"""The sparse MLP algorithms in plain torch ops: only listed rows of the weights are gathered.

Any device and dtype (float32 compute). Where numba and Triton are missing this is what runs; the
per-token form materialises an (nnz, d) gather, so the union form (dense matmuls over the rows of the
batch's union) is usually the faster of the two here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import activations
from .csr import expand_groups, token_of_entry
from .reference import hidden


def _gathered_dots(w, b, xf, rows, cols) -> torch.Tensor:
    """w[cols[p]] . xf[rows[p]] (+ b[cols[p]]) for every listed (token, neuron) pair p."""
    z = (w.float()[cols] * xf[rows]).sum(-1)
    return z if b is None else z + b.float()[cols]


def _scatter_out(x, rows, cols, h, w2_t, b2) -> torch.Tensor:
    """y[i] = b2 + sum over the pairs p of token i of h[p] * w2_t[cols[p]], in x's dtype."""
    y = torch.zeros(x.shape[0], w2_t.shape[1], dtype=torch.float32, device=x.device)
    y.index_add_(0, rows, h.unsqueeze(1) * w2_t.float()[cols])
    if b2 is not None:
        y += b2.float()
    return y.to(x.dtype)


def per_token(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, act_code: int) -> torch.Tensor:
    """Gather the (token, neuron) pairs, one dot (two for a GLU) each, scatter-add their fc2 rows back."""
    act = activations.by_code(act_code).fn
    xf = x.float()
    rows = token_of_entry(indptr)
    cols = indices.long()
    h = act(_gathered_dots(w1, b1, xf, rows, cols) if wg is None else _gathered_dots(wg, bg, xf, rows, cols))
    if wg is not None:
        h = h * _gathered_dots(w1, b1, xf, rows, cols)
    if offset is not None:
        h = h - offset.float()[cols]
    return _scatter_out(x, rows, cols, h, w2_t, b2)


def union_and_mask(indptr, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's union of listed neurons (ascending, int64) and each token's 0/1 float mask over it."""
    union, local = torch.unique(indices.long(), return_inverse=True)
    mask = torch.zeros(indptr.numel() - 1, union.numel(), dtype=torch.float32, device=indices.device)
    mask[token_of_entry(indptr), local] = 1.0
    return union, mask


def over_union(x, w1, b1, w2_t, b2, wg, bg, offset, union, mask, act_code: int) -> torch.Tensor:
    """Dense matmuls over the union's rows, each token's neurons outside its own list zeroed by ``mask``."""
    def rows(t):
        return None if t is None else t.float()[union]

    h = hidden(x, rows(w1), rows(b1), rows(wg), rows(bg), rows(offset), act_code) * mask
    y = h @ w2_t.float()[union]
    if b2 is not None:
        y += b2.float()
    return y.to(x.dtype)


def sparse_mlp_torch(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, strategy: str, group_size: int,
                     act_code: int) -> torch.Tensor:
    if strategy == "grouped":
        indptr, indices = expand_groups(indptr, indices, group_size)
    if strategy == "union":
        return over_union(x, w1, b1, w2_t, b2, wg, bg, offset, *union_and_mask(indptr, indices), act_code)
    return per_token(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, act_code)


def relu_skip_mlp_torch(x, w1, b1, w2_t, b2) -> torch.Tensor:
    """Dense fc1 + ReLU, then fc2 over each token's non-zeros only (gathered rows, scatter-add)."""
    h = F.relu(F.linear(x.float(), w1.float(), None if b1 is None else b1.float()))
    rows, cols = h.nonzero(as_tuple=True)
    return _scatter_out(x, rows, cols, h[rows, cols], w2_t, b2)


def gate_skip_mlp_torch(x, w1, b1, w2_t, b2, wg, bg, offset, threshold, act_code: int) -> torch.Tensor:
    """Dense gate + activation, then w1 (GLU) and w2_t over each token's kept neurons only (gathered rows)."""
    act = activations.by_code(act_code).fn
    xf = x.float()
    gate, gate_bias = (w1, b1) if wg is None else (wg, bg)
    a = act(F.linear(xf, gate.float(), None if gate_bias is None else gate_bias.float()))
    rows, cols = (a.abs() > threshold).nonzero(as_tuple=True)
    h = a[rows, cols]
    if wg is not None:
        h = h * _gathered_dots(w1, b1, xf, rows, cols)
    if offset is not None:
        h = h - offset.float()[cols]
    return _scatter_out(x, rows, cols, h, w2_t, b2)
