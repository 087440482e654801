"""gradguard: detect, diagnose and tame exploding and vanishing gradients in PyTorch.

``import gradguard as gg`` loads only what a training loop needs (the guard, the clip
transforms, the detectors and the policy). The heavier parts load on first use:
``gg.doctor``, ``gg.fixes``, ``gg.report``, ``gg.scenarios``, ``gg.bench``,
``gg.integrations`` and ``gg.testing`` (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from types import ModuleType

from . import clip, detect, stats
from .control import Stability
from .detect import LossSpike, NormSpike
from .errors import (
    ConfigError,
    GradGuardError,
    GuardUsageError,
    GuardUsageWarning,
    InputError,
    MissingFileError,
    UnknownNameError,
)
from .guard import Guard, StepInfo
from .record import read_jsonl
from .respond import Action, Policy, Rollback, TrainingDivergedError
from .runlog import Event, Meta, StepRecord

# Subpackages imported on first attribute access: they pull matplotlib, sklearn data
# loaders, or framework integrations that a training loop does not need.
_LAZY = ("bench", "doctor", "fixes", "integrations", "report", "scenarios", "testing")

__all__ = [
    "ConfigError",
    "Event",
    "InputError",
    "MissingFileError",
    "UnknownNameError",
    "GradGuardError",
    "Guard",
    "GuardUsageError",
    "GuardUsageWarning",
    "LossSpike",
    "Meta",
    "NormSpike",
    "Action",
    "Policy",
    "Rollback",
    "Stability",
    "StepInfo",
    "StepRecord",
    "TrainingDivergedError",
    "__version__",
    "clip",
    "detect",
    "read_jsonl",
    "stats",
    *_LAZY,
]


def __getattr__(name: str) -> ModuleType:
    """Import a lazy subpackage (``gg.fixes``, ``gg.doctor``, ...) on first use."""
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'gradguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
