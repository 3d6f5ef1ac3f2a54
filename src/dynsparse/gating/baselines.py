"""The untrained references that gates are measured against.

* ``OracleMLP``: the ceiling. It computes every neuron, then keeps per token the top-k by the true
  activity score (or, per layer, those above a calibrated threshold) and drops the rest. No predictor
  can choose better by that criterion, so its quality loss bounds what a gate can reach at a sparsity.
* ``CATSMLP``: the CATS baseline (Lee et al., 2024). The gate projection runs dense, |act(g_j)| > t_l
  picks the neurons, and only those read their up and down rows (``dynsparse.ops.mlp.gate_skip_mlp``,
  with an optional per-neuron compensation for the skipped ones). No training.

Both implement the sparse-FF protocol. The oracle's FLOPs are the dense block's (it computes all to
choose); CATS counts the dense gate plus each kept neuron's up row (a gated block's) and down row.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import activations
from ..ops.backend import check_backend
from ..ops.mlp import GATE_SKIP_BACKENDS, MLPWeights, gate_skip_mlp
from .activity import MAGNITUDE, activity_scores, check_target, hidden_values, topk_mask
from .modules import _no_grad_backend
from .usage import UsageCounter, neuron_flops


class _BlockBuffers(UsageCounter, nn.Module):
    """A dense MLP block's tensors as float32 buffers (w2 stored transposed, as the ops read it)."""

    def __init__(self, w1, b1, w2, b2, activation: str, act=None, wg=None, bg=None):
        super().__init__()
        self.activation = activation
        self.act = act if act is not None else activations.fn(activation)

        def buf(name, t):
            self.register_buffer(name, None if t is None else t.detach().float().contiguous())

        buf("w1", w1)
        buf("b1", b1)
        buf("wg", wg)
        buf("bg", bg)
        buf("w2_t", w2.detach().t())
        buf("b2", b2)
        self.register_buffer("w2_norm", self.w2_t.norm(dim=1))
        self.d_ff = self.w1.shape[0]
        self._neuron_flops = neuron_flops(self.w1.shape[1], self.w2_t.shape[1], self.wg is not None)
        self._init_usage()

    def _hidden(self, x2: torch.Tensor):
        wg = None if self.wg is None else self.wg.float()
        return hidden_values(x2, self.w1.float(), self.b1, wg, self.bg, self.act)

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        y = h @ self.w2_t.float()
        return y if self.b2 is None else y + self.b2


class OracleMLP(_BlockBuffers):
    """The block with, per token, only its ``keep`` top neurons by ``criterion`` (or, with ``threshold``,
    those scoring above it); everything is computed, the rest is dropped."""

    def __init__(self, w1, b1, w2, b2, activation: str, criterion: str, keep: int | None = None,
                 threshold: float | None = None, act=None, wg=None, bg=None):
        super().__init__(w1, b1, w2, b2, activation, act, wg, bg)
        if criterion not in MAGNITUDE + ("sign",):
            raise ValueError(f"criterion must be one of {list(MAGNITUDE + ('sign',))}, got {criterion!r}")
        if (keep is None) == (threshold is None):
            raise ValueError("OracleMLP needs exactly one of keep= (per-token top-k) or threshold= (per layer)")
        if keep is not None and not (isinstance(keep, int) and 0 <= keep <= self.d_ff):
            raise ValueError(f"keep must be an int in [0, {self.d_ff}], got {keep!r}")
        self.criterion, self.keep = criterion, keep
        self.threshold = None if threshold is None else float(threshold)

    @property
    def flops_per_token(self) -> int:
        return self.d_ff * self._neuron_flops

    def mask(self, x2: torch.Tensor):
        """(h, mask): every hidden value and which ones the oracle keeps."""
        h, gate = self._hidden(x2)
        scores = activity_scores(self.criterion, h, gate, self.w2_norm)
        mask = topk_mask(scores, self.keep) if self.keep is not None else scores > self.threshold
        return h, mask

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        h, mask = self.mask(x2)
        self._count_usage(x2.shape[0], int(mask.sum()), x2.shape[0] * self.flops_per_token)
        return self._out(h * mask).reshape(*shape[:-1], -1).to(x.dtype)


