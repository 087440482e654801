"""Detectors: which steps are in trouble, and where the trouble starts.

Two kinds, by where they run:

* **Device detectors** (:class:`NormSpike`, :class:`LossSpike`) decide *this* step: their
  flags feed the skip and LR-backoff decisions on the device, so they are written with
  tensor ops only and keep their statistics in device tensors.
* **Host analyzers** (:class:`LayerAttribution`, :class:`DepthTrend`, :class:`Drift`)
  explain and warn: they read the per-step rows the recorder brings to the host and
  produce events. They never hold up a step.

Non-finite detection needs no detector of its own: it is the stats pass's flag.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, UnknownNameError, check_int, check_positive
from .state import TensorState
from .stats import finite

__all__ = ["DepthTrend", "Detector", "Drift", "Flag", "LayerAttribution", "LossSpike",
           "NormSpike", "make", "register"]

_TINY = 1e-30


# MAD → σ for normal data (1.4826 = 1/Φ⁻¹(3/4)).
_MAD_SIGMA = 1.4826


class Flag(NamedTuple):
    """A device detector's verdict on one step (0-dim device tensors).

    Attributes:
        spike: the step is flagged.
        z: how far out it is, in robust standard deviations (0 before the detector is
            ready); recorded in the step's row.
        typical: the value the detector expected (its window's median; the value itself
            before any history). The spike clamp scales a flagged gradient to it.
    """

    spike: Tensor
    z: Tensor
    typical: Tensor


@runtime_checkable
class Detector(Protocol):
    """What the guard needs of a per-step device detector (``Policy.grad_spike`` and
    ``Policy.loss_spike`` take any object that has these; the guard works on a copy).

    ``__call__`` must use tensor ops only (no host reads): it runs on every step.
    """

    def bind(self, device: torch.device) -> None:
        """Allocate state on ``device``."""

    def __call__(self, value: Tensor, ok: Tensor, noise: float = 1.0) -> Flag:
        """Judge this step's ``value`` (the global gradient norm or the loss); learn from it
        only where ``ok`` (0-dim bool: the step is finite). ``noise`` >= 1 widens the test
        for a smaller batch than usual."""

    def state_dict(self) -> dict[str, Any]:
        """The detector's state, for checkpoints and rollback."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""


class _RobustWindow(TensorState):
    """A rolling window of recent values on the device, summarised by median and MAD.

    Median and MAD ignore the odd outlier that would inflate a mean and a variance (or an
    EMA of them), so the detectors built on them neither miss the second spike after a
    first one nor learn a steady blow-up as normal.
    """

    window: int

    def bind(self, device: torch.device) -> None:
        self.state = {"buf": torch.full((self.window,), math.nan, device=device),
                      "count": torch.zeros((), dtype=torch.long, device=device)}
        # Constants as device tensors: a Python number in torch.where costs a kernel.
        self._zero = torch.zeros((), device=device)

    def stats(self) -> tuple[Tensor, Tensor]:
        """(median, robust σ) of the window (NaN while it is empty)."""
        buf = self.state["buf"]
        med = torch.nanmedian(buf)
        return med, _MAD_SIGMA * torch.nanmedian((buf - med).abs())

    def learn(self, value: Tensor, when: Tensor) -> None:
        """Append ``value`` to the window where ``when`` holds (a 0-dim bool tensor)."""
        s = self.state
        # A one-element index tensor: indexing with a 0-dim one reads it on the host.
        slot = torch.remainder(s["count"], self.window).reshape(1)
        s["buf"].index_copy_(0, slot, torch.where(when, value, s["buf"][slot]))
        s["count"].add_(when)


