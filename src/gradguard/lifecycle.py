"""A guard that is never closed still delivers its log.

Rows reach the sinks in batches (every ``flush_every`` steps), so a script that ends
without ``guard.close()`` (or ``with gg.Guard(...) as guard:``) would lose the last batch.
Two safety nets:

- at interpreter exit, every guard still open is closed (rows in flight processed, sinks
  flushed and closed), by one ``atexit`` handler;
- a guard garbage-collected without ``close()`` flushes and closes its sinks and removes
  its optimizer hooks (``weakref.finalize``; it holds no reference to the guard).
"""

from __future__ import annotations

import atexit
import logging
import sys
import weakref
from typing import Any

__all__ = ["register"]

log = logging.getLogger("gradguard")
_open: weakref.WeakSet[Any] = weakref.WeakSet()


def register(guard: Any, recorder: Any, *hooks: Any) -> weakref.finalize:
    """Watch ``guard`` until it is closed; returns the finalizer ``close()`` detaches.

    Args:
        guard: the guard (only weakly referenced).
        recorder: flushed and closed if the guard is collected unclosed.
        hooks: objects whose ``remove()`` takes the guard's hooks off the model/optimizer.
    """
    _open.add(guard)
    fin = weakref.finalize(guard, _release, recorder, hooks)
    fin.atexit = False  # at exit _close_open_guards closes the whole guard instead
    return fin


def finish(guard: Any) -> None:
    """:meth:`gradguard.Guard.close`: process the rows still in flight, write the run's
    verdict, free the snapshot dir, close the sinks."""
    if guard._closed:
        return
    unregister(guard, guard._finalizer)  # takes the optimizer/model hooks off
    try:
        guard._host.drain()
        if guard._started:
            guard.recorder.event(guard.steps, "verdict", guard.verdict(), action="info")
    finally:
        if guard.store is not None:
            guard.store.release()  # (its snapshot dir is free for another guard)
        try:
            guard.recorder.close()
        finally:
            guard._closed = True  # (a sink that failed to close: the guard is closed)


def unregister(guard: Any, fin: weakref.finalize) -> None:
    """The guard is closing: take off the hooks given to :func:`register` and stop
    watching it (its recorder is the guard's to close)."""
    detached = fin.detach()  # (guard, _release, (recorder, hooks), {}) while alive
    if detached is not None:
        _recorder, hooks = detached[2]
        for h in hooks:
            h.remove()
    _open.discard(guard)


def close(guard: Any, exc: BaseException | None) -> None:
    """Close ``guard``; ``exc``: the exception that ended the run, if one did, which the
    verdict then names (a crashed run is not a "stable" one)."""
    if exc is not None and not guard._closed:
        guard._host.stopped(exc)
    guard.close()


def _release(recorder: Any, hooks: tuple[Any, ...]) -> None:
    for h in hooks:
        h.remove()
    try:
        recorder.close()
    except Exception:  # a sink failing at collection must not raise into unrelated code
        log.exception("gradguard: closing the sinks of a collected guard failed")


@atexit.register
def _close_open_guards() -> None:
    # (An uncaught exception that ends a script is sys.last_value by now; in an interactive
    # session it may be any earlier error, long handled.)
    interactive = hasattr(sys, "ps1") or sys.flags.interactive or "ipykernel" in sys.modules
    exc = None if interactive else getattr(sys, "last_value", None)
    for guard in list(_open):
        try:
            close(guard, exc)
        except Exception:
            log.exception("gradguard: closing an open guard at exit failed")
