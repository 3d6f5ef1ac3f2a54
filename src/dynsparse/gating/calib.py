"""Load a saved model and its calibration batches for the commands: a DETR directory (COCO-format
calibration data) or any HF text model (a text file, one example per line, a folder of .txt/.md files, or
``shakespeare``: the built-in plays, the default)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def model_kind(model_dir: str | os.PathLike) -> str:
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a saved HF model directory")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    return "detr" if model_type == "detr" else "text"


def load_model(model_dir: str | os.PathLike, trust_remote_code: bool = False):
    """(model in eval mode, processor or tokenizer, kind). A folder that asks to run its own code is
    refused unless ``trust_remote_code``."""
    from ..remote_code import check_remote_code

    kind = model_kind(model_dir)
    if kind == "detr":
        from ..detection.model import load_detr

        model, proc = load_detr(model_dir)
        return model, proc, kind
    from transformers import AutoModel, AutoTokenizer

    trust = check_remote_code(model_dir, trust_remote_code)
    if _is_own_lm(model_dir):  # dynsparse's LM (or a converted one): AutoModel has no base class for it
        from ..lm.convert import load_model as load_lm

        model = load_lm(model_dir)
    else:
        model = AutoModel.from_pretrained(model_dir, trust_remote_code=trust)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust), kind


def _is_own_lm(model_dir) -> bool:
    from ..remote_code import OWN_MODEL_TYPES, TREE_MARKER

    if (Path(model_dir) / TREE_MARKER).is_file():
        return True
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") in OWN_MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


BUILTIN_TEXT = "shakespeare"


def default_calib(kind: str):
    """What a command calibrates on without --calib: the built-in synthetic COCO set for DETR, the built-in
    Shakespeare for text models."""
    if kind == "detr":
        from ..detection.synthetic import default_synthetic_root

        return default_synthetic_root()
    return BUILTIN_TEXT


def _builtin_lines(split: str, limit: int | None) -> list[str]:
    """Lines of the built-in plays' ``split``, evenly spaced over the whole split (not one play's opening)."""
    from ..data.shakespeare import shakespeare_splits

    splits = shakespeare_splits()
    if split not in splits:
        raise ValueError(f"the built-in {BUILTIN_TEXT} calibration text has splits {', '.join(splits)}, not {split!r}")
    lines = [ln for _, text in splits[split] for ln in _examples(text)]
    if limit is not None and 0 < limit < len(lines):
        lines = [lines[i * len(lines) // limit] for i in range(limit)]
    return lines


def _examples(text: str) -> list[str]:
    """A text's calibration examples: its lines of three words or more (speaker tags and stage directions go)."""
    return [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 3]


def _text_lines(path: Path) -> list[str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md"))
    if not files:
        raise ValueError(f"calibration path {path} has no .txt/.md files")
    lines = []
    for f in files:
        lines += _examples(f.read_text(errors="replace"))
    return lines


def calib_batches(kind: str, proc, data: str | os.PathLike, batch_size: int = 8, limit: int | None = None,
                  split: str = "train", max_length: int = 128) -> list:
    """Calibration batches (dicts of model inputs); raises ValueError when there is nothing to calibrate on."""
    if kind != "detr" and str(data) == BUILTIN_TEXT:
        return _text_batches(proc, _builtin_lines(split, limit), batch_size, max_length)
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"calibration data {data} does not exist")
    if kind == "detr":
        from ..detection.coco import CocoDetection, make_collate

        ds = CocoDetection(data, split, limit=limit)
        collate = make_collate(proc, with_labels=False)
        out = [collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))]) for i in range(0, len(ds), batch_size)]
    else:
        out = _text_batches(proc, _text_lines(data)[:limit], batch_size, max_length)
    if not out:
        empty = data.is_file() and data.stat().st_size == 0
        raise ValueError(f"calibration data {data} " + ("is empty" if empty else "has no text lines to calibrate on"))
    return out


def _text_batches(proc, lines: list[str], batch_size: int, max_length: int) -> list:
    out = []
    for i in range(0, len(lines), batch_size):
        enc = proc(lines[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({k: enc[k] for k in ("input_ids", "attention_mask")})
    return out
