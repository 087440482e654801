"""Resume mid-run: a guard restored from ``state_dict`` decides as the uninterrupted one."""

import copy
import math

import pytest
import torch
from torch import nn

import gradguard as gg

# Trouble before the save (spikes, a NaN streak that rolls back and lowers the LR) and
# after it (bad batches, another NaN streak, a probe back up after a long calm).
SPIKES = {20, 90, 150, 260, 333}
NAN_STREAKS = {40, 41, 42, 300, 301, 302}
SAVE, STEPS = 120, 420


def make(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = gg.Guard(model, opt, rollback=gg.Rollback(every=10),
                     policy=gg.Policy(stability=gg.Stability(probe_after=100)))
    return model, opt, guard


def batch(k):
    gen = torch.Generator().manual_seed(1000 + k)
    x = torch.randn(64, 8, generator=gen)
    y = x[:, :4].argmax(1)
    if k in SPIKES:
        x = x * 300.0
    return x, y


def run(model, opt, guard, first, last,
        keys=("skipped", "lr_scale", "grad_norm", "rolled_back")):
    out = []
    for k in range(first, last):
        x, y = batch(k)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if k in NAN_STREAKS:  # NaN born in the model (NaN inputs are the data's: skipped)
            loss = loss * math.nan
        loss.backward()
        d = guard.step(loss).to_dict()
        out.append(repr((k, *(d[key] for key in keys))))
    return out


def test_resume_decides_and_trains_identically_for_300_steps(tmp_path):
    model, opt, guard = make(0)
    run(model, opt, guard, 0, SAVE)
    assert guard.lr.scale < 1 and guard.rollbacks >= 1  # saved while the LR is backed off
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "guard": guard.state_dict(snapshots=True)}, tmp_path / "ckpt.pt")
    straight = run(model, opt, guard, SAVE, STEPS)

    model2, opt2, guard2 = make(123)  # another init: everything must come from the file
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    guard2.load_state_dict(ckpt["guard"])
    resumed = run(model2, opt2, guard2, SAVE, STEPS)

    assert resumed == straight
    assert guard.rollbacks == guard2.rollbacks >= 2  # the second streak rolled back too
    kinds = [e["kind"] for e in guard2.recorder.events]
    assert "rollback" in kinds and "recover" in kinds
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    guard.close()
    guard2.close()
    # The whole run's story, the steps before the save included (its events are not in
    # the resumed guard's log, their counts are in its state).
    assert guard.verdict() == guard2.verdict() and "bad steps skipped" in guard.verdict()
    assert guard.diagnosis()["events"] == guard2.diagnosis()["events"]


def test_a_resumed_guard_keeps_clipping_every_step(tmp_path):
    # The controller's answer to a give-back (clip every step to the typical norm) is
    # memory a resumed run must keep: the same clipped norms after the load.
    keys = ("skipped", "grad_norm", "clipped_norm")
    model, opt, guard = make(0)
    run(model, opt, guard, 0, 30)
    guard.control.clip_since = 30  # as Controller.unstable sets it on a give-back
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                           "guard": guard.state_dict()})
    straight = run(model, opt, guard, 30, 80, keys)
    guard.recorder.flush()
    rows = [r for r in guard.recorder.rows if r["step"] >= 30]
    assert sum(r["clipped_norm"] < r["grad_norm"] for r in rows) >= 2  # it does clip
    model2, opt2, guard2 = make(123)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    guard2.load_state_dict(state["guard"])
    assert guard2.control.clip_since == 30
    assert run(model2, opt2, guard2, 30, 80, keys) == straight


def test_a_guard_resumed_without_snapshots_names_the_state_it_resumed_from():
    # Without saved snapshots the first rollback target is the resumed state: the state
    # after step SAVE - 1, not "-1" (the initial weights, which the run left long ago).
    model, opt, guard = make(0)
    run(model, opt, guard, 0, SAVE)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                           "guard": guard.state_dict()})
    guard.close()
    model2, opt2, guard2 = make(123)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    guard2.load_state_dict(state["guard"])
    for k in range(SAVE, SAVE + 3):  # a NaN streak before the next snapshot is due
        x, y = batch(k)
        opt2.zero_grad()
        loss = nn.functional.cross_entropy(model2(x), y) * math.nan
        loss.backward()
        guard2.step(loss)
    said = [e["message"] for e in guard2.recorder.events if e["kind"] == "rollback"]
    assert said and f"state after step {SAVE - 1}" in said[0]
    guard2.close()


def _drop(part, key=None):
    def damage(state):
        if key is None:
            state[part] = {}
        else:
            del state[part][key]
    return damage


@pytest.mark.parametrize("damage", [_drop("host", "skip_streak"), _drop("lr"),
                                    _drop("controller"), _drop("rollback"),
                                    _drop("decision")],
                         ids=["host-key", "lr", "controller", "rollback", "decision"])
def test_a_damaged_state_loads_nothing(damage):
    # A state whose settings fit but one of whose parts was edited or cut short: refused
    # by name, and the guard that refused it goes on exactly as its twin that never saw
    # it (its counters, detectors, controller and in-memory snapshots all untouched).
    model, opt, guard = make(0)
    run(model, opt, guard, 0, SAVE)
    state = guard.state_dict(snapshots=True)
    damage(state)
    twins = [make(1), make(1)]
    for m, o, g in twins:
        run(m, o, g, 0, 60)  # (past the NaN streak's rollback and LR cut at 40-42)
    with pytest.raises(gg.ConfigError, match="nothing was loaded"):
        twins[1][2].load_state_dict(state)
    after = [run(m, o, g, 60, 200) for m, o, g in twins]
    assert after[0] == after[1]
    for a, b in zip(twins[0][0].parameters(), twins[1][0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_refused_non_strict_load_leaves_the_snapshots_and_the_data_watch_as_they_were():
    # A non-strict load rewrites the in-memory snapshots' guard parts in place (the parts
    # it leaves fresh) and may switch the data watch on; a part that fails after that
    # must take both back.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, opt, rollback=gg.Rollback(every=2, clean_window=1),
                     policy=gg.Policy(grad_spike=gg.NormSpike(window=16)))
    run(model, opt, guard, 0, 30)
    other_model, other_opt, other = make(1)
    run(other_model, other_opt, other, 0, 45)  # (its NaN streak at 40-42 arms its watch)
    state = other.state_dict()
    state["host"]["watching"] = True
    del state["attribution"]["mean"]
    parts = [copy.deepcopy(s.guard) for s in guard.store.good]
    armed = guard._host.inputs.armed
    with pytest.raises(gg.ConfigError, match="nothing was loaded"):
        guard.load_state_dict(state, strict=False)
    assert guard._host.inputs.armed == armed
    for s, before in zip(guard.store.good, parts, strict=True):
        assert s.guard.keys() == before.keys()
        assert repr(s.guard["grad_spike"]) == repr(before["grad_spike"])
