"""Registered torch ops for conditional computation, each with reference, torch, numba and Triton backends."""
from .backend import BACKENDS, get_backend, resolve, set_backend, use_backend

__all__ = ["BACKENDS", "get_backend", "resolve", "set_backend", "use_backend"]
