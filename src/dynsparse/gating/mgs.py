"""MGS: micro-gated sparsification. A small gate per MLP block predicts, from the block's input, which
hidden neurons will be active; only those are computed.

The paper does not publish the gate, loss or thresholds; our choices:

* Gate forms. A full d -> d_ff gate costs as much as fc1, so only cheap forms are offered: low-rank
  (d -> r -> d_ff, ``gate="lowrank"``), grouped (one logit per ``group_size`` consecutive neurons,
  ``gate="grouped"``), and low-bit (``gate="lowbit"``, ``gating.lowbit``): the block's own contribution
  computed from ``bits``-bit copies of its routing and up projections, the one form that predicts a
  product of two projections. It is not trained: calibration only sets its threshold.
* Initialisation. The low-rank gate starts as the best rank-r approximation of the block's own
  pre-activations on the calibration inputs (Z = X W1^T + b1; A = W1^T V_r, B = V_r^T with V_r the top
  right singular vectors of Z), i.e. it starts by predicting sign(z); the grouped gate starts from the
  group-mean rows of W1.
* Labels. A neuron is active by the ``activity`` criterion (``gating.activity``): "sign" (a > 0), or
  a magnitude criterion calibrated for ``activity_sparsity`` (default: the target sparsity). For smooth
  gated MLPs "contribution" is the one to predict: it names the neurons whose absence the output feels,
  and a gate that predicts it lets the block skip all three projections for the rest.
* Training. The model stays frozen; the gate learns from recorded (input, active) pairs with binary
  cross-entropy, positives up-weighted by ``pos_weight`` (default: negatives/positives, capped at 10)
  because active neurons are rare. A grouped gate's label is "any neuron of the group active". The
  gates of all layers with the same shape train together as one batched problem (``gate_training``):
  the same steps, batches and updates as one layer at a time, in one pass of batched matmuls.
* Threshold. Per layer, on held-out calibration rows the gate never trained on: the logit quantile that
  keeps ``target_recall`` of the truly active (token, neuron) pairs, or that gates off ``target_sparsity``
  of all pairs.
* Compensation (smooth activations only): a gated-off neuron contributes its mean over the calibration
  tokens on which it is inactive, E[a | inactive], instead of 0.
* Neuron order (grouped gates, ``reorder``): a group is "on" when any of its neurons is, and consecutive
  neurons of a pretrained MLP are unrelated; so the hidden neurons are first permuted so that neurons
  that fire together on the training rows share a group (``gating.reorder``). The permutation is stored
  with the gate (``perm``) and applied to fc1 rows, b1, fc2 columns and the compensation when the
  block is built: the dense function is unchanged, the gate sees the permuted layout.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..mlps import MLPBlock
from .lowbit import LowBitGate
from .modules import GatedMLP, GroupedGate, LowRankGate
from .record import LayerStats
from .reorder import check_permutation, coactivation_permutation, group_density, permute_mlp


GATES = ("lowrank", "grouped", "lowbit")


@dataclass
class MGSConfig:
    gate: str = "lowrank"  # "lowrank", "grouped" or "lowbit"
    rank: int = 16  # default from experiments/gate_cost.py on this CPU (see module docstring)
    group_size: int = 16
    bits: int = 3  # low-bit gate: bits per weight of its projection copies
    quant_group: int = 32  # low-bit gate: consecutive input weights sharing one scale and offset
    smoothing: float = 0.5  # low-bit gate: input channels scaled by rms(x)^smoothing before quantizing
    target_recall: float | None = None  # keep this share of truly active (token, neuron) pairs (default 0.99)
    target_sparsity: float | None = None  # or gate this share of all pairs off
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 1024
    pos_weight: float | None = None
    holdout: float = 0.2
    max_samples: int = 16384  # rows per layer kept for gate training (reservoir sample)
    min_samples: int = 64
    compensate: bool = True  # only changes smooth activations
    reorder: bool | None = None  # grouped gates: permute neurons so co-active ones share a group (None: True)
    seed: int = 0
    activity: str = "sign"  # the labels: "sign", "contribution" or "cats" (gating.activity)
    activity_sparsity: float | None = None  # a magnitude activity's calibration target (default: target_sparsity)

    def __post_init__(self):
        from .activity import check_activity, check_target

        check_activity(self.activity)
        if self.activity == "sign":
            if self.activity_sparsity is not None:
                raise ValueError("activity_sparsity calibrates a magnitude activity; activity 'sign' has no threshold")
        else:
            if self.activity_sparsity is None:
                if self.target_sparsity is None:
                    raise ValueError(f"activity {self.activity!r} with target_recall= needs activity_sparsity= "
                                     "(the share of pairs its per-layer threshold switches off)")
                self.activity_sparsity = self.target_sparsity
            check_target(self.activity_sparsity, "activity_sparsity")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {list(GATES)}, got {self.gate!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in [1, 8], got {self.bits!r}")
        if isinstance(self.quant_group, bool) or not isinstance(self.quant_group, int) or self.quant_group < 1:
            raise ValueError(f"quant_group must be a positive int, got {self.quant_group!r}")
        if not 0 <= self.smoothing <= 1:
            raise ValueError(f"smoothing must be in [0, 1], got {self.smoothing!r}")
        if self.target_recall is not None and self.target_sparsity is not None:
            raise ValueError("MGSConfig takes at most one of target_recall= or target_sparsity=")
        if self.target_recall is None and self.target_sparsity is None:
            self.target_recall = 0.99
        if self.target_recall is not None and not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.target_sparsity is not None and not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout is the share of calibration rows kept for thresholds, in (0, 1); got {self.holdout}")
        if self.rank < 1 or self.group_size < 1:
            raise ValueError("rank and group_size must be >= 1")
        if self.reorder is None:
            self.reorder = self.gate == "grouped"
        elif self.reorder and self.gate != "grouped":
            raise ValueError("reorder=True applies to grouped gates only (a low-rank gate is per neuron)")


def _init_lowrank(gate: LowRankGate, w1, b1, x) -> None:
    v = _top_right_singular(x, w1, gate.A.shape[1])  # (d_ff, r)
    with torch.no_grad():
        gate.A.copy_(w1.t() @ v)
        gate.B.copy_(v.t())
        gate.c.copy_(b1 if b1 is not None else torch.zeros(w1.shape[0]))


def _top_right_singular(x: torch.Tensor, w1: torch.Tensor, r: int) -> torch.Tensor:
    """(d_ff, r): the top right singular vectors of Z = X W1^T (the input-dependent part of the
    pre-activation; the bias b1 is per neuron, so the gate keeps it exactly).

    They are the top eigenvectors of Z^T Z = W1 M W1^T with M = X^T X. With M = L L^T and K = W1 L
    (d_ff x d), Z^T Z = K K^T, whose top eigenvectors are K's top left singular vectors: K Q S^(-1/2)
    from the eigen-decomposition K^T K = Q S Q^T, a d x d problem instead of d_ff x d_ff."""
    w = w1.double()
    s, u = torch.linalg.eigh((x.t() @ x).double())
    k = w @ (u * s.clamp_min(0).sqrt())  # (d_ff, d)
    lam, q = torch.linalg.eigh(k.t() @ k)
    lam, q = lam[-r:], q[:, -r:]
    v = (k @ q) / lam.clamp_min(1e-300).sqrt()
    return v.float()


def _init_grouped(gate: GroupedGate, w1, b1) -> None:
    g = gate.group_size
    with torch.no_grad():
        gate.G.copy_(w1.reshape(-1, g, w1.shape[1]).mean(1).t())
        if b1 is not None:
            gate.c.copy_(b1.reshape(-1, g).mean(1))


def _labels(gate, active: torch.Tensor) -> torch.Tensor:
    if isinstance(gate, GroupedGate):
        return active.reshape(active.shape[0], -1, gate.group_size).any(-1)
    return active


def _quantile(v: torch.Tensor, q: float) -> float:
    v = v.flatten().float()
    if v.numel() > 4_000_000:
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:4_000_000]]
    k = min(max(int(q * v.numel()), 1), v.numel())
    return v.kthvalue(k).values.item()


def _split(n: int, cfg: MGSConfig):
    """(holdout rows, training rows) of the recorded samples: deterministic in cfg.seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_hold = max(1, int(cfg.holdout * n))
    return perm[:n_hold], perm[n_hold:]


