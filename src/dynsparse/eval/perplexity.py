"""Held-out perplexity, and FF cost measured from what the tree layers actually routed.

For a tree layer the work per token follows from the routing counts: every visited node costs one
dot product with the input and one scaled row of the output table. Counting visits over real text
(rather than trusting the formula) also shows dead nodes and how evenly tokens spread over leaves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data import eval_windows
from ..mlps import find_mlps
from ..tree import PrunedTreeFF, TreeFF
from ..tree.telemetry import node_visits_from_leaves


@dataclass
class EvalResult:
    loss: float
    tokens: int
    ff_active_fraction: float  # measured: visited FF neurons / all FF neurons, per token, mean over blocks
    ff_flops_per_token: float  # measured, per FF block, mean over blocks
    layers: dict = field(default_factory=dict)  # tree layer name -> usage statistics over the text

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "ff_active_fraction": self.ff_active_fraction, "ff_flops_per_token": self.ff_flops_per_token,
                "layers": self.layers}


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int = 16,
                max_windows: int | None = None) -> EvalResult:
    """Next-token loss over consecutive windows of ``tokens``, with routing counted in every tree layer."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"need at least {seq_len + 1} tokens to evaluate, got {len(tokens)}")
    model.eval()
    trees = {n: m for n, m in model.named_modules() if isinstance(m, TreeFF)}
    saved = {n: (m.leaf_visits.clone(), m.tracking) for n, m in trees.items()}
    pruned = {n: m for n, m in model.named_modules() if isinstance(m, PrunedTreeFF)}
    for m in [*trees.values(), *pruned.values()]:
        m.reset_usage()
        m.track_usage(True)
    x, y = eval_windows(tokens, seq_len, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        logits = model(input_ids=xb, use_cache=False).logits
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), yb.reshape(-1), reduction="sum").item()
        count += yb.numel()
    layers, fractions, flops = {}, [], []
    for name, m in trees.items():
        usage = m.usage_stats()
        visits = node_visits_from_leaves(m.leaf_visits.cpu()).sum().item()  # node visits, all trees
        per_token = visits / max(usage.tokens, 1)
        fractions.append(per_token / (m.trees * m.nodes))
        flops.append(2 * per_token * (m.d_model + m.d_out))
        layers[name] = {k: usage.to_dict()[k] for k in ("dead_fraction", "static_fraction", "path_entropy",
                                                        "effective_leaves", "balance_by_depth")}
        layers[name]["node_visits"] = usage.node_visits.tolist()
        m.leaf_visits.copy_(saved[name][0])
        m.track_usage(saved[name][1])
    for m in pruned.values():
        fractions.append(m.nodes_per_token / m.w_in.shape[0])
        flops.append(2 * m.nodes_per_token * (m.d_model + m.d_out))
        m.track_usage(False)
    if not trees and not pruned:  # dense blocks: every neuron works for every token
        mlps = list(find_mlps(model).values())
        fractions = [1.0] * len(mlps)
        flops = [4.0 * b.d_model * b.d_ff for b in mlps]
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return EvalResult(total / count, count, mean(fractions), mean(flops), layers)
