"""Routing health and the auto-pruning mechanism, measured on one fixed held-out token set.

Training telemetry counts whatever windows the last interval drew; comparing snapshots then mixes a
change of routing with a change of data. The probe routes the same tokens every time. Per tree layer it
reports the routing statistics (dead/static nodes, path entropy, effective leaves, per-depth balance)
and the mechanism the auto-pruning argument names, per internal node:

* majority share: of the tokens reaching the node, the share whose pre-activation z has the more common
  sign (1 = the node always turns one way, 0.5 = an even split);
* gradient ratio: RMS of dL/dz over the tokens with z > 0 divided by that over z <= 0. An asymmetric
  per-node activation (GELU, ReLU) passes little gradient on its negative side, so the ratio is >> 1;
  the activation after the path, or a symmetric one, gives both sides gradients of one form.

dL/dz is taken by recomputing each tree layer's output from its input in plain torch (a forward hook
that replaces the layer's output with the same values, built from z on the hard path), so any backend
can be probed; the recomputation's largest difference from the layer's own output is reported.

Why a node turns one way for every token, from the first two moments of the layer's input x over the probe
tokens (mean mu, covariance S), per internal node n with z = w.x + b:

* input anisotropy ||mu||^2 / mean ||x||^2: the share of the input's energy in the one direction all tokens
  share (1 = every token the same vector, ~0 = centred); a large share makes sign(z) nearly the same for all;
* the effective rank of the input's spread, (tr S)^2 / tr(S^2): how many directions the tokens still differ
  in (d_model for an isotropic spread, 1 when they differ along one line only);
* |cos(w_n, mu)|, mean over nodes: whether the node weights themselves line up with that shared direction;
* offset ratio |E z| / sd z over all probe tokens (not only those reaching n), and its two parts |w.mu| / sd z
  and |b| / sd z: a ratio >> 1 sends nearly every token one way, and the parts say whether the shared input
  direction or the bias put it there.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from .. import activations
from ..tree import TreeFF
from ..tree.telemetry import usage_from_leaf_visits


def _path_forward(layer: TreeFF, x: torch.Tensor):
    """The layer's function on x (M, d) from hard-path pre-activations: (y, z (M,T,L), nodes (M,T,L))."""
    w_in, w_out = layer.w_in.detach(), layer.w_out.detach()
    b_in = layer.b_in.detach() if layer.b_in is not None else None
    m, trees = x.shape[0], layer.trees
    t_idx = torch.arange(trees).unsqueeze(0).expand(m, trees)
    node = torch.zeros(m, trees, dtype=torch.long)
    zs, nodes = [], []
    for _ in range(layer.depth + 1):
        z = torch.einsum("md,mtd->mt", x, w_in[t_idx, node])
        if b_in is not None:
            z = z + b_in[t_idx, node]
        zs.append(z)
        nodes.append(node)
        node = 2 * node + 1 + (z.detach() > 0).long()
    z = torch.stack(zs, -1)
    if not z.requires_grad:  # an input outside autograd (first layer of a frozen model): z becomes the leaf
        z.requires_grad_(True)
    path = torch.stack(nodes, -1)
    w_path = w_out[t_idx.unsqueeze(-1).expand_as(path), path]  # (M, T, L, d_out)
    act = activations.fn(layer.activation)
    if layer.act_position == "node":
        y = torch.einsum("mtl,mtld->md", act(z), w_path)
    else:
        y = act(torch.einsum("mtl,mtld->mtd", z, w_path)).sum(1)
    return y, z, path


