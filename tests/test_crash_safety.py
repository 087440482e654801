"""Crash safety: kill -9 a process mid-write, then resume; resuming reproduces decisions."""

import json
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import snapshot as snap
from gradguard.testing import BadBatch, GradFault, Injector, NaNLoss

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster

# Trains with disk snapshots every step and a log flushed every step, resuming from the
# newest loadable snapshot of the previous run, until it is killed.
WRITER = textwrap.dedent("""
    import os
    import sys
    import time
    from pathlib import Path
    import torch
    import gradguard as gg
    from gradguard import snapshot as snap
    from tests.conftest import backward, small_mlp

    torch.set_num_threads(1)
    fsync = os.fsync

    def slow_fsync(fd):  # widen the window between a temp file's write and its rename
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            time.sleep(0.03)
        fsync(fd)

    os.fsync = slow_fsync
    root, run = sys.argv[1], int(sys.argv[2])
    model = small_mlp(width=256, depth=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    start = 0
    if run > 0:
        path, s = snap.load_latest(f"{root}/run{run - 1}")
        snap.restore(s, model, list(model.parameters()), opt)
        start = s.step + 1
    guard = gg.Guard(model, opt, log=f"{root}/run.jsonl", flush_every=1,
                     rollback=gg.Rollback(every=1, keep=3, dir=f"{root}/run{run}",
                                          clean_window=0))
    ready = False
    for k in range(start, 10**9):
        opt.zero_grad()
        guard.step(backward(model, seed=k))
        # Ready once a snapshot is on disk (on a loaded machine the first write can take
        # longer than the parent's shortest wait before the kill).
        if not ready and k > start and any(Path(f"{root}/run{run}").glob("snapshot-*.pt")):
            ready = True
            print("ready", flush=True)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and /proc/self/fd")
def test_killed_writers_leave_loadable_snapshots_and_a_readable_log(tmp_path):
    rng = random.Random(0)
    kills = 4
    for run in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(run)],
                                stdout=subprocess.PIPE, cwd=ROOT)
        assert proc.stdout.readline().strip() == b"ready", f"writer {run} did not start"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

        folder = tmp_path / f"run{run}"
        names = sorted(p.name for p in folder.iterdir())
        finished = [n for n in names if n.startswith("snapshot-") and n.endswith(".pt")]
        # Anything else is an unfinished temp file, which never matches a snapshot name
        # (or the lock that keeps another open guard's snapshots out of the dir).
        assert all(n.startswith(".snapshot-") and n.endswith(".tmp")
                   for n in names if n not in finished and n != ".gradguard-lock"), names
        # Every finished name is a whole file: rename is atomic, so no torn snapshot exists.
        steps = [snap.load_file(folder / n).step for n in finished]
        path, latest = snap.load_latest(folder)
        assert path.name == finished[-1] and latest.step == max(steps)
        # (A writer that could not load the previous run's newest snapshot never got
        # ready: load_latest raised in it.)

    # The log: every line but a torn last one per killed run parses, and every run's
    # records (its meta line first) are there, even after a torn line.
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    bad = 0
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            bad += 1
    assert bad <= kills
    recs = list(gg.read_jsonl(tmp_path / "run.jsonl"))
    assert sum(r["type"] == "meta" for r in recs) == kills
    assert sum(r["type"] == "step" for r in recs) >= 2 * kills


# -- resume reproduces the same decisions ------------------------------------------------
def model_for(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=gen)
    return x, x[:, :4].argmax(1)


# Three NaN steps in a row are instability (rollback, LR scale lowered); isolated NaN steps
# and bad batches are skipped. The state saved mid-run holds a lowered LR scale, the
# controller's loss history and memory, and spike statistics.
FAULTS = lambda: [GradFault("nan", at=[12, 13, 14, 41]), NaNLoss(at=[44]),  # noqa: E731
                  BadBatch(factor=300.0, at=[20, 24, 27, 47, 50])]


def make(seed, opt_name):
    model = model_for(seed)
    if opt_name == "adamw":  # fused: the found_inf path, LR scale on the device
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:  # masked path: the LR scale reaches the optimizer one step late, via the host
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, clip=[gg.clip.ZScore(warmup=5), gg.clip.Quantile(history=8)])
    return model, opt, guard


def steps(model, opt, guard, first, last):
    inj = Injector(model, opt, FAULTS(), seed=0)
    out = []
    for k in range(first, last):
        x, y = inj.batch(k, batch(k))
        opt.zero_grad(set_to_none=True)
        loss = inj.loss(k, nn.functional.cross_entropy(model(x), y))
        loss.backward()
        inj.after_backward(k)
        info = guard.step(loss)
        d = info.to_dict()
        out.append((k, d["skipped"], d["lr_scale"], d["grad_norm"], d["clipped_norm"],
                    d["grad_spike"], d["loss_spike"]))
    # repr, so that NaN norms on the faulty steps compare equal
    return [repr(o) for o in out]


@pytest.mark.parametrize("opt_name", ["adamw", "rmsprop"])
def test_resume_from_state_dicts_reproduces_decisions_and_params(tmp_path, opt_name):
    n, m = 30, 30
    model, opt, guard = make(0, opt_name)
    steps(model, opt, guard, 0, n)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "guard": guard.state_dict()}, tmp_path / "ckpt.pt")
    assert guard.state_dict()["lr"]["scale"] < 1  # there is LR-control state to keep
    straight = steps(model, opt, guard, n, n + m)

    # "Crash": new process state, fresh objects from another init, restored from disk.
    model2, opt2, guard2 = make(123, opt_name)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    guard2.load_state_dict(ckpt["guard"])
    resumed = steps(model2, opt2, guard2, n, n + m)

    assert resumed == straight
    assert "True" in straight[11] and "0.1" in straight[11]  # step 41: skipped, still ×0.1
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    for sa, sb in zip(opt.state.values(), opt2.state.values(), strict=True):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


def test_a_disk_snapshot_resumes_the_guard_exactly_after_a_crash(tmp_path):
    # A disk snapshot holds the guard's whole state as of its step: a run restored from
    # it (model, optimizer, guard) decides and trains as the uninterrupted run, with the
    # LR scale the guard had lowered (a fresh guard would start again at ×1).
    def build(seed):
        model = model_for(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, gg.Guard(model, opt, rollback=gg.Rollback(every=10, dir=tmp_path))

    model, opt, guard = build(0)
    straight = steps(model, opt, guard, 0, 65)
    crashed = tmp_path / "crashed"  # the folder as a crash at step 64 leaves it (the
    # snapshot of step 60 goes to disk once judged calm, at step 68)
    shutil.copytree(tmp_path, crashed, ignore=shutil.ignore_patterns("crashed"))
    straight += steps(model, opt, guard, 65, 90)
    _, s = snap.load_latest(crashed)
    assert s.step == 50 and s.state is not None and s.state["lr"]["scale"] < 1

    model2, opt2, guard2 = build(123)
    snap.restore(s, model2, list(model2.parameters()), opt2)
    guard2.load_state_dict(s.state)
    resumed = steps(model2, opt2, guard2, s.step + 1, 90)
    assert resumed == straight[s.step + 1:]
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    guard.close()
    guard2.close()


def test_a_full_disk_turns_disk_snapshots_off_and_training_goes_on(tmp_path, monkeypatch):
    import errno

    from gradguard import snapshot

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writes = []

    def full(snap_, path):
        writes.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(snapshot, "save_file", full)
    guard = gg.Guard(model, opt, rollback=gg.Rollback(every=5, dir=tmp_path))
    x = torch.randn(32, 4)
    y = x.sum(1, keepdim=True)
    with pytest.warns(gg.GuardUsageWarning, match="No space left.*disk snapshots are off"):
        for _ in range(40):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
    guard.close()
    assert len(writes) == 1  # not tried again on every snapshot
    assert guard.store.good  # kept in memory all the same
    assert any(e["kind"] == "rollback_off" and "No space left" in e["message"]
               for e in guard.recorder.events)


def test_a_snapshot_dir_another_open_guard_writes_to_is_warned_about(tmp_path):
    # Two guards on one dir write snapshot files of the same names and prune each other's.
    def guard():
        model = torch.nn.Linear(3, 1)
        return gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        rollback=gg.Rollback(every=5, dir=tmp_path))

    first = guard()
    with pytest.warns(gg.GuardUsageWarning, match="in use by another open guard"):
        second = guard()
    second.close()
    first.close()
    import warnings

    with warnings.catch_warnings():  # once the other is closed, the dir is free
        warnings.filterwarnings("error", message=".*in use by another open guard")
        guard().close()
