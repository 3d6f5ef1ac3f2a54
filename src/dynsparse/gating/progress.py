"""Progress of the long steps of sparsification (recording, calibration, gate training), on stderr.

On a terminal each stage is a rich bar; elsewhere (a log file, a pipe) a plain line every ``every_s``
seconds and one when the stage ends, so a long run never sits silent. ``progress=False`` (or
``DYNSPARSE_PROGRESS=0``) turns both off; ``None`` means on.
"""
from __future__ import annotations

import os
import sys
import time


def enabled(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    return os.environ.get("DYNSPARSE_PROGRESS", "1") not in ("0", "false", "no", "")


class Stage:
    """``with Stage("recording", total=24, unit="batches") as st: ... st.advance()``."""

    def __init__(self, description: str, total: int, unit: str = "", progress: bool | None = None,
                 every_s: float = 15.0):
        self.description, self.total, self.unit = description, int(total), unit
        self.on = enabled(progress)
        self.every_s = every_s
        self.done = 0
        self.info = ""
        self._bar = None

    def __enter__(self) -> "Stage":
        self._t0 = self._last = time.perf_counter()
        if self.on and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn(f"[bold]{self.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(self.unit), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=Console(stderr=True))
            self._task = self._bar.add_task(self.description, total=self.total, info="")
            self._bar.start()
        return self

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        if info is not None:
            self.info = info
        if not self.on:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=self.info)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self._printed = self.done
        unit = f" {self.unit}" if self.unit else ""
        info = f"  {self.info}" if self.info else ""
        print(f"{self.description}: {self.done}/{self.total}{unit} ({now - self._t0:.0f} s){info}",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.on and exc[0] is None and getattr(self, "_printed", None) != self.done:
            self._line(time.perf_counter())
