"""The stability controller: tells a bad batch from an unstable run and sets the LR scale.

The per-step detectors (:mod:`gradguard.detect`) flag single steps. Whether a run is
*unstable* is a question about many steps, so it is answered here, on the host, from the
rows the recorder brings back (no device sync; on a GPU the rows arrive a step or two
late, which a trend measured over tens of steps does not mind). Three classes of evidence,
and a look-alike of the second:

* **transient fault** — one flagged step (NaN/Inf, a gradient-norm or loss spike) between
  normal ones: a bad batch. The device skips it; the LR is left alone, and it does not
  count towards instability.
* **persistent instability** — ``bad_steps`` steps in a row whose loss was NaN/Inf or
  spiked (more where the run's data brings such batches so often that independent ones
  line up: :meth:`Controller.streak_needed`), or the loss *level* (the median of recent
  losses, robust to single bad batches) rising to more than (1 + ``rise``) × its best,
  beyond the noise of both (confidence bounds ``z`` standard errors wide; where the user's
  schedule raised the LR back to one the run had trained at, a warm restart, its best at
  that LR: :meth:`Controller.reference`), or above (1 + ``rise``) × the first loss (plus
  ``z`` σ of one sample's noise): the run itself is diverging, slowly or fast, or was
  wrecked in its first steps (Adam at a far too high LR) so that even its first level is
  the wrecked one.
* **a change of data** — not told from a rising level until the guard rolls back: the
  restored weights, held as restored while they are judged, then score worse than every
  loss they had when saved (:meth:`Controller.unlike_saved`), and the snapshot before
  moved with them (which tells a change of data from a snapshot holding damage), so the
  data moved, not the weights; the host returns the run to where the rollback found it,
  takes the rollback's cut back and starts the level afresh (``HostSide.restore_check``).
* **early phase** — before ``min_losses`` losses exist there is no level; then
  ``bad_steps`` flagged steps in a row count as instability, the per-step detectors'
  early checks (a norm or loss far above the first ones) supplying the flags. Later, on
  a model without recurrent layers, a streak of flagged steps still counts once the
  guard has applied one of its steps (judged against the run's own rate of flagged
  steps, as bad batches are): gradient norms that spike step after step while the steps
  go on are a blow-up under way before the loss shows it — unless the loss falls through
  them, as a run leaving a plateau does (:meth:`Controller._falling`). On a recurrent net
  they are not enough: its heavy-tailed but healthy gradient norms flag runs of steps,
  and the loss level is the better witness (``Stability.norm_streaks``).
* **an overshoot the run recovers from** — a look-alike of such a streak: as an LR nears
  its edge (a warm-up reaching its peak, a warm restart) the norm jumps for a few steps
  while the loss stays finite, and the loss comes back below where it was (the catapult
  of Lewkowycz et al. 2020). At the user's own LR (no cut in force), a streak whose
  losses were all finite is therefore judged ``window // 2`` rows later, by the median
  of those rows' losses (one lucky batch cannot fake it): back under the median of the
  three losses before the streak, or above it by less than the noise of two such
  medians, it was an overshoot and does not count (:meth:`Controller._judge_overshoot`);
  still above beyond the noise, it counts as the streak would have.
  A streak with a NaN/Inf loss, or one at an LR the guard has already cut (a relapse of
  a run found past its edge), is not waited for; during the wait the NaN/Inf and
  loss-spike streaks still count at once, and the level's tests judge every row once the
  flags stop. Where the guard keeps snapshots, the rows waited are undone with the rest
  of the unstable stretch.

Response to instability: multiply the LR scale by a factor graded by the evidence of how
far the LR is past its edge, and (when the guard keeps snapshots) return to the last
snapshot taken before the loss began to rise, so the damage of the unstable stretch is
undone rather than trained on. A run that had been training well (its loss level fell
from the first loss by at least the factor a regression must rise, 1 + ``rise``) and then
broke (a streak of bad steps) was near its edge: the scale falls by ``decrease``. A run
that failed before it ever trained well, or whose loss level climbed, was far past it:
the scale falls by ``decrease_far``, one decade, so the next
attempt lands below the edge instead of spending another failure (and its lost steps)
finding out. A run whose loss level sank back towards its first loss (the give-back
test) is first answered by clipping every later step to the typical gradient norm at the
same LR (``clip_on_giveback``), and sudden failures of healthy runs past their early
phase are first retried at the same scale (see :meth:`Controller.unstable`). The scale
has memory: it is raised again (by 1/√decrease) only after ``probe_after`` calm steps,
and a relapse soon after a raise doubles that wait — TCP's multiplicative decrease with
exponentially backed off probing (Jacobson 1988), so a run settles at a stable LR
instead of cycling across the edge. A raised LR that fails shows it in the loss level
only over a window of rows (``window``): where the run's length is known
(``Guard(total_steps=...)``) and fewer steps than that are left, the probe is not made,
for a raise that fails then leaves the run's last weights damaged with no step left to
answer it. Below ``floor`` the guard gives up: the base LR,
the init or the inputs are wrong, which the doctor diagnoses.

Reasoning borrowed from: backtracking line search (Armijo 1966; Nocedal & Wright 2006,
§3.1: shrink the step by a constant factor until the objective does not rise); PaLM's
restart-before-the-spike (Chowdhery et al. 2022, §5.1); OLMo-core's skip rule on a rolling
window (``olmo_core/optim/skip_step_optimizer.py``).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, check_bool, check_int, check_positive

__all__ = ["Controller", "CutPoint", "Stability", "Verdict"]

# The controller's LR state around a cut: (scale, probe wait, last raise, cuts).
CutPoint = tuple[float, int, int | None, int]

# A streak of bad batches counts as instability only when independent bad batches, at the
# rate this run has seen them, would produce it less often than once in this many steps.
_STREAK_FALSE_RATE = 1e-3

# Standard error of a sample median of n normal draws is about 1.2533·σ/√n (Kenney &
# Keeping 1962); σ itself comes from the MAD (1.4826 × median absolute deviation).
_MEDIAN_SE = 1.2533
_MAD_SIGMA = 1.4826

# At most this many bests are kept with their LRs (see Controller._note_best): about 60
# decades of an annealed LR at the merging step, far more than any schedule spans.
_MAX_BESTS = 256

# A flag streak is judged against the median of this many losses before it (one lucky or
# hard batch does not set the bar; more would reach back past where the streak began).
_BEFORE = 3


def _rate(rows: deque[bool], streak: int, window: int) -> float:
    """The share of True in ``rows`` before the trailing ``streak`` (0 with fewer than
    ``window`` such rows: too few to estimate a rate from)."""
    past = list(rows)[: max(0, len(rows) - streak)]
    return sum(past) / len(past) if len(past) >= window else 0.0


def _unmark(rows: deque[bool], n: int) -> None:
    """Mark the last ``n`` of ``rows`` False: rows of an episode found to be the run's,
    not independent bad batches, which must not raise the bar for the next streak."""
    for i in range(1, min(n, len(rows)) + 1):
        rows[-i] = False


def counted(n: int, noun: str) -> str:
    """``n`` and the noun, plural unless n is 1 ("1 bad step", "3 bad steps")."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _median(x: list[float]) -> float:
    # Pure Python: on windows of ~20 values it is several times faster than numpy's call
    # overhead, and this runs once per training step.
    s = sorted(x)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


