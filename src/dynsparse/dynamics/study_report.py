"""Tables and plots of an auto-pruning study folder: every finished cell, seed spread shown everywhere.

Values come from the held-out probe (probe.jsonl), averaged over layers (the gradient ratio as a
geometric mean); a cell's spread is the mean, standard deviation and min-max over its seeds.
"""
from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_write_text  # noqa: E402
from ..train.telemetry import read_jsonl  # noqa: E402
from .study import MODIFIERS, PROBE_FILE, VARIANTS  # noqa: E402

KEYS = ("dead_fraction", "static_fraction", "path_entropy", "effective_leaves", "majority_share",
        "positive_share", "grad_ratio_rms")
LOG_KEYS = ("grad_ratio_rms",)
PLOTTED = ("dead_fraction", "static_fraction", "path_entropy", "majority_share", "grad_ratio_rms", "val_loss")


def variant_of(cfg: dict) -> str | None:
    """The variant name of a run's config (its base, then the modifiers it has on)."""
    mods = "".join(f"+{m}" for m, on in MODIFIERS.items() if all(cfg.get(k, False) == v for k, v in on.items()))
    for name, v in VARIANTS.items():
        if cfg["activation"] == v["activation"] and cfg["act_position"] == v["act_position"]:
            return name + mods
    return None


def variant_order(name: str) -> tuple:
    """Modifier set first, then the base variants in their table order."""
    base, _, mods = name.partition("+")
    return (mods, list(VARIANTS).index(base))


def layer_mean(layers: dict, key: str) -> float:
    """One probe snapshot's value of ``key`` averaged over tree layers (a geometric mean for the gradient ratio)."""
    vals = [l[key] for l in layers.values() if l[key] is not None and not math.isnan(l[key])]
    if not vals:
        return math.nan
    return float(np.exp(np.mean(np.log(vals)))) if key in LOG_KEYS else float(np.mean(vals))


def load_run(run: Path) -> dict | None:
    """One finished cell: its grid position, final metrics and probe series (None if unfinished)."""
    if not (run / "final" / "metrics.json").exists() or not (run / PROBE_FILE).exists():
        return None
    cfg = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    by_step = {r["step"]: r["layers"] for r in read_jsonl(run / PROBE_FILE)}  # a resumed run's repeat wins
    steps = sorted(s for s in by_step if s <= cfg["max_steps"])
    series = {k: [layer_mean(by_step[s], k) for s in steps] for k in KEYS}
    val = {r["step"]: r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r}
    series["val_loss"] = [val.get(s, math.nan) for s in steps]
    last = by_step[steps[-1]]
    depth_balance = np.nanmean([l["balance_by_depth"] for l in last.values()], axis=0).tolist()
    depth_majority = np.nanmean([l["majority_share_by_depth"] for l in last.values()], axis=0).tolist()
    return {"run": run.name, "variant": variant_of(cfg), "lr": cfg["lr"], "depth": cfg["depth"],
            "trees": cfg["trees"], "seed": cfg["seed"], "val_loss": metrics["val_loss"], "steps": steps,
            "series": series, "final": {k: series[k][-1] for k in KEYS},
            "peak_dead": float(np.nanmax(series["dead_fraction"])), "balance_by_depth": depth_balance,
            "majority_by_depth": depth_majority,
            "recompute_max_abs_diff": max(l["recompute_max_abs_diff"] for r in by_step.values() for l in r.values())}


def load_runs(out: Path) -> list[dict]:
    runs = [load_run(p) for p in sorted(Path(out).iterdir()) if (p / "config.json").exists()]
    return [r for r in runs if r is not None and r["variant"] is not None]


