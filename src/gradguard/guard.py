"""Guard: the drop-in for ``optimizer.step()``: stats → clip → detect → decide → step → record.

Per step, on the device: one fused norm pass, the clip transforms, the spike detectors,
the skip/LR-scale decision and the (possibly skipped) optimizer step. The step's row of
statistics is then posted to the host without waiting (:mod:`gradguard.record`); the
host side turns rows into events, runs the analyzers and, when the policy says so, rolls
back. The only blocking host reads are the documented ones: a state-creating first step
(:mod:`gradguard.stepper`), snapshot writes to disk, and a masked optimizer with LR
backoff reading its LR scale one step late.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__, lifecycle
from . import snapshot as snap
from .clip import ClipContext, Transform, chain
from .control import Controller
from .detect import DepthTrend, Drift, LayerAttribution
from .distributed import local_tensor, make_sync
from .errors import ConfigError, GuardUsageError, check_int, config_diff
from .record import ConsoleSink, JsonlSink, Mailbox, Recorder, Sink, TensorBoardSink
from .respond import DeviceDecision, Policy, Rollback, TrainingDivergedError
from .samples import SampleCounter
from .stats import GradStats, collect_grads, compute_stats, global_from_norms, local_norms
from .stepper import Stepper
from .usage import Usage, check_optimizer

__all__ = ["Guard", "StepInfo"]

log = logging.getLogger("gradguard")
STATE_VERSION = 4
T = TypeVar("T")


@dataclass(frozen=True)
class StepInfo:
    """What one ``guard.step`` saw and did. Tensors stay on the device; read them lazily.

    Attributes:
        step: index of this call (0-based, counts skipped steps too).
        loss: the loss passed to ``step`` (detached), or None.
        grad_norm: global gradient norm before any transform.
        clipped_norm: global gradient norm after the transforms.
        skipped: 0-dim bool, True when the optimizer step was not applied.
        nonfinite: 0-dim bool, True when the gradients or the loss had NaN/Inf.
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
        out: dict[str, Any] = {"step": self.step}
        for k in ("loss", "grad_norm", "clipped_norm", "lr_scale"):
            v = getattr(self, k)
            out[k] = None if v is None else float(v.detach().float().cpu())
        out["clip_coef"] = float(self.clip_coef.cpu())
        for k in ("skipped", "nonfinite", "grad_spike", "loss_spike"):
            out[k] = bool(getattr(self, k).cpu())
        out["rolled_back"] = self.rolled_back
        return out


