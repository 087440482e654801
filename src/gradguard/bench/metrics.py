"""Cross-LR stability metrics and the bench's tables.

Every number is a **median over seeds**: the scenarios are chaotic (a 1e-7 difference in
one kernel's rounding sends a BN network or an RNN down another path), and a mean is
decided by its worst seed. Per scenario:

* ``L0`` is the unguarded run's held-out loss at initialisation, ``L*`` the best median
  final loss any remedy reached at any LR.
* **Seed noise** ``σ``: the robust spread (1.4826 × median absolute deviation) of the
  unguarded seeds around their own LR's median, pooled over the LRs where the unguarded
  run does not diverge. A median of ``n`` seeds then has a standard error of about
  1.2533·σ/√n, and a difference of two medians √2 times that.
* **Tolerance** ``tol = max(frac · (L0 − L*), 2 · √2 · 1.2533 · σ/√n)``: a cell counts as
  converged when its median is within ``tol`` of ``L*`` — the difference must be both
  practically small (``frac``, 10 % of the way back to the start) and within two standard
  errors of the seed noise.
* **stable LR range**: the widest contiguous stretch of the LR grid whose cells converged,
  in decades of LR (a cell whose median is a diverged run does not converge);
* **LR sensitivity** (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
  training instabilities", §2.2): the mean over the LR grid of ``min(median, L0) − L*``.
* **harm**: at every LR where the unguarded run converges, the remedy's runs are paired with
  the unguarded runs of the same seed; the median paired difference is harm when it
  exceeds two standard errors of such a median (1.2533 · √2σ/√n each). The same test
  against the *placebo* (``skip-nonfinite``: the guard's kernels, no action taken on
  healthy steps) separates what the guard's actions do from the noise of a different
  but equivalent kernel (torch's fused SGD against its foreach SGD).
* **ratio at the exploding LR**: the remedy's median at the scenario's default (exploding)
  LR over the best median of the unguarded run at any LR. This and the other "default LR"
  columns are read at that LR only: a grid that leaves it out leaves them empty
  (``default_lr_in_grid`` 0), never filled from the nearest grid point.
* When every cell's median diverged there is no ``L*``: nothing converged (no stable
  range, no tolerance, no LR sensitivity) and harm is not checked.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import median

__all__ = ["PLACEBO", "SummaryRow", "markdown", "summarize"]

PLACEBO = "skip-nonfinite"
# Standard error of a sample median ≈ 1.2533 σ/√n; σ from the MAD (× 1.4826).
_MEDIAN_SE = 1.2533
_MAD_SIGMA = 1.4826


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
    tol: float = math.nan
    noise: float = math.nan
    default_lr_ratio: float = math.nan
    harm_checked: int = 0
    harm_lrs: str = ""
    harm_worst: float = math.nan
    placebo_harm_lrs: str = ""
    # 0 when the LR grid left out the scenario's default LR: the default-LR columns
    # (test loss, metric, diverged, clipped, skipped, ratio) are then empty.
    default_lr_in_grid: int = 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def _loss(row: dict) -> float:
    v = float(row["final_test_loss"])
    return v if math.isfinite(v) and not int(row["diverged"]) else math.inf


def _median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return median(xs) if xs else math.nan


def _noise(cells: dict[tuple[str, float], list[dict]]) -> float:
    """Pooled robust seed spread σ of the unguarded runs (0 when it cannot be measured)."""
    devs: list[float] = []
    for (rem, _lr), runs in cells.items():
        losses = [_loss(r) for r in runs]
        if rem != "none" or len(losses) < 3 or not all(math.isfinite(v) for v in losses):
            continue
        m = median(losses)
        devs += [abs(v - m) for v in losses]
    return _MAD_SIGMA * median(devs) if devs else 0.0


def _paired(mine: list[dict], ref: list[dict]) -> list[float]:
    """Per-seed differences (mine − ref) of the final loss, on the seeds both have."""
    by_seed = {int(r["seed"]): _loss(r) for r in ref}
    return [_loss(r) - by_seed[int(r["seed"])] for r in mine if int(r["seed"]) in by_seed]


def _harms(diffs: list[float], sigma: float) -> bool:
    """The median paired difference exceeds two standard errors of such a median."""
    if not diffs:
        return False
    d = median(diffs)
    return d > 2 * _MEDIAN_SE * math.sqrt(2) * sigma / math.sqrt(len(diffs)) and d > 0


def summarize(rows: Sequence[dict], default_lr: dict[str, float],
              tol: float = 0.1) -> list[SummaryRow]:
    """Aggregate per-run rows (dicts with the ``runs.csv`` columns) by scenario and remedy.

    Args:
        rows: one dict per run.
        default_lr: each scenario's exploding LR, where the "default LR" columns are read
            (empty, NaN, when no cell is at it).
        tol: the practical part of the tolerance, as a fraction of ``L0 − L*`` (see the
            module docstring for the statistical part).
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
            return _median(_loss(r) for r in runs)

        best = min((cell_loss(c) for c in cells.values()), default=math.inf)
        sigma = _noise(cells)
        n = max((len(c) for c in cells.values()), default=1)
        stat = 2 * math.sqrt(2) * _MEDIAN_SE * sigma / math.sqrt(n)
        if math.isfinite(best):
            practical = tol * (init - best) if math.isfinite(init) else tol * abs(best)
            tolerance = max(practical, stat)
        else:
            # Every cell's median diverged: there is no best loss to be within a tolerance
            # of, so nothing converged (∞ <= ∞ + tol would call every diverged cell stable).
            tolerance = math.nan
        limit = best + tolerance

        def converged(v: float, limit: float = limit) -> bool:
            # A cell whose median is a diverged run never converges (NaN compares False).
            return math.isfinite(v) and v <= limit

        plain = {lr: cell_loss(c) for (name, lr), c in cells.items() if name == "none"}
        best_plain = min(plain.values(), default=math.nan)
        healthy = sorted(lr for lr, v in plain.items() if converged(v))
        remedies = list(dict.fromkeys(r["remedy"] for r in srows))
        d_want = default_lr.get(scn)
        for rem in remedies:
            lrs = sorted({lr for (name, lr) in cells if name == rem})
            ok = [converged(cell_loss(cells[(rem, lr)])) for lr in lrs]
            lo, hi, decades = _widest(lrs, ok)
            capped = [min(cell_loss(cells[(rem, lr)]), init) for lr in lrs]
            sens = _mean(c - best for c in capped) if math.isfinite(best) else math.nan
            mine = [r for r in srows if r["remedy"] == rem]
            # The "default LR" columns are read at the scenario's default LR only: a grid
            # that leaves it out leaves them empty (not the nearest LR's numbers under the
            # default LR's name).
            d_lr = next((v for v in lrs if d_want is not None
                         and math.isclose(v, d_want, rel_tol=1e-6)), None)
            at = cells[(rem, d_lr)] if d_lr is not None else []
            metrics = [float(r["final_metric"]) for r in at if r["final_metric"] not in ("", None)]
            harmed, placebo_harmed, worst = [], [], -math.inf
            checked = 0
            if rem != "none":
                for lr in healthy:
                    if (rem, lr) not in cells:
                        continue
                    checked += 1
                    diffs = _paired(cells[(rem, lr)], cells[("none", lr)])
                    if diffs:
                        worst = max(worst, median(diffs) / max(abs(plain[lr]), 1e-12))
                    if _harms(diffs, sigma):
                        harmed.append(lr)
                    if (PLACEBO, lr) in cells and rem != PLACEBO and _harms(
                            _paired(cells[(rem, lr)], cells[(PLACEBO, lr)]), sigma):
                        placebo_harmed.append(lr)
            d_med = cell_loss(at) if at else math.nan
            out.append(SummaryRow(
                scenario=scn, remedy=rem, runs=len(mine),
                diverged_runs=sum(int(r["diverged"]) for r in mine),
                stable_lo=lo, stable_hi=hi, stable_decades=decades, lr_sensitivity=sens,
                default_lr_test_loss=d_med,
                default_lr_metric=_median(metrics) if metrics else None,
                default_lr_diverged=_mean(int(r["diverged"]) for r in at),
                clipped=_mean(float(r["clipped"]) for r in at),
                skipped=_mean(float(r["skipped"]) for r in at),
                seconds=_mean(float(r["seconds"]) for r in mine),
                tol=tolerance, noise=sigma,
                default_lr_ratio=(d_med / best_plain if best_plain and math.isfinite(
                    best_plain) and best_plain > 0 else math.nan),
                harm_checked=checked,
                harm_lrs=" ".join(f"{v:.3g}" for v in harmed),
                harm_worst=worst if math.isfinite(worst) else math.nan,
                placebo_harm_lrs=" ".join(f"{v:.3g}" for v in placebo_harmed),
                default_lr_in_grid=int(d_lr is not None),
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
    """Markdown bullets: per scenario, the widest stable LR range, the lowest LR
    sensitivity, ``ours``' ratio at the exploding LR and its harm, then a tally."""
    lines = ["### Verdict per scenario", ""]
    wins = sens_wins = ratio_ok = harmless = ratio_defined = harm_checked = 0
    scns = list(dict.fromkeys(s.scenario for s in summary))
    for scn in scns:
        rows = [s for s in summary if s.scenario == scn]
        mine = next((s for s in rows if s.remedy == ours), None)
        baseline = any(s.remedy == "none" for s in rows)
        widest = max((s.stable_decades for s in rows if s.stable_decades is not None),
                     default=None)
        parts = []
        if widest is None:
            parts.append("no remedy converged at any LR of the grid")
        else:
            best = [s.remedy for s in rows if s.stable_decades == widest]
            parts.append(f"widest range {', '.join(best)} ({widest:.2g} decades)")
        if mine is None:
            lines.append(f"- {scn}: {'; '.join(parts)}; {ours} not run")
            continue
        if widest is not None and mine.stable_decades == widest:
            wins += 1
            parts.append(f"**{ours} widest**" + (" (tied)" if len(best) > 1 else "") +
                         (" (the only remedy run)" if len(rows) == 1 else ""))
        else:
            got = "none" if mine.stable_decades is None else f"{mine.stable_decades:.2g}"
            parts.append(f"{ours} {got} decades")
        # LR sensitivity is a mean of medians: "tied" means within the scenario's tolerance.
        low = min((s.lr_sensitivity for s in rows if math.isfinite(s.lr_sensitivity)),
                  default=None)
        if low is None or not math.isfinite(mine.lr_sensitivity):
            parts.append("no LR sensitivity (no run converged to measure it against)")
        elif mine.lr_sensitivity <= low + mine.tol:
            sens_wins += 1
            parts.append(f"lowest LR sensitivity{' (tied)' if mine.lr_sensitivity > low else ''}"
                         f" {mine.lr_sensitivity:.3g}")
        else:
            lowest = next(s.remedy for s in rows if s.lr_sensitivity == low)
            parts.append(f"LR sensitivity {mine.lr_sensitivity:.3g} (lowest: {lowest} "
                         f"{low:.3g})")
        r = mine.default_lr_ratio
        if not baseline:
            parts.append("no unguarded run ('none') to compare the exploding LR or harm with")
            lines.append(f"- {scn}: " + "; ".join(parts))
            continue
        if not mine.default_lr_in_grid:
            parts.append("no ratio at the exploding LR (the LR grid leaves it out)")
        elif math.isnan(r):
            parts.append("at the exploding LR no ratio (the unguarded run converged at no LR)")
        else:
            ratio_defined += 1
            ratio_ok += r <= 1.5
            parts.append(f"at the exploding LR {_f(r)}× the best unguarded loss")
        if mine.harm_lrs:
            harm_checked += 1
            parts.append(f"**harm** vs unguarded at lr {mine.harm_lrs}")
        elif mine.harm_checked:
            harm_checked += 1
            harmless += 1
            parts.append(f"no harm at the {mine.harm_checked} LR(s) where unguarded converges")
        else:
            parts.append("harm not checked (the unguarded run converged at no LR)")
        lines.append(f"- {scn}: " + "; ".join(parts))
    n = len(scns)
    lines += ["", f"{ours} (default policy): widest stable LR range, alone or tied, on {wins} "
              f"of {n} scenarios; lowest or tied LR sensitivity on {sens_wins} of {n}; at the "
              f"exploding LR within 1.5× of the best unguarded loss on {ratio_ok} of the "
              f"{ratio_defined} where the ratio is defined; no harm on {harmless} of the "
              f"{harm_checked} where the unguarded run converged at some LR."]
    return lines


def _f(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if math.isinf(v):
        return "∞"
    return f"{v:.{digits}g}"


def _pct(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.0%}"


def _count(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.0f}"


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
    lines = ["## Stable LR range (decades of LR where the median converges; wider is better)",
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
        mine = [x for x in summary if x.scenario == scn]
        off_grid = not any(x.default_lr_in_grid for x in mine)
        tol = mine[0].tol
        lines += [f"## {scn}", "", info.get("summary", ""), "",
                  f"Default LR {info.get('lr', '?')}; grid "
                  f"{', '.join(f'{v:.3g}' for v in info.get('grid', []))}.", "",
                  (f"Tolerance {_f(tol)} " if math.isfinite(tol) else
                   "No tolerance (every cell's median diverged: nothing converged) ") +
                  f"(seed noise σ {_f(mine[0].noise)})."
                  " Columns at the default LR are medians over seeds"
                  + (" (empty: the LR grid leaves the default LR out)" if off_grid else "") +
                  "; *ratio* is that median "
                  "over the best unguarded median at any LR; *harm* lists the LRs (where the "
                  "unguarded run converges) at which the remedy's seed-paired median is worse "
                  "beyond the noise, against the unguarded run and against the placebo.", "",
                  f"| remedy | stable LR range | decades | LR sensitivity | diverged at default "
                  f"LR | test loss | ratio | {metric} | harm (vs none / vs placebo) | clipped "
                  "| skipped | s/run |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for s in mine:
            harm = (f"{s.harm_lrs or '–'} / {s.placebo_harm_lrs or '–'}" if s.harm_checked
                    else "" if s.remedy == "none" else "not checked")
            lines.append(
                f"| {s.remedy} | {_range(s)} | {_f(s.stable_decades, 2)} | "
                f"{_f(s.lr_sensitivity)} | {_pct(s.default_lr_diverged)} | "
                f"{_f(s.default_lr_test_loss)} | {_f(s.default_lr_ratio)} | "
                f"{_f(s.default_lr_metric)} | {harm} | "
                f"{_count(s.clipped)} | {_count(s.skipped)} | {s.seconds:.2f} |")
        lines.append("")
    return "\n".join(lines)
