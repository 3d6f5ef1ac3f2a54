"""The LM's HF config: one class, one field (``ff``) that picks the feed-forward block, and named presets."""
from __future__ import annotations

from transformers import PretrainedConfig

from ..presets import MODEL_PRESETS
from ..sparse_ff import dense_ff_flops
from ..tree.convert import TreeConfig

FF_KINDS = ("dense", "tree")
TREE_OUT_INITS = ("published", "residual")
POSITIONS = ("learned", "rope")
TREE_DEFAULTS = {"depth": 7, "trees": 8, "activation": "gelu", "act_position": "node", "whiten": False}


class DynSparseLMConfig(PretrainedConfig):
    """A GPT-style decoder. ``ff="dense"``: GELU MLP of width ``intermediate_size``;
    ``ff="tree"``: a ``TreeFF`` in each block instead, built from ``tree`` (the ``TreeConfig`` fields depth,
    trees, activation, act_position, whiten: one name per setting from ``--depth`` to ``TreeFF.depth``).

    Field names follow HF conventions (hidden_size, num_hidden_layers, ...) so HF utilities and
    lm-evaluation-harness find the context length and sizes without help.
    """

    model_type = "dynsparse_lm"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 2048
    max_position_embeddings: int = 256
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int | None = None  # dense FF width; None -> 4 * hidden_size
    ff: str = "dense"
    tree: dict | None = None  # TreeConfig fields; None -> TREE_DEFAULTS
    # w_out's initialisation: "published" U(+-1/sqrt(trees*(depth+1))), or "residual": N(0, initializer_range
    # / sqrt(2 * layers)) like the dense block's fc2 and every other projection into the residual stream.
    tree_out_init: str = "published"
    position_embedding: str = "learned"  # "learned" or "rope"
    rope_theta: float = 10000.0
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        # configs saved before the tree settings moved into ``tree`` name them tree_depth, tree_trees, ...
        legacy = {key: kwargs.pop(f"tree_{key}") for key in TREE_DEFAULTS if f"tree_{key}" in kwargs}
        self.tree = {**TREE_DEFAULTS, **(self.tree or {}), **legacy}
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.check()
        super().__post_init__(**kwargs)

    def check(self) -> None:
        """Reject configs that would build a broken model, naming the field."""
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.ff not in FF_KINDS:
            raise ValueError(f"ff must be one of {FF_KINDS}, got {self.ff!r}")
        unknown = sorted(set(self.tree) - set(TREE_DEFAULTS))
        if unknown:
            raise ValueError(f"tree has unknown field(s) {unknown}; it takes {sorted(TREE_DEFAULTS)}")
        self.tree_config  # noqa: B018 - TreeConfig checks the values
        if self.tree_out_init not in TREE_OUT_INITS:
            raise ValueError(f"tree_out_init must be one of {TREE_OUT_INITS}, got {self.tree_out_init!r}")
        if self.position_embedding not in POSITIONS:
            raise ValueError(f"position_embedding must be one of {POSITIONS}, got {self.position_embedding!r}")
        if self.position_embedding == "rope" and (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("rope needs an even head dimension (hidden_size / num_attention_heads)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def tree_config(self) -> TreeConfig:
        """The tree blocks' settings (their bias follows ``bias``, like every other projection)."""
        return TreeConfig(**self.tree, bias=self.bias)

    @property
    def ff_active_fraction(self) -> float:
        """Share of the FF block's neurons that work for one token (1.0 for dense)."""
        return 1.0 if self.ff == "dense" else self.tree_config.active_fraction

    @property
    def ff_flops_per_token(self) -> int:
        """FLOPs of one FF block for one token (the hard path for trees)."""
        if self.ff == "dense":
            return dense_ff_flops(self.hidden_size, self.intermediate_size)
        return self.tree_config.flops_per_token(self.hidden_size)


# Architecture presets live with their training defaults in dynsparse.presets.
PRESETS = MODEL_PRESETS


def preset_config(name: str, **overrides) -> DynSparseLMConfig:
    """A config from a named preset; keyword arguments override its fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return DynSparseLMConfig(**{**PRESETS[name], **overrides})
