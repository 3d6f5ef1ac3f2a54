"""Issue 14's early routing collapse: what drives it, and whether transforming the tree input prevents it.

Short runs of the auto-pruning study's tiny tree LM (same shape, data, optimiser and held-out probe as
``dynsparse study autoprune``), probed every few steps. Besides the routing health, the probe reports the tree
input's anisotropy (the share of its energy in the direction all tokens share), the effective rank of its
spread, the node weights' alignment with the shared direction and each node's offset ratio |E z| / sd z,
split into the part the shared input direction puts there and the part the bias does.

The fixes are forward pre-hooks on every tree layer, installed before the first step (RunningCentre): the
layer sees its input centred (``centre``), centred and rescaled (``standardise``) or centred and whitened
(``whiten``) with statistics of earlier training batches, never the current one (so no token sees the
others') and never updated in evaluation or in the probe. They hold no parameters; their statistics are a
hook's state, not in the checkpoint, so these runs are never resumed (a killed one is started again).

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/autoprune_collapse.py \\
        --out docs/results/autoprune_collapse
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dynsparse.dynamics.probe import hooked, probe
from dynsparse.dynamics.study import VARIANTS, StudySpec, heldout_set, run_name
from dynsparse.train.loop import train
from dynsparse.train.telemetry import append_jsonl, read_jsonl, tree_layers

FIXES = ("none", "centre", "standardise", "whiten")
SERIES = ("dead_fraction", "static_fraction", "path_entropy", "majority_share", "input_anisotropy",
          "input_effective_rank", "w_in_mean_cos", "offset_ratio",
          "offset_ratio_mean_part", "offset_ratio_bias_part")


class RunningCentre:
    """Forward pre-hook on a tree layer: transform its input with running statistics of earlier training
    batches' inputs (exponential moving averages; the current batch's never enter its own transform).

    ``centre``: x - m. ``standardise``: (x - m) / s, s the RMS spread about m over tokens and features.
    ``whiten``: (x - m) C^-1/2 with C the spread's covariance, its eigenvalues floored by ``floor`` times their
    mean so that directions the tokens hardly differ in are not blown up to full size."""

    def __init__(self, mode: str, momentum: float, floor: float = 1e-2, eps: float = 1e-5):
        if mode not in FIXES[1:]:
            raise ValueError(f"mode must be one of {FIXES[1:]}, got {mode!r}")
        self.mode, self.momentum, self.floor, self.eps = mode, momentum, floor, eps
        self.mean = self.cov = self.transform = None

    def __call__(self, module, args):
        x = args[0]
        mean, transform = self.mean, self.transform
        if module.training and torch.is_grad_enabled():  # training steps only, after reading the old stats
            flat = x.detach().reshape(-1, x.shape[-1])
            m = flat.mean(0)
            c = (flat - m).T @ (flat - m) / flat.shape[0]
            a = 1.0 - self.momentum
            self.mean, self.cov = (m, c) if self.mean is None else (self.mean.lerp(m, a), self.cov.lerp(c, a))
            self.transform = self._transform(self.cov)
        if mean is None:
            return None
        x = x - mean
        return (x if transform is None else x @ transform, *args[1:])

    def _transform(self, cov):
        if self.mode == "centre":
            return None
        if self.mode == "standardise":
            return torch.eye(len(cov), dtype=cov.dtype) * torch.rsqrt(cov.diagonal().mean() + self.eps)
        lam, vec = torch.linalg.eigh(cov.double())
        lam = lam.clamp_min(self.floor * lam.mean().clamp_min(0.0) + self.eps)
        return ((vec * lam.rsqrt()) @ vec.T).to(cov.dtype)


def train_counts(spec: StudySpec) -> np.ndarray:
    """How often each token id occurs in the training split."""
    from dynsparse.data import prepare_tokens, text_source

    cfg = spec.config(*spec.cells()[0])
    data = prepare_tokens(text_source(cfg.data), cfg.bpe_vocab_size, cfg.tokenizer, cfg.cache_dir)
    return np.bincount(np.asarray(data.splits["train"]).reshape(-1), minlength=data.vocab_size)


def _pc1(rows: np.ndarray):
    """Shares of the spread in the top principal components, and every row's score on the first."""
    centred = rows - rows.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return (s**2 / (s**2).sum())[:3].tolist(), centred @ vt[0]


