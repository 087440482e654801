"""Guard: the drop-in for ``optimizer.step()``: stats → clip → detect → decide → step → record.

Per step, on the device: one fused norm pass, the clip transforms, the spike detectors,
the skip decision and the (possibly skipped) optimizer step. The step's row of statistics
is then posted to the host without waiting (:mod:`gradguard.record`); the host side turns
rows into events and feeds the stability controller (:mod:`gradguard.control`), which
sets the LR factor (:mod:`gradguard.lr`) and asks for rollbacks (:mod:`gradguard.rollback`).
The guard is the facade that wires these parts; each holds its own state.

Host syncs, all deliberate: a state-creating first step (:mod:`gradguard.stepper`),
snapshot writes to disk, and ``close()``/``state_dict()``, which wait for the rows still
in flight.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__, lifecycle
from . import events as ev
from . import snapshot as snap
from .clip import ClipContext, SpikeClamp, Transform, chain
from .control import Controller
from .detect import DepthTrend, Drift, LayerAttribution
from .distributed import local_tensor, make_sync
from .errors import ConfigError, GuardUsageError, check_int, config_diff
from .lr import LRFactor
from .params import ForwardOrder, InputWatch, resolve_params
from .record import ConsoleSink, JsonlSink, Mailbox, Recorder, Sink, TensorBoardSink, pack_row
from .respond import Action, DeviceDecision, Policy, Rollback, TrainingDivergedError
from .rollback import RollbackStore
from .samples import SampleCounter
from .stats import GradStats, collect_grads, compute_stats, global_from_norms, local_norms
from .stepper import Stepper
from .usage import Usage, check_optimizer

__all__ = ["Guard", "StepInfo"]

log = logging.getLogger("gradguard")
STATE_VERSION = 5
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
        # Host sync, deliberate: the caller asked for host numbers.
        out: dict[str, Any] = {"step": self.step}
        for k in ("loss", "grad_norm", "clipped_norm", "lr_scale"):
            v = getattr(self, k)
            out[k] = None if v is None else float(v.detach().float().cpu())
        out["clip_coef"] = float(self.clip_coef.cpu())
        for k in ("skipped", "nonfinite", "grad_spike", "loss_spike"):
            out[k] = bool(getattr(self, k).cpu())
        out["rolled_back"] = self.rolled_back
        return out


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
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.names, self.params = resolve_params(model, optimizer, params)
        self.device = self.params[0].device
        self.policy = policy = _policy(policy, on_nonfinite, on_spike, on_loss_spike, rollback)
        self.clip = _clip(clip)
        self.clip.bind(self.names, self.params, self.device)
        # The transforms a step runs: the user's, then (under the spike actions that apply
        # a flagged step) the clamp of a spike to the norm the detector expected.
        self._transforms: Transform = (
            chain(self.clip, SpikeClamp())
            if policy.on_spike in (Action.AUTO, Action.CLIP, Action.BACKOFF) else self.clip)
        self.after_step = _hooks(after_step)

        # Device parts: the detectors and the skip decision.
        self.grad_spike = copy.deepcopy(policy.grad_spike)
        self.loss_spike = copy.deepcopy(policy.loss_spike)
        self.grad_spike.bind(self.device)
        self.loss_spike.bind(self.device)
        self.decision = DeviceDecision(policy, self.device)
        self.stepper = Stepper(optimizer, skip_strategy)
        # Host parts: the stability controller and the LR factor it sets.
        self.control = Controller(policy.stability) if policy.stability is not None else None
        self.lr = LRFactor(optimizer, policy.stability.warmup_steps(optimizer)
                           if policy.stability is not None else 0, self.device)

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
        self._order_probe: ForwardOrder | None = ForwardOrder(model, self.params)
        self._first_module: nn.Module | None = None
        self._inputs: InputWatch | None = None  # armed by the first NaN/Inf step
        self.order = list(range(len(self.params)))
        self.attribution = LayerAttribution(self.names, self.order)
        self.depth = DepthTrend(self.names, self.order, [p.dim() >= 2 for p in self.params])
        self.drift = Drift()

        self._tracked: list[Any] = []
        self.store = (RollbackStore(policy.rollback, model, self.params, optimizer,
                                    self._tracked, self.recorder,
                                    self._sync.rank if self._sync is not None else None)
                      if policy.rollback is not None else None)
        self._skip_batches = 0
        self._batches_used = False
        self._skip_streak = 0
        self._clean_streak = 0
        self._ignore_rows_before = 0
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
        if self._started:
            raise GuardUsageError("track() objects before the first guard.step()")
        self._tracked.append(obj)
        return obj

    def should_skip_batch(self) -> bool:
        """True for the next ``Rollback.skip_batches`` calls after a rollback."""
        self._batches_used = True
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
    def _start(self) -> None:
        self._started = True
        self._usage.first_step()
        if self._order_probe is not None:
            self._first_module = self._order_probe.first
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
        if self.store is not None:
            self.store.start(self._trajectory())

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
            loss = _run_closure(loss, closure)
        if self.scaler is not None and self.scaler.is_enabled():
            _unscale(self.scaler, self.optimizer)
        groups = collect_grads(self.params)
        if not groups.grads:
            raise GuardUsageError(
                "no guarded parameter has a gradient: call loss.backward() before "
                "guard.step(), and check the loss depends on the model's parameters"
            )
        _check_fresh_grads(groups.grads)
        if not self._started:
            self._start()

        loss_d: Tensor | None = None
        loss_spike, loss_z = self._false, self._nan
        if loss is not None:
            if not isinstance(loss, Tensor):
                raise GuardUsageError(
                    f"guard.step(loss) takes the loss tensor, got {type(loss).__name__}; pass "
                    "the tensor you called backward() on (no .item())"
                )
            loss_d = local_tensor(loss.detach()).float().mean().to(self.device)
        stats, loss_d, groups = self._measure(groups, loss_d)
        nonfinite = stats.nonfinite
        if loss_d is not None:
            nonfinite = nonfinite | ~torch.isfinite(loss_d)
        ok = ~nonfinite
        noise = self._samples.noise()  # > 1 for a smaller batch (epoch end)
        grad_spike, grad_z, typical = self.grad_spike(stats.global_norm, ok, noise)
        if loss_d is not None and self.policy.on_loss_spike != "none":
            loss_spike, loss_z, _ = self.loss_spike(loss_d, ok, noise)

        ctx = ClipContext(groups, stats, [self.names[i] for i in groups.index], ok, self.device)
        ctx.spike, ctx.typical = grad_spike, typical
        self._transforms(ctx)
        clipped = ctx.global_norm
        ctx.flush()

        skip = self.decision(nonfinite, grad_spike, loss_spike)
        base_lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(base_lr, float | int):  # a host number: free to record
            self._base_lrs[self.steps] = float(base_lr)
        self.lr.prepare(base_lr)
        with self.lr.applied(), self._usage.stepping():
            self.stepper.step(groups.params, skip)
        for hook in self.after_step:
            hook()
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.update()
        self.skipped.add_(skip.long())
        for g in groups.grads:
            g._gradguard_version = g._version  # type: ignore[attr-defined]

        row = pack_row(stats.full_norms(len(self.params)),
                       loss=loss_d if loss_d is not None else self._nan,
                       grad_norm=stats.global_norm, clipped_norm=clipped, skipped=skip,
                       nonfinite=nonfinite, grad_spike=grad_spike, loss_spike=loss_spike,
                       lr_scale=self.lr.tensor, grad_z=grad_z, loss_z=loss_z)
        self.mailbox.post(self.steps, row)
        step = self.steps
        self.steps += 1
        rolled = self._host_side(step)
        return StepInfo(step, loss_d, stats.global_norm, clipped, skip, nonfinite, grad_spike,
                        loss_spike, self.lr.tensor, stats.norms, rolled)

    def _measure(self, groups: Any, loss_d: Tensor | None
                 ) -> tuple[GradStats, Tensor | None, Any]:
        """The fused norm pass; under torch.distributed, agreed across ranks."""
        if self._sync is None:
            return compute_stats(groups, self.device), loss_d, groups
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
        return stats, loss_d, groups

    # -- host side ---------------------------------------------------------------------
    def _host_side(self, step: int) -> bool:
        """Process the rows that reached the host; maybe roll back; take snapshots."""
        rolled = False
        for k, values in self.mailbox.poll():
            rolled = self._on_row(k, values) or rolled
        if self.store is not None and not rolled:
            self.store.maybe_take(step, self._trajectory)
        self.recorder.maybe_flush(step)
        return rolled

    def _judge(self, cand: snap.Snapshot) -> None:
        """Keep a snapshot when the steps before it were clean and the loss was calm."""
        assert self.store is not None
        cw = self.store.cfg.clean_window
        c = self.control
        calm = c is None or (c.calm_now() and c.held_since(cand.guard.get("control", {}), cw))
        if self._clean_streak >= cw and calm:
            self.store.keep(cand)

    def _on_row(self, k: int, values: np.ndarray) -> bool:
        rec = self.recorder.row(k, values, len(self.params))
        rec["lr"] = self._base_lrs.pop(k, None)
        norms = rec["_norms"]
        flagged = rec["skipped"] or rec["grad_spike"] or rec["loss_spike"] or rec["nonfinite"]
        self._clean_streak = 0 if flagged else self._clean_streak + 1
        self._skip_streak = self._skip_streak + 1 if rec["skipped"] else 0
        if rec["nonfinite"] and self._inputs is None and self._first_module is not None \
                and self._sync is None:
            # Inputs differ per rank, so under torch.distributed the data is not blamed.
            self._inputs = InputWatch(self._first_module, lambda: self.steps)
        if flagged:
            ev.describe_flags(self.recorder, self.attribution, rec, norms)
        else:
            self.attribution.learn(norms)
        for kind, msg in (("depth_trend", self.depth.update(norms)),
                          ("drift", self.drift.update(rec["grad_norm"]))):
            if msg:
                self.recorder.event(k, kind, msg, action="warn")
        if k < self._ignore_rows_before:
            return False  # a step taken before the last rollback took effect
        rolled = self._stability(rec, bool(flagged))
        # A snapshot taken after step s is judged by rows s+1 … s+clean_window: their
        # losses are the first ones computed with its weights and their descendants.
        due = k - max(1, self.store.cfg.clean_window) if self.store is not None else None
        if not rolled and self.store is not None and due in self.store.candidates:
            self._judge(self.store.candidates.pop(due))
        return rolled

    def _stability(self, rec: dict[str, Any], flagged: bool) -> bool:
        """Escalation: feed the controller; lower the LR, roll back or give up."""
        p, c, k = self.policy, self.control, rec["step"]
        if rec["nonfinite"] and p.on_nonfinite == Action.RAISE:
            self._diverged(k, "NaN/Inf in gradients or loss (on_nonfinite='raise')")
        if self._skip_streak >= p.max_consecutive_skips:
            self._diverged(k, f"{self._skip_streak} consecutive steps skipped: the model "
                              "cannot recover by skipping")
        if c is None:
            return False
        c.can_retry = self.store is not None and self.store.can_retry()
        loss = rec["loss"]
        verdict = c.observe(k, None if loss is None else float(loss), flagged,
                            bool(rec["nonfinite"] or rec["loss_spike"]))
        may_roll = True
        if verdict.unstable is None:
            forced = p.immediate(rec["nonfinite"], rec["grad_spike"], rec["loss_spike"])
            if forced is not None:
                verdict = c.unstable(k, forced[0])
                may_roll = forced[1]
        self.lr.scale = verdict.scale
        if verdict.raised:
            self.recorder.event(k, "recover", f"calm for a while: LR scale raised to "
                                f"×{verdict.scale:.3g}", action="recover", lr_scale=verdict.scale)
        reason = verdict.unstable
        if reason is None:
            return False
        from_data = None
        if self.rollbacks >= 2 and self._inputs is not None and self.order \
                and ev.data_origin(self.recorder, self._inputs):
            from_data = self.names[self.order[0]]
        if verdict.give_up or from_data:
            lr = self._base_lrs.get(k) or self.optimizer.param_groups[0]["lr"]
            self._diverged(k, ev.give_up(reason, c.scale, lr, from_data))
        rb = p.rollback
        if rb is not None and rb.max_rollbacks is not None and self.rollbacks >= rb.max_rollbacks:
            self._diverged(k, f"{reason}, after {self.rollbacks} rollbacks "
                              f"(max_rollbacks={rb.max_rollbacks})")
        if self.store is not None and self.store.good and may_roll:
            loss_bad = rec["loss_spike"] or (loss is not None and not math.isfinite(loss))
            # A snapshot is kept when the clean_window rows after it were clean; failing
            # that same test right after being restored (a streak that began within
            # clean_window rows), it holds the damage, not the LR: go one further back
            # at the LR the run had.
            since = k - self._ignore_rows_before
            if since < self.store.cfg.clean_window + c.cfg.bad_steps and self.rollbacks \
                    and loss_bad and self.store.discard_latest():
                verdict = c.not_the_lr()
                self.lr.scale = verdict.scale
            self._rollback(k, reason, verdict.retry)
            return True
        # No snapshot undid the damage: the weights are elsewhere now, and so is what is
        # normal for their loss and gradients. Judge what follows from here.
        c.rebaseline()
        self.grad_spike.bind(self.device)
        self.loss_spike.bind(self.device)
        self.recorder.event(k, "backoff", f"unstable: {reason}; LR scale ×{verdict.scale:.3g}"
                            " (no snapshot to roll back to)", action="backoff",
                            lr_scale=verdict.scale, reason=reason)
        return False

    def _rollback(self, step: int, reason: str, retry: bool) -> None:
        """Restore the latest good snapshot; the controller has already set the LR."""
        assert self.store is not None
        target = self.store.restore(retry)
        self._load_trajectory(target.guard)
        self.lr.progress = target.step + 1
        self.rollbacks += 1
        skip_n = self.store.cfg.skip_batches
        self._skip_batches = skip_n
        self._skip_streak = self._clean_streak = 0
        self._ignore_rows_before = self.steps
        skip = ""
        if skip_n:
            skip = (f"; skipping the next {skip_n} batches" if self._batches_used else
                    f"; NOT skipping the next {skip_n} batches: iterate with "
                    "guard.batches(loader) (or ask guard.should_skip_batch()) for that")
        lr = (f"retrying at the same LR scale ×{self.lr.scale:.3g} (a sudden failure of a "
              "healthy run: a transient fault is likelier than the LR)" if retry
              else f"LR scale ×{self.lr.scale:.3g}")
        self.recorder.event(
            step, "rollback", f"unstable: {reason}; rolled back to the state after step "
            f"{target.step}, {lr}{skip}",
            action="rollback", to_step=target.step, reason=reason, lr_scale=self.lr.scale)

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
        latest = self.store.latest if self.store is not None else None
        return ev.diagnosis(self.recorder, self.steps, self.rollbacks, self.lr.scale,
                            latest.step if latest is not None else None)

    def verdict(self) -> str:
        """One sentence on how the run went and what to change (also logged at close)."""
        return ev.verdict(self.recorder, self.control, self.rollbacks,
                          self.optimizer.param_groups[0]["lr"])

    # -- state -------------------------------------------------------------------------
    def _trajectory(self) -> dict[str, Any]:
        """The guard state that describes the current weights (rolled back with them)."""
        out = {"clip": self.clip.state_dict(), "grad_spike": self.grad_spike.state_dict(),
               "loss_spike": self.loss_spike.state_dict(),
               "decision": self.decision.state_dict()}
        if self.control is not None:
            out["control"] = self.control.trajectory()
        return out

    def _load_trajectory(self, s: dict[str, Any]) -> None:
        self.clip.load_state_dict(snap.clone_tree(s["clip"]))
        self.grad_spike.load_state_dict(s["grad_spike"])
        self.loss_spike.load_state_dict(s["loss_spike"])
        self.decision.load_state_dict(s["decision"])
        if self.control is not None and "control" in s:
            self.control.load_trajectory(s["control"])

    def _drain(self) -> None:
        """Wait for and process every row still in flight (a host sync, on purpose)."""
        for k, values in self.mailbox.poll(wait=True):
            self._on_row(k, values)

    def close(self) -> None:
        """Process the rows still in flight, write the run's verdict, close the sinks."""
        if self._closed:
            return
        self._usage.remove()
        self._samples.remove()
        if self._inputs is not None:
            self._inputs.remove()
        lifecycle.unregister(self, self._finalizer)
        try:
            self._drain()
            if self._started:
                self.recorder.event(self.steps, "verdict", self.verdict(), action="info")
        finally:
            self.recorder.close()
            self._closed = True

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def state_dict(self, snapshots: bool = False) -> dict[str, Any]:
        """The guard's own state (not the model's or optimizer's), versioned: the dict of
        its parts' states.

        Args:
            snapshots: include the in-memory rollback snapshots (each the size of the
                model plus its optimizer state), so that a resumed run rolls back to
                exactly where the uninterrupted one would. Without them, a resumed guard's
                first rollback target is the state it resumed from.
        """
        self._drain()
        return {
            "format": STATE_VERSION, "gradguard": __version__, "config": self._config(),
            "steps": self.steps, "skipped": self.skipped.detach().clone(),
            "rollbacks": self.rollbacks,
            "controller": None if self.control is None else self.control.state_dict(),
            "lr": self.lr.state_dict(),
            "rollback": None if self.store is None else self.store.state_dict(snapshots),
            "attribution": {k: torch.as_tensor(v) for k, v in
                            self.attribution.state_dict().items()},
            # Host-side bookkeeping a resumed run needs to decide as the uninterrupted one.
            "host": {"skip_streak": self._skip_streak, "clean_streak": self._clean_streak,
                     "skip_batches": self._skip_batches, "depth": self.depth.state_dict(),
                     "drift": self.drift.state_dict()},
            **self._trajectory(),
        }

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
                parameters match; the decision and controller when the policy matches;
                each detector when its state fits) and the rest keeps its fresh state,
                relearned within its warm-up.

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
            self._load_trajectory(state)
        if skipped:
            log.warning("gradguard: guard state loaded without %s (settings differ: %s)",
                        ", ".join(skipped), "; ".join(diff))
        self.steps = int(state["steps"])
        self.skipped.copy_(state["skipped"])
        self.rollbacks = int(state["rollbacks"])
        h = state["host"]
        self._skip_streak, self._clean_streak = int(h["skip_streak"]), int(h["clean_streak"])
        self._skip_batches = int(h["skip_batches"])
        self.depth.load_state_dict(h["depth"])
        self.drift.load_state_dict(h["drift"])
        self.lr.load_state_dict(state["lr"])
        if self.store is not None and state["rollback"] is not None:
            self.store.load_state_dict(state["rollback"])
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


