"""``gradguard demo``: the bench's quick preset — real explosions, the peers, the guard."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .bench import QUICK, BenchConfig
from .bench.metrics import SummaryRow
from .events import counted

OUT = Path("gradguard-runs") / "demo"


def demo_config(out: Path = OUT, jobs: int | None = None, seed: int = 0) -> BenchConfig:
    """The quick preset at one seed, on every core."""
    return BenchConfig(scenarios=QUICK["scenarios"], remedies=QUICK["remedies"], seeds=(seed,),
                       lr_points=QUICK["lr_points"],
                       jobs=jobs if jobs is not None else os.cpu_count() or 1, out=out,
                       command="gradguard demo")


def _runs(rows: list[dict[str, Any]], scenario: str, remedy: str, lr: float
          ) -> list[dict[str, Any]]:
    return [r for r in rows if r["scenario"] == scenario and r["remedy"] == remedy
            and math.isclose(r["lr"], lr)]


def headlines(rows: list[dict[str, Any]], summary: list[SummaryRow], meta: dict[str, Any],
              out: Path | None = None) -> list[str]:
    """One plain sentence per scenario: what broke unguarded, what the guard did (with the
    guard's own verdict from its run log in ``out/logs`` when there is one)."""
    lines = []
    for scn, info in meta["scenarios"].items():
        lr = info["lr"]
        plain = _runs(rows, scn, "none", lr)
        guarded = _runs(rows, scn, "gradguard", lr)
        if not plain or not guarded:
            continue
        p, g = plain[0], guarded[0]
        if p["first_nonfinite"] is not None:
            broke = f"the loss became NaN/inf at step {p['first_nonfinite']}"
        elif p["diverged"]:
            broke = f"the loss blew up from step {p['diverged_at']}"
        else:
            broke = f"it trained (test loss {p['final_test_loss']:.4g})"
        if g["diverged"]:
            kept = "the default guard did not save it"
        else:
            metric = (f", {info['metric']} {g['final_metric']:.3f}"
                      if g["final_metric"] is not None else "")
            kept = (f"with the default guard it trained to a test loss of "
                    f"{g['final_test_loss']:.4g}{metric} "
                    f"({counted(int(g['skipped']), 'step')} skipped, {g['clipped']} clipped)")
        mine = [s for s in summary if s.scenario == scn]
        widest = max((s.stable_decades for s in mine if s.stable_decades is not None),
                     default=None)
        wide = ""
        if widest is not None:
            best = [s for s in mine if s.stable_decades == widest]
            span = (f"lr {best[0].stable_lo:.2g}" if widest == 0 else
                    f"{widest:.2g} decade{'' if widest == 1 else 's'}, "
                    f"lr {best[0].stable_lo:.2g}–{best[0].stable_hi:.2g}")
            wide = (f"; widest stable LR range on this grid: "
                    f"{', '.join(s.remedy for s in best)} ({span})")
        said = _verdict(out, scn)
        lines.append(f"{scn} at lr {lr:.3g}: unguarded, {broke}; {kept}{wide}"
                     f"{_least_sensitive(mine)}."
                     + (f" The guard's verdict: {said}" if said else ""))
    return lines


def _least_sensitive(mine: list[SummaryRow]) -> str:
    """"; lowest LR sensitivity: …" (ties within the scenario's tolerance, as the bench's
    verdict reads them), with the unguarded run's for scale."""
    finite = [s for s in mine if math.isfinite(s.lr_sensitivity)]
    if not finite:
        return ""
    low = min(s.lr_sensitivity for s in finite)
    best = [s for s in finite if s.lr_sensitivity <= low + s.tol]
    none = next((s for s in mine if s.remedy == "none"), None)
    plain = ("" if none is None or none in best
             else f"; unguarded {none.lr_sensitivity:.3g}")
    return (f"; lowest LR sensitivity (mean excess loss over the grid): "
            f"{', '.join(s.remedy for s in best)} ({low:.3g}{plain})")


def _verdict(out: Path | None, scenario: str) -> str | None:
    if out is None:
        return None
    log = out / "logs" / f"{scenario}__gradguard.jsonl"
    if not log.exists():
        return None
    from .report import summarize

    return summarize(log).verdict
