"""Issue #3's acceptance run: injected faults on real data under the default policy."""

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.report import summarize
from gradguard.scenarios.builtin import _mnist_split
from gradguard.scenarios.train import batches

FAULTS = {40: "nan", 75: "spike", 110: "nan", 150: "spike", 190: "spike", 230: "nan",
          265: "spike"}


def train(faults, log=None, steps=300, seed=0, guarded=True):
    xtr, ytr, xte, yte = _mnist_split(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    # fused=True in both runs, so guarded and plain runs use the same kernel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    guard = gg.Guard(model, opt, log=log) if guarded else None
    data = batches(xtr, ytr, 128, seed)
    poisoned = 0
    for s in range(steps):
        x, y = next(data)
        if faults.get(s) == "nan":
            x = torch.full_like(x, math.nan)  # a broken record
        elif faults.get(s) == "spike":
            x = x * 1000.0  # a batch in the wrong units
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if guard is None:
            if faults.get(s) != "nan":  # (what a guard can do at best: skip it)
                opt.step()
        else:
            guard.step(loss)
        sched.step()
        state = [p for p in model.parameters()] + [
            v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        poisoned += not all(torch.isfinite(t).all() for t in state)
    if guard is not None:
        guard.close()
    with torch.no_grad():
        test_loss = nn.functional.cross_entropy(model(xte), yte).item()
    return test_loss, poisoned


@pytest.mark.slow
def test_faulty_run_matches_clean_run_and_log_explains_each_fault(tmp_path):
    clean, _ = train({}, guarded=False)  # the same run, unguarded, without faults
    log = tmp_path / "run.jsonl"
    faulty, poisoned = train(FAULTS, log=log)
    assert poisoned == 0
    assert faulty == pytest.approx(clean, rel=0.02), (faulty, clean)

    s = summarize(log)
    assert s.steps == 300 and s.skipped == len(FAULTS)
    by_step = {}
    for e in s.timeline:
        if e["kind"] != "verdict":
            by_step.setdefault(e["step"], []).append(e)
    assert s.verdict.startswith("stable")
    for step, kind in FAULTS.items():
        kinds = {e["kind"] for e in by_step[step]}
        assert ("nonfinite" if kind == "nan" else "grad_spike") in kinds, (step, kinds)
        for e in by_step[step]:
            assert e["action"] == "skip"
            assert e["origin_layer"] == "0.weight"  # the corrupted input enters here
    # nothing else was flagged
    assert set(by_step) == set(FAULTS)


def test_a_corrupt_shard_is_skipped_as_the_run_without_it_would_be(tmp_path):
    # 12 batches in a row with NaN records (a corrupt shard): the data's fault, skipped
    # with the LR untouched; the run is bit for bit the one that skips those batches.
    shard = {s: "nan" for s in range(120, 132)}
    plain, _ = train(shard, steps=200, guarded=False)
    log = tmp_path / "run.jsonl"
    guarded, poisoned = train(shard, log=log, steps=200)
    assert poisoned == 0 and guarded == plain
    s = summarize(log)
    assert s.skipped == 12 and s.events["rollback"] == 0 and not s.lr_changes
    assert s.bad_data == 11  # (the first NaN step arms the watch on a CPU)
    from typer.testing import CliRunner

    from gradguard.cli import app
    out = CliRunner().invoke(app, ["report", str(log)], env={"COLUMNS": "200"}).output
    assert "12 (11 with NaN/Inf in the data)" in out
    assert "12 bad steps skipped (11 of them with NaN/Inf in the data" in s.verdict


def _regress(shard, steps=240, seed=0, guarded=True, pass_batch=True):
    """A diabetes MLP (standardised units), Adam; ``shard`` steps' targets are missing
    (NaN) for a third of their records, as a CSV with empty cells loads."""
    from gradguard.scenarios.data import diabetes

    x, y = diabetes()
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)  # (one kernel in both)
    guard = gg.Guard(model, opt, log=None, rollback=gg.Rollback(every=10)) if guarded else None
    data = batches(x[:360], y[:360], 32, seed)
    for s in range(steps):
        xb, yb = next(data)
        if s in shard:
            yb = yb.clone()
            yb[::3] = math.nan
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        if guard is None:
            if s not in shard:
                opt.step()
        else:
            guard.step(loss, batch=(xb, yb) if pass_batch else None)
    if guard is not None:
        guard.close()
    with torch.no_grad():
        held_out = nn.functional.mse_loss(model(x[360:]), y[360:]).item()
    return held_out, guard


def test_missing_targets_are_the_datas_when_the_batch_is_passed():
    # NaN targets leave the model's inputs finite: only the batch tells a shard of missing
    # labels from a model whose loss went NaN. Passed, the shard is skipped and the run
    # is bit for bit the one that skips those batches; not passed, it reads as
    # instability and is rolled back.
    shard = set(range(100, 112))
    plain, _ = _regress(shard, guarded=False)
    guarded, guard = _regress(shard)
    assert guarded == plain
    assert guard.rollbacks == 0 and guard.lr.scale == 1 and int(guard.skipped) == 12
    # (the first NaN step arms the watch on a CPU)
    assert [e["step"] for e in guard.recorder.events if e.get("data")] == list(range(101, 112))
    assert "(11 of them with NaN/Inf in the data" in guard.verdict()
    blind, blind_guard = _regress(shard, pass_batch=False)
    assert blind_guard.rollbacks >= 1 and blind != plain
