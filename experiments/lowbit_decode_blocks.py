"""One decode token through SmolLM2's 30 MLP blocks: dense (torch linears, and dynsparse's C++ gemv) against
CATS (dynsparse_cpp::gate_skip_mlp) and the low-bit MGS gate (dynsparse_cpp::lowbit_gate_mlp), same inputs.

Each block gets its own real input (the dense model's MLP input at the last prompt token); the table is the
median over ``--repeats`` passes of the 30 blocks, fp32 tables, 2 threads, eager calls: through the modules
(their Python forward included), and of the registered ops alone (what a compiled decode graph calls).

    .venv/bin/python experiments/lowbit_decode_blocks.py --cats DIR --lowbit DIR --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from dynsparse.bench.timing import median_time
from dynsparse.gating.api import load_sparsified
from dynsparse.lm import resolve_model
from dynsparse.ops.dense import gemv
from dynsparse.ops.mlp import gate_skip_mlp
from dynsparse.ops.mlp.lowbit import lowbit_gate_mlp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cats", required=True)
    p.add_argument("--lowbit", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model("smollm2-135m")
    dense = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok("The king hath happily received, Macbeth, the news of thy success", return_tensors="pt").input_ids
    xs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: xs.__setitem__(i, a[0][0, -1:].contiguous()))
             for i, layer in enumerate(dense.model.layers)]
    with torch.no_grad():
        dense(ids)
    for h in hooks:
        h.remove()
    n = len(dense.model.layers)
    sparse = {name: load_sparsified(path) for name, path in (("cats", args.cats), ("lowbit", args.lowbit))}

    def blocks(model):
        return [model.model.layers[i].mlp for i in range(n)]

    def run_modules(mods):
        def f():
            with torch.no_grad():
                for i, m in enumerate(mods):
                    m(xs[i])
        return f

    def run_gemv():
        mlps = blocks(dense)
        ws = [(m.gate_proj.weight.detach(), m.up_proj.weight.detach(), m.down_proj.weight.detach()) for m in mlps]

        def f():
            with torch.no_grad():
                for i, (wg, wu, wd) in enumerate(ws):
                    h = gemv(xs[i], wg, activation="silu") * gemv(xs[i], wu, activation="identity")
                    gemv(h, wd, activation="identity")
        return f

    def run_ops(name):
        mods = blocks(sparse[name])
        if name == "cats":
            calls = [(gate_skip_mlp, (xs[i], m.weights, m.threshold), m.activation) for i, m in enumerate(mods)]
        else:
            calls = [(lowbit_gate_mlp, (xs[i], m.weights, m.gate.tables(), m.threshold), m.activation)
                     for i, m in enumerate(mods)]

        def f():
            with torch.no_grad():
                for op, a, act in calls:
                    op(*a, activation=act, backend="cpp")
        return f

    rows = {"dense torch linears": median_time(run_modules(blocks(dense)), 3, args.repeats),
            "dense gemv (cpp)": median_time(run_gemv(), 3, args.repeats),
            "CATS (gate_skip_mlp, cpp)": median_time(run_modules(blocks(sparse["cats"])), 3, args.repeats),
            "MGS lowbit (lowbit_gate_mlp, cpp)": median_time(run_modules(blocks(sparse["lowbit"])), 3, args.repeats),
            "CATS, op calls only": median_time(run_ops("cats"), 3, args.repeats),
            "MGS lowbit, op calls only": median_time(run_ops("lowbit"), 3, args.repeats)}
    # the outputs against the dense blocks, and the measured kept share of the low-bit gate
    errs = {}
    with torch.no_grad():
        for name, model in sparse.items():
            e = [(F.mse_loss(m(xs[i]), d(xs[i])) / d(xs[i]).pow(2).mean()).item()
                 for i, (m, d) in enumerate(zip(blocks(model), blocks(dense)))]
            errs[name] = statistics.mean(e)
        kept = []
        for i, m in enumerate(blocks(sparse["lowbit"])):
            kept.append(m.gate_mask(xs[i].float()).float().mean().item())
    out = {"settings": vars(args), "seconds_per_token_30_blocks": rows,
           "speedup_vs_dense_gemv": {k: rows["dense gemv (cpp)"] / v for k, v in rows.items()},
           "mean_relative_block_error": errs, "lowbit_kept_share": statistics.mean(kept)}
    Path(args.out).write_text(json.dumps(out, indent=1))
    for k, v in rows.items():
        print(f"{k:<36} {v * 1e3:7.2f} ms  {rows['dense gemv (cpp)'] / v:5.2f}x vs gemv")
    print("block errors", errs, "lowbit kept", out["lowbit_kept_share"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
