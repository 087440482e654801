"""Snapshots of model + optimizer + guard state for rollback, in memory or on disk.

In memory, a snapshot is a set of device-side clones (no host copy, no sync). On disk it
is written atomically — serialised to bytes, SHA-256 checksummed, written to a temporary
file in the same folder, fsynced, renamed over the target, and the folder fsynced — so a
crash mid-write leaves the previous snapshot intact, and a corrupted or truncated file
is detected by its checksum rather than loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import local_tensor
from .errors import ConfigError, GradGuardError

__all__ = ["Snapshot", "SnapshotError", "check_fits", "load_file", "load_latest", "restore",
           "save_file", "take"]

FILE_FORMAT = 1


class SnapshotError(GradGuardError):
    """A snapshot file is missing, truncated, corrupted or of another format."""


def clone_tree(obj: Any, to_cpu: bool = False) -> Any:
    """Deep copy with tensors cloned and containers rebuilt.

    Tensors stay on their device, or with ``to_cpu`` go to host memory: pinned, and
    copied without blocking the host when they come from a GPU (the copy is ordered on
    the stream before any later in-place update of the source).
    """
    if isinstance(obj, Tensor):
        t = obj.detach()
        if not to_cpu or t.device.type == "cpu":
            return t.clone()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        return out.copy_(t, non_blocking=t.is_cuda)
    if isinstance(obj, dict):
        return {k: clone_tree(v, to_cpu) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_tree(v, to_cpu) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tree(v, to_cpu) for v in obj)
    return obj


def estimate_bytes(params: Sequence[Tensor], optimizer: torch.optim.Optimizer,
                   model: nn.Module | None = None) -> int:
    """Bytes one snapshot takes: the model's state (with ``model``: its whole state dict,
    frozen parameters and buffers too, as a snapshot holds it; else ``params``) plus the
    optimizer's state.

    Before the first step the optimizer's state does not exist yet; it is counted as two
    tensors per watched parameter (Adam's moments: the largest of torch's usual
    optimizers). Under FSDP2 a rank's snapshot holds its shards only: a DTensor counts its
    local shard, not the global size ``numel()`` gives.
    """
    weights = sum(_nbytes(p) for p in params)
    if model is None:
        held = weights
    else:
        _, foreign = _outside(model, optimizer)  # (left out of a snapshot: _model_state)
        held = sum(_nbytes(v) for k, v in model.state_dict(keep_vars=True).items()
                   if isinstance(v, Tensor) and k not in foreign)
    state = sum(_nbytes(v) for st in optimizer.state.values()
                for v in st.values() if isinstance(v, Tensor))
    return held + (state if optimizer.state else 2 * weights)


def _nbytes(t: Tensor) -> int:
    t = local_tensor(t)
    return t.numel() * t.element_size()


def _world(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _step_of(path: Path) -> int | None:
    m = re.match(r"snapshot-(\d+)", path.name)
    return int(m.group(1)) if m else None


def _load_agreed(found: list[Path], pattern: str, folder: Path, map_location: Any,
                 group: Any) -> tuple[Path, Snapshot]:
    """:func:`load_latest` across ranks: the newest step (in the first rank's order of
    writing) whose file loads on every rank; a few collectives, once, at a resume."""
    import torch.distributed as dist

    mine = {}
    for p in found:
        if (k := _step_of(p)) is not None:
            mine.setdefault(k, p)  # (newest first: a step written twice keeps its newest)
    lists: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(lists, list(mine), group=group)
    common = [k for k in lists[0] if all(k in other for other in lists)]
    errors: list[str] = []
    for k in common:
        try:
            got: tuple[Path, Snapshot] | None = (mine[k], load_file(mine[k], map_location))
        except SnapshotError as e:
            got = None
            errors.append(str(e))
        ok: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(ok, got is not None, group=group)
        if all(ok) and got is not None:
            return got
    raise SnapshotError(
        f"no step's snapshot matching {pattern!r} in {folder} loads on every rank "
        f"(this rank has steps {sorted(mine)[-5:]}, {len(common)} in common with every "
        "rank's)" + (f"; refused here: {errors[0]}" if errors else ""))


def host_available_bytes() -> int | None:
    """Free host memory (Linux/macOS ``sysconf``), or None where it cannot be read."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


