"""Fast CPU execution of conditional computation (numba), each kernel with a plain reference."""
from ._common import numba_available
from .gated_mlp import (
    gated_sparse_mlp,
    grouped_gate_indices,
    lowrank_gate_indices,
    relu_skip_mlp,
    sparse_mlp,
    union_sparse_mlp,
)
from .grouped_mlp import grouped_gate_groups, grouped_sparse_mlp
from .tree_infer import tree_forward_kernel

__all__ = [
    "numba_available",
    "tree_forward_kernel",
    "lowrank_gate_indices",
    "grouped_gate_indices",
    "sparse_mlp",
    "union_sparse_mlp",
    "relu_skip_mlp",
    "gated_sparse_mlp",
    "grouped_gate_groups",
    "grouped_sparse_mlp",
]