def calibrate_threshold(gate, x_hold: torch.Tensor, active_hold: torch.Tensor, target_recall: float | None = None,
                        target_sparsity: float | None = None, gated_mlp: bool = False):
    """(threshold, report) for ``gate`` on held-out rows, for a target recall or a target sparsity
    (``gated_mlp``: the block has three projections, which only changes its reported FLOPs)."""
    with torch.no_grad():
        logits = gate(x_hold)  # per neuron (lowrank) or per group (grouped)
        if target_recall is not None:
            pos_logits = logits[_labels(gate, active_hold)]
            thr = _quantile(pos_logits, 1 - target_recall) - 1e-6 if pos_logits.numel() else float("inf")
        elif target_sparsity == 0:
            thr = logits.min().item() - 1.0  # every neuron on (a quantile would still switch the lowest off)
        else:
            thr = _quantile(logits, target_sparsity)
        pred = logits > thr
        if isinstance(gate, GroupedGate):
            pred = pred.repeat_interleave(gate.group_size, dim=-1)
        tp = (pred & active_hold).sum().item()
        d_ff = active_hold.shape[1]
        report = {
            "holdout_rows": x_hold.shape[0],
            "natural_density": active_hold.float().mean().item(),
            "gated_density": pred.float().mean().item(),
            "recall": tp / max(active_hold.sum().item(), 1),
            "precision": tp / max(pred.sum().item(), 1),
            "threshold": thr,
            "gate_flops_per_token": gate.flops_per_token,
            "mlp_flops_per_token": (6 if gated_mlp else 4) * x_hold.shape[1] * d_ff,
        }
        if isinstance(gate, GroupedGate):  # what a perfect gate of this layout would compute
            report["natural_group_density"] = group_density(active_hold, gate.group_size)
    return torch.tensor(thr), report


