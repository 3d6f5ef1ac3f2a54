"""Pieces every numba kernel shares: availability, thread count, activations, tensor <-> array glue."""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch

try:
    import numba
    from numba import njit

    NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    NUMBA = False

# LLVM flags for the kernels' inner loops: "reassoc" lets dot products use SIMD partial sums and
# "contract" allows fused multiply-adds. No "afn"/"nnan": erf/exp stay exact and NaN still propagates.
# Reassociation changes the last bits of a dot product; a routing or gating decision can flip only
# when |z| is within rounding of zero, which the tests exclude by margin.
FAST = {"reassoc", "contract"}


def numba_available() -> bool:
    return NUMBA


_POOL_STARTED = False


def sync_threads() -> None:
    """Use torch's thread count so the kernels and the dense baselines share the same cores.

    numba's OpenMP layer shares libgomp with torch, and starting its pool resets the process-wide
    OpenMP thread count (torch.get_num_threads() would jump to all cores). The pool is therefore
    started once here, and torch's setting put back.
    """
    global _POOL_STARTED
    if not NUMBA:
        return
    threads = torch.get_num_threads()
    if not _POOL_STARTED:
        _start_pool(np.zeros(2))
        torch.set_num_threads(threads)
        _POOL_STARTED = True
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def as_f32(t: torch.Tensor) -> np.ndarray:
    """A contiguous float32 numpy view (no copy when t already is one)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


# Weight tensors' numpy views, so that a per-token call (generation) does not pay for
# detach/numpy on every parameter: id(tensor) -> (weakref, data_ptr, view). Only zero-copy views
# are cached (they see in-place updates); an entry dies with its tensor or when .data is replaced.
_VIEWS: dict[int, tuple] = {}


def weight_view(t: torch.Tensor) -> np.ndarray:
    """as_f32 for long-lived tensors (parameters), cached while the tensor and its storage live."""
    key = id(t)
    entry = _VIEWS.get(key)
    if entry is not None and entry[0]() is t and entry[1] == t.data_ptr():
        return entry[2]
    arr = as_f32(t)
    if t.dtype == torch.float32 and t.is_contiguous():
        _VIEWS[key] = (weakref.ref(t, lambda _, k=key: _VIEWS.pop(k, None)), t.data_ptr(), arr)
    return arr


if NUMBA:
    from numba import prange

    @njit(parallel=True, cache=True)
    def _start_pool(a):
        for i in prange(a.shape[0]):
            a[i] += 1.0

    @njit(inline="always", cache=True)
    def act(z, code):
        """Activation by code (dynsparse.tree.activations.ACTIVATION_CODES): gelu(erf), relu, silu, tanh, identity."""
        if code == 0:
            return 0.5 * z * (1.0 + math.erf(z * 0.7071067811865476))
        if code == 1:
            return z if z > 0.0 else 0.0
        if code == 2:
            return z / (1.0 + math.exp(-z))
        if code == 3:
            return math.tanh(z)
        return z
