"""Gate ops: a cheap predictor's logits per token -> CSR lists of the neurons (or groups) to compute.

* ``dynsparse::lowrank_gate_indices``: logit[m, j] = (x[m] @ A) @ B[:, j] + c[j]; neuron j is listed for
  token m when its logit exceeds threshold[j];
* ``dynsparse::grouped_gate_indices``: one logit x[m] @ G[:, g] + c[g] per block of ``group_size``
  consecutive neurons; a group over its threshold lists its neurons g*group_size .. (g+1)*group_size-1;
* ``dynsparse::grouped_gate_groups``: the same gate listing the groups themselves (for the sparse MLP's
  "grouped" strategy, which runs group by group).

Each returns (indptr int64 (M+1,), indices int32 (nnz,)), ascending within each token; nnz depends on
the data, so the fake implementations declare it a dynamic size. Backends: reference (torch; also
serves "torch") and numba. Thresholds are a scalar or one per logit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._eager import call
from ..backend import resolve
from ..mlp.csr import check_x
from . import reference

GATE_BACKENDS = ("reference", "torch", "numba")


def _impl(backend: str, op: str):
    if backend in ("reference", "torch"):
        return getattr(reference, f"{op}_reference")
    if backend == "numba":
        from . import numba_impl

        return getattr(numba_impl, f"{op}_numba")
    raise ValueError(f"backend must be one of {list(GATE_BACKENDS)} for the gate ops, got {backend!r}")


def _check_vectors(c, threshold, n: int, what: str, device) -> None:
    if c is not None and (not isinstance(c, torch.Tensor) or c.shape != (n,)):
        raise ValueError(f"c must have shape ({n},) like {what}, got {tuple(getattr(c, 'shape', ()))}")
    if not isinstance(threshold, torch.Tensor) or threshold.shape not in ((), (n,)):
        shape = tuple(getattr(threshold, "shape", ()))
        raise ValueError(f"threshold must be a scalar or have shape ({n},), got {shape}")
    for name, t in (("c", c), ("threshold", threshold)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, x on {device}")


def _check_lowrank(x, A, B, c, threshold) -> int:
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor) or A.dim() != 2 or B.dim() != 2 \
            or A.shape[1] != B.shape[0]:
        raise ValueError(f"A must be (d, r) and B (r, d_ff), got {tuple(getattr(A, 'shape', ()))} and "
                         f"{tuple(getattr(B, 'shape', ()))}")
    check_x(x, A.shape[0], "A (d, r)")
    if A.device != x.device or B.device != x.device:
        raise ValueError(f"A and B must be on x's device {x.device}, got {A.device} and {B.device}")
    _check_vectors(c, threshold, B.shape[1], "B's d_ff columns", x.device)
    return B.shape[1]


def _check_grouped(x, G, c, threshold) -> int:
    if not isinstance(G, torch.Tensor) or G.dim() != 2:
        raise ValueError(f"G must be (d, n_groups), got {tuple(getattr(G, 'shape', ()))}")
    check_x(x, G.shape[0], "G (d, n_groups)")
    if G.device != x.device:
        raise ValueError(f"G must be on x's device {x.device}, got {G.device}")
    _check_vectors(c, threshold, G.shape[1], "G's n_groups columns", x.device)
    return G.shape[1]


def _check_group_size(group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def _thresholds(threshold: Tensor, n: int) -> Tensor:
    return threshold.float().expand(n).contiguous()


def _fake_lists(x: Tensor) -> tuple[Tensor, Tensor]:
    nnz = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(x.shape[0] + 1, dtype=torch.int64), x.new_empty(nnz, dtype=torch.int32)


# ------------------------------------------------------------------------------------------- low-rank
def _lowrank_gate_indices(x: Tensor, A: Tensor, B: Tensor, c: Tensor | None, threshold: Tensor,
                          backend: str) -> tuple[Tensor, Tensor]:
    d_ff = _check_lowrank(x, A, B, c, threshold)
    return _impl(backend, "lowrank_gate_indices")(x, A, B, c, _thresholds(threshold, d_ff))


lowrank_gate_indices_op = torch.library.custom_op("dynsparse::lowrank_gate_indices", _lowrank_gate_indices,
                                                  mutates_args=())


@lowrank_gate_indices_op.register_fake
def _(x, A, B, c, threshold, backend):
    _check_lowrank(x, A, B, c, threshold)
    return _fake_lists(x)


# -------------------------------------------------------------------------------------------- grouped
def _grouped_gate_indices(x: Tensor, G: Tensor, c: Tensor | None, threshold: Tensor, group_size: int,
                          backend: str) -> tuple[Tensor, Tensor]:
    _check_group_size(group_size)
    n_groups = _check_grouped(x, G, c, threshold)
    return _impl(backend, "grouped_gate_indices")(x, G, c, _thresholds(threshold, n_groups), group_size)


grouped_gate_indices_op = torch.library.custom_op("dynsparse::grouped_gate_indices", _grouped_gate_indices,
                                                  mutates_args=())


@grouped_gate_indices_op.register_fake
def _(x, G, c, threshold, group_size, backend):
    _check_group_size(group_size)
    _check_grouped(x, G, c, threshold)
    return _fake_lists(x)


def _grouped_gate_groups(x: Tensor, G: Tensor, c: Tensor | None, threshold: Tensor,
                         backend: str) -> tuple[Tensor, Tensor]:
    n_groups = _check_grouped(x, G, c, threshold)
    return _impl(backend, "grouped_gate_groups")(x, G, c, _thresholds(threshold, n_groups))


grouped_gate_groups_op = torch.library.custom_op("dynsparse::grouped_gate_groups", _grouped_gate_groups,
                                                 mutates_args=())


@grouped_gate_groups_op.register_fake
def _(x, G, c, threshold, backend):
    _check_grouped(x, G, c, threshold)
    return _fake_lists(x)


# ------------------------------------------------------------------------------------------ public API
def _as_threshold(threshold, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(threshold, Tensor):
        return threshold.detach().to(device=x.device, dtype=torch.float32)
    return torch.as_tensor(threshold, dtype=torch.float32, device=x.device)


def _detached(t):
    return t.detach() if isinstance(t, Tensor) else t


def lowrank_gate_indices(x: Tensor, A: Tensor, B: Tensor, c: Tensor | None, threshold, *,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Neuron lists of a rank-r gate: x (M, d), A (d, r), B (r, d_ff), c (d_ff,) or None,
    threshold scalar or (d_ff,)."""
    threshold = _as_threshold(threshold, x)
    _check_lowrank(x, A, B, c, threshold)
    chosen = resolve(backend, x.device, GATE_BACKENDS)
    return call(lowrank_gate_indices_op, _lowrank_gate_indices, x, A.detach(), B.detach(), _detached(c), threshold,
                chosen)


