"""dynsparse: dynamic activation sparsity for transformer feed-forward blocks.

The tree layer API loads with torch alone; the pretrained-sparsity API (``sparsify_``, ``MGSConfig``,
``SIBSConfig``, ...) and the language model (``DynSparseLMForCausalLM``, which registers itself with HF's
Auto classes) load on first use, so ``import dynsparse`` stays cheap.
"""
from importlib import import_module

from .mlps import MLPBlock, find_mlps
from .tree import PrunedTreeFF, TreeConfig, TreeFF, TreeUsage, prune_static, treeify_

__version__ = "0.1.0"

_LAZY = {
    "sparsify_": "dynsparse.gating",
    "MGSConfig": "dynsparse.gating",
    "SIBSConfig": "dynsparse.gating",
    "record_activations": "dynsparse.gating",
    "load_gates": "dynsparse.gating",
    "DynSparseLMConfig": "dynsparse.lm",
    "DynSparseLMForCausalLM": "dynsparse.lm",
    "PrunedDynSparseLMForCausalLM": "dynsparse.dynamics.pruned_lm",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynsparse' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "TreeFF",
    "TreeConfig",
    "TreeUsage",
    "treeify_",
    "prune_static",
    "PrunedTreeFF",
    "find_mlps",
    "MLPBlock",
    *_LAZY,
    "__version__",
]
