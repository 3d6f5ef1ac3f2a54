"""SIBS: static indicator-based sparsification.

A neuron that rarely fires on calibration data is predicted inactive for every input and removed: fc1's
rows and fc2's columns are sliced out, leaving a smaller dense MLP (real speed, real memory saving, no
index lists at run time). Which neurons go is decided per layer by ``criterion``:

* ``"frequency"`` (the paper's indicator, default): firing frequency, the share of real tokens with
  a > 0; either below ``threshold``, or the ``target_sparsity`` share of lowest-frequency neurons.
* ``"output_error"``: the ``target_sparsity`` share of neurons whose removal adds the least expected
  squared error to the block output, E[a^2] * |W2[:, j]|^2 (Var[a] instead of E[a^2] with compensation).
  Pretrained transformers have neurons that fire rarely but hugely on a few tokens (massive activations
  on separator-like tokens); frequency removes them first. On all-MiniLM-L6-v2 the 25 % lowest-frequency
  neurons carry almost all of the first layer's output energy on held-out text.

"Firing" is the ``activity`` criterion (``gating.activity``): "sign" (a > 0, the paper's), or a
magnitude criterion ("contribution", "cats") whose per-layer threshold is calibrated for
``activity_sparsity`` (default: the target sparsity), so the frequency counts how often a neuron matters.

With ``compensate`` each removed neuron's mean output (over all calibration tokens) is added to fc2's
bias: the MSE-best constant, zero for dead ReLU neurons. It lowers every layer's output error, but a
rare huge output turned into a small constant on every token can still hurt end to end: on MiniLM it
does with ``"frequency"`` and helps with ``"output_error"`` (docs/results/minilm).
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
    criterion: str = "frequency"  # or "output_error" (needs target_sparsity); see the module docstring
    eps: float = 1e-3  # near-zero tolerance reported by the recorder
    min_tokens: int = 16  # fewer calibration tokens than this per layer is an error
    activity: str = "sign"  # what "firing" means: "sign", "contribution" or "cats" (gating.activity)
    activity_sparsity: float | None = None  # a magnitude activity's calibration target (default: target_sparsity)
    max_samples: int = 16384  # magnitude activities: calibration rows per layer kept to calibrate on

    def __post_init__(self):
        from .activity import check_activity, check_target

        check_activity(self.activity)
        if self.activity == "sign":
            if self.activity_sparsity is not None:
                raise ValueError("activity_sparsity calibrates a magnitude activity; activity 'sign' has no threshold")
        else:
            if self.activity_sparsity is None:
                if self.target_sparsity is None:
                    raise ValueError(f"activity {self.activity!r} with threshold= needs activity_sparsity= "
                                     "(the share of pairs its per-layer threshold switches off)")
                self.activity_sparsity = self.target_sparsity
            check_target(self.activity_sparsity, "activity_sparsity")
        if (self.threshold is None) == (self.target_sparsity is None):
            raise ValueError("SIBSConfig needs exactly one of threshold= or target_sparsity=")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold is a firing frequency in [0, 1], got {self.threshold}")
        if self.target_sparsity is not None and not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.criterion not in ("frequency", "output_error"):
            raise ValueError(f"criterion must be 'frequency' or 'output_error', got {self.criterion!r}")
        if self.criterion == "output_error" and self.threshold is not None:
            raise ValueError("threshold is a firing frequency; criterion='output_error' takes target_sparsity=")


def removal_error(stats: LayerStats, w2: torch.Tensor, compensate: bool) -> torch.Tensor:
    """(d_ff,) expected squared error each neuron's removal adds to the block output on calibration
    tokens: E[a^2] |W2[:, j]|^2, or Var[a] |W2[:, j]|^2 when its mean is added back."""
    second = stats.mean_square_activation
    if compensate:
        second = (second - stats.mean_activation.square()).clamp_min(0)
    return second * w2.detach().double().square().sum(0)


def select_kept(stats: LayerStats, cfg: SIBSConfig, w2: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of the neurons SIBS keeps (at least one); ``w2`` (fc2's weight) for output_error."""
    if cfg.criterion == "output_error":
        if w2 is None:
            raise ValueError("criterion='output_error' needs the block's fc2 weight")
        score = removal_error(stats, w2, cfg.compensate)
    else:
        score = stats.firing_frequency
    if cfg.threshold is not None:
        kept = torch.nonzero(score >= cfg.threshold).flatten()
        if len(kept) == 0:
            kept = score.argmax().reshape(1)
    else:
        n_keep = max(1, stats.d_ff - int(cfg.target_sparsity * stats.d_ff))
        order = torch.sort(score, descending=True, stable=True).indices
        kept = order[:n_keep].sort().values
    return kept


def sibs_tensors(block: MLPBlock, stats: LayerStats, cfg: SIBSConfig) -> dict[str, torch.Tensor]:
    """What a SIBS layer needs beside the dense weights: kept indices and the bias shift."""
    if stats.n_tokens < cfg.min_tokens:
        raise ValueError(f"{block.name}: only {stats.n_tokens} calibration tokens (need >= {cfg.min_tokens})")
    _, _, w2, _ = block.linear_weights()
    kept = select_kept(stats, cfg, w2)
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
