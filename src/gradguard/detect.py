"""Detectors: which steps are in trouble, and where the trouble starts.

Two kinds, by where they run:

* **Spike detectors** (:class:`NormSpike`, :class:`LossSpike`) decide *this* step. They
  keep their statistics on the host and hand the device a limit per step (a host
  number); the device flags a step whose value is above it, with one comparison, and
  the flags feed the skip and clip decisions there. Each step's row then comes back to
  the host, where the detector learns from it. The decisions need no host sync, and
  the robust statistics (medians of windows) cost the device nothing: done as tensor
  ops they were ~115 tiny kernels per step, three quarters of the guard's (issue 14).
* **Host analyzers** (:class:`LayerAttribution`, :class:`DepthTrend`, :class:`Drift`)
  explain and warn: they read the per-step rows the recorder brings to the host and
  produce events. They never hold up a step.

Non-finite detection needs no detector of its own: it is the stats pass's flag.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from .errors import ConfigError, UnknownNameError, check_int, check_positive

__all__ = ["DeadLayers", "DepthTrend", "Detector", "Drift", "Flag", "LayerAttribution",
           "Limits", "LossSpike", "NormSpike", "judge", "make", "register"]

_TINY = 1e-30


# MAD → σ for normal data (1.4826 = 1/Φ⁻¹(3/4)).
_MAD_SIGMA = 1.4826


class Limits(NamedTuple):
    """What a detector expects of the next step, as host numbers.

    Attributes:
        above: a finite step whose value is above this is a spike (``math.inf``: no test
            yet). The device compares the step's value with it: one kernel, no sync.
        typical: the value the detector expects (its window's median; ``math.inf``
            before any history). The spike clamp scales a flagged gradient to it.
    """

    above: float
    typical: float


class Flag(NamedTuple):
    """A detector's verdict on one value (host numbers; see :func:`judge`).

    Attributes:
        spike: the value is flagged.
        z: how far out it is, in robust standard deviations (0 before the detector is
            ready); recorded in the step's row.
        typical: the value the detector expected.
    """

    spike: bool
    z: float
    typical: float


@runtime_checkable
class Detector(Protocol):
    """What the guard needs of a spike detector (``Policy.grad_spike`` and
    ``Policy.loss_spike`` take any object that has these; the guard works on a copy).

    A detector lives on the host. Before each step the guard asks for its
    :meth:`limits`; the device flags the step when its value (the global gradient norm,
    or the loss) is above ``limits().above`` — a comparison with a host number, which
    needs no sync. When the step's row reaches the host (at once on a CPU, a step or two
    later on a GPU), :meth:`observe` learns from it. So a detector's statistics may lag
    its flags by the rows still in flight, never the other way round.
    """

    def bind(self, device: torch.device) -> None:
        """Start afresh (no history)."""

    def limits(self, noise: float = 1.0) -> Limits:
        """The limits for the next step; ``noise`` >= 1 widens them for a smaller batch
        than usual."""

    def observe(self, value: float, ok: bool, spike: bool, noise: float = 1.0) -> float:
        """Learn from one step's ``value`` (only where ``ok``: the step is finite);
        ``spike`` is the device's flag for it. Returns the value's z-score for the
        record."""

    def state_dict(self) -> dict[str, Any]:
        """The detector's state, for checkpoints and rollback."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (:class:`ConfigError` if it does not fit)."""


def _above_one(name: str, value: float) -> float:
    """A ratio to the typical value that marks a spike: a spike is above the typical
    value, so a ratio at or below 1 would flag (or clip) ordinary steps."""
    v = check_positive(name, value)
    if v <= 1:
        raise ConfigError(f"{name} must be > 1 (a ratio to the typical value; at or below "
                          f"1 ordinary steps would count as spikes), got {value!r}")
    return v


def judge(det: Detector, value: float, ok: bool = True, noise: float = 1.0) -> Flag:
    """Flag one value and learn from it, as the guard does over a step (on the host).

    For using a detector on its own, e.g. on a series of losses from a log.
    """
    lim = det.limits(noise)
    spike = bool(ok and value > lim.above)
    return Flag(spike, det.observe(value, ok, spike, noise), lim.typical)


