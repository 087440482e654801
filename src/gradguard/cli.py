"""The ``gradguard`` command line (typer + rich)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

try:
    import typer
    import typer.core
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
except ImportError as e:  # pragma: no cover - exercised only without the [cli] extra
    raise SystemExit("the gradguard CLI needs its extra: pip install 'gradguard[cli]'") from e

from . import __version__

if TYPE_CHECKING:  # (the bench imports torch: only when a command needs it)
    from .bench.runner import BenchConfig, Job


class _FlagsWithoutType:
    """On/off flags show no value type in ``--help``.

    typer 0.2x prints the Python type after every option, flags included
    (``--json <bool>``, even ``--help <bool>``), as if they took a value.
    """

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class _Command(_FlagsWithoutType, typer.core.TyperCommand):
    """A gradguard subcommand."""


class _Group(_FlagsWithoutType, typer.core.TyperGroup):
    """The gradguard command group."""


app = typer.Typer(
    cls=_Group,
    name="gradguard",
    help="Detect, diagnose and tame exploding and vanishing gradients in PyTorch.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "–"
    if not math.isfinite(v):
        return "[red]NaN[/red]" if math.isnan(v) else "[red]inf[/red]"
    return f"{v:.{digits}g}"


@app.command(cls=_Command)
def version() -> None:
    """Print the gradguard version."""
    console.print(f"gradguard {__version__}")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gradguard {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version,
                                       is_eager=True, help="print the version and exit")
          ) -> None:
    """Detect, diagnose and tame exploding and vanishing gradients in PyTorch."""


@app.command(cls=_Command)
def demo(
    seed: int = typer.Option(0, help="seed for model init and batch order"),
    jobs: int = typer.Option(None, help="worker processes (default: one per CPU core)"),
    out: str = typer.Option(str(Path("gradguard-runs") / "demo"), help="results directory"),
) -> None:
    """Blow up real-data scenarios, then compare the peers' remedies and gradguard's."""
    import json

    from .bench.console import run_with_progress, summary_tables
    from .demo import demo_config, headlines
    from .report import write_bench_report

    _check_bench_out(out)
    cfg = demo_config(Path(out), jobs, seed)
    _plan_or_exit(cfg)
    console.print("[bold]gradguard demo[/bold]: the same real-data runs unguarded, with torch's "
                  "clip_grad_norm_, the zclip and autoclip packages, skip-if-NaN, and "
                  "gradguard's default guard, over a grid of learning rates.")
    with _bench_interrupt():
        res = run_with_progress(cfg, console)
    meta = json.loads((res.out / "meta.json").read_text())
    for t in summary_tables(res.summary, meta):
        console.print(t)
    for line in headlines(res.rows, res.summary, meta, res.out):
        console.print(f"• {line}")
    page = write_bench_report(res.out)
    console.print(f"Report with loss, norm and LR-sensitivity plots: [bold]{page}[/bold]")
    console.print(f"Tables: {res.out / 'results.md'}; guard run logs: {res.out / 'logs'} "
                  f"(try [bold]gradguard report {res.out / 'logs'}/<file>.jsonl[/bold])")


@app.command(cls=_Command)
def report(
    run_log: str = typer.Argument(..., metavar="PATH",
                                  help="a JSONL run log written by Guard(log=...), or a "
                                  "results directory written by gradguard bench"),
    events: int = typer.Option(20, help="how many events of the timeline to show"),
    run: int = typer.Option(-1, help="which run of a log several guards appended to: "
                            "-1 the last, 0 the first"),
    html: str = typer.Option(None, "--html", metavar="OUT.html",
                             help="also write a self-contained HTML page with plots here "
                             "(a bench directory gets DIR/report.html without it)"),
) -> None:
    """Summarise a recorded run (steps, skips, spikes, rollbacks, where trouble started), or
    turn a bench results directory into an HTML page."""
    from pathlib import Path

    from .report import summarize, write_bench_report, write_run_log_report

    if events < 0:
        typer.echo(f"--events must be 0 or more, got {events}")
        raise typer.Exit(2)

    if not Path(run_log).exists():
        console.print(f"[red]no such run log or bench directory: {escape(run_log)}[/red]")
        raise typer.Exit(2)
    if Path(run_log).is_dir():
        if not any((Path(run_log) / f).exists() for f in ("runs.csv", "meta.json")):
            typer.echo(f"{run_log} is a directory without a bench's runs.csv or meta.json: "
                       "give a run log (.jsonl) or a `gradguard bench --out` directory")
            raise typer.Exit(2)
        if html:
            _check_out(html, None)  # (one of the bench's own files: write_bench_report refuses)
        # typer.echo, not rich: a long path must come out whole, unwrapped and unstyled.
        problems: list[str] = []
        with _write_errors(html or str(Path(run_log) / "report.html")), _user_errors():
            page = write_bench_report(run_log, html, problems)
        for line in problems:
            typer.echo(f"warning: {line}")
        typer.echo(f"HTML report: {page}")
        return
    if html:
        _check_out(html, None, keep=run_log)
    with _user_errors():
        s = summarize(run_log, run)
    which = f" (run {s.run + 1} of {s.runs}; --run picks another)" if s.runs > 1 else ""
    # (Log contents are text, not rich markup: "[bold]" in a path or a message stays.)
    # The path is a line of its own, never wrapped: as the table's title it was cut to
    # the table's width with an ellipsis, and a path the user cannot copy is no use.
    console.print(escape(f"gradguard run {run_log}{which}"), style="bold", soft_wrap=True)
    head = Table(show_header=False)
    head.add_column("what")
    head.add_column("value", justify="right")
    head.add_row("steps", str(s.steps))
    if s.resumed_at:
        head.add_row("resumed at step", ", ".join(map(str, s.resumed_at)))
    if s.bad_lines:
        head.add_row("unreadable lines (skipped)", str(s.bad_lines))
    head.add_row("skipped steps", str(s.skipped) + (
        f" ({s.bad_data} with NaN/Inf in the data)" if s.bad_data else ""))
    head.add_row("clipped steps", str(s.clipped))
    loss = f"{_fmt(s.first_loss)} → {_fmt(s.last_loss)}"
    if s.ended_nonfinite and s.last_finite_loss is not None:
        loss += f" (last finite {_fmt(s.last_finite_loss)} at step {s.last_finite_step})"
    head.add_row("loss first → last", loss)
    head.add_row("largest gradient norm", _fmt(s.max_grad_norm))
    for kind in ("nonfinite", "grad_spike", "loss_spike", "backoff", "recover", "probe_held",
                 "overshoot", "noise", "data_shift", "rollback", "rollback_off", "edit_undone",
                 "drift", "depth_trend", "dead_units", "unwatched", "restored", "joined",
                 "join_synced", "warmup", "diverged", "stopped"):
        if s.events[kind]:
            head.add_row(f"events: {kind}", str(s.events[kind]))
    if s.origins:
        layer, n = s.origins.most_common(1)[0]
        head.add_row("where trouble starts most often", escape(f"{layer} ({n}×)"))
    first = s.first_trouble
    if first:
        head.add_row("first trouble", f"step {first['step']}: {first['kind']}")
    if s.lr_changes:
        head.add_row("LR scale changes", ", ".join(f"{k}:×{v:.3g}" for k, v in s.lr_changes[:8])
                     + (" …" if len(s.lr_changes) > 8 else ""))
    console.print(head)
    if s.verdict:
        typer.echo(f"verdict: {s.verdict}")
    elif s.steps:
        typer.echo("no verdict: the log ends before the guard was closed (the run crashed, "
                   "was killed, or is still running)")
    if s.timeline:
        tl = Table(title="events")
        for col in ("step", "kind", "action", "origin layer", "message"):
            tl.add_column(col, overflow="fold")
        for e in s.timeline[:events]:
            tl.add_row(*(escape(str(v)) for v in (
                e["step"], e["kind"], e.get("action", ""), e.get("origin_layer") or "",
                e.get("message", ""))))
        console.print(tl)
        if len(s.timeline) > events:
            console.print(f"[dim]… {len(s.timeline) - events} more events[/dim]")
    if html:
        with _write_errors(html):
            typer.echo(f"HTML report: {write_run_log_report(run_log, html, run=run)}")


def _check_bench_out(out: str) -> None:
    """Refuse a bench's --out that is a file or lies under one."""
    if (Path(out).exists() and not Path(out).is_dir()) or any(
            p.exists() and not p.is_dir() for p in Path(out).parents):
        typer.echo(f"--out {out} is a file or lies under one: give a directory")
        raise typer.Exit(2)


