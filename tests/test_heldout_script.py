"""Smoke test for benchmarks/heldout.py: every case and arm runs, and the table is written
(in worker processes, as the docs run it).

No assertions on the losses: three steps prove nothing about them; the committed
HELDOUT.md is the measurement.
"""

from __future__ import annotations

import csv
import math

import pytest


def test_every_case_runs_in_every_arm(heldout, one_thread):
    # One LR per case: the LR grid only changes a number, the code each case runs (data,
    # model, loss, optimizer, schedule, autocast) is the same at every LR.
    for name, case in heldout.cases().items():
        for arm in heldout.ARMS:
            loss, gave_up = heldout.run(case, arm, case[4][-1], 0, 3)
            assert isinstance(loss, float) and not math.isnan(loss), (name, arm)
            assert gave_up in (False, True)


def test_heldout_script_writes_a_row_per_case_and_lr(heldout, tmp_path):
    out = tmp_path / "HELDOUT.md"
    chosen = ["rnn-memory", "softmax-raw"]
    runs = tmp_path / "runs.csv"
    args = ["--seeds", "2", "--steps", "3", "--jobs", "2", "--out", str(out)]
    assert heldout.main([*args, "--runs", str(runs),
                         *(a for c in chosen for a in ("--case", c))]) == 0
    rows = sum(len(heldout.cases()[c][4]) for c in chosen)
    # One CSV row per case, LR, arm and seed, each loss the one the table's median is of.
    with runs.open() as f:
        rows_csv = list(csv.DictReader(f))
    assert len(rows_csv) == rows * len(heldout.ARMS) * 2
    assert {r["case"] for r in rows_csv} == set(chosen)
    assert all(float(r["loss"]) >= 0 and r["gave_up"] in ("0", "1") for r in rows_csv)
    text = out.read_text()
    assert text.count("\n| ") - len(chosen) == rows  # minus one header per case
    assert "## Tally" in text and "## rnn-memory" in text and "## softmax-raw" in text
    assert {r["steps"] for r in rows_csv} == {"3"}
    assert len({r["machine"] for r in rows_csv}) == 1
    # (the unguarded arms' runs depend on the cases' code only, the guarded arm's on the
    # guard's too)
    codes = {r["arm"]: r["code"] for r in rows_csv}
    assert codes["none"] == codes["clip 1.0"] != codes["gradguard"]
    with pytest.raises(SystemExit):
        heldout.main([*args, "--case", "no-such-case"])


def test_an_interrupted_regeneration_resumes_from_its_runs_file(heldout, tmp_path,
                                                               monkeypatch):
    runs, out = tmp_path / "runs.csv", tmp_path / "HELDOUT.md"
    args = ["--seeds", "2", "--steps", "3", "--case", "softmax-raw", "--out", str(out),
            "--runs", str(runs)]
    assert heldout.main(args) == 0
    whole, table = runs.read_text().splitlines(), out.read_text()
    n = len(whole) - 1
    runs.write_text("\n".join(whole[:-3]) + "\n")  # (killed three runs before the end)
    ran = []
    job = heldout._job
    monkeypatch.setattr(heldout, "_job", lambda j: ran.append(j) or job(j))
    assert heldout.main(args) == 0
    assert len(ran) == 3  # only the runs the file lacked
    with runs.open() as f:
        assert len(list(csv.DictReader(f))) == n
    # The same table as the uninterrupted run's (but its wall time).
    assert out.read_text().split("## Tally")[0] == table.split("## Tally")[0]
    # After a change to the guard, only the guarded arm's runs are stale.
    ran.clear()
    digest = heldout.code_digest
    monkeypatch.setattr(heldout, "code_digest",
                        lambda arm: "changed" if arm == "gradguard" else digest(arm))
    assert heldout.main(args) == 0
    assert len(ran) == n // len(heldout.ARMS) and {j[1] for j in ran} == {"gradguard"}
    # Runs of another length are not mixed in.
    with pytest.raises(SystemExit, match="holds runs of 3 steps"):
        heldout.main([*args[:2], "--steps", "4", *args[4:]])
