"""Routing balance for tree FF layers while training (optional: ``tree_balance_rate > 0``).

A node's turn is sign(z) and carries no gradient, and GELU per node trains the two signs very
differently, so nodes drift to one side and whole subtrees stop receiving tokens (auto-pruning).
Loss-free bias balancing, as DeepSeek-V3 does for its MoE routers: after every optimizer step, move
each internal node's bias ``b_in`` by ``rate`` against the sign of (right - left) turns it took in
that step. Only a parameter update: the layer computes exactly the same function of its weights.

The step's turns come from the layers' routing counters (``leaf_visits``), so tracking is on while
balancing; ``rebase()`` tells the balancer that the telemetry snapshot reset those counters.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..tree.telemetry import node_visits_from_leaves
from . import telemetry


class RoutingBalancer:
    def __init__(self, model: torch.nn.Module, rate: float):
        if rate <= 0:
            raise ValueError(f"balance rate must be > 0, got {rate}")
        self.rate = rate
        self.layers = {n: l for n, l in telemetry.tree_layers(model).items() if l.b_in is not None and l.depth > 0}
        for layer in self.layers.values():
            layer.track_usage(True)
        self.rebase()

    def rebase(self) -> None:
        """Remember the counters as they are now (call after anything resets them)."""
        self.last = {n: l.leaf_visits.clone() for n, l in self.layers.items()}

    @torch.no_grad()
    def step(self) -> None:
        for name, layer in self.layers.items():
            counts = layer.leaf_visits - self.last[name]  # this step's routing (this process)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts)  # every process applies the same update
            visits = node_visits_from_leaves(counts)
            n_internal = 2**layer.depth - 1
            left, right = visits[:, 1 : 2 * n_internal : 2], visits[:, 2 : 2 * n_internal + 1 : 2]
            b = layer.b_in.data
            b[:, :n_internal] -= self.rate * torch.sign(right - left).to(b.dtype)
        self.rebase()
