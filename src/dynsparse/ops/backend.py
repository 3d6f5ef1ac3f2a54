"""One backend vocabulary for every dynsparse op, and the rule that picks one.

* ``reference``: the plain definition in torch (computes everything, then masks); any device, any dtype.
  Tests compare every other backend with it.
* ``torch``: the sparse algorithm in torch ops (gathers only the rows it needs); any device, any dtype.
* ``numba``: fused CPU kernels (float32 compute; bfloat16 weight tables where the op says so).
* ``cpp``: fused CPU kernels in C++ for the decode-step ops (``gemv``, ``gate_skip_mlp``, ``lowbit_gate_mlp``,
  ``tree_infer``), registered as torch ops of their own so a call runs no Python; built once per machine
  (``ops/_cpp.py``).
* ``triton``: fused CUDA kernels (also run on CPU tensors under ``TRITON_INTERPRET=1``, for tests).
* ``auto``: the measured best for the tensors at hand: on CPU cpp where the op has it (and it builds),
  else numba; triton on CUDA; torch elsewhere.

The setting is process-wide (``set_backend``, ``use_backend`` for a block) or per layer (``backend=``);
an op call resolves it to a concrete backend before it runs, so a compiled graph sees a constant.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from ._cpp import cpp_available, require_cpp

BACKENDS = ("auto", "reference", "torch", "numba", "cpp", "triton")
CONCRETE = BACKENDS[1:]

_default = "auto"


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


def set_backend(backend: str) -> None:
    """Process-wide default for layers whose own ``backend`` is ``auto``."""
    global _default
    _default = check_backend(backend)


def get_backend() -> str:
    return _default


@contextlib.contextmanager
def use_backend(backend: str):
    """``with use_backend("reference"): ...`` runs every op in the block on that backend."""
    global _default
    previous, _default = _default, check_backend(backend)
    try:
        yield
    finally:
        _default = previous


def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend: str, device: torch.device, supported: tuple[str, ...] = CONCRETE) -> str:
    """The concrete backend an op runs for tensors on ``device``.

    ``backend`` is the layer's own setting; ``auto`` there defers to the process-wide one, and ``auto``
    there picks by device among ``supported`` (the backends this op and dtype have). An explicit choice
    that cannot serve the device is refused rather than silently replaced.
    """
    choice = check_backend(backend)
    if choice == "auto":
        choice = _default
    if choice == "auto":
        if device.type == "cpu" and "cpp" in supported and cpp_available():
            return "cpp"
        if device.type == "cpu" and "numba" in supported and numba_available():
            return "numba"
        if device.type == "cuda" and "triton" in supported and triton_available():
            return "triton"
        return "torch" if "torch" in supported else "reference"
    if choice not in supported:
        raise ValueError(f"backend {choice!r} does not serve this op here; it supports {list(supported)}")
    if choice == "numba":
        if device.type != "cpu":
            raise ValueError(f"backend 'numba' runs on CPU tensors, got a tensor on {device}")
        if not numba_available():
            raise RuntimeError("backend 'numba' needs numba: pip install numba")
    if choice == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors, got a tensor on {device}")
        require_cpp()
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs triton: pip install triton")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise ValueError(f"backend 'triton' runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")
    return choice