def _policy(policy: Policy | None, on_nonfinite: str | None, on_spike: str | None,
            on_loss_spike: str | None, rollback: Any) -> Policy:
    """The policy with the ``Guard(on_*=..., rollback=...)`` shortcuts applied."""
    policy = policy if policy is not None else Policy()
    if not isinstance(policy, Policy):
        raise ConfigError(f"policy must be a gradguard.Policy, got {policy!r}; use "
                          "Policy(on_spike=...) or the on_* shortcuts")
    if rollback is not None and rollback is not False and not isinstance(rollback, Rollback):
        raise ConfigError(f"rollback takes a gradguard.Rollback, or False to turn rollback "
                          f"off, got {rollback!r}")
    overrides = {k: v for k, v in (("on_nonfinite", on_nonfinite), ("on_spike", on_spike),
                                   ("on_loss_spike", on_loss_spike), ("rollback", rollback))
                 if v is not None}
    if overrides.get("rollback") is False:
        overrides["rollback"] = None
    if not overrides:
        return policy
    return Policy(**{**{f: getattr(policy, f) for f in policy.__dataclass_fields__},
                     **overrides})


def _clip(clip: Transform | Sequence[Transform] | None) -> Transform:
    if clip is None:
        return chain()
    if isinstance(clip, str) or not isinstance(clip, Transform | Sequence):
        raise ConfigError(f"clip takes a gradguard.clip transform or a list of them, got "
                          f"{clip!r}; e.g. clip=gg.clip.GlobalNorm(1.0)")
    return clip if isinstance(clip, Transform) else chain(*clip)


def _hooks(after_step: Any) -> tuple[Callable[[], object], ...]:
    hooks = (tuple(after_step) if isinstance(after_step, Sequence)
             else () if after_step is None else (after_step,))
    if not all(callable(h) for h in hooks):
        raise ConfigError(f"after_step takes a callable or a list of them, got {after_step!r}")
    return hooks


def _check_fresh_grads(grads: Sequence[Tensor]) -> None:
    # A gradient the guard already stepped carries the version it had then; backward()
    # either makes a new tensor or bumps the version by accumulating into it.
    if all(getattr(g, "_gradguard_version", None) == g._version for g in grads):
        raise GuardUsageError(
            "guard.step() was called twice on the same gradients: call loss.backward() "
            "(and optimizer.zero_grad()) between steps"
        )


def _unscale(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Unscale AMP gradients once, before anything measures them."""
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


def _run_closure(loss: Tensor | None, closure: Callable[[], Tensor]) -> Tensor:
    if loss is not None:
        raise GuardUsageError("guard.step() takes the loss or a closure, not both: the "
                              "closure computes the loss and calls backward() itself")
    if not callable(closure):
        raise GuardUsageError(f"closure must be callable, got {type(closure).__name__}")
    with torch.enable_grad():
        return closure()
