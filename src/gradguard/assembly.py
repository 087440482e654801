"""How a :class:`~gradguard.Guard` is put together from its parts, and taken apart again
when that fails part-way (a log path that cannot be created, a module refusing a hook).

The guard builds its device parts first (:class:`~gradguard.device.DeviceSide`: the
detectors, the transforms, the skip decision and the stepper, which may switch the
optimizer to a fused or capturable kernel); :func:`assemble` adds the host parts, the
sinks and, last, the hooks on the user's model and optimizer; :func:`undo` leaves the
user's optimizer, model and sinks as they were before ``Guard(...)``. :class:`Parts`
declares what it builds, for readers and type checkers.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import lifecycle
from .control import Controller
from .distributed import Sync, make_sync
from .host import HostSide
from .lr import LRFactor
from .params import ForwardOrder, InputWatch
from .record import Mailbox, Recorder, Sink, make_sinks
from .rollback import RollbackStore
from .running import RunningStats
from .samples import SampleCounter
from .usage import Usage

if TYPE_CHECKING:
    from .detect import Detector
    from .guard import Guard
    from .respond import DeviceDecision
    from .stepper import Stepper

__all__ = ["Parts", "assemble", "undo"]


class Parts:
    """What :func:`assemble` builds into a guard: its parts (each holds its own state) and
    counters. :class:`~gradguard.Guard` derives from it so these are declared attributes."""

    grad_spike: Detector
    loss_spike: Detector
    decision: DeviceDecision
    stepper: Stepper
    control: Controller | None
    lr: LRFactor
    recorder: Recorder
    mailbox: Mailbox
    store: RollbackStore | None
    steps: int  # optimizer steps taken through the guard (skipped ones included)
    skipped: Tensor  # steps skipped, a device tensor
    _host: HostSide
    _sync: Sync | None
    _tracked: list[Any]
    _started: bool
    _closed: bool
    _usage: Usage
    _samples: SampleCounter
    _order_probe: ForwardOrder | None
    _running: RunningStats  # norm layers' statistics, put back on a skipped step
    _inputs: InputWatch  # NaN/Inf in the data (see gradguard.params)
    _unwatched: list[tuple[str, Tensor]]  # frozen when the guard was built (see params.py)
    _finalizer: weakref.finalize


def assemble(g: Guard, scaler: Any, log: Any, tensorboard: Any, console: bool,
             sinks: Sequence[Sink], flush_every: int, layers_every: int,
             distributed: Any) -> None:
    """Build ``g``'s host parts, sinks and hooks on top of its device parts."""
    d, policy, model, optimizer = g._device, g.policy, g.model, g.optimizer
    g.grad_spike, g.loss_spike, g.decision = d.grad_spike, d.loss_spike, d.decision
    g.stepper = d.stepper
    # Host parts: the stability controller and the LR factor it sets.
    stab = policy.stability
    g.control = Controller(stab, can_clip=d.clamps) if stab is not None else None
    g.lr = LRFactor(optimizer, stab.warmup_steps(optimizer) if stab else 0, g.device)
    g.steps = 0
    g.skipped = torch.zeros((), dtype=torch.long, device=g.device)

    g._sync = make_sync(distributed, g.params)
    rank = g._sync.rank if g._sync is not None else None
    g.recorder = Recorder(g.names, make_sinks(log, tensorboard, console, sinks, rank),
                          flush_every, layers_every)
    g.mailbox = Mailbox(g.device)
    g._tracked = []
    # Without the controller nothing rolls back: snapshots are kept only for disk (resume).
    idle = policy.stability is None and policy.rollback is not None \
        and policy.rollback.dir is None
    g.store = None if policy.rollback is None or idle else RollbackStore(
        policy.rollback, model, g.params, optimizer, g._tracked, g.recorder, rank, g._sync)
    g._inputs = InputWatch()  # (armed by the host side; its hook goes with the finalizer)
    g._host = HostSide(g)
    g._started = False
    g._closed = False
    # Last, so a failed construction leaves no hooks behind (see gradguard.usage).
    g._usage = Usage(model, optimizer, scaler is not None, g.device)
    # Ranks must decide alike: under torch.distributed the batch-size factor stays 1.
    g._samples = SampleCounter(model if g._sync is None else None)
    stab = policy.stability
    probe = ForwardOrder(model, g.params,
                         outputs=stab is not None and stab.warmup == "attention")
    g._order_probe = probe
    g._running = RunningStats(model)
    g._finalizer = lifecycle.register(g, g.recorder, g._usage, g._samples, probe,
                                      g._running, g._inputs)


def undo(g: Guard, user_sinks: int) -> None:
    """After a failed construction: put the optimizer's switches back, take the hooks off
    and close the sinks the guard opened (the first ``user_sinks`` are the user's own)."""
    steps = [g._device.stepper.undo] + [
        part.remove for part in (g.__dict__.get(k) for k in
                                 ("_usage", "_samples", "_order_probe", "_running",
                                  "_inputs"))
        if part is not None]
    if "recorder" in g.__dict__:  # (make_sinks puts the user's first)
        steps += [s.close for s in g.recorder.sinks[user_sinks:]]
    for step in steps:
        with contextlib.suppress(Exception):  # the original error is the news
            step()
