"""The fault-injection harness: schedules, each fault kind, accounting, and a guarded run."""

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.testing import (
    BadBatch,
    Fault,
    GradFault,
    Injector,
    LRSpike,
    NaNLoss,
    WeightFault,
    flagged_steps,
    state_is_finite,
)
from tests.conftest import small_mlp

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def batch(step, n=32):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(n, 8, generator=gen)
    return x, (x[:, :4].argmax(1))


def loop(model, opt, inj, steps, guard=None, on_step=None):
    """The documented hook order; returns the guard's StepInfos (or None per step)."""
    infos = []
    for step in range(steps):
        x, y = inj.batch(step, batch(step))
        opt.zero_grad(set_to_none=True)
        loss = inj.loss(step, nn.functional.cross_entropy(model(x), y))
        loss.backward()
        inj.after_backward(step)
        inj.before_step(step)
        if guard is None:
            opt.step()
            infos.append(None)
        else:
            infos.append(guard.step(loss))
        inj.after_step(step)
        if on_step is not None:
            on_step(step)
    return infos


def strikes(fault, steps=200, seed=0):
    model = classifier()
    inj = Injector(model, torch.optim.SGD(model.parameters(), lr=0.1), [fault], seed=seed)
    return [s for s in range(steps) if inj._strikes(s)]


def test_schedules_at_every_window_and_seeded_probability():
    assert strikes(NaNLoss(at=[3, 7])) == [3, 7]
    assert strikes(NaNLoss(every=50, offset=10)) == [10, 60, 110, 160]
    assert strikes(NaNLoss(every=10, start=35, stop=70)) == [40, 50, 60]
    assert strikes(LRSpike(at=[5], duration=3)) == [5, 6, 7]
    random_a = strikes(GradFault(prob=0.1), steps=2000, seed=1)
    assert random_a == strikes(GradFault(prob=0.1), steps=2000, seed=1)
    assert random_a != strikes(GradFault(prob=0.1), steps=2000, seed=2)
    assert 150 < len(random_a) < 250


def test_injection_never_touches_the_global_rng():
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inj = Injector(model, opt, [BadBatch("labels", prob=0.5), GradFault(prob=0.5),
                                WeightFault(prob=0.2)], seed=3)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    loop(model, opt, inj, 10)
    assert torch.equal(state, torch.get_rng_state())
    assert inj.log


def test_grad_fault_hits_only_the_chosen_layers():
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inj = Injector(model, opt, [GradFault("inf", layers="2.*", elements=3, at=[0])])
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    inj.after_backward(0)
    bad = {n: int((~torch.isfinite(p.grad)).sum()) for n, p in model.named_parameters()}
    assert sum(bad.values()) == 3 and set(k for k, v in bad.items() if v) <= {"2.weight",
                                                                                "2.bias"}
    (e,) = inj.log
    assert e.kind == "inf_grad" and e.target in ("2.weight", "2.bias") and e.step == e.last == 0
    assert len(e.detail["elements"]) == 3


def test_nan_loss_poisons_grads_or_only_the_value():
    for grads in (True, False):
        model = classifier()
        inj = Injector(model, None, [NaNLoss(grads=grads, at=[0])])
        x, y = batch(0)
        loss = inj.loss(0, nn.functional.cross_entropy(model(x), y))
        loss.backward()
        assert math.isnan(loss.item())
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert finite is not grads


def test_bad_batch_scales_inputs_and_float_targets_and_relabels_classes():
    model = classifier()
    inj = Injector(model, None, [BadBatch("inputs", factor=(10, 1e4), at=[0]),
                                 BadBatch("labels", factor=100.0, at=[1]),
                                 BadBatch("labels", num_classes=4, at=[2])], seed=5)
    x, y = batch(0)
    x0, y0 = inj.batch(0, (x, y))
    f = inj.log[0].detail["factor"]
    assert 10 <= f <= 1e4 and torch.allclose(x0, x * f) and torch.equal(y0, y)
    yf = torch.rand(32, 1)
    _, y1 = inj.batch(1, [x, yf])
    assert torch.allclose(y1, yf * 100)
    x2, y2, extra = inj.batch(2, (x, y, "extra"))
    assert torch.equal(x2, x) and extra == "extra"
    assert y2.dtype == y.dtype and y2.min() >= 0 and y2.max() < 4
    assert not torch.equal(y2, y)
    assert [e.kind for e in inj.log] == ["bad_inputs", "bad_labels", "bad_labels"]
    with pytest.raises(gg.ConfigError, match="labels"):
        Injector(model, None, [BadBatch("labels", at=[0])]).batch(0, x)


def test_lr_spike_is_seen_by_the_step_and_undone_after_it():
    model = classifier()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": list(model[2].parameters()) + list(model[4].parameters()),
                            "lr": 0.01}])
    seen = []
    opt.register_step_pre_hook(lambda o, *_: seen.append([float(g["lr"])
                                                          for g in o.param_groups]))
    guard = gg.Guard(model, opt, clip=[])
    inj = Injector(model, opt, [LRSpike(100.0, at=[2], duration=2)])
    loop(model, opt, inj, 6, guard=guard)
    assert [s[0] for s in seen] == pytest.approx([0.1, 0.1, 10.0, 10.0, 0.1, 0.1])
    assert [s[1] for s in seen] == pytest.approx([0.01, 0.01, 1.0, 1.0, 0.01, 0.01])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]  # exactly, not 0.1*100/100
    (e,) = inj.log
    assert (e.step, e.last) == (2, 4)  # visible one step after the stretch ends


