"""Short training trials: the measured consequences the doctor's severities rest on.

A statistic measured at initialisation (a gradient ratio across depth, an input scale,
an LR range test) is a *suspicion*: stock architectures show large ratios by design
(attention at initialisation passes almost no gradient to its queries and keys) and
still train well. So before the doctor calls anything a warning or critical, it trains
copies for a few dozen steps: the user's setup as it is, and the same setup with the
proposed fix. A finding is critical only when the user's run fails (diverges or makes
no progress) and the fix cures it, a warning when the run trains but the fix trains it
much further in the same steps, and info otherwise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .lr_find import Batch, clone_optimizer, cycle_batches

__all__ = ["Trial", "run_trial", "verdict"]

# A run whose loss ends this many times above where it started has diverged.
DIVERGE_FACTOR = 3.0
# A run that removes less than this fraction of its starting loss has stalled.
STALL_FRACTION = 0.05
# A fix cures a stalled run when it removes at least this much more of the starting loss.
HELP_FRACTION = 0.1
# A run that trains still has a problem when its fix removes this much more of it.
MUCH_FRACTION = 0.25


@dataclass
class Trial:
    """Losses and gradient norms of one short training run on a copy.

    Attributes:
        label: what was trained ("as is", "re-initialised", "LR 0.01", ...).
        losses: training loss per step (NaN/inf kept).
        grad_norms: global gradient norm per step, before the optimizer step.
    """

    label: str
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)

    @property
    def start(self) -> float:
        """Mean of the first three losses (the loss the run starts from)."""
        head = [v for v in self.losses[:3] if math.isfinite(v)]
        return sum(head) / len(head) if head else math.nan

    @property
    def end(self) -> float:
        """Median of the last ten losses (inf when any of them is not finite)."""
        tail = sorted(v if math.isfinite(v) else math.inf for v in self.losses[-10:])
        return tail[len(tail) // 2] if tail else math.inf

    @property
    def diverged(self) -> bool:
        """A non-finite loss or gradient, or a loss ending far above where it started."""
        if not all(math.isfinite(v) for v in self.losses + self.grad_norms):
            return True
        return self.end > DIVERGE_FACTOR * self.start if self.start > 0 else False

    @property
    def progress(self) -> float:
        """Fraction of the starting loss removed by the end (-inf when diverged)."""
        if self.diverged or not math.isfinite(self.start):
            return -math.inf
        return (self.start - self.end) / max(abs(self.start), 1e-12)

    @property
    def ok(self) -> bool:
        """Trained: finite, not diverged, and at least a little progress."""
        return not self.diverged and self.progress >= STALL_FRACTION

    def describe(self) -> str:
        """One phrase for a finding's title, e.g. 'loss 2.3 → 0.41 in 60 steps'."""
        n = len(self.losses)
        bad = next((i for i, v in enumerate(self.losses) if not math.isfinite(v)), None)
        if bad is not None:
            return f"loss turns non-finite at step {bad}"
        g_bad = next((i for i, v in enumerate(self.grad_norms) if not math.isfinite(v)), None)
        if g_bad is not None:
            return f"gradients turn non-finite at step {g_bad}"
        return f"loss {self.start:.3g} → {self.end:.3g} in {n} steps"

    def summary(self) -> dict[str, object]:
        """The numbers, for a finding's evidence."""
        finite = [g for g in self.grad_norms if math.isfinite(g)]
        return {"label": self.label, "steps": len(self.losses), "start_loss": self.start,
                "end_loss": self.end, "diverged": self.diverged, "progress": self.progress,
                "max_grad_norm": max(finite) if finite else math.inf}


