"""A GPT-style decoder whose feed-forward block is dense or a tree (read top to bottom, like nanoGPT).

CausalSelfAttention -> MLP (dense) or TreeFF -> Block (pre-LayerNorm) -> DynSparseLMForCausalLM
(HF PreTrainedModel + GenerationMixin, tied embeddings, KV cache via HF ``DynamicCache``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..tree import TreeFF
from .config import DynSparseLMConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of x (B, H, T, hd) at integer positions (B, T)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, hd/2)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: DynSparseLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.dropout = config.dropout
        self.rope_theta = config.rope_theta if config.position_embedding == "rope" else None

    def forward(self, x, positions, cache: Cache | None = None, mask: torch.Tensor | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rope_theta is not None:
            q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        drop = self.dropout if self.training else 0.0
        if mask is None:  # no cache, no padding: the plain causal case
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    """The dense FF block. Named fc1/act/fc2 so ``dynsparse.find_mlps`` (and ``treeify_``) find it."""

    def __init__(self, config: DynSparseLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.act(self.fc1(x))))


def build_ff(config: DynSparseLMConfig) -> nn.Module:
    """The one place where ``config.ff`` chooses the feed-forward block."""
    if config.ff == "dense":
        return MLP(config)
    return config.tree_config.build(config.hidden_size)


class Block(nn.Module):
    def __init__(self, config: DynSparseLMConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = build_ff(config)

    def forward(self, x, positions, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), positions, cache, mask)
        return x + self.mlp(self.ln_2(x))


class DynSparseLMPreTrainedModel(PreTrainedModel):
    config_class = DynSparseLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """GPT-2 init (N(0, 0.02), residual projections scaled by 1/sqrt(2 L)); tree layers keep the
        published neuron-tree init (w_out optionally like the residual projections: ``tree_out_init``). Uses HF's ``init`` helpers so loaded weights are never overwritten."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            scale = math.sqrt(2 * self.config.num_hidden_layers) if getattr(module, "_residual", False) else 1.0
            init.normal_(module.weight, mean=0.0, std=std / scale)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, TreeFF):
            bound_in = 1.0 / math.sqrt(module.d_model)
            init.uniform_(module.w_in, -bound_in, bound_in)
            if module.b_in is not None:
                init.uniform_(module.b_in, -bound_in, bound_in)
            if self.config.tree_out_init == "residual":
                init.normal_(module.w_out, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                bound_out = 1.0 / math.sqrt(module.trees * (module.depth + 1))
                init.uniform_(module.w_out, -bound_out, bound_out)
            init.zeros_(module.leaf_visits)


class DynSparseLMForCausalLM(DynSparseLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: DynSparseLMConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.hidden_size),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)]),
            ln_f=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias),
        ))
        if config.position_embedding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for block in self.transformer.h:  # the projections that write into the residual stream
            block.attn.c_proj._residual = True
            if isinstance(block.mlp, MLP):
                block.mlp.fc2._residual = True
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def tree_layers(self) -> dict[str, TreeFF]:
        """Every TreeFF in the model by qualified name (empty for a dense model)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, TreeFF)}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {past + T} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).unsqueeze(0).expand(B, T)
        position_ids = position_ids.expand(B, T).clamp_min(0)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(position_ids)
        mask = attention_mask_4d(attention_mask, B, T, past, x.device)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, position_ids, cache, mask)
        x = self.transformer.ln_f(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def attention_mask_4d(attention_mask, B: int, T: int, past: int, device) -> torch.Tensor | None:
    """None in the plain causal case (SDPA's ``is_causal``); otherwise a (B, 1, T, past+T) bool mask
    that is causal over absolute positions and hides padding (0 in the 2-D ``attention_mask``)."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past == 0 and not padded:
        return None
    total = past + T
    rows = torch.arange(past, total, device=device)[:, None]
    cols = torch.arange(total, device=device)[None, :]
    mask = (cols <= rows)[None, None].expand(B, 1, T, total)
    if padded:
        keep = attention_mask[:, -total:].to(device=device, dtype=torch.bool)
        mask = mask & keep[:, None, None, :]
        # A fully padded query row (left padding) would give NaN: let it see itself.
        mask = mask | (cols == rows)[None, None]
    return mask
