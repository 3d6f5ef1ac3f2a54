"""Layer-wise distillation: each tree FF block learns its dense MLP's output before any LM fine-tuning.

Freshly built trees are noise; swapped into a pretrained model they wreck every later layer's input.
So before fine-tuning, each tree is fitted to reproduce the dense block it replaces on the inputs that
block sees on calibration text. The inputs are recorded from the dense model in one pass (hooks on each
block's first projection), the dense output is computed from the kept block, and the layers are then
fitted one at a time against that fixed target: no gradient crosses a layer boundary and only one
layer's optimizer state exists at a time. Training runs through the tree's gather training path
(TreeFF in training mode with its backend, "auto" by default: the registered ``tree_train`` op, numba
on CPU and triton on CUDA), the same path LM fine-tuning uses. The loss is the MSE divided by the mean
squared target, so one learning rate suits layers whose outputs differ in scale; the reported
``rel_error`` is ||tree(x) - mlp(x)|| / ||mlp(x)|| on held-out calibration tokens.

Those inputs come from the dense model, but a tree runs behind the trees before it, whose errors move its
input away from what it was fitted on. ``inputs="sequential"`` fits each tree on the inputs it will see: the
calibration batches go through the decoder layers one at a time (the layer-by-layer pass of GPTQ and
SparseGPT), so layer l's inputs come from layers 0..l-1 with their trees already fitted, and the target is
the dense block applied to those inputs. It holds one layer's inputs at a time instead of every layer's,
and runs each decoder layer twice (once to read its MLP's input, once with the fitted tree).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..mlps import MLPBlock
from ..tree import TreeConfig, TreeFF


@dataclass
class DistillConfig:
    steps: int = 300  # optimizer steps per layer
    lr: float = 3e-3  # Adam, cosine-decayed to lr/10 over the steps
    batch_tokens: int = 1024
    holdout: float = 0.1  # share of the recorded tokens kept for the reported error
    seed: int = 0
    inputs: str = "dense"  # where each tree's inputs come from: "dense" (the dense model) or "sequential"
    start: str = "random"  # the trees' weights before the fit: as built, or "balanced" on the layer's inputs

    def check(self) -> None:
        for name in ("steps", "batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"distillation {name} must be an int >= 1, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"distillation lr must be a positive number, got {self.lr}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"distillation holdout must be in (0, 1), got {self.holdout}")
        if self.inputs not in INPUTS:
            raise ValueError(f"distillation inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        if self.start not in STARTS:
            raise ValueError(f"distillation start must be one of {', '.join(STARTS)}, got {self.start!r}")


INPUTS = ("dense", "sequential")
STARTS = ("random", "balanced")


def dense_forward(block: MLPBlock, x: torch.Tensor) -> torch.Tensor:
    """The dense block's output for inputs x (..., d_model): the block module itself when it is one,
    else its layers composed (fc2(act(fc1 x)), gated: fc2(act(gate x) * fc1 x))."""
    if block.kind == "module":
        return block.owner(x)
    act = block.act if block.act is not None else (lambda t: t)
    h = act(block.gate_proj(x)) * block.fc1(x) if block.gated else act(block.fc1(x))
    return block.fc2(h)


def record_inputs(model: nn.Module, blocks: dict[str, MLPBlock], ids: torch.Tensor, batch: int = 4,
                  progress: bool | None = None) -> dict:
    """{block name: (tokens, d_model) float tensor} of what each block reads on ``ids`` (windows, seq);
    a progress stage on stderr (``gating.progress``: minutes for a real model on many tokens)."""
    from ..gating.progress import Stage

    store: dict[str, list] = {name: [] for name in blocks}
    hooks = [block.fc1.register_forward_pre_hook(
        lambda mod, args, name=name: store[name].append(_rows(args[0])))
        for name, block in blocks.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), Stage("recording block inputs", -(-ids.shape[0] // batch), "batches",
                                    progress=progress) as stage:
            for i in range(0, ids.shape[0], batch):
                model(input_ids=ids[i:i + batch].to(device))
                stage.advance()
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(parts) for name, parts in store.items()}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A block input (..., d_model) as float rows on the CPU, the form every recorded input is kept in."""
    return x.detach().reshape(-1, x.shape[-1]).float().cpu()


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(pred - target) / torch.linalg.vector_norm(target).clamp_min(1e-30))


