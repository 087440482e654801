"""Guard: the drop-in for ``optimizer.step()``: stats → clip → detect → decide → step → record.

A facade over parts that each hold their own state, declared and wired in
:mod:`gradguard.assembly`: the device half of a step (:mod:`gradguard.device`), the host
half that reads its rows (:mod:`gradguard.host`), the stability controller
(:mod:`gradguard.control`), the LR factor (:mod:`gradguard.lr`) and the rollback store
(:mod:`gradguard.rollback`). Host syncs, all deliberate: a state-creating first step
(:mod:`gradguard.stepper`), snapshot writes to disk, and ``close()``/``state_dict()``,
which wait for the rows still in flight.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from . import assembly, checkpoint, join, lifecycle
from . import events as ev
from .clip import Transform, as_transform, claim
from .device import DeviceSide
from .errors import ConfigError, check_int
from .params import resolve_params
from .record import Sink, StepInfo
from .respond import Action, Policy, resolve_policy
from .rollback import trackable
from .usage import after_step_hooks, begin_step, check_args, check_open, check_outputs

__all__ = ["Guard", "StepInfo"]

T = TypeVar("T")


class Guard(assembly.Parts):
    """Replaces ``optimizer.step()``: measures, clips, detects, skips, backs off, rolls back.

    Example::

        with gg.Guard(model, optimizer, log="runs/exp1.jsonl") as guard:  # closes the log
            for x, y in guard.batches(loader):        # drops batches after a rollback
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                info = guard.step(loss)                # instead of optimizer.step()

    The guard owns the optimizer's step: an ``optimizer.step()`` (or ``scaler.step(opt)``)
    outside ``guard.step`` raises :class:`~gradguard.GuardUsageError` until the guard is
    closed. A guard never closed is closed at interpreter exit (:mod:`gradguard.lifecycle`).

    Args:
        model: the module being trained (names parameters, gives forward order, and is
            what a rollback restores); may be None when ``params`` or the optimizer's own
            parameters are enough.
        optimizer: the user's optimizer. On CUDA, torch's Adam/AdamW/SGD left at their
            default implementation are switched to ``fused=True``, and torch's optimizers
            that have a ``capturable`` mode otherwise to ``capturable=True``, so a skipped
            step needs no host sync (see :mod:`gradguard.stepper`); on a CPU it runs as
            built.
        clip: a transform or a list of transforms (chained). None (the default) clips
            nothing but the spikes the detector flags (to the typical norm): blanket
            clipping of a healthy run's heavy-tailed norms slows it, and real instability
            is the stability controller's job.
        policy: a :class:`~gradguard.respond.Policy`; default ``Policy()`` (skip NaN/Inf
            steps and isolated spikes; the stability controller rolls back on persistent
            instability and lowers the LR, or clips every later step). ``on_nonfinite``,
            ``on_spike``, ``on_loss_spike`` and ``rollback`` are shortcuts that replace
            the policy's fields.
        scaler: a ``torch.amp.GradScaler``; the guard then unscales before measuring and
            calls ``scaler.update()`` itself.
        log: path of a JSONL run log (read by ``gradguard report``).
        tensorboard: a log dir for a TensorBoard sink.
        console: print events to the console.
        sinks: further sinks (objects with meta/steps/event/close).
        flush_every: hand rows to the sinks every this many steps (and at every event).
        layers_every: write per-layer norms every this many steps (and at flagged steps).
        skip_strategy: "auto", "found_inf", "masked" or "host" (see
            :mod:`gradguard.stepper`).
        params: guard only these parameters (default: all trainable ones).
        after_step: a callable (or a sequence of them) the guard calls right after each
            optimizer step, skipped or not: a weight constraint such as
            ``gg.fixes.MaxNorm(model, 3.0)`` (a projection is harmless on a skipped step).
        total_steps: how many ``guard.step`` calls the whole run makes (counted from its
            first step, across resumes; e.g. ``len(loader) * epochs``), if known. After an
            LR cut the guard raises the LR again (a probe) only while the run has enough
            steps left for a failure of the raise to show in the loss level
            (``Stability.window``), so a raised LR that fails cannot damage the last
            weights with no step left to answer. None: unknown (probes whenever due; so
            does a run that goes on past the length it was given).
            The Lightning and Hugging Face callbacks set it from the trainer; it can be
            set later too (``guard.total_steps = n``).
    """

    def __init__(
        self,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer,
        clip: Transform | Sequence[Transform] | None = None,
        *,
        policy: Policy | None = None,
        on_nonfinite: Action | str | None = None,
        on_spike: Action | str | None = None,
        on_loss_spike: Action | str | None = None,
        rollback: Any = None,
        scaler: torch.amp.GradScaler | None = None,
        log: str | os.PathLike[str] | None = None,
        tensorboard: str | os.PathLike[str] | None = None,
        console: bool = False,
        sinks: Sequence[Sink] = (),
        flush_every: int = 50,
        layers_every: int = 1,
        skip_strategy: str = "auto",
        params: Iterable[Tensor] | None = None,
        after_step: Callable[[], object] | Sequence[Callable[[], object]] | None = None,
        distributed: Any = None,
        total_steps: int | None = None,
    ) -> None:
        check_args(model, optimizer, flush_every=flush_every, layers_every=layers_every)
        if total_steps is not None:
            check_int("Guard(total_steps=...)", total_steps, 1)
        sinks = check_outputs(log, tensorboard, sinks, scaler)
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.names, self.params, self._unwatched = resolve_params(model, optimizer, params)
        self.device = self.params[0].device
        self.policy = resolve_policy(policy, on_nonfinite, on_spike, on_loss_spike, rollback)
        self.clip = as_transform(clip)
        claim(self.clip, self)
        self.clip.bind(self.names, self.params, self.device)
        self.after_step = after_step_hooks(after_step)
        self._join_config = join.disabled_config()  # (set by torch's Join, see join_hook)
        # Device parts: detectors, transforms, skip decision, optimizer stepper; then the
        # host parts (controller, LR factor, rollback store), sinks and hooks.
        self._device = d = DeviceSide(self, skip_strategy)
        try:
            assembly.assemble(self, scaler, log, tensorboard, console, sinks, flush_every,
                              layers_every, distributed)
        except BaseException:
            # A failed construction leaves the user's optimizer, model and sinks as they were.
            assembly.undo(self, len(sinks))
            raise
        d.stepper.commit()
        self.total_steps = total_steps

    @property
    def total_steps(self) -> int | None:
        """How many steps the whole run makes, if known (see the class's Args)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None:
            value = check_int("Guard(total_steps=...)", value, 1)
        self._total_steps = value
        if self.control is not None:
            self.control.ends_at = value

    # -- public helpers ----------------------------------------------------------------
    def track(self, obj: Any) -> Any:
        """Include ``obj`` (anything with state_dict/load_state_dict, e.g. an LR scheduler
        or a GradScaler) in rollback snapshots. Returns ``obj``."""
        check_open(self)
        self._tracked.append(trackable(obj, self._started))
        return obj

    @property
    def rollbacks(self) -> int:
        """Snapshots restored so far."""
        return self._host.rollbacks

    @property
    def order(self) -> list[int]:
        """Parameter indices in forward order, input side first (known after a step)."""
        return self._host.order

    def should_skip_batch(self) -> bool:
        """True for the next ``Rollback.skip_batches`` calls after a rollback."""
        return self._host.should_skip_batch()

    def batches(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield from ``iterable``, dropping the batches a rollback asks to skip."""
        return (item for item in iterable if not self.should_skip_batch())

    def data_changed(self) -> None:
        """The data, the loss or the model changed on purpose (a curriculum step, pruned
        or reloaded weights): judge the loss afresh, and never roll back past this point."""
        check_open(self)
        self._host.data_changed()

    # -- the step ----------------------------------------------------------------------
    def step(self, loss: Tensor | None = None, closure: Callable[[], Tensor] | None = None,
             *, batch: Any = None) -> StepInfo:
        """Measure, transform and apply (or skip) this step's gradients.

        Args:
            loss: this step's loss (unscaled); enables the loss checks.
            closure: instead of ``loss``, torch's convention: a callable that clears the
                gradients, computes the loss, calls ``backward()`` and returns the loss;
                the guard calls it once, then steps.
            batch: the step's data (tensors, nested in dicts, lists or tuples): NaN/Inf in
                it, targets included, is read as the data's fault, not the model's.

        Returns:
            A :class:`StepInfo` of device tensors.

        Raises:
            TrainingDivergedError: the policy has run out of remedies.
        """
        join.notify(self)  # (inside torch's Join: this rank still steps)
        groups, loss = begin_step(self, loss, closure, batch)
        self._host.outside_edits(self.steps, end=False)
        if not self._started:
            self._started = True
            self._host.start()
        if loss is not None and not self._host.graph_checked:
            self._host.check_loss_graph(self.steps, loss)
        self._host.joined(self.steps, groups.index)
        row, info = self._device.step(self.steps, groups, loss)
        self.mailbox.post(self.steps, row)
        step = self.steps
        self.steps += 1
        rolled = self._host.after_step(step)
        self._host.outside_edits(step, end=True)
        return StepInfo(step, *info, rolled)

    def diagnosis(self) -> dict[str, Any]:
        """What the guard has seen so far: event counts, origins, LR scale, rollbacks."""
        latest = self.store.latest if self.store is not None else None
        return ev.diagnosis(self.recorder, self.steps, self.rollbacks, self.lr.scale,
                            latest.step if latest is not None else None)

    def verdict(self) -> str:
        """One sentence on how the run went and what to change (also logged at close)."""
        h = self._host
        return ev.verdict(self.recorder, self.control, self.rollbacks,
                          ev.group_lr(self.optimizer), h.recurrent, h.recurrent_clipped,
                          self._device.clip_ratio, h.batch_noise, h.lr_span, h.dead.ended(),
                          self.lr.warmup)

    # -- uneven inputs (torch's Join) --------------------------------------------------
    def join_hook(self, **kwargs: Any) -> Any:
        """The hook with which ``torch.distributed.algorithms.join.Join([ddp_model,
        guard])`` keeps ranks that ran out of data in step with the others (see
        :mod:`gradguard.join`); ``kwargs`` are the context's and unused."""
        return join.join_hook(self, **kwargs)

    @property
    def join_device(self) -> torch.device:
        """Where the join context's own collectives run: the guard's device."""
        return self.device

    @property
    def join_process_group(self) -> Any:
        """The process group the guard agrees over (the default group's object where it
        uses that one, as DDP names it: Join wants every participant's the same)."""
        group = self._sync.group if self._sync is not None else None
        if group is None and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            return torch.distributed.group.WORLD
        return group

    # -- state -------------------------------------------------------------------------
    def close(self) -> None:
        """Process the rows still in flight, write the run's verdict, close the sinks."""
        lifecycle.finish(self)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: Any) -> None:
        lifecycle.close(self, exc[1])  # (an exception that ends the block: in the verdict)

    def state_dict(self, snapshots: bool = False) -> dict[str, Any]:
        """The guard's own state (not the model's or optimizer's), versioned: the dict of
        its parts' states.

        Args:
            snapshots: include the in-memory rollback snapshots (each the size of the
                model plus its optimizer state), so that a resumed run rolls back to
                exactly where the uninterrupted one would. Without them, a resumed guard's
                first rollback target is the state it resumed from.
        """
        return checkpoint.save(self, snapshots)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> list[str]:
        """Restore :meth:`state_dict` output.

        Args:
            state: what :meth:`state_dict` returned.
            strict: refuse a state saved with other settings, listing the settings that
                differ. With ``strict=False`` the parts those settings leave valid are
                loaded (counters always; the clip statistics when the clip settings and
                parameters match; the decision and controller when the policy matches;
                each detector when its state fits; the warm-up as this guard's when the
                policy differs) and the rest keeps its fresh state, relearned within its
                warm-up; loaded rollback snapshots get the same fresh parts.

        Returns:
            The parts that were not loaded (empty when everything was).
        """
        return checkpoint.load(self, state, strict)


def check_guard_kwargs(owner: str, kwargs: dict[str, Any]) -> None:
    """The :class:`Guard` keywords an integration holds until training starts, checked
    when the integration is built: a typo or a bad value fails there, not after the
    trainer was set up.

    Args:
        owner: the integration's name, for the message.
        kwargs: the keywords it will build the guard with (not ``model``, ``optimizer``
            nor ``scaler``: it takes those from the trainer).
    """
    for k in ("model", "optimizer", "scaler"):
        if k in kwargs:
            raise ConfigError(f"{owner} takes {k!r} from the Trainer; do not pass it")
    known = [n for n in inspect.signature(Guard.__init__).parameters
             if n not in ("self", "model", "optimizer", "scaler")]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        named = [f"{u!r}" + "".join(f" (did you mean {c!r}?)"
                                    for c in difflib.get_close_matches(u, known, 1))
                 for u in unknown]
        raise ConfigError(f"{owner} got {', '.join(named)}, not a Guard keyword; Guard takes "
                          f"{', '.join(known)}")
    resolve_policy(kwargs.get("policy"), kwargs.get("on_nonfinite"), kwargs.get("on_spike"),
                   kwargs.get("on_loss_spike"), kwargs.get("rollback"))
    as_transform(kwargs.get("clip"))
    sinks = check_outputs(kwargs.get("log"), kwargs.get("tensorboard"), kwargs.get("sinks", ()))
    if "sinks" in kwargs:
        kwargs["sinks"] = sinks  # (a generator, read by the check, is kept as its list)
    for k in ("flush_every", "layers_every", "total_steps"):
        if kwargs.get(k) is not None:
            check_int(k, kwargs[k], 1)


if join.Joinable is not None:
    # A Joinable by its methods (Join only reads those); registered so that isinstance
    # says so, without the ABC in the guard's bases.
    join.Joinable.register(Guard)
