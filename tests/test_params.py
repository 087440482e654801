"""Which layers the guard treats as recurrent (Policy.clip_recurrent)."""

import torch
from torch import nn

from gradguard.params import ForwardOrder


class Loop(nn.Module):
    """A tanh RNN written by hand: two Linear layers run once per time step."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.hid, self.out = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.hid(h))
        return self.out(h)


class Experts(nn.Module):
    """A router and two experts, of which only one runs per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 3), nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.router(x)
        return self.head((self.a if self.calls % 2 else self.b)(x))


def recurrent(model, x, passes=1):
    probe = ForwardOrder(model, list(model.parameters()))
    for _ in range(passes):  # (gradient accumulation: several forward passes a step)
        model(x)
    probe.finish()
    return probe.recurrent()


def test_recurrent_layers_by_type_and_by_weights_run_in_a_loop():
    rnn = nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 8, batch_first=True))
    assert recurrent(rnn, torch.randn(2, 5, 3)) == ["1"]
    assert recurrent(Loop(), torch.randn(2, 5, 3)) == ["inp", "hid"]
    assert recurrent(Loop(), torch.randn(2, 5, 3), passes=4) == ["inp", "hid"]
    cell = nn.ModuleDict({"cell": nn.LSTMCell(3, 4)})
    assert ForwardOrder(cell, list(cell.parameters())).recurrent() == ["cell"]


def test_accumulation_experts_and_plain_nets_are_not_recurrent():
    mlp = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    assert recurrent(mlp, torch.randn(4, 3)) == []
    assert recurrent(mlp, torch.randn(4, 3), passes=4) == []
    assert recurrent(Experts(), torch.randn(4, 3), passes=4) == []
    assert ForwardOrder(None, []).recurrent() == []
