"""Misuse the guard can see for itself, and says so instead of training on wrong numbers.

- **Outside steps.** ``guard.step`` steps the optimizer; an ``optimizer.step()`` (or a
  ``scaler.step(optimizer)``) left in the loop would apply every update twice, and apply
  the ones the guard skipped. A step pre-hook (``Optimizer.register_step_pre_hook``)
  refuses every step of the guarded optimizer that the guard did not start.
- **A GradScaler the guard was not given.** Under fp16 autocast the loss is scaled
  (``scaler.scale(loss).backward()``); a guard without ``scaler=`` then measures, clips
  and steps gradients 2^16 times too large. The first forward pass tells whether fp16
  autocast is on; with no scaler given, the first ``guard.step`` warns once.
- **Optimizers it cannot own.** LBFGS re-evaluates its closure several times per step
  (line search): there is no single gradient to measure, clip or skip. SparseAdam needs
  sparse gradients, which the guard does not measure. Both are refused at construction.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, GuardUsageError, GuardUsageWarning, check_int
from .params import hook_weighted_modules
from .stats import GradGroups, collect_grads

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["Usage", "after_step_hooks", "begin_step", "check_args", "check_fresh_grads",
           "check_optimizer", "run_closure", "unscale_once"]

OUTSIDE_STEP = (
    "optimizer.step() was called outside guard.step() (scaler.step(optimizer) calls it "
    "too): the guard already steps this optimizer, so the update would be applied twice, "
    "and steps the guard skipped would be applied anyway. Remove optimizer.step(); "
    "guard.step(loss) steps for you. With a GradScaler, pass Guard(..., scaler=scaler) and "
    "remove scaler.step(optimizer) and scaler.update() as well."
)

NO_SCALER = (
    "the model ran under fp16 autocast but the guard has no GradScaler. If you scale the "
    "loss (scaler.scale(loss).backward()), pass it: Guard(model, optimizer, scaler=scaler); "
    "otherwise the guard measures, clips and steps gradients multiplied by the loss scale. "
    "If you do not scale the loss, fp16 gradients underflow: use a GradScaler, or "
    "autocast to bfloat16."
)

# Optimizers the guard steps while a guard.step is in progress (by id): any guard of the
# optimizer may step it, so a guard that was dropped without close() cannot block a new one.
_stepping: set[int] = set()


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose ``step`` requires a closure (LBFGS)."""
    if isinstance(optimizer, torch.optim.LBFGS):
        return True
    try:
        p = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):  # a C extension or an odd wrapper: assume not
        return False
    return p is not None and p.default is inspect.Parameter.empty


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers the guard cannot own the step of, naming why and what to do."""
    if needs_closure(optimizer):
        raise ConfigError(
            f"{type(optimizer).__name__} needs a closure that it re-evaluates several times "
            "per step (a line search), so there is no single gradient the guard could "
            "measure, clip or skip. Use a first-order optimizer with the guard (SGD, Adam, "
            "AdamW, ...; see the README's optimizer table), or run "
            f"{type(optimizer).__name__} without a guard."
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise ConfigError(
            "SparseAdam steps sparse gradients (nn.Embedding(sparse=True)); the guard "
            "measures and clips dense gradients only. Use dense gradients with Adam or "
            "AdamW, or run SparseAdam without a guard."
        )


class Usage:
    """The guard's watch over how it is used: outside steps and a forgotten GradScaler.

    Args:
        model: watched for fp16 autocast in its first forward pass (None: not watched).
        optimizer: every step of it outside :meth:`stepping` raises
            :class:`~gradguard.GuardUsageError`.
        has_scaler: the guard was given a GradScaler (then nothing is watched for fp16).
        device: the parameters' device (its type names the autocast to look at).
    """

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer,
                 has_scaler: bool, device: torch.device) -> None:
        self.optimizer = optimizer
        self.device_type = device.type
        # Set by integrations whose framework unscales and updates its own GradScaler.
        self.scaler_elsewhere = False
        self.fp16_forward = False
        self._fwd_hooks: list[Any] = []
        if model is not None and not has_scaler:  # (removed at the first guard.step)
            self._fwd_hooks = hook_weighted_modules(model, self._see_forward)
        hooks = getattr(optimizer, "_optimizer_step_pre_hooks", {}).values()
        if any(h is _refuse_outside_steps for h in hooks):
            warnings.warn(
                "this optimizer already has an open guard: two guards on one optimizer "
                "both step, snapshot and roll it back. Close the old one (guard.close(), or "
                "build it in a `with` block) before building another", GuardUsageWarning,
                stacklevel=4)
        self._step_hook = optimizer.register_step_pre_hook(_refuse_outside_steps)

    def _see_forward(self, _module: nn.Module, _args: Any) -> None:
        if self.fp16_forward:
            return
        dt = self.device_type
        if torch.is_autocast_enabled(dt) and torch.get_autocast_dtype(dt) == torch.float16:
            self.fp16_forward = True

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """The guard's own optimizer step: let it through."""
        key = id(self.optimizer)
        nested = key in _stepping
        _stepping.add(key)
        try:
            yield
        finally:
            if not nested:
                _stepping.discard(key)

    def first_step(self) -> None:
        """Called by the first ``guard.step``: warn about a forgotten GradScaler."""
        self._remove_forward_hooks()
        if self.fp16_forward and not self.scaler_elsewhere:
            warnings.warn(NO_SCALER, GuardUsageWarning, stacklevel=3)

    def remove(self) -> None:
        """Remove the hooks (the guard is closed or gone)."""
        self._step_hook.remove()
        self._remove_forward_hooks()

    def _remove_forward_hooks(self) -> None:
        for h in self._fwd_hooks:
            h.remove()
        self._fwd_hooks = []


