"""Convert pretrained HF causal LMs (GPT-2, OPT, our own dense LM) to tree FF blocks, and load them back.

The published fine-tuning protocol keeps a pretrained model's attention and replaces its MLP blocks.
Our own LM converts to a plain ``ff="tree"`` config (``from_pretrained`` loads it as is). Another
family (GPT-2, OPT, ...) keeps its own config; the saved directory then carries
``dynsparse_tree.json`` (the TreeConfig and the replaced blocks) and ``load_model`` rebuilds it:
config -> model -> ``treeify_`` -> weights.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..atomic import atomic_dir
from ..tree import TreeConfig, treeify_
from ..tree.layer import MAX_DEPTH
from .config import DynSparseLMConfig
from .distill import available_bytes
from .quiet import hf_bars_off
from .remote import write_remote_code

MARKER = "dynsparse_tree.json"


def check_tree_shape(tree: TreeConfig) -> None:
    """A tree shape worth converting to: one that leaves some units idle per token (depth >= 1)."""
    if not isinstance(tree, TreeConfig):
        raise TypeError(f"tree must be a TreeConfig, got {type(tree).__name__}")
    if tree.active_fraction >= 1.0:
        raise ValueError(f"--depth {tree.depth}: a depth-{tree.depth} tree uses {tree.active_fraction:.0%} of its "
                         "units per token; a tree shape must activate less than 100 % (depth >= 1)")
    if tree.depth > MAX_DEPTH:
        raise ValueError(f"--depth {tree.depth}: at most {MAX_DEPTH}")


def check_tree_memory(blocks: dict, tree: TreeConfig, available: int | None = None) -> None:
    """Refuse, before building them, trees whose fp32 weights cannot fit in memory (a deep shape on a wide
    model is hundreds of GiB: without this the process is killed instead of told)."""
    units = tree.trees * (2 ** (tree.depth + 1) - 1)
    need = sum(units * (2 * b.d_model + 1) * 4 for b in blocks.values())
    available = available_bytes() if available is None else available
    if available is not None and need > 0.8 * available:
        raise ValueError(f"--depth {tree.depth} --trees {tree.trees}: {units:,} units per block x {len(blocks)} blocks "
                         f"hold about {need / 2**30:.1f} GiB of tree weights, more than the {available / 2**30:.1f} GiB "
                         "of memory available; choose a smaller shape")


def check_convertible(model: torch.nn.Module, tree: TreeConfig) -> dict:
    """The MLP blocks ``dynsparse convert`` would replace, after one-line checks: a tree shape that is
    sparse at all (active fraction below 100 %), one block per layer (a layer whose MLP is not found,
    e.g. because its widths do not chain in -> hidden -> in, would stay dense silently), every block
    reading and writing the model's hidden width, a gated block's gate as wide as its up projection, and
    trees that fit in memory."""
    from ..mlps import find_mlps

    check_tree_shape(tree)
    blocks = find_mlps(model)
    if not blocks:
        raise ValueError(f"no MLP blocks found in {type(model).__name__} (fc1/act/fc2, c_fc/c_proj, "
                         "gate/up/down_proj, ...): nothing to convert")
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and len(blocks) != layers:
        raise ValueError(f"found {len(blocks)} MLP blocks in {type(model).__name__} with {layers} layers "
                         "(a layer's MLP is missing or its widths do not match): converting only some is refused")
    for name, block in blocks.items():
        w1, _, w2, _ = block.linear_weights()
        if isinstance(hidden, int) and (block.d_model != hidden or w2.shape[0] != hidden):
            raise ValueError(f"{name}: MLP maps {block.d_model} -> {w2.shape[0]}, not the model's hidden width {hidden}")
        wg, _ = block.gate_weights()
        if wg is not None and tuple(wg.shape) != tuple(w1.shape):
            raise ValueError(f"{name}: gate_proj {tuple(wg.shape)} and up_proj {tuple(w1.shape)} widths do not match")
    check_tree_memory(blocks, tree)
    return blocks


def convert_model(model: torch.nn.Module, tree: TreeConfig) -> list[str]:
    """Replace the MLP blocks of ``model`` in place; for our own LM also switch its config to ff="tree"."""
    replaced = treeify_(model, tree)
    if isinstance(model.config, DynSparseLMConfig):
        model.config.ff = "tree"
        model.config.tree = {"depth": tree.depth, "trees": tree.trees, "activation": tree.activation,
                             "act_position": tree.act_position, "whiten": tree.whiten}
        if not tree.bias and model.config.bias:
            raise ValueError("our LM ties the tree bias to config.bias; convert with bias=True")
    else:
        model._dynsparse_tree = {"tree_config": asdict(tree), "replaced": replaced}
    return replaced


def save_converted(model: torch.nn.Module, out: Path, tokenizer=None, state_dict: dict | None = None,
                   extra: dict[str, str] | None = None) -> None:
    """save_pretrained (+ tokenizer, + marker for foreign families) into a temp dir, renamed into place."""
    with atomic_dir(out) as tmp, hf_bars_off():
        model.save_pretrained(str(tmp), state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if getattr(model, "_dynsparse_tree", None):
            (tmp / MARKER).write_text(json.dumps(model._dynsparse_tree, indent=1))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        write_remote_code(tmp)  # stock tools load it with trust_remote_code=True


def load_model(path: str | Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """Any local causal-LM directory: ours, a plain HF model, or a converted HF model (with MARKER).
    A folder that asks to run its own code is refused unless ``trust_remote_code``."""
    from ..remote_code import check_remote_code

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved model directory (no config.json)")
    trust = check_remote_code(path, trust_remote_code)
    marker = path / MARKER
    if not marker.exists():
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32,
                                                    trust_remote_code=trust)
    info = json.loads(marker.read_text())
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust)
    replaced = convert_model(model, TreeConfig(**info["tree_config"]))
    if replaced != info["replaced"]:
        raise ValueError(f"{path}: the converted blocks {info['replaced'][:2]}... do not match this model")
    state = _read_weights(path)
    own = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = sorted(set(own) - set(state) - tied)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the converted model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def load_tokenizer_if_any(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved in ``path``, or None when the directory holds none."""
    from ..remote_code import TOKENIZER_FILES, check_remote_code

    if not any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    trust = check_remote_code(path, trust_remote_code, names=TOKENIZER_FILES)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust)
    except (OSError, ValueError, TypeError):
        return None


def _read_weights(path: Path) -> dict:
    single = path / "model.safetensors"
    if single.exists():
        return load_file(single)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(load_file(path / f))
        return state
    raise FileNotFoundError(f"no safetensors weights in {path}")
