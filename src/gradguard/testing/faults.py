"""Fault injection: break a training loop on purpose and check the guard catches it.

Faults are small objects that say *what* goes wrong (a NaN in a gradient, a batch in the
wrong units, a learning rate ×100, a corrupted weight) and *when* (at given steps, every
n steps, or at random with a probability). An :class:`Injector` applies them through
hooks the training loop calls, and logs every injection, so a run can count what the
guard detected against what was injected::

    inj = Injector(model, optimizer, [GradFault("nan", prob=0.02), BadBatch(every=50)], seed=0)
    for step in range(steps):
        x, y = inj.batch(step, next(data))          # bad batches, corrupted weights
        optimizer.zero_grad()
        loss = inj.loss(step, loss_fn(model(x), y))   # NaN loss
        loss.backward()
        inj.after_backward(step)                     # NaN/Inf gradients
        inj.before_step(step)                        # LR spikes start
        guard.step(loss)
        inj.after_step(step)                         # ... and are undone
    print(inj.account(flagged_steps(guard.recorder.rows)))

``inj.batch`` has the ``(step, batch) -> batch`` signature of the scenarios' ``corrupt=``
hook, so batch and weight faults also plug into :func:`gradguard.scenarios.train.train`.

Randomness never touches torch's global RNG: each fault draws from a generator seeded by
``(seed, fault index, step)``, so a faulty run and a clean run with the same seed see the
same initialisation and batches, and whether a fault strikes at step k does not depend
on the other faults or on which hooks the loop calls.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, check_int, check_positive

__all__ = [
    "BadBatch",
    "Fault",
    "GradFault",
    "Injection",
    "Injector",
    "LRSpike",
    "NaNLoss",
    "Strike",
    "WeightFault",
    "flagged_steps",
    "state_is_finite",
]


@dataclass(frozen=True)
class Injection:
    """One fault striking: what, where, and the steps in which a guard can see it.

    Attributes:
        step: the step the fault struck first.
        kind: the fault's kind (``"nan_grad"``, ``"bad_inputs"``, ``"lr_spike"``, ...).
        target: what it hit: a parameter name, ``"inputs"``, ``"labels"``, ``"loss"``, ``"lr"``.
        last: the last step whose statistics can show it (a guard that flags any step in
            ``step..last`` detected it); an LR spike shows one step late, in the loss.
        detail: the fault's particulars (factor, value, element index, ...).
    """

    step: int
    kind: str
    target: str
    last: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Strike:
    """A fault acting at one step: what it may touch, its random draws, where it reports.

    Attributes:
        step: the current step.
        first: the step the fault struck first (``step`` unless it lasts several steps).
        rng: this fault's generator for this step.
        model: the model (None when the injector was given none).
        optimizer: the optimizer.
        params: ``(name, parameter)`` pairs, in model order.
    """

    step: int
    first: int
    rng: np.random.Generator
    model: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    params: list[tuple[str, Tensor]]
    _fault: Fault
    _log: list[Injection]

    def record(self, target: str, **detail: Any) -> None:
        """Log the injection: once per strike (on its first step) and target hit."""
        if self.step != self.first:
            return
        f = self._fault
        last = self.first + f.duration - 1 + f.lag
        self._log.append(Injection(self.first, f.kind, target, last, detail))

    def generator(self) -> torch.Generator:
        """A torch generator seeded from ``rng`` (torch's global RNG stays untouched)."""
        return torch.Generator().manual_seed(int(self.rng.integers(2**62)))

    def pick(self, patterns: Sequence[str] | None, count: int,
             want: Callable[[Tensor], bool] | None = None) -> list[tuple[str, Tensor]]:
        """Up to ``count`` parameters whose names match ``patterns``, chosen at random.

        Args:
            patterns: glob patterns on parameter names (None: any parameter).
            count: how many to pick.
            want: an extra predicate on the parameter (e.g. "has a gradient").
        """
        pool = [(n, p) for n, p in self.params
                if (patterns is None or any(fnmatch.fnmatchcase(n, g) for g in patterns))
                and (want is None or want(p))]
        if not pool:
            return []
        idx = self.rng.choice(len(pool), size=min(count, len(pool)), replace=False)
        return [pool[int(i)] for i in sorted(idx)]


class Fault:
    """A kind of fault and its schedule; subclasses override the hooks they act in.

    The schedule combines: explicit steps ``at``, every ``every`` steps from ``offset``,
    and a probability ``prob`` per step, all within ``[start, stop)``. A fault that
    strikes lasts ``duration`` steps and does not strike again while it lasts.

    Args:
        at: steps at which the fault strikes.
        every: strike every this many steps (from ``offset``).
        offset: first step of the ``every`` schedule.
        prob: probability of striking at any step (seeded by the injector).
        start: no strike before this step.
        stop: no strike at or after this step (None: never stops).
        duration: steps each strike lasts.
    """

    kind: ClassVar[str] = "fault"
    # Steps after a strike ends in which its effects can still first show.
    lag: int = 0

    def __init__(self, *, at: Iterable[int] = (), every: int | None = None, offset: int = 0,
                 prob: float = 0.0, start: int = 0, stop: int | None = None,
                 duration: int = 1) -> None:
        self.at = frozenset(check_int("Fault.at", _as_int(s), 0) for s in at)
        self.every = None if every is None else check_int("Fault.every", every, 1)
        self.offset = check_int("Fault.offset", offset, 0)
        self.prob = check_positive("Fault.prob", prob, allow_zero=True)
        if self.prob > 1:
            raise ConfigError(f"Fault.prob must be in [0, 1], got {prob!r}")
        self.start = check_int("Fault.start", start, 0)
        self.stop = None if stop is None else check_int("Fault.stop", stop, 0)
        self.duration = check_int("Fault.duration", duration, 1)

    def strikes(self, step: int, rng: np.random.Generator) -> bool:
        """Whether the schedule makes the fault strike at ``step``."""
        if step < self.start or (self.stop is not None and step >= self.stop):
            return False
        if step in self.at:
            return True
        if self.every is not None and step >= self.offset and \
                (step - self.offset) % self.every == 0:
            return True
        return self.prob > 0 and bool(rng.random() < self.prob)

    # Hooks, in the order the loop calls them. Each runs only on steps the fault is active.
    def batch(self, s: Strike, batch: Any) -> Any:
        """Before the forward pass: may return a corrupted batch."""
        return batch

    def loss(self, s: Strike, loss: Tensor) -> Tensor:
        """Before ``backward``: may return a corrupted loss."""
        return loss

    def after_backward(self, s: Strike) -> None:
        """After ``backward``, before ``guard.step``: may corrupt gradients."""

    def before_step(self, s: Strike) -> None:
        """Right before ``guard.step``: may change optimizer settings."""

    def after_step(self, s: Strike) -> None:
        """Right after ``guard.step``: undo what ``before_step`` changed."""

    def __repr__(self) -> str:
        def show(k: str, v: Any) -> str:
            if k == "at" and len(v) > 4:
                return f"at=<{len(v)} steps from {min(v)}>"
            return f"{k}={sorted(v) if isinstance(v, frozenset) else v!r}"

        args = ", ".join(show(k, v) for k, v in vars(self).items() if not k.startswith("_")
                         and v not in ((), frozenset(), None) and (k, v) not in _QUIET)
        return f"{type(self).__name__}({args})"


# Schedule settings at their defaults, left out of reprs.
_QUIET = {("offset", 0), ("prob", 0.0), ("start", 0), ("duration", 1)}


def _as_int(v: Any) -> Any:
    # numpy integers (from a drawn schedule) are steps too; bools and floats are not.
    return int(v) if isinstance(v, np.integer) else v


def _as_patterns(layers: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if layers is None:
        return None
    pats = (layers,) if isinstance(layers, str) else tuple(layers)
    if not pats or not all(isinstance(p, str) for p in pats):
        raise ConfigError(f"layers takes glob patterns on parameter names, got {layers!r}")
    return pats


_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class GradFault(Fault):
    """NaN or Inf written into the gradients of chosen layers, after ``backward``.

    Args:
        value: ``"nan"``, ``"inf"`` or ``"-inf"``.
        layers: glob patterns on parameter names (None: any parameter with a gradient).
        tensors: how many matching parameters to hit per strike.
        elements: how many elements of each to overwrite, or ``"all"``.
        **when: the schedule (see :class:`Fault`).
    """

    def __init__(self, value: str = "nan", layers: str | Sequence[str] | None = None,
                 tensors: int = 1, elements: int | str = 1, **when: Any) -> None:
        super().__init__(**when)
        if value not in _VALUES:
            raise ConfigError(f"GradFault.value must be one of {tuple(_VALUES)}, got {value!r}")
        self.value = value
        self.layers = _as_patterns(layers)
        self.tensors = check_int("GradFault.tensors", tensors, 1)
        if elements != "all":
            check_int("GradFault.elements", elements, 1)  # type: ignore[arg-type]
        self.elements = elements

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "nan_grad" if self.value == "nan" else "inf_grad"

    def after_backward(self, s: Strike) -> None:
        for name, p in s.pick(self.layers, self.tensors, lambda p: p.grad is not None):
            g = p.grad
            assert g is not None
            flat = g.view(-1) if g.is_contiguous() else None
            with torch.no_grad():
                if self.elements == "all" or flat is None:
                    g.fill_(_VALUES[self.value])
                    where: Any = "all"
                else:
                    n = min(int(self.elements), flat.numel())
                    where = sorted(int(i) for i in s.rng.choice(flat.numel(), n, replace=False))
                    flat[torch.tensor(where, device=g.device)] = _VALUES[self.value]
            s.record(name, value=self.value, elements=where)


class NaNLoss(Fault):
    """The loss becomes NaN (as from ``log(0)`` or ``0/0`` in a loss function).

    Args:
        grads: also poison the gradients (the loss's NaN flows through ``backward``, as a
            NaN in the loss computation does); False makes only the loss value NaN.
        **when: the schedule (see :class:`Fault`).
    """

    kind = "nan_loss"

    def __init__(self, grads: bool = True, **when: Any) -> None:
        super().__init__(**when)
        self.grads = bool(grads)

    def loss(self, s: Strike, loss: Tensor) -> Tensor:
        s.record("loss", grads=self.grads)
        if self.grads:
            return loss * math.nan
        # The value turns NaN; the gradient of the loss is untouched.
        return loss + (torch.full_like(loss, math.nan) - loss).detach()


def _factor(spec: float | tuple[float, float], rng: np.random.Generator) -> float:
    if isinstance(spec, tuple):
        lo, hi = spec
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(spec)


def _check_factor(name: str, spec: float | tuple[float, float]) -> float | tuple[float, float]:
    if isinstance(spec, tuple | list):
        if len(spec) != 2:
            raise ConfigError(f"{name} takes a number or a (low, high) pair, got {spec!r}")
        lo, hi = (check_positive(name, v) for v in spec)
        if lo > hi:
            raise ConfigError(f"{name} range must be (low, high) with low <= high, got {spec!r}")
        return (lo, hi)
    return check_positive(name, spec)


class BadBatch(Fault):
    """A corrupted batch: inputs or labels in the wrong units (×10–×10⁴ by default).

    The batch is a tensor (the inputs) or a tuple/list ``(inputs, labels, ...)``.
    Floating-point targets are multiplied by the factor; integer class labels cannot be,
    so they are replaced by random classes (a mislabelled batch).

    Args:
        target: ``"inputs"`` or ``"labels"``.
        factor: a multiplier, or a ``(low, high)`` range drawn log-uniformly per strike.
        num_classes: number of classes for integer labels (default: largest label + 1).
        **when: the schedule (see :class:`Fault`).
    """

    def __init__(self, target: str = "inputs",
                 factor: float | tuple[float, float] = (10.0, 1e4),
                 num_classes: int | None = None, **when: Any) -> None:
        super().__init__(**when)
        if target not in ("inputs", "labels"):
            raise ConfigError(f"BadBatch.target must be 'inputs' or 'labels', got {target!r}")
        self.target = target
        self.factor = _check_factor("BadBatch.factor", factor)
        self.num_classes = None if num_classes is None else \
            check_int("BadBatch.num_classes", num_classes, 2)

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"bad_{self.target}"

    def batch(self, s: Strike, batch: Any) -> Any:
        i = 0 if self.target == "inputs" else 1
        if isinstance(batch, Tensor):
            if i:
                raise ConfigError("BadBatch(target='labels') needs (inputs, labels) batches")
            return self._corrupt(s, batch)
        if not isinstance(batch, tuple | list) or len(batch) <= i:
            raise ConfigError(
                f"BadBatch needs a tensor or an (inputs, labels, ...) tuple, got "
                f"{type(batch).__name__}")
        items = list(batch)
        items[i] = self._corrupt(s, items[i])
        return type(batch)(items) if isinstance(batch, list) else tuple(items)

    def _corrupt(self, s: Strike, t: Tensor) -> Tensor:
        if t.is_floating_point():
            f = _factor(self.factor, s.rng)
            s.record(self.target, factor=f)
            return t * f
        k = self.num_classes or int(t.max()) + 1
        s.record(self.target, relabelled=True, num_classes=k)
        return torch.randint(0, k, t.shape, generator=s.generator()).to(t.device, t.dtype)


class LRSpike(Fault):
    """Every param group's learning rate ×``factor`` for ``duration`` steps, then restored.

    The guard cannot see this coming: it measures gradients, and the LR is applied with
    them. The damage shows one step later, in the loss (hence ``lag = 1``).

    Args:
        factor: the LR multiplier.
        duration: steps the spike lasts.
        **when: the schedule (see :class:`Fault`).
    """

    kind = "lr_spike"
    lag = 1

    def __init__(self, factor: float = 100.0, **when: Any) -> None:
        super().__init__(**when)
        self.factor = check_positive("LRSpike.factor", factor)
        self._saved: list[Any] | None = None

    def before_step(self, s: Strike) -> None:
        if s.optimizer is None:
            raise ConfigError("LRSpike needs the Injector to be given the optimizer")
        s.record("lr", factor=self.factor, duration=self.duration)
        groups = s.optimizer.param_groups
        self._saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * self.factor

    def after_step(self, s: Strike) -> None:
        # Put back the exact values (not lr / factor, which would drift in floating point).
        if self._saved is not None and s.optimizer is not None:
            for g, lr in zip(s.optimizer.param_groups, self._saved, strict=True):
                g["lr"] = lr
        self._saved = None


class WeightFault(Fault):
    """A weight corrupted in place before the forward pass (a bad write, a bit flip).

    This hits the model itself, not its gradients: a guard can notice the symptoms (loss
    and gradient spikes) but only a rollback to a snapshot can undo it.

    Args:
        mode: ``"zero"`` (set to 0) or ``"huge"`` (an element becomes ``factor`` × the
            tensor's largest magnitude, keeping its sign; a whole tensor is multiplied
            by ``factor``).
        factor: the multiplier for ``"huge"``.
        scope: ``"element"`` (one entry) or ``"tensor"`` (the whole parameter).
        layers: glob patterns on parameter names (None: any weight matrix or kernel).
        lag: flags within this many steps count as detecting it: a corrupted weight can
            lie dormant until a batch activates its unit (or for ever, when it kills the
            unit).
        **when: the schedule (see :class:`Fault`).
    """

    def __init__(self, mode: str = "huge", factor: float = 1e4, scope: str = "element",
                 layers: str | Sequence[str] | None = None, lag: int = 20,
                 **when: Any) -> None:
        super().__init__(**when)
        self.lag = check_int("WeightFault.lag", lag, 0)  # type: ignore[misc]
        if mode not in ("zero", "huge"):
            raise ConfigError(f"WeightFault.mode must be 'zero' or 'huge', got {mode!r}")
        if scope not in ("element", "tensor"):
            raise ConfigError(f"WeightFault.scope must be 'element' or 'tensor', got {scope!r}")
        self.mode = mode
        self.factor = check_positive("WeightFault.factor", factor)
        self.scope = scope
        self.layers = _as_patterns(layers)

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"{self.mode}_weight"

    def batch(self, s: Strike, batch: Any) -> Any:
        want = (lambda p: p.is_floating_point()) if self.layers is not None \
            else (lambda p: p.is_floating_point() and p.dim() >= 2)
        for name, p in s.pick(self.layers, 1, want):
            with torch.no_grad():
                if self.scope == "tensor":
                    if self.mode == "zero":
                        p.zero_()
                    else:
                        p.mul_(self.factor)
                    s.record(name, mode=self.mode, scope="tensor")
                    continue
                i = int(s.rng.integers(p.numel()))
                flat = p.view(-1)
                if self.mode == "zero":
                    flat[i] = 0.0
                else:
                    sign = 1.0 if float(flat[i]) >= 0 else -1.0
                    flat[i] = sign * self.factor * float(p.abs().max().clamp_min(1e-3))
                s.record(name, mode=self.mode, scope="element", index=i)
        return batch


class Injector:
    """Applies faults through hooks a training loop calls, and logs each injection.

    Args:
        model: the model (its parameter names are what ``layers=`` patterns match).
        optimizer: the optimizer (needed by :class:`LRSpike`).
        faults: the faults to inject.
        seed: seeds every random choice (schedules with ``prob``, targets, factors).

    Attributes:
        log: every :class:`Injection`, in order.
    """

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None,
                 faults: Sequence[Fault], seed: int = 0) -> None:
        for f in faults:
            if not isinstance(f, Fault):
                raise ConfigError(f"Injector takes gradguard.testing Fault objects, got {f!r}")
        if model is not None:
            params = list(model.named_parameters())
        elif optimizer is not None:
            params = [(f"group{gi}.param{pi}", p) for gi, g in enumerate(optimizer.param_groups)
                      for pi, p in enumerate(g["params"])]
        else:
            raise ConfigError("Injector needs a model or an optimizer to inject into")
        self.model = model
        self.optimizer = optimizer
        self.faults = list(faults)
        self.seed = check_int("seed", seed, 0)
        self.params = params
        self.log: list[Injection] = []
        self._until = [-1] * len(self.faults)  # last step of each fault's current strike
        self._first = [-1] * len(self.faults)
        self._step: int | None = None
        self._active: list[Strike] = []

    def _rng(self, i: int, step: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i, step, stream])

    def _strikes(self, step: int) -> list[Strike]:
        """The faults active at ``step`` (planned once per step, on the first hook)."""
        if step == self._step:
            return self._active
        if self._step is not None and step < self._step:
            # The loop went back (a resumed run): forget strikes planned past this point.
            self._until = [min(u, step - 1) for u in self._until]
        self._step = step
        active = []
        for i, f in enumerate(self.faults):
            if step > self._until[i] and f.strikes(step, self._rng(i, step, 0)):
                self._first[i] = step
                self._until[i] = step + f.duration - 1
            if self._first[i] <= step <= self._until[i]:
                active.append(Strike(step, self._first[i], self._rng(i, step, 1), self.model,
                                     self.optimizer, self.params, f, self.log))
        self._active = active
        return active

    def batch(self, step: int, batch: Any) -> Any:
        """Before the forward pass: return ``batch``, possibly corrupted."""
        for s in self._strikes(step):
            batch = s._fault.batch(s, batch)
        return batch

    def loss(self, step: int, loss: Tensor) -> Tensor:
        """Before ``backward``: return ``loss``, possibly corrupted."""
        for s in self._strikes(step):
            loss = s._fault.loss(s, loss)
        return loss

    def after_backward(self, step: int) -> None:
        """After ``backward``, before ``guard.step``: corrupt gradients."""
        for s in self._strikes(step):
            s._fault.after_backward(s)

    def before_step(self, step: int) -> None:
        """Right before ``guard.step``: apply temporary optimizer changes (LR spikes)."""
        for s in self._strikes(step):
            s._fault.before_step(s)

    def after_step(self, step: int) -> None:
        """Right after ``guard.step`` (before a scheduler step): undo them."""
        for s in reversed(self._strikes(step)):
            s._fault.after_step(s)

    def counts(self) -> dict[str, int]:
        """Injections so far, by kind."""
        out: dict[str, int] = {}
        for e in self.log:
            out[e.kind] = out.get(e.kind, 0) + 1
        return out

    def account(self, flagged: Iterable[int]) -> dict[str, dict[str, int]]:
        """Injected vs detected, by kind.

        Args:
            flagged: the steps the guard flagged (see :func:`flagged_steps`).

        Returns:
            ``{kind: {"injected": n, "detected": m}}``; an injection counts as detected
            when any step in its ``step..last`` window was flagged.
        """
        marks = np.zeros(0, dtype=bool)
        steps = sorted(set(flagged))
        if steps:
            marks = np.zeros(steps[-1] + 1, dtype=bool)
            marks[steps] = True
        out: dict[str, dict[str, int]] = {}
        for e in self.log:
            row = out.setdefault(e.kind, {"injected": 0, "detected": 0})
            row["injected"] += 1
            row["detected"] += bool(marks[e.step : e.last + 1].any())
        return out

    def unexplained(self, flagged: Iterable[int]) -> list[int]:
        """Flagged steps that no injection's window covers (false alarms, or real trouble)."""
        covered: set[int] = set()
        for e in self.log:
            covered.update(range(e.step, e.last + 1))
        return sorted(set(flagged) - covered)


