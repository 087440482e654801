"""Self-contained HTML reports: one file, plots inlined as PNG, nothing fetched.

Two readers of what ``record`` and ``gradguard bench`` wrote:

- :func:`run_log_html` draws one guard run log: loss, global gradient norm before and
  after clipping, a per-layer norm heatmap, the :func:`~gradguard.report.summarize`
  summary and the event timeline.
- :func:`bench_html` draws a bench results directory: the results tables, loss and
  norm curves per remedy at each scenario's default LR, LR-sensitivity curves
  (Wortsman et al. 2023) and heatmaps from the guard logs in ``logs/``.

Plots are made with matplotlib's ``Figure`` (no pyplot), so rendering never touches
the caller's backend. A page can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..record import read_jsonl
from ..runlog import Event, Meta, StepRecord
from .summary import RunSummary, summarize

__all__ = ["bench_html", "run_log_html", "write_bench_report", "write_run_log_report"]

PathLike = str | os.PathLike[str]

_DPI = 90
# How far above its reference a curve may go before it is drawn at the cap, on a log and
# on a linear axis: losses that grow 1000x (3x) their first value have blown up, and
# seeing by how much adds nothing. Norms have no first value to anchor on; 10^4 x their
# median keeps healthy runs readable.
_LOSS_CAP, _NORM_CAP = (1e3, 3.0), (1e4, 1e4)
# Heatmap columns beyond this are max-pooled: the image has no more pixels than that, and
# the max keeps a one-step explosion visible.
_MAX_COLS = 1200
# The clipped norm is drawn thin and dark over a wide light band of the raw norm: where
# they part, the clip acted, and the dark line traces its threshold.
_BEFORE, _AFTER = "#9ecae1", "#08306b"
_MARKS = {  # kind -> (marker, colour, legend text)
    "nonfinite": ("X", "#d62728", "non-finite"),
    "skip": ("o", "#d62728", "skipped step"),
    "spike": ("v", "#ff7f0e", "spike flagged"),
    "rollback": ("D", "#9467bd", "rollback"),
}

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;
color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;margin-top:1.6em}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.t,th.t{text-align:left}td{white-space:nowrap}
td.t:last-child{white-space:normal}.wide{overflow-x:auto}
.bad{color:#c00;font-weight:600}.note{color:#666}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto}
"""
# Lets a headless browser (the tests) confirm that every inlined plot decoded.
_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesOk = imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesTotal = imgs.length;
});
</script>"""


# ---------------------------------------------------------------- page and formatting


def _page(title: str, parts: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + f"\n{_SCRIPT}\n</body></html>\n")


def _num(v: Any) -> float:
    """A float from a CSV/JSON cell; empty and unparsable cells are NaN."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: Any, digits: int = 4) -> str:
    """A cell for HTML: numbers to ``digits`` significant figures, non-finite in red."""
    if v is None or v == "":
        return "–"
    if isinstance(v, str):
        f = _num(v)
        if math.isnan(f) and v.strip().lower() != "nan":
            return escape(v)
        if math.isfinite(f) and v.strip().lstrip("-").isdigit():
            return v.strip()
        v = f
    if isinstance(v, bool | int):
        return str(v)
    if not isinstance(v, float):  # (a list or object where a number belongs)
        return escape(str(v))
    if not math.isfinite(v):
        return f'<span class="bad">{"NaN" if math.isnan(v) else f"{v:g}"}</span>'
    return f"{v:.{digits}g}"


def _table(header: list[str], rows: list[list[str]], text_cols: int = 1) -> str:
    """An HTML table of cells that are already HTML; the first ``text_cols`` align left."""
    def cls(i: int) -> str:
        return ' class="t"' if i < text_cols else ""
    head = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r))
                   + "</tr>\n" for r in rows)
    return (f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>\n{body}'
            "</tbody></table></div>")


def _csv_table(rows: list[dict[str, str]]) -> str:
    header = [h for h in rows[0] if isinstance(h, str)]  # (None: a row's surplus cells)
    text = sum(1 for h in header[:2] if h in ("scenario", "remedy"))
    return _table(header, [[_fmt(r.get(h)) for h in header] for r in rows], text)


def _absent(what: str) -> str:
    return f'<p class="note">{escape(what)}</p>'


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ModuleNotFoundError("HTML reports need matplotlib: pip install 'gradguard[bench]'"
                                  ) from e
    return Figure(figsize=(width, height), layout="constrained")


