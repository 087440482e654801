"""PyTorch Lightning: a :class:`~gradguard.Guard` in charge of every optimizer step.

Lightning runs ``optimizer.step(closure)`` itself; the closure does forward and backward,
then calls the ``on_before_optimizer_step`` hooks, then Lightning's own clipping, and only
then does the optimizer update. The callback does its work in that hook:
``guard.step(loss)`` measures, clips, detects and applies or skips the update there, and
a :class:`~gradguard.integrations.StepGate` makes the update that would follow a no-op.
So skipping needs no change to Lightning's loop, works the same under automatic and
manual optimization, and a skipped step leaves parameters and optimizer moments untouched.

- ``Trainer(gradient_clip_val=...)`` and a ``configure_gradient_clipping`` override are
  refused: they would clip after the guard's step. Clip with the guard (``clip=``).
- Gradient accumulation: the hook runs once per optimizer step, on the accumulated
  gradient; the loss the guard checks is the sum of the (already divided) losses Lightning
  back-propagated since the last step, i.e. the mean loss of the accumulation window.
- Each batch (every micro-batch of an accumulation window) is watched for NaN/Inf,
  targets included (``watch_batch=``): such a batch is the data's fault, skipped without
  touching the LR.
- AMP: bf16 needs nothing. With fp16 the gradients are unscaled before the guard measures
  them (Lightning's plugin does it, or the callback when the optimizer is fused), and
  Lightning's ``GradScaler`` keeps calling ``scaler.update()`` once per step.
- Lightning's ``global_step`` and LR schedulers advance on skipped steps, as they do when
  ``GradScaler`` skips one; a rollback also restores the schedulers.
- Works with either package name, ``lightning`` or ``pytorch_lightning``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor

from .. import lifecycle
from ..errors import ConfigError, check_bool
from ..guard import Guard, StepInfo, check_guard_kwargs
from ..stats import loss_value
from . import StepGate, WatchBatch, check_watch, watched_part

__all__ = ["GradGuardCallback"]

STATE_KEY = "gradguard"  # the guard's entry in a Lightning checkpoint dict


def _callback_bases() -> tuple[type, ...]:
    """Callback classes of every installed Lightning package, so either Trainer accepts us."""
    bases: list[type] = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(name).Callback)
        except ImportError:
            continue
    if not bases:
        raise ModuleNotFoundError(
            "gradguard.integrations.lightning needs PyTorch Lightning: "
            "pip install 'gradguard[lightning]' (or lightning / pytorch-lightning)"
        )
    return tuple(bases)


def _overrides(obj: Any, hook: str, base: str) -> bool:
    """True when ``obj``'s class (below Lightning's ``base`` class) defines ``hook``."""
    for cls in type(obj).__mro__:
        if cls.__name__ == base:
            return False
        if hook in cls.__dict__:
            return True
    return False


def _overrides_clipping(pl_module: Any) -> bool:
    """True when the user's LightningModule defines its own ``configure_gradient_clipping``."""
    return _overrides(pl_module, "configure_gradient_clipping", "LightningModule")


def _late_gradient_hooks(trainer: Any, pl_module: Any, callback: Any) -> list[str]:
    """Who else implements ``on_before_optimizer_step`` and runs after the guard has stepped:
    Lightning calls the callbacks in their order, then the module's hook."""
    late, after = [], False
    for cb in getattr(trainer, "callbacks", []):
        if cb is callback:
            after = True
        elif after and _overrides(cb, "on_before_optimizer_step", "Callback"):
            late.append(type(cb).__name__)
    if _overrides(pl_module, "on_before_optimizer_step", "LightningModule"):
        late.append(f"{type(pl_module).__name__} (the LightningModule)")
    return late


