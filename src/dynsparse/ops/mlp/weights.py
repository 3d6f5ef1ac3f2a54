"""The tensors of one MLP block in the layout the sparse kernels read.

``w2_t`` is fc2's weight transposed and contiguous, (d_ff, d_out): a listed neuron then costs one row
of w1 (its dot) and one row of w2_t (its axpy), both contiguous reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _check_vector(name: str, t, n: int, device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, w1 on {device}: all weights must share a device")


def check_weights(w1, b1, w2_t, b2, wg=None, bg=None, offset=None) -> None:
    """Shapes, types and devices of an MLP's kernel tensors (no data is read: fake tensors pass)."""
    for name, t in (("w1", w1), ("w2_t", w2_t)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if w1.dim() != 2 or w2_t.dim() != 2 or w1.shape[0] != w2_t.shape[0]:
        raise ValueError(f"w1 must be (d_ff, d) and w2_t (d_ff, d_out) with the same d_ff, got "
                         f"{tuple(w1.shape)} and {tuple(w2_t.shape)}")
    if w2_t.device != w1.device:
        raise ValueError(f"w2_t is on {w2_t.device}, w1 on {w1.device}: all weights must share a device")
    d_ff = w1.shape[0]
    _check_vector("b1", b1, d_ff, w1.device)
    _check_vector("b2", b2, w2_t.shape[1], w1.device)
    if wg is None:
        if bg is not None:
            raise ValueError("bg was given without wg (the gate projection of a gated MLP)")
    else:
        if not isinstance(wg, torch.Tensor):
            raise TypeError(f"wg must be a torch.Tensor or None, got {type(wg).__name__}")
        if wg.shape != w1.shape:
            raise ValueError(f"wg (gate projection) must have w1's shape {tuple(w1.shape)}, got {tuple(wg.shape)}")
        if wg.device != w1.device:
            raise ValueError(f"wg is on {wg.device}, w1 on {w1.device}: all weights must share a device")
        _check_vector("bg", bg, d_ff, w1.device)
    _check_vector("offset", offset, d_ff, w1.device)


def _weight(lin: nn.Module, name: str) -> torch.Tensor:
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"{name} must be an nn.Linear, got {type(lin).__name__}")
    return lin.weight.detach()


def _bias(lin: nn.Linear):
    return None if lin.bias is None else lin.bias.detach()


@dataclass(frozen=True, eq=False)
class MLPWeights:
    """y = b2 + sum_j h_j w2_t[j], h_j = act(w1_j.x + b1_j) - offset_j, or for a gated (GLU, Llama-style)
    block h_j = act(wg_j.x + bg_j) * (w1_j.x + b1_j) - offset_j (w1 then is the up projection).

    ``offset`` (d_ff,) is subtracted from every computed hidden value: with b2 raised by W2 c it makes a
    skipped neuron count as c_j instead of zero (MGS compensation, see ``with_compensation``).
    """

    w1: torch.Tensor  # (d_ff, d): fc1, or the up projection of a GLU
    b1: torch.Tensor | None
    w2_t: torch.Tensor  # (d_ff, d_out): fc2.weight.T, contiguous
    b2: torch.Tensor | None
    wg: torch.Tensor | None = None  # (d_ff, d): a GLU's gate projection
    bg: torch.Tensor | None = None
    offset: torch.Tensor | None = None  # (d_ff,)

    def __post_init__(self):
        check_weights(self.w1, self.b1, self.w2_t, self.b2, self.wg, self.bg, self.offset)

    @property
    def glu(self) -> bool:
        return self.wg is not None

    @property
    def d_ff(self) -> int:
        return self.w1.shape[0]

    @property
    def d_model(self) -> int:
        return self.w1.shape[1]

    @property
    def d_out(self) -> int:
        return self.w2_t.shape[1]

    @classmethod
    def from_tensors(cls, w1, b1, w2, b2, wg=None, bg=None, offset=None) -> "MLPWeights":
        """From nn.Linear-convention tensors (w2 is fc2.weight, (d_out, d_ff)); detached, contiguous."""
        if not isinstance(w2, torch.Tensor) or w2.dim() != 2:
            raise ValueError(f"w2 must be a 2-D tensor (d_out, d_ff), got {getattr(w2, 'shape', type(w2).__name__)}")

        def prep(t):
            return None if t is None else t.detach().contiguous()

        return cls(prep(w1), prep(b1), w2.detach().t().contiguous(), prep(b2), prep(wg), prep(bg), prep(offset))

    @classmethod
    def from_linear(cls, fc1: nn.Linear, fc2: nn.Linear, gate_proj: nn.Linear | None = None,
                    offset=None) -> "MLPWeights":
        """fc2(act(fc1(x))), or fc2(act(gate_proj(x)) * fc1(x)) with ``gate_proj``."""
        wg, bg = (None, None) if gate_proj is None else (_weight(gate_proj, "gate_proj"), _bias(gate_proj))
        return cls.from_tensors(_weight(fc1, "fc1"), _bias(fc1), _weight(fc2, "fc2"), _bias(fc2), wg, bg, offset)

    @classmethod
    def from_block(cls, block, offset=None) -> "MLPWeights":
        """From a ``dynsparse.mlps.MLPBlock`` (anything with ``linear_weights()`` and ``gate_weights()``),
        whatever layer convention the model uses (HF Conv1D included)."""
        if not (hasattr(block, "linear_weights") and hasattr(block, "gate_weights")):
            raise TypeError(f"block must be an MLPBlock (with linear_weights/gate_weights), got {type(block).__name__}")
        w1, b1, w2, b2 = block.linear_weights()
        wg, bg = block.gate_weights()
        return cls.from_tensors(w1, b1, w2, b2, wg, bg, offset)

    def with_compensation(self, c: torch.Tensor) -> "MLPWeights":
        """These weights with skipped neurons counting as c_j (d_ff,): b2 + W2 c, and c subtracted from
        every computed neuron, so y = b2 + W2 (h * on + c * off) stays a sparse sum."""
        if self.offset is not None:
            raise ValueError("these weights already carry an offset; compensate once")
        _check_vector("c", c, self.d_ff, self.w1.device)
        shift = c.detach().to(self.w2_t.dtype) @ self.w2_t
        b2 = shift if self.b2 is None else self.b2 + shift
        return MLPWeights(self.w1, self.b1, self.w2_t, b2, self.wg, self.bg, c.detach())
