"""The rollback store: which snapshots to take and keep, where they live, and restoring one.

The guard owns *when* to roll back (the stability controller decides); this part owns the
snapshots. Every ``Rollback.every`` steps it clones model, optimizer, the guard's
weight-describing state and tracked objects after the step, and keeps the clone when the
next ``clean_window`` rows show a calm run: their losses are the first ones computed with
the cloned weights (a step that wrecked them, an LR spike say, looks clean in its own row,
whose loss came before the update). Until then, and on a GPU until the rows arrive, the
clone waits as a *candidate*. A snapshot that two rollbacks in a row could not hold to
is dropped, so the next one goes a snapshot further back.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import snapshot as snap
from .errors import ConfigError, GuardUsageError, GuardUsageWarning
from .record import Recorder
from .respond import Rollback

if TYPE_CHECKING:
    from .distributed import Sync

__all__ = ["RollbackStore", "trackable"]


def trackable(obj: Any, started: bool) -> Any:
    """``obj``, checked for ``Guard.track``: it must have state_dict/load_state_dict and
    come before the first step (the first snapshot must already hold it)."""
    if isinstance(obj, type):  # (its methods unbound: found only at the first snapshot)
        raise ConfigError(f"track() takes an instance, not the class {obj.__name__}: "
                          f"e.g. guard.track({obj.__name__}(optimizer, ...))")
    if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
        raise ConfigError(f"track() needs state_dict/load_state_dict, {type(obj).__name__} "
                          "has neither")
    if started:
        raise GuardUsageError("track() objects before the first guard.step()")
    return obj


def _usable_dir(folder: Path) -> None:
    """Make ``folder`` (and its parents) and check that files can be written in it, when
    the guard is built: found at the first disk snapshot, the problem would stop training
    inside ``guard.step``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gradguard-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"Rollback(dir={str(folder)!r}) cannot hold snapshots: "
                          f"{e.strerror or e} ({type(e).__name__}); give a folder this "
                          "process can write to") from e


def _claim_dir(folder: Path, rank: int | None) -> Any:
    """Lock ``folder`` for this guard (and rank) while it is open, or warn that another
    open guard writes there: both would write snapshot files of the same names and prune
    each other's, and a crash-resume would find the other run's. The lock is an ``flock``,
    released when the guard closes or its process ends (a crashed run's dir is free at
    once); where there is none (Windows), no check is made."""
    try:
        import fcntl
    except ImportError:
        return None
    name = ".gradguard-lock" + ("" if rank is None else f"-rank{rank}")
    handle = (folder / name).open("a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        warnings.warn(
            f"gradguard: Rollback(dir={str(folder)!r}) is in use by another open guard: "
            "their snapshot files have the same names, so each overwrites and deletes the "
            "other's (and a resume reads either run's). Give each run its own dir, or close "
            "the other guard first", GuardUsageWarning, stacklevel=4)
        return None
    return handle


