"""``dynsparse::gemv``: a dense linear layer over a few tokens (a decode step), bound by reading its weights.

y = act(x w^T + b) for x (M, d), w (N, d), computed in float32 and returned in x's dtype. Backends:
``reference`` (F.linear in float32), ``torch`` (F.linear in x's dtype, BLAS), ``numba`` and ``cpp`` (each
weight row read once for all tokens, bfloat16 tables read as stored; ``cpp`` is the C++ op
``dynsparse_cpp::gemv``, which the wrapper calls directly so no Python runs per call); from
``GEMV_MAX_TOKENS`` tokens on (a prefill) both hand over to torch's F.linear: BLAS wins once each row
serves many tokens.
``FastDecoder(linears="gemv")`` routes a model's ``nn.Linear`` layers through it while decoding
(``dynsparse.decode.linears``); the gate-skip MLP's dense gate projection uses its kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import activations
from .._eager import call
from ..backend import CONCRETE, resolve

GEMV_BACKENDS = ("reference", "torch", "numba", "cpp")
GEMV_MAX_TOKENS = 16


def _check(x: Tensor, w: Tensor, b: Tensor | None, act_code: int, backend: str) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv takes x (M, d) and w (N, d), got {tuple(x.shape)} and {tuple(w.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"gemv's bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device}, w on {w.device}")
    activations.check_code(act_code)
    if backend not in CONCRETE:
        raise ValueError(f"backend must be a concrete one of {list(CONCRETE)}, got {backend!r}")


def gemv_reference(x: Tensor, w: Tensor, b: Tensor | None, act_code: int) -> Tensor:
    return activations.by_code(act_code).fn(F.linear(x.float(), w.float(), None if b is None else b.float()))


def _gemv(x: Tensor, w: Tensor, b: Tensor | None, act_code: int, backend: str) -> Tensor:
    """The body of ``dynsparse::gemv``."""
    _check(x, w, b, act_code, backend)
    if backend == "numba" and x.shape[0] < GEMV_MAX_TOKENS:
        from .numba_impl import gemv_numba

        return torch.from_numpy(gemv_numba(x, w, b, act_code)).to(x.dtype)
    if backend == "cpp" and x.shape[0] < GEMV_MAX_TOKENS:
        return torch.ops.dynsparse_cpp.gemv(x, w, b, act_code)
    if backend == "reference":
        return gemv_reference(x, w, b, act_code).to(x.dtype)
    if backend == "triton":
        raise ValueError("gemv has no triton backend; on CUDA use backend='torch' (cuBLAS)")
    b = None if b is None else b.to(x.dtype)
    return activations.by_code(act_code).fn(F.linear(x, w.to(x.dtype), b))


gemv_op = torch.library.custom_op("dynsparse::gemv", _gemv, mutates_args=())


@gemv_op.register_fake
def _(x, w, b, act_code, backend):
    _check(x, w, b, act_code, backend)
    return x.new_empty(x.shape[0], w.shape[0])


def gemv(x: Tensor, w: Tensor, b: Tensor | None = None, *, activation: str = "identity",
         backend: str = "auto") -> Tensor:
    """act(x w^T + b) for x (..., d): any leading dims, flattened to the op's tokens and restored."""
    chosen = resolve(backend, x.device, GEMV_BACKENDS)
    lead, x2, code = x.shape[:-1], x.reshape(-1, x.shape[-1]), activations.code(activation)
    if chosen == "cpp" and x2.shape[0] < GEMV_MAX_TOKENS:  # a C++ op itself: no Python body to run
        _check(x2, w, b, code, chosen)
        y = torch.ops.dynsparse_cpp.gemv(x2, w, b, code)
    else:
        y = call(gemv_op, _gemv, x2, w, b, code, chosen)
    return y.reshape(*lead, w.shape[0])


__all__ = ["gemv", "gemv_op", "gemv_reference", "GEMV_BACKENDS", "GEMV_MAX_TOKENS"]
