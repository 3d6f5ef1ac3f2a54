"""CSR index lists, the currency between gates and sparse MLPs: ``indptr`` int64 (M+1,) and ``indices``
int32 (nnz,), token i's entries being ``indices[indptr[i]:indptr[i+1]]`` (neurons, or groups of neurons).

A gate writes them without a dense (M, d_ff) mask where it can: such a mask and its nonzero() pass cost
as much as the sparse MLP itself. The mask conversions here are the plain definition and the torch path.
"""
from __future__ import annotations

import torch


def check_x(x, d: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"x must have shape (M, {d}) to match {what}, got {tuple(x.shape)}")


def check_csr_layout(indptr, indices, m: int, name: str = "indices") -> None:
    """Dtypes and shapes only: what a fake (meta) tensor can be checked for."""
    if not isinstance(indptr, torch.Tensor) or indptr.dtype != torch.int64 or indptr.dim() != 1 \
            or indptr.shape[0] != m + 1:
        raise ValueError(f"indptr must be int64 of shape ({m + 1},), got "
                         f"{getattr(indptr, 'dtype', type(indptr).__name__)} {tuple(getattr(indptr, 'shape', ()))}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or indices.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor, got "
                         f"{getattr(indices, 'dtype', type(indices).__name__)} {tuple(getattr(indices, 'shape', ()))}")


def check_csr(indptr, indices, m: int, n: int, name: str = "indices") -> None:
    """CSR lists over n columns (neurons, or groups with name="groups") for m tokens.

    The content checks read the lists, which on an accelerator costs a synchronisation per call, so
    there only the layout is checked (the layers build their lists from their own width). On CPU they
    run in numpy: a handful of torch reductions on short lists cost more than a one-token kernel. (The
    lists are transient outputs, never parameters, so ``Tensor.numpy()`` pinning their storage's size
    is harmless, unlike for weights; see ``ops._numba.array``.)"""
    check_csr_layout(indptr, indices, m, name)
    if indptr.device.type != "cpu" or indices.device.type != "cpu":
        return
    ptr, idx = indptr.detach().numpy(), indices.detach().numpy()
    if ptr[0] != 0 or ptr[-1] != idx.shape[0] or (ptr[1:] < ptr[:-1]).any():
        raise ValueError(f"indptr must start at 0, never decrease and end at len({name})")
    if idx.shape[0] and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name} must lie in [0, {n})")


def csr_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense (M, n) bool mask -> CSR lists, ascending within each token, on the mask's device."""
    counts = mask.sum(1)
    indptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(counts, 0, out=indptr[1:])
    indices = mask.nonzero()[:, 1].to(torch.int32)
    return indptr, indices


def mask_from_csr(indptr: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """CSR lists -> the dense (M, n) bool mask they describe."""
    m = indptr.numel() - 1
    mask = torch.zeros(m, n, dtype=torch.bool, device=indices.device)
    mask[token_of_entry(indptr), indices.long()] = True
    return mask


def token_of_entry(indptr: torch.Tensor) -> torch.Tensor:
    """(nnz,) int64: the token each list entry belongs to."""
    m = indptr.numel() - 1
    return torch.repeat_interleave(torch.arange(m, device=indptr.device), indptr[1:] - indptr[:-1])


def expand_groups(indptr: torch.Tensor, groups: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group lists -> neuron lists (the neurons g*group_size ... (g+1)*group_size-1 of each group)."""
    counts = (indptr[1:] - indptr[:-1]) * group_size
    neuron_ptr = torch.zeros_like(indptr)
    torch.cumsum(counts, 0, out=neuron_ptr[1:])
    offsets = torch.arange(group_size, dtype=torch.int32, device=groups.device)
    return neuron_ptr, (groups.unsqueeze(1) * group_size + offsets).reshape(-1)
