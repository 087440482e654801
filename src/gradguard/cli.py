"""The ``gradguard`` command line (typer + rich)."""

from __future__ import annotations

import math

try:
    import typer
    from rich.console import Console
    from rich.table import Table
except ImportError as e:  # pragma: no cover - exercised only without the [cli] extra
    raise SystemExit("the gradguard CLI needs its extra: pip install 'gradguard[cli]'") from e

from . import __version__

app = typer.Typer(
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


@app.command()
def version() -> None:
    """Print the gradguard version."""
    console.print(f"gradguard {__version__}")


@app.command()
def demo(seed: int = typer.Option(0, help="seed for model init and batch order")) -> None:
    """Train built-in real-data scenarios unguarded, then guarded, and compare."""
    from .demo import run_demo

    rows = run_demo(seed=seed, progress=console)
    table = Table(title="gradguard demo: the same runs without and with a guard")
    table.add_column("scenario", no_wrap=True)
    table.add_column("run", no_wrap=True)
    for col in ("blew up", "test loss", "acc", "skipped"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        res = r.result
        blew = "[green]no[/green]" if res.diverged_at is None else f"[red]{res.diverged_at}[/red]"
        table.add_row(r.scenario, r.label, blew, _fmt(res.final_loss),
                      _fmt(res.final_metric, 3), str(res.skipped))
    console.print(table)
    for r in rows:
        if r.note:
            console.print(f"• [bold]{r.scenario}[/bold] / {r.label}: {r.note}")
    from .demo import LOG_DIR

    logs = sorted(LOG_DIR.glob("*.jsonl"))
    if logs:
        console.print(f"Run logs of the guarded runs: {', '.join(map(str, logs))}; "
                      f"try [bold]gradguard report {logs[-1]}[/bold]")


@app.command()
def report(
    run_log: str = typer.Argument(..., help="a JSONL run log written by Guard(log=...)"),
    events: int = typer.Option(20, help="how many events of the timeline to show"),
) -> None:
    """Summarise a recorded run: steps, skips, spikes, rollbacks, where trouble started."""
    from pathlib import Path

    from .report import summarize

    if not Path(run_log).exists():
        console.print(f"[red]no such run log: {run_log}[/red]")
        raise typer.Exit(2)
    s = summarize(run_log)
    head = Table(title=f"gradguard run {run_log}", show_header=False)
    head.add_column("what")
    head.add_column("value", justify="right")
    head.add_row("steps", str(s.steps))
    head.add_row("skipped steps", str(s.skipped))
    head.add_row("clipped steps", str(s.clipped))
    head.add_row("loss first → last", f"{_fmt(s.first_loss)} → {_fmt(s.last_loss)}")
    head.add_row("largest gradient norm", _fmt(s.max_grad_norm))
    for kind in ("nonfinite", "grad_spike", "loss_spike", "backoff", "recover", "rollback",
                 "drift", "depth_trend", "diverged"):
        if s.events[kind]:
            head.add_row(f"events: {kind}", str(s.events[kind]))
    if s.origins:
        layer, n = s.origins.most_common(1)[0]
        head.add_row("where trouble starts most often", f"{layer} ({n}×)")
    first = s.first_trouble
    if first:
        head.add_row("first trouble", f"step {first['step']}: {first['kind']}")
    if s.lr_changes:
        head.add_row("LR scale changes", ", ".join(f"{k}:×{v:.3g}" for k, v in s.lr_changes[:8])
                     + (" …" if len(s.lr_changes) > 8 else ""))
    console.print(head)
    if s.timeline:
        tl = Table(title="events")
        for col in ("step", "kind", "action", "origin layer", "message"):
            tl.add_column(col, overflow="fold")
        for e in s.timeline[:events]:
            tl.add_row(str(e["step"]), e["kind"], str(e.get("action", "")),
                       str(e.get("origin_layer") or ""), e.get("message", ""))
        console.print(tl)
        if len(s.timeline) > events:
            console.print(f"[dim]… {len(s.timeline) - events} more events[/dim]")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
