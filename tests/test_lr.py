"""The guard's LR factor on top of the user's LR."""

from __future__ import annotations

import pytest
import torch

from gradguard.lr import LRFactor


def _rprop_step(factor: float, warm: int = 4):
    """``warm`` Rprop steps at the full LR, then one at ``factor``: (update, state, bounds)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = torch.optim.Rprop(model.parameters(), lr=0.01)
    f = LRFactor(opt, warmup=0, device=torch.device("cpu"))
    x = torch.randn(32, 6)
    y = x.sum(1, keepdim=True)
    for i in range(warm + 1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        f.scale = factor if i == warm else 1.0
        f.prepare(0.01)
        before = model.weight.detach().clone()
        with f.applied():
            opt.step()
    sizes = opt.state[model.weight]["step_size"].clone()
    return model.weight.detach() - before, sizes, opt.param_groups[0]["step_sizes"]


def test_a_cut_lr_reaches_rprops_adapted_step_sizes():
    # Rprop reads the LR only to start its per-element step sizes: a cut made later must
    # scale the sizes themselves for the step, and leave their own adaptation alone.
    cut, sizes_cut, bounds = _rprop_step(0.3)
    full, sizes_full, _ = _rprop_step(1.0)
    assert full.abs().min() > 0
    torch.testing.assert_close(cut, 0.3 * full)
    torch.testing.assert_close(sizes_cut, sizes_full)
    assert bounds == (1e-6, 50)  # the user's bounds put back exactly


def _factor(f: LRFactor, lr: float) -> float:
    f.prepare(lr)
    return f.factor


def test_at_a_constant_lr_the_ceiling_is_the_scale_exactly():
    f = LRFactor(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3), warmup=0,
                 device=torch.device("cpu"))
    assert _factor(f, 0.3) == 1.0
    for scale in (0.3, 0.03, 0.03 / 0.3**0.5, 0.1, 1.0):
        f.scale = scale
        assert _factor(f, 0.3) == scale  # (bit for bit: runs without a schedule unchanged)
    assert f.ref is None


def test_a_cut_caps_the_lr_the_run_failed_at_and_leaves_a_schedule_below_it_alone():
    f = LRFactor(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), warmup=0,
                 device=torch.device("cpu"))
    _factor(f, 1.0)
    f.scale = 0.1  # failed at lr 1: the ceiling is 0.1
    assert abs(_factor(f, 0.5) * 0.5 - 0.1) < 1e-12  # a decaying schedule, still above it
    assert _factor(f, 0.05) == 1.0  # below it: the user's LR as it is
    assert _factor(f, 2.0) * 2.0 == pytest.approx(0.1)  # a restart's raise is capped
    # A failure below the ceiling was at the user's own LR: the next cap is under that.
    _factor(f, 0.05)
    f.scale = 0.01
    assert _factor(f, 0.05) * 0.05 == pytest.approx(0.005)
    assert _factor(f, 0.001) == 1.0
    # A failure at the ceiling lowers it by the cut; a raise lifts it; x1 removes it.
    _factor(f, 1.0)
    _factor(f, 1.0)
    f.scale = 0.001
    assert _factor(f, 1.0) == pytest.approx(0.0005)
    f.scale = 0.002
    assert _factor(f, 1.0) == pytest.approx(0.001)
    state = f.state_dict()
    g = LRFactor(f.optimizer, warmup=0, device=torch.device("cpu"))
    g.load_state_dict(state)
    assert _factor(g, 1.0) == f.factor and _factor(g, 1e-4) == 1.0
    f.scale = 1.0
    assert f.ref is None and _factor(f, 1.0) == 1.0


def test_a_cut_while_the_schedule_rises_scales_the_schedule_from_the_lr_it_failed_at():
    # A warm-up (OneCycle's first phase) is on its way to the peak the rest of the
    # schedule is built around: the cut keeps its shape, from the factor the run failed at.
    f = LRFactor(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), warmup=0,
                 device=torch.device("cpu"))
    _factor(f, 0.1)
    _factor(f, 0.2)
    f.scale = 0.1
    assert f.ref is None and _factor(f, 1.0) == 0.1 and _factor(f, 0.001) == 0.1
    # A later failure while the schedule falls caps the LR it failed at.
    _factor(f, 0.6)
    _factor(f, 0.5)
    f.scale = 0.01
    assert _factor(f, 0.5) == pytest.approx(0.01) and _factor(f, 0.001) == 1.0
    # Under a cap a rising LR is a ramp, scaled (a warm-up replayed after a rollback keeps
    # its gentle start) and kept under the cap; a failure on it cuts the scaled ramp.
    assert _factor(f, 0.002) == 0.01 and _factor(f, 0.004) == 0.01
    assert _factor(f, 1.0) * 1.0 == pytest.approx(0.005)
    assert _factor(f, 0.004) == 1.0  # (falling: under the cap, the user's)
    _factor(f, 0.005)
    f.scale = 0.001
    assert f.ref is None and _factor(f, 0.004) == pytest.approx(0.001)
    f.scale = 1.0
    assert _factor(f, 0.004) == 1.0


def test_a_guarded_cosine_run_cut_early_ends_on_its_own_schedule():
    # Unscaled inputs put the edge near lr 0.01; the cosine starts at 0.05, so the guard
    # cuts in the first steps. The cut caps the LR it failed at: the cosine's tail, once
    # under the cap, is the user's (a factor would have kept it x0.1 to the end).
    import gradguard as gg

    torch.manual_seed(0)
    x = 10 * torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, opt, log=None)
    sched = guard.track(torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300))
    seen = []
    for step in range(300):
        idx = torch.arange(32) + 32 * (step % 8)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        guard.step(loss)
        seen.append((sched.get_last_lr()[0], guard.lr.factor, guard.lr.ceiling))
        sched.step()
    guard.close()
    assert guard.lr.scale < 1 and all(cap is not None and cap < 0.01 for _, _, cap in seen[10:])
    # (the step that failed is the one before the cut: from the next on, the cap holds)
    assert all(lr * f <= cap * (1 + 1e-9) for lr, f, cap in seen[10:])
    tail = [f for lr, f, cap in seen[10:] if lr < cap]
    assert len(tail) > 20 and all(f == 1.0 for f in tail)
    said = [e["message"] for e in guard.recorder.events if e["kind"] in ("rollback", "recover")]
    assert "LR scale ×0.1 (a cap: lr ≤ 0.005)" in said[0]
    assert "a cap of lr" in guard.verdict()
