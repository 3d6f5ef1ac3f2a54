"""Replace a model's MLP blocks with tree FF layers, in place (torchao-style verb)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..mlps import FilterFn, find_mlps
from .layer import TreeFF, tree_active_fraction, tree_flops_per_token


@dataclass
class TreeConfig:
    """What to build in place of each MLP block. d_model and d_out follow the block being replaced."""

    depth: int
    trees: int = 1
    activation: str = "gelu"
    act_position: str = "node"
    bias: bool = True
    whiten: bool = False  # whiten the input with earlier batches' statistics while training (tree/whiten.py)
    backend: str = "auto"

    def build(self, d_model: int, d_out: int | None = None, **factory) -> TreeFF:
        return TreeFF(d_model, d_out=d_out, **asdict(self), **factory)

    @property
    def active_fraction(self) -> float:
        return tree_active_fraction(self.depth)

    def flops_per_token(self, d_model: int, d_out: int | None = None) -> int:
        return tree_flops_per_token(d_model, d_model if d_out is None else d_out, self.depth, self.trees)


def treeify_(model: nn.Module, config: TreeConfig, filter_fn: FilterFn | None = None) -> list[str]:
    """Swap every MLP block ``find_mlps`` finds (and ``filter_fn(module, fqn)`` accepts) for a fresh
    ``TreeFF`` on the same device and dtype. Returns the names of the replaced blocks."""
    if not isinstance(config, TreeConfig):
        raise TypeError(f"config must be a TreeConfig, got {type(config).__name__}")
    blocks = find_mlps(model, filter_fn)
    if not blocks:
        raise ValueError(f"no MLP blocks found in {type(model).__name__} (fc1/act/fc2, c_fc/c_proj, up/down, ...)")
    trees = {}
    for name, block in blocks.items():  # build every tree before touching the model: all or nothing
        w1, _, w2, _ = block.linear_weights()
        trees[name] = config.build(block.d_model, d_out=w2.shape[0], device=w1.device, dtype=w1.dtype)
    for name, block in blocks.items():
        block.replace(trees[name])
    return list(blocks)
