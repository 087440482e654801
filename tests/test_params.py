"""Which layers the guard treats as recurrent (Policy.clip_recurrent); where it watches the
data for NaN/Inf."""

import math

import pytest
import torch
from torch import nn

import gradguard as gg
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


class Shared(nn.Module):
    """An embedding shared by an encoder and a decoder (T5/BART style)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.enc, self.dec = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, src, tgt):
        return self.dec(self.emb(tgt)) + self.enc(self.emb(src)).mean(0)


def recurrent(model, *inputs, params=None, passes=1):
    probe = ForwardOrder(model, list(model.parameters()) if params is None else params)
    for _ in range(passes):  # (gradient accumulation: several forward passes a step)
        model(*inputs)
    probe.finish()
    return probe.recurrent()


def test_torchs_recurrent_layers_that_ran_with_watched_weights():
    rnn = nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 8, batch_first=True))
    assert recurrent(rnn, torch.randn(2, 5, 3)) == ["1"]
    assert recurrent(rnn, torch.randn(2, 5, 3), passes=4) == ["1"]
    cell = nn.ModuleDict({"cell": nn.LSTMCell(3, 4), "head": nn.Linear(4, 1)})
    probe = ForwardOrder(cell, list(cell.parameters()))
    h, c = torch.zeros(2, 4), torch.zeros(2, 4)
    for _ in range(5):
        h, c = cell["cell"](torch.randn(2, 3), (h, c))
    cell["head"](h)
    probe.finish()
    assert probe.recurrent() == ["cell"]
    # An RNN the forward pass never ran, or whose weights the guard does not watch
    # (frozen, or a guard over the head's parameters only), is not clipped for.
    unused = nn.ModuleDict({"lstm": nn.LSTM(3, 4), "head": nn.Linear(3, 1)})
    probe = ForwardOrder(unused, list(unused.parameters()))
    unused["head"](torch.randn(2, 3))
    probe.finish()
    assert probe.recurrent() == []
    head_only = list(rnn[0].parameters())
    assert recurrent(rnn, torch.randn(2, 5, 3), params=head_only) == []


def test_shared_layers_and_hand_written_loops_are_not_told_apart_so_neither_counts():
    # Policy(clip_recurrent="always") is the way to clip a hand-written recurrence.
    mlp = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    assert recurrent(mlp, torch.randn(4, 3), passes=4) == []
    assert recurrent(Shared(), torch.tensor([1, 2]), torch.tensor([3, 4])) == []
    assert recurrent(Loop(), torch.randn(2, 5, 3)) == []
    assert ForwardOrder(None, []).recurrent() == []


def test_a_compiled_model_blames_bad_data_as_an_eager_one_does():
    # InputWatch is armed after the first NaN step, by then the graph is compiled: a hook
    # on an inner layer would never run, and the guard would blame the LR.
    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)),
                          backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, opt, log=None, policy=gg.Policy(max_consecutive_skips=50))
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(gg.TrainingDivergedError, match="data carries them"):
        for step in range(200):
            x = torch.randn(16, 6, generator=gen)
            if step >= 60:
                x[0, 0] = math.nan  # the pipeline goes bad for good
            opt.zero_grad()
            loss = (model(x) - x[:, :1]).pow(2).mean()
            loss.backward()
            guard.step(loss)
    assert guard.steps == 110 and guard.rollbacks == 0 and guard.lr.scale == 1


def test_a_batch_is_watched_whole_once_armed():
    from collections import namedtuple

    from gradguard.params import InputWatch

    w = InputWatch()
    nan = torch.tensor([1.0, math.nan])
    w.check_batch((torch.ones(2), nan), torch.device("cpu"))
    assert w.take() is None  # not armed: a healthy CPU run pays nothing
    w.arm(None)
    Pair = namedtuple("Pair", "x y")
    for batch, bad in [((torch.ones(2), nan), True),
                       ({"x": torch.ones(2), "y": [Pair(torch.ones(1), nan)]}, True),
                       ({"x": torch.ones(2), "ids": torch.tensor([1, 2])}, False),
                       ([torch.ones(2), torch.tensor([1.0, math.inf])], True),
                       (torch.tensor([1 + 0j, complex(math.nan, 0)]), True),
                       ({"ids": torch.tensor([1, 2])}, None)]:  # (nothing floating)
        w.check_batch(batch, torch.device("cpu"))
        flag = w.take()
        assert (flag if flag is None else bool(flag)) is bad, batch
    # Mappings that are not dicts (a tokenizer's BatchEncoding is a UserDict), dataclasses.
    from collections import UserDict
    from dataclasses import dataclass

    @dataclass
    class Example:
        x: torch.Tensor
        y: torch.Tensor

    for batch in (UserDict(x=torch.ones(2), y=nan), Example(torch.ones(2), nan)):
        w.check_batch(batch, torch.device("cpu"))
        assert bool(w.take()), batch
    # Tensors torch has no isfinite for, or that hold no values, are left unwatched.
    sparse = torch.tensor([[0.0, math.nan]]).to_sparse()
    w.check_batch((sparse, torch.empty(2, device="meta")), torch.device("cpu"))
    assert w.take() is None
    # A column of plain values is not walked (a long list of ids costs nothing).
    w.check_batch((list(range(100_000)), ["a"] * 10), torch.device("cpu"))
    assert w.take() is None
    # A batch on the CPU while the guard is elsewhere is read on the host (free there),
    # not copied to the guard's device and waited for: the flag is made there.
    flag = w.batch_flag((torch.ones(2), nan), torch.device("meta"))
    assert flag.device.type == "meta"
    assert w.batch_flag(torch.ones(2), torch.device("meta")) is None
    # Several batches in one step (accumulated micro-batches): any of them.
    w.check_batch(torch.ones(2), torch.device("cpu"))
    w.check_batch(nan, torch.device("cpu"))
    assert bool(w.take()) and w.take() is None  # (taken: the next step starts clean)


def test_missing_targets_passed_with_the_step_are_the_datas_from_the_first_step():
    # Where rows arrive late (CUDA) the watch runs from the first step; a guard given only
    # parameters (no model: no first layer to hook) still watches the batch.
    torch.manual_seed(0)
    w = nn.Parameter(torch.zeros(4, 1))
    opt = torch.optim.SGD([w], lr=0.1)
    guard = gg.Guard(None, opt, log=None, rollback=gg.Rollback(every=5))
    guard.mailbox.lag = 2
    for s in range(60):
        x = torch.randn(16, 4)
        y = x @ torch.ones(4, 1)
        if 30 <= s < 40:
            y[::4] = math.nan
        opt.zero_grad()
        loss = (x @ w - y).pow(2).mean()
        loss.backward()
        guard.step(loss, batch={"x": x, "y": y})
    guard.close()
    assert guard.rollbacks == 0 and guard.lr.scale == 1 and int(guard.skipped) == 10
    assert [e["step"] for e in guard.recorder.events if e.get("data")] == list(range(30, 40))
    assert "the batch passed to step" in guard.recorder.events[0]["message"]
