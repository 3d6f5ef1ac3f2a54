"""Which gate pays on this CPU: wall-clock of one MLP block (dense, exact ReLU skip, MGS with low-rank and
grouped gates of several sizes) at a fixed gated density, same inputs, same threads.

    python experiments/gate_cost.py --d-model 128 --d-ff 1024 --tokens 512 --density 0.1

Timing does not depend on how good a gate is, only on its size and on how many neurons it lets through,
so random weights are used and each gate's threshold is set to the logit quantile giving ``density``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dynsparse.gating.modules import GatedMLP, GroupedGate, LowRankGate, ReLUSkipMLP


def _time(fn, x, repeats: int) -> float:
    with torch.no_grad():
        fn(x)  # warm-up (numba compilation)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def measure(d_model=128, d_ff=1024, tokens=512, density=0.1, repeats=20, ranks=(8, 16, 32, 64),
            groups=(8, 16, 32), seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d_ff, d_model, generator=g) / d_model**0.5
    b1 = torch.randn(d_ff, generator=g) * 0.1 - 1.0  # negative bias: ReLU sparsity like a trained block
    w2 = torch.randn(d_model, d_ff, generator=g) / d_ff**0.5
    b2 = torch.zeros(d_model)
    x = torch.randn(tokens, d_model, generator=g)
    dense = torch.nn.Sequential(torch.nn.Linear(d_model, d_ff), torch.nn.ReLU(), torch.nn.Linear(d_ff, d_model))
    with torch.no_grad():
        dense[0].weight.copy_(w1), dense[0].bias.copy_(b1), dense[2].weight.copy_(w2), dense[2].bias.copy_(b2)
        natural = (F.linear(x, w1, b1) > 0).float().mean().item()
    t_dense = _time(dense, x, repeats)
    rows = [{"block": "dense nn.Linear MLP", "density": 1.0, "seconds": t_dense, "vs_dense": 1.0,
             "flops_per_token": 4 * d_model * d_ff}]
    t_skip = _time(ReLUSkipMLP(w1, b1, w2, b2), x, repeats)
    rows.append({"block": "exact ReLU skip", "density": natural, "seconds": t_skip, "vs_dense": t_dense / t_skip,
                 "flops_per_token": int(2 * d_model * d_ff * (1 + natural))})
    gates = [("lowrank", r, LowRankGate(d_model, d_ff, r)) for r in ranks]
    gates += [("grouped", s, GroupedGate(d_model, d_ff, s)) for s in groups]
    for kind, size, gate in gates:
        gate.requires_grad_(False)
        with torch.no_grad():
            logits = gate(x).flatten()
        thr = logits.kthvalue(max(1, int((1 - density) * logits.numel()))).values
        mod = GatedMLP(w1, b1, w2, b2, gate, thr, "relu")
        t = _time(mod, x, repeats)
        rows.append({"block": f"MGS {kind} {'r' if kind == 'lowrank' else 'group'}={size}",
                     "density": mod.last_density, "seconds": t, "vs_dense": t_dense / t,
                     "flops_per_token": int(gate.flops_per_token + mod.last_density * 4 * d_model * d_ff)})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"d_model {a.d_model}, d_ff {a.d_ff}, {a.tokens} tokens, target density {a.density}, {a.threads} thread(s)")
    print("| block | density | ms | speed-up vs dense | FLOPs/token |\n|---|---|---|---|---|")
    for r in measure(a.d_model, a.d_ff, a.tokens, a.density, a.repeats):
        print(f"| {r['block']} | {r['density']:.1%} | {r['seconds'] * 1e3:.2f} | {r['vs_dense']:.2f}x | {r['flops_per_token']} |")
