"""Activation sparsity of pretrained transformers: record, analyse, SIBS, MGS, CATS, oracles, sparse execution."""
from .activity import ACTIVITIES
from .analyze import summarize
from .api import GateSet, apply_gates, fit_gates, load_gates, save_sparsified_dir, sparsify_
from .baselines import CATSMLP, OracleMLP, cats_mlp, oracle_mlp
from .cats import CATSConfig
from .mgs import MGSConfig
from .modules import GatedMLP, GroupedGate, LowRankGate, ReLUSkipMLP, SlicedMLP
from .record import ActivationRecorder, LayerStats, record_activations
from .reorder import coactivation_permutation, group_density
from .sibs import SIBSConfig
from .thresholds import derive_stats

__all__ = [
    "ACTIVITIES", "ActivationRecorder", "LayerStats", "record_activations", "derive_stats", "summarize",
    "SIBSConfig", "MGSConfig", "CATSConfig", "sparsify_", "fit_gates", "apply_gates", "load_gates", "GateSet",
    "save_sparsified_dir", "SlicedMLP", "GatedMLP", "LowRankGate", "GroupedGate", "ReLUSkipMLP",
    "OracleMLP", "CATSMLP", "oracle_mlp", "cats_mlp", "coactivation_permutation", "group_density",
]
