"""The dense-vs-tree comparison table (terminal, via rich) and ``report.md`` with its figures."""
from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import plots

ROWS = [  # (label, key, format)
    ("val loss (nats/token)", "val_loss", "{:.4f}"),
    ("val perplexity", "val_ppl", "{:.2f}"),
    ("FF active fraction", "ff_active_fraction", "{:.2%}"),
    ("FF FLOPs / token / block", "ff_flops_per_token", "{:,.0f}"),
    ("train tokens / s", "tokens_per_s", "{:,.0f}"),
    ("dead-node fraction (val)", "dead_fraction", "{:.2%}"),
    ("path entropy (val)", "path_entropy", "{:.3f}"),
    ("parameters", "params", "{:,}"),
    ("train seconds", "train_seconds", "{:.1f}"),
]


def _fmt(fmt: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def verdict(dense: dict, tree: dict, max_gap: float = 0.03, max_active: float = 0.05) -> dict:
    gap = tree["val_loss"] / dense["val_loss"] - 1
    return {"loss_gap": gap, "active_fraction": tree["ff_active_fraction"],
            "loss_ok": gap <= max_gap, "active_ok": tree["ff_active_fraction"] < max_active,
            "max_gap": max_gap, "max_active": max_active}


def verdict_line(v: dict) -> str:
    ok = v["loss_ok"] and v["active_ok"]
    return (f"tree val loss is {v['loss_gap']:+.2%} vs dense (target <= {v['max_gap']:.0%}) at an FF active "
            f"fraction of {v['active_fraction']:.2%} (target < {v['max_active']:.0%}): "
            f"{'target met' if ok else 'target NOT met'}")


def print_table(results: dict[str, dict], data: str = "shakespeare", console: Console | None = None) -> None:
    table = Table(title=f"dense vs tree FF on {data} (validation split)")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for label, key, fmt in ROWS:
        table.add_row(label, *(_fmt(fmt, r.get(key)) for r in results.values()))
    (console or Console()).print(table)


def write_report(out: Path, results: dict[str, dict], settings: dict, v: dict, histories: dict[str, list[dict]],
                 telemetry: list[dict], tree_layers: dict[str, dict], command: str) -> Path:
    """report.md plus loss_curves.png, routing_training.png and node_usage.png, next to it."""
    figures = [("Loss curves", plots.loss_curves(histories, out / "loss_curves.png"))]
    if telemetry:
        figures.append(("Tree routing over training", plots.routing_over_training(telemetry, out / "routing_training.png")))
    if tree_layers:
        figures.append(("Final node usage on validation text", plots.node_usage_heatmap(tree_layers, out / "node_usage.png")))
    lines = ["# dynsparse compare: dense vs tree feed-forward blocks", "",
             f"Command: `{command}`", "", f"**{verdict_line(v)}**", "",
             "| metric | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for label, key, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(_fmt(fmt, r.get(key)) for r in results.values()) + " |")
    lines += ["", "Validation loss and perplexity are measured on the validation split (whole held-out plays for "
              "the built-in Shakespeare) "
              f"({settings.get('val_tokens', '?'):,} tokens); FF active fraction, FLOPs and routing statistics are "
              "measured from the tree layers' routing counts on the same text (per FF block, mean over blocks). "
              "Tokens/s is wall-clock training throughput on this machine, for the execution path named below.",
              "", "## Settings", "", "```"]
    lines += [f"{k}: {val}" for k, val in settings.items()]
    lines += ["```", ""]
    for title, path in figures:
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    report = out / "report.md"
    tmp = report.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(report)
    return report
