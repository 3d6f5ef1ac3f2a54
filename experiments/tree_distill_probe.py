"""Probe: how well can one SmolLM2 layer's SwiGLU block be fitted by a tree FF, and what limits the fit?

For one layer, the block's inputs on Shakespeare calibration windows are recorded from the dense model and
its outputs computed; a tree of the given shape is then fitted in several ways and its held-out relative
error ||tree(x) - mlp(x)|| / ||mlp(x)|| reported:

* ``adam``: ``dynsparse.lm.distill.distill_layer`` (what ``convert --init distill`` runs) on N tokens;
* ``adam+ls``: the same, then ``w_out`` replaced by its ridge least-squares optimum for the routing and node
  activations the fitted ``w_in``/``b_in`` give (the output is linear in ``w_out`` once they are fixed);
* ``balanced+ls``: no gradient steps: random ``w_in`` with each node's bias set to minus the median of its
  pre-activation over the tokens reaching it (every split halves its tokens), then the least-squares ``w_out``.
* ``balanced+adam``: that balanced start, then the Adam fit of ``adam`` (random init on SmolLM2's hidden
  states leaves about half of each tree's nodes unvisited; does a start that uses every node fit better?);
* ``random``: the published random init itself, before any fitting (a ``balanced`` row is written likewise).

Every row also gives ``dead``: the share of the tree's nodes that no training token reaches.

The calibration windows are spread over the built-in Shakespeare train split; the held-out tokens are its last
``--holdout`` tokens (other plays than most training tokens), the training tokens the first N of the rest.

Usage: python experiments/tree_distill_probe.py --layers 3,15 --tokens 8192,65536 [--trees 8,16,32]
       [--methods adam,adam+ls,balanced+ls,balanced+adam,random] [--inputs-cache FILE.pt] --out probe.jsonl
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from dynsparse import activations
from dynsparse.data import prepare_tokens, text_source
from dynsparse.lm.distill import (DistillConfig, balanced_start, dense_forward, distill_layer, record_inputs,
                                  relative_error)
from dynsparse.lm.pretrained import resolve_model
from dynsparse.mlps import find_mlps
from dynsparse.tree import TreeFF


def path_activations(tree: TreeFF, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(node index (tokens, trees, depth+1) into the flattened trees*nodes table, act(z) at those nodes)."""
    act = activations.get(tree.activation).fn
    w_in, b_in = tree.routing_weights()
    n_tok = x.shape[0]
    idx = torch.zeros(n_tok, tree.trees, dtype=torch.long)
    rows, vals = [], []
    offset = torch.arange(tree.trees) * tree.nodes
    for _ in range(tree.depth + 1):
        w = w_in[torch.arange(tree.trees), idx]  # (tokens, trees, d)
        z = torch.einsum("ntd,nd->nt", w, x) + (0 if b_in is None else b_in[torch.arange(tree.trees), idx])
        rows.append(idx + offset)
        vals.append(act(z))
        idx = 2 * idx + 1 + (z > 0).long()
    return torch.stack(rows, -1), torch.stack(vals, -1)


