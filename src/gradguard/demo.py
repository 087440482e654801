"""``gradguard demo``: real explosions on real data, then the same runs guarded."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn, optim

from . import scenarios
from .guard import Guard
from .scenarios.train import RunResult

GuardFactory = Callable[[nn.Module, optim.Optimizer], Guard] | None


@dataclass
class DemoRow:
    scenario: str
    label: str
    result: RunResult
    note: str = ""


LOG_DIR = Path("gradguard-runs") / "demo"


def _logged(scn: str) -> GuardFactory:
    return lambda m, o: Guard(m, o, log=LOG_DIR / f"{scn}.jsonl")


# (scenario, label, guard factory). The first run of each scenario is the unguarded one.
PLAN: list[tuple[str, str, GuardFactory]] = [
    ("linreg-raw", "no guard", None),
    ("linreg-raw", "gradguard default", _logged("linreg-raw")),
    ("mlp-corrupt", "no guard", None),
    ("mlp-corrupt", "gradguard default", _logged("mlp-corrupt")),
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
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    for scn, label, factory in PLAN:
        if progress is not None:
            progress.print(f"[dim]training {scn} ({label})…[/dim]")
        guards: list[Guard] = []

        def build(m: nn.Module, o: optim.Optimizer, factory: GuardFactory = factory,
                  guards: list[Guard] = guards) -> Guard:
            assert factory is not None
            g = factory(m, o)
            guards.append(g)
            return g

        res = scenarios.run(scn, seed=seed, guard=None if factory is None else build)
        for g in guards:
            g.close()
        base = baselines.get(scn)
        if factory is None:
            baselines[scn] = res
        rows.append(DemoRow(scn, label, res, _note(scn, res, base)))
    return rows
