"""Severity from consequences: the doctor's suspicions, confirmed or cleared by trials.

The checks measure the model at initialisation and flag *suspicions*. This module sets
each suspicion's severity from what happens when copies are trained
(:mod:`gradguard.doctor.trial`): the setup as it is, and with the fix the finding proposes.

- ``init`` / ``recurrent`` → ``gg.fixes.reinit(model, "auto")``; ``input_scale`` →
  standardising what the findings name (inputs, regression targets);
  :func:`~gradguard.doctor.trial.verdict` decides.
- ``learning_rate`` is judged last: when the run fails at the user's LR and a fix above
  cures it *at that LR*, the LR is a symptom (info); otherwise other LRs are tried (every
  param group's LR scaled by one factor) and judged the same way: LR/10, then LR/100 for a
  run that blows up or sits above the range test's suggestion; ×10, ×100, ... up to the
  range test's best LR for a run that stalls far (10×) below it.
- ``activations`` and ``architecture`` findings explain a failure but have no single fix
  to test: at most a warning when the run fails, info when it trains.
- ``precision`` findings are configuration facts (fp16 without loss scaling) and keep
  their severity.
- Without an optimizer nothing can be trained: suspicions are capped at warning and say so.

Every finding a trial confirmed carries ``evidence["confirmed"] = True``; ``--fix``
applies only those.
"""

from __future__ import annotations

import math
from typing import Any

from .findings import CAUSES, Finding
from .lr_find import Batch
from .trial import DIVERGE_FACTOR, STALL_FRACTION, Trial, Trials, verdict

__all__ = ["confirm", "unconfirmed"]

# Checks whose fix the doctor can try, and how.
_FIXED_BY = {"init": "reinit", "recurrent": "reinit", "input_scale": "standardized"}
_EXPLAINERS = ("activations", "architecture")
_UNTESTED = ("not confirmed by a training trial: pass the optimizer to diagnose() so the "
             "doctor can train a copy and measure")


def unconfirmed(findings: list[Finding]) -> list[Finding]:
    """Without an optimizer: cap every suspicion at warning, saying it was not measured."""
    for f in findings:
        if f.check in _FIXED_BY or f.check in _EXPLAINERS:
            if f.severity == "critical":
                f.severity = "warning"
            if f.severity != "info":
                f.evidence["confirmed"] = False
                f.fix = f"{f.fix} ({_UNTESTED})" if f.fix else _UNTESTED
    return findings


def _trial_of(kind: str, trials: Trials, sample: list[Batch],
              findings: list[Finding]) -> tuple[Trial | None, str]:
    """The trial of a finding's fix, and a note for its fix text (an LR it also needs)."""
    if kind == "reinit":
        return trials.reinit(), ""
    # One trial standardises everything the input-scale findings name: raw inputs and raw
    # targets each keep the gradient large, so either alone may not cure the run.
    what = {f.evidence.get("standardise", "inputs") for f in findings
            if f.check == "input_scale"}
    kw = {"inputs": "inputs" in what, "targets": "targets" in what}
    t = trials.standardized(sample, **kw)
    if t is None or t.ok or t.diverged or t.peak > DIVERGE_FACTOR * t.start:
        return t, ""
    # Standardised data has gradients that much smaller than raw units: an LR tuned to the
    # raw units crawls on it. The fix is judged at the LR it needs, found as for the user's.
    for factor in (10.0, 100.0):
        s = trials.standardized(sample, **kw, lr_scale=factor)
        if s is not None and s.ok:
            # The control: the raw data at that same LR. When it trains as far, the raised
            # LR is the cure and standardising is not.
            raw = trials.scaled_lr(factor)
            if raw.ok and verdict(raw, s) == "info":
                return t, ""
            return s, (f"; then raise the LR {factor:.3g}× (standardised, the gradients are "
                       f"smaller: at your LR, {t.describe()})")
    return t, ""


def _judge(f: Finding, user: Trial, fixed: Trial | None, note: str = "") -> None:
    if fixed is None:
        if f.severity == "critical":
            f.severity = "warning"
        f.evidence["confirmed"] = False
        f.title += (" — not tested: nothing here can be standardised (integer inputs, "
                    "label-like targets)")
        return
    f.severity = verdict(user, fixed)
    f.evidence["trial"] = {"as_is": user.summary(), "fixed": fixed.summary()}
    f.evidence["confirmed"] = f.severity != "info"
    if f.severity == "info":
        # Nothing to apply: the fix either is not needed or does not help.
        f.fix_code = ""
        if user.ok:
            f.title += (f" — but training as is is fine ({user.describe()}), so this is how "
                        "the model starts, not a problem")
            f.fix = ""
        else:
            how = "it trains no further" if fixed.ok else "it fails too"
            f.title += (f" — training as is fails ({user.describe()}), and {fixed.label} "
                        f"{how} ({fixed.describe()}): not the cause")
    elif f.severity == "critical":
        f.title += (f" — training as is: {user.describe()}; {fixed.label}: "
                    f"{fixed.describe()}")
    else:
        f.title += (f" — training as is: {user.describe()}; {fixed.label}, it goes much "
                    f"further: {fixed.describe()}")
    if f.severity != "info" and note:
        f.fix += note


