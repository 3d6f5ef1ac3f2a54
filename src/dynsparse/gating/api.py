"""``sparsify_(model, MGSConfig | SIBSConfig | CATSConfig, calib=...)``: record, fit and install, in place
(torchao style).

What a method learns per block is a handful of tensors (SIBS: kept indices + bias shift; MGS: gate
weights, threshold, compensation; CATS: a threshold and optional compensation). They are kept in a ``GateSet`` keyed by the block names of the
*dense* model, saved as one safetensors file (``gates.safetensors``) with the method, config and
per-layer shapes in its metadata, and re-applied to a freshly loaded dense model by ``load_gates``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_dir
from ..mlps import FilterFn, find_mlps
from .cats import CATSConfig, build_cats, cats_tensors
from .lowbit import check_tensors as check_lowbit
from .mgs import MGSConfig, build_gated, mgs_tensors_all
from .record import LayerStats, activation_name, record_activations
from .sibs import SIBSConfig, build_sliced, sibs_tensors

METHODS = ("sibs", "mgs", "cats")

GATES_FILE = "gates.safetensors"
_FORMAT = "dynsparse-gates/1"


@dataclass
class GateSet:
    method: str  # "sibs", "mgs" or "cats"
    config: dict
    layers: dict[str, dict]  # block name -> {"activation", "d_model", "d_ff"}
    tensors: dict[str, dict[str, torch.Tensor]]  # block name -> tensors
    report: dict[str, dict] = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``out_dir/gates.safetensors`` atomically (temp file + os.replace)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        flat = {f"{name}::{k}": v.contiguous() for name, ts in self.tensors.items() for k, v in ts.items()}
        meta = {"format": _FORMAT, "method": self.method, "config": json.dumps(self.config),
                "layers": json.dumps(self.layers), "report": json.dumps(self.report)}
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
        os.close(fd)
        try:
            save_file(flat, tmp, metadata=meta)
            os.replace(tmp, out_dir / GATES_FILE)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return out_dir / GATES_FILE

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GateSet":
        path = Path(path)
        if path.is_dir():
            path = path / GATES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no gate file {path}")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            flat = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a dynsparse gate file (format {meta.get('format')!r})")
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for key, v in flat.items():
            if "::" not in key:
                raise ValueError(f"{path}: tensor {key!r} is not named <block>::<tensor>")
            name, k = key.split("::", 1)
            tensors.setdefault(name, {})[k] = v
        try:
            parsed = {k: json.loads(meta.get(k, "{}")) for k in ("config", "layers", "report")}
        except ValueError:
            raise ValueError(f"{path}: its metadata is not valid JSON") from None
        gates = cls(meta.get("method"), parsed["config"], parsed["layers"], tensors, parsed["report"])
        gates.check(str(path))
        return gates

    def check(self, source: str = "gate set") -> None:
        """Everything ``apply_gates`` relies on, so a damaged or hand-edited file is named at load time
        instead of indexing out of range or running with repeated neurons."""
        if self.method not in METHODS:
            raise ValueError(f"{source}: unknown method {self.method!r} (expected one of {', '.join(METHODS)})")
        for what in ("config", "layers", "report"):
            if not isinstance(getattr(self, what), dict):
                raise ValueError(f"{source}: its {what} metadata is not a mapping")
        if not self.layers:
            raise ValueError(f"{source}: holds no layers")
        extra = sorted(set(self.tensors) - set(self.layers))
        if extra:
            raise ValueError(f"{source}: tensors for {extra[0]!r}, which its layer list does not name")
        for name, info in self.layers.items():
            where = f"{source}: layer {name}"
            if not isinstance(info, dict) or not all(isinstance(info.get(k), int) and info[k] > 0
                                                     for k in ("d_model", "d_ff")):
                raise ValueError(f"{where}: needs positive integer d_model and d_ff")
            if not isinstance(info.get("activation"), str):
                raise ValueError(f"{where}: names no activation")
            ts = self.tensors.get(name)
            if not ts:
                raise ValueError(f"{where}: no tensors")
            for k, t in ts.items():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"{where}: {k} holds NaN or infinite values")
            if self.method == "sibs":
                _check_sibs(where, ts, info, self.report.get(name, {}))
            elif self.method == "mgs":
                _check_mgs(where, ts, info)
            else:
                _check_cats(where, ts, info)


def _config_method(config) -> str:
    if isinstance(config, SIBSConfig):
        return "sibs"
    if isinstance(config, MGSConfig):
        return "mgs"
    if isinstance(config, CATSConfig):
        return "cats"
    raise TypeError(f"config must be SIBSConfig, MGSConfig or CATSConfig, got {type(config).__name__}")


def _stats_match(s: LayerStats, activity: str, target) -> bool:
    if s.activity != activity:
        return False
    return activity == "sign" or (s.target_sparsity is not None and abs(s.target_sparsity - target) < 1e-12)


def _record(model, config, method: str, blocks, calib, stats, progress):
    """The statistics the method needs: recorded from ``calib``, or ``stats`` as given when they were
    recorded under the config's activity, or derived from their rows for it (no model pass)."""
    activity, target = config.activity, config.activity_sparsity
    if stats is None:
        if calib is None:
            raise ValueError("pass calib= (calibration batches) or stats=")
        rows = config.max_samples if method == "mgs" or activity != "sign" else 0
        return record_activations(model, calib, blocks, eps=getattr(config, "eps", 1e-3), max_samples=rows,
                                  activity=activity, target_sparsity=target if activity != "sign" else None,
                                  progress=progress)
    for name in blocks:
        if name not in stats:
            raise ValueError(f"no recorded statistics for block {name}")
    if all(_stats_match(stats[n], activity, target) for n in blocks):
        return stats
    if activity == "sign":
        raise ValueError(f"the statistics were recorded with activity {next(iter(stats.values())).activity!r}; "
                         "the config asks for 'sign': record again")
    from .thresholds import derive_stats

    return derive_stats(blocks, stats, activity, [target], keep_samples=method == "mgs", progress=progress)[target]