def _img(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


# ---------------------------------------------------------------- curves with a cap


def _use_log(*series: np.ndarray) -> bool:
    """Log-y when every finite value is positive and they span more than a decade or so."""
    v = np.concatenate([s[np.isfinite(s)] for s in series]) if series else np.array([])
    return bool(v.size) and bool(v.min() > 0) and v.max() / v.min() > 20


def _cap(series: list[np.ndarray], ref: float, factors: tuple[float, float],
         log: bool) -> float:
    """The top of the axis; anything above it, or non-finite, is drawn there and marked."""
    fin = np.concatenate([s[np.isfinite(s)] for s in series]) if series else np.array([])
    top = float(fin.max()) if fin.size else (ref if math.isfinite(ref) else 1.0)
    if math.isfinite(ref) and ref > 0:
        top = min(top, ref * factors[0 if log else 1])
    if log and top > 0:
        return top * 2
    lo = float(fin.min()) if fin.size else 0.0
    return top + 0.08 * (abs(top - lo) or abs(top) or 1.0)


def _capped(ax: Any, y: np.ndarray, cap: float, marks: set[str], x: np.ndarray | None = None,
            **style: Any) -> None:
    """Plot ``y`` with non-finite and off-scale values at ``cap``, marking where they start.

    A run that ends non-finite is cut at the first step of that tail: its line shoots up to
    the cap and stops, instead of running flat along the top of the plot.
    """
    x = np.arange(len(y), dtype=float) if x is None else np.asarray(x, float)
    bad = ~np.isfinite(y)
    if bad.size and bad[-1]:
        good = np.flatnonzero(~bad)
        end = good[-1] + 2 if good.size else 1
        x, y, bad = x[:end], y[:end], bad[:end]
    over = bad | (y > cap)
    shown = np.where(over, cap, y)
    ax.plot(x, shown, **style)
    # One marker where an excursion starts and one where it turns non-finite, not per step.
    first_bad = bad & ~np.r_[False, bad[:-1]]
    first_over = over & ~bad & ~np.r_[False, over[:-1]]
    colour = style.get("color")
    for sel, kind in ((first_bad, "nonfinite"), (first_over, "offscale")):
        if sel.any():
            marker = "X" if kind == "nonfinite" else "^"
            ax.plot(x[sel], shown[sel], marker, color=colour, ms=8, mec="k", mew=0.6, ls="")
            marks.add(kind)


def _mark_handles(marks: set[str], cap: float | None = None) -> list[Any]:
    """Legend entries for the cap markers used (``cap`` None: one legend for many axes)."""
    from matplotlib.lines import Line2D

    where = f"{cap:.3g}" if cap is not None else "the top of the axis"
    out = []
    if "nonfinite" in marks:
        out.append(Line2D([], [], marker="X", color="grey", mec="k", ls="",
                          label=f"non-finite (drawn at {where})"))
    if "offscale" in marks:
        out.append(Line2D([], [], marker="^", color="grey", mec="k", ls="",
                          label=f"above {where} (capped)"))
    return out


def _mark_legend(ax: Any, marks: set[str], cap: float) -> None:
    handles = ax.get_legend_handles_labels()[0] + _mark_handles(marks, cap)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")


def _fig_legend(fig: Any, handles: list[Any], ncols: int = 1) -> None:
    # Outside the panels: with a dozen remedies a legend inside would hide the curves.
    if handles:
        fig.legend(handles=handles, loc="outside right upper" if ncols == 1
                   else "outside upper center", ncols=ncols, fontsize=8, frameon=False)


def _line(colour: Any, label: str, **style: Any) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, label=label, **style)


# ---------------------------------------------------------------- one guard run log


@dataclass
class _Log:
    """The columns of a run log that the plots need."""

    names: list[str] = field(default_factory=list)
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    grad: np.ndarray = field(default_factory=lambda: np.zeros(0))
    clipped: np.ndarray = field(default_factory=lambda: np.zeros(0))
    flags: dict[str, list[int]] = field(default_factory=dict)  # kind -> steps, see _MARKS
    norm_steps: list[int] = field(default_factory=list)
    norms: list[list[float]] = field(default_factory=list)


def _read_log(path: PathLike, run: int | None = -1) -> _Log:
    log = _Log()
    rows: dict[int, StepRecord] = {}
    rollbacks: list[int] = []
    for rec in read_jsonl(path, run):
        if isinstance(rec, Meta):
            log.names = [str(n) for n in rec.params]
        elif isinstance(rec, StepRecord) and rec.step >= 0:
            rows[rec.step] = rec  # a step logged twice keeps its last record
        elif isinstance(rec, Event) and rec.kind == "rollback":
            rollbacks.append(max(rec.step, 0))
    ordered = [rows[k] for k in sorted(rows)]
    log.steps = np.array([r.step for r in ordered], dtype=float)
    for col, attr in (("loss", "loss"), ("grad_norm", "grad"), ("clipped_norm", "clipped")):
        setattr(log, attr, np.array([_num(getattr(r, col)) for r in ordered], dtype=float))
    log.flags = {
        "nonfinite": [r.step for r in ordered if r.nonfinite],
        "skip": [r.step for r in ordered if r.skipped],
        "spike": [r.step for r in ordered if r.grad_spike or r.loss_spike],
        "rollback": sorted(set(rollbacks)),
    }
    for r in ordered:
        if isinstance(r.norms, list):
            log.norm_steps.append(r.step)
            log.norms.append([_num(v) for v in r.norms])
    if log.norms and len(log.names) < max(map(len, log.norms)):
        # A log without names still gets a heatmap, with tensors numbered.
        log.names += [f"#{i}" for i in range(len(log.names), max(map(len, log.norms)))]
    return log


