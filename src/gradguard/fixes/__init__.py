"""One-line remedies that act on the model, the data or the loss (not on the gradient).

Every fix returns a :class:`FixReport` saying what it changed.
"""

from .init import FixReport, layer_activations, reinit, spectral_radius

__all__ = ["FixReport", "layer_activations", "reinit", "spectral_radius"]
