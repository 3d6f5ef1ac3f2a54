"""Activation sparsity of pretrained transformers: record, analyse, SIBS, MGS, sparse execution."""
from .analyze import summarize
from .api import GateSet, apply_gates, fit_gates, load_gates, save_sparsified_dir, sparsify_
from .mgs import MGSConfig
from .modules import GatedMLP, GroupedGate, LowRankGate, ReLUSkipMLP, SlicedMLP
from .record import ActivationRecorder, LayerStats, record_activations
from .reorder import coactivation_permutation, group_density
from .sibs import SIBSConfig

__all__ = [
    "ActivationRecorder", "LayerStats", "record_activations", "summarize",
    "SIBSConfig", "MGSConfig", "sparsify_", "fit_gates", "apply_gates", "load_gates", "GateSet",
    "save_sparsified_dir", "SlicedMLP", "GatedMLP", "LowRankGate", "GroupedGate", "ReLUSkipMLP",
    "coactivation_permutation", "group_density",
]
