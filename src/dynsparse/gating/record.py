"""Record MLP hidden activations over a calibration set, in bounded memory.

One forward hook per MLP block, on its first linear layer: it sees the block input ``x`` and the
pre-activation ``z``, applies the block's own activation and folds the result into running per-neuron
statistics (counts and sums, O(d_ff) memory whatever the data size). Optionally a capped reservoir of
(x, active-mask) rows is kept per block for gate training.

Padding never counts. For each batch a boolean mask of the real tokens is derived and only those rows
enter any statistic or the reservoir:

* HF text models: the batch's ``attention_mask`` (when its (B, S) shape matches the block input);
* DETR: the pixel mask downsampled to the backbone's last feature map (captured with a hook on the
  backbone, exactly the mask DETR's encoder uses) for encoder blocks; decoder queries are all real.

What "active" means is the ``activity`` criterion (``gating.activity``). ``"sign"`` (default) is
``a > 0`` (a ReLU neuron's exact non-zeros, a GELU neuron's positive branch), or for gated (Llama-style)
blocks, where a = act(gate_proj(x)) * up_proj(x), ``act(gate_proj(x)) > 0``; it needs no threshold, so
its statistics stream over every token. The separate "near zero" count uses ``|a| <= eps`` (eps
reported) so smooth activations get an honest sparsity number. The magnitude criteria (``"contribution"``,
``"cats"``) need each layer's threshold before anything counts as active, so the pass only keeps the
reservoir of block inputs and ``gating.thresholds`` derives thresholds and statistics from those rows,
block by block, without running the model again (for several targets from one recording).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..mlps import MLPBlock, find_mlps

# keys our collate functions add that are not model inputs
_NON_INPUT_KEYS = ("labels", "image_ids", "orig_sizes")


def activation_name(block: MLPBlock) -> str:
    """'relu', 'gelu', 'silu', 'tanh' or the activation's class name (GELU variants map to 'gelu')."""
    act = block.act
    name = (act.__name__ if callable(act) and not isinstance(act, nn.Module) else type(act).__name__).lower()
    for key in ("relu", "gelu", "silu", "tanh"):
        if key in name:
            return "relu" if key == "relu" and "leaky" not in name else key
    return name


def hidden_activations(block: MLPBlock, x: torch.Tensor, z: torch.Tensor):
    """(a, active) for rows ``x`` whose fc1 output is ``z``: a is what fc2 consumes; active is None for
    plain blocks (a > 0) and act(gate_proj(x)) > 0 for gated ones."""
    if not block.gated:
        return block.act(z), None
    gate = block.act(block.gate_proj(x))
    return gate * z, gate > 0


