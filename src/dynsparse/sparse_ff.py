"""The sparse-FF protocol: what training, evaluation and benchmarks read from any FF block that
computes less than a dense one, so none of them keeps its own cost formula.

A block implements ``SparseFF``: ``flops_per_token`` (nominal cost of one token), ``track_usage`` /
``reset_usage`` (counters of the work actually done) and ``measured_usage()``. ``TreeFF``,
``PrunedTreeFF`` and the sparsified MLP modules of ``dynsparse.gating`` do. ``ff_usage(model)`` gives the
per-block mean a report shows; blocks that are plain dense MLPs count at ``dense_ff_flops``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn


def dense_ff_flops(d_model: int, d_ff: int, d_out: int | None = None, gated: bool = False) -> int:
    """FLOPs (2 per multiply-add) of one token through a dense MLP: fc1 (and a GLU's gate) and fc2."""
    d_out = d_model if d_out is None else d_out
    return 2 * d_ff * (d_model * (2 if gated else 1) + d_out)


@dataclass(frozen=True)
class FFUsage:
    """Work measured since the last reset: ``active_fraction`` of the block's units per token and the
    FLOPs per token that work cost (the gate's included where there is one)."""

    tokens: int
    active_fraction: float
    flops_per_token: float


@runtime_checkable
class SparseFF(Protocol):
    @property
    def flops_per_token(self) -> float: ...

    def track_usage(self, enabled: bool = True): ...

    def reset_usage(self) -> None: ...

    def measured_usage(self) -> FFUsage: ...


def sparse_ff_blocks(model: nn.Module) -> dict[str, SparseFF]:
    """Every block of ``model`` that implements the protocol, by qualified name (outermost only)."""
    found: dict[str, SparseFF] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseFF) and not any(name.startswith(f"{n}.") for n in found):
            found[name] = module
    return found


def ff_usage(model: nn.Module, measured: bool = True) -> dict[str, float]:
    """Mean FF active fraction and FLOPs/token over the model's FF blocks: measured counters of sparse
    blocks (``measured=False``: their nominal cost), dense MLP blocks at full cost. Empty if none."""
    from .mlps import find_mlps

    blocks = sparse_ff_blocks(model)
    if blocks:
        rows = []
        for b in blocks.values():
            usage = b.measured_usage() if measured else None
            if usage is None or usage.tokens == 0:
                rows.append((getattr(b, "active_fraction", float("nan")), float(b.flops_per_token)))
            else:
                rows.append((usage.active_fraction, usage.flops_per_token))
    else:
        rows = [(1.0, float(dense_ff_flops(b.d_model, b.d_ff, gated=b.gated))) for b in find_mlps(model).values()]
    if not rows:
        return {}
    return {"ff_active_fraction": sum(r[0] for r in rows) / len(rows),
            "ff_flops_per_token": sum(r[1] for r in rows) / len(rows)}