def flagged_steps(records: Iterable[Mapping[str, Any]]) -> set[int]:
    """Steps a guard flagged (skipped, non-finite, gradient or loss spike).

    Args:
        records: step records: ``guard.recorder.rows`` or ``gradguard.read_jsonl(log)``.
    """
    keys = ("skipped", "nonfinite", "grad_spike", "loss_spike")
    return {int(r["step"]) for r in records
            if r.get("type", "step") == "step" and any(r.get(k) for k in keys)}


def state_is_finite(model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> bool:
    """True when every parameter and floating-point optimizer state tensor is finite.

    One max-abs pass per tensor list and one host read, cheap enough to run every step of
    a soak test. Max-abs (not the L2 norm) so a large but finite tensor does not
    overflow into a false alarm.
    """
    tensors: list[Tensor] = []
    if model is not None:
        tensors += [p.detach() for p in model.parameters()]
    if optimizer is not None:
        tensors += [p.detach() for g in optimizer.param_groups for p in g["params"]]
        tensors += [v.detach() for st in optimizer.state.values() for v in st.values()
                    if isinstance(v, Tensor) and v.is_floating_point() and v.numel()]
    tensors = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    ok = [torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(ts, math.inf)]))
          .all().cpu() for ts in by_device.values()]
    return all(bool(v) for v in ok)
