"""``gradguard demo``: real explosions on real data, then the same runs guarded."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn, optim

from . import clip, scenarios
from .guard import Guard
from .scenarios.train import RunResult

GuardFactory = Callable[[nn.Module, optim.Optimizer], Guard] | None


@dataclass
class DemoRow:
    scenario: str
    label: str
    result: RunResult
    note: str = ""


# (scenario, label, guard factory). The first run of each scenario is the unguarded one.
PLAN: list[tuple[str, str, GuardFactory]] = [
    ("linreg-raw", "no guard", None),
    ("linreg-raw", "Guard(clip=GlobalNorm(10))",
     lambda m, o: Guard(m, o, clip=clip.GlobalNorm(10.0))),
    ("mlp-corrupt", "no guard", None),
    ("mlp-corrupt", "Guard() default", lambda m, o: Guard(m, o)),
]


def _note(scn: str, res: RunResult, baseline: RunResult | None) -> str:
    if baseline is None:
        if res.diverged_at is None:
            return ""
        where = (f"loss became NaN/inf at step {res.first_nonfinite}"
                 if res.first_nonfinite is not None
                 else f"loss grew past 10× its start at step {res.diverged_at}")
        return f"{where}; the model is ruined"
    if res.diverged_at is None and baseline.diverged_at is not None:
        extra = f", {res.skipped} bad step(s) skipped" if res.skipped else ""
        return f"trained to a finite loss of {res.final_loss:.4g}{extra}"
    return ""


def run_demo(seed: int = 0, progress: Any = None) -> list[DemoRow]:
    """Run the demo plan and return one row per run."""
    rows: list[DemoRow] = []
    baselines: dict[str, RunResult] = {}
    for scn, label, factory in PLAN:
        if progress is not None:
            progress.print(f"[dim]training {scn} ({label})…[/dim]")
        res = scenarios.run(scn, seed=seed, guard=factory)
        base = baselines.get(scn)
        if factory is None:
            baselines[scn] = res
        rows.append(DemoRow(scn, label, res, _note(scn, res, base)))
        assert math.isfinite(res.seconds)
    return rows
