"""Would a neuron order make the kept rows of a sparsified SmolLM2 contiguous? Mean run length of kept
neurons per token, in the natural order, in a co-activation order (``gating.reorder``, groups of 32) and by
firing frequency, each fitted on the first tokens of the calibration text and measured on the rest.

A skipping walk reads memory more slowly than a dense stream (``kept_walk_layout.cpp``); longer runs of
kept neurons would bring it closer. Prints one line per layer and writes the table as JSON.

    .venv/bin/python experiments/kept_runs.py --sparsified runs/lowbit5 --calib docs/results/smollm2_decode/calib.txt --out FILE.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dynsparse.gating.api import load_sparsified
from dynsparse.gating.reorder import coactivation_permutation
from dynsparse.lm import resolve_model


def mean_run(mask: torch.Tensor) -> float:
    """Mean length of the runs of consecutive kept neurons, over tokens (rows)."""
    starts = (torch.diff(F.pad(mask.int(), (1, 1)), dim=1) == 1).sum(1).float()
    return (mask.sum(1) / starts.clamp(min=1)).mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsified", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--tokens", type=int, default=600)
    p.add_argument("--fit-tokens", type=int, default=400)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    model = load_sparsified(args.sparsified).eval()
    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m")))
    ids = tok(Path(args.calib).read_text(), return_tensors="pt").input_ids[:, :args.tokens]
    xs = {}
    layers = model.model.layers
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: xs.__setitem__(i, a[0][0].float()))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    rows = []
    for i, layer in enumerate(layers):
        mask = layer.mlp.gate_mask(xs[i])
        fit, test = mask[:args.fit_tokens], mask[args.fit_tokens:]
        freq = fit.float().mean(0)
        row = {"layer": i, "kept_share": test.float().mean().item(), "natural": mean_run(test),
               "coactivation": mean_run(test[:, coactivation_permutation(fit, 32)]),
               "by_frequency": mean_run(test[:, torch.argsort(freq, descending=True)]),
               "kept_on_over_90pct": int((freq > 0.9).sum()), "kept_on_under_10pct": int((freq < 0.1).sum())}
        rows.append(row)
        print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    Path(args.out).write_text(json.dumps({"settings": vars(args), "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
