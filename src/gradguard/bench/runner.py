"""Run scenarios × remedies × learning rates × seeds and write the results directory.

The directory (read by ``gradguard report DIR``):

* ``meta.json`` — the command, date, torch version, machine, scenarios, remedies, seeds;
* ``runs.csv`` — one row per run (:data:`RUN_COLUMNS`);
* ``curves.jsonl`` — per run: training losses and global gradient norms before/after clipping;
* ``summary.csv`` / ``results.md`` — per scenario and remedy: stable LR range, LR
  sensitivity and the outcome at the scenario's default LR (see :mod:`.metrics`);
* ``logs/<scenario>__<remedy>.jsonl`` — guard run logs at the default LR, first seed.

The files are written only when every run has finished, replacing the previous bench's
(see :func:`run_bench`): a folder never mixes two benches.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import scenarios
from ..errors import ConfigError
from ..record import encode_float
from ..report.html import BENCH_INPUTS
from ..scenarios.train import RunResult
from . import remedies as R
from .metrics import SummaryRow, markdown, summarize

__all__ = ["QUICK", "RUN_COLUMNS", "BenchConfig", "BenchInterrupted", "BenchResult", "Job",
           "cpu_model", "plan_jobs", "resummarize", "run_bench", "run_one"]

RUN_COLUMNS = ("scenario", "remedy", "lr", "seed", "steps", "diverged", "diverged_at",
               "first_nonfinite", "gave_up", "initial_loss", "final_train_loss",
               "final_test_loss", "metric_name", "final_metric", "clipped", "skipped",
               "rollbacks", "seconds", "error")


@dataclass(frozen=True)
class Job:
    """One training run of the bench."""

    scenario: str
    remedy: str
    lr: float
    seed: int
    steps: int
    log: str | None = None


@dataclass
class BenchConfig:
    """What to run.

    Attributes:
        scenarios: scenario names.
        remedies: remedy names (see ``gradguard.bench.remedies.REMEDIES``).
        seeds: seeds per (scenario, remedy, LR).
        lr_grid: LRs to sweep for every scenario; None uses each scenario's own grid.
        lr_points: keep every this-many-th grid point counted down from the scenario's
            default LR (2 halves a half-decade grid to whole decades); 1 keeps all.
        steps: optimizer steps per run; None uses each scenario's own.
        jobs: worker processes (each single-threaded); 1 runs in this process.
        out: results directory.
        tol: convergence tolerance for the stable LR range (see ``metrics.summarize``).
        command: the command line recorded in ``meta.json``.
    """

    scenarios: Sequence[str]
    remedies: Sequence[str]
    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    lr_grid: Sequence[float] | None = None
    lr_points: int = 1
    steps: int | None = None
    jobs: int = 1
    out: Path = Path("gradguard-runs/bench")
    tol: float = 0.1
    command: str = field(default_factory=lambda: shlex.join(["gradguard", *sys.argv[1:]]))

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        # A name, seed or LR given twice is one cell, not a cell counted twice in the
        # medians (first occurrence kept, in order).
        self.scenarios = list(dict.fromkeys(self.scenarios))
        self.remedies = list(dict.fromkeys(self.remedies))
        self.seeds = tuple(dict.fromkeys(self.seeds))
        if self.lr_grid is not None:
            self.lr_grid = list(dict.fromkeys(self.lr_grid))

    def grid(self, scn: scenarios.Scenario) -> list[float]:
        if self.lr_grid:
            return sorted(self.lr_grid)
        grid = sorted(scn.grid())
        i = min(range(len(grid)), key=lambda k: abs(math.log(grid[k] / scn.lr)))
        return [v for k, v in enumerate(grid) if (i - k) % self.lr_points == 0]


# The quick preset: the explosions a user meets first, against the peers, one seed.
QUICK = {
    "scenarios": ("linreg-raw", "mlp-corrupt", "cnn-lr"),
    "remedies": ("none", "clip-norm", "zclip", "autoclip", "skip-nonfinite", "gradguard"),
    "seeds": (0,),
    "lr_points": 2,
}


class BenchInterrupted(KeyboardInterrupt):
    """The bench was interrupted (Ctrl-C): queued runs were cancelled, running ones
    stopped, and nothing was written — the results directory is as it was before
    (unless ``written``: the interrupt came after every run had finished and the
    results had been written).

    Attributes:
        done: runs that had finished.
        total: runs planned.
        out: the results directory.
        written: the results were written all the same.
    """

    def __init__(self, done: int, total: int, out: Path, written: bool = False) -> None:
        super().__init__(f"interrupted after {done} of {total} runs; " + (
            f"the results were written to {out}" if written else
            f"nothing written ({out} is as it was)"))
        self.done, self.total, self.out, self.written = done, total, out, written


@dataclass
class BenchResult:
    """Rows of the run, the summary and where they were written."""

    rows: list[dict[str, Any]]
    summary: list[SummaryRow]
    out: Path
    skipped_remedies: dict[str, str]


def run_one(job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one job; returns its ``runs.csv`` row and its ``curves.jsonl`` record."""
    scn = scenarios.get(job.scenario)
    rem = R.get(job.remedy)
    error = ""
    try:
        res = _train(scn, rem, job)
    except Exception as e:  # a remedy that crashes is a result too, not the end of the bench
        res = RunResult(diverged_at=0)
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    row = {
        "scenario": job.scenario, "remedy": job.remedy, "lr": job.lr, "seed": job.seed,
        "steps": job.steps, "diverged": int(res.diverged), "diverged_at": res.diverged_at,
        "first_nonfinite": res.first_nonfinite, "gave_up": int(res.gave_up),
        "initial_loss": res.initial_loss,
        "final_train_loss": res.final_train_loss, "final_test_loss": res.final_loss,
        "metric_name": scn.metric, "final_metric": res.final_metric, "clipped": res.clipped,
        "skipped": res.skipped, "rollbacks": res.rollbacks, "seconds": res.seconds,
        "error": error,
    }
    curve = {"scenario": job.scenario, "remedy": job.remedy, "lr": job.lr, "seed": job.seed,
             "losses": _json_floats(res.losses), "grad_norms": _json_floats(res.grad_norms),
             "clipped_norms": _json_floats(res.clipped_norms)}
    return row, curve


