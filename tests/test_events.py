import math

import torch
from torch import nn

import gradguard as gg
from gradguard.events import counted


def test_counted_is_plural_unless_one():
    assert counted(1, "bad step") == "1 bad step"
    assert counted(0, "rollback") == "0 rollbacks"
    assert counted(3, "step") == "3 steps"


def test_the_verdict_counts_in_words_a_reader_expects():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log=None)
    x = torch.randn(8, 4)
    for step in range(20):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        if step == 5:
            loss = loss * math.nan  # one broken batch
        loss.backward()
        guard.step(loss)
    guard.close()
    assert guard.verdict().startswith("stable: 1 bad step skipped, the LR was never changed")

