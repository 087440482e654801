"""Terminal side of the bench: rich progress bars and result tables (needs the [cli] extra)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .metrics import SummaryRow
from .runner import BenchConfig, BenchResult, Job, plan_jobs, run_bench

__all__ = ["run_with_progress", "summary_tables"]


def run_with_progress(cfg: BenchConfig, console: Console) -> BenchResult:
    """``run_bench`` with one overall bar and one bar per scenario."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                  console=console, transient=False) as bar:
        jobs, _ = plan_jobs(cfg)
        total = bar.add_task("[bold]all runs", total=len(jobs))
        per = {name: bar.add_task(f"  {name}", total=sum(j.scenario == name for j in jobs))
               for name in dict.fromkeys(j.scenario for j in jobs)}

        def tick(job: Job, row: dict[str, Any], done: int, n: int) -> None:
            bar.update(total, completed=done)
            bar.advance(per[job.scenario])
            if row["error"]:
                bar.console.print(f"[red]{job.scenario}/{job.remedy} lr={job.lr:.3g} "
                                  f"seed={job.seed} crashed: {row['error']}[/red]")

        return run_bench(cfg, progress=tick)


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if math.isinf(v):
        return "[red]∞[/red]"
    return f"{v:.{digits}g}"


def summary_tables(summary: Sequence[SummaryRow], meta: dict[str, Any]) -> list[Table]:
    """One rich table per scenario; the widest stable LR range is bold green."""
    tables = []
    for scn in dict.fromkeys(s.scenario for s in summary):
        rows = [s for s in summary if s.scenario == scn]
        info = meta["scenarios"][scn]
        widest = max((s.stable_decades for s in rows if s.stable_decades is not None),
                     default=None)
        t = Table(title=f"{scn}: {info['summary']}", title_justify="left")
        t.add_column("remedy", no_wrap=True)
        t.add_column("stable LRs", no_wrap=True)
        t.add_column("decades", justify="right")
        t.add_column("LR sens.", justify="right")
        # Read at the scenario's default LR only: a grid without it leaves these empty.
        off = "" if any(s.default_lr_in_grid for s in rows) else " (not in grid)"
        t.add_column(f"blew up @{info['lr']:.2g}{off}", justify="right")
        t.add_column("test loss", justify="right")
        if info["metric"]:
            t.add_column(info["metric"][:8], justify="right")
        t.add_column("skipped", justify="right")
        for s in rows:
            if s.stable_lo is None:
                rng, dec = "[red]none[/red]", "–"
            else:
                rng = (f"{s.stable_lo:.2g}" if s.stable_lo == s.stable_hi
                       else f"{s.stable_lo:.2g}–{s.stable_hi:.2g}")
                dec = f"{s.stable_decades:.2g}"
                if widest is not None and s.stable_decades == widest:
                    dec = f"[bold green]{dec}[/bold green]"
            blew = ("–" if math.isnan(s.default_lr_diverged)
                    else f"[red]{s.default_lr_diverged:.0%}[/red]" if s.default_lr_diverged
                    else "[green]no[/green]")
            cells = [s.remedy, rng, dec, _fmt(s.lr_sensitivity), blew,
                     _fmt(s.default_lr_test_loss)]
            if info["metric"]:
                cells.append(_fmt(s.default_lr_metric))
            cells.append("–" if math.isnan(s.skipped) else f"{s.skipped:.0f}")
            t.add_row(*cells)
        tables.append(t)
    return tables
