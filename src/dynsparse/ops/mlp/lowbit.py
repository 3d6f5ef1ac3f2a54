"""The low-bit gate's arithmetic and its fused decode op.

``dynsparse.gating.lowbit`` defines the gate; here are the pieces every backend shares: min-max codes per
group of input weights (``quantize``/``dequantize``), the int8 rounding of the gate's input
(``round_input``), the 4-bit packing the C++ kernel reads (``pack``) and the op itself:

* ``dynsparse_cpp::lowbit_gate_mlp`` (``ops/mlp/lowbit_gate.cpp``): for a few tokens, each neuron's
  predicted contribution from the packed codes (integer dot products against the int8 input), and only
  for those above the threshold the exact gate, up and down rows. ``lowbit_gate_mlp`` below calls it, or,
  on the "reference" backend, the plain definition (scores from the dequantized weights, then the block
  with the rest masked). Packed codes need ``bits`` <= 4 and groups of ``PACK_GROUP`` inputs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import activations
from ..backend import resolve
from .csr import check_x
from .weights import MLPWeights

PACK_GROUP = 32  # inputs per group in the packed layout: one 16-byte load of nibbles
LOWBIT_BACKENDS = ("reference", "cpp")


def quantize(w: Tensor, bits: int, group: int):
    """(codes uint8, scale, lo float16) of w (rows, d): min-max codes per ``group`` consecutive columns,
    w ~ lo + scale * code; the codes are rounded against the float16 values kept."""
    rows, d = w.shape
    if d % group:
        raise ValueError(f"quant_group {group} must divide the input width {d}")
    wr = w.float().reshape(rows, d // group, group)
    levels = 2**bits - 1
    lo = wr.amin(-1).half()
    scale = ((wr.amax(-1) - lo.float()) / levels).clamp_min(torch.finfo(torch.float16).tiny).half()
    codes = ((wr - lo.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, levels)
    return codes.to(torch.uint8).reshape(rows, d), scale, lo


def dequantize(codes: Tensor, scale: Tensor, lo: Tensor) -> Tensor:
    rows, d = codes.shape
    group = d // scale.shape[1]
    w = codes.float().reshape(rows, -1, group) * scale.float()[..., None] + lo.float()[..., None]
    return w.reshape(rows, d)


def round_input(x: Tensor, group: int) -> Tensor:
    """x (M, d) rounded to int8 steps per group of ``group`` columns: q * absmax / 127, q in [-127, 127]
    (ties to even, as the kernel's nearbyint)."""
    xr = x.float().reshape(x.shape[0], -1, group)
    step = xr.abs().amax(-1, keepdim=True) / 127
    q = torch.where(step > 0, xr / step, torch.zeros_like(xr)).round_()
    return (q * step).reshape(x.shape)


def pack(codes: Tensor) -> Tensor:
    """(rows, d) codes < 16 -> (rows, d / 2) bytes: per group of 32 inputs, byte b = code[b] | code[b + 16] << 4."""
    rows, d = codes.shape
    if d % PACK_GROUP or int(codes.max()) > 15:
        raise ValueError(f"packing needs codes < 16 and a width divisible by {PACK_GROUP}, got {d} columns")
    c = codes.reshape(rows, d // PACK_GROUP, 2, PACK_GROUP // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(rows, d // 2).contiguous()


def unpack(packed: Tensor) -> Tensor:
    """The inverse of ``pack``."""
    rows = packed.shape[0]
    p = packed.reshape(rows, -1, PACK_GROUP // 2)
    return torch.stack([p & 15, p >> 4], 2).reshape(rows, -1)


class LowBitTables(NamedTuple):
    """A low-bit gate as the kernel reads it: packed codes (``pack``), float16 scale and lo per group, the
    input scale, ||W_down[:, j]|| and the optional biases of the routing and up pre-activations."""

    route_codes: Tensor
    route_scale: Tensor
    route_lo: Tensor
    up_codes: Tensor | None
    up_scale: Tensor | None
    up_lo: Tensor | None
    in_scale: Tensor
    w2_norm: Tensor
    b_route: Tensor | None
    b_up: Tensor | None


def lowbit_scores(x: Tensor, w_route: Tensor, w_up: Tensor | None, t: LowBitTables, group: int, act) -> Tensor:
    """(M, d_ff) predicted contributions from dequantized weights ``w_route``/``w_up``: the definition."""
    xq = round_input(x.float() / t.in_scale, group)
    h = act(F.linear(xq, w_route, t.b_route))
    if w_up is not None:
        h = h * F.linear(xq, w_up, t.b_up)
    return h.abs() * t.w2_norm


def _reference(x: Tensor, w: MLPWeights, t: LowBitTables, threshold: Tensor, act_code: int) -> Tensor:
    act = activations.by_code(act_code).fn
    w_route = dequantize(unpack(t.route_codes), t.route_scale, t.route_lo)
    w_up = None if t.up_codes is None else dequantize(unpack(t.up_codes), t.up_scale, t.up_lo)
    x32 = x.float()
    mask = lowbit_scores(x32, w_route, w_up, t, PACK_GROUP, act) > threshold
    z = F.linear(x32, w.w1.float(), w.b1)
    h = act(z) if w.wg is None else act(F.linear(x32, w.wg.float(), w.bg)) * z
    if w.offset is not None:
        h = h - w.offset
    y = (h * mask) @ w.w2_t.float()
    return (y if w.b2 is None else y + w.b2).to(x.dtype)


def lowbit_gate_mlp(x: Tensor, weights: MLPWeights, tables: LowBitTables, threshold: Tensor, *, activation: str,
                    backend: str = "auto") -> Tensor:
    """y (M, d_out) in x's dtype: the block over the neurons whose low-bit predicted contribution exceeds
    ``threshold`` (0-dim), each computed exactly; skipped neurons give -offset (``MLPWeights``)."""
    check_x(x, weights.d_model, "the weights' d_model")
    chosen = resolve(backend, x.device, LOWBIT_BACKENDS)
    code = activations.code(activation)
    if chosen == "reference":
        return _reference(x, weights, tables, threshold, code)
    w, t = weights, tables
    return torch.ops.dynsparse_cpp.lowbit_gate_mlp(x, t.route_codes, t.route_scale, t.route_lo, t.up_codes,
                                                   t.up_scale, t.up_lo, t.in_scale, t.w2_norm, t.b_route, t.b_up,
                                                   w.w1, w.b1, w.w2_t, w.b2, w.wg, w.bg, w.offset, threshold, code)
