"""Recording: per-step rows reach the host asynchronously; sinks get them in batches.

Each ``guard.step`` packs its statistics (loss, norms, flags, LR scale, per-tensor norms)
into one small device tensor and posts it to a :class:`Mailbox`. On CUDA the mailbox
copies it into pinned host memory with ``non_blocking=True`` and records an event; the
host picks the row up once the event has completed (usually one step later), so the
training loop never waits for the device. On CPU there is no device to wait for and the
row is read in place. The host side (policy, analyzers, sinks) works on those rows.

Sinks receive rows every ``flush_every`` steps and immediately when an event happens.

Record schema (one JSON object per line in the JSONL sink):

- ``{"type": "meta", "format": 1, "gradguard": ver, "params": [...], "forward_order": [...],
  "config": {...}, "time": unix}`` — first line of a run.
- ``{"type": "step", "step": k, "loss": x, "grad_norm": x, "clipped_norm": x,
  "clip_coef": x, "skipped": b, "nonfinite": b, "grad_spike": b, "loss_spike": b,
  "lr_scale": x, "lr": x, "norms": [...]}`` — one per step (``lr`` is group 0's LR as the
  user's scheduler set it, before the guard's scale) (``norms`` every
  ``layers_every`` steps and on every flagged step).
- ``{"type": "event", "step": k, "kind": ..., "action": ..., "origin_layer": name|null,
  "top_layers": [[name, z], ...], "message": text, ...}`` — kinds: ``nonfinite``,
  ``grad_spike``, ``loss_spike``, ``backoff``, ``recover``, ``probe_held``, ``overshoot``,
  ``rollback``, ``snapshot``, ``drift``, ``depth_trend``, ``dead_units``, ``unwatched``,
  ``diverged``, ``joined``, ``join_synced`` (uneven inputs under ``Join``,
  :mod:`gradguard.join`).

:func:`read_jsonl` reads a log back as typed records (:mod:`gradguard.runlog`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, GuardUsageError, GuardUsageWarning, check_int
from .runlog import Event, Meta, StepRecord, typed

__all__ = [
    "COLUMNS",
    "ConsoleSink",
    "JsonlSink",
    "Mailbox",
    "Recorder",
    "Sink",
    "StepInfo",
    "TensorBoardSink",
    "count_runs",
    "encode_float",
    "make_sinks",
    "pack_row",
    "read_jsonl",
    "refuse_non_log",
]

FORMAT = 1
# Scalar columns at the head of every packed row; per-tensor norms follow. (The
# detectors' z-scores, ``grad_z`` and ``loss_z``, are added on the host, where the
# detectors live.)
# The flags come last, so that they are packed with one stack and one cast.
# ``bad_inputs``: the data held NaN/Inf (:class:`~gradguard.params.InputWatch`;
# False while it is not armed).
COLUMNS = ("loss", "grad_norm", "clipped_norm", "lr_scale",
           "skipped", "nonfinite", "grad_spike", "loss_spike", "bad_inputs")
_BOOL_COLUMNS = {"skipped", "nonfinite", "grad_spike", "loss_spike", "bad_inputs"}
_FLOATS = tuple(c for c in COLUMNS if c not in _BOOL_COLUMNS)
_FLAGS = COLUMNS[len(_FLOATS):]
LR_SCALE_AT = _FLOATS.index("lr_scale")  # (its index in a packed row)
assert set(_FLAGS) == _BOOL_COLUMNS  # the flags are the tail of COLUMNS


def pack_row(norms: Tensor, **columns: Tensor) -> Tensor:
    """One step's row for the host, in the order :data:`COLUMNS` declares.

    Args:
        norms: the per-tensor gradient norms, appended after the scalar columns.
        columns: one 0-dim tensor per name in :data:`COLUMNS`, no more and no fewer.
    """
    if set(columns) != set(COLUMNS):
        missing, extra = set(COLUMNS) - set(columns), set(columns) - set(COLUMNS)
        raise ValueError(f"pack_row: missing columns {sorted(missing)}, unknown {sorted(extra)}")
    return torch.cat([torch.stack([columns[c].float() for c in _FLOATS]),
                      torch.stack([columns[c] for c in _FLAGS]).float(), norms.float()])


def encode_float(v: float) -> float | str:
    """JSON and CSV have no NaN/Inf: write them as "nan"/"inf"/"-inf", which ``float()``
    (and :func:`read_jsonl`) turn back into floats. The one encoder for logs and tables."""
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _unnum(v: Any) -> Any:
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


# Steps a row may take to reach the host on an accelerator: the loop runs at most this far
# ahead of the device, which keeps the device's queue full.
ROW_LAG = 2


class Mailbox:
    """Moves small per-step tensors to the host without blocking the training loop.

    The host takes row ``k`` at step ``k + lag`` exactly (:data:`ROW_LAG` on CUDA; 0 on a
    CPU, where a row is there at once, and on other accelerators, whose rows are copied
    to the host at once, a sync per step), waiting for it if the device is that far
    behind. A fixed lag makes the host's decisions (the spike detectors'
    limits, the controller's) the same from run to run and on every rank of a
    distributed job; without it they would depend on how far the device happened to be.
    """

    def __init__(self, device: torch.device, slots: int = 64) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.lag = ROW_LAG if self.cuda else 0
        self._queue: deque[tuple[int, Tensor, Any]] = deque()
        self._slots = slots
        self._pool: list[Tensor] = []

    def post(self, step: int, row: Tensor) -> None:
        """Queue ``row`` (a 1-D device tensor) of ``step`` for the host."""
        if not self.cuda:
            row = row.detach()
            if row.device.type != "cpu":
                # Host sync, deliberate: an accelerator other than CUDA (MPS, XPU, ...)
                # gets no pinned-memory and event pipeline here; its row is read at once.
                row = row.cpu()
            self._queue.append((step, row, None))
            return
        host = self._pool.pop() if self._pool and self._pool[-1].numel() == row.numel() else \
            torch.empty(row.numel(), dtype=row.dtype, pin_memory=True)
        host.copy_(row.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._queue.append((step, host, event))
        if len(self._queue) > self._slots:
            # Host sync, deliberate: the host fell this far behind; waiting for the
            # oldest row bounds the pinned memory instead of growing the queue.
            self._queue[0][2].synchronize()

    def poll(self, wait: bool = False, upto: int | None = None) -> list[tuple[int, np.ndarray]]:
        """The rows of steps up to ``upto`` (waiting for them), oldest first; with
        ``wait``, every row; with neither, the rows whose copies have completed."""
        out: list[tuple[int, np.ndarray]] = []
        while self._queue:
            step, host, event = self._queue[0]
            if upto is not None and step > upto:
                break
            if event is not None and not event.query():
                if not wait and upto is None:
                    break
                # Host sync, deliberate: close()/drain asked for every row, or the
                # device is more than `lag` steps behind the loop (it then stalls the
                # loop until the device is within `lag` steps, not until it is idle).
                event.synchronize()
            self._queue.popleft()
            # A CPU tensor: reading it is a memory access, not a device synchronisation.
            out.append((step, host.numpy().copy()))
            if event is not None:
                self._pool.append(host)
        return out


class Sink(Protocol):
    """Where records go. Every method receives plain Python data."""

    def meta(self, record: dict[str, Any]) -> None: ...
    def steps(self, records: list[dict[str, Any]]) -> None: ...
    def event(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _atomic_append_lines(f: Any, lines: Iterable[str]) -> None:
    # One write call per batch, then flush + fsync, so a crash leaves at most a torn
    # last line, which read_jsonl skips.
    f.write("".join(lines))
    f.flush()
    os.fsync(f.fileno())


class _OpenResource:
    """A sink that holds an open file, writer or console: pickling or copying it (with the
    guard that owns it) would fail deep inside pickle with "cannot pickle
    '_io.TextIOWrapper' object", or give two guards one file."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise GuardUsageError(
            f"a Guard with a {type(self).__name__} (log=, tensorboard= or console=) holds "
            "an open file and cannot be pickled or copied. To save a guard, save "
            "guard.state_dict() (torch.save(guard.state_dict(), path)) and restore it with "
            "load_state_dict() on a new Guard; to copy one, build a new Guard on the copied "
            "model and optimizer and load the state into it (or build the guard with "
            "log=None, tensorboard=None, console=False)")


