"""Tools for testing training code under a guard: fault injection and state checks.

See :mod:`gradguard.testing.faults` for the loop the hooks fit into.
"""

from __future__ import annotations

from .faults import (
    BadBatch,
    Fault,
    GradFault,
    Injection,
    Injector,
    LRSpike,
    NaNLoss,
    Strike,
    WeightFault,
    flagged_steps,
    state_is_finite,
)

__all__ = [
    "BadBatch",
    "Fault",
    "GradFault",
    "Injection",
    "Injector",
    "LRSpike",
    "NaNLoss",
    "Strike",
    "WeightFault",
    "flagged_steps",
    "state_is_finite",
]
