"""LR warm-up then cosine decay, built from torch's schedulers (no scheduler of our own).

Pairing with the guard: the scheduler owns the base LR; the guard's spike backoff
multiplies whatever LR the scheduler set, for the step it applies, and puts the
scheduler's value back afterwards. So ``scheduler.step()`` keeps its schedule and the
guard only ever scales it down (see ``Guard(policy=...)`` and ``Backoff``).
"""

from __future__ import annotations

import functools
import numbers

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, SequentialLR

from ..errors import ConfigError, check_int, check_positive

__all__ = ["warmup_cosine"]

_MARK = "_gradguard_warmup_cosine"


def _hold(factor: float, _step: int) -> float:
    return factor


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, *,
                  start_factor: float = 0.01, min_lr: float = 0.0) -> SequentialLR:
    """Linear LR warm-up for ``warmup_steps``, then cosine decay to ``min_lr``, held there
    after ``total_steps``.

    torch's ``SequentialLR([LinearLR, CosineAnnealingLR, LambdaLR])`` (the last holds
    ``min_lr``: torch's cosine alone would climb back up after its half period). Warm-up
    keeps the first updates small while Adam's moment estimates and the loss landscape's
    sharpness settle (Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 2.2; Liu
    et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond", section 3);
    cosine decay is Loshchilov & Hutter 2017, "SGDR", eq. 5 (without restarts).

    Args:
        optimizer: the optimizer whose groups' LRs are the peak LRs.
        warmup_steps: steps from ``start_factor`` × LR up to the LR (>= 1).
        total_steps: steps of the whole schedule (> ``warmup_steps``); call
            ``scheduler.step()`` once per optimizer step.
        start_factor: the first step's LR as a fraction of the peak, in (0, 1].
        min_lr: the LR the cosine ends at, the same for every param group; it must not
            exceed any group's peak LR.

    Returns:
        The ``torch.optim.lr_scheduler.SequentialLR``.

    Raises:
        ConfigError: bad step counts, a ``start_factor`` or ``min_lr`` that is not a number
            in range, ``min_lr`` above a param group's peak LR, or the optimizer already has
            a warmup_cosine schedule (two schedulers on one optimizer fight over its LR).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"warmup_cosine: optimizer must be a torch.optim.Optimizer, got "
                          f"{type(optimizer).__name__}")
    # (numpy's ints are ints here: step counts often come out of array arithmetic)
    warmup_steps, total_steps = (int(v) if isinstance(v, numbers.Integral) and
                                 not isinstance(v, bool) else v
                                 for v in (warmup_steps, total_steps))
    check_int("warmup_cosine.warmup_steps", warmup_steps, 1)
    check_int("warmup_cosine.total_steps", total_steps, 2)
    if total_steps <= warmup_steps:
        raise ConfigError(f"warmup_cosine: total_steps ({total_steps}) must exceed "
                          f"warmup_steps ({warmup_steps})")
    start_factor = check_positive("warmup_cosine.start_factor", start_factor)
    if start_factor > 1:
        raise ConfigError(f"warmup_cosine: start_factor must be in (0, 1], got {start_factor!r}")
    min_lr = check_positive("warmup_cosine.min_lr", min_lr, allow_zero=True)
    peaks = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    # Per group: one floor for every group, above a low-LR group's peak, would make that
    # group's "decay" climb to min_lr and stay there.
    low = [(i, p) for i, p in enumerate(peaks) if min_lr > p]
    if low:
        i, peak = low[0]
        which = "" if len(peaks) == 1 else f" of param group {i}"
        raise ConfigError(f"warmup_cosine: min_lr ({min_lr!r}) is above the peak LR{which} "
                          f"({peak!r}): the cosine would climb, not decay; use a min_lr at or "
                          f"below the smallest group LR ({min(peaks)!r})")
    if getattr(optimizer, _MARK, False):
        raise ConfigError("warmup_cosine: this optimizer already has a warmup_cosine "
                          "schedule; two schedulers on one optimizer overwrite each other's LR")
    sched = SequentialLR(
        optimizer,
        [LinearLR(optimizer, start_factor=start_factor, end_factor=1.0,
                  total_iters=warmup_steps),
         CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=min_lr),
         LambdaLR(optimizer, [functools.partial(_hold, min_lr / peak if peak > 0 else 0.0)
                              for peak in peaks])],
        milestones=[warmup_steps, total_steps],
    )
    setattr(optimizer, _MARK, True)
    return sched