def distill_layer(tree: TreeFF, x: torch.Tensor, y: torch.Tensor, cfg: DistillConfig) -> dict:
    """Fit ``tree`` to map x -> y (rows are tokens); returns its held-out relative error before and after."""
    cfg.check()
    n = x.shape[0]
    n_val = max(1, int(round(n * cfg.holdout)))
    if n - n_val < 1:
        raise ValueError(f"distillation needs at least 2 calibration tokens per layer, got {n}")
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=g)
    val, train = perm[:n_val], perm[n_val:]
    param = next(tree.parameters())
    x, y = x.to(param.device, param.dtype), y.to(param.device, param.dtype)
    scale = float(y[train].pow(2).mean().clamp_min(1e-30))
    if cfg.start == "balanced":
        balanced_start(tree, x[train], cfg.seed)
    with torch.no_grad():
        tree.eval()
        before = relative_error(tree(x[val]), y[val])
    opt = torch.optim.Adam(tree.parameters(), lr=cfg.lr, fused=True)  # on CPU several times faster than foreach
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    tree.train()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        idx = train[torch.randint(0, train.numel(), (min(cfg.batch_tokens, train.numel()),), generator=g)]
        loss = (tree(x[idx]) - y[idx]).pow(2).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    tree.eval()
    with torch.no_grad():
        after = relative_error(tree(x[val]), y[val])
        train_err = relative_error(tree(x[train[:n_val]]), y[train[:n_val]])
    return {"rel_error_init": before, "rel_error": after, "rel_error_train": train_err,
            "train_tokens": int(train.numel()), "heldout_tokens": int(n_val), "seconds": seconds}


