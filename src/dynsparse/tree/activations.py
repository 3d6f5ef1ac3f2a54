"""Transitional re-export of the activation registry (``dynsparse.activations``); removed once no caller is left."""
from ..activations import REGISTRY, fn as get_activation

ACTIVATIONS = {name: a.fn for name, a in REGISTRY.items()}
ACTIVATION_CODES = {name: a.code for name, a in REGISTRY.items()}