def _plan_or_exit(cfg: BenchConfig) -> tuple[list[Job], dict[str, str]]:
    """The bench's runs, or exit 2 naming what the configuration gets wrong."""
    from .bench.runner import plan_jobs

    try:
        return plan_jobs(cfg)
    except (KeyError, ValueError) as e:
        typer.echo(str(e.args[0] if e.args else e))
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _bench_interrupt() -> Iterator[None]:
    """Ctrl-C stops a bench with exit 130, saying how far it got and what was written."""
    from .bench import BenchInterrupted

    try:
        yield
    except BenchInterrupted as e:
        wrote = (f"the results were written to {e.out}" if e.written else
                 f"nothing was written ({e.out} is as it was before)")
        typer.echo(f"interrupted: {e.done} of {e.total} runs had finished; {wrote}")
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # (before the first run started)
        typer.echo("interrupted before any run had finished; nothing was written")
        raise typer.Exit(130) from None


def _check_out(path: str, suffixes: tuple[str, ...] | None, keep: str | None = None) -> None:
    """Refuse, before any work, an output file the command could not write: a folder, a
    kind of file it cannot make (None: any name), or the input it reads (``keep``)."""
    p = Path(path)
    if p.is_dir():
        typer.echo(f"{path} is a directory; give a file name")
        raise typer.Exit(2)
    if keep is not None and p.exists() and p.resolve() == Path(keep).resolve():
        typer.echo(f"{path} is the run log being read; give the HTML page another name "
                   "(writing it there would replace the log)")
        raise typer.Exit(2)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        typer.echo(f"{path}: the file name must end in one of {', '.join(sorted(suffixes))}")
        raise typer.Exit(2)


