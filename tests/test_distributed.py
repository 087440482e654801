"""DDP and FSDP2 on CPU (gloo, 2 processes): every rank decides the same, norms are true."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")

WORLD = 2
STEPS = 40
SPIKE_STEP = 25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _data(rank: int):
    from gradguard.scenarios.data import mnist

    x, y = mnist()
    x = (x[:2000] / 255.0 - 0.1307) / 0.3081
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    idx = torch.randint(0, 2000, (STEPS, 32), generator=gen)
    return x, y[:2000], idx


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def _ddp_worker(rank: int, port: int, out: str, sync: bool) -> None:
    _init(rank, port)
    try:
        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        # Gradient spikes are recorded only, loss spikes skip: the loss is the signal that
        # differs between ranks, so it is what must be agreed on.
        guard = gg.Guard(model, opt, on_spike="none", on_loss_spike="skip",
                         distributed=None if sync else False)
        x, y, idx = _data(rank)
        skips = []
        for step in range(STEPS):
            xb, yb = x[idx[step]], y[idx[step]]
            if step == SPIKE_STEP and rank == 1:
                yb = (yb + 1) % 10  # one rank's batch has shifted labels: only its loss spikes
                xb = xb * 30
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            info = guard.step(loss)
            skips.append(bool(info.skipped))
        guard.close()
        calls = guard._sync.calls if guard._sync is not None else 0
        torch.save({"skips": skips, "params": [p.detach().clone() for p in model.parameters()],
                    "calls": calls}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)


@pytest.mark.parametrize("sync", [True, False])
def test_ddp_one_rank_loss_spike_is_skipped_by_every_rank(tmp_path, sync):
    _spawn(_ddp_worker, str(tmp_path), sync)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    if not sync:
        # The failure the all-reduce prevents: rank 1 alone skips, and the replicas part.
        assert r1["skips"][SPIKE_STEP] and not r0["skips"][SPIKE_STEP]
        assert any(not torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))
        return
    assert r0["skips"] == r1["skips"]
    assert r0["skips"][SPIKE_STEP] and sum(r0["skips"]) == 1
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    assert r0["calls"] == STEPS  # one all-reduce per step, flags and statistics together


def _shard_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        guard = gg.Guard(model, opt, log=None)
        x, y, idx = _data(rank)
        for step in range(STEPS):
            xb = x[idx[step]]
            if rank == 1 and 20 <= step < 26:
                xb = torch.full_like(xb, float("nan"))  # a corrupt shard, on one rank only
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), y[idx[step]])
            loss.backward()
            guard.step(loss)
        guard.close()
        torch.save({"data": [e["step"] for e in guard.recorder.events if e.get("data")],
                    "rollbacks": guard.rollbacks, "scale": guard.lr.scale,
                    "params": [p.detach().clone() for p in model.parameters()]},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_a_corrupt_shard_on_one_rank_is_the_datas_on_every_rank(tmp_path):
    # One rank's NaN records reach every rank's gradients through DDP's all-reduce; the
    # data flag is voted on with the guard's own all-reduce, so every rank reads them as
    # the data's: skipped, no rollback, no LR cut, the replicas identical.
    _spawn(_shard_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    # (on a CPU the first NaN step arms the watch)
    assert r0["data"] == r1["data"] == list(range(21, 26))
    assert r0["rollbacks"] == r1["rollbacks"] == 0 and r0["scale"] == r1["scale"] == 1
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


def _fsdp_model(mesh, sharded: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    if sharded:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for p in model.parameters()]


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        x, y, idx = _data(0)  # the same batches on both ranks: FSDP's average is that batch
        results = {}
        for clip in ("norm", "agc"):
            for sharded in (False, True):
                model = _fsdp_model(mesh, sharded)
                opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
                transform = gg.clip.GlobalNorm(0.5) if clip == "norm" else gg.clip.AGC(0.02)
                guard = gg.Guard(model, opt, clip=transform, on_spike="none",
                                 on_loss_spike="none", distributed=None if sharded else False)
                norms, gnorms = [], []
                for step in range(15):
                    opt.zero_grad()
                    xb, yb = x[idx[step]], y[idx[step]]
                    if step == 7:
                        xb = torch.full_like(xb, float("nan"))  # a NaN batch: skipped by both
                    loss = nn.functional.cross_entropy(model(xb), yb)
                    loss.backward()
                    info = guard.step(loss)
                    norms.append(info.norms.clone())
                    gnorms.append(info.clipped_norm.clone())
                guard.close()
                results[(clip, sharded)] = {
                    "norms": torch.stack(norms), "clipped": torch.stack(gnorms),
                    "params": _full(model), "skipped": int(guard.skipped)}
        # Rollback with sharded snapshots: a NaN step (the model's: NaN data is skipped
        # without one) rolls every rank back to its shard of the last good state.
        model = _fsdp_model(mesh, True)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        guard = gg.Guard(model, opt, on_nonfinite="rollback",
                         rollback=gg.Rollback(every=4, clean_window=2))
        at_snapshot = None
        for step in range(13):
            opt.zero_grad()
            xb, yb = x[idx[step]], y[idx[step]]
            # The snapshot after step 8 is kept once rows 9 and 10 (clean_window) were clean.
            loss = nn.functional.cross_entropy(model(xb), yb)
            if step == 11:
                loss = loss * float("nan")
            loss.backward()
            info = guard.step(loss)
            if step == 8:
                at_snapshot = _full(model)
            if info.rolled_back:
                results["rolled_back_at"] = step
                results["restored_equal"] = all(
                    torch.equal(a, b) for a, b in zip(_full(model), at_snapshot, strict=True))
        results["rollbacks"] = guard.rollbacks
        guard.close()
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_norms_clipping_and_rollback_match_the_unsharded_model(tmp_path):
    _spawn(_fsdp_worker, str(tmp_path))
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt")
        for clip in ("norm", "agc"):
            plain, shard = res[(clip, False)], res[(clip, True)]
            assert plain["skipped"] == shard["skipped"] == 1
            ok = torch.isfinite(plain["norms"]).all(dim=1)
            torch.testing.assert_close(shard["norms"][ok], plain["norms"][ok], rtol=1e-5,
                                       atol=1e-6)
            torch.testing.assert_close(shard["clipped"][ok], plain["clipped"][ok], rtol=1e-5,
                                       atol=1e-6)
            for a, b in zip(shard["params"], plain["params"], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert res["rollbacks"] == 1 and res["rolled_back_at"] == 11
        assert res["restored_equal"]  # back to the snapshot taken after step 8
