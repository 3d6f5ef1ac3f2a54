"""Model folders that ask to run their own Python code are refused unless the user says otherwise.

A Hugging Face folder names custom code with ``auto_map`` (config.json, tokenizer_config.json); loading
it runs that code. dynsparse's own models are registered classes and load without it, so the check
only stops foreign folders. Every loader passes ``trust_remote_code`` explicitly, so transformers
never falls back to asking on the terminal (where ``echo y |`` would answer it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

OWN_MODEL_TYPES = ("dynsparse_lm", "dynsparse_lm_pruned")
TREE_MARKER = "dynsparse_tree.json"  # a converted family's folder (lm/convert.py MARKER)
GATES_MARKER = "gates.safetensors"  # a sparsified model's folder (gating/api.py GATES_FILE)
# the auto_map lm/remote.py writes into a sparsified causal LM's config.json; dynsparse loads such a
# folder itself (gating.load_sparsified: the family's class + the gates), never through that file
SPARSIFIED_AUTO_MAP = {"AutoModelForCausalLM": "modeling_dynsparse.SparsifiedForCausalLM"}

FLAG = "--trust-remote-code"


MODEL_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer_config.json",)


def custom_code_files(model_dir: str | os.PathLike, names=MODEL_FILES) -> list[str]:
    """Files of ``model_dir`` that point at custom code (auto_map), except for dynsparse's own models."""
    model_dir = Path(model_dir)
    found = []
    for name in names:
        f = model_dir / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # the loader itself reports an unreadable file
        if not isinstance(data, dict):
            continue
        if name == "config.json" and (data.get("model_type") in OWN_MODEL_TYPES or (model_dir / TREE_MARKER).is_file()):
            # Ours (lm/remote.py writes auto_map for stock tools): dynsparse loads them with its own registered
            # classes, or rebuilds a converted family itself, so the folder's code is never run.
            return []
        if name == "config.json" and (model_dir / GATES_MARKER).is_file() and data.get("auto_map") == SPARSIFIED_AUTO_MAP:
            from .lm.remote import has_own_modeling_file

            if has_own_modeling_file(model_dir):
                continue
        if data.get("auto_map"):
            found.append(name)
    return found


def check_remote_code(model_dir: str | os.PathLike, trust: bool, how: str = f"pass {FLAG} to allow it",
                      names=MODEL_FILES) -> bool:
    """Raise a one-line ValueError when ``model_dir`` wants to run its own code and ``trust`` is off;
    returns the ``trust_remote_code`` value to pass to ``from_pretrained``."""
    if trust:
        return True
    files = custom_code_files(model_dir, names)

    if files:
        raise ValueError(f"{model_dir} asks to run its own Python code (auto_map in {', '.join(files)}); "
                         f"dynsparse does not run a model's code unless told to: {how}")
    return False
