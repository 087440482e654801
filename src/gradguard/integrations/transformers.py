"""Hugging Face ``Trainer``: a :class:`~gradguard.Guard` in charge of every optimizer step.

Per optimizer step the Trainer runs (``Trainer._inner_training_loop``, transformers 5.x):
backward for each micro-batch, clipping to ``args.max_grad_norm`` when it is > 0, a
gradient-norm read for its logs, the ``on_pre_optimizer_step`` callbacks,
``optimizer.step()`` (accelerate's ``AcceleratedOptimizer``), ``on_optimizer_step``, the
LR scheduler and ``zero_grad``. The callback runs ``guard.step(loss)`` in
``on_pre_optimizer_step`` (measure, clip, detect, apply or skip), and a
:class:`~gradguard.integrations.StepGate` turns the Trainer's ``optimizer.step()`` that
follows into a no-op. A skipped step leaves weights and optimizer moments untouched.

- ``TrainingArguments(max_grad_norm=0)`` is required: the guard owns clipping (the
  Trainer's default, 1.0, would clip before the guard measures). ``clip=GlobalNorm(1.0)``
  gives the Trainer's default back.
- The loss the guard checks is the model output's ``loss``, averaged over the micro-batches
  of the step (a custom ``compute_loss`` that adds terms outside the model is not seen).
- The data the guard watches for NaN/Inf is what the Trainer calls the model with
  (``model(**inputs)``, labels included, ``watch_batch=``): a NaN label is the data's
  fault, skipped without touching the LR. With ``compute_loss_func`` or label smoothing
  the Trainer takes the labels out before that call, and they are not watched.
- fp16: the Trainer has unscaled the gradients before the hook; the guard is handed
  accelerate's ``GradScaler`` and calls ``scaler.update()`` itself.
- The Trainer's LR scheduler still advances on a skipped step (as the guard's docs say for
  plain loops); the guard's metrics go to its own sinks (``log=``, ``tensorboard=``,
  ``sinks=``), not to the Trainer's ``report_to`` loggers.
- The guard's state is written as ``gradguard.pt`` into each ``checkpoint-N`` folder and
  read back when training resumes: from the folder named in
  ``TrainingArguments(resume_from_checkpoint=...)``, else from ``output_dir``'s
  ``checkpoint-N`` (the Trainer tells callbacks the step, not the folder).
- DeepSpeed runs its own step and is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..guard import Guard, check_guard_kwargs
from ..stats import loss_value
from . import StepGate, WatchBatch, check_watch, watched_part

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ModuleNotFoundError(
        "gradguard.integrations.transformers needs transformers: "
        "pip install 'gradguard[transformers]'"
    ) from e

__all__ = ["STATE_FILE", "GradGuardCallback"]

log = logging.getLogger("gradguard")
STATE_FILE = "gradguard.pt"  # the guard's state inside a Trainer checkpoint folder


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or itself)."""
    inner = getattr(optimizer, "optimizer", None)
    if type(optimizer).__name__ == "AcceleratedOptimizer" and inner is not None:
        return inner
    return optimizer


