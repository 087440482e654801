"""A guard's construction, and its undoing when it fails part-way (gradguard.assembly)."""

import pytest
import torch

import gradguard as gg
import gradguard.assembly as assembly
from tests.conftest import backward, small_mlp


def _refusing_probe(monkeypatch, error):
    def refuse(*_a, **_k):
        raise error

    monkeypatch.setattr(assembly, "ForwardOrder", refuse)


class _UserSink:
    closed = False

    def meta(self, record): ...
    def steps(self, records): ...
    def event(self, record): ...

    def close(self):
        self.closed = True


def test_a_guard_that_fails_to_build_leaves_the_optimizer_and_model_as_they_were(tmp_path):
    # The stepper switches the optimizer (fused kernel, state on the device) before the
    # sinks open; a log path that cannot be created must not leave it switched or hooked.
    model = small_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    backward(model)
    opt.step()  # state exists: a switch would move its step counters
    for st in opt.state.values():  # (a switch to the fused kernel casts them to fp32)
        st["step"] = st["step"].double()
    steps = {id(p): st["step"] for p, st in opt.state.items()}
    hooks = len(opt._optimizer_step_pre_hooks)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        gg.Guard(model, opt, log=blocker / "run.jsonl")
    assert opt.param_groups[0]["fused"] is None
    assert "_step_supports_amp_scaling" not in vars(opt)
    assert all(st["step"] is steps[id(p)] for p, st in opt.state.items())
    assert len(opt._optimizer_step_pre_hooks) == hooks
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
    import gc
    import weakref

    old = [weakref.ref(st["step"]) for st in opt.state.values()]
    del steps
    guard = gg.Guard(model, opt)  # and a guard built afterwards switches it as usual
    assert guard.stepper.strategy == "found_inf" and opt.param_groups[0]["fused"] is True
    gc.collect()
    # The replaced fp64 counters are not kept for an undo once the guard is built.
    assert all(r() is None for r in old)
    guard.close()


def test_a_guard_failing_late_in_its_construction_takes_its_hooks_off(monkeypatch):
    # Anything after the device parts may fail (here the forward-order probe, as a
    # TorchScript submodule refusing hooks would): the optimizer keeps no step hook (the
    # user's own optimizer.step() would raise GuardUsageError), the model no forward
    # hook, and the user's own sink stays open.
    class Boom(Exception):
        pass

    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = _UserSink()
    _refusing_probe(monkeypatch, Boom())
    with pytest.raises(Boom):
        gg.Guard(model, opt, sinks=[sink])
    assert len(opt._optimizer_step_pre_hooks) == 0
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert opt.param_groups[0].get("fused") is None and not sink.closed
    backward(model)
    opt.step()  # the user's optimizer works as before


def test_a_failed_construction_closes_the_log_it_opened_and_not_the_users_sink(
        monkeypatch, tmp_path):
    opened = []
    make_sinks = assembly.make_sinks

    def recording(*a, **k):
        sinks = make_sinks(*a, **k)
        opened.extend(sinks)
        return sinks

    monkeypatch.setattr(assembly, "make_sinks", recording)
    _refusing_probe(monkeypatch, KeyError("probe"))
    user = _UserSink()
    model = small_mlp()
    with pytest.raises(KeyError, match="probe"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), sinks=[user],
                 log=tmp_path / "run.jsonl")
    logs = [s for s in opened if s is not user]
    assert logs and all(s._f.closed for s in logs)  # the guard's own JSONL file
    assert not user.closed


def test_a_cleanup_step_that_fails_does_not_hide_the_original_error(monkeypatch):
    # The error the user needs is the one that stopped the construction, not a second one
    # raised while undoing it; and the cleanup steps after the failing one still run.
    from gradguard.stepper import Stepper

    def broken_undo(self):
        raise RuntimeError("undo failed")

    monkeypatch.setattr(Stepper, "undo", broken_undo)
    _refusing_probe(monkeypatch, LookupError("the real cause"))
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(LookupError, match="the real cause"):
        gg.Guard(model, opt)
    assert len(opt._optimizer_step_pre_hooks) == 0  # Usage's hook still taken off
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
