"""GPT-style language model with a pluggable feed-forward block (dense or tree), as HF classes.

Importing this package registers ``dynsparse_lm`` with ``AutoConfig`` and ``AutoModelForCausalLM``,
so ``AutoModelForCausalLM.from_pretrained(saved_dir)`` works after ``import dynsparse.lm``.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .config import FF_KINDS, PRESETS, DynSparseLMConfig, preset_config
from .model import MLP, Block, CausalSelfAttention, DynSparseLMForCausalLM
from .pretrained import resolve_model

AutoConfig.register(DynSparseLMConfig.model_type, DynSparseLMConfig, exist_ok=True)
AutoModelForCausalLM.register(DynSparseLMConfig, DynSparseLMForCausalLM, exist_ok=True)

__all__ = [
    "DynSparseLMConfig",
    "DynSparseLMForCausalLM",
    "CausalSelfAttention",
    "MLP",
    "Block",
    "PRESETS",
    "FF_KINDS",
    "preset_config",
    "resolve_model",
]