def _resolve_params(
    model: nn.Module | None, optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None,
) -> tuple[list[str], list[Tensor]]:
    """The parameters the guard watches, with names, in model registration order."""
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_ids = {id(p) for p in opt_params}
    if not opt_params:
        raise ConfigError("the optimizer has no parameters; build it with model.parameters()")
    names: list[str] = []
    chosen: list[Tensor] = []
    if params is not None:
        wanted = list(params)
        missing = [i for i, p in enumerate(wanted) if id(p) not in opt_ids]
        if missing:
            raise ConfigError(
                f"params #{missing[:5]} are not in the optimizer; the guard can only skip "
                "steps of parameters the optimizer updates"
            )
        lookup = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        for i, p in enumerate(wanted):
            names.append(lookup.get(id(p), f"param{i}"))
            chosen.append(p)
        return names, chosen
    if model is not None:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        foreign = [n for n, p in trainable if id(p) not in opt_ids]
        if foreign and len(foreign) == len(trainable):
            raise ConfigError(
                "none of the model's trainable parameters are in the optimizer: build the "
                "optimizer from this model's parameters "
                "(e.g. torch.optim.AdamW(model.parameters()))"
            )
        if foreign:
            raise ConfigError(
                f"{len(foreign)} trainable parameter(s) of the model are not in the optimizer "
                f"(first: {foreign[:3]}); freeze them (requires_grad_(False)), add them to the "
                "optimizer, or pass params= to guard a subset"
            )
        seen: set[int] = set()
        for n, p in trainable:
            seen.add(id(p))
            names.append(n)
            chosen.append(p)
        for gi, g in enumerate(optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                if id(p) not in seen and p.requires_grad:
                    names.append(f"group{gi}.param{pi}")
                    chosen.append(p)
        return names, chosen
    for gi, g in enumerate(optimizer.param_groups):
        for pi, p in enumerate(g["params"]):
            names.append(f"group{gi}.param{pi}")
            chosen.append(p)
    return names, chosen


class _ForwardOrder:
    """Learns the order in which modules run in the first forward pass, then unhooks."""

    def __init__(self, model: nn.Module | None, params: Sequence[Tensor]) -> None:
        self.params = params
        self.calls: list[nn.Module] = []
        self.handles = []
        if model is not None:
            for m in model.modules():
                if any(True for _ in m.parameters(recurse=False)):
                    self.handles.append(m.register_forward_pre_hook(self._hook))

    def _hook(self, module: nn.Module, _args: Any) -> None:
        if not self.calls or self.calls[-1] is not module:
            self.calls.append(module)

    def finish(self) -> list[int]:
        """Positions of the guarded params in forward order (unused ones at the end)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        pos = {id(p): i for i, p in enumerate(self.params)}
        order: list[int] = []
        seen: set[int] = set()
        for m in self.calls:
            for p in m.parameters(recurse=False):
                i = pos.get(id(p))
                if i is not None and i not in seen:
                    seen.add(i)
                    order.append(i)
        order += [i for i in range(len(self.params)) if i not in seen]
        return order


def _why(z: float, early: str) -> str:
    # Before a detector's warm-up ends it has no z-score, only its early ratio rule.
    if z == 0.0:
        return f"early check: far above the {early} so far"
    return f"z={z:.2f}"


class Guard:
    """Replaces ``optimizer.step()``: measures, clips, detects, skips, backs off, rolls back.

    Example::

        with gg.Guard(model, optimizer, log="runs/exp1.jsonl") as guard:  # closes the log
            for x, y in guard.batches(loader):        # drops batches after a rollback
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                info = guard.step(loss)                # instead of optimizer.step()

    The guard owns the optimizer's step: an ``optimizer.step()`` (or
    ``scaler.step(optimizer)``) outside ``guard.step`` raises
    :class:`~gradguard.GuardUsageError` until the guard is closed. A guard never closed is
    closed at interpreter exit (see :mod:`gradguard.lifecycle`).

    Args:
        model: the module being trained (names parameters, gives forward order, and is
            what a rollback restores); may be None when ``params`` or the optimizer's own
            parameters are enough.
        optimizer: the user's optimizer. torch's Adam/AdamW/SGD/Adagrad left at their
            default implementation are switched to ``fused=True`` so a skipped step needs
            no host sync (see :mod:`gradguard.stepper`; ``skip_strategy="masked"`` opts out).
        clip: a transform or a list of transforms (chained). None (the default) clips
            nothing but the spikes the detector flags (to the typical norm): blanket
            clipping of a healthy run's heavy-tailed norms slows it, and real instability
            is the stability controller's job.
        policy: a :class:`~gradguard.respond.Policy`; default ``Policy()`` (skip NaN/Inf
            steps and isolated spikes; the stability controller lowers the LR and rolls
            back on persistent instability). ``on_nonfinite``,
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
        skip_strategy: "auto", "found_inf" or "masked" (see :mod:`gradguard.stepper`).
        params: guard only these parameters (default: all trainable ones).
        after_step: a callable (or a sequence of them) the guard calls right after each
            optimizer step, skipped or not: a weight constraint such as
            ``gg.fixes.MaxNorm(model, 3.0)`` (a projection is harmless on a skipped step).
    """

    def __init__(
        self,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer,
        clip: Transform | Sequence[Transform] | None = None,
        *,
        policy: Policy | None = None,
        on_nonfinite: str | None = None,
        on_spike: str | None = None,
        on_loss_spike: str | None = None,
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
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module or None, got {type(model).__name__}")
        check_optimizer(optimizer)
        check_int("flush_every", flush_every, 1)
        check_int("layers_every", layers_every, 1)
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.names, self.params = _resolve_params(model, optimizer, params)
        self.device = self.params[0].device

        policy = policy if policy is not None else Policy()
        if not isinstance(policy, Policy):
            raise ConfigError(f"policy must be a gradguard.Policy, got {policy!r}; use "
                              "Policy(on_spike=...) or the on_* shortcuts")
        if rollback is not None and rollback is not False and \
                not isinstance(rollback, Rollback):
            raise ConfigError(f"rollback takes a gradguard.Rollback, or False to turn rollback "
                              f"off, got {rollback!r}")
        overrides = {k: v for k, v in (("on_nonfinite", on_nonfinite), ("on_spike", on_spike),
                                       ("on_loss_spike", on_loss_spike), ("rollback", rollback))
                     if v is not None}
        if overrides.get("rollback") is False:
            overrides["rollback"] = None
        if overrides:
            fields = {**{f: getattr(policy, f) for f in policy.__dataclass_fields__},
                      **overrides}
            policy = Policy(**fields)
        self.policy = policy
        self.grad_spike = copy.deepcopy(policy.grad_spike)
        self.loss_spike = copy.deepcopy(policy.loss_spike)
        self.grad_spike.bind(self.device)
        self.loss_spike.bind(self.device)
        self.decision = DeviceDecision(policy, self.device)
        self.control = Controller(policy.stability) if policy.stability is not None else None

        if clip is None:
            clip = chain()
        elif isinstance(clip, str) or not isinstance(clip, Transform | Sequence):
            raise ConfigError(f"clip takes a gradguard.clip transform or a list of them, got "
                              f"{clip!r}; e.g. clip=gg.clip.GlobalNorm(1.0)")
        elif not isinstance(clip, Transform):
            clip = chain(*clip)
        self.clip: Transform = clip
        self.clip.bind(self.names, self.params, self.device)
        hooks = (tuple(after_step) if isinstance(after_step, Sequence)
                 else () if after_step is None else (after_step,))
        if not all(callable(h) for h in hooks):
            raise ConfigError(f"after_step takes a callable or a list of them, got {after_step!r}")
        self.after_step: tuple[Callable[[], object], ...] = hooks
        self.stepper = Stepper(optimizer, skip_strategy)
        # The LR scale is decided on the host from rows already there (no sync); the
        # device copy only feeds the per-step row and is refilled when the scale changes.
        self._scale = 1.0  # the controller's LR scale
        self._factor = 1.0  # what this step applies: scale × automatic warm-up
        self._scale_t = torch.ones((), device=self.device)
        self._warm_len = (policy.stability.warmup_steps(optimizer)
                          if policy.stability is not None else 0)
        self._progress = 0  # steps since the state the weights are in began
        self._lr0: float | None = None

        self.steps = 0
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)
        self.rollbacks = 0
        self._nan = torch.full((), math.nan, device=self.device)
        self._false = torch.zeros((), dtype=torch.bool, device=self.device)

        self._sync = make_sync(distributed, self.params)
        if self._sync is not None and self._sync.rank != 0:
            # Every rank makes the same decisions; one copy of the record is enough, and
            # several ranks appending to one file would interleave it.
            sinks, log, tensorboard, console = (), None, None, False
        all_sinks: list[Sink] = list(sinks)
        if log is not None:
            all_sinks.append(JsonlSink(log))
        if tensorboard is not None:
            all_sinks.append(TensorBoardSink(tensorboard))
        if console:
            all_sinks.append(ConsoleSink())
        self.recorder = Recorder(self.names, all_sinks, flush_every, layers_every)
        self.mailbox = Mailbox(self.device)
        self._order_probe: _ForwardOrder | None = _ForwardOrder(model, self.params)
        self.order = list(range(len(self.params)))
        self.attribution = LayerAttribution(self.names, self.order)
        self.depth = DepthTrend(self.names, self.order, [p.dim() >= 2 for p in self.params])
        self.drift = Drift()

        self._tracked: list[Any] = []
        self._good: deque[snap.Snapshot] = deque(maxlen=policy.rollback.keep
                                                  if policy.rollback else 1)
        self._candidates: dict[int, snap.Snapshot] = {}
        # Where snapshots live ("device", "cpu" or "off"), settled at the first snapshot.
        self._snap_place: str | None = None
        self._retried_from: int | None = None
        self._resumed_snapshots = False
        self._skip_batches = 0
        self._skip_streak = 0
        self._clean_streak = 0
        self._ignore_rows_before = 0
        self._disk_files: deque[Path] = deque()
        self._base_lrs: dict[int, float] = {}
        self._started = False
        self._closed = False
        # Last, so a failed construction leaves no hooks behind (see gradguard.usage).
        self._usage = Usage(model, optimizer, scaler is not None, self.device)
        # Ranks must decide alike: under torch.distributed the batch-size factor stays 1.
        self._samples = SampleCounter(model if self._sync is None else None)
        self._finalizer = lifecycle.register(self, self.recorder, self._usage, self._samples)

    # -- public helpers ----------------------------------------------------------------
    def track(self, obj: Any) -> Any:
        """Include ``obj`` (anything with state_dict/load_state_dict, e.g. an LR scheduler
        or a GradScaler) in rollback snapshots. Returns ``obj``."""
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise ConfigError(f"track() needs state_dict/load_state_dict, {type(obj).__name__} "
                              "has neither")
        if self._good:
            raise GuardUsageError("track() objects before the first guard.step()")
        self._tracked.append(obj)
        return obj

    def should_skip_batch(self) -> bool:
        """True for the next ``Rollback.skip_batches`` calls after a rollback."""
        if self._skip_batches > 0:
            self._skip_batches -= 1
            return True
        return False

    def batches(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield from ``iterable``, dropping the batches a rollback asks to skip."""
        for item in iterable:
            if self.should_skip_batch():
                continue
            yield item

    # -- the step ----------------------------------------------------------------------
    @staticmethod
    def _check_fresh_grads(grads: Sequence[Tensor]) -> None:
        # A gradient the guard already stepped carries the version it had then; backward()
        # either makes a new tensor or bumps the version by accumulating into it.
        if all(getattr(g, "_gradguard_version", None) == g._version for g in grads):
            raise GuardUsageError(
                "guard.step() was called twice on the same gradients: call loss.backward() "
                "(and optimizer.zero_grad()) between steps"
            )

    def _unscale(self) -> None:
        """Unscale AMP gradients once, before anything measures them."""
        from torch.amp.grad_scaler import OptState

        state = self.scaler._per_optimizer_states[id(self.optimizer)]  # type: ignore[union-attr]
        if state["stage"] is OptState.READY:
            self.scaler.unscale_(self.optimizer)  # type: ignore[union-attr]

    @staticmethod
    def _run_closure(loss: Tensor | None, closure: Callable[[], Tensor]) -> Tensor:
        if loss is not None:
            raise GuardUsageError("guard.step() takes the loss or a closure, not both: the "
                                  "closure computes the loss and calls backward() itself")
        if not callable(closure):
            raise GuardUsageError(f"closure must be callable, got {type(closure).__name__}")
        with torch.enable_grad():
            return closure()

    def _start(self) -> None:
        self._started = True
        self._usage.first_step()
        if self._order_probe is not None:
            self.order = self._order_probe.finish()
            self._order_probe = None
            self.attribution.order = self.order
            old = self.depth
            self.depth = DepthTrend(self.names, self.order, [p.dim() >= 2 for p in self.params])
            self.depth.load_state_dict(old.state_dict())  # a resumed run keeps its streak
        self.recorder.start({
            "gradguard": __version__, "params": self.names,
            "forward_order": [self.names[i] for i in self.order],
            "shapes": [list(p.shape) for p in self.params],
            "config": {"clip": repr(self.clip), **self.policy.describe(),
                       "optimizer": type(self.optimizer).__name__,
                       "skip_strategy": self.stepper.strategy},
        })
        if self.policy.rollback is not None:
            self._snap_place = self._placement()
            if self._snap_place != "off" and not self._resumed_snapshots:
                self._good.append(self._take(-1))

    def step(self, loss: Tensor | None = None,
             closure: Callable[[], Tensor] | None = None) -> StepInfo:
        """Measure, transform and apply (or skip) this step's gradients.

        Args:
            loss: this step's loss (unscaled); enables the loss checks.
            closure: instead of ``loss``, torch's convention: a callable that clears the
                gradients, computes the loss, calls ``backward()`` and returns the loss;
                the guard calls it once, then steps.

        Returns:
            A :class:`StepInfo` of device tensors.

        Raises:
            TrainingDivergedError: the policy has run out of remedies.
        """
        if self._closed:
            raise GuardUsageError("this guard was closed; build a new one to keep training")
        if closure is not None:
            loss = self._run_closure(loss, closure)
        if self.scaler is not None and self.scaler.is_enabled():
            self._unscale()
        groups = collect_grads(self.params)
        if not groups.grads:
            raise GuardUsageError(
                "no guarded parameter has a gradient: call loss.backward() before "
                "guard.step(), and check the loss depends on the model's parameters"
            )
        self._check_fresh_grads(groups.grads)
        if not self._started:
            self._start()

        loss_d: Tensor | None = None
        loss_spike = self._false
        loss_z = self._nan
        if loss is not None:
            if not isinstance(loss, Tensor):
                raise GuardUsageError(
                    f"guard.step(loss) takes the loss tensor, got {type(loss).__name__}; pass "
                    "the tensor you called backward() on (no .item())"
                )
            loss_d = local_tensor(loss.detach()).float().mean().to(self.device)
        if self._sync is None:
            stats: GradStats = compute_stats(groups, self.device)
        else:
            # All ranks agree on norms, loss and the NaN vote in one all-reduce; everything
            # after this point is computed from identical inputs on every rank.
            if self._sync.sharded:
                groups = dataclasses.replace(groups, sum_squares=self._sync.sum_squares)
            local = local_norms(groups, groups.grads, self.device)
            bad = ~torch.isfinite(global_from_norms(local))
            if loss_d is not None:
                bad = bad | ~torch.isfinite(loss_d)
            norms, loss_d, any_bad = self._sync.step(local, loss_d, bad)
            stats = compute_stats(groups, self.device, norms=norms)
            stats.nonfinite = stats.nonfinite | any_bad
        nonfinite = stats.nonfinite
        if loss_d is not None:
            nonfinite = nonfinite | ~torch.isfinite(loss_d)
        ok = ~nonfinite
        noise = self._samples.noise()  # > 1 for a smaller batch (epoch end)
        grad_spike, grad_z, typical = self.grad_spike(stats.global_norm, ok, noise)
        if loss_d is not None and self.policy.on_loss_spike != "none":
            loss_spike, loss_z = self.loss_spike(loss_d, ok, noise)

        ctx = ClipContext(groups, stats, [self.names[i] for i in groups.index], ok, self.device)
        self.clip(ctx)
        if self.policy.on_spike in ("auto", "clip", "backoff"):
            # A detected spike is applied no larger than the norm the detector expects,
            # whatever the clip transforms let through (ZClip's "mean" response).
            ctx.scale(torch.where(grad_spike, torch.clamp(typical / (ctx.global_norm + 1e-6),
                                                          max=1.0), 1.0))
        clipped = ctx.global_norm
        ctx.flush()

        skip = self.decision(nonfinite, grad_spike, loss_spike)
        lr_scale = self._scale_t
        base_lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(base_lr, float | int):  # a host number: free to record
            self._base_lrs[self.steps] = float(base_lr)
        self._set_factor(self._scale * self._warmup_factor(base_lr))
        self._optimizer_step(groups.params, skip)
        self._progress += 1
        for hook in self.after_step:
            hook()
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.update()
        self.skipped.add_(skip.long())
        for g in groups.grads:
            g._gradguard_version = g._version  # type: ignore[attr-defined]

        full = stats.full_norms(len(self.params))
        head = torch.stack([loss_d if loss_d is not None else self._nan, stats.global_norm,
                            clipped, skip.float(), nonfinite.float(), grad_spike.float(),
                            loss_spike.float(), lr_scale.float(), grad_z, loss_z])
        self.mailbox.post(self.steps, torch.cat([head, full.float()]))
        step = self.steps
        self.steps += 1
        rolled = self._host_side(step)
        return StepInfo(step, loss_d, stats.global_norm, clipped, skip, nonfinite, grad_spike,
                        loss_spike, lr_scale, stats.norms, rolled)

    def _optimizer_step(self, params: list[Tensor], skip: Tensor) -> None:
        groups = self.optimizer.param_groups
        scale = self._factor
        if scale != 1.0:
            # The guard scales whatever LR the user's scheduler set, for this step only.
            base = [g["lr"] for g in groups]
            for g, b in zip(groups, base, strict=True):
                g["lr"] = b * scale
        try:
            with self._usage.stepping():
                self.stepper.step(params, skip)
        finally:
            if scale != 1.0:
                for g, b in zip(groups, base, strict=True):
                    g["lr"] = b

    def _set_scale(self, scale: float) -> None:
        self._scale = scale

    def _set_factor(self, factor: float) -> None:
        if factor != self._factor:
            self._factor = factor
            self._scale_t.fill_(factor)  # a host scalar into a device tensor: no sync

    def _warmup_factor(self, base_lr: Any) -> float:
        """The automatic warm-up's LR factor for this step (1 when off or over).

        A linear ramp over ``Stability.warmup`` steps, counted from the state the weights
        are in (a rollback to the start ramps again). Switched off for good when the
        user's own LR rises during the ramp: their schedule warms up already.
        """
        n = self._warm_len
        if n == 0 or self._progress >= n:
            return 1.0
        if isinstance(base_lr, float | int):
            if self._lr0 is None:
                self._lr0 = float(base_lr)
            elif base_lr > self._lr0 * (1 + 1e-6):
                self._warm_len = 0
                return 1.0
        return (self._progress + 1) / n

    # -- host side ---------------------------------------------------------------------
    def _host_side(self, step: int) -> bool:
        """Process the rows that reached the host; maybe roll back; take snapshots."""
        rolled = False
        for k, values in self.mailbox.poll():
            rolled = self._on_row(k, values) or rolled
        rb = self.policy.rollback
        if (rb is not None and self._snap_place not in (None, "off") and not rolled
                and step % rb.every == 0 and step > 0):
            cand = self._take(step)
            if self.recorder.rows and self.recorder.rows[-1]["step"] == step:
                self._judge(cand)
            else:
                self._candidates[step] = cand
        self.recorder.maybe_flush(step)
        return rolled

    def _judge(self, cand: snap.Snapshot) -> None:
        """Keep a snapshot when the steps before it were clean and the loss was calm."""
        rb = self.policy.rollback
        assert rb is not None
        calm = self.control is None or self.control.calm_now()
        if self._clean_streak >= rb.clean_window and calm:
            if self.control is not None:
                # Judged at its own row: the controller now describes exactly its weights.
                cand.guard["control"] = self.control.trajectory()
            self._good.append(cand)
            if rb.dir is not None and cand.step % (rb.disk_every or rb.every) == 0:
                self._write_disk(cand)

    def _on_row(self, k: int, values: np.ndarray) -> bool:
        rec = self.recorder.row(k, values, len(self.params))
        rec["lr"] = self._base_lrs.pop(k, None)
        norms = rec["_norms"]
        flagged = rec["skipped"] or rec["grad_spike"] or rec["loss_spike"] or rec["nonfinite"]
        self._clean_streak = 0 if flagged else self._clean_streak + 1
        self._skip_streak = self._skip_streak + 1 if rec["skipped"] else 0
        if flagged:
            self._events_for(rec, norms)
        else:
            self.attribution.learn(norms)
        msg = self.depth.update(norms)
        if msg:
            self.recorder.event(k, "depth_trend", msg, action="warn")
        msg = self.drift.update(rec["grad_norm"])
        if msg:
            self.recorder.event(k, "drift", msg, action="warn")
        if k < self._ignore_rows_before:
            return False  # a step taken before the last rollback took effect
        rolled = self._stability(rec, bool(flagged))
        if not rolled and k in self._candidates:
            self._judge(self._candidates.pop(k))
        return rolled

    def _stability(self, rec: dict[str, Any], flagged: bool) -> bool:
        """Escalation: feed the controller; lower the LR, roll back or give up."""
        p = self.policy
        k = rec["step"]
        if rec["nonfinite"] and p.on_nonfinite == "raise":
            self._diverged(k, "NaN/Inf in gradients or loss (on_nonfinite='raise')")
        if self.control is None:
            if self._skip_streak >= p.max_consecutive_skips:
                self._diverged(k, f"{self._skip_streak} consecutive steps skipped: the model "
                                  "cannot recover by skipping")
            return False
        loss = rec["loss"]
        # A retry at the same LR is allowed once per snapshot: failing again from the same
        # place is the LR's doing.
        self.control.can_retry = bool(self._good) and self._good[-1].step != self._retried_from
        verdict = self.control.observe(k, None if loss is None else float(loss), flagged,
                                       bool(rec["nonfinite"] or rec["loss_spike"]))
        may_roll = True
        if verdict.unstable is None:
            forced = p.immediate(rec["nonfinite"], rec["grad_spike"], rec["loss_spike"])
            if forced is not None:
                verdict = self.control.unstable(k, forced[0])
                may_roll = forced[1]
        reason = verdict.unstable
        if verdict.raised:
            self._set_scale(verdict.scale)
            self.recorder.event(k, "recover", f"calm for a while: LR scale raised to "
                                f"×{verdict.scale:.3g}", action="recover",
                                lr_scale=verdict.scale)
            return False
        if reason is None:
            if self._skip_streak >= p.max_consecutive_skips:
                self._diverged(k, f"{self._skip_streak} consecutive steps skipped")
            return False
        if verdict.give_up:
            self._give_up(k, reason)
        rb = p.rollback
        if self.rollbacks >= (rb.max_rollbacks if rb else 0) and rb is not None and \
                self._good:
            self._diverged(k, f"{reason}, after {self.rollbacks} rollbacks "
                              f"(max_rollbacks={rb.max_rollbacks})")
        self._set_scale(verdict.scale)
        if self._good and may_roll:
            self._rollback(k, reason, retry=verdict.retry)
            return True
        # No snapshot undid the damage: the weights are elsewhere now, and so is what is
        # normal for their loss and gradients. Judge what follows from here.
        self.control.rebaseline()
        self.grad_spike.bind(self.device)
        self.loss_spike.bind(self.device)
        self.recorder.event(k, "backoff", f"unstable: {reason}; LR scale ×{verdict.scale:.3g}"
                            " (no snapshot to roll back to)", action="backoff",
                            lr_scale=verdict.scale, reason=reason)
        return False

    def _give_up(self, step: int, reason: str) -> None:
        assert self.control is not None
        lr = self._base_lrs.get(step) or self.optimizer.param_groups[0]["lr"]
        try:
            at = f" (lr {float(lr) * self.control.scale:.3g})"
        except (TypeError, ValueError):
            at = ""
        self._diverged(
            step,
            f"{reason}, and the LR is already scaled ×{self.control.scale:.3g}{at}: this run "
            "is unstable at any LR the guard can give it. The base LR, the initialisation "
            "or the inputs' scale is the problem: run `gradguard doctor` on this model, or "
            "start from a much lower LR",
        )

    def _events_for(self, rec: dict[str, Any], norms: np.ndarray) -> None:
        k = rec["step"]
        att = self.attribution.attribute(norms)
        where = f" starting at {att.origin}" if att.origin else ""
        # What the device actually did, whatever the configured action was called.
        if rec["skipped"]:
            action = "skip"
        elif rec["clipped_norm"] < rec["grad_norm"] * (1 - 1e-6):
            action = "clip"
        else:
            action = "none"
        done = {"skip": "step skipped", "clip": "step clipped",
                "none": "step applied as is"}[action]
        common = {"action": action, "origin_layer": att.origin,
                  "top_layers": [[n, round(z, 2) if math.isfinite(z) else "inf"]
                                 for n, z in att.top],
                  "grad_norm": rec["grad_norm"], "loss": rec["loss"]}
        if rec["nonfinite"]:
            self.recorder.event(k, "nonfinite", f"NaN/Inf in gradients or loss{where}; {done}",
                                **common)
        if rec["grad_spike"]:
            self.recorder.event(k, "grad_spike",
                                f"gradient norm {rec['grad_norm']:.4g} spiked "
                                f"({_why(rec['grad_z'], 'median norm')}){where}; {done}",
                                z=rec["grad_z"], **common)
        if rec["loss_spike"]:
            self.recorder.event(k, "loss_spike",
                                f"loss {rec['loss']:.4g} spiked "
                                f"({_why(rec['loss_z'], 'median loss')}){where}; {done}",
                                z=rec["loss_z"], **common)

    def _diverged(self, step: int, why: str) -> None:
        diagnosis = self.diagnosis()
        self.recorder.event(step, "diverged", f"gave up: {why}", action="raise")
        self.recorder.flush()
        raise TrainingDivergedError(
            f"gradguard gave up at step {step}: {why}. Last events: "
            + "; ".join(e["message"] for e in self.recorder.events[-4:]),
            diagnosis,
        )

    def diagnosis(self) -> dict[str, Any]:
        """What the guard has seen so far: event counts, origins, LR scale, rollbacks."""
        ev = self.recorder.events
        kinds: dict[str, int] = {}
        origins: dict[str, int] = {}
        for e in ev:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
            if e.get("origin_layer"):
                origins[e["origin_layer"]] = origins.get(e["origin_layer"], 0) + 1
        return {"steps": self.steps, "events": kinds, "origin_layers": origins,
                "rollbacks": self.rollbacks, "lr_scale": self._scale,
                "last_good_step": self._good[-1].step if self._good else None,
                "recent_events": ev[-10:]}

    # -- snapshots and rollback --------------------------------------------------------
    def _guard_state(self) -> dict[str, Any]:
        """The guard state that describes the current weights (rolled back with them)."""
        out = {"clip": self.clip.state_dict(), "grad_spike": self.grad_spike.state_dict(),
               "loss_spike": self.loss_spike.state_dict(),
               "decision": self.decision.state_dict()}
        if self.control is not None:
            out["control"] = self.control.trajectory()
        return out

    def _load_guard_state(self, s: dict[str, Any]) -> None:
        self.clip.load_state_dict(snap.clone_tree(s["clip"]))
        self.grad_spike.load_state_dict(s["grad_spike"])
        self.loss_spike.load_state_dict(s["loss_spike"])
        self.decision.load_state_dict(s["decision"])
        if self.control is not None and "control" in s:
            self.control.load_trajectory(s["control"])

    def _placement(self) -> str:
        """Where in-memory snapshots can live: "device", "cpu" or "off" (too large)."""
        rb = self.policy.rollback
        assert rb is not None
        if rb.memory != "auto":
            return rb.memory
        need = rb.keep * snap.estimate_bytes(self.params, self.optimizer)
        host = snap.host_available_bytes()
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            if need <= rb.device_fraction * total:
                return "device"
        elif host is None:
            return "device"  # nothing to measure against: trust the user's device
        if host is not None and need <= rb.host_fraction * host:
            # On a CPU model host memory *is* the device; a GPU model offloads to it.
            return "device" if self.device.type == "cpu" else "cpu"
        self.recorder.event(-1, "rollback_off",
                            f"rollback off: {rb.keep} snapshots need {need / 2**30:.3g} GiB, "
                            f"more than Rollback(device_fraction={rb.device_fraction}, "
                            f"host_fraction={rb.host_fraction}) allows; instability is "
                            "answered by lowering the LR in place", action="warn")
        return "off"

    def _take(self, step: int) -> snap.Snapshot:
        return snap.take(step, self.model, self.params, self.optimizer, self._guard_state(),
                         self._tracked, to_cpu=self._snap_place == "cpu")

    def _write_disk(self, s: snap.Snapshot) -> None:
        rb = self.policy.rollback
        assert rb is not None and rb.dir is not None
        # Under DDP/FSDP2 each rank saves its own state (its shards under FSDP2).
        rank = f"-rank{self._sync.rank}" if self._sync is not None else ""
        path = snap.save_file(s, Path(rb.dir) / f"snapshot-{max(s.step, 0):09d}{rank}.pt")
        self._disk_files.append(path)
        while len(self._disk_files) > rb.keep:
            self._disk_files.popleft().unlink(missing_ok=True)
        self.recorder.event(s.step, "snapshot", f"snapshot of step {s.step} written to {path}",
                            action="snapshot", path=str(path))

    def _rollback(self, step: int, reason: str, retry: bool = False) -> None:
        """Restore the latest good snapshot; the controller has already lowered the LR."""
        rb = self.policy.rollback
        assert rb is not None and self._good
        # The latest good snapshot was taken while the loss was calm, so before the
        # regression began. Going back further would throw away sound progress; if the
        # run fails again from here, the lower LR is what changes.
        target = self._good[-1]
        if retry:
            self._retried_from = target.step
        snap.restore(target, self.model, self.params, self.optimizer, self._tracked)
        self._load_guard_state(target.guard)
        self._progress = target.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        self.rollbacks += 1
        self._skip_batches = rb.skip_batches
        self._skip_streak = self._clean_streak = 0
        self._candidates.clear()
        self._ignore_rows_before = self.steps
        skip = f"; skipping the next {rb.skip_batches} batches" if rb.skip_batches else ""
        lr = (f"retrying at the same LR scale ×{self._scale:.3g} (a sudden failure of a "
              "healthy run: a transient fault is likelier than the LR)" if retry
              else f"LR scale ×{self._scale:.3g}")
        self.recorder.event(
            step, "rollback",
            f"unstable: {reason}; rolled back to the state after step {target.step}, "
            f"{lr}{skip}",
            action="rollback", to_step=target.step, reason=reason, lr_scale=self._scale,
        )

    # -- lifecycle and state -----------------------------------------------------------
    def _drain(self) -> None:
        """Wait for and process every row still in flight."""
        for k, values in self.mailbox.poll(wait=True):
            self._on_row(k, values)

    def close(self) -> None:
        """Process the rows still in flight, write the run's verdict, close the sinks."""
        if self._closed:
            return
        self._usage.remove()
        self._samples.remove()
        lifecycle.unregister(self, self._finalizer)
        try:
            self._drain()
            if self._started:
                self.recorder.event(self.steps, "verdict", self.verdict(), action="info")
        finally:
            self.recorder.close()
            self._closed = True

    def verdict(self) -> str:
        """One sentence on how the run went and what to change (also logged at close)."""
        skipped = len({e["step"] for e in self.recorder.events if e.get("action") == "skip"})
        bad = f"{skipped} bad step(s) skipped" if skipped else "no step skipped"
        c = self.control
        if c is None or c.cuts == 0:
            retried = (f"; {c.retries} rollback(s) after sudden failures, retried at the same "
                       "LR" if c is not None and c.retries else "")
            return f"stable: {bad}, the LR was never changed{retried}"
        lr = self.optimizer.param_groups[0]["lr"]
        share = c.scaled_rows / max(c.rows, 1)
        try:
            at = f"lr ≈ {float(lr) * c.scale:.3g} (×{c.scale:.3g} of lr {float(lr):.3g})"
        except (TypeError, ValueError):
            at = f"×{c.scale:.3g} of your LR"
        return (f"unstable at your LR: the guard lowered it {c.cuts} time(s) "
                f"({self.rollbacks} rollback(s)), it was scaled down on {share:.0%} of steps, "
                f"and the run ended stable at {at}; {bad}. Set that LR (or warm up to it) "
                "to train without the guard's help")

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def state_dict(self, snapshots: bool = False) -> dict[str, Any]:
        """The guard's own state (not the model's or optimizer's), versioned.

        Args:
            snapshots: include the in-memory rollback snapshots (each the size of the
                model plus its optimizer state), so that a resumed run rolls back to
                exactly where the uninterrupted one would. Without them, a resumed guard's
                first rollback target is the state it resumed from.
        """
        self._drain()
        out = {
            "format": STATE_VERSION,
            "gradguard": __version__,
            "config": self._config(),
            "steps": self.steps,
            "skipped": self.skipped.detach().clone(),
            "rollbacks": self.rollbacks,
            "scale": self._scale,
            "controller": None if self.control is None else self.control.state_dict(),
            "attribution": {k: torch.as_tensor(v) for k, v in
                            self.attribution.state_dict().items()},
            # Host-side bookkeeping a resumed run needs to decide as the uninterrupted one.
            "host": {"skip_streak": self._skip_streak, "clean_streak": self._clean_streak,
                     "skip_batches": self._skip_batches, "retried_from": self._retried_from,
                     "progress": self._progress, "lr0": self._lr0, "warm_len": self._warm_len,
                     "depth": self.depth.state_dict(), "drift": self.drift.state_dict()},
            **self._guard_state(),
        }
        if snapshots:
            out["snapshots"] = [snap.clone_tree(s.as_dict()) for s in self._good]
        return out

    def _config(self) -> dict[str, Any]:
        return {"clip": repr(self.clip), "n_params": len(self.params),
                "policy": self.policy.describe()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> list[str]:
        """Restore :meth:`state_dict` output.

        Args:
            state: what :meth:`state_dict` returned.
            strict: refuse a state saved with other settings, listing the settings that
                differ. With ``strict=False`` the parts those settings leave valid are
                loaded (counters always; the clip statistics when the clip settings and
                parameters match; the decision when the policy matches; each detector
                when its state fits) and the rest keeps its fresh state, relearned
                within its warm-up.

        Returns:
            The parts that were not loaded (empty when everything was).
        """
        if not isinstance(state, dict) or "format" not in state:
            raise ConfigError("not a gradguard state dict (no 'format' key)")
        if state["format"] != STATE_VERSION:
            raise ConfigError(
                f"guard state format {state['format']} (gradguard {state.get('gradguard')}) "
                f"cannot be read by format {STATE_VERSION} (gradguard {__version__}); resume "
                "with the gradguard version that saved it, or leave the guard state out (the "
                "guard relearns its statistics within its warm-up)"
            )
        diff = config_diff(state["config"], self._config())
        if diff and strict:
            raise ConfigError(
                "guard state was saved with other settings (saved → this guard):\n  "
                + "\n  ".join(diff) + "\nbuild the guard with the same clip settings, policy "
                "and parameters, or load_state_dict(state, strict=False) to load only the "
                "parts those settings leave valid"
            )
        skipped = self._load_parts(state) if diff else []
        if not diff:
            self._load_guard_state(state)
        if skipped:
            log.warning("gradguard: guard state loaded without %s (settings differ: %s)",
                        ", ".join(skipped), "; ".join(diff))
        self.steps = int(state["steps"])
        self.skipped.copy_(state["skipped"])
        h = state["host"]
        self._skip_streak, self._clean_streak = int(h["skip_streak"]), int(h["clean_streak"])
        self._skip_batches, self._retried_from = int(h["skip_batches"]), h["retried_from"]
        self._progress, self._lr0, self._warm_len = int(h["progress"]), h["lr0"], int(
            h["warm_len"])
        self.depth.load_state_dict(h["depth"])
        self.drift.load_state_dict(h["drift"])
        if state.get("snapshots") and self.policy.rollback is not None:
            self._good.clear()
            self._good.extend(snap.Snapshot(**d) for d in snap.clone_tree(state["snapshots"]))
            self._resumed_snapshots = True
        self.rollbacks = int(state["rollbacks"])
        self._set_scale(float(state["scale"]))
        if self.control is not None and state["controller"] is not None \
                and "controller" not in skipped:
            self.control.load_state_dict(state["controller"])
        if "attribution" not in skipped:
            a = state["attribution"]
            self.attribution.load_state_dict({"mean": a["mean"].numpy(),
                                              "var": a["var"].numpy(),
                                              "count": int(a["count"])})
        return skipped

    def _load_parts(self, state: dict[str, Any]) -> list[str]:
        """Non-strict load: each part whose settings (or tensor shapes) match; the rest
        is named in the returned list."""
        saved, mine = state["config"], self._config()

        def same(*keys: str) -> bool:
            return all(saved.get(k) == mine.get(k) for k in keys)

        def fits(obj: Any, st: dict[str, Any]) -> bool:
            cur = getattr(obj, "state", {})
            return set(st) == set(cur) and all(tuple(v.shape) == tuple(cur[k].shape)
                                               for k, v in st.items())

        skipped: list[str] = []
        if same("clip", "n_params"):
            self.clip.load_state_dict(snap.clone_tree(state["clip"]))
        else:
            skipped.append("clip")
        for name in ("grad_spike", "loss_spike"):
            det = getattr(self, name)
            if fits(det, state[name]):
                det.load_state_dict(state[name])
            else:
                skipped.append(name)
        if same("policy") and fits(self.decision, state["decision"]):
            self.decision.load_state_dict(state["decision"])
        else:
            skipped += ["decision", "controller"]
        if not same("n_params"):
            skipped.append("attribution")
        return skipped
