"""Real-data scenarios that reproduce gradient explosions, and the loop that runs them.

Each scenario is a recipe: real data (shipped in PyPI wheels), a model, an optimizer at
a learning rate where the unguarded run blows up, and an evaluation. ``run`` trains it
with or without a guard and returns a :class:`~gradguard.scenarios.train.RunResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnknownNameError
from ..guard import Guard
from .train import BLOWUP, Batch, RunResult, train

__all__ = ["SCENARIOS", "GuardFactory", "Prepared", "RunResult", "Scenario", "Setup", "get",
           "make_scaler", "prepare", "run"]


@dataclass
class Setup:
    """Everything one run of a scenario needs, built fresh per seed.

    Attributes:
        model: the freshly initialised model.
        data: ``batch_size -> endless iterator of (inputs, targets)``, reproducible per seed.
        batch_size: the scenario's own batch size.
        loss_fn: ``(outputs, targets) -> scalar loss``.
        evaluate: ``model -> (held-out loss, metric or None)``.
        make_optimizer: ``(params, lr) -> optimizer``; ``lr`` may be swept.
        corrupt: ``(step, batch) -> batch``, faulty batches the scenario injects.
        amp_dtype: run forward passes under ``torch.autocast`` with this dtype; float16 also
            gets a ``torch.amp.GradScaler`` (dynamic loss scaling).
        act: the activation the model's hidden layers use, for ``gg.fixes.reinit``'s choice
            and for the bench's activation swap ("relu", "tanh", ...).
    """

    model: nn.Module
    data: Callable[[int], Iterator[Batch]]
    batch_size: int
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module], tuple[float, float | None]]
    make_optimizer: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
    corrupt: Callable[[int, Batch], Batch] | None = None
    amp_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Scenario:
    """A named, reproducible explosion.

    Attributes:
        name: CLI name, e.g. ``linreg-raw``.
        summary: one line for tables.
        lr: a learning rate at which the unguarded run blows up.
        steps: optimizer steps of a full run.
        build: ``seed -> Setup``.
        metric: name of ``final_metric`` ("accuracy", "success", or "" when there is none).
        lr_grid: learning rates the bench sweeps (ascending, including ``lr``).
        optimizer: the optimizer family ``make_optimizer`` builds ("sgd" or "adam"), so the
            bench's optimizer-swap remedy knows what to swap to.
        blowup: a run whose final loss ends above ``blowup`` × its first loss (or non-finite)
            diverged. 10 suits losses that explode; a language model that blows up settles
            near its initial loss instead, so it uses a ratio near 1.
        reference_loss: the loss ``blowup`` multiplies, where it is known in advance (chance
            level, e.g. ln 4 for a 4-way classifier with a zero readout); None uses the
            run's first loss. A fixed reference keeps the verdict the same for remedies that
            change the first loss (a re-initialised readout).
    """

    name: str
    summary: str
    lr: float
    steps: int
    build: Callable[[int], Setup]
    metric: str = ""
    lr_grid: tuple[float, ...] = ()
    optimizer: str = "sgd"
    blowup: float = BLOWUP
    reference_loss: float | None = None

    def grid(self) -> tuple[float, ...]:
        """The LR sweep: ``lr_grid`` or, when unset, 1/100× to 10× ``lr`` in half decades."""
        if self.lr_grid:
            return self.lr_grid
        return tuple(self.lr * 10 ** (k / 2) for k in range(-4, 3))


SCENARIOS: dict[str, Scenario] = {}


def register(scn: Scenario) -> Scenario:
    SCENARIOS[scn.name] = scn
    return scn


def get(name: str) -> Scenario:
    """Look a scenario up by name, with the list of names in the error."""
    if name not in SCENARIOS:
        raise UnknownNameError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


GuardFactory = Callable[[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler | None], Guard]
"""``(model, optimizer, scaler) -> Guard``: ``scaler`` is the run's GradScaler (fp16
scenarios) or None; pass it on, ``Guard(model, optimizer, scaler=scaler)``."""


@dataclass
class Prepared:
    """One run, set up and ready to train: what :func:`prepare` returns.

    Attributes:
        scenario: the scenario.
        setup: its freshly built parts (model, data, loss, evaluation).
        optimizer: built with the run's LR.
        scaler: the fp16 GradScaler, or None.
        guard: the guard replacing ``optimizer.step()``, or None.
    """

    scenario: Scenario
    setup: Setup
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    guard: Guard | None

    def train(self, steps: int | None = None, *, batch_scale: int = 1,
              **kwargs: Any) -> RunResult:
        """Train ``steps`` optimizer steps (default: the scenario's) and close the guard.

        Args:
            steps: optimizer steps.
            batch_scale: batches this many times the scenario's size.
            kwargs: passed to :func:`~gradguard.scenarios.train.train` (scheduler, accum,
                before_step).
        """
        s, scn = self.setup, self.scenario
        try:
            return train(s.model, self.optimizer, s.data(s.batch_size * batch_scale),
                         s.loss_fn, steps or scn.steps, guard=self.guard,
                         evaluate=s.evaluate, corrupt=s.corrupt, amp_dtype=s.amp_dtype,
                         scaler=self.scaler, blowup=scn.blowup,
                         reference_loss=scn.reference_loss, **kwargs)
        finally:
            if self.guard is not None:
                self.guard.close()


def prepare(
    scn: Scenario | str,
    *,
    lr: float | None = None,
    seed: int = 0,
    guard: GuardFactory | None = None,
    fix_setup: Callable[[Scenario, Setup], None] | None = None,
    fix_model: Callable[[nn.Module], object] | None = None,
    optimizer: Callable[[Scenario, Setup, Iterable[nn.Parameter], float],
                        torch.optim.Optimizer] | None = None,
) -> Prepared:
    """Set one run up: seed, build, (remedy hooks), optimizer, scaler, guard.

    The one place a run is assembled: :func:`run`, the bench and the doctor all start here,
    so a seed means the same model, batches and optimizer everywhere.

    Args:
        scn: the scenario or its name.
        lr: learning rate (default: the scenario's exploding one).
        seed: seeds the model init and the batch order.
        guard: a :data:`GuardFactory`; None trains unguarded.
        fix_setup: ``(scenario, setup) -> None`` changes the setup in place (inputs, loss).
        fix_model: ``model -> anything`` changes the model in place (init, norms).
        optimizer: ``(scenario, setup, params, lr) -> optimizer`` replaces the scenario's.
    """
    scn = get(scn) if isinstance(scn, str) else scn
    lr = scn.lr if lr is None else lr
    torch.manual_seed(seed)
    setup = scn.build(seed)
    if fix_setup is not None:
        fix_setup(scn, setup)
    if fix_model is not None:
        fix_model(setup.model)
    params = setup.model.parameters()
    opt = (optimizer(scn, setup, params, lr) if optimizer is not None
           else setup.make_optimizer(params, lr))
    scaler = make_scaler(setup)
    g = guard(setup.model, opt, scaler) if guard is not None else None
    return Prepared(scn, setup, opt, scaler, g)


def run(
    scn: Scenario | str,
    *,
    lr: float | None = None,
    seed: int = 0,
    steps: int | None = None,
    guard: GuardFactory | None = None,
) -> RunResult:
    """Train one scenario once.

    Args:
        scn: the scenario or its name.
        lr: learning rate (default: the scenario's exploding one).
        seed: seeds the model init and the batch order.
        steps: optimizer steps (default: the scenario's).
        guard: ``(model, optimizer, scaler) -> Guard``, e.g.
            ``lambda m, o, s: gg.Guard(m, o, scaler=s)``; None trains unguarded.
    """
    return prepare(scn, lr=lr, seed=seed, guard=guard).train(steps)


def make_scaler(setup: Setup) -> torch.amp.GradScaler | None:
    """The dynamic loss scaler an fp16 scenario trains with (None otherwise)."""
    if setup.amp_dtype != torch.float16:
        return None
    device = next(setup.model.parameters()).device.type
    return torch.amp.GradScaler(device)


# Registering the built-in scenarios imports their modules.
from . import builtin  # noqa: E402, F401, I001
from . import sequence  # noqa: E402, F401
from . import vision  # noqa: E402, F401
