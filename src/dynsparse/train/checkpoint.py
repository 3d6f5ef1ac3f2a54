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


def load_checkpoint(path: Path) -> dict:
    """{"model": state dict, "optimizer": ..., "rng": ..., "state": {...}} after verifying the manifest."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} has a corrupt manifest.json") from None
    for name, digest in manifest.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt or truncated (checksum mismatch)")
    return {
        "model": load_file(path / "model.safetensors"),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "rng": torch.load(path / "rng.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
    }


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
