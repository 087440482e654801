"""Smoke test for benchmarks/noharm.py: every case runs guarded and not, and the tables are
written. The committed NOHARM.md is the measurement; three steps prove nothing about it."""

from __future__ import annotations

import math

import pytest

# (the script is loaded by the ``noharm`` fixture of tests/conftest.py)


def test_every_case_runs_guarded_and_not(noharm, one_thread):
    for name, case in {**noharm.cases(), **noharm.noisy_cases()}.items():
        for guarded in (False, True):
            loss, acted = noharm.run(case, guarded, 0, 3)
            assert isinstance(loss, float) and not math.isnan(loss), (name, guarded)
            want = {"flagged", "rollbacks", "lr_cut", "gave_up"} if guarded else set()
            assert set(acted) == want, (name, guarded)


def test_noharm_script_writes_a_row_per_case(noharm, tmp_path):
    out = tmp_path / "NOHARM.md"
    healthy, noisy = next(iter(noharm.cases())), next(iter(noharm.noisy_cases()))
    args = ["--seeds", "2", "--steps", "3", "--out", str(out)]
    assert noharm.main([*args, "--case", healthy, "--case", noisy]) == 0
    text = out.read_text()
    for name in (healthy, noisy):
        assert f"| {name} |" in text
    assert "## Verdict" in text and "## Not healthy without a guard" in text
    with pytest.raises(SystemExit):
        noharm.main([*args, "--case", "no-such-case"])


def test_the_harm_test_flags_a_consistent_cost_and_not_noise(noharm):
    none = [1.0, 1.1, 0.9, 1.05, 0.95]
    assert not noharm.paired(none, none)["harm"]
    worse = noharm.paired(none, [v + 0.5 for v in none])
    assert worse["harm"] and worse["worse"] == 5 and worse["p"] < 0.07
    assert not noharm.paired(none, [v + 0.01 for v in none])["harm"]


def test_a_minority_of_seeds_far_worse_is_counted_apart(noharm):
    # The restarts' CNN of stop 48: three seeds of ten cut and ending ~1.8x worse, the
    # others unchanged: the median test says no harm, the far count says three.
    none = [0.133, 0.165, 0.191, 0.175, 0.179, 0.169, 0.181, 0.138, 0.179, 0.176]
    guard = [0.139, 0.281, 0.346, 0.175, 0.179, 0.311, 0.181, 0.138, 0.169, 0.176]
    r = noharm.paired(none, guard)
    assert not r["harm"] and r["far_worse"] == 3 and r["far_better"] == 0
    # Diverged seeds count, and the magnitude of a negative loss (an NLL) is the scale.
    assert noharm._far(1.0, float("inf")) == 1 and noharm._far(float("inf"), 1.0) == -1
    assert noharm._far(float("inf"), float("inf")) == 0
    assert noharm._far(-1.0, -0.7) == 1 and noharm._far(-1.0, -0.9) == 0
