"""Policy responses end to end through the Guard: skip, backoff, rollback, escalation."""

import copy

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.conftest import backward, no_host_sync, small_mlp


def step(guard, model, opt, seed, scale=1.0, nan=False):
    opt.zero_grad(set_to_none=True)
    return guard.step(backward(model, scale=scale, seed=seed, nan=nan))


def test_backoff_and_recovery_follow_the_schedule_under_a_user_scheduler():
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    policy = gg.Policy(on_spike="backoff", on_loss_spike="none",
                       backoff=gg.Backoff(factor=0.5, patience=3))
    guard = gg.Guard(model, opt, clip=[], policy=policy)
    gen = torch.Generator().manual_seed(0)
    applied, expected = [], []
    scale, calm = 1.0, 0
    for s in range(30):
        x = torch.randn(16, 4, generator=gen) * (1000.0 if s in (20, 21) else 1.0)
        y = x.sum(1, keepdim=True)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        before = model.weight.detach().clone()
        base_lr = opt.param_groups[0]["lr"]
        guard.step(loss)
        g = model.weight.grad
        delta = model.weight.detach() - before
        applied.append(float(-(delta * g).sum() / (g * g).sum()) / base_lr)
        assert opt.param_groups[0]["lr"] == base_lr  # the user's LR is left as it was
        sched.step()
        # the documented rule
        if s in (20, 21):
            scale, calm = max(scale * 0.5, 1e-3), 0
        else:
            calm += 1
            if calm >= 3 and scale < 1:
                scale, calm = min(scale / 0.5, 1.0), 0
        expected.append(scale)
    assert applied == pytest.approx(expected, rel=1e-4)
    assert expected[20:28] == [0.5, 0.25, 0.25, 0.25, 0.5, 0.5, 0.5, 1.0]
    kinds = [(e["step"], e["kind"]) for e in guard.recorder.events]
    assert (20, "grad_spike") in kinds and (20, "backoff") in kinds and (24, "recover") in kinds


def relu_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 1))


def test_isolated_spike_is_skipped_repeated_trouble_backs_off():
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt)  # default policy: on_spike="auto"
    for s in range(30):
        step(guard, model, opt, s)
    info = step(guard, model, opt, 30, scale=1e4)
    assert info.skipped and info.grad_spike and float(info.lr_scale) == 1.0
    for s in range(31, 45):
        step(guard, model, opt, s)
    step(guard, model, opt, 45, scale=1e4)
    info = step(guard, model, opt, 46, scale=1e4)  # again within the window: persistent
    assert info.grad_spike and not info.skipped and float(info.lr_scale) == 0.5
    assert float(info.clipped_norm) < float(info.grad_norm) / 10  # applied, clipped down


def test_rollback_restores_model_optimizer_and_guard_bit_for_bit():
    model = small_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt, rollback=gg.Rollback(every=5, after_bad_steps=2,
                                                      clean_window=2))
    saved = None
    for s in range(12):
        info = step(guard, model, opt, s, nan=s in (8, 9))
        if s == 5:
            saved = ([p.detach().clone() for p in model.parameters()],
                     copy.deepcopy(opt.state_dict()), copy.deepcopy(guard._guard_state()))
        if s == 9:
            assert info.rolled_back
            params, ostate, gstate = saved
            for a, b in zip(params, model.parameters(), strict=True):
                assert torch.equal(a, b)
            now = opt.state_dict()
            for k, st in ostate["state"].items():
                for n, v in st.items():
                    assert torch.equal(v, now["state"][k][n])
            for part in ("clip", "grad_spike", "loss_spike"):
                for k, v in gstate[part].items():
                    w = guard._guard_state()[part][k]
                    assert torch.equal(v, w) or torch.equal(v.isnan(), w.isnan())
            assert all(p.grad is None for p in model.parameters())
    ev = [e for e in guard.recorder.events if e["kind"] == "rollback"]
    assert len(ev) == 1 and ev[0]["to_step"] == 5 and ev[0]["step"] == 9
    assert float(guard.decision.state["lr_scale"]) < 1  # lowered after the rollback


def test_rollback_skips_batches_and_escalates():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, rollback=gg.Rollback(every=2, after_bad_steps=1,
                                                      skip_batches=2, max_rollbacks=2))
    for s in range(4):
        step(guard, model, opt, s)
    assert step(guard, model, opt, 4, nan=True).rolled_back
    assert [guard.should_skip_batch() for _ in range(3)] == [True, True, False]
    assert step(guard, model, opt, 5, nan=True).rolled_back
    with pytest.raises(gg.TrainingDivergedError) as err:
        step(guard, model, opt, 6, nan=True)
    assert err.value.diagnosis["rollbacks"] == 2
    assert err.value.diagnosis["events"]["nonfinite"] == 3


def test_batches_wrapper_drops_batches_after_rollback():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, rollback=gg.Rollback(after_bad_steps=1, skip_batches=2))
    seen = []
    for i in guard.batches(range(8)):
        seen.append(i)
        step(guard, model, opt, i, nan=(i == 3))
    assert seen == [0, 1, 2, 3, 6, 7]


def test_without_rollback_endless_skipping_is_an_error():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, policy=gg.Policy(max_consecutive_skips=3))
    step(guard, model, opt, 0, nan=True)
    step(guard, model, opt, 1, nan=True)
    with pytest.raises(gg.TrainingDivergedError, match="3 consecutive steps skipped"):
        step(guard, model, opt, 2, nan=True)


def test_on_nonfinite_raise():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, on_nonfinite="raise")
    step(guard, model, opt, 0)
    with pytest.raises(gg.TrainingDivergedError, match="NaN"):
        step(guard, model, opt, 1, nan=True)


def test_no_host_sync_with_detection_backoff_and_rollback_snapshots():
    model = relu_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, rollback=gg.Rollback(every=3, after_bad_steps=50))
    step(guard, model, opt, 0)
    for s in range(1, 25):
        opt.zero_grad()
        loss = backward(model, seed=s, scale=1e4 if s in (12, 13) else 1.0, nan=s == 18)
        with no_host_sync():
            guard.step(loss)
    kinds = {e["kind"] for e in guard.recorder.events}
    assert {"grad_spike", "backoff", "nonfinite"} <= kinds


@pytest.mark.parametrize("kw", [dict(on_spike="explode"), dict(on_nonfinite="ignore"),
                                dict(on_loss_spike="maybe")])
def test_unknown_policy_names_fail_at_construction(kw):
    model = small_mlp()
    with pytest.raises(gg.ConfigError, match="must be one of"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


@pytest.mark.parametrize("bad", [dict(factor=1.5), dict(factor=0), dict(patience=0),
                                 dict(floor=float("nan"))])
def test_backoff_validation(bad):
    with pytest.raises(gg.ConfigError):
        gg.Backoff(**bad)


def test_backoff_waits_longer_after_each_relapse():
    from gradguard.respond import DeviceDecision

    pol = gg.Policy(on_spike="backoff", backoff=gg.Backoff(patience=5, window=1))
    dec = DeviceDecision(pol, torch.device("cpu"))
    no, yes = torch.tensor(False), torch.tensor(True)

    def calm_steps_until_recovery() -> int:
        n = 0
        while True:
            n += 1
            _, scale = dec(no, no, no)
            if float(scale) == 1.0:
                return n

    dec(no, yes, no)  # trouble: scale 0.5
    assert calm_steps_until_recovery() == 5
    dec(no, yes, no)  # relapse right after recovering: wait twice as long
    assert calm_steps_until_recovery() == 10
    dec(no, yes, no)
    assert calm_steps_until_recovery() == 20
