"""Weights in the decode dtype, except where a sparse kernel reads float32 tables.

The sparse MLP ops compute in float32. Most read their weight rows in place only when those are float32
(any other dtype would be converted, the whole table, on every call), so ``cast_weights_`` leaves a module
that hands an ``MLPWeights`` to the ops (``GatedMLP``, ``ReLUSkipMLP``) as it is: it takes and returns
activations of the model's dtype and computes inside in float32. A module that names ``stored_tables``
(``CATSMLP``: its gate-skip kernels read bf16 tables as stored) has those tables cast, and only those.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.mlp import MLPWeights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def feeds_sparse_ops(module: nn.Module) -> bool:
    """True for a module whose weights the sparse MLP ops read (it exposes them as ``MLPWeights``)."""
    return isinstance(getattr(module, "weights", None), MLPWeights)


def cast_weights_(model: nn.Module, dtype) -> nn.Module:
    """Cast ``model``'s floating parameters and persistent buffers to ``dtype`` ("fp32", "bf16" or a torch
    dtype) in place, skipping the modules the sparse ops read (see the module doc). Tied weights stay tied.
    Non-persistent buffers (rotary frequencies) stay as built, as ``from_pretrained(dtype=...)`` leaves them."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    kept = {id(m) for top in model.modules() if feeds_sparse_ops(top) for m in top.modules()}
    for module in model.modules():
        if feeds_sparse_ops(module):
            for name in getattr(module, "stored_tables", ()):
                t = module._buffers.get(name)
                if t is not None and t.dtype != dtype:
                    module._buffers[name] = t.to(dtype)
        if id(module) in kept:
            continue
        for p in module._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in module._buffers.items():
            if name not in module._non_persistent_buffers_set and b is not None and b.is_floating_point() and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)
    return model