def _fitting(trainer: Any) -> bool:
    """True while the trainer runs ``fit`` (or when it cannot say)."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return fn is None or getattr(fn, "value", fn) == "fit"


def _planned_steps(trainer: Any) -> int | None:
    """The optimizer steps the fit plans to make (Lightning's own estimate, which
    schedulers such as OneCycleLR are sized by); None when unbounded or unknown."""
    try:
        n = trainer.estimated_stepping_batches
    except Exception:  # (Lightning refuses one when accumulation varies by epoch)
        return None
    return int(n) if isinstance(n, int | float) and math.isfinite(n) and n >= 1 else None


class GradGuardCallback(*_callback_bases()):  # type: ignore[misc]
    """Lightning callback that replaces the optimizer step with ``guard.step(loss)``.

    Example::

        trainer = L.Trainer(callbacks=[GradGuardCallback(log="runs/guard.jsonl")])
        trainer.fit(model, loader)

    Args:
        prefix: prefix of the metric names logged with ``pl_module.log``.
        log_metrics: log ``grad_norm``, ``clipped_norm``, ``skipped``, ``lr_scale`` and
            ``skipped_total`` every step, as device tensors (Lightning reads them only when
            it hands metrics to the logger, every ``log_every_n_steps``).
        watch_batch: watch each batch for NaN/Inf, targets included (True); only the first
            layer's inputs (False); or what a function of the batch returns (leave out a
            tensor that holds NaN or -inf on purpose, such as masked-out targets).
        strict: how ``fit(ckpt_path=...)`` loads the guard state the checkpoint holds
            (:meth:`gradguard.Guard.load_state_dict`): True refuses a state saved with
            other guard settings; False loads what those settings leave valid (change a
            setting mid-run, e.g. add a clip, and resume).

    A second ``fit()`` that goes on from where the last one ended (the same Trainer and
    module, e.g. after raising ``max_steps``: Lightning's ``global_step`` goes on) goes on
    with the guard's state too, as a resume from a checkpoint would: its statistics, LR
    scale and counts carry over (Lightning builds a new optimizer, so the guard is new).
    A fit from step 0, on another module, after a failed fit, or with a module whose
    parameters changed in between (layers unfrozen) starts a fresh guard.
        **guard_kwargs: passed to :class:`~gradguard.Guard` (``clip``, ``policy``,
            ``on_spike``, ``rollback``, ``log``, ``tensorboard``, ``sinks``, ...). Not
            ``scaler``: the callback uses the precision plugin's.
    """

    def __init__(self, *, prefix: str = "gradguard/", log_metrics: bool = True,
                 watch_batch: WatchBatch = True, strict: bool = True,
                 **guard_kwargs: Any) -> None:
        super().__init__()
        self.strict = check_bool("GradGuardCallback(strict=...)", strict)
        check_guard_kwargs("GradGuardCallback", guard_kwargs)
        self.guard_kwargs = guard_kwargs
        self.prefix = prefix
        self.log_metrics = log_metrics
        self.watch_batch = check_watch(watch_batch)
        self._batch_flag: Tensor | None = None  # this batch's, until its backward
        self.guard: Guard | None = None
        self._gate: StepGate | None = None
        self._scaler: torch.amp.GradScaler | None = None
        self._loss: Tensor | None = None
        self._pending_state: dict[str, Any] | None = None
        # The state the last fit ended with, for a fit that goes on from it: (the module,
        # Lightning's global_step then, the guard's state).
        self._ended: tuple[weakref.ref[Any], int, dict[str, Any]] | None = None

    # -- set-up and tear-down ----------------------------------------------------------
    @staticmethod
    def _check(trainer: Any, pl_module: Any) -> None:
        clip = trainer.gradient_clip_val
        if clip is not None and clip > 0:
            raise ConfigError(
                f"Trainer(gradient_clip_val={clip}) clips after the guard has already stepped; "
                "gradguard owns clipping: drop gradient_clip_val and pass "
                f"GradGuardCallback(clip=gg.clip.GlobalNorm({clip})) (or another transform)"
            )
        if _overrides_clipping(pl_module):
            raise ConfigError(
                f"{type(pl_module).__name__}.configure_gradient_clipping runs after the guard "
                "has stepped; remove it and pass the clipping to GradGuardCallback(clip=...)"
            )
        if type(trainer.strategy).__name__.startswith("DeepSpeed"):
            raise ConfigError("DeepSpeed runs its own optimizer step; GradGuardCallback cannot "
                              "skip it. Use DDP/FSDP or a single device.")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse a conflicting configuration before any training happens."""
        if stage == "fit":
            self._check(trainer, pl_module)
            late = _late_gradient_hooks(trainer, pl_module, self)
            if late:
                # (Not refused: most such hooks only log, e.g. Lightning's grad_norm.)
                warnings.warn(
                    f"on_before_optimizer_step of {', '.join(late)} runs after "
                    "GradGuardCallback has already stepped the optimizer: a gradient it "
                    "edits there changes nothing. Edit gradients in on_after_backward, or "
                    "as a clip transform (GradGuardCallback(clip=...)); a callback can "
                    "instead go before GradGuardCallback in the Trainer's callbacks",
                    stacklevel=2)
        else:
            # A validate/test/predict(ckpt_path=...) reads a checkpoint too: its guard
            # state is no later fit's to resume.
            self._pending_state = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the guard once optimizers, schedulers and any checkpoint are in place."""
        self._check(trainer, pl_module)
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ConfigError(
                f"GradGuardCallback guards one optimizer; configure_optimizers returned "
                f"{len(optimizers)}. With several (a GAN), use manual optimisation "
                "(self.automatic_optimization = False) and build a guard per optimizer in "
                "on_train_start, gg.Guard(self, opt, params=[p for g in opt.param_groups for p "
                "in g['params']]), calling guard.step() in place of opt.step(); Lightning's "
                "trainer.global_step counts only the steps of its own optimizer wrappers, so "
                "bound such a run by max_epochs or limit_train_batches, not max_steps")
        opt = optimizers[0]
        if isinstance(opt, torch.optim.LBFGS):
            raise ConfigError("LBFGS evaluates its closure several times per step; the guard "
                              "cannot own that step")
        self.guard = Guard(pl_module, opt, **self.guard_kwargs)
        if self.guard.total_steps is None:
            self.guard.total_steps = _planned_steps(trainer)
        for cfg in trainer.lr_scheduler_configs:
            self.guard.track(cfg.scheduler)  # rolled back with the model
        ended, self._ended = self._ended, None
        if self._pending_state is not None:
            self.guard.load_state_dict(self._pending_state, strict=self.strict)
            self._pending_state = None
        elif ended is not None and ended[0]() is pl_module \
                and trainer.global_step == ended[1] > 0:
            # The same run, going on: its guard state goes on with it. Other settings or
            # parameters (a layer unfrozen between the fits) make it a new phase, which a
            # fresh guard judges afresh (the check comes before anything is loaded).
            with contextlib.suppress(ConfigError):
                self.guard.load_state_dict(ended[2], strict=True)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self._scaler is not None:
            # Lightning's plugin owns the GradScaler: the callback unscales before the
            # guard measures and Lightning updates it, so no scaler= is missing.
            self.guard._usage.scaler_elsewhere = True
        self._loss = None
        self._gate = StepGate(opt, "Lightning")

    def _finish(self, exc: BaseException | None = None) -> None:
        if self._gate is not None:
            self._gate.remove()
            self._gate = None
        if self.guard is not None:
            # (stays readable: events, skipped, diagnosis(); an exception that ended the
            # run is named in its verdict, as a plain loop's `with gg.Guard(...)` does)
            lifecycle.close(self.guard, exc)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Close the guard (flushing its sinks) and restore the optimizer's ``step``."""
        if stage == "fit":
            # (after an error on_exception has closed the guard already: nothing goes on)
            if self.guard is not None and self._gate is not None:
                self._ended = (weakref.ref(pl_module), trainer.global_step,
                               self.guard.state_dict())
            self._finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Also close on errors (e.g. ``TrainingDivergedError``), so the run log is complete
        and its verdict says how the run ended."""
        self._ended = None  # (a failed fit is no run to go on from)
        self._finish(exception)

    # -- the step ----------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        """Watch the batch: NaN/Inf in it, targets too, is the data's fault (checked on the
        device, read with the step's row). The flag counts from the batch's backward on:
        a batch that never gets one (an epoch ended by ``on_train_batch_start`` returning
        -1, a batch manual optimisation passes over) adds nothing to any step."""
        guard = self.guard
        if guard is None:
            return
        if self._loss is None:
            guard._inputs.take()  # (no backward since the last step: nothing there is a step's)
        self._batch_flag = guard._inputs.batch_flag(watched_part(self.watch_batch, batch),
                                                    guard.device)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch_flag = None

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        """Add this backward's loss to the step's loss (unscaled, detached, on device)."""
        if self._gate is None:
            return
        self._gate.handled = False
        if self.guard is not None:
            self.guard._inputs.add(self._batch_flag)
        self._batch_flag = None
        loss = loss_value(loss)
        scaler = self._scaler
        if scaler is not None and scaler.is_enabled():
            # Lightning's fp16 plugin hands the hook the scaled loss.
            scale = getattr(scaler, "_scale", None)
            if isinstance(scale, Tensor):
                loss = loss / scale.to(loss.device)
        self._loss = loss if self._loss is None else self._loss + loss

    def _unscale(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning does not unscale for optimizers that handle scaling themselves (fused
        # ones, which the guard prefers); the guard must measure real units either way.
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled():
            return
        from torch.amp.grad_scaler import OptState

        if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
            scaler.unscale_(optimizer)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Run ``guard.step``: the update happens (or is skipped) here, not after the hook."""
        gate, guard = self._gate, self.guard
        if gate is None or guard is None:
            return
        gate.handled = True
        loss, self._loss = self._loss, None
        if not any(p.grad is not None for p in guard.params):
            # Nothing was back-propagated (training_step returned None): the forward pass
            # that ran, if one did, is no step's, nor is its data flag.
            guard._inputs.take()
            return
        self._unscale(guard.optimizer)
        if guard.should_skip_batch():
            # After a rollback: drop this step's gradients. Zeroed, not freed, so an fp16
            # GradScaler still finds the inf checks it recorded.
            guard.optimizer.zero_grad(set_to_none=False)
            return
        gate.passthrough = True
        try:
            info = guard.step(loss)
        finally:
            gate.passthrough = False
        if self.log_metrics:
            self._log(pl_module, info, guard)

    def _log(self, pl_module: Any, info: StepInfo, guard: Guard) -> None:
        p = self.prefix
        pl_module.log_dict(
            {f"{p}grad_norm": info.grad_norm.float(), f"{p}clipped_norm": info.clipped_norm.float(),
             f"{p}skipped": info.skipped.float(), f"{p}lr_scale": info.lr_scale.float(),
             f"{p}skipped_total": guard.skipped.float()},
            on_step=True, on_epoch=False,
        )

    # -- checkpoints -------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Any, pl_module: Any,
                           checkpoint: dict[str, Any]) -> None:
        """Store the guard's state (clip statistics, detectors, LR scale) in the checkpoint."""
        if self.guard is not None:
            checkpoint[STATE_KEY] = self.guard.state_dict()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any,
                           checkpoint: dict[str, Any]) -> None:
        """Restore the guard's state; applied when the guard is built at ``on_train_start``."""
        state = checkpoint.get(STATE_KEY)
        if state is None or not _fitting(trainer):
            # (validate/test/predict(ckpt_path=...) load the weights to evaluate them; the
            # guard state is resumed only by fit(ckpt_path=...))
            return
        if self.guard is not None and self._gate is not None:
            self.guard.load_state_dict(state, strict=self.strict)
        else:
            self._pending_state = state