@dataclass
class Snapshot:
    """State at the end of step ``step`` (``-1``: before the first step).

    ``guard`` is the guard's trajectory (what a rollback restores); ``state``, held by the
    snapshots written to disk, is the guard's whole ``state_dict()`` at that moment (its
    LR scale, step count and controller memory too), for an exact resume after a crash.
    """

    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    guard: dict[str, Any]
    extras: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "model": self.model, "optimizer": self.optimizer,
                "guard": self.guard, "extras": self.extras, "state": self.state}


def _outside(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[set[str], set[str]]:
    """(names of the model's parameters this optimizer does not update, those of them that
    are trainable). The trainable ones belong to someone else (another optimizer, often
    with its own guard): a rollback must not move them, since their optimizer's state is
    not rolled back with them. Frozen ones and every buffer (running statistics a bad
    forward pass may have poisoned) go back with the snapshot."""
    mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
    outside = {n: p for n, p in model.named_parameters(remove_duplicate=False)
               if id(p) not in mine}
    return set(outside), {n for n, p in outside.items() if p.requires_grad}


def _model_state(model: nn.Module | None, params: Sequence[Tensor],
                 optimizer: torch.optim.Optimizer, to_cpu: bool) -> dict[str, Any]:
    if model is not None:
        _, foreign = _outside(model, optimizer)
        state = model.state_dict()
        return clone_tree({k: v for k, v in state.items() if k not in foreign}, to_cpu)
    return {str(i): clone_tree(p, to_cpu) for i, p in enumerate(params)}


def _load_model(model: nn.Module, state: dict[str, Any],
                optimizer: torch.optim.Optimizer) -> None:
    # (check_fits has vetted the keys: a parameter outside the optimizer may be absent)
    outside, foreign = _outside(model, optimizer)
    model.load_state_dict({k: v for k, v in state.items() if k not in foreign},
                          strict=not outside)


def _drives(obj: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``obj`` is an LR scheduler of ``optimizer``, through the wrappers
    accelerate puts around either (``.scheduler``, ``.optimizer``)."""
    for sched in (obj, getattr(obj, "scheduler", None)):
        opt = getattr(sched, "optimizer", None)
        for _ in range(3):
            if opt is None:
                break
            if opt is optimizer:
                return True
            opt = getattr(opt, "optimizer", None)
    return False


def _other_kind(saved: dict[str, Any], now: dict[str, Any],
                ignore: set[str]) -> tuple[list[str], list[str]] | None:
    """The keys only ``saved`` has and those only ``now`` has, when both sides have some:
    another class of optimizer or scheduler (a newer torch adds keys on one side only)."""
    only_saved = sorted(set(saved) - set(now) - ignore)
    only_now = sorted(set(now) - set(saved) - ignore)
    return (only_saved[:4], only_now[:4]) if only_saved and only_now else None


def check_fits(snap: Snapshot, model: nn.Module | None, params: Sequence[Tensor],
               optimizer: torch.optim.Optimizer, extras: Sequence[Any] = ()) -> None:
    """Raise :class:`SnapshotError`, before anything is changed, when ``snap`` cannot be
    restored into these objects: another model, a model whose state's keys changed since
    (pruning or weight norm applied mid-run), other shapes, other parameter groups, another
    optimizer, or another number or kind of tracked objects (torch would load part of it,
    then raise, or load an Adam's state into an SGD that breaks at its next step)."""
    if model is not None:
        outside, foreign = _outside(model, optimizer)
        now = {k: v for k, v in model.state_dict().items() if k not in foreign}
    else:
        outside, now = set(), {str(i): p for i, p in enumerate(params)}
    saved = {k: v for k, v in snap.model.items() if k not in foreign} if model is not None \
        else snap.model
    missing = [k for k in now if k not in saved and k not in outside]
    unexpected = [k for k in saved if k not in now]
    shapes = [k for k, v in saved.items() if k in now and isinstance(v, Tensor)
              and isinstance(now[k], Tensor) and v.shape != now[k].shape]
    sizes = [len(g["params"]) for g in snap.optimizer.get("param_groups", [])]
    why = []
    if missing or unexpected:
        why.append(f"its model state has other entries (missing {missing[:3]}, unexpected "
                   f"{unexpected[:3]}: another model, or one pruned or reparametrised since)")
    if shapes:
        why.append(f"other shapes ({shapes[:3]})")
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        why.append(f"other optimizer parameter groups (sizes {sizes} against "
                   f"{[len(g['params']) for g in optimizer.param_groups]})")
    saved_groups = snap.optimizer.get("param_groups", [])
    if saved_groups and optimizer.param_groups and (
            other := _other_kind(saved_groups[0], optimizer.param_groups[0], {"params"})):
        why.append(f"another optimizer (its settings {other[0]} against this "
                   f"{type(optimizer).__name__}'s {other[1]})")
    if len(extras) != len(snap.extras):
        why.append(f"{len(snap.extras)} tracked object(s) (schedulers, ...), and "
                   f"{len(extras)} were given to restore into")
    else:
        for e, saved_e in zip(extras, snap.extras, strict=True):
            if isinstance(saved_e, dict) and hasattr(e, "state_dict") and (
                    other := _other_kind(saved_e, e.state_dict(), set())):
                why.append(f"another kind of tracked {type(e).__name__} (its state "
                           f"{other[0]} against {other[1]})")
    if why:
        raise SnapshotError(f"the snapshot of step {snap.step} does not fit: "
                            + "; ".join(why) + ". Nothing was restored")


def take(step: int, model: nn.Module | None, params: Sequence[Tensor],
         optimizer: torch.optim.Optimizer, guard_state: dict[str, Any],
         extras: Sequence[Any] = (), to_cpu: bool = False) -> Snapshot:
    """Clone everything needed to return to this moment (no host sync either way)."""
    return Snapshot(
        step=step,
        model=_model_state(model, params, optimizer, to_cpu),
        optimizer=clone_tree(optimizer.state_dict(), to_cpu),
        guard=clone_tree(guard_state),
        extras=[clone_tree(e.state_dict(), to_cpu) for e in extras],
    )


def restore(snap: Snapshot, model: nn.Module | None, params: Sequence[Tensor],
            optimizer: torch.optim.Optimizer, extras: Sequence[Any] = ()) -> None:
    """Put model, optimizer and extras back to ``snap`` (the guard restores its own part).

    The optimizer's hyperparameters (LR, weight decay, momentum, …) stay as they are now
    unless an LR scheduler of it is among ``extras``: they are the user's (a hand-set LR,
    or an untracked scheduler's, which is not rolled back and goes on from its own count),
    and a rollback must not raise an LR the user lowered. A tracked scheduler's count goes
    back, and the LR it set goes back with it.
    """
    _check_restore_args(snap, model, optimizer, extras)
    check_fits(snap, model, params, optimizer, extras)
    with torch.no_grad():
        if model is not None:
            _load_model(model, clone_tree(snap.model), optimizer)
        else:
            for i, p in enumerate(params):
                p.copy_(snap.model[str(i)])
    scheduled = any(_drives(e, optimizer) for e in extras)
    now = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(clone_tree(snap.optimizer))
    _keep_dtypes(optimizer, snap.optimizer)
    if not scheduled and len(now) == len(optimizer.param_groups):
        for group, hyper in zip(optimizer.param_groups, now, strict=True):
            group.update(hyper)
    for e, s in zip(extras, snap.extras, strict=True):
        e.load_state_dict(clone_tree(s))


def _check_restore_args(snap: Any, model: Any, optimizer: Any, extras: Any) -> None:
    """:func:`restore`'s arguments by type, so that a slip is named, not met as an
    AttributeError deep inside (nothing is changed before this)."""
    if isinstance(snap, tuple) and len(snap) == 2 and isinstance(snap[1], Snapshot):
        raise ConfigError("restore() takes the Snapshot, and load_latest() returns "
                          "(path, snapshot): path, s = load_latest(folder); restore(s, ...)")
    if not isinstance(snap, Snapshot):
        raise ConfigError(f"restore() takes a Snapshot (from load_file() or load_latest()), got "
                          f"a {type(snap).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"restore(snapshot, model, params, optimizer, extras): model "
                          f"must be an nn.Module or None, got a {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"restore(snapshot, model, params, optimizer, extras): optimizer "
                          f"must be a torch.optim.Optimizer, got a {type(optimizer).__name__}")
    if not isinstance(extras, list | tuple):
        raise ConfigError(f"restore()'s extras= is a list of the tracked objects (e.g. "
                          f"[scheduler]), got a {type(extras).__name__}")


def _keep_dtypes(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Put back the state entries ``load_state_dict`` cast to their parameter's dtype.

    torch casts every floating state tensor but ``step`` to the parameter's dtype, so with
    bfloat16 parameters NAdam's float32 ``mu_product`` (ASGD's ``eta``/``mu``) came back
    rounded: a rollback must return the state exactly as it was snapshotted.
    """
    states = saved.get("state", {})
    groups = saved.get("param_groups", [])
    for group, saved_group in zip(optimizer.param_groups, groups, strict=False):
        for p, key in zip(group["params"], saved_group.get("params", []), strict=False):
            now = optimizer.state.get(p)
            for k, v in states.get(key, {}).items():
                cur = None if now is None else now.get(k)
                if type(v) is Tensor and type(cur) is Tensor and cur.dtype != v.dtype:
                    now[k] = v.to(device=cur.device, copy=True)


def save_file(snap: Snapshot, path: str | os.PathLike[str]) -> Path:
    """Write ``snap`` to ``path`` atomically, with a checksum."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(to_cpu(snap.as_dict()), buf)
    payload = buf.getvalue()
    outer = io.BytesIO()
    torch.save({"format": FILE_FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": payload}, outer)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(outer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_file(path: str | os.PathLike[str], map_location: Any = None) -> Snapshot:
    """Read a snapshot written by :func:`save_file`, verifying format and checksum."""
    path = Path(path)
    if not path.exists():
        raise SnapshotError(f"snapshot file {path} does not exist")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated zip
        raise SnapshotError(
            f"snapshot file {path} is truncated or not a gradguard snapshot "
            f"({e.__class__.__name__}); use the previous snapshot"
        ) from e
    if not isinstance(outer, dict) or outer.get("format") != FILE_FORMAT:
        raise SnapshotError(f"snapshot file {path} has an unknown format; expected {FILE_FORMAT}")
    payload = outer.get("payload")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != outer.get("sha256"):
        raise SnapshotError(f"snapshot file {path} failed its checksum: it is corrupted")
    d = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    return Snapshot(d["step"], d["model"], d["optimizer"], d["guard"], d.get("extras", []),
                    d.get("state"))


def load_latest(folder: str | os.PathLike[str], pattern: str | None = None,
                map_location: Any = None, rank: int | None = None,
                agree: bool = False, group: Any = None) -> tuple[Path, Snapshot]:
    """The newest snapshot in ``folder`` that passes its checksum, with its path.

    After a crash, the newest file may be corrupted (a disk fault; a torn write cannot
    happen, see :func:`save_file`) and unfinished temp files may remain; neither is
    taken for a snapshot (temp files never match ``pattern``).

    With ``agree`` under an initialised torch.distributed group of more than one rank,
    every rank of ``group`` must call it (a collective): the ranks agree on the newest step
    whose snapshot loads on all of them (a crash can leave one rank's newest file
    unwritten or corrupted, and ranks resumed at different steps would part, then hang).

    Args:
        folder: where the snapshots are (``Rollback(dir=...)``).
        pattern: glob for snapshot names (default: the guard's, ``snapshot-<step>.pt``, or
            ``snapshot-<step>-rank<r>.pt`` with ``rank``).
        map_location: as for :func:`torch.load`.
        rank: under torch.distributed, this rank's files (each rank writes its own).
        agree: agree with the other ranks on the step (see above); needs ``rank``.
        group: the process group the ranks agree over (None: the default one).

    Raises:
        SnapshotError: no file in ``folder`` matching ``pattern`` loads (with ``rank``
            under torch.distributed: no step's file loads on every rank).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SnapshotError(f"snapshot folder {folder} does not exist (or is not a folder)")
    if pattern is None:
        pattern = "snapshot-*.pt" if rank is None else f"snapshot-*-rank{rank}.pt"
    # (Without a rank, another rank's files are not this process's.)
    others = "-rank" if rank is None and pattern == "snapshot-*.pt" else None
    # Newest written first, not highest step first: a run restarted without its guard
    # state counts steps from 0 again.
    found = sorted((p for p in folder.glob(pattern)
                    if p.is_file() and (others is None or others not in p.name)),
                   key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    if agree and rank is not None and _world(group) > 1:
        return _load_agreed(found, pattern, folder, map_location, group)
    errors: list[str] = []
    for path in found:
        try:
            return path, load_file(path, map_location)
        except SnapshotError as e:
            errors.append(str(e))
    raise SnapshotError(
        f"no loadable snapshot matching {pattern!r} in {folder}"
        + (" (files of other ranks are there: pass rank=)" if others and any(
            others in p.name for p in folder.glob(pattern)) else "")
        + (f" ({len(errors)} refused: {errors[0]})" if errors else "")
    )
