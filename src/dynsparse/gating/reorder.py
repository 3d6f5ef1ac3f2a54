"""Neuron reordering for grouped gates: put neurons that fire together into the same group.

A grouped gate switches blocks of ``group_size`` *consecutive* neurons, and a block is "on" for a token
when any of its neurons is. In a pretrained MLP consecutive neurons are unrelated, so almost every group
holds some active neuron and the gate computes many inactive neurons with it (low precision). Permuting
the hidden neurons changes nothing about the block's function (fc1 rows, b1 and fc2 columns move
together) but lets groups be chosen so that their members' firing patterns overlap.

The objective is the *group density*: the share of (token, group) pairs with at least one active neuron,
i.e. what a perfect grouped gate must compute. We minimise it with balanced k-means on the neurons'
binary firing patterns over calibration tokens (squared distance between 0/1 patterns = Hamming
distance), from two starts: neurons sorted by the leading principal component of their patterns and cut
into equal groups, and greedy nearest-neighbour groups (the most often firing free neuron with its
nearest free neighbours). Each start alternates centroids and a capacity-limited assignment (most
decided neurons pick first); the grouping with the lowest group density seen wins (the identity order
is a candidate too). Deterministic for a given input.
"""
from __future__ import annotations

import numpy as np
import torch


def group_density(active: torch.Tensor, group_size: int, perm: torch.Tensor | None = None) -> float:
    """Share of (token, group) pairs with >= 1 active neuron when neurons are laid out as ``perm``."""
    a = active if perm is None else active[:, perm]
    return a.reshape(a.shape[0], -1, group_size).any(-1).float().mean().item()


def _check(active: torch.Tensor, group_size: int) -> None:
    if not isinstance(active, torch.Tensor) or active.dim() != 2 or active.dtype != torch.bool:
        raise TypeError("active must be a 2-D bool tensor (tokens, d_ff) of firing masks")
    if active.shape[0] == 0:
        raise ValueError("no calibration tokens to compute a neuron order from")
    if group_size < 1 or active.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} must be >= 1 and divide d_ff {active.shape[1]}")


