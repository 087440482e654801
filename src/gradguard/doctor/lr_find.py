"""Learning-rate range test on a copy of the model and optimizer.

Exponential LR ramp, EMA-smoothed loss with bias correction, stop when the smoothed loss
exceeds ``diverge_factor`` times its best (or turns non-finite). Reference: Smith 2017,
"Cyclical Learning Rates for Training Neural Networks", section 3.3; the conventions
(β = 0.98 smoothing, ×4 divergence threshold, suggestion = LR at the minimum / 10, the
steepest-descent LR as a second opinion) follow fastai's ``lr_find`` and torch-lr-finder.
"""

from __future__ import annotations

import collections
import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError, check_int

__all__ = ["LRFindResult", "as_batch", "clone_optimizer", "cycle_batches", "is_batch", "loss_value",
           "lr_find"]

Batch = tuple[Tensor, Tensor]


@dataclass
class LRFindResult:
    """The curve and what it says."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    diverged_at: float | None = None  # LR where the smoothed loss blew past the threshold
    suggested: float | None = None  # a tenth of the LR at the loss minimum (fastai's rule)
    # Why ``suggested`` is not that tenth (it fell below the tested range); else None.
    note: str | None = None
    steepest: float | None = None  # LR at the steepest descent of the smoothed curve
    min_loss_lr: float | None = None

    def plot(self, path: str, user_lr: float | None = None) -> str:
        """Write loss vs LR as a PNG (log-x), marking the suggestion and the user's LR."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.losses, color="C0")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("smoothed loss")
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite:
            lo, hi = min(finite), min(max(finite), 4 * min(finite) if min(finite) > 0
                                      else max(finite))
            ax.set_ylim(lo - 0.05 * abs(lo), hi + 0.1 * abs(hi))
        if self.suggested:
            ax.axvline(self.suggested, color="C2", ls="--",
                       label=f"suggested {self.suggested:.2g}")
        if self.diverged_at:
            ax.axvline(self.diverged_at, color="C3", ls=":",
                       label=f"diverges {self.diverged_at:.2g}")
        if user_lr:
            ax.axvline(user_lr, color="k", ls="-.", label=f"your LR {user_lr:.2g}")
        ax.legend()
        ax.set_title("gradguard lr-find")
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # (as the HTML report does)
        try:
            fig.savefig(path, dpi=100)
        finally:
            plt.close(fig)
        return path


def clone_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module,
                    copy_model: nn.Module) -> torch.optim.Optimizer:
    """A copy of ``optimizer`` over ``copy_model``'s parameters; the original is untouched.

    A fresh optimizer of the same class is built from the param groups (hyper-parameters
    kept, no state). An optimizer whose constructor needs more than the param groups (a
    required hyper-parameter, a wrapper around another optimizer) is deep-copied instead,
    with every parameter re-pointed at its counterpart in ``copy_model``.

    Args:
        optimizer: the user's optimizer, built over ``model``'s parameters.
        model: the model ``optimizer`` steps.
        copy_model: a deep copy of ``model``; the clone steps its parameters.

    Returns:
        The clone.

    Raises:
        ConfigError: neither way works; the message says what to change.
    """
    mapping = {id(p): q for p, q in zip(model.parameters(), copy_model.parameters(),
                                        strict=True)}
    groups = []
    for g in optimizer.param_groups:
        params = [mapping[id(p)] for p in g["params"] if id(p) in mapping]
        hp = {k: v for k, v in g.items() if k != "params"}
        if isinstance(hp.get("lr"), Tensor):
            hp["lr"] = float(hp["lr"])
        groups.append({"params": params, **hp})
    cls = type(optimizer)
    try:
        return cls(groups)
    except Exception as e:  # (any constructor error: the deep copy below may still work)
        rebuild_error = e
    try:
        return _deepcopy_onto(optimizer, model, copy_model)
    except Exception as e:
        raise ConfigError(
            f"the doctor trains copies of the optimizer and cannot copy {cls.__name__}: "
            f"{cls.__name__}(param_groups) fails ({type(rebuild_error).__name__}: "
            f"{rebuild_error}) and copy.deepcopy fails ({type(e).__name__}: {e}). Give its "
            "constructor's hyper-parameters defaults (they are read back from the param "
            "groups) or make it deep-copyable") from e