def neuron_order(stats: LayerStats, cfg: MGSConfig) -> torch.Tensor | None:
    """The grouped gate's neuron permutation from the training rows (never the held-out ones), or None."""
    if cfg.gate != "grouped" or not cfg.reorder:
        return None
    _, train = _split(stats.samples_x.shape[0], cfg)
    return coactivation_permutation(stats.samples_active[train], cfg.group_size, seed=cfg.seed)


def _prepare(block: MLPBlock, stats: LayerStats, cfg: MGSConfig, perm: torch.Tensor | None):
    """The initialised gate and its training problem: (gate, x, active, hold, train, labels, pos_weight)."""
    if stats.samples_x is None or stats.samples_x.shape[0] < cfg.min_samples:
        n = 0 if stats.samples_x is None else stats.samples_x.shape[0]
        raise ValueError(f"{block.name}: {n} recorded calibration rows, need >= {cfg.min_samples} to train a gate")
    if stats.samples_active is None:
        raise ValueError(f"{block.name}: the statistics hold no per-row active masks to train a gate on")
    # the weights whose pre-activation decides activity: fc1, or a gated block's gate projection
    w1, b1 = (t.detach().float() if t is not None else None for t in block.routing_weights())
    x, active = stats.samples_x, stats.samples_active
    if perm is not None:
        perm = check_permutation(perm, stats.d_ff)
        w1, b1 = w1[perm], None if b1 is None else b1[perm]
        active = active[:, perm]
    hold, train = _split(x.shape[0], cfg)
    d, d_ff = stats.d_model, stats.d_ff
    if cfg.gate == "lowrank":
        gate = LowRankGate(d, d_ff, min(cfg.rank, d, d_ff))
        _init_lowrank(gate, w1, b1, x[train])
    elif cfg.gate == "lowbit":
        if d % cfg.quant_group:
            raise ValueError(f"{block.name}: quant_group {cfg.quant_group} does not divide d_model {d}")
        up, up_b, w2, _ = block.linear_weights()
        up, up_b = (up, up_b) if block.gated else (None, None)
        gate = LowBitGate.fit(w1, b1, up, up_b, w2.detach().float().norm(dim=0), x[train], cfg.bits,
                              cfg.quant_group, cfg.smoothing, stats.activation, _own_act(block))
    else:
        gate = GroupedGate(d, d_ff, cfg.group_size)
        _init_grouped(gate, w1, b1)
    labels = _labels(gate, active)
    pos = labels[train].float().mean().clamp(1e-6, 1 - 1e-6).item()
    pw = cfg.pos_weight if cfg.pos_weight is not None else min(max((1 - pos) / pos, 1.0), 10.0)
    return gate, x, active, hold, train, labels, pw