@torch.no_grad()
def ls_out(tree: TreeFF, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3, chunk: int = 8192) -> None:
    """Set ``w_out`` to argmin ||A w_out - y||^2 + ridge * mean(diag(A^T A)) ||w_out||^2 (A: node activations)."""
    units = tree.trees * tree.nodes
    ata = torch.zeros(units, units, dtype=torch.float64)
    aty = torch.zeros(units, y.shape[1], dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        rows, vals = path_activations(tree, x[i:i + chunk])
        a = torch.zeros(rows.shape[0], units)
        a.scatter_(1, rows.reshape(rows.shape[0], -1), vals.reshape(rows.shape[0], -1))
        ata += (a.T @ a).double()
        aty += (a.T @ y[i:i + chunk]).double()
    lam = ridge * float(ata.diagonal().mean())
    w = torch.linalg.solve(ata + lam * torch.eye(units, dtype=torch.float64), aty)
    tree.w_out.copy_(w.reshape(tree.trees, tree.nodes, -1).to(tree.w_out.dtype))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="3,15")
    p.add_argument("--tokens", default="8192,65536", help="calibration token counts (the largest is recorded)")
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--trees", default="8", help="tree counts to try (comma-separated)")
    p.add_argument("--methods", default="adam,adam+ls,balanced+ls")
    p.add_argument("--inputs-cache", help="a .pt file: the recorded inputs are saved there, or loaded when present")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--holdout", type=int, default=4096, help="held-out tokens (taken from the end of the text)")
    p.add_argument("--ridges", default="1e-3,1e-2", help="least-squares ridge strengths (times mean diag(A^T A))")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM

    path = resolve_model(a.model)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    layers = [int(s) for s in a.layers.split(",")]
    counts = sorted(int(s) for s in a.tokens.split(","))
    ridges = [float(s) for s in a.ridges.split(",")]
    data = prepare_tokens(text_source("shakespeare"), tokenizer_dir=path)
    train_ids = data.splits["train"]
    need = counts[-1] + a.holdout
    stride = max(256, (len(train_ids) // (need // 256)) // 256 * 256)  # windows spread over the whole split
    starts = list(range(0, len(train_ids) - 256, stride))[: need // 256]
    ids = torch.stack([torch.as_tensor(train_ids[s:s + 256]) for s in starts]).long()
    blocks = find_mlps(model)
    names = list(blocks)
    chosen = {names[i]: blocks[names[i]] for i in layers}
    t0 = time.perf_counter()
    cache = Path(a.inputs_cache) if a.inputs_cache else None
    inputs = torch.load(cache, weights_only=True) if cache and cache.is_file() else {}
    if set(inputs) != set(chosen) or any(v.shape[0] != ids.numel() for v in inputs.values()):
        inputs = record_inputs(model, chosen, ids)
        if cache:
            torch.save(inputs, cache.with_suffix(".tmp"))
            cache.with_suffix(".tmp").replace(cache)
    print(f"{ids.numel():,} tokens for {len(chosen)} layers in {time.perf_counter() - t0:.0f} s", flush=True)
    methods = a.methods.split(",")
    with open(a.out, "a") as f:
        for (name, block), layer in zip(chosen.items(), layers):
            x = inputs[name]
            with torch.no_grad():
                y = torch.cat([dense_forward(block, x[i:i + 4096]) for i in range(0, x.shape[0], 4096)])
            xv, yv = x[-a.holdout:], y[-a.holdout:]
            for n, trees in itertools.product(counts, [int(t) for t in a.trees.split(",")]):
                xt, yt = x[:n], y[:n]
                base = dict(layer=layer, tokens=n, tree=f"{trees}x{a.depth}", holdout=a.holdout)

                def emit(method, tree, t, **extra):
                    seconds = round(time.perf_counter() - t, 1)
                    with torch.no_grad():
                        tree.eval()
                        tree.reset_usage()
                        tree.track_usage(True)
                        for i in range(0, n, 8192):
                            tree(xt[i:i + 8192])
                        tree.track_usage(False)
                        row = {**base, "method": method, "heldout_error": relative_error(tree(xv), yv),
                               "train_error": relative_error(tree(xt[:a.holdout]), yt[:a.holdout]),
                               "dead": round(tree.usage_stats().dead_fraction, 4), "seconds": seconds, **extra}
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")
                    f.flush()

                torch.manual_seed(0)
                tree = TreeFF(x.shape[1], a.depth, trees, activation="silu")
                t = time.perf_counter()
                cfg = DistillConfig(steps=a.steps, lr=a.lr, holdout=0.5 / n)  # one token: the probe holds out its own
                if "balanced+adam" in methods:
                    start = TreeFF(x.shape[1], a.depth, trees, activation="silu")
                    balanced_start(start, xt, seed=0)
                    emit("balanced", start, t)
                    distill_layer(start, xt, yt, cfg)
                    emit("balanced+adam", start, t, steps=a.steps, lr=a.lr)
                    t = time.perf_counter()
                if "random" in methods:
                    emit("random", tree, t)
                distill_layer(tree, xt, yt, cfg)
                emit("adam", tree, t, steps=a.steps, lr=a.lr)
                if "adam+ls" in methods:
                    for ridge in ridges:
                        ls_out(tree, xt, yt, ridge)
                        emit("adam+ls", tree, t, steps=a.steps, lr=a.lr, ridge=ridge)
                if "balanced+ls" in methods:
                    tree = TreeFF(x.shape[1], a.depth, trees, activation="silu")
                    t = time.perf_counter()
                    balanced_start(tree, xt, seed=0)
                    for ridge in ridges:
                        ls_out(tree, xt, yt, ridge)
                        emit("balanced+ls", tree, t, ridge=ridge)


if __name__ == "__main__":
    main()
