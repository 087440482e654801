"""The guard on a CUDA device: what only a GPU can show (skipped where there is none).

CI has no GPU; run these where one is (``make gpu-check``). CUDA's sync debug mode makes
every blocking device→host transfer an error, so a pass proves the hot path never stalls
the loop, with the real fused optimizer kernels, pinned-memory rows and GradScaler.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from tests import test_resume, test_stepper

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (make gpu-check on a machine with one)",
                allow_module_level=True)
pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")


@contextlib.contextmanager
def syncs_are_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4)).to(DEV)


def batches(n: int, nan: set[int], spike: set[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator(device=DEV).manual_seed(7)
    out = []
    for k in range(n):
        x = torch.randn(32, 16, device=DEV, generator=gen)
        y = x[:, :4].argmax(1)
        if k in spike:
            x = x * 300.0
        if k in nan:
            x[0, 0] = float("nan")
        out.append((x, y))
    return out


CONFIGS = {
    "default-adamw": lambda m: gg.Guard(m, torch.optim.AdamW(m.parameters(), lr=1e-3)),
    "default-sgd": lambda m: gg.Guard(m, torch.optim.SGD(m.parameters(), lr=0.05,
                                                         momentum=0.9)),
    "full-adam": lambda m: gg.Guard(m, torch.optim.Adam(m.parameters(), lr=1e-3),
                                    clip=[gg.clip.AGC(), gg.clip.ZScore()],
                                    rollback=gg.Rollback(every=10)),
    "masked-rmsprop": lambda m: gg.Guard(m, torch.optim.RMSprop(m.parameters(), lr=1e-3)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_faulty_training_loop_on_cuda_never_blocks_on_the_device(name):
    model = mlp()
    guard = CONFIGS[name](model)
    # NaN records (the data's: skipped) and NaN born in the loss (instability: rolled back)
    data = batches(160, nan={100, 101, 102, 103}, spike={70, 130})
    boom = {40, 41, 42, 43, 44, 45}
    opt = guard.optimizer
    for k, (x, y) in enumerate(data):
        # The first step creates the optimizer's state: the one documented host read.
        with syncs_are_errors() if k else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y) * (math.nan if k in boom else 1.0)
            loss.backward()
            guard.step(loss)
    guard.close()
    assert int(guard.skipped) >= 10  # every NaN step, at least
    assert all(torch.isfinite(p).all() for p in model.parameters())
    kinds = {e["kind"] for e in guard.recorder.events}
    assert "nonfinite" in kinds
    # (watched from the first step on CUDA: every NaN record is the data's)
    assert [e["step"] for e in guard.recorder.events if e.get("data")] == [100, 101, 102, 103]
    if name == "full-adam":
        assert guard.rollbacks >= 1


class _GRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(16, 32, batch_first=True)
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(x)[0][:, -1])


def test_a_recurrent_model_is_clipped_on_cuda_without_a_sync():
    # Policy.clip_recurrent: the clip to 3x the typical norm is one more device factor.
    # (Only guard.step is watched: what cuDNN's RNN does is not the guard's.)
    torch.manual_seed(0)
    model = _GRU().to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    guard = gg.Guard(model, opt)
    gen = torch.Generator(device=DEV).manual_seed(3)
    for k in range(120):
        x = torch.randn(16, 10, 16, device=DEV, generator=gen) * (8.0 if k % 9 == 5 else 1.0)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), x[:, -1, :4].argmax(1))
        loss.backward()
        with syncs_are_errors() if k else contextlib.nullcontext():
            guard.step(loss)
    guard.close()
    assert guard._device.clip_ratio == 3.0 and guard._host.recurrent == ["gru"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "recurrent layers (gru)" in guard.verdict()


# torch's optimizers, except the two the guard refuses (LBFGS, SparseAdam).
TORCH_OPTIMIZERS = [n for n in test_stepper.TORCH_OPTIMIZERS
                    if test_stepper.TABLE.get(n) != "refused"]
# A CPU step counter and no capturable mode (Adagrad's own update reads it on the host):
# each step reads the skip flag on the host, and the guard says so once.
HOST_DECIDED = {"Adagrad", "Adafactor"}


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_every_torch_optimizer_on_cuda_skips_exactly_and_without_a_sync_where_it_can(
        name, caplog):
    model = mlp()
    opt = getattr(torch.optim, name)(test_stepper.params_for(name, model), lr=1e-2)
    guard = gg.Guard(model, opt)
    data = batches(4, nan={2}, spike=set())

    def quiet():
        return contextlib.nullcontext() if name in HOST_DECIDED else syncs_are_errors()

    def step(k):
        opt.zero_grad(set_to_none=True)
        x, y = data[k]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return guard.step(loss)

    step(0)
    step(1)  # state exists from here on: no host read is documented after it
    before = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in enumerate(opt.state.values())}
    with quiet():
        info = step(2)
    assert bool(info.skipped)
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            assert torch.equal(v, state[i][k]) if torch.is_tensor(v) else v == state[i][k], k
    with quiet():
        info = step(3)
    assert not bool(info.skipped)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    if guard.stepper.strategy == "masked" and "capturable" in opt.defaults:
        # the step counters moved to the device
        assert all(g["capturable"] for g in opt.param_groups)
    warned = "waits for the device" in caplog.text
    assert warned == (name in HOST_DECIDED), caplog.text
    guard.close()


@pytest.mark.parametrize("name", ["RMSprop", "NAdam", "RAdam", "Adamax", "ASGD", "Rprop",
                                  "Adadelta"])
def test_the_capturable_switch_trains_as_the_users_optimizer(name):
    # capturable=True is the same update with the scalars on the device; only the
    # rounding of the bias corrections differs (RAdam on an H200: 5 of 1024 weights apart
    # by at most 2.1e-6 after 30 steps of lr 1e-3).
    a, b = mlp(), mlp()
    oa = getattr(torch.optim, name)(a.parameters(), lr=1e-3)
    ob = getattr(torch.optim, name)(b.parameters(), lr=1e-3)
    guard = gg.Guard(a, oa, clip=[])
    assert all(g["capturable"] for g in oa.param_groups)
    assert not any(g["capturable"] for g in ob.param_groups)
    for x, y in batches(30, nan=set(), spike=set()):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            guard.step(loss) if m is a else o.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    guard.close()


def test_an_optimizer_state_loaded_after_the_guard_is_made_capturable_again():
    # Resuming from an unguarded run's checkpoint brings capturable=False and CPU step
    # counters back; the next masked step switches again instead of syncing every step.
    plain_model = mlp()
    plain = torch.optim.RMSprop(plain_model.parameters(), lr=1e-3)
    data = batches(4, nan={3}, spike=set())
    x, y = data[0]
    nn.functional.cross_entropy(plain_model(x), y).backward()
    plain.step()
    assert plain.state[next(plain_model.parameters())]["step"].device.type == "cpu"

    model = mlp()
    model.load_state_dict(plain_model.state_dict())
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt)
    opt.load_state_dict(plain.state_dict())
    assert not opt.param_groups[0]["capturable"]
    for k in (1, 2, 3):
        opt.zero_grad(set_to_none=True)
        x, y = data[k]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        with syncs_are_errors() if k > 1 else contextlib.nullcontext():
            info = guard.step(loss)
    assert bool(info.skipped) and opt.param_groups[0]["capturable"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(s["step"].device.type == "cuda" for s in opt.state.values())
    guard.close()


def test_lightning_16_mixed_on_cuda_skips_the_bad_batches():
    pl = pytest.importorskip("lightning.pytorch")
    from gradguard.integrations.lightning import GradGuardCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

        def training_step(self, batch, _idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=gen)
    y = x[:, :4].argmax(1)
    for b in (10, 30):  # a few broken records in two batches
        x[b * 64:b * 64 + 4] = math.nan
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    module, cb = Module(), GradGuardCallback()
    pl.Trainer(callbacks=[cb], accelerator="gpu", devices=1, precision="16-mixed",
               max_epochs=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
    guard = cb.guard
    assert guard.steps == 32
    assert all(torch.isfinite(p).all() for p in module.parameters())
    skipped = {e["step"] for e in guard.recorder.events if e["action"] == "skip"}
    assert {10, 30} <= skipped
    net = module.net.cpu()  # (Lightning's teardown has already moved it back)
    with torch.no_grad():
        acc = (net(x[2048 - 512:]).argmax(1) == y[2048 - 512:]).float()
    assert acc.mean() > 0.4  # chance is 0.25


def test_fp16_autocast_with_grad_scaler_on_cuda():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    guard = gg.Guard(model, opt, scaler=scaler)
    data = batches(40, nan=set(), spike=set())
    for k, (x, y) in enumerate(data):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if k == 20:  # an fp16 overflow in one gradient
            next(iter(model.parameters())).grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            scale = scaler.get_scale()
        with syncs_are_errors() if k > 1 else contextlib.nullcontext():
            info = guard.step(loss)
        if k == 20:
            assert bool(info.skipped)
            assert all(torch.equal(a, b)
                       for a, b in zip(before, model.parameters(), strict=True))
            assert scaler.get_scale() == scale * 0.5
        elif k > 1:
            assert not bool(info.skipped)
            assert float(info.grad_norm) < 100  # measured unscaled: loss scale 4096
    guard.close()


def test_resume_on_cuda_decides_and_trains_identically(tmp_path, monkeypatch):
    # The CPU resume test, on the GPU: rows reach the host two steps late there, so the
    # pending rows are part of what a checkpoint must carry.
    def make(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).to(DEV)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        guard = gg.Guard(model, opt, rollback=gg.Rollback(every=10),
                         policy=gg.Policy(stability=gg.Stability(probe_after=100)))
        return model, opt, guard

    cpu_batch = test_resume.batch
    monkeypatch.setattr(test_resume, "batch",
                        lambda k: tuple(t.to(DEV) for t in cpu_batch(k)))
    run = test_resume.run
    model, opt, guard = make(0)
    run(model, opt, guard, 0, test_resume.SAVE)
    assert guard.rollbacks >= 1
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "guard": guard.state_dict(snapshots=True)}, tmp_path / "ckpt.pt")
    straight = run(model, opt, guard, test_resume.SAVE, test_resume.STEPS)

    model2, opt2, guard2 = make(123)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    guard2.load_state_dict(ckpt["guard"])
    resumed = run(model2, opt2, guard2, test_resume.SAVE, test_resume.STEPS)
    assert resumed == straight
    assert guard.rollbacks == guard2.rollbacks >= 2
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    guard.close()
    guard2.close()


def test_two_cuda_runs_make_the_same_decisions():
    # Rows reach the host at a fixed lag, not whenever the device gets there: the host's
    # decisions do not depend on timing.
    def once():
        model = mlp(3)
        guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                         rollback=gg.Rollback(every=10))
        for x, y in batches(150, nan={30, 31, 32, 33, 34, 35}, spike={60, 61, 90}):
            guard.optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            guard.step(loss)
        guard.close()
        return ([(e["kind"], e["step"]) for e in guard.recorder.events],
                [p.detach().cpu() for p in model.parameters()])

    (ev1, p1), (ev2, p2) = once(), once()
    assert ev1 == ev2 and len(ev1) > 0
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
