"""DDP and FSDP2 on CPU (gloo, 2 processes): every rank decides the same, norms are true."""

import contextlib
import datetime
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch without distributed"),
              pytest.mark.timeout(180)]

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
    # A rank left waiting in a collective fails within a minute instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


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


def _spawn(fn, out: str, *args) -> None:
    """Run ``fn(rank, port, out, *args)`` on every rank; each saves ``out/rank{r}.pt``."""
    try:
        mp.spawn(fn, args=(_free_port(), out, *args), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as e:
        # Seen once in ~100 runs on a loaded 2-core machine: both ranks printed "terminate
        # called without an active exception" (a C++ thread destroyed while joinable, as
        # in torch's process-group teardown) and one died of SIGABRT. Where every rank
        # wrote its results first, the test's work was done and its checks below decide;
        # a rank that did not write them (or wrote them torn) still fails it.
        done = all(os.path.exists(f"{out}/rank{r}.pt") for r in range(WORLD))
        if e.signal_name != "SIGABRT" or not done:
            raise
        warnings.warn(f"a rank aborted at exit after writing its results: {e}", stacklevel=2)


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
        from torch.distributed.algorithms.join import Join

        try:  # (sharded norms cannot be shadowed by a rank that ran out: no Join)
            Join([guard])
        except gg.ConfigError as e:
            results["join_refused"] = str(e)
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
        assert "same number of steps" in res["join_refused"]


def _placement_worker(rank: int, port: int, out: str) -> None:
    import gradguard.snapshot as snap

    _init(rank, port)
    try:
        places, events = [], []
        for short in (False, True):
            if short and rank == 1:  # this rank's node has little free memory left
                snap.host_available_bytes = lambda: 4096
            model = nn.parallel.DistributedDataParallel(_mlp())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            guard = gg.Guard(model, opt, log=None, rollback=gg.Rollback(every=10))
            opt.zero_grad()
            model(torch.randn(8, 784)).square().mean().backward()
            guard.step()
            places.append(guard.store.place)
            events.append([e["message"] for e in guard.recorder.events
                           if e["kind"] == "rollback_off"])
            guard.close()
        torch.save({"places": places, "events": events}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rollback_on_or_off_is_agreed_by_every_rank(tmp_path):
    # Rank 1 alone has too little free memory for snapshots: rollback goes off on every
    # rank (one rank rolling back alone would part the replicas), and says why.
    _spawn(_placement_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert r0["places"] == r1["places"] == ["device", "off"]
    assert r0["events"][0] == r1["events"][0] == []
    assert "another rank has no room" in r0["events"][1][0]
    assert "on this rank" in r1["events"][1][0]


def _loss_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = gg.Guard(model, opt, log=None, on_spike="none", on_loss_spike="skip")
        torch.manual_seed(rank)
        raised, losses = None, []
        for step in range(6):
            opt.zero_grad()
            loss = model(torch.randn(8, 784)).square().mean()
            loss.backward()
            try:
                # Rank 1 leaves its loss out at step 3 (needed for rank 0's log only, say).
                info = guard.step(None if rank == 1 and step == 3 else loss)
            except gg.GuardUsageError as e:
                raised = (step, str(e))
                break
            if step != 3:  # (the guard's loss: the mean of both ranks')
                losses.append((float(loss.detach()), float(info.loss)))
        guard.close()
        # No loss on any rank: nothing to refuse.
        none = gg.Guard(model, opt, log=None)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 784)).square().mean().backward()
            none.step()
        none.close()
        torch.save({"raised": raised, "losses": losses}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_loss_passed_on_some_ranks_only_is_refused_by_every_rank(tmp_path):
    _spawn(_loss_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    # Refused at the same step on both ranks (on a CPU at once; on CUDA when the step's
    # row is read), so neither is left waiting in the next all-reduce.
    assert r0["raised"] is not None and r1["raised"] is not None
    assert r0["raised"][0] == r1["raised"][0] == 3
    assert "on every rank" in r0["raised"][1] and "1 of 2 ranks" in r1["raised"][1]
    for (own0, mean0), (own1, mean1) in zip(r0["losses"], r1["losses"], strict=True):
        assert mean0 == mean1 == pytest.approx((own0 + own1) / 2, rel=1e-6)


def _layout_model(mesh, layout: str) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = _mlp()
    if layout == "plain":
        return model
    if layout == "ignored":  # the head stays a plain tensor the user keeps in sync
        fully_shard(model, mesh=mesh, ignored_params=set(model[4].parameters()))
    elif layout == "shard1":
        fully_shard(model, mesh=mesh,
                    shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    else:  # "fsdp", or "hsdp" on the 2-D mesh (Replicate, Shard(0))
        fully_shard(model, mesh=mesh)
    return model


def _layouts_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from gradguard.snapshot import estimate_bytes

        mesh = init_device_mesh("cpu", (WORLD,))
        hsdp = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
        torch.manual_seed(0)
        x, y = torch.randn(4, 32, 784), torch.randint(0, 10, (4, 32))  # same on both ranks
        res: dict = {}

        # Snapshot size under FSDP2: this rank's shards, before and after the first step.
        model = _layout_model(mesh, "fsdp")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        local = sum(p._local_tensor.numel() * 4 for p in model.parameters())
        res["estimate"] = [(estimate_bytes(list(model.parameters()), opt), 3 * local)]
        nn.functional.cross_entropy(model(x[0]), y[0]).backward()
        opt.step()
        state = sum(v._local_tensor.numel() * v.element_size() if hasattr(v, "_local_tensor")
                    else v.numel() * v.element_size()
                    for st in opt.state.values() for v in st.values())
        res["estimate"].append((estimate_bytes(list(model.parameters()), opt), local + state))

        # AGC and Centralize act per row: a matrix sharded on dim 1 is refused when built.
        res["refused"] = {}
        for clip in (gg.clip.AGC(0.01), gg.clip.Centralize()):
            model = _layout_model(mesh, "shard1")
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            try:
                gg.Guard(model, opt, log=None, clip=clip).close()
            except gg.ConfigError as e:
                res["refused"][type(clip).__name__] = str(e)

        # HSDP and ignored parameters: norms, AGC and clipping as the unsharded model's.
        for layout in ("plain", "hsdp", "ignored"):
            model = _layout_model(hsdp if layout == "hsdp" else mesh, layout)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            clip = [gg.clip.AGC(0.01), gg.clip.GlobalNorm(0.5)]
            guard = gg.Guard(model, opt, log=None, clip=clip, on_spike="none",
                             on_loss_spike="none", distributed=layout != "plain")
            norms = []
            for step in range(len(x)):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[step]), y[step]).backward()
                if layout == "ignored":
                    for p in model[4].parameters():
                        dist.all_reduce(p.grad)
                        p.grad /= WORLD
                info = guard.step()
                norms.append(torch.stack([info.grad_norm, info.clipped_norm]))
            guard.close()
            res[layout] = {"norms": torch.stack(norms), "params": _full(model)}
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """What each rank saw with FSDP2 layouts other than plain Shard(0) (one spawn)."""
    out = tmp_path_factory.mktemp("layouts")
    _spawn(_layouts_worker, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_fsdp2_snapshot_estimate_counts_this_ranks_shards(layouts):
    for res in layouts:
        for estimate, actual in res["estimate"]:
            assert estimate == actual


def test_fsdp2_agc_and_centralize_refuse_a_matrix_sharded_on_dim_1(layouts):
    for res in layouts:
        for name in ("AGC", "Centralize"):
            msg = res["refused"][name]
            assert "'0.weight'" in msg and "Shard(dim=1)" in msg and "dim 0" in msg


@pytest.mark.parametrize("layout", ["hsdp", "ignored"])
def test_hsdp_and_ignored_params_norms_match_the_unsharded_model(layouts, layout):
    # Each tensor's squared norm counts once, not once per rank holding a copy of it.
    for res in layouts:
        plain, other = res["plain"], res[layout]
        torch.testing.assert_close(other["norms"], plain["norms"], rtol=1e-5, atol=1e-6)
        for a, b in zip(other["params"], plain["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _resume_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        from gradguard import snapshot as snap

        folder = os.path.join(out, "snaps")
        if rank == 0:
            os.makedirs(folder, exist_ok=True)
        dist.barrier()
        # Each rank wrote its snapshots at 10, 20, 30; the crash came after rank 0 wrote
        # step 30 and before rank 1 did, and rank 1's step 20 file is corrupted.
        for step in (10, 20, 30):
            if rank == 1 and step == 30:
                continue
            s = snap.Snapshot(step, {"w": torch.full((2,), float(step))}, {}, {})
            path = snap.save_file(s, os.path.join(folder, f"snapshot-{step:09d}-rank{rank}.pt"))
            if rank == 1 and step == 20:
                data = bytearray(path.read_bytes())
                data[: len(data) // 2] = b""  # truncated
                path.write_bytes(bytes(data))
        dist.barrier()
        alone = snap.load_latest(folder, rank=rank)[1].step  # (no collective)
        path, s = snap.load_latest(folder, rank=rank, agree=True)
        torch.save({"step": s.step, "w": s.model["w"], "alone": alone},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_crash_resume_loads_the_same_step_on_every_rank(tmp_path):
    # Each rank took its own newest loadable file: rank 0 step 30, rank 1 step 10 here,
    # and the resumed ranks parted (then hung on their different step counts).
    _spawn(_resume_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert r0["step"] == r1["step"] == 10
    assert torch.equal(r0["w"], r1["w"])
    assert (r0["alone"], r1["alone"]) == (30, 10)  # each its own newest, without agree


def test_fsdp_over_tp_strided_shards_count_as_pieces():
    # FSDP2 over a tensor-parallel layer places it as (_StridedShard, Shard); torch 2.13's
    # _StridedShard.is_shard() is False, so its pieces were undercounted and its squared
    # norm halved (checked on 4 gloo ranks, a (dp=2, tp=2) mesh: 0.2027 against 0.2867).
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

    from gradguard.distributed import _cuts

    assert _cuts(_StridedShard(0, split_factor=2)) and _cuts(Shard(1))
    assert not _cuts(Replicate()) and not _cuts(Partial())


class _LateHead(nn.Module):
    """The test MLP with a second head first used at step ``late`` (an auxiliary task
    switched on): its parameters get their first gradient then."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.aux = _mlp(), nn.Linear(10, 10)

    def forward(self, x: torch.Tensor, late: bool) -> torch.Tensor:
        out = self.body(x)
        return out + 0.1 * self.aux(out) if late else out


def _join_worker(rank: int, port: int, out: str, counts: tuple[int, int], order: str,
                 accum: int = 1) -> None:
    from torch.distributed.algorithms.join import Join

    _init(rank, port)
    try:
        # find_unused_parameters: the head is unused until late.
        model = nn.parallel.DistributedDataParallel(_LateHead(), find_unused_parameters=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        guard = gg.Guard(model, opt, on_spike="none", on_loss_spike="skip",
                         log=f"{out}/log{rank}.jsonl")
        x, y, idx = _data(rank)
        raised, skips, losses, sums = None, [], [], []

        def batch(step: int, spike: bool):
            xb, yb = x[idx[step % STEPS]], y[idx[step % STEPS]]
            return (xb * 30, (yb + 1) % 10) if spike else (xb, yb)

        def epoch(n: int, spike_at: int | None, late_from: int) -> None:
            for step in range(n):
                opt.zero_grad()
                for micro in range(accum):
                    xb, yb = batch(step * accum + micro, step == spike_at)
                    sync = micro == accum - 1
                    with model.no_sync() if not sync else contextlib.nullcontext():
                        loss = nn.functional.cross_entropy(model(xb, step >= late_from), yb)
                        (loss / accum).backward()
                info = guard.step(loss)
                skips.append(bool(info.skipped))
                losses.append((float(loss.detach()), float(info.loss)))
                # (every weight, momentum included through the next step's update)
                sums.append(float(sum(p.double().sum() for p in model.parameters())))

        try:
            with Join([model, guard] if order == "model-first" else [guard, model]):
                epoch(counts[rank], spike_at=35 if rank == 1 else None, late_from=20)
        except gg.GuardUsageError as e:
            raised = str(e)
        after = {"steps": guard.steps, "scale": guard.lr.scale,
                 "params": [p.detach().clone() for p in model.parameters()],
                 "good": [s.step for s in guard.store.good]}
        if raised is None:
            # After the join the guards decide alike again, and the replicas stay equal at
            # every step of an even epoch outside any Join (DDP syncs the weights at the end
            # of each Join, so inside one the check would be DDP's): a loss spike on one
            # rank's batch is skipped by both.
            epoch(30, spike_at=25 if rank == 0 else None, late_from=0)
        guard.close()
        torch.save({"raised": raised, "skips": skips, "losses": losses, "after": after,
                    "sums": sums, "end_steps": guard.steps,
                    "good": [s.step for s in guard.store.good],
                    "events": [(e["kind"], e["step"]) for e in guard.recorder.events]},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("counts", "accum"), [((30, 40), 1), ((0, 12), 1), ((17, 34), 2)],
                         ids=["30-40", "0-12", "accumulate"])
def test_join_with_uneven_inputs_keeps_the_guards_in_step(tmp_path, counts, accum):
    _spawn(_join_worker, str(tmp_path), counts, "model-first", accum)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert r0["raised"] is None and r1["raised"] is None
    short, long = counts
    # While rank 0 was out, rank 1 stepped alone: the guard's loss is its own (no zero
    # from rank 0 in the mean, no "a loss on 1 of 2 ranks" refusal), before that both's.
    for step, (own, agreed) in enumerate(r1["losses"][:long]):
        both = (own + r0["losses"][step][0]) / 2 if step < short else own
        assert agreed == pytest.approx(both, rel=1e-6)
    if long > 35:
        assert r1["skips"][35] and sum(r1["skips"][:long]) == 1
    # After the join, every rank holds the last joiner's weights and guard state, and
    # its rollback history starts from them.
    a0, a1 = r0["after"], r1["after"]
    assert a0["steps"] == a1["steps"] == long
    assert a0["scale"] == a1["scale"]
    for a, b in zip(a0["params"], a1["params"], strict=True):
        assert torch.equal(a, b)
    assert a1["good"] == [long - 1]
    # (a rank that had not stepped takes that snapshot at its first step)
    assert a0["good"] == ([] if short == 0 else [long - 1])
    # The even epoch after it: equal weights after every step (the optimizer's momenta
    # were synced too), both ranks skip rank 0's spike, and the head that got its first
    # gradient while rank 0 was out is no news to rank 0's guard.
    assert r0["sums"][short:] == r1["sums"][long:]
    assert r0["skips"][short:] == r1["skips"][long:]
    assert r0["skips"][short + 25] and r0["end_steps"] == r1["end_steps"] == long + 30
    assert r0["good"] == r1["good"]
    assert ("joined", short) in r0["events"] and ("join_synced", long) in r0["events"]
    assert "joined" not in [k for k, _ in r1["events"]]
    assert [k for k, s in r0["events"] if s >= long and k == "data_shift"] == \
        [k for k, s in r1["events"] if s >= long and k == "data_shift"]


def test_join_with_the_guard_listed_first_is_refused_on_every_rank(tmp_path):
    _spawn(_join_worker, str(tmp_path), (5, 5), "guard-first")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for r in (r0, r1):
        assert r["raised"] is not None and "listed first" in r["raised"]
