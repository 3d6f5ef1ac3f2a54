"""Fast greedy decoding at batch 1 for HF causal LMs, dense or sparse (the recipe of gpt-fast).

A static KV cache keeps every tensor's shape fixed, so the one-token decode step compiles once with
``torch.compile`` (the dynsparse sparse-MLP, gate and tree ops stay single nodes of that graph) and
prefill compiles apart, once for every prompt length. ``FastDecoder`` holds both; ``cast_weights_``
gives bf16 weights without touching the float32 tables the sparse kernels read; ``weight_traffic``
counts the bytes one decode step reads, the yardstick for its tokens/s; ``linears="gemv"`` (the
default) runs the model's linear layers through ``dynsparse::gemv`` while it decodes.
"""
from .adapters import DynSparseLMStatic, HFStatic, static_model
from .dtype import DTYPES, cast_weights_
from .generate import LINEARS, FastDecoder
from .linears import GemvLinear, gemv_active, route_linears_
from .traffic import Traffic, weight_traffic

__all__ = ["FastDecoder", "static_model", "HFStatic", "DynSparseLMStatic", "cast_weights_", "DTYPES",
           "weight_traffic", "Traffic", "LINEARS", "GemvLinear", "route_linears_", "gemv_active"]
