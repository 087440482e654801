"""Responders and the policy that picks them: skip, LR backoff, rollback, escalation.

The per-step part of the decision runs on the device: whether to skip this step and what
LR scale to apply are tensors computed from the detectors' flags. The structural part
runs on the host when the step's row arrives: rolling back to a snapshot, skipping the
next batches, giving up with :class:`TrainingDivergedError`.

How large training runs handle the same trouble by hand, and what each responder mirrors:
PaLM (Chowdhery et al. 2022, section 5.1) restarted ~100 steps before a spike and skipped
200–500 batches; OPT-175B (Zhang et al. 2022, logbook) restarted from checkpoints with a
lower LR; OLMo-core skips steps whose loss or gradient norm is far above its recent mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .detect import LossSpike, NormSpike
from .errors import ConfigError, GradGuardError, check_int, check_positive
from .state import TensorState

__all__ = ["Backoff", "Policy", "Rollback", "TrainingDivergedError"]

NONFINITE_ACTIONS = ("skip", "rollback", "raise")
SPIKE_ACTIONS = ("none", "auto", "clip", "skip", "backoff", "rollback")
LOSS_SPIKE_ACTIONS = ("none", "auto", "skip", "backoff", "rollback")


class TrainingDivergedError(GradGuardError, RuntimeError):
    """Training cannot be saved by skipping, backing off or rolling back any more.

    Attributes:
        diagnosis: what the guard saw: recent events, rollbacks, LR scale, last good step.
    """

    def __init__(self, message: str, diagnosis: dict[str, Any]) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis


@dataclass(frozen=True)
class Backoff:
    """Multiply every param group's LR by ``factor`` on trouble; recover geometrically.

    After each flagged step the LR scale becomes ``max(scale * factor, floor)``; after
    every ``patience`` consecutive calm steps it is divided by ``factor`` again, up to 1.
    Trouble that comes back after a recovery (a *relapse*: the recovered LR is at the edge
    of stability) multiplies the patience by ``patience_growth``, up to 64×, so a run
    near its stability limit spends most of its time below it instead of oscillating
    across it; this is TCP's exponential backoff applied to the LR. The scale multiplies
    whatever LR the user's scheduler set for that step: the scheduler sets the base, the
    guard scales it.

    Args:
        factor: multiplier per flagged step, in (0, 1).
        patience: calm steps before each recovery step.
        floor: smallest LR scale.
        window: a flagged step within this many steps of the previous flagged step is
            *persistent* trouble (the "auto" actions back off on it; an isolated one is
            treated as a bad batch and skipped).
        on_nonfinite: also back off on persistent NaN/Inf steps (repeated non-finite
            gradients are often a too-high LR's first sign).
        patience_growth: patience multiplier per relapse (1 keeps it fixed).
    """

    factor: float = 0.5
    patience: int = 25
    floor: float = 1e-3
    window: int = 10
    on_nonfinite: bool = True
    patience_growth: float = 2.0

    def __post_init__(self) -> None:
        check_positive("Backoff.factor", self.factor)
        if not 0 < self.factor < 1:
            raise ConfigError(f"Backoff.factor must be in (0, 1), got {self.factor!r}")
        check_int("Backoff.patience", self.patience, 1)
        check_int("Backoff.window", self.window, 1)
        check_positive("Backoff.floor", self.floor)
        if self.floor > 1:
            raise ConfigError(f"Backoff.floor must be in (0, 1], got {self.floor!r}")
        check_positive("Backoff.patience_growth", self.patience_growth)
        if self.patience_growth < 1:
            raise ConfigError(
                f"Backoff.patience_growth must be >= 1, got {self.patience_growth!r}")


@dataclass(frozen=True)
class Rollback:
    """Return to the last good snapshot when skipping and clipping are not enough.

    Args:
        every: take a snapshot every this many steps (kept if the steps before it are clean).
        keep: how many good snapshots to keep; a second rollback in a row goes further back.
        after_bad_steps: roll back after this many consecutive skipped steps.
        loss_spike_steps: roll back when the loss spikes this many steps in a row
            (only with ``on_loss_spike="rollback"``).
        skip_batches: after a rollback, ``guard.should_skip_batch()`` is true this many
            times (PaLM skipped the batches around a spike).
        lr_factor: multiply the LR scale by this after a rollback.
        max_rollbacks: give up with :class:`TrainingDivergedError` after this many.
        dir: also write snapshots to this folder (atomic, checksummed).
        disk_every: write every this many steps (default: ``every``).
        clean_window: a snapshot counts as good when this many steps before it were clean.
    """

    every: int = 100
    keep: int = 2
    after_bad_steps: int = 5
    loss_spike_steps: int = 3
    skip_batches: int = 0
    lr_factor: float = 0.5
    max_rollbacks: int = 5
    dir: str | None = None
    disk_every: int | None = None
    clean_window: int = 5

    def __post_init__(self) -> None:
        check_int("Rollback.every", self.every, 1)
        check_int("Rollback.keep", self.keep, 1)
        check_int("Rollback.after_bad_steps", self.after_bad_steps, 1)
        check_int("Rollback.loss_spike_steps", self.loss_spike_steps, 1)
        check_int("Rollback.skip_batches", self.skip_batches, 0)
        check_int("Rollback.max_rollbacks", self.max_rollbacks, 0)
        check_int("Rollback.clean_window", self.clean_window, 0)
        if self.disk_every is not None:
            check_int("Rollback.disk_every", self.disk_every, 1)
        check_positive("Rollback.lr_factor", self.lr_factor)
        if self.lr_factor > 1:
            raise ConfigError(f"Rollback.lr_factor must be in (0, 1], got {self.lr_factor!r}")


@dataclass(frozen=True)
class Policy:
    """What the guard does about each kind of trouble.

    Args:
        on_nonfinite: "skip" the step (default), "rollback" (skip, then roll back at
            once), or "raise" :class:`TrainingDivergedError`.
        on_spike: for a gradient-norm spike: "auto" (default: skip an isolated spike as a
            bad batch; on a spike within ``backoff.window`` steps of earlier trouble, apply
            the step clipped to the typical norm and lower the LR), "clip" (apply it
            clipped to the typical norm; only record), "skip" the step, "backoff" (apply
            clipped and lower the LR), "rollback", or "none" (record it, apply the step as
            the clip transforms left it).
        on_loss_spike: "none", "auto" (default, as for on_spike), "skip", "backoff" or
            "rollback".
        backoff: LR backoff settings (used by the "backoff" actions and by rollbacks).
        rollback: rollback settings; None disables snapshots unless an action needs them.
        grad_spike: the gradient-norm spike detector.
        loss_spike: the loss spike detector (needs ``guard.step(loss)``).
        max_consecutive_skips: without rollback, give up after this many skipped steps in
            a row rather than silently spin on a broken model.
    """

    on_nonfinite: str = "skip"
    on_spike: str = "auto"
    on_loss_spike: str = "auto"
    backoff: Backoff = field(default_factory=Backoff)
    rollback: Rollback | None = None
    grad_spike: NormSpike = field(default_factory=NormSpike)
    loss_spike: LossSpike = field(default_factory=LossSpike)
    max_consecutive_skips: int = 200

    def __post_init__(self) -> None:
        for name, value, allowed in (("on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS),
                                     ("on_spike", self.on_spike, SPIKE_ACTIONS),
                                     ("on_loss_spike", self.on_loss_spike, LOSS_SPIKE_ACTIONS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if not isinstance(self.backoff, Backoff):
            raise ConfigError(f"backoff must be a gradguard.Backoff, got {self.backoff!r}")
        if self.rollback is not None and not isinstance(self.rollback, Rollback):
            raise ConfigError(f"rollback must be a gradguard.Rollback, got {self.rollback!r}")
        check_int("max_consecutive_skips", self.max_consecutive_skips, 1)
        if self.needs_rollback and self.rollback is None:
            object.__setattr__(self, "rollback", Rollback())

    @property
    def needs_rollback(self) -> bool:
        return "rollback" in (self.on_nonfinite, self.on_spike, self.on_loss_spike) or \
            self.rollback is not None

    @property
    def backs_off(self) -> bool:
        return bool({"backoff", "auto"} & {self.on_spike, self.on_loss_spike}) or \
            self.needs_rollback

    def describe(self) -> dict[str, Any]:
        return {"on_nonfinite": self.on_nonfinite, "on_spike": self.on_spike,
                "on_loss_spike": self.on_loss_spike, "backoff": repr(self.backoff),
                "rollback": repr(self.rollback)}


class DeviceDecision(TensorState):
    """The per-step decision on the device: skip flag and LR scale."""

    def __init__(self, policy: Policy, device: torch.device) -> None:
        self.policy = policy
        f32 = {"dtype": torch.float32, "device": device}
        i64 = {"dtype": torch.long, "device": device}
        self.state = {"lr_scale": torch.ones((), **f32), "calm": torch.zeros((), **i64),
                      "step": torch.zeros((), **i64),
                      "last_flag": torch.full((), -(2**40), **i64),
                      "patience": torch.full((), float(policy.backoff.patience), **f32),
                      "recovered": torch.zeros((), dtype=torch.bool, device=device)}

    def __call__(self, nonfinite: Tensor, grad_spike: Tensor, loss_spike: Tensor
                 ) -> tuple[Tensor, Tensor]:
        """Return ``(skip, lr_scale)`` for this step; updates the backoff state."""
        p = self.policy
        b = p.backoff
        st = self.state
        flagged = nonfinite | grad_spike | loss_spike
        persistent = flagged & (st["step"] - st["last_flag"] <= b.window)
        st["last_flag"].copy_(torch.where(flagged, st["step"], st["last_flag"]))
        st["step"].add_(1)

        def acts(action: str, flag: Tensor) -> tuple[Tensor, Tensor]:
            """(skip, back off) for one detector's flag under its action."""
            if action in ("skip", "rollback"):
                return flag, torch.zeros_like(flag)
            if action == "backoff":
                return torch.zeros_like(flag), flag
            if action == "auto":
                return flag & ~persistent, flag & persistent
            return torch.zeros_like(flag), torch.zeros_like(flag)

        skip_g, back_g = acts(p.on_spike, grad_spike)
        skip_l, back_l = acts(p.on_loss_spike, loss_spike)
        skip = nonfinite | skip_g | skip_l
        if not p.backs_off:
            return skip, st["lr_scale"]
        trouble = back_g | back_l
        if b.on_nonfinite:
            trouble = trouble | (nonfinite & persistent)
        scale, calm = st["lr_scale"], st["calm"]
        lowered = torch.clamp(scale * b.factor, min=b.floor)
        calm_next = torch.where(trouble, torch.zeros_like(calm), calm + 1)
        recover = (calm_next >= st["patience"]) & (scale < 1)
        raised = torch.clamp(scale / b.factor, max=1.0)
        new = torch.where(trouble, lowered, torch.where(recover, raised, scale))
        relapse = trouble & st["recovered"]
        st["patience"].copy_(torch.where(
            relapse, torch.clamp(st["patience"] * b.patience_growth, max=64.0 * b.patience),
            st["patience"]))
        st["recovered"].copy_((st["recovered"] & ~trouble) | recover)
        scale.copy_(new)
        calm.copy_(torch.where(recover, torch.zeros_like(calm), calm_next))
        return skip, scale

    def scale_lr(self, factor: float) -> None:
        """Lower the LR scale (after a rollback) and restart the calm count."""
        s = self.state["lr_scale"]
        s.copy_(torch.clamp(s * factor, min=self.policy.backoff.floor))
        self.state["calm"].zero_()
