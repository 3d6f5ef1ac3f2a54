"""Shared Triton glue for the op kernels: the activation switch, its derivative, and input checks.

The activation codes are the registry's (``dynsparse.activations``): gelu (erf) 0, relu 1, silu 2,
tanh 3, identity 4. Kernels compute in float32 whatever the storage dtype.

Whether kernels run compiled or in the interpreter is fixed when they are decorated (Triton reads
``TRITON_INTERPRET`` then), so ``interpreted(kernel)`` asks the kernel itself rather than the
environment, which may have changed since.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import activations

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def act(z, ACT: tl.constexpr):
    """act(z) for float32 z; ACT is the registry code."""
    if ACT == 0:
        a = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:
        a = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        a = z / (1.0 + tl.exp(-z))
    elif ACT == 3:
        # 1 - 2 / (e^{2z} + 1): saturates to +-1 without overflow trouble (exp -> inf gives 1)
        a = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    else:
        a = z
    return a


@triton.jit
def dact(z, ACT: tl.constexpr):
    """act'(z) as torch autograd computes it (relu'(0) = 0)."""
    if ACT == 0:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 3:
        t = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
        d = 1.0 - t * t
    else:
        d = z * 0.0 + 1.0
    return d


def interpreted(kernel) -> bool:
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_act(act_code) -> int:
    activations.by_code(act_code)  # one-line ValueError for unknown codes
    return int(act_code)


def check_float(name: str, t: torch.Tensor | None, ndim: int) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_device(kernel, x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """All tensors on x's device, and that device one the kernels can run on."""
    if interpreted(kernel):
        if x.device.type != "cpu":
            raise ValueError(f"x must be on CPU while Triton interprets (TRITON_INTERPRET=1), got {x.device}")
    elif x.device.type != "cuda":
        raise ValueError(f"x must be a CUDA tensor for the Triton kernels (or set TRITON_INTERPRET=1 "
                         f"before importing them), got {x.device}")
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """next power of two >= n, clamped to [lo, hi]."""
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return p if hi is None else min(p, hi)
