"""The low-bit MGS gate: the block's own contribution, computed with low-bit copies of the projections
that decide it.

A neuron's contribution |act(g_j(x)) * u_j(x)| * ||W_down[:, j]|| is what the oracle ranks by, and a
linear function of x (the low-rank gate) cannot predict a product of two projections: the block's
inputs are not low-rank. This gate computes the product itself, from the routing projection (a gated
block's gate projection, a plain block's fc1) and a gated block's up projection quantized to ``bits``
bits per weight; its score for neuron j is |act(g~_j) * u~_j| * ||W_down[:, j]||, compared with the
layer's calibrated threshold like any gate logit. It needs no training; calibration picks its threshold.

Quantization: asymmetric min-max codes per group of ``quant_group`` consecutive input weights of a row,
w ~ lo + scale * code, code in [0, 2^bits), scale and lo stored as float16. The input channels are first
scaled by s_k = rms(x_k)^alpha (``smoothing`` = alpha, normalised to mean 1; from the calibration rows), so
the rounding error is spent where the inputs are small: W diag(s) is quantized and the gate multiplies
x / s by it. Large input channels (a transformer's outlier features) would otherwise carry the largest
errors. The gate's input x / s is itself rounded to int8 per group of ``quant_group`` (absmax scaling, as
llama.cpp's Q8 activations), so that a kernel can take the dot products in integers; that rounding is part
of the definition here, and every backend computes the same scores.

Stored per projection ("route", "up"): ``<proj>_codes`` uint8 (d_ff, d), ``<proj>_scale`` and ``<proj>_lo``
float16 (d_ff, d / quant_group), the bias ``b_<proj>`` if the block has one; shared: ``in_scale`` (d,) and
``w2_norm`` (d_ff,). On disk a code takes a byte; when built, the gate dequantizes its tables once (the
torch path) and, where bits <= 4 and quant_group is 32, packs two codes a byte for the C++ decode kernel
(``dynsparse.ops.mlp.lowbit``), which reads a quarter of the bytes of a float32 row per projection plus
the float16 scale and lo.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import activations
from ..ops.mlp.lowbit import PACK_GROUP, LowBitTables, dequantize, lowbit_scores, pack, quantize


def input_scale(x: torch.Tensor, smoothing: float) -> torch.Tensor:
    """s_k = rms(x_k)^smoothing over the rows x (n, d), normalised to mean 1 (all ones at smoothing 0)."""
    s = x.float().pow(2).mean(0).sqrt().clamp_min(1e-6).pow(smoothing)
    return s / s.mean()


STORED = ("route_codes", "route_scale", "route_lo", "up_codes", "up_scale", "up_lo", "in_scale", "w2_norm",
          "b_route", "b_up")


class LowBitGate(nn.Module):
    """score = |act(x W~_r^T + b_r) * (x W~_u^T + b_u)| * ||W_down[:, j]|| with low-bit W~ (see the module
    doc); a plain block has no up projection and scores |act(x W~_r^T + b_r)| * ||W2[:, j]||.

    Built from its stored tensors (``STORED``; the up_* and bias entries are optional), which are its
    persistent buffers, so ``state_dict()`` is what a gate file holds."""

    def __init__(self, tensors: dict[str, torch.Tensor], activation: str, act=None):
        super().__init__()
        self.activation = activation
        self.act = act if act is not None else activations.fn(activation)
        for name in STORED:
            t = tensors.get(name)
            if t is not None and name.endswith("_codes"):
                t = t.detach().to(torch.uint8).clone()
            elif t is not None and name in ("route_scale", "route_lo", "up_scale", "up_lo"):
                t = t.detach().half().clone()
            elif t is not None:
                t = t.detach().float().clone()
            self.register_buffer(name, t)
        self.gated = self.up_codes is not None
        self.quant_group = self.route_codes.shape[1] // self.route_scale.shape[1]
        # dequantized once for the torch path
        self.register_buffer("w_route", dequantize(self.route_codes, self.route_scale, self.route_lo), persistent=False)
        w_up = dequantize(self.up_codes, self.up_scale, self.up_lo) if self.gated else None
        self.register_buffer("w_up", w_up, persistent=False)
        # the C++ kernel's layout, where the codes fit it (bits <= 4, groups of PACK_GROUP)
        packable = self.quant_group == PACK_GROUP and int(self.route_codes.max()) < 16 and \
            (not self.gated or int(self.up_codes.max()) < 16)
        for proj in ("route", "up"):
            codes = getattr(self, f"{proj}_codes")
            self.register_buffer(f"{proj}_packed", pack(codes) if packable and codes is not None else None,
                                 persistent=False)
        self.packed = packable

    @classmethod
    def fit(cls, w_route, b_route, w_up, b_up, w2_norm, x: torch.Tensor, bits: int, group: int,
            smoothing: float, activation: str, act=None) -> "LowBitGate":
        """The gate of one block from its float weights and calibration inputs ``x`` (for the input scale)."""
        s = input_scale(x, smoothing)
        tensors = {"in_scale": s, "w2_norm": w2_norm, "b_route": b_route, "b_up": b_up}
        for proj, w in (("route", w_route), ("up", w_up)):
            if w is not None:
                codes, scale, lo = quantize(w.detach().float() * s, bits, group)
                tensors.update({f"{proj}_codes": codes, f"{proj}_scale": scale, f"{proj}_lo": lo})
        return cls(tensors, activation, act)

    @property
    def flops_per_token(self) -> int:
        return 2 * self.w_route.numel() * (2 if self.gated else 1)

    def tables(self) -> LowBitTables:
        """The gate as ``dynsparse.ops.mlp.lowbit_gate_mlp`` reads it (only where ``packed``)."""
        return LowBitTables(self.route_packed, self.route_scale, self.route_lo, self.up_packed, self.up_scale,
                            self.up_lo, self.in_scale, self.w2_norm, self.b_route, self.b_up)

    def forward(self, x):
        return lowbit_scores(x, self.w_route, self.w_up, self, self.quant_group, self.act)

    def neuron_logits(self, x):
        return self(x)


def check_tensors(where: str, ts: dict, d_model: int, d_ff: int, gated: bool) -> None:
    """One line naming the first tensor of a saved low-bit gate that does not fit its block."""
    def need(key, shape, dtype=None):
        t = ts.get(key)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: low-bit gate is missing {key}")
        if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
            raise ValueError(f"{where}: {key} is {t.dtype} {tuple(t.shape)}, expected {dtype or 'a float'} {shape}")

    need("gate.in_scale", (d_model,), torch.float32)
    need("gate.w2_norm", (d_ff,), torch.float32)
    for proj in ("route", "up") if gated else ("route",):
        need(f"gate.{proj}_codes", (d_ff, d_model), torch.uint8)
        scale = ts.get(f"gate.{proj}_scale")
        groups = scale.shape[-1] if isinstance(scale, torch.Tensor) and scale.dim() == 2 else 0
        if groups < 1 or d_model % groups:
            raise ValueError(f"{where}: gate.{proj}_scale must be (d_ff, groups) with groups dividing d_model={d_model}")
        need(f"gate.{proj}_scale", (d_ff, groups), torch.float16)
        need(f"gate.{proj}_lo", (d_ff, groups), torch.float16)
    for bias in ("b_route", "b_up"):
        if f"gate.{bias}" in ts:
            need(f"gate.{bias}", (d_ff,), torch.float32)
    if not gated and "gate.up_codes" in ts:
        raise ValueError(f"{where}: low-bit gate has an up projection but the layer is a plain MLP")