def test_weight_fault_zeroes_or_blows_up_one_weight():
    model = classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inj = Injector(model, None, [WeightFault("zero", scope="tensor", layers="2.weight", at=[0]),
                                 WeightFault("huge", factor=1e4, at=[1])], seed=2)
    inj.batch(0, None)
    assert torch.count_nonzero(model[2].weight) == 0
    inj.batch(1, None)
    changed = [n for n, p in model.named_parameters()
               if n != "2.weight" and not torch.equal(p, before[n])]
    assert len(changed) == 1 and changed[0].endswith("weight")
    p = dict(model.named_parameters())[changed[0]]
    assert p.abs().max() >= 1e4 * before[changed[0]].abs().max() * 0.999
    assert torch.isfinite(p).all()
    assert [e.kind for e in inj.log] == ["zero_weight", "huge_weight"]


def test_guard_catches_gradient_path_faults_and_state_stays_finite():
    model = classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt)
    faults = [GradFault("nan", at=[20, 50]), GradFault("inf", elements="all", at=[35]),
              NaNLoss(at=[65]), BadBatch("inputs", factor=1e4, at=[80])]
    inj = Injector(model, opt, faults, seed=0)
    poisoned = []
    infos = loop(model, opt, inj, 90, guard=guard,
                 on_step=lambda s: poisoned.append(not state_is_finite(model, opt)))
    guard.close()
    assert not any(poisoned)
    flagged = flagged_steps(guard.recorder.rows)
    acc = inj.account(flagged)
    assert all(v["detected"] == v["injected"] for v in acc.values()), acc
    assert sum(v["injected"] for v in acc.values()) == 5
    assert inj.counts() == {"nan_grad": 2, "inf_grad": 1, "nan_loss": 1, "bad_inputs": 1}
    assert inj.unexplained(flagged) == []
    assert all(bool(infos[s].skipped) for s in (20, 35, 50, 65, 80))


def test_account_and_flagged_steps_from_log_records():
    model = small_mlp()
    inj = Injector(model, None, [LRSpike(at=[10]), NaNLoss(at=[20])])
    inj.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(25):
        inj.before_step(s)
        inj.after_step(s)
        inj.loss(s, torch.ones(()))
    records = [{"type": "meta"}, {"type": "step", "step": 11, "loss_spike": True},
               {"type": "step", "step": 12, "skipped": False},
               {"type": "event", "step": 3, "kind": "x"},
               {"type": "step", "step": 30, "grad_spike": True}]
    flagged = flagged_steps(records)
    assert flagged == {11, 30}
    assert inj.account(flagged) == {"lr_spike": {"injected": 1, "detected": 1},
                                    "nan_loss": {"injected": 1, "detected": 0}}
    assert inj.unexplained(flagged) == [30]


def test_state_is_finite_checks_params_and_optimizer_state():
    model = classifier()
    opt = torch.optim.Adam(model.parameters())
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert state_is_finite(model, opt)
    with torch.no_grad():
        model[0].weight[0, 0] = 1e30  # huge but finite: not poison
    assert state_is_finite(model, opt)
    opt.state[model[2].weight]["exp_avg_sq"][0, 0] = math.nan
    assert not state_is_finite(model, opt)
    assert not state_is_finite(None, opt)
    assert state_is_finite(model, None)


def test_plugs_into_the_scenarios_train_loop():
    from gradguard.scenarios.train import train

    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    inj = Injector(model, opt, [BadBatch(factor=1e3, at=[30])])

    def data():
        k = 0
        while True:
            yield batch(k)
            k += 1

    res = train(model, opt, data(), nn.functional.cross_entropy, 40,
                guard=gg.Guard(model, opt), corrupt=inj.batch)
    assert res.skipped == 1 and inj.counts() == {"bad_inputs": 1}


@pytest.mark.parametrize("make, match", [
    (lambda: GradFault("zero"), "GradFault.value"),
    (lambda: GradFault(elements=0), "GradFault.elements"),
    (lambda: NaNLoss(prob=1.5), r"prob must be in \[0, 1\]"),
    (lambda: NaNLoss(prob=math.nan), "Fault.prob"),
    (lambda: NaNLoss(every=0), "Fault.every"),
    (lambda: NaNLoss(at=[-1]), "Fault.at"),
    (lambda: BadBatch(factor=(1e4, 10)), "low <= high"),
    (lambda: BadBatch("weights"), "BadBatch.target"),
    (lambda: LRSpike(-3.0), "LRSpike.factor"),
    (lambda: WeightFault("flip"), "WeightFault.mode"),
    (lambda: Injector(None, None, []), "needs a model"),
    (lambda: Injector(small_mlp(), None, ["nan"]), "Fault objects"),
])
def test_bad_fault_settings_fail_at_construction(make, match):
    with pytest.raises(gg.ConfigError, match=match):
        make()


def test_custom_fault_subclass():
    class Flip(Fault):
        kind = "sign_flip"

        def after_backward(self, s):
            for name, p in s.pick(None, 1, lambda p: p.grad is not None):
                p.grad.neg_()
                s.record(name)

    model = classifier()
    inj = Injector(model, None, [Flip(at=[0])], seed=0)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    inj.after_backward(0)
    flipped = [torch.equal(g, -p.grad) for g, p in zip(grads, model.parameters(), strict=True)]
    assert sum(flipped) == 1 and inj.counts() == {"sign_flip": 1}
