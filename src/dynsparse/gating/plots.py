"""One figure shared by the pretrained-sparsity studies: a quality metric against MLP activation sparsity."""
from __future__ import annotations

from pathlib import Path


def plot_quality_vs_sparsity(rows: list[dict], metric: str, ylabel: str, title: str, path: str | Path,
                             reference: float | None = None, reference_label: str = "") -> None:
    """One line per method (rows: dicts with "method", "sparsity" and ``metric``; "dense" rows are skipped),
    plus an optional horizontal reference line (the dense model's score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", label=reference_label)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["sparsity"], r[metric]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("MLP activation sparsity")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
