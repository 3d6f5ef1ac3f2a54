"""Issue 14 in the fine-tuning protocol: does routing starve subtrees when a pretrained model's activations
drive it? Trees converted from SmolLM2's MLPs (`dynsparse convert`, distilled or at the published init) are
fine-tuned with the LM loss, only the trees training, and the held-out probe of `dynsparse study autoprune`
(dynamics/probe.py) measures every tree layer on the same held-out windows before the first step and at
every snapshot: dead and static nodes, path entropy, majority-sign share, gradient ratio.

    .venv/bin/python experiments/autoprune_finetune.py --converted DIR [--converted DIR2 ...] --out OUT

Writes OUT/<name>/ (the training run and its probe.jsonl) and OUT/summary.json / summary.md: per model, the
layer-mean probe values at every snapshot, and the first and last snapshot per layer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dynsparse.atomic import atomic_write_text
from dynsparse.data import eval_windows, prepare_tokens, text_source
from dynsparse.dynamics.probe import probe
from dynsparse.dynamics.study_report import layer_mean
from dynsparse.train import TrainConfig, train
from dynsparse.train.telemetry import append_jsonl, read_jsonl

KEYS = ("dead_fraction", "static_fraction", "path_entropy", "effective_leaves", "majority_share", "grad_ratio_rms")


def finetune_config(converted: Path, args) -> TrainConfig:
    """The fine-tuning of docs/results/smollm2_tree_finetune/run.sh, with a snapshot every ``probe_every`` steps."""
    return TrainConfig(
        ff="tree", init_from=str(converted), tokenizer=str(converted), trainable="ff", data=args.data,
        seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps, lr=args.lr, warmup_steps=args.warmup,
        eval_every=args.steps, eval_batches=4, telemetry_every=args.probe_every, ckpt_every=args.steps,
        keep_checkpoints=1, log_every=args.probe_every)


def heldout(cfg: TrainConfig, windows: int):
    """The first ``windows`` test windows of the corpus in the model's own tokenizer (never trained on)."""
    data = prepare_tokens(text_source(cfg.data), cfg.bpe_vocab_size, cfg.tokenizer, cfg.cache_dir)
    x, y = eval_windows(data.splits["test"], cfg.seq_len, windows)
    if len(x) < windows:
        raise SystemExit(f"the test split holds only {len(x)} windows of {cfg.seq_len} tokens")
    return x, y


def summarise(out: Path, names: list[str]) -> dict:
    summary = {}
    for name in names:
        rows = {r["step"]: r["layers"] for r in read_jsonl(out / name / "probe.jsonl")}
        steps = sorted(rows)
        first, last = rows[steps[0]], rows[steps[-1]]
        metrics = json.loads((out / name / "final" / "metrics.json").read_text())
        summary[name] = {
            "steps": steps,
            "series": {k: [layer_mean(rows[s], k) for s in steps] for k in KEYS},
            "per_layer": {layer: {k: [first[layer][k], last[layer][k]] for k in KEYS} for layer in first},
            "val_loss": metrics["val_loss"], "train_seconds": metrics["train_seconds"],
        }
    lines = ["# Held-out routing of trees converted from SmolLM2, through fine-tuning", "",
             "Layer means (gradient ratio: geometric mean) at the first and last snapshot.", "",
             "| model | steps | dead | static | path entropy | eff. leaves | majority share | grad ratio +/- |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        cell = lambda k, d=3: f"{s['series'][k][0]:.{d}f} → {s['series'][k][-1]:.{d}f}"  # noqa: E731
        lines.append(f"| {name} | {s['steps'][0]} → {s['steps'][-1]} | {cell('dead_fraction')} | "
                     f"{cell('static_fraction')} | {cell('path_entropy')} | {cell('effective_leaves', 1)} | "
                     f"{cell('majority_share')} | {cell('grad_ratio_rms', 2)} |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--converted", type=Path, action="append", required=True, help="a `dynsparse convert` folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--probe-every", type=int, default=10)
    ap.add_argument("--heldout-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=4)
    args = ap.parse_args()
    names = []
    for converted in args.converted:
        cfg = finetune_config(converted, args)
        x, y = heldout(cfg, args.heldout_windows)
        run = args.out / converted.name
        names.append(converted.name)
        if (run / "final" / "metrics.json").exists():
            continue  # finished: reused

        def on_snapshot(step, model, run=run):
            append_jsonl(run / "probe.jsonl", {"step": step, "layers": probe(model, x, y, args.batch_size)})

        train(cfg, run, resume=(run / "config.json").exists(), progress=False, tensorboard=False,
              on_snapshot=on_snapshot)
    print((args.out / "summary.md").read_text() if summarise(args.out, names) else "")


if __name__ == "__main__":
    main()