class NormSpike(_RobustWindow):
    """Gradient-norm spike: log‖g‖ far above the median of a rolling window.

    Working in log space makes the test scale-free (a spike is a *factor* above the
    typical norm). After ``warmup`` finite norms, a step is a spike when its log norm is
    more than ``z_thresh`` robust standard deviations (MAD-based) above the window's
    median *and* at least ``min_ratio`` times the median norm. Before that, a norm more
    than ``early_ratio`` times the median so far (plus ``z_thresh`` σ once three norms
    exist) is a spike: a run that explodes from step one has no calm history. Spikes
    enter the window clipped to ``min_ratio`` × the median, so a lasting level shift is
    learned within a window or two, while a steady exponential blow-up keeps outrunning
    the median.

    References: OLMo-core's skip rule, mean + 6σ over the last 128 steps
    (``olmo_core/optim/skip_step_optimizer.py``), here with median/MAD (Hampel 1974) in
    place of mean/σ; the z-score test of Kumar et al. 2025 (ZClip), section 3.
    """

    def __init__(self, window: int = 64, z_thresh: float = 6.0, warmup: int = 10,
                 min_ratio: float = 3.0, early_ratio: float = 10.0) -> None:
        self.window = check_int("NormSpike.window", window, 4)
        self.z_thresh = check_positive("NormSpike.z_thresh", z_thresh)
        self.warmup = check_int("NormSpike.warmup", warmup, 1)
        if self.warmup > self.window:
            raise ConfigError(f"NormSpike.warmup ({warmup}) must be <= window ({window})")
        self.min_ratio = check_positive("NormSpike.min_ratio", min_ratio)
        self.early_ratio = check_positive("NormSpike.early_ratio", early_ratio)

    def bind(self, device: torch.device) -> None:
        super().bind(device)
        self._log_min_ratio = torch.tensor(math.log(self.min_ratio), device=device)

    def __call__(self, norm: Tensor, ok: Tensor, noise: float = 1.0) -> Flag:
        """Judge this step's global norm (a :class:`Flag` of 0-dim tensors).

        ``typical`` is the median norm of the window (the norm itself before any has been
        seen); the guard clips spikes down to it. ``noise`` >= 1 is how much larger
        sampling noise alone can make this step's norm (a smaller batch at an epoch's
        end): the norm is judged divided by it.
        """
        count = self.state["count"]
        x = torch.log(norm.float().clamp_min(_TINY))
        if noise != 1.0:
            x = x - math.log(noise)
        med, sigma = self.stats()
        ready = count >= self.warmup
        seen = count > 0
        dev = torch.where(seen, x - med, self._zero)
        spread = torch.where(count >= 3, self.z_thresh * sigma, self._zero)
        z = torch.where(ready, dev / (sigma + 1e-12), self._zero)
        late = ready & (dev > self.z_thresh * sigma) & (dev > math.log(self.min_ratio))
        early = seen & ~ready & (dev > math.log(self.early_ratio) + spread)
        spike = ok & (late | early)
        typical = torch.where(seen, torch.exp(med), norm.float())
        # A spike enters at min_ratio × the median (not at the z threshold, which would
        # widen the MAD it is measured by): a level shift is learned within a window or
        # two, while a steady exponential blow-up outruns the median and stays flagged.
        cap = med + torch.where(ready, self._log_min_ratio,
                                math.log(self.early_ratio) + spread)
        self.learn(torch.where(spike, cap, x), ok & finite(x))
        return Flag(spike, z, typical)


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
    at a higher loss stops being flagged once the window has filled.

    References: OLMo-core skips steps whose loss exceeds mean + 6σ of a rolling window
    (``olmo_core/optim/skip_step_optimizer.py``); here with median/MAD (Hampel 1974).
    """

    def __init__(self, window: int = 64, z_thresh: float = 6.0, ratio: float = 1.5,
                 min_count: int = 10, early_ratio: float = 2.5, floor: float = 0.05) -> None:
        self.window = check_int("LossSpike.window", window, 4)
        self.z_thresh = check_positive("LossSpike.z_thresh", z_thresh)
        self.ratio = check_positive("LossSpike.ratio", ratio)
        self.min_count = check_int("LossSpike.min_count", min_count, 2)
        if self.min_count > self.window:
            raise ConfigError(f"LossSpike.min_count ({min_count}) must be <= window ({window})")
        self.early_ratio = check_positive("LossSpike.early_ratio", early_ratio)
        self.floor = check_positive("LossSpike.floor", floor, allow_zero=True)

    def bind(self, device: torch.device) -> None:
        super().bind(device)
        self.state["first"] = torch.full((), math.nan, device=device)
        self._early = torch.tensor(self.early_ratio, device=device)
        self._early_sq = torch.tensor(self.early_ratio ** 2, device=device)

    def __call__(self, loss: Tensor, ok: Tensor, noise: float = 1.0) -> Flag:
        """Judge this step's loss (``typical``: the window's median loss); ``noise`` >= 1
        widens the thresholds for a step whose batch is smaller than usual."""
        s = self.state
        loss = loss.float().reshape(())
        med, sigma = self.stats()
        if noise != 1.0:
            sigma = sigma * noise
        count = s["count"]
        ready = count >= self.min_count
        seen = count > 0
        dev = torch.where(seen, loss - med, self._zero)
        floor = self.floor * torch.nan_to_num(s["first"].abs(), nan=0.0)
        # Positive losses are compared on a log scale: late in training a batch's loss is
        # skewed to the right (a few hard examples), and a harder batch at 3× the median
        # is ordinary there, not 7 linear σ. Losses that can be <= 0 stay linear.
        logs = torch.log(self.state["buf"].clamp_min(_TINY))
        lmed = torch.nanmedian(logs)
        # The noise comes from successive differences (neighbours in the ring are
        # neighbours in time, but for the one pair across the write slot): a falling loss
        # spreads the window around its median, which would pass a trend off as noise.
        steps = logs - torch.roll(logs, 1)
        lsig = _MAD_SIGMA / math.sqrt(2) * torch.nanmedian(steps.abs()) * noise
        pos = (med > 0) & (loss > 0)
        z = torch.where(pos, (torch.log(loss.clamp_min(_TINY)) - lmed) / (lsig + 1e-12),
                        dev / (sigma + 1e-12))
        z = torch.where(ready, z, self._zero)
        ratio_ok = (med <= 0) | (loss > self.ratio * med)
        late = ready & (z > self.z_thresh) & (dev > floor) & ratio_ok
        spread = torch.where(count >= 3, self.z_thresh * sigma, self._zero)
        # With fewer than three losses there is no noise estimate: only a gross jump
        # (early_ratio squared) counts, since two batches can differ by early_ratio alone.
        early_bound = torch.where(count >= 3, self._early, self._early_sq) * noise * med
        early = seen & ~ready & (med > 0) & (loss > early_bound) & (dev > spread)
        spike = ok & (late | early)
        good = ok & finite(loss)
        # Early spikes enter clipped to the early bound: a wrecked first step must not fill
        # the window with values that hide the next spike.
        self.learn(torch.where(early, early_bound, loss), good & ~late)
        s["first"].copy_(torch.where(good & ~seen, loss, s["first"]))
        return Flag(spike, z, torch.where(seen, med, loss))


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
                          "not a detector (bind, __call__, state_dict, load_state_dict)")
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
    forward order** whose deviation passes ``z_thresh`` (or whose norm is non-finite):
    where the blow-up starts, as seen from the input side.
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
        if not np.all(np.isfinite(norms)):
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
        origin = next((self.names[i] for i in self.order if z[i] > self.z_thresh), None)
        return Attribution(origin, top)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.mean, self.var, self.count = np.asarray(s["mean"]), np.asarray(s["var"]), s["count"]


def _line_fit(y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` against 0, 1, 2, … and the Pearson correlation.

    The same numbers as ``np.polyfit(x, y, 1)[0]`` and ``np.corrcoef(x, y)[0, 1]`` in
    closed form: a few dot products instead of an SVD, since the analyzers run every step.
    The correlation is NaN when ``y`` is constant.
    """
    xc = np.arange(len(y), dtype=np.float64)
    xc -= xc.mean()
    yc = y - y.mean()
    sxy, sxx, syy = float(xc @ yc), float(xc @ xc), float(yc @ yc)
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
        self.names = list(names)
        self.threshold = threshold
        self.patience = patience
        self.streak = 0
        self.active = False

    def ratio(self, norms: np.ndarray) -> float | None:
        if len(self.idx) < 3:
            return None
        v = norms[self.idx]
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
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


class Drift:
    """Slow drift: the global norm growing steadily over a window (an early warning).

    Fits a line to log‖g‖ over the last ``window`` finite steps; warns when the fitted
    growth across the window exceeds ``factor`` and the fit is consistent (correlation
    above ``min_corr``), then stays quiet for a window.
    """

    def __init__(self, window: int = 200, factor: float = 4.0, min_corr: float = 0.7) -> None:
        self.window = window
        self.factor = factor
        self.min_corr = min_corr
        self.buf: deque[float] = deque(maxlen=window)
        self.cooldown = 0

    def update(self, norm: float) -> str | None:
        if math.isfinite(norm) and norm > 0:
            self.buf.append(math.log(norm))
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
        if growth > self.factor and corr > self.min_corr:
            self.cooldown = self.window
            return (f"gradient norm drifting up: ×{growth:.3g} over the last {len(y)} steps "
                    f"(steady, r={corr:.2f}); a spike may follow — consider a lower LR")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"buf": list(self.buf), "cooldown": self.cooldown}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.buf = deque((float(v) for v in s["buf"]), maxlen=self.window)
        self.cooldown = int(s["cooldown"])