class GradGuardCallback(TrainerCallback):
    """``Trainer`` callback that replaces the optimizer step with ``guard.step(loss)``.

    Example::

        args = TrainingArguments(output_dir="out", max_grad_norm=0)   # the guard clips
        cb = GradGuardCallback(log="out/guard.jsonl")
        Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()
        cb.guard.diagnosis()

    Args:
        watch_batch: watch what the Trainer calls the model with (its keyword arguments:
            ``input_ids``, ``labels``, ...) for NaN/Inf (True); only the first layer's
            inputs (False); or what a function of those arguments returns (leave out a
            tensor that holds NaN or -inf on purpose, such as a float attention mask).
        **guard_kwargs: passed to :class:`~gradguard.Guard` (``clip``, ``policy``,
            ``on_spike``, ``rollback``, ``log``, ``tensorboard``, ``sinks``, ...). Not
            ``scaler``: the callback uses the Trainer's.
    """

    def __init__(self, *, watch_batch: WatchBatch = True, **guard_kwargs: Any) -> None:
        check_guard_kwargs("GradGuardCallback", guard_kwargs)
        self.guard_kwargs = guard_kwargs
        self.watch_batch = check_watch(watch_batch)
        self.guard: Guard | None = None
        self._gate: StepGate | None = None
        self._hook: Any = None
        self._watch: Any = None
        self._loss_sum: Tensor | None = None
        self._loss_n = 0
        # Whether this step's forwards got num_items_in_batch: their losses are already
        # divided by the step's whole token count (summed, not averaged, over micro-batches).
        self._scaled = False
        self._labels = False  # whether the last forward was given labels
        self._no_loss_warned = False
        self._world = 1

    # -- set-up and tear-down ----------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        """Check the arguments and build the guard around the Trainer's optimizer."""
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ConfigError(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}) clips before the guard "
                "measures; gradguard owns clipping: set max_grad_norm=0 and pass "
                f"GradGuardCallback(clip=gg.clip.GlobalNorm({args.max_grad_norm})) for the same "
                "clipping"
            )
        if "on_pre_optimizer_step" not in vars(TrainerCallback):
            raise ConfigError("this transformers version has no on_pre_optimizer_step callback "
                              "hook; upgrade transformers to use GradGuardCallback")
        if getattr(args, "deepspeed", None):
            raise ConfigError("DeepSpeed runs its own optimizer step; GradGuardCallback cannot "
                              "skip it")
        if model is None or optimizer is None:
            raise ConfigError("the Trainer passed no model/optimizer to the callback")
        self._finish()
        inner = _unwrap_optimizer(optimizer)
        scaler = getattr(optimizer, "scaler", None)
        self.guard = Guard(model, inner, scaler=scaler, **self.guard_kwargs)
        if self.guard.total_steps is None and int(getattr(state, "max_steps", 0) or 0) > 0:
            self.guard.total_steps = int(state.max_steps)  # (the Trainer's plan)
        if lr_scheduler is not None and hasattr(lr_scheduler, "load_state_dict"):
            self.guard.track(lr_scheduler)  # rolled back with the model
        try:
            self._resume(args, state)
        except ConfigError as e:
            self._finish()  # (no half-built guard left hooked on the optimizer)
            raise ConfigError(
                f"{e}\n(GradGuardCallback: build it with the settings the checkpoint was "
                f"saved with, or delete the checkpoint's {STATE_FILE} to resume with a "
                "fresh guard)") from None
        # A model loss divided by the tokens of all ranks is averaged over them by the
        # Trainer's multiplying it back (average_tokens_across_devices), and by the guard.
        self._world = max(1, int(getattr(args, "world_size", 1) or 1)) if getattr(
            args, "average_tokens_across_devices", False) else 1
        self._gate = StepGate(optimizer, "transformers.Trainer")
        self._hook = model.register_forward_hook(self._capture_loss)
        self._watch = model.register_forward_pre_hook(self._watch_batch, with_kwargs=True)
        self._loss_sum, self._loss_n = None, 0

    def _resume(self, args: Any, state: Any) -> None:
        if not state.global_step:
            return
        # The Trainer tells callbacks the step it resumed at, not the folder: the one named
        # in TrainingArguments(resume_from_checkpoint=...) first, then output_dir's.
        places = [os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}",
                               STATE_FILE)]
        named = getattr(args, "resume_from_checkpoint", None)
        if isinstance(named, str | os.PathLike):
            places.insert(0, os.path.join(named, STATE_FILE))
        path = next((p for p in places if os.path.exists(p)), None)
        if path is None:
            log.warning("gradguard: resuming at step %d without the guard's state (looked for "
                        "%s); the guard starts fresh. For a checkpoint outside output_dir, "
                        "name it in TrainingArguments(resume_from_checkpoint=...) too",
                        state.global_step, " and ".join(places))
            return
        assert self.guard is not None
        self.guard.load_state_dict(torch.load(path, map_location=self.guard.device,
                                              weights_only=True))

    def _finish(self) -> None:
        for hook in (self._hook, self._watch):
            if hook is not None:
                hook.remove()
        self._hook = self._watch = None
        if self._gate is not None:
            self._gate.remove()
            self._gate = None
        if self.guard is not None:
            self.guard.close()  # stays readable: events, skipped, diagnosis()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the guard (flushing its sinks) and give the optimizer its ``step`` back."""
        self._finish()

    # -- the step ----------------------------------------------------------------------
    def _watch_batch(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        # A pre-hook: the Trainer calls model(**inputs), so the batch, labels included, is
        # what the model is called with; NaN/Inf in it is the data's fault.
        if module.training and torch.is_grad_enabled() and self.guard is not None:
            self._scaled = self._scaled or (kwargs or {}).get("num_items_in_batch") is not None
            self._labels = (kwargs or {}).get("labels") is not None
            self.guard._inputs.check_batch(watched_part(self.watch_batch, kwargs or args),
                                           self.guard.device)

    def _capture_loss(self, module: nn.Module, _args: Any, output: Any) -> None:
        # A forward hook: the Trainer hands callbacks no loss, the model output has it.
        if not (module.training and torch.is_grad_enabled()):
            return
        if isinstance(output, Mapping):
            loss = output.get("loss")
        elif isinstance(output, tuple | list) and output and self._labels:
            loss = output[0]  # (return_dict=False: the loss comes first when labels were given)
        else:
            return
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        loss = loss_value(loss)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_n += 1

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any,
                              **kwargs: Any) -> None:
        """Run ``guard.step``: the update happens (or is skipped) here, not in the Trainer."""
        gate, guard = self._gate, self.guard
        if gate is None or guard is None:
            return
        gate.handled = True
        if self._loss_sum is None:
            loss = None
            if not self._no_loss_warned:
                self._no_loss_warned = True
                log.warning("gradguard: the model's output holds no loss (label smoothing, "
                            "compute_loss_func, or a loss computed outside the model): the "
                            "guard runs without its loss checks and the stability "
                            "controller's loss level")
        elif self._scaled:
            loss = self._loss_sum * self._world  # (see _world in on_train_begin)
        else:
            loss = self._loss_sum / self._loss_n
        self._loss_sum, self._loss_n, self._scaled = None, 0, False
        if guard.should_skip_batch():
            self._drop(guard)
            return
        gate.passthrough = True  # when the Trainer's optimizer is the guard's own
        try:
            guard.step(loss)
        except BaseException:
            # The Trainer has no exception hook: close the log and unhook the model now.
            self._finish()
            raise
        finally:
            gate.passthrough = False

    @staticmethod
    def _drop(guard: Guard) -> None:
        """Discard this step's gradients (after a rollback) and settle the fp16 scaler."""
        scaler = guard.scaler
        if scaler is not None and scaler.is_enabled():
            from torch.amp.grad_scaler import OptState

            if scaler._per_optimizer_states[id(guard.optimizer)]["stage"] is OptState.READY:
                scaler.unscale_(guard.optimizer)
            scaler.update()  # the next step's unscale_ would fail without it
        guard.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints -------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the guard's state beside the Trainer's checkpoint."""
        if self.guard is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.guard.state_dict(), os.path.join(folder, STATE_FILE))
