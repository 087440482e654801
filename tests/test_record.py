import json
import math

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.record import COLUMNS, JsonlSink, Mailbox, Recorder, read_jsonl


def test_mailbox_on_cpu_delivers_in_order():
    mb = Mailbox(torch.device("cpu"))
    for k in range(3):
        mb.post(k, torch.tensor([float(k), 2.0]))
    rows = mb.poll()
    assert [k for k, _ in rows] == [0, 1, 2]
    assert rows[2][1].tolist() == [2.0, 2.0]


def test_jsonl_roundtrip_nonfinite_and_torn_last_line(tmp_path):
    path = tmp_path / "run.jsonl"
    rec = Recorder(["a", "b"], [JsonlSink(path)], flush_every=1)
    rec.start({"params": ["a", "b"]})
    head = {"loss": math.nan, "grad_norm": 3.0, "clipped_norm": 1.0, "skipped": 1,
            "nonfinite": 1, "grad_spike": 0, "loss_spike": 0, "lr_scale": 0.5, "bad_inputs": 0,
            "grad_z": 0.0, "loss_z": 0.0}
    vals = np.array([*(head[c] for c in COLUMNS), math.inf, 2.0])  # then the norms
    rec.row(0, vals, 2)
    rec.event(0, "nonfinite", "boom", action="skip")
    rec.close()
    with open(path, "a") as f:
        f.write('{"type": "step", "step": 1, "loss": 0.')  # a crash mid-line
    recs = list(read_jsonl(path))
    assert [r["type"] for r in recs] == ["meta", "step", "event"]
    step = recs[1]
    assert math.isnan(step["loss"]) and step["skipped"] is True
    assert step["norms"][0] == math.inf and step["lr_scale"] == 0.5
    assert json.loads(path.read_text().splitlines()[1])["loss"] == "nan"


def test_tensorboard_sink_writes_events(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, tensorboard=tmp_path / "tb", flush_every=5)
    for i in range(12):
        opt.zero_grad()
        x = torch.randn(8, 3)
        if i == 10:
            x[0, 0] = math.nan
        loss = model(x).pow(2).mean()
        loss.backward()
        guard.step(loss)
    guard.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()
    assert "gradguard/grad_norm" in tags["scalars"]
    assert len(acc.Scalars("gradguard/loss")) >= 10
    assert "gradguard/log10_layer_grad_norm" in tags["histograms"]
    assert any("nonfinite" in t for t in tags["tensors"])


def test_console_events_are_whole_lines_at_80_columns():
    import io

    from rich.console import Console

    from gradguard.record import ConsoleSink

    buf = io.StringIO()
    sink = ConsoleSink(Console(file=buf, width=80, force_terminal=False))
    path = "/very/long/checkpoint/directory/of/an/experiment/run-2024-06-01/snapshot-000000100.pt"
    sink.event({"step": 100, "kind": "snapshot",
                "message": f"snapshot of step 100 written to {path}"})
    sink.event({"step": 101, "kind": "nonfinite", "message": "NaN in [layers.0] weights"})
    lines = buf.getvalue().splitlines()
    assert lines == [f"gradguard step 100: snapshot of step 100 written to {path}",
                     "gradguard step 101: NaN in [layers.0] weights"]


def test_pack_row_follows_the_declared_schema_and_names_a_missing_column():
    from gradguard.record import COLUMNS, pack_row

    cols = {c: torch.tensor(float(i)) for i, c in enumerate(COLUMNS)}
    cols["skipped"] = torch.tensor(True)
    row = pack_row(torch.tensor([7.0, 8.0]), **cols)
    assert row.tolist()[: len(COLUMNS)] == [1.0 if c == "skipped" else float(i)
                                            for i, c in enumerate(COLUMNS)]
    assert row.tolist()[len(COLUMNS):] == [7.0, 8.0]
    del cols["lr_scale"]
    with pytest.raises(ValueError, match="missing columns \\['lr_scale'\\]"):
        pack_row(torch.tensor([1.0]), **cols)


def test_mailbox_hands_over_rows_up_to_a_step_and_no_further():
    from gradguard.record import Mailbox

    box = Mailbox(torch.device("cpu"))
    for k in range(5):
        box.post(k, torch.tensor([float(k)]))
    assert [k for k, _ in box.poll(upto=2)] == [0, 1, 2]
    assert box.poll(upto=2) == []
    assert [k for k, _ in box.poll(wait=True)] == [3, 4]


