"""Train the MGS gates of many layers at once: one batched problem per group of same-shaped gates.

Training a layer's gate alone costs a few small matmuls per step, so thirty layers trained one after
another spend their time in Python and per-call overhead. Here the parameters of all gates of one shape
are stacked ((L, d, r) and (L, r, d_ff) for low-rank gates, (L, d, n_groups) for grouped ones) and
every step runs batched matmuls over the layers. The loss is the sum of the layers' own mean BCE
losses, so each layer's gradient is exactly its own and Adam (elementwise) updates each as if it
trained alone: the same rows, steps and updates as ``mgs.train_gate`` (tested against it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .modules import LowRankGate


@dataclass
class GateJob:
    """One layer's gate to train: the initialised gate, its rows, labels (one per logit) and split."""

    name: str
    gate: torch.nn.Module
    x: torch.Tensor  # (n, d) float32 block inputs
    labels: torch.Tensor  # (n, n_logits) bool
    train: torch.Tensor  # row indices to train on
    pos_weight: float


def _param_names(gate) -> tuple[str, ...]:
    return ("A", "B", "c") if isinstance(gate, LowRankGate) else ("G", "c")


def _same_problem(a: GateJob, b: GateJob) -> bool:
    """Whether two jobs can share a batched problem: gate type, shapes and training rows alike."""
    if type(a.gate) is not type(b.gate) or a.x.shape != b.x.shape or a.labels.shape != b.labels.shape:
        return False
    names = _param_names(a.gate)
    return all(getattr(a.gate, p).shape == getattr(b.gate, p).shape for p in names) and torch.equal(a.train, b.train)


def _logits(kind: str, params: dict, xb: torch.Tensor) -> torch.Tensor:
    if kind == "LowRankGate":
        return torch.bmm(torch.bmm(xb, params["A"]), params["B"]) + params["c"]
    return torch.bmm(xb, params["G"]) + params["c"]


def train_gates(jobs: list[GateJob], steps: int, lr: float, batch_size: int, seed: int,
                progress: bool | None = None) -> dict[str, float]:
    """Train every job's gate in place (then frozen); returns each layer's last-step training loss.

    Jobs train together when their gates have the same type and shapes and the same training rows;
    each group draws the row batches of ``mgs.train_gate`` (one generator seeded with ``seed``)."""
    from .progress import Stage

    groups: list[list[GateJob]] = []
    for job in jobs:
        for group in groups:
            if _same_problem(group[0], job):
                group.append(job)
                break
        else:
            groups.append([job])
    losses: dict[str, float] = {}
    for group in groups:
        kind = type(group[0].gate).__name__
        names = _param_names(group[0].gate)
        params = {p: torch.stack([getattr(j.gate, p).detach() for j in group]).clone().requires_grad_(True)
                  for p in names}
        params["c"] = params["c"].unsqueeze(1).detach().requires_grad_(True)  # (L, 1, n_logits): broadcasts over rows
        opt = torch.optim.Adam(list(params.values()), lr=lr, fused=True)
        pw = torch.tensor([j.pos_weight for j in group]).reshape(-1, 1, 1)
        train = group[0].train
        g = torch.Generator().manual_seed(seed)
        label = f"training gates ({len(group)} layer{'s' * (len(group) > 1)}, {kind})"
        last = torch.zeros(len(group))
        with Stage(label, steps, "steps", progress) as stage:
            for step in range(steps):
                idx = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=g)]
                xb = torch.stack([j.x[idx] for j in group])
                yb = torch.stack([j.labels[idx] for j in group]).float()
                per = F.binary_cross_entropy_with_logits(_logits(kind, params, xb), yb, pos_weight=pw,
                                                         reduction="none")
                layer_loss = per.reshape(len(group), -1).mean(1)
                opt.zero_grad(set_to_none=True)
                layer_loss.sum().backward()
                opt.step()
                last = layer_loss.detach()
                stage.advance(info=f"mean loss {last.mean().item():.4f}" if step % 10 == 0 else None)
        with torch.no_grad():
            for i, job in enumerate(group):
                for p in names:
                    value = params[p][i].reshape(-1) if p == "c" else params[p][i]
                    getattr(job.gate, p).copy_(value.reshape(getattr(job.gate, p).shape))
                job.gate.requires_grad_(False)
                losses[job.name] = last[i].item()
    return losses
