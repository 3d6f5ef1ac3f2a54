"""dynsparse: dynamic activation sparsity for transformer feed-forward blocks.

Importing it registers the language models (plain and statically pruned) with HF's ``AutoConfig`` and
``AutoModelForCausalLM``, so ``from_pretrained`` works on saved run directories. The pretrained-sparsity
API (``sparsify_``, ``MGSConfig``, ``SIBSConfig``, ...) and training load on first use.
"""
from importlib import import_module

from .mlps import MLPBlock, find_mlps
from .tree import PrunedTreeFF, TreeConfig, TreeFF, TreeUsage, prune_static, treeify_
from .lm import DynSparseLMConfig, DynSparseLMForCausalLM, preset_config  # registers the Auto classes
from .dynamics.pruned_lm import PrunedDynSparseLMForCausalLM  # likewise for pruned models

__version__ = "0.1.0"

_LAZY = {
    "sparsify_": "dynsparse.gating",
    "MGSConfig": "dynsparse.gating",
    "SIBSConfig": "dynsparse.gating",
    "record_activations": "dynsparse.gating",
    "load_gates": "dynsparse.gating",
    "fit_gates": "dynsparse.gating",
    "apply_gates": "dynsparse.gating",
    "GateSet": "dynsparse.gating",
    "TrainConfig": "dynsparse.train",
    "evaluate_lm": "dynsparse.eval",
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
    "DynSparseLMConfig",
    "DynSparseLMForCausalLM",
    "PrunedDynSparseLMForCausalLM",
    "preset_config",
    *_LAZY,
    "__version__",
]
