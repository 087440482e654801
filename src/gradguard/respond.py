"""Responders and the policy that picks them: skip, LR backoff, rollback, escalation.

The per-step part of the decision runs on the device: whether to skip this step is a
tensor computed from the detectors' flags. The structural part runs on the host when the
step's row arrives (:mod:`gradguard.control` decides): lowering the LR scale, rolling
back to a snapshot, skipping the next batches, giving up with
:class:`TrainingDivergedError`.

How large training runs handle the same trouble by hand, and what each responder mirrors:
PaLM (Chowdhery et al. 2022, section 5.1) restarted ~100 steps before a spike and skipped
200–500 batches; OPT-175B (Zhang et al. 2022, logbook) restarted from checkpoints with a
lower LR; OLMo-core skips steps whose loss or gradient norm is far above its recent mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor

from .control import Stability
from .detect import Detector, LossSpike, NormSpike
from .detect import make as make_detector
from .errors import ConfigError, GradGuardError, check_int, check_positive
from .state import TensorState

__all__ = ["Action", "Policy", "Rollback", "TrainingDivergedError", "resolve_policy"]


class Action(StrEnum):
    """What the guard does about a flagged step (a plain string works as well)."""

    NONE = "none"          # record only (for on_loss_spike: no loss check at all)
    AUTO = "auto"          # skip an isolated flag; apply clipped when the run is in trouble
    CLIP = "clip"          # apply the step clipped to the typical norm
    SKIP = "skip"          # skip the step
    BACKOFF = "backoff"    # instability at once: lower the LR in place
    ROLLBACK = "rollback"  # instability at once: roll back and lower the LR
    RAISE = "raise"        # give up with TrainingDivergedError


MEMORY = ("auto", "device", "cpu", "off")
A = Action
NONFINITE_ACTIONS = (A.SKIP, A.ROLLBACK, A.RAISE)
SPIKE_ACTIONS = (A.NONE, A.AUTO, A.CLIP, A.SKIP, A.BACKOFF, A.ROLLBACK)
LOSS_SPIKE_ACTIONS = (A.NONE, A.AUTO, A.SKIP, A.BACKOFF, A.ROLLBACK)


class TrainingDivergedError(GradGuardError, RuntimeError):
    """Training cannot be saved by skipping, backing off or rolling back any more.

    Attributes:
        diagnosis: what the guard saw: recent events, rollbacks, LR scale, last good step.
    """

    def __init__(self, message: str, diagnosis: dict[str, Any]) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis


@dataclass(frozen=True)
class Rollback:
    """Return to the last good snapshot when the run becomes unstable.

    On by default (``Policy.rollback``) when a snapshot is affordable (see ``memory``):
    when the stability controller finds persistent instability it restores model,
    optimizer, guard state and tracked objects to the last snapshot taken while the run
    was calm, then continues at the lowered LR scale, so the unstable stretch is undone
    instead of trained on (PaLM, Chowdhery et al. 2022, §5.1).

    Args:
        every: take a snapshot every this many steps (kept when the run was calm then);
            with the stability controller also at steps 8, 16, 32, … before the first
            (see :meth:`gradguard.rollback.RollbackStore.due`; those are not written to
            ``dir``).
        keep: how many good snapshots to keep in memory.
        skip_batches: after a rollback, ``guard.should_skip_batch()`` is true this many
            times (PaLM skipped the batches around a spike); needs ``guard.batches``.
        max_rollbacks: give up with :class:`TrainingDivergedError` after this many (None:
            no cap; rollbacks cannot loop without progress anyway, since a retry needs a
            snapshot verified clean since the last rollback and every other rollback lowers
            the LR towards the floor where the guard gives up; faults a long run meets at
            intervals each cost one).
        memory: where in-memory snapshots live: "auto" (on the parameters' device when
            ``keep`` snapshots take at most ``device_fraction`` of its memory, else in
            host memory when they take at most ``host_fraction`` of what is free there,
            else no rollback), "device", "cpu", or "off".
        device_fraction, host_fraction: the budgets of ``memory="auto"``.
        dir: also write snapshots to this folder (atomic, checksummed); they are the kept
            in-memory ones, so not with ``memory="off"``.
        disk_every: write every this many steps (default: ``every``; a multiple of it:
            only the snapshots taken every ``every`` steps exist to be written).
        clean_window: a snapshot counts as good when this many steps after it (the first
            computed with its weights) were clean and the loss level calm.
    """

    every: int = 50
    keep: int = 2
    skip_batches: int = 0
    max_rollbacks: int | None = None
    memory: str = "auto"
    device_fraction: float = 0.1
    host_fraction: float = 0.25
    dir: str | None = None
    disk_every: int | None = None
    clean_window: int = 5

    def __post_init__(self) -> None:
        if self.dir == "":
            raise ConfigError("Rollback.dir is empty: give a folder path ('.' for the "
                              "current folder), or None to keep snapshots in memory only")
        if self.dir is not None and not isinstance(self.dir, str):
            if not isinstance(self.dir, os.PathLike):
                raise ConfigError(f"Rollback.dir must be a folder path (str or os.PathLike) "
                                  f"or None, got {self.dir!r}")
            # (a Path's repr is no literal: the saved settings could not be compared)
            object.__setattr__(self, "dir", os.fspath(self.dir))
        check_int("Rollback.every", self.every, 1)
        check_int("Rollback.keep", self.keep, 1)
        check_int("Rollback.skip_batches", self.skip_batches, 0)
        if self.max_rollbacks is not None:
            check_int("Rollback.max_rollbacks", self.max_rollbacks, 0)
        check_int("Rollback.clean_window", self.clean_window, 0)
        if self.disk_every is not None:
            check_int("Rollback.disk_every", self.disk_every, 1)
            if self.disk_every % self.every:
                raise ConfigError(
                    f"Rollback.disk_every={self.disk_every} is not a multiple of every="
                    f"{self.every}: only the snapshots taken every {self.every} steps exist to "
                    f"be written (every={self.every}, disk_every={self.every} writes each of "
                    "them)")
        if self.memory not in MEMORY:
            raise ConfigError(f"Rollback.memory must be one of {MEMORY}, got {self.memory!r}")
        if self.memory == "off" and self.dir is not None:
            raise ConfigError("Rollback(memory='off') keeps no snapshot, and the ones in dir= "
                              "are written from the kept ones: none would be written; use "
                              "memory='cpu' (host memory) or 'auto'")
        for name in ("device_fraction", "host_fraction"):
            v = check_positive(f"Rollback.{name}", getattr(self, name))
            if v > 1:
                raise ConfigError(f"Rollback.{name} must be in (0, 1], got {v!r}")


@dataclass(frozen=True)
class Policy:
    """What the guard does about each kind of trouble.

    Per step, on the device: NaN/Inf steps are skipped; a gradient-norm or loss spike is
    handled by ``on_spike`` / ``on_loss_spike``. Over many steps, on the host: the
    stability controller (``stability``) tells bad batches from an unstable run and lowers
    the LR (rolling back first when ``rollback`` can), see :mod:`gradguard.control`.

    Args:
        on_nonfinite: "skip" the step (default), "rollback" (skip, then treat the run as
            unstable at once), or "raise" :class:`TrainingDivergedError`.
        on_spike: for a gradient-norm spike: "auto" (default: skip an isolated spike as a
            bad batch; when the step before was flagged too, apply the step clipped to the
            typical norm, so an unstable run keeps moving while the controller acts),
            "clip" (apply it clipped to the typical norm), "skip" the step, "backoff"
            (apply it clipped and treat the run as unstable at once: lower the LR, no
            rollback), "rollback" (skip it and treat the run as unstable at once), or
            "none" (record it, apply the step as the clip transforms left it).
        on_loss_spike: "none" (no loss check: nothing flagged, recorded or counted, for a
            loss whose jumps are its nature), "auto" (default: as for on_spike, skip an
            isolated one and
            apply one that follows a flagged step), "skip", "backoff" (apply it and lower
            the LR) or "rollback". A loss-spike step that is applied is clipped to the
            typical norm only when its gradient norm spiked too: clamping every one was
            measured to turn a far too high LR's loud blow-up, which the controller
            answers in a few steps, into hidden units dying quietly at that LR
            (benchmarks/RESULTS.md, "clamping loss-spike steps").
        stability: the stability controller's settings; None turns it off (the LR is
            then never changed, nothing is rolled back, so no snapshot is kept but for
            ``Rollback(dir=...)``, and ``max_consecutive_skips`` is the only escalation).
        rollback: rollback settings (default: on where affordable, see
            :class:`Rollback`); None turns rollback off.
        grad_spike: the gradient-norm spike detector (any
            :class:`~gradguard.detect.Detector`, or the name it was registered under with
            :func:`gradguard.detect.register`; default :class:`~gradguard.NormSpike`,
            registered as "norm_spike").
        loss_spike: the loss spike detector (needs ``guard.step(loss)``; a detector or a
            registered name; default :class:`~gradguard.LossSpike`, "loss_spike").
        max_consecutive_skips: give up after this many skipped steps in a row rather than
            silently spin on a broken model.
        clip_recurrent: True (default): when torch's recurrent layers (RNN/LSTM/GRU or
            their cells) ran in the first forward pass, clip every step whose gradient
            norm is more than the spike detector's ``min_ratio`` (3) times the typical
            norm (× the small-batch factor the spike test uses) to that bound, as soon as
            the detector has a typical norm, under the spike actions that apply a step
            clipped ("auto", "clip", "backoff"); "always": do that for any model (a
            recurrence written by hand, which the guard cannot tell from a shared
            layer; it also keeps streaks of gradient-norm spikes from counting as
            instability, as for a recurrent model, see ``Stability.norm_streaks``);
            False: never. A recurrent net's loss surface has cliffs (Pascanu,
            Mikolov & Bengio 2013, §3.2): one step over one throws its hidden units into
            saturation before a z-test of 6σ on its heavy-tailed norms flags anything.
            Measured in benchmarks/RESULTS.md ("Clipping recurrent nets from the first
            step"). Needs a detector with a ``min_ratio`` (the default
            :class:`~gradguard.NormSpike`).
    """

    on_nonfinite: Action | str = Action.SKIP
    on_spike: Action | str = Action.AUTO
    on_loss_spike: Action | str = Action.AUTO
    stability: Stability | None = field(default_factory=Stability)
    rollback: Rollback | None = field(default_factory=Rollback)
    grad_spike: Detector | str = field(default_factory=NormSpike)
    loss_spike: Detector | str = field(default_factory=LossSpike)
    max_consecutive_skips: int = 200
    clip_recurrent: bool | str = True

    def __post_init__(self) -> None:
        for name, value, allowed in (("on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS),
                                     ("on_spike", self.on_spike, SPIKE_ACTIONS),
                                     ("on_loss_spike", self.on_loss_spike, LOSS_SPIKE_ACTIONS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {[str(a) for a in allowed]}, "
                                  f"got {value!r}")
            object.__setattr__(self, name, Action(value))
        if self.stability is not None and not isinstance(self.stability, Stability):
            raise ConfigError(f"stability must be a gradguard.Stability or None, got "
                              f"{self.stability!r}")
        if self.rollback is not None and not isinstance(self.rollback, Rollback):
            raise ConfigError(f"rollback must be a gradguard.Rollback or None, got "
                              f"{self.rollback!r}")
        for name in ("grad_spike", "loss_spike"):
            if isinstance(getattr(self, name), str):  # a registered name
                object.__setattr__(self, name, make_detector(getattr(self, name)))
            example = "NormSpike" if name == "grad_spike" else "LossSpike"
            if isinstance(getattr(self, name), type):  # (a class passes the Protocol check)
                raise ConfigError(f"{name} takes a detector, not its class: "
                                  f"{getattr(self, name).__name__}() with parentheses (e.g. "
                                  f"gg.{example}()), got {getattr(self, name)!r}")
            if not isinstance(getattr(self, name), Detector):
                raise ConfigError(
                    f"{name} takes a detector (e.g. gg.{example}(...)): an object with "
                    f"bind, limits, observe, state_dict and load_state_dict; got "
                    f"{getattr(self, name)!r}")
        check_int("max_consecutive_skips", self.max_consecutive_skips, 1)
        if not isinstance(self.clip_recurrent, bool) and self.clip_recurrent != "always":
            raise ConfigError(f"clip_recurrent must be True, False or 'always', got "
                              f"{self.clip_recurrent!r}")
        needs = A.ROLLBACK in (self.on_nonfinite, self.on_spike, self.on_loss_spike)
        if needs and self.rollback is None:
            raise ConfigError("a 'rollback' action needs Policy(rollback=gg.Rollback(...)); "
                              "it is None here")
        if self.stability is None and needs | (A.BACKOFF in (self.on_spike,
                                                               self.on_loss_spike)):
            raise ConfigError("the 'backoff' and 'rollback' actions act through the stability "
                              "controller: leave Policy(stability=...) set")

    def describe(self) -> dict[str, Any]:
        return {"on_nonfinite": str(self.on_nonfinite), "on_spike": str(self.on_spike),
                "on_loss_spike": str(self.on_loss_spike), "stability": repr(self.stability),
                "rollback": repr(self.rollback), "clip_recurrent": self.clip_recurrent}

    def immediate(self, nonfinite: bool, grad_spike: bool, loss_spike: bool
                  ) -> tuple[str, bool] | None:
        """``(reason, may roll back)`` when an action makes this one flagged step count as
        instability at once ("backoff" lowers the LR without rolling back)."""
        if nonfinite and self.on_nonfinite == A.ROLLBACK:
            return "NaN/Inf step (on_nonfinite='rollback')", True
        for flag, action, what in ((grad_spike, self.on_spike, "gradient-norm spike"),
                                   (loss_spike, self.on_loss_spike, "loss spike")):
            if flag and action in (A.BACKOFF, A.ROLLBACK):
                return f"{what} (on_*='{action}')", action == A.ROLLBACK
        return None


class DeviceDecision(TensorState):
    """The per-step skip decision on the device.

    NaN/Inf steps are skipped. A spike under "auto" is skipped when the step before was
    not flagged (a bad batch) and applied when it was (the run is in trouble and the
    controller is acting on it); the spike clamp clips it when its gradient norm spiked.
    """

    def __init__(self, policy: Policy, device: torch.device) -> None:
        self.policy = policy
        self.state = {"prev_flag": torch.zeros((), dtype=torch.bool, device=device)}

    def __call__(self, nonfinite: Tensor, grad_spike: Tensor, loss_spike: Tensor) -> Tensor:
        """Return ``skip`` for this step (a 0-dim bool tensor)."""
        p = self.policy
        prev = self.state["prev_flag"]
        spikes = grad_spike | loss_spike
        pairs = ((p.on_spike, grad_spike), (p.on_loss_spike, loss_spike))
        skip = nonfinite
        for action, flag in pairs:
            if action in (A.SKIP, A.ROLLBACK):
                skip = skip | flag
        auto = [flag for action, flag in pairs if action == A.AUTO]
        if auto:
            # "auto" skips a spike unless the step before was flagged too; with both
            # detectors on "auto" (the default) that is one test on either flag.
            either = spikes if len(auto) == 2 else auto[0]
            skip = skip | (either & ~prev)
        prev.copy_(nonfinite | spikes)
        return skip


def resolve_policy(policy: Policy | None, on_nonfinite: str | None, on_spike: str | None,
                   on_loss_spike: str | None, rollback: Any) -> Policy:
    """The policy with the ``Guard(on_*=..., rollback=...)`` shortcuts applied."""
    policy = policy if policy is not None else Policy()
    if not isinstance(policy, Policy):
        raise ConfigError(f"policy must be a gradguard.Policy, got {policy!r}; use "
                          "Policy(on_spike=...) or the on_* shortcuts")
    if rollback is not None and rollback is not False and not isinstance(rollback, Rollback):
        raise ConfigError(f"rollback takes a gradguard.Rollback, or False to turn rollback "
                          f"off, got {rollback!r}")
    overrides = {k: v for k, v in (("on_nonfinite", on_nonfinite), ("on_spike", on_spike),
                                   ("on_loss_spike", on_loss_spike), ("rollback", rollback))
                 if v is not None}
    if overrides.get("rollback") is False:
        overrides["rollback"] = None
    if not overrides:
        return policy
    return Policy(**{**{f: getattr(policy, f) for f in policy.__dataclass_fields__},
                     **overrides})
