"""Bad input: each mistake fails with a message that names the problem and the fix.

Already covered elsewhere (not repeated here): an optimizer that does not own the model's
parameters, ``guard.step()`` twice without ``backward`` and no backward at all
(``tests/test_guard.py``); truncated and bit-flipped snapshot files
(``tests/test_snapshot.py``); ``read_jsonl`` on a torn last line (``tests/test_record.py``).
"""

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import snapshot as snap
from gradguard.report import summarize
from tests.conftest import backward, small_mlp

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr)


# -- gradients -------------------------------------------------------------------------
def test_loss_that_does_not_depend_on_the_parameters():
    model = small_mlp()
    guard = gg.Guard(model, sgd(model))
    x = torch.randn(4, 8, requires_grad=True)
    loss = (x * 2).sum()  # built from the input only: backward reaches no parameter
    loss.backward()
    with pytest.raises(gg.GuardUsageError, match="check the loss depends on the model"):
        guard.step(loss)


def test_some_parameters_without_grads_are_fine():
    model = nn.ModuleDict({"used": nn.Linear(8, 1), "unused": nn.Linear(8, 1)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt)
    before = model["unused"].weight.detach().clone()
    model["used"](torch.randn(4, 8)).pow(2).mean().backward()
    info = guard.step()
    assert not info.skipped
    assert info.norms.shape == (2,)  # norms of the parameters that have a gradient
    assert torch.equal(model["unused"].weight, before)


def test_sparse_gradients_are_refused_with_the_fix():
    emb = nn.Embedding(10, 4, sparse=True)
    guard = gg.Guard(emb, torch.optim.SGD(emb.parameters(), lr=0.1))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"sparse gradient.*sparse=False.*params="):
        guard.step()


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_mixed_fp32_and_bf16_parameters_work(opt_cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1).to(torch.bfloat16))

    def loss_fn(x):
        h = model[1](model[0](x))
        return model[2](h.to(torch.bfloat16)).float().pow(2).mean()

    opt = opt_cls(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt, clip=gg.clip.GlobalNorm(0.05))
    for step in range(4):
        opt.zero_grad()
        loss = loss_fn(torch.randn(32, 8) * 10)
        loss.backward()
        if step == 2:  # NaN in the bf16 layer only: the whole step is skipped
            model[2].weight.grad[0, 0] = math.nan
            before = [p.detach().clone() for p in model.parameters()]
        info = guard.step(loss)
        if step == 2:
            assert info.skipped
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(),
                                                          strict=True))
        else:
            assert not info.skipped
            # the clip acts on both dtypes together (bf16 rounding: ~2^-8 relative)
            applied = torch.linalg.vector_norm(torch.stack(
                [p.grad.float().norm() for p in model.parameters()]))
            assert applied <= 0.05 * (1 + 2**-7)
    assert {p.dtype for p in model.parameters()} == {torch.float32, torch.bfloat16}
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- configuration, checked at construction --------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: gg.clip.GlobalNorm(-1.0), r"GlobalNorm.max_norm must be a finite number > 0"),
    (lambda: gg.clip.GlobalNorm(0), r"GlobalNorm.max_norm must be a finite number > 0"),
    (lambda: gg.clip.GlobalNorm(math.nan), r"GlobalNorm.max_norm .* got nan"),
    (lambda: gg.clip.GlobalNorm(math.inf), r"GlobalNorm.max_norm .* got inf"),
    (lambda: gg.clip.GlobalNorm("1.0"), r"must be a number"),
    (lambda: gg.clip.Value(math.nan), r"Value.limit"),
    (lambda: gg.clip.PerLayerNorm(-2), r"PerLayerNorm.max_norm"),
    (lambda: gg.clip.AGC(clipping=0), r"AGC.clipping"),
    (lambda: gg.clip.Quantile(q=math.nan), r"Quantile.q"),
    (lambda: gg.clip.Quantile(q=1.5), r"Quantile.q must be in \[0, 1\]"),
    (lambda: gg.clip.ZScore(z_thresh=math.nan), r"ZScore.z_thresh"),
    (lambda: gg.clip.ZScore(alpha=1.0), r"ZScore.alpha must be in \(0, 1\)"),
    (lambda: gg.clip.ZScore(mode="median"), r"ZScore.mode must be one of"),
    (lambda: gg.clip.Normalize(norm=0.0), r"Normalize.norm"),
    (lambda: gg.NormSpike(z_thresh=-1), r"NormSpike.z_thresh"),
    (lambda: gg.NormSpike(warmup=0), r"NormSpike.warmup must be an int >= 1"),
    (lambda: gg.LossSpike(ratio=math.nan), r"LossSpike.ratio"),
    (lambda: gg.Stability(decrease=1.5), r"Stability.decrease must be in \(0, 1\)"),
    (lambda: gg.Stability(decrease=math.nan), r"Stability.decrease"),
    (lambda: gg.Rollback(every=0), r"Rollback.every must be an int >= 1"),
    (lambda: gg.Rollback(memory="gpu"), r"Rollback.memory must be one of"),
    (lambda: gg.Rollback(host_fraction=math.nan), r"Rollback.host_fraction"),
    (lambda: gg.Rollback(every=20, disk_every=30), r"disk_every=30 is not a multiple of every"),
    (lambda: gg.Policy(on_spike="explode"), r"on_spike must be one of .*'explode'"),
    (lambda: gg.Policy(on_nonfinite="ignore"), r"on_nonfinite must be one of"),
    (lambda: gg.Policy(on_loss_spike="clip"), r"on_loss_spike must be one of"),
    (lambda: gg.Policy(rollback=True), r"rollback must be a gradguard.Rollback"),
    (lambda: gg.Policy(stability=0.5), r"stability must be a gradguard.Stability"),
    (lambda: gg.Policy(max_consecutive_skips=0), r"max_consecutive_skips"),
    (lambda: gg.Policy(grad_spike=gg.NormSpike), r"grad_spike takes a detector, not its class"),
    (lambda: gg.Policy(loss_spike=gg.LossSpike), r"LossSpike\(\) with parentheses"),
    (lambda: gg.Stability(giveback="0.5"), r"Stability.giveback must be a number"),
    (lambda: gg.Stability(giveback=None), r"Stability.giveback must be a number"),
    (lambda: gg.Rollback(dir=5), r"Rollback.dir must be a folder path"),
    (lambda: gg.NormSpike(min_ratio=0.5), r"NormSpike.min_ratio must be > 1"),
    (lambda: gg.NormSpike(early_ratio=1), r"NormSpike.early_ratio must be > 1"),
    (lambda: gg.LossSpike(early_ratio=0.9), r"LossSpike.early_ratio must be > 1"),
    (lambda: gg.Stability(warmup="Auto"), r"Stability.warmup must be 'attention', 'auto', an int"),
    (lambda: gg.Rollback(memory="off", dir="snaps"), r"memory='off'\) keeps no snapshot"),
    # (a string reads as true: "False" would switch the setting on)
    (lambda: gg.Stability(clip_on_giveback="False"),
     r"Stability.clip_on_giveback must be True or False, got 'False'"),
    (lambda: gg.Stability(norm_streaks=None), r"Stability.norm_streaks must be True or False"),
    (lambda: gg.clip.Normalize(per_tensor="False"), r"Normalize.per_tensor must be True or"),
    (lambda: gg.clip.ZScore(skip_update_on_spike=1), r"ZScore.skip_update_on_spike must be"),
    (lambda: gg.Rollback(dir=""), r"Rollback.dir is empty: give a folder path \('.' for"),
])
def test_invalid_settings_fail_at_construction(make, match):
    with pytest.raises(gg.ConfigError, match=match):
        make()


