"""``--data`` -> a text source: the one place that knows every kind (data flows text.py <- hf.py <- here)."""
from __future__ import annotations

from .hf import hf_source  # imports `datasets` only when such a source is read
from .text import TextSource, file_source


def text_source(spec: str) -> TextSource:
    """Resolve ``--data``: "shakespeare", a .txt/.jsonl file, a folder holding such files, or
    "hf:NAME[:CONFIG][#COLUMN]" (a Hugging Face dataset on the Hub or in a local directory)."""
    if spec.startswith("hf:"):
        return hf_source(spec)
    return file_source(spec)
