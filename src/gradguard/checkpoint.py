"""The guard's ``state_dict``: the dict of its parts' states, versioned, for checkpoints.

Everything a resumed run needs to decide exactly as the uninterrupted one would: the
trajectory (clip statistics, detector windows, the skip decision, the controller's recent
losses), the controller's memory, the LR factor, the rollback store (snapshots optional),
the layer attribution and the host-side streaks. ``load`` refuses a state saved with other
settings unless asked to load the parts those settings leave valid.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import logging
import re
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from . import snapshot as snap
from .control import Stability
from .errors import ConfigError, config_diff
from .respond import Policy, Rollback

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["STATE_VERSION", "load", "load_trajectory", "save", "trajectory", "with_defaults"]

log = logging.getLogger("gradguard")
STATE_VERSION = 5


# Where snapshots are kept, not what the guard decides: a resumed run may move them.
_PLACEMENT = {"dir": None, "disk_every": None, "memory": "auto", "device_fraction": 0.1,
              "host_fraction": 0.25}


def config(g: Guard) -> dict[str, Any]:
    """The settings a saved state must match: the clip, the policy (less where snapshots
    are kept), and the watched parameters' names and shapes."""
    policy = g.policy.describe()
    policy["rollback"] = _decisions(policy["rollback"])
    prefix = _wrapper_prefix(g.model)
    return {"clip": repr(g.clip), "n_params": len(g.params), "policy": policy,
            "shapes": {n.removeprefix(prefix): "×".join(map(str, p.shape))
                       for n, p in zip(g.names, g.params, strict=True)}}


def _unwrapped(saved: Any, mine: dict[str, str]) -> Any:
    """``saved``'s shapes with a wrapper prefix taken off when that makes them this guard's
    (a state saved behind DDP or torch.compile before the prefixes were left out)."""
    if not isinstance(saved, dict) or saved == mine:
        return saved
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        if saved and all(k.startswith(prefix) for k in saved):
            bare = {k.removeprefix(prefix): v for k, v in saved.items()}
            if bare == mine:
                return bare
    return saved


def _wrapper_prefix(model: Any) -> str:
    """The name prefix that wrappers put before the model's own parameter names: DDP's
    ``module.``, ``torch.compile``'s ``_orig_mod.``. A state saved under one loads into
    the same model without it (a DDP run resumed on one process)."""
    prefix = ""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            prefix, model = prefix + "module.", model.module
        elif isinstance(model, torch.nn.Module) and isinstance(
                getattr(model, "_orig_mod", None), torch.nn.Module):
            prefix, model = prefix + "_orig_mod.", model._orig_mod
        else:
            return prefix


def _decisions(text: Any) -> Any:
    """A ``Rollback`` repr with its placement fields (:data:`_PLACEMENT`) at their
    defaults; anything else unchanged."""
    parsed = _fields(text, Rollback)
    if parsed is None:
        return text
    try:
        return repr(Rollback(**{**parsed, **_PLACEMENT}))
    except (ConfigError, TypeError, ValueError):
        return text


def trajectory(g: Guard) -> dict[str, Any]:
    """The guard state that describes the current weights (rolled back with them)."""
    out = {"clip": g.clip.state_dict(), "grad_spike": g.grad_spike.state_dict(),
           "loss_spike": g.loss_spike.state_dict(), "decision": g.decision.state_dict()}
    if g.control is not None:
        out["control"] = g.control.trajectory()
    return out


def load_trajectory(g: Guard, s: dict[str, Any]) -> None:
    g.clip.load_state_dict(snap.clone_tree(s["clip"]))
    g.grad_spike.load_state_dict(s["grad_spike"])
    g.loss_spike.load_state_dict(s["loss_spike"])
    g.decision.load_state_dict(s["decision"])
    if g.control is not None and "control" in s:
        g.control.load_trajectory(s["control"])


def save(g: Guard, snapshots: bool = False, drain: bool = True) -> dict[str, Any]:
    """See :meth:`gradguard.Guard.state_dict`; without ``drain``, the state as the rows
    that reached the host so far left it (a disk snapshot's: no host sync, and no
    decision taken in the middle of taking it; on CUDA the last two rows are not in it)."""
    if drain:
        g._host.drain()
    h = g._host
    return {
        "format": STATE_VERSION, "gradguard": __version__, "config": config(g),
        "steps": g.steps, "skipped": g.skipped.detach().clone(),
        "rollbacks": h.rollbacks,
        "controller": None if g.control is None else g.control.state_dict(),
        "lr": g.lr.state_dict(),
        "rollback": None if g.store is None else g.store.state_dict(snapshots),
        "attribution": {k: torch.as_tensor(v) for k, v in h.attribution.state_dict().items()},
        "host": h.state_dict(),
        "events": g.recorder.tally(),
        **trajectory(g),
    }


_REQUIRED = {"config", "steps", "skipped", "rollbacks", "controller", "lr", "rollback",
             "attribution", "host", "clip", "grad_spike", "loss_spike", "decision"}


