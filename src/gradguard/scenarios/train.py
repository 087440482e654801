"""A plain training loop shared by the demo, the bench and the integration tests.

It reads top to bottom like a user's loop; the guard, when given, replaces
``optimizer.step()`` and nothing else.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..guard import Guard
from ..respond import TrainingDivergedError
from ..stats import collect_grads, compute_stats

__all__ = ["RunResult", "batches", "train"]

Batch = tuple[Tensor, Tensor]
# By default, a run that ends with its loss this many times above its start has blown up.
BLOWUP = 10.0


@dataclass
class RunResult:
    """What one training run did, on the host (read once, after the run).

    Attributes:
        losses: training loss per step (NaN/inf kept as they were).
        grad_norms: global gradient norm per step, before clipping.
        clipped_norms: global gradient norm per step after clipping (what the optimizer saw,
            before any skip).
        first_nonfinite: first step whose training loss was NaN/Inf, or None (a guarded run
            can see one on a corrupted batch and still finish healthy).
        diverged_at: for a run that ends broken (final loss non-finite or above ``blowup`` ×
            the reference loss), the step where its final stretch above that limit began;
            else None.
        initial_loss: evaluation loss before training (the first training loss when there
            is no evaluation); the reference for the blowup verdict.
        final_loss: evaluation loss after training (inf when the model is broken).
        final_train_loss: median training loss over the last 20 steps (inf when broken).
        final_metric: evaluation accuracy (classification) or None.
        skipped: number of optimizer steps the guard skipped.
        clipped: number of steps whose gradient was rescaled (by the guard or a peer clipper).
        rollbacks: snapshots the guard restored.
        gave_up: the guard raised ``TrainingDivergedError`` and training stopped there.
        seconds: wall time of the training loop.
    """

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    clipped_norms: list[float] = field(default_factory=list)
    first_nonfinite: int | None = None
    diverged_at: int | None = None
    initial_loss: float = math.nan
    final_loss: float = math.inf
    final_train_loss: float = math.inf
    final_metric: float | None = None
    skipped: int = 0
    clipped: int = 0
    rollbacks: int = 0
    gave_up: bool = False
    seconds: float = 0.0

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None


def batches(x: Tensor, y: Tensor, batch_size: int, seed: int = 0) -> Iterator[Batch]:
    """Endless shuffled mini-batches, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterator[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    *,
    guard: Guard | None = None,
    evaluate: Callable[[nn.Module], tuple[float, float | None]] | None = None,
    corrupt: Callable[[int, Batch], Batch] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    accum: int = 1,
    before_step: Callable[[], None] | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    blowup: float = BLOWUP,
    reference_loss: float | None = None,
) -> RunResult:
    """Train for ``steps`` optimizer steps and report what happened.

    Args:
        model, optimizer, loss_fn: as in any PyTorch loop.
        data: an iterator of ``(inputs, targets)`` batches.
        steps: number of optimizer steps.
        guard: when given, ``guard.step(loss)`` replaces ``optimizer.step()``.
        evaluate: returns ``(loss, metric)`` for the trained model.
        corrupt: ``(step, batch) -> batch``, to inject faulty batches (first micro-batch).
        scheduler: stepped once per optimizer step.
        accum: micro-batches accumulated per optimizer step (gradient accumulation).
        before_step: called between backward and ``optimizer.step()`` in an unguarded run,
            where a peer clipper (``clip_grad_norm_``, ZClip, AutoClip) goes.
        amp_dtype: autocast dtype for the forward pass (None: full precision).
        scaler: a GradScaler for fp16; a guard given one uses it, else the loop does.
        blowup: the run diverged if its final loss ends above ``blowup`` × its initial loss
            (held-out when ``evaluate`` is given; ``reference_loss`` when given).
    """
    res = RunResult()
    losses: list[Tensor] = []
    norms: list[Tensor] = []
    post: list[Tensor] = []
    skips: list[Tensor] = []
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    use_scaler = scaler is not None and scaler.is_enabled()
    if guard is not None and use_scaler and guard.scaler is None:
        raise ConfigError("pass the scaler to the Guard too: Guard(..., scaler=scaler)")

    def autocast() -> contextlib.AbstractContextManager[None]:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    initial_eval: float | None = None
    if evaluate is not None:
        # The verdict compares held-out loss with held-out loss: a remedy that changes the
        # training loss itself (Huber, z-loss) is judged in the scenario's own units.
        model.eval()
        with torch.no_grad(), autocast():
            initial_eval = evaluate(model)[0]
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        seen: list[Batch] = []  # (passed to the guard: NaN/Inf in them is the data's)
        for micro in range(accum):
            x, y = next(data)
            if corrupt is not None and micro == 0:
                x, y = corrupt(step, (x, y))
            seen.append((x, y))
            with autocast():
                loss = loss_fn(model(x), y).float() / accum
            (scaler.scale(loss) if use_scaler else loss).backward()
            total = total + loss.detach()
        if guard is None:
            if use_scaler:
                scaler.unscale_(optimizer)
            norms.append(compute_stats(collect_grads(params), device).global_norm)
            if before_step is not None:
                before_step()
                post.append(compute_stats(collect_grads(params), device).global_norm)
            else:
                post.append(norms[-1])
            if use_scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        else:
            try:
                info = guard.step(total, batch=seen)
            except TrainingDivergedError:
                res.gave_up = True
                losses.append(total)
                break
            norms.append(info.grad_norm)
            post.append(info.clipped_norm)
            skips.append(info.skipped)
        if scheduler is not None:
            scheduler.step()
        losses.append(total)
    res.seconds = time.perf_counter() - start
    # One host copy for the whole run, after it.
    res.losses = torch.stack(losses).float().tolist()
    n = len(norms)
    if n:
        res.grad_norms = torch.stack(norms).float().tolist()
        res.clipped_norms = torch.stack(post).float().tolist()
    res.clipped = sum(1 for a, b in zip(res.grad_norms, res.clipped_norms, strict=True)
                      if math.isfinite(a) and b < a * (1 - 1e-6))
    if skips:
        res.skipped = int(torch.stack(skips).sum())
    if guard is not None:
        res.rollbacks = guard.rollbacks
    res.first_nonfinite = next((i for i, v in enumerate(res.losses) if not math.isfinite(v)),
                               None)
    tail = sorted(v if math.isfinite(v) else math.inf for v in res.losses[-20:])
    res.final_train_loss = tail[len(tail) // 2]
    if evaluate is not None:
        model.eval()
        with torch.no_grad(), autocast():
            loss_v, metric = evaluate(model)
        res.final_loss = loss_v if math.isfinite(loss_v) else math.inf
        res.final_metric = metric
    else:
        res.final_loss = res.final_train_loss
    res.initial_loss = initial_eval if initial_eval is not None else res.losses[0]
    ref = reference_loss if reference_loss is not None else res.initial_loss
    # A model broken before it trained (non-finite at init) has no scale to blow up from:
    # judge it by finiteness alone.
    limit = blowup * ref if math.isfinite(ref) else math.inf
    if res.gave_up or not res.final_loss <= limit:
        # Where the final stretch above the limit began: after the last step whose loss was
        # still finite and at or below it (0 when it never was).
        below = [i for i, v in enumerate(res.losses) if math.isfinite(v) and v <= limit]
        res.diverged_at = min(below[-1] + 1, len(res.losses) - 1) if below else 0
    return res
