"""The one activation registry: every layer, kernel and recorder names activations from here.

Each entry carries the torch function, the integer code the numba and Triton kernels switch on, and the
names other libraries use for the same function (HF ``ACT2FN`` keys, torch module class names), so a
pretrained block's activation resolves to one of ours or is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    grad: Callable[[torch.Tensor], torch.Tensor]  # d fn / dz, as torch's autograd gives it (relu'(0) = 0)
    code: int  # the kernels' switch value; stable, saved in nothing
    aliases: tuple[str, ...] = ()


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


# Explicit derivatives: custom ops run below autograd, so their backward formulas cannot call it.
def _gelu_grad(z):
    return 0.5 * (1.0 + torch.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * torch.exp(-0.5 * z * z)


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _tanh_grad(z):
    return 1.0 - torch.tanh(z) ** 2


REGISTRY: dict[str, Activation] = {
    a.name: a
    for a in (
        # exact (erf) GELU, as in UltraFastBERT and HF's "gelu"
        Activation("gelu", F.gelu, _gelu_grad, 0, ("gelu", "geluactivation", "gelu_new", "newgeluactivation",
                                       "gelu_pytorch_tanh", "pytorchgelutanh", "gelu_fast", "fastgeluactivation")),
        Activation("relu", F.relu, lambda z: (z > 0).to(z.dtype), 1, ("relu", "reluactivation")),
        Activation("silu", F.silu, _silu_grad, 2, ("silu", "swish", "siluactivation")),
        Activation("tanh", torch.tanh, _tanh_grad, 3, ("tanh", "tanhactivation")),
        Activation("identity", _identity, torch.ones_like, 4, ("identity", "linear", "linearactivation")),
    )
}
NAMES = tuple(REGISTRY)
BY_CODE = {a.code: a for a in REGISTRY.values()}


def get(name: str) -> Activation:
    """The registry entry for one of NAMES; any other name is refused in one line."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {list(NAMES)}, got {name!r}") from None


def by_code(code: int) -> Activation:
    try:
        return BY_CODE[code]
    except (KeyError, TypeError):
        raise ValueError(f"activation code must be one of {sorted(BY_CODE)} ({', '.join(NAMES)}), got {code!r}") from None


def check_code(code) -> int:
    """A kernel's activation code, refused in one line unless it names an entry (bools are not codes)."""
    if isinstance(code, bool) or code not in BY_CODE:
        raise ValueError(f"act_code must be one of {sorted(BY_CODE)} ({', '.join(NAMES)}), got {code!r}")
    return code


def code(name: str) -> int:
    return get(name).code


def fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return get(name).fn


def name_of(act) -> str:
    """Our name for a module or function from another library (HF ``GELUActivation``, ``nn.SiLU``,
    ``F.relu``, ...); GELU approximations map to 'gelu'. Unknown ones return their own lowercase name,
    so a caller can refuse them by it."""
    raw = act.__name__ if callable(act) and not isinstance(act, nn.Module) else type(act).__name__
    key = raw.lower()
    for a in REGISTRY.values():
        if key in a.aliases or key == a.name:
            return a.name
    if "leaky" not in key:
        for a in ("relu", "gelu", "silu", "tanh"):
            if a in key:
                return a
    return key
