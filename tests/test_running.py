import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import stepper
from tests.conftest import no_host_sync


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _stats(m: nn.Module) -> list[torch.Tensor]:
    bn = m[1]
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def _train(guarded: bool, steps: int = 40, bad: int | None = None, accum: int = 1,
           eval_every: int = 0) -> tuple[nn.Module, list[int], dict[int, list[torch.Tensor]]]:
    m = _bn_net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    guard = gg.Guard(m, opt, log=None) if guarded else None
    gen = torch.Generator().manual_seed(1)
    skipped, before = [], {}
    for step in range(steps):
        before[step] = _stats(m)
        opt.zero_grad()
        total = torch.zeros(())
        for micro in range(accum):
            x = torch.randn(32, 8, generator=gen)
            y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
            if step == bad and micro == accum - 1:
                x[3, 2] = math.nan  # one bad record, in the last micro-batch
            loss = nn.functional.cross_entropy(m(x), y) / accum
            loss.backward()
            total = total + loss.detach()
        if eval_every and step % eval_every == 0:
            m.eval()
            with torch.no_grad():
                m(torch.randn(4, 8, generator=gen))
            m.train()
        if guard is None:
            opt.step()
        elif bool(guard.step(total).skipped):
            skipped.append(step)
    return m, skipped, before


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
@pytest.mark.parametrize("accum", [1, 3])
def test_a_skipped_batch_leaves_no_trace_in_batchnorm_statistics(host, accum, monkeypatch):
    monkeypatch.setattr(stepper, "HOST_ON_CPU", host)
    m, skipped, before = _train(True, steps=21, bad=20, accum=accum)
    assert skipped == [20]
    # the statistics are those from before the skipped step's first forward pass
    for a, b in zip(_stats(m), before[20], strict=True):
        assert torch.equal(a, b)
    m.eval()
    assert torch.isfinite(m(torch.randn(5, 8))).all()


def test_without_the_guard_the_nan_batch_poisons_the_statistics():
    m, _, _ = _train(False, steps=21, bad=20)
    assert not torch.isfinite(m[1].running_mean).all()


@pytest.mark.cpu_host
def test_healthy_batchnorm_runs_are_untouched():
    # Evaluation passes between steps do not re-arm anything: identical to no guard.
    plain, _, _ = _train(False, eval_every=7)
    guarded, skipped, _ = _train(True, eval_every=7)
    assert skipped == []
    for a, b in zip(plain.state_dict().values(), guarded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_restore_makes_no_host_sync_on_an_accelerator_strategy(monkeypatch):
    monkeypatch.setattr(stepper, "HOST_ON_CPU", False)
    m = _bn_net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    guard = gg.Guard(m, opt, log=None)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for bad in (False, True):
        opt.zero_grad()
        xb = x.clone()
        if bad:
            xb[0, 0] = math.inf
        saved = _stats(m)
        loss = nn.functional.cross_entropy(m(xb), y)
        loss.backward()
        with no_host_sync():
            guard.step(loss)
    for a, b in zip(_stats(m), saved, strict=True):
        assert torch.equal(a, b)
    guard.close()
    assert m[1]._forward_pre_hooks == {}  # closing takes the hooks off