@dataclass(frozen=True)
class Stability:
    """How the guard tells transient faults from persistent instability, and responds.

    Args:
        window: the loss level is the median of the last ``window`` finite losses.
        min_losses: losses needed before the level is judged (the early phase before).
        rise: the level is *regressing* when above its best by more than ``rise`` × |best|
            (0.5: the median loss is half as high again as its best).
        z: the test uses confidence bounds ``z`` standard errors wide: the best level is
            the smallest upper bound the level has had, and the level regresses when its
            lower bound is above ``(1 + rise)`` × that (a noise floor: tiny, noisy losses
            near zero are not flagged for doubling).
        bad_steps: this many steps in a row with a NaN/Inf or spiking loss (or this many
            flagged steps in a row: before a loss level exists, and on a model without
            recurrent layers, see ``norm_streaks``) are instability, not bad batches; at
            least: where bad batches are common, more are needed
            (:meth:`Controller.streak_needed`).
        decrease: LR scale multiplier when a run that had been training well (level
            fallen to under 1/(1 + ``rise``) of the first loss) breaks with a streak of bad
            steps: near its edge (a backtracking factor). The probe raises the scale by
            1/√decrease.
        decrease_far: LR scale multiplier for any other instability: a failure before the
            run trained well, or a climbing loss level (far past the edge).
        probe_after: calm steps before the scale is raised by 1/√decrease; doubled after
            each relapse (instability within ``probe_after`` steps of a raise).
        floor: give up (:class:`~gradguard.TrainingDivergedError`) when the scale would
            fall below this; except for a run that had trained well and broke after
            making progress since its last rollback, which is rolled back at the floor
            (at a thousandth of the LR, the LR is not what breaks it).
        warmup: an automatic linear LR warm-up, off by default (None). "attention"
            ramps an Adam-family optimizer (one with ``betas``, RAdam aside: its
            rectification is a warm-up) over 2/(1 − β1) steps when the model computes
            dot-product attention (found at the first step: ``nn.MultiheadAttention``, or
            a fused attention kernel or a softmax over q·kᵀ in the graph of the model's
            outputs or of the loss) and leaves other models alone: Adam's first updates
            are oversized (the excess of their size over the stationary one on noisy
            gradients is √((1 + β1ᵗ)/(1 − β1ᵗ)), gone within about 2/(1 − β1) steps), and
            attention logits are quadratic in the query and key weights, so at a high LR
            those first steps can grow them until attention collapses (Wortsman et al.
            2023, §3.1.1). It is not the default because it costs healthy runs: a
            held-out transformer at its healthy LR ended 27 % worse (median over 10
            seeds, 9 worse; benchmarks/RESULTS.md, "a warm-up for attention"). "auto"
            ramps every Adam-family optimizer over 2/(1 − β2) steps, the untuned warm-up
            of Ma & Yarats 2021 (§4; about the time Adam's second-moment estimate needs
            to become reliable, cf. RAdam, Liu et al. 2020); an int ramps any optimizer
            over that many steps; None or 0 turns it off. It stands down as soon as the
            user's own LR rises during the ramp, or when it starts below the LR their
            scheduler was built at (their schedule warms up already).
        giveback: the level also regresses when it has given back more than this
            fraction of the run's progress, from its first loss down to its best (see
            :meth:`Controller.progress_threshold`).
        clip_on_giveback: the first time that give-back test finds a run unstable, roll
            back and clip every later step to the typical gradient norm (the norm
            detector's window median) instead of lowering the LR; later instability
            lowers it as usual (see :meth:`Controller.unstable`). Needs the spike clamp
            (``on_spike`` "auto", "clip" or "backoff"); without it the LR is lowered.
        norm_streaks: past the early phase, a streak of flagged steps (gradient-norm
            spikes included, not only the loss's) is instability too, on a model the
            guard found no recurrent layer in (``Policy.clip_recurrent``: the layers
            whose heavy-tailed norms flag runs of healthy steps). The streak must have
            had a step the guard applied anyway (under ``on_spike="auto"`` all but its
            first, clipped): a skipped step leaves the weights where they were, so spikes
            that go on through skips alone are the data's or a damaged weight's doing,
            not the LR's. And the gradient norm must not have fallen below the streak's
            first: a transient (a transformer's loss spike) decays once its clipped steps
            bring the run back, a blow-up keeps climbing. As many in a row are needed as
            :meth:`Controller.streak_needed` asks at the run's own rate of flagged
            steps. At the user's LR (no cut in force), a streak whose losses were all
            finite counts only if, ``window // 2`` rows later, the loss is still above
            where the streak began, beyond the noise (an overshoot the run recovers from,
            see the module docstring). False: only the loss's streaks count after the early
            phase.
    """

    window: int = 20
    min_losses: int = 8
    rise: float = 0.5
    z: float = 3.0
    bad_steps: int = 3
    decrease: float = 0.3
    decrease_far: float = 0.1
    probe_after: int = 250
    floor: float = 1e-3
    warmup: str | int | None = None
    giveback: float = 0.5
    clip_on_giveback: bool = True
    norm_streaks: bool = True

    def __post_init__(self) -> None:
        check_int("Stability.window", self.window, 3)
        check_int("Stability.min_losses", self.min_losses, 2)
        if self.min_losses > self.window:
            raise ConfigError(f"Stability.min_losses ({self.min_losses}) must be <= window "
                              f"({self.window})")
        check_positive("Stability.rise", self.rise)
        check_positive("Stability.z", self.z, allow_zero=True)
        check_int("Stability.bad_steps", self.bad_steps, 1)
        check_positive("Stability.giveback", self.giveback)
        if not 0 < self.giveback <= 1:
            raise ConfigError(f"Stability.giveback must be in (0, 1], got {self.giveback!r}")
        for name in ("decrease", "decrease_far"):
            v = check_positive(f"Stability.{name}", getattr(self, name))
            if not v < 1:
                raise ConfigError(f"Stability.{name} must be in (0, 1), got {v!r}")
        check_int("Stability.probe_after", self.probe_after, 1)
        check_positive("Stability.floor", self.floor)
        check_bool("Stability.clip_on_giveback", self.clip_on_giveback)
        check_bool("Stability.norm_streaks", self.norm_streaks)
        if self.floor >= 1:
            raise ConfigError(f"Stability.floor must be in (0, 1), got {self.floor!r}")
        if self.warmup not in (None, "auto", "attention") and (
                isinstance(self.warmup, bool) or not isinstance(self.warmup, int)
                or self.warmup < 0):
            raise ConfigError(f"Stability.warmup must be 'attention', 'auto', an int >= 0 or "
                              f"None, got {self.warmup!r}")

    def warmup_steps(self, optimizer: Any, attention: bool = False) -> int:
        """Length of the automatic warm-up for this optimizer (0: none).

        Args:
            optimizer: the guarded optimizer (its first group's ``betas``).
            attention: whether the model computes attention (for ``"attention"``).
        """
        if self.warmup is None or (self.warmup == "attention" and not attention):
            return 0
        if self.warmup not in ("auto", "attention"):
            return int(self.warmup)
        betas = optimizer.param_groups[0].get("betas")
        if not betas:
            return 0
        if self.warmup == "auto":
            beta = float(betas[1])
        elif type(optimizer).__name__ == "RAdam":  # (by name: this module needs no torch)
            return 0
        else:  # (β1 = 0: no first moment, no oversized start to cover)
            beta = float(betas[0])
        if not 0 < beta < 1:
            return 0
        return round(2 / (1 - beta))


@dataclass(frozen=True)
class Verdict:
    """What the controller concluded from one row.

    Attributes:
        unstable: why the run counts as unstable at this row, or None.
        give_up: set when the LR scale would fall below the floor.
        scale: the LR scale to apply from now on.
        raised: the scale was raised (a probe) at this row.
        held: a probe was due at this row and not made, for the run ends before its
            failure could show: the steps left then (set once, at the first such row).
        retry: roll back and retry at the same scale (see :meth:`Controller.unstable`).
        clip: roll back at the same scale and clip every step from now on (see
            :meth:`Controller.unstable`).
        recovered: why a streak of flagged steps that was waited on did not count (the
            loss came back: an overshoot the run recovered from), or None.
    """

    unstable: str | None = None
    give_up: bool = False
    scale: float = 1.0
    raised: bool = False
    held: int | None = None
    retry: bool = False
    clip: bool = False
    recovered: str | None = None