@torch.no_grad()
def balanced_start(tree: TreeFF, x: torch.Tensor, seed: int) -> None:
    """Random unit-scale directions, and each node's bias at the median pre-activation of the tokens ``x``
    that reach it: every node starts with half of its parent's tokens, none starved before the fit."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(tree.w_in.shape, generator=g) / x.shape[1] ** 0.5
    tree.w_in.copy_(w.to(tree.w_in.dtype))
    w = tree.w_in.to(x.dtype)
    for t in range(tree.trees):
        reach = {0: torch.arange(x.shape[0], device=x.device)}
        for n in range(tree.nodes):
            sel = reach.pop(n)
            z = x[sel] @ w[t, n]
            b = -z.median() if sel.numel() else torch.zeros((), dtype=x.dtype, device=x.device)
            tree.b_in[t, n] = b
            if 2 * n + 2 < tree.nodes:
                right = (z + b) > 0
                reach[2 * n + 1], reach[2 * n + 2] = sel[~right], sel[right]


def _installed(model: nn.Module, block: MLPBlock) -> TreeFF:
    """The tree that now sits where ``block`` was (module kind: the block's place; else fc1's)."""
    if block.kind == "module":
        tree = getattr(block._parent, block._attr)
    else:
        tree = block.owner
        for part in block._fc1_path:
            tree = getattr(tree, part)
    if not isinstance(tree, TreeFF):
        raise RuntimeError(f"{block.name}: expected a TreeFF after conversion, found {type(tree).__name__}")
    return tree


def convert_distilled(model: nn.Module, tree: TreeConfig, ids: torch.Tensor, cfg: DistillConfig | None = None,
                      log=None, progress: bool | None = None) -> tuple[list[str], list[dict]]:
    """Replace ``model``'s MLP blocks with trees (``convert_model``) fitted layer by layer to the dense
    blocks on calibration windows ``ids`` (windows, seq) of token ids. Returns (replaced names, one
    report per layer). ``log(report)`` is called after each layer."""
    from .convert import check_convertible, convert_model

    cfg = cfg or DistillConfig()
    cfg.check()
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"distillation needs calibration tokens (windows x seq_len token ids), got {shape}")
    blocks = check_convertible(model, tree)
    layers = decoder_layers(model, blocks) if cfg.inputs == "sequential" else None
    check_memory(len(blocks), ids.numel(), next(iter(blocks.values())).d_model, cfg.inputs)
    was_training = model.training
    model.eval()
    inputs = record_inputs(model, blocks, ids, progress=progress) if layers is None else None
    replaced = convert_model(model, tree)  # every tree drawn up front: the same initial trees for both inputs
    trees = {name: _installed(model, block) for name, block in blocks.items()}
    if layers is None:
        pairs = ((name, inputs.pop(name)) for name in blocks)
    else:
        pairs = sequential_inputs(model, layers, trees, ids, progress=progress)
    reports = []
    for name, x in pairs:
        block = blocks[name]
        with torch.no_grad():
            dtype = block.linear_weights()[0].dtype
            y = torch.cat([dense_forward(block, x[i:i + 4096].to(dtype)).float() for i in range(0, x.shape[0], 4096)])
        report = {"layer": name, **distill_layer(trees[name], x, y, cfg)}
        reports.append(report)
        if log is not None:
            log(report)
        del x, y
    model.train(was_training)
    return replaced, reports


def check_memory(layers: int, tokens: int, d_model: int, inputs: str, available: int | None = None) -> None:
    """Refuse, before the long recording pass, a calibration set whose held inputs cannot fit in memory:
    dense inputs hold every layer's at once, sequential ones a few tokens x d_model tables (the hidden
    states, one layer's inputs, its targets and the fit's copies)."""
    per_table = tokens * d_model * 4
    sequential = 4 * per_table
    need = layers * per_table if inputs == "dense" else sequential
    available = available_bytes() if available is None else available
    if available is not None and need > 0.8 * available:
        hint = f"; --distill-inputs sequential holds about {sequential / 2**30:.1f} GiB" if inputs == "dense" else ""
        raise ValueError(f"--calib-tokens {tokens:,}: distilling on {inputs} inputs holds about {need / 2**30:.1f} GiB "
                         f"of recorded inputs, more than the {available / 2**30:.1f} GiB of memory available; "
                         f"use fewer tokens{hint}")


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read (the check is skipped)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def decoder_layers(model: nn.Module, blocks: dict[str, MLPBlock]) -> dict[str, nn.Module]:
    """{block name: the decoder layer holding it}, in execution order: one block in each layer of one
    ``nn.ModuleList`` (``model.layers``, ``transformer.h``, ...), which sequential distillation steps through."""
    modules = dict(model.named_modules())
    found = {}
    for name in blocks:
        parts = name.split(".")
        owners = [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)
                  if parts[k - 1].isdigit() and isinstance(modules.get(".".join(parts[:k - 1])), nn.ModuleList)]
        if not owners:
            raise ValueError(f"sequential distillation needs each MLP block inside a list of decoder layers; "
                             f"{name} is in none")
        found[name] = owners[0]
    lists = {layer.rsplit(".", 1)[0] for layer in found.values()}
    indices = [int(layer.rsplit(".", 1)[1]) for layer in found.values()]
    if len(lists) != 1 or len(set(indices)) != len(indices) or indices != sorted(indices):
        raise ValueError(f"sequential distillation needs one MLP block per decoder layer of one layer list, "
                         f"in order; got {sorted(found.items())}")
    return {name: modules[layer] for name, layer in found.items()}


class _Caught(Exception):
    """Raised by a hook to stop a forward pass once it has what it came for."""


def sequential_inputs(model: nn.Module, layers: dict[str, nn.Module], trees: dict[str, TreeFF], ids: torch.Tensor,
                      batch: int = 4, progress: bool | None = None):
    """Yield (block name, (tokens, d_model) float inputs) layer by layer, each read with the trees before it in
    place: the calls into the first decoder layer are caught once, then every layer runs on the previous
    layer's outputs. A layer runs again after the caller has fitted its tree (the consumer of each yield),
    so the next layer sees the fitted tree's outputs."""
    from ..gating.progress import Stage

    calls = []  # (args, kwargs) of each batch's call into the first layer: hidden states and the rest

    def catch(module, args, kwargs):  # no KV cache: each layer runs twice on the same positions
        calls.append((args, {k: (None if k in ("past_key_value", "past_key_values") else v) for k, v in kwargs.items()}))
        raise _Caught

    first = next(iter(layers.values()))
    device = next(model.parameters()).device
    hook = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch):
                try:
                    model(input_ids=ids[i:i + batch].to(device), use_cache=False)
                except _Caught:
                    pass
    finally:
        hook.remove()
    if len(calls) != -(-ids.shape[0] // batch):
        raise RuntimeError("sequential distillation: the first decoder layer was not called once per batch")

    with Stage("sequential distillation passes", 2 * len(layers) * len(calls), "layer-batches",
               progress=progress) as stage:
        for name, layer in layers.items():
            xs = []

            def grab(module, args):
                xs.append(_rows(args[0]))
                raise _Caught

            hook = trees[name].register_forward_pre_hook(grab)
            try:
                with torch.no_grad():
                    for args, kwargs in calls:
                        try:
                            layer(*args, **kwargs)
                        except _Caught:
                            pass
                        stage.advance()
            finally:
                hook.remove()
            yield name, torch.cat(xs)
            del xs
            with torch.no_grad():
                for k, (args, kwargs) in enumerate(calls):
                    out = layer(*args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    calls[k] = ((out,) + tuple(args[1:]), kwargs) if args else \
                        ((), {**kwargs, "hidden_states": out})
                    stage.advance()
