"""When an MLP neuron counts as active: one vocabulary for recording, analysis, SIBS, MGS and the baselines.

For a block y = W_down h, with h_j = act(g_j(x)) * u_j(x) (gated, Llama-style) or h_j = act(z_j(x)) (plain):

* ``"sign"``: act(g_j) > 0 (plain: act(z_j) > 0). Exact zeros for a ReLU; for SiLU or GELU it is only
  the positive branch: about half the neurons, and the negative ones still contribute.
* ``"contribution"``: |h_j| * ||W_down[:, j]|| > t_l, the size of what neuron j adds to the block output.
  Dropping the smallest contributions is what keeps the output closest, so gates should predict this.
* ``"cats"``: |act(g_j)| > t_l (plain: |act(z_j)|), the criterion of CATS (Lee et al., 2024): it
  ignores the up projection, so a neuron with a large gate but a tiny u_j still counts.

``t_l`` is one threshold per layer, calibrated on calibration rows so that ``target_sparsity`` of the
(token, neuron) pairs fall at or below it. Every criterion is a score compared with a threshold ("sign":
act(g) against 0), so one code path serves all three.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVITIES = ("sign", "contribution", "cats")
MAGNITUDE = ("contribution", "cats")  # the criteria whose threshold is calibrated


def check_activity(name, arg: str = "activity") -> str:
    if name not in ACTIVITIES:
        raise ValueError(f"{arg} must be one of {list(ACTIVITIES)}, got {name!r}")
    return name


def check_target(target, arg: str = "target_sparsity") -> float:
    """A sparsity target: a number in [0, 1) (1 would switch every neuron off)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise ValueError(f"{arg} must be a number in [0, 1), got {target!r}")
    return float(target)


def hidden_values(x: torch.Tensor, w1, b1, wg, bg, act, z: torch.Tensor | None = None):
    """(h, act(routing pre-activation)) for rows x (M, d) of a block with these tensors (float32); ``z`` =
    fc1(x) when already computed. For a plain block both are act(z)."""
    x = x.float()
    z = F.linear(x, w1, b1) if z is None else z.float()
    if wg is None:
        a = act(z)
        return a, a
    gate = act(F.linear(x, wg, bg))
    return gate * z, gate


def activity_scores(criterion: str, h: torch.Tensor, gate: torch.Tensor, w2_norm: torch.Tensor) -> torch.Tensor:
    """(M, d_ff) scores whose comparison with the layer's threshold says who is active (``w2_norm``:
    ||W_down[:, j]||)."""
    if criterion == "sign":
        return gate
    if criterion == "contribution":
        return h.abs() * w2_norm
    if criterion == "cats":
        return gate.abs()
    raise ValueError(f"activity must be one of {list(ACTIVITIES)}, got {criterion!r}")


class BlockScorer:
    """The tensors of one ``dynsparse.mlps.MLPBlock`` that hidden values and scores need, detached,
    float32, with the block's own activation (e.g. GPT-2's tanh GELU)."""

    def __init__(self, block):
        w1, b1, w2, _ = block.linear_weights()
        wg, bg = block.gate_weights()

        def f32(t):
            return None if t is None else t.detach().float()

        self.w1, self.b1, self.wg, self.bg = f32(w1), f32(b1), f32(wg), f32(bg)
        self.w2_norm = w2.detach().float().norm(dim=0)  # ||W_down[:, j]||, (d_ff,)
        self.act = block.act

    def hidden(self, x: torch.Tensor, z: torch.Tensor | None = None):
        return hidden_values(x, self.w1, self.b1, self.wg, self.bg, self.act, z)

    def scores(self, criterion: str, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return activity_scores(criterion, h, gate, self.w2_norm)


def threshold_for(scores: torch.Tensor, target_sparsity: float) -> float:
    """The per-layer threshold t: the k-th smallest score, k = target_sparsity * (number of scores), so
    ``scores > t`` switches that share of the pairs off (more where scores tie at t). At target 0 it is
    below every score (finite, so it can be saved)."""
    check_target(target_sparsity)
    v = scores.flatten().float()
    k = int(target_sparsity * v.numel())
    if k == 0:
        return v.min().item() - 1.0
    return v.kthvalue(k).values.item()


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(M, d_ff) bool: each row's ``keep`` highest scores (the oracle's per-token selection)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    return mask
