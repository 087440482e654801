"""A guard that is never closed still delivers its whole run log."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import torch

import gradguard as gg
from tests.conftest import backward, small_mlp

SCRIPT = textwrap.dedent("""
    import sys, torch
    import gradguard as gg
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log=sys.argv[1], flush_every=1000)
    for _ in range(7):
        opt.zero_grad()
        loss = model(torch.randn(32, 8)).pow(2).mean()
        loss.backward()
        guard.step(loss)
    # no guard.close(): the script just ends
""")


def steps_in(path) -> list[int]:
    return [r["step"] for r in gg.read_jsonl(path) if r["type"] == "step"]


def test_a_script_that_never_closes_its_guard_still_writes_every_step(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    log = tmp_path / "run.jsonl"
    res = subprocess.run([sys.executable, str(script), str(log)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert steps_in(log) == list(range(7))


def test_a_guard_collected_without_close_flushes_and_unhooks(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log = tmp_path / "run.jsonl"
    guard = gg.Guard(model, opt, log=log, flush_every=1000)
    for s in range(3):
        opt.zero_grad()
        guard.step(backward(model, seed=s))
    assert steps_in(log) == []  # still pending: flush_every=1000
    del guard
    gc.collect()
    assert steps_in(log) == [0, 1, 2]
    opt.zero_grad()
    backward(model)
    opt.step()  # the step hook went with the guard


def test_closing_twice_and_collecting_a_closed_guard_are_harmless(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.Guard(model, opt, log=tmp_path / "run.jsonl") as guard:
        guard.step(backward(model))
    guard.close()
    del guard
    gc.collect()
    assert steps_in(tmp_path / "run.jsonl") == [0]


def test_a_guard_closed_or_collected_before_its_first_step_leaves_no_forward_hooks():
    # The forward-order probe hooks every module with parameters until the first step;
    # a guard that never steps must still take them off (they would record every call).
    nn = torch.nn
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    def hooks():
        return sum(len(m._forward_pre_hooks) for m in model.modules())

    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert hooks() >= 2  # (the batch-size counter hooks the model too)
    guard.close()
    assert hooks() == 0
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert hooks() >= 2  # (the batch-size counter hooks the model too)
    del guard
    gc.collect()
    assert hooks() == 0


def _verdict(path) -> str:
    return next(r["message"] for r in gg.read_jsonl(path) if r.get("kind") == "verdict")


def test_a_run_an_exception_ends_gets_a_verdict_that_says_so(tmp_path):
    # Not "stable": the run did not finish. A `with` block, and a script whose uncaught
    # exception ends it (the exit handler closes the guard).
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace("# no guard.close(): the script just ends",
                                     "raise RuntimeError('the loader died')"))
    log = tmp_path / "run.jsonl"
    res = subprocess.run([sys.executable, str(script), str(log)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "the loader died" in res.stderr
    assert _verdict(log).startswith("stopped by RuntimeError: the loader died at step 7; "
                                    "until then: stable")
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        with gg.Guard(model, opt, log=tmp_path / "with.jsonl") as guard:
            for s in range(5):
                opt.zero_grad()
                guard.step(backward(model, seed=s))
            raise ValueError("out of memory")
    except ValueError:
        pass
    assert guard.verdict().startswith("stopped by ValueError: out of memory at step 5")
    assert _verdict(tmp_path / "with.jsonl") == guard.verdict()


def test_a_guard_stopped_before_its_first_step_writes_into_no_other_run(tmp_path):
    # Its "stopped" event went into the log after the previous guard's verdict, with no
    # run header of its own: the report read it as the earlier run's.
    log = tmp_path / "run.jsonl"
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.Guard(model, opt, log=log) as guard:
        for _ in range(3):
            guard.step(backward(model))
    before = log.read_text()
    try:
        with gg.Guard(model, opt, log=log):
            raise RuntimeError("the loader died")
    except RuntimeError:
        pass
    assert log.read_text() == before