def fit_gates(model: nn.Module, config, calib: Iterable | None = None, filter_fn: FilterFn | None = None,
              stats: dict[str, LayerStats] | None = None, progress: bool | None = None) -> GateSet:
    """Record ``calib`` (unless ``stats`` are given) and compute the method's tensors for every block.

    ``stats`` recorded under another activity (or target) are re-derived from their recorded rows."""
    method = _config_method(config)
    blocks = find_mlps(model, filter_fn)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no recognisable MLP blocks (fc1 -> act -> fc2)")
    if method == "cats":
        plain = [n for n, b in blocks.items() if not b.gated]
        if plain:
            raise ValueError(f"CATS thresholds a gated MLP's gate projection; {plain[0]} is a plain MLP "
                             "(use SIBS or MGS with activity='cats')")
    stats = _record(model, config, method, blocks, calib, stats, progress)
    for name in blocks:
        if name not in stats:
            raise ValueError(f"no recorded statistics for block {name}")
        n = 0 if stats[name].samples_x is None else stats[name].samples_x.shape[0]
        if method == "mgs" and n < config.min_samples:  # fail before any gate is trained
            raise ValueError(f"{name}: {n} recorded calibration rows, need >= {config.min_samples} to train a gate")
    layers, tensors, report = {}, {}, {}
    for name, block in blocks.items():
        s = stats[name]
        layers[name] = {"activation": s.activation, "d_model": s.d_model, "d_ff": s.d_ff, "gated": block.gated}
    if method == "mgs":
        for name, (t, r) in mgs_tensors_all(blocks, stats, config, progress=progress).items():
            tensors[name], report[name] = t, r
    for name, block in blocks.items():
        s = stats[name]
        if method == "sibs":
            tensors[name] = sibs_tensors(block, s, config)
            kept = len(tensors[name]["kept"])
            report[name] = {"kept": kept, "removed_fraction": 1 - kept / s.d_ff, "natural_sparsity": s.sparsity}
        elif method == "cats":
            tensors[name] = cats_tensors(block, s, config)
            report[name] = {"threshold": s.threshold, "calibrated_sparsity": s.sparsity}
        if s.activity != "sign":
            report[name].update({"activity": s.activity, "activity_threshold": s.threshold,
                                 "activity_sparsity": s.sparsity})
    return GateSet(method, dataclasses.asdict(config), layers, tensors, report)


