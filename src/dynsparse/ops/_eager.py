"""Calling a registered op from eager code without the dispatcher's Python round trips.

A ``torch.library.custom_op`` call goes Python -> C++ dispatcher -> Python (autograd kernel) -> C++ ->
Python (the implementation). On a small CPU those hops cost tens of microseconds, as much as a one-token
sparse kernel, so per-token generation would pay for them twice per layer. Where nothing between the
caller and the implementation can matter (eager, grad off, plain tensors) the wrappers run the op's
body directly; torch.compile/export tracing, grad mode and tensor subclasses (fake tensors included)
still go through the registered op, so compiled graphs keep it as one node.
"""
from __future__ import annotations

import torch


def call(op, body, x: torch.Tensor, *args):
    """``op(x, *args)``, or ``body(x, *args)`` (the function ``op`` was made from) where that is the same."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or type(x) is not torch.Tensor:
        return op(x, *args)
    return body(x, *args)