class JsonlSink(_OpenResource):
    """Append records to a JSON-lines file (the default sink; ``gradguard report`` reads it)."""

    # The files open sinks of this process write to: two live guards on one file
    # interleave their rows, and the report reads them as one run.
    _writing: ClassVar[dict[Path, int]] = {}

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = self.path.resolve()
        if JsonlSink._writing.get(self._key):
            warnings.warn(
                f"another open guard is writing to {self.path}: their rows interleave and "
                "`gradguard report` reads them as one run. Give each guard its own log= "
                "(or close the first guard before building the second)",
                GuardUsageWarning, stacklevel=5)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        JsonlSink._writing[self._key] = JsonlSink._writing.get(self._key, 0) + 1
        if self._f.tell() > 0:
            # A crash can leave a torn last line; start on a fresh one so this run's first
            # record is not glued onto the fragment and skipped with it.
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                _atomic_append_lines(self._f, ["\n"])

    def _write(self, records: Iterable[dict[str, Any]]) -> None:
        _atomic_append_lines(self._f, (json.dumps(r, separators=(",", ":")) + "\n"
                                       for r in records))

    def meta(self, record: dict[str, Any]) -> None:
        self._write([record])

    def steps(self, records: list[dict[str, Any]]) -> None:
        self._write(records)

    def event(self, record: dict[str, Any]) -> None:
        self._write([record])

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            left = JsonlSink._writing.pop(self._key, 1) - 1
            if left > 0:
                JsonlSink._writing[self._key] = left