class _Accumulator:
    """Per-node sums over the probe's batches for one layer."""

    def __init__(self, layer: TreeFF):
        self.trees, self.nodes, self.depth = layer.trees, layer.nodes, layer.depth
        size = self.trees * self.nodes
        self.visits, self.pos = np.zeros(size), np.zeros(size)
        self.g2_pos, self.g2_neg = np.zeros(size), np.zeros(size)
        self.leaf_visits = torch.zeros(self.trees, 2**self.depth, dtype=torch.int64)
        self.max_diff = 0.0
        # the layer's input moments over the probe tokens, and the node weights they are read against
        self.w_in = layer.w_in.detach().double().reshape(size, -1).numpy().copy()
        self.b_in = (layer.b_in.detach().double().reshape(-1).numpy().copy() if layer.b_in is not None
                     else np.zeros(size))
        self.n_x, self.sum_x, self.sum_xx = 0, np.zeros(layer.d_model), np.zeros((layer.d_model, layer.d_model))

    def add_input(self, x: torch.Tensor) -> None:
        """Accumulate the first two moments of the layer's input rows x (M, d_model)."""
        xd = x.detach().double().numpy()
        self.n_x += xd.shape[0]
        self.sum_x += xd.sum(0)
        self.sum_xx += xd.T @ xd

    def input_stats(self, internal: np.ndarray) -> dict:
        """Anisotropy, node-weight alignment and offset ratios (module docstring) from the input moments."""
        keys = ("input_anisotropy", "input_effective_rank", "w_in_mean_cos", "offset_ratio", "offset_ratio_mean_part",
                "offset_ratio_bias_part")
        if self.n_x == 0:
            return dict.fromkeys(keys, math.nan)
        mu = self.sum_x / self.n_x
        second = self.sum_xx / self.n_x
        cov = second - np.outer(mu, mu)
        energy = float(np.trace(second))
        if np.trace(cov) <= 1e-12 * energy:  # identical rows: what is left is rounding, not spread
            cov = np.zeros_like(cov)
        w, b = self.w_in[internal], self.b_in[internal]
        mean_part = w @ mu
        sd = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", w, cov, w), 0.0))
        mu_norm, w_norm = float(np.linalg.norm(mu)), np.linalg.norm(w, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.abs(mean_part) / (w_norm * mu_norm)
            ratios = [np.abs(mean_part + b) / sd, np.abs(mean_part) / sd, np.abs(b) / sd]
        return {
            "input_anisotropy": float(mu_norm**2 / energy) if energy > 0 else math.nan,
            "input_effective_rank": float(np.trace(cov) ** 2 / np.sum(cov * cov)) if cov.any() else math.nan,
            "w_in_mean_cos": float(np.nanmean(cos)) if mu_norm > 0 and w.size else math.nan,
            **{k: float(np.median(r)) if r.size else math.nan for k, r in zip(keys[3:], ratios)},
        }

    def add(self, z: torch.Tensor, path: torch.Tensor, grad: torch.Tensor) -> None:
        flat = (path + torch.arange(self.trees).view(1, -1, 1) * self.nodes).reshape(-1).numpy()
        zf, gf = z.detach().reshape(-1).double().numpy(), grad.reshape(-1).double().numpy()
        size = self.visits.size
        pos = zf > 0
        self.visits += np.bincount(flat, minlength=size)
        self.pos += np.bincount(flat, weights=pos.astype(float), minlength=size)
        self.g2_pos += np.bincount(flat, weights=np.where(pos, gf * gf, 0.0), minlength=size)
        self.g2_neg += np.bincount(flat, weights=np.where(pos, 0.0, gf * gf), minlength=size)
        leaves = path[..., -1] - (2**self.depth - 1)
        counts = torch.bincount((leaves + torch.arange(self.trees) * 2**self.depth).reshape(-1),
                                minlength=self.trees * 2**self.depth)
        self.leaf_visits += counts.view(self.trees, -1)

    def summary(self) -> dict:
        usage = usage_from_leaf_visits(self.leaf_visits)
        n_int = 2**self.depth - 1
        internal = np.zeros((self.trees, self.nodes), bool)
        internal[:, :n_int] = True
        internal = internal.reshape(-1)
        v, p = self.visits, self.pos
        seen = internal & (v > 0)
        share = np.maximum(p, v - p)[seen] / v[seen]
        weights = v[seen]
        # nodes visited on both sides; a negative side without any gradient (ReLU) gives an infinite ratio
        both = internal & (p > 0) & (v - p > 0) & ((self.g2_pos > 0) | (self.g2_neg > 0))
        with np.errstate(divide="ignore"):
            rms = np.sqrt(self.g2_pos[both] / p[both]) / np.sqrt(self.g2_neg[both] / (v - p)[both])
            total = np.sqrt(self.g2_pos[both] / self.g2_neg[both])
        level = np.floor(np.log2(np.arange(self.nodes) + 1)).astype(int)
        level = np.tile(level, self.trees)
        share_by_depth = []
        for d in range(self.depth):
            sel = seen & (level == d)
            share_by_depth.append(float((np.maximum(p, v - p)[sel]).sum() / v[sel].sum()) if sel.any() else math.nan)
        return {
            "tokens": usage.tokens,
            "dead_fraction": usage.dead_fraction,
            "static_fraction": usage.static_fraction,
            "path_entropy": usage.path_entropy,
            "effective_leaves": usage.effective_leaves,
            "balance_by_depth": usage.balance_by_depth,
            "majority_share": float((share * weights).sum() / weights.sum()) if seen.any() else math.nan,
            "majority_share_by_depth": share_by_depth,
            # positive share of turns: > 0.5 means the routing leans right (z > 0)
            "positive_share": float(p[seen].sum() / v[seen].sum()) if seen.any() else math.nan,
            "grad_ratio_rms": float(np.exp(np.median(np.log(rms)))) if both.any() else math.nan,
            "grad_ratio_total": float(np.exp(np.median(np.log(total)))) if both.any() else math.nan,
            "nodes_with_both_sides": int(both.sum()),
            "negative_side_without_gradient": float((self.g2_neg[both] == 0).mean()) if both.any() else math.nan,
            "recompute_max_abs_diff": self.max_diff,
            # per tree: share of tokens turning right at the root
            "root_positive_share": [float(p[t * self.nodes] / v[t * self.nodes]) if v[t * self.nodes] > 0 else math.nan
                                    for t in range(self.trees)],
            **self.input_stats(internal),
        }


@contextmanager
def hooked(model: torch.nn.Module, layers: dict, hook_for):
    """Forward hooks ``hook_for(name)`` on the tree ``layers``, the model in eval mode and their usage
    counting off; hooks removed and mode and counting restored on the way out, so a measurement leaves
    the model as it found it."""
    was_training = model.training
    tracking = {name: layer.tracking for name, layer in layers.items()}
    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    model.eval()
    for layer in layers.values():
        layer.track_usage(False)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for name, layer in layers.items():
            layer.track_usage(tracking[name])
        model.train(was_training)


def probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, dict]:
    """Per tree layer (by module name): routing health and mechanism on the rows (x, y), in ``batch`` rows
    at a time. The model's mode, telemetry counters and gradients are left as they were."""
    from ..train.loop import lm_loss
    from ..train.telemetry import tree_layers

    layers = tree_layers(model)
    if not layers:
        raise ValueError("the model has no tree layers to probe")
    if len(x) < batch:
        raise ValueError(f"the held-out set has {len(x)} rows, fewer than one batch ({batch})")
    acc = {name: _Accumulator(layer) for name, layer in layers.items()}
    captured: dict[str, tuple] = {}

    def hook_for(name):
        def hook(layer, inputs, output):
            x2 = layer.routing_input(inputs[0].reshape(-1, layer.d_model))  # what the nodes read
            acc[name].add_input(x2)
            y_path, z, path = _path_forward(layer, x2)
            acc[name].max_diff = max(acc[name].max_diff, float((y_path.detach() - output.detach().reshape(
                y_path.shape)).abs().max()))
            captured[name] = (z, path)
            return y_path.reshape(output.shape)
        return hook

    with hooked(model, layers, hook_for):
        for i in range(0, len(x) - batch + 1, batch):  # whole batches only: every probe sees the same rows
            captured.clear()
            with torch.enable_grad():
                loss = lm_loss(model, x[i : i + batch], y[i : i + batch])
                names = list(captured)
                grads = torch.autograd.grad(loss, [captured[n][0] for n in names])
            for name, g in zip(names, grads):
                z, path = captured[name]
                acc[name].add(z, path, g)
    return {name: a.summary() for name, a in acc.items()}
