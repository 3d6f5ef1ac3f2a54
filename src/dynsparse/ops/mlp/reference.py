"""The plain definition of the sparse MLP ops: compute every neuron, mask, then one matmul.

As slow as the dense block and obviously right; every other backend is tested against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import activations
from .csr import mask_from_csr


def _f32(t):
    return None if t is None else t.float()


def gate_and_hidden(x, w1, b1, wg, bg, offset, act_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, d_ff) float32 each: the gate's activation a (act(x wg^T + bg), or a plain block's act(x w1^T + b1))
    and the hidden value h (a * (x w1^T + b1) for a GLU, a itself otherwise), minus offset."""
    act = activations.by_code(act_code).fn
    x = x.float()
    z = F.linear(x, w1.float(), _f32(b1))
    if wg is None:
        a = h = act(z)
    else:
        a = act(F.linear(x, wg.float(), _f32(bg)))
        h = a * z
    return a, (h if offset is None else h - offset.float())


def hidden(x, w1, b1, wg, bg, offset, act_code: int) -> torch.Tensor:
    """(M, d_ff) float32: act(x w1^T + b1), or act(x wg^T + bg) * (x w1^T + b1) for a GLU, minus offset."""
    return gate_and_hidden(x, w1, b1, wg, bg, offset, act_code)[1]


def _masked_out(h, mask, w2_t, b2, dtype) -> torch.Tensor:
    y = (h * mask) @ w2_t.float()
    if b2 is not None:
        y = y + b2.float()
    return y.to(dtype)


def neuron_mask(indptr, indices, strategy: str, group_size: int, d_ff: int) -> torch.Tensor:
    """(M, d_ff) bool: the neurons each token's list names (groups expanded to their neurons)."""
    if strategy == "grouped":
        return mask_from_csr(indptr, indices, d_ff // group_size).repeat_interleave(group_size, dim=1)
    return mask_from_csr(indptr, indices, d_ff)


def sparse_mlp_reference(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, strategy: str, group_size: int,
                         act_code: int) -> torch.Tensor:
    mask = neuron_mask(indptr, indices, strategy, group_size, w1.shape[0])
    return _masked_out(hidden(x, w1, b1, wg, bg, offset, act_code), mask, w2_t, b2, x.dtype)


def relu_skip_mlp_reference(x, w1, b1, w2_t, b2) -> torch.Tensor:
    """The dense ReLU MLP the skip must reproduce exactly."""
    h = F.relu(F.linear(x.float(), w1.float(), None if b1 is None else b1.float()))
    y = h @ w2_t.float()
    if b2 is not None:
        y = y + b2.float()
    return y.to(x.dtype)


def gate_skip_mlp_reference(x, w1, b1, w2_t, b2, wg, bg, offset, threshold, act_code: int) -> torch.Tensor:
    """Every neuron computed, those whose |act(gate)| is at most the threshold zeroed, one matmul (also the
    op's prefill path, so the gate is computed once)."""
    a, h = gate_and_hidden(x, w1, b1, wg, bg, offset, act_code)
    return _masked_out(h, a.abs() > threshold, w2_t, b2, x.dtype)
