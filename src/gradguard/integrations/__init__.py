"""Framework integrations: a Guard inside PyTorch Lightning and the Hugging Face Trainer.

Both frameworks call ``optimizer.step()`` themselves. The integrations let the guard own
the step instead: the guard steps (or skips) in the framework's pre-step hook, and
:class:`StepGate` turns the framework's own ``step()`` call that follows into a no-op, so
an update is never applied twice and a skipped one never slips through.

Submodules import their framework lazily; importing this package needs only torch::

    from gradguard.integrations.lightning import GradGuardCallback      # lightning
    from gradguard.integrations.transformers import GradGuardCallback   # transformers
    from gradguard.integrations.sinks import MLflowSink, WandbSink      # optional sinks
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError, GuardUsageError

__all__ = ["StepGate", "watched_part"]

WatchBatch = bool | Callable[[Any], Any]


def check_watch(watch: Any) -> WatchBatch:
    """A callback's ``watch_batch=``: True, False or a callable (refused otherwise)."""
    if not (isinstance(watch, bool) or callable(watch)):
        raise ConfigError(f"watch_batch must be True, False or a function of the batch that "
                          f"returns what to watch, got {watch!r}")
    return watch


def watched_part(watch: WatchBatch, batch: Any) -> Any:
    """What of ``batch`` the guard watches for NaN/Inf: all of it (True), nothing (False),
    or what ``watch(batch)`` returns (e.g. the inputs alone, when the targets hold NaN on
    purpose for the loss to mask)."""
    if watch is True:
        return batch
    return watch(batch) if callable(watch) else None


class StepGate:
    """Makes ``optimizer.step`` a no-op for everyone but the guard, until :meth:`remove`.

    The framework calls the gated ``step(closure)`` as usual: the closure (forward,
    backward and the framework's pre-step hook, where the guard stepped) still runs, and
    the update is not applied a second time. Calls made while :attr:`passthrough` is
    set (the guard stepping this same optimizer) reach the real ``step``.

    Args:
        optimizer: the object whose ``step`` the framework calls.
        framework: named in the error raised when the pre-step hook never ran.
    """

    def __init__(self, optimizer: Any, framework: str) -> None:
        self.optimizer = optimizer
        self.framework = framework
        self.passthrough = False
        self.handled = False
        self._removed = False
        self._own = optimizer.__dict__.get("step")  # e.g. an LR scheduler's wrapper
        inner: Callable[..., Any] = optimizer.step
        gate = self

        def step(opt: Any, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            if gate.passthrough:
                return inner(closure, **kwargs) if closure is not None else inner(**kwargs)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not gate.handled:
                raise GuardUsageError(
                    f"{framework} called optimizer.step() but the gradguard callback's pre-step "
                    "hook did not run for this step, so nothing was applied; is the callback "
                    "attached to the trainer that owns this optimizer?"
                )
            gate.handled = False
            # torch's LR schedulers warn when they see no optimizer.step(); one happened.
            opt._opt_called = True
            return loss

        if hasattr(inner, "_wrapped_by_lr_sched"):
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer.step = types.MethodType(step, optimizer)

    def remove(self) -> None:
        """Give the optimizer its own ``step`` back."""
        if self._removed:
            return
        self._removed = True
        if self._own is not None:
            self.optimizer.step = self._own
        else:
            del self.optimizer.step