class RollbackStore:
    """Snapshots for rollback, in memory (device or pinned host) and optionally on disk.

    Args:
        cfg: the rollback settings.
        model, params, optimizer: what a snapshot holds.
        tracked: further objects with ``state_dict``/``load_state_dict`` (the guard's list,
            shared: ``guard.track`` appends to it).
        recorder: where snapshot and ``rollback_off`` events go.
        rank: this process's rank under torch.distributed (disk files per rank), or None.
        sync: the guard's collective under torch.distributed (the ranks agree on where
            snapshots live), or None.
    """

    def __init__(self, cfg: Rollback, model: nn.Module | None, params: Sequence[Tensor],
                 optimizer: torch.optim.Optimizer, tracked: list[Any], recorder: Recorder,
                 rank: int | None, sync: Sync | None = None) -> None:
        self.cfg = cfg
        self.sync = sync
        self.model, self.params, self.optimizer = model, params, optimizer
        self.tracked = tracked
        self.recorder = recorder
        self.rank = rank
        self.good: deque[snap.Snapshot] = deque(maxlen=cfg.keep)
        self.candidates: dict[int, snap.Snapshot] = {}
        # Where snapshots live ("device", "cpu" or "off"), settled at the first step.
        self.place: str | None = None
        # Settled already by the other ranks while this one had not stepped (see rebase).
        self.agreed_place: str | None = None
        self.retried_from: int | None = None
        self.resumed = False
        self.disk_files: deque[Path] = deque()
        self.disk_failed = False  # a write failed (a full disk): none is tried again
        self.fails: dict[int, int] = {}
        # The state a rollback left, while the restored weights are judged (see leave).
        self.left: snap.Snapshot | None = None
        self._lock = None
        if cfg.dir is not None:
            _usable_dir(Path(cfg.dir))
            self._lock = _claim_dir(Path(cfg.dir), rank)

    def release(self) -> None:
        """Free the snapshot dir for another guard (the guard closes)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def active(self) -> bool:
        return self.place not in (None, "off")

    @property
    def latest(self) -> snap.Snapshot | None:
        return self.good[-1] if self.good else None

    def can_retry(self, held: bool = False) -> bool:
        """Whether a failure now may be retried at the same LR.

        It needs a snapshot never restored from (one the run reached and passed clean
        *after* its last rollback), or, once, the snapshot a retry restored when that
        restore ``held`` (the run got through the rows in which a restored snapshot that
        holds damage fails): an independent fault may strike again before the next
        snapshot is verified, while an LR-driven failure repeats and gets its cut on the
        next try.
        """
        if not self.good:
            return False
        step = self.good[-1].step
        restores = self.fails.get(step, 0)
        if restores == 0:
            return step != self.retried_from
        return held and restores == 1 and step == self.retried_from

    def start(self, guard_state: dict[str, Any], step: int = 0) -> None:
        """At the first step (``step``: the guard's count, past 0 for a resumed guard):
        settle where snapshots live and keep the starting state, labelled as the state
        after the step before (-1: the initial weights)."""
        self.place = self._placement() if self.agreed_place is None else self.agreed_place
        if self.active and not self.resumed:
            self.good.append(self._take(step - 1, guard_state))

    @property
    def agrees(self) -> bool:
        """Whether :meth:`start` settles the snapshots' place with the other ranks (one
        all-reduce at the first step)."""
        return self.sync is not None and self.cfg.memory == "auto" \
            and self.agreed_place is None

    def rebase(self, step: int, guard_state: dict[str, Any], place: str | None,
               started: bool) -> None:
        """Start the rollback history afresh from the current weights, labelled ``step``
        (after a ``Join``: the snapshots held were of a path the other ranks did not
        take). ``place``: where the other ranks keep snapshots, taken as settled when
        ``started`` (they have stepped) and this store has not yet."""
        if self.place is None:
            if started and place is not None:
                self.agreed_place = place
            return  # (the first step takes the first snapshot)
        self.forget()
        if self.active:
            self.good.append(self._take(step, guard_state))

    def _placement(self) -> str:
        """Where in-memory snapshots can live: "device", "cpu" or "off" (too large); under
        torch.distributed the same on every rank (see :meth:`_room`)."""
        cfg = self.cfg
        if cfg.memory != "auto":
            return cfg.memory
        # The kept snapshots, and the candidates still waiting out their clean_window rows
        # (one per `every` steps in that window) before one of them is kept; at least one
        # slot, which the state a rollback leaves takes while it is judged (see leave).
        held = cfg.keep + max(1, math.ceil(cfg.clean_window / cfg.every))
        need = held * snap.estimate_bytes(self.params, self.optimizer, self.model)
        on_device, on_host = self._room(need)
        fits_here = on_device or on_host
        if self.sync is not None:
            # Ranks that roll back alone part from the others' replicas: each place is
            # taken only where it fits on every rank (a node short of memory turns
            # rollback off for all). Once, at the first step: the host waits for it.
            on_device, on_host = self.sync.agree([on_device, on_host],
                                                 self.params[0].device)
        if on_device:
            return "device"
        if on_host:
            return "cpu"
        limit = (f"Rollback(device_fraction={cfg.device_fraction}, "
                 f"host_fraction={cfg.host_fraction})")
        why = (f"another rank has no room for its {held} snapshots within {limit} "
               f"(this rank's, {need / 2**30:.3g} GiB, fit; every rank must keep them to "
               "roll back together)") if fits_here else (
            f"{held} snapshots (keep={cfg.keep} and those awaiting their clean window) "
            f"need {need / 2**30:.3g} GiB"
            + (" on this rank" if self.sync is not None else "")
            + f", more than {limit} allows")
        self.recorder.event(-1, "rollback_off",
                            f"rollback off: {why}"
                            + "; instability is answered by lowering the LR in place"
                            + ("" if cfg.dir is None else
                               f", and no snapshot is written to {cfg.dir} (they are the "
                               "kept ones; memory='cpu' keeps them in host memory)"),
                            action="warn")
        return "off"

    def _room(self, need: int) -> tuple[bool, bool]:
        """Whether ``need`` bytes of snapshots fit (in device memory, in host memory to
        offload to) on this rank; on a CPU model host memory *is* the device."""
        cfg = self.cfg
        device = self.params[0].device
        host = snap.host_available_bytes()
        on_host = host is not None and need <= cfg.host_fraction * host
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            return need <= cfg.device_fraction * total, on_host
        if device.type == "cpu":
            # (no reading of free memory: nothing to measure against, trust the machine)
            return host is None or on_host, False
        return host is None, on_host

    def _take(self, step: int, guard_state: dict[str, Any]) -> snap.Snapshot:
        return snap.take(step, self.model, self.params, self.optimizer, guard_state,
                         self.tracked, to_cpu=self.place == "cpu")

    def maybe_take(self, step: int, guard_state: Callable[[], dict[str, Any]],
                   early: bool = False,
                   full_state: Callable[[], dict[str, Any]] | None = None) -> None:
        """Take this step's snapshot when one is due (see :meth:`due`), as a candidate;
        one bound for disk also holds ``full_state()``, the guard's whole state."""
        if not self.active or not self.due(step, early) or self.left is not None:
            return  # (while restored weights are judged: held, and leave's memory in use)
        cand = self._take(step, guard_state())
        if full_state is not None and self.disk_due(step):
            cand.state = snap.clone_tree(full_state())  # (parts may hand out live lists)
        self.candidates[step] = cand

    def disk_due(self, step: int) -> bool:
        """Whether the snapshot of ``step``, once kept, is written to disk."""
        cfg = self.cfg
        return cfg.dir is not None and not self.disk_failed and \
            step % (cfg.disk_every or cfg.every) == 0

    def due(self, step: int, early: bool = False) -> bool:
        """Whether a snapshot is due after ``step`` (> 0): every ``every`` steps, and, with
        ``early``, before the first of those at the powers of two.

        Early on the weights change fastest and instability is likeliest (the reason
        warm-up exists), so the interval grows with the run's age instead of putting
        ``every`` steps of progress at stake from the start; Pythia's checkpoints are
        spaced the same way (steps 1, 2, 4, …, 512, then every 1000; Biderman et al.
        2023). The guard asks for them (``early``) only once the stability controller
        holds a loss level to judge a snapshot by before keeping it (8 losses by default:
        steps 8, 16, 32 on a CPU; 16, 32 where rows reach the host two steps late).
        With ``keep=2`` the initial weights are then no longer among the kept snapshots
        after step 16, where before they stayed until step 100.
        """
        every = self.cfg.every
        if step <= 0:
            return False
        if step % every == 0:
            return True
        return early and step < every and step & (step - 1) == 0

    def discard_latest(self) -> bool:
        """The latest snapshot failed at once when restored: it holds damage, not a calm
        state (keep at least one to go back to). Returns whether one was dropped."""
        if len(self.good) > 1:
            self.good.pop()
            return True
        return False

    def leave(self, step: int, guard_state: dict[str, Any]) -> None:
        """Before a rollback: keep the state it leaves (after ``step``), until the restored
        weights are judged. When they show the data changed, not the LR, the run goes back
        to where it was (:meth:`return_to_left`) instead of losing the progress since the
        snapshot. The awaiting candidates go first (a restore drops them anyway), so the
        memory the placement budgeted for is not exceeded."""
        self.candidates.clear()
        self.left = self._take(step, guard_state) if self.active else None

    def return_to_left(self) -> snap.Snapshot | None:
        """Put model, optimizer and tracked objects back to the state the rollback left;
        returns it (None: none kept)."""
        left, self.left = self.left, None
        if left is not None:
            self._put_back(left)
        return left

    def forget(self) -> int:
        """Drop every snapshot (the data changed since they were judged calm: the level
        each recorded is the old data's, so restoring one would bring back a yardstick the
        run can no longer meet). New ones are taken as the run goes on. Returns how many
        were dropped."""
        n = len(self.good)
        self.left = None
        self.good.clear()
        self.candidates.clear()
        self.fails.clear()
        self.retried_from = None
        return n

    def keep(self, cand: snap.Snapshot) -> None:
        """Keep a snapshot its row showed calm (and write it to disk when due)."""
        self.good.append(cand)
        if self.disk_due(cand.step):
            self._write_disk(cand)

    def _write_disk(self, s: snap.Snapshot) -> None:
        assert self.cfg.dir is not None
        # Under DDP/FSDP2 each rank saves its own state (its shards under FSDP2).
        rank = f"-rank{self.rank}" if self.rank is not None else ""
        try:
            path = snap.save_file(s, Path(self.cfg.dir) /
                                  f"snapshot-{max(s.step, 0):09d}{rank}.pt")
        except OSError as e:
            # A full or vanished disk mid-run must not end the training: the snapshot is
            # still kept in memory, and rollback goes on from there.
            self.disk_failed = True
            msg = (f"could not write the snapshot of step {s.step} to Rollback(dir="
                   f"{str(self.cfg.dir)!r}): {e}; disk snapshots are off for the rest of "
                   "this run (rollback goes on from memory). Free space or pick another "
                   "dir to have them again on the next run")
            self.recorder.event(s.step, "rollback_off", msg, action="warn")
            warnings.warn(f"gradguard: {msg}", GuardUsageWarning, stacklevel=2)
            return
        self.disk_files.append(path)
        while len(self.disk_files) > self.cfg.keep:
            self.disk_files.popleft().unlink(missing_ok=True)
        self.recorder.event(s.step, "snapshot", f"snapshot of step {s.step} written to {path}",
                            action="snapshot", path=str(path))

    def restore(self, retry: bool) -> snap.Snapshot:
        target = self.good[-1]
        self.fails[target.step] = self.fails.get(target.step, 0) + 1
        if self.fails[target.step] > 2 and len(self.good) > 1:
            # Restored twice, failed twice, the LR lowered in between: the damage is in it.
            self.good.pop()
        return self.restore_latest(retry)

    def restore_latest(self, retry: bool = False) -> snap.Snapshot:
        """Put model, optimizer and tracked objects back to the latest good snapshot
        (:meth:`restore` also counts the restore against that snapshot; the give-up path
        does not: it ends the run).

        Returns the snapshot (the guard restores its own part from ``.guard``). The latest
        good one was taken while the loss was calm, so before the regression began; going
        back further would throw away sound progress. If the run fails again from here,
        the lower LR is what changes.
        """
        target = self.good[-1]
        if retry:
            self.retried_from = target.step
        self._put_back(target)
        return target

    def _put_back(self, target: snap.Snapshot) -> None:
        snap.restore(target, self.model, self.params, self.optimizer, self.tracked)
        self.optimizer.zero_grad(set_to_none=True)
        self.candidates.clear()  # (taken from weights that are gone now)

    def state_dict(self, snapshots: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"retried_from": self.retried_from, "fails": dict(self.fails)}
        if snapshots:
            # (not the whole guard state a disk-bound one holds: the state is this one)
            out["snapshots"] = [snap.clone_tree({**s.as_dict(), "state": None})
                                for s in self.good]
            out["left"] = None if self.left is None else snap.clone_tree(
                {**self.left.as_dict(), "state": None})
        return out

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.retried_from = s["retried_from"]
        self.fails = {int(k): int(v) for k, v in s["fails"].items()}
        if s.get("snapshots"):
            self.good.clear()
            self.good.extend(snap.Snapshot(**d) for d in snap.clone_tree(s["snapshots"]))
            self.resumed = True
            left = s.get("left")  # (absent before it existed)
            self.left = None if left is None else snap.Snapshot(**snap.clone_tree(left))
