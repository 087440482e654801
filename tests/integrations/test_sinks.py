"""Optional tracker sinks: real packages when installed; a clear error when not."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

import gradguard as gg
from gradguard.integrations.sinks import MLflowSink, WandbSink
from tests.conftest import backward, small_mlp


def run_guard(sink, steps=12, nan_at=5):
    model = small_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, sinks=[sink], flush_every=4)
    for s in range(steps):
        opt.zero_grad()
        guard.step(backward(model, seed=s, nan=s == nan_at))
    guard.close()
    return guard


@pytest.mark.parametrize(("cls", "package"), [(WandbSink, "wandb"), (MLflowSink, "mlflow")])
def test_missing_package_is_named(cls, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(ModuleNotFoundError, match=f"pip install {package}"):
        cls()


def test_wandb_sink_logs_an_offline_run(tmp_path):
    wandb = pytest.importorskip("wandb")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="gradguard-test")
    try:
        run_guard(WandbSink(run))
        assert run.summary["gradguard/step"] == 11
        assert run.summary["gradguard/events/nonfinite"] == 1.0
    finally:
        run.finish()


def test_mlflow_sink_logs_metrics_and_events(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as active:
        run_guard(MLflowSink())
        run_id = active.info.run_id
    client = mlflow.tracking.MlflowClient()
    norms = client.get_metric_history(run_id, "gradguard/grad_norm")
    assert sorted(m.step for m in norms) == [s for s in range(12) if s != 5]  # NaN left out
    skipped = {m.step: m.value for m in client.get_metric_history(run_id, "gradguard/skipped")}
    assert skipped[5] == 1.0
    assert client.get_metric_history(run_id, "gradguard/events/nonfinite")[0].step == 5
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/gradguard/events.json")["events"]


class _FakeWandbRun:
    """Records calls made with the subset of wandb's run API the sink uses."""

    def __init__(self):
        self.defined, self.logged, self.configured, self.finished = [], [], {}, False
        self.config = types.SimpleNamespace(
            update=lambda d, allow_val_change=False: self.configured.update(d))

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, d):
        self.logged.append(d)

    def finish(self):
        self.finished = True


def test_wandb_sink_translation_with_a_stand_in_module(monkeypatch):
    # Exercises the sink's own logic where wandb is absent; the real-package test above
    # checks it against wandb itself.
    run = _FakeWandbRun()
    fake = types.SimpleNamespace(run=None, init=lambda **kw: run,
                                 Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_guard(WandbSink(project="x"))
    assert run.finished and ("gradguard/*", "gradguard/step") in run.defined
    assert run.configured["gradguard/params"] == 6
    steps = [d for d in run.logged if "gradguard/skipped" in d]
    assert [d["gradguard/step"] for d in steps] == list(range(12))
    assert "gradguard/grad_norm" not in steps[5] and steps[5]["gradguard/skipped"] == 1.0
    assert run.logged[-1]["gradguard/events"][2][0][:2] == [5, "nonfinite"]


class _Unreachable:
    """A tracker sink whose close fails (a network error)."""

    def meta(self, record):
        pass

    def steps(self, records):
        pass

    def event(self, record):
        pass

    def close(self):
        raise ConnectionError("tracker unreachable")


def test_a_sink_that_fails_to_close_leaves_the_guard_and_its_log_closed(tmp_path):
    # The guard stayed open (a second close wrote a second verdict, steps were still
    # taken) and the sinks after the failing one, its own run log among them, unclosed.
    model = small_mlp()
    log = tmp_path / "run.jsonl"
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log=log,
                     sinks=[_Unreachable()])
    for _ in range(5):
        guard.step(backward(model))
    with pytest.raises(ConnectionError):
        guard.close()
    guard.close()  # closed already: nothing more
    assert log.read_text().count('"verdict"') == 1
    assert all(s._f.closed for s in guard.recorder.sinks if hasattr(s, "_f"))
    with pytest.raises(gg.GuardUsageError, match="closed"):
        guard.step(backward(model))