def _leading_component(x: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Per-neuron score on the leading principal component of the centred patterns ``x`` (d_ff, n)."""
    xc = (x - x.mean(0)).double()
    v = torch.linspace(1.0, 2.0, x.shape[1], dtype=torch.float64)  # fixed start: deterministic
    for _ in range(iters):
        v = xc.t() @ (xc @ v)
        v = v / v.norm().clamp_min(1e-30)
    score = xc @ v
    return score if score @ x.sum(1).double() >= 0 else -score  # sign: frequent neurons score high


def _balanced_assign(dist: np.ndarray, group_size: int) -> np.ndarray:
    """Each neuron's group: neurons with the largest regret (2nd-best minus best distance) choose first,
    each takes its nearest group that still has room, so every group ends with exactly group_size."""
    part = np.partition(dist, 1, axis=1)
    order = np.lexsort((np.arange(dist.shape[0]), -(part[:, 1] - part[:, 0])))
    room = np.full(dist.shape[1], group_size)
    full = np.zeros(dist.shape[1], dtype=bool)
    labels = np.empty(dist.shape[0], dtype=np.int64)
    for i in order:
        d = np.where(full, np.inf, dist[i])
        g = int(np.argmin(d))
        labels[i] = g
        room[g] -= 1
        full[g] = room[g] == 0
    return labels


def _greedy_groups(x: torch.Tensor, group_size: int) -> np.ndarray:
    """Group labels built one group at a time: the most often firing unassigned neuron and its
    group_size - 1 nearest unassigned neurons (Hamming distance of the patterns ``x`` (d_ff, n))."""
    d_ff = x.shape[0]
    freq = x.sum(1)
    dist = (freq[:, None] + freq[None, :] - 2 * (x @ x.t())).numpy().astype(np.float64)
    order = np.lexsort((np.arange(d_ff), -freq.numpy()))
    free = np.ones(d_ff, dtype=bool)
    labels = np.empty(d_ff, dtype=np.int64)
    g = 0
    for seed in order:
        if not free[seed]:
            continue
        free[seed] = False
        cand = np.flatnonzero(free)
        near = cand[np.lexsort((cand, dist[seed, cand]))[:group_size - 1]]
        labels[seed] = g
        labels[near] = g
        free[near] = False
        g += 1
    return labels


def _kmeans(x: torch.Tensor, active: torch.Tensor, labels: np.ndarray, group_size: int, iters: int):
    """Balanced k-means from ``labels``: (best permutation seen, its group density)."""
    k = x.shape[0] // group_size
    best_perm, best = None, float("inf")
    for _ in range(iters + 1):
        perm = _perm_from_labels(labels)
        dens = group_density(active, group_size, perm)
        if dens < best - 1e-12:
            best_perm, best = perm, dens
        cent = x[perm].reshape(k, group_size, -1).mean(1)  # (k, n): groups are contiguous in perm
        dist = ((cent * cent).sum(1) - 2 * (x @ cent.t())).numpy()  # + |x|^2, the same for every group
        new = _balanced_assign(dist, group_size)
        if np.array_equal(new, labels):
            break
        labels = new
    return best_perm, best


def _perm_from_labels(labels: np.ndarray) -> torch.Tensor:
    """Neurons of group 0 first (ascending index), then group 1, ... (stable)."""
    return torch.from_numpy(np.argsort(labels, kind="stable"))


def coactivation_permutation(active: torch.Tensor, group_size: int, iters: int = 15,
                             max_tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """A permutation ``perm`` of the d_ff neurons (new position j holds old neuron ``perm[j]``) such that
    neurons that fire together on the rows of ``active`` (tokens, d_ff) share a group of ``group_size``.

    Never worse than the identity order on the rows it saw (the identity is a candidate too).
    """
    _check(active, group_size)
    n, d_ff = active.shape
    identity = torch.arange(d_ff)
    if group_size == 1 or group_size == d_ff:
        return identity
    if n > max_tokens:  # a fixed subsample keeps it to seconds at d_ff 4096
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_tokens].sort().values
        active = active[rows]
    x = active.t().float().contiguous()  # (d_ff, n) firing patterns
    pca = np.empty(d_ff, dtype=np.int64)
    pca[np.lexsort((np.arange(d_ff), _leading_component(x).numpy()))] = np.arange(d_ff) // group_size
    best_perm, best = identity, group_density(active, group_size)
    for init in (pca, _greedy_groups(x, group_size)):
        perm, dens = _kmeans(x, active, init, group_size, iters)
        if dens < best - 1e-12:
            best_perm, best = perm, dens
    return best_perm


def check_permutation(perm: torch.Tensor, d_ff: int) -> torch.Tensor:
    """``perm`` as int64 if it is a permutation of range(d_ff), else a ValueError naming the problem."""
    if not isinstance(perm, torch.Tensor) or perm.dim() != 1 or perm.numel() != d_ff:
        raise ValueError(f"neuron permutation must be a 1-D tensor of length d_ff={d_ff}, "
                         f"got shape {tuple(perm.shape) if isinstance(perm, torch.Tensor) else type(perm).__name__}")
    if perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise ValueError(f"neuron permutation must hold integers, got {perm.dtype}")
    perm = perm.long()
    if not torch.equal(perm.sort().values, torch.arange(d_ff)):
        raise ValueError(f"neuron permutation is not a permutation of range({d_ff}) (repeated or missing neurons)")
    return perm


def permute_mlp(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, perm: torch.Tensor):
    """(w1, b1, w2) with hidden neuron ``perm[j]`` moved to position j: fc1 rows, b1 and fc2 columns move
    together, so fc2(act(fc1(x))) is unchanged (the sum over neurons only changes order)."""
    perm = check_permutation(perm, w1.shape[0])
    return w1[perm], None if b1 is None else b1[perm], w2[:, perm]
