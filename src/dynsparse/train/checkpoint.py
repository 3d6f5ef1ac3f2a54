"""Checkpoints: everything needed to continue a run exactly, written so a crash never corrupts one.

``<run>/checkpoints/step_N/`` holds ``model.safetensors`` (weights and the tree layers' routing
counters), ``optimizer.pt`` (AdamW state; loaded with ``weights_only=True``), ``rng.pt`` and
``state.json`` (step, tokens seen; the data position is the step, since batches are a function of
(seed, step)). It is written to a temporary directory, its files' SHA-256 go into ``manifest.json``
last, then the directory is renamed into place. Loading verifies the manifest, so a truncated or
corrupt checkpoint is reported as such, and older checkpoints are only deleted after a newer one is
complete.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or from another configuration."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, model_state: dict, optim_state: dict, state: dict, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    with atomic_dir(final) as tmp:
        # Tied weights share storage; safetensors stores each tensor once, so clone to contiguous copies.
        save_file({k: v.detach().contiguous().clone() for k, v in model_state.items()}, tmp / "model.safetensors")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
        files = ["model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
        (tmp / "manifest.json").write_text(json.dumps({f: _sha256(tmp / f) for f in files}))
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")


def load_checkpoint(path: Path) -> dict:
    """{"model": state dict, "optimizer": ..., "rng": ..., "state": {...}} after verifying the manifest.
    Anything unreadable (a rewritten manifest, a file that is not what its name says) is a CheckpointError."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise CheckpointError(f"checkpoint {path} has a corrupt manifest.json") from None
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        raise CheckpointError(f"checkpoint {path} has a corrupt manifest.json (not a mapping of file: checksum)")
    missing = [f for f in FILES if f not in manifest]
    if missing:
        raise CheckpointError(f"checkpoint {path}: manifest.json does not list {', '.join(missing)}")
    for name, digest in manifest.items():
        f = path / name
        if "/" in name or "\\" in name or not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt or truncated (checksum mismatch)")
    out = {}
    for key, name, read in (("model", "model.safetensors", lambda f: load_file(f)),
                            ("optimizer", "optimizer.pt", lambda f: torch.load(f, weights_only=True)),
                            ("rng", "rng.pt", lambda f: torch.load(f, weights_only=True)),
                            ("state", "state.json", lambda f: json.loads(f.read_text()))):
        try:
            out[key] = read(path / name)
        except Exception as e:  # safetensors, pickle and JSON each raise their own error types
            raise CheckpointError(f"checkpoint {path}: {name} is unreadable ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'})") from None
    _check_contents(path, out)
    return out


def _check_contents(path: Path, ck: dict) -> None:
    state, optim, rng = ck["state"], ck["optimizer"], ck["rng"]
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool)
                                              and state[k] >= 0 for k in ("step", "tokens")):
        raise CheckpointError(f"checkpoint {path}: state.json lacks a step and a token count")
    if not isinstance(optim, dict) or not {"state", "param_groups"} <= set(optim):
        raise CheckpointError(f"checkpoint {path}: optimizer.pt holds no optimizer state")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise CheckpointError(f"checkpoint {path}: rng.pt holds no random-number state")
    if not all(isinstance(v, torch.Tensor) for v in ck["model"].values()):
        raise CheckpointError(f"checkpoint {path}: model.safetensors holds no weights")


def move_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint to ``corrupt-step_N`` (``-2``, ... if taken) beside it: out of the way of
    resuming and of the keep-last-N rotation, never deleted."""
    path = Path(path)
    target, i = path.with_name(f"corrupt-{path.name}"), 1
    while target.exists():
        i += 1
        target = path.with_name(f"corrupt-{path.name}-{i}")
    path.rename(target)
    return target


def load_latest_checkpoint(run_dir: Path, restore=None, move=True, note=None) -> dict | None:
    """The newest intact checkpoint of a run (None when it has none), after ``restore(ck, path)`` accepted it.

    A newer checkpoint that fails to load (or that ``restore`` rejects with a CheckpointError) is named,
    via ``note``, and with ``move`` renamed aside (``move_aside``). When no checkpoint is intact nothing is
    moved and the newest one's error is raised."""
    failed = []
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            ck = load_checkpoint(path)
            if restore is not None:
                restore(ck, path)
        except CheckpointError as e:
            failed.append((path, e))
            continue
        for bad, e in failed:
            where = move_aside(bad) if move else bad
            if note is not None:
                note(f"{e}; resuming from {path} instead" + (f" (the corrupt one is kept as {where})" if move else ""))
        return ck
    if failed:
        more = f" (and {len(failed) - 1} older one(s) fail too)" if len(failed) > 1 else ""
        raise CheckpointError(f"{failed[0][1]}{more}: no intact checkpoint to resume from")
    return None


def check_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """A key or shape mismatch means the checkpoint belongs to another configuration: say which."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape mismatch at {bad[0]}: checkpoint {tuple(state[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}")
        raise CheckpointError(f"checkpoint {source} does not fit this model's configuration ({detail})")
