"""HF classes for a tree LM whose trees were statically pruned.

A pruned tree has an arbitrary shape, so the config records each pruned layer's table sizes and the
model rebuilds empty ``PrunedTreeFF`` layers of those sizes before the weights load. Registered with
``AutoConfig``/``AutoModelForCausalLM`` on import, like the unpruned LM.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from ..lm import DynSparseLMConfig, DynSparseLMForCausalLM
from ..tree.prune import PrunedTreeFF


class PrunedDynSparseLMConfig(DynSparseLMConfig):
    model_type = "dynsparse_lm_pruned"
    pruned_layers: dict | None = None  # module name -> PrunedTreeFF.shape_spec()


class PrunedDynSparseLMForCausalLM(DynSparseLMForCausalLM):
    config_class = PrunedDynSparseLMConfig

    def __init__(self, config: PrunedDynSparseLMConfig):
        super().__init__(config)
        for name, spec in (config.pruned_layers or {}).items():
            parent_name, _, attr = name.rpartition(".")
            setattr(self.get_submodule(parent_name), attr, PrunedTreeFF.empty(**spec))

    def pruned_layers(self) -> dict[str, PrunedTreeFF]:
        return {n: m for n, m in self.named_modules() if isinstance(m, PrunedTreeFF)}


AutoConfig.register(PrunedDynSparseLMConfig.model_type, PrunedDynSparseLMConfig, exist_ok=True)
AutoModelForCausalLM.register(PrunedDynSparseLMConfig, PrunedDynSparseLMForCausalLM, exist_ok=True)
