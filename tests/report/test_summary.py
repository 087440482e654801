"""The run summary tells the truth about how a run ended."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from typer.testing import CliRunner

import gradguard as gg
from gradguard.cli import app
from gradguard.report import summarize
from tests.conftest import backward, small_mlp


def run(path, steps: int, nan_from: int | None = None, with_loss: bool = True):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gg.Guard(model, opt, log=path) as guard:
        for s in range(steps):
            opt.zero_grad()
            loss = backward(model, seed=s, nan=nan_from is not None and s >= nan_from)
            guard.step(loss if with_loss else None)
    return path


def test_a_run_that_ends_nan_says_so(tmp_path):
    s = summarize(run(tmp_path / "r.jsonl", 12, nan_from=9))
    assert math.isfinite(s.first_loss)
    assert math.isnan(s.last_loss) and s.ended_nonfinite
    assert s.last_finite_step == 8 and math.isfinite(s.last_finite_loss)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "r.jsonl")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "→ NaN (last finite" in res.output and "at step 8)" in res.output


def test_a_healthy_run_and_a_run_without_losses(tmp_path):
    s = summarize(run(tmp_path / "a.jsonl", 5))
    assert math.isfinite(s.last_loss) and not s.ended_nonfinite and s.last_finite_step == 4
    s = summarize(run(tmp_path / "b.jsonl", 5, with_loss=False))
    assert s.first_loss is None and s.last_loss is None and not s.ended_nonfinite


def test_each_guard_appending_to_one_log_is_its_own_run(tmp_path):
    path = tmp_path / "r.jsonl"
    run(path, 30, nan_from=28)  # the first run ends NaN
    run(path, 12)  # a second, healthy one appends to the same file
    last, first = summarize(path), summarize(path, run=0)
    assert (last.runs, last.run, last.steps) == (2, 1, 12) and not last.ended_nonfinite
    assert first.steps == 30 and first.ended_nonfinite
    out = CliRunner().invoke(app, ["report", str(path)], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "run 2 of 2" in out.output
    bad = CliRunner().invoke(app, ["report", str(path), "--run", "5"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "holds 2 run(s)" in bad.output
    from gradguard.report.html import run_log_html

    assert "run 1 of 2" in run_log_html(path, run=0)


def test_two_open_guards_on_one_log_are_warned_about(tmp_path):
    # Sequential runs append as runs of their own (above); two live guards interleave.
    log = tmp_path / "run.jsonl"
    model = torch.nn.Linear(3, 1)
    first = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log=log)
    with pytest.warns(gg.GuardUsageWarning, match="another open guard is writing to"):
        second = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log=log)
    first.close()
    second.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gg.GuardUsageWarning)
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log=log).close()


def _nan_run(guard, model, steps, nan_at):
    for i in steps:
        model.zero_grad()
        guard.step(backward(model, seed=i, nan=i in nan_at))


def test_a_resumed_run_is_one_run_and_a_crash_resume_replaces_the_steps_done_again(tmp_path):
    # A guard that loads a saved state continues its run: the report read the resumed
    # part alone (skips since the resume, the first loss of the resumed step) next to
    # whole-run figures (the step count, the verdict's carried tallies).
    log = tmp_path / "run.jsonl"
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log=log)
    _nan_run(guard, model, range(30), {5, 10, 20})
    state = guard.state_dict()
    _nan_run(guard, model, range(30, 40), {35})  # steps a crash loses: done again below
    guard.recorder.flush()
    with pytest.warns(gg.GuardUsageWarning):  # (the crashed guard is still open)
        guard2 = gg.Guard(model, opt, log=log)
    guard2.load_state_dict(state)
    _nan_run(guard2, model, range(30, 60), {50})
    guard2.close()
    guard.close()  # (the crashed guard's late close: its verdict is past the resume)
    s = summarize(log)
    assert s.runs == 1 and s.resumed_at == [30]
    assert (s.steps, s.skipped) == (60, 4)  # step 35 of the lost part is not counted
    assert s.events["nonfinite"] == 4 and s.first_loss is not None
    assert "4 bad steps skipped" in s.verdict


def test_lines_that_are_no_record_are_counted_and_wrong_types_take_defaults(tmp_path):
    log = tmp_path / "run.jsonl"
    model = small_mlp()
    with gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.01), log=log) as guard:
        _nan_run(guard, model, range(10), set())
    lines = log.read_text().splitlines()
    lines[3] = lines[3][:20]  # torn
    lines.insert(5, "not json at all")
    lines[0] = lines[0].replace('"params":[', '"params":5,"was":[')
    log.write_text("\n".join(lines) + "\n")
    s = summarize(log)
    assert s.bad_lines == 2 and s.steps == 10 and list(s.meta.params) == []
    res = CliRunner().invoke(app, ["report", str(log), "--html", str(tmp_path / "r.html")],
                             env={"COLUMNS": "120"})
    assert res.exit_code == 0 and "unreadable lines (skipped)" in res.output


def test_a_finished_run_resumed_from_an_earlier_step_is_a_new_run(tmp_path):
    # A new experiment branching off a finished run's checkpoint hid that run's later
    # steps and its verdict (they gave way to the branch); a planned pause resumed where
    # the run stopped is still one run.
    log = tmp_path / "run.jsonl"
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log=log)
    _nan_run(guard, model, range(10), set())
    early = guard.state_dict()
    _nan_run(guard, model, range(10, 30), {20})
    end = guard.state_dict()
    guard.close()
    branch = gg.Guard(model, opt, log=log)
    branch.load_state_dict(early)
    _nan_run(branch, model, range(10, 15), set())
    branch.close()
    assert [(s.steps, s.skipped) for s in (summarize(log, 0), summarize(log, 1))] == [
        (30, 1), (15, 0)]
    later = gg.Guard(model, opt, log=log)
    later.load_state_dict(end)
    _nan_run(later, model, range(30, 40), set())
    later.close()
    s = summarize(log, 0)  # (resumed where run 0 stopped: run 0 goes on, not the branch)
    assert (s.runs, s.steps, s.skipped, s.resumed_at) == (2, 40, 1, [30])
