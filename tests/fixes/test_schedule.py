"""LR warm-up + cosine from torch's schedulers, and its pairing with the guard's backoff."""

import itertools
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import fixes


def lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_warmup_then_cosine_to_min_lr():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = fixes.warmup_cosine(opt, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert isinstance(sched, torch.optim.lr_scheduler.SequentialLR)
    got = lrs(sched, opt, 160)
    assert got[0] == pytest.approx(0.01)
    assert got[5] == pytest.approx(0.01 + 0.99 * 5 / 10)
    assert got[10] == pytest.approx(1.0)
    assert got[60] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 50 / 100)) / 2)
    assert got[110] == pytest.approx(0.1)
    assert got[110:] == pytest.approx([0.1] * 50)  # held: torch's cosine alone climbs back
    assert all(a <= b for a, b in itertools.pairwise(got[:11]))
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(got[10:]))
    import numpy as np

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)  # numpy ints are ints
    assert lrs(fixes.warmup_cosine(opt, np.int64(2), np.int64(4)), opt, 6)[2] == 1.0


def test_a_second_schedule_and_bad_arguments_are_refused():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    fixes.warmup_cosine(opt, 5, 50)
    with pytest.raises(gg.ConfigError, match="already has a warmup_cosine"):
        fixes.warmup_cosine(opt, 5, 50)
    fresh = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(gg.ConfigError, match="must exceed"):
        fixes.warmup_cosine(fresh, 50, 50)
    with pytest.raises(gg.ConfigError, match="warmup_steps"):
        fixes.warmup_cosine(fresh, 0, 50)
    with pytest.raises(gg.ConfigError, match="start_factor"):
        fixes.warmup_cosine(fresh, 5, 50, start_factor=0)
    with pytest.raises(gg.ConfigError, match="Optimizer"):
        fixes.warmup_cosine("sgd", 5, 50)
    with pytest.raises(gg.ConfigError, match="above the peak LR"):
        fixes.warmup_cosine(fresh, 5, 50, min_lr=2.0)


def test_the_guard_scales_the_scheduled_lr_and_leaves_the_schedule_alone():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = fixes.warmup_cosine(opt, 5, 40)
    guard = gg.Guard(model, opt, on_spike="backoff", on_loss_spike="backoff")
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for step in range(40):
        opt.zero_grad()
        # a burst of huge losses mid-run makes the guard back the LR off
        scale = 1e4 if step in (25, 26, 27) else 1.0
        loss = nn.functional.mse_loss(model(x) * scale, y * scale)
        loss.backward()
        guard.step(loss)
        assert opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])
        sched.step()
    guard.close()
    assert guard.diagnosis()["lr_scale"] < 1.0  # the guard did back off


def test_min_lr_is_checked_against_every_param_groups_peak_and_bad_types_refused():
    # A backbone group at 1e-4 under min_lr 1e-3 would "decay" up to 10× its peak.
    def two_groups():
        return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 1e-4},
                                {"params": [nn.Parameter(torch.zeros(1))], "lr": 1e-2}])

    opt = two_groups()
    with pytest.raises(gg.ConfigError, match=r"above the peak LR of param group 0 \(0\.0001\)"):
        fixes.warmup_cosine(opt, 5, 20, min_lr=1e-3)
    assert not hasattr(opt, "_gradguard_warmup_cosine")  # refused before anything changed
    ok = fixes.warmup_cosine(opt, 5, 20, min_lr=1e-4)  # the smallest peak itself is fine
    got = lrs(ok, opt, 25)
    assert max(got) == pytest.approx(1e-4)
    fresh = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    for kw, name in [({"start_factor": "0.1"}, "start_factor"), ({"min_lr": None}, "min_lr"),
                     ({"start_factor": 2.0}, "start_factor"), ({"min_lr": -1.0}, "min_lr")]:
        with pytest.raises(gg.ConfigError, match=name):
            fixes.warmup_cosine(fresh, 2, 10, **kw)
