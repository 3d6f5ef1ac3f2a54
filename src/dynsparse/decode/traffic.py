"""The weight bytes one decode step reads: the yardstick a batch-1 tokens/s figure is measured against.

At batch 1 every dense weight is read once per token and used for one multiply-add, so memory traffic,
not arithmetic, bounds the speed: tokens/s <= bandwidth / bytes per token. Counted here:

* dense modules: every floating parameter and buffer once (tied tensors once: a tied LM head reads the
  whole embedding table); an untied embedding table only the one row a token looks up;
* ``SlicedMLP`` (and any MLP block ``find_mlps`` finds): its weights, already cut to the kept neurons;
* ``GatedMLP``: the whole gate (a packed low-bit gate: the tables its decode op reads, not the float
  copies its torch path keeps), then per token only the rows of the neurons it computed (w1's, the gate
  projection's, w2_t's, and their bias/offset entries);
* ``CATSMLP``: the whole gate projection (it is the gate), then per kept neuron its w2_t row and, for a
  gated block, its w1 row (and their bias/offset entries);
* ``ReLUSkipMLP``: all of fc1, then the computed neurons' rows of fc2;
* ``TreeFF``: the share of each tree's nodes one token visits.

The share of neurons computed per token comes from ``densities`` (block name -> fraction, as measured
by the caller); without one, a ``GatedMLP`` uses its own counters and the others count every neuron.

A dynsparse module of another kind is counted whole and named in ``notes``, so a figure never looks
better than the bytes allow.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..gating.baselines import CATSMLP
from ..gating.lowbit import LowBitGate
from ..gating.modules import GatedMLP, ReLUSkipMLP, SlicedMLP
from ..mlps import find_mlps
from ..tree import TreeFF
from ..tree.layer import tree_active_fraction


@dataclass
class Traffic:
    total: float  # weight bytes one decode step reads
    mlp: float  # of which the MLP blocks (dense or sparse)
    notes: list[str] = field(default_factory=list)  # modules counted whole for want of a better count

    @property
    def other(self) -> float:
        return self.total - self.mlp


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _Counter:
    """Bytes of tensors, each storage counted once."""

    def __init__(self):
        self.seen: set[int] = set()

    def whole(self, t: torch.Tensor | None) -> int:
        if t is None or not t.is_floating_point() or t.data_ptr() in self.seen:
            return 0
        self.seen.add(t.data_ptr())
        return _nbytes(t)

    def module(self, m: nn.Module) -> int:
        return sum(self.whole(t) for t in list(m.parameters()) + list(m.buffers()))

    def claim(self, m: nn.Module) -> None:
        self.seen.update(t.data_ptr() for t in list(m.parameters()) + list(m.buffers()))


def _row(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.shape[-1] * t.element_size()


def _entry(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.element_size()


def _gated_bytes(m: GatedMLP, density: float | None) -> float:
    if density is None:
        density = m.computed / m.total if m.total else 1.0
    if isinstance(m.gate, LowBitGate) and m.gate.packed:  # what its decode op reads: the packed tables
        fixed = sum(_nbytes(t) for t in m.gate.tables())
    else:
        fixed = sum(_nbytes(t) for t in list(m.gate.parameters()) + list(m.gate.buffers()))
    fixed += _nbytes(m.threshold) + _nbytes(m.b2_kernel)
    return fixed + density * m.w1.shape[0] * _per_neuron(m)


def _per_neuron(m) -> int:
    """Bytes the sparse MLP op reads for one listed neuron: its rows of w1, wg (GLU) and w2_t, and its
    bias/offset entries."""
    return _row(m.w1) + _row(m.wg) + _row(m.w2_t) + _entry(m.b1) + _entry(m.bg) + _entry(m.compensation)


def _cats_bytes(m, density: float | None) -> float:
    density = 1.0 if density is None else density
    gate = (m.wg, m.bg) if m.wg is not None else (m.w1, m.b1)  # a plain block's gate is fc1 itself
    fixed = sum(_nbytes(t) for t in gate) + _nbytes(m.threshold) + _nbytes(m.b2_kernel)
    # the op reuses each kept neuron's gate value: past the gate it reads the up row (GLU) and the down row
    kept = _row(m.w2_t) + _entry(m.compensation)
    if m.wg is not None:
        kept += _row(m.w1) + _entry(m.b1)
    return fixed + density * m.w1.shape[0] * kept


def _relu_skip_bytes(m: ReLUSkipMLP, density: float | None) -> float:
    density = 1.0 if density is None else density
    return _nbytes(m.w1) + _nbytes(m.b1) + _nbytes(m.b2) + density * _nbytes(m.w2_t)


def _tree_bytes(m: TreeFF) -> float:
    share = tree_active_fraction(m.depth)
    routed = sum(_nbytes(t) for t in (m.w_in, m.b_in, m.w_out))
    rest = sum(_nbytes(t) for t in m.parameters() if t is not m.w_in and t is not m.b_in and t is not m.w_out)
    return share * routed + rest


def weight_traffic(model: nn.Module, densities: dict[str, float] | None = None) -> Traffic:
    """Weight bytes one decode step of ``model`` reads (see the module doc); ``densities``: block name ->
    share of its neurons one token computes."""
    densities = densities or {}
    count = _Counter()
    mlp = 0.0
    notes = []
    handled: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(h + ".") for h in handled):
            continue  # inside a module counted already (a GatedMLP's gate)
        if isinstance(m, GatedMLP):
            mlp += _gated_bytes(m, densities.get(name))
        elif isinstance(m, CATSMLP):
            mlp += _cats_bytes(m, densities.get(name))
        elif isinstance(m, ReLUSkipMLP):
            mlp += _relu_skip_bytes(m, densities.get(name))
        elif isinstance(m, TreeFF):
            mlp += _tree_bytes(m)
        elif type(m).__module__.startswith("dynsparse.gating") and not isinstance(m, SlicedMLP):
            mlp += sum(_nbytes(t) for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point())
            notes.append(f"{name} ({type(m).__name__}) counted whole")
        else:
            continue
        handled.append(name)
        count.claim(m)
    for block in find_mlps(model).values():  # dense blocks and SIBS's sliced ones
        mlp += sum(count.module(part) for part in (block.fc1, block.fc2, block.gate_proj) if part is not None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ptr = head.weight.data_ptr() if head is not None else None
    other = 0
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.weight.data_ptr() != head_ptr and m.weight.data_ptr() not in count.seen:
            other += _nbytes(m.weight[0])  # one row per token
            count.claim(m)
    other += count.module(model)
    return Traffic(total=mlp + other, mlp=mlp, notes=notes)

