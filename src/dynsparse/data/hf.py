"""Hugging Face datasets as a text source: ``--data hf:NAME[:CONFIG][#COLUMN]``.

NAME is a dataset on the Hub (``hf:wikitext:wikitext-2-raw-v1``; needs a network connection the first
time, then the HF cache serves it) or a local directory: one saved by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``, or a folder of data files that ``datasets.load_dataset`` reads (.txt,
.jsonl/.json, .csv, .parquet; files named train/validation/test become those splits). COLUMN is the
text column, "text" by default.

Splits: the dataset's own "validation" (or "valid"/"val"/"dev") and "test" splits are used as they
are; a missing one is carved out of "train" by the same block rule as any user text (block i goes to
val when i % 20 == 1, to test when i % 20 == 2), so a dataset with only a train split splits 90/5/5
and one with train + validation gives 5 % of train to test. A dataset without a "train" split but
with exactly one split uses that split as its corpus.

Datasets are Arrow tables memory-mapped from disk and read in batches, so a corpus larger than RAM is
never held in memory. ``datasets`` is imported only when such a source is used.
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator

from .text import SPLITS, TextSource, _blocks, _split_of

PREFIX = "hf:"
DEFAULT_COLUMN = "text"
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
READ_BATCH = 1000


@dataclass
class HFSource(TextSource):
    """A loaded dataset (split name -> ``datasets.Dataset``) and the column holding the text."""

    column: str = DEFAULT_COLUMN
    splits: dict = field(default_factory=dict)  # our split name -> the dataset's split (only those it has)

    @property
    def fingerprint(self) -> str:
        """Changes when the data change: the Arrow files backing each split (name, size, mtime)."""
        h = hashlib.sha256(f"{self.name}#{self.column}".encode())
        for split, ds in sorted(self.splits.items()):
            h.update(f"|{split}:{ds.num_rows}".encode())
            files = [Path(c["filename"]) for c in ds.cache_files]
            for f in files:
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
            if not files:  # an in-memory table: its content fingerprint
                h.update(str(getattr(ds, "_fingerprint", "")).encode())
        return h.hexdigest()[:16]

    @property
    def total_chars(self) -> int:
        return sum(ds.data.nbytes for ds in self.splits.values())

    def blocks(self, split: str) -> Iterator[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split in self.splits and split != "train":  # the dataset's own held-out split, whole
            yield from _blocks(self._texts(self.splits[split]), self._block_chars())
            return
        want = SPLITS.index(split)
        for i, block in enumerate(_blocks(self._texts(self.splits["train"]), self._block_chars())):
            s = _split_of(i)
            if SPLITS[s] in self.splits and s != 0:  # that split comes from the dataset itself
                s = 0
            if s == want:
                yield block

    def _block_chars(self) -> int:
        return max(200, min(1_000_000, self.splits["train"].data.nbytes // 40))

    def _texts(self, ds) -> Iterator[str]:
        for batch in ds.select_columns([self.column]).iter(batch_size=READ_BATCH):
            for text in batch[self.column]:
                if text:
                    yield text


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """"hf:NAME[:CONFIG][#COLUMN]" -> (NAME, CONFIG or None, COLUMN). A NAME that exists on disk is a
    local directory and takes no CONFIG (so paths may hold ':')."""
    rest = spec.removeprefix(PREFIX)
    rest, _, column = rest.partition("#")
    column = column or DEFAULT_COLUMN
    if not rest:
        raise ValueError(f"empty dataset name in {spec!r}: use hf:NAME[:CONFIG][#COLUMN] or hf:/path/to/dir")
    if Path(rest).expanduser().exists():
        return rest, None, column
    name, _, config = rest.partition(":")
    return name, config or None, column


def hf_source(spec: str) -> HFSource:
    """Load (or find in the HF cache) the dataset named by ``spec`` and check its text column."""
    name, config, column = parse_spec(spec)
    dataset = _load(name, config)
    if not hasattr(dataset, "keys"):  # a single Dataset saved to disk: its one split is the corpus
        dataset = {"train": dataset}
    splits = _map_splits(dict(dataset), spec)
    for split, ds in splits.items():
        if column not in ds.column_names:
            raise ValueError(f"{spec}: no text column {column!r} in its {split} split; available columns: "
                             f"{', '.join(ds.column_names)} (pick one with hf:NAME#COLUMN)")
        dtype = getattr(ds.features[column], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise ValueError(f"{spec}: column {column!r} holds {ds.features[column]}, not text")
    if splits["train"].num_rows == 0:
        raise ValueError(f"corpus is empty: {spec} has no rows in its train split")
    local = Path(name).expanduser()
    label = str(local.resolve()) if local.exists() else name + (f":{config}" if config else "")
    return HFSource(PREFIX + label, [], column=column, splits=splits)


def _load(name: str, config: str | None):
    import datasets

    local = Path(name).expanduser()
    if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
        return datasets.load_from_disk(str(local))
    if local.exists() and not local.is_dir():
        raise ValueError(f"hf:{name} is a file; give its folder (or use --data {name} for .txt/.jsonl files)")
    if not local.exists() and name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"local dataset directory not found: {name}")
    try:
        with _hub_warnings_off():
            return datasets.load_dataset(str(local) if local.exists() else name, config)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(
            f"cannot load the HF dataset {name!r} ({reason}): loading by name needs a connection to the "
            "Hugging Face Hub (or the dataset already in the HF cache); offline, give a local directory "
            "as hf:/path/to/dir"
        ) from None
    except RuntimeError as e:  # e.g. "Dataset scripts are no longer supported": dataset code never runs here
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"cannot load the HF dataset {name!r}: {reason} (give data files or a "
                         "save_to_disk folder instead)") from None


@contextmanager
def _hub_warnings_off() -> Iterator[None]:
    """Offline, huggingface_hub logs each failed request before the error this module turns into one line."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def _map_splits(dataset: dict, spec: str) -> dict:
    """Our split name -> the dataset's split, for those the dataset has."""
    found = {}
    for ours, names in SPLIT_NAMES.items():
        for n in names:
            if n in dataset:
                found[ours] = dataset[n]
                break
    if "train" not in found:
        if len(dataset) != 1:
            raise ValueError(f"{spec}: no 'train' split to learn from (splits: {', '.join(dataset)})")
        found = {"train": next(iter(dataset.values()))}
    return found
