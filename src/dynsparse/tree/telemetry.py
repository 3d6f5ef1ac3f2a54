"""Routing statistics of a tree FF layer, derived from per-leaf visit counts.

A token's leaf determines its whole root-to-leaf path, so counting leaves (one bincount per forward)
is enough to recover every node's visits and right turns. That keeps telemetry cheap enough to leave
on during training.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


def node_visits_from_leaves(leaf_visits: torch.Tensor) -> torch.Tensor:
    """(trees, leaves) counts -> (trees, nodes) counts in heap order (children of i: 2i+1, 2i+2)."""
    trees, n_leaves = leaf_visits.shape
    levels = [leaf_visits]
    while levels[-1].shape[1] > 1:
        below = levels[-1]
        levels.append(below[:, 0::2] + below[:, 1::2])
    return torch.cat(list(reversed(levels)), dim=1)


@dataclass
class TreeUsage:
    """What the routing did over the counted tokens. Per-tree values are lists of length trees."""

    tokens: int
    depth: int
    trees: int
    node_visits: torch.Tensor  # (trees, nodes), heap order
    dead_fraction: float  # nodes never visited / all nodes
    static_fraction: float  # visited internal nodes that always turned the same way / visited internal nodes
    path_entropy: float  # leaf-distribution entropy / log(#leaves), mean over trees (1 = uniform)
    effective_leaves: float  # exp(entropy in nats), mean over trees
    entropy_per_tree: list[float]
    right_fraction_by_depth: list[float]  # visit-weighted share of right turns at each internal depth
    balance_by_depth: list[float]  # visit-weighted 1 - |2r - 1| of each node's right-turn ratio r

    def to_dict(self, with_visits: bool = False) -> dict:
        out = asdict(self)
        out.pop("node_visits")
        if with_visits:
            out["node_visits"] = self.node_visits.tolist()
        return out


def usage_from_leaf_visits(leaf_visits: torch.Tensor) -> TreeUsage:
    leaf_visits = leaf_visits.to(torch.float64)
    trees, n_leaves = leaf_visits.shape
    depth = int(math.log2(n_leaves))
    visits = node_visits_from_leaves(leaf_visits)
    tokens = int(visits[0, 0].item()) if trees else 0
    n_internal = n_leaves - 1

    internal = visits[:, :n_internal]
    left = visits[:, 1 : 2 * n_internal : 2]
    right = visits[:, 2 : 2 * n_internal + 1 : 2]
    visited_internal = internal > 0
    static = visited_internal & ((left == 0) | (right == 0))
    n_visited_internal = int(visited_internal.sum())
    static_fraction = float(static.sum()) / n_visited_internal if n_visited_internal else 0.0

    totals = leaf_visits.sum(1, keepdim=True).clamp_min(1)
    p = leaf_visits / totals
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    norm = ent / math.log(n_leaves) if n_leaves > 1 else torch.ones_like(ent)

    right_by_depth, balance_by_depth = [], []
    for level in range(depth):
        sl = slice(2**level - 1, 2 ** (level + 1) - 1)
        v, r = internal[:, sl], right[:, sl]
        total = float(v.sum())
        if total == 0:
            right_by_depth.append(float("nan"))
            balance_by_depth.append(float("nan"))
            continue
        ratio = torch.where(v > 0, r / v.clamp_min(1), torch.zeros_like(v))
        right_by_depth.append(float(r.sum()) / total)
        balance_by_depth.append(float(((1 - (2 * ratio - 1).abs()) * v).sum()) / total)

    return TreeUsage(
        tokens=tokens,
        depth=depth,
        trees=trees,
        node_visits=visits.to(torch.int64),
        dead_fraction=float((visits == 0).double().mean()),
        static_fraction=static_fraction,
        path_entropy=float(norm.mean()),
        effective_leaves=float(ent.exp().mean()),
        entropy_per_tree=[float(e) for e in norm],
        right_fraction_by_depth=right_by_depth,
        balance_by_depth=balance_by_depth,
    )
