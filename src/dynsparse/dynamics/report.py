"""``dynsparse inspect``: how a run's trees routed over training, as inspect.md + PNGs + a terminal table."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_dir  # noqa: E402
from .telemetry_log import LayerSeries, alive_by_depth, load_telemetry, node_visits  # noqa: E402

LABELS = {
    "dead_fraction": "dead nodes (fraction)",
    "static_fraction": "static nodes (fraction)",
    "path_entropy": "path entropy / log(#leaves)",
    "effective_leaves": "effective leaves exp(H)",
}


def plot_trajectories(layers: dict[str, LayerSeries], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for series in layers.values():
        for ax, key in zip(axes, ("dead_fraction", "static_fraction", "path_entropy")):
            ax.plot(series.steps, series.values[key], label=_short(series.name))
    for ax, key in zip(axes, ("dead_fraction", "static_fraction", "path_entropy")):
        ax.set_title(LABELS[key])
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(fig, path)


def plot_depth_heatmap(series: LayerSeries, path: Path) -> None:
    """Share of each depth's nodes that received tokens, per snapshot: where subtrees die over training."""
    grid = np.stack([alive_by_depth(v) for v in series.leaf_visits], axis=1)
    fig, ax = plt.subplots(figsize=(8, 3))
    im = ax.imshow(grid, aspect="auto", origin="upper", vmin=0, vmax=1, cmap="viridis",
                   extent=(series.steps[0], series.steps[-1], series.depth + 0.5, -0.5))
    ax.set_xlabel("step")
    ax.set_ylabel("depth")
    ax.set_title(f"{_short(series.name)}: share of nodes visited, by depth")
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def plot_tree_usage(series: LayerSeries, path: Path, tree: int = 0, snapshot: int = -1) -> None:
    """An icicle picture of one tree: each node spans its leaves' columns, colour = log visits."""
    visits = node_visits(series.leaf_visits[snapshot])[tree]
    depth = series.depth
    width = 2**depth
    grid = np.full((depth + 1, width), np.nan)
    for level in range(depth + 1):
        span = width // 2**level
        for j in range(2**level):
            grid[level, j * span : (j + 1) * span] = visits[2**level - 1 + j]
    fig, ax = plt.subplots(figsize=(10, 3))
    masked = np.ma.masked_where(grid == 0, np.log10(np.maximum(grid, 1)))
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#dddddd")
    im = ax.imshow(masked, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_ylabel("depth")
    ax.set_yticks(range(depth + 1))
    ax.set_xticks([])
    ax.set_title(f"{_short(series.name)}, tree {tree}, step {series.steps[snapshot]}: log10 visits (grey = dead)")
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def summary_rows(layers: dict[str, LayerSeries]) -> list[dict]:
    rows = []
    for name, s in layers.items():
        first = {k: v[0] for k, v in s.values.items()}
        last = {k: v[-1] for k, v in s.values.items()}
        rows.append({"layer": name, "step": s.steps[-1], **last,
                     "entropy_change": last["path_entropy"] - first["path_entropy"],
                     "dead_change": last["dead_fraction"] - first["dead_fraction"]})
    return rows


def write_inspect_report(run: str | Path, out: str | Path | None = None, layers_to_draw: int = 2) -> Path:
    """Write ``inspect.md`` and its PNGs into ``out`` (default ``<run>/inspect``); returns the .md path.

    Written into a temporary folder first and moved into place, so a failure leaves no half report.
    """
    run = Path(run)
    layers = load_telemetry(run)
    out = Path(out) if out is not None else run / "inspect"
    with atomic_dir(out) as tmp:
        _write_report(run, layers, tmp, layers_to_draw)
    return out / "inspect.md"


def _write_report(run: Path, layers: dict[str, LayerSeries], tmp: Path, layers_to_draw: int) -> None:
    plot_trajectories(layers, tmp / "trajectories.png")
    chosen = _chosen_layers(layers, layers_to_draw)
    for i, name in enumerate(chosen):
        plot_depth_heatmap(layers[name], tmp / f"depth_heatmap_{i}.png")
        plot_tree_usage(layers[name], tmp / f"tree_usage_{i}.png")
    lines = [f"# Routing report: `{run}`", "",
             f"{len(layers)} tree layers, {len(next(iter(layers.values())).steps)} telemetry snapshots. Each "
             "snapshot counts the tokens routed since the previous one: a node is *dead* if none reached it, "
             "*static* if every token it saw turned the same way.", "",
             "| layer | step | dead | static | entropy | eff. leaves | entropy change | dead change |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary_rows(layers):
        lines.append(f"| {r['layer']} | {r['step']} | {r['dead_fraction']:.3f} | {r['static_fraction']:.3f} | "
                     f"{r['path_entropy']:.3f} | {r['effective_leaves']:.1f} | {r['entropy_change']:+.3f} | "
                     f"{r['dead_change']:+.3f} |")
    lines += ["", "## Over training", "", "![trajectories](trajectories.png)", ""]
    for i, name in enumerate(chosen):
        lines += [f"## {name}", "", f"![depth heat map](depth_heatmap_{i}.png)", "",
                  f"![tree usage](tree_usage_{i}.png)", ""]
    (tmp / "inspect.md").write_text("\n".join(lines))


def _chosen_layers(layers, n):
    """The first and the last layer (most and least shallow), then others, up to n."""
    names = list(layers)
    order = [names[0], names[-1]] + names[1:-1]
    return list(dict.fromkeys(order))[:n]


def _short(name: str) -> str:
    return name.replace("transformer.", "").replace(".mlp", "")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
