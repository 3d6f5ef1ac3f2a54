"""Sparse MLP ops: an MLP block that computes only the neurons each token's list names.

Two registered torch ops, each with the backends of ``dynsparse.ops.backend`` side by side:

* ``dynsparse::sparse_mlp``: y[i] = b2 + sum over token i's listed neurons j of h_j * w2_t[j], with
  h_j = act(w1_j.x + b1_j) - offset_j, or act(wg_j.x + bg_j) * (w1_j.x + b1_j) - offset_j for a GLU.
  Lists are CSR (``indptr`` int64 (M+1,), ``indices`` int32 (nnz,)), each neuron at most once per token.
  ``strategy`` says what they hold and how to run them: "token" (neuron lists, token by token),
  "union" (neuron lists, dense matmuls over the batch's union of them), "grouped" (group lists: group g
  means neurons g*group_size .. g*group_size+group_size-1), or "auto" (neuron lists; token or union
  picked from the lists inside the op, by ``strategy.choose_strategy``, so a compiled graph keeps the
  data-dependent choice);
* ``dynsparse::relu_skip_mlp``: the exact ReLU MLP, dense fc1 then fc2 over each token's non-zeros only
  (no gate, no accuracy loss: the baseline activation sparsity must beat);
* ``dynsparse::gate_skip_mlp``: the CATS form: the gate projection dense, a = act(gate), neurons with
  |a| <= threshold skipped, the kept ones' w1 (GLU: h = a * (w1_j.x + b1_j)) and w2_t rows read once;
  h - offset as in ``sparse_mlp``. (Through ``sparse_mlp`` a kept neuron would read its gate row again.)
  From ``GATE_SKIP_DENSE_TOKENS`` tokens on (a prefill) it runs as masked dense matmuls. Its ``cpp``
  backend is the C++ op ``dynsparse_cpp::gate_skip_mlp``, which the wrapper calls directly (no Python
  runs per call, eager or compiled).

All compute in float32 and return x's dtype. ``reference.py`` holds the definition, ``torch_impl.py``
the sparse algorithm in torch ops, ``numba_impl.py`` the CPU kernels and ``triton.py`` the CUDA
kernels. The ops are opaque to ``torch.compile`` (fake implementations give their shapes). They have no
autograd: they serve inference.

``sparse_mlp`` and ``relu_skip_mlp`` below are the friendly entry points: an ``MLPWeights``, an
activation name and a backend setting (resolved to a concrete backend before the op runs); in eager
no-grad calls they run the op's body without the dispatcher (``ops/_eager.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import activations
from .._eager import call
from ..backend import CONCRETE, resolve
from . import reference, torch_impl
from .csr import check_csr, check_csr_layout, check_x
from .strategy import UNION_MIN_TOKENS, UNION_SPEEDUP, choose_strategy
from .weights import MLPWeights, check_weights

STRATEGIES = ("token", "union", "grouped")
SPARSE_MLP_BACKENDS = ("reference", "torch", "numba", "triton")
RELU_SKIP_BACKENDS = ("reference", "torch", "numba", "triton")
GATE_SKIP_BACKENDS = ("reference", "torch", "numba", "cpp", "triton")
# From this many tokens gate_skip_mlp runs masked dense matmuls (its reference) on every backend: in a
# prefill nearly every neuron is kept by some token, and BLAS over all rows beats gathering them.
GATE_SKIP_DENSE_TOKENS = 16


def _triton(name: str):
    try:
        from . import triton as triton_impl
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.triton":
            raise
        raise RuntimeError("backend 'triton' of the sparse MLP ops is not available: "
                           "dynsparse/ops/mlp/triton.py is missing") from None
    fn = getattr(triton_impl, name, None)
    if fn is None:
        raise RuntimeError(f"backend 'triton' does not implement {name} (dynsparse/ops/mlp/triton.py)")
    return fn


def _impl(backend: str, op: str):
    if backend == "reference":
        return getattr(reference, f"{op}_reference")
    if backend == "torch":
        return getattr(torch_impl, f"{op}_torch")
    if backend == "numba":
        if op == "gate_skip_mlp":
            from .numba_gate_skip import gate_skip_mlp_numba

            return gate_skip_mlp_numba
        from . import numba_impl

        return getattr(numba_impl, f"{op}_numba")
    if backend == "cpp" and op == "gate_skip_mlp":
        return torch.ops.dynsparse_cpp.gate_skip_mlp
    if backend == "triton":
        return _triton(f"{op}_triton")
    raise ValueError(f"backend must be one of {list(CONCRETE)}, got {backend!r}")


def _check_common(x, w1, b1, w2_t, b2, wg, bg, offset, act_code, backend) -> None:
    check_weights(w1, b1, w2_t, b2, wg, bg, offset)
    check_x(x, w1.shape[1], "w1 (d_ff, d)")
    if x.device != w1.device:
        raise ValueError(f"x is on {x.device}, the weights on {w1.device}")
    activations.check_code(act_code)
    if backend not in CONCRETE:
        raise ValueError(f"backend must be a concrete one of {list(CONCRETE)}, got {backend!r}")


def _check_sparse(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, strategy, group_size, act_code, backend,
                  read_lists: bool) -> None:
    """Every argument of ``dynsparse::sparse_mlp``; ``read_lists`` also checks the lists' content."""
    _check_common(x, w1, b1, w2_t, b2, wg, bg, offset, act_code, backend)
    d_ff = w1.shape[0]
    if strategy not in STRATEGIES + ("auto",):
        raise ValueError(f"strategy must be one of {list(STRATEGIES + ('auto',))}, got {strategy!r}")
    if strategy == "grouped":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or d_ff % group_size:
            raise ValueError(f"group_size must be a positive int dividing d_ff={d_ff}, got {group_size!r}")
    elif group_size != 0:
        raise ValueError(f"group_size is for strategy='grouped' only (pass 0), got {group_size!r}")
    name, n = ("groups", d_ff // group_size) if strategy == "grouped" else ("indices", d_ff)
    for t, what in ((indptr, "indptr"), (indices, name)):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{what} is on {t.device}, x on {x.device}")
    if read_lists:
        check_csr(indptr, indices, x.shape[0], n, name)
    else:
        check_csr_layout(indptr, indices, x.shape[0], name)


# ------------------------------------------------------------------------------------------ sparse_mlp
def _sparse_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2_t: Tensor, b2: Tensor | None, wg: Tensor | None,
                bg: Tensor | None, offset: Tensor | None, indptr: Tensor, indices: Tensor, strategy: str,
                group_size: int, act_code: int, backend: str) -> Tensor:
    """The body of ``dynsparse::sparse_mlp``."""
    _check_sparse(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, strategy, group_size, act_code, backend,
                  read_lists=True)
    if strategy == "auto":
        strategy = choose_strategy(x.shape[0], indices, w1.shape[0], backend)
    y = _impl(backend, "sparse_mlp")(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, strategy, group_size,
                                     act_code)
    return y.to(x.dtype)


