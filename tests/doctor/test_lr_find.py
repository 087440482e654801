import copy
import itertools
import threading

import pytest
import torch
from torch import nn

from gradguard.doctor.lr_find import clone_optimizer, cycle_batches, loss_value, lr_find
from gradguard.errors import ConfigError


class RequiredArgsSGD(torch.optim.Optimizer):
    """A custom optimizer whose constructor has required hyper-parameters."""

    def __init__(self, params, lr, beta):
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["steps"] = state.get("steps", 0) + 1
                    p.add_(p.grad, alpha=-g["lr"])


class LockedSGD(torch.optim.SGD):
    """Neither rebuildable from its param groups nor deep-copyable (it holds a lock)."""

    def __init__(self, params, lr, lock):
        super().__init__(params, lr=lr)
        self.lock = lock


class WrapperSGD(torch.optim.Optimizer):
    """A wrapper (as SAM is) that steps an inner optimizer sharing its param groups."""

    def __init__(self, params, base_cls, **kwargs):
        super().__init__(params, dict(kwargs))
        self.base = base_cls(self.param_groups, **kwargs)
        self.param_groups = self.base.param_groups

    def step(self, closure=None):
        return self.base.step(closure)


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    return model, x, y


def test_clone_optimizer_deep_copies_one_it_cannot_rebuild():
    model, x, y = _setup()
    opt = RequiredArgsSGD(model.parameters(), lr=0.1, beta=0.9)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # (state keyed by the original parameters)
    before = [p.detach().clone() for p in model.parameters()]
    m2 = copy.deepcopy(model)
    clone = clone_optimizer(opt, model, m2)
    assert type(clone) is RequiredArgsSGD and clone is not opt
    assert clone.param_groups[0]["beta"] == 0.9
    # Every parameter and state key is the copy's, none the user's.
    copied = {id(p) for p in m2.parameters()}
    assert all(id(p) in copied for g in clone.param_groups for p in g["params"])
    assert clone.state and all(id(p) in copied for p in clone.state)
    nn.functional.cross_entropy(m2(x), y).backward()
    clone.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not all(torch.equal(p, b) for p, b in zip(m2.parameters(), before, strict=True))


def test_clone_optimizer_keeps_a_wrappers_inner_optimizer():
    model, x, y = _setup()
    opt = WrapperSGD(model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    m2 = copy.deepcopy(model)
    clone = clone_optimizer(opt, model, m2)
    assert clone.base is not opt.base and clone.base.param_groups is clone.param_groups
    nn.functional.cross_entropy(m2(x), y).backward()
    clone.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not all(torch.equal(p, b) for p, b in zip(m2.parameters(), before, strict=True))


def test_clone_optimizer_that_cannot_be_copied_names_the_fix():
    model, _, _ = _setup()
    opt = LockedSGD(model.parameters(), 0.1, threading.Lock())
    with pytest.raises(ConfigError, match=r"cannot copy LockedSGD.*defaults.*deep-copyable"):
        clone_optimizer(opt, model, copy.deepcopy(model))


def test_lr_find_runs_with_an_optimizer_it_cannot_rebuild():
    model, x, y = _setup()
    opt = RequiredArgsSGD(model.parameters(), lr=0.1, beta=0.9)
    res = lr_find(model, opt, (x, y), nn.CrossEntropyLoss(), num_iter=12)
    assert len(res.lrs) > 6 and opt.param_groups[0]["lr"] == 0.1


def test_cycle_batches_replays_a_one_pass_generator():
    _, x, y = _setup()
    gen = ((x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16))  # 4 batches, one pass
    it = cycle_batches(gen)
    got = [next(it) for _ in range(10)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got[:6], got[4:10], strict=True))
    with pytest.raises(ConfigError, match="yielded no batches"):
        next(cycle_batches(iter([])))


def test_lr_find_on_a_generator():
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    gen = ((x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16))
    res = lr_find(model, opt, gen, nn.CrossEntropyLoss(), num_iter=20)
    assert len(res.lrs) > 6 and res.suggested is not None


def test_a_loss_that_is_not_a_scalar_is_named():
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with pytest.raises(ConfigError, match=r"must return a scalar.*\(64,\).*reduction='mean'"):
        lr_find(model, opt, (x, y), nn.CrossEntropyLoss(reduction="none"), num_iter=5)
    with pytest.raises(ConfigError, match="scalar tensor, got tuple"):
        loss_value((torch.tensor(1.0), torch.tensor(2.0)))
    assert loss_value(torch.tensor([2.5])) == 2.5


def test_the_suggestion_stays_inside_the_tested_range():
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    calls = itertools.count()

    def rising(out, target):  # the loss only rises: lowest at the first LR, 1e-7
        return nn.functional.cross_entropy(out, target) + next(calls)

    res = lr_find(model, opt, (x, y), rising, start_lr=1e-7, num_iter=10)
    assert res.min_loss_lr == pytest.approx(1e-7)
    assert res.suggested == pytest.approx(1e-7)  # not 1e-8, which was never tested
    assert res.note is not None and "clamped to start_lr" in res.note
    res = lr_find(model, opt, (x, y), nn.CrossEntropyLoss(), num_iter=40)
    assert res.note is None and res.suggested == pytest.approx(res.min_loss_lr / 10)


def test_a_deep_copied_optimizer_leaves_the_guards_hooks_behind():
    # The fallback copy took the original's step hooks with it: a guard's refusal of
    # steps outside guard.step then refused the doctor's own trial steps.
    import gradguard as gg
    from gradguard.doctor.lr_find import clone_optimizer

    class Needy(torch.optim.SGD):
        def __init__(self, params, lr, momentum_must):  # (not rebuildable from groups)
            super().__init__(params, lr=lr)

    model = torch.nn.Linear(4, 1)
    opt = Needy(model.parameters(), 0.1, 0.9)
    guard = gg.Guard(model, opt, log=None)
    copy_model = copy.deepcopy(model)
    clone = clone_optimizer(opt, model, copy_model)
    copy_model(torch.randn(8, 4)).pow(2).mean().backward()
    clone.step()  # no GuardUsageError
    guard.close()
