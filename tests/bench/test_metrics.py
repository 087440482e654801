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


def test_a_grid_where_every_run_diverged_has_no_stable_range():
    # Best loss ∞: no tolerance around it, and ∞ <= ∞ must not call a diverged cell stable.
    rows = [row(rem, lr, math.inf, seed=s) for rem in ("none", "skip-nonfinite", "gradguard")
            for lr in (1e-2, 1e-1) for s in (0, 1)]
    out = {s.remedy: s for s in summarize(rows, {"s": 1e-1})}
    for s in out.values():
        assert (s.stable_lo, s.stable_hi, s.stable_decades) == (None, None, None)
        assert s.harm_checked == 0 and s.harm_lrs == "" and math.isnan(s.tol)
    md = markdown(list(out.values()), {"scenarios": {"s": {"lr": 1e-1, "grid": [1e-2, 1e-1],
                                                           "metric": "", "summary": "x"}}})
    assert "no remedy converged at any LR of the grid" in md
    assert "gradguard none decades" in md and "harm not checked" in md
    assert "| gradguard | none | – |" in md and "not checked" in md


def test_a_diverged_median_never_converges_even_next_to_a_finite_best():
    rows = [row("a", 1e-3, 1.0), row("a", 1e-2, math.inf), row("b", 1e-3, math.inf),
            row("b", 1e-2, math.inf)]
    out = {s.remedy: s for s in summarize(rows, {"s": 1e-2})}
    assert out["a"].stable_decades == 0 and out["b"].stable_decades is None


def test_default_lr_columns_stay_empty_when_the_grid_leaves_the_default_out():
    rows = [row("none", 1e-3, 1.0), row("none", 1e-2, math.inf),
            row("fix", 1e-3, 1.1), row("fix", 1e-2, 1.2)]
    out = {s.remedy: s for s in summarize(rows, {"s": 1e-1})}  # default 1e-1: not in grid
    for s in out.values():
        assert s.default_lr_in_grid == 0
        assert math.isnan(s.default_lr_test_loss) and math.isnan(s.default_lr_diverged)
        assert math.isnan(s.default_lr_ratio) and s.default_lr_metric is None
    # On the grid, the columns are read at the default LR itself.
    (on,) = [s for s in summarize(rows, {"s": 1e-2}) if s.remedy == "fix"]
    assert on.default_lr_in_grid == 1 and on.default_lr_test_loss == 1.2
    md = markdown(list(out.values()), {"scenarios": {"s": {"lr": 1e-1, "grid": [1e-3, 1e-2],
                                                           "metric": "", "summary": "x"}}})
    assert "(empty: the LR grid leaves the default LR out)" in md
    assert "| fix | 0.001–0.01 | 1 | 0.15 | – | – | – | – |" in md
    rows.append(row("gradguard", 1e-3, 1.0))
    verdict_md = markdown(summarize(rows, {"s": 1e-1}), {"scenarios": {}})
    assert "no ratio at the exploding LR (the LR grid leaves it out)" in verdict_md
