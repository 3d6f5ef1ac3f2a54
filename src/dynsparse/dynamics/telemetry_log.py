"""Read a run's routing telemetry (``<run>/telemetry.jsonl``) into per-layer time series.

Tolerates a live run: a last line still being written is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..train.telemetry import read_jsonl
from ..tree.telemetry import node_visits_from_leaves

SERIES = ("dead_fraction", "static_fraction", "path_entropy", "effective_leaves")


class TelemetryError(ValueError):
    """A run directory without usable routing telemetry."""


@dataclass
class LayerSeries:
    name: str
    steps: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SERIES})
    balance_by_depth: list[list[float]] = field(default_factory=list)
    leaf_visits: list[np.ndarray] = field(default_factory=list)  # per snapshot, (trees, leaves)

    @property
    def depth(self) -> int:
        return int(np.log2(self.leaf_visits[-1].shape[1]))

    def total_leaf_visits(self) -> np.ndarray:
        return np.sum(self.leaf_visits, axis=0)


def load_telemetry(run: str | Path) -> dict[str, LayerSeries]:
    run = Path(run)
    if not run.is_dir():
        raise TelemetryError(f"{run} is not a directory")
    path = run / "telemetry.jsonl"
    if not path.exists():
        raise TelemetryError(
            f"{run} has no telemetry.jsonl: it is not a tree-model run, or it was trained with telemetry off"
        )
    try:
        records = read_jsonl(path)
    except ValueError as e:
        raise TelemetryError(str(e)) from None
    if not records or not any(r.get("layers") for r in records):
        raise TelemetryError(f"{path} holds no tree-layer snapshots yet (a dense run, or too early in training)")
    layers: dict[str, LayerSeries] = {}
    for record in records:
        for name, stats in record["layers"].items():
            series = layers.setdefault(name, LayerSeries(name))
            series.steps.append(int(record["step"]))
            for key in SERIES:
                series.values[key].append(float(stats[key]))
            series.balance_by_depth.append([float(b) for b in stats["balance_by_depth"]])
            series.leaf_visits.append(np.asarray(stats["leaf_visits"], dtype=np.int64))
    return layers


def node_visits(leaf_visits: np.ndarray) -> np.ndarray:
    """(trees, leaves) -> (trees, nodes) in heap order."""
    return node_visits_from_leaves(torch.from_numpy(leaf_visits)).numpy()


def alive_by_depth(leaf_visits: np.ndarray) -> np.ndarray:
    """Fraction of nodes visited at each depth (0..D), over all trees."""
    visits = node_visits(leaf_visits)
    depth = int(np.log2(leaf_visits.shape[1]))
    return np.array([(visits[:, 2**l - 1 : 2 ** (l + 1) - 1] > 0).mean() for l in range(depth + 1)])
