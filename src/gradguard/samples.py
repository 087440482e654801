"""How much data each step's gradient averages over, for the spike detectors.

A mean-reduced loss over ``n`` samples has a standard deviation that scales as
``1/sqrt(n)``, and so does the noise part of its gradient. The last batch of an epoch
is often smaller (a dataset of 1797 samples in batches of 64 ends with 5): its loss and
gradient norm are up to ``sqrt(N/n)`` times further from the typical ones by sampling
noise alone, which the detectors would flag as a spike once per epoch. The guard counts
the input elements of the model's training forward passes since the last step (all
micro-batches of an accumulated step together), takes the largest count seen as a full
step, and hands the detectors ``noise = sqrt(full / this step)`` (1 for a full step):
their thresholds widen by that factor, so a real spike (10× or more) is still caught.

The count is the first tensor argument of the model's ``forward`` (``numel``: samples ×
features, or tokens for a batch of sequences). When the model's own ``forward`` is never
called (a framework calling submodules), or under ``torch.distributed`` (ranks must
decide alike), the factor stays 1: the detectors behave as before.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .params import refuses_hooks

__all__ = ["SampleCounter"]


class SampleCounter:
    """Counts input elements per optimizer step; :meth:`noise` gives the widening factor.

    Args:
        model: the guarded model (None: nothing is counted and the factor is always 1).
    """

    def __init__(self, model: nn.Module | None) -> None:
        self.pending = 0
        self.full = 0
        # (A scripted model refuses hooks: nothing is counted, the factor stays 1.)
        self._handle = (model.register_forward_pre_hook(self._count, with_kwargs=True)
                        if model is not None and not refuses_hooks(model) else None)

    def _count(self, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any] | None = None) -> None:
        # (kwargs=None: a guard collected during a forward pass removed this hook while
        # torch was calling its snapshot of the hooks, without the kwargs marker)
        if kwargs is None or not (module.training and torch.is_grad_enabled()):
            return  # evaluation passes add nothing to the gradient
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if first is not None:
            self.pending += first.numel()

    def noise(self) -> float:
        """``sqrt(full step / this step)`` (>= 1) for the step about to be judged; resets."""
        n, self.pending = self.pending, 0
        if n <= 0:
            return 1.0
        self.full = max(self.full, n)
        return math.sqrt(self.full / n)

    def discard(self) -> None:
        """Forget the samples counted since the last step (a batch dropped after its
        forward pass: no step's)."""
        self.pending = 0

    def remove(self) -> None:
        """Stop counting (the guard is closed)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
