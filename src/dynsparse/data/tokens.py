"""Token arrays on disk (np.memmap) and the random windows the trainer reads from them.

``prepare_tokens`` encodes each split block by block and appends to a flat binary file, so neither
the text nor the tokens of a corpus need to fit in RAM. The result lives in a cache directory keyed
by the source's fingerprint and the tokenizer, built in a temporary directory and renamed into place
(a crash never leaves a half-written cache that looks complete).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .text import SPLITS, UNDECODABLE, TextSource, warn_undecodable
from .tokenizer import load_tokenizer, train_bpe

FORMAT_VERSION = 1
ENCODE_BATCH = 64


def default_cache_dir() -> Path:
    return Path(os.environ.get("DYNSPARSE_CACHE", Path.home() / ".cache" / "dynsparse"))


@dataclass
class TokenData:
    """A tokenized corpus: its tokenizer and one memory-mapped uint16/uint32 array per split."""

    path: Path
    tokenizer: object  # PreTrainedTokenizerFast
    splits: dict[str, np.ndarray]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def check_length(self, seq_len: int) -> None:
        """Every split must hold at least one window of seq_len + 1 tokens."""
        for name, arr in self.splits.items():
            if len(arr) < seq_len + 1:
                raise ValueError(
                    f"the {name} split has {len(arr)} tokens, fewer than one sequence of {seq_len}+1: "
                    "use more text or a shorter --seq-len"
                )


def prepare_tokens(source: TextSource, vocab_size: int = 2048, tokenizer_dir: str | None = None,
                   cache_dir: str | Path | None = None) -> TokenData:
    """Tokenize ``source`` once (train a BPE on its train split unless ``tokenizer_dir`` is given)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    tok_key = f"dir:{Path(tokenizer_dir).resolve()}" if tokenizer_dir else f"bpe:{vocab_size}"
    key = hashlib.sha256(f"{FORMAT_VERSION}|{source.fingerprint}|{tok_key}".encode()).hexdigest()[:16]
    target = cache_dir / f"tokens-{key}"
    if not (target / "meta.json").exists():
        clean_stale_builds(cache_dir)
        _build(source, vocab_size, tokenizer_dir, cache_dir, target)
    data = load_tokens(target)
    meta = json.loads((target / "meta.json").read_text())
    for path, share in meta.get("undecodable", {}).items():  # a binary corpus warns on every run, cached or not
        warn_undecodable(path, share)
    return data


BUILDING = ".building"  # flock-ed by the process that fills a temporary cache folder


def clean_stale_builds(cache_dir: Path, min_age_s: float = 60.0) -> list[Path]:
    """Remove ``.tokens-*`` folders that a killed build left: their ``.building`` lock is free (a folder
    without one counts once it is older than ``min_age_s``, the moment between mkdtemp and the lock)."""
    import fcntl
    import time

    removed = []
    for tmp in Path(cache_dir).glob(".tokens-*") if Path(cache_dir).is_dir() else []:
        lock = tmp / BUILDING
        try:
            if not lock.exists():
                if time.time() - tmp.stat().st_mtime < min_age_s:
                    continue
            else:
                with lock.open("rb") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live build
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        except OSError:
            continue
    return removed


def load_tokens(path: Path) -> TokenData:
    meta = json.loads((path / "meta.json").read_text())
    tokenizer = load_tokenizer(path / "tokenizer")
    splits = {s: np.memmap(path / f"{s}.bin", dtype=meta["dtype"], mode="r", shape=(meta["tokens"][s],))
              if meta["tokens"][s] else np.zeros(0, dtype=meta["dtype"]) for s in SPLITS}
    return TokenData(path, tokenizer, splits)


def _build(source, vocab_size, tokenizer_dir, cache_dir: Path, target: Path) -> None:
    import fcntl

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokens-", dir=cache_dir))
    building = (tmp / BUILDING).open("wb")
    fcntl.flock(building, fcntl.LOCK_EX)  # held until this build ends, so clean_stale_builds leaves it alone
    try:
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else train_bpe(source.blocks("train"), vocab_size)
        tok.save_pretrained(str(tmp / "tokenizer"))
        dtype = np.uint16 if len(tok) <= 2**16 else np.uint32
        counts = {s: _encode_to_file(tok, source.blocks(s), tmp / f"{s}.bin", dtype) for s in SPLITS}
        if counts["train"] == 0:
            raise ValueError(f"corpus is empty after tokenization: {source.name}")
        meta = {"version": FORMAT_VERSION, "source": source.name, "dtype": np.dtype(dtype).name,
                "tokens": counts, "vocab_size": len(tok),
                "undecodable": {str(f): UNDECODABLE[str(f)] for f in source.files if str(f) in UNDECODABLE}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / BUILDING).unlink()
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        building.close()


def _encode_to_file(tok, blocks, path: Path, dtype) -> int:
    n = 0
    with path.open("wb") as f:
        batch = []
        for block in blocks:
            batch.append(block)
            if len(batch) == ENCODE_BATCH:
                n += _write(tok, batch, f, dtype)
                batch = []
        if batch:
            n += _write(tok, batch, f, dtype)
    return n


def _write(tok, texts, f, dtype) -> int:
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    arr = np.fromiter((i for seq in ids for i in seq), dtype=dtype)
    f.write(arr.tobytes())
    return len(arr)


def sample_windows(tokens: np.ndarray, batch: int, seq_len: int, seed: int, step: int):
    """``batch`` random windows (x, y = x shifted by one) drawn from (seed, step) alone, so a resumed
    run, or any DDP rank taking its slice of the global batch, sees exactly the same data."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None):
    """Consecutive non-overlapping windows covering a split (for perplexity), as (x, y) tensors."""
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    rows = np.asarray(tokens[: n * seq_len + 1], dtype=np.int64)
    x = torch.from_numpy(rows[:-1].reshape(n, seq_len).copy())
    y = torch.from_numpy(rows[1:].reshape(n, seq_len).copy())
    return x, y


def spread_windows(tokens: np.ndarray, n_tokens: int, seq_len: int) -> torch.Tensor:
    """(windows, seq_len) int64 ids: about ``n_tokens`` tokens in windows spread evenly over ``tokens``
    (calibration text: a prefix of a split is one play or one document)."""
    seq = min(seq_len, n_tokens, len(tokens))
    if seq < 1:
        raise ValueError(f"no windows to take: {len(tokens)} tokens, n_tokens {n_tokens}, seq_len {seq_len}")
    starts = np.linspace(0, len(tokens) - seq, max(1, min(n_tokens, len(tokens)) // seq)).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq], dtype=np.int64) for s in starts]))
