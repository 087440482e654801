"""A plain training loop shared by the demo, the bench and the integration tests.

It reads top to bottom like a user's loop; the guard, when given, replaces
``optimizer.step()`` and nothing else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..guard import Guard
from ..stats import collect_grads, compute_stats

__all__ = ["RunResult", "batches", "train"]

Batch = tuple[Tensor, Tensor]
# A run that ends with its loss this many times above where it started has blown up.
BLOWUP = 10.0


@dataclass
class RunResult:
    """What one training run did, on the host (read once, after the run).

    Attributes:
        losses: training loss per step (NaN/inf kept as they were).
        grad_norms: global gradient norm per step, before clipping.
        first_nonfinite: first step whose training loss was NaN/Inf, or None (a guarded run
            can see one on a corrupted batch and still finish healthy).
        diverged_at: for a run that ends broken (final loss non-finite or above
            ``BLOWUP`` × the first loss), the first step where the loss went there; else None.
        final_loss: evaluation loss after training (inf when the model is broken).
        final_metric: evaluation accuracy (classification) or None.
        skipped: number of optimizer steps the guard skipped.
        clipped: number of steps whose gradient the guard rescaled.
        seconds: wall time of the training loop.
    """

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    first_nonfinite: int | None = None
    diverged_at: int | None = None
    final_loss: float = math.inf
    final_metric: float | None = None
    skipped: int = 0
    clipped: int = 0
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
) -> RunResult:
    """Train for ``steps`` optimizer steps and report what happened.

    Args:
        model, optimizer, loss_fn: as in any PyTorch loop.
        data: an iterator of ``(inputs, targets)`` batches.
        steps: number of optimizer steps.
        guard: when given, ``guard.step(loss)`` replaces ``optimizer.step()``.
        evaluate: returns ``(loss, metric)`` for the trained model.
        corrupt: ``(step, batch) -> batch``, to inject faulty batches.
    """
    res = RunResult()
    losses: list[Tensor] = []
    norms: list[Tensor] = []
    skips: list[Tensor] = []
    clips: list[Tensor] = []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        x, y = next(data)
        if corrupt is not None:
            x, y = corrupt(step, (x, y))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if guard is None:
            params = list(model.parameters())
            norms.append(compute_stats(collect_grads(params), params[0].device).global_norm)
            optimizer.step()
        else:
            info = guard.step(loss)
            norms.append(info.grad_norm)
            skips.append(info.skipped)
            clips.append(info.clipped_norm < info.grad_norm * (1 - 1e-6))
        losses.append(loss.detach())
    res.seconds = time.perf_counter() - start
    # One host copy for the whole run, after it.
    res.losses = torch.stack(losses).float().tolist()
    res.grad_norms = torch.stack(norms).float().tolist()
    if skips:
        res.skipped = int(torch.stack(skips).sum())
        res.clipped = int(torch.stack(clips).sum())
    res.first_nonfinite = next((i for i, v in enumerate(res.losses) if not math.isfinite(v)),
                               None)
    if evaluate is not None:
        model.eval()
        with torch.no_grad():
            loss_v, metric = evaluate(model)
        res.final_loss = loss_v if math.isfinite(loss_v) else math.inf
        res.final_metric = metric
    else:
        res.final_loss = res.losses[-1] if math.isfinite(res.losses[-1]) else math.inf
    limit = BLOWUP * res.losses[0] if math.isfinite(res.losses[0]) else math.inf
    if not res.final_loss <= limit:
        res.diverged_at = next(
            (i for i, v in enumerate(res.losses) if not math.isfinite(v) or v > limit), steps - 1
        )
    return res
