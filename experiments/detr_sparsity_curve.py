"""AP vs MLP activation sparsity of the built-in DETR: dense, exact ReLU skip, SIBS and MGS.

    python experiments/detr_sparsity_curve.py --out runs/detr_curve    # table (markdown + JSON) and PNG

All runs use the same val images, batch size and post-processing (score threshold 0, all queries kept,
original sizes). Calibration uses train images only. MGS gates are trained once per block and their
thresholds re-calibrated for each target recall (``dynsparse.gating.mgs.recalibrate_``).
SIBS runs with both neuron-selection criteria (firing frequency, the paper's; and output error).
Sparsity: SIBS = share of neurons removed; MGS = share of (token, neuron) pairs the gates switched off,
counted during the val run; ReLU skip = the model's natural sparsity (a = 0) on the calibration images.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

from dynsparse.gating.plots import plot_quality_vs_sparsity


def run(out_dir: str | os.PathLike, coco_root: str | os.PathLike | None = None, model_dir=None, n_calib: int = 256,
        n_val: int | None = None, batch_size: int = 8, rank: int = 16, verbose: bool = False) -> list[dict]:
    from dynsparse.gating import MGSConfig, SIBSConfig, apply_gates, fit_gates, record_activations
    from dynsparse.gating.mgs import recalibrate_
    from dynsparse.gating.modules import GatedMLP, ReLUSkipMLP
    from dynsparse.mlps import find_mlps
    from dynsparse.detection.coco import CocoDetection, make_collate
    from dynsparse.detection.evaluate import evaluate_detr
    from dynsparse.detection.model import load_detr
    from dynsparse.detection.synthetic import default_synthetic_root

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(coco_root) if coco_root is not None else default_synthetic_root()
    dense, proc = load_detr(model_dir)
    val = CocoDetection(root, "val", limit=n_val)
    calib_ds = CocoDetection(root, "train", limit=n_calib)
    collate = make_collate(proc, with_labels=False)
    calib = [collate([calib_ds[j] for j in range(i, min(i + batch_size, len(calib_ds)))])
             for i in range(0, len(calib_ds), batch_size)]
    blocks = find_mlps(dense)
    names = list(blocks)
    d, d_ff = blocks[names[0]].d_model, blocks[names[0]].d_ff
    dense_flops = 4 * d * d_ff
    stats = record_activations(dense, calib, max_samples=16384)
    natural = sum(s.sparsity * s.n_tokens for s in stats.values()) / sum(s.n_tokens for s in stats.values())
    rows = []

    def evaluate(model, method, sparsity, flops, extra=None):
        timing = {}
        st = evaluate_detr(model, proc, val, batch_size=batch_size, verbose=verbose, timing=timing, mlp_names=names)
        row = {"method": method, "sparsity": sparsity, "AP": st["AP"], "AP50": st["AP50"], "AP75": st["AP75"],
               "mlp_flops_per_token": flops, "mlp_seconds": timing["mlp_seconds"],
               "model_seconds": timing["model_seconds"], **(extra or {})}
        rows.append(row)

    def warm(model):  # numba kernels compile on first call: keep that out of the timings
        with torch.no_grad():
            model(pixel_values=calib[0]["pixel_values"], pixel_mask=calib[0]["pixel_mask"])

    evaluate(dense, "dense", 0.0, dense_flops)
    m = copy.deepcopy(dense)
    for n, b in find_mlps(m).items():
        b.replace(ReLUSkipMLP(*[t.detach() if t is not None else None for t in b.linear_weights()]))
    warm(m)
    evaluate(m, "ReLU skip (exact)", natural, int(dense_flops / 2 * (1 + (1 - natural))))
    for criterion in ("frequency", "output_error"):
        for target in (0.3, 0.5, 0.7, 0.8, 0.9):
            m = copy.deepcopy(dense)
            g = fit_gates(m, SIBSConfig(target_sparsity=target, criterion=criterion), stats=stats)
            apply_gates(m, g)
            sp = sum(r["removed_fraction"] for r in g.report.values()) / len(g.report)
            evaluate(m, "SIBS" + (" output-error" if criterion == "output_error" else ""), sp,
                     int(dense_flops * (1 - sp)))
    mgs = fit_gates(dense, MGSConfig(rank=rank), stats=stats)
    gate_flops = next(iter(mgs.report.values()))["gate_flops_per_token"]
    for recall in (0.999, 0.99, 0.97, 0.95, 0.9, 0.8, 0.7):
        recalibrate_(mgs, stats, target_recall=recall)
        m = copy.deepcopy(dense)
        apply_gates(m, mgs)
        warm(m)
        mods = [mod for mod in m.modules() if isinstance(mod, GatedMLP)]
        for x in mods:
            x.computed = x.total = 0
        evaluate(m, f"MGS r={rank}", None, None, {"target_recall": recall})
        density = sum(x.computed for x in mods) / sum(x.total for x in mods)
        rep = mgs.report.values()
        rows[-1].update({"sparsity": 1 - density, "mlp_flops_per_token": int(gate_flops + density * dense_flops),
                         "holdout_recall": sum(r["recall"] for r in rep) / len(rep),
                         "holdout_precision": sum(r["precision"] for r in rep) / len(rep)})
    for r in rows:
        print(json.dumps(r), flush=True)
    meta = {"coco_root": str(root), "val_images": len(val), "calib_images": len(calib_ds), "batch_size": batch_size,
            "natural_sparsity": natural, "threads": torch.get_num_threads(), "d_model": d, "d_ff": d_ff,
            "mlp_blocks": len(names)}
    (out_dir / "detr_sparsity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| method | MLP sparsity | AP | AP50 | AP75 | MLP FLOPs/token | MLP s | model s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["method"] + (f" (recall {r['target_recall']})" if "target_recall" in r else "")
        lines.append(f"| {name} | {r['sparsity']:.1%} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | "
                     f"{r['mlp_flops_per_token']} | {r['mlp_seconds']:.2f} | {r['model_seconds']:.2f} |")
    (out_dir / "detr_sparsity.md").write_text(
        f"Built-in DETR, {len(val)} val images, batch {batch_size}, {torch.get_num_threads()} thread(s); "
        f"natural ReLU sparsity {natural:.1%}\n\n" + "\n".join(lines) + "\n")
    _plot(rows, out_dir / "detr_sparsity.png")
    return rows


def _plot(rows, path):
    dense = next(r for r in rows if r["method"] == "dense")
    plot_quality_vs_sparsity(rows, "AP", "COCO AP (val)", "Built-in DETR: AP vs MLP sparsity", path,
                             reference=dense["AP"], reference_label=f"dense AP {dense['AP']:.3f}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="AP vs MLP sparsity (dense, ReLU skip, SIBS, MGS) for a DETR")
    ap.add_argument("--out", default="runs/detr_curve")
    ap.add_argument("--coco", default=None, help="COCO-format root (default: the built-in synthetic set)")
    ap.add_argument("--model", default=None, help="DETR model dir (default: the built-in one)")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--n-val", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run(a.out, a.coco, a.model, a.n_calib, a.n_val, a.batch_size, a.rank)
