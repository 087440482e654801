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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, check_int, check_positive
from .state import TensorState

__all__ = ["DepthTrend", "Drift", "LayerAttribution", "LossSpike", "NormSpike"]

_TINY = 1e-30


class NormSpike(TensorState):
    """Gradient-norm spike: z-score of log‖g‖ against its EMA mean and variance.

    Working in log space makes the test scale-free (a spike is a *factor* above the
    typical norm). A step is a spike when z > ``z_thresh`` *and* the norm is at least
    ``min_ratio`` times the EMA's typical norm, so a run with very steady norms does not
    flag ordinary wobbles. Before ``warmup`` finite norms have been seen, a norm more than
    ``early_ratio`` times the smallest norm so far is a spike (a run that explodes from
    step one has no calm history to compare with). Spikes enter the statistics clipped
    to the threshold, so a lasting level shift is learned, slowly.

    References: the EMA z-score test of Kumar et al. 2025 (ZClip), section 3; OLMo-core's
    mean + kσ skip rule (``olmo_core/optim/skip_step_optimizer.py``); Megatron-LM's check
    against a multiple of early values.
    """

    def __init__(self, alpha: float = 0.95, z_thresh: float = 4.0, warmup: int = 10,
                 min_ratio: float = 3.0, early_ratio: float = 10.0) -> None:
        self.alpha = check_positive("NormSpike.alpha", alpha)
        if self.alpha >= 1:
            raise ConfigError(f"NormSpike.alpha must be in (0, 1), got {alpha!r}")
        self.z_thresh = check_positive("NormSpike.z_thresh", z_thresh)
        self.warmup = check_int("NormSpike.warmup", warmup, 1)
        self.min_ratio = check_positive("NormSpike.min_ratio", min_ratio)
        self.early_ratio = check_positive("NormSpike.early_ratio", early_ratio)

    def bind(self, device: torch.device) -> None:
        z = {"dtype": torch.float32, "device": device}
        self.state = {"mean": torch.zeros((), **z), "var": torch.zeros((), **z),
                      "min": torch.full((), math.inf, **z),
                      "count": torch.zeros((), dtype=torch.long, device=device)}

    def __call__(self, norm: Tensor, ok: Tensor, noise: float = 1.0
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(spike, z, typical)`` for this step's global norm (0-dim tensors).

        ``typical`` is the geometric-mean norm the statistics expect (the norm itself
        before any has been learned); the guard clips spikes down to it. ``noise`` >= 1
        is how much larger sampling noise alone can make this step's norm (a smaller
        batch: see :mod:`gradguard.samples`); the norm is judged divided by it.
        """
        s = self.state
        x = torch.log(norm.clamp_min(_TINY))
        if noise != 1.0:
            x = x - math.log(noise)
        ready = s["count"] >= self.warmup
        std = torch.sqrt(s["var"] + 1e-12)
        z = torch.where(ready, (x - s["mean"]) / std, torch.zeros_like(x))
        late = ready & (z > self.z_thresh) & (x - s["mean"] > math.log(self.min_ratio))
        early = ~ready & (s["count"] > 0) & (x - s["min"] > math.log(self.early_ratio))
        spike = ok & (late | early)
        typical = torch.where(s["count"] > 0, torch.exp(s["mean"]), norm)

        # Learning: Welford-style running mean during warm-up, EMA afterwards; spikes
        # enter clipped to the threshold. Early spikes enter too (clipped to the early
        # bound): a run knocked to a higher norm level in its first steps must still get
        # through warm-up and learn that level, not flag every later step for ever.
        cap = torch.where(ready, s["mean"] + self.z_thresh * std,
                          s["min"] + math.log(self.early_ratio))
        xc = torch.minimum(x, cap)
        n = (s["count"] + 1).to(torch.float32)
        w = torch.where(ready, torch.full_like(n, 1 - self.alpha), 1.0 / n)
        delta = xc - s["mean"]
        new_mean = s["mean"] + w * delta
        new_var = torch.where(ready, (1 - w) * (s["var"] + w * delta * delta),
                              s["var"] + (delta * (xc - new_mean) - s["var"]) / n)
        learn = ok
        s["mean"].copy_(torch.where(learn, new_mean, s["mean"]))
        s["var"].copy_(torch.where(learn, new_var, s["var"]))
        s["min"].copy_(torch.where(ok, torch.minimum(s["min"], x), s["min"]))
        s["count"].add_(learn.long())
        return spike, z, typical


class LossSpike(TensorState):
    """Loss spike: z-score *and* ratio against a rolling window of recent losses.

    A step is a spike when the loss is more than ``z_thresh`` standard deviations above
    the window mean and (for positive losses) more than ``ratio`` times that mean. Spikes
    do not enter the window. Before ``min_count`` losses have been seen, a positive loss
    more than ``early_ratio`` times the smallest loss so far is a spike (a too-high LR
    can wreck a model in its first few steps, before any statistics exist); early spikes
    enter the window clipped to that bound, so a run that settles at a higher loss stops
    being flagged once the window has filled.

    References: OLMo-core skips steps whose loss exceeds mean + 6σ of a rolling window
    (``olmo_core/optim/skip_step_optimizer.py``); Megatron-LM flags a loss far above its
    recent values.
    """

    def __init__(self, window: int = 50, z_thresh: float = 6.0, ratio: float = 1.5,
                 min_count: int = 10, early_ratio: float = 2.5) -> None:
        self.window = check_int("LossSpike.window", window, 2)
        self.z_thresh = check_positive("LossSpike.z_thresh", z_thresh)
        self.ratio = check_positive("LossSpike.ratio", ratio)
        self.min_count = check_int("LossSpike.min_count", min_count, 2)
        self.early_ratio = check_positive("LossSpike.early_ratio", early_ratio)

    def bind(self, device: torch.device) -> None:
        self.state = {"losses": torch.full((self.window,), math.nan, device=device),
                      "count": torch.zeros((), dtype=torch.long, device=device)}

    def __call__(self, loss: Tensor, ok: Tensor, noise: float = 1.0) -> tuple[Tensor, Tensor]:
        """Return ``(spike, z)`` for this step's loss; ``noise`` >= 1 widens the thresholds
        by the factor a smaller batch's loss is noisier (see :mod:`gradguard.samples`)."""
        s = self.state
        buf = s["losses"]
        loss = loss.float().reshape(())
        mean = torch.nanmean(buf)
        valid = ~torch.isnan(buf)
        nvalid = valid.sum().clamp_min(1)
        var = torch.where(valid, (buf - mean) ** 2, 0.0).sum() / nvalid
        std = torch.sqrt(var) + 1e-8 * mean.abs() + 1e-12
        if noise != 1.0:
            std = std * noise
        ready = s["count"] >= self.min_count
        z = torch.where(ready, (loss - mean) / std, torch.zeros_like(loss))
        ratio_ok = (mean <= 0) | (loss > self.ratio * mean)
        low = torch.where(valid, buf, torch.full_like(buf, math.inf)).min()
        early = ~ready & (s["count"] > 0) & (low > 0) & (loss > self.early_ratio * noise * low)
        spike = ok & ((ready & (z > self.z_thresh) & ratio_ok) | early)
        learn = ok & torch.isfinite(loss) & (~spike | ~ready)
        # Early spikes enter clipped to the early bound: a wrecked first step must not fill
        # the window with values that hide the next spike for ``window`` steps.
        entry = torch.where(early, self.early_ratio * noise * low, loss)
        slot = torch.remainder(s["count"], self.window).reshape(1)
        buf.index_copy_(0, slot, torch.where(learn, entry, buf[slot]).reshape(1))
        s["count"].add_(learn.long())
        return spike, z


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
