"""One decode token through every linear layer of SmolLM2-135M: torch's F.linear against dynsparse::gemv.

    python experiments/gemv_bench.py [--threads 2] [--decode] [--json OUT]

Per layer kind (q/k/v/o projections, gate/up/down, the tied head), each of the 30 layers' real weights once
per pass (so they come from memory, not cache), median of 5 passes; then the gate shape at 1-15 tokens.
``--decode`` adds whole-model greedy decoding (``FastDecoder``, 16-token prompt, 32 new tokens, median of
3) with linears="torch" and "gemv", eager and compiled. Run it alone on the machine: both paths are bound
by memory bandwidth."""
from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np
import torch
import torch.nn.functional as F


def median_s(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    from dynsparse.bench.generate import copy_gbps
    from dynsparse.lm.convert import load_model
    from dynsparse.lm.pretrained import resolve_model
    from dynsparse.ops._numba import sync_threads
    from dynsparse.ops.dense import gemv

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sync_threads()
    model = load_model(str(resolve_model("smollm2-135m"))).eval()
    kinds = collections.defaultdict(list)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            kinds[name.split(".")[-1]].append(m.weight.detach())
    paths = {"torch": lambda x, w: F.linear(x, w), "gemv": lambda x, w: gemv(x, w, backend="numba")}
    rows = []
    with torch.no_grad():
        for kind, ws in kinds.items():
            x = torch.randn(1, ws[0].shape[1])
            row = {"kind": kind, "shape": list(ws[0].shape), "layers": len(ws)}
            for path, fn in paths.items():
                s = median_s(lambda: [fn(x, w) for w in ws])
                row[f"{path}_us"] = 1e6 * s / len(ws)
                row[f"{path}_gbps"] = sum(w.numel() * 4 for w in ws) / s / 1e9
            rows.append(row)
            print(f"{kind:10s} {str(tuple(row['shape'])):14s} torch {row['torch_us']:8.1f} us {row['torch_gbps']:5.1f} GB/s"
                  f"   gemv {row['gemv_us']:8.1f} us {row['gemv_gbps']:5.1f} GB/s")
        tokens = []
        for m in (1, 2, 4, 8, 15):
            x = torch.randn(m, kinds["gate_proj"][0].shape[1])
            t = {p: 1e3 * median_s(lambda: [fn(x, w) for w in kinds["gate_proj"]]) for p, fn in paths.items()}
            tokens.append({"tokens": m, "torch_ms": t["torch"], "gemv_ms": t["gemv"]})
            print(f"gate_proj x30 at {m:2d} tokens: torch {t['torch']:6.2f} ms, gemv {t['gemv']:6.2f} ms")
    decode = []
    if args.decode:
        from dynsparse.decode import FastDecoder

        ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
        for compiled in (False, True):
            for linears in ("torch", "gemv"):
                m = load_model(str(resolve_model("smollm2-135m"))).eval()
                dec = FastDecoder(m, 16 + 33, compile=compiled, compile_prefill=False, linears=linears)
                t = time.perf_counter()
                dec.warm_up(16)
                warm = time.perf_counter() - t

                def tok_s():
                    dec.generate(ids, 32, eos_token_id=None)
                    return dec.timing["decode_tokens"] / dec.timing["decode_s"]

                rate = float(np.median([tok_s() for _ in range(3)]))
                decode.append({"compiled": compiled, "linears": linears, "tokens_per_s": rate, "warm_up_s": warm})
                print(f"decode {'compiled' if compiled else 'eager':8s} {linears:5s}: {rate:5.1f} tok/s (warm-up {warm:.0f} s)")
                torch._dynamo.reset()
    bw = copy_gbps(1024)
    print(f"copy bandwidth {bw:.1f} GB/s, {args.threads} threads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "tokens": tokens, "decode": decode, "copy_gbps": bw, "threads": args.threads}, f, indent=1)


if __name__ == "__main__":
    main()
