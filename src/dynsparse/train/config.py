"""What a training run does, as one flat dataclass (saved to ``<run>/config.json``).

Precedence: training defaults of the preset < ``--config file.yaml`` < command-line flags.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from ..lm import FF_KINDS, PRESETS, DynSparseLMConfig, preset_config
from ..lm.config import TREE_OUT_INITS
from ..ops.backend import BACKENDS
from ..presets import TRAIN_PRESETS

DTYPES = ("fp32", "bf16")
TRAINABLE = ("all", "ff")  # ff: only the FF blocks train (attention, embeddings and norms frozen)


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"
    ff: str = "dense"
    depth: int | None = None  # tree depth; None -> the preset's
    trees: int | None = None
    activation: str = "gelu"
    act_position: str = "node"
    whiten: bool = False  # whiten each tree's input with earlier batches' statistics (tree/whiten.py)
    tree_out_init: str = "published"  # see DynSparseLMConfig.tree_out_init
    position_embedding: str = "learned"
    d_model: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    dropout: float = 0.0
    init_from: str | None = None  # an HF model directory to continue from (e.g. `dynsparse convert` output)
    # data
    data: str = "shakespeare"
    qa: str | None = None  # a JSONL of {context, question, answer}: fine-tune with the loss on answers
    vocab_size: int | None = None  # BPE size; None -> the preset's
    tokenizer: str | None = None  # a local HF tokenizer directory instead of training a BPE
    cache_dir: str | None = None
    seq_len: int = 128
    # optimisation
    batch_size: int = 16  # global: sequences per optimizer step, over all processes and micro-batches
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    # The FF block's weights (dense fc1/fc2, or the tree tables) may get their own learning-rate multiplier
    # and weight decay (None: the same as the rest). Deep tree nodes see ~1/2**level of the tokens, so their
    # updates are rare; tune the multiplier per FF kind (dynsparse compare does, for both models).
    ff_lr_scale: float = 1.0
    ff_weight_decay: float | None = None
    tree_balance_rate: float = 0.0  # > 0: loss-free routing balance of the node biases (train/balance.py)
    trainable: str = "all"  # "ff": freeze all but the FF blocks (the fine-tuning protocol's trees-only option)
    grad_clip: float = 1.0
    dtype: str = "fp32"
    seed: int = 0
    backend: str = "auto"  # the tree ops' backend while training (dynsparse.ops.BACKENDS)
    # bookkeeping
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    telemetry_every: int = 50
    telemetry: bool = True
    fsdp: bool = False

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.ff not in FF_KINDS:
            raise ValueError(f"ff must be one of {FF_KINDS}, got {self.ff!r}")
        if self.tree_out_init not in TREE_OUT_INITS:
            raise ValueError(f"tree_out_init must be one of {TREE_OUT_INITS}, got {self.tree_out_init!r}")
        if not isinstance(self.whiten, bool):
            raise ValueError(f"whiten must be true or false, got {self.whiten!r}")
        if self.whiten and (self.ff != "tree" or self.init_from):
            raise ValueError("whiten builds new tree blocks: it needs ff tree and no init_from (a loaded model "
                             "keeps its own blocks)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                     "ckpt_every", "keep_checkpoints", "log_every", "telemetry_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("depth", "trees", "d_model", "n_layer", "n_head", "vocab_size", "seed", "warmup_steps"):
            value = getattr(self, name)  # optional integers, and those where 0 means something
            low = 0 if name in ("depth", "seed", "warmup_steps") else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        # A YAML "1e-3" is a string and a NaN passes every "< 0" test: numbers must be real and finite.
        for name in ("lr", "min_lr_ratio", "weight_decay", "ff_lr_scale", "ff_weight_decay", "tree_balance_rate",
                     "grad_clip", "dropout"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
                raise ValueError(f"{name} must be a finite number, got {value!r}{hint}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        ffwd = self.ff_weight_decay
        for name, ok, rule in (("lr", self.lr > 0, "> 0"), ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                               ("ff_lr_scale", self.ff_lr_scale > 0, "> 0"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("ff_weight_decay", ffwd is None or ffwd >= 0, ">= 0"),
                               ("grad_clip", self.grad_clip >= 0, ">= 0 (0: no clipping)"),
                               ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                               ("tree_balance_rate", self.tree_balance_rate >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if self.tree_balance_rate > 0 and self.fsdp:
            raise ValueError("tree_balance_rate is not supported with fsdp (sharded biases); use DDP")

    # ------------------------------------------------------------------ model config
    def model_config(self, vocab_size: int) -> DynSparseLMConfig:
        base = PRESETS[self.preset]["tree"]
        tree = {"depth": base["depth"] if self.depth is None else self.depth,
                "trees": base["trees"] if self.trees is None else self.trees,
                "activation": self.activation, "act_position": self.act_position, "whiten": self.whiten}
        over = dict(ff=self.ff, tree=tree, tree_out_init=self.tree_out_init,
                    position_embedding=self.position_embedding, dropout=self.dropout, vocab_size=vocab_size,
                    max_position_embeddings=max(self.seq_len, PRESETS[self.preset]["max_position_embeddings"]))
        for ours, theirs in (("d_model", "hidden_size"), ("n_layer", "num_hidden_layers"),
                             ("n_head", "num_attention_heads")):
            if getattr(self, ours) is not None:
                over[theirs] = getattr(self, ours)
        if self.d_model is not None:
            over["intermediate_size"] = 4 * self.d_model
        return preset_config(self.preset, **over)

    @property
    def bpe_vocab_size(self) -> int:
        return self.vocab_size or PRESETS[self.preset]["vocab_size"]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if "tree_impl" in d:  # runs saved before the op layer named the execution path this way
            d["backend"] = "reference" if d.pop("tree_impl") == "masked" else "auto"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def build(cls, preset: str = "tiny", yaml_file: str | None = None, **flags) -> "TrainConfig":
        """Preset defaults < YAML file < flags (flags that are None are ignored)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        values = {"preset": preset, **TRAIN_PRESETS[preset]}
        if yaml_file:
            path = Path(yaml_file)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {yaml_file}")
            loaded = _read_yaml(path) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{yaml_file} must hold a mapping of option: value")
            values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls.from_dict(values)


def _read_yaml(path: Path):
    """The YAML document in ``path``; a file that is not YAML text is one ValueError naming the place."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a YAML text file (not UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML ({problem}{where})") from None


def diff_configs(a: dict, b: dict, ignore=("max_steps",)) -> list[str]:
    """Fields that differ between two saved run configs (those in ``ignore`` may change on resume). A field
    one of them lacks (saved before it existed) counts as its default."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return sorted(k for k in set(a) | set(b)
                  if k not in ignore and a.get(k, defaults.get(k)) != b.get(k, defaults.get(k)))