def _explain(f: Finding, user: Trial, trials: Trials) -> None:
    """An explainer's severity: info when the run trains, at most a warning otherwise; a
    re-initialisation it proposes is confirmed (or refuted) by the re-initialised trial."""
    f.evidence["confirmed"] = False
    if user.ok:
        f.severity = "info"
        return
    if f.severity == "critical":
        f.severity = "warning"
    if f.severity != "info" and "reinit" in f.fix_code:
        t = trials.reinit()
        f.evidence["confirmed"] = verdict(user, t) != "info"
        if not f.evidence["confirmed"]:
            f.fix += f" (re-initialising alone does not cure it: {t.describe()})"


def confirm(findings: list[Finding], trials: Trials, sample: list[Batch],
            lr_meas: dict[str, Any]) -> list[Finding]:
    """Set each finding's severity from the trials and add the learning-rate finding.

    Args:
        findings: the checks' suspicions (changed in place).
        trials: the diagnosis's trials (user's setup, fixes).
        sample: batches to fit a standardiser on.
        lr_meas: the LR range test's measurements ({} when it did not run).

    Returns:
        The findings, with the learning-rate finding(s) appended.
    """
    user = trials.user()
    cured_by: str | None = None
    same_lr = True
    for f in sorted(findings, key=lambda f: CAUSES.index(f.check)):
        kind = _FIXED_BY.get(f.check)
        if kind is not None:
            fixed, note = _trial_of(kind, trials, sample, findings)
            _judge(f, user, fixed, note)
            if f.severity == "critical" and cured_by is None:
                cured_by, same_lr = f.check, not note
        elif f.check in _EXPLAINERS:
            _explain(f, user, trials)
    return [*findings, *_lr_findings(user, trials, lr_meas, cured_by, same_lr)]


def _lrs(lrs: list[float], factor: float = 1.0) -> str:
    """'learning rate 0.01', or each group's for an optimizer whose groups differ."""
    if len(set(lrs)) == 1:
        return f"learning rate {lrs[0] * factor:.3g}"
    return ("learning rates " + ", ".join(f"{v * factor:.3g}" for v in lrs)
            + " (per param group)")


def _at(lrs: list[float], factor: float) -> str:
    """Where a trial ran: 'at 0.001', or 'scaled by 0.1 (0.001, 0.1)' for several groups."""
    if len(set(lrs)) == 1:
        return f"at {lrs[0] * factor:.3g}"
    if factor == 1:
        return "as they are"
    return f"scaled by {factor:.3g} ({', '.join(f'{v * factor:.3g}' for v in lrs)})"


def _up_factors(lr: float, meas: dict[str, Any]) -> tuple[float, ...]:
    """Factors to raise a stalled run's LR by: by tens, up to the range test's best LR
    (where its loss was lowest; else where it diverged)."""
    ceiling = meas.get("min_loss_lr") or meas.get("diverges_at")
    if ceiling is None:
        return (10.0, 100.0)
    return tuple(f for f in (10.0, 100.0, 1000.0) if lr * f <= ceiling)


