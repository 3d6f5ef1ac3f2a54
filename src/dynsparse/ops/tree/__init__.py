"""Tree FF ops: every token walks one root-to-leaf path per tree, picking children by the sign of z.

Three registered torch ops, each with the backends of ``dynsparse.ops.backend`` side by side (inference also
on ``cpp``: ``tree_infer.cpp`` for the few tokens of a decode step):

* ``dynsparse::tree_infer``: y and the leaf each token reached (inference; no autograd);
* ``dynsparse::tree_train_forward``: y plus the visited node indices and their pre-activations, with
  registered autograd that calls
* ``dynsparse::tree_train_backward``: gradients for x and for the visited rows only.

``reference.py`` holds the definition (compute every node, mask the path), ``torch_impl.py`` the sparse
algorithm in torch ops, ``numba_infer.py``/``numba_train.py`` the CPU kernels and ``triton.py`` the CUDA
kernels. The ops are opaque to ``torch.compile`` (fake implementations give their shapes), so a compiled
model keeps the kernels and has no graph break at them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import activations
from .._eager import call
from ..backend import numba_available, resolve
from ..dense import GEMV_MAX_TOKENS as CPP_MAX_TOKENS
from . import reference, torch_impl

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _zs_dtype(dtype: torch.dtype) -> torch.dtype:
    """Pre-activations are kept in at least float32: backward recomputes activations from them."""
    return torch.promote_types(dtype, torch.float32)


def _impl(backend: str, kind: str):
    """The implementation of one op (kind: infer, train_forward, train_backward) on one backend."""
    if backend == "reference":
        return getattr(reference, f"tree_{kind}_reference")
    if backend == "torch":
        return getattr(torch_impl, f"tree_{kind}_torch")
    if backend == "numba":
        from . import numba_infer, numba_train

        return numba_infer.tree_infer_numba if kind == "infer" else getattr(numba_train, f"tree_{kind}_numba")
    if backend == "cpp" and kind == "infer":
        return _infer_cpp
    if backend == "triton":
        from . import triton as triton_impl

        return getattr(triton_impl, f"tree_{kind}_triton")
    raise ValueError(f"no tree op backend {backend!r}")


# ---------------------------------------------------------------------------------------- inference
def _infer_cpp(x, w_in, b_in, w_out, depth, act_code, act_on_path):
    """The C++ walk for a few tokens; from CPP_MAX_TOKENS on, numba's kernel (it shares shallow rows
    between tokens and splits tokens over threads), or torch's where numba is absent."""
    if x.shape[0] < CPP_MAX_TOKENS:
        return torch.ops.dynsparse_cpp.tree_infer(x, w_in, b_in, w_out, depth, act_code, act_on_path)
    # cpp serves what numba serves at inference (CPU, float32 or bfloat16 throughout)
    return _impl("numba" if numba_available() else "torch", "infer")(x, w_in, b_in, w_out, depth, act_code, act_on_path)


def _tree_infer_body(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, depth: int, act_code: int,
                     act_on_path: bool, backend: str) -> tuple[Tensor, Tensor]:
    y, leaves = _impl(backend, "infer")(x, w_in, b_in, w_out, depth, act_code, act_on_path)
    return y.to(x.dtype), leaves


_tree_infer = torch.library.custom_op("dynsparse::tree_infer", mutates_args=())(_tree_infer_body)


@_tree_infer.register_fake
def _(x, w_in, b_in, w_out, depth, act_code, act_on_path, backend):
    m = x.shape[0]
    return x.new_empty(m, w_out.shape[-1]), x.new_empty(m, w_in.shape[0], dtype=torch.int64)