def spread(values) -> dict:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if not len(v):
        return {"n": 0, "mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan}
    return {"n": int(len(v)), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def fmt(s: dict, digits: int = 3) -> str:
    if s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def cells(runs: list[dict]) -> dict[tuple, list[dict]]:
    grouped = defaultdict(list)
    for r in runs:
        grouped[(r["variant"], r["lr"], r["depth"], r["trees"])].append(r)
    return dict(sorted(grouped.items(), key=lambda kv: (kv[0][2], kv[0][3], variant_order(kv[0][0]), kv[0][1])))


def cell_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for (variant, lr, depth, trees), group in cells(runs).items():
        row = {"variant": variant, "lr": lr, "depth": depth, "trees": trees, "seeds": sorted(r["seed"] for r in group),
               "val_loss": spread([r["val_loss"] for r in group]), "peak_dead": spread([r["peak_dead"] for r in group])}
        row.update({k: spread([r["final"][k] for r in group]) for k in KEYS})
        rows.append(row)
    return rows


def plot_cells(runs: list[dict], path: Path, title: str) -> None:
    """Trajectories per variant: mean over seeds, band = min-max over seeds."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    with warnings.catch_warnings():  # the loss has no value at step 0: an all-NaN column is expected
        warnings.simplefilter("ignore", RuntimeWarning)
        for (variant, lr, depth, trees), group in cells(runs).items():
            steps = group[0]["steps"]
            for ax, key in zip(axes.flat, PLOTTED):
                vals = np.array([r["series"][key][: len(steps)] for r in group if len(r["series"][key]) >= len(steps)])
                mean = np.exp(np.nanmean(np.log(vals), 0)) if key in LOG_KEYS else np.nanmean(vals, 0)
                style = "--" if "+" in variant else "-"  # modified variants dashed beside their base
                line, = ax.plot(steps, mean, style, label=f"{variant} (n={len(vals)})")
                if len(vals) > 1:
                    ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=line.get_color(), alpha=0.2)
    for ax, key in zip(axes.flat, PLOTTED):
        ax.set_title(key.replace("_", " ") + (" (log)" if key in LOG_KEYS else ""))
        ax.set_xlabel("step")
        if key in LOG_KEYS:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_lr_sweep(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    by_variant = defaultdict(list)
    for r in rows:
        by_variant[(r["variant"], r["depth"], r["trees"])].append(r)
    for (variant, depth, trees), rs in by_variant.items():
        rs = sorted(rs, key=lambda r: r["lr"])
        for ax, key in zip(axes, ("val_loss", "dead_fraction", "path_entropy")):
            ax.errorbar([r["lr"] for r in rs], [r[key]["mean"] for r in rs], yerr=[r[key]["sd"] for r in rs],
                        marker="o", capsize=3, label=f"{variant} d{depth} t{trees}")
    for ax, key in zip(axes, ("val_loss", "dead_fraction", "path_entropy")):
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_title(f"final {key.replace('_', ' ')} (± sd over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(fig, path)


def plot_depth_profile(runs: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for (variant, lr, depth, trees), group in cells(runs).items():
        for ax, key in zip(axes, ("balance_by_depth", "majority_by_depth")):
            vals = np.array([r[key] for r in group], dtype=float)
            ax.errorbar(range(vals.shape[1]), np.nanmean(vals, 0), yerr=np.nanstd(vals, 0), marker="o", capsize=2,
                        label=variant)
    axes[0].set_title("final routing balance by depth (1 = even split)")
    axes[1].set_title("final majority-sign share by depth")
    for ax in axes:
        ax.set_xlabel("depth")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(fig, path)


def verdict(final_rows: list[dict]) -> str:
    """Whether node-GELU ends with clearly more dead held-out nodes than GELU after the path (beyond seed
    spread), per shape and per modifier set (plain, +whiten, ...) that holds both."""
    by = {(r["variant"], r["depth"], r["trees"]): r for r in final_rows}
    sentences = []
    for (variant, depth, trees), g_row in by.items():
        base, plus, mods = variant.partition("+")
        other = ("path-gelu" + plus + mods, depth, trees)
        if base != "node-gelu" or other not in by:
            continue
        g, p = g_row["dead_fraction"], by[other]["dead_fraction"]
        clear = g["min"] > p["max"] and g["mean"] - p["mean"] > 0.05
        sentences.append(
            ("Auto-pruning shows" if clear else "Auto-pruning does not clearly show") +
            f" (depth {depth}, {trees} tree{'s' if trees != 1 else ''}{', ' + mods if mods else ''}): node-GELU ends with {g['mean']:.1%} dead "
            f"held-out nodes (seeds {g['min']:.1%}-{g['max']:.1%}), GELU after the path with {p['mean']:.1%} "
            f"({p['min']:.1%}-{p['max']:.1%}).")
    return " ".join(sentences) or "Run both node-gelu and path-gelu to compare the auto-pruning form with its remedy."


def write_report(out: str | Path, best_lr: float | None = None, prune_rows: list[dict] | None = None) -> Path:
    out = Path(out)
    runs = load_runs(out)
    if not runs:
        raise ValueError(f"{out} holds no finished study runs")
    rows = cell_rows(runs)
    lines = ["# Auto-pruning study", "",
             "Every value is measured on the same held-out validation rows at every snapshot, averaged over layers "
             "(gradient ratio: geometric mean). Cells show mean ± sd [min, max] over seeds.", "",
             "## All cells (final snapshot)", "",
             "| variant | lr | depth | trees | seeds | val loss | dead | peak dead | static | entropy | eff. leaves "
             "| majority share | grad ratio +/- |", "|---|---:|---:|---:|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['lr']:g} | {r['depth']} | {r['trees']} | {r['seeds']} | "
                     f"{fmt(r['val_loss'])} | {fmt(r['dead_fraction'])} | {fmt(r['peak_dead'])} | "
                     f"{fmt(r['static_fraction'])} | {fmt(r['path_entropy'])} | {fmt(r['effective_leaves'], 1)} | "
                     f"{fmt(r['majority_share'])} | {fmt(r['grad_ratio_rms'], 2)} |")
    plot_lr_sweep(rows, out / "lr_sweep.png")
    lines += ["", "![learning-rate sweep](lr_sweep.png)", ""]
    final_rows = rows
    if best_lr is not None:
        final_runs = [r for r in runs if r["lr"] == best_lr]
        final_rows = [r for r in rows if r["lr"] == best_lr]
        lines += [f"## Comparison at the best learning rate ({best_lr:g})", "", verdict(final_rows), ""]
        shapes = sorted({(r["depth"], r["trees"]) for r in final_runs})
        for depth, trees in shapes:  # one figure per tree shape: a shape's curves are not comparable to another's
            suffix = "" if len(shapes) == 1 else f"_d{depth}_t{trees}"
            shape_runs = [r for r in final_runs if (r["depth"], r["trees"]) == (depth, trees)]
            plot_cells(shape_runs, out / f"trajectories{suffix}.png",
                       f"held-out probe at lr {best_lr:g}, depth {depth}, {trees} tree{'s' if trees != 1 else ''} "
                       "(band: min-max over seeds)")
            plot_depth_profile(shape_runs, out / f"depth_profile{suffix}.png")
            shape = f"depth {depth}, {trees} tree{'s' if trees != 1 else ''}"
            lines += [f"![trajectories, {shape}](trajectories{suffix}.png)", "",
                      f"![depth profile, {shape}](depth_profile{suffix}.png)", ""]
    prune_rows = folder_prune_rows(out, runs) or prune_rows
    if prune_rows:
        lines += ["## Static conversion (`dynsparse prune`) of the final models", "",
                  "| run | nodes before → after | params removed | tree FLOPs/token before → after (held-out) | "
                  "val loss before → after |", "|---|---:|---:|---:|---:|"]
        for p in prune_rows:
            lines.append(f"| {p['run']} | {p['nodes_before']} → {p['nodes_after']} | {p['params_removed']} "
                         f"({p['params_removed'] / p['params_before']:.1%}) | {p['flops_per_token_before']} → "
                         f"{p['flops_per_token_after']:.0f} | {p['val_loss_before']:.4f} → {p['val_loss_after']:.4f} |")
        lines.append("")
    atomic_write_text(out / "study.md", "\n".join(lines))
    atomic_write_text(out / "study.json", json.dumps(
        {"best_lr": best_lr, "cells": rows, "prune": prune_rows or [], "verdict": verdict(final_rows),
         "runs": [{k: v for k, v in r.items() if k != "series"} for r in runs]}, indent=1, default=float))
    return out / "study.md"


def folder_prune_rows(out: Path, runs: list[dict]) -> list[dict]:
    """Every `dynsparse prune` report in the folder's pruned/, for the finished runs it holds: a folder
    filled by several invocations reports all of them."""
    by_name = {r["run"]: r for r in runs}
    rows = []
    for report in sorted((out / "pruned").glob("*/prune_report.json")):
        run = by_name.get(report.parent.name)
        result = json.loads(report.read_text())
        if run is not None and "flops_per_token_after" in result:
            rows.append({"run": run["run"], "variant": run["variant"], "seed": run["seed"], **result})
    return rows


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
