"""Atomic writes: a reader (or a crash) never sees a half-written file or folder.

Everything is written beside its target under a temporary name and moved into place with
``os.replace``; a replaced folder is set aside first and removed only after the new one is in place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target``
    (replacing any folder there), on error it is deleted and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_TMP_SUFFIX = r"[a-z0-9_]{8}"  # tempfile's random part


def recover(parent: str | Path, accept) -> list[str]:
    """Finish or undo what a killed ``atomic_dir`` / ``atomic_write_text`` left in ``parent``, for the
    targets whose name ``accept(name)`` is true: a target moved aside but never replaced is put back, and
    every temporary is removed. Call it only while no other process writes there (under its lock).
    Returns one line per action."""
    import re

    parent = Path(parent)
    if not parent.is_dir():
        return []
    done = []
    old = re.compile(rf"^\.(.+)\.old\.{_TMP_SUFFIX}$")
    new = re.compile(rf"^\.(.+)\.{_TMP_SUFFIX}$")
    for p in sorted(parent.iterdir()):
        m = old.match(p.name)
        if not m or not accept(m.group(1)) or not p.is_dir():
            continue
        target, kept = parent / m.group(1), p / m.group(1)
        if not target.exists() and kept.exists():
            os.replace(kept, target)
            done.append(f"restored {target} (a replacement was interrupted)")
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed the temporary {p}")
    for p in sorted(parent.iterdir()):
        m = new.match(p.name)
        if not m or old.match(p.name) or not accept(m.group(1)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(f"removed the temporary {p}")
    return done
