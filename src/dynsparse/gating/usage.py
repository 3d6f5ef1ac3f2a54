"""The sparse-FF protocol (``dynsparse.sparse_ff``) for the MLP modules of ``dynsparse.gating``.

Each module says what one token costs in FLOPs given how many neurons it computed; ``UsageCounter``
keeps the counters while tracking is on, so evaluation reports the measured active fraction and FLOPs
instead of a formula's guess. Costs count 2 FLOPs per multiply-add of the projections (biases and the
activation are left out, as in ``sparse_ff.dense_ff_flops``).
"""
from __future__ import annotations

from ..sparse_ff import FFUsage


def neuron_flops(d_model: int, d_out: int, gated: bool) -> int:
    """FLOPs of one computed hidden neuron for one token: its row of fc1 (and of the gate projection for
    a gated block) and its column of fc2."""
    return 2 * (d_model * (2 if gated else 1) + d_out)


class UsageCounter:
    """Mixin: ``track_usage`` / ``reset_usage`` / ``measured_usage`` over (tokens, computed neurons,
    FLOPs) counters; the module calls ``_count_usage`` from its forward."""

    d_ff: int

    def _init_usage(self) -> None:
        self._tracking = False
        self.reset_usage()

    def track_usage(self, enabled: bool = True):
        self._tracking = bool(enabled)
        return self

    @property
    def tracking(self) -> bool:
        return self._tracking

    def reset_usage(self) -> None:
        self._usage_tokens, self._usage_neurons, self._usage_flops = 0, 0, 0.0

    def _count_usage(self, tokens: int, neurons: int, flops: float) -> None:
        if self._tracking:
            self._usage_tokens += int(tokens)
            self._usage_neurons += int(neurons)
            self._usage_flops += float(flops)

    def measured_usage(self) -> FFUsage:
        """Since the last reset: computed neurons per token / d_ff, and FLOPs per token."""
        t = self._usage_tokens
        if t == 0:
            return FFUsage(0, float("nan"), float("nan"))
        return FFUsage(t, self._usage_neurons / (t * self.d_ff), self._usage_flops / t)