def apply_gates(model: nn.Module, gates: GateSet, backend: str = "auto") -> list[str]:
    """Install the gate set's modules in ``model`` (a dense model with the same MLP blocks); ``backend``
    is the MGS modules' execution setting (``dynsparse.ops.BACKENDS``)."""
    gates.check()
    blocks = _blocks_for(model, list(gates.layers))
    missing = [n for n in gates.layers if n not in blocks]
    if missing:
        raise ValueError(f"gate file does not match the model: no MLP block(s) {missing[:3]} in {type(model).__name__}")
    for name, info in gates.layers.items():
        b = blocks[name]
        if (b.d_model, b.d_ff) != (info["d_model"], info["d_ff"]):
            raise ValueError(f"gate file does not match the model at {name}: gates for d_model={info['d_model']}, "
                             f"d_ff={info['d_ff']}, model has {b.d_model}, {b.d_ff}")
        if activation_name(b) != info["activation"]:
            raise ValueError(f"{name}: gates were fitted for activation {info['activation']}, model has {activation_name(b)}")
        if info.get("gated", False) != b.gated:  # files written before gated blocks were supported lack the key
            raise ValueError(f"gate file does not match the model at {name}: gates for a "
                             f"{'gated' if info.get('gated') else 'plain'} MLP, the model's is "
                             f"{'gated' if b.gated else 'plain'}")
    built = {}  # every module first, so a bad tensor in a later layer leaves the model untouched
    for name, info in gates.layers.items():
        b = blocks[name]
        try:
            if gates.method == "sibs":
                built[name] = build_sliced(b, gates.tensors[name], info["activation"])
            elif gates.method == "mgs":
                built[name] = build_gated(b, gates.tensors[name], info["activation"], backend=backend)
            else:
                built[name] = build_cats(b, gates.tensors[name], info["activation"], backend=backend)
        except (RuntimeError, IndexError, KeyError) as e:  # e.g. load_state_dict's size mismatch
            msg = " ".join(str(e).split())[:200]
            raise ValueError(f"gate tensors of layer {name} do not fit its MLP block ({type(e).__name__}: {msg})") from None
    for name, new in built.items():
        b = blocks[name]
        b.replace(new.to(next(b.fc1.parameters()).device))
    return list(gates.layers)


def _blocks_for(model: nn.Module, names: list[str]) -> dict:
    """The model's MLP blocks under the gate file's names. Gates fitted on an HF base model (``dynsparse
    sparsify`` loads ``AutoModel``: "layers.0.mlp") also apply to its task model ("model.layers.0.mlp"),
    and the other way round, through ``base_model_prefix``."""
    blocks = find_mlps(model)
    if all(n in blocks for n in names):
        return blocks
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module):  # a task model, gates of its base model
        inner = find_mlps(base)
        if all(n in inner for n in names):
            return inner
    if prefix and all(n.startswith(prefix + ".") for n in names):  # a base model, gates of its task model
        stripped = {f"{prefix}.{n}": b for n, b in blocks.items()}
        if all(n in stripped for n in names):
            return stripped
    return blocks


def sparsify_(model: nn.Module, config, calib: Iterable | None = None, filter_fn: FilterFn | None = None,
              stats: dict[str, LayerStats] | None = None, progress: bool | None = None) -> GateSet:
    """Fit SIBS, MGS or CATS on ``calib`` and install it in ``model`` in place; returns the GateSet (``.save``)."""
    gates = fit_gates(model, config, calib, filter_fn, stats, progress=progress)
    apply_gates(model, gates)
    return gates


def load_gates(model: nn.Module, path: str | os.PathLike, backend: str = "auto") -> GateSet:
    """Apply a saved gate set to a freshly loaded dense ``model``."""
    gates = GateSet.load(path)
    apply_gates(model, gates, backend=backend)
    return gates


