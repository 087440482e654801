"""Cross-LR stability metrics and the bench's tables.

Two numbers summarise how a remedy copes with the learning rate, per scenario:

* **stable LR range**: the widest contiguous stretch of the LR grid where every seed
  converges (does not diverge, and its mean held-out loss is within ``tol`` of the way from
  the best loss back to the initial loss), in decades of LR;
* **LR sensitivity** (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
  training instabilities", §2.2): the mean over the LR grid of ``min(L(lr), L0) − L*``, where
  ``L0`` is the initial loss and ``L*`` the best loss any remedy reached on the scenario.
  Lower is better; it charges both instability and slow training at small LRs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import median

__all__ = ["SummaryRow", "markdown", "summarize"]


@dataclass
class SummaryRow:
    """One (scenario, remedy) line of ``summary.csv``."""

    scenario: str
    remedy: str
    runs: int
    diverged_runs: int
    stable_lo: float | None
    stable_hi: float | None
    stable_decades: float | None
    lr_sensitivity: float
    default_lr_test_loss: float
    default_lr_metric: float | None
    default_lr_diverged: float
    clipped: float
    skipped: float
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def _loss(row: dict) -> float:
    v = float(row["final_test_loss"])
    return v if math.isfinite(v) and not int(row["diverged"]) else math.inf


def summarize(rows: Sequence[dict], default_lr: dict[str, float],
              tol: float = 0.1) -> list[SummaryRow]:
    """Aggregate per-run rows (dicts with the ``runs.csv`` columns) by scenario and remedy.

    Args:
        rows: one dict per run.
        default_lr: each scenario's exploding LR, where the "default LR" columns are read.
        tol: a run at some LR converged if its loss is at most
            ``L* + tol · (L0 − L*)``.
    """
    by_scn: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_scn[r["scenario"]].append(r)
    out: list[SummaryRow] = []
    for scn, srows in by_scn.items():
        base = [float(r["initial_loss"]) for r in srows if r["remedy"] == "none"] or \
            [float(r["initial_loss"]) for r in srows]
        init = median(v for v in base if math.isfinite(v)) if any(
            math.isfinite(v) for v in base) else math.inf
        cells: dict[tuple[str, float], list[dict]] = defaultdict(list)
        for r in srows:
            cells[(r["remedy"], float(r["lr"]))].append(r)

        def cell_loss(runs: list[dict]) -> float:
            return _mean(_loss(r) for r in runs)

        best = min((cell_loss(c) for c in cells.values()), default=math.inf)
        limit = best + tol * (init - best) if math.isfinite(init) else best * (1 + tol)
        remedies = list(dict.fromkeys(r["remedy"] for r in srows))
        for rem in remedies:
            lrs = sorted({lr for (name, lr) in cells if name == rem})
            ok = [cell_loss(cells[(rem, lr)]) <= limit for lr in lrs]
            lo, hi, decades = _widest(lrs, ok)
            capped = [_mean(min(_loss(r), init) for r in cells[(rem, lr)]) for lr in lrs]
            sens = _mean(c - best for c in capped) if math.isfinite(best) else math.nan
            mine = [r for r in srows if r["remedy"] == rem]
            d_lr = min(lrs, key=lambda v: abs(math.log(v / default_lr.get(scn, v))))
            at = cells[(rem, d_lr)]
            metrics = [float(r["final_metric"]) for r in at if r["final_metric"] not in ("", None)]
            out.append(SummaryRow(
                scenario=scn, remedy=rem, runs=len(mine),
                diverged_runs=sum(int(r["diverged"]) for r in mine),
                stable_lo=lo, stable_hi=hi, stable_decades=decades, lr_sensitivity=sens,
                default_lr_test_loss=_mean(_loss(r) for r in at),
                default_lr_metric=_mean(metrics) if metrics else None,
                default_lr_diverged=_mean(int(r["diverged"]) for r in at),
                clipped=_mean(float(r["clipped"]) for r in at),
                skipped=_mean(float(r["skipped"]) for r in at),
                seconds=_mean(float(r["seconds"]) for r in mine),
            ))
    return out


def _widest(lrs: list[float], ok: list[bool]) -> tuple[float | None, float | None, float | None]:
    """The longest run of consecutive converged grid points, as (lo, hi, decades)."""
    best: tuple[int, int] | None = None
    start = None
    for i, good in enumerate([*ok, False]):
        if good and start is None:
            start = i
        elif not good and start is not None:
            if best is None or (i - start) > (best[1] - best[0] + 1):
                best = (start, i - 1)
            start = None
    if best is None:
        return None, None, None
    lo, hi = lrs[best[0]], lrs[best[1]]
    # Rounded so equal spans of a log-spaced grid compare equal whatever their endpoints.
    return lo, hi, round(math.log10(hi / lo), 6)


def verdict(summary: Sequence[SummaryRow], ours: str = "gradguard") -> list[str]:
    """Markdown bullets: per scenario, which remedies have the widest stable LR range."""
    lines = ["### Widest stable LR range per scenario", ""]
    wins = 0
    scns = list(dict.fromkeys(s.scenario for s in summary))
    for scn in scns:
        rows = [s for s in summary if s.scenario == scn]
        widest = max((s.stable_decades for s in rows if s.stable_decades is not None),
                     default=None)
        if widest is None:
            lines.append(f"- {scn}: no remedy converged at any LR of the grid")
            continue
        best = [s.remedy for s in rows if s.stable_decades == widest]
        mine = next((s for s in rows if s.remedy == ours), None)
        if mine is not None and mine.stable_decades == widest:
            wins += 1
            tag = f"**{ours} is among the widest**" if len(best) > 1 else f"**{ours} widest**"
        elif mine is not None:
            got = "none" if mine.stable_decades is None else f"{mine.stable_decades:.2g}"
            tag = f"{ours}: {got} decades"
        else:
            tag = f"{ours} not run"
        lines.append(f"- {scn}: {', '.join(best)} ({widest:.2g} decades); {tag}")
    lines += ["", f"{ours} (default policy) has the widest stable LR range, alone or tied, on "
              f"{wins} of {len(scns)} scenarios."]
    return lines


def _f(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if math.isinf(v):
        return "∞"
    return f"{v:.{digits}g}"


def _range(s: SummaryRow) -> str:
    if s.stable_lo is None:
        return "none"
    if s.stable_lo == s.stable_hi:
        return f"{s.stable_lo:.2g} only"
    return f"{s.stable_lo:.2g}–{s.stable_hi:.2g}"


def markdown(summary: Sequence[SummaryRow], meta: dict) -> str:
    """Markdown tables: a headline of stable LR decades, then one table per scenario."""
    scns = list(dict.fromkeys(s.scenario for s in summary))
    rems = list(dict.fromkeys(s.remedy for s in summary))
    cell = {(s.scenario, s.remedy): s for s in summary}
    lines = ["## Stable LR range (decades of LR where every seed converges; wider is better)",
             "", "| remedy | " + " | ".join(scns) + " |",
             "|---|" + "---:|" * len(scns)]
    for rem in rems:
        vals = []
        for scn in scns:
            s = cell.get((scn, rem))
            if s is None:
                vals.append("")
                continue
            widest = max((x.stable_decades or -1) for x in summary if x.scenario == scn)
            txt = _f(s.stable_decades, 2) if s.stable_decades is not None else "none"
            vals.append(f"**{txt}**" if s.stable_decades is not None and
                        s.stable_decades >= widest else txt)
        lines.append(f"| {rem} | " + " | ".join(vals) + " |")
    lines += ["", *verdict(summary), ""]
    for scn in scns:
        info = meta.get("scenarios", {}).get(scn, {})
        metric = info.get("metric") or "metric"
        lines += [f"## {scn}", "", info.get("summary", ""), "",
                  f"Default LR {info.get('lr', '?')}; grid "
                  f"{', '.join(f'{v:.3g}' for v in info.get('grid', []))}.", "",
                  f"| remedy | stable LR range | decades | LR sensitivity | diverged at default "
                  f"LR | test loss | {metric} | clipped | skipped | s/run |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in (x for x in summary if x.scenario == scn):
            lines.append(
                f"| {s.remedy} | {_range(s)} | {_f(s.stable_decades, 2)} | "
                f"{_f(s.lr_sensitivity)} | {s.default_lr_diverged:.0%} | "
                f"{_f(s.default_lr_test_loss)} | {_f(s.default_lr_metric)} | "
                f"{s.clipped:.0f} | {s.skipped:.0f} | {s.seconds:.2f} |")
        lines.append("")
    return "\n".join(lines)
