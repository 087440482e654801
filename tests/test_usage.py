"""Misuse the guard detects itself: outside steps, a forgotten GradScaler, closures."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

import gradguard as gg
from tests.conftest import backward, small_mlp


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, before) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.RMSprop])  # fused, masked
def test_optimizer_step_after_guard_step_is_refused_and_not_applied(opt_cls):
    model = small_mlp()
    opt = opt_cls(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt)
    guard.step(backward(model))
    before = params_of(model)
    with pytest.raises(gg.GuardUsageError,
                       match=r"Remove optimizer\.step\(\); guard\.step\(loss\) steps for you"):
        opt.step()
    assert unchanged(model, before)


def test_optimizer_step_before_guard_step_is_refused():
    model = small_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt)
    backward(model)
    with pytest.raises(gg.GuardUsageError, match=r"outside guard\.step"):
        opt.step()
    guard.step()  # the refused step left the gradients for the guard


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.RMSprop])  # fused, masked
def test_scaler_step_in_user_code_is_an_outside_step(opt_cls):
    model = small_mlp()
    opt = opt_cls(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    guard = gg.Guard(model, opt, scaler=scaler)
    x = torch.randn(16, 8)
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    guard.step(loss)
    model.zero_grad()
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    before = params_of(model)
    with pytest.raises(gg.GuardUsageError, match=r"scaler\.step\(optimizer\)"):
        scaler.step(opt)
    assert unchanged(model, before)


def test_close_gives_the_optimizer_back():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.Guard(model, opt) as guard:
        guard.step(backward(model))
    backward(model)
    opt.step()  # the guard is closed: a plain loop again


def test_a_closed_guard_leaves_no_warning_for_the_next():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.Guard(model, opt) as old:
        old.step(backward(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gg.GuardUsageWarning)
        gg.Guard(model, opt).close()


def test_a_dropped_guard_neither_blocks_a_new_one_nor_plain_steps():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    old = gg.Guard(model, opt)
    old.step(backward(model))
    with pytest.warns(gg.GuardUsageWarning, match="already has an open guard"):
        new = gg.Guard(model, opt)  # the old one is still alive: both may step the optimizer
    opt.zero_grad()
    new.step(backward(model))
    del old, new
    gc.collect()
    opt.zero_grad()
    backward(model)
    opt.step()


def fp16_step(guard, model, opt, scaler=None):
    x = torch.randn(16, 8)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(x).float().pow(2).mean()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    guard.step(loss)


def test_fp16_autocast_without_scaler_warns_once():
    model = small_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt)
    scaler = torch.amp.GradScaler("cpu")  # the user's, not given to the guard
    with pytest.warns(gg.GuardUsageWarning, match=r"Guard\(model, optimizer, scaler=scaler\)"):
        fp16_step(guard, model, opt, scaler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp16_step(guard, model, opt, scaler)


@pytest.mark.parametrize("setup", ["scaler", "bf16", "fp32"])
def test_no_scaler_warning_when_nothing_is_missing(setup):
    model = small_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu") if setup == "scaler" else None
    guard = gg.Guard(model, opt, scaler=scaler)
    x = torch.randn(16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if setup == "scaler":
            fp16_step(guard, model, opt, scaler)
        else:
            dtype = torch.bfloat16 if setup == "bf16" else None
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            guard.step(loss)


def test_lbfgs_is_refused_at_construction():
    model = small_mlp()
    with pytest.raises(gg.ConfigError, match=r"LBFGS needs a closure .* without a guard"):
        gg.Guard(model, torch.optim.LBFGS(model.parameters()))


def test_step_with_a_closure_matches_optimizer_step_with_it():
    a, b = small_mlp(), small_mlp()
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    guard = gg.Guard(a, oa, clip=[])
    x = torch.randn(32, 8)

    def closure_for(model, opt):
        def closure():
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss
        return closure

    with torch.no_grad():  # torch's convention: the closure enables grad itself
        for _ in range(3):
            info = guard.step(closure=closure_for(a, oa))
            ob.step(closure_for(b, ob))
    assert info.loss is not None and info.step == 2
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    with pytest.raises(gg.GuardUsageError, match="the loss or a closure, not both"):
        guard.step(torch.tensor(1.0), closure=closure_for(a, oa))


@pytest.mark.cpu_host
def test_an_optimizer_that_maximizes_has_its_objective_read_as_a_rising_score():
    # SGD(maximize=True) climbs what backward() was called on; the guard used to read the
    # rising objective as a rising loss, roll back three times and cut the LR a thousandfold.
    def run(guarded: bool) -> tuple[torch.Tensor, int]:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, maximize=True)
        guard = gg.Guard(m, opt, log=None) if guarded else None
        gen = torch.Generator().manual_seed(1)
        for _ in range(300):
            x = torch.randn(32, 6, generator=gen)
            opt.zero_grad()
            objective = -(m(x) - x[:, :1]).pow(2).mean()  # rises towards 0
            objective.backward()
            if guard is None:
                opt.step()
            else:
                guard.step(objective)
        rollbacks = guard.rollbacks if guard is not None else 0
        return torch.cat([p.detach().flatten() for p in m.parameters()]), rollbacks

    plain, _ = run(False)
    guarded, rollbacks = run(True)
    assert rollbacks == 0
    assert torch.equal(plain, guarded)


def test_an_optimizer_maximizing_some_groups_and_minimizing_others_refuses_a_loss():
    m = small_mlp()
    first, *rest = m.parameters()
    opt = torch.optim.SGD([{"params": [first], "maximize": True}, {"params": rest}], lr=0.01)
    guard = gg.Guard(m, opt, log=None)
    loss = m(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    with pytest.raises(gg.GuardUsageError, match="maximizes some parameter groups"):
        guard.step(loss)
    guard.step()  # without a loss: the gradient checks run


def test_a_give_up_under_fp16_without_the_scaler_names_the_scaler_first():
    # The loss is scaled ×65536 but the guard was not given the scaler: every step looks
    # like a blow-up. The warning at the first step is long gone when the guard gives up,
    # so the give-up names the scaler before the LR.
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    guard = gg.Guard(m, opt, log=None)
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(gg.GuardUsageWarning, match="no GradScaler"), \
            pytest.raises(gg.TrainingDivergedError, match=r"has no GradScaler.*scaler=scaler"):
        for _ in range(100):
            x = torch.randn(32, 8, generator=gen)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(m(x).float(), x.sum(1, keepdim=True))
            scaler.scale(loss).backward()
            guard.step(loss)


def test_torchs_checkpoint_helpers_may_initialise_the_optimizer_state():
    # torch.distributed.checkpoint's get/set_state_dict create a fresh optimizer's state
    # with a zero-LR optimizer.step(): refused as a step outside the guard, it left the
    # LR at 0 (torch has no cleanup on error). Any other outside step is still refused.
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = small_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, log=None)
    msd, osd = get_state_dict(model, opt)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    assert opt.param_groups[0]["lr"] == 1e-3
    guard.step(backward(model))
    backward(model)
    with pytest.raises(gg.GuardUsageError, match=r"outside guard\.step"):
        opt.step()
    guard.close()


def test_a_users_own_step_at_lr_zero_is_still_an_outside_step():
    # (a warm-up that starts at 0: the exemption for torch's checkpoint helpers, whose
    # gradients are zeros, let this NaN step through into Adam's state)
    model = small_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    guard = gg.Guard(model, opt, log=None)
    loss = model(torch.randn(4, 8)).sum() * float("nan")
    loss.backward()
    with pytest.raises(gg.GuardUsageError, match=r"outside guard\.step"):
        opt.step()
    assert not opt.state
    guard.close()
