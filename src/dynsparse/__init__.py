"""dynsparse: dynamic activation sparsity for transformer feed-forward blocks."""
from .mlps import MLPBlock, find_mlps
from .tree import PrunedTreeFF, TreeConfig, TreeFF, TreeUsage, prune_static, treeify_

__version__ = "0.1.0"

__all__ = [
    "TreeFF",
    "TreeConfig",
    "TreeUsage",
    "treeify_",
    "prune_static",
    "PrunedTreeFF",
    "find_mlps",
    "MLPBlock",
    "__version__",
]
