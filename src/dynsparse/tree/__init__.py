"""Tree-structured feed-forward layers: semantics, execution paths, telemetry, pruning, conversion."""
from .convert import TreeConfig, treeify_
from .layer import TreeFF
from .prune import PrunedTreeFF, PruneReport, prune_static
from .telemetry import TreeUsage

__all__ = ["TreeFF", "TreeConfig", "treeify_", "prune_static", "PrunedTreeFF", "PruneReport", "TreeUsage"]