def _explained(score: np.ndarray, groups: np.ndarray, keep: np.ndarray) -> float:
    """Share of the variance of ``score`` (over the rows ``keep``) that the group means explain."""
    score, groups = score[keep], groups[keep]
    means = np.bincount(groups, weights=score) / np.maximum(np.bincount(groups), 1)
    return float(1.0 - np.var(score - means[groups]) / np.var(score))


def explain(model, x: torch.Tensor, counts: np.ndarray, batch: int) -> dict:
    """Where the tokens' spread lies. Per tree layer, on the held-out rows and as the layer sees them: the top
    principal components' shares of the spread of its input; of its first component, the share that token
    identity (ids seen >= 10 times) and position explain, and its correlation with the token's log training
    frequency. The same for the token embeddings over the vocabulary."""
    caps, layers = {}, tree_layers(model)

    def hook_for(name):
        return lambda m, a, o: caps.setdefault(name, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))

    rows = (len(x) // batch) * batch
    with hooked(model, layers, hook_for), torch.no_grad():
        for i in range(0, rows, batch):
            model(input_ids=x[i : i + batch], use_cache=False)
    ids = x[:rows].reshape(-1).numpy()
    pos = np.tile(np.arange(x.shape[1]), rows)
    logf = np.log(counts[ids] + 1.0)
    common = np.bincount(ids, minlength=len(counts))[ids] >= 10
    out = {}
    for name, chunks in caps.items():
        shares, score = _pc1(torch.cat(chunks).double().numpy())
        out[name] = {"pc_shares": shares, "pc1_token_share": _explained(score, ids, common),
                     "pc1_position_share": _explained(score, pos, np.ones_like(common)),
                     "pc1_logfreq_r": float(np.corrcoef(score, logf)[0, 1])}
    emb = model.get_input_embeddings().weight.detach().double().numpy()[: len(counts)]
    seen = counts > 0
    shares, score = _pc1(emb[seen])
    out["embeddings"] = {"pc_shares": shares, "pc1_logfreq_r": float(np.corrcoef(score, np.log(counts[seen]))[0, 1])}
    return out


def run_one(spec: StudySpec, cell: tuple, fix: str, momentum: float, runs: Path, heldout, counts,
            explain_steps=()) -> list[dict]:
    """Train one cell fresh (or reuse a finished one); returns its probe records and explain records."""
    run = runs / fix / run_name(*cell)
    done = run / "final" / "metrics.json"
    if done.exists() and (run / "probe.jsonl").exists():
        return read_jsonl(run / "probe.jsonl"), _read_optional(run / "explain.jsonl")
    if run.exists():
        shutil.rmtree(run)  # a killed run of this experiment: the running mean is not in its checkpoint
    x, y = heldout

    def on_snapshot(step, model):
        if step == 0 and fix != "none":
            for layer in tree_layers(model).values():
                layer.register_forward_pre_hook(RunningCentre(fix, momentum))
        append_jsonl(run / "probe.jsonl", {"step": step, "layers": probe(model, x, y, spec.batch_size)})
        if step in explain_steps:
            append_jsonl(run / "explain.jsonl", {"step": step, **explain(model, x, counts, spec.batch_size)})

    train(spec.config(*cell), run, progress=False, tensorboard=False, on_snapshot=on_snapshot)
    return read_jsonl(run / "probe.jsonl"), _read_optional(run / "explain.jsonl")


def _read_optional(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def series_of(records: list[dict]) -> dict:
    """Per-step values averaged over the tree layers, plus each layer's own dead fraction and anisotropy."""
    steps = [r["step"] for r in records]
    out = {"steps": steps}
    for key in SERIES:
        out[key] = [float(np.nanmean([l[key] for l in r["layers"].values()])) for r in records]
    out["root_majority_share"] = [float(np.mean([abs(s - 0.5) + 0.5 for l in r["layers"].values()
                                                 for s in l["root_positive_share"]])) for r in records]
    out["balance_by_depth"] = [np.nanmean([l["balance_by_depth"] for l in r["layers"].values()], axis=0).tolist()
                               for r in records]
    out["per_layer"] = {name: {k: [r["layers"][name][k] for r in records] for k in
                               ("dead_fraction", "input_anisotropy", "input_effective_rank", "offset_ratio",
                                "w_in_mean_cos")}
                        for name in records[0]["layers"]}
    return out


def at(series: dict, key: str, step: int) -> float:
    return series[key][series["steps"].index(step)] if step in series["steps"] else math.nan


def summarise(results: list[dict], steps: list[int]) -> list[dict]:
    """Per (fix, variant, lr): mean, min and max over seeds of the key series at the given steps."""
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["fix"], r["variant"], r["lr"]), []).append(r)
    rows = []
    for (fix, variant, lr), rs in sorted(groups.items()):
        row = {"fix": fix, "variant": variant, "lr": lr, "seeds": [r["seed"] for r in rs],
               "val_loss": [r["val_loss"] for r in rs]}
        for key in ("dead_fraction", "input_anisotropy", "offset_ratio", "offset_ratio_mean_part",
                    "offset_ratio_bias_part", "w_in_mean_cos", "root_majority_share"):
            for s in steps:
                vals = [at(r["series"], key, s) for r in rs]
                row[f"{key}@{s}"] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)),
                                     "max": float(np.max(vals))}
        row["explain"] = explain_summary(rs)
        row["peak_dead"] = [max(r["series"]["dead_fraction"]) for r in rs]
        row["peak_dead_step"] = [r["series"]["steps"][int(np.argmax(r["series"]["dead_fraction"]))] for r in rs]
        row["peak_anisotropy_step"] = [r["series"]["steps"][int(np.argmax(r["series"]["input_anisotropy"]))]
                                       for r in rs]
        rows.append(row)
    return rows