def _lr_findings(user: Trial, trials: Trials, meas: dict[str, Any],
                 cured_by: str | None, same_lr: bool = True) -> list[Finding]:
    lr, lrs = trials.user_lr, trials.user_lrs
    name = _lrs(lrs)
    div, sugg = meas.get("diverges_at"), meas.get("suggested")
    ev: dict[str, Any] = {**meas, "user_lr": lr, "user_lrs": lrs,
                          "trial": {"as_is": user.summary()}}
    if user.ok:
        if div is not None and lr >= div:
            return [Finding(
                "learning_rate", "info",
                f"the LR range test's loss diverged at {div:.3g}, below your {name}, but "
                f"training at it is fine ({user.describe()})", evidence=ev,
                fix="if the run blows up later, lower the LR or add warm-up "
                    "(gg.fixes.warmup_cosine)")]
        if sugg is not None and lr < sugg / 100:
            return [Finding(
                "learning_rate", "info",
                f"{name} is far below the range test's suggestion ({sugg:.3g}); training "
                "may be slow", evidence=ev)]
        return []
    if cured_by is not None:
        return [Finding(
            "learning_rate", "info",
            f"training at {name} fails ({user.describe()}) — a symptom of {cured_by}: its "
            + ("fix trains at this same LR" if same_lr else "fix, with the LR change it "
               "names, trains"), evidence=ev,
            fix=f"fix {cured_by} first" + ("; the LR is then fine" if same_lr else ""))]
    # Which way to look: a run that blows up (even if it comes back) needs a lower LR; one
    # that stalls far below the range test's suggestion (an order of magnitude under it,
    # itself a tenth of the best LR), a higher one; one that stalls near the suggestion,
    # neither. Without a range test, lower first, then higher.
    blew_up = user.diverged or user.peak > DIVERGE_FACTOR * user.start
    # (Higher LRs only for a run that stalled: one that made progress but ended near its
    # prior is learning slowly, which a short trial cannot call too low an LR.)
    stalled = not blew_up and user.progress < STALL_FRACTION
    # (An LR a warm-up schedule has just set low, below the initial_lr it ramps to, is
    # not the user's LR: no higher one is advised from it.)
    warming = any(isinstance(g.get("initial_lr"), int | float)
                  and g["initial_lr"] > float(g["lr"]) for g in trials.optimizer.param_groups)
    down, up = (0.1, 0.01), _up_factors(lr, meas) if stalled and not warming else ()
    if blew_up or sugg is None:
        plans = [down, up] if up else [down]
    elif lr <= sugg / 10:
        plans = [up] if up else []
    else:
        plans = [down] if lr >= sugg else []
    tried: list[tuple[float, Trial]] = []
    for factors in plans:
        for factor in factors:
            t = trials.scaled_lr(factor)
            tried.append((factor, t))
            sev = verdict(user, t)
            if sev != "info":
                return [_lr_change(sev, user, trials, factor, t, ev)]
            # (Down: the largest lower LR that trains was no cure, so none lower is. Up: a
            # higher one that barely trains may be the start of what a higher one cures.)
            if factor < 1 and t.ok:
                break
    ev["confirmed"] = False
    if not tried:
        near = "" if sugg is None else f" (the range test suggests {sugg:.3g})"
        return [Finding(
            "learning_rate", "info",
            f"training at {name} fails ({user.describe()}): no other LR is indicated"
            f"{near}", evidence=ev)]
    factor, t = tried[-1]
    ev["trial"]["fixed"] = t.summary()
    where = f" (LR range test: the loss diverges from {div:.3g})" if div is not None else ""
    how = "trains little further" if t.ok else "fails too"
    return [Finding(
        "learning_rate", "info",
        f"training at {name} fails ({user.describe()}), and {_at(lrs, factor)} it {how} "
        f"({t.describe()}): the LR alone is not the cause{where}", evidence=ev)]


def _lr_change(sev: str, user: Trial, trials: Trials, factor: float, t: Trial,
               ev: dict[str, Any]) -> Finding:
    """The finding for an LR that a trial at ``factor`` times it confirmed as the cause."""
    lr, lrs = trials.user_lr, trials.user_lrs
    new = lr * factor
    ev["trial"]["fixed"] = t.summary()
    ev.update(suggested_lr=new, suggested_lrs=[v * factor for v in lrs], lr_factor=factor,
              confirmed=True)
    div, sugg = ev.get("diverges_at"), ev.get("suggested")
    several = len(set(lrs)) > 1
    if factor < 1:
        where = f" (LR range test: the loss diverges from {div:.3g})" if div is not None else ""
        verb = "lower"
        extra = ", add warm-up (gg.fixes.warmup_cosine), or keep the guard's LR backoff on"
        high = "too high"
    else:
        where = f" (LR range test suggests {sugg:.3g})" if sugg is not None else ""
        verb = "raise"
        extra = ""
        high = "too low"
    fix = (f"{verb} every group's LR alike: scale them by {factor:.3g} (to "
           f"{', '.join(f'{v * factor:.2g}' for v in lrs)}){extra}" if several else
           f"{verb} the LR to about {new:.2g}{extra}")
    code = (f"for g in optimizer.param_groups: g['lr'] *= {factor:.3g}" if several else
            f"for g in optimizer.param_groups: g['lr'] = {new:.3g}")
    return Finding(
        "learning_rate", sev,
        f"{_lrs(lrs)} {'are' if several else 'is'} {high}: {_at(lrs, 1)}, {user.describe()}; "
        f"{_at(lrs, factor)}, {t.describe()}{where}", evidence=ev, fix=fix, fix_code=code,
        score=abs(math.log10(factor)))
