"""Summarise a JSONL run log: steps, skips, spikes, rollbacks, where trouble started."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..events import data_fault
from ..record import count_runs, read_jsonl
from ..runlog import Event, Meta, StepRecord

__all__ = ["RunSummary", "summarize"]

# Events that set the LR scale (the controller's decisions).
_SCALE_EVENTS = ("backoff", "rollback", "recover", "noise", "data_shift")


@dataclass
class RunSummary:
    """What a run log says, in numbers."""

    path: str
    steps: int = 0
    skipped: int = 0
    bad_data: int = 0  # steps whose data held NaN/Inf (skipped as the data's)
    clipped: int = 0
    first_loss: float | None = None
    last_loss: float | None = None  # as recorded: a run that ended NaN has NaN here
    last_finite_loss: float | None = None
    last_finite_step: int | None = None
    max_grad_norm: float | None = None
    events: Counter[str] = field(default_factory=Counter)
    origins: Counter[str] = field(default_factory=Counter)
    timeline: list[Event] = field(default_factory=list)
    lr_changes: list[tuple[int, float]] = field(default_factory=list)
    meta: Mapping[str, Any] = field(default_factory=dict)  # the run's Meta
    bad_lines: int = 0  # lines of the file that are no record (torn, corrupt): skipped
    resumed_at: list[int] = field(default_factory=list)  # steps a guard resumed the run at
    run: int = 0  # which run of the file (0-based)
    runs: int = 1  # how many runs the file holds

    @property
    def verdict(self) -> str | None:
        """The guard's closing verdict on the run (None when the log has none)."""
        return next((e["message"] for e in reversed(self.timeline) if e["kind"] == "verdict"),
                    None)

    @property
    def ended_nonfinite(self) -> bool:
        """The last recorded loss is NaN/Inf."""
        return self.last_loss is not None and not math.isfinite(self.last_loss)

    @property
    def first_trouble(self) -> dict[str, Any] | None:
        return next((e for e in self.timeline
                     if e["kind"] in ("nonfinite", "grad_spike", "loss_spike")), None)


def summarize(path: str | os.PathLike[str], run: int = -1) -> RunSummary:
    """Read a run log (tolerating a torn last line) and summarise one run of it.

    Args:
        path: the JSONL run log.
        run: which run, when several guards appended to the file: -1 the last, 0 the first.
    """
    s = RunSummary(str(path))
    s.runs = count_runs(path)
    s.run = run + s.runs if run < 0 else run
    last_scale: float | None = None
    origin_steps: set[int] = set()
    bad = [0]
    for rec in read_jsonl(path, run, bad):
        if isinstance(rec, Meta):
            if last_scale is None:  # (the scale the run started with: ×1 unless resumed)
                last_scale = rec.lr_scale if math.isfinite(rec.lr_scale) else 1.0
            if rec.first_step:
                s.resumed_at.append(rec.first_step)
            s.meta = rec
        elif isinstance(rec, StepRecord):
            s.steps = max(s.steps, rec.step + 1)
            s.skipped += rec.skipped
            s.bad_data += data_fault(rec)
            s.clipped += rec.clip_coef < 1 - 1e-6 and not rec.skipped
            loss = rec.loss
            # A NaN loss on a step the guard did not flag non-finite is a step without a
            # loss (guard.step() called without one), not a NaN loss.
            if math.isfinite(loss) or rec.nonfinite:
                if s.first_loss is None:
                    s.first_loss = loss
                s.last_loss = loss
                if math.isfinite(loss):
                    s.last_finite_loss, s.last_finite_step = loss, rec.step
            g = rec.grad_norm
            if math.isfinite(g):
                s.max_grad_norm = g if s.max_grad_norm is None else max(s.max_grad_norm, g)
        elif isinstance(rec, Event):
            scale = rec.get("lr_scale")
            # The controller's decisions, not the automatic warm-up's per-step ramp.
            last_scale = 1.0 if last_scale is None else last_scale
            if rec.kind in _SCALE_EVENTS and isinstance(scale, float) \
                    and abs(scale - last_scale) > 1e-9 * max(1.0, last_scale):
                s.lr_changes.append((rec.step, scale))
                last_scale = scale
            s.events[rec.kind] += 1
            # Where trouble starts: once per flagged step (a spike flags the gradient and
            # the loss at once), and never for the data's NaN/Inf (it enters at layer 0).
            if rec.get("origin_layer") and not rec.get("data") and rec.step not in origin_steps:
                origin_steps.add(rec.step)
                s.origins[rec["origin_layer"]] += 1
            s.timeline.append(rec)
    s.bad_lines = bad[0]
    return s
