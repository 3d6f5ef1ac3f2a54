"""Static pruning: turn routing that has become static into structure.

After training, some subtrees receive no tokens (auto-pruning) and some nodes always send their
traffic the same way. ``prune_static`` removes the subtrees that saw fewer than ``min_visits`` tokens
on calibration data and makes nodes with a single surviving child stop routing (they still compute and
contribute their output, but their successor is fixed). The result is a ``PrunedTreeFF``: an explicit
child-pointer forest that computes exactly what the original layer computed on every path that kept
its traffic, and stores fewer parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..activations import fn as get_activation
from ..sparse_ff import FFUsage
from .layer import TreeFF
from .telemetry import node_visits_from_leaves


@dataclass
class PruneReport:
    nodes_before: int
    nodes_after: int
    static_nodes: int  # kept internal nodes whose successor is now fixed
    params_before: int
    params_after: int

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def __str__(self) -> str:
        return (
            f"pruned {self.nodes_before - self.nodes_after} of {self.nodes_before} nodes "
            f"({self.params_removed} parameters removed, {self.static_nodes} nodes no longer route)"
        )


class PrunedTreeFF(nn.Module):
    """A tree FF layer with arbitrary (pruned) tree shapes, stored as flat node tables plus child pointers.

    ``left[i]``/``right[i]`` are the successors of node i when z <= 0 / z > 0, or -1 where the walk
    ends. A static node has ``left == right``. Each tree's walk starts at ``roots[t]``.
    """

    def __init__(self, w_in, b_in, w_out, left, right, roots, max_len, activation, act_position):
        super().__init__()
        self.w_in = nn.Parameter(w_in)
        self.b_in = nn.Parameter(b_in) if b_in is not None else None
        self.w_out = nn.Parameter(w_out)
        self.register_buffer("left", left)
        self.register_buffer("right", right)
        self.register_buffer("roots", roots)
        self.max_len = max_len
        self.activation, self.act_position = activation, act_position
        self.d_model, self.d_out = w_in.shape[1], w_out.shape[1]
        self.trees = roots.numel()
        self.prune_report: PruneReport | None = None
        self._tracking = False
        self.reset_usage()

    # A pruned tree's paths have different lengths, so telemetry here is the measured cost: nodes visited.
    def track_usage(self, enabled: bool = True) -> "PrunedTreeFF":
        self._tracking = bool(enabled)
        return self

    @property
    def tracking(self) -> bool:
        return self._tracking

    def reset_usage(self) -> None:
        self.node_visit_count, self.token_count = 0, 0

    @property
    def nodes_per_token(self) -> float:
        """Mean number of nodes (over all trees) a counted token visited."""
        return self.node_visit_count / self.token_count if self.token_count else float("nan")

    @property
    def flops_per_token(self) -> int:
        """Nominal cost: every tree's longest path (a token's real cost is ``measured_usage``)."""
        return 2 * self.trees * self.max_len * (self.d_model + self.d_out)

    @property
    def active_fraction(self) -> float:
        return self.trees * self.max_len / self.w_in.shape[0]

    def measured_usage(self) -> FFUsage:
        npt = self.nodes_per_token
        return FFUsage(self.token_count, npt / self.w_in.shape[0], 2 * npt * (self.d_model + self.d_out))

    @classmethod
    def empty(cls, nodes: int, trees: int, d_model: int, d_out: int, max_len: int, activation: str,
              act_position: str, bias: bool = True) -> "PrunedTreeFF":
        """A layer of the given shape with uninitialised tables, to be filled by ``load_state_dict``
        (how a saved pruned model is rebuilt from its config)."""
        long = lambda n: torch.full((n,), -1, dtype=torch.long)  # noqa: E731
        return cls(torch.zeros(nodes, d_model), torch.zeros(nodes) if bias else None, torch.zeros(nodes, d_out),
                   long(nodes), long(nodes), torch.zeros(trees, dtype=torch.long), max_len, activation, act_position)

    def shape_spec(self) -> dict:
        """What ``empty`` needs to rebuild this layer."""
        return {"nodes": self.w_in.shape[0], "trees": self.trees, "d_model": self.d_model, "d_out": self.d_out,
                "max_len": self.max_len, "activation": self.activation, "act_position": self.act_position,
                "bias": self.b_in is not None}

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, trees={self.trees}, nodes={self.w_in.shape[0]}, max_len={self.max_len}, "
            f"activation={self.activation!r}, act_position={self.act_position!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input's last dimension must be d_model={self.d_model}, got {tuple(x.shape)}")
        act = get_activation(self.activation)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        m = x2.shape[0]
        node = self.roots.unsqueeze(0).expand(m, -1).clone()
        alive = torch.ones_like(node, dtype=torch.bool)
        y = x2.new_zeros(m, self.d_out)
        h = x2.new_zeros(m, self.trees, self.d_out) if self.act_position == "path" else None
        if self._tracking:
            self.token_count += m
        for _ in range(self.max_len):
            if self._tracking:
                self.node_visit_count += int(alive.sum())
            safe = node.clamp_min(0)
            z = torch.einsum("mtd,md->mt", self.w_in[safe], x2)
            if self.b_in is not None:
                z = z + self.b_in[safe]
            z = torch.where(alive, z, torch.zeros_like(z))
            coeff = act(z) if self.act_position == "node" else z
            contrib = (coeff * alive).unsqueeze(-1) * self.w_out[safe]
            if h is None:
                y = y + contrib.sum(1)
            else:
                h = h + contrib
            node = torch.where(z.detach() > 0, self.right[safe], self.left[safe])
            alive = alive & (node >= 0)
            if not alive.any():
                break
        if h is not None:
            y = act(h).sum(1)
        return y.reshape(*lead, self.d_out)


@torch.no_grad()
def prune_static(layer: TreeFF, min_visits: int = 1, leaf_visits: torch.Tensor | None = None) -> PrunedTreeFF:
    """Prune ``layer`` by its routing counts (``layer.leaf_visits`` unless ``leaf_visits`` is given).

    Nodes visited fewer than ``min_visits`` times are removed with their subtrees; a kept node with one
    kept child always continues there. Returns a new ``PrunedTreeFF`` with ``.prune_report`` set.
    """
    if not isinstance(layer, TreeFF):
        raise TypeError(f"prune_static expects a TreeFF, got {type(layer).__name__}")
    if isinstance(min_visits, bool) or not isinstance(min_visits, int) or min_visits < 1:
        raise ValueError(f"min_visits must be an int >= 1, got {min_visits!r}")
    counts = layer.leaf_visits if leaf_visits is None else leaf_visits
    if tuple(counts.shape) != tuple(layer.leaf_visits.shape):
        raise ValueError(f"leaf_visits must have shape {tuple(layer.leaf_visits.shape)}, got {tuple(counts.shape)}")
    visits = node_visits_from_leaves(counts.cpu().to(torch.int64))
    if int(visits[:, 0].min()) < min_visits:
        raise ValueError(
            f"a tree's root saw {int(visits[:, 0].min())} tokens < min_visits={min_visits}: "
            "count routing on calibration data first (layer.track_usage(True), then run the data)"
        )
    keep = visits >= min_visits
    n_internal = 2**layer.depth - 1

    old_index, left, right, roots = [], [], [], []
    static_nodes = 0
    for t in range(layer.trees):
        roots.append(len(old_index))
        order = [0]  # breadth-first over kept nodes, so a node's children get later positions
        position = {}
        for n in order:
            position[n] = len(old_index)
            old_index.append(t * layer.nodes + n)
            if n < n_internal:
                order.extend(c for c in (2 * n + 1, 2 * n + 2) if keep[t, c])
        for n in order:
            if n >= n_internal:
                left.append(-1), right.append(-1)
                continue
            lc, rc = 2 * n + 1, 2 * n + 2
            lp = position[lc] if keep[t, lc] else None
            rp = position[rc] if keep[t, rc] else None
            if lp is None and rp is None:  # both subtrees below min_visits: the walk ends here
                static_nodes += 1
                left.append(-1), right.append(-1)
            elif lp is None or rp is None:
                static_nodes += 1
                only = lp if lp is not None else rp
                left.append(only), right.append(only)
            else:
                left.append(lp), right.append(rp)

    idx = torch.tensor(old_index, dtype=torch.long, device=layer.w_in.device)
    w_in, b_in = layer.routing_weights()  # a whitened layer's map folded in
    flat_in = w_in.reshape(-1, layer.d_model)
    flat_out = layer.w_out.reshape(-1, layer.d_out)
    b_in = b_in.reshape(-1)[idx].clone() if b_in is not None else None
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=layer.w_in.device)  # noqa: E731
    pruned = PrunedTreeFF(
        flat_in[idx].clone(),
        b_in,
        flat_out[idx].clone(),
        as_long(left),
        as_long(right),
        as_long(roots),
        layer.depth + 1,
        layer.activation,
        layer.act_position,
    )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    pruned.prune_report = PruneReport(
        nodes_before=layer.trees * layer.nodes,
        nodes_after=len(old_index),
        static_nodes=static_nodes,
        params_before=count(layer),
        params_after=count(pruned),
    )
    return pruned