def load(g: Guard, state: dict[str, Any], strict: bool = True) -> list[str]:
    """See :meth:`gradguard.Guard.load_state_dict`."""
    if not isinstance(state, dict) or "format" not in state:
        raise ConfigError("not a gradguard state dict (no 'format' key)")
    if state["format"] != STATE_VERSION:
        raise ConfigError(
            f"guard state format {state['format']} (gradguard {state.get('gradguard')}) "
            f"cannot be read by format {STATE_VERSION} (gradguard {__version__}); resume "
            "with the gradguard version that saved it, or leave the guard state out (the "
            "guard relearns its statistics within its warm-up)"
        )
    missing = sorted(_REQUIRED - set(state))
    if missing:
        raise ConfigError(f"guard state lacks {missing}: pass what Guard.state_dict() "
                          "returned, whole")
    saved = state["config"]
    if isinstance(saved.get("policy"), dict):
        # A policy setting added since the state was saved is read as its default (the
        # saving guard had no such switch: clip_recurrent changes nothing on a model
        # without recurrent layers).
        saved = {**saved, "policy": {**Policy().describe(), **saved["policy"]}}
        # Likewise a Stability or Rollback setting added since (Stability.norm_streaks).
        for key, cls in (("stability", Stability), ("rollback", Rollback)):
            saved["policy"][key] = with_defaults(saved["policy"][key], cls)
        saved["policy"]["rollback"] = _decisions(saved["policy"]["rollback"])
    mine = config(g)
    # (saved before the shapes were: the count is all there is)
    shapes = saved["shapes"] if "shapes" in saved else mine["shapes"]
    saved = {**saved, "shapes": _unwrapped(shapes, mine["shapes"])}
    diff = config_diff(saved, mine)
    # The detectors' own settings (a window's length) are theirs to check: tried on
    # copies, so that a state that does not fit is a difference like the others, found
    # before anything is loaded.
    for name in ("grad_spike", "loss_spike"):
        try:
            trial = copy.deepcopy(getattr(g, name))
        except Exception:  # (a user's detector that cannot be copied: it checks as it loads)
            continue
        try:
            trial.load_state_dict(state[name])
        except ConfigError as e:
            diff.append(f"{name}: {e}")
    if diff and strict:
        raise ConfigError(
            "guard state was saved with other settings (saved → this guard):\n  "
            + "\n  ".join(diff) + "\nbuild the guard with the same clip settings, policy "
            "(its detectors too) and parameters, or load_state_dict(state, strict=False) "
            "to load only the parts those settings leave valid"
        )
    # A state whose settings fit can still be damaged (a part edited or cut short): its
    # parts are read one after another, so the guard is put back as it was when one of
    # them fails, rather than left half-loaded (its counters from one run, its
    # detectors from another).
    undo = _undo_point(g)
    try:
        skipped = _apply(g, state, saved, diff)
    except Exception as e:
        try:
            _undo(g, undo)
        except Exception as again:  # (a user's detector that cannot take its own state)
            raise ConfigError(
                f"guard state is damaged ({type(e).__name__}: {e}), and putting the guard "
                f"back failed too ({type(again).__name__}: {again}): build a fresh guard"
            ) from e
        if isinstance(e, ConfigError):
            raise ConfigError(f"{e} (nothing was loaded)") from e
        raise ConfigError(
            f"guard state is damaged ({type(e).__name__}: {e}); nothing was loaded: pass "
            "what Guard.state_dict() returned, whole and unedited") from e
    if skipped:
        log.warning("gradguard: guard state loaded without %s (settings differ: %s)",
                    ", ".join(skipped), "; ".join(diff))
    return skipped


def _undo_point(g: Guard) -> tuple[Any, ...]:
    """What :func:`_undo` needs to put the guard back: its own state as the rows that
    reached the host so far left it (no drain: the rows still in flight stay there); the
    in-memory snapshots by reference, with their guard parts' entries (a non-strict load
    rewrites those in place, see _refresh_snapshots); the carried event counts; and the
    host's one-way switches (a load turns the data watch on, never off)."""
    store = g.store
    kept = None if store is None else (
        [(s, dict(s.guard)) for s in store.good], store.left, store.resumed)
    h = g._host
    return (snap.clone_tree(save(g, drain=False)), kept, copy.deepcopy(g.recorder.carried),
            (h.inputs.armed, h.warned_thaw))


def _undo(g: Guard, undo: tuple[Any, ...]) -> None:
    state, kept, carried, (armed, warned_thaw) = undo
    _apply(g, state, state["config"], [])
    if kept is not None and g.store is not None:
        g.store.good.clear()
        for s, guard_parts in kept[0]:
            s.guard.clear()
            s.guard.update(guard_parts)
            g.store.good.append(s)
        g.store.left, g.store.resumed = kept[1], kept[2]
    g.recorder.carried = carried
    g._host.inputs.armed, g._host.warned_thaw = armed, warned_thaw


