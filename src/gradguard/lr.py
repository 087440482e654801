"""The LR factor the guard applies on top of the user's schedule.

The factor is the stability controller's scale times an optional automatic warm-up. It is
decided on the host from rows already there (no sync) and applied to every param group
for the optimizer step only: the scheduler sets the base, the guard scales it, and the
group's LR is put back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["LRFactor"]


def host_lr(lr: Any) -> float | None:
    """A group's LR as a host number when reading it costs nothing: a Python number, or a
    0-dim tensor on the CPU (as torch's schedulers keep a tensor LR); None for a tensor on
    an accelerator (reading it would wait for the device)."""
    if isinstance(lr, float | int):
        return float(lr)
    if isinstance(lr, torch.Tensor) and lr.device.type == "cpu" and lr.numel() == 1:
        return float(lr)
    return None


def _scale_rprop(optimizer: torch.optim.Optimizer, f: float) -> None:
    """Scale Rprop's per-element step sizes and their bounds by ``f``.

    Rprop reads a group's LR only to start its step sizes, then adapts them on its own
    (Riedmiller & Braun 1993), so a scaled LR alone would change nothing after the first
    step. Scaling the sizes and their clamp for the step, and back after it, applies the
    factor to the update and leaves the sizes' own adaptation as it would have been.
    """
    for g in optimizer.param_groups:
        lo, hi = g["step_sizes"]
        g["step_sizes"] = (lo * f, hi * f)
        sizes = [st["step_size"] for p in g["params"]
                 if isinstance(st := optimizer.state.get(p), dict) and "step_size" in st]
        if sizes:
            torch._foreach_mul_(sizes, f)


class LRFactor:
    """Scale × warm-up, with a device copy for the per-step row.

    Args:
        optimizer: whose groups' LR is scaled during the step.
        warmup: length of the automatic linear warm-up in steps (0: none).
        device: where the row's copy of the factor lives.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int,
                 device: torch.device) -> None:
        self.optimizer = optimizer
        self.scale = 1.0  # the controller's
        self.factor = 1.0  # what this step applies
        self.tensor = torch.ones((), device=device)
        self.warmup = warmup
        self.progress = 0  # steps since the state the weights are in began
        self.lr0: float | None = None

    def prepare(self, base_lr: Any) -> None:
        """Settle this step's factor (the device copy is refilled only when it changes)."""
        factor = self.scale * self._warmup_factor(base_lr)
        if factor != self.factor:
            self.factor = factor
            self.tensor.fill_(factor)  # a host scalar into a device tensor: no sync

    def _warmup_factor(self, base_lr: Any) -> float:
        """A linear ramp over ``warmup`` steps, counted from the state the weights are in
        (a rollback to the start ramps again); switched off for good when the user's own
        LR rises during it, or starts below the LR a scheduler of theirs was built at
        (their schedule warms up already)."""
        n = self.warmup
        if n == 0 or self.progress >= n:
            return 1.0
        lr = host_lr(base_lr)
        if lr is not None:
            if self.lr0 is None:
                self.lr0 = lr
                if self.progress == 0 and self.user_warms_up():
                    self.warmup = 0
                    return 1.0
            elif lr > self.lr0 * (1 + 1e-6):
                self.warmup = 0
                return 1.0
        return (self.progress + 1) / n

    def user_warms_up(self) -> bool:
        """Whether the user's LR is below the ``initial_lr`` a scheduler of theirs was
        built at: their schedule starts low (a warm-up)."""
        group = self.optimizer.param_groups[0]
        lr, peak = host_lr(group["lr"]), host_lr(group.get("initial_lr"))
        return lr is not None and peak is not None and lr < peak * (1 - 1e-6)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Scale every group's LR for the duration of the optimizer step."""
        groups = self.optimizer.param_groups
        f = self.factor
        base = [g["lr"] for g in groups]
        rprop = f != 1.0 and isinstance(self.optimizer, torch.optim.Rprop)
        if f != 1.0:
            for g, b in zip(groups, base, strict=True):
                g["lr"] = b * f
        bounds = [g.get("step_sizes") for g in groups]
        if rprop:
            _scale_rprop(self.optimizer, f)
        try:
            yield
        finally:
            if rprop:
                _scale_rprop(self.optimizer, 1.0 / f)
                for g, b in zip(groups, bounds, strict=True):
                    g["step_sizes"] = b  # (exactly the user's, not lo·f/f)
            if f != 1.0:
                for g, b in zip(groups, base, strict=True):
                    g["lr"] = b
        self.progress += 1

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "progress": self.progress, "lr0": self.lr0,
                "warmup": self.warmup}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.scale = float(s["scale"])
        self.progress, self.lr0, self.warmup = int(s["progress"]), s["lr0"], int(s["warmup"])
