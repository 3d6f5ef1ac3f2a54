"""Shared helpers for the tree tests: random layers and inputs with unambiguous routing."""
from __future__ import annotations

import torch

from dynsparse import TreeFF
from dynsparse.ops.tree.reference import route_dense


def routing_margin(layer: TreeFF, x: torch.Tensor) -> torch.Tensor:
    """Per token, the smallest |z| along any of its paths: where it is tiny, two correct
    implementations may route differently because they sum in different orders."""
    with torch.no_grad():
        z_all = torch.einsum("md,tnd->mtn", x.double(), layer.w_in.double())
        if layer.b_in is not None:
            z_all = z_all + layer.b_in.double()
        paths = route_dense(z_all, layer.depth)
        return z_all.gather(-1, paths).abs().amin(dim=(1, 2))


def unambiguous_inputs(layer: TreeFF, m: int, generator=None, margin: float = 1e-4) -> torch.Tensor:
    """m random tokens whose every routing decision is at least ``margin`` away from a tie."""
    n = 2 * m + 8
    while True:
        x = torch.randn(n, layer.d_model, generator=generator, dtype=layer.w_in.dtype)
        kept = x[routing_margin(layer, x) > margin]
        if kept.shape[0] >= m:
            return kept[:m].contiguous()
        assert n < 64 * m, f"only {kept.shape[0]} of {n} random tokens route unambiguously"
        n *= 4