def save_sparsified_dir(gates: GateSet, out_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir`` with gates.safetensors (+ a copy of the dense model's files when ``model_dir``),
    built in a temporary sibling and moved into place only when complete. A causal LM's directory also
    gets ``auto_map`` and a modeling file (``lm.remote``), so ``AutoModelForCausalLM.from_pretrained(out_dir,
    trust_remote_code=True)`` returns the sparsified model wherever dynsparse is installed."""
    from ..lm.remote import MODELING_FILE, write_remote_code

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if model_dir is not None:
            for f in Path(model_dir).iterdir():
                if f.is_file() and f.name != MODELING_FILE:
                    shutil.copy2(f, tmp / f.name)
        gates.save(tmp)
        (tmp / "sparsify_report.json").write_text(json.dumps({"method": gates.method, "config": gates.config,
                                                               "layers": gates.report}, indent=1))
        if model_dir is not None and (tmp / "config.json").is_file():
            write_remote_code(tmp)
    return out_dir


def is_sparsified_dir(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / GATES_FILE).is_file() and (Path(model_dir) / "config.json").is_file()


def load_sparsified(model_dir: str | os.PathLike, backend: str = "auto", dtype=None) -> nn.Module:
    """The causal LM of a directory written by ``save_sparsified_dir`` (dense files + gates): the family's
    own class with the gates installed, in eval mode. The folder's own code (auto_map) is never run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not is_sparsified_dir(model_dir):
        raise ValueError(f"{model_dir} is not a sparsified model directory (config.json and {GATES_FILE})")
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, local_files_only=True,
                                                 dtype=dtype if dtype is not None else torch.float32,
                                                 trust_remote_code=False)
    load_gates(model, model_dir, backend=backend)
    return model.eval()


def _need(where: str, ts: dict, key: str, shape: tuple | None = None, integer: bool = False) -> torch.Tensor:
    if key not in ts:
        raise ValueError(f"{where}: missing tensor {key!r}")
    t = ts[key]
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, expected {shape}")
    if integer and (t.is_floating_point() or t.dtype == torch.bool or t.is_complex()):
        raise ValueError(f"{where}: {key} must hold integers, got {t.dtype}")
    if not integer and not t.is_floating_point():
        raise ValueError(f"{where}: {key} must hold floats, got {t.dtype}")
    return t


def _check_sibs(where: str, ts: dict, info: dict, report: dict) -> None:
    kept = _need(where, ts, "kept", integer=True)
    d_ff = info["d_ff"]
    if kept.dim() != 1 or kept.numel() == 0:
        raise ValueError(f"{where}: kept must be a non-empty 1-D index list, got shape {tuple(kept.shape)}")
    if int(kept.min()) < 0 or int(kept.max()) >= d_ff:
        raise ValueError(f"{where}: kept holds neuron index {int(kept.max()) if int(kept.max()) >= d_ff else int(kept.min())}, "
                         f"outside 0..{d_ff - 1}")
    if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
        raise ValueError(f"{where}: kept must list each neuron once, in increasing order (repeated or unsorted indices)")
    if isinstance(report, dict) and isinstance(report.get("kept"), int) and report["kept"] != kept.numel():
        raise ValueError(f"{where}: kept lists {kept.numel()} neurons but the file's report says {report['kept']}")
    _need(where, ts, "bias_shift", shape=(info["d_model"],))


def _check_cats(where: str, ts: dict, info: dict) -> None:
    _need(where, ts, "threshold", shape=())
    if "compensation" in ts:
        _need(where, ts, "compensation", shape=(info["d_ff"],))
    if not info.get("gated", False):
        raise ValueError(f"{where}: CATS gates are for gated MLPs, the layer says it is plain")


def _check_mgs(where: str, ts: dict, info: dict) -> None:
    d_model, d_ff = info["d_model"], info["d_ff"]
    _need(where, ts, "threshold", shape=())
    if "compensation" in ts:
        _need(where, ts, "compensation", shape=(d_ff,))
    if "gate.A" in ts:
        a = _need(where, ts, "gate.A")
        if a.dim() != 2 or a.shape[0] != d_model or a.shape[1] < 1:
            raise ValueError(f"{where}: gate.A has shape {tuple(a.shape)}, expected ({d_model}, rank)")
    elif "gate.G" in ts:
        g = _need(where, ts, "gate.G")
        if g.dim() != 2 or g.shape[0] != d_model or g.shape[1] < 1 or d_ff % g.shape[1]:
            raise ValueError(f"{where}: gate.G has shape {tuple(g.shape)}, expected ({d_model}, groups) "
                             f"with groups dividing d_ff={d_ff}")
    elif "gate.route_codes" in ts:
        check_lowbit(where, ts, d_model, d_ff, info.get("gated", False))
    else:
        raise ValueError(f"{where}: no low-rank (gate.A), grouped (gate.G) or low-bit (gate.route_codes) gate")
