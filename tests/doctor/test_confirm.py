"""Severities from trials: the LR judged in both directions and per param group, and
``--fix`` applying only what a trial confirmed."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradguard import doctor
from gradguard.doctor.entry import Run, apply_fixes
from gradguard.doctor.findings import Diagnosis, Finding
from gradguard.scenarios import data
from tests.doctor.test_trial import digits_batches, kaiming_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_lr_that_collapses_the_run_to_chance_is_named():
    # Adam at 0.3 on a healthy MLP: a spike, then the class frequencies (2.72 → 2.25 with
    # chance at 2.30); judged against an inflated start, this read as 99 % progress.
    m = kaiming_mlp()
    d = doctor.diagnose(m, digits_batches(), nn.functional.cross_entropy,
                        torch.optim.Adam(m.parameters(), lr=0.3))
    rc = d.root_cause
    assert rc is not None and rc.check == "learning_rate" and rc.severity == "critical", str(d)
    assert "too high" in rc.title and rc.evidence["suggested_lr"] < 0.3


def test_the_healthy_lr_still_has_nothing_above_info():
    m = kaiming_mlp()
    d = doctor.diagnose(m, digits_batches(), nn.functional.cross_entropy,
                        torch.optim.Adam(m.parameters(), lr=3e-3))
    assert d.healthy and d.root_cause is None, str(d)


def test_a_stalled_run_at_a_far_too_low_lr_is_named():
    m = kaiming_mlp()
    d = doctor.diagnose(m, digits_batches(), nn.functional.cross_entropy,
                        torch.optim.SGD(m.parameters(), lr=1e-5))
    (f,) = d.by_check("learning_rate")
    assert f.severity != "info" and "too low" in f.title, str(d)
    assert f.evidence["lr_factor"] >= 10 and f.evidence["suggested_lr"] > 1e-5
    assert f.evidence["trial"]["fixed"]["ok"] and not f.evidence["trial"]["as_is"]["ok"]
    fixed, _ = apply_fixes(Run("x", m, digits_batches(), nn.functional.cross_entropy,
                               torch.optim.SGD(m.parameters(), lr=1e-5)), d)
    assert fixed.optimizer.param_groups[0]["lr"] == pytest.approx(f.evidence["suggested_lr"])


def two_group_run():
    m = kaiming_mlp()
    head = list(m[-1].parameters())
    body = [p for p in m.parameters() if all(p is not q for q in head)]
    # The head (group 0) at a sane LR, the body (group 1) 1000× higher: it diverges.
    opt = torch.optim.SGD([{"params": head, "lr": 0.01}, {"params": body, "lr": 10.0}])
    return Run("two groups", m, digits_batches(), nn.functional.cross_entropy, opt)


def test_per_group_lrs_are_scaled_by_one_factor():
    run = two_group_run()
    d = doctor.diagnose(run.model, run.data, run.loss_fn, run.optimizer)
    (f,) = d.by_check("learning_rate")
    assert f.severity == "critical", str(d)
    assert f.evidence["user_lrs"] == [0.01, 10.0]
    factor = f.evidence["lr_factor"]
    assert factor < 1
    assert "learning rates 0.01, 10 (per param group)" in f.title
    assert f.fix_code == f"for g in optimizer.param_groups: g['lr'] *= {factor:.3g}"
    fixed, done = apply_fixes(run, d)
    assert [g["lr"] for g in fixed.optimizer.param_groups] == pytest.approx(
        [0.01 * factor, 10.0 * factor])
    assert [g["lr"] for g in run.optimizer.param_groups] == [0.01, 10.0]  # (untouched)
    assert done and "→" in done[0]


def test_fix_applies_no_reinit_that_a_trial_refuted():
    # The re-initialised trial cleared init (info); a saturation finding still proposes a
    # re-init in its fix_code, but no trial confirmed it: --fix must not apply it.
    m = kaiming_mlp()
    before = [p.detach().clone() for p in m.parameters()]
    d = Diagnosis([
        Finding("input_scale", "critical", "raw inputs", evidence={"confirmed": True},
                fix_code="x = (x - x_train.mean(0)) / x_train.std(0)"),
        Finding("activations", "warning", "tanh saturated", evidence={"confirmed": False},
                fix_code='gg.fixes.reinit(model, scheme="auto")'),
        Finding("init", "info", "not the cause", evidence={"confirmed": False}),
    ])
    run = Run("x", m, digits_batches(), nn.functional.cross_entropy,
              torch.optim.SGD(m.parameters(), lr=0.1))
    fixed, done = apply_fixes(run, d)
    assert done == []
    assert all(torch.equal(a, b) for a, b in zip(before, fixed.model.parameters(), strict=True))
    # A confirmed re-init is applied.
    d.findings[1].evidence["confirmed"] = True
    assert any("reinit" in s for s in apply_fixes(run, d)[1])


def test_confirm_marks_an_explainers_reinit_refuted_by_the_trial():
    # A tanh MLP with Xavier init (right for tanh) on raw 0-320 pixels at LR 2: the inputs
    # are the cause. The saturated tanh layer's finding proposes a re-init, but the
    # re-initialised trial fails as the run does: not confirmed, and --fix leaves the init.
    xr, yr = data.digits()
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        lin = nn.Linear(64, 64)
        nn.init.xavier_normal_(lin.weight, gain=5 / 3)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    m = nn.Sequential(*layers, nn.Linear(64, 10))
    batches = [(xr[i : i + 64] * 20, yr[i : i + 64]) for i in range(0, 512, 64)]
    run = Run("tanh raw", m, batches, nn.functional.cross_entropy,
              torch.optim.SGD(m.parameters(), lr=2.0))
    diag = doctor.diagnose(run.model, run.data, run.loss_fn, run.optimizer)
    assert diag.root_cause.check == "input_scale", str(diag)
    assert not diag.measurements["trials"]["re-initialised"]["ok"]
    (sat,) = [f for f in diag.by_check("activations") if "saturated" in f.title]
    assert sat.severity == "warning" and "reinit" in sat.fix_code
    assert sat.evidence["confirmed"] is False and "does not cure it" in sat.fix
    assert diag.by_check("init")[0].severity == "info"
    _, done = apply_fixes(run, diag)
    assert not any("reinit" in s for s in done)


def _protos(n=1024, d=32, k=10, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(k, d, generator=g)[y] + noise * torch.randn(n, d, generator=g)
    x = (x - x.mean(0)) / x.std(0)
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]


def _relu_mlp(depth=3, d=32, h=64, k=10, gain=1.0):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d if i == 0 else h, h), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(h, k))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.mul_(gain)
                nn.init.zeros_(m.bias)
    return model


def test_log_softmax_and_nll_have_the_same_floor_as_cross_entropy():
    # Uniform zeros and raw frequencies read as log-probabilities gave a negative "floor":
    # every run then failed, and a real init problem was ranked below the activations.
    data = _protos(noise=2.0)
    for wrap, loss in [(lambda m: m, nn.CrossEntropyLoss()),
                       (lambda m: nn.Sequential(m, nn.LogSoftmax(1)), F.nll_loss)]:
        model = wrap(_relu_mlp(depth=9, gain=2.5))
        d = doctor.diagnose(model, data, loss, torch.optim.SGD(model.parameters(), lr=0.01))
        assert d.root_cause is not None and d.root_cause.check == "init"
        assert d.root_cause.severity == "critical"
        assert all(t["chance_loss"] > 0 for t in d.measurements["trials"].values()
                   if t.get("chance_loss") is not None)


def test_missing_labels_the_loss_masks_and_a_warm_up_are_not_faults():
    # NaN targets a masked loss leaves out made a critical data finding, and the LR a
    # warm-up schedule had just set (1e-6 of 1e-3) was called too low.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = x[:, :3] @ torch.randn(3, 2, generator=g)
    y[torch.rand(512, 2, generator=g) < 0.2] = math.nan  # missing labels

    def masked(out, target):
        keep = torch.isfinite(target)
        return ((out - torch.nan_to_num(target)) ** 2)[keep].mean()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=100)
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 512, 32)]
    d = doctor.diagnose(model, data, masked, opt)
    assert not [f for f in d.findings if f.severity != "info"], [f.title for f in d.findings]


def test_an_optimizer_copied_under_a_scheduler_trains_the_copy_not_the_model():
    # A scheduler wraps the optimizer's step on the instance; deep-copied, the wrapper
    # stepped the user's optimizer, and diagnose trained the user's model.
    class Needy(torch.optim.SGD):
        def __init__(self, params, lr, needed):
            super().__init__(params, lr=lr)

    data = _protos()
    model = _relu_mlp()
    opt = Needy(model.parameters(), 0.05, True)
    torch.optim.lr_scheduler.StepLR(opt, 10)
    nn.CrossEntropyLoss()(model(data[0][0]), data[0][1]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    d = doctor.diagnose(model, data, nn.CrossEntropyLoss(), opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not opt.state and d.measurements["trials"]["as is"]["ok"]


def test_standardising_is_no_cure_when_the_raised_lr_alone_trains():
    # The standardised trial that stalled was retried at x10 the LR, and its success
    # credited to standardising; with BatchNorm first, standardising changes nothing and
    # the raw data trains as well at that LR.
    data = [(x * 30, y) for x, y in _protos(noise=2.0)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(32), _relu_mlp())
    d = doctor.diagnose(model, data, nn.CrossEntropyLoss(),
                        torch.optim.Adam(model.parameters(), lr=3e-5))
    assert all(f.severity == "info" for f in d.findings if f.check == "input_scale")


def test_a_buffer_the_first_forward_creates_does_not_stop_a_trial():
    class Lazy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _relu_mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not hasattr(self, "scale"):
                self.register_buffer("scale", torch.ones(x.shape[1]))
            return self.net(x * self.scale)

    model = Lazy()
    d = doctor.diagnose(model, _protos(), nn.CrossEntropyLoss(),
                        torch.optim.SGD(model.parameters(), lr=0.05))
    assert d.healthy