def _refuse_outside_steps(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
    if id(optimizer) not in _stepping and not _initialising(optimizer):
        raise GuardUsageError(OUTSIDE_STEP)


def _initialising(optimizer: torch.optim.Optimizer) -> bool:
    """torch.distributed.checkpoint's ``get_state_dict``/``set_state_dict`` creating the
    state to load into: a step of an optimizer without state, at LR 0, on gradients it set
    to zeros (it moves no weight, and the checkpoint is loaded over it). A user's own step
    at LR 0 (a warm-up's first) has real gradients and is still refused. (Reads the
    gradients on the host: only on this refused path, never in guard.step.)"""
    if optimizer.state:
        return False
    for g in optimizer.param_groups:
        lr = g.get("lr")
        if isinstance(lr, torch.Tensor):
            lr = float(lr) if lr.numel() == 1 else None
        if not isinstance(lr, int | float) or isinstance(lr, bool) or lr != 0:
            return False
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    return bool(grads) and all(gr is not None and not bool(gr.any()) for gr in grads)


def after_step_hooks(after_step: Any) -> tuple[Callable[[], object], ...]:
    """The ``Guard(after_step=...)`` argument as a tuple of callables."""
    hooks = (tuple(after_step) if isinstance(after_step, Sequence)
             else () if after_step is None else (after_step,))
    if not all(callable(h) for h in hooks):
        raise ConfigError(f"after_step takes a callable or a list of them, got {after_step!r}")
    return hooks


def check_fresh_grads(grads: Sequence[Tensor]) -> None:
    # A gradient the guard already stepped carries the version it had then; backward()
    # either makes a new tensor or bumps the version by accumulating into it.
    if all(getattr(g, "_gradguard_version", None) == g._version for g in grads):
        raise GuardUsageError(
            "guard.step() was called twice on the same gradients: call loss.backward() "
            "(and optimizer.zero_grad()) between steps"
        )


def unscale_once(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Unscale AMP gradients once, before anything measures them."""
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


def run_closure(loss: Tensor | None, closure: Callable[[], Tensor]) -> Tensor:
    """Call torch's step closure once (grad enabled) and return its loss."""
    if loss is not None:
        raise GuardUsageError("guard.step() takes the loss or a closure, not both: the "
                              "closure computes the loss and calls backward() itself")
    if not callable(closure):
        raise GuardUsageError(f"closure must be callable, got {type(closure).__name__}")
    with torch.enable_grad():
        return closure()


def check_args(model: Any, optimizer: Any, **positive_ints: int) -> None:
    """The ``Guard`` constructor's own arguments: types, the optimizer, counts >= 1."""
    if isinstance(optimizer, (list, tuple)) and optimizer and all(
            isinstance(o, torch.optim.Optimizer) for o in optimizer):
        # (a GAN's, or one optimizer per part of a model: each needs its own judge)
        raise ConfigError(
            f"optimizer is a {type(optimizer).__name__} of {len(optimizer)} optimizers; a "
            "Guard steps one optimizer: build one guard per optimizer, each with params= "
            "naming what its optimizer updates (params=[p for g in opt.param_groups for p "
            "in g['params']]), or put the parameter groups into one optimizer")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if type(optimizer).__name__ == "AcceleratedOptimizer":
        # (a torch Optimizer by class, but a wrapper: the step to guard is the inner one's)
        raise ConfigError("optimizer is accelerate's AcceleratedOptimizer wrapper: pass the "
                          "optimizer inside it, gg.Guard(model, optimizer.optimizer, "
                          "scaler=accelerator.scaler), and call guard.step instead of "
                          "optimizer.step()")
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module or None, got {type(model).__name__}")
    check_optimizer(optimizer)
    for name, v in positive_ints.items():
        check_int(name, v, 1)


_SINK_METHODS = ("meta", "steps", "event", "close")  # (gradguard.record.Sink's)


def check_outputs(log: Any, tensorboard: Any, sinks: Any, scaler: Any = None) -> list[Any]:
    """The ``Guard``'s log paths, sinks and scaler, before any file is opened; returns the
    sinks as a list."""
    for name, v in (("log", log), ("tensorboard", tensorboard)):
        if v is not None and not isinstance(v, str | os.PathLike):
            raise ConfigError(f"{name}= takes a file path (str or os.PathLike) or None, got "
                              f"{v!r}")
        if v is not None and os.fspath(v) == "":
            raise ConfigError(f"{name}= is empty: give a path, or None for no {name}")
    if log is not None and os.path.isdir(log):
        raise ConfigError(f"log={os.fspath(log)!r} is a folder: give the file to write, "
                          f"e.g. log={os.path.join(os.fspath(log), 'run.jsonl')!r}")
    if scaler is not None and (isinstance(scaler, type) or not all(
            callable(getattr(scaler, m, None)) for m in ("is_enabled", "unscale_", "update"))):
        what = "the class" if isinstance(scaler, type) else "a " + type(scaler).__name__
        raise ConfigError(f"scaler= takes the torch.amp.GradScaler instance your loop uses, "
                          f"got {what}: scaler = torch.amp.GradScaler(); "
                          "gg.Guard(..., scaler=scaler)")
    if all(callable(getattr(sinks, m, None)) for m in _SINK_METHODS):
        raise ConfigError(f"sinks= takes a list of sinks, got one: sinks=[{sinks!r}]")
    try:
        sinks = list(sinks)
    except TypeError:
        raise ConfigError(f"sinks= takes a list of sinks, got {sinks!r}") from None
    for i, sink in enumerate(sinks):
        lacks = [m for m in _SINK_METHODS if not callable(getattr(sink, m, None))]
        if lacks or isinstance(sink, type):
            what = "a class, not an instance" if isinstance(sink, type) else \
                f"it lacks {', '.join(lacks)}"
            raise ConfigError(f"sinks[{i}] is not a sink ({what}): a sink is an object with "
                              f"meta, steps, event and close methods (see gradguard.record.Sink), "
                              f"got {sink!r}")
    return sinks


def check_open(g: Guard) -> None:
    """Refuse to use a closed guard (``step``, ``track``, ``data_changed``)."""
    if g._closed:
        raise GuardUsageError("this guard was closed; build a new one to keep training")


def begin_step(g: Guard, loss: Tensor | None, closure: Callable[[], Tensor] | None,
               batch: Any = None) -> tuple[GradGroups, Tensor | None]:
    """What ``guard.step`` checks and prepares before its device half: the closure run,
    AMP gradients unscaled, the gradients collected; misuse refused before anything is
    measured or stepped."""
    check_open(g)
    if closure is not None:
        loss = run_closure(loss, closure)
    if loss is not None and not isinstance(loss, Tensor):
        raise GuardUsageError(
            f"guard.step(loss) takes the loss tensor, got {type(loss).__name__}; pass "
            "the tensor you called backward() on (no .item())"
        )
    if loss is not None:
        loss = _as_loss(g.optimizer, loss)
    if g.scaler is not None and g.scaler.is_enabled():
        unscale_once(g.scaler, g.optimizer)
    groups = collect_grads(g.params)
    if not groups.grads:
        raise GuardUsageError(
            "no guarded parameter has a gradient: call loss.backward() before "
            "guard.step(), and check the loss depends on the model's parameters"
        )
    check_fresh_grads(groups.grads)
    if batch is not None:
        g._inputs.check_batch(batch, g.device)
    return groups, loss


def _as_loss(optimizer: torch.optim.Optimizer, value: Tensor) -> Tensor:
    """The value the guard's loss checks read: lower is better. Under torch's
    ``maximize=True`` the optimizer climbs what was passed, so the checks read it negated
    (a rising objective is progress, not a blow-up)."""
    ways = {bool(group.get("maximize", False)) for group in optimizer.param_groups}
    if ways == {False}:
        return value
    if ways == {True}:
        return -value.detach()
    raise GuardUsageError(
        "the optimizer maximizes some parameter groups (maximize=True) and minimizes "
        "others, so one value cannot be read as a loss either way: call guard.step() "
        "without it (the gradient checks still run), or use one optimizer per direction")