def _nanmedian(values: Sequence[float], full: bool = False) -> float:
    """``torch.nanmedian``: the lower middle of the non-NaN values (NaN when none);
    ``full``: there is no NaN among them (a filled window), so none is looked for."""
    s = sorted(values) if full else sorted(v for v in values if v == v)
    return s[(len(s) - 1) // 2] if s else math.nan


def _log(v: float) -> float:
    """``log(max(v, _TINY))``, NaN for NaN."""
    return math.log(v) if v > _TINY else (math.log(_TINY) if v == v else math.nan)


def _exp(v: float) -> float:
    return math.exp(v) if v < 709.0 else math.inf


class _RobustWindow:
    """A rolling window of recent values on the host, summarised by median and MAD.

    Median and MAD ignore the odd outlier that would inflate a mean and a variance (or an
    EMA of them), so the detectors built on them neither miss the second spike after a
    first one nor learn a steady blow-up as normal. Empty slots hold NaN; the summary is
    cached until the window changes (a step asks for it twice: limits, then observe).
    """

    window: int
    _KEYS: tuple[str, ...] = ("buf", "count")
    # Saved since the early checks' stand-down; a state without them loads as "none seen".
    _OPTIONAL: tuple[str, ...] = ("lo", "hi", "rise", "fall")

    def bind(self, device: torch.device | None = None) -> None:
        self.buf = [math.nan] * self.window
        self.count = 0
        self._summary: tuple[float, ...] | None = None
        # Over the values learned as ordinary (not flagged) while the early check runs, in
        # learned units: their range, and the largest rise and fall between two of them.
        self.lo, self.hi = math.inf, -math.inf
        self.rise = self.fall = 0.0

    def _ordinary(self, x: float, log: bool) -> None:
        """Learn the range and the up and down moves of the ordinary values (``log``:
        they are log values, moves are differences; else positive values, moves ratios)."""
        if self.hi > -math.inf:
            if log:
                self.rise, self.fall = max(self.rise, x - self.lo), max(self.fall, self.hi - x)
            else:
                self.rise = max(self.rise, x / self.lo if self.lo > 0 else math.inf)
                self.fall = max(self.fall, self.hi / x if x > 0 else math.inf)
        self.lo, self.hi = min(self.lo, x), max(self.hi, x)

    def stand_down(self) -> None:
        """Stand the early check down: the run measured its batch noise at fixed weights
        above the check's margin (see :meth:`gradguard.host.HostSide.echo`)."""
        self.rise = self.fall = math.inf

    def _noisy(self, margin: float) -> bool:
        """The ordinary values have both risen and fallen by more than ``margin`` (a ratio, or
        a log difference): batch noise at least that wide, not a trend. A ratio test with
        that margin has nothing to judge by."""
        return self.rise > margin and self.fall > margin

    def stats(self) -> tuple[float, float]:
        """(median, robust σ) of the window (NaN while it is empty)."""
        return self.summary()[:2]

    def summary(self) -> tuple[float, ...]:
        if self._summary is None:
            # Only finite values are learned: once the window is full it holds no NaN.
            full = self.count >= self.window
            med = _nanmedian(self.buf, full)
            self._summary = (med, _MAD_SIGMA * _nanmedian([abs(v - med) for v in self.buf],
                                                          full), *self._more(full))
        return self._summary

    def _more(self, full: bool) -> tuple[float, ...]:
        return ()

    def learn(self, value: float) -> None:
        self.buf[self.count % self.window] = value
        self.count += 1
        self._summary = None

    def state_dict(self) -> dict[str, Any]:
        # Host numbers (a copy): restoring a snapshot reads no tensor.
        return {"buf": list(self.buf), "count": self.count, "lo": self.lo, "hi": self.hi,
                "rise": self.rise, "fall": self.fall}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = type(self).__name__
        if not set(self._KEYS) <= set(state) <= set(self._KEYS) | set(self._OPTIONAL):
            raise ConfigError(f"{name}: state has keys {sorted(state)}, expected "
                              f"{sorted(self._KEYS)}; it was saved by another detector")
        buf = state["buf"]
        if isinstance(buf, torch.Tensor):  # saved by gradguard <= 0.1's device detectors
            buf = buf.detach().cpu().reshape(-1).tolist()
        buf = [float(v) for v in buf]
        if len(buf) != self.window:
            raise ConfigError(f"{name}: state holds a window of {len(buf)} values, this "
                              f"detector has window={self.window}")
        self.buf, self.count = buf, int(state["count"])
        self._summary = None
        self.lo = float(state.get("lo", math.inf))
        self.hi = float(state.get("hi", -math.inf))
        self.rise, self.fall = float(state.get("rise", 0.0)), float(state.get("fall", 0.0))


class NormSpike(_RobustWindow):
    """Gradient-norm spike: log‖g‖ far above the median of a rolling window.

    Working in log space makes the test scale-free (a spike is a *factor* above the
    typical norm). After ``warmup`` finite norms, a step is a spike when its log norm is
    more than ``z_thresh`` robust standard deviations (MAD-based) above the window's
    median *and* at least ``min_ratio`` times the median norm. Before that, a norm more
    than ``early_ratio`` times the median so far (plus ``z_thresh`` σ once three norms
    exist) is a spike: a run that explodes from step one has no calm history
    (``early_ratio=None``: no early test, for a model known to be trained, whose batches
    can differ by decades; see the README's "Fine-tuning a trained model"). Spikes
    enter the window clipped to ``min_ratio`` × the median, so a lasting level shift is
    learned within a window or two, while a steady exponential blow-up keeps outrunning
    the median.

    References: OLMo-core's skip rule, mean + 6σ over the last 128 steps
    (``olmo_core/optim/skip_step_optimizer.py``), here with median/MAD (Hampel 1974) in
    place of mean/σ; the z-score test of Kumar et al. 2025 (ZClip), section 3.
    """

    def __init__(self, window: int = 64, z_thresh: float = 6.0, warmup: int = 10,
                 min_ratio: float = 3.0, early_ratio: float | None = 10.0) -> None:
        self.window = check_int("NormSpike.window", window, 4)
        self.z_thresh = check_positive("NormSpike.z_thresh", z_thresh)
        self.warmup = check_int("NormSpike.warmup", warmup, 1)
        if self.warmup > self.window:
            raise ConfigError(f"NormSpike.warmup ({warmup}) must be <= window ({window})")
        self.min_ratio = _above_one("NormSpike.min_ratio", min_ratio)
        self.early_ratio = None if early_ratio is None else \
            _above_one("NormSpike.early_ratio", early_ratio)
        self.bind()

    def _bound(self, med: float, sigma: float) -> float:
        """The log norm above which a norm is a spike; also where a spike enters."""
        if self.count >= self.warmup:
            return med + max(self.z_thresh * sigma, math.log(self.min_ratio))
        if self.early_ratio is None:
            return math.inf
        spread = self.z_thresh * sigma if self.count >= 3 else 0.0
        return med + math.log(self.early_ratio) + spread

    def limits(self, noise: float = 1.0) -> Limits:
        """A norm above ``above`` is a spike. ``noise`` >= 1 is how much larger sampling
        noise alone can make this step's norm (a smaller batch at an epoch's end): the
        norm is judged divided by it."""
        if self.count == 0:
            return Limits(math.inf, math.inf)
        med, sigma = self.stats()
        bound = self._bound(med, sigma)
        if self.count < self.warmup and self._noisy(bound - med):
            # The early check's margin is inside the spread the run's ordinary norms have
            # already shown (a trained model's batches differ by decades): it has nothing
            # to judge by, and waits for the window's own noise estimate.
            return Limits(math.inf, _exp(med))
        return Limits(_exp(bound) * noise, _exp(med))

    def observe(self, value: float, ok: bool, spike: bool, noise: float = 1.0) -> float:
        x = _log(value) - (math.log(noise) if noise != 1.0 else 0.0)
        med, sigma = self.stats()
        z = (x - med) / (sigma + 1e-12) if self.count >= self.warmup else 0.0
        if ok and math.isfinite(x):
            # A spike enters at min_ratio × the median (not at the z threshold, which
            # would widen the MAD it is measured by): a level shift is learned within a
            # window or two, while a steady exponential blow-up outruns the median and
            # stays flagged.
            early = self.count < self.warmup
            if not early:
                margin = math.log(self.min_ratio)
            elif self.early_ratio is None:
                margin = math.inf
            else:
                margin = math.log(self.early_ratio) + \
                    (self.z_thresh * sigma if self.count >= 3 else 0.0)
            cap = med + margin
            self.learn(min(x, cap) if spike else x)
            if early and not spike:  # (only the early check reads the moves)
                self._ordinary(x, log=True)
        return z


class LossSpike(_RobustWindow):
    """Loss spike: the loss far above the median of a rolling window of recent losses.

    After ``min_count`` losses, a step is a spike when the loss is more than ``z_thresh``
    robust standard deviations above the window's median (of log losses, when they are
    positive: a batch's loss is skewed to the right), more than ``floor`` × the first
    loss above it (a noise floor: once a loss is near zero, a batch at 5× the median is
    still a small loss, not an event), and (for positive losses) more than ``ratio`` times
    the median. On the log scale the noise is read from successive differences, so a
    falling loss's trend is not taken for noise. Spikes do not enter the window.

    Before ``min_count`` losses, a positive loss more than ``early_ratio`` times the
    median so far (and ``z_thresh`` σ above it once three losses exist) is a spike: a
    too-high LR can wreck a model in its first few steps, before any statistics exist
    (with fewer than three losses, ``early_ratio`` squared: two batches alone can differ
    by ``early_ratio``). Early spikes enter clipped to that bound, so a run that settles
    at a higher loss stops being flagged once the window has filled. ``early_ratio=None``
    turns the early test off (a model known to be trained: fine-tuning).

    References: OLMo-core skips steps whose loss exceeds mean + 6σ of a rolling window
    (``olmo_core/optim/skip_step_optimizer.py``); here with median/MAD (Hampel 1974).
    """

    _KEYS = ("buf", "count", "first")

    def __init__(self, window: int = 64, z_thresh: float = 6.0, ratio: float = 1.5,
                 min_count: int = 10, early_ratio: float | None = 2.5,
                 floor: float = 0.05) -> None:
        self.window = check_int("LossSpike.window", window, 4)
        self.z_thresh = check_positive("LossSpike.z_thresh", z_thresh)
        self.ratio = check_positive("LossSpike.ratio", ratio)  # (<= 1: that test off)
        self.min_count = check_int("LossSpike.min_count", min_count, 2)
        if self.min_count > self.window:
            raise ConfigError(f"LossSpike.min_count ({min_count}) must be <= window ({window})")
        self.early_ratio = None if early_ratio is None else \
            _above_one("LossSpike.early_ratio", early_ratio)
        self.floor = check_positive("LossSpike.floor", floor, allow_zero=True)
        self.bind()

    def bind(self, device: torch.device | None = None) -> None:
        super().bind(device)
        self.logs = [math.nan] * self.window  # the window's log losses, kept alongside
        self.first = math.nan

    def learn(self, value: float) -> None:
        self.logs[self.count % self.window] = _log(value)
        super().learn(value)

    def _more(self, full: bool) -> tuple[float, ...]:
        # Positive losses are compared on a log scale: late in training a batch's loss is
        # skewed to the right (a few hard examples), and a harder batch at 3× the median
        # is ordinary there, not 7 linear σ. The noise comes from successive differences
        # (neighbours in the ring are neighbours in time, but for the one pair across the
        # write slot): a falling loss spreads the window around its median, which would
        # pass a trend off as noise.
        logs = self.logs
        steps = [abs(a - b) for a, b in zip(logs, logs[-1:] + logs[:-1], strict=True)]
        return _nanmedian(logs, full), _MAD_SIGMA / math.sqrt(2) * _nanmedian(steps, full)

    def _tests(self, noise: float) -> tuple[float, float, float, float, float, float]:
        """(median, σ, log median, log σ, noise floor, early bound) for this noise."""
        med, sigma, lmed, lsig = self.summary()
        first = 0.0 if math.isnan(self.first) else abs(self.first)
        ratio = self.early_ratio
        early = math.inf if ratio is None else \
            (ratio if self.count >= 3 else ratio ** 2) * noise * med
        return med, sigma * noise, lmed, lsig * noise, self.floor * first, early

    def limits(self, noise: float = 1.0) -> Limits:
        """A loss above ``above`` is a spike (``noise`` >= 1 widens the thresholds for a
        step whose batch is smaller than usual); ``typical`` is the window's median."""
        if self.count == 0:
            return Limits(math.inf, math.inf)
        med, sigma, lmed, lsig, floor, early = self._tests(noise)
        if self.count >= self.min_count:
            if med > 0:
                above = max(_exp(lmed + self.z_thresh * (lsig + 1e-12)), med + floor,
                            self.ratio * med)
            else:  # losses that can be <= 0 stay linear
                above = max(med + self.z_thresh * (sigma + 1e-12), med + floor)
        else:
            spread = self.z_thresh * sigma if self.count >= 3 else 0.0
            above = max(early, med + spread) if med > 0 else math.inf
            if self._stands_down(above, med):
                above = math.inf
        return Limits(above, med)

    def _stands_down(self, above: float, med: float) -> bool:
        """The early check has nothing to judge by: the losses learned as ordinary already
        differ by more than its margin (a trained model's batches, from 0 to 0.3, or
        a fast first fall), so it waits for the window's noise estimate (log scale)."""
        if not (med > 0 and math.isfinite(above)) or self.early_ratio is None:
            return False
        return self._noisy(max(above / med, self.early_ratio ** 2))

    def observe(self, value: float, ok: bool, spike: bool, noise: float = 1.0) -> float:
        med, sigma, lmed, lsig, floor, early_bound = self._tests(noise)
        seen, ready = self.count > 0, self.count >= self.min_count
        dev = value - med if seen else 0.0
        if med > 0 and value > 0:
            z = (_log(value) - lmed) / (lsig + 1e-12)
        else:
            z = dev / (sigma + 1e-12)
        z = z if ready else 0.0
        late = ready and z > self.z_thresh and dev > floor and \
            (med <= 0 or value > self.ratio * med)
        spread = self.z_thresh * sigma if self.count >= 3 else 0.0
        early = seen and not ready and med > 0 and value > early_bound and dev > spread \
            and not self._stands_down(max(early_bound, med + spread), med)
        if ok and math.isfinite(value):
            if not seen:
                self.first = value
            if not late:
                # Early spikes enter clipped to the early bound: a wrecked first step must
                # not fill the window with values that hide the next spike.
                self.learn(early_bound if early else value)
                if not (early or ready):  # (only the early check reads the moves)
                    self._ordinary(value, log=False)
        return z

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "first": self.first}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.logs = [_log(v) for v in self.buf]
        self.first = float(state["first"])


