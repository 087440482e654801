"""One-line remedies that act on the model, the data or the loss (not on the gradient).

Every fix returns a :class:`FixReport` saying what it changed (the per-step constraints
and the standardiser carry theirs as ``.report``), and either changes nothing when applied
twice or refuses the second application with a :class:`~gradguard.errors.ConfigError`
naming the fix.
"""

from .activations import PRESETS, swap_activations
from .data import Standardized, Standardizer
from .init import FixReport, layer_activations, reinit, spectral_radius
from .loss import ZLossWrapped, robust_loss, with_z_loss, z_loss
from .schedule import warmup_cosine
from .weights import MaxNorm, WeightClip, prune, weight_norm

__all__ = [
    "PRESETS",
    "FixReport",
    "MaxNorm",
    "Standardized",
    "Standardizer",
    "WeightClip",
    "ZLossWrapped",
    "layer_activations",
    "prune",
    "reinit",
    "robust_loss",
    "spectral_radius",
    "swap_activations",
    "warmup_cosine",
    "weight_norm",
    "with_z_loss",
    "z_loss",
]