def _train(scn: scenarios.Scenario, rem: R.Remedy, job: Job) -> RunResult:
    log = Path(job.log) if job.log else None
    make = rem.guard
    run = scenarios.prepare(
        scn, lr=job.lr, seed=job.seed, fix_setup=rem.fix_setup, fix_model=rem.fix_model,
        optimizer=rem.optimizer,
        guard=None if make is None else lambda m, o, s: make(m, o, s, log))
    opt = run.optimizer
    return run.train(job.steps, batch_scale=rem.batch_scale,
                     scheduler=rem.schedule(opt, job.steps) if rem.schedule else None,
                     accum=rem.accum,
                     before_step=rem.clipper(run.setup.model, opt) if rem.clipper else None)


def _json_floats(xs: Sequence[float]) -> list[float | None]:
    return [x if math.isfinite(x) else None for x in xs]


def _worker_init() -> None:
    # One thread per worker: runs are small, and N single-threaded runs side by side beat
    # N threads fighting over each one.
    torch.set_num_threads(1)
    # Ctrl-C reaches the whole process group: the parent alone handles it (cancels the
    # queue, stops the workers); a worker that raised KeyboardInterrupt would only break
    # the pool with a traceback. The parent spawned us with SIGINT blocked, so one that
    # came while we started is discarded here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Hold off SIGINT (delivered when the block ends; POSIX, main thread only)."""
    if not hasattr(signal, "pthread_sigmask") or \
            threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued runs and stop the running ones now."""
    # (ProcessPoolExecutor has no public way to stop a running job before Python 3.14's
    # terminate_workers(); the workers ignore SIGINT, so they are terminated. shutdown()
    # forgets them: they are taken first.)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(10)


def plan_jobs(cfg: BenchConfig, logs: Path | None = None) -> tuple[list[Job], dict[str, str]]:
    """The runs ``cfg`` asks for, and the remedies left out (with why).

    Args:
        cfg: what to run.
        logs: the folder the guard logs go to (default ``cfg.out / "logs"``).
    """
    _validate(cfg)
    logs = Path(cfg.out) / "logs" if logs is None else Path(logs)
    skipped = {r: f"needs the '{R.get(r).needs}' package" for r in cfg.remedies
               if not R.get(r).available()}
    jobs: list[Job] = []
    for name in cfg.scenarios:
        scn = scenarios.get(name)
        steps = cfg.steps or scn.steps
        for rem in cfg.remedies:
            if rem in skipped:
                continue
            logged = R.get(rem).guard is not None
            for lr in cfg.grid(scn):
                for seed in cfg.seeds:
                    log = None
                    if logged and seed == cfg.seeds[0] and math.isclose(lr, scn.lr):
                        log = str(logs / f"{name}__{rem}.jsonl")
                    jobs.append(Job(name, rem, lr, seed, steps, log))
    return jobs, skipped


def _validate(cfg: BenchConfig) -> None:
    for name in cfg.scenarios:
        scenarios.get(name)
    for rem in cfg.remedies:
        R.get(rem)
    if not cfg.seeds:
        raise ConfigError("give at least one seed")
    if cfg.jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {cfg.jobs}")
    if cfg.lr_points < 1:
        raise ConfigError(f"lr_points must be >= 1, got {cfg.lr_points}")
    if cfg.lr_grid is not None and any(not (v > 0 and math.isfinite(v)) for v in cfg.lr_grid):
        raise ConfigError(f"learning rates must be positive and finite, got {list(cfg.lr_grid)}")


def run_bench(cfg: BenchConfig,
              progress: Callable[[Job, dict[str, Any], int, int], None] | None = None
              ) -> BenchResult:
    """Run every job of ``cfg`` and write the results directory.

    The runs write into a hidden folder inside ``cfg.out``; only when all have finished
    do their files replace the previous bench's there (its ``runs.csv``, ``summary.csv``,
    ``results.md``, ``curves.jsonl``, ``meta.json``, guard logs, and its ``report.html``,
    which is removed: it described the previous bench). An interrupt (Ctrl-C) cancels
    the queued runs, stops the running ones and raises :class:`BenchInterrupted` with
    the folder as it was.

    Args:
        cfg: what to run.
        progress: called after each run with ``(job, row, done, total)``.
    """
    out = Path(cfg.out)
    created = not out.exists()
    stage = out / f".bench-partial-{os.getpid()}"
    # (validates cfg before anything is made; the logs go to the stage folder)
    jobs, skipped = plan_jobs(cfg, logs=stage / "logs")
    results: dict[Job, tuple[dict[str, Any], dict[str, Any]]] = {}
    written = False
    try:
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "logs").mkdir(parents=True)
        _run_jobs(cfg, jobs, results, progress)
        rows = [results[j][0] for j in jobs]
        meta = _meta(cfg, skipped)
        summary = summarize(rows, {n: scenarios.get(n).lr for n in cfg.scenarios}, cfg.tol)
        _write(stage, rows, [results[j][1] for j in jobs], summary, meta)
        with _sigint_blocked():  # (the folder is replaced whole or not at all)
            _commit(stage, out)
            written = True
    except KeyboardInterrupt:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not written:
            with contextlib.suppress(OSError):
                out.rmdir()  # (only if still empty)
        raise BenchInterrupted(len(results), len(jobs), out, written) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return BenchResult(rows, summary, out, skipped)


def _run_jobs(cfg: BenchConfig, jobs: list[Job],
              results: dict[Job, tuple[dict[str, Any], dict[str, Any]]],
              progress: Callable[[Job, dict[str, Any], int, int], None] | None) -> None:
    if cfg.jobs == 1:
        # Single-threaded like a worker: a run's numbers must not depend on --jobs (the
        # kernels' reduction order changes with the thread count, and chaotic runs follow).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for job in jobs:
                results[job] = run_one(job)
                if progress is not None:
                    progress(job, results[job][0], len(results), len(jobs))
        finally:
            torch.set_num_threads(threads)
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(cfg.jobs, mp_context=ctx, initializer=_worker_init)
    try:
        # The workers are spawned while the jobs are submitted: with SIGINT held off, so
        # a Ctrl-C in their start-up reaches this process only (see _worker_init).
        with _sigint_blocked():
            futures = {pool.submit(run_one, job): job for job in jobs}
        for fut in as_completed(futures):
            job = futures[fut]
            results[job] = fut.result()
            if progress is not None:
                progress(job, results[job][0], len(results), len(jobs))
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def _is_bench_log(path: Path) -> bool:
    # A previous bench's log is named <scenario>__<remedy>.jsonl: a file of the user's
    # that happens to lie in logs/ is left alone.
    from .remedies import REMEDIES

    scenario, _, remedy = path.stem.partition("__")
    return path.suffix == ".jsonl" and scenario in scenarios.SCENARIOS and remedy in REMEDIES


def _commit(stage: Path, out: Path) -> None:
    """Replace the previous bench's files in ``out`` with the finished ones in ``stage``."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    fresh = {p.name for p in (stage / "logs").glob("*.jsonl")}
    for new in (stage / "logs").glob("*.jsonl"):
        # (shutil.move: logs/ may be a link to another file system, where os.replace fails)
        shutil.move(new, logs / new.name)
    # Only once the new logs are in: the previous bench's that this one did not replace.
    for old in logs.glob("*.jsonl"):
        if old.name not in fresh and _is_bench_log(old):
            old.unlink()
    # The previous bench's page describes another bench (the caller writes a new one).
    (out / "report.html").unlink(missing_ok=True)
    for name in BENCH_INPUTS:
        os.replace(stage / name, out / name)