def grouped_gate_indices(x: Tensor, G: Tensor, c: Tensor | None, threshold, group_size: int, *,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Neuron lists of a grouped gate: x (M, d), G (d, n_groups), c (n_groups,) or None, threshold
    scalar or (n_groups,); each group on lists its ``group_size`` neurons."""
    _check_group_size(group_size)
    threshold = _as_threshold(threshold, x)
    _check_grouped(x, G, c, threshold)
    chosen = resolve(backend, x.device, GATE_BACKENDS)
    return call(grouped_gate_indices_op, _grouped_gate_indices, x, G.detach(), _detached(c), threshold, group_size,
                chosen)


def grouped_gate_groups(x: Tensor, G: Tensor, c: Tensor | None, threshold, *,
                        backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Group lists of a grouped gate (the sparse MLP's "grouped" strategy reads them)."""
    threshold = _as_threshold(threshold, x)
    _check_grouped(x, G, c, threshold)
    chosen = resolve(backend, x.device, GATE_BACKENDS)
    return call(grouped_gate_groups_op, _grouped_gate_groups, x, G.detach(), _detached(c), threshold, chosen)


__all__ = ["lowrank_gate_indices", "grouped_gate_indices", "grouped_gate_groups", "lowrank_gate_indices_op",
           "grouped_gate_indices_op", "grouped_gate_groups_op", "GATE_BACKENDS"]
