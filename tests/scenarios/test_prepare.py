"""One run setup for scenarios.run, the bench and the doctor."""

import pytest
import torch

import gradguard as gg
from gradguard import scenarios
from gradguard.bench.runner import Job, run_one
from gradguard.doctor.entry import load_run


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_a_seed_builds_the_same_run_everywhere():
    a = scenarios.prepare("mlp-init", seed=3)
    b = scenarios.prepare("mlp-init", seed=3)
    doc = load_run("mlp-init", seed=3)
    for x, y, z in zip(_params(a.setup.model), _params(b.setup.model), _params(doc.model),
                       strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    xa, _ = next(a.setup.data(a.setup.batch_size))
    assert torch.equal(xa, doc.data[0][0])
    assert a.optimizer.param_groups[0]["lr"] == scenarios.get("mlp-init").lr
    other = scenarios.prepare("mlp-init", seed=4)
    assert not torch.equal(_params(other.setup.model)[0], _params(a.setup.model)[0])


def test_the_guard_factory_gets_the_runs_scaler():
    run = scenarios.prepare("amp-fp16", lr=0.01,
                            guard=lambda m, o, s: gg.Guard(m, o, scaler=s, log=None))
    assert run.scaler is not None and run.guard is not None
    assert run.guard.scaler is run.scaler
    assert run.optimizer.param_groups[0]["lr"] == 0.01
    run.guard.close()


def test_remedy_hooks_run_in_order():
    calls: list[str] = []
    run = scenarios.prepare(
        "linreg-raw",
        fix_setup=lambda scn, setup: calls.append(f"setup:{scn.name}"),
        fix_model=lambda m: calls.append("model"),
        optimizer=lambda scn, setup, params, lr: (calls.append(f"opt:{lr}"),
                                                  torch.optim.SGD(params, lr=lr))[1],
        guard=lambda m, o, s: (calls.append("guard"), gg.Guard(m, o, log=None))[1])
    assert calls == ["setup:linreg-raw", "model", f"opt:{scenarios.get('linreg-raw').lr}",
                     "guard"]
    run.train(5)
    with pytest.raises(gg.GuardUsageError, match="closed"):  # train() closed it
        run.guard.step()


def test_bench_and_run_train_the_same_run(one_thread):
    job = Job(scenario="linreg-raw", remedy="gradguard", lr=1e-3, seed=1, steps=40, log=None)
    row, curve = run_one(job)
    res = scenarios.run("linreg-raw", lr=1e-3, seed=1, steps=40,
                        guard=lambda m, o, s: gg.Guard(m, o, scaler=s, log=None))
    assert curve["losses"] == res.losses
    assert row["final_test_loss"] == res.final_loss