# --------------------------------------------------------------------------------------
# Detectors by name, for settings that come from a config file or a command line.

_REGISTRY: dict[str, Callable[[], Detector]] = {"norm_spike": NormSpike,
                                                "loss_spike": LossSpike}


def register(name: str, factory: Callable[[], Detector]) -> None:
    """Make ``factory`` (a class or function returning a :class:`Detector`) available by
    ``name``, so that ``Policy(grad_spike=name)`` builds one; a name registered again is
    replaced."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a detector's name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ConfigError(f"register({name!r}, ...) needs a class or function that builds "
                          f"a detector, got {factory!r}")
    _REGISTRY[name] = factory


def make(name: str) -> Detector:
    """A fresh detector of the registered ``name`` (see :func:`register`)."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"no detector named {name!r}; registered: "
                               f"{sorted(_REGISTRY)} (gg.detect.register adds one)")
    det = _REGISTRY[name]()
    if not isinstance(det, Detector):
        raise ConfigError(f"the factory registered as {name!r} returned {det!r}, which is "
                          "not a detector (bind, limits, observe, state_dict, load_state_dict)")
    return det


# --------------------------------------------------------------------------------------
# Host analyzers: numpy on the rows the recorder delivers.


@dataclass
class Attribution:
    """Where a flagged step's gradients deviated most from their own history."""

    origin: str | None
    top: list[tuple[str, float]] = field(default_factory=list)


