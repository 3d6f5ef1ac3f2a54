"""Batch-1 greedy decode through FastDecoder (compiled, static KV cache) of a converted tree model with its
TreeFF layers on numba, then on the C++ walk, alternating twice, and of the dense model; one process, the
same threads, 64 tokens after a 16-token prompt, median of 3 runs each.

    .venv/bin/python experiments/tree_decode_ab.py TREE_DIR [--threads 1] > out.txt
"""
from __future__ import annotations

import argparse
import time

import torch

from dynsparse.decode import FastDecoder
from dynsparse.lm import resolve_model
from dynsparse.lm.convert import load_model


def tokens_per_s(model, ids, new: int = 64) -> float:
    torch._dynamo.reset()
    dec = FastDecoder(model, ids.shape[1] + new + 16, compile_prefill=False)
    dec.generate(ids, 8)  # compile
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        dec.generate(ids, new)
        times.append(time.perf_counter() - t0)
    return new / sorted(times)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tree_dir")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 40000, (1, 16), generator=torch.Generator().manual_seed(0))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        tree = load_model(args.tree_dir).to(dtype).eval()
        layers = [m for m in tree.modules() if type(m).__name__ == "TreeFF"]
        for backend in ("numba", "cpp", "numba", "cpp"):
            for m in layers:
                m.backend = backend
            print(f"{name} tree, TreeFF on {backend}: {tokens_per_s(tree, ids):.1f} tokens/s", flush=True)
        dense = load_model(str(resolve_model("smollm2-135m"))).to(dtype).eval()
        print(f"{name} dense: {tokens_per_s(dense, ids):.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
