"""The activations a tree node may apply, by name, with the integer codes the kernels use."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU, as in UltraFastBERT and GPT-2's "gelu" in HF
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda z: z,
}

# Codes shared with the numba kernels; keep in sync with dynsparse.kernels.tree_infer._act.
ACTIVATION_CODES = {"gelu": 0, "relu": 1, "silu": 2, "tanh": 3, "identity": 4}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]