def resummarize(out: str | os.PathLike[str], tol: float | None = None) -> list[SummaryRow]:
    """Recompute ``summary.csv`` and ``results.md`` of a results directory from its runs.

    Args:
        out: a directory ``run_bench`` wrote.
        tol: a new convergence tolerance (default: the one it was run with).
    """
    out = Path(out)
    meta = json.loads((out / "meta.json").read_text())
    if tol is not None:
        meta["tol"] = tol
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["lr"] = float(r["lr"])
    default = {n: float(v["lr"]) for n, v in meta["scenarios"].items()}
    summary = summarize(rows, default, meta["tol"])
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _write(out, rows, None, summary, meta)  # curves.jsonl stays as it is
    return summary


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the architecture. Results are
    machine-specific: a chaotic run takes another path on a CPU whose kernels round
    differently (benchmarks/RESULTS.md), so every results file names it."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """The architecture and CPU model, as every results file names the machine."""
    return f"{platform.machine()} {cpu_model()}"


def _meta(cfg: BenchConfig, skipped: dict[str, str]) -> dict[str, Any]:
    scns = {}
    for name in cfg.scenarios:
        scn = scenarios.get(name)
        scns[name] = {"lr": scn.lr, "grid": cfg.grid(scn), "metric": scn.metric,
                      "summary": scn.summary}
    return {
        "command": cfg.command,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": f"{machine()}, "
                   f"{os.cpu_count()} CPUs, {cfg.jobs} single-threaded worker(s)",
        "scenarios": scns,
        "remedies": {r: R.get(r).summary for r in cfg.remedies if r not in skipped},
        "skipped_remedies": skipped,
        "seeds": list(cfg.seeds),
        "steps": {n: cfg.steps or scenarios.get(n).steps for n in cfg.scenarios},
        "tol": cfg.tol,
    }


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    return encode_float(v) if isinstance(v, float) else v


def _write(out: Path, rows: list[dict[str, Any]], curves: list[dict[str, Any]] | None,
           summary: list[SummaryRow], meta: dict[str, Any]) -> None:
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, RUN_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r[k]) for k in RUN_COLUMNS})
    if curves is not None:
        with open(out / "curves.jsonl", "w") as f:
            for c in curves:
                f.write(json.dumps(c) + "\n")
    cols = list(SummaryRow.__dataclass_fields__)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for s in summary:
            w.writerow({k: _csv_value(v) for k, v in s.as_dict().items()})
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    head = ["# gradguard bench results", "", f"Command: `{meta['command']}`  ",
            f"Created {meta['created']} with torch {meta['torch']} on {meta['machine']}; "
            f"seeds {meta['seeds']}; convergence tolerance {meta['tol']}.", ""]
    if meta["skipped_remedies"]:
        head += ["Not run: " + "; ".join(f"{k} ({v})" for k, v in
                                         meta["skipped_remedies"].items()), ""]
    (out / "results.md").write_text("\n".join(head) + "\n" + markdown(summary, meta) + "\n")
