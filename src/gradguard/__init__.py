"""gradguard: detect, diagnose and tame exploding and vanishing gradients in PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from . import clip, detect, stats
from .detect import LossSpike, NormSpike
from .errors import ConfigError, GradGuardError, GuardUsageError
from .guard import Guard, StepInfo
from .record import read_jsonl
from .control import Stability
from .respond import Policy, Rollback, TrainingDivergedError

__all__ = [
    "ConfigError",
    "GradGuardError",
    "Guard",
    "GuardUsageError",
    "LossSpike",
    "NormSpike",
    "Policy",
    "Rollback",
    "Stability",
    "StepInfo",
    "TrainingDivergedError",
    "__version__",
    "clip",
    "detect",
    "read_jsonl",
    "stats",
]