class ConsoleSink(_OpenResource):
    """Print events (not steps) to the console with rich, or plain print without it."""

    def __init__(self, console: Any = None) -> None:
        if console is None:
            try:
                from rich.console import Console

                console = Console(stderr=True)
            except ImportError:
                console = None
        self.console = console

    def meta(self, record: dict[str, Any]) -> None:
        pass

    def steps(self, records: list[dict[str, Any]]) -> None:
        pass

    def event(self, record: dict[str, Any]) -> None:
        text = f"gradguard step {record['step']}: {record.get('message', record['kind'])}"
        if self.console is None:
            print(text)
        else:
            style = "red" if record["kind"] in ("nonfinite", "rollback", "diverged") else "yellow"
            # soft_wrap: one line per event, whole (rich would otherwise break a snapshot
            # path mid-word at 80 columns); markup off: messages may contain "[...]".
            self.console.print(text, style=style, soft_wrap=True, markup=False,
                               highlight=False)

    def close(self) -> None:
        pass


class TensorBoardSink(_OpenResource):
    """Scalars, per-layer norm histograms and events as text, via ``SummaryWriter``."""

    def __init__(self, log_dir: str | os.PathLike[str], histogram_every: int = 50) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ModuleNotFoundError(
                "TensorBoardSink needs tensorboard: pip install 'gradguard[tensorboard]'"
            ) from e
        self.writer = SummaryWriter(str(log_dir))
        self.histogram_every = check_int("TensorBoardSink.histogram_every", histogram_every, 1)
        self._names: list[str] = []
        self._next_histogram = 0

    def meta(self, record: dict[str, Any]) -> None:
        self._names = list(record.get("params", []))
        # (A resumed run's steps done again after a crash are drawn twice: SummaryWriter's
        # purge_step would also purge every other writer's points in a shared folder.)
        first = record.get("first_step", 0)
        self._next_histogram = first if isinstance(first, int) and first > 0 else 0
        self.writer.add_text("gradguard/config", json.dumps(record.get("config", {}), indent=1))

    def steps(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            k = r["step"]
            for col in ("loss", "grad_norm", "clipped_norm", "clip_coef", "lr_scale", "lr"):
                v = _unnum(r.get(col))
                if isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(f"gradguard/{col}", v, k)
            for col in ("skipped", "nonfinite", "grad_spike", "loss_spike"):
                self.writer.add_scalar(f"gradguard/{col}", float(bool(r.get(col))), k)
            norms = r.get("norms")
            # (every histogram_every steps or more: the first row with norms past each
            # mark, whatever layers_every keeps norms at)
            if norms is not None and k >= self._next_histogram:
                self._next_histogram = k + self.histogram_every
                arr = np.asarray([_unnum(v) for v in norms], dtype=np.float64)
                arr = arr[np.isfinite(arr) & (arr > 0)]
                if arr.size:
                    self.writer.add_histogram("gradguard/log10_layer_grad_norm",
                                              np.log10(arr), k)

    def event(self, record: dict[str, Any]) -> None:
        self.writer.add_text(f"gradguard/events/{record['kind']}",
                             record.get("message", ""), record["step"])

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class Recorder:
    """Turns host rows into records, keeps recent history, and feeds the sinks."""

    def __init__(self, names: list[str], sinks: list[Sink], flush_every: int = 50,
                 layers_every: int = 1, history: int = 10_000) -> None:
        self.names = names
        self.sinks = sinks
        self.flush_every = max(1, int(flush_every))
        self.layers_every = max(1, int(layers_every))
        self.rows: deque[dict[str, Any]] = deque(maxlen=history)
        self.events: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._last_flush = 0
        # What the events of a run this one resumed said (see tally): the verdict and the
        # diagnosis count the whole run, not only what happened since the resume.
        self.carried: dict[str, Any] = {"kinds": {}, "origins": {}, "skipped": 0, "data": 0}

    def carry(self, saved: dict[str, Any]) -> None:
        """Take ``saved`` (a :meth:`tally` from a state being loaded) as the run's story so
        far: the events this recorder holds already are the run the load replaces (a
        checkpoint loaded back in the process that wrote it), so they are offset, not
        counted on top."""
        self.carried = {"kinds": {}, "origins": {}, "skipped": 0, "data": 0}
        own = self.tally()

        def offset(key: str) -> dict[str, int]:
            a, b = saved[key], own[key]
            return {k: a.get(k, 0) - b.get(k, 0) for k in {*a, *b}}

        self.carried = {"kinds": offset("kinds"), "origins": offset("origins"),
                        "skipped": saved["skipped"] - own["skipped"],
                        "data": saved["data"] - own["data"]}

    def tally(self) -> dict[str, Any]:
        """Counts of the events so far, the carried ones included: per kind, per origin
        layer, the skipped steps and those of them whose inputs held NaN/Inf."""
        kinds, origins = dict(self.carried["kinds"]), dict(self.carried["origins"])
        for e in self.events:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
            if e.get("origin_layer"):
                origins[e["origin_layer"]] = origins.get(e["origin_layer"], 0) + 1
        return {"kinds": {k: n for k, n in kinds.items() if n},
                "origins": {k: n for k, n in origins.items() if n},
                "skipped": self.carried["skipped"] + len(
                    {e["step"] for e in self.events if e.get("action") == "skip"}),
                "data": self.carried["data"] + len(
                    {e["step"] for e in self.events if e.get("data")})}

    def start(self, meta: dict[str, Any]) -> None:
        record = {"type": "meta", "format": FORMAT, "time": time.time(), **meta}
        for s in self.sinks:
            s.meta(record)

    def row(self, step: int, values: np.ndarray, n_params: int) -> dict[str, Any]:
        """Decode one packed row into a step record (and queue it for the sinks)."""
        k = len(COLUMNS)
        rec: dict[str, Any] = {"type": "step", "step": step}
        for i, col in enumerate(COLUMNS):
            v = float(values[i])
            rec[col] = bool(v) if col in _BOOL_COLUMNS else v
        g, c = rec["grad_norm"], rec["clipped_norm"]
        rec["clip_coef"] = c / g if g > 0 and math.isfinite(g) else 1.0
        norms = values[k : k + n_params]
        rec["_norms"] = norms  # kept in memory for the analyzers; serialised selectively
        flagged = rec["skipped"] or rec["grad_spike"] or rec["loss_spike"]
        rec["_with_norms"] = flagged or step % self.layers_every == 0
        self.rows.append(rec)
        self._pending.append(rec)
        return rec

    @staticmethod
    def serialise(rec: dict[str, Any]) -> dict[str, Any]:
        out = {k: (encode_float(v) if isinstance(v, float) else v)
               for k, v in rec.items() if not k.startswith("_")}
        if rec.get("_with_norms"):
            out["norms"] = [encode_float(float(v)) for v in rec["_norms"]]
        return out

    def event(self, step: int, kind: str, message: str, **fields: Any) -> dict[str, Any]:
        """Record an event; it and every pending step go to the sinks now."""
        rec = {"type": "event", "step": step, "kind": kind, "message": message, **fields}
        self.events.append(rec)
        self.flush()
        for s in self.sinks:
            s.event(rec)
        return rec

    def maybe_flush(self, step: int) -> None:
        if step - self._last_flush >= self.flush_every:
            self.flush()
            self._last_flush = step

    def flush(self) -> None:
        if not self._pending:
            return
        if not self.sinks:  # nobody reads them: skip the per-tensor serialisation
            self._pending = []
            return
        records = [self.serialise(r) for r in self._pending]
        self._pending = []
        _all(functools.partial(s.steps, records) for s in self.sinks)

    def close(self) -> None:
        """Flush and close every sink, the others too when one fails (its error is raised
        after: a tracker that cannot be reached must not leave the run log open)."""
        _all([self.flush, *(s.close for s in self.sinks)])


def _all(calls: Iterable[Callable[[], object]]) -> None:
    """Make every call; one that raises does not keep the rest from theirs (the first
    error is raised once all were made)."""
    error: BaseException | None = None
    for call in calls:
        try:
            call()
        except Exception as e:
            error = error or e
    if error is not None:
        raise error


def _records(path: str | os.PathLike[str], bad: list[int] | None = None
             ) -> Iterator[dict[str, Any]]:
    """The log's records; a line that is none (torn, corrupt) is skipped, and counted in
    ``bad[0]`` when ``bad`` is given."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict) or "type" not in rec:
                if bad is not None:
                    bad[0] += 1
                continue
            yield {k: (_unnum(v) if not isinstance(v, list) else [_unnum(x) for x in v])
                   for k, v in rec.items()}


def _first_step(meta: dict[str, Any]) -> int:
    """The step a guard's first row has (past 0: it resumed a saved state)."""
    v = meta.get("first_step", 0)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


@dataclass
class _Part:
    """What one guard appended to a log, read without keeping its records."""

    first: int = 0  # the step its first row has (past 0: it resumed a saved state)
    end: int = 0  # one past its last step row
    verdict: bool = False  # it was closed (its verdict is there)
    crashed: bool = False  # it ended by an exception or gave up

    @property
    def clean(self) -> bool:
        return self.verdict and not self.crashed


def _parts(path: str | os.PathLike[str], bad: list[int] | None) -> list[_Part]:
    parts: list[_Part] = []
    for rec in _records(path, bad):
        if rec["type"] == "meta" or not parts:
            parts.append(_Part(_first_step(rec) if rec["type"] == "meta" else 0))
        part, step, kind = parts[-1], rec.get("step"), rec.get("kind")
        if rec["type"] == "step" and isinstance(step, int):
            part.end = max(part.end, step + 1)
        elif rec["type"] == "event" and kind == "verdict":
            part.verdict = True
        elif rec["type"] == "event" and kind in ("stopped", "diverged"):
            part.crashed = True
    return parts


def _plan(parts: list[_Part]) -> list[list[tuple[int, float]]]:
    """The runs, each a list of (part index, the step from which its records give way).

    A guard that resumed a saved state continues the latest run it can: one that crashed
    or gave up (the steps from the snapshot on were done again, and the resumed part's
    records replace them), or one that stopped cleanly at the very step it resumes at (a
    planned pause). A state resumed from an earlier step of a run that ended well is a
    new run branching off it: the finished run keeps all its records.
    """
    runs: list[list[tuple[int, float]]] = []
    for i, part in enumerate(parts):
        # The latest run that this part continues: one whose last part crashed or gave
        # up, or stopped cleanly at the very step this one resumes at.
        home = next((r for r in reversed(runs) if part.first > 0 and (
            not parts[r[-1][0]].clean or parts[r[-1][0]].end == part.first)), None)
        if home is None:
            runs.append([(i, math.inf)])
            continue
        home[:] = [(j, min(cut, part.first)) for j, cut in home]
        home.append((i, math.inf))
    return runs


def _stream(path: str | os.PathLike[str], run: list[tuple[int, float]],
            bad: list[int] | None) -> Iterator[dict[str, Any]]:
    """The records of one run of :func:`_plan`, read as they come."""
    cuts = dict(run)
    part = -1
    for rec in _records(path, bad):
        if rec["type"] == "meta" or part < 0:
            part += 1
        if part not in cuts:
            continue
        step = rec.get("step")
        if rec["type"] != "meta" and isinstance(step, int) and step >= cuts[part]:
            continue
        yield rec


def refuse_non_log(path: str | os.PathLike[str], read_any: bool) -> None:
    """Raise :class:`ConfigError` when :func:`read_jsonl` found nothing (``read_any``
    False) in a file that holds text: it is no run log. An empty file is one: a guard
    that never stepped (``Guard(log=...)`` creates it)."""
    if read_any:
        return
    with open(path, "rb") as f:
        if any(line.strip() for line in f):
            raise ConfigError(f"{path} is not a gradguard run log: no line in it is one "
                              "that Guard(log=...) writes")


def count_runs(path: str | os.PathLike[str]) -> int:
    """How many runs a log holds (see :func:`_plan`: each guard appends its own part, and a
    guard that resumed a saved state may continue an earlier run)."""
    return max(1, len(_plan(_parts(path, None))))


def read_jsonl(path: str | os.PathLike[str], run: int | None = None,
               bad: list[int] | None = None) -> Iterator[Meta | StepRecord | Event]:
    """Read a run log; a torn or corrupt line (e.g. from a crash mid-write) is skipped.

    Args:
        path: the JSONL file a ``Guard(log=...)`` wrote.
        run: which run of a file that several guards appended to (each run starts with its
            ``meta`` line; a guard that resumed a saved state may continue an earlier run,
            see :func:`_plan`): ``0`` the first, ``-1`` the last; None reads every record.
        bad: a one-element list the number of lines that are no record (torn, corrupt:
            skipped) is added to.

    Returns:
        Typed records (:class:`~gradguard.runlog.Meta`, :class:`~gradguard.runlog.StepRecord`,
        :class:`~gradguard.runlog.Event`), which are also read-only mappings of the line's
        keys (``rec["loss"]`` works as it did on the plain dicts).
    """
    if run is not None:
        if isinstance(run, bool) or not isinstance(run, numbers.Integral):
            raise ConfigError(f"run= takes an int (0 the first run, -1 the last) or None "
                              f"for every record, got {run!r}")
        run = int(run)
    read_any = False
    for rec in _select(path, run, bad):
        read_any = True
        yield typed(rec)
    refuse_non_log(path, read_any)


def _select(path: str | os.PathLike[str], run: int | None,
            bad: list[int] | None = None) -> Iterator[dict[str, Any]]:
    if run is None:
        yield from _records(path, bad)
        return
    plan = _plan(_parts(path, None))
    n = max(1, len(plan))
    index = run + n if run < 0 else run
    if not 0 <= index < n:
        raise ConfigError(f"{path} holds {n} run(s); run={run} is not one of them "
                          f"(use 0..{n - 1}, or -1 for the last)")
    if plan:
        yield from _stream(path, plan[index], bad)


@dataclass(frozen=True)
class StepInfo:
    """What one ``guard.step`` saw and did. Tensors stay on the device; read them lazily.

    Attributes:
        step: index of this call (0-based, counts skipped steps too).
        loss: the loss passed to ``step`` (detached), or None.
        grad_norm: global gradient norm before any transform.
        clipped_norm: global gradient norm after the transforms.
        skipped: 0-dim bool, True when the optimizer step was not applied.
        nonfinite: 0-dim bool, True when the gradients or the loss had NaN/Inf (or the
            gradient norm is too large for its square to fit in fp32).
        grad_spike: 0-dim bool, the gradient-norm spike detector fired.
        loss_spike: 0-dim bool, the loss spike detector fired.
        lr_scale: 0-dim, the factor the guard applied to every group's LR this step.
        norms: per-parameter-tensor gradient norms before the transforms.
        rolled_back: the guard restored a snapshot during this call (a host bool).
    """

    step: int
    loss: Tensor | None
    grad_norm: Tensor
    clipped_norm: Tensor
    skipped: Tensor
    nonfinite: Tensor
    grad_spike: Tensor
    loss_spike: Tensor
    lr_scale: Tensor
    norms: Tensor
    rolled_back: bool = False

    @property
    def clip_coef(self) -> Tensor:
        """clipped_norm / grad_norm (1 when nothing was clipped)."""
        return torch.where(self.grad_norm > 0, self.clipped_norm / self.grad_norm, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """Host copy of the scalars (this synchronises; call it off the hot path)."""
        # Host sync, deliberate: the caller asked for host numbers.
        out: dict[str, Any] = {"step": self.step}
        for k in ("loss", "grad_norm", "clipped_norm", "lr_scale"):
            v = getattr(self, k)
            out[k] = None if v is None else float(v.detach().float().cpu())
        out["clip_coef"] = float(self.clip_coef.cpu())
        for k in ("skipped", "nonfinite", "grad_spike", "loss_spike"):
            out[k] = bool(getattr(self, k).cpu())
        out["rolled_back"] = self.rolled_back
        return out


def make_sinks(log: str | os.PathLike[str] | None, tensorboard: str | os.PathLike[str] | None,
               console: bool, sinks: Sequence[Sink] = (), rank: int | None = None
               ) -> list[Sink]:
    """The sinks ``Guard(log=..., tensorboard=..., console=..., sinks=...)`` asks for; none
    on a torch.distributed rank other than 0 (``rank``): every rank makes the same
    decisions, one copy of the record is enough, and several ranks appending to one file
    would interleave it."""
    if rank is not None and rank != 0:
        return []
    out: list[Sink] = list(sinks)
    made: list[Sink] = []
    try:
        if log is not None:
            made.append(JsonlSink(log))
        if tensorboard is not None:
            made.append(TensorBoardSink(tensorboard))
        if console:
            made.append(ConsoleSink())
    except BaseException:  # close what was opened before the one that failed
        for s in made:
            with contextlib.suppress(Exception):
                s.close()
        raise
    return out + made
