"""SIBS: static indicator-based sparsification.

A neuron that rarely fires on calibration data is predicted inactive for every input and removed: fc1's
rows and fc2's columns are sliced out, leaving a smaller dense MLP (real speed, real memory saving, no
index lists at run time). Which neurons go is decided per layer by their firing frequency (share of
real tokens with a > 0): either below ``threshold``, or the ``target_sparsity`` share of lowest-frequency
neurons. With ``compensate`` each removed neuron's mean output (over all calibration tokens) is added to
fc2's bias; for smooth activations this is what keeps the model close to dense (a GELU neuron's
negative outputs do not vanish), for ReLU it is the MSE-best constant and zero for dead neurons.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mlps import MLPBlock
from .modules import SlicedMLP
from .record import LayerStats


@dataclass
class SIBSConfig:
    threshold: float | None = None  # remove neurons firing on fewer than this share of tokens
    target_sparsity: float | None = None  # or: remove this share of each layer's neurons
    compensate: bool = True
    eps: float = 1e-3  # near-zero tolerance reported by the recorder
    min_tokens: int = 16  # fewer calibration tokens than this per layer is an error

    def __post_init__(self):
        if (self.threshold is None) == (self.target_sparsity is None):
            raise ValueError("SIBSConfig needs exactly one of threshold= or target_sparsity=")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold is a firing frequency in [0, 1], got {self.threshold}")
        if self.target_sparsity is not None and not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")


def select_kept(stats: LayerStats, cfg: SIBSConfig) -> torch.Tensor:
    """Sorted indices of the neurons SIBS keeps (at least one)."""
    f = stats.firing_frequency
    if cfg.threshold is not None:
        kept = torch.nonzero(f >= cfg.threshold).flatten()
        if len(kept) == 0:
            kept = f.argmax().reshape(1)
    else:
        n_keep = max(1, stats.d_ff - int(cfg.target_sparsity * stats.d_ff))
        order = torch.sort(f, descending=True, stable=True).indices
        kept = order[:n_keep].sort().values
    return kept


def sibs_tensors(block: MLPBlock, stats: LayerStats, cfg: SIBSConfig) -> dict[str, torch.Tensor]:
    """What a SIBS layer needs beside the dense weights: kept indices and the bias shift."""
    if stats.n_tokens < cfg.min_tokens:
        raise ValueError(f"{block.name}: only {stats.n_tokens} calibration tokens (need >= {cfg.min_tokens})")
    kept = select_kept(stats, cfg)
    _, _, w2, _ = block.linear_weights()
    removed = torch.ones(stats.d_ff, dtype=torch.bool)
    removed[kept] = False
    shift = torch.zeros(w2.shape[0])
    if cfg.compensate and removed.any():
        shift = (w2.detach().double()[:, removed] @ stats.mean_activation[removed]).float()
    return {"kept": kept, "bias_shift": shift}


def build_sliced(block: MLPBlock, tensors: dict[str, torch.Tensor], activation: str) -> SlicedMLP:
    w1, b1, w2, b2 = (None if t is None else t.detach() for t in block.linear_weights())
    wg, bg = (None if t is None else t.detach() for t in block.gate_weights())
    return SlicedMLP(w1, b1, w2, b2, tensors["kept"], activation, tensors["bias_shift"],
                     act=block.act if callable(block.act) else None, wg=wg, bg=bg)
