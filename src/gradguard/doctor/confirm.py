"""Severity from consequences: the doctor's suspicions, confirmed or cleared by trials.

The checks measure the model at initialisation and flag *suspicions*. This module sets
each suspicion's severity from what happens when copies are trained
(:mod:`gradguard.doctor.trial`): the setup as it is, and with the fix the finding proposes.

- ``init`` / ``recurrent`` → ``gg.fixes.reinit(model, "auto")``; ``input_scale`` →
  ``gg.fixes.Standardizer``; :func:`~gradguard.doctor.trial.verdict` decides.
- ``learning_rate`` is judged last: when the run fails at the user's LR and a fix above
  cures it *at that LR*, the LR is a symptom (info); otherwise LR/10 (then LR/100) is
  tried and judged the same way.
- ``activations`` and ``architecture`` findings explain a failure but have no single fix
  to test: at most a warning when the run fails, info when it trains.
- ``precision`` findings are configuration facts (fp16 without loss scaling) and keep
  their severity.
- Without an optimizer nothing can be trained: suspicions are capped at warning and say so.
"""

from __future__ import annotations

import math
from typing import Any

from .findings import CAUSES, Finding
from .lr_find import Batch
from .trial import Trial, Trials, verdict

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


def _trial_of(kind: str, trials: Trials, sample: list[Batch]) -> Trial:
    return trials.reinit() if kind == "reinit" else trials.standardized(sample)


def _judge(f: Finding, user: Trial, fixed: Trial) -> None:
    f.severity = verdict(user, fixed)
    f.evidence["trial"] = {"as_is": user.summary(), "fixed": fixed.summary()}
    if f.severity == "info":
        # Nothing to apply: the fix either is not needed or does not help.
        f.fix_code = ""
        if user.ok:
            f.title += (f" — but training as is is fine ({user.describe()}), so this is how "
                        "the model starts, not a problem")
            f.fix = ""
        else:
            f.title += (f" — training as is fails ({user.describe()}), and {fixed.label} it "
                        f"does too ({fixed.describe()}): not the cause")
    elif f.severity == "critical":
        f.title += (f" — training as is: {user.describe()}; {fixed.label}: "
                    f"{fixed.describe()}")
    else:
        f.title += (f" — training as is: {user.describe()}; {fixed.label}, it goes much "
                    f"further: {fixed.describe()}")


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
    for f in sorted(findings, key=lambda f: CAUSES.index(f.check)):
        kind = _FIXED_BY.get(f.check)
        if kind is not None:
            _judge(f, user, _trial_of(kind, trials, sample))
            if f.severity == "critical" and cured_by is None:
                cured_by = f.check
        elif f.check in _EXPLAINERS:
            if user.ok:
                f.severity = "info"
            elif f.severity == "critical":
                f.severity = "warning"
    return [*findings, *_lr_findings(user, trials, lr_meas, cured_by)]


def _lr_findings(user: Trial, trials: Trials, meas: dict[str, Any],
                 cured_by: str | None) -> list[Finding]:
    lr = trials.user_lr
    div, sugg = meas.get("diverges_at"), meas.get("suggested")
    ev: dict[str, Any] = {**meas, "user_lr": lr, "trial": {"as_is": user.summary()}}
    if user.ok:
        if div is not None and lr >= div:
            return [Finding(
                "learning_rate", "info",
                f"the LR range test's loss diverged at {div:.3g}, below your learning rate "
                f"{lr:.3g}, but training at it is fine ({user.describe()})", evidence=ev,
                fix="if the run blows up later, lower the LR or add warm-up "
                    "(gg.fixes.warmup_cosine)")]
        if sugg is not None and lr < sugg / 100:
            return [Finding(
                "learning_rate", "info",
                f"learning rate {lr:.3g} is far below the range test's suggestion "
                f"({sugg:.3g}); training may be slow", evidence=ev)]
        return []
    if cured_by is not None:
        return [Finding(
            "learning_rate", "info",
            f"training at learning rate {lr:.3g} fails ({user.describe()}) — a symptom of "
            f"{cured_by}: its fix trains at this same LR", evidence=ev,
            fix=f"fix {cured_by} first; the LR is then fine")]
    new_lr, low = trials.lower_lr()
    ev["trial"]["fixed"] = low.summary()
    ev["suggested_lr"] = new_lr
    sev = verdict(user, low)
    where = f" (LR range test: the loss diverges from {div:.3g})" if div is not None else ""
    if sev == "info":
        return [Finding(
            "learning_rate", "info",
            f"training at learning rate {lr:.3g} fails ({user.describe()}), and at {new_lr:.3g} "
            f"too ({low.describe()}): the LR alone is not the cause{where}", evidence=ev)]
    return [Finding(
        "learning_rate", sev,
        f"learning rate {lr:.3g} is too high: at {lr:.3g}, {user.describe()}; at "
        f"{new_lr:.3g}, {low.describe()}{where}", evidence=ev,
        fix=f"lower the LR to about {new_lr:.2g}, add warm-up (gg.fixes.warmup_cosine), or "
            "keep the guard's LR backoff on",
        fix_code=f"for g in optimizer.param_groups: g['lr'] = {new_lr:.3g}",
        score=math.log10(max(lr / new_lr, 1.0)))]
