"""The guard's device half: one step's pipeline, in tensor ops only.

For each ``guard.step``: the fused norm pass (:mod:`gradguard.stats`; under
torch.distributed agreed across ranks in one all-reduce) → the spike tests, a comparison
of the norm and the loss with the limits the host-side detectors set (:mod:`gradguard.detect`)
→ the clip transforms, the user's chain and then the spike
clamp (:mod:`gradguard.clip`) → the skip decision (:class:`~gradguard.respond.DeviceDecision`)
→ the LR factor (:mod:`gradguard.lr`) and the optimizer step, skipped on the device when
the decision says so (:mod:`gradguard.stepper`) → the step's row for the host
(:func:`~gradguard.record.pack_row`). Nothing here reads a device value on the host, so
the training loop never waits; :mod:`gradguard.host` handles the rows when they arrive.

It uses the guard's step parts (detectors' limits, transforms, decision, stepper, LR
factor), whose state the guard saves and rolls back.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .clip import ClipContext, SpikeClamp, Transform, chain
from .distributed import local_tensor
from .lr import host_lr
from .record import LR_SCALE_AT, pack_row
from .respond import Action, DeviceDecision
from .stats import (
    GradStats,
    compute_stats,
    global_from_norms,
    local_norms,
    loss_value,
    not_finite,
    unusable,
)
from .stepper import Stepper

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["DeviceSide"]


class DeviceSide:
    """One step's device pipeline for one guard (see the module docstring)."""

    def __init__(self, guard: Guard, skip_strategy: str) -> None:
        self.g = guard
        policy, device = guard.policy, guard.device
        # The transforms a step runs: the user's, then (under the spike actions that apply
        # a flagged step) the clamp of a spike to the norm the detector expected.
        self.clamps = policy.on_spike in (Action.AUTO, Action.CLIP, Action.BACKOFF)
        self.transforms: Transform = chain(guard.clip, SpikeClamp()) if self.clamps \
            else guard.clip
        self.grad_spike = copy.deepcopy(policy.grad_spike)
        self.loss_spike = copy.deepcopy(policy.loss_spike)
        self.grad_spike.bind(device)  # (host objects: the device only sees their limits)
        self.loss_spike.bind(device)
        self.decision = DeviceDecision(policy, device)
        # Set at the first step when the model has recurrent layers (Policy.clip_recurrent).
        self.clip_ratio: float | None = None
        self.stepper = Stepper(guard.optimizer, skip_strategy, guard.params)
        self._nan = torch.full((), math.nan, device=device)
        self._false = torch.zeros((), dtype=torch.bool, device=device)
        self._true = torch.ones((), dtype=torch.bool, device=device)

    def step(self, k: int, groups: Any, loss: Tensor | None) -> tuple[Tensor, tuple[Any, ...]]:
        """Run step ``k`` on ``groups`` (the collected gradients).

        Returns:
            The step's row for the host, and the fields of its
            :class:`~gradguard.record.StepInfo` after ``step`` and before ``rolled_back``.
        """
        g = self.g
        loss_d: Tensor | None = None
        loss_spike = self._false
        if loss is not None:
            loss_d = loss_value(local_tensor(loss)).to(g.device)
        bad_inputs = g._inputs.take()  # (this step's data flag; agreed on across ranks)
        stats, loss_d, groups, bad_inputs = self.measure(groups, loss_d, bad_inputs)
        nonfinite = stats.nonfinite
        if loss_d is not None:
            nonfinite = nonfinite | not_finite(loss_d)
        ok = ~nonfinite
        noise = g._samples.noise()  # > 1 for a smaller batch (epoch end)
        # The detectors' limits are host numbers: each test is one comparison kernel.
        lim = self.grad_spike.limits(noise)
        grad_spike = self.flag(stats.global_norm, lim.above, ok)
        checked = loss_d is not None and g.policy.on_loss_spike != "none" \
            and not g._host.unjudged
        if checked:
            loss_spike = self.flag(loss_d, self.loss_spike.limits(noise).above, ok)
        g._host.judged[k] = (noise, checked)  # what the detectors learn this row with

        ctx = ClipContext(groups, stats, [g.names[i] for i in groups.index], ok, g.device)
        ctx.spike, ctx.typical = grad_spike, lim.typical
        ctx.clip_all = g.control is not None and g.control.clip_since is not None
        # (a smaller batch's norm is larger by its noise factor, as the spike test allows)
        ctx.clip_ratio = None if self.clip_ratio is None else self.clip_ratio * noise
        ctx.host_reads = self.stepper.strategy == "host"
        self.transforms(ctx)
        clipped = ctx.global_norm
        # A fused optimizer applies one pending factor itself, as it unscales for
        # GradScaler (and writes the scaled gradients back): one pass over the gradients
        # fewer than a separate multiply.
        scale = ctx.take_scale() if self.stepper.strategy == "found_inf" else ctx.flush()

        skip = self.decision(nonfinite, grad_spike, loss_spike)
        # (after a rollback: the restored weights stay as they are while their first
        # losses judge them, see HostSide.take_hold; the row keeps the detectors' skip)
        applied = self._true if g._host.take_hold(k) else skip
        base_lr = g.optimizer.param_groups[0]["lr"]
        if (host := host_lr(base_lr)) is not None:  # (free to read: no device wait)
            g._host.base_lrs[k] = host
        if len(groups.index) != len(g.params):
            mask = np.zeros(len(g.params), dtype=bool)
            mask[list(groups.index)] = True
            g._host.present[k] = mask
        g.lr.prepare(base_lr)
        with g.lr.applied(), g._usage.stepping():
            self.stepper.step(groups.params, applied, scale)
        # (the host strategy has read the skip already: a host bool is free there)
        g._running.after(applied, bool(applied) if self.stepper.strategy == "host" else None)
        for hook in g.after_step:
            hook()
        if g.scaler is not None and g.scaler.is_enabled():
            g.scaler.update()
        g.skipped.add_(skip)
        for grad in groups.grads:
            grad._gradguard_version = grad._version  # type: ignore[attr-defined]

        row = pack_row(stats.full_norms(len(g.params)),
                       loss=loss_d if loss_d is not None else self._nan,
                       grad_norm=stats.global_norm, clipped_norm=clipped, skipped=skip,
                       nonfinite=nonfinite, grad_spike=grad_spike, loss_spike=loss_spike,
                       lr_scale=g.lr.tensor, bad_inputs=self._false if bad_inputs is None
                       else bad_inputs.to(g.device))
        # (this step's factor: the row's own copy, which the next step does not overwrite
        # as it does the LR tensor)
        return row, (loss_d, stats.global_norm, clipped, applied, nonfinite, grad_spike,
                     loss_spike, row[LR_SCALE_AT], stats.norms)

    def flag(self, value: Tensor, above: float, ok: Tensor) -> Tensor:
        """``ok & (value > above)``; no kernel while a detector has no limit yet."""
        return ok & (value > above) if above < math.inf else self._false

    def measure(self, groups: Any, loss_d: Tensor | None, bad_inputs: Tensor | None
                ) -> tuple[GradStats, Tensor | None, Any, Tensor | None]:
        """The fused norm pass; under torch.distributed, agreed across ranks (with the data
        flag: whether any rank's data held NaN/Inf)."""
        g = self.g
        if g._sync is None:
            return compute_stats(groups, g.device), loss_d, groups, bad_inputs
        # All ranks agree on norms, loss and the NaN vote in one all-reduce; everything
        # after this point is computed from identical inputs on every rank.
        if g._sync.sharded:
            groups = dataclasses.replace(groups, sum_squares=g._sync.sum_squares)
        local = local_norms(groups, groups.grads, g.device)
        bad = unusable(global_from_norms(local))
        if loss_d is not None:
            bad = bad | not_finite(loss_d)
        watched = g._inputs.armed
        norms, loss_d, any_bad, any_data = g._sync.step(local, loss_d, bad, bad_inputs)
        stats = compute_stats(groups, g.device, norms=norms)
        stats.nonfinite = stats.nonfinite | any_bad
        return stats, loss_d, groups, any_data if watched else None
