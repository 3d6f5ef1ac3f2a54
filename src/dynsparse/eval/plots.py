"""Matplotlib (Agg) figures for reports: loss curves and tree routing pictures."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(runs: dict[str, list[dict]], path: Path) -> Path:
    """Training loss (thin) and validation loss (markers) against step, one colour per run."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, records), color in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.5, lw=1, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", lw=2, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def routing_over_training(telemetry: list[dict], path: Path) -> Path:
    """Dead-node fraction and normalised path entropy of each tree layer over training."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(telemetry[0]["layers"]) if telemetry else []
    steps = [r["step"] for r in telemetry]
    for name in names:
        short = name.replace("transformer.h.", "block ").replace(".mlp", "")
        a.plot(steps, [r["layers"][name]["dead_fraction"] for r in telemetry], label=short)
        b.plot(steps, [r["layers"][name]["path_entropy"] for r in telemetry], label=short)
    a.set_title("dead-node fraction (per snapshot window)")
    b.set_title("path entropy / log(#leaves)")
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    a.set_ylim(bottom=0)
    b.set_ylim(0, 1.05)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def node_usage_heatmap(layers: dict[str, dict], path: Path) -> Path:
    """For each tree layer, node visits by depth (rows) and position (columns), summed over trees,
    as the share of tokens reaching each node: dead subtrees show as dark wedges."""
    names = list(layers)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.9 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        visits = np.asarray(layers[name]["node_visits"], dtype=np.float64).sum(0)  # (nodes,)
        depth = int(np.log2(len(visits) + 1)) - 1
        width = 2**depth
        grid = np.full((depth + 1, width), np.nan)
        for level in range(depth + 1):
            row = visits[2**level - 1 : 2 ** (level + 1) - 1]
            grid[level] = np.repeat(row / max(visits[0], 1), width // len(row))
        im = ax.imshow(np.log10(grid + 1e-6), aspect="auto", cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
        ax.set_ylabel("depth")
        ax.set_title(f"{name}: log10 share of tokens per node", fontsize=9)
        ax.set_xticks([])
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
