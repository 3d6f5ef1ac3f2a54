"""Routing telemetry over training: every N steps, one JSON line per snapshot in ``<run>/telemetry.jsonl``.

Each snapshot holds, for every tree layer, the statistics of the tokens routed since the previous
snapshot (dead/static node fractions, normalised path entropy, effective leaves, per-depth balance)
and the raw per-leaf visit counts they derive from; then the layers' counters are reset. Counts are
kept per process under DDP and summed across processes at snapshot time.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..tree import TreeFF


def tree_layers(model: torch.nn.Module) -> dict[str, TreeFF]:
    return {n.removeprefix("module."): m for n, m in model.named_modules() if isinstance(m, TreeFF)}


def set_tracking(model: torch.nn.Module, enabled: bool) -> None:
    for layer in tree_layers(model).values():
        layer.track_usage(enabled)


def snapshot(model: torch.nn.Module, step: int) -> dict:
    """Statistics of every tree layer since the last snapshot, then reset the counters."""
    layers = {}
    for name, layer in tree_layers(model).items():
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(layer.leaf_visits)
        usage = layer.usage_stats()
        layers[name] = {
            "tokens": usage.tokens,
            "dead_fraction": round(usage.dead_fraction, 6),
            "static_fraction": round(usage.static_fraction, 6),
            "path_entropy": round(usage.path_entropy, 6),
            "effective_leaves": round(usage.effective_leaves, 3),
            "balance_by_depth": [round(b, 4) for b in usage.balance_by_depth],
            "right_fraction_by_depth": [round(r, 4) for r in usage.right_fraction_by_depth],
            "leaf_visits": layer.leaf_visits.tolist(),
        }
        layer.reset_usage()
    return {"step": step, "time": round(time.time(), 3), "layers": layers}


def append_jsonl(path: Path, record: dict) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log. A last line cut off mid-write (a live or killed run) is skipped;
    an unreadable line anywhere else is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records written after ``max_step`` (they belong to the part of a run that a resume repeats)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(path)


def summarize(records: list[dict]) -> dict:
    """Mean over layers of the last snapshot (for tables): dead, static, entropy, effective leaves."""
    if not records:
        return {}
    layers = records[-1]["layers"].values()
    keys = ("dead_fraction", "static_fraction", "path_entropy", "effective_leaves")
    return {k: sum(l[k] for l in layers) / len(layers) for k in keys} if layers else {}