class Controller:
    """Host-side state machine over the per-step rows (see the module docstring).

    Its state has two parts: the *trajectory* (recent losses, best level) describes the
    model's current weights and is rolled back with them; the *memory* (LR scale, probe
    wait, counts) is what the run has learned about its LR and survives rollbacks.
    """

    def __init__(self, cfg: Stability, can_clip: bool = False) -> None:
        self.cfg = cfg
        # trajectory
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.best = math.inf
        self.best_se = 0.0
        # Where the best levels were set: (the user's LR, the scale epoch, the level, its
        # standard error) at each new best, newest last (see :meth:`reference`).
        self.bests: list[tuple[float, float, float, float]] = []
        self.lr: float | None = None  # the user's LR at the latest row (None: unknown)
        self.lrs: deque[float] = deque(maxlen=cfg.window)  # and at the rows before it
        self.log_scale: bool | None = None
        self.sigma: float | None = None
        self._cache: tuple[float, float, float] | None = None
        self._x: list[float] = []  # the window level() summarised, in its units
        self.start: float | None = None  # the first loss of this trajectory
        self.streak = 0
        self.nan_streak = 0
        # memory
        # Whether each recent row's loss was bad (NaN/Inf or a spike): the data's own rate of
        # bad batches, which a rollback does not change.
        self.bad_rows: deque[bool] = deque(maxlen=max(cfg.probe_after, cfg.window))
        # The same for any flag (a gradient-norm spike too), and whether a streak of them
        # counts past the early phase (set by the guard: the model has no recurrent layer).
        self.flag_rows: deque[bool] = deque(maxlen=self.bad_rows.maxlen)
        self.norm_streaks = False
        # Set by the guard when the loss's objective is known to move on its own (another
        # model's score, or data that changed twice): a streak of flags is then no
        # evidence about the LR, only NaN/Inf is (see HostSide.stand_down_loss).
        self.moving = False
        self.applied_streak = 0  # flagged steps applied anyway (clipped), in the streak
        self.streak_norm: float | None = None  # the gradient norm of the streak's first row
        # The flagged streak's losses (inf where one was unknown), bounded: a streak long
        # enough to fill it has been judged many times over.
        self.streak_losses: deque[float] = deque(maxlen=cfg.window)
        self.streak_from: float | None = None  # the median of the _BEFORE losses before it
        # A norm streak with finite losses, waiting for what the loss does next (see
        # :meth:`_judge_overshoot`): the step it was found at, the loss it is judged
        # against, why it would count, and the row count at its first row.
        self.overshoot: tuple[int, float, str, int] | None = None
        self.scale = 1.0
        # Counts the guard's changes of the LR scale (a cut, a probe, a cut taken back):
        # a best counts for :meth:`reference` only in the epoch it was set in.
        self.scale_epoch = 0
        self.epoch_scale = 1.0
        self.calm = 0
        self.probe_wait = cfg.probe_after
        self.last_raise: int | None = None
        # The step count at which the run ends (Guard(total_steps=...)), None: unknown;
        # and whether a probe is being held back for it (told once).
        self.ends_at: int | None = None
        self.held = False
        self.instabilities = 0
        self.cuts = 0
        self.retries = 0
        self.first_loss: float | None = None
        # Whether the run's start was forgotten (:meth:`forget_start`).
        self.restarted = False
        # The level with the highest lower confidence bound (level, that bound, its step;
        # loss units): whether a run without progress was pushed up by its steps
        # (:meth:`rose`; words only).
        self.peak: tuple[float, float, int] | None = None
        self.was_calm = False
        # Set by the guard: whether a snapshot it has not retried from yet is there, and
        # whether the run made progress since its last rollback (the restore held).
        self.can_retry = False
        self.progressed = True
        self._before_cut: tuple[float, int, int | None] | None = None
        self.rows = 0
        self.scaled_rows = 0
        self.scale_rows: dict[float, int] = {}
        # Whether the guard's chain clamps steps to the typical norm (its spike clamp).
        self.can_clip = can_clip
        self.clip_since: int | None = None  # the row from which every step is clipped
        # The LR state (scale, cuts, probe wait) before the trailing run of give-back cuts
        # (a cut for other evidence ends the run: it is never taken back), and whether the
        # give-back test has stood down for the run (see :meth:`unstable`).
        self.giveback_from: tuple[float, int, int] | None = None
        self.giveback_off = False

    # -- bad-batch streaks -----------------------------------------------------------------
    def bad_rate(self) -> float:
        """The share of recent rows whose loss was bad (NaN/Inf or a spike), before the
        current streak (0 with fewer than ``window`` such rows)."""
        return _rate(self.bad_rows, self.nan_streak, self.cfg.window)

    def flag_rate(self) -> float:
        """The share of recent rows any detector flagged, before the current flag streak
        (0 with fewer than ``window`` such rows)."""
        return _rate(self.flag_rows, self.streak, self.cfg.window)

    def streak_needed(self, rate: float | None = None) -> int:
        """How many bad rows in a row count as instability: ``bad_steps``, or more when this
        run's data brings bad batches so often that independent ones line up (``rate``:
        the rate to judge by, :meth:`bad_rate` by default; :meth:`flag_rate` for streaks
        of any flag).

        With bad batches independent at rate p (measured over the last ``probe_after``
        rows before the streak, or ``window`` if that is longer; the rows of a streak that
        was found to be instability do not count: they were not independent), k in a row
        happen at a given step with probability pᵏ; the streak counts once pᵏ is below
        1e-3 (a false alarm less than once in a thousand steps), capped at ``window``
        rows. At the rates faults usually come (up to 10 %) that is the default 3;
        heavy-tailed label noise that spikes a third of the batches needs 7. A real blow-up
        flags every step after a history of few flags, so it is still caught after
        ``bad_steps``. The reasoning is a run-length test on a Bernoulli sequence (Feller
        1968, §XIII.7).
        """
        p = self.bad_rate() if rate is None else rate
        if p <= 0:
            return self.cfg.bad_steps
        if p >= 1:
            return max(self.cfg.bad_steps, self.cfg.window)
        k = math.ceil(math.log(_STREAK_FALSE_RATE) / math.log(p) - 1e-9)
        return max(self.cfg.bad_steps, min(self.cfg.window, k))

    # -- the loss level ------------------------------------------------------------------
    def has_level(self) -> bool:
        """Past the early phase: enough losses (``min_losses``) to judge a level by."""
        return len(self.losses) >= self.cfg.min_losses

    def level(self) -> tuple[float, float, float] | None:
        """(median of recent losses, its standard error, the pooled noise σ), or None in
        the early phase.

        Positive losses are judged on a log scale (a regression is a *factor* above the
        best, whatever the loss's units). The noise is measured from successive
        differences (MAD of x[t] − x[t−1], over √2): a loss that trends up or down spreads
        the window's values far more than its noise does, and a spread-based error bar
        would hide exactly the steady blow-up this test is for.
        """
        if not self.has_level():
            return None
        if self._cache is not None:
            return self._cache
        self._x = x = self._scaled(list(self.losses))
        med = _median(x)
        d = [b - a for a, b in itertools.pairwise(x)]
        md = _median(d)
        sigma = _MAD_SIGMA * _median([abs(v - md) for v in d]) / math.sqrt(2)
        # One window's spread is itself noisy (a lucky window is low *and* tight), so the
        # error bar uses a slow average of it.
        pooled = sigma if self.sigma is None else 0.95 * self.sigma + 0.05 * sigma
        self._cache = (med, _MEDIAN_SE * pooled / math.sqrt(len(x)), pooled)
        return self._cache

    def _scaled(self, x: list[float]) -> list[float]:
        positive = min(x) > 0
        if self.log_scale is None:  # decided on the first full window
            self.log_scale = positive
        elif self.log_scale and not positive:
            # A loss that can reach zero or below (a log-likelihood, or a batch fitted
            # exactly): linear from here on. A change of units, not of trajectory: the
            # best level carries over, converted (it is an upper bound, which exp keeps
            # one; its standard error by the delta method). Forgetting it would let the
            # one batch that happened to score 0 wipe the memory of how low the run had
            # got, and a later climb back would go unjudged. The noise is re-measured.
            self.log_scale = False
            if math.isfinite(self.best):
                self.best = math.exp(self.best)
                self.best_se *= self.best
            self.bests = [(lr, epoch, math.exp(b), se * math.exp(b))
                          for lr, epoch, b, se in self.bests]
            self.sigma = None
        return [math.log(v) for v in x] if self.log_scale else x

    def _shown(self, v: float) -> float:
        """A level back in the loss's own units, for messages."""
        return math.exp(v) if self.log_scale else v

    def threshold(self) -> float:
        """The level above which the loss is regressing (inf before a best exists).

        ``best`` is the smallest *upper* confidence bound the level has had, and the level
        is compared through its *lower* bound (see :meth:`observe`): the minimum of many
        noisy medians is biased low, and this keeps a lucky window from becoming a bar
        that ordinary noise later clears.
        """
        return self._limit(self.reference())

    def reference(self) -> float:
        """The best level the regression tests judge the present one against: the run's
        best, or, where the user's schedule has raised the LR again (a warm restart, a
        cyclic schedule, an SWA phase), the best the run had set when it last trained at
        an LR like the present one.

        The level a run settles at depends on its LR: SGD's iterates bounce in a region
        whose excess loss grows with the step size (Mandt, Hoffman & Blei 2017, §3), and a
        run annealed to a small LR sits far below where it can sit at its peak one. A
        warm restart (Loshchilov & Hutter 2017) throws the loss up on purpose, and the
        first steps at the raised LR overshoot further while the sharpness the small LR
        let grow falls back (the catapult, Lewkowycz et al. 2020): judged against the
        annealed best, that reads as a run climbing away from it (measured: an AdamW
        transformer under cosine restarts rolled back and cut ×0.1 forty steps after a
        restart, where the unguarded run's loss peaked ×3 and fell back below its old best
        by the cycle's end). So a best is kept with the LR it was set at, and the level is
        judged against the latest best set at an LR no less than the present one over
        (1 + ``rise``), the margin the test already gives the loss: the excess loss of an
        LR that much lower is at most that much lower. That is the run's best on a
        constant or decaying schedule (every best was set at an LR as high as the present
        one); only a schedule that raised the LR back to where the run had already trained
        uses an older best. An LR higher than any the run set a best at (a warm-up, or a
        raise beyond its old peak) and the guard's own LR moves (a cut, a probe) are judged
        against the run's best as before: only the bests set since the guard last changed
        its LR scale count.
        """
        lr = self.lr
        if lr is None or not self.bests:
            return self.best
        floor = lr / (1 + self.cfg.rise)
        # (newest first, and only the bests set since the guard last moved the scale)
        epoch = self._epoch()
        for i in range(len(self.bests) - 1, -1, -1):
            at, seen, level, _ = self.bests[i]
            if seen != epoch:
                break
            if at >= floor:
                return self.best if i == len(self.bests) - 1 else max(level, self.best)
        return self.best

    def _note_best(self) -> None:
        """Keep the new best with the LR it was set at (the lowest of the window's, see
        :meth:`reference`); an older best set in this scale epoch and an LR no higher is
        superseded (a later best is lower). Bests at LRs within a quarter of the band of
        each other are merged into the newer level at the higher LR (which can only make
        :meth:`reference` stricter), so a schedule that anneals over decades keeps a few
        dozen of them."""
        if self.lr is None or not self.lrs:
            return
        # The level is the median of the window's losses, computed at the window's LRs:
        # it was reached at the lowest of them (rows after a restart still carry the
        # annealed losses).
        lr = min(self.lrs)
        step = (1 + self.cfg.rise) ** 0.25
        keep = lr
        epoch = self._epoch()
        while self.bests and self.bests[-1][1] == epoch and self.bests[-1][0] <= lr * step:
            keep = max(keep, self.bests.pop()[0])
        if len(self.bests) >= _MAX_BESTS:
            del self.bests[0]
        self.bests.append((keep, epoch, self.best, self.best_se))

    def _epoch(self) -> int:
        """The scale epoch, moved on when the scale differs from the one it was counted
        at."""
        if self.scale != self.epoch_scale:
            self.scale_epoch += 1
            self.epoch_scale = self.scale
        return self.scale_epoch

    def _limit(self, ref: float) -> float:
        """The regression limit above a reference level (in the level's units)."""
        if not math.isfinite(ref):
            return math.inf
        if self.log_scale:
            return ref + math.log1p(self.cfg.rise)
        return ref + self.cfg.rise * abs(ref)

    def start_threshold(self) -> float:
        """The level above which the run has climbed past its *first* loss (inf if unknown).

        The first loss of the trajectory: the run's, or the first one after an in-place LR
        cut re-based it (the weights it was computed with are the ones judged from then
        on; a run recovering from damage it could not roll back must not be judged
        against a loss its weights left behind). It is one sample, so its upper bound is
        ``z`` per-step noise σ above it (not σ/√n); the regression margin is added on top,
        as for the best level. This is the test for a run that blows up before it ever has
        a best: Adam wrecking a network in its first steps, whose first level is already
        the wrecked one. σ is :meth:`_sample_sigma`. Simulated on a falling loss with ×1.6–3.3
        lognormal batch noise (σ 0.5–1.2), it adds 1–3 false alarms per 1000 runs of 200
        steps to the best-level test's own 0–2.
        """
        first = self._start_scaled()
        if first is None:
            return math.inf
        return self._limit(first + self.cfg.z * self._sample_sigma())

    def progress_threshold(self) -> float:
        """The level above which the run has given back most of what it learned (inf
        while it has learned nothing beyond the noise, and once the give-back test has
        stood down, see :meth:`unstable`).

        The progress is the way from the first loss down to the best level; the level
        regresses when it is back above ``best + giveback × progress`` — with the default
        0.5, when it sits nearer where the run started than its best. This is the test
        for a run that made only a little progress before the LR undid it: a net that
        saturates and drifts back to chance (a tanh RNN whose loss falls from ln 4 to 0.85
        × that and returns) can never rise to (1 + ``rise``) × its best, because chance is
        a ceiling for its loss. For a run that has learned a factor (1 + ``rise``)² or
        more the best-level test is the tighter one, so this test only acts where
        progress is small. Progress counts only when the best level's upper bound is
        below the first loss by ``z`` σ of one sample's noise (the first loss is one
        draw); with less, there is nothing to give back. σ here is the pooled
        successive-difference estimate alone: the window's spread also measures the
        climb this test is for (a window that holds both the best losses and the
        returning ones is wide), which would hide the progress exactly while it is being
        given back.
        """
        first, lv = self._start_scaled(), self.level()
        if first is None or lv is None or self.giveback_off:
            return math.inf
        return self._giveback_limit(self.reference(), first, lv[2])

    def _giveback_limit(self, best: float, first: float, sigma: float) -> float:
        if not math.isfinite(best) or best >= first - self.cfg.z * sigma:
            return math.inf
        return best + self.cfg.giveback * (first - best)

    def _start_scaled(self) -> float | None:
        """The trajectory's first loss in the level's units (None when unknown or there is
        no level yet)."""
        if self.level() is None:
            return None
        return self._in_units(self.start)

    def _in_units(self, v: float | None) -> float | None:
        if v is None or self.log_scale is None:
            return None
        if self.log_scale:
            return math.log(v) if v > 0 else None
        return v

    def _sample_sigma(self) -> float:
        """One sample's noise σ: one sample against a noise estimate from a few losses is
        fragile, so the larger of the window's two estimates (successive differences, and
        the spread around its median)."""
        lv = self.level()
        assert lv is not None
        med, _, sigma = lv
        # (level() scaled this window's losses: the cache holds while it holds)
        return max(sigma, _MAD_SIGMA * _median([abs(v - med) for v in self._x]))

    def stalled(self) -> tuple[float, float] | None:
        """(level, first loss), in the loss's units, when the run's loss level is not
        below its first loss; None when it made progress (or has no level yet).

        Progress counts when the level's upper confidence bound (``z`` standard errors)
        is under the first loss. That errs towards "progress": the first loss is one
        draw, but a fresh model's batches differ little, and a run that the present
        window's noise would call stalled (a loss bouncing at a high LR) has often
        learned a little, which is not what this reports. A run at a too-high LR that
        bounces at its starting level (a net at chance, skipping spike after spike)
        meets no instability test and is not stable either: the verdict says so. None
        after :meth:`forget_start` (new data): the first loss is then a trained model's,
        one draw from batch losses that span ×10, which one lucky draw turns into "no
        progress".
        """
        lv, first = self.level(), self._in_units(self.first_loss)
        if lv is None or first is None or self.first_loss is None or self.restarted:
            return None
        level, se, _ = lv
        if level + self.cfg.z * se < first:
            return None
        return self._shown(level), self.first_loss

    def _note_peak(self, step: int, lv: tuple[float, float, float]) -> None:
        level, se, _ = lv
        lower = self._shown(level - self.cfg.z * se)
        if self.peak is None or lower > self.peak[1]:
            self.peak = (self._shown(level), lower, step)

    def rose(self) -> tuple[float, int] | None:
        """(level, step) when the loss level once rose above the run's first loss: its
        lower confidence bound above the first loss by ``z`` σ of one sample's noise, σ the
        run's present (pooled) one, not that of the window where it rose (a run thrown
        about by a too-high LR is noisiest exactly there). A too-small LR barely moves the
        loss, so a run without progress that rose was pushed up by its own steps. None
        otherwise. Words only: no action depends on it (as an action, with the window's
        own noise, it is the first-loss test)."""
        first = self._in_units(self.first_loss)
        if first is None or self.peak is None or self.sigma is None:
            return None
        lower = self._in_units(self.peak[1])
        if lower is None or not lower > first + self.cfg.z * self.sigma:
            return None
        return self.peak[0], self.peak[2]

    def calm_now(self) -> bool:
        """No flag streak and a level well under the regression threshold: a good moment
        to keep a snapshot."""
        return not self.streak and self._level_calm()

    def _level_calm(self) -> bool:
        lv = self.level()
        thr = min(self.threshold(), self.progress_threshold())
        return lv is None or not math.isfinite(thr) or \
            lv[0] <= (ref := self.reference()) + 0.5 * (thr - ref)

    def held_since(self, before: dict[str, Any], n: int) -> bool:
        """The last ``n`` losses (the first ones computed with a snapshot's weights) are not
        regressing against the level in ``before`` (the trajectory when it was taken):
        their median is under (1 + ``rise``) × that level, and they have not given back
        most of the progress the trajectory had then made (:meth:`progress_threshold`).
        A snapshot that holds damage (a corrupted weight, an LR spike's update, hidden
        units already saturating) fails this before it is ever kept."""
        past = list(before["losses"])
        if n <= 0 or len(self.losses) < n or len(past) < self.cfg.min_losses \
                or self.log_scale is None:
            return True
        now = list(self.losses)[-n:]
        if self.log_scale and (min(now) <= 0 or min(past) <= 0):
            return True
        f = (lambda v: [math.log(x) for x in v]) if self.log_scale else (lambda v: v)
        past_u = f(past)
        lim = self._limit(_median(past_u))
        first = self._in_units(before.get("start"))
        if first is not None and before.get("log_scale") == self.log_scale \
                and not self.giveback_off:
            sigma = before.get("sigma")  # (None: no noise estimate, no progress judged)
            lim = min(lim, self._giveback_limit(
                float(before["best"]), first, math.inf if sigma is None else float(sigma)))
        return _median(f(now)) <= lim

    def unlike_saved(self, before: dict[str, Any],
                     losses: list[float]) -> tuple[float, float] | None:
        """(the level then, the median of ``losses``) when every one of ``losses`` (the
        first ``bad_steps`` computed with restored weights, which the guard holds as they
        are meanwhile: :meth:`gradguard.host.HostSide.take_hold`) lies above all but the
        highest loss of the window those same weights had when their snapshot was taken
        (``before``, its trajectory; :meth:`saved_bar`); None otherwise.

        A restore is an experiment: the weights are the saved ones, so their loss can have
        moved only with what they are scored on. Right after a rollback for instability,
        the saved weights scoring worse than nearly all their saved losses says the data
        (or the loss function) changed since, and the rise that triggered the rollback was
        that change, not the LR. The test is by rank, not by a noise estimate: near a loss
        of 0 batch losses span decades, so a σ on any scale is wide, while under an
        unchanged loss each of k new batches at the same weights is exchangeable with the
        window's n (which, taken as the loss fell, score those weights no better than they
        are), so all k land among the top k + 1 of the n + k with a chance of at most
        C(k + 1, k) / C(n + k, k): 4 in 1771 for the defaults (n = 20, k = 3). A snapshot
        holding damage its window did not show fails it too: the guard then judges the
        one before alike (:meth:`gradguard.host.HostSide.restore_check`), and only both
        failing reads as new data.
        """
        past = [float(v) for v in before.get("losses", [])]
        if len(past) < self.cfg.min_losses or not losses or not all(
                math.isfinite(v) for v in [*past, *losses]):
            return None
        if min(losses) <= self.saved_bar(past):
            return None
        return _median(past), _median(losses)

    @staticmethod
    def saved_bar(past: list[float]) -> float:
        """The loss every held one must beat for :meth:`unlike_saved`: the second-highest
        of a snapshot's saved window (the highest alone with one loss; +inf with none).

        One outlier forgiven: batch losses are heavy-tailed (one hard batch scores ×5 the
        window's median), and a window's single highest draw decides a strict "above them
        all" test; a snapshot taken just after such a batch could then never tell a change
        of data, found on a parity head added mid-run (``benchmarks/noharm.py``,
        ``mlp-aux-switch``: one saved loss of 1.05 in a window whose next highest was 0.78
        hid held losses of 0.86 to 0.97). The false-alarm rate goes from 1 to 4 in 1771.
        """
        if not past:
            return math.inf
        top = sorted(past)[-2:]
        return top[0]

    def moved_with(self, before: dict[str, Any], losses: list[float],
                   newer: list[float]) -> tuple[float, float] | None:
        """The second look's comparison (:meth:`gradguard.host.HostSide.restore_check`):
        (the level then, the median of ``losses``) when the older snapshot's held losses
        ``losses`` are above the median of its saved window (``before``, its trajectory:
        its level then, which training since only lowered) and no lower than the newer
        snapshot's, ``newer``, on the same new batches (the newer weights trained longer
        and, holding no damage, score no worse); None otherwise, and with fewer than
        ``min_losses`` saved (the initial weights: no level to compare with).

        Both directions point at the data: a snapshot holding damage the older one does
        not scores worse than it, and the older one scores as it did when saved.
        """
        past = [float(v) for v in before.get("losses", [])]
        if len(past) < self.cfg.min_losses or not losses or not newer:
            return None
        then, now = _median(past), _median(losses)
        return (then, now) if now > then and now >= _median(newer) else None

    # -- one row -------------------------------------------------------------------------
    def observe(self, step: int, loss: float | None, flagged: bool, loss_bad: bool,
                skipped: bool = False, grad_norm: float | None = None,
                lr: float | None = None) -> Verdict:
        """Feed one step's row; returns what to do (see :class:`Verdict`).

        Args:
            step: the row's step.
            loss: its loss (None when the guard is not given losses).
            flagged: any detector flagged the step (NaN/Inf, gradient or loss spike).
            loss_bad: the loss itself was flagged: NaN/Inf gradients or loss, or a loss
                spike.
            skipped: the step was not applied (a streak of gradient-norm spikes counts
                once the guard applied one of its steps, see ``Stability.norm_streaks``).
            grad_norm: the step's gradient norm (such a streak counts only while the norm
                is not below the streak's first; None: not judged).
            lr: the user's LR at the step (before the guard's scale; None: unknown), which
                the regression tests read the level's best against (:meth:`reference`).
        """
        cfg = self.cfg
        self.lr = lr
        if lr is not None:
            self.lrs.append(float(lr))
        self.rows += 1
        self.scale_rows[self.scale] = self.scale_rows.get(self.scale, 0) + 1
        if self.scale < 1:
            self.scaled_rows += 1
        self.streak = self.streak + 1 if flagged else 0
        self.applied_streak = 0 if not flagged else self.applied_streak + (not skipped)
        if self.streak == 1:
            self.streak_norm = grad_norm
            self.streak_losses.clear()
            # (self.losses holds the rows before this one: it is appended to below)
            self.streak_from = _median(list(self.losses)[-_BEFORE:]) if self.losses else None
        if flagged:
            self.streak_losses.append(
                float(loss) if loss is not None and math.isfinite(loss) else math.inf)
        rising = grad_norm is None or self.streak_norm is None or not (
            grad_norm < self.streak_norm)  # (NaN compares False: a NaN norm is rising)
        self.nan_streak = self.nan_streak + 1 if loss_bad else 0
        self.bad_rows.append(bool(loss_bad))
        self.flag_rows.append(bool(flagged))
        if loss is not None and math.isfinite(loss):
            if self.first_loss is None:
                self.first_loss = float(loss)
            if self.start is None:
                self.start = float(loss)
            # Bad batches enter too: one is an outlier the median ignores, a run of them
            # is a loss that really is higher now.
            self.losses.append(float(loss))
        self._cache = None
        reason = None
        climb = giveback = False
        lv = self.level()
        judged = self._judge_overshoot(step, lv)
        if judged is not None and judged.unstable is not None:
            return judged
        recovered = None if judged is None else judged.recovered
        if self.nan_streak >= cfg.bad_steps and self.nan_streak >= (need := self.streak_needed()):
            rate = "" if need == cfg.bad_steps else (
                f" (bad batches come at a rate of {self.bad_rate():.0%} in this run, so "
                f"{need} in a row are needed)")
            reason = (f"{counted(self.nan_streak, 'step')} in a row with NaN/Inf or a spiking "
                      f"loss{rate}")
        elif self.moving:
            pass  # (the flags a moving objective raises are its own; NaN/Inf counts above)
        elif self.norm_streaks and lv is not None and cfg.norm_streaks and \
                self.applied_streak and rising and not self._falling(lv) and \
                self.streak >= (need := self.streak_needed(self.flag_rate())):
            rate = "" if need == cfg.bad_steps else (
                f" (flags come at a rate of {self.flag_rate():.0%} in this run, so {need} in "
                "a row are needed)")
            grew = "" if grad_norm is None or self.streak_norm is None else (
                f", the gradient norm not falling ({self.streak_norm:.4g} → {grad_norm:.4g})")
            why = (f"{counted(self.streak, 'flagged step')} in a row, "
                   f"{self.applied_streak} of them applied (gradient-norm or loss "
                   f"spikes){grew}{rate}")
            if self.scale < 1 or self.streak_from is None or not all(
                    map(math.isfinite, self.streak_losses)):
                reason = why
            elif self.overshoot is None:
                self.overshoot = (step, self.streak_from, why, self.rows - self.streak + 1)
        elif lv is None and self.streak >= cfg.bad_steps:
            # Early phase: no loss level to judge by yet, so any flag streak is evidence.
            # Later, on a recurrent net, heavy-tailed but healthy gradient norms flag runs
            # of steps, so only a streak the loss itself shows counts (norm_streaks above
            # is the exception for other models).
            reason = f"{counted(self.streak, 'flagged step')} in a row before any loss history"
        else:
            if lv is not None:
                level, se, self.sigma = lv
                thr = self.threshold()
                if level - cfg.z * se > thr:
                    climb = True
                    ref = self.reference()
                    at = "" if ref == self.best else " at an LR like this one"
                    reason = (f"loss level {self._shown(level):.4g} rose above its best{at} "
                              f"{self._shown(ref):.4g} (limit {self._shown(thr):.4g})")
                elif level - cfg.z * se > (start := self.start_threshold()):
                    climb = True
                    reason = (f"loss level {self._shown(level):.4g} rose above the first loss "
                              f"{self.start:.4g} (limit {self._shown(start):.4g})")
                elif level - cfg.z * se > (back := self.progress_threshold()):
                    climb = giveback = True
                    reason = (f"loss level {self._shown(level):.4g} gave back most of its "
                              f"progress from the first loss {self.start:.4g} to its best "
                              f"{self._shown(self.reference()):.4g} (limit "
                              f"{self._shown(back):.4g})")
                elif level + cfg.z * se < self.best:
                    self.best, self.best_se = level + cfg.z * se, se
                    self._note_best()
        if reason is None and lv is not None:
            self._note_peak(step, lv)
        if reason is not None:
            verdict = self.unstable(step, reason, climb=climb, giveback=giveback)
            self.was_calm = False
            return verdict
        if not flagged:
            # A flag streak that follows is judged by where the level was before it.
            self.was_calm = self._level_calm()
        self.calm += 1
        if self.calm >= self.probe_wait and self.scale < 1:
            # (a run past the end it was said to have: the number was wrong, not known)
            left = None if self.ends_at is None else self.ends_at - 1 - step
            if left is not None and 0 <= left < cfg.window:
                told, self.held = self.held, True
                return Verdict(scale=self.scale, held=None if told else left,
                               recovered=recovered)
            self.scale = min(1.0, self.scale / math.sqrt(cfg.decrease))
            self.calm = 0
            self.last_raise = step
            self.held = False
            return Verdict(scale=self.scale, raised=True, recovered=recovered)
        return Verdict(scale=self.scale, recovered=recovered)

    def _judge_overshoot(self, step: int, lv: tuple[float, float, float] | None
                         ) -> Verdict | None:
        """Judge a waited-on norm streak once ``window // 2`` rows have followed it, with
        ``lv`` the present :meth:`level`: the verdict, or None (no streak waited on, or
        still waiting).

        The streak counts only if the median of the losses of those rows is above the
        median of the three before the streak by more than ``z`` standard errors of the
        difference of the two medians (σ the level's noise, from successive differences;
        on a log scale for positive losses), as a level must rise beyond its noise to
        count. Otherwise the loss came back: the overshoot of an LR near its edge that the
        run recovers from by itself (the catapult, Lewkowycz et al. 2020, §3: the loss
        grows for a few steps, the curvature falls, and the loss returns below where it
        was). A blow-up leaves the loss above where it was, or lets the NaN/Inf streak or
        the level's tests answer it sooner. Half the level's window: long enough for the
        catapult's few steps of growth and its return, short enough that the rows waited,
        which a rollback undoes, stay a fraction of the snapshots' spacing.

        Measured (paired seeds, against the build that counts the streak at once; AMD
        EPYC, benchmarks/RESULTS.md): ``cnn-restarts-warmup`` of the no-harm suite, whose
        warm-up to lr 0.05 overshoots at steps 12-16 and recovers, was cut ×0.1 and rolled
        back on 3 of 10 seeds (0.281 / 0.346 / 0.311 against 0.165 / 0.191 / 0.169
        unguarded); waiting, 2 of them are left alone (0.178, 0.171) and the third ends
        at 0.225: its three losses before the streak were a point on a steep fall (2.2 →
        0.42 in eight steps), and the ten after it came back to 0.91 against 0.82, inside
        the noise. Read with the noise, it is left alone too (0.154). Waiting at an LR the
        guard had already cut too cost the held-out runs far past their edge more than it
        gained (a raw-unit quantile regression at 1000× its LR: 3 of 5 seeds 21-32 %
        worse), so a relapse is not waited for.
        """
        if self.overshoot is None:
            return None
        at, before, why, first_row = self.overshoot
        wait = self.cfg.window // 2
        if step - at < wait:
            return None
        self.overshoot = None
        after = _median(list(self.losses)[-wait:])
        a, b = self._in_units(after), self._in_units(before)
        # Two medians of noisy losses: "above" must be beyond their noise, as a level must
        # be to count as risen (z standard errors of the difference of a median of
        # ``wait`` losses and one of _BEFORE).
        margin = 0.0 if lv is None or a is None or b is None else (
            self.cfg.z * _MEDIAN_SE * lv[2] * math.sqrt(1 / wait + 1 / _BEFORE))
        if after < before or (margin and a < b + margin):
            back = "came back under" if after < before else "came back to within its noise of"
            return Verdict(scale=self.scale, recovered=(
                f"{why}, but the loss {back} where it was ({before:.4g} before the streak, "
                f"a median of {after:.4g} over the {wait} steps after it): an overshoot "
                "the run recovered from, not counted"))
        # The streak's rows and the flags of the rows waited were the run's, not
        # independent bad batches (as :meth:`unstable` does for a streak it is told of).
        for rows in (self.bad_rows, self.flag_rows):
            _unmark(rows, self.rows - first_row + 1)
        verdict = self.unstable(step, f"{why}, and {wait} steps later the loss has not come "
                                f"back ({before:.4g} before the streak, a median of "
                                f"{after:.4g} since)")
        self.was_calm = False
        return verdict

    def _falling(self, lv: tuple[float, float, float]) -> bool:
        """The flagged streak's median loss lies under the median of the three losses
        before it, and more than ``z`` σ (one batch's noise, not the median's) under the
        level: the big gradients go on lowering the loss, as in a run leaving a plateau
        (its gradient norm grows tenfold as it starts to learn), instead of overshooting
        (a loss back above where the streak began). The median: one hard batch among the
        streak's does not decide it.

        Measured: a 10-layer SiLU MLP under NAdam at a healthy LR sits at chance for ~20
        steps, then its loss falls 2.30 → 1.85 while the gradient norm goes 0.2 → 2.5; the
        norm detector flagged three or four of those steps and the streak read as
        instability (a cut ×0.1 and a rollback) on 5 of 10 seeds, each ending 0.25 worse.
        A VGG without normalisation at 10× its LR falls off its plateau too (2.30 → 2.06),
        but its streak's losses climb back (2.20, 2.21, 2.42) and its units die two dozen
        steps later: that streak still counts.
        """
        if not self.streak_losses or self.streak_from is None:
            return False
        mid = _median(list(self.streak_losses))
        if not (math.isfinite(mid) and mid < self.streak_from) or (
                self.log_scale and mid <= 0):
            return False
        level, _, sigma = lv
        return (math.log(mid) if self.log_scale else mid) < level - self.cfg.z * sigma

    def unstable(self, step: int, reason: str, climb: bool = False,
                 giveback: bool = False, may_retry: bool = True) -> Verdict:
        """Respond to instability found at ``step``: lower the scale, or give up.

        A *sudden* failure of a *healthy, settled* run — one row earlier the loss level was
        still in the lower half of its margin, its best was below the run's first loss, and
        the run is past its first ``probe_after`` steps — is retried at the same scale when
        the guard has a snapshot to retry from (``can_retry``: one never restored from,
        reached and verified clean after the last rollback, or the one a retry restored
        when that restore held, see :meth:`gradguard.rollback.RollbackStore.can_retry`):
        it is likelier a transient fault (bad data, a corrupted step, a flipped bit) than
        the LR, and PaLM restarted at the same LR (Chowdhery et al. 2022, §5.1). A failure
        early in training (where warm-up exists for a reason), a slow climb, or failing
        again at once after a restore is the LR's doing, and the scale falls: by
        ``decrease`` when the run had been training well and broke (a streak of bad steps,
        or an immediate action's single one), by ``decrease_far`` when it never trained
        well at this LR or its loss level climbed (``climb``; see the module docstring).
        At the floor, a run that had trained well and made progress since its last
        rollback (``progressed``) is rolled back at the same scale instead; and a
        give-back that recurred after every cut it caused (×0.1, ×0.01, ×0.001) takes
        those cuts back and turns the give-back test off for the run (it is not the LR's
        doing, and a loss that sinks back to chance is not diverging).

        The first instability found by the give-back test (``giveback``: the level drifted
        back towards the first loss without overshooting it) is answered by clipping
        instead (``clip_on_giveback``): roll back, keep the LR, and from then on clip
        every step to the typical gradient norm (``clip`` in the verdict). A loss that
        overshoots its start is being pushed uphill by every step, which only a smaller
        LR fixes; a run that loses a little progress and sinks back to chance has had its
        weights thrown into saturation by a few oversized steps — the cliffs of a
        recurrent net's loss surface, for which Pascanu, Mikolov & Bengio (2013, §3.2)
        clip the norm, leaving the ordinary steps at the full LR. Measured on rnn-long at
        its exploding LR over 20 seeds: 15 learn (14 with the ×0.1 cut, which leaves the
        RNN too slow at a tenth of its LR), median 0.39 against 0.58, better on 11 seeds
        and worse on 4 (benchmarks/RESULTS.md).
        """
        cfg = self.cfg
        self.instabilities += 1
        # The bad rows that ended in this instability were the run's, not independent bad
        # batches: they must not raise the bar for the next streak.
        _unmark(self.bad_rows, self.nan_streak)
        _unmark(self.flag_rows, self.streak)
        self._before_cut = None  # (set again below only if this instability cuts)
        sudden = self.was_calm and self.has_level()
        # Healthy: the run had made progress, its best level under its first loss. A run
        # that never got below where it started is failing at its LR, not by accident.
        first = self.first_loss
        healthy = first is not None and math.isfinite(self.best) and (
            self._shown(self.best - cfg.z * self.best_se) < first)
        # Past the early phase. Whether the run has recovered since its last instability
        # is the snapshot's to say (``can_retry``: one reached clean after the last
        # rollback): independent faults can strike a run at any spacing.
        settled = self.rows >= cfg.probe_after
        self.held = False  # (a probe due later is told about afresh)
        if may_retry and self.can_retry and sudden and healthy and settled:
            self.calm = 0
            self.retries += 1
            return Verdict(unstable=reason, scale=self.scale, retry=True)
        # How far past its edge: a run that had trained well at this LR and then broke
        # was near it; one that never trained well here, or whose loss level climbed
        # (the LR is pushing it uphill step after step), was far past it. "Trained well"
        # mirrors a regression: the best level fell by as much as a regression must rise
        # (its regression threshold is still under the first loss), a margin one noisy
        # first loss cannot fake.
        trained = self.trained_well()
        if giveback and cfg.clip_on_giveback and self.can_clip and self.clip_since is None:
            self.clip_since = step
            self._before_cut = None
            self.calm = 0
            return Verdict(unstable=reason, scale=self.scale, clip=True)
        near = trained and not climb
        new = self.scale * (cfg.decrease if near else cfg.decrease_far)
        # At the floor the LR is a thousandth of the user's: a run that had trained well
        # and broke after making progress since its last rollback is not failing because
        # of it. Roll back and keep the scale (no cut to take back); a failure without
        # progress in between (a loop) still gives up.
        hold = new < cfg.floor and near and self.progressed
        # (A give-back is a climb, so ``hold``, which needs ``near``, never applies to it.)
        if giveback and new < cfg.floor and self.giveback_from is not None:
            # The level kept sinking back towards its start at every LR the cuts tried, a
            # tenth, a hundredth, a thousandth: at those the weights barely move between a
            # restore and the next give-back, so it is the restored snapshots' own level,
            # not the LR's doing. Chance is a ceiling, not a blow-up: take the give-back
            # cuts back (the clipping stays) and stop judging give-backs, rather than give
            # up on a run that is not diverging. A climb or a NaN streak is still judged.
            self.scale, self.cuts, self.probe_wait = self.giveback_from
            self.giveback_off = True
            self._before_cut = None
            self.last_raise = None
            self.calm = 0
            return Verdict(unstable=f"{reason}; it recurred at every LR the cuts tried, "
                           "so they are taken back and the give-back test stands down",
                           scale=self.scale)
        if not hold and new < cfg.floor:
            # (No cut is counted: none is made, and a user who catches the error and goes
            # on must not read one in the verdict.)
            return Verdict(unstable=reason, give_up=True, scale=self.scale)
        if not giveback:
            self.giveback_from = None
        elif self.giveback_from is None:
            self.giveback_from = (self.scale, self.cuts, self.probe_wait)
        if hold:
            self._before_cut = None
        else:
            self.cuts += 1
            self._before_cut = (self.scale, self.probe_wait, self.last_raise)
        if self.last_raise is not None and step - self.last_raise <= self.probe_wait:
            self.probe_wait *= 2  # a relapse: the raised LR was past the edge
        self.last_raise = None
        self.calm = 0
        if hold:
            return Verdict(unstable=reason, scale=self.scale)
        self.scale = new
        return Verdict(unstable=reason, scale=self.scale)

    def trained_well(self) -> bool:
        """Whether the run trained well at some point: its best level fell by as much as a
        regression must rise (the regression threshold is under the first loss), a margin
        one noisy first loss cannot fake. False before a best exists."""
        return self._under_first(self.best)

    def learned(self) -> bool:
        """Whether the loss level has been under the first loss by a regression's margin:
        its best level, or already the present one (the median of the window: a loss that
        falls ×10 in a few steps spreads so much that an upper bound would hide it), which
        early on, while flags keep the best from being set, is the only level there is."""
        lv = self.level()
        return self._under_first(self.best if lv is None else min(self.best, lv[0]))

    def _under_first(self, ref: float) -> bool:
        """Whether the regression limit above level ``ref`` is under the first loss."""
        first = self.first_loss
        return first is not None and self._shown(self._limit(ref)) < first

    def cut_point(self) -> CutPoint:
        """The LR state (scale, probe wait, last raise, cuts) before the cut just made, or
        the present one when none was made; :meth:`not_the_lr` can return to it."""
        if self._before_cut is not None:
            return (*self._before_cut, self.cuts - 1)
        return (self.scale, self.probe_wait, self.last_raise, self.cuts)

    def not_the_lr(self, point: CutPoint | None = None) -> Verdict:
        """Take back the cut just made (or, given a :meth:`cut_point`, every cut since it):
        the failure was a damaged snapshot's or batch noise, not the LR's (the loss was
        wrecked at once after a restore, before anything could develop)."""
        if point is not None:
            self.scale, self.probe_wait, self.last_raise, self.cuts = point
            self._before_cut = None
        elif self._before_cut is not None:
            self.scale, self.probe_wait, self.last_raise = self._before_cut
            self._before_cut = None
            self.cuts -= 1
        return Verdict(unstable="restored snapshot held the damage", scale=self.scale)

    def rebaseline(self) -> None:
        """Forget the trajectory (after an in-place LR cut, when no rollback undid it):
        judge what follows against what the run does from here, not the old best."""
        self.losses.clear()
        self._cache = None
        self.best, self.best_se = math.inf, 0.0
        self.bests = []
        self.lrs.clear()
        self.start = None
        self.streak = self.nan_streak = self.applied_streak = 0
        self.streak_norm = self.streak_from = self.overshoot = None
        self.streak_losses.clear()

    def forget_start(self) -> None:
        """Forget where the run started (its first loss, noise and highest level): they
        were another loss's (new data, or a loss found to be no loss at all)."""
        self.first_loss = self.sigma = self.peak = None
        self.restarted = True

    # -- state ---------------------------------------------------------------------------
    def trajectory(self) -> dict[str, Any]:
        """The part rolled back with the model."""
        return {"losses": list(self.losses), "best": self.best, "best_se": self.best_se,
                "bests": [list(b) for b in self.bests], "lrs": list(self.lrs),
                "log_scale": self.log_scale, "sigma": self.sigma, "start": self.start}

    def load_trajectory(self, s: dict[str, Any]) -> None:
        self.losses = deque(s["losses"], maxlen=self.cfg.window)
        self._cache = None
        self.best, self.best_se = float(s["best"]), float(s["best_se"])
        # (absent from a state saved before bests were kept with their LRs)
        self.bests = [(float(a), float(b), float(c), float(d))
                      for a, b, c, d in s.get("bests", [])]
        self.lrs = deque((float(v) for v in s.get("lrs", [])), maxlen=self.cfg.window)
        self.log_scale = s["log_scale"]
        self.sigma = s["sigma"]
        # (a state from before the start reference: the run's first loss was it)
        self.start = s.get("start", s.get("first_loss"))
        self.streak = self.nan_streak = self.applied_streak = 0
        self.streak_norm = self.streak_from = self.overshoot = None
        self.streak_losses.clear()

    def state_dict(self) -> dict[str, Any]:
        return {**self.trajectory(), "streak": self.streak, "nan_streak": self.nan_streak,
                "applied_streak": self.applied_streak, "streak_norm": self.streak_norm,
                "streak_losses": list(self.streak_losses), "streak_from": self.streak_from,
                "overshoot": None if self.overshoot is None else list(self.overshoot),
                "scale": self.scale, "scale_epoch": self.scale_epoch,
                "epoch_scale": self.epoch_scale,
                "calm": self.calm, "probe_wait": self.probe_wait,
                "last_raise": self.last_raise, "instabilities": self.instabilities,
                "cuts": self.cuts, "retries": self.retries,
                "first_loss": self.first_loss, "restarted": self.restarted,
                "peak": None if self.peak is None else list(self.peak),
                "was_calm": self.was_calm,
                "rows": self.rows, "scaled_rows": self.scaled_rows,
                "scale_rows": dict(self.scale_rows), "clip_since": self.clip_since,
                "bad_rows": [int(b) for b in self.bad_rows],
                "flag_rows": [int(b) for b in self.flag_rows],
                "giveback_from": None if self.giveback_from is None else list(
                    self.giveback_from), "giveback_off": self.giveback_off,
                "moving": self.moving}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.load_trajectory(s)
        self.streak = int(s["streak"])
        self.nan_streak = int(s["nan_streak"])
        self.applied_streak = int(s.get("applied_streak", 0))  # (these two: absent
        norm = s.get("streak_norm")  # before they existed)
        self.streak_norm = None if norm is None else float(norm)
        self.streak_losses.clear()  # (absent from an older state: judged as before)
        self.streak_losses.extend(float(v) for v in s.get("streak_losses", []))
        self.streak_from = s.get("streak_from")
        shot = s.get("overshoot")  # (absent from a state saved before it existed)
        self.overshoot = None if shot is None else (
            int(shot[0]), float(shot[1]), str(shot[2]), int(shot[3]))
        self.scale = float(s["scale"])
        self.scale_epoch = int(s.get("scale_epoch", 0))  # (these two: absent before them)
        self.epoch_scale = float(s.get("epoch_scale", self.scale))
        self.calm = int(s["calm"])
        self.probe_wait = int(s["probe_wait"])
        self.last_raise = None if s["last_raise"] is None else int(s["last_raise"])
        self.instabilities = int(s["instabilities"])
        self.cuts, self.retries = int(s["cuts"]), int(s["retries"])
        self.first_loss = s["first_loss"]
        self.restarted = bool(s.get("restarted", False))  # (absent before it existed)
        peak = s.get("peak")  # (absent from a state saved before it existed)
        self.peak = None if peak is None else (float(peak[0]), float(peak[1]), int(peak[2]))
        self.was_calm = bool(s["was_calm"])
        self.rows = int(s["rows"])
        self.scaled_rows = int(s["scaled_rows"])
        self.scale_rows = {float(k): int(v) for k, v in s["scale_rows"].items()}
        # (absent from a state saved before it existed)
        self.bad_rows = deque((bool(b) for b in s.get("bad_rows", [])),
                              maxlen=self.bad_rows.maxlen)
        # (a state from before flag_rows: its bad rows, flags too, are a lower bound on
        # the run's rate of flags, so a resumed run's bar does not start at its lowest)
        self.flag_rows = deque((bool(b) for b in s.get("flag_rows", s.get("bad_rows", []))),
                               maxlen=self.flag_rows.maxlen)
        since = s.get("clip_since")  # (absent from a state saved before it existed)
        self.clip_since = None if since is None else int(since)
        gb = s.get("giveback_from")  # (these two: absent before they existed)
        self.giveback_from = None if gb is None else (float(gb[0]), int(gb[1]), int(gb[2]))
        self.giveback_off = bool(s.get("giveback_off", False))
        self.moving = bool(s.get("moving", False))  # (absent before it existed)
