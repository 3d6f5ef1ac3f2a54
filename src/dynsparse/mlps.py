"""Find the MLP blocks of a model (HF transformers or plain PyTorch) and swap them out.

Three layouts cover the models we care about:

* ``module``: one module whose forward *is* the MLP (GPT-2's ``GPT2MLP`` with c_fc/c_proj,
  DETR's ``DetrMLP`` and timm/our ``fc1``/``fc2`` blocks, Llama-style gate/up/down).
  Replacing it means replacing the module.
* ``inline``: the MLP's layers live on a bigger module whose forward also does other things (OPT's
  decoder layer: ``fc1`` -> ``activation_fn`` -> ``fc2``). Replacing it means putting the new block
  in ``fc1``'s place and turning the activation and ``fc2`` into identities.
* ``split``: BERT/ViT/RoBERTa put the first half in ``intermediate`` (``dense`` + ``intermediate_act_fn``)
  and the second half in ``output.dense`` (followed by dropout, residual and LayerNorm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

FilterFn = Callable[[nn.Module, str], bool]

# (first layer, second layer, activation attribute) names of known MLP layouts, most specific first.
_PAIRS = [
    ("c_fc", "c_proj", ("act",)),  # GPT-2
    ("fc1", "fc2", ("activation_fn", "act", "act_fn", "activation")),  # OPT, DETR, BART, timm, dynsparse LM
    ("dense_h_to_4h", "dense_4h_to_h", ("act", "activation_fn")),  # GPT-NeoX, BLOOM
    ("up_proj", "down_proj", ("act_fn", "act")),  # Llama, Mistral, Qwen (gated: gate_proj too)
    ("w1", "w2", ("act", "activation")),
]
_ACT_ATTRS = ("activation_fn", "act", "act_fn", "activation", "intermediate_act_fn")


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # HF GPT-2 Conv1D: weight (in, out)


def _is_norm(m) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or type(m).__name__.endswith("Norm")


def _linear_weight(m) -> torch.Tensor:
    """Weight in nn.Linear's (out, in) convention."""
    return m.weight.t() if type(m).__name__ == "Conv1D" else m.weight


@dataclass
class MLPBlock:
    """One MLP block: where it lives, its two layers and activation, and how to replace it."""

    name: str  # fully qualified name of the module that owns (kind inline/split) or is (module) the block
    kind: str  # "module", "inline" or "split"
    owner: nn.Module  # the block itself (module) or the module holding its layers (inline/split)
    fc1: nn.Module
    fc2: nn.Module
    act: Callable | None
    gate_proj: nn.Module | None = None  # Llama-style gated block: fc2(act(gate_proj(x)) * fc1(x)), fc1 = up_proj
    _fc1_path: tuple[str, ...] = ()
    _fc2_path: tuple[str, ...] = ()
    _act_path: tuple[str, ...] = ()
    _parent: nn.Module | None = None  # for kind "module": the module holding the block
    _attr: str = ""
    _aliases: tuple = ()  # for kind "module": every other (parent, attribute) that holds the same block

    @property
    def d_model(self) -> int:
        return _linear_weight(self.fc1).shape[1]

    @property
    def d_ff(self) -> int:
        return _linear_weight(self.fc1).shape[0]

    @property
    def gated(self) -> bool:
        return self.gate_proj is not None

    @property
    def activation_name(self) -> str:
        return type(self.act).__name__ if self.act is not None else "none"

    def linear_weights(self):
        """(W1 (d_ff, d_model), b1 or None, W2 (d_model, d_ff), b2 or None) in nn.Linear convention."""
        return (_linear_weight(self.fc1), self.fc1.bias, _linear_weight(self.fc2), self.fc2.bias)

    def gate_weights(self):
        """(Wg (d_ff, d_model), bg or None) of a gated block's gate projection; (None, None) otherwise."""
        if self.gate_proj is None:
            return None, None
        return _linear_weight(self.gate_proj), self.gate_proj.bias

    def routing_weights(self):
        """(W, b) whose pre-activation decides if a neuron is active (act(z) > 0): the gate projection of a
        gated block, fc1 otherwise. Gates that predict activity start from these."""
        w1, b1, _, _ = self.linear_weights()
        return self.gate_weights() if self.gated else (w1, b1)

    def replace(self, new: nn.Module) -> None:
        """Install ``new`` (a module mapping (..., d_model) -> (..., d_model)) in place of the block."""
        if self.kind == "module":
            setattr(self._parent, self._attr, new)
            for parent, attr in self._aliases:  # one block shared under several names is replaced everywhere
                setattr(parent, attr, new)
            return
        _set_path(self.owner, self._fc1_path, new)
        _set_path(self.owner, self._fc2_path, nn.Identity())
        if self._act_path:
            _set_path(self.owner, self._act_path, nn.Identity())


