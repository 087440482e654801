"""gradguard: detect, diagnose and tame exploding and vanishing gradients in PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from . import clip, stats
from .errors import ConfigError, GradGuardError, GuardUsageError
from .guard import Guard, StepInfo

__all__ = [
    "ConfigError",
    "GradGuardError",
    "Guard",
    "GuardUsageError",
    "StepInfo",
    "__version__",
    "clip",
    "stats",
]
