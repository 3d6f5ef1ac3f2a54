"""A rich progress bar showing loss, tokens/s and validation loss (silent when disabled)."""
from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "train"):
        self.enabled = enabled
        if not enabled:
            return
        self._bar = RichProgress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
        self._task = self._bar.add_task(label, total=total, completed=start, info="")
        self._bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float, val_loss: float | None = None) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s"
        if val_loss is not None:
            info += f"  val {val_loss:.3f}"
        self._bar.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if self.enabled:
            self._bar.stop()