@contextlib.contextmanager
def _write_errors(path: str) -> Iterator[None]:
    """A file that cannot be written (no permission, a read-only place) exits 2 naming it."""
    try:
        yield
    except OSError as e:
        typer.echo(f"cannot write {path}: {e.strerror or e}")
        raise typer.Exit(2) from None


_SEV_STYLE = {"critical": "bold red", "warning": "yellow", "info": "dim"}


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A ConfigError (data the doctor cannot read, a loss NaN before any step, a run the log
    does not hold) exits 2 with its message, not a traceback (unwrapped and unstyled: it
    may hold a path)."""
    from .errors import ConfigError

    try:
        yield
    except ConfigError as e:
        typer.echo(str(e))
        raise typer.Exit(2) from None


def _load_run(target: str, seed: int):
    """A scenario or user script for the doctor; a bad target exits 2 with the reason."""
    from .doctor.entry import load_run

    try:
        return load_run(target, seed)
    except (ValueError, FileNotFoundError, AttributeError, TypeError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e


@app.command(cls=_Command)
def doctor(
    target: str = typer.Argument(..., help="a built-in scenario (e.g. mlp-init, linreg-raw) "
                                 "or path/to/file.py:make_run"),
    json_out: bool = typer.Option(False, "--json", help="print the findings as JSON"),
    fix: bool = typer.Option(False, "--fix", help="apply the safe fixes to a copy and re-run"),
    steps: int = typer.Option(200, help="steps of the before/after re-run with --fix"),
    lr_test: bool = typer.Option(True, help="run the LR range test"),
    run_log: str = typer.Option(None, help="also read a guard's JSONL run log (evidence, "
                                "never the root cause)"),
    trial_steps: int = typer.Option(60, help="steps of each short training run of a copy "
                                    "(as is, and with each proposed fix) that the "
                                    "severities rest on; 0: none, suspicions stop at warning"),
    seed: int = typer.Option(0),
    fail_on: str = typer.Option("never", help="exit 1 when a finding is at least this "
                                "severe: 'critical', 'warning' or 'never' (for CI)"),
) -> None:
    """Diagnose why gradients explode or vanish, rank the causes, and propose fixes."""
    from .doctor import diagnose
    from .doctor.entry import apply_fixes, rerun, summary

    if trial_steps < 0:
        console.print("[red]--trial-steps must be 0 or more[/red]")
        raise typer.Exit(2)
    if fail_on not in _FAIL_ON:
        typer.echo(f"--fail-on must be one of {', '.join(_FAIL_ON)}, got {fail_on!r}")
        raise typer.Exit(2)
    if fix and steps < 1:
        console.print("[red]--steps (of the --fix re-runs) must be 1 or more[/red]")
        raise typer.Exit(2)
    if run_log is not None and not Path(run_log).is_file():
        typer.echo(f"--run-log {run_log}: no such run log (a JSONL file written by "
                   "Guard(log=...))")
        raise typer.Exit(2)
    run = _load_run(target, seed)
    if isinstance(run.data, Iterator):  # one pass: the diagnosis and both re-runs share it
        run = dataclasses.replace(run, data=list(itertools.islice(
            run.data, max(steps, trial_steps, 100, 4))))
    with _user_errors():
        d = diagnose(run.model, run.data, run.loss_fn, run.optimizer, run_log=run_log,
                     lr_test=lr_test, trial_steps=trial_steps)
        out: dict = d.to_dict()
        if fix:
            fixed, done = apply_fixes(run, d)
            before, after = summary(rerun(run, steps)), summary(rerun(fixed, steps))
            out["fix"] = {"applied": done, "before": before, "after": after, "steps": steps}
    failed = any(f.severity in _FAIL_ON[fail_on] for f in d.findings)
    if json_out:
        import json

        from .doctor.findings import jsonable

        # allow_nan=False: strict JSON, so a NaN that slipped past jsonable fails here,
        # not in the reader's parser.
        typer.echo(json.dumps(jsonable(out), indent=2, default=str, allow_nan=False))
        if failed:
            raise typer.Exit(1)
        return
    console.print(f"[bold]gradguard doctor[/bold] · {run.name}")
    # soft_wrap: one line per item, left for the terminal to wrap (rich would break
    # sentences and code at its own width, with trailing spaces).
    for i, f in enumerate(d.findings, 1):
        style = _SEV_STYLE[f.severity]
        console.print(f"{i}. [{style}]{f.severity.upper()}[/{style}] [bold]{f.check}[/bold]: "
                      f"{escape(f.title)}", soft_wrap=True)
        if f.layers:
            more = " …" if len(f.layers) > 6 else ""
            console.print(f"   layers: {escape(', '.join(f.layers[:6]))}{more}", soft_wrap=True)
        if f.fix:
            console.print(f"   fix: {escape(f.fix)}", soft_wrap=True)
        if f.fix_code:
            console.print(f"   [cyan]{escape(f.fix_code)}[/cyan]", soft_wrap=True)
    if d.root_cause:
        console.print(f"[bold]most likely root cause:[/bold] {d.root_cause.check}")
    elif d.healthy:
        console.print("[green]no problem found: nothing above info (a short training run of a "
                      "copy is fine)[/green]")
    if fix:
        fx = out["fix"]
        console.print("applied to a copy: " + ("; ".join(fx["applied"]) or "nothing safe to apply"))
        t = Table(title=f"{steps}-step re-run, before and after the fixes")
        for col in ("run", "final train loss", "max grad norm", "blew up"):
            t.add_column(col, justify="right" if col != "run" else "left")
        for label, s in (("before", fx["before"]), ("after", fx["after"])):
            t.add_row(label, _fmt(s["final_loss"]), _fmt(s["max_grad_norm"]), _blew_up(s))
        console.print(t)
    if failed:
        raise typer.Exit(1)




# --fail-on: which severities make the doctor exit 1.
_FAIL_ON = {"never": (), "critical": ("critical",), "warning": ("critical", "warning")}


def _blew_up(s: dict) -> str:
    """When a re-run blew up: its first NaN/Inf step, else the step its loss left its
    bound, else "no"."""
    if s.get("first_nonfinite") is not None:
        return f"NaN/Inf at step {s['first_nonfinite']}"
    if s.get("diverged_at") is not None:
        return f"at step {s['diverged_at']}"
    return "no"


@app.command("lr-find", cls=_Command)
def lr_find_cmd(
    target: str = typer.Argument(..., help="a built-in scenario or path/to/file.py:make_run"),
    out: str = typer.Option("lr_find.png", help="where to write the plot"),
    start_lr: float = typer.Option(1e-7),
    end_lr: float = typer.Option(10.0),
    num_iter: int = typer.Option(100),
    seed: int = typer.Option(0),
) -> None:
    """LR range test (Smith 2017) on a copy: plot loss vs LR and suggest an LR."""
    import matplotlib.figure

    from .doctor import lr_find

    kinds = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    _check_out(out, tuple(f".{k}" for k in kinds))
    run = _load_run(target, seed)
    with _user_errors():
        res = lr_find(run.model, run.optimizer, run.data, run.loss_fn, start_lr=start_lr,
                      end_lr=end_lr, num_iter=num_iter)
    user = float(run.optimizer.param_groups[0]["lr"])
    with _write_errors(out):
        res.plot(out, user_lr=user)
    console.print(f"your LR: {user:.3g}; suggested: {_fmt(res.suggested, 3)}; loss diverges at: "
                  f"{_fmt(res.diverged_at, 3)}; plot: {out}")
    if res.note:
        console.print(f"note: {escape(res.note)}", soft_wrap=True)


@app.command(cls=_Command)
def bench(
    scenario: Annotated[list[str] | None, typer.Option(
        "--scenario", "-s", help="scenario(s) to run (default: all; see --list)")] = None,
    remedy: Annotated[list[str] | None, typer.Option(
        "--remedy", "-r", help="remedy(ies) to compare (default: all; see --list)")] = None,
    lr_grid: str = typer.Option(None, help="comma-separated LRs for every scenario, e.g. "
                                           "'1e-3,1e-2,1e-1' (default: each scenario's grid)"),
    lr_points: int = typer.Option(None, help="keep every N-th point of each scenario's grid "
                                  "(default: 1; --quick: 2)", show_default=False),
    seeds: int = typer.Option(None, help="seeds per scenario, remedy and LR (medians need >= 5) "
                              "(default: 5; --quick: 1)", show_default=False),
    steps: int = typer.Option(None, help="optimizer steps per run (default: the scenario's)"),
    jobs: int = typer.Option(None, help="worker processes (default: one per CPU core)"),
    out: str = typer.Option("gradguard-runs/bench", help="results directory"),
    quick: bool = typer.Option(False, "--quick", help="the quick preset: 3 scenarios, "
                                                      "6 remedies, 1 seed, whole decades "
                                                      "(options given explicitly win)"),
    html: bool = typer.Option(True, help="write OUT/report.html"),
    list_: bool = typer.Option(False, "--list", help="list scenarios and remedies, then exit"),
) -> None:
    """Reproduce explosions on real data and compare remedies side by side."""
    import os

    from . import scenarios as S
    from .bench import QUICK, REMEDIES, BenchConfig
    from .bench.console import run_with_progress, summary_tables

    if list_:
        t = Table(title="scenarios")
        for col in ("name", "default LR", "steps", "what"):
            t.add_column(col)
        for s in S.SCENARIOS.values():
            t.add_row(s.name, f"{s.lr:.3g}", str(s.steps), s.summary)
        console.print(t)
        t = Table(title="remedies")
        for col in ("name", "kind", "what"):
            t.add_column(col)
        for r in REMEDIES.values():
            t.add_row(r.name, r.kind, r.summary + ("" if r.available() else
                                                   f" [red](needs {r.needs})[/red]"))
        console.print(t)
        return
    preset: dict = dict(QUICK) if quick else {}
    try:
        grid = None if lr_grid is None else [float(v) for v in lr_grid.split(",")]
    except ValueError:
        console.print(f"[red]--lr-grid must be comma-separated numbers, got {lr_grid!r}[/red]")
        raise typer.Exit(2) from None
    if seeds is not None and seeds < 1:
        console.print("[red]--seeds must be at least 1[/red]")
        raise typer.Exit(2)
    if steps is not None and steps < 1:
        console.print(f"[red]--steps must be at least 1, got {steps}[/red]")
        raise typer.Exit(2)
    _check_bench_out(out)
    # An option given explicitly wins over the preset's value for it.
    cfg = BenchConfig(
        scenarios=scenario or preset.get("scenarios", list(S.SCENARIOS)),
        remedies=remedy or preset.get("remedies", list(REMEDIES)),
        seeds=tuple(range(seeds)) if seeds is not None else preset.get("seeds", tuple(range(5))),
        lr_grid=grid, lr_points=lr_points if lr_points is not None else preset.get("lr_points", 1),
        steps=steps, jobs=jobs if jobs is not None else os.cpu_count() or 1, out=out,
    )
    plan, skipped = _plan_or_exit(cfg)
    for name, why in skipped.items():
        console.print(f"[yellow]remedy {name} not run: {why}[/yellow]")
    console.print(f"{len(plan)} runs on {cfg.jobs} worker(s) → {cfg.out}")
    stale = (cfg.out / "report.html").is_file()
    with _bench_interrupt():
        res = run_with_progress(cfg, console)
    import json

    meta = json.loads((res.out / "meta.json").read_text())
    for t in summary_tables(res.summary, meta):
        console.print(t)
    console.print(f"Results: {res.out / 'results.md'}, {res.out / 'runs.csv'}, "
                  f"{res.out / 'summary.csv'}")
    if html:
        from .report import write_bench_report

        page = write_bench_report(res.out)
        console.print(f"Report: [bold]{page}[/bold] (open it in a browser)")
    elif stale:
        typer.echo(f"Removed the previous bench's {res.out / 'report.html'}: it described "
                   "another bench (--no-html: no new one written)")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # (last: every command must be registered before it runs)
    main()
