"""How far a sparsified LM is from its dense original: held-out perplexity of each and the mean KL
divergence KL(dense || sparse) of their next-token distributions, on the same windows.

Perplexity alone can hide damage (a model can lose on some tokens and gain on others); the KL says how
much the distribution itself moved. ``dense_reference`` runs the dense model once and keeps its
log-probabilities, so a study comparing many variants runs the dense model only once;
``compare_models`` runs both side by side when keeping them would cost too much memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data import eval_windows
from ..sparse_ff import ff_usage, sparse_ff_blocks


@dataclass
class DenseReference:
    """The dense model's next-token log-probabilities on fixed windows (float32, one tensor per batch)."""

    x: torch.Tensor  # (windows, seq_len) inputs
    y: torch.Tensor  # (windows, seq_len) targets
    batch_size: int
    logprobs: list[torch.Tensor]
    loss: float

    @property
    def tokens(self) -> int:
        return self.y.numel()

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def _windows(tokens: np.ndarray, seq_len: int, max_windows: int | None):
    if len(tokens) < seq_len + 1:
        raise ValueError(f"need at least {seq_len + 1} tokens to evaluate, got {len(tokens)}")
    return eval_windows(tokens, seq_len, max_windows)


def _logprobs(model, xb: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=xb.to(next(model.parameters()).device), use_cache=False).logits
    return F.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def dense_reference(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8,
                    max_windows: int | None = None) -> DenseReference:
    """Run the dense ``model`` over consecutive windows of ``tokens`` and keep its log-probabilities
    (memory: windows * seq_len * vocab * 4 bytes)."""
    model.eval()
    x, y = _windows(tokens, seq_len, max_windows)
    out, total = [], 0.0
    for i in range(0, len(x), batch_size):
        lp = _logprobs(model, x[i:i + batch_size])
        total += -lp.gather(-1, y[i:i + batch_size].unsqueeze(-1)).sum().item()
        out.append(lp)
    return DenseReference(x, y, batch_size, out, total / y.numel())


def _kl_sum(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Sum over positions of KL(p || q) from log-probabilities (last dim: the vocabulary)."""
    return (p_log.exp() * (p_log - q_log)).sum().item()


def _usage_start(model):
    blocks = sparse_ff_blocks(model)
    for m in blocks.values():
        m.reset_usage()
        m.track_usage(True)
    return blocks


def _usage_end(model, blocks) -> dict:
    usage = ff_usage(model)  # dense MLP blocks count at full cost, as in evaluate_lm
    for m in blocks.values():
        m.track_usage(False)
    return usage


def _result(loss_sum: float, kl_sum: float, tokens: int, dense_loss: float, usage: dict) -> dict:
    loss = loss_sum / tokens
    nan = float("nan")
    return {"loss": loss, "perplexity": math.exp(loss), "dense_perplexity": math.exp(dense_loss),
            "perplexity_increase": math.exp(loss - dense_loss) - 1, "kl_to_dense": kl_sum / tokens,
            "tokens": tokens, "ff_active_fraction": usage.get("ff_active_fraction", nan),
            "ff_flops_per_token": usage.get("ff_flops_per_token", nan)}


@torch.no_grad()
def evaluate_against(model, reference: DenseReference) -> dict:
    """Perplexity of ``model`` on the reference's windows, its increase over the dense model, the mean
    KL(dense || model) per token, and the FF cost its sparse blocks measured on the way."""
    model.eval()
    blocks = _usage_start(model)
    loss_sum = kl_sum = 0.0
    try:
        for b, i in enumerate(range(0, len(reference.x), reference.batch_size)):
            lp = _logprobs(model, reference.x[i:i + reference.batch_size])
            loss_sum += -lp.gather(-1, reference.y[i:i + reference.batch_size].unsqueeze(-1)).sum().item()
            kl_sum += _kl_sum(reference.logprobs[b], lp)
    finally:
        usage = _usage_end(model, blocks)
    return _result(loss_sum, kl_sum, reference.tokens, reference.loss, usage)


@torch.no_grad()
def compare_models(model, dense, tokens: np.ndarray, seq_len: int, batch_size: int = 8,
                   max_windows: int | None = None) -> dict:
    """``evaluate_against`` without keeping the dense log-probabilities: both models run batch by batch."""
    model.eval()
    dense.eval()
    x, y = _windows(tokens, seq_len, max_windows)
    blocks = _usage_start(model)
    loss_sum = kl_sum = dense_sum = 0.0
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size].unsqueeze(-1)
            p, q = _logprobs(dense, xb), _logprobs(model, xb)
            dense_sum += -p.gather(-1, yb).sum().item()
            loss_sum += -q.gather(-1, yb).sum().item()
            kl_sum += _kl_sum(p, q)
    finally:
        usage = _usage_end(model, blocks)
    return _result(loss_sum, kl_sum, y.numel(), dense_sum / y.numel(), usage)