def _own_act(block: MLPBlock):
    """The block's own activation where it has one (e.g. GPT-2's tanh GELU), else None (by name)."""
    return block.act if callable(block.act) else None


def _finish(block: MLPBlock, gate, x, active, hold, cfg: MGSConfig, pw: float):
    gate.requires_grad_(False)
    thr, report = calibrate_threshold(gate, x[hold], active[hold], cfg.target_recall, cfg.target_sparsity,
                                      gated_mlp=block.gated)
    report["pos_weight"] = pw
    return gate, thr, report


def train_gate(block: MLPBlock, stats: LayerStats, cfg: MGSConfig, perm: torch.Tensor | None = None):
    """(gate, threshold, report) for one block from its recorded samples; with ``perm`` the gate is
    trained for the block with its hidden neurons laid out as ``perm`` (see ``gating.reorder``).
    The plain one-layer loop: ``gate_training.train_gates`` runs the same for many layers at once."""
    gate, x, active, hold, train, labels, pw = _prepare(block, stats, cfg, perm)
    y_all = labels.float()
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(gate.parameters(), lr=cfg.lr, fused=True)
    for _ in range(cfg.steps):
        idx = train[torch.randint(len(train), (min(cfg.batch_size, len(train)),), generator=g)]
        loss = F.binary_cross_entropy_with_logits(gate(x[idx]), y_all[idx], pos_weight=torch.tensor(pw))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _finish(block, gate, x, active, hold, cfg, pw)


def gate_from_tensors(tensors: dict[str, torch.Tensor], d_model: int, d_ff: int, activation: str = "relu",
                      act=None):
    """The gate a block's saved tensors hold (``activation``/``act``: the block's, which a low-bit gate applies)."""
    if "gate.route_codes" in tensors:
        return LowBitGate({k[5:]: v for k, v in tensors.items() if k.startswith("gate.")}, activation, act)
    if "gate.A" in tensors:
        gate = LowRankGate(d_model, d_ff, tensors["gate.A"].shape[1])
    elif "gate.G" in tensors:
        gate = GroupedGate(d_model, d_ff, d_ff // tensors["gate.G"].shape[1])
    else:
        raise ValueError("gate tensors hold no low-rank (gate.A), grouped (gate.G) or low-bit (gate.route_codes) gate")
    gate.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("gate.")})
    return gate.requires_grad_(False)