def run_trial(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Batch | Iterable[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    *,
    label: str = "as is",
    lr: float | None = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> Trial:
    """Train a copy of ``model`` with a copy of ``optimizer`` for ``steps`` steps.

    Args:
        model, optimizer: the user's; neither is modified.
        data: one batch or an iterable of batches (cycled).
        loss_fn: ``loss_fn(model(inputs), targets)``.
        steps: optimizer steps; the run stops early at the first non-finite loss.
        label: names the trial in findings.
        lr: train at this LR instead of the optimizer's.
        prepare: applied to the copy before training (a fix); returns the module to train,
            whose parameters must be the copy's (a wrapper such as a Standardizer may add
            none of its own).

    Returns:
        The :class:`Trial`.
    """
    m = copy.deepcopy(model)
    opt = clone_optimizer(optimizer, model, m)
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    net = prepare(m) if prepare is not None else m
    net.train()
    params = [p for p in m.parameters() if p.requires_grad]
    batches = cycle_batches(data)
    res = Trial(label)
    for _ in range(steps):
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        value = float(loss.detach())
        res.losses.append(value)
        if not math.isfinite(value):
            break
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.detach().float()) for g in grads]))) if grads else 0.0
        res.grad_norms.append(norm)
        if not math.isfinite(norm):
            break
        opt.step()
    return res


def verdict(user: Trial, fixed: Trial) -> str:
    """Severity of a suspected cause, from the user's trial and the trial with its fix.

    Returns:
        "critical" when the user's run fails (diverges, or stalls) and the fix cures it
        (no divergence; from a stall, real progress); "warning" when the user's run
        trains but the fix reaches a much lower loss in the same steps; else "info".
    """
    if fixed.diverged:
        return "info"
    if user.diverged:
        return "critical"
    gain = (user.end - fixed.end) / max(abs(user.start), 1e-12)
    if user.progress < STALL_FRACTION:
        return "critical" if fixed.ok and gain >= HELP_FRACTION else "info"
    return "warning" if gain >= MUCH_FRACTION else "info"


class Trials:
    """The trials of one diagnosis: each variant trained at most once, from a fixed seed.

    The seed makes a diagnosis repeatable (re-initialisation and dropout draw random
    numbers); the caller's random state is restored afterwards.

    Args:
        model, optimizer, data, loss_fn: the user's setup (left untouched).
        steps: optimizer steps per trial.
        seed: seed of every trial.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 data: Batch | Iterable[Batch], loss_fn: Callable[[Tensor, Tensor], Tensor],
                 steps: int, seed: int = 0) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.loss_fn = loss_fn
        self.steps = steps
        self.seed = seed
        self.user_lr = float(optimizer.param_groups[0]["lr"])
        self._cache: dict[str, Trial] = {}

    def _run(self, key: str, **kwargs: object) -> Trial:
        if key not in self._cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self._cache[key] = run_trial(self.model, self.optimizer, self.data,
                                             self.loss_fn, self.steps, label=key,
                                             **kwargs)  # type: ignore[arg-type]
        return self._cache[key]

    def done(self) -> dict[str, Trial]:
        """The trials run so far, by label."""
        return dict(self._cache)

    def user(self) -> Trial:
        """The setup as it is."""
        return self._run("as is")

    def reinit(self) -> Trial:
        """Weights re-initialised by ``gg.fixes.reinit(model, "auto")``, same LR."""
        from ..fixes.init import reinit

        def prepare(m: nn.Module) -> nn.Module:
            reinit(m, "auto")
            return m
        return self._run("re-initialised", prepare=prepare)

    def standardized(self, sample: list[Batch]) -> Trial:
        """Inputs (and regression targets) standardised by ``gg.fixes.Standardizer``."""
        from ..fixes.data import Standardizer

        x = sample[0][0]
        std = Standardizer.fit(sample, dim=-1 if x.dim() == 3 else 1)
        return self._run("inputs standardised", prepare=std.wrap)

    def lower_lr(self) -> tuple[float, Trial]:
        """The first of LR/10 and LR/100 that trains, else the last one tried."""
        for factor in (10, 100):
            lr = self.user_lr / factor
            t = self._run(f"LR {lr:.3g}", lr=lr)
            if t.ok:
                break
        return lr, t