@dataclass
class LayerStats:
    """Streaming statistics of one MLP block's hidden activations over real (non-padding) tokens."""

    name: str
    d_model: int
    d_ff: int
    activation: str
    eps: float
    n_tokens: int = 0
    n_batches: int = 0
    fire_count: torch.Tensor = None  # (d_ff,) int64: tokens with a > 0
    near_zero_count: torch.Tensor = None  # (d_ff,) int64: tokens with |a| <= eps
    act_sum: torch.Tensor = None  # (d_ff,) float64: sum of a (for mean-output compensation)
    sq_sum: torch.Tensor = None  # (d_ff,) float64: sum of a^2 (what dropping a neuron costs, see sibs)
    inactive_sum: torch.Tensor = None  # (d_ff,) float64: sum of a over tokens with a <= 0
    union_sum: float = 0.0  # sum over batches of the fraction of neurons active for >= 1 token of the batch
    max_samples: int = 0
    samples_x: torch.Tensor | None = None  # (n, d_model) float32 reservoir of block inputs
    samples_active: torch.Tensor | None = None  # (n, d_ff) bool: which neurons are active on those rows
    samples_batch: torch.Tensor | None = None  # (n,) int64: the calibration batch each row came from
    activity: str = "sign"  # the criterion of "active" (gating.activity)
    threshold: float | None = None  # the layer's activity threshold (magnitude criteria)
    target_sparsity: float | None = None  # what that threshold was calibrated for
    _seen: int = 0
    _gen: torch.Generator = field(default=None, repr=False)

    def __post_init__(self):
        self.fire_count = torch.zeros(self.d_ff, dtype=torch.int64)
        self.near_zero_count = torch.zeros(self.d_ff, dtype=torch.int64)
        self.act_sum = torch.zeros(self.d_ff, dtype=torch.float64)
        self.sq_sum = torch.zeros(self.d_ff, dtype=torch.float64)
        self.inactive_sum = torch.zeros(self.d_ff, dtype=torch.float64)
        self._gen = torch.Generator().manual_seed(0)

    @property
    def firing_frequency(self) -> torch.Tensor:
        return self.fire_count.double() / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> torch.Tensor:
        return self.act_sum / max(self.n_tokens, 1)

    @property
    def mean_square_activation(self) -> torch.Tensor:
        return self.sq_sum / max(self.n_tokens, 1)

    @property
    def mean_inactive_activation(self) -> torch.Tensor:
        """E[a | a <= 0] per neuron: what a gated-off neuron contributes on average (0 for ReLU)."""
        return self.inactive_sum / (self.n_tokens - self.fire_count).clamp_min(1).double()

    @property
    def sparsity(self) -> float:
        """Fraction of (token, neuron) pairs with a <= 0 (exact zeros for ReLU)."""
        return 1.0 - self.fire_count.sum().item() / max(self.n_tokens * self.d_ff, 1)

    @property
    def near_zero_sparsity(self) -> float:
        return self.near_zero_count.sum().item() / max(self.n_tokens * self.d_ff, 1)

    @property
    def batch_union(self) -> float:
        return self.union_sum / max(self.n_batches, 1)

    def update(self, x: torch.Tensor, a: torch.Tensor | None, active: torch.Tensor | None = None,
               statistics: bool = True) -> None:
        """Fold in rows ``x`` (n, d_model), their activations ``a`` (n, d_ff) and which are active
        (default ``a > 0``; real tokens only). ``statistics=False`` only counts the rows and keeps them
        in the reservoir (``a`` and ``active`` unused): what a magnitude criterion needs from the pass."""
        if x.shape[0] == 0:
            return
        self.n_tokens += x.shape[0]
        self.n_batches += 1
        if not statistics:
            if self.max_samples:
                self._reservoir(x.float(), None)
            return
        if active is None:
            active = a > 0
        self.fire_count += active.sum(0)
        self.near_zero_count += (a.abs() <= self.eps).sum(0)
        a64 = a.double()
        self.act_sum += a64.sum(0)
        self.sq_sum += a64.square().sum(0)
        self.inactive_sum += torch.where(active, 0.0, a).double().sum(0)
        self.union_sum += active.any(0).float().mean().item()
        if self.max_samples:
            self._reservoir(x.float(), active)

    def _reservoir(self, x: torch.Tensor, active: torch.Tensor | None) -> None:
        """Uniform sample of all rows seen so far (Algorithm R, vectorised per batch); ``active`` None
        keeps the inputs only."""
        n, cap = x.shape[0], self.max_samples
        batch = torch.full((n,), self.n_batches - 1, dtype=torch.int64)
        stored = 0 if self.samples_x is None else self.samples_x.shape[0]
        take = min(cap - stored, n)
        if take > 0:
            self.samples_x = _cat(self.samples_x, x[:take].clone())
            self.samples_batch = _cat(self.samples_batch, batch[:take])
            if active is not None:
                self.samples_active = _cat(self.samples_active, active[:take].clone())
        rest = torch.arange(take, n)
        if len(rest):
            t = self._seen + rest + 1  # 1-based position of each row in the whole stream
            j = (torch.rand(len(rest), generator=self._gen) * t).long()
            keep = j < cap
            self.samples_x[j[keep]] = x[rest[keep]]
            self.samples_batch[j[keep]] = batch[rest[keep]]
            if active is not None:
                self.samples_active[j[keep]] = active[rest[keep]]
        self._seen += n


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new])


def _model_inputs(batch) -> dict:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k not in _NON_INPUT_KEYS}
    raise TypeError(f"a calibration batch must be a dict of model inputs or an input_ids tensor, got {type(batch).__name__}")


def _detr_backbone(model: nn.Module):
    for name, m in model.named_modules():
        if type(m).__name__ == "DetrConvEncoder":
            return m
    return None


