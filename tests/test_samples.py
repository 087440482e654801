"""The last, smaller batch of an epoch is not a spike; a corrupted one still is."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.samples import SampleCounter
from gradguard.scenarios import data

pytestmark = pytest.mark.usefixtures("one_thread")


def digits_epochs(seed: int, corrupt: set[int] = frozenset(), epochs: int = 6, bs: int = 128):
    """1797 digits in batches of 128: every epoch ends with a batch of 5."""
    x, y = data.digits()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs,
                                         shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    partial, step = [], 0
    with gg.Guard(model, opt) as guard:
        for _ in range(epochs):
            for xb, yb in loader:
                if len(xb) < bs:
                    partial.append(step)
                if step in corrupt:
                    xb = xb * 1000.0  # a batch in the wrong units
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                guard.step(loss)
                step += 1
    flagged = {e["step"] for e in guard.recorder.events
               if e["kind"] in ("grad_spike", "loss_spike")}
    return partial, flagged


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_smaller_last_batch_of_each_epoch_is_not_a_spike(seed):
    partial, flagged = digits_epochs(seed)
    assert partial == [14, 29, 44, 59, 74, 89]
    assert flagged == set()


def test_a_corrupted_batch_is_flagged_whether_it_is_full_or_the_small_last_one():
    _, flagged = digits_epochs(2, corrupt={50, 59})
    assert flagged == {50, 59}


def test_counter_sums_micro_batches_and_ignores_evaluation():
    model = nn.Linear(4, 1)
    c = SampleCounter(model)
    for _ in range(4):  # gradient accumulation: four micro-batches of 8
        model(torch.randn(8, 4))
    with torch.no_grad():
        model(torch.randn(100, 4))
    model.eval()
    model(torch.randn(100, 4))
    model.train()
    assert c.noise() == 1.0 and c.full == 4 * 8 * 4
    model(torch.randn(8, 4))  # a quarter of a full step
    assert c.noise() == pytest.approx(2.0)
    assert c.noise() == 1.0  # nothing counted: unknown, judged as a full step
    c.remove()
    model(torch.randn(8, 4))
    assert c.pending == 0


def test_a_counter_removed_during_a_forward_pass_does_not_break_that_pass():
    # A guard garbage-collected while its model runs forward (an old guard dropped in a
    # notebook, say) takes its hooks off from inside the pass; torch still calls the
    # snapshot it took, without the kwargs its with_kwargs marker promised.
    model = torch.nn.Linear(4, 2)
    counter: list[SampleCounter] = []
    model.register_forward_pre_hook(lambda _m, _a: counter[0].remove())
    counter.append(SampleCounter(model))
    model(torch.randn(3, 4))
    model(torch.randn(3, 4))


def test_a_batch_dropped_after_its_forward_pass_is_not_counted_into_the_next_step():
    # The HF callback asks should_skip_batch after the forward pass: the dropped batches'
    # samples were counted into the next step, which became the "full" size, so every
    # later step read as a smaller batch and the spike thresholds stayed widened.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, opt, log=None,
                     rollback=gg.Rollback(every=10, skip_batches=2))
    dropped = 0
    for i in range(60):
        opt.zero_grad()
        loss = model(torch.randn(32, 8)).pow(2).mean()
        if i in (30, 31, 32):
            loss = loss * math.nan  # three NaN steps: a rollback, then 2 batches skipped
        loss.backward()
        if guard.should_skip_batch():
            dropped += 1
            continue
        guard.step(loss)
    guard.close()
    assert guard.rollbacks == 1 and dropped == 2
    assert guard._samples.full == 32 * 8
