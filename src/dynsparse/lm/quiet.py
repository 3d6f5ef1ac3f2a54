"""transformers' own progress bars off while dynsparse works: its status lines (or --no-progress)
already say what is happening, and a shard-writing bar per saved run floods a study's log."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def hf_bars_off() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