class LayerAttribution:
    """Per-tensor z-scores of log gradient norms against each tensor's own EMA.

    For a flagged step it names the tensors that deviated most and the **first tensor in
    forward order** whose deviation passes ``z_thresh``: where the blow-up starts, as seen
    from the input side. When some gradients are non-finite, the origin is the *last*
    of those in forward order instead: backpropagation carries a NaN from where it arose
    to every layer before it, never after it. When all are non-finite (a NaN in the
    inputs, the forward pass or the loss) the gradients cannot place it, and the origin is
    the first layer, where the inputs enter (the guard then watches them to tell).
    """

    def __init__(self, names: Sequence[str], order: Sequence[int], alpha: float = 0.95,
                 z_thresh: float = 3.0, top_k: int = 3, warmup: int = 5) -> None:
        self.names = list(names)
        self.order = list(order)
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.top_k = top_k
        self.warmup = warmup
        n = len(names)
        self.mean = np.zeros(n)
        self.var = np.zeros(n)
        self.count = 0

    def zscores(self, norms: np.ndarray) -> np.ndarray:
        x = np.log(np.maximum(np.nan_to_num(norms, nan=np.inf, posinf=np.inf), _TINY))
        if self.count < self.warmup:
            return np.where(np.isfinite(x), 0.0, np.inf)
        z = (x - self.mean) / np.sqrt(self.var + 1e-6)
        return np.where(np.isfinite(x), z, np.inf)

    def learn(self, norms: np.ndarray) -> None:
        """Update the per-tensor statistics with a clean step's norms."""
        if not np.isfinite(norms).all():
            return
        x = np.log(np.maximum(norms, _TINY))
        self.count += 1
        if self.count == 1:
            self.mean = x.copy()
            return
        a = self.alpha if self.count > self.warmup else 1 - 1 / self.count
        d = x - self.mean
        self.mean = self.mean + (1 - a) * d
        self.var = a * (self.var + (1 - a) * d * d)

    def attribute(self, norms: np.ndarray) -> Attribution:
        z = self.zscores(norms)
        ranked = np.argsort(-np.where(np.isnan(z), -np.inf, z))[: self.top_k]
        top = [(self.names[i], float(z[i])) for i in ranked if z[i] > 0]
        bad = ~np.isfinite(norms)
        if bad.any() and not bad.all():
            origin = next(self.names[i] for i in reversed(self.order) if bad[i])
        else:
            origin = next((self.names[i] for i in self.order if z[i] > self.z_thresh), None)
        return Attribution(origin, top)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.mean, self.var, self.count = np.asarray(s["mean"]), np.asarray(s["var"]), s["count"]


