"""Pieces every numba kernel shares: thread count, activations by code, tensor <-> array glue."""
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


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's raw bits as a zero-copy uint16 numpy view (numpy has no bfloat16); the
    kernels widen each element to float32 with ``load`` as they read it."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return array(t.view(torch.int16)).view(np.uint16)


_TYPESTR = {torch.float32: "<f4", torch.float64: "<f8", torch.int64: "<i8", torch.int32: "<i4",
            torch.int16: "<i2", torch.uint8: "|u1", torch.bool: "|b1"}


class _Exported:
    """Holds a tensor and describes its memory to numpy through the array interface."""

    def __init__(self, t: torch.Tensor):
        self.tensor = t
        self.__array_interface__ = {"data": (t.data_ptr(), False), "shape": tuple(t.shape),
                                    "typestr": _TYPESTR[t.dtype], "version": 3}


def array(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a contiguous CPU tensor that keeps the tensor alive.

    ``Tensor.numpy()`` marks the storage as not resizable for good, and FSDP2 frees unsharded
    parameters by resizing their storage to zero ("Trying to resize storage that is not resizable"),
    so every array a kernel reads or writes is made this way instead."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return np.asarray(_Exported(t))


def as_f32(t: torch.Tensor) -> np.ndarray:
    """A contiguous float32 numpy view (no copy when t already is one)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return array(t)


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


def weight_table(t: torch.Tensor) -> np.ndarray:
    """The tree kernel's view of a weight table: bfloat16 bits stay bfloat16 (half the bytes to read;
    the kernel widens them), anything else is weight_view's float32."""
    if t.dtype == torch.bfloat16:
        return bf16_bits(t)
    return weight_view(t)


if NUMBA:
    from llvmlite import ir
    from numba import prange, types
    from numba.extending import intrinsic, overload

    @intrinsic
    def _f32_from_bits(typingctx, bits):
        """Reinterpret a uint32 as float32 (one LLVM bitcast; vectorizes with the loop around it)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    def load(a, i):
        """a[i] as float32 where a holds float32 or bfloat16 bits (uint16): bf16 is the upper half of
        an fp32, so widening is a 16-bit shift."""

    @overload(load, inline="always")
    def _load(a, i):
        if a.dtype == types.uint16:
            return lambda a, i: _f32_from_bits(np.uint32(np.uint32(a[i]) << np.uint32(16)))
        return lambda a, i: a[i]

    @njit(parallel=True, cache=True)
    def _start_pool(a):
        for i in prange(a.shape[0]):
            a[i] += 1.0

    @njit(inline="always", cache=True)
    def act(z, code):
        """Activation by code (dynsparse.activations.REGISTRY): gelu(erf), relu, silu, tanh, identity."""
        if code == 0:
            return 0.5 * z * (1.0 + math.erf(z * 0.7071067811865476))
        if code == 1:
            return z if z > 0.0 else 0.0
        if code == 2:
            return z / (1.0 + math.exp(-z))
        if code == 3:
            return math.tanh(z)
        return z
