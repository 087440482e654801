"""What the guard says: flagged-step events, the give-up message, the diagnosis, the verdict.

The wording lives here, apart from the decisions, so the guard's own code reads as what it
does. Every message says what happened and, where there is one, what to do about it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .control import Controller, counted
from .detect import LayerAttribution
from .record import Recorder, encode_float

__all__ = ["data_fault", "describe_flags", "diagnosis", "give_up", "skipped_out",
           "verdict"]


def _why(z: float, early: str) -> str:
    # Before a detector's warm-up ends it has no z-score, only its early ratio rule.
    if z == 0.0:
        return f"early check: far above the {early} so far"
    return f"z={z:.2f}"


def data_fault(rec: dict[str, Any]) -> bool:
    """A NaN/Inf step whose data held NaN/Inf (:class:`~gradguard.params.InputWatch`)."""
    return bool(rec["nonfinite"] and rec.get("bad_inputs"))


def describe_flags(recorder: Recorder, attribution: LayerAttribution, rec: dict[str, Any],
                   norms: np.ndarray) -> None:
    """One event per detector that flagged the row, with where the trouble starts."""
    k = rec["step"]
    att = attribution.attribute(norms)
    where = f" starting at {att.origin}" if att.origin else ""
    # What the device actually did, whatever the configured action was called.
    if rec["skipped"]:
        action = "skip"
    elif rec.get("_held"):
        action = "hold"  # (the restored weights being judged: HostSide.take_hold)
    elif rec["clipped_norm"] < rec["grad_norm"] * (1 - 1e-6):
        action = "clip"
    else:
        action = "none"
    done = {"skip": "step skipped", "clip": "step clipped", "none": "step applied as is",
            "hold": "step held (the restored weights are being judged)"}[action]
    common = {"action": action, "origin_layer": att.origin,
              "top_layers": [[n, round(z, 2) if math.isfinite(z) else encode_float(z)]
                             for n, z in att.top],
              "grad_norm": rec["grad_norm"], "loss": rec["loss"]}
    if data_fault(rec):
        # (the attribution would name the first layer: the NaN/Inf came in with the data)
        recorder.event(k, "nonfinite", f"NaN/Inf in the data (the first layer's inputs or "
                       f"the batch passed to step): the data's, not the run's; {done}, the LR "
                       "unchanged", data=True, **common)
    elif rec["nonfinite"]:
        recorder.event(k, "nonfinite", f"NaN/Inf in gradients or loss{where}; {done}", **common)
    if rec["grad_spike"]:
        recorder.event(k, "grad_spike", f"gradient norm {rec['grad_norm']:.4g} spiked "
                       f"({_why(rec['grad_z'], 'median norm')}){where}; {done}",
                       z=rec["grad_z"], **common)
    if rec["loss_spike"]:
        recorder.event(k, "loss_spike", f"loss {rec['loss']:.4g} spiked "
                       f"({_why(rec['loss_z'], 'median loss')}){where}; {done}",
                       z=rec["loss_z"], **common)


def skipped_out(n: int, data: int, first: str) -> str:
    """Why the guard stops after ``n`` skipped steps in a row, ``data`` of them (the last
    ones) with NaN/Inf in the data (the ``first`` layer's inputs or the step's batch)."""
    # (On a CPU the first NaN/Inf row arms the watch: that one row is not known.)
    if data and data >= n - 1:
        return (f"{n} consecutive steps skipped, the data (the inputs of the first layer "
                f"({first}) or the batch passed to guard.step) held NaN/Inf on every one: "
                "the data carries them, not the model or the LR. "
                "Check the data pipeline (a NaN in a file, a division by zero in "
                "preprocessing); Policy(max_consecutive_skips=...) sets how long the guard "
                "skips such batches")
    return f"{n} consecutive steps skipped: the model cannot recover by skipping"


# What a run whose give-back test stood down showed (Controller.unstable).
_SANK_BACK = ("its loss sank back towards its start at a tenth, a hundredth and a thousandth "
              "of the LR alike")


def give_up(reason: str, scale: float, lr: Any,
            dead: tuple[str, str, int, int] | None = None) -> str:
    """Why the guard stops: the run is unstable at any LR it can give (``dead``: the run
    ended with dead units, as :func:`verdict` takes them)."""
    try:
        at = f" (lr {float(lr) * scale:.3g})"
    except (TypeError, ValueError):
        at = ""
    if dead is not None:
        # Dead units explain a run no LR helps better than "unstable at any LR".
        tensor, _, _, since = dead
        return (f"{reason}, and the LR is already scaled ×{scale:.3g}{at}; hidden units "
                f"died at step {since} (no gradient reached {tensor} from there on), "
                "and no LR revives them. Restart from before the first oversized steps with "
                "a lower LR, standardised inputs or a better init (`gradguard doctor` tells "
                "which)")
    return (f"{reason}, and the LR is already scaled ×{scale:.3g}{at}: this run is unstable "
            "at any LR the guard can give it. The base LR, the initialisation or the "
            "inputs' scale is the problem: run `gradguard doctor` on this model, or start "
            "from a much lower LR")


def diagnosis(recorder: Recorder, steps: int, rollbacks: int, scale: float,
              last_good: int | None) -> dict[str, Any]:
    """What the guard has seen so far: event counts, origins, LR scale, rollbacks."""
    t = recorder.tally()
    return {"steps": steps, "events": t["kinds"], "origin_layers": t["origins"],
            "rollbacks": rollbacks, "lr_scale": scale, "last_good_step": last_good,
            "recent_events": recorder.events[-10:]}


def verdict(recorder: Recorder, control: Controller | None, rollbacks: int, lr: Any,
            recurrent: Sequence[str] = (), recurrent_clipped: int = 0,
            ratio: float | None = None, batch_noise: float | None = None,
            lr_span: tuple[float, float] | None = None,
            dead: tuple[str, str, int, int] | None = None, warmup: int = 0) -> str:
    """One sentence on how the run went and what to change (``ratio``: every step was
    clipped to that many times the typical norm, for the ``recurrent`` layers or for any
    model; ``recurrent_clipped``: the steps any clipping changed in such a run;
    ``batch_noise``: the ratio the restore echo measured when it took an early cut back;
    ``lr_span``: the lowest and highest base LR of the run, a schedule when they differ;
    ``dead``: the run ended with dead units, as (deepest tensor without a gradient, the
    live one after it, how many tensors get none, the step since which); ``warmup``: the
    length of the guard's warm-up, 0 when it had none or stood down for the user's)."""
    c = control
    gave_up = [e for e in recorder.events if e["kind"] == "diverged"]
    if gave_up:  # (no LR is advice then: the guard found none the run is stable at)
        e = gave_up[-1]
        why = e["message"].removeprefix("gave up: ")
        return f"gave up at step {e['step']}: {why}"
    # (Two windows of losses at least: "no progress" after a handful of steps is no news.)
    stalled = None if c is None or dead is not None or c.rows < 2 * c.cfg.window \
        else c.stalled()
    # (Steps, not events: one skipped step can carry several skip events.)
    t = recorder.tally()
    skipped, data = t["skipped"], t["data"]
    # (the changes the guard found; one the user announced needs no account)
    shifts = [e for e in recorder.events if e.get("kind") == "data_shift" and "then" in e]
    shifted = ""
    if shifts:
        e = shifts[-1]
        at = ", ".join(str(x["step"]) for x in shifts)
        shifted = (f"; the data changed (at step {at}: weights restored from step "
                   f"{e['to_step']} scored {e['now']:.4g} against "
                   f"{e['then']:.4g} when saved), so the rollback that rise "
                   "caused was no LR problem: its LR cut was taken back and the guard "
                   "learned the new data's statistics afresh")
    changes = [e for e in recorder.events if e.get("model_changed")]
    if changes:
        at = ", ".join(str(x["step"]) for x in changes)
        shifted += (f"; the model was changed during the run (found at step {at}: its "
                    "snapshots no longer fit it), so the rise that came with it was no LR "
                    "problem: its LR cut was taken back and the guard learned the changed "
                    "model's statistics afresh")
    said = _verdict((skipped, data), control, rollbacks, lr, recurrent, recurrent_clipped, ratio,
                    batch_noise, lr_span, dead is not None or stalled is not None, shifted)
    warm = next((e for e in recorder.events if e["kind"] == "warmup"), None)
    if warm is not None and warmup:
        said += (f"; besides, a warm-up ramped the LR up over the first {warmup} steps "
                 f"({warm['found']}: Stability(warmup='attention'))")
    stops = [e for e in recorder.events if e["kind"] == "stopped"]
    if stops:  # (a crashed run is not a stable one: what the guard saw comes after)
        e = stops[-1]
        said = f"{e['message'].removeprefix('the run ')} at step {e['step']}; until then: {said}"
    if stalled is not None:
        assert c is not None
        level, first = stalled
        if c.giveback_off:
            why = (f"{_SANK_BACK}, so the LR alone is not the problem: check the init and "
                   "the inputs")
        elif rollbacks or c.cuts or c.clip_since is not None:
            why = ("the guard had to step in on the way (rollbacks, LR cuts or clipping), "
                   "so the LR is likely too high for this model: try a tenth of it")
        elif skipped:
            why = ("with bad steps skipped on the way, the LR may be too high for this "
                   "model (or the data noisy): try a tenth of it")
        elif (rose := c.rose()) is not None:
            peak, at = rose
            why = (f"and nothing was skipped, clipped or cut, but the loss level rose to "
                   f"{peak:.4g} by step {at}, beyond its noise above where it started: "
                   "steps that push the loss up are too large, so the LR is likely too high "
                   "for this model: try a tenth of it")
        else:
            why = ("and nothing was skipped, clipped or cut: the LR may be too low, or so "
                   "high that the loss bounces at one level; try ten times either way")
        return (f"no progress: after {c.rows} steps the loss level ({level:.4g}) is no "
                f"lower than where it started ({first:.4g}) — {why} (`gradguard doctor` "
                f"checks the LR, the init and the inputs). Besides: {said}")
    if dead is None:
        return said
    deepest, after, n, since = dead
    more = f" (and {counted(n - 1, 'tensor')} before it)" if n > 1 else ""
    return (f"stopped learning: from step {since} on, no gradient reaches {deepest}{more} on "
            f"most steps while {after} still gets one — the units in between died (ReLUs "
            "off, or tanh/sigmoid saturated, for every example) and no LR revives them; "
            "restart from before the first oversized steps with a lower LR, standardised "
            f"inputs or a better init (`gradguard doctor` tells which). Besides: {said}")


def _verdict(skips: tuple[int, int], control: Controller | None, rollbacks: int, lr: Any,
             recurrent: Sequence[str], recurrent_clipped: int, ratio: float | None,
             batch_noise: float | None, lr_span: tuple[float, float] | None,
             led: bool = False, shifted: str = "") -> str:
    """The verdict of a run that learned; with ``led``, only what the guard did (dead
    units or a run without progress lead, and no LR the run ended at is advice)."""
    skipped, data = skips
    bad = f"{counted(skipped, 'bad step')} skipped" if skipped else "no step skipped"
    if data:
        bad += (f" ({data} of them with NaN/Inf in the data: the data's, not the "
                "run's; check the data pipeline)")
    c = control
    # (No threshold is advised: the typical norm falls as the loss does, so its value at
    # the end would cripple the start of a run clipped to it.)
    clipped = "" if c is None or c.clip_since is None else (
        f"; from step {c.clip_since} every step was clipped to the typical gradient norm "
        "(the run had given back its progress: at this LR it trains only with its gradient "
        "norm clipped; without the guard, clip with gg.clip.Quantile(0.5) or "
        "clip_grad_norm_)")
    rnn = ""
    if ratio is not None:
        why = (f"recurrent layers ({listed(recurrent)})" if recurrent
               else "clip_recurrent='always'")
        rnn = (f"; {why}: every step was clipped to at most {ratio:g}× the typical gradient "
               f"norm, {counted(recurrent_clipped, 'step')} clipped in all "
               "(Policy(clip_recurrent=False) turns that off)")
    noise = "" if batch_noise is None else (
        f"; an early rollback was batch noise, not the LR (two batches at the same weights "
        f"differed {batch_noise:.3g}×): the LR was restored and the early checks stood "
        f"down; for a model that has already trained, NormSpike(early_ratio=None) and "
        f"LossSpike(early_ratio=None) turn them off")
    noise += shifted
    if c is None or c.cuts == 0:
        failures = "a sudden failure" if c is not None and c.retries == 1 else "sudden failures"
        retried = (f"; {counted(c.retries, 'rollback')} after {failures}, retried at the "
                   "same LR" if c is not None and c.retries else "")
        # Rollbacks that were no retry: at the floor (a run that made progress is rolled
        # back at the same LR), or after a cut taken back (the snapshot held the damage).
        if (others := rollbacks - (c.retries if c is not None else 0)) > 0 and not (
                c is not None and c.giveback_off):
            retried += (f"; {counted(others, 'rollback')} to an earlier snapshot at the "
                        "same LR")
        state = "stable" if not clipped else "unstable at your LR without clipping"
        lr_said, standdown = "the LR was never changed", ""
        if c is not None and c.giveback_off:
            state = "unsettled" if not clipped else state
            lr_said = "the LR ended where it began"
            standdown = (f"; {_SANK_BACK}, so those cuts were taken back "
                         f"({counted(rollbacks, 'rollback')} in all)")
        state = "" if led else f"{state}: "
        return f"{state}{bad}, {lr_said}{retried}{standdown}{noise}{clipped}{rnn}"
    share = c.scaled_rows / max(c.rows, 1)
    advice = "Set that LR (or warm up to it)"
    try:
        if isinstance(lr, list | tuple):  # (parameter groups with their own LRs)
            shown = ", ".join(f"{float(v) * c.scale:.3g}" for v in lr[:4])
            at = (f"×{c.scale:.3g} of each group's LR (lr ≈ {shown}"
                  f"{', …' if len(lr) > 4 else ''})")
            advice = "Set those LRs (or warm up to them)"
        else:
            at = f"lr ≈ {float(lr) * c.scale:.3g} (×{c.scale:.3g} of lr {float(lr):.3g})"
    except (TypeError, ValueError):
        at = f"×{c.scale:.3g} of your LR"
    if lr_span is not None and lr_span[1] > lr_span[0] * (1 + 1e-6):
        # A schedule moved the LR: one LR to "set" would be its value at the last step.
        peak = lr_span[1]
        at = (f"×{c.scale:.3g} of your schedule (its peak lr {peak:.3g} would be "
              f"≈ {peak * c.scale:.3g})")
        advice = "Scale your schedule by that"
    times = "once" if c.cuts == 1 else f"{c.cuts} times"
    how = counted(rollbacks, 'rollback') if rollbacks else "in place, no rollback"
    if led:
        return (f"the guard lowered the LR {times} ({how}), to {at}; "
                f"{bad}{noise}{clipped}{rnn}")
    return (f"unstable at your LR: the guard lowered it {times} "
            f"({how}), it was scaled down on {share:.0%} of steps, "
            "and the run ended "
            f"stable at {at}; {bad}{noise}{clipped}{rnn}. {advice} to train without the "
            "guard's help")


def listed(names: Sequence[str]) -> str:
    """The first two names, and how many more ("a, b and 3 more")."""
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    return f"{', '.join(names[:2])}{more}"


def group_lr(optimizer: Any) -> Any:
    """The optimizer's LR for the verdict: one number, or each group's where they differ."""
    lrs = [g.get("lr") for g in optimizer.param_groups]
    return lrs[0] if all(_same(v, lrs[0]) for v in lrs) else lrs


def _same(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a is b