def _apply(g: Guard, state: dict[str, Any], saved: dict[str, Any], diff: list[str]
           ) -> list[str]:
    """Load ``state``'s parts into ``g`` (``diff``: the settings that differ, whose parts
    stay fresh); returns the parts not loaded."""
    skipped = _load_parts(g, state, saved) if diff else []
    if not diff:
        load_trajectory(g, state)
    h = g._host
    if "events" in state:  # (absent before it existed)
        g.recorder.carry(state["events"])
    g.steps = int(state["steps"])
    g.skipped.copy_(state["skipped"])
    h.rollbacks = int(state["rollbacks"])
    h.load_state_dict(state["host"])
    warmup = g.lr.warmup
    g.lr.load_state_dict(state["lr"])
    if "controller" in skipped and g.lr.warmup != warmup:
        # Other stability settings: the warm-up is this guard's (its step count goes on).
        g.lr.warmup = warmup
        skipped.append("warmup")
    if g.control is not None and "controller" in skipped:
        # A fresh controller would set the LR scale back to ×1 at the next row: the cuts
        # the saved run found it needed stand (its probe raises them after calm, as ever).
        g.control.scale = g.lr.scale
    if g.store is not None and state["rollback"] is not None:
        g.store.load_state_dict(state["rollback"])
        _refresh_snapshots(g, skipped)
    if g.control is not None and state["controller"] is not None \
            and "controller" not in skipped:
        g.control.load_state_dict(state["controller"])
    if "attribution" not in skipped:
        a = state["attribution"]
        h.attribution.load_state_dict({"mean": a["mean"].numpy(), "var": a["var"].numpy(),
                                       "count": int(a["count"])})
    return skipped


# The parts of a snapshot's trajectory that each part a non-strict load leaves fresh holds.
_TRAJECTORY_PARTS = {"clip": ("clip",), "grad_spike": ("grad_spike",),
                     "loss_spike": ("loss_spike",), "decision": ("decision",),
                     "controller": ("control",)}


def _refresh_snapshots(g: Guard, skipped: list[str]) -> None:
    """Give the loaded snapshots this guard's fresh state for the parts a non-strict load
    left fresh: theirs was saved by other settings, and a rollback restoring it would fail
    (or load settings this guard does not have) in the middle of a run."""
    keys = [k for part in skipped for k in _TRAJECTORY_PARTS.get(part, ())]
    if not keys or g.store is None:
        return
    now = trajectory(g)
    for s in g.store.good:
        for k in keys:
            if k in now:
                s.guard[k] = snap.clone_tree(now[k])
            else:
                s.guard.pop(k, None)


def with_defaults(text: Any, cls: type) -> Any:
    """A settings dataclass's saved ``repr`` with the fields it lacks (added to ``cls``
    since it was saved) filled in as their defaults, in the form ``repr`` gives now.

    Anything else comes back unchanged, for the settings check to report: text that is not
    ``cls(...)`` with literal values, a field ``cls`` does not have (a newer gradguard
    saved it), or values ``cls`` refuses.
    """
    values = _fields(text, cls)
    if values is None:
        return text
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    if not set(values) <= names or set(values) == names:
        return text
    try:
        return repr(cls(**values))
    except (ConfigError, TypeError, ValueError):
        return text


def _fields(text: Any, cls: type) -> dict[str, Any] | None:
    """The keyword values of ``text`` when it reads ``cls(...)`` with literal values."""
    if not isinstance(text, str):
        return None
    # (A state saved before Rollback took its dir as a str: PosixPath('…') is no literal.)
    text = re.sub(r"\b(?:Pure)?(?:Posix|Windows)?Path\(('[^']*'|\"[^\"]*\")\)", r"\1", text)
    try:
        node = ast.parse(text, mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == cls.__name__ and not node.args):
            return None
        if any(k.arg is None for k in node.keywords):  # (a **mapping: not literal)
            return None
        return {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    except (SyntaxError, ValueError, TypeError):
        return None


def _load_parts(g: Guard, state: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Non-strict load: each part whose settings (``saved``, with settings added since
    read as their defaults) or tensor shapes match; the rest is named in the returned
    list."""
    mine = config(g)

    def same(*keys: str) -> bool:
        return all(saved.get(k) == mine.get(k) for k in keys)

    def fits(obj: Any, st: dict[str, Any]) -> bool:
        cur = getattr(obj, "state", {})
        return set(st) == set(cur) and all(tuple(v.shape) == tuple(cur[k].shape)
                                           for k, v in st.items())

    skipped: list[str] = []
    if same("clip", "n_params", "shapes"):
        g.clip.load_state_dict(snap.clone_tree(state["clip"]))
    else:
        skipped.append("clip")
    for name in ("grad_spike", "loss_spike"):
        try:  # a detector checks its state before taking any of it
            getattr(g, name).load_state_dict(state[name])
        except ConfigError:
            skipped.append(name)
    if same("policy") and fits(g.decision, state["decision"]):
        g.decision.load_state_dict(state["decision"])
    else:
        skipped += ["decision", "controller"]
    if not same("n_params", "shapes"):
        skipped.append("attribution")
    return skipped
