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
        return "[red]inf/NaN[/red]"
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
    for col in ("blew up at", "test loss", "acc", "skipped", "clipped", "sec"):
        table.add_column(col, justify="right")
    for r in rows:
        res = r.result
        blew = "[green]no[/green]" if res.diverged_at is None else f"[red]{res.diverged_at}[/red]"
        table.add_row(r.scenario, r.label, blew, _fmt(res.final_loss),
                      _fmt(res.final_metric, 3), str(res.skipped), str(res.clipped),
                      f"{res.seconds:.1f}")
    console.print(table)
    for r in rows:
        if r.note:
            console.print(f"• [bold]{r.scenario}[/bold] / {r.label}: {r.note}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