def test_a_guard_whose_rows_arrive_late_still_catches_spikes_and_decides_alike():
    # On an accelerator the host takes each row ROW_LAG steps late, so the detectors'
    # windows lag their flags; on the CPU the mailbox can be made to hold rows as long.
    from tests.conftest import small_mlp

    def run(lag):
        torch.manual_seed(0)
        model = small_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        guard = gg.Guard(model, opt)
        guard.mailbox.lag = lag
        flags = []
        for k in range(60):
            opt.zero_grad()
            x = torch.randn(32, 8, generator=torch.Generator().manual_seed(k))
            loss = model(x).pow(2).mean() * (1000.0 if k in (40, 41) else 1.0)
            loss.backward()
            info = guard.step(loss)
            flags.append((bool(info.grad_spike | info.loss_spike), bool(info.skipped)))
            if k == 30:
                assert guard.grad_spike.count == 31 - lag  # rows 0 … 30 - lag learned
        guard.close()
        return flags, [p.detach().clone() for p in model.parameters()]

    flags, params = run(2)
    assert flags[40] == (True, True)  # a bad batch: flagged and skipped
    assert flags[41][0] and not any(f[0] for f in flags[:40] + flags[42:])
    again, params2 = run(2)
    assert again == flags and all(torch.equal(a, b) for a, b in zip(params, params2, strict=True))
    assert run(0)[0] == flags  # here the lag changes no decision


def test_rows_of_an_accelerator_without_the_cuda_pipeline_reach_the_host_as_arrays():
    # MPS/XPU rows are read at once (the pinned-memory and event pipeline is CUDA's); a
    # row left on such a device would fail at .numpy() when the host takes it.
    class Row:  # stands in for an MPS tensor: .numpy() refuses, .cpu() has the values
        device = torch.device("mps")

        def __init__(self, t):
            self.t = t

        def detach(self):
            return self

        def cpu(self):
            return self.t

        def numpy(self):
            raise TypeError("can't convert mps:0 device type tensor to numpy")

    box = Mailbox(torch.device("mps"))
    box.post(0, Row(torch.tensor([1.0, 2.0])))
    [(step, arr)] = box.poll()
    assert step == 0 and arr.tolist() == [1.0, 2.0] and box.lag == 0


def _tb(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_histograms_keep_their_cadence(tmp_path):
    # Histograms came only at steps that were multiples of both 50 and layers_every
    # (layers_every=7: one in 350 steps).
    from gradguard.record import TensorBoardSink

    with pytest.raises(gg.ConfigError, match="histogram_every must be an int >= 1"):
        TensorBoardSink(tmp_path / "bad", histogram_every=0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log=None, tensorboard=tmp_path / "tb", layers_every=7)
    for _ in range(120):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        guard.step()
    guard.close()
    hist = [e.step for e in _tb(tmp_path / "tb").Histograms("gradguard/log10_layer_grad_norm")]
    assert hist == [0, 56, 112]
    assert "gradguard/lr" in _tb(tmp_path / "tb").Tags()["scalars"]


def test_a_guard_with_an_open_log_refuses_pickle_and_copy_and_keeps_training(tmp_path):
    import copy
    import pickle

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def train(g, m, o, n):
        for _ in range(n):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            g.step(loss)

    guard = gg.Guard(model, opt, log=tmp_path / "run.jsonl")
    train(guard, model, opt, 3)
    for attempt in (lambda: pickle.dumps(guard), lambda: copy.deepcopy(guard)):
        with pytest.raises(gg.GuardUsageError, match=r"state_dict\(\).*log=None"):
            attempt()
    train(guard, model, opt, 3)  # the refused copy left the guard and its log working
    guard.close()
    steps = [r for r in read_jsonl(tmp_path / "run.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(6))

    # Without a log a guard is plain data: the copy trains its own copies of the model
    # and optimizer and ends as the original does.
    model2 = torch.nn.Linear(3, 1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    plain = gg.Guard(model2, opt2, log=None)
    train(plain, model2, opt2, 2)
    twin = pickle.loads(pickle.dumps((plain, model2, opt2)))
    train(plain, model2, opt2, 3)
    train(*twin, 3)
    assert torch.equal(twin[1].weight, model2.weight)