class CATSMLP(_BlockBuffers):
    """Dense gate projection, |act(g)| > ``threshold``, then only the kept neurons' up and down rows
    (``dynsparse.ops.mlp.gate_skip_mlp``: each kept neuron reuses its gate value, no row is read twice).

    ``compensation`` (d_ff,), optional: what a skipped neuron contributes instead of zero (its mean
    hidden value over the calibration tokens it was skipped on). ``backend``: as ``GatedMLP``'s.
    ``stored_tables``: the weight tables the gate-skip kernels read at their stored dtype (bf16 as stored), so
    ``dynsparse.decode.cast_weights_`` casts these; threshold, biases and compensation stay float32."""

    stored_tables = ("w1", "w2_t", "wg")

    def __init__(self, w1, b1, w2, b2, threshold, activation: str, compensation: torch.Tensor | None = None,
                 backend: str = "auto", act=None, wg=None, bg=None):
        super().__init__(w1, b1, w2, b2, activation, act, wg, bg)
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).detach().clone().reshape(()))
        self.register_buffer("compensation", None if compensation is None else compensation.detach().float())
        b2_kernel = self.b2
        if self.compensation is not None:
            b2_kernel = (0 if self.b2 is None else self.b2) + self.compensation @ self.w2_t
        self.register_buffer("b2_kernel", b2_kernel, persistent=False)
        self.weights  # validates the set
        self.backend = check_backend(backend)

    @property
    def weights(self) -> MLPWeights:
        return MLPWeights(self.w1, self.b1, self.w2_t, self.b2_kernel, self.wg, self.bg, self.compensation)

    @property
    def _kept_flops(self) -> int:
        """A kept neuron's FLOPs past the dense gate: its up row (a GLU's) and its down row."""
        return self._neuron_flops - 2 * self.w1.shape[1]

    @property
    def flops_per_token(self) -> int:
        """Nominal (upper bound): the dense gate plus every neuron kept."""
        return 2 * self.w1.shape[1] * self.d_ff + self.d_ff * self._kept_flops

    def gate_mask(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, d_ff) bool: |act(gate pre-activation)| > threshold (fc1's for a plain block)."""
        if self.wg is None:
            pre = torch.nn.functional.linear(x2, self.w1.float(), self.b1)
        else:
            pre = torch.nn.functional.linear(x2, self.wg.float(), self.bg)
        return self.act(pre).abs() > self.threshold

    def forward_reference(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        mask = self.gate_mask(x2)
        h, _ = self._hidden(x2)
        fill = self.compensation if self.compensation is not None else torch.zeros_like(h)
        self._count_cost(x2.shape[0], int(mask.sum()))
        return self._out(torch.where(mask, h, fill)).reshape(*shape[:-1], -1).to(x.dtype)

    def _count_cost(self, m: int, nnz: int) -> None:
        self._count_usage(m, nnz, m * 2 * self.w1.shape[1] * self.d_ff + nnz * self._kept_flops)

    def forward(self, x):
        backend = _no_grad_backend(self, x, GATE_SKIP_BACKENDS)
        if backend == "reference":
            return self.forward_reference(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        y = gate_skip_mlp(x2, self.weights, self.threshold, activation=self.activation, backend=backend)
        if self._tracking:  # eager only: the count is a Python number
            self._count_cost(x2.shape[0], int(self.gate_mask(x2).sum()))
        return y.reshape(*shape[:-1], -1).to(x.dtype)


def _block_args(block):
    w1, b1, w2, b2 = block.linear_weights()
    wg, bg = block.gate_weights()
    act = block.act if callable(block.act) else None
    return (w1, b1, w2, b2), {"act": act, "wg": wg, "bg": bg}


def oracle_mlp(block, activation: str, criterion: str, target_sparsity: float, selection: str = "topk",
               threshold: float | None = None) -> OracleMLP:
    """The oracle for ``block`` at ``target_sparsity``: per-token top-k (k = d_ff - target * d_ff), or
    ``selection="threshold"`` with the layer's calibrated ``threshold``."""
    check_target(target_sparsity)
    args, kw = _block_args(block)
    if selection == "topk":
        keep = block.d_ff - int(target_sparsity * block.d_ff)
        return OracleMLP(*args, activation, criterion, keep=keep, **kw)
    if selection == "threshold":
        if threshold is None:
            raise ValueError("selection='threshold' needs the layer's calibrated threshold=")
        return OracleMLP(*args, activation, criterion, threshold=threshold, **kw)
    raise ValueError(f"selection must be 'topk' or 'threshold', got {selection!r}")


def cats_mlp(block, activation: str, threshold: float, compensation: torch.Tensor | None = None,
             backend: str = "auto") -> CATSMLP:
    args, kw = _block_args(block)
    return CATSMLP(*args, threshold, activation, compensation, backend=backend, **kw)