@pytest.mark.parametrize("kwargs, match", [
    ({"on_spike": "explode"}, r"on_spike must be one of"),
    ({"on_nonfinite": "warn"}, r"on_nonfinite must be one of"),
    ({"skip_strategy": "fast"}, r"skip_strategy must be one of"),
    ({"policy": "skip"}, r"policy must be a gradguard.Policy"),
    ({"clip": "zscore"}, r"clip takes a gradguard.clip transform.*GlobalNorm"),
    ({"clip": torch.nn.utils.clip_grad_norm_}, r"clip takes a gradguard.clip transform"),
    ({"clip": [gg.clip.GlobalNorm(1.0), 1.0]}, r"chain\(\) takes gradguard.clip transforms"),
    ({"flush_every": 0}, r"flush_every must be an int >= 1"),
    ({"layers_every": math.nan}, r"layers_every must be an int >= 1"),
    ({"after_step": "maxnorm"}, r"after_step takes a callable"),
    ({"clip": gg.clip.AGC(exclude=["head.*", "0.*"])},
     r"AGC exclude pattern\(s\) \['head\.\*'\] match no parameter.*'0\.weight', '0\.bias'"),
    ({"params": []}, r"params= is empty"),
    ({"log": 5}, r"log= takes a file path"),
    ({"tensorboard": 5}, r"tensorboard= takes a file path"),
    ({"sinks": [object()]}, r"sinks\[0\] is not a sink \(it lacks meta, steps, event, close\)"),
    ({"sinks": [gg.record.JsonlSink]}, r"sinks\[0\] is not a sink \(a class"),
    ({"sinks": gg.record.ConsoleSink()}, r"sinks= takes a list of sinks, got one: sinks=\["),
    ({"sinks": 5}, r"sinks= takes a list of sinks, got 5"),
    ({"log": ""}, r"log= is empty: give a path, or None"),
    ({"tensorboard": ""}, r"tensorboard= is empty"),
    ({"scaler": torch.amp.GradScaler}, r"scaler= takes the torch.amp.GradScaler instance .*"
                                       r"got the class"),
    ({"scaler": True}, r"scaler= takes .* got a bool"),
    ({"params": small_mlp()}, r"params= takes tensors, got the module Sequential: "
                              r"params=model.parameters\(\)"),
    ({"distributed": "nccl"}, r"distributed= takes None \(auto\), True, False or a process "
                              r"group"),
    ({"distributed": 1}, r"distributed= takes"),
])
def test_invalid_guard_arguments_fail_at_construction(kwargs, match, tmp_path):
    model = small_mlp()
    with pytest.raises(gg.ConfigError, match=match):
        gg.Guard(model, sgd(model), **{"log": tmp_path / "r.jsonl", **kwargs})


