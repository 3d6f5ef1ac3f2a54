"""TensorBoard scalars next to metrics.jsonl, when ``tensorboard`` is installed (``<run>/tensorboard/``).

The same numbers as the JSONL logs: ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``val/loss``,
``val/ppl``, ``ff/active_fraction`` and ``ff/flops_per_token``, and per tree layer (plus their mean)
``tree/<layer>/{dead_fraction,static_fraction,path_entropy,effective_leaves}``. A resumed run passes
``purge_step`` so the steps it repeats after its checkpoint replace the ones logged before the
interruption instead of doubling them. Each write is flushed, so a killed run leaves readable events.
"""
from __future__ import annotations

import sys
from pathlib import Path

METRICS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
           "val_loss": "val/loss", "val_ppl": "val/ppl"}
TREE_KEYS = ("dead_fraction", "static_fraction", "path_entropy", "effective_leaves")


def summary_writer_class():
    """torch's SummaryWriter, or None when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


class TensorBoardLog:
    """Writes scalars when enabled and importable; every method is a no-op otherwise."""

    def __init__(self, run: Path, enabled: bool = True, resume_step: int | None = None, ff: dict | None = None):
        self.writer = None
        if not enabled:
            return
        writer_cls = summary_writer_class()
        if writer_cls is None:
            print("dynsparse: tensorboard not installed; metrics go to metrics.jsonl only "
                  "(pip install tensorboard to get TensorBoard logs)", file=sys.stderr)
            return
        # purge_step = first step the resumed run writes again: events at or after it are dropped.
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = writer_cls(log_dir=str(Path(run) / "tensorboard"), purge_step=purge)
        self.ff = {f"ff/{k.removeprefix('ff_')}": v for k, v in (ff or {}).items()}

    def metrics(self, record: dict) -> None:
        """One metrics.jsonl record (step, loss, lr, tokens_per_s[, val_loss, val_ppl])."""
        if self.writer is None:
            return
        step = record["step"]
        for key, tag in METRICS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        for tag, value in self.ff.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def telemetry(self, record: dict) -> None:
        """One telemetry.jsonl snapshot: the routing statistics of every tree layer, and their mean."""
        if self.writer is None or not record.get("layers"):
            return
        step, layers = record["step"], record["layers"]
        for name, stats in layers.items():
            for key in TREE_KEYS:
                self.writer.add_scalar(f"tree/{name}/{key}", stats[key], step)
        for key in TREE_KEYS:
            self.writer.add_scalar(f"tree/mean/{key}", sum(s[key] for s in layers.values()) / len(layers), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