def _set_path(root: nn.Module, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        root = getattr(root, part)
    setattr(root, path[-1], value)


def _find_act(module, names=_ACT_ATTRS):
    for n in names:
        if hasattr(module, n):
            return n, getattr(module, n)
    return None, None


def _match(name: str, module: nn.Module):
    """The MLPBlock that ``module`` is or owns, or None."""
    children = dict(module.named_children())
    # BERT/ViT layout: intermediate.dense (+ intermediate_act_fn) and output.dense
    inter, out = children.get("intermediate"), children.get("output")
    if inter is not None and out is not None and _is_linear(getattr(inter, "dense", None)) and _is_linear(
        getattr(out, "dense", None)
    ):
        act_name, act = _find_act(inter, ("intermediate_act_fn",))
        return MLPBlock(
            name, "split", module, inter.dense, out.dense, act,
            _fc1_path=("intermediate", "dense"), _fc2_path=("output", "dense"),
            _act_path=("intermediate", act_name) if act_name else (),
        )
    for first, second, act_names in _PAIRS:
        a, b = children.get(first), children.get(second)
        if not (_is_linear(a) and _is_linear(b)):
            continue
        w1, w2 = _linear_weight(a), _linear_weight(b)
        if w1.shape[0] != w2.shape[1] or w1.shape[1] != w2.shape[0]:
            continue  # not an in -> hidden -> in block
        act_name, act = _find_act(module, act_names)
        gate = children.get("gate_proj") if _is_linear(children.get("gate_proj")) else None
        gated = gate is not None
        own = {first, second} | ({"gate_proj"} if gated else set())
        # Any other child with parameters (attention, norms) means the module does more than the MLP.
        others = [n for n, c in children.items() if n not in own and any(True for _ in c.parameters())]
        if others and all(_is_norm(children[n]) for n in others):
            # fc1 -> act -> norm -> fc2 (timm's NormMlp): the norm sits inside the block, so neither swapping the
            # module (it is not fc2(act(fc1 x))) nor the inline swap (the norm would wrap the new block) is exact.
            continue
        kind = "inline" if others or any(True for _ in module.parameters(recurse=False)) else "module"
        if kind == "inline" and gated:
            continue
        return MLPBlock(
            name, kind, module, a, b, act, gate_proj=gate,
            _fc1_path=(first,), _fc2_path=(second,), _act_path=(act_name,) if act_name else (),
        )
    return None


def find_mlps(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, MLPBlock]:
    """All MLP blocks of ``model`` by name (outermost match wins; nothing inside a match is searched).

    ``filter_fn(module, fqn)`` narrows the choice: it sees the block module (or owner) and its name.
    """
    found: dict[str, MLPBlock] = {}
    covered: list[str] = []
    parents: dict[int, list] = {}
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            parents.setdefault(id(child), []).append((module, child_name))
    for name, module in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in covered):
            continue
        block = _match(name, module)
        if block is None:
            continue
        covered.append(name)
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if block.kind == "module":
            if id(module) not in parents:
                continue  # the model itself is one MLP: nothing above it to swap into
            (block._parent, block._attr), *rest = parents[id(module)]
            block._aliases = tuple(rest)
        found[name] = block
    return found