class ActivationRecorder:
    """Context manager that installs the hooks; ``run(calib)`` feeds batches through the model."""

    def __init__(self, model: nn.Module, blocks: dict[str, MLPBlock] | None = None, eps: float = 1e-3,
                 max_samples: int = 0, statistics: bool = True):
        self.model = model
        self.blocks = blocks if blocks is not None else find_mlps(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no recognisable MLP blocks (fc1 -> act -> fc2)")
        if not statistics and not max_samples:
            raise ValueError("statistics=False keeps only the reservoir of inputs: give max_samples >= 1")
        self.statistics = statistics
        self.stats: dict[str, LayerStats] = {}
        for name, b in self.blocks.items():
            if b.act is None:
                raise ValueError(f"{name}: MLP block has no activation function to record")
            self.stats[name] = LayerStats(name, b.d_model, b.d_ff, activation_name(b), eps, max_samples=max_samples)
        self._handles = []
        self._attention_mask = None
        self._encoder_mask = None

    def _mask_for(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        lead = tuple(x.shape[:-1])
        if self._encoder_mask is not None:
            is_encoder = ".encoder." in f".{name}."
            return self._encoder_mask if is_encoder and tuple(self._encoder_mask.shape) == lead else None
        if self._attention_mask is not None and tuple(self._attention_mask.shape) == lead:
            return self._attention_mask
        return None

    def _hook(self, name: str, block: MLPBlock):
        def hook(module, inputs, z):
            x = inputs[0]
            with torch.no_grad():
                mask = self._mask_for(name, x)
                x2, z2 = x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])
                if mask is not None:
                    keep = mask.reshape(-1)
                    x2, z2 = x2[keep], z2[keep]
                if not self.statistics:
                    self.stats[name].update(x2.detach(), None, statistics=False)
                    return
                a, active = hidden_activations(block, x2, z2)
                self.stats[name].update(x2.detach(), a.detach().float(), active)

        return hook

    def __enter__(self):
        for name, b in self.blocks.items():
            self._handles.append(b.fc1.register_forward_hook(self._hook(name, b)))
        bb = _detr_backbone(self.model)
        if bb is not None:
            def bb_hook(module, inputs, out):
                self._encoder_mask = out[-1][1].flatten(1).bool()
            self._handles.append(bb.register_forward_hook(bb_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def run(self, calib: Iterable, max_batches: int | None = None, progress: bool | None = None) -> dict[str, LayerStats]:
        """Feed ``calib`` through the model once (one forward per batch records every block)."""
        from .progress import Stage

        was_training = self.model.training
        self.model.eval()
        n = 0
        total = len(calib) if hasattr(calib, "__len__") else 0
        if max_batches is not None:
            total = min(total, max_batches) if total else max_batches
        try:
            with Stage("recording", total, "batches", progress) as stage:
                for batch in calib:
                    if max_batches is not None and n >= max_batches:
                        break
                    inputs = _model_inputs(batch)
                    am = inputs.get("attention_mask")
                    self._attention_mask = am.bool() if am is not None else None
                    self._encoder_mask = None
                    self.model(**inputs)
                    n += 1
                    stage.advance(info=f"{next(iter(self.stats.values())).n_tokens:,} tokens")
        finally:
            self.model.train(was_training)
        if n == 0:
            raise ValueError("the calibration set is empty: no batches to record")
        return self.stats


# rows per block kept when a magnitude criterion derives everything from the recorded inputs
DEFAULT_ACTIVITY_ROWS = 16384


def record_activations(model: nn.Module, calib: Iterable, blocks: dict[str, MLPBlock] | None = None,
                       eps: float = 1e-3, max_samples: int = 0, max_batches: int | None = None,
                       activity: str = "sign", target_sparsity: float | None = None,
                       progress: bool | None = None) -> dict[str, LayerStats]:
    """Per-block ``LayerStats`` over ``calib`` (dicts of model inputs, or input_ids tensors).

    ``activity`` (``gating.activity.ACTIVITIES``): "sign" streams over every token; "contribution" and
    "cats" calibrate each layer's threshold for ``target_sparsity`` and compute every statistic over the
    recorded rows (``max_samples`` per block, default ``DEFAULT_ACTIVITY_ROWS``: all of a calibration set
    up to that size)."""
    from .activity import check_activity, check_target

    check_activity(activity)
    if activity == "sign":
        if target_sparsity is not None:
            raise ValueError("target_sparsity calibrates a magnitude activity ('contribution' or 'cats'); "
                             "activity 'sign' has no threshold")
        with ActivationRecorder(model, blocks, eps=eps, max_samples=max_samples) as rec:
            return rec.run(calib, max_batches=max_batches, progress=progress)
    if target_sparsity is None:
        raise ValueError(f"activity {activity!r} needs target_sparsity= (the share of pairs its threshold switches off)")
    check_target(target_sparsity)
    from .thresholds import derive_stats

    blocks = blocks if blocks is not None else find_mlps(model)
    with ActivationRecorder(model, blocks, eps=eps, max_samples=max_samples or DEFAULT_ACTIVITY_ROWS,
                            statistics=False) as rec:
        rows = rec.run(calib, max_batches=max_batches, progress=progress)
    return derive_stats(blocks, rows, activity, [target_sparsity], progress=progress)[target_sparsity]