def _deepcopy_onto(optimizer: torch.optim.Optimizer, model: nn.Module,
                   copy_model: nn.Module) -> torch.optim.Optimizer:
    """A deep copy of ``optimizer`` whose references to ``model`` are to ``copy_model``."""
    # The memo makes deepcopy hand back the copy's parameter (or module) wherever the
    # optimizer refers to one: its param groups, its state's keys, an inner optimizer.
    memo: dict[int, object] = {id(p): q for p, q in zip(model.parameters(),
                                                        copy_model.parameters(), strict=True)}
    memo.update((id(a), b) for a, b in zip(model.modules(), copy_model.modules(),
                                           strict=True))
    # The whole __dict__, not copy.deepcopy(optimizer): Optimizer.__getstate__ keeps only
    # defaults, state and param_groups, and would drop a wrapper's inner optimizer.
    clone = type(optimizer).__new__(type(optimizer))
    memo[id(optimizer)] = clone
    clone.__dict__.update(copy.deepcopy(optimizer.__dict__, memo))
    # Hooks are the original's (a guard's refusal of steps outside guard.step among
    # them): the copy steps freely.
    for name in list(vars(clone)):
        if name.startswith("_optimizer_") and name.endswith("_hooks"):
            setattr(clone, name, collections.OrderedDict())
        elif callable(vars(clone)[name]) and hasattr(type(clone), name):
            # An instance attribute over a method: an LR scheduler's wrapper of `step`,
            # which calls the original optimizer's. The copy uses its class's method.
            delattr(clone, name)
    return clone


def is_batch(data: object) -> bool:
    """One ``(inputs, targets)`` batch: a tuple, or the list a DataLoader collates
    (``next(iter(loader))``), of two tensors."""
    return isinstance(data, tuple | list) and len(data) == 2 and \
        all(isinstance(t, Tensor) for t in data)


def as_batch(b: object) -> Batch:
    """``b`` as an ``(inputs, targets)`` tuple, or a ConfigError that says what to pass."""
    if is_batch(b):
        return (b[0], b[1])  # type: ignore[index]
    if isinstance(b, dict):
        got = f"a dict with keys {sorted(map(str, b))[:6]}"
    elif isinstance(b, tuple | list):
        got = (f"a {type(b).__name__} of {len(b)}: "
               f"{', '.join(type(t).__name__ for t in b[:4])}")
    else:
        got = type(b).__name__
    raise ConfigError(
        f"the doctor reads each batch as (inputs, targets), two tensors, and calls "
        f"loss_fn(model(inputs), targets); got {got}. Adapt the data to that, e.g. "
        "((b['input_ids'], b['labels']) for b in loader) for dict batches or "
        "((x, y) for x, y, _ in loader) to drop a third item, and let loss_fn unpack "
        "whatever model(inputs) returns")


def cycle_batches(data: Batch | Iterable[Batch]) -> Iterator[Batch]:
    """Endless batches from one batch or an iterable of batches (re-iterated when spent).

    Args:
        data: one ``(inputs, targets)`` batch, an iterable of batches (re-iterated), or a
            one-pass iterator such as a generator (the batches it yields are kept, then
            replayed).

    Returns:
        An endless iterator of ``(inputs, targets)`` tuples.
    """
    if is_batch(data):
        return itertools.repeat(as_batch(data))
    if not isinstance(data, Iterable):
        as_batch(data)  # (raises, naming what it got)
    if isinstance(data, Iterator):
        return _replay(data)

    def gen() -> Iterator[Batch]:
        while True:
            yielded = False
            for b in data:  # type: ignore[union-attr]
                yielded = True
                yield as_batch(b)
            if not yielded:
                raise ConfigError("the data iterable yielded no batches")
    return gen()


