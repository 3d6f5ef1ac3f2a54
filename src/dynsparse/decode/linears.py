"""A model's ``nn.Linear`` layers through ``dynsparse::gemv`` while ``FastDecoder`` decodes.

At one token per step every linear layer is a matrix-vector product, bound by reading its weights; torch's
BLAS call reads them well below memory speed on some machines, ``gemv``'s kernel at it. The layers keep
their class's parameters and state dict (only ``__class__`` changes, to a subclass), and behave as
``nn.Linear`` outside ``gemv_active()``: HF's own ``generate``, training and saving see no change.
Calls with ``GEMV_MAX_TOKENS`` tokens or more (a prefill) stay on ``F.linear``, decided while tracing.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..ops.dense import GEMV_MAX_TOKENS, gemv


class _State:
    on = False


_STATE = _State()


class GemvLinear(nn.Linear):
    """nn.Linear whose few-token, no-grad calls run ``dynsparse::gemv`` inside ``gemv_active()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _STATE.on and not torch.is_grad_enabled() and x.numel() // x.shape[-1] < GEMV_MAX_TOKENS:
            return gemv(x, self.weight, self.bias)
        return super().forward(x)


def route_linears_(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a ``GemvLinear`` (idempotent); returns how many are."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = GemvLinear
        n += type(m) is GemvLinear
    return n


@contextlib.contextmanager
def gemv_active():
    before, _STATE.on = _STATE.on, True
    try:
        yield
    finally:
        _STATE.on = before


__all__ = ["GemvLinear", "route_linears_", "gemv_active"]
