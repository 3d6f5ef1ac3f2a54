"""Per-layer thresholds of a magnitude activity, and the layer statistics under them, from recorded rows.

A magnitude criterion (``gating.activity``) needs each layer's threshold before any neuron counts as
active, and the threshold depends on the target sparsity. Everything here is block-local: the block's
recorded inputs (the recorder's reservoir) and its weights give every hidden value and score, so one
recording serves every criterion and target without running the model again, and a layer's scores
are computed once for all targets. Statistics are over the recorded rows (all calibration tokens when
the reservoir holds them; a uniform sample of them otherwise).
"""
from __future__ import annotations

import torch

from ..mlps import MLPBlock
from .activity import MAGNITUDE, BlockScorer, check_activity, check_target, threshold_for
from .record import LayerStats

CHUNK_ROWS = 4096  # rows scored at a time, so no (rows x d_ff) float64 copy is ever made


def layer_scores(block: MLPBlock, x: torch.Tensor, criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, scores), both (n, d_ff) float32, of ``block`` on rows ``x`` under ``criterion``."""
    scorer = BlockScorer(block)
    hs, ss = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], CHUNK_ROWS):
            h, gate = scorer.hidden(x[i:i + CHUNK_ROWS])
            hs.append(h)
            ss.append(scorer.scores(criterion, h, gate))
    return torch.cat(hs), torch.cat(ss)


def _chunked_sum(t: torch.Tensor, fn) -> torch.Tensor:
    out = torch.zeros(t.shape[1], dtype=torch.float64)
    for i in range(0, t.shape[0], CHUNK_ROWS):
        out += fn(t[i:i + CHUNK_ROWS]).double().sum(0)
    return out


def derive_stats(blocks: dict[str, MLPBlock], rows: dict[str, LayerStats], criterion: str, targets,
                 keep_samples: bool = True, progress: bool | None = None) -> dict[float, dict[str, LayerStats]]:
    """{target: {block name: LayerStats}} under ``criterion`` ("contribution" or "cats"), each layer's
    threshold calibrated on its recorded rows for that target sparsity. ``keep_samples``: also keep the
    per-row active masks (MGS trains on them; SIBS needs only the counts)."""
    from .progress import Stage

    check_activity(criterion)
    if criterion not in MAGNITUDE:
        raise ValueError(f"activity {criterion!r} has no threshold to calibrate; use one of {list(MAGNITUDE)}")
    targets = [check_target(t) for t in targets]
    if not targets:
        raise ValueError("targets: give at least one target sparsity")
    out: dict[float, dict[str, LayerStats]] = {t: {} for t in targets}
    with Stage(f"calibrating {criterion} thresholds", len(blocks), "layers", progress) as stage:
        for name, block in blocks.items():
            base = rows.get(name)
            if base is None or base.samples_x is None or base.samples_x.shape[0] == 0:
                raise ValueError(f"{name}: no recorded calibration rows to calibrate an activity threshold on "
                                 "(record with max_samples >= 1)")
            x = base.samples_x
            batch = base.samples_batch if base.samples_batch is not None else torch.zeros(x.shape[0], dtype=torch.int64)
            h, scores = layer_scores(block, x, criterion)
            eps = base.eps
            common = {"act_sum": _chunked_sum(h, lambda t: t), "sq_sum": _chunked_sum(h, torch.square),
                      "near_zero_count": (h.abs() <= eps).sum(0)}
            groups, inverse = torch.unique(batch, return_inverse=True)
            for t in targets:
                thr = threshold_for(scores, t)
                active = scores > thr
                s = LayerStats(name, base.d_model, base.d_ff, base.activation, eps, max_samples=base.max_samples,
                               activity=criterion, threshold=thr, target_sparsity=t)
                s.n_tokens, s.n_batches = x.shape[0], len(groups)
                s.fire_count = active.sum(0)
                s.act_sum, s.sq_sum, s.near_zero_count = common["act_sum"], common["sq_sum"], common["near_zero_count"]
                s.inactive_sum = _chunked_sum(torch.where(active, 0.0, h), lambda v: v)
                per_batch = torch.zeros(len(groups), base.d_ff).index_add_(0, inverse, active.float()) > 0
                s.union_sum = per_batch.float().mean(1).sum().item()
                s.samples_x, s.samples_batch = x, batch
                s.samples_active = active if keep_samples else None
                out[t][name] = s
            del h, scores
            stage.advance()
    return out