def _replay(it: Iterator[object]) -> Iterator[Batch]:
    """The batches of a one-pass iterator, then the same ones again, endlessly."""
    # Only what is read is kept, so a long loader is never drained past what is used.
    seen: list[Batch] = []
    for b in it:
        seen.append(as_batch(b))
        yield seen[-1]
    if not seen:
        raise ConfigError("the data iterator yielded no batches (was it already consumed?)")
    yield from itertools.cycle(seen)


def loss_value(loss: object) -> float:
    """The loss as a float, or a ConfigError when ``loss_fn`` did not return a scalar.

    Args:
        loss: what ``loss_fn(model(inputs), targets)`` returned.

    Returns:
        Its value.
    """
    if not isinstance(loss, Tensor):
        raise ConfigError(f"the loss function must return a scalar tensor, got "
                          f"{type(loss).__name__}: return the loss itself, e.g. "
                          "nn.CrossEntropyLoss()(outputs, targets)")
    if loss.numel() != 1:
        raise ConfigError(
            f"the loss function must return a scalar, got a tensor of shape "
            f"{tuple(loss.shape)}: use reduction='mean' (e.g. nn.CrossEntropyLoss(), not "
            "reduction='none') or return loss.mean()")
    return float(loss.detach())


def lr_find(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Batch | Iterable[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    beta: float = 0.98,
    diverge_factor: float = 4.0,
) -> LRFindResult:
    """Run the range test on copies; ``model`` and ``optimizer`` are left untouched."""
    if not (math.isfinite(start_lr) and start_lr > 0 and math.isfinite(end_lr)
            and end_lr > start_lr):
        raise ConfigError(f"lr_find: the range must rise from a positive start_lr to a larger "
                          f"end_lr, got {start_lr!r} → {end_lr!r}")
    num_iter = check_int("lr_find.num_iter", num_iter, 2)
    m = copy.deepcopy(model)
    m.train()
    opt = clone_optimizer(optimizer, model, m)
    batches = cycle_batches(data)
    gamma = (end_lr / start_lr) ** (1 / max(1, num_iter - 1))
    res = LRFindResult()
    avg, best = 0.0, math.inf
    for i in range(num_iter):
        lr = start_lr * gamma**i
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(m(x), y)
        value = loss_value(loss)
        if not math.isfinite(value):
            if i == 0:
                raise ConfigError(
                    f"the loss is {value} before any step (at the model's initial weights): "
                    "no LR is to blame. Check the inputs and targets for NaN/Inf, the loss "
                    "function's domain (a log of 0, a division by 0) and the init "
                    "(gradguard doctor)")
            res.diverged_at = lr
            break
        loss.backward()
        opt.step()
        avg = beta * avg + (1 - beta) * value
        smooth = avg / (1 - beta ** (i + 1))
        res.lrs.append(lr)
        res.losses.append(smooth)
        if smooth < best:
            best = smooth
            res.min_loss_lr = lr
        if i > 5 and smooth > diverge_factor * best:
            res.diverged_at = lr
            break
    res.steepest = _steepest(res.lrs, res.losses)
    if res.min_loss_lr is not None:
        # The minimum sits just before divergence; a tenth of it is Smith's "still falling
        # fast" region and is robust where the steepest slope is noisy (broken models).
        res.suggested = res.min_loss_lr / 10
        if res.suggested < start_lr:
            # Nothing below start_lr was tested: suggesting it would be a guess.
            res.suggested = start_lr
            res.note = (f"the loss was lowest at {res.min_loss_lr:.3g}, near the start of the "
                        f"range, so the suggestion is clamped to start_lr {start_lr:.3g}: "
                        "lower start_lr or raise num_iter to look below it")
    return res


def _steepest(lrs: list[float], losses: list[float]) -> float | None:
    """LR at the steepest descent of the smoothed loss (on log-LR), ignoring the ends."""
    n = len(losses)
    if n < 10:
        return None
    cut = max(1, n // 10)
    xs = [math.log(v) for v in lrs]
    best_i, best_slope = None, 0.0
    for i in range(cut, n - cut):
        slope = (losses[i + 1] - losses[i - 1]) / (xs[i + 1] - xs[i - 1])
        if slope < best_slope:
            best_i, best_slope = i, slope
    return lrs[best_i] if best_i is not None else None
