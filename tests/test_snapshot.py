import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch.nn.utils import prune

from gradguard import snapshot as snap
from tests.conftest import backward, small_mlp


def make_snapshot(step=3, width=16):
    model = small_mlp(width=width)
    opt = torch.optim.Adam(model.parameters())
    backward(model)
    opt.step()
    return snap.take(step, model, list(model.parameters()), opt, {"x": torch.ones(2)}), model, opt


def test_roundtrip_through_disk(tmp_path):
    s, model, _opt = make_snapshot()
    path = snap.save_file(s, tmp_path / "a.pt")
    back = snap.load_file(path)
    assert back.step == 3
    for k, v in s.model.items():
        assert torch.equal(v, back.model[k])
    assert torch.equal(back.guard["x"], torch.ones(2))
    model2 = small_mlp(seed=9)
    opt2 = torch.optim.Adam(model2.parameters())
    snap.restore(back, model2, list(model2.parameters()), opt2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_corrupted_and_truncated_files_are_refused(tmp_path):
    s, *_ = make_snapshot()
    path = snap.save_file(s, tmp_path / "a.pt")
    data = bytearray(path.read_bytes())
    (tmp_path / "trunc.pt").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(snap.SnapshotError, match="truncated"):
        snap.load_file(tmp_path / "trunc.pt")
    # flip bytes inside the payload: the zip may still open, the checksum must not match
    i = data.find(b"PK", 200)
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    with pytest.raises(snap.SnapshotError):
        snap.load_file(tmp_path / "flip.pt")
    assert i != -1
    with pytest.raises(snap.SnapshotError, match="does not exist"):
        snap.load_file(tmp_path / "missing.pt")


def test_a_process_killed_mid_write_leaves_the_previous_snapshot_loadable(tmp_path):
    target = tmp_path / "snap.pt"
    s, *_ = make_snapshot(step=0)
    snap.save_file(s, target)
    writer = textwrap.dedent(f"""
        import torch
        from gradguard import snapshot as snap
        from tests.conftest import small_mlp
        model = small_mlp(width=512, depth=6)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = 1
        print("ready", flush=True)
        while True:
            snap.save_file(snap.take(step, model, list(model.parameters()), opt, {{}}),
                           {str(target)!r})
            step += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE,
                            cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    loaded = snap.load_file(target)  # the last completed write, never a torn one
    assert loaded.step >= 0
    leftovers = [p for p in tmp_path.iterdir() if p.name != "snap.pt"]
    assert all(p.name.endswith(".tmp") for p in leftovers)  # only temp files may remain


def test_a_rollback_leaves_parameters_another_optimizer_updates():
    # One model, two optimizers on disjoint parts, a guard each: a fault in the body rolls
    # the body back, but the head is the other optimizer's (its momentum is not rolled
    # back), so it must stay where it is. Buffers and frozen parameters go back.
    import gradguard as gg

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                            torch.nn.Linear(16, 1))
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    m.register_parameter("frozen", frozen)
    body = [*m[0].parameters(), *m[1].parameters()]
    head = list(m[3].parameters())
    o1 = torch.optim.Adam(body, lr=1e-2)
    o2 = torch.optim.SGD(head, lr=1e-2, momentum=0.9)
    g1, g2 = gg.Guard(m, o1, params=body, log=None), gg.Guard(m, o2, params=head, log=None)
    gen = torch.Generator().manual_seed(1)
    rolled = []
    for i in range(80):
        x = torch.randn(16, 8, generator=gen)
        o1.zero_grad()
        o2.zero_grad()
        loss = (m(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        if i in (60, 61, 62):  # a body-only fault, three steps running: a rollback
            m[0].weight.grad[0, 0] = float("nan")
            with torch.no_grad():
                frozen.fill_(7.0)  # moved behind the optimizer's back: goes back too
        head_before = [p.detach().clone() for p in head]
        running_before = m[1].running_mean.clone()
        if g1.step(loss).rolled_back:
            rolled.append(i)
            for a, b in zip(head_before, head, strict=True):
                assert torch.equal(a, b)
            assert not torch.equal(m[1].running_mean, running_before)
            assert torch.equal(frozen, torch.ones(3))
        g2.step(loss)
    assert rolled


def test_a_snapshot_of_another_model_is_refused():
    s, _model, _opt = make_snapshot()
    other = torch.nn.Module()
    other.body = torch.nn.Linear(8, 4)
    other.extra = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(other.body.parameters(), lr=0.1)  # leaves 'extra' outside
    with pytest.raises(snap.SnapshotError, match="another model"):
        snap.restore(s, other, list(other.body.parameters()), opt)


def _state(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
             for p, st in opt.state.items()}, [dict(g, params=None) for g in opt.param_groups])


def _same(a, b):
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1].keys() == b[1].keys() \
        and all(torch.equal(v, b[1][p][k]) for p, st in a[1].items() for k, v in st.items())


@pytest.mark.parametrize("wrong", ["extras", "other model", "shapes", "pruned"])
def test_a_snapshot_that_does_not_fit_is_refused_before_anything_changes(wrong):
    # torch's load_state_dict loads part of a state and then raises: the model (or the
    # optimizer) would be left half-restored.
    s, model, opt = make_snapshot()
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    extras = []
    if wrong == "extras":  # the snapshot holds a scheduler, restore is given none
        s = snap.take(3, model, list(model.parameters()), opt, {}, [sched])
    elif wrong == "other model":
        model = small_mlp(width=16, depth=4)
        opt = torch.optim.Adam(model.parameters())
    elif wrong == "shapes":
        model = small_mlp(width=32)
        opt = torch.optim.Adam(model.parameters())
    else:  # pruned after the snapshot: weight → weight_orig + weight_mask
        prune.l1_unstructured(model[0], "weight", amount=0.5)
    backward(model, seed=5, d_in=8)
    opt.step()
    before = _state(model, opt)
    with pytest.raises(snap.SnapshotError, match=r"does not fit.*Nothing was restored"):
        snap.restore(s, model, list(model.parameters()), opt, extras)
    assert _same(before, _state(model, opt))


def test_a_wrapped_tracked_scheduler_takes_the_lr_back_with_its_count():
    # accelerate wraps both: the scheduler (.scheduler) and the optimizer (.optimizer).
    # Its count goes back with a rollback, so the LR it set must go back too.
    class Wrapped:
        def __init__(self, inner, optimizer):
            self.scheduler, self.optimizer = inner, optimizer

        def state_dict(self):
            return self.scheduler.state_dict()

        def load_state_dict(self, s):
            self.scheduler.load_state_dict(s)

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    wrapped = Wrapped(sched, type("AcceleratedOptimizer", (), {"optimizer": opt})())
    s = None
    for t in range(6):
        opt.step()
        sched.step()
        if t == 2:
            s = snap.take(t, model, list(model.parameters()), opt, {}, [wrapped])
    snap.restore(s, model, list(model.parameters()), opt, [wrapped])
    assert opt.param_groups[0]["lr"] == 0.5 ** 3 and sched.last_epoch == 3


@pytest.mark.parametrize("to_cpu", [False, True])
def test_a_rollback_returns_low_precision_models_optimizer_state_exactly(to_cpu):
    # torch's load_state_dict casts floating state to the parameter's dtype: NAdam's
    # float32 mu_product (ASGD's eta/mu) must not come back rounded to bfloat16.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).bfloat16()
    for opt in (torch.optim.NAdam(model.parameters(), lr=1e-2),
                torch.optim.ASGD(model.parameters(), lr=1e-2)):
        x = torch.randn(8, 4).bfloat16()

        def step(opt=opt, x=x):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

        for _ in range(3):
            step()
        before = {k: v.clone() for k, v in opt.state[model.weight].items()}
        s = snap.take(3, model, list(model.parameters()), opt, {}, to_cpu=to_cpu)
        for _ in range(3):
            step()
        snap.restore(s, model, list(model.parameters()), opt)
        after = opt.state[model.weight]
        for k, v in before.items():
            assert after[k].dtype == v.dtype, k
            assert torch.equal(after[k], v), k


def test_a_snapshot_of_another_optimizer_or_scheduler_is_refused():
    # An Adam run resumed with SGD: torch would load Adam's groups and state into the SGD,
    # which then fails at its next step (KeyError 'momentum') with the weights overwritten.
    model = small_mlp()
    adam = torch.optim.Adam(model.parameters())
    backward(model)
    adam.step()
    sched = torch.optim.lr_scheduler.StepLR(adam, 10)
    s = snap.take(3, model, list(model.parameters()), adam, {}, [sched])
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(snap.SnapshotError, match=r"another optimizer.*SGD"):
        snap.restore(s, model, list(model.parameters()), sgd,
                     [torch.optim.lr_scheduler.StepLR(sgd, 10)])
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(adam, 10)
    with pytest.raises(snap.SnapshotError, match="another kind of tracked CosineAnnealingLR"):
        snap.restore(s, model, list(model.parameters()), adam, [cosine])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    snap.restore(s, model, list(model.parameters()), adam,
                 [torch.optim.lr_scheduler.StepLR(adam, 10)])  # the same kinds: fine


def test_the_memory_estimate_counts_what_a_snapshot_holds():
    # A frozen backbone and buffers are cloned into every snapshot too: the budget of
    # Rollback(memory="auto") must count them, not only the watched parameters.
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64),
                                torch.nn.Linear(64, 2))
    model[0].requires_grad_(False)
    watched = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(watched, lr=0.1)
    s = snap.take(0, model, watched, opt, {})
    held = sum(v.numel() * v.element_size() for v in s.model.values()
               if isinstance(v, torch.Tensor))
    assert snap.estimate_bytes(watched, opt, model) >= held
    assert snap.estimate_bytes(watched, opt) < held  # (the old count: watched ones only)
