"""Whitening of a tree's input with statistics of earlier training batches.

Early LM training squeezes every token's FF input into one shared direction and then onto one line
(docs/results/autoprune_collapse/). A tree of hyperplanes cannot split a line into many regions, so most
of its nodes starve. Whitening the input with the previous batch's mean and covariance keeps the tokens
spread while routing is learnt. The map is linear, so it folds into ``w_in`` and ``b_in``
(``TreeFF.fold_whitening_``) and inference pays nothing for it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class InputWhitening(nn.Module):
    """``x -> (x - mean) @ transform`` with ``transform = C^-1/2``, C the covariance of earlier batches' inputs.

    Only training steps (training mode with gradients on) update the statistics, and only after the
    batch has been transformed with the old ones: no token's transform depends on the tokens beside it,
    and evaluation never changes them. ``momentum`` 0 uses the previous batch alone; otherwise
    mean and covariance are exponential moving averages. C's eigenvalues are floored at ``floor`` times
    their mean so that the directions the tokens hardly differ in are not blown up to full size. Until
    the first update the map is the identity. It holds no parameters: gradients pass through to x. Under
    DDP or FSDP the statistics are those of the whole step's batch over all processes.
    """

    def __init__(self, d_model: int, momentum: float = 0.0, floor: float = 1e-2, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {floor}")
        self.d_model, self.momentum, self.floor, self.eps = d_model, momentum, floor, eps
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("mean", torch.zeros(d_model, **kw))
        self.register_buffer("cov", torch.zeros(d_model, d_model, **kw))
        self.register_buffer("transform", torch.eye(d_model, **kw))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64, device=device))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, momentum={self.momentum}, floor={self.floor}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"whitening input's last dimension must be d_model={self.d_model}, got {tuple(x.shape)}")
        mean, transform = self.mean, self.transform
        if self.training and torch.is_grad_enabled():
            # this step's graph keeps its own copies: update() changes the buffers in place (so that
            # DDP's buffer broadcast, which holds references to them, still sees the current ones)
            mean, transform = mean.clone(), transform.clone()
            self.update(x.detach())
        return (x - mean.to(x.dtype)) @ transform.to(x.dtype)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of x (..., d_model) into the statistics and recompute the transform."""
        flat = x.reshape(-1, self.d_model).double()
        # the first two moments, summed over every process of a DDP/FSDP run: each whitens by the global batch
        n = torch.tensor([float(flat.shape[0])], dtype=torch.float64, device=flat.device)
        s, ss = flat.sum(0), flat.T @ flat
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (n, s, ss):
                dist.all_reduce(t)
        if float(n) < 2:  # one row has no spread to whiten by
            return
        m = s / n
        c = ss / n - torch.outer(m, m)
        if self.momentum > 0 and int(self.updates) > 0:
            m = self.mean.double().lerp(m, 1.0 - self.momentum)
            c = self.cov.double().lerp(c, 1.0 - self.momentum)
        lam, vec = torch.linalg.eigh(c)
        lam = lam.clamp_min(self.floor * lam.mean().clamp_min(0.0) + self.eps)
        self.mean.copy_(m)
        self.cov.copy_(c)
        self.transform.copy_((vec * lam.rsqrt()) @ vec.T)
        self.updates += 1

    def fold(self, w_in: torch.Tensor, b_in: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Node weights (..., d_model) and biases (...) that give the same pre-activations on raw inputs:
        w.((x - m) T) + b = (w T^T).x + (b - (w T^T).m)."""
        w = w_in @ self.transform.to(w_in.dtype).T
        b = -(w @ self.mean.to(w.dtype))
        return w, b if b_in is None else b_in + b