def explain_summary(rs: list[dict]) -> dict:
    """Per explained step: the principal-component measures, mean [min, max] over seeds (tree layers averaged)."""
    out = {}
    steps = sorted({e["step"] for r in rs for e in r["explain"]})
    for step in steps:
        recs = [e for r in rs for e in r["explain"] if e["step"] == step]
        layers = [{k: v for k, v in e.items() if k not in ("step", "embeddings")} for e in recs]
        vals = {
            "pc1_share": [np.mean([l["pc_shares"][0] for l in ls.values()]) for ls in layers],
            "pc1_token_share": [np.mean([l["pc1_token_share"] for l in ls.values()]) for ls in layers],
            "pc1_position_share": [np.mean([l["pc1_position_share"] for l in ls.values()]) for ls in layers],
            "embedding_pc1_share": [e["embeddings"]["pc_shares"][0] for e in recs],
            "embedding_pc1_logfreq_abs_r": [abs(e["embeddings"]["pc1_logfreq_r"]) for e in recs],  # sign: arbitrary
        }
        out[str(step)] = {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                          for k, v in vals.items()}
    return out


def tracking(results: list[dict]) -> dict:
    """How closely the dead fraction follows the anisotropy and the offset ratio over time (baseline runs,
    per layer): Pearson correlation over all snapshots pooled, and the median of the per-run correlations."""
    out = {}
    per_layer = ("input_anisotropy", "input_effective_rank", "offset_ratio", "w_in_mean_cos")
    for key in per_layer + ("offset_ratio_mean_part", "offset_ratio_bias_part"):
        pooled_x, pooled_y, per_run = [], [], []
        for r in results:
            if r["fix"] != "none":
                continue
            for layer in r["series"]["per_layer"].values() if key in per_layer else [None]:
                xs = np.array(layer[key] if layer else r["series"][key], float)
                ys = np.array(layer["dead_fraction"] if layer else r["series"]["dead_fraction"], float)
                ok = np.isfinite(xs) & np.isfinite(ys)
                pooled_x += xs[ok].tolist()
                pooled_y += ys[ok].tolist()
                if ok.sum() > 2:
                    per_run.append(float(np.corrcoef(xs[ok], ys[ok])[0, 1]))
        out[key] = {"pooled_r": float(np.corrcoef(pooled_x, pooled_y)[0, 1]) if len(pooled_x) > 2 else math.nan,
                    "median_run_r": float(np.median(per_run)) if per_run else math.nan, "n_points": len(pooled_x)}
    # least squares over the pooled per-layer points: how much of the dead fraction the anisotropy and the
    # log effective rank explain, alone and together (R^2)
    rows = [(a, math.log(e), dead) for r in results if r["fix"] == "none" for l in r["series"]["per_layer"].values()
            for a, e, dead in zip(l["input_anisotropy"], l["input_effective_rank"], l["dead_fraction"])
            if math.isfinite(a) and math.isfinite(e) and e > 0]
    if len(rows) > 3:
        data = np.array(rows)
        for name, cols in (("anisotropy", [0]), ("log_effective_rank", [1]), ("both", [0, 1])):
            design = np.column_stack([np.ones(len(data)), data[:, cols]])
            coef, *_ = np.linalg.lstsq(design, data[:, 2], rcond=None)
            resid = data[:, 2] - design @ coef
            out[f"r2_{name}"] = {"r2": float(1 - resid.var() / data[:, 2].var()), "coef": coef.tolist()}
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("dead_fraction", "dead nodes (held-out)"), ("input_anisotropy", "tree-input anisotropy"),
            ("input_effective_rank", "effective rank of the spread"),
            ("offset_ratio", "node offset |E z| / sd z (median)"),
            ("offset_ratio_mean_part", "  part from w . mean(x)"),
            ("offset_ratio_bias_part", "  part from b_in"), ("root_majority_share", "root majority share")]
    cells = sorted({(r["variant"], r["lr"]) for r in results})
    fig, axes = plt.subplots(len(keys), len(cells), figsize=(4 * len(cells), 2.4 * len(keys)), squeeze=False,
                             sharex=True)
    colours = {"none": "tab:red", "centre": "tab:orange", "standardise": "tab:blue", "whiten": "tab:green"}
    for j, (variant, lr) in enumerate(cells):
        for i, (key, label) in enumerate(keys):
            ax = axes[i][j]
            for fix in FIXES:
                rs = [r for r in results if (r["variant"], r["lr"], r["fix"]) == (variant, lr, fix)]
                if not rs:
                    continue
                steps = rs[0]["series"]["steps"]
                vals = np.array([r["series"][key] for r in rs], float)
                ax.plot(steps, vals.mean(0), color=colours[fix], label=f"fix={fix} (n={len(rs)})")
                ax.fill_between(steps, vals.min(0), vals.max(0), color=colours[fix], alpha=0.2, lw=0)
            if key.startswith("offset") or key == "input_effective_rank":
                ax.set_yscale("log")
            if i == 0:
                ax.set_title(f"{variant}, lr {lr:g}")
            if j == 0:
                ax.set_ylabel(label)
            if i == len(keys) - 1:
                ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Early routing collapse: mean over seeds, band = min-max", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_tracking(results: list[dict], path: Path) -> None:
    """Baseline runs, every layer and snapshot: dead fraction against the input's anisotropy and the
    effective rank of its spread, coloured by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "input_anisotropy", "tree-input anisotropy"),
                           (axes[1], "input_effective_rank", "effective rank of the tree input's spread")):
        for r in results:
            if r["fix"] != "none":
                continue
            for layer in r["series"]["per_layer"].values():
                sc = ax.scatter(layer[key], layer["dead_fraction"], c=r["series"]["steps"], cmap="viridis", s=6,
                                vmin=0, vmax=max(r["series"]["steps"]))
        ax.set_xlabel(label)
    axes[1].set_xscale("log")
    axes[0].set_ylabel("dead nodes (held-out)")
    fig.colorbar(sc, ax=axes, label="step")
    fig.suptitle("No fix: every layer, snapshot, variant, lr and seed", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def floats(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of floats, got {text!r}") from None


def ints(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


def names(choices):
    def parse(text: str) -> tuple:
        bad = [v for v in text.split(",") if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {sorted(choices)}")
        return tuple(text.split(","))
    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="where the JSON, plot and table go")
    ap.add_argument("--runs", type=Path, default=Path("runs/autoprune_collapse"), help="run directories")
    ap.add_argument("--variants", type=names(VARIANTS), default=("node-gelu", "path-gelu"))
    ap.add_argument("--lrs", type=floats, default=(3e-3, 1e-3))
    ap.add_argument("--seeds", type=ints, default=(0, 1))
    ap.add_argument("--fixes", type=names(FIXES), default=FIXES)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup-steps", type=int, default=50, help="absolute, as in the 1000-step study (5 %%)")
    ap.add_argument("--probe-every", type=int, default=10)
    ap.add_argument("--momentum", type=float, default=0.0,
                    help="momentum of the fixes' running statistics (0: the previous training batch's)")
    ap.add_argument("--explain-steps", type=ints, default=(0, 20, 50, 100, 300),
                    help="snapshots at which to measure where the spread lies (principal components)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not 0 <= args.momentum < 1:
        ap.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.steps < args.probe_every or args.probe_every < 1 or args.threads < 1:
        ap.error("need --probe-every >= 1, --steps >= --probe-every and --threads >= 1")
    if not 0 <= args.warmup_steps <= args.steps // 2:
        ap.error(f"--warmup-steps must be in [0, {args.steps // 2}], got {args.warmup_steps}")
    torch.set_num_threads(args.threads)
    spec = StudySpec(variants=args.variants, lrs=args.lrs, seeds=args.seeds, max_steps=args.steps,
                     warmup_frac=args.warmup_steps / args.steps, probe_every=args.probe_every, eval_batches=2)
    heldout = heldout_set(spec)
    counts = train_counts(spec)
    results, t0 = [], time.perf_counter()
    for fix in args.fixes:
        for cell in spec.cells():
            t1 = time.perf_counter()
            records, explained = run_one(spec, cell, fix, args.momentum, args.runs, heldout, counts,
                                         set(args.explain_steps))
            metrics = json.loads((args.runs / fix / run_name(*cell) / "final" / "metrics.json").read_text())
            series = series_of(records)
            results.append({"fix": fix, "variant": cell[0], "lr": cell[1], "seed": cell[4],
                            "val_loss": metrics["val_loss"], "series": series, "explain": explained})
            print(f"[{fix}] {run_name(*cell)}: dead@100 {at(series, 'dead_fraction', 100):.3f}, "
                  f"dead@{args.steps} {series['dead_fraction'][-1]:.3f}, val {metrics['val_loss']:.3f} "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)
    wall = time.perf_counter() - t0
    report_steps = sorted({0, 20, 50, 100, 200, args.steps} & set(results[0]["series"]["steps"]))
    summary = {"command": " ".join(sys.argv), "wall_s_this_invocation": round(wall, 1),  # reused runs cost ~0 "spec": spec.base(), "momentum": args.momentum,
               "rows": summarise(results, report_steps), "tracking": tracking(results), "runs": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "collapse.json").write_text(json.dumps(summary, indent=1))
    plot(results, args.out / "collapse.png")
    if any(r["fix"] == "none" for r in results):
        plot_tracking(results, args.out / "tracking.png")
    for row in summary["rows"]:
        d = {s: row[f"dead_fraction@{s}"] for s in report_steps}
        print(f"{row['fix']:6s} {row['variant']:10s} lr {row['lr']:g}: " + ", ".join(
            f"dead@{s} {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]" for s, v in d.items()))
    print("tracking (baseline):", json.dumps(summary["tracking"]))
    print(f"wall {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