sparse_mlp_op = torch.library.custom_op("dynsparse::sparse_mlp", _sparse_mlp, mutates_args=())


@sparse_mlp_op.register_fake
def _(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, strategy, group_size, act_code, backend):
    _check_sparse(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, strategy, group_size, act_code, backend,
                  read_lists=False)
    return x.new_empty(x.shape[0], w2_t.shape[1])


def sparse_mlp(x: Tensor, weights: MLPWeights, indptr: Tensor, indices: Tensor, *, activation: str,
               strategy: str = "auto", group_size: int = 0, backend: str = "auto") -> Tensor:
    """y (M, d_out) in x's dtype for x (M, d) and CSR lists from a gate (see the module doc).

    ``strategy``: "auto" (neuron lists, token or union by measured sizes), "token", "union", or
    "grouped" (group lists, with ``group_size``). ``backend``: one of ``dynsparse.ops.BACKENDS``.
    """
    if not isinstance(weights, MLPWeights):
        raise TypeError(f"weights must be an MLPWeights, got {type(weights).__name__}")
    check_x(x, weights.d_model, "the weights' d_model")
    chosen = resolve(backend, x.device, SPARSE_MLP_BACKENDS)
    w = weights
    return call(sparse_mlp_op, _sparse_mlp, x, w.w1, w.b1, w.w2_t, w.b2, w.wg, w.bg, w.offset, indptr, indices,
                strategy, group_size, activations.code(activation), chosen)


# ---------------------------------------------------------------------------------------- relu_skip_mlp
def _relu_skip_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2_t: Tensor, b2: Tensor | None,
                   backend: str) -> Tensor:
    """The body of ``dynsparse::relu_skip_mlp``."""
    _check_common(x, w1, b1, w2_t, b2, None, None, None, activations.code("relu"), backend)
    return _impl(backend, "relu_skip_mlp")(x, w1, b1, w2_t, b2).to(x.dtype)


relu_skip_mlp_op = torch.library.custom_op("dynsparse::relu_skip_mlp", _relu_skip_mlp, mutates_args=())