# ---------------------------------------------------------------------------------------- training
@torch.library.custom_op("dynsparse::tree_train_forward", mutates_args=())
def _tree_train_forward(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, depth: int, act_code: int,
                        act_on_path: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    y, idx, zs = _impl(backend, "train_forward")(x, w_in, b_in, w_out, depth, act_code, act_on_path)
    return y.to(x.dtype), idx, zs.to(_zs_dtype(x.dtype))


@_tree_train_forward.register_fake
def _(x, w_in, b_in, w_out, depth, act_code, act_on_path, backend):
    m, trees = x.shape[0], w_in.shape[0]
    return (x.new_empty(m, w_out.shape[-1]), x.new_empty(m, trees, depth + 1, dtype=torch.int64),
            x.new_empty(m, trees, depth + 1, dtype=_zs_dtype(x.dtype)))


@torch.library.custom_op("dynsparse::tree_train_backward", mutates_args=())
def _tree_train_backward(grad_y: Tensor, x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, idx: Tensor,
                         zs: Tensor, act_code: int, act_on_path: bool, backend: str
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g_x, g_in, g_b, g_out = _impl(backend, "train_backward")(
        grad_y.contiguous(), x, w_in, b_in, w_out, idx, zs, act_code, act_on_path)
    g_b = x.new_empty(0, dtype=w_in.dtype) if b_in is None else g_b.to(b_in.dtype)
    return g_x.to(x.dtype), g_in.to(w_in.dtype), g_b, g_out.to(w_out.dtype)


@_tree_train_backward.register_fake
def _(grad_y, x, w_in, b_in, w_out, idx, zs, act_code, act_on_path, backend):
    g_b = x.new_empty(0, dtype=w_in.dtype) if b_in is None else torch.empty_like(b_in)
    return torch.empty_like(x), torch.empty_like(w_in), g_b, torch.empty_like(w_out)


def _setup_context(ctx, inputs, output):
    x, w_in, b_in, w_out, depth, act_code, act_on_path, backend = inputs
    _, idx, zs = output
    ctx.save_for_backward(x, w_in, b_in, w_out, idx, zs)
    ctx.config = (act_code, act_on_path, backend, b_in is not None)
    ctx.mark_non_differentiable(idx, zs)


def _backward(ctx, grad_y, _grad_idx, _grad_zs):
    x, w_in, b_in, w_out, idx, zs = ctx.saved_tensors
    act_code, act_on_path, backend, has_bias = ctx.config
    g_x, g_in, g_b, g_out = _tree_train_backward(grad_y, x, w_in, b_in, w_out, idx, zs, act_code, act_on_path,
                                                 backend)
    return g_x, g_in, g_b if has_bias else None, g_out, None, None, None, None


_tree_train_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------- public API
def supported_backends(x: Tensor, w_in: Tensor, train: bool) -> tuple[str, ...]:
    """The backends that serve these tensors: numba computes in float32 (inference also reads bfloat16
    tables) and would round float64 routing, so it serves only what it computes exactly."""
    out = ["reference", "torch"]
    if x.device.type == "cpu" and x.dtype == w_in.dtype:
        if x.dtype == torch.float32 or (not train and x.dtype == torch.bfloat16):
            out.append("numba")
    if (not train and x.device.type == "cpu" and x.dtype == w_in.dtype
            and x.dtype in (torch.float32, torch.bfloat16)):
        out.append("cpp")
    if x.dtype in (torch.float32, *_LOW_PRECISION) and x.dtype == w_in.dtype:
        out.append("triton")
    return tuple(out)


def tree_infer(x, w_in, b_in, w_out, depth: int, activation: str, act_position: str = "node",
               backend: str = "auto"):
    """x (M, d) -> (y (M, d_out) in x's dtype, leaves (M, T) int64). No autograd."""
    chosen = resolve(backend, x.device, supported_backends(x, w_in, train=False))
    code, on_path = activations.code(activation), act_position == "path"
    if chosen == "cpp" and x.shape[0] < CPP_MAX_TOKENS:  # a C++ op itself: no Python body to run
        return torch.ops.dynsparse_cpp.tree_infer(x, w_in, b_in, w_out, depth, code, on_path)
    return call(_tree_infer, _tree_infer_body, x, w_in, b_in, w_out, depth, code, on_path, chosen)


def tree_train(x, w_in, b_in, w_out, depth: int, activation: str, act_position: str = "node",
               backend: str = "auto"):
    """x (M, d) -> (y, leaves), differentiable in x and the weights; only visited rows get gradient."""
    chosen = resolve(backend, x.device, supported_backends(x, w_in, train=True))
    y, idx, _ = _tree_train_forward(x, w_in, b_in, w_out, depth, activations.code(activation),
                                    act_position == "path", chosen)
    return y, idx[:, :, -1] % w_in.shape[1] - (2**depth - 1)


__all__ = ["tree_infer", "tree_train", "supported_backends"]