def _at(log: _Log, kind: str, y: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """x and (capped) y of the steps flagged ``kind``, to put markers on a curve."""
    idx = np.flatnonzero(np.isin(log.steps, log.flags.get(kind, [])))
    yy = y[idx]
    return log.steps[idx], np.where(np.isfinite(yy) & (yy <= cap), yy, cap)


def _run_plot(log: _Log, lines: list[tuple[np.ndarray, str, str, float]], ylabel: str,
              ref: float, factors: tuple[float, float], kinds: tuple[str, ...]) -> str:
    """One curve plot of a run log: ``lines`` of (values, colour, label, width), the steps
    flagged ``kinds`` marked on the first line, rollbacks as vertical lines."""
    fig = _figure(11, 3.6)
    ax = fig.add_subplot()
    series = [v for v, *_ in lines]
    log_y = _use_log(*series)
    cap = _cap(series, ref, factors, log_y)
    marks: set[str] = set()
    for values, colour, label, width in lines:
        _capped(ax, values, cap, marks, log.steps, color=colour, lw=width, label=label)
    for kind in kinds:
        xs, ys = _at(log, kind, series[0], cap)
        if xs.size:
            m, c, label = _MARKS[kind]
            ax.plot(xs, ys, m, ms=7, ls="", label=label, color=c,
                    mfc="none" if kind == "skip" else c)
    for i, step in enumerate(log.flags.get("rollback", [])):
        ax.axvline(step, color=_MARKS["rollback"][1], ls="--", lw=1,
                   label="rollback" if i == 0 else None)
    if log_y:
        ax.set_yscale("log", nonpositive="clip")
    ax.set(xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    _mark_legend(ax, marks, cap)
    return _img(fig, ylabel)


def _run_curves(log: _Log) -> tuple[str, str]:
    """The loss plot and the global-norm plot of one run log."""
    first = next((float(v) for v in log.loss if math.isfinite(v)), math.nan)
    # (a NaN loss on a step not flagged non-finite is a step without one: guard.step()
    # called without a loss, which would plot as the loss turning NaN)
    if np.isfinite(log.loss).any() or log.flags.get("nonfinite"):
        loss = _run_plot(log, [(log.loss, "C0", "loss", 1.2)], "training loss", first,
                         _LOSS_CAP, ("spike",))
    else:
        loss = _absent("No loss was passed to guard.step: there is no loss to plot.")
    fin = log.grad[np.isfinite(log.grad)]
    norm = _run_plot(log, [(log.grad, _BEFORE, "before clipping", 2.2),
                           (log.clipped, _AFTER, "after clipping (what the optimizer saw)", 1.0)],
                     "global gradient norm", float(np.median(fin)) if fin.size else math.nan,
                     _NORM_CAP, ("skip", "spike"))
    return loss, norm


def _heatmap(log: _Log, title: str) -> str | None:
    """Per-layer gradient norms (log10) over steps, flagged steps marked in a strip above."""
    if not log.norms or not log.names:
        return None
    n, cols = len(log.names), len(log.norm_steps)
    mat = np.full((n, cols), np.nan)
    recorded = np.zeros((n, cols), dtype=bool)
    for j, row in enumerate(log.norms):
        mat[: len(row), j] = row[:n]
        recorded[: len(row), j] = True
    with np.errstate(divide="ignore", invalid="ignore"):
        lg = np.log10(mat)
    fin = lg[np.isfinite(lg)]
    vmin, vmax = (float(np.percentile(fin, 1)), float(fin.max())) if fin.size else (0.0, 1.0)
    vmax = max(vmax, vmin + 1e-6)
    # A NaN/inf norm is as bad as it gets: the top colour (the strip marks the step too).
    lg = np.where(recorded & ~np.isfinite(mat), vmax, lg)
    lg = np.where(np.isneginf(lg), vmin, lg)  # a zero gradient: bottom of the scale
    steps = np.asarray(log.norm_steps, dtype=float)
    if cols > _MAX_COLS:
        cuts = np.linspace(0, cols, _MAX_COLS + 1).astype(int)
        lg = np.fmax.reduceat(lg, cuts[:-1], axis=1)  # fmax: a missing value loses to any
        edges = np.r_[steps[cuts[:-1]] - 0.5, steps[-1] + 0.5]
    else:
        edges = np.r_[steps[0] - 0.5, (steps[:-1] + steps[1:]) / 2, steps[-1] + 0.5]
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    height = min(14.0, max(2.2, 0.22 * n + 1.2))
    fig = _figure(11, height + 1.2)
    grid = fig.add_gridspec(2, 1, height_ratios=[1.0, height])
    strip = fig.add_subplot(grid[0])
    ax = fig.add_subplot(grid[1], sharex=strip)
    mesh = ax.pcolormesh(edges, np.arange(n + 1) - 0.5, np.ma.masked_invalid(lg), cmap=cmap,
                         vmin=vmin, vmax=vmax, shading="flat", rasterized=True)
    ax.set_ylim(n - 0.5, -0.5)  # the log's first tensor on top
    every = max(1, math.ceil(n / 40))
    ax.set_yticks(range(0, n, every), [log.names[i] for i in range(0, n, every)], fontsize=7)
    ax.set_xlabel("step")
    fig.colorbar(mesh, ax=ax, location="bottom", shrink=0.4, aspect=40,
                 label="log10 per-tensor gradient norm (grey: not recorded)")
    kinds = [k for k in ("nonfinite", "skip", "spike", "rollback") if log.flags.get(k)]
    for i, kind in enumerate(kinds):
        m, c, _ = _MARKS[kind]
        xs = log.flags[kind]
        strip.plot(xs, [i] * len(xs), m, color=c, ms=5, ls="", mfc="none" if kind == "skip"
                   else c)
    strip.set_yticks(range(len(kinds)), [_MARKS[k][2] for k in kinds], fontsize=7)
    strip.set_ylim(len(kinds) - 0.5 if kinds else 0.5, -0.5)
    strip.tick_params(labelbottom=False)
    if not kinds:
        strip.text(0.5, 0.5, "no non-finite, skipped, spiking or rolled-back steps",
                   transform=strip.transAxes, ha="center", va="center", fontsize=8)
    strip.set_title(title, fontsize=10)
    return _img(fig, f"per-layer gradient norm heatmap: {title}")


def _summary_rows(s: RunSummary) -> list[list[str]]:
    loss = f"{_fmt(s.first_loss)} → {_fmt(s.last_loss)}"
    if s.ended_nonfinite and s.last_finite_loss is not None:
        loss += f" (last finite {_fmt(s.last_finite_loss)} at step {s.last_finite_step})"
    rows = [["verdict", escape(s.verdict)]] if s.verdict else []
    data = f" ({s.bad_data} with NaN/Inf in the data)" if s.bad_data else ""
    rows += [["steps", str(s.steps)], ["skipped steps", str(s.skipped) + data],
             ["clipped steps", str(s.clipped)],
             ["loss first → last", loss],
             ["largest gradient norm", _fmt(s.max_grad_norm)]]
    for kind, n in sorted(s.events.items()):
        rows.append([f"events: {escape(kind)}", str(n)])
    if s.origins:
        layer, n = s.origins.most_common(1)[0]
        rows.append(["where trouble starts most often", f"{escape(layer)} ({n}×)"])
    first = s.first_trouble
    if first:
        rows.append(["first trouble", f"step {first['step']}: {escape(first['kind'])}"])
    if s.lr_changes:
        rows.append(["LR scale changes", ", ".join(f"{k}:×{v:.3g}" for k, v in s.lr_changes)])
    if s.bad_lines:
        rows.append(["unreadable lines", str(s.bad_lines)])
    return rows


def _timeline(s: RunSummary, events: int) -> str:
    if not s.timeline:
        return _absent("No events: the guard never had to act.")
    rows = [[str(e.get("step", "")), escape(str(e.get("kind", ""))),
             escape(str(e.get("action", "") or "")), escape(str(e.get("origin_layer") or "")),
             escape(str(e.get("message", "")))] for e in s.timeline[:events]]
    more = len(s.timeline) - events
    tail = _absent(f"… {more} more events") if more > 0 else ""
    return _table(["step", "kind", "action", "origin layer", "message"], rows, 5) + tail


def run_log_html(path: PathLike, *, events: int = 200, run: int = -1) -> str:
    """The HTML page of one guard run log (``Guard(log=...)``).

    Args:
        path: the JSONL run log.
        events: how many events of the timeline to list.
        run: which run of a file several guards appended to (-1: the last).
    """
    s = summarize(path, run)
    log = _read_log(path, run)
    which = f" (run {s.run + 1} of {s.runs})" if s.runs > 1 else ""
    parts = [f"<h1>gradguard run report</h1><p class=\"note\">{escape(str(path))}{which}</p>"]
    if s.meta:
        info = [["gradguard", escape(str(s.meta.get("gradguard", "")))],
                ["tensors", str(len(s.meta.get("params", [])))]]
        info += [[escape(k), escape(str(v))] for k, v in s.meta.get("config", {}).items()]
        parts.append("<h2>Guard</h2>" + _table(["setting", "value"], info, 2))
    parts.append("<h2>Summary</h2>" + _table(["what", "value"], _summary_rows(s), 2))
    if log.steps.size:
        loss_img, norm_img = _run_curves(log)
        parts += ["<h2>Loss</h2>", loss_img,
                  "<h2>Gradient norm</h2>", norm_img]
    else:
        parts.append("<h2>Loss</h2>" + _absent("The log has no step records."))
    heat = _heatmap(log, Path(path).name)
    parts.append("<h2>Per-layer gradient norms</h2>"
                 + (heat or _absent("The log has no per-layer norms.")))
    parts.append("<h2>Events</h2>" + _timeline(s, events))
    return _page(f"gradguard run {Path(path).name}", parts)


def write_run_log_report(path: PathLike, out: PathLike | None = None, *,
                         events: int = 200, run: int = -1) -> Path:
    """Write :func:`run_log_html` to ``out`` (default: the log's path with ``.html``)."""
    target = Path(out) if out is not None else Path(path).with_suffix(".html")
    return _write(target, run_log_html(path, events=events, run=run))


def _write(target: Path, text: str) -> Path:
    # Written aside and renamed, so a browser never sees half a report.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # (gone after the rename; left by a failed one)
    return target


# ---------------------------------------------------------------- a bench directory


@dataclass
class _Bench:
    meta: dict[str, Any]
    runs: list[dict[str, str]] | None
    summary: list[dict[str, str]] | None
    curves: list[dict[str, Any]] | None
    scenarios: list[str]
    remedies: list[str]
    colours: dict[str, Any]

    def default_lr(self, scenario: str) -> float | None:
        lr = self.meta.get("scenarios", {}).get(scenario, {}).get("lr")
        if lr is not None:
            return float(lr)  # (checked by _clean_meta)
        # Without meta.json (the Setup section says so), the middle of the swept grid.
        lrs = sorted({float(c["lr"]) for c in self.curves or [] if c["scenario"] == scenario})
        return lrs[len(lrs) // 2] if lrs else None


# The files a bench directory holds and its page is made from (and the guard logs in
# logs/): the page is never written over one of them.
BENCH_INPUTS = ("runs.csv", "summary.csv", "meta.json", "curves.jsonl", "results.md")


def _read_text(path: Path, problems: list[str]) -> str | None:
    """A file's text, or None (with the reason in ``problems``) when it is unreadable."""
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problems.append(f"{path} is not UTF-8 text: ignored")
    except OSError as e:
        problems.append(f"{path} cannot be read ({e.strerror or e}): ignored")
    return None


def _read_csv(path: Path, problems: list[str] | None = None) -> list[dict[str, str]] | None:
    problems = [] if problems is None else problems
    text = _read_text(path, problems)
    if text is None:
        return None
    try:
        rows = [r for r in csv.DictReader(io.StringIO(text, newline=""))
                if any(v for k, v in r.items() if k is not None)]
    except csv.Error as e:
        problems.append(f"{path} is not a readable CSV file ({e}): ignored")
        return None
    return rows or None


def _int(v: Any) -> int | None:
    """An integer from a JSON value (``3``, ``3.0``, ``"3"``); None for anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    f = _num(v)
    return int(f) if math.isfinite(f) and f == int(f) else None


def _lr(v: Any) -> float | None:
    f = _num(v)
    return f if math.isfinite(f) and f > 0 else None


def _read_curves(path: Path, problems: list[str] | None = None) -> list[dict[str, Any]] | None:
    problems = [] if problems is None else problems
    text = _read_text(path, problems)
    if text is None:
        return None
    out, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a bench still running
        # A record is placed by its scenario, remedy, LR and seed: one without all four
        # usable cannot be.
        if not (isinstance(rec, dict) and isinstance(rec.get("scenario"), str)
                and isinstance(rec.get("remedy"), str) and _lr(rec.get("lr")) is not None
                and _int(rec.get("seed")) is not None):
            bad += 1
            continue
        rec["lr"], rec["seed"] = _lr(rec["lr"]), _int(rec["seed"])
        for key in ("losses", "grad_norms", "clipped_norms"):
            vals = rec.get(key)
            rec[key] = np.array([_num(v) for v in vals] if isinstance(vals, list) else [],
                                dtype=float)
        out.append(rec)
    if bad:
        problems.append(f"{path}: {bad} record(s) without a usable scenario, remedy, lr "
                        "and seed: skipped")
    return out or None


def _clean_meta(meta: Any, path: Path, problems: list[str]) -> dict[str, Any]:
    """``meta.json`` with what the page reads checked: a part of the wrong kind is left
    out (and named in ``problems``), not a crash."""
    if not isinstance(meta, dict):
        problems.append(f"{path} is not a JSON object: ignored")
        return {}
    for key in ("scenarios", "remedies", "steps", "skipped_remedies"):
        if key in meta and not isinstance(meta[key], dict):
            problems.append(f"{path}: '{key}' is not an object: ignored")
            del meta[key]
    scns = meta.get("scenarios", {})
    for name, info in list(scns.items()):
        if not isinstance(info, dict):
            problems.append(f"{path}: scenario '{name}' is not an object: ignored")
            scns[name] = {}
            continue
        if "lr" in info and _lr(info["lr"]) is None:
            problems.append(f"{path}: scenario '{name}' has no usable default lr "
                            f"({info['lr']!r}): ignored")
            del info["lr"]
        if "grid" in info and not isinstance(info["grid"], list):
            del info["grid"]
    if "seeds" in meta:
        seeds = meta["seeds"] if isinstance(meta["seeds"], list) else [None]
        if any(_int(v) is None for v in seeds):
            problems.append(f"{path}: 'seeds' is not a list of integers: ignored")
            del meta["seeds"]
    return meta


def _read_bench(d: Path, problems: list[str] | None = None) -> _Bench:
    problems = [] if problems is None else problems
    meta: dict[str, Any] = {}
    text = _read_text(d / "meta.json", problems)
    if text is not None:
        try:
            meta = _clean_meta(json.loads(text), d / "meta.json", problems)
        except json.JSONDecodeError:
            problems.append(f"{d / 'meta.json'} is not valid JSON: ignored")
    runs = _read_csv(d / "runs.csv", problems)
    summary = _read_csv(d / "summary.csv", problems)
    curves = _read_curves(d / "curves.jsonl", problems)

    def placed(rows: list[dict[str, str]] | None, name: str) -> list[dict[str, str]]:
        # Rows that do not say which scenario and remedy they are cannot be placed.
        ok = [r for r in rows or [] if isinstance(r.get("scenario"), str) and r["scenario"]
              and isinstance(r.get("remedy"), str) and r["remedy"]]
        if rows and len(ok) < len(rows):
            problems.append(f"{d / name}: {len(rows) - len(ok)} row(s) without a scenario "
                            "and remedy: left out of the plots")
        return ok

    runs = placed(runs, "runs.csv") or None
    scenarios, remedies = list(meta.get("scenarios", {})), list(meta.get("remedies", {}))
    for rows in (placed(summary, "summary.csv"), runs, curves):
        for r in rows or []:
            if r["scenario"] not in scenarios:
                scenarios.append(r["scenario"])
            if r["remedy"] not in remedies:
                remedies.append(r["remedy"])
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(remedies) <= 10 else "tab20"]
    others = [r for r in remedies if r != "none"]
    # The unguarded baseline is always black, so it reads the same in every plot.
    colours: dict[str, Any] = {r: cmap(i % cmap.N) for i, r in enumerate(others)}
    colours["none"] = "black"
    return _Bench(meta, runs, summary, curves, scenarios, remedies, colours)


def _panels(n: int, width: float = 5.2, height: float = 3.6) -> tuple[Any, list[Any]]:
    cols = min(3, max(1, n))
    rows = math.ceil(n / cols)
    fig = _figure(width * cols, height * rows)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def _pick_seed(b: _Bench) -> int:
    seeds = [int(s) for s in b.meta.get("seeds", [])] or sorted(
        {int(c["seed"]) for c in b.curves or []})
    return 0 if 0 in seeds or not seeds else min(seeds)


def _default_curves(b: _Bench, scenario: str, seed: int) -> tuple[float | None, dict]:
    lr = b.default_lr(scenario)
    found = {c["remedy"]: c for c in b.curves or []
             if c["scenario"] == scenario and int(c["seed"]) == seed and lr is not None
             and math.isclose(float(c["lr"]), lr, rel_tol=1e-6)}
    return lr, found


def _bench_losses(b: _Bench) -> str:
    seed = _pick_seed(b)
    fig, axes = _panels(len(b.scenarios))
    marks: set[str] = set()
    gave_up = False
    for ax, scn in zip(axes, b.scenarios, strict=True):
        lr, found = _default_curves(b, scn, seed)
        ax.set_title(f"{scn} (lr {lr:.3g}, seed {seed})" if lr else scn, fontsize=10)
        if not found:
            ax.text(0.5, 0.5, "no curves at the default LR", ha="center",
                    transform=ax.transAxes)
            continue
        series = [c["losses"] for c in found.values()]
        log_y = _use_log(*series)
        firsts = [s[0] for s in series if s.size and math.isfinite(s[0])]
        cap = _cap(series, max(firsts) if firsts else math.nan, _LOSS_CAP, log_y)
        longest = max(s.size for s in series)
        for rem in b.remedies:
            if rem in found:
                y = found[rem]["losses"]
                _capped(ax, y, cap, marks, color=b.colours[rem], lw=1.1, label=rem)
                if 0 < y.size < longest and math.isfinite(y[-1]):
                    # The guard gave up here: the run stops, it does not blow up.
                    ax.plot(y.size - 1, min(y[-1], cap), "s", color=b.colours[rem], ms=6)
                    gave_up = True
        if log_y:
            ax.set_yscale("log", nonpositive="clip")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    stop = [_line("grey", "guard gave up", marker="s", ls="")] if gave_up else []
    _fig_legend(fig, [_line(b.colours[r], r) for r in b.remedies] + _mark_handles(marks)
                + stop)
    return _img(fig, "loss curves per remedy")


def _bench_norms(b: _Bench) -> str:
    seed = _pick_seed(b)
    rows, cols = len(b.scenarios), len(b.remedies)
    fig = _figure(max(6.0, 2.6 * cols), 2.3 * rows + 0.9)
    grid = fig.add_gridspec(rows, cols)
    marks: set[str] = set()
    for i, scn in enumerate(b.scenarios):
        lr, found = _default_curves(b, scn, seed)
        series = [c[k] for c in found.values() for k in ("grad_norms", "clipped_norms")]
        log_y = _use_log(*series)
        fin = np.concatenate([s[np.isfinite(s)] for s in series]) if series else np.zeros(0)
        cap = _cap(series, float(np.median(fin)) if fin.size else math.nan, _NORM_CAP, log_y)
        longest = max((c["losses"].size for c in found.values()), default=1)
        first = None
        for j, rem in enumerate(b.remedies):
            # Shared axes per scenario: a run that blew up visibly ends early.
            ax = fig.add_subplot(grid[i, j], sharex=first, sharey=first)
            first = first or ax
            if i == 0:
                ax.set_title(rem, fontsize=10, color=b.colours[rem])
            if j == 0:
                ax.set_ylabel(f"{scn}\n(lr {lr:.3g})" if lr else scn, fontsize=9)
            if rem not in found:
                ax.text(0.5, 0.5, "no run", ha="center", transform=ax.transAxes, fontsize=8)
                continue
            c = found[rem]
            _capped(ax, c["grad_norms"], cap, marks, color=_BEFORE, lw=1.8)
            _capped(ax, c["clipped_norms"], cap, marks, color=_AFTER, lw=0.8)
            ax.set_xlim(0, longest - 1)
            if log_y:
                ax.set_yscale("log", nonpositive="clip")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.supxlabel("step", fontsize=9)
    _fig_legend(fig, [_line(_BEFORE, "before clipping", lw=1.8),
                      _line(_AFTER, "after clipping (what the optimizer saw)", lw=0.8),
                      *_mark_handles(marks)], ncols=4)
    return _img(fig, "global gradient norm per remedy, before and after clipping")


def _bench_sensitivity(b: _Bench) -> str:
    # Wortsman et al. 2023: a run's final loss counts at most as its initial loss, so one
    # diverged seed cannot dominate the mean and every LR past the edge scores the same.
    groups: dict[tuple[str, str, float], list[tuple[float, bool]]] = defaultdict(list)
    initial: dict[str, list[float]] = defaultdict(list)
    for r in b.runs or []:
        if _lr(r.get("lr")) is None:
            continue  # (a row without a usable LR has no place on the LR axis)
        ini = _num(r.get("initial_loss"))
        loss = _num(r.get("final_test_loss"))
        if math.isfinite(ini):
            initial[r["scenario"]].append(ini)
            loss = min(loss, ini) if not math.isnan(loss) else ini
        groups[(r["scenario"], r["remedy"], _num(r.get("lr")))].append(
            (loss, str(r.get("diverged", "")).strip().lower() in ("1", "1.0", "true")))
    fig, axes = _panels(len(b.scenarios))
    drawn: list[str] = []
    for ax, scn in zip(axes, b.scenarios, strict=True):
        ys_all = []
        for rem in b.remedies:
            pts = sorted((lr, float(np.mean([v for v, _ in g])), any(d for _, d in g))
                         for (s, r_, lr), g in groups.items() if s == scn and r_ == rem)
            if not pts:
                continue
            lrs, ys, div = (np.array(v) for v in zip(*pts, strict=True))
            ys_all.append(ys)
            colour = b.colours[rem]
            drawn += [rem] if rem not in drawn else []
            ax.plot(lrs, ys, "-", color=colour, lw=1.2)
            ax.plot(lrs[~div], ys[~div], "o", color=colour, ms=5)
            ax.plot(lrs[div], ys[div], "o", color=colour, mfc="white", ms=6)
        if initial[scn]:
            ax.axhline(float(np.mean(initial[scn])), color="grey", ls="--", lw=0.8)
        lr = b.default_lr(scn)
        if lr:
            ax.axvline(lr, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        if ys_all and _use_log(*ys_all):
            ax.set_yscale("log", nonpositive="clip")
        ax.set_title(scn, fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final test loss (capped, mean over seeds)")
        ax.grid(alpha=0.3)
    _fig_legend(fig, [_line(b.colours[r], r) for r in b.remedies if r in drawn] + [
        _line("grey", "initial loss (the cap)", ls="--", lw=0.8),
        _line("grey", "scenario's default LR", ls=":"),
        _line("grey", "some seed diverged", marker="o", mfc="white", ls="")])
    return _img(fig, "LR sensitivity per remedy")


def _bench_meta(b: _Bench) -> str:
    m = b.meta
    if not m:
        return _absent("meta.json is absent: scenario defaults and run settings are unknown.")
    info = []
    for k, v in m.items():
        if k in ("scenarios", "remedies", "steps"):
            continue  # tables of their own below
        if isinstance(v, dict):
            v = "; ".join(f"{a} ({b})" for a, b in v.items()) or "–"
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        info.append([escape(k.replace("_", " ")), escape(str(v))])
    out = [_table(["run", ""], info, 2)]
    steps = m.get("steps", {})
    scn_rows = [[escape(n), escape(str(s.get("summary", ""))), _fmt(s.get("lr")),
                 escape(", ".join(f"{_num(v):.3g}" for v in s.get("grid", []))),
                 _fmt(steps.get(n)), escape(str(s.get("metric", "")))]
                for n, s in m.get("scenarios", {}).items()]
    if scn_rows:
        out.append(_table(["scenario", "summary", "default lr", "lr grid", "steps", "metric"],
                          scn_rows, 2))
    rem_rows = [[escape(n), escape(str(s))] for n, s in m.get("remedies", {}).items()]
    if rem_rows:
        out.append(_table(["remedy", "what it does"], rem_rows, 2))
    return "\n".join(out)


def bench_html(bench_dir: PathLike, problems: list[str] | None = None) -> str:
    """The HTML page of a results directory written by ``gradguard bench``.

    Every file is optional: a section whose file is missing says so instead of failing.
    A file or record that cannot be read (not UTF-8, not the expected JSON, a curve
    without its LR or seed) is left out, and said so on the page and in ``problems``.
    """
    d = Path(bench_dir)
    problems = [] if problems is None else problems
    b = _read_bench(d, problems)
    logs = sorted((d / "logs").glob("*.jsonl")) if (d / "logs").is_dir() else []
    heats = []
    for p in logs:
        try:
            heats.append(_heatmap(_read_log(p), p.stem.replace("__", " / ")))
        except (OSError, ValueError) as e:  # (UnicodeDecodeError and ConfigError too)
            problems.append(f"{p} cannot be read ({e}): ignored")
    results_md = _read_text(d / "results.md", problems) if not b.summary else None
    parts = [f"<h1>gradguard bench report</h1><p class=\"note\">{escape(str(d))}</p>"]
    if problems:
        parts.append("<p class=\"note\">Left out (unreadable):<br>"
                     + "<br>".join(escape(p) for p in problems) + "</p>")
    parts += ["<h2>Setup</h2>", _bench_meta(b), "<h2>Results</h2>"]
    if b.summary:
        parts.append(_csv_table(b.summary))
    elif results_md is not None:
        parts.append(f"<pre>{escape(results_md)}</pre>")
    else:
        parts.append(_absent("summary.csv and results.md are absent."))
    if b.runs:
        parts.append(f"<details><summary>all {len(b.runs)} runs (runs.csv)</summary>"
                     f"{_csv_table(b.runs)}</details>")
    else:
        parts.append(_absent("runs.csv is absent."))
    have_curves = bool(b.curves and b.scenarios)
    parts.append("<h2>Loss curves</h2>")
    parts.append(_bench_losses(b) if have_curves else _absent("curves.jsonl is absent."))
    parts.append("<h2>Gradient norms</h2>")
    parts.append(_bench_norms(b) if have_curves and b.remedies
                 else _absent("curves.jsonl is absent."))
    parts.append("<h2>LR sensitivity</h2>")
    parts.append(_bench_sensitivity(b) if b.runs and b.scenarios
                 else _absent("runs.csv is absent."))
    parts.append("<h2>Per-layer gradient norms</h2>")
    heats = [h for h in heats if h]
    parts += heats or [_absent("No guard logs with per-layer norms (logs/ is absent or empty).")]
    return _page(f"gradguard bench {d.name}", parts)


def bench_input(bench_dir: PathLike, out: PathLike) -> Path | None:
    """The bench directory's input file ``out`` would overwrite (None: it would not):
    one of :data:`BENCH_INPUTS` or a guard log in ``logs/``, whether or not it exists."""
    d, target = Path(bench_dir).resolve(), Path(out).resolve()
    if target.parent == d and target.name in BENCH_INPUTS:
        return target
    if target.parent == d / "logs" and target.suffix == ".jsonl":
        return target
    return None


def write_bench_report(bench_dir: PathLike, out: PathLike | None = None,
                       problems: list[str] | None = None) -> Path:
    """Write :func:`bench_html` to ``out`` (default: ``bench_dir/report.html``).

    Raises:
        ConfigError: ``out`` is one of the directory's input files (see :func:`bench_input`).
    """
    target = Path(out) if out is not None else Path(bench_dir) / "report.html"
    if bench_input(bench_dir, target) is not None:
        raise ConfigError(f"{out} is an input file of the bench directory {bench_dir}; give "
                          "the HTML page another name (writing it there would replace it)")
    return _write(target, bench_html(bench_dir, problems))