def test_a_folder_for_the_log_names_a_file_in_it(tmp_path):
    model = small_mlp()
    with pytest.raises(gg.ConfigError, match=r"is a folder: give the file to write, e\.g\. "
                                             r"log='.*run\.jsonl'"):
        gg.Guard(model, sgd(model), log=tmp_path)


def test_named_parameters_for_params_names_the_fix():
    model = small_mlp()
    with pytest.raises(gg.ConfigError, match=r"got \(name, tensor\) pairs"):
        gg.Guard(model, sgd(model), params=model.named_parameters())


def test_tracking_a_scheduler_class_is_refused_before_any_step():
    model = small_mlp()
    opt = sgd(model)
    guard = gg.Guard(model, opt)
    with pytest.raises(gg.ConfigError, match=r"track\(\) takes an instance, not the class "
                                             r"StepLR: e\.g\. guard\.track\(StepLR\("):
        guard.track(torch.optim.lr_scheduler.StepLR)
    backward(model)
    guard.step()  # (nothing was tracked: the first snapshot is taken as usual)
    assert guard.steps == 1


def test_restore_names_a_slip_in_its_arguments_before_changing_anything(tmp_path):
    model = small_mlp()
    opt = sgd(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    guard = gg.Guard(model, opt, rollback=gg.Rollback(every=5, dir=tmp_path))
    guard.track(sched)
    for _ in range(30):
        backward(model)
        guard.step()
        sched.step()
    guard.close()
    found = snap.load_latest(tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    with pytest.raises(gg.ConfigError, match=r"load_latest\(\) returns \(path, snapshot\)"):
        snap.restore(found, model, params, opt, [sched])
    with pytest.raises(gg.ConfigError, match=r"extras= is a list of the tracked objects"):
        snap.restore(found[1], model, params, opt, sched)
    with pytest.raises(gg.ConfigError, match=r"optimizer must be a torch.optim.Optimizer"):
        snap.restore(found[1], model, opt, params, [sched])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    snap.restore(found[1], model, params, opt, [sched])  # (the right call still works)


def test_read_jsonl_refuses_a_file_that_is_no_run_log_and_a_run_that_is_no_index(tmp_path):
    other = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, other)
    with pytest.raises(gg.ConfigError, match=r"is not a gradguard run log"):
        list(gg.read_jsonl(other))
    model = small_mlp()
    with gg.Guard(model, sgd(model), log=tmp_path / "r.jsonl") as guard:
        backward(model)
        guard.step()
    with pytest.raises(gg.ConfigError, match=r"run= takes an int \(0 the first run, -1 the "
                                             r"last\) or None .* got 'last'"):
        list(gg.read_jsonl(tmp_path / "r.jsonl", run="last"))
    assert len(list(gg.read_jsonl(tmp_path / "r.jsonl", run=-1))) >= 2
    assert len(list(gg.read_jsonl(tmp_path / "r.jsonl", run=np.int64(0)))) >= 2


def test_a_list_of_optimizers_names_one_guard_per_optimizer():
    # (a GAN's two optimizers passed together: each needs its own guard and params=)
    model = small_mlp()
    opts = [torch.optim.SGD(model[0].parameters(), lr=0.1), sgd(model)]
    with pytest.raises(gg.ConfigError, match=r"list of 2 optimizers.*one guard per optimizer"
                                             r".*params="):
        gg.Guard(model, opts, log=None)


def test_a_model_frozen_whole_names_the_fix():
    # (fine-tuning: a guard built before the layers are unfrozen has nothing to watch)
    model = small_mlp().requires_grad_(False)
    with pytest.raises(gg.ConfigError, match=r"(?s)every parameter.*is frozen.*params="):
        gg.Guard(model, sgd(model), log=None)


# -- resuming ----------------------------------------------------------------------------
def stepped_guard(model, **kw):
    kw.setdefault("clip", gg.clip.ZScore())  # a clip with statistics to carry over
    guard = gg.Guard(model, sgd(model), **kw)
    guard.step(backward(model))
    return guard


def test_state_from_a_differently_configured_guard_is_refused():
    model = small_mlp()
    state = stepped_guard(model).state_dict()
    with pytest.raises(gg.ConfigError,
                       match=r"same clip settings, policy \(its detectors too\) and parameters"):
        stepped_guard(model, on_spike="skip").load_state_dict(state)
    deeper = small_mlp(depth=4)
    with pytest.raises(gg.ConfigError, match="n_params: 6 → 8"):
        stepped_guard(deeper).load_state_dict(state)
    with pytest.raises(gg.ConfigError, match="not a gradguard state dict"):
        stepped_guard(model).load_state_dict(model.state_dict())
    with pytest.raises(gg.ConfigError, match="not a gradguard state dict"):
        stepped_guard(model).load_state_dict([1, 2])
    partial = {k: v for k, v in state.items() if k != "host"}
    with pytest.raises(gg.ConfigError, match=r"guard state lacks \['host'\]"):
        stepped_guard(model).load_state_dict(partial)


def test_a_refused_state_lists_only_the_settings_that_differ():
    model = small_mlp()
    state = stepped_guard(model).state_dict()
    with pytest.raises(gg.ConfigError) as e:
        stepped_guard(model, on_spike="skip", clip=gg.clip.GlobalNorm(1.0)).load_state_dict(state)
    lines = str(e.value).splitlines()
    diff = [ln.strip() for ln in lines[1:-1]]
    assert len(diff) == 2  # n_params, the backoff and rollback settings are equal: not listed
    assert diff[0].startswith('clip: "ZScore(') and diff[0].endswith("→ 'GlobalNorm(max_norm=1.0)'")
    assert diff[1] == "policy.on_spike: 'auto' → 'skip'"
    assert "strict=False" in lines[-1]


def test_non_strict_load_takes_what_the_new_settings_leave_valid():
    model = small_mlp()
    old = stepped_guard(model)
    for _ in range(4):
        model.zero_grad()
        old.step(backward(model))
    state = old.state_dict()
    new = stepped_guard(model, on_spike="skip")  # same clip, other policy
    skipped = new.load_state_dict(state, strict=False)
    assert skipped == ["decision", "controller"]
    assert new.steps == 5
    for k, v in old.clip.state.items():  # the ZScore statistics came across
        assert torch.equal(new.clip.state[k], v)
    assert new.grad_spike.count == old.grad_spike.count == 5
    other = stepped_guard(model, clip=gg.clip.GlobalNorm(1.0), on_spike="skip")
    assert other.load_state_dict(state, strict=False) == ["clip", "decision", "controller"]
    assert other.steps == 5


def test_state_from_another_format_version_names_the_fix():
    model = small_mlp()
    state = stepped_guard(model).state_dict()
    state["format"] = 2
    state["gradguard"] = "0.0.1"
    with pytest.raises(gg.ConfigError,
                       match=r"format 2 \(gradguard 0.0.1\).*version that saved it"):
        stepped_guard(model).load_state_dict(state)


def test_state_from_another_package_version_with_the_same_format_loads():
    # The format number is the contract: a release that keeps it reads older states.
    model = small_mlp()
    state = stepped_guard(model).state_dict()
    state["gradguard"] = "0.0.9"
    fresh = stepped_guard(model)
    fresh.load_state_dict(state)
    assert fresh.steps == 1


# -- files ---------------------------------------------------------------------------------
def take(step=0):
    model = small_mlp()
    opt = torch.optim.Adam(model.parameters())
    return snap.take(step, model, list(model.parameters()), opt, {"x": torch.ones(2)})


def test_a_failed_snapshot_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "snapshot-000000001.pt"
    snap.save_file(take(1), path)

    def disk_full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        snap.save_file(take(2), path)
    monkeypatch.undo()
    assert snap.load_file(path).step == 1  # the old snapshot, intact
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_load_latest_falls_back_past_a_corrupted_newest_snapshot(tmp_path):
    for step in (100, 200, 300):
        snap.save_file(take(step), tmp_path / f"snapshot-{step:09d}.pt")
    newest = tmp_path / "snapshot-000000300.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    # leftovers of a crash mid-write look nothing like a snapshot name
    (tmp_path / ".snapshot-000000400.pt.k3j2.tmp").write_bytes(b"PK\x03\x04 half a zip")
    path, s = snap.load_latest(tmp_path)
    assert path.name == "snapshot-000000200.pt" and s.step == 200
    with pytest.raises(snap.SnapshotError, match="empty does not exist"):
        snap.load_latest(tmp_path / "empty")
    # Under torch.distributed each rank writes its own files and reads its own back.
    for rank in (0, 1):
        snap.save_file(take(400 + rank), tmp_path / f"snapshot-000000400-rank{rank}.pt")
    assert snap.load_latest(tmp_path)[1].step == 200  # (not another rank's)
    assert snap.load_latest(tmp_path, rank=1)[1].step == 401
    assert snap.load_latest(tmp_path, rank=0)[1].step == 400
    (tmp_path / "ranks").mkdir()
    snap.save_file(take(5), tmp_path / "ranks" / "snapshot-000000005-rank0.pt")
    with pytest.raises(snap.SnapshotError, match="other ranks are there: pass rank="):
        snap.load_latest(tmp_path / "ranks")


def test_guard_snapshots_on_disk_survive_a_corrupted_newest_file(tmp_path):
    model = small_mlp()
    guard = gg.Guard(model, sgd(model, 0.01),
                     rollback=gg.Rollback(every=5, keep=2, dir=str(tmp_path), clean_window=0))
    for s in range(22):  # the snapshot of step 20 is judged by the row of step 21
        guard.optimizer.zero_grad()
        guard.step(backward(model, seed=s))
    guard.close()
    files = sorted(tmp_path.glob("snapshot-*.pt"))
    assert [f.name for f in files] == ["snapshot-000000015.pt", "snapshot-000000020.pt"]
    files[-1].write_bytes(files[-1].read_bytes()[:100])  # truncated
    with pytest.raises(snap.SnapshotError, match="truncated"):
        snap.load_file(files[-1])
    path, s = snap.load_latest(tmp_path)
    assert path == files[0] and s.step == 15


def test_report_reads_a_log_whose_last_line_is_torn(tmp_path):
    log = tmp_path / "r.jsonl"
    model = small_mlp()
    opt = sgd(model, 0.01)
    with gg.Guard(model, opt, log=log, flush_every=1) as guard:
        for s in range(12):
            opt.zero_grad()
            guard.step(backward(model, seed=s, nan=s == 8))
    with open(log, "a") as f:
        f.write('{"type":"step","step":12,"loss":0.4,"grad_no')  # killed mid-write
    s = summarize(log)
    assert s.steps == 12 and s.skipped == 1 and s.events["nonfinite"] == 1

    # A run resumed into the same log starts on a fresh line: its records are not lost.
    model2 = small_mlp()
    opt2 = sgd(model2, 0.01)
    with gg.Guard(model2, opt2, log=log, flush_every=1) as guard:
        opt2.zero_grad()
        guard.step(backward(model2))
    recs = list(gg.read_jsonl(log))
    assert [r["type"] for r in recs].count("meta") == 2
    second = max(i for i, r in enumerate(recs) if r["type"] == "meta")
    assert [r["step"] for r in recs[second:] if r["type"] == "step"] == [0]


def test_periphery_errors_are_gradguard_errors_and_the_builtin_users_catch():
    from gradguard import scenarios
    from gradguard.bench import remedies

    with pytest.raises(gg.UnknownNameError, match="unknown scenario 'nope'; choose from") as e:
        scenarios.get("nope")
    assert isinstance(e.value, KeyError) and isinstance(e.value, gg.GradGuardError)
    assert str(e.value).startswith("unknown scenario")  # not KeyError's quoted repr
    with pytest.raises(KeyError):
        remedies.get("nope")
    with pytest.raises(gg.InputError, match="sparse gradient"):
        emb = torch.nn.Embedding(10, 4, sparse=True)
        guard = gg.Guard(emb, torch.optim.SGD(emb.parameters(), lr=0.1))
        emb(torch.tensor([1, 2])).sum().backward()
        guard.step()


def test_a_snapshot_folder_that_cannot_be_written_fails_at_construction(tmp_path):
    # Found at the first disk snapshot, it would stop training inside guard.step.
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(gg.ConfigError, match=r"cannot hold snapshots: .*FileExistsError"):
        gg.Guard(model, opt, rollback=gg.Rollback(dir=str(tmp_path / "afile")))
    guard = gg.Guard(model, opt, rollback=gg.Rollback(dir=str(tmp_path / "new" / "deep")))
    assert (tmp_path / "new" / "deep").is_dir()  # made, and no probe file left in it
    guard.close()
    left = [p.name for p in (tmp_path / "new" / "deep").iterdir()]
    assert left in ([], [".gradguard-lock"]), left  # (the lock that keeps other guards out)


def test_a_state_must_come_from_the_same_parameters_and_may_move_its_snapshots(tmp_path):
    # The same number of tensors is not the same model: a later rollback would load the
    # other model's weights (or crash on their shapes). Where snapshots are kept is no
    # decision: a resumed run may move them.
    model = small_mlp(width=16)
    state = stepped_guard(model, rollback=gg.Rollback(dir=str(tmp_path / "a"))).state_dict()
    with pytest.raises(gg.ConfigError, match=r"shapes.0.weight: '16×8' → '32×8'"):
        stepped_guard(small_mlp(width=32)).load_state_dict(state)
    moved = gg.Rollback(dir=str(tmp_path / "b"), memory="cpu")
    assert stepped_guard(model, rollback=moved).load_state_dict(state) == []


def test_a_non_strict_load_keeps_the_lr_scale_the_saved_run_needed():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    old = gg.Guard(model, opt, log=None)
    for s in range(20):
        opt.zero_grad()
        loss = backward(model, seed=s)
        if 10 <= s < 13:
            next(model.parameters()).grad[0] = float("nan")
        old.step(loss)
    assert old.lr.scale < 1
    state = old.state_dict()
    old.close()
    new = gg.Guard(model, opt, log=None, policy=gg.Policy(stability=gg.Stability(window=30)))
    assert "controller" in new.load_state_dict(state, strict=False)
    for s in range(20, 25):
        opt.zero_grad()
        info = new.step(backward(model, seed=s))
    assert float(info.lr_scale) == pytest.approx(old.lr.scale)


def test_found_inf_refusal_says_why_the_optimizer_cannot_run_fused():
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=torch.cfloat))
    with pytest.raises(gg.ConfigError, match="Adam has complex parameters"):
        gg.Guard(None, torch.optim.Adam([complex_param]), skip_strategy="found_inf")
    real = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(gg.ConfigError, match="RMSprop does not"):
        gg.Guard(None, torch.optim.RMSprop([real]), skip_strategy="found_inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_found_inf_is_refused_where_torchs_fused_sgd_would_not_train(dtype):
    # torch's fused SGD on a CPU leaves low-precision parameters unchanged: the guard
    # would have skipped nothing and trained nothing. "auto" keeps the user's kernel.
    from gradguard.stepper import _fused_sgd_moves

    model = torch.nn.Linear(32, 1).to(dtype)
    if _fused_sgd_moves(dtype):
        pytest.skip(f"this torch's fused SGD updates {dtype} on a CPU")
    with pytest.raises(gg.ConfigError, match=f"leaves {dtype} parameters unchanged"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), skip_strategy="found_inf")
    w0 = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, log=None)
    loss = model(torch.randn(8, 32, dtype=dtype)).float().pow(2).mean()
    loss.backward()
    guard.step(loss)
    assert not torch.equal(model.weight, w0)
    assert gg.Guard(None, torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1),
                    skip_strategy="found_inf").stepper.strategy == "found_inf"  # fp32: fused


