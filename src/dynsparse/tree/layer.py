"""TreeFF: a feed-forward block made of K binary trees of single neurons, with hard routing."""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch import nn

from .. import activations
from ..ops import backend as backends
from ..ops.tree import tree_infer, tree_train
from ..ops.tree.reference import tree_ff_masked
from ..sparse_ff import FFUsage
from .telemetry import TreeUsage, usage_from_leaf_visits
from .whiten import InputWhitening

MAX_DEPTH = 24
_NUMBA = backends.numba_available()
if _NUMBA:
    from ..ops._numba import as_f32, weight_table
    from ..ops.tree.numba_infer import run_tree_kernel
ACT_POSITIONS = ("node", "path")
# Per-layer numpy views of the weights for the inference fast path, outside the module so that
# pickling, deepcopy and state_dict never see them: layer -> (data pointers, (w_in, b_in, w_out)).
_KERNEL_VIEWS: weakref.WeakKeyDictionary[TreeFF, tuple] = weakref.WeakKeyDictionary()


class TreeFF(nn.Module):
    """A drop-in replacement for a transformer MLP block that activates trees * (depth+1) neurons per token.

    Semantics (the contract the tests check):

    * Parameters ``w_in`` (trees, nodes, d_model), ``b_in`` (trees, nodes) when ``bias``, and
      ``w_out`` (trees, nodes, d_out), with ``nodes = 2**(depth+1) - 1`` in heap order: the children
      of node i are 2i+1 (taken when z <= 0) and 2i+2 (taken when z > 0).
    * For a token x, in every tree: start at the root, compute ``z = w_in[n] . x + b_in[n]``, move to
      the child picked by the sign of z, and repeat for depth+1 nodes (root to leaf). The routing
      decision carries no gradient.
    * ``act_position="node"`` (UltraFastBERT's form): ``y = sum_trees sum_path act(z_n) * w_out[n]``.
    * ``act_position="path"``: the activation comes after each tree's path is accumulated,
      ``y = sum_trees act(sum_path z_n * w_out[n])``; z then enters linearly, so both branches of a
      node receive gradients of the same form (the variant that keeps trees balanced).
    * Input (..., d_model) -> output (..., d_out).
    * ``whiten=True``: x is first whitened with statistics of earlier training batches
      (``InputWhitening``); ``fold_whitening_`` moves that linear map into ``w_in``/``b_in``.

    Execution: ``backend`` is one of ``dynsparse.ops.BACKENDS``. ``"reference"`` computes every node and
    masks the path (the definition, plain autograd); every other backend runs the registered tree ops,
    which touch only visited rows: ``dynsparse::tree_train_forward`` (with autograd) when gradients are
    needed, ``dynsparse::tree_infer`` otherwise. ``"auto"`` (default) defers to ``dynsparse.ops.set_backend``
    and then picks numba on CPU, triton on CUDA, torch elsewhere.
    """

    def __init__(
        self,
        d_model: int,
        depth: int,
        trees: int = 1,
        d_out: int | None = None,
        activation: str = "gelu",
        act_position: str = "node",
        bias: bool = True,
        whiten: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_int("d_model", d_model, 1)
        _check_int("depth", depth, 0, MAX_DEPTH)
        _check_int("trees", trees, 1)
        d_out = d_model if d_out is None else d_out
        _check_int("d_out", d_out, 1)
        activations.get(activation)
        if act_position not in ACT_POSITIONS:
            raise ValueError(f"act_position must be one of {ACT_POSITIONS}, got {act_position!r}")

        self.d_model, self.depth, self.trees, self.d_out = d_model, depth, trees, d_out
        self.activation, self.act_position = activation, act_position
        self.backend, self.check_finite = backend, check_finite
        self.nodes = 2 ** (depth + 1) - 1
        kw = {"device": device, "dtype": dtype}
        self.w_in = nn.Parameter(torch.empty(trees, self.nodes, d_model, **kw))
        self.b_in = nn.Parameter(torch.empty(trees, self.nodes, **kw)) if bias else None
        self.w_out = nn.Parameter(torch.empty(trees, self.nodes, d_out, **kw))
        self.whitening = InputWhitening(d_model, **kw) if whiten else None
        # Routing telemetry: per-leaf visit counts (they determine every node's visits and turns).
        self.register_buffer("leaf_visits", torch.zeros(trees, 2**depth, dtype=torch.int64, device=device))
        self._tracking = False
        self.reset_parameters()

    # ------------------------------------------------------------------ set-up
    def reset_parameters(self) -> None:
        """The published neuron-tree initialisation: U(+-1/sqrt(d_model)) in, U(+-1/sqrt(trees*(depth+1))) out."""
        bound_in = 1.0 / math.sqrt(self.d_model)
        bound_out = 1.0 / math.sqrt(self.trees * (self.depth + 1))
        with torch.no_grad():
            self.w_in.uniform_(-bound_in, bound_in)
            if self.b_in is not None:
                self.b_in.uniform_(-bound_in, bound_in)
            self.w_out.uniform_(-bound_out, bound_out)

    @property
    def active_fraction(self) -> float:
        return tree_active_fraction(self.depth)

    @property
    def flops_per_token(self) -> int:
        return tree_flops_per_token(self.d_model, self.d_out, self.depth, self.trees)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, depth={self.depth}, trees={self.trees}, d_out={self.d_out}, "
            f"activation={self.activation!r}, act_position={self.act_position!r}, "
            f"bias={self.b_in is not None}, whiten={self.whitening is not None}, active={self.active_fraction:.2%}"
        )

    # ------------------------------------------------------------------ whitening
    def routing_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the nodes read: x, or x whitened when the layer whitens its input."""
        return x if self.whitening is None else self.whitening(x)

    def routing_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``w_in`` and ``b_in`` as they act on the raw input (whitening folded in, when there is one)."""
        if self.whitening is None:
            return self.w_in, self.b_in
        return self.whitening.fold(self.w_in, self.b_in)

    @torch.no_grad()
    def fold_whitening_(self) -> TreeFF:
        """Move the whitening into ``w_in``/``b_in`` (a bias is added if there was none) and drop it: the
        same function, at no extra cost per token."""
        if self.whitening is None:
            return self
        w, b = self.routing_weights()
        self.w_in.copy_(w)
        if self.b_in is None:
            self.b_in = nn.Parameter(b)
        else:
            self.b_in.copy_(b)
        self.whitening = None
        return self

    # ------------------------------------------------------------------ telemetry
    def track_usage(self, enabled: bool = True) -> TreeFF:
        """Count visits per leaf (hence per node) on every forward while enabled."""
        self._tracking = bool(enabled)
        return self

    @property
    def tracking(self) -> bool:
        return self._tracking

    def reset_usage(self) -> None:
        self.leaf_visits.zero_()

    def usage_stats(self) -> TreeUsage:
        return usage_from_leaf_visits(self.leaf_visits.cpu())

    def measured_usage(self) -> FFUsage:
        """The sparse-FF protocol's counters: every counted token visited trees * (depth+1) nodes."""
        tokens = int(self.leaf_visits[0].sum()) if self.trees else 0
        return FFUsage(tokens, self.active_fraction, float(self.flops_per_token))

    # ------------------------------------------------------------------ forward
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = backends.check_backend(value)

    @property
    def impl(self):
        raise AttributeError("TreeFF.impl is now TreeFF.backend (one of dynsparse.ops.BACKENDS)")

    @impl.setter
    def impl(self, value) -> None:
        raise AttributeError(f"TreeFF.impl is now TreeFF.backend: set backend to one of {list(backends.BACKENDS)}")

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _weights_for(self, x: torch.Tensor):
        """The parameters in x's dtype: under autocast the layer follows the autocast dtype."""
        params = (self.w_in, self.b_in, self.w_out)
        if x.dtype == self.w_in.dtype:
            return params
        return tuple(None if p is None else p.to(x.dtype) for p in params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.whitening is not None:
            self._check_input(x)
            x = self.whitening(x)
        if self._fast_path_applies(x):
            return self._forward_fast(x)
        self._check_input(x)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x2 = x if x.dim() == 2 else x.reshape(-1, self.d_model)
        args = self._weights_for(x2)
        if self.backend == "reference":
            y, leaves = tree_ff_masked(x2, *args, self.depth, self.activation, self.act_position)
        else:
            op = tree_train if self._needs_grad(x2) else tree_infer
            y, leaves = op(x2, *args, self.depth, self.activation, self.act_position, self.backend)
        if self._tracking:
            self._count(leaves)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.d_out)

    # ------------------------------------------------------------------ inference fast path
    def _fast_path_applies(self, x) -> bool:
        """The common inference call (fp32 or bf16 CPU tensor in the layer's dtype, no grad, no
        autocast, no checks, numba chosen) skips the general path's Python and the op dispatch: at one
        token per call (generation) that cost several times the kernel. Any other call, and every call
        under ``torch.compile``, takes the registered ops. (Parameters are read from ``_parameters``
        directly: nn.Module's attribute lookup is slow at this scale.)"""
        return (
            _NUMBA
            and not torch.compiler.is_compiling()
            and not self.training
            and not torch.is_grad_enabled()
            and type(x) is torch.Tensor
            and (x.dtype is torch.float32 or x.dtype is torch.bfloat16)
            and x.is_cpu
            and not x.requires_grad
            and x.dim() >= 1
            and x.shape[-1] == self.d_model
            and (self._backend == "numba" or (self._backend == "auto" and backends.get_backend() in ("auto", "numba")))
            and not self.check_finite
            and self._parameters["w_in"].dtype is x.dtype
            and not torch.is_autocast_enabled("cpu")
        )

    def _kernel_views(self):
        """The weights as the kernel reads them (zero-copy float32 views, or bfloat16 bits), rebuilt
        only when a parameter's storage changes: in-place updates are seen through the views, and a
        view keeps its storage alive, so an equal data pointer means the same storage. A bfloat16
        bias is copied to float32, so its version counter is part of the key."""
        params = self._parameters
        w_in, b_in, w_out = params["w_in"], params.get("b_in"), params["w_out"]
        key = (w_in.data_ptr(), w_out.data_ptr(), None if b_in is None else (b_in.data_ptr(), b_in._version))
        entry = _KERNEL_VIEWS.get(self)
        if entry is None or entry[0] != key:
            b_view = as_f32(b_in) if b_in is not None else np.zeros((self.trees, self.nodes), np.float32)
            entry = (key, (weight_table(w_in), b_view, weight_table(w_out)))
            _KERNEL_VIEWS[self] = entry
        return entry[1]

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.d_model)
        if x2.dtype is not torch.float32:
            x2 = x2.float()
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        m = x2.shape[0]
        y = np.empty((m, self.d_out), dtype=np.float32)
        leaves = np.empty((m, self.trees), dtype=np.int64)
        w_in, b_in, w_out = self._kernel_views()
        # x2 is an activation here, never a parameter FSDP resizes: Tensor.numpy() costs a third of array()
        run_tree_kernel(x2.numpy(), w_in, b_in, w_out, self.depth, activations.code(self.activation),
                        self.act_position == "path", y, leaves)
        if self._tracking:
            self._count(torch.from_numpy(leaves))
        out = torch.from_numpy(y)
        if x.dtype is not torch.float32:
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.d_out)

    def _count(self, leaves: torch.Tensor) -> None:
        n_leaves = self.leaf_visits.shape[1]
        flat = (leaves.to(self.leaf_visits.device) + torch.arange(self.trees, device=self.leaf_visits.device) * n_leaves)
        counts = torch.bincount(flat.reshape(-1), minlength=self.trees * n_leaves)
        self.leaf_visits += counts.view(self.trees, n_leaves)

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"TreeFF input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"TreeFF input must be floating point, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"TreeFF input's last dimension must be d_model={self.d_model}, got shape {tuple(x.shape)}"
            )
        if x.dtype != self.w_in.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"TreeFF input dtype {x.dtype} differs from the layer's {self.w_in.dtype}")
        if self.check_finite and not torch.isfinite(x).all():
            raise ValueError("TreeFF input contains NaN or Inf (check_finite=True)")


def tree_active_fraction(depth: int) -> float:
    """Share of a tree's neurons that work for one token: (depth+1) / nodes."""
    return (depth + 1) / (2 ** (depth + 1) - 1)


def tree_flops_per_token(d_model: int, d_out: int, depth: int, trees: int) -> int:
    """Multiply-adds x2 on the hard path: per tree and level a dot (d_model) and an axpy (d_out)."""
    return 2 * trees * (depth + 1) * (d_model + d_out)


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        expect = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {expect}, got {value}")
