"""Modules that replace an MLP block (x -> fc2(act(fc1(x)))) and compute less of it.

* ``SlicedMLP`` (SIBS): a smaller dense MLP over the kept neurons; removed neurons' mean outputs folded
  into fc2's bias (the MSE-best constant for a neuron that is always dropped).
* ``GatedMLP`` (MGS): a per-token gate picks the neurons to compute. The fast path asks the gate op
  for CSR index lists (of groups for a grouped gate) and runs ``dynsparse.ops.mlp.sparse_mlp`` on them
  (only listed rows of fc1 and fc2 are read); ``forward_reference`` is the plain torch definition the
  fast path is tested against.
* ``ReLUSkipMLP``: the exact ReLU skip (dense fc1, fc2 only over non-zeros), the zero-loss baseline.

``SlicedMLP`` and ``GatedMLP`` also take a gated (Llama-style) block's gate projection ``wg``/``bg``:
its hidden value is act(x wg^T + bg) * (x w1^T + b1), with w1 the up projection.

``backend`` (``dynsparse.ops.BACKENDS``) picks the execution: "reference" runs ``forward_reference``,
the others the ops on that backend, "auto" the best for the device. The ops have no autograd, so with
grad enabled an "auto" module runs its reference and an explicit sparse backend refuses.

Every module implements the sparse-FF protocol (``dynsparse.sparse_ff``, via ``gating.usage``): while
``track_usage`` is on it counts tokens, computed neurons and the FLOPs its sparse execution costs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import activations
from ..ops.backend import check_backend, resolve
from ..ops.gates import GATE_BACKENDS, grouped_gate_groups, lowrank_gate_indices
from ..ops.mlp import (GATE_SKIP_DENSE_TOKENS, RELU_SKIP_BACKENDS, SPARSE_MLP_BACKENDS, MLPWeights, relu_skip_mlp,
                       sparse_mlp)
from ..ops.mlp.csr import csr_from_mask
from ..ops.mlp.lowbit import lowbit_gate_mlp
from .lowbit import LowBitGate
from .usage import UsageCounter, neuron_flops


def _no_grad_backend(module: nn.Module, x: torch.Tensor, supported: tuple[str, ...]) -> str:
    """The concrete backend of ``module.backend`` for x, or "reference" where autograd needs it."""
    if torch.is_grad_enabled():
        if module.backend not in ("auto", "reference"):
            raise RuntimeError(f"backend {module.backend!r} has no autograd: call under torch.no_grad(), "
                               "or use backend='reference'")
        return "reference"
    return resolve(module.backend, x.device, supported)


class SlicedMLP(UsageCounter, nn.Module):
    """fc2(act(fc1(x))) over the ``kept`` neurons only; ``bias_shift`` = W2[:, removed] @ mean(a[removed]).
    With ``wg`` (a gated block): fc2(act(gate_proj(x)) * fc1(x)), gate_proj sliced like fc1."""

    def __init__(self, w1, b1, w2, b2, kept: torch.Tensor, activation: str, bias_shift: torch.Tensor | None = None,
                 act=None, wg=None, bg=None):
        super().__init__()
        kept = kept.long()
        d_ff_kept, d_out = len(kept), w2.shape[0]
        self.d_ff = w1.shape[0]  # the dense block's width: the active fraction is kept / d_ff
        self._neuron_flops = neuron_flops(w1.shape[1], d_out, wg is not None)
        self._init_usage()
        self.activation = activation
        self.act = act if act is not None else activations.fn(activation)  # the block's own (e.g. GPT-2's tanh GELU)
        self.fc1 = _sliced_linear(w1, b1, kept)
        self.gate_proj = None if wg is None else _sliced_linear(wg, bg, kept)
        self.fc2 = nn.Linear(d_ff_kept, d_out)
        self.register_buffer("kept", kept)
        with torch.no_grad():
            self.fc2.weight.copy_(w2[:, kept])
            bias = b2.detach().clone() if b2 is not None else torch.zeros(d_out)
            if bias_shift is not None:
                bias += bias_shift
            self.fc2.bias.copy_(bias)

    @property
    def active_fraction(self) -> float:
        return len(self.kept) / self.d_ff

    @property
    def flops_per_token(self) -> int:
        return len(self.kept) * self._neuron_flops

    def forward(self, x):
        tokens = x.numel() // x.shape[-1]
        self._count_usage(tokens, tokens * len(self.kept), tokens * self.flops_per_token)
        if self.gate_proj is None:
            return self.fc2(self.act(self.fc1(x)))
        return self.fc2(self.act(self.gate_proj(x)) * self.fc1(x))


def _sliced_linear(w, b, rows: torch.Tensor) -> nn.Linear:
    """nn.Linear holding the given output rows of (w, b)."""
    lin = nn.Linear(w.shape[1], len(rows), bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w[rows])
        if b is not None:
            lin.bias.copy_(b[rows])
    return lin


class LowRankGate(nn.Module):
    """logit = (x @ A) @ B + c: costs r * (d + d_ff) per token instead of d * d_ff."""

    def __init__(self, d_model: int, d_ff: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(d_model, rank) / d_model**0.5)
        self.B = nn.Parameter(torch.randn(rank, d_ff) / rank**0.5)
        self.c = nn.Parameter(torch.zeros(d_ff))

    @property
    def flops_per_token(self) -> int:
        return 2 * self.A.shape[1] * (self.A.shape[0] + self.B.shape[1])

    def forward(self, x):
        return (x @ self.A) @ self.B + self.c

    def neuron_logits(self, x):
        return self(x)


class GroupedGate(nn.Module):
    """One logit per group of ``group_size`` consecutive neurons: logit_g = x @ G[:, g] + c_g."""

    def __init__(self, d_model: int, d_ff: int, group_size: int):
        super().__init__()
        if d_ff % group_size:
            raise ValueError(f"group_size {group_size} must divide d_ff {d_ff}")
        self.group_size = group_size
        self.G = nn.Parameter(torch.randn(d_model, d_ff // group_size) / d_model**0.5)
        self.c = nn.Parameter(torch.zeros(d_ff // group_size))

    @property
    def flops_per_token(self) -> int:
        return 2 * self.G.shape[0] * self.G.shape[1]

    def forward(self, x):
        return x @ self.G + self.c

    def neuron_logits(self, x):
        return self(x).repeat_interleave(self.group_size, dim=-1)


class GatedMLP(UsageCounter, nn.Module):
    """MLP that computes only the neurons whose gate logit exceeds ``threshold`` (per neuron or group).

    ``compensation`` (d_ff,), optional: the expected output of a skipped neuron (mean of a over tokens
    where it is inactive, zero for ReLU); skipped neurons then contribute it instead of zero. The ops
    run it sparsely: fc2's bias absorbs W2 c once, and each computed neuron gives act(z) - c_j (``weights``).
    ``wg``/``bg``: a gated block's gate projection. ``backend``: see the module doc.
    """

    def __init__(self, w1, b1, w2, b2, gate: nn.Module, threshold: torch.Tensor, activation: str,
                 compensation: torch.Tensor | None = None, backend: str = "auto", act=None, wg=None, bg=None):
        super().__init__()
        self.activation = activation
        self.act_code = activations.code(activation)
        # reference path: the block's own activation; the ops know exact GELU only (GPT-2's tanh GELU differs ~1e-3)
        self.act = act if act is not None else activations.fn(activation)
        self.register_buffer("w1", w1.detach().float().contiguous())
        self.register_buffer("b1", None if b1 is None else b1.detach().float().contiguous())
        self.register_buffer("wg", None if wg is None else wg.detach().float().contiguous())
        self.register_buffer("bg", None if bg is None else bg.detach().float().contiguous())
        self.register_buffer("w2_t", w2.detach().float().t().contiguous())
        self.register_buffer("b2", None if b2 is None else b2.detach().float().contiguous())
        self.gate = gate
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).detach().clone())
        self.register_buffer("compensation", None if compensation is None else compensation.detach().float())
        # kernel form of the compensation: b2 + W2 c, and c subtracted from every computed neuron
        b2_kernel = self.b2
        if self.compensation is not None:
            b2_kernel = (0 if self.b2 is None else self.b2) + self.compensation @ self.w2_t
        self.register_buffer("b2_kernel", b2_kernel, persistent=False)
        self.weights  # validates the set
        self.backend = check_backend(backend)
        self.last_density: float | None = None  # share of neurons computed in the last forward
        self.computed = 0  # running (token, neuron) pairs computed, and ...
        self.total = 0  # ... pairs a dense block would compute: computed / total = measured density
        self.d_ff = self.w1.shape[0]
        self._neuron_flops = neuron_flops(self.w1.shape[1], self.w2_t.shape[1], self.wg is not None)
        self._init_usage()

    @property
    def stored_tables(self) -> tuple[str, ...]:
        """The tables ``dynsparse.decode.cast_weights_`` may cast to bf16: those of a packed low-bit gate's
        block, whose decode op reads bf16 as stored (the sparse MLP op reads float32 only)."""
        return ("w1", "w2_t", "wg") if isinstance(self.gate, LowBitGate) and self.gate.packed else ()

    @property
    def weights(self) -> MLPWeights:
        """The ops' view of the block: compensation as an offset, fc2's bias raised by W2 c."""
        return MLPWeights(self.w1, self.b1, self.w2_t, self.b2_kernel, self.wg, self.bg, self.compensation)

    @property
    def flops_per_token(self) -> int:
        """Nominal (upper bound): the gate plus every neuron; ``measured_usage`` has what tokens cost."""
        return int(self.gate.flops_per_token) + self.d_ff * self._neuron_flops

    def _count(self, computed: int, total: int) -> None:
        self.last_density = computed / max(total, 1)
        self.computed += computed
        self.total += total
        tokens = total // max(self.d_ff, 1)
        self._count_usage(tokens, computed, tokens * self.gate.flops_per_token + computed * self._neuron_flops)

    def gate_mask(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, d_ff) bool: which neurons each token computes (reference semantics of the gate)."""
        logits = self.gate(x2)
        thr = self.threshold
        active = logits > thr
        if isinstance(self.gate, GroupedGate):
            active = active.repeat_interleave(self.gate.group_size, dim=-1)
        return active

    def forward_reference(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        mask = self.gate_mask(x2)
        w1 = self.w1.float()  # bf16 tables (``stored_tables``) widen here
        a = self.act(F.linear(x2, w1, self.b1) if self.wg is None else F.linear(x2, self.wg.float(), self.bg))
        if self.wg is not None:
            a = a * F.linear(x2, w1, self.b1)
        a = torch.where(mask, a, self.compensation if self.compensation is not None else torch.zeros_like(a))
        y = a @ self.w2_t.float()
        if self.b2 is not None:
            y = y + self.b2
        self._count(int(mask.sum()), mask.numel())
        return y.reshape(*shape[:-1], -1).to(x.dtype)

    def _sparse_forward(self, x2, backend: str):
        """(y, neurons computed) through the ops: a grouped gate's lists stay lists of groups and run
        group by group; a low-rank or low-bit gate's run per token or over their union (``strategy="auto"``)."""
        gate_backend = backend if backend in GATE_BACKENDS else "torch"
        if isinstance(self.gate, GroupedGate):
            size = self.gate.group_size
            indptr, groups = grouped_gate_groups(x2, self.gate.G, self.gate.c, self.threshold, backend=gate_backend)
            y = sparse_mlp(x2, self.weights, indptr, groups, activation=self.activation, strategy="grouped",
                           group_size=size, backend=backend)
            return y, groups.numel() * size
        if isinstance(self.gate, LowRankGate):
            indptr, indices = lowrank_gate_indices(x2, self.gate.A, self.gate.B, self.gate.c, self.threshold,
                                                   backend=gate_backend)
        else:  # a low-bit gate: its scores in torch, then the lists
            indptr, indices = csr_from_mask(self.gate(x2) > self.threshold)
        y = sparse_mlp(x2, self.weights, indptr, indices, activation=self.activation, backend=backend)
        return y, indices.numel()

    def forward(self, x):
        fused = isinstance(self.gate, LowBitGate) and self.gate.packed  # the C++ decode op serves it
        backend = _no_grad_backend(self, x, SPARSE_MLP_BACKENDS + (("cpp",) if fused else ()))
        if backend == "reference":
            return self.forward_reference(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        if backend == "cpp":
            if x2.shape[0] >= GATE_SKIP_DENSE_TOKENS:  # a prefill: masked dense matmuls, as gate_skip_mlp's
                return self.forward_reference(x)
            y = lowbit_gate_mlp(x2, self.weights, self.gate.tables(), self.threshold, activation=self.activation,
                                backend="cpp")
            if self._tracking:  # eager only, and it costs the gate's scores in torch once more
                self._count(int(self.gate_mask(x2).sum()), x2.shape[0] * self.d_ff)
            return y.reshape(*shape[:-1], -1).to(x.dtype)
        y, computed = self._sparse_forward(x2, backend)
        self._count(computed, x2.shape[0] * self.w1.shape[0])
        return y.reshape(*shape[:-1], -1).to(x.dtype)


class ReLUSkipMLP(UsageCounter, nn.Module):
    """Exact ReLU skip: dense fc1, fc2 only over each token's non-zero activations (no accuracy loss).
    While tracking usage it counts the non-zeros with one more fc1 pass (the op does not report them)."""

    def __init__(self, w1, b1, w2, b2, backend: str = "auto"):
        super().__init__()
        self.register_buffer("w1", w1.detach().float().contiguous())
        self.register_buffer("b1", None if b1 is None else b1.detach().float().contiguous())
        self.register_buffer("w2_t", w2.detach().float().t().contiguous())
        self.register_buffer("b2", None if b2 is None else b2.detach().float().contiguous())
        self.weights  # validates the set
        self.backend = check_backend(backend)
        self.d_ff = self.w1.shape[0]
        self._init_usage()

    @property
    def flops_per_token(self) -> int:
        """Nominal (upper bound): dense fc1 and every fc2 column."""
        d, d_out = self.w1.shape[1], self.w2_t.shape[1]
        return 2 * self.d_ff * (d + d_out)

    def _track(self, x2: torch.Tensor) -> None:
        if self.tracking:
            with torch.no_grad():
                nnz = int((F.linear(x2, self.w1, self.b1) > 0).sum())
            m, d, d_out = x2.shape[0], self.w1.shape[1], self.w2_t.shape[1]
            self._count_usage(m, nnz, m * 2 * d * self.d_ff + nnz * 2 * d_out)

    @property
    def weights(self) -> MLPWeights:
        return MLPWeights(self.w1, self.b1, self.w2_t, self.b2)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        self._track(x2)
        backend = _no_grad_backend(self, x, RELU_SKIP_BACKENDS)
        if backend == "reference" and torch.is_grad_enabled():
            y = F.relu(F.linear(x2, self.w1, self.b1)) @ self.w2_t + (self.b2 if self.b2 is not None else 0)
        else:
            y = relu_skip_mlp(x2, self.weights, backend=backend)
        return y.reshape(*shape[:-1], -1).to(x.dtype)
