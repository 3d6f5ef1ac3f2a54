"""The rules every command that writes follows, so nothing a user has is lost.

* an output folder that holds something other than this command's own kind of output is refused
  unless ``--overwrite``; a folder no dynsparse command wrote is refused even then;
* an output never replaces (or contains) one of the command's inputs;
* a folder a live dynsparse process holds (``RunLock``) is never written or replaced by another;
* ``--out`` naming a regular file is an error, not a folder created over it.

All checks run before any long work starts, and raise ``OutputError`` (a ValueError with one line).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterable

LOCK_NAME = ".dynsparse.lock"


class OutputError(ValueError):
    """An output path that cannot be used as asked."""


# What each command writes, recognised by the file that only it writes (checked in this order: a
# sparsified or pruned folder also holds a model's config.json).
_MARKERS = (
    ("compare", "compare.json"),
    ("study", "study.json"),
    ("inspect", "inspect.md"),
    ("analyze", "analysis.json"),
    ("sparsify", "gates.safetensors"),
    ("prune", "prune_report.json"),
)
KINDS = ("run", "model", "detr-eval") + tuple(k for k, _ in _MARKERS)


def kind_of(path: str | os.PathLike) -> str | None:
    """Which dynsparse output ``path`` holds ("run", "model", "sparsify", ...), or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for kind, marker in _MARKERS:
        if (path / marker).exists():
            return kind
    config = path / "config.json"
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        return "run"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(data, dict) and {"max_steps", "preset", "ff"} <= set(data):
            return "run"
        if isinstance(data, dict) and ("model_type" in data or "architectures" in data):
            return "model"
        return None
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if entries and all(p.is_dir() and kind_of(p) == "run" for p in entries):
        return "study"  # a study stopped before its report: one run folder per variant
    return None



def _contents(path: Path) -> list[Path]:
    """The folder's entries, not counting a lock file left by a dead process."""
    return [p for p in path.iterdir() if p.name != LOCK_NAME]


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(path: Path, inputs: Iterable, arg: str) -> None:
    """``path`` must not be an input, nor a folder holding one (replacing it would delete the input)."""
    out = path.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():  # names such as "shakespeare" or "hf:..." are not paths
            continue
        inp = Path(given).resolve()
        if _is_within(inp, out):

            what = "is" if inp == out else "contains"
            raise OutputError(f"{arg} {path} {what} the input {given}; choose another {arg} (inputs are never replaced)")


def prepare_output(path: str | os.PathLike, kind: str, overwrite: bool = False, inputs: Iterable = (),
                   arg: str = "--out", reuse_own: bool = False) -> Path:
    """Check that ``path`` may receive a ``kind`` output; returns it as a Path. Nothing is written.

    ``reuse_own``: a folder already holding this kind of output is refreshed without ``--overwrite``
    (reports that are regenerated, studies and comparisons that continue)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{arg} {path} is a file, not a directory; choose a directory for {arg}")
    if not path.exists() and path.parent.exists() and not path.parent.is_dir():
        raise OutputError(f"{arg} {path}: {path.parent} is a file, not a directory")
    check_not_input(path, inputs, arg)
    if not path.exists():
        return path
    holder = live_holder_within(path)
    if holder is not None:
        where, pid = holder
        raise OutputError(f"{arg} {path}: {where} is in use by a running dynsparse process (pid {pid}); "
                          "wait for it to finish or stop it first")
    if not _contents(path):
        return path
    found = kind_of(path)
    if found == kind and reuse_own:
        return path
    what = f"a dynsparse {found} output" if found else "files that dynsparse did not write"
    if not overwrite:
        raise OutputError(f"{arg} {path} is not empty (it holds {what}): pass --overwrite to replace it, "
                          f"or choose another {arg}")
    if found is None:
        raise OutputError(f"{arg} {path} holds {what}; refusing to replace it even with --overwrite: "
                          f"choose an empty or new {arg}")
    return path


def check_output_file(path: str | os.PathLike, inputs: Iterable = (), arg: str = "--json",
                      own=lambda p: False) -> Path:
    """A single output file: its folder must exist, it must not be a folder or one of the inputs, and an
    existing file is replaced only when ``own(path)`` says it is an earlier output of the same command."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{arg} {path} is a directory; name a file")
    if not path.parent.is_dir():
        raise OutputError(f"{arg} {path}: the folder {path.parent} does not exist")
    out = path.resolve()
    for given in inputs:
        if given is None:
            continue
        inp = Path(given).resolve()
        if out == inp or (path.exists() and inp.is_dir() and inp in out.parents):
            raise OutputError(f"{arg} {path} would replace a file of the input {given}; choose another {arg}")
    if path.exists() and not own(path):
        raise OutputError(f"{arg} {path} exists and is not an earlier output of this command; choose another "
                          f"{arg} (or remove the file)")
    return path


def json_with_keys(*keys: str):
    """An ``own`` test for check_output_file: the file is a JSON object holding these keys."""
    def own(path: Path) -> bool:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and set(keys) <= set(data)
    return own


# ---------------------------------------------------------------------------------------------- lock
def _read_info(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, ValueError):
        return {"pid": "?"} if raw else {}
    return info if isinstance(info, dict) else {"pid": "?"}


def live_holder(directory: str | os.PathLike) -> int | str | None:
    """The pid holding ``directory``'s lock, or None when no live process holds it."""
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd).get("pid", "?")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def live_holder_within(path: Path) -> tuple[Path, int | str] | None:
    """A live lock in ``path`` or one of its sub-folders (a comparison or study holds runs): (where, pid)."""
    for d in [path, *(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())] if path.is_dir() else []:
        pid = live_holder(d)
        if pid is not None:
            return d, pid
    return None


class RunLock:
    """An exclusive lock on a folder, held by one process for as long as it writes there.

    The lock is ``flock`` on ``<dir>/.dynsparse.lock``, which also records the holder's pid: the kernel
    drops it when the process dies, so a lock file whose lock is free was left by a dead process (a stale
    lock). ``acquire`` takes such a lock over and says so in ``stale``; ``release`` removes the file.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None
        self.created_dir = False
        self.stale: dict | None = None

    def acquire(self) -> "RunLock":
        if self.directory.exists() and not self.directory.is_dir():
            raise OutputError(f"{self.directory} is a file, not a directory")
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            self.created_dir = True
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_info(fd).get("pid", "?")
                os.close(fd)
                raise OutputError(f"{self.directory} is in use by a running dynsparse process (pid {pid}); "
                                  "wait for it to finish or stop it first") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file after we opened it: try the new one
                os.close(fd)
                continue
            old = _read_info(fd)
            self.stale = old or None
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise OutputError(f"could not lock {self.directory}: the lock file keeps changing")

    def stale_note(self) -> str | None:
        """One line about a stale lock taken over, or None."""
        if not self.stale:
            return None
        return (f"note: {self.directory} had a stale lock from pid {self.stale.get('pid', '?')} "
                f"(since {self.stale.get('since', '?')}), which is no longer running; took it over")

    def release(self, remove_empty_dir: bool = True) -> None:
        """Drop the lock; a folder this lock created that is still empty goes too (a failed start)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
        if remove_empty_dir and self.created_dir:
            try:
                self.directory.rmdir()  # only succeeds when empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