def recalibrate_(gates, stats: dict[str, LayerStats], target_recall: float | None = None,
                 target_sparsity: float | None = None) -> None:
    """Re-set every layer's threshold of an MGS GateSet for a new target (same held-out rows, no retraining):
    how the sparsity sweeps reuse one trained gate per layer."""
    # gate files written before neuron reordering existed have no "reorder" entry and no permutation
    cfg = MGSConfig(**{"reorder": False, **gates.config, "target_recall": target_recall,
                       "target_sparsity": target_sparsity})
    for name, ts in gates.tensors.items():
        s, info = stats[name], gates.layers[name]
        hold, _ = _split(s.samples_x.shape[0], cfg)
        gate = gate_from_tensors(ts, info["d_model"], info["d_ff"], info["activation"])
        active = s.samples_active[hold]
        if "perm" in ts:
            active = active[:, check_permutation(ts["perm"], info["d_ff"])]
        thr, report = calibrate_threshold(gate, s.samples_x[hold], active, target_recall, target_sparsity,
                                          gated_mlp=info.get("gated", False))
        ts["threshold"] = thr.reshape(())
        gates.report[name] = {**gates.report[name], **report}
    gates.config = dataclasses.asdict(cfg)


def mgs_tensors(block: MLPBlock, stats: LayerStats, cfg: MGSConfig):
    """The tensors saved per block: gate.*, threshold, optional perm (grouped gates' neuron order) and
    compensation (per neuron, in the model's own neuron order like everything but the gate)."""
    return mgs_tensors_all({block.name: block}, {block.name: stats}, cfg, progress=False)[block.name]


def mgs_tensors_all(blocks: dict[str, MLPBlock], stats: dict[str, LayerStats], cfg: MGSConfig,
                    progress: bool | None = None) -> dict[str, tuple[dict, dict]]:
    """{name: (tensors, report)} for every block, the gates trained together (``gate_training``)."""
    from .gate_training import GateJob, train_gates
    from .progress import Stage

    problems, jobs = {}, []
    what = "ordering neurons and initialising gates" if cfg.gate == "grouped" and cfg.reorder else "initialising gates"
    with Stage(what, len(blocks), "layers", progress) as stage:
        for name, block in blocks.items():
            s = stats[name]
            perm = neuron_order(s, cfg) if s.samples_x is not None else None
            gate, x, active, hold, train, labels, pw = _prepare(block, s, cfg, perm)
            problems[name] = (perm, gate, x, active, hold, pw)
            if not isinstance(gate, LowBitGate):  # calibrated, not trained
                jobs.append(GateJob(name, gate, x, labels, train, pw))
            stage.advance()
    losses = train_gates(jobs, cfg.steps, cfg.lr, cfg.batch_size, cfg.seed, progress=progress)
    out = {}
    for name, block in blocks.items():
        s = stats[name]
        perm, gate, x, active, hold, pw = problems[name]
        gate, thr, report = _finish(block, gate, x, active, hold, cfg, pw)
        if name in losses:
            report["train_loss"] = losses[name]
        t = {f"gate.{k}": v.detach().clone() for k, v in gate.state_dict().items()}
        t["threshold"] = thr.reshape(())
        if perm is not None:
            t["perm"] = perm
            report["natural_group_density_unordered"] = group_density(s.samples_active[hold], cfg.group_size)
        if cfg.compensate and s.activation != "relu":
            t["compensation"] = s.mean_inactive_activation.float()
        out[name] = (t, report)
    return out


def build_gated(block: MLPBlock, tensors: dict[str, torch.Tensor], activation: str, backend: str = "auto") -> GatedMLP:
    w1, b1, w2, b2 = block.linear_weights()
    wg, bg = block.gate_weights()
    gate = gate_from_tensors(tensors, block.d_model, block.d_ff, activation, _own_act(block))
    comp = tensors.get("compensation")
    if "perm" in tensors:  # the gate's neuron layout; same function, neurons in another order
        if not isinstance(gate, GroupedGate):
            raise ValueError(f"{block.name}: gate tensors hold a neuron permutation but not a grouped gate")
        perm = check_permutation(tensors["perm"], block.d_ff)
        w1, b1, w2 = permute_mlp(w1, b1, w2, perm)
        wg, bg = (None if t is None else t[perm] for t in (wg, bg))
        comp = None if comp is None else comp[perm]
    return GatedMLP(w1, b1, w2, b2, gate, tensors["threshold"], activation, comp, backend=backend,
                    act=_own_act(block), wg=wg, bg=bg)
