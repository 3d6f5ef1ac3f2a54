"""Held-out perplexity, and FF cost measured from what the sparse FF blocks actually did.

Every block that implements the sparse-FF protocol (``dynsparse.sparse_ff``) counts its work while the
text runs; tree layers' routing counts also show dead nodes and how evenly tokens spread over leaves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data import eval_windows
from ..sparse_ff import ff_usage, sparse_ff_blocks
from ..tree import TreeFF


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
    blocks = sparse_ff_blocks(model)
    trees = {n: m for n, m in blocks.items() if isinstance(m, TreeFF)}
    saved = {n: (m.leaf_visits.clone(), m.tracking) for n, m in trees.items()}
    for m in blocks.values():
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
    usage = ff_usage(model)
    layers = {}
    for name, m in trees.items():
        stats = m.usage_stats()
        layers[name] = {k: stats.to_dict()[k] for k in ("dead_fraction", "static_fraction", "path_entropy",
                                                        "effective_leaves", "balance_by_depth")}
        layers[name]["node_visits"] = stats.node_visits.tolist()
        m.leaf_visits.copy_(saved[name][0])
        m.track_usage(saved[name][1])
    for name, m in blocks.items():
        if name not in trees:
            m.track_usage(False)
    nan = float("nan")
    return EvalResult(total / count, count, usage.get("ff_active_fraction", nan), usage.get("ff_flops_per_token", nan),
                      layers)
