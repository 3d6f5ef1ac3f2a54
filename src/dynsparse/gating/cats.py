"""CATS as a sparsification method: per layer, the threshold on |act(gate)| calibrated for a target
sparsity (``activity="cats"``), nothing trained. Saved in a ``GateSet`` like SIBS and MGS (method
"cats": the threshold, and the compensation when asked), applied as ``baselines.CATSMLP``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mlps import MLPBlock
from .activity import check_target
from .baselines import CATSMLP, cats_mlp
from .record import LayerStats


@dataclass
class CATSConfig:
    target_sparsity: float  # share of (token, neuron) pairs the threshold switches off on calibration text
    compensate: bool = False  # skipped neurons contribute their mean hidden value where skipped (CATS: off)
    max_samples: int = 16384  # calibration rows per layer the threshold is calibrated on
    eps: float = 1e-3
    min_tokens: int = 16

    def __post_init__(self):
        check_target(self.target_sparsity)
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 1:
            raise ValueError(f"max_samples must be an int >= 1, got {self.max_samples!r}")

    @property
    def activity(self) -> str:
        return "cats"

    @property
    def activity_sparsity(self) -> float:
        return self.target_sparsity


def cats_tensors(block: MLPBlock, stats: LayerStats, cfg: CATSConfig) -> dict[str, torch.Tensor]:
    """The threshold (and compensation) of one block from statistics recorded under activity "cats"."""
    if stats.activity != "cats" or stats.threshold is None:
        raise ValueError(f"{block.name}: CATS needs statistics recorded with activity='cats', got {stats.activity!r}")
    if stats.n_tokens < cfg.min_tokens:
        raise ValueError(f"{block.name}: only {stats.n_tokens} calibration tokens (need >= {cfg.min_tokens})")
    t = {"threshold": torch.tensor(float(stats.threshold))}
    if cfg.compensate:
        t["compensation"] = stats.mean_inactive_activation.float()
    return t


def build_cats(block: MLPBlock, tensors: dict[str, torch.Tensor], activation: str, backend: str = "auto") -> CATSMLP:
    return cats_mlp(block, activation, tensors["threshold"], tensors.get("compensation"), backend=backend)
