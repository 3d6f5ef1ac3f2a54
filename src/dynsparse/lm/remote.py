"""Make every model directory dynsparse saves loadable by stock tools that never import dynsparse.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (and so ``lm_eval --model hf``)
only knows the model types transformers ships; for any other it follows ``auto_map`` in config.json to
a Python file inside the directory. ``write_remote_code`` writes that file (it only imports dynsparse,
which must be installed, so the code that runs is the installed library's) and the matching
``auto_map``. The file is the same for every kind of directory, so transformers' module cache (keyed
by the directory's name) never holds a stale variant.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

MODELING_FILE = "modeling_dynsparse.py"
_MODULE = MODELING_FILE[:-3]
_SOURCE = '''"""Written by dynsparse: lets stock tools load this directory with trust_remote_code=True.

The classes are dynsparse's own (pip install dynsparse); this file only points transformers at them.
"""
from dynsparse.lm import DynSparseLMConfig, DynSparseLMForCausalLM  # noqa: F401
from dynsparse.dynamics.pruned_lm import PrunedDynSparseLMConfig, PrunedDynSparseLMForCausalLM  # noqa: F401
from dynsparse.lm.remote import SparsifiedForCausalLM, TreeifiedForCausalLM  # noqa: F401
'''

# model_type in config.json -> the classes auto_map names
_OWN = {
    "dynsparse_lm": ("DynSparseLMConfig", "DynSparseLMForCausalLM"),
    "dynsparse_lm_pruned": ("PrunedDynSparseLMConfig", "PrunedDynSparseLMForCausalLM"),
}


def write_remote_code(model_dir: str | os.PathLike) -> bool:
    """Add ``auto_map`` and the modeling file to a saved model directory when transformers alone cannot
    load it: our own LM types, another family whose MLPs were replaced by tree FF blocks, or a causal
    LM sparsified by ``dynsparse.gating`` (its dense files beside gates.safetensors). Returns whether
    anything was written (a plain HF model needs nothing)."""
    from ..gating.api import GATES_FILE
    from .convert import MARKER

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a saved model directory")
    config = json.loads(cfg_path.read_text())
    model_type = config.get("model_type")
    if model_type in _OWN:
        config_cls, model_cls = _OWN[model_type]
        auto_map = {"AutoConfig": f"{_MODULE}.{config_cls}", "AutoModelForCausalLM": f"{_MODULE}.{model_cls}"}
    elif (model_dir / MARKER).is_file():
        # transformers knows the config class; only the model needs rebuilding with its tree blocks.
        auto_map = {"AutoModelForCausalLM": f"{_MODULE}.TreeifiedForCausalLM"}
    elif (model_dir / GATES_FILE).is_file() and _is_causal_lm(config):
        auto_map = {"AutoModelForCausalLM": f"{_MODULE}.SparsifiedForCausalLM"}
    else:
        return False
    config["auto_map"] = auto_map
    (model_dir / MODELING_FILE).write_text(_SOURCE)
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


class TreeifiedForCausalLM:
    """Loader for a converted model of another family (GPT-2, OPT, Llama, ... with tree FF blocks):
    ``from_pretrained`` returns that family's own model class with the trees in place, as
    ``dynsparse.lm.convert.load_model`` builds it. Never instantiated itself."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype=None, torch_dtype=None, **kwargs):
        import torch

        from .convert import load_model

        model = load_model(pretrained_model_name_or_path)  # fp32; weights, config and trees from the directory
        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model.eval()

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """transformers calls this on remote classes; a loader has nothing to register."""



def has_own_modeling_file(model_dir: str | os.PathLike) -> bool:
    """Whether the directory's modeling file is exactly the one dynsparse writes (only imports dynsparse)."""
    try:
        return (Path(model_dir) / MODELING_FILE).read_text() == _SOURCE
    except (OSError, UnicodeDecodeError):
        return False


def _is_causal_lm(config: dict) -> bool:
    """Whether transformers has a causal-LM class for this config's model type."""
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    model_type = config.get("model_type")
    return model_type in CONFIG_MAPPING and CONFIG_MAPPING[model_type] in MODEL_FOR_CAUSAL_LM_MAPPING


class SparsifiedForCausalLM:
    """Loader for a causal LM sparsified by ``dynsparse.gating`` (SIBS, MGS or CATS): ``from_pretrained``
    returns the family's own model class with the gates installed, as ``dynsparse.gating.load_sparsified``
    builds it. Never instantiated itself."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype=None, torch_dtype=None, **kwargs):
        import torch

        from ..gating.api import load_sparsified

        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        return load_sparsified(pretrained_model_name_or_path, dtype=dtype or torch.float32)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """transformers calls this on remote classes; a loader has nothing to register."""