@relu_skip_mlp_op.register_fake
def _(x, w1, b1, w2_t, b2, backend):
    _check_common(x, w1, b1, w2_t, b2, None, None, None, activations.code("relu"), backend)
    return x.new_empty(x.shape[0], w2_t.shape[1])


def relu_skip_mlp(x: Tensor, weights: MLPWeights, *, backend: str = "auto") -> Tensor:
    """fc2(relu(fc1(x))) exactly, fc2 reading only the rows of each token's non-zero activations."""
    if not isinstance(weights, MLPWeights):
        raise TypeError(f"weights must be an MLPWeights, got {type(weights).__name__}")
    if weights.glu or weights.offset is not None:
        raise ValueError("relu_skip_mlp serves a plain ReLU MLP: weights must have no wg and no offset")
    check_x(x, weights.d_model, "the weights' d_model")
    chosen = resolve(backend, x.device, RELU_SKIP_BACKENDS)
    w = weights
    return call(relu_skip_mlp_op, _relu_skip_mlp, x, w.w1, w.b1, w.w2_t, w.b2, chosen)


# ---------------------------------------------------------------------------------------- gate_skip_mlp
def _check_threshold(threshold, device) -> None:
    if not isinstance(threshold, torch.Tensor) or threshold.dim() != 0 or not threshold.is_floating_point():
        raise TypeError(f"threshold must be a 0-dim floating tensor, got {threshold!r}")
    if threshold.device != device:
        raise ValueError(f"threshold is on {threshold.device}, x on {device}")


def _gate_skip_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2_t: Tensor, b2: Tensor | None, wg: Tensor | None,
                   bg: Tensor | None, offset: Tensor | None, threshold: Tensor, act_code: int, backend: str) -> Tensor:
    """The body of ``dynsparse::gate_skip_mlp``."""
    _check_common(x, w1, b1, w2_t, b2, wg, bg, offset, act_code, backend)
    _check_threshold(threshold, x.device)
    if x.shape[0] >= GATE_SKIP_DENSE_TOKENS:
        backend = "reference"
    return _impl(backend, "gate_skip_mlp")(x, w1, b1, w2_t, b2, wg, bg, offset, threshold, act_code).to(x.dtype)


gate_skip_mlp_op = torch.library.custom_op("dynsparse::gate_skip_mlp", _gate_skip_mlp, mutates_args=())


@gate_skip_mlp_op.register_fake
def _(x, w1, b1, w2_t, b2, wg, bg, offset, threshold, act_code, backend):
    _check_common(x, w1, b1, w2_t, b2, wg, bg, offset, act_code, backend)
    _check_threshold(threshold, x.device)
    return x.new_empty(x.shape[0], w2_t.shape[1])


def gate_skip_mlp(x: Tensor, weights: MLPWeights, threshold: Tensor, *, activation: str,
                  backend: str = "auto") -> Tensor:
    """y (M, d_out) in x's dtype: the neurons whose |act(gate)| exceeds ``threshold`` (0-dim tensor), each
    computed once from the dense gate's value (see the module doc)."""
    if not isinstance(weights, MLPWeights):
        raise TypeError(f"weights must be an MLPWeights, got {type(weights).__name__}")
    check_x(x, weights.d_model, "the weights' d_model")
    _check_threshold(threshold, x.device)
    chosen = resolve(backend, x.device, GATE_SKIP_BACKENDS)
    w, code = weights, activations.code(activation)
    if chosen == "cpp" and x.shape[0] < GATE_SKIP_DENSE_TOKENS:  # a C++ op itself: no Python body to run
        _check_common(x, w.w1, w.b1, w.w2_t, w.b2, w.wg, w.bg, w.offset, code, chosen)
        return torch.ops.dynsparse_cpp.gate_skip_mlp(x, w.w1, w.b1, w.w2_t, w.b2, w.wg, w.bg, w.offset, threshold,
                                                     code)
    return call(gate_skip_mlp_op, _gate_skip_mlp, x, w.w1, w.b1, w.w2_t, w.b2, w.wg, w.bg, w.offset, threshold,
                code, chosen)


__all__ = [
    "MLPWeights", "sparse_mlp", "relu_skip_mlp", "gate_skip_mlp", "sparse_mlp_op", "relu_skip_mlp_op",
    "gate_skip_mlp_op", "choose_strategy", "STRATEGIES", "SPARSE_MLP_BACKENDS", "RELU_SKIP_BACKENDS",
    "GATE_SKIP_BACKENDS", "GATE_SKIP_DENSE_TOKENS", "UNION_SPEEDUP", "UNION_MIN_TOKENS",
]
