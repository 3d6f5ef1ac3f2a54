"""SmolLM2-135M (the built-in real model) at 30 / 50 / 70 / 90 % MLP sparsity: which neurons to skip, and
who can predict them.

Every method is measured on the same held-out windows (the start of the built-in Shakespeare test
split: Macbeth) by its perplexity, the increase over the dense model and the mean KL(dense || sparse)
of the next-token distributions, with the active fraction and FLOPs its MLP blocks measured while
running. 0 % is the dense model for every method (tested in tests/test_gating_*.py).

* oracle, contribution: per token the top neurons by |act(g_j) u_j| * ||W_down[:, j]|| (top-k), or
  per layer those above a threshold calibrated on calibration text (threshold): the ceiling.
* oracle, CATS criterion: per-token top-k by |act(g_j)|; its per-layer threshold is the CATS row.
* CATS: dense gate projection, |act(g)| > t_l, sparse up/down (no training), compensation off / on.
* SIBS: static slicing of the least often active neurons, activity = contribution or cats.
* MGS: low-rank and grouped gates trained to predict the contribution-active set (all three
  projections skipped for the rest), compensation on / off. Gates train at ``--train-targets``;
  other targets re-calibrate the nearest trained gate's threshold (``recalibrate_``, no retraining).
  The low-bit gate (``--bits``-bit copies of the gate and up projections score each neuron's
  contribution; ``gating.lowbit``) is not trained, so it is fitted at every target.

Calibration: ``--calib-windows`` windows of ``--seq-len`` tokens spread evenly over the training plays,
recorded once; every threshold, statistic and label set is derived from those rows.

    .venv/bin/python experiments/smollm2_sparsity.py --out docs/results/smollm2_sparsity
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dynsparse import find_mlps
from dynsparse.data import prepare_tokens, text_source
from dynsparse.eval.divergence import dense_reference, evaluate_against
from dynsparse.gating import (
    CATSConfig,
    GateSet,
    MGSConfig,
    SIBSConfig,
    apply_gates,
    derive_stats,
    fit_gates,
    oracle_mlp,
    record_activations,
)
from dynsparse.gating.mgs import recalibrate_
from dynsparse.lm import resolve_model


def calib_batches(tokens: np.ndarray, windows: int, seq_len: int, batch_size: int) -> list[dict]:
    """``windows`` windows spread evenly over the training split, in batches."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, windows).astype(np.int64)
    rows = [np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]
    return [{"input_ids": torch.from_numpy(np.stack(rows[i:i + batch_size]))} for i in range(0, windows, batch_size)]


@contextmanager
def swapped(model, modules: dict):
    """Install ``modules`` (block name -> module) in place of the dense MLP blocks, then restore them."""
    blocks = find_mlps(model)
    try:
        for name, mod in modules.items():
            blocks[name].replace(mod)
        yield model
    finally:
        for block in blocks.values():
            block.replace(block.owner)


@contextmanager
def gated(model, gates: GateSet):
    blocks = find_mlps(model)
    try:
        apply_gates(model, gates, backend="reference")  # the definition; the fast paths are tested equal to it
        yield model
    finally:
        for block in blocks.values():
            block.replace(block.owner)


