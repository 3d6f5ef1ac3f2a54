"""Summaries of recorded activation statistics: terminal table, JSON and PNG plots.

"How input-dependent" is summarised by how the per-neuron firing frequencies split: never active on the
calibration data (static zeros: SIBS removes them for free), always active, rarely active (< 1 %), and the
rest. A layer whose neurons are mostly "sometimes" active is sparse per token but not statically: only a
per-token gate (MGS) can exploit it. The batch union says how much a shared index set would still compute.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .record import LayerStats


def summarize(stats: dict[str, LayerStats]) -> list[dict]:
    rows = []
    for name, s in stats.items():
        f = s.firing_frequency
        rows.append({
            "layer": name,
            "activation": s.activation,
            "activity": s.activity,  # what "active" means (gating.activity)
            "activity_threshold": s.threshold,  # magnitude activities: the layer's calibrated threshold
            "d_ff": s.d_ff,
            "tokens": s.n_tokens,
            "sparsity": s.sparsity,  # inactive by the activity criterion (sign: a <= 0, exact zeros for ReLU)
            "near_zero_sparsity": s.near_zero_sparsity,  # |a| <= eps
            "eps": s.eps,
            "never_active": (f == 0).double().mean().item(),
            "always_active": (f == 1).double().mean().item(),
            "rarely_active": ((f > 0) & (f < 0.01)).double().mean().item(),
            "sometimes_active": ((f >= 0.01) & (f < 1)).double().mean().item(),
            "batch_union": s.batch_union,
        })
    return rows


def print_table(rows: list[dict], title: str = "MLP activation sparsity") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    magnitude = any(r.get("activity_threshold") is not None for r in rows)
    cols = ("layer", "act", "d_ff", "tokens", "sparsity", "|a|<=eps", "never", "always", "rare<1%", "batch union")
    for col in cols + (("threshold",) if magnitude else ()):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for r in rows:
        cells = [r["layer"], r["activation"], str(r["d_ff"]), str(r["tokens"]), f"{r['sparsity']:.1%}",
                 f"{r['near_zero_sparsity']:.1%}", f"{r['never_active']:.1%}", f"{r['always_active']:.1%}",
                 f"{r['rarely_active']:.1%}", f"{r['batch_union']:.1%}"]
        if magnitude:
            cells.append(f"{r['activity_threshold']:.4g}")
        t.add_row(*cells)
    console = Console()
    Console(width=max(console.width, 150)).print(t)  # full layer names even when piped
    if rows:
        what = {"sign": "a <= 0 (gated: act(gate) <= 0)",
                "contribution": "|act(g) u| * ||W_down[:, j]|| <= the layer's threshold",
                "cats": "|act(g)| <= the layer's threshold"}.get(rows[0].get("activity", "sign"), "inactive")
        print(f"sparsity = share of (token, neuron) with {what}; |a|<=eps uses eps = {rows[0]['eps']:g}")


def write_json(rows: list[dict], path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


def plot(stats: dict[str, LayerStats], out_dir: str | os.PathLike) -> list[Path]:
    """sparsity.png (per-layer bars) and firing_hist.png (per-layer firing-frequency histograms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    names = list(stats)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), [stats[n].sparsity for n in names],
           label="a <= 0" if stats[names[0]].activity == "sign" else f"inactive ({stats[names[0]].activity})")
    ax.bar(range(len(names)), [stats[n].near_zero_sparsity for n in names], width=0.4, label="|a| <= eps")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("activation sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out_dir / "sparsity.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
    for ax, n in zip(axes.flat, names):
        ax.hist(stats[n].firing_frequency.numpy(), bins=50, range=(0, 1))
        ax.set_title(n, fontsize=7)
        ax.set_yscale("log")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    activity = next(iter(stats.values())).activity if stats else "sign"
    fig.supxlabel("firing frequency (share of tokens with a > 0)" if activity == "sign"
                  else f"firing frequency (share of tokens active by {activity})")
    fig.tight_layout()
    paths.append(out_dir / "firing_hist.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
