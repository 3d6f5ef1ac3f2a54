"""Fast CPU execution of conditional computation (numba), each kernel with a plain reference."""
from ._common import numba_available
from .tree_infer import tree_forward_kernel

__all__ = [
    "numba_available",
    "tree_forward_kernel",
]
