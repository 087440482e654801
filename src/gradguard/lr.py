"""The LR factor the guard applies on top of the user's schedule.

The factor is the stability controller's scale times an optional automatic warm-up. It is
decided on the host from rows already there (no sync) and applied to every param group
for the optimizer step only: the scheduler sets the base, the guard scales it, and the
group's LR is put back afterwards. Under a schedule a cut acts as a cap on the LR the run
failed at, or, made while the schedule rose, as a factor on the whole schedule (see
:attr:`LRFactor.scale`); at a constant LR the two are the same, bit for bit.
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
        self._scale = 1.0  # the controller's
        # Below x1 the scale acts in one of two forms, chosen at the cut: as a ceiling,
        # scale x ref, on the first group's LR (ref: an LR), or as a factor, scale x k.
        self.ref: float | None = None
        self.k = 1.0
        self.base: float | None = None  # the first group's LR at the latest step
        self.prev: float | None = None  # and at the step before
        self.factor = 1.0  # what this step applies
        self.tensor = torch.ones((), device=device)
        self.warmup = warmup
        self.progress = 0  # steps since the state the weights are in began
        self.lr0: float | None = None

    @property
    def scale(self) -> float:
        """The controller's LR scale (x1: the user's LR as it is)."""
        return self._scale

    @scale.setter
    def scale(self, new: float) -> None:
        new = float(new)
        old, f = self._scale, self._cut_factor()
        self._scale = new
        if new >= 1.0 or self.base is None:
            self.ref, self.k = None, 1.0
        elif new < old:
            # A cut answers the LR the run failed at, f x base. While the user's schedule
            # falls or stays (an anneal, a constant LR) that is the highest LR the run
            # meets again: cap it, scale x ref, and leave the schedule below the cap as it
            # is (TCP's ssthresh is a window size, not a factor; Jacobson 1988). While it
            # rises (a warm-up) the user's LR is still on its way to the peak the
            # schedule's later shape is built around: scale the schedule instead.
            if self.prev is not None and self.base > self.prev:
                self.ref, self.k = None, f / old
            elif self.ref is None or f >= 1.0:
                # (base x (f / old): exactly base after a factor-form cut, f = old)
                self.ref, self.k = self.base * (f / old), 1.0
            # (else the failure was at the binding cap: the same ref, a lower scale)

    @property
    def ceiling(self) -> float | None:
        """The first group's LR cap where the scale acts as one (None: it does not)."""
        return self._scale * self.ref if self.ref is not None and self._scale < 1 else None

    def said(self) -> str:
        """The scale in an event's words, with the cap it sets where it acts as one."""
        cap = self.ceiling
        return f"LR scale ×{self._scale:.3g}" + (f" (a cap: lr ≤ {cap:.3g})" if cap else "")

    def _cut_factor(self) -> float:
        """The factor the scale makes of the latest step's LR. Under a cap, a rising LR is
        a ramp (a warm-up replayed after a rollback, a restart's warm-up), whose point is
        its gentle start: scaled, and kept under the cap; a falling or holding one is
        capped, so the tail of a decay is the user's."""
        if self.ref is None or not self.base:
            return self._scale * self.k
        capped = self._scale * (self.ref / self.base)
        if self.prev is not None and self.base > self.prev:
            return min(self._scale, capped)
        return min(1.0, capped)

    def prepare(self, base_lr: Any) -> None:
        """Settle this step's factor (the device copy is refilled only when it changes)."""
        self.prev, self.base = self.base, host_lr(base_lr)
        factor = self._cut_factor() * self._warmup_factor(base_lr)
        if factor != self.factor:
            self.factor = factor
            self.tensor.fill_(factor)  # a host scalar into a device tensor: no sync

    def _warmup_factor(self, base_lr: Any) -> float:
        """A linear ramp over ``warmup`` steps, counted from the state the weights are in
        (a rollback to the start ramps again); switched off for good when the user's own
        LR rises during it (their schedule warms up already)."""
        n = self.warmup
        if n == 0 or self.progress >= n:
            return 1.0
        lr = host_lr(base_lr)
        if lr is not None:
            if self.lr0 is None:
                self.lr0 = lr
            elif lr > self.lr0 * (1 + 1e-6):
                self.warmup = 0
                return 1.0
        return (self.progress + 1) / n

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
                "warmup": self.warmup, "ref": self.ref, "k": self.k, "base": self.base}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self._scale, self.ref, self.k = float(s["scale"]), s.get("ref"), s.get("k", 1.0)
        self.base = s.get("base")
        self.progress, self.lr0, self.warmup = int(s["progress"]), s["lr0"], int(s["warmup"])
