"""A skipped step leaves no trace in the model's running statistics.

A normalisation layer in training mode (BatchNorm, SyncBatchNorm, an InstanceNorm that
tracks its statistics) folds every batch it sees into its running mean and variance
*during the forward pass*, before the guard decides anything. One batch with a NaN input
is skipped, so the weights stay clean, but its NaN is already in those buffers, and every
evaluation-mode forward after it returns NaN while the training loss looks fine. Skipping a
step must undo all of the batch's effect on the model, so these buffers go back too.

Each layer's statistics are copied when its first training-mode forward pass of an
optimizer step starts (a forward pre-hook, re-armed after every ``guard.step``; with
gradient accumulation, the first micro-batch), and put back after the step when it was
skipped. Under the host strategy (a CPU) the skip is a host bool already and a healthy
step costs one copy per buffer; on an accelerator the restore is a ``torch.where`` per
buffer (no host sync). A model compiled with ``torch.compile`` before the guard was built
does not run hooks added to its inner layers, so there nothing is copied or restored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .params import refuses_hooks

__all__ = ["RunningStats"]

_NAMES = ("running_mean", "running_var", "num_batches_tracked")


class RunningStats:
    """Keeps the norm layers' running statistics from before a step's forward pass.

    Args:
        model: the guarded model (None, or no layer with running statistics: nothing).
    """

    def __init__(self, model: nn.Module | None) -> None:
        self.layers: list[nn.Module] = [] if model is None or refuses_hooks(model) else [
            m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
        self.saved: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._all = frozenset(id(m) for m in self.layers)
        self.armed = set(self._all)
        self.handles = [m.register_forward_pre_hook(self._capture) for m in self.layers]

    def _capture(self, module: nn.Module, _args: Any) -> None:
        if not module.training or id(module) not in self.armed:
            return  # evaluation passes do not update the statistics
        self.armed.discard(id(module))
        pairs = self.saved.get(id(module))
        bufs = [b for b in (getattr(module, n, None) for n in _NAMES) if isinstance(b, Tensor)]
        if pairs is None or [b for b, _ in pairs] != bufs:  # (a buffer was replaced)
            self.saved[id(module)] = [(b, b.detach().clone()) for b in bufs]
        else:
            with torch.no_grad():
                for b, s in pairs:
                    s.copy_(b)

    def after(self, skip: Tensor, host_skip: bool | None) -> None:
        """After ``guard.step``: put back the statistics of the layers that ran, when the
        step was skipped; re-arm every layer for the next step.

        Args:
            skip: the step's skip decision (0-dim bool, on the device).
            host_skip: the same as a host bool where the strategy already read it (no
                device work on a healthy step), else None (restored by ``torch.where``).
        """
        ran = [self.saved[id(m)] for m in self.layers
               if id(m) not in self.armed and id(m) in self.saved]
        self.armed = set(self._all)
        if not ran or host_skip is False:
            return
        with torch.no_grad():
            for pairs in ran:
                for b, s in pairs:
                    b.copy_(s if host_skip else torch.where(skip.to(b.device), s, b))

    def remove(self) -> None:
        """Take the hooks off."""
        for h in self.handles:
            h.remove()
        self.handles = []
