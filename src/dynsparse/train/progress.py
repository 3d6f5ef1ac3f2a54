"""A rich progress bar showing loss, tokens/s, FF active fraction and validation loss (silent when disabled)."""
from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "train",
                 ff_active: float | None = None):
        self.enabled = enabled
        self.ff_active = ff_active  # the model's FF active fraction (fixed by its architecture)
        if not enabled:
            return
        self._bar = RichProgress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
        self._task = self._bar.add_task(label, total=total, completed=start, info="")
        self._bar.start()

    def info(self, loss: float, tokens_per_s: float, val_loss: float | None = None) -> str:
        text = f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s"
        if self.ff_active is not None:
            text += f"  FF active {self.ff_active:.1%}"
        if val_loss is not None:
            text += f"  val {val_loss:.3f}"
        return text

    def update(self, step: int, loss: float, tokens_per_s: float, val_loss: float | None = None) -> None:
        if not self.enabled:
            return
        self._bar.update(self._task, completed=step, info=self.info(loss, tokens_per_s, val_loss))

    def close(self) -> None:
        if self.enabled:
            self._bar.stop()