@functools.lru_cache(maxsize=8)
def _centred(n: int) -> tuple[np.ndarray, float]:
    """0, 1, …, n−1 minus their mean, and its sum of squares (read-only, shared)."""
    xc = np.arange(n, dtype=np.float64)
    xc -= xc.mean()
    xc.setflags(write=False)
    return xc, float(xc @ xc)


def _line_fit(y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` against 0, 1, 2, … and the Pearson correlation.

    The same numbers as ``np.polyfit(x, y, 1)[0]`` and ``np.corrcoef(x, y)[0, 1]`` in
    closed form: a few dot products instead of an SVD, since the analyzers run every step.
    The correlation is NaN when ``y`` is constant.
    """
    xc, sxx = _centred(len(y))
    yc = y - y.mean()
    sxy, syy = float(xc @ yc), float(yc @ yc)
    slope = sxy / sxx
    corr = sxy / math.sqrt(sxx * syy) if syy > 0 else math.nan
    return slope, corr


class DepthTrend:
    """Vanishing/exploding with depth: the slope of log layer-gradient norms over depth.

    Uses weight tensors (two or more dimensions) in forward order. ``ratio`` is the
    input-side norm over the output-side norm, from a least-squares line through the log
    norms (robust to one odd layer). Flags after ``patience`` consecutive steps beyond
    ``threshold`` either way: ratio < 1/threshold means gradients vanish toward the
    input; ratio > threshold means they explode toward it.
    Reference: Glorot & Bengio 2010, section 4.2 (back-propagated gradient variance
    across layers); Pascanu et al. 2013, section 2.
    """

    def __init__(self, names: Sequence[str], order: Sequence[int], is_weight: Sequence[bool],
                 threshold: float = 100.0, patience: int = 20) -> None:
        self.idx = [i for i in order if is_weight[i]]
        self._take = np.asarray(self.idx, dtype=np.intp)
        self.names = list(names)
        self.threshold = threshold
        self.patience = patience
        self.streak = 0
        self.active = False

    def ratio(self, norms: np.ndarray) -> float | None:
        if len(self.idx) < 3:
            return None
        v = norms[self._take]
        if not (v > 0).all() or not np.isfinite(v).all():  # (NaN > 0 is False)
            return None
        y = np.log(v)
        slope, _ = _line_fit(y)
        return float(np.exp(-slope * (len(y) - 1)))

    def update(self, norms: np.ndarray) -> str | None:
        """Feed one step; return a message the first time a trend has persisted."""
        r = self.ratio(norms)
        bad = r is not None and (r > self.threshold or r < 1 / self.threshold)
        self.streak = self.streak + 1 if bad else 0
        if bad and self.streak >= self.patience and not self.active:
            self.active = True
            assert r is not None
            first, last = self.names[self.idx[0]], self.names[self.idx[-1]]
            if r < 1:
                return (f"vanishing gradients: the input-side layer ({first}) gets {1 / r:.3g}× "
                        f"smaller gradients than the output side ({last}) "
                        f"for {self.streak} steps")
            return (f"exploding gradients with depth: the input-side layer ({first}) gets "
                    f"{r:.3g}× larger gradients than the output side ({last}) "
                    f"for {self.streak} steps")
        if not bad:
            self.active = False
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "active": self.active}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.streak, self.active = int(s["streak"]), bool(s["active"])


class DeadLayers:
    """Dead units: the gradient stops part-way through the network, step after step.

    A ReLU whose input is negative for every example of a batch passes no gradient, and
    a tanh or sigmoid pushed far into saturation passes an exact float zero. When every
    unit of a layer is so, the layer's weights and every tensor before it in forward order
    get exactly 0 while the layers after it still get a gradient. Oversized early steps (a
    too-high LR, unscaled inputs, a bad init) leave units there for good: with no gradient,
    no step at any LR moves them back ("dying ReLU": Lu et al. 2019, "Dying ReLU and
    Initialization: Theory and Numerical Examples").

    The test is structural, so healthy runs do not meet it: on a row, the tensors that got
    a gradient tensor (a ``None`` gradient is a tensor the step did not use: a dropped
    layer, an unsampled task head, an expert with no tokens, a frozen layer) are walked in
    forward order; the ones before the first nonzero norm form the *dead prefix*, counted
    only among tensors that had a gradient on an earlier row (a zero-initialised branch
    before its gate opens is not dead) and that still require one. A batch the model fits
    exactly has no nonzero norm at all and no prefix; a dead unit in one residual branch
    does not stop the gradient reaching the layers before it, and the network learns on.

    The host acts on it only where the run never learned (see
    ``HostSide.dead_before_training``); a snapshot whose rows show a dead prefix is not
    kept. As a trigger for every run it did not pay (a bad init that dies at chance scores
    better than its own restored weights; benchmarks/RESULTS.md, "Dead units").

    Args:
        names: parameter names, in the guard's order.
        order: forward order (input side first) of those indices.
        streak: rows in a row with a dead prefix before it is reported (one batch on which
            a layer's few live units all happen to be off is chance).
        recent: rows over which the end state is judged (:meth:`ended`).
    """

    def __init__(self, names: list[str], order: list[int], streak: int = 3,
                 recent: int = 50) -> None:
        self.names, self.streak = names, streak
        self.order = np.asarray(order, dtype=np.int64)
        self.seen = np.zeros(len(names), dtype=bool)  # had a gradient on some row
        self.run = 0  # rows in a row with a dead prefix
        self.run_start: int | None = None  # the step of the first of them
        self.first: int | None = None  # the run's first reported episode began here
        self.last: tuple[str, str, int] | None = None  # the latest dead prefix found
        # Whether each recent row had a dead prefix: a nearly dead layer flickers (one
        # unit fires on one batch), so the end state is what most recent rows show.
        self.recent: deque[bool] = deque(maxlen=recent)

    def update(self, step: int, norms: np.ndarray, present: np.ndarray | None = None,
               trainable: Callable[[int], bool] | None = None) -> str | None:
        """Feed one row; a warning the first time a dead prefix lasts ``streak`` rows.

        Args:
            step: the row's step.
            norms: its per-tensor gradient norms.
            present: which tensors had a gradient tensor this step (None: all).
            trainable: whether a tensor still requires a gradient (asked only for the
                tensors of a dead prefix).
        """
        if not np.isfinite(norms).all():
            return None  # (a NaN row says nothing about which units are off)
        order = self.order if present is None else self.order[present[self.order]]
        live = np.flatnonzero(norms[order] > 0)
        if not len(live):
            return None  # no gradient anywhere: a batch the model fits exactly
        prefix = order[: live[0]]
        prefix = prefix[self.seen[prefix]]
        if trainable is not None and len(prefix):
            prefix = prefix[[trainable(int(i)) for i in prefix]]
        self.seen[order[norms[order] > 0]] = True
        dead = bool(len(prefix))
        self.recent.append(dead)
        if not dead:
            self.run, self.run_start = 0, None
            return None
        self.last = (self.names[prefix[-1]], self.names[order[live[0]]], len(prefix))
        if self.run == 0:
            self.run_start = step
        self.run += 1
        if self.run < self.streak or self.first is not None:
            return None
        self.first = self.run_start
        deepest, after, n = self.last
        more = f" and {n - 1} tensor{'s' if n > 2 else ''} before it" if n > 1 else ""
        return (f"dead units: no gradient has reached {deepest}{more} since step "
                f"{self.first} ({self.run} steps in a row) while {after} still gets one: "
                "the units in between are off for every example (ReLUs below zero, or "
                "tanh/sigmoid saturated), and no LR moves them back; the oversized steps "
                "that killed them came earlier (a too-high LR, unscaled inputs or a bad "
                "init)")

    def recently(self) -> bool:
        """Whether any of the last ``recent`` rows had a dead prefix (a dying layer
        flickers: one unit fires on one batch, so rows without one in between do not show
        it alive)."""
        return any(self.recent)

    def restart(self, initial: bool = False) -> None:
        """Forget the episode (the weights went back to before it): a new one is reported
        afresh. ``initial``: back to the initial weights, which count as the run's start
        (a layer initialised at zero, such as an output layer, passes no gradient to the
        tensors before it on the first step, as at the run's first step)."""
        self.run, self.run_start, self.first, self.last = 0, None, None, None
        self.recent.clear()
        if initial:
            self.seen[:] = False

    def ended(self) -> tuple[str, str, int, int] | None:
        """(deepest tensor of the dead prefix, the live one after it, how many, the step
        the run's first reported episode began) when most recent rows had a dead prefix."""
        if self.first is None or self.last is None or 2 * sum(self.recent) <= len(self.recent):
            return None
        return (*self.last, self.first)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen.tolist(), "run": self.run, "run_start": self.run_start,
                "first": self.first, "last": None if self.last is None else list(self.last),
                "recent": list(self.recent)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        seen = np.asarray(s["seen"], dtype=bool)
        if seen.shape != self.seen.shape:
            return  # (saved for other parameters: start afresh)
        self.seen = seen
        self.run = int(s["run"])
        self.run_start = None if s["run_start"] is None else int(s["run_start"])
        self.first = None if s["first"] is None else int(s["first"])
        last = s["last"]
        self.last = None if last is None else (str(last[0]), str(last[1]), int(last[2]))
        self.recent = deque((bool(v) for v in s["recent"]), maxlen=self.recent.maxlen)


class Drift:
    """Slow drift: the global norm growing steadily over a window (an early warning).

    Fits a line to log‖g‖ over the last ``window`` finite steps; warns when the fitted
    growth across the window exceeds ``factor`` and the fit is consistent (correlation
    above ``min_corr``), then stays quiet for a window. Not while the loss fell as
    steadily over the same steps (its fit's correlation below ``-min_corr``): a net
    leaving a plateau grows its gradients as it starts to learn (measured: a 1-D CNN,
    ×5–10 over 200 steps while its loss fell, warned on every seed), and a norm that
    grows towards a blow-up does not come with a falling loss.
    """

    def __init__(self, window: int = 200, factor: float = 4.0, min_corr: float = 0.7) -> None:
        self.window = window
        self.factor = factor
        self.min_corr = min_corr
        self.buf: deque[float] = deque(maxlen=window)
        self.losses: deque[float] = deque(maxlen=window)
        self.cooldown = 0

    def update(self, norm: float, loss: float | None = None) -> str | None:
        """Feed one step's gradient norm (and its loss, when the guard has one)."""
        if math.isfinite(norm) and norm > 0:
            self.buf.append(math.log(norm))
        if loss is not None and math.isfinite(loss):
            self.losses.append(float(loss))
        if self.cooldown:
            self.cooldown -= 1
            return None
        if len(self.buf) < self.window:
            return None
        y = np.fromiter(self.buf, dtype=np.float64)
        slope, corr = _line_fit(y)
        if not math.isfinite(corr):  # constant norms: no trend
            return None
        growth = math.exp(slope * len(y))
        if growth > self.factor and corr > self.min_corr and not self._learning():
            self.cooldown = self.window
            return (f"gradient norm drifting up: ×{growth:.3g} over the last {len(y)} steps "
                    f"(steady, r={corr:.2f}); a spike may follow — consider a lower LR")
        return None

    def _learning(self) -> bool:
        """The loss fell steadily over the window (a raw-scale fit: a loss may be < 0)."""
        if len(self.losses) < self.window:
            return False
        _, corr = _line_fit(np.fromiter(self.losses, dtype=np.float64))
        return math.isfinite(corr) and corr < -self.min_corr

    def state_dict(self) -> dict[str, Any]:
        return {"buf": list(self.buf), "cooldown": self.cooldown, "losses": list(self.losses)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.buf = deque((float(v) for v in s["buf"]), maxlen=self.window)
        self.losses = deque((float(v) for v in s.get("losses", ())),  # (absent before it)
                            maxlen=self.window)
        self.cooldown = int(s["cooldown"])
