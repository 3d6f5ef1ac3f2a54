"""Which cheap predictor can rank SmolLM2's MLP neurons by contribution? Block-level error of each, per layer.

For a few layers, the dense model's MLP inputs on calibration text are split into fitting and held-out rows.
Each predictor scores every neuron; the block keeps each token's top (1 - sparsity) share by that score and
drops the rest; the cell is the held-out mean of ||y - y_kept||^2 / ||y||^2 (the block's output error).

* oracle: the true contribution |silu(g) u| * ||W_down[:, j]||; cats: |silu(g)| (exact gate projection).
* lowrank-gate rank r: a rank-r least-squares fit of g alone, scored |silu(g~)| (what the low-rank MGS gate
  starts from).
* factored rank r: a rank-r reduced-rank regression of [g, u] on x (one shared projection), scored by the
  contribution formula from the predicted g~, u~.
* exact-gate rank r: the exact g with a rank-r fit of u (costs a dense gate projection, as CATS).
* lowbit b: b-bit min-max copies of W_gate and W_up (groups of 32 inputs, input channels scaled by
  rms(x)^0.5, the int8-rounded input): the low-bit MGS gate of ``dynsparse.gating.lowbit``.

    .venv/bin/python experiments/predictor_study.py --out docs/results/smollm2_sparsity/predictor_study.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dynsparse.data import prepare_tokens, text_source
from dynsparse.gating.lowbit import LowBitGate
from dynsparse.lm import resolve_model

from smollm2_sparsity import calib_batches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", default="2,8,15,22,28")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--holdout", type=int, default=768)
    p.add_argument("--ranks", default="32,64,128")
    p.add_argument("--bits", default="1,2,3")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model_dir = resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    data = prepare_tokens(text_source("shakespeare"), tokenizer_dir=str(model_dir))
    layers = [int(v) for v in args.layers.split(",")]
    inputs = {l: [] for l in layers}
    hooks = [model.model.layers[l].mlp.register_forward_pre_hook(
        lambda m, a, l=l: inputs[l].append(a[0].reshape(-1, a[0].shape[-1]).detach())) for l in layers]
    with torch.no_grad():
        for batch in calib_batches(data.splits["train"], args.windows, args.seq_len, 4):
            model(**batch)
    for h in hooks:
        h.remove()
    results = {}
    for l in layers:
        x = torch.cat(inputs[l]).double()
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        hold, fit = perm[:args.holdout], perm[args.holdout:]
        mlp = model.model.layers[l].mlp
        wg, wu, wd = (m.weight.detach().double() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        nd, d_ff = wd.norm(dim=0), wg.shape[0]
        g, u = x @ wg.T, x @ wu.T
        h = F.silu(g) * u
        y = h[hold] @ wd.T

        def error(score: torch.Tensor, sparsity: float) -> float:
            s = score[hold]
            keep = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(d_ff - int(sparsity * d_ff), 1).indices, True)
            return ((((h[hold] * keep) @ wd.T) - y).pow(2).sum(1) / y.pow(2).sum(1)).mean().item()

        def rank_fit(target: torch.Tensor, r: int) -> torch.Tensor:
            coef = torch.linalg.lstsq(x[fit], target[fit]).solution
            v = torch.linalg.svd(x[fit] @ coef, full_matrices=False).Vh[:r].T
            return x @ coef @ v @ v.T

        scores = {"oracle": h.abs() * nd, "cats": F.silu(g).abs()}
        for r in (int(v) for v in args.ranks.split(",")):
            scores[f"lowrank-gate rank {r}"] = F.silu(rank_fit(g, r)).abs()
            gu = rank_fit(torch.cat([g, u], 1), r)
            scores[f"factored rank {r}"] = (F.silu(gu[:, :d_ff]) * gu[:, d_ff:]).abs() * nd
            scores[f"exact-gate rank {r}"] = (F.silu(g) * rank_fit(u, r)).abs() * nd
        for b in (int(v) for v in args.bits.split(",")):
            gate = LowBitGate.fit(wg.float(), None, wu.float(), None, nd.float(), x[fit].float(), b, 32, 0.5, "silu")
            with torch.no_grad():
                scores[f"lowbit {b}"] = gate(x.float()).double()
        results[l] = {name: {f"{sp:.0%}": error(s, sp) for sp in (0.3, 0.5)} for name, s in scores.items()}
        print(l, {k: v["50%"] for k, v in results[l].items()}, flush=True)
    out = {"settings": vars(args), "seconds": time.perf_counter() - t0, "block_output_error": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
