"""The vision scenarios: a MobileNet-style CNN at a too-high LR (two datasets) and fp16 AMP."""

import math

import pytest
import torch

import gradguard as gg
from gradguard import scenarios

# accuracy after a full run at a low grid LR, with margin (measured, seeds 0-2: cnn-lr
# 0.82-0.86 at 0.01, cnn-digits 0.97-0.98 at 0.01, amp-fp16 0.93 at 0.03; chance is 0.1)
TRAINS = [("cnn-lr", 0.01, 0.7), ("cnn-digits", 0.01, 0.9), ("amp-fp16", 0.03, 0.85)]


pytestmark = pytest.mark.usefixtures("one_thread")  # sized for one core, as the bench runs them


@pytest.mark.parametrize("name", ["cnn-lr", "cnn-digits", "amp-fp16"])
def test_the_unguarded_run_blows_up_at_the_scenarios_lr(name):
    scn = scenarios.get(name)
    assert scn.lr in scn.grid() and list(scn.grid()) == sorted(scn.grid())
    # The loss goes NaN by step ~30 (42 at worst over seeds 0-2), so 60 steps show it.
    res = scenarios.run(name, steps=60)
    assert res.diverged and res.first_nonfinite is not None
    assert not math.isfinite(res.final_loss)


@pytest.mark.parametrize(("name", "lr", "acc"), TRAINS)
def test_a_low_grid_lr_trains(name, lr, acc):
    assert lr in scenarios.get(name).grid()
    res = scenarios.run(name, lr=lr)
    assert not res.diverged and res.first_nonfinite is None
    assert res.final_metric > acc


def test_amp_fp16_runs_real_fp16_autocast_with_a_grad_scaler():
    setup = scenarios.get("amp-fp16").build(0)
    assert setup.amp_dtype == torch.float16
    assert isinstance(scenarios.make_scaler(setup), torch.amp.GradScaler)
    x, _ = next(setup.data(8))
    with torch.autocast("cpu", dtype=torch.float16):
        assert setup.model(x).dtype == torch.float16


def test_the_default_guard_leaves_a_healthy_cnn_run_alone():
    # At a stable LR the guard must not cost accuracy (0.98 unguarded, seed 0). At the
    # scenario's LR it does not yet rescue these runs, so that is not pinned here.
    res = scenarios.run("cnn-digits", lr=0.03, guard=lambda m, o, s: gg.Guard(m, o, scaler=s))
    assert not res.diverged and res.skipped == 0
    assert res.final_metric > 0.93