def without_compensation(gates: GateSet) -> GateSet:
    """The same gates with skipped neurons contributing zero."""
    tensors = {n: {k: v for k, v in ts.items() if k != "compensation"} for n, ts in gates.tensors.items()}
    return GateSet(gates.method, {**gates.config, "compensate": False}, gates.layers, tensors, gates.report)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--targets", default="0.3,0.5,0.7,0.9")
    p.add_argument("--train-targets", default="0.3,0.5", help="MGS gates train here; other targets re-calibrate")
    p.add_argument("--compensation-targets", default="0.3,0.5", help="targets that also get the other compensation setting")
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=200, help="MGS training steps")
    p.add_argument("--gate-batch", type=int, default=256, help="MGS rows per training step")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--gates", default="lowrank,grouped,lowbit", help="MGS gate forms to measure")
    p.add_argument("--bits", type=int, default=3, help="the low-bit gate's bits per weight")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    train_targets = [float(t) for t in args.train_targets.split(",")]
    comp_targets = [float(t) for t in args.compensation_targets.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    from transformers import AutoModelForCausalLM

    model_dir = resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    data = prepare_tokens(text_source("shakespeare"), tokenizer_dir=str(model_dir))
    blocks = find_mlps(model)
    calib = calib_batches(data.splits["train"], args.calib_windows, args.seq_len, args.batch_size)

    t = time.perf_counter()
    rows = record_activations(model, calib, max_samples=args.calib_windows * args.seq_len)
    timings["record"] = time.perf_counter() - t
    t = time.perf_counter()
    contribution = derive_stats(blocks, rows, "contribution", targets)
    timings["calibrate_contribution"] = time.perf_counter() - t
    t = time.perf_counter()
    cats = derive_stats(blocks, rows, "cats", targets, keep_samples=False)
    timings["calibrate_cats"] = time.perf_counter() - t
    sign_sparsity = sum(s.sparsity for s in rows.values()) / len(rows)

    t = time.perf_counter()
    ref = dense_reference(model, data.splits["test"], args.seq_len, args.batch_size, max_windows=args.eval_windows)
    timings["dense_reference"] = time.perf_counter() - t
    results = [{"method": "dense", "target": 0.0, "perplexity": ref.perplexity, "perplexity_increase": 0.0,
                "kl_to_dense": 0.0, "ff_active_fraction": 1.0, "tokens": ref.tokens}]
    print(f"dense perplexity {ref.perplexity:.2f} on {ref.tokens} held-out tokens", flush=True)

    def record(method: str, target: float, result: dict, **extra) -> None:
        row = {"method": method, "target": target, **result, **extra}
        results.append(row)
        print(f"{method:<34} {target:.0%}: ppl {row['perplexity']:8.2f} ({row['perplexity_increase']:+8.1%})  "
              f"KL {row['kl_to_dense']:.4f}  active {row['ff_active_fraction']:.1%}", flush=True)
        (out / "results.json").write_text(json.dumps({"settings": vars(args), "timings_s": timings,
                                                      "results": results}, indent=1))

    def oracle(criterion: str, target: float, selection: str):
        mods = {}
        for name, b in blocks.items():
            thr = contribution[target][name].threshold if selection == "threshold" else None
            mods[name] = oracle_mlp(b, "silu", criterion, target, selection, thr)
        return mods

    trained: dict[tuple, GateSet] = {}
    for target in targets:
        for criterion, selection in (("contribution", "topk"), ("contribution", "threshold"), ("cats", "topk")):
            with swapped(model, oracle(criterion, target, selection)):
                record(f"oracle {criterion} {selection}", target, evaluate_against(model, ref))
        for comp in ([False, True] if target in comp_targets else [False]):
            gates = fit_gates(model, CATSConfig(target, compensate=comp), stats=cats[target], progress=False)
            with gated(model, gates):
                record(f"CATS{' +comp' if comp else ''}", target, evaluate_against(model, ref))
        for activity, stats in (("contribution", contribution), ("cats", cats)):
            for comp in ([True, False] if target in comp_targets and activity == "contribution" else [True]):
                cfg = SIBSConfig(target_sparsity=target, activity=activity, compensate=comp)
                gates = fit_gates(model, cfg, stats=stats[target], progress=False)
                with gated(model, gates):
                    record(f"SIBS {activity}{' +comp' if comp else ''}", target, evaluate_against(model, ref))
        for gate in args.gates.split(","):
            if gate == "lowbit":
                cfg = MGSConfig(gate=gate, bits=args.bits, target_sparsity=target, activity="contribution",
                                max_samples=args.calib_windows * args.seq_len)
                t = time.perf_counter()
                gates = fit_gates(model, cfg, stats=contribution[target], progress=False)
                timings[f"mgs_{gate}_{target}"] = time.perf_counter() - t
                how = "calibrated"
            elif target in train_targets:
                cfg = MGSConfig(gate=gate, rank=args.rank, group_size=args.group_size, target_sparsity=target,
                                activity="contribution", steps=args.steps, batch_size=args.gate_batch,
                                max_samples=args.calib_windows * args.seq_len)
                t = time.perf_counter()
                gates = fit_gates(model, cfg, stats=contribution[target])
                timings[f"mgs_{gate}_{target}"] = time.perf_counter() - t
                trained[(gate, target)] = gates
                how = "trained"
            else:
                source = min(train_targets, key=lambda s: abs(s - target))
                gates = copy.deepcopy(trained[(gate, source)])
                recalibrate_(gates, contribution[target], target_sparsity=target)
                how = f"re-calibrated from {source:.0%}"
            recall = sum(r["recall"] for r in gates.report.values()) / len(gates.report)
            for comp in ([True, False] if target in comp_targets else [True]):
                with gated(model, gates if comp else without_compensation(gates)):
                    record(f"MGS {gate}{' +comp' if comp else ''}", target, evaluate_against(model, ref),
                           gate=how, holdout_recall=recall)
    timings["total"] = time.perf_counter() - t_all
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "timings_s": timings,
                                                  "sign_sparsity": sign_sparsity, "results": results}, indent=1))
    write_table(out, results, targets, args, timings, sign_sparsity, ref)
    return 0


def write_table(out: Path, results: list[dict], targets, args, timings, sign_sparsity: float, ref) -> None:
    methods = list(dict.fromkeys(r["method"] for r in results if r["method"] != "dense"))
    cell = {(r["method"], r["target"]): r for r in results}
    lines = ["# SmolLM2-135M: MLP sparsity by method", "",
             f"Dense perplexity **{ref.perplexity:.2f}** on {ref.tokens:,} held-out tokens (the first "
             f"{args.eval_windows} windows of {args.seq_len} tokens of the built-in Shakespeare test split: Macbeth). "
             f"Calibration: {args.calib_windows} windows of {args.seq_len} tokens spread over the training plays. "
             f"By the sign criterion (act(gate) > 0) the dense MLPs are {sign_sparsity:.1%} 'sparse'.", "",
             "Each cell: perplexity increase over dense / mean KL(dense || sparse) per token / measured MLP "
             "active fraction. 0 % is the dense model for every method.", "",
             "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |", "|---|" + "---:|" * len(targets)]
    for m in methods:
        cells = []
        for t in targets:
            r = cell.get((m, t))
            cells.append("-" if r is None else
                         f"{r['perplexity_increase']:+.1%} / {r['kl_to_dense']:.3f} / {r['ff_active_fraction']:.0%}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "MGS gates: " + ", ".join(sorted({f"{r['method']} at {r['target']:.0%}: {r['gate']}"
                                                  for r in results if "gate" in r})) + ".", "",
              "Pipeline seconds on this machine (shared 2-core CPU): " +
              ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".", "",
              "Command: `.venv/bin/python experiments/smollm2_sparsity.py " +
              " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()) + "`", ""]
    tmp = out / "README.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out / "README.md")


if __name__ == "__main__":
    raise SystemExit(main())
