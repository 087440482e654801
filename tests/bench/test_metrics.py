"""Stable LR range and LR sensitivity on hand-made results."""

import math

import pytest

from gradguard.bench.metrics import _widest, markdown, summarize


def row(remedy, lr, loss, seed=0, diverged=None, initial=10.0):
    div = (not math.isfinite(loss)) if diverged is None else diverged
    return {"scenario": "s", "remedy": remedy, "lr": lr, "seed": seed, "diverged": int(div),
            "initial_loss": initial, "final_test_loss": loss, "final_metric": "",
            "clipped": 0, "skipped": 0, "seconds": 0.1}


def test_widest_takes_the_longest_contiguous_stretch():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert _widest(lrs, [True, False, True, True, False]) == (1e-2, 1e-1, pytest.approx(1.0))
    assert _widest(lrs, [False] * 5) == (None, None, None)
    lo, hi, dec = _widest(lrs, [True] * 5)
    assert (lo, hi) == (1e-4, 1.0) and dec == pytest.approx(4.0)


def test_summary_range_and_sensitivity():
    lrs = [1e-3, 1e-2, 1e-1]
    rows = [row("none", 1e-3, 1.2), row("none", 1e-2, 1.0), row("none", 1e-1, math.inf),
            row("fix", 1e-3, 1.1), row("fix", 1e-2, 1.0), row("fix", 1e-1, 1.5)]
    out = {s.remedy: s for s in summarize(rows, {"s": 1e-1}, tol=0.1)}
    # best loss 1.0, initial 10 -> converged means loss <= 1.9
    assert (out["none"].stable_lo, out["none"].stable_hi) == (1e-3, 1e-2)
    assert out["fix"].stable_decades == pytest.approx(2.0)
    # Wortsman et al.: mean over LRs of min(L, L0) - L*, a diverged run counting as L0
    assert out["none"].lr_sensitivity == pytest.approx((0.2 + 0.0 + 9.0) / 3)
    assert out["fix"].lr_sensitivity == pytest.approx((0.1 + 0.0 + 0.5) / 3)
    assert out["none"].default_lr_diverged == 1.0 and out["fix"].default_lr_diverged == 0.0
    assert len(lrs) == 3


def test_one_diverged_seed_breaks_convergence_at_that_lr():
    rows = [row("a", 1e-2, 1.0, seed=0), row("a", 1e-2, math.inf, seed=1),
            row("a", 1e-3, 1.0, seed=0), row("a", 1e-3, 1.0, seed=1)]
    (s,) = summarize(rows, {"s": 1e-2})
    assert (s.stable_lo, s.stable_hi) == (1e-3, 1e-3)
    assert s.diverged_runs == 1 and s.default_lr_diverged == 0.5


def test_markdown_marks_the_widest_range():
    rows = [row("none", 1e-3, 1.0), row("none", 1e-2, math.inf),
            row("fix", 1e-3, 1.0), row("fix", 1e-2, 1.05)]
    md = markdown(summarize(rows, {"s": 1e-2}),
                  {"scenarios": {"s": {"lr": 1e-2, "grid": [1e-3, 1e-2], "metric": "",
                                       "summary": "demo"}}})
    assert "| fix | **1** |" in md and "| none | 0 |" in md
    assert "## s" in md


def test_the_verdict_claims_no_ratio_or_harm_it_could_not_measure():
    from gradguard.bench.metrics import SummaryRow, verdict

    def row(scn, remedy, decades, ratio=float("nan")):
        return SummaryRow(scn, remedy, 5, 0, 1e-3, 1e-2, decades, 0.5, 1.0, None, 0.0, 0.0,
                          0.0, 0.0, tol=0.1, default_lr_ratio=ratio)

    alone = "\n".join(verdict([row("a", "gradguard", 1.0)]))
    assert "(the only remedy run)" in alone and "no unguarded run ('none')" in alone
    assert "on 0 of the 0 where the ratio is defined" in alone
    assert "no harm on 0 of the 0 where the unguarded run converged" in alone
    both = "\n".join(verdict([row("a", "gradguard", 1.0, 1.2), row("a", "none", 0.5),
                              row("b", "gradguard", 1.0), row("b", "none", None)]))
    assert "on 1 of the 1 where the ratio is defined" in both  # (b: undefined, not a win)
    assert "no ratio (the unguarded run converged at no LR)" in both