def test_a_snapshot_folder_given_as_a_path_may_move_too(tmp_path):
    from pathlib import Path

    from gradguard.checkpoint import _fields
    model = small_mlp()
    state = stepped_guard(model, rollback=gg.Rollback(dir=Path(tmp_path / "a"))).state_dict()
    moved = gg.Rollback(dir=Path(tmp_path / "b"))
    assert stepped_guard(model, rollback=moved).load_state_dict(state) == []
    # (states saved before dir was kept as a str hold a PosixPath repr)
    assert _fields("Rollback(every=50, dir=PosixPath('/x'))", gg.Rollback) == {
        "every": 50, "dir": "/x"}


def test_snapshots_too_large_to_keep_say_none_go_to_disk_either(tmp_path):
    # memory="auto" that finds no room turns rollback off, and with it the disk
    # snapshots (written from the kept ones): the warning says so.
    model = small_mlp()
    guard = gg.Guard(model, sgd(model), log=None, rollback=gg.Rollback(
        dir=tmp_path / "snaps", device_fraction=1e-12, host_fraction=1e-12))
    guard.step(backward(model))  # (where snapshots live is settled at the first step)
    off = [e for e in guard.recorder.events if e["kind"] == "rollback_off"]
    if guard.store.place != "off":
        pytest.skip("no host memory figure on this machine: 'auto' keeps snapshots")
    assert len(off) == 1 and "no snapshot is written to" in off[0]["message"]
    guard.close()


def test_a_state_saved_behind_a_wrapper_loads_into_the_bare_model():
    # DDP's "module." and torch.compile's "_orig_mod." prefixes read as other parameters:
    # a DDP run resumed on one process was refused (and strict=False dropped the clip).
    model = small_mlp()
    opt = sgd(model)
    wrapped = torch.compile(model)  # (only wrapped: its forward is never run here)
    guard = gg.Guard(wrapped, opt, clip=gg.clip.ZScore(), log=None)
    guard.step(backward(model))
    state = guard.state_dict()
    guard.close()
    bare = gg.Guard(model, opt, clip=gg.clip.ZScore(), log=None)
    assert bare.load_state_dict(state) == []
    bare.close()
    # A state saved before the prefixes were left out (its names carry them) loads too.
    old = {**state, "config": {**state["config"], "shapes": {
        f"_orig_mod.{k}": v for k, v in state["config"]["shapes"].items()}}}
    again = gg.Guard(torch.compile(model), opt, clip=gg.clip.ZScore(), log=None)
    assert again.load_state_dict(old) == []
    again.close()
