"""One decode token through every linear layer of SmolLM2-135M: torch's F.linear against dynsparse::gemv's
numba and cpp backends.

    python experiments/gemv_bench.py [--threads 2] [--dtype fp32|bf16] [--decode] [--json OUT]

Per layer kind (q/k/v/o projections, gate/up/down, the tied head), each of the 30 layers' real weights once
per pass (so they come from memory, not cache), median of 5 passes; then the gate shape at 1-15 tokens; then
the 30 MLP blocks at one token: dense (three F.linear or three gemv calls) and the CATS gate-skip op at 30
and 50 % sparsity (each layer's threshold set on the token itself, so the kept share is exact).
``--decode`` adds whole-model greedy decoding (``FastDecoder``, 16-token prompt, 32 new tokens, median of
3) with linears="torch" and "gemv" (on each of gemv's two kernel backends), eager and compiled. Run it alone
on the machine: every path is bound by memory bandwidth."""
from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from dynsparse.bench.timing import median_time


def median_s(fn):
    return median_time(fn, warmup=1, repeats=5)  # one warm-up call, median of 5 passes


def mlp_rows(model, paths) -> list[dict]:
    """The 30 SwiGLU blocks at one token: dense by each linear path, and gate_skip_mlp on each CPU backend."""
    from dynsparse.ops.mlp import MLPWeights, gate_skip_mlp

    blocks = [layer.mlp for layer in model.model.layers]
    d = blocks[0].gate_proj.in_features
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(0))
    dense_bytes = sum(3 * b.gate_proj.weight.numel() * 4 for b in blocks)
    rows = []
    for path, fn in paths.items():
        def dense():
            for b in blocks:
                fn(F.silu(fn(x, b.gate_proj.weight)) * fn(x, b.up_proj.weight), b.down_proj.weight)
        s = median_s(dense)
        rows.append({"block": "dense", "path": path, "ms": 1e3 * s, "gbps": dense_bytes / s / 1e9})
    weights = [MLPWeights(b.up_proj.weight, None, b.down_proj.weight.t().contiguous(), None,
                          wg=b.gate_proj.weight) for b in blocks]
    gate_acts = [F.silu(F.linear(x, b.gate_proj.weight)).abs() for b in blocks]  # |act(gate)| on the token
    for sparsity in (0.3, 0.5):
        thresholds = [torch.quantile(a, sparsity) for a in gate_acts]
        kept = sum(int((a > t).sum()) for a, t in zip(gate_acts, thresholds))
        sparse_bytes = sum(b.gate_proj.weight.numel() * 4 for b in blocks) + kept * 2 * d * 4
        for backend in ("numba", "cpp"):
            s = median_s(lambda: [gate_skip_mlp(x, w, t, activation="silu", backend=backend)
                                  for w, t in zip(weights, thresholds)])
            rows.append({"block": f"cats {sparsity:.0%}", "path": backend, "ms": 1e3 * s,
                         "gbps": sparse_bytes / s / 1e9, "bytes_ratio": dense_bytes / sparse_bytes})
    for r in rows:
        extra = f"  (bytes allow {r['bytes_ratio']:.2f}x)" if "bytes_ratio" in r else ""
        print(f"30 MLP blocks {r['block']:9s} {r['path']:6s} {r['ms']:6.2f} ms {r['gbps']:5.1f} GB/s{extra}")
    return rows


def main() -> None:
    from dynsparse.bench.generate import copy_gbps
    from dynsparse.lm.convert import load_model
    from dynsparse.lm.pretrained import resolve_model
    from dynsparse.ops._numba import sync_threads
    from dynsparse.ops.dense import gemv

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and activations")
    ap.add_argument("--json")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    sync_threads()
    model = load_model(str(resolve_model("smollm2-135m"))).eval().to(dtype)
    kinds = collections.defaultdict(list)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            kinds[name.split(".")[-1]].append(m.weight.detach())
    paths = {"torch": lambda x, w: F.linear(x, w), "numba": lambda x, w: gemv(x, w, backend="numba"),
             "cpp": lambda x, w: gemv(x, w, backend="cpp")}
    rows = []
    with torch.no_grad():
        for kind, ws in kinds.items():
            x = torch.randn(1, ws[0].shape[1], dtype=dtype)
            row = {"kind": kind, "shape": list(ws[0].shape), "layers": len(ws)}
            for path, fn in paths.items():
                s = median_s(lambda: [fn(x, w) for w in ws])
                row[f"{path}_us"] = 1e6 * s / len(ws)
                row[f"{path}_gbps"] = sum(w.numel() * w.element_size() for w in ws) / s / 1e9
            rows.append(row)
            print(f"{kind:10s} {str(tuple(row['shape'])):14s}" + "".join(
                f"   {p} {row[p + '_us']:8.1f} us {row[p + '_gbps']:5.1f} GB/s" for p in paths))
        tokens = []
        for m in (1, 2, 4, 8, 15):
            x = torch.randn(m, kinds["gate_proj"][0].shape[1], dtype=dtype)
            t = {p: 1e3 * median_s(lambda: [fn(x, w) for w in kinds["gate_proj"]]) for p, fn in paths.items()}
            tokens.append({"tokens": m, **{f"{p}_ms": v for p, v in t.items()}})
            print(f"gate_proj x30 at {m:2d} tokens: " + ", ".join(f"{p} {v:6.2f} ms" for p, v in t.items()))
        mlp = mlp_rows(model, paths) if args.dtype == "fp32" else []  # the MLP and decode rows are fp32 only
    decode = []
    if args.decode:
        from dynsparse.decode import FastDecoder
        from dynsparse.ops import use_backend

        ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
        for compiled in (False, True):
            for linears, backend in (("torch", "auto"), ("gemv", "numba"), ("gemv", "cpp")):
                m = load_model(str(resolve_model("smollm2-135m"))).eval()
                with use_backend(backend):  # resolved while tracing: the compiled graph keeps it
                    dec = FastDecoder(m, 16 + 33, compile=compiled, compile_prefill=False, linears=linears)
                    t = time.perf_counter()
                    dec.warm_up(16)
                    warm = time.perf_counter() - t

                    def tok_s():
                        dec.generate(ids, 32, eos_token_id=None)
                        return dec.timing["decode_tokens"] / dec.timing["decode_s"]

                    rate = float(np.median([tok_s() for _ in range(3)]))
                path = linears if linears == "torch" else f"gemv/{backend}"
                decode.append({"compiled": compiled, "linears": path, "tokens_per_s": rate, "warm_up_s": warm})
                print(f"decode {'compiled' if compiled else 'eager':8s} {path:10s}: {rate:5.1f} tok/s "
                      f"(warm-up {warm:.0f} s)")
                torch._dynamo.reset()
    bw = copy_gbps(1024)
    print(f"copy bandwidth {bw:.1f} GB/s, {args.threads} threads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "tokens": tokens, "mlp": mlp, "decode": decode, "copy_gbps": bw, "threads": args.threads}, f, indent=1)


if __name__ == "__main__":
    main()
