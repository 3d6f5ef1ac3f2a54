"""A causal LM as ``forward(ids (1, T), positions (T,)) -> logits (1, vocab)`` of the last position, over a
KV cache whose tensors never change shape (so a compiled step never recompiles as the sequence grows).

* ``HFStatic``: any HF model whose attention takes transformers' ``StaticCache`` (the classes HF marks
  ``_can_compile_fullgraph``: Llama and its relatives, SmolLM2 among them), run through its own forward.
* ``DynSparseLMStatic``: dynsparse's own LM (dense or tree FF blocks). Its blocks are called as they are;
  only the cache is ours: full-length key/value buffers, written at ``positions``, and a mask that hides
  the slots not written yet.

Both are driven the same way: reset, one prefill call at positions 0..P-1, then one call per token at
the next position. (transformers' cache counts the written positions itself; the calls must follow
that order.)
"""
from __future__ import annotations

import torch
from torch import nn


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class HFStatic:
    """An HF causal LM with transformers' ``StaticCache`` of ``max_len`` positions."""

    def __init__(self, model: nn.Module, max_len: int):
        from transformers import StaticCache

        self.model, self.max_len = model, max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        # The cache allocates its buffers on first use: do that now, eagerly, so that no compiled graph
        # holds the allocation (a graph traced before it would be retraced after it).
        device = _device(model)
        with torch.no_grad():
            self.forward(torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))
        self.reset()

    def reset(self) -> None:
        self.cache.reset()

    @property
    def kv_bytes(self) -> int:
        """Bytes of the key/value buffers, all of which attention reads at every step."""
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions[None], cache=self.cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]


class _Writer:
    """What dynsparse's attention asks of a cache: ``update(k, v, layer)`` stores k, v at the step's
    positions and returns the layer's whole key and value buffers."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor):
        self.keys, self.values, self.positions = keys, values, positions

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        self.keys[layer_idx].index_copy_(2, self.positions, k)
        self.values[layer_idx].index_copy_(2, self.positions, v)
        return self.keys[layer_idx], self.values[layer_idx]


class DynSparseLMStatic:
    """``DynSparseLMForCausalLM`` over full-length key/value buffers (1, heads, max_len, head_dim) per layer."""

    def __init__(self, model: nn.Module, max_len: int):
        cfg = model.config
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        self.model, self.max_len = model, max_len
        heads = cfg.num_attention_heads
        shape = (1, heads, max_len, cfg.hidden_size // heads)
        blocks = model.transformer.h
        dtype = blocks[0].attn.c_attn.weight.dtype  # keys and values come out of c_attn
        device = _device(model)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in blocks]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in blocks]
        self.columns = torch.arange(max_len, device=device)

    def reset(self) -> None:
        for t in self.keys + self.values:
            t.zero_()

    @property
    def kv_bytes(self) -> int:
        """Bytes of the key/value buffers, all of which attention reads at every step."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        x = t.wte(ids)
        if "wpe" in t:
            x = x + t.wpe(positions[None])
        x = t.drop(x)
        # query at position p sees the slots 0..p: causal within the prompt, unwritten slots hidden
        mask = (self.columns[None, :] <= positions[:, None])[None, None]
        cache = _Writer(self.keys, self.values, positions)
        for block in t.h:
            x = block(x, positions[None], cache, mask)
        return self.model.lm_head(t.ln_f(x[:, -1:]))[:, -1]


def static_model(model: nn.Module, max_len: int):
    """The static-cache form of ``model`` (``HFStatic`` or ``DynSparseLMStatic``) for ``max_len`` positions."""
    from ..lm import DynSparseLMForCausalLM

    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 4:
        raise ValueError(f"max_len must be an int >= 4, got {max_len!r}")
    if isinstance(model, DynSparseLMForCausalLM):
        return DynSparseLMStatic(model, max_len)
    if getattr(model, "_can_compile_fullgraph", False) and hasattr(model, "generate"):
        return HFStatic(model, max_len)
    raise ValueError(f"model: {type(model).__name__} does not take a static KV cache (neither a dynsparse LM nor "
                     "an HF causal LM marked _can_compile_fullgraph); use its own generate()")
