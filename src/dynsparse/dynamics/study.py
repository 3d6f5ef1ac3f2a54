"""The auto-pruning study: the same small tree LM trained with the variants that matter.

Per-node GELU (asymmetric; the published form that starves subtrees), per-node ReLU, a symmetric
per-node activation (tanh), and GELU after path accumulation (z enters linearly, so both children of a
node get gradients of one form). Same seed, data and budget; each variant is an ordinary run directory,
so the study resumes where it stopped and every run can be inspected on its own.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_write_text  # noqa: E402
from ..train.config import TrainConfig  # noqa: E402
from .telemetry_log import load_telemetry  # noqa: E402

VARIANTS = {
    "node-gelu": dict(activation="gelu", act_position="node"),
    "node-relu": dict(activation="relu", act_position="node"),
    "node-tanh": dict(activation="tanh", act_position="node"),
    "path-gelu": dict(activation="gelu", act_position="path"),
}
METRICS = ("dead_fraction", "static_fraction", "path_entropy")

# Budgets sized for 2 CPU cores: full < 30 min, quick < 5 min (4 variants each).
BUDGETS = {
    "full": dict(d_model=128, n_layer=4, n_head=4, depth=7, trees=4, seq_len=128, batch_size=16, max_steps=600,
                 warmup_steps=30, lr=3e-3, telemetry_every=25, eval_every=200, ckpt_every=200, eval_batches=8),
    "quick": dict(d_model=64, n_layer=2, n_head=2, depth=6, trees=2, seq_len=64, batch_size=16, max_steps=200,
                  warmup_steps=10, lr=3e-3, telemetry_every=10, eval_every=100, ckpt_every=100, eval_batches=4),
}


def study_configs(quick: bool, variants: list[str] | None = None, seed: int = 0, data: str = "shakespeare",
                  max_steps: int | None = None) -> dict[str, TrainConfig]:
    names = variants or list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    base = dict(BUDGETS["quick" if quick else "full"])
    if max_steps is not None:
        if max_steps < base["telemetry_every"]:  # the report needs at least one routing snapshot
            raise ValueError(f"--max-steps {max_steps} is shorter than the study's telemetry interval "
                             f"({base['telemetry_every']} steps): use --max-steps {base['telemetry_every']} or more")
        base["max_steps"] = max_steps
    common = TrainConfig(preset="tiny", ff="tree", seed=seed, data=data, **base)
    return {name: replace(common, **VARIANTS[name]) for name in names}


def run_study(out: str | Path, configs: dict[str, TrainConfig], overwrite: bool = False, progress: bool = True) -> dict:
    """Train every variant into ``out/<variant>`` (finished runs with the same config are reused)."""
    from ..train.loop import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, cfg in configs.items():
        run = out / name
        metrics_file = run / "final" / "metrics.json"
        same = not overwrite and _same_config(run, cfg)
        if same and metrics_file.exists():  # finished: reuse
            results[name] = json.loads(metrics_file.read_text())
            continue
        results[name] = train(cfg, run, resume=same, overwrite=overwrite, progress=progress)
    return results


def summarize_study(out: str | Path, results: dict) -> list[dict]:
    rows = []
    for name, metrics in results.items():
        layers = load_telemetry(Path(out) / name)
        last = {k: float(np.mean([s.values[k][-1] for s in layers.values()])) for k in METRICS}
        rows.append({"variant": name, "val_loss": metrics["val_loss"], **last,
                     "effective_leaves": float(np.mean([s.values["effective_leaves"][-1] for s in layers.values()])),
                     "leaves": 2 ** next(iter(layers.values())).depth})
    return rows


def verdict(rows: list[dict]) -> str:
    """One honest sentence on whether auto-pruning and its remedy show at this scale."""
    by = {r["variant"]: r for r in rows}
    if "node-gelu" not in by or "path-gelu" not in by:
        return "Run both node-gelu and path-gelu to compare the auto-pruning form with its remedy."
    g, p = by["node-gelu"], by["path-gelu"]
    shows = g["dead_fraction"] > p["dead_fraction"] + 0.05 and g["path_entropy"] < p["path_entropy"] - 0.05
    numbers = (f"node-GELU ends with {g['dead_fraction']:.1%} dead nodes and entropy {g['path_entropy']:.2f}; "
               f"GELU after the path ends with {p['dead_fraction']:.1%} dead and entropy {p['path_entropy']:.2f}")
    if shows:
        return f"Auto-pruning shows at this scale: {numbers}."
    return f"At this scale auto-pruning does not clearly show: {numbers}."


def plot_study(out: str | Path, names: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(METRICS), figsize=(14, 3.8))
    for name in names:
        layers = load_telemetry(Path(out) / name)
        steps = next(iter(layers.values())).steps
        for ax, key in zip(axes, METRICS):
            ax.plot(steps, np.mean([s.values[key] for s in layers.values()], axis=0), label=name)
    for ax, key in zip(axes, METRICS):
        ax.set_title(key.replace("_", " ") + " (mean over layers)")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_study_report(out: str | Path, rows: list[dict], configs: dict[str, TrainConfig]) -> Path:
    out = Path(out)
    plot_study(out, [r["variant"] for r in rows], out / "study.png")
    cfg = next(iter(configs.values()))
    lines = ["# Auto-pruning study", "",
             f"Tiny tree LM on `{cfg.data}`: d_model {cfg.d_model}, {cfg.n_layer} layers, {cfg.trees} trees of depth "
             f"{cfg.depth} per layer, {cfg.max_steps} steps, batch {cfg.batch_size} x {cfg.seq_len} tokens, seed "
             f"{cfg.seed}; identical for every variant. Telemetry counts the tokens since the previous snapshot "
             f"(every {cfg.telemetry_every} steps); values are the last snapshot's, averaged over layers.", "",
             "| variant | val loss | dead nodes | static nodes | path entropy | effective leaves |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['val_loss']:.4f} | {r['dead_fraction']:.3f} | {r['static_fraction']:.3f} "
                     f"| {r['path_entropy']:.3f} | {r['effective_leaves']:.1f} of {r['leaves']} |")
    lines += ["", verdict(rows), "", "![trajectories](study.png)", ""]
    atomic_write_text(out / "study.md", "\n".join(lines))
    atomic_write_text(out / "study.json", json.dumps({"rows": rows, "verdict": verdict(rows)}, indent=1))
    return out / "study.md"


def _same_config(run: Path, cfg: TrainConfig) -> bool:
    try:
        return json.loads((run / "config.json").read_text()) == cfg.to_dict()
    except (OSError, json.JSONDecodeError):
        return False
