"""Small real inputs for the CLI robustness tests (a finished tiny tree run, a tiny DETR with COCO data and
SIBS gates), plus a runner that calls ``dynsparse.cli.main`` in-process and says how it ended."""
from __future__ import annotations

import hashlib
import io
import os
import signal
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

CORPUS = "".join(f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}.\n" for i in range(600))
TINY = ["--ff", "tree", "--d-model", "16", "--n-layer", "1", "--n-head", "2", "--depth", "2", "--vocab-size", "260",
        "--seq-len", "8", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--telemetry-every", "2",
        "--ckpt-every", "2", "--no-progress", "--no-tensorboard"]


def train_argv(corpus: Path, out: Path, cache: Path, steps: int = 4) -> list[str]:
    return ["train", *TINY, "--max-steps", str(steps), "--data", str(corpus), "--cache-dir", str(cache), "--out", str(out)]


@dataclass
class Outcome:
    kind: str  # "ok" (exit 0), "clear" (exit 2 with one error line), "unclear" (any other exit), "traceback", "hang"
    code: int | None
    err: str
    out: str = ""
    exc: BaseException | None = None

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ": error: " in ln]


class _Hang(BaseException):
    pass


def run_cli(argv: list[str], timeout_s: int = 120) -> Outcome:
    """``main(argv)`` in this process, stdout/stderr captured; an exception out of main is a traceback."""
    from dynsparse.cli import main
    from dynsparse.data import text

    text._WARNED.clear()  # as in a fresh process: each command warns about a file that is not text
    out, err = io.StringIO(), io.StringIO()

    def alarm(*_):
        raise _Hang

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout_s)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
    except SystemExit as e:  # argparse's own usage errors (exit 2, usage + one error line)
        code = e.code if isinstance(e.code, int) else 1
    except _Hang:
        return Outcome("hang", None, err.getvalue(), out.getvalue())
    except BaseException as e:  # noqa: BLE001 - the point is to see everything that escapes
        return Outcome("traceback", None, err.getvalue() + f"\n{type(e).__name__}: {e}", out.getvalue(), e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    e = err.getvalue()
    if code == 0:
        return Outcome("ok", 0, e, out.getvalue())
    lines = [ln for ln in e.splitlines() if "error: " in ln]
    kind = "clear" if code == 2 and len(lines) == 1 and "Traceback" not in e else "unclear"
    return Outcome(kind, code, e, out.getvalue())


def snapshot(root: Path, skip: tuple[Path, ...] = (), fast: bool = False) -> dict[str, str]:
    """Relative path -> sha256 (or "<dir>") of everything under ``root`` outside ``skip``; ``fast`` uses
    (size, mtime, inode) instead of the content (any write changes the mtime)."""
    root, skip = Path(root), tuple(Path(s).resolve() for s in skip)
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if any(d.resolve() == s or s in d.resolve().parents for s in skip):
            dirnames[:] = []
            continue
        found[str(d.relative_to(root))] = "<dir>"
        for f in filenames:
            p = d / f
            if any(p.resolve() == s for s in skip):
                continue
            if fast:
                st = p.stat()
                found[str(p.relative_to(root))] = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
            else:
                found[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def make_world(root: Path) -> dict[str, Path]:
    """The user's files every robustness test starts from: corpus, finished tiny tree and dense runs, a tiny
    DETR, a COCO set, SIBS gates for that DETR, a folder of unrelated files and a plain file."""
    import torch
    from transformers import DetrForObjectDetection

    from dynsparse.cli import main
    from dynsparse.detection.model import small_detr_config, small_detr_processor
    from dynsparse.detection.synthetic import CLASSES, make_synthetic_coco

    root.mkdir(parents=True, exist_ok=True)
    w = {"root": root, "corpus": root / "c.txt", "cache": root / "cache", "run": root / "run",
         "detr": root / "detr", "coco": root / "coco", "gates": root / "gates", "mine": root / "mine",
         "file": root / "notes.txt"}
    w["corpus"].write_text(CORPUS)
    w["dense"] = root / "dense"
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        assert main(train_argv(w["corpus"], w["run"], w["cache"])) == 0
        dense = train_argv(w["corpus"], w["dense"], w["cache"], steps=2)
        dense[dense.index("--ff") + 1] = "dense"
        assert main(dense) == 0
    make_synthetic_coco(w["coco"], n_train=16, n_val=2, seed=1)
    torch.manual_seed(0)
    cfg = small_detr_config(dict(enumerate(CLASSES)), d_model=16, layers=1, d_ff=32, num_queries=4)
    DetrForObjectDetection(cfg).save_pretrained(w["detr"])
    small_detr_processor().save_pretrained(w["detr"])
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        assert main(["sparsify", "--model", str(w["detr"]), "--method", "sibs", "--target-sparsity", "0.5",
                     "--calib", str(w["coco"]), "--calib-limit", "4", "--out", str(w["gates"])]) == 0
    w["mine"].mkdir()
    (w["mine"] / "thesis.tex").write_text("years of work")
    w["file"].write_text("a plain file")
    return w
