import copy
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.conftest import backward, no_host_sync, small_mlp

OPTIMIZERS = {
    "sgd": lambda p, **k: torch.optim.SGD(p, lr=0.1, **k),
    "sgd_momentum": lambda p, **k: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, **k),
    "adam": lambda p, **k: torch.optim.Adam(p, lr=1e-2, **k),
    "adamw": lambda p, **k: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, **k),
    "rmsprop": lambda p, **k: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, **k),
}
# (strategy asked for, extra optimizer kwargs): auto fuses torch's own optimizers;
# foreach=True keeps them unfused, which forces the masked strategy.
STRATEGIES = {"auto": {}, "masked": {"foreach": True}}


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_identical(before, model, opt):
    params, state = before
    for a, b in zip(params, model.parameters(), strict=True):
        assert torch.equal(a, b)
    now = opt.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for k, s in state["state"].items():
        assert s.keys() == now["state"][k].keys()
        for name, v in s.items():
            w = now["state"][k][name]
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(w)), (k, name)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "rmsprop"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("first_step_bad", [False, True])
def test_skipped_step_leaves_state_bit_identical(name, strategy, first_step_bad):
    model = small_mlp()
    opt = OPTIMIZERS[name](model.parameters(), **STRATEGIES[strategy])
    guard = gg.Guard(model, opt, clip=[], skip_strategy=strategy)
    if not first_step_bad:
        for s in range(3):
            opt.zero_grad()
            guard.step(backward(model, seed=s))
    before = snapshot(model, opt)
    opt.zero_grad()
    info = guard.step(backward(model, nan=True))
    assert info.skipped and info.nonfinite
    assert_identical(before, model, opt)
    # and the next good step trains as usual
    opt.zero_grad()
    assert not guard.step(backward(model, seed=9)).skipped
    assert any(not torch.equal(a, b) for a, b in zip(before[0], model.parameters(), strict=True))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_guarded_good_steps_match_plain_optimizer(name):
    """With nothing to clip or skip, the guarded run is the plain run (masked path)."""
    a, b = small_mlp(), small_mlp()
    oa = OPTIMIZERS[name](a.parameters(), foreach=True)
    ob = OPTIMIZERS[name](b.parameters(), foreach=True)
    guard = gg.Guard(a, oa, clip=[], skip_strategy="masked")
    for s in range(4):
        oa.zero_grad()
        ob.zero_grad()
        guard.step(backward(a, seed=s))
        backward(b, seed=s)
        ob.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_nonfinite_loss_alone_skips():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt)
    backward(model)
    before = [p.detach().clone() for p in model.parameters()]
    info = guard.step(torch.tensor(float("nan")))
    assert info.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("strategy", ["auto", "masked"])
def test_no_host_sync_in_step(strategy):
    model = small_mlp()
    kw = STRATEGIES[strategy]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **kw)
    guard = gg.Guard(model, opt, clip=[gg.clip.ZScore(warmup=3), gg.clip.Quantile(history=8),
                                       gg.clip.AGC(), gg.clip.Value(5.0)],
                     skip_strategy=strategy)
    opt.zero_grad()
    guard.step(backward(model))  # creates optimizer state (the one documented host read)
    for s in range(8):
        opt.zero_grad()
        loss = backward(model, seed=s, nan=(s == 5))
        with no_host_sync():
            info = guard.step(loss)
    assert guard.skipped == 1
    assert not info.skipped


def test_fused_conversion_only_when_user_left_it_open():
    m = small_mlp()
    opt = torch.optim.Adam(m.parameters())
    assert gg.Guard(m, opt).stepper.strategy == "found_inf"
    assert opt.param_groups[0]["fused"] is True
    opt2 = torch.optim.Adam(m.parameters(), foreach=False)
    assert gg.Guard(m, opt2).stepper.strategy == "masked"
    assert opt2.param_groups[0]["fused"] is None
    with pytest.raises(gg.ConfigError, match="found_inf"):
        gg.Guard(m, torch.optim.RMSprop(m.parameters()), skip_strategy="found_inf")


# What the README's optimizer table promises, for every optimizer torch ships.
TABLE = {"SGD": "found_inf", "Adam": "found_inf", "AdamW": "found_inf", "Adagrad": "found_inf",
         "Adadelta": "masked", "Adafactor": "masked", "Adamax": "masked", "ASGD": "masked",
         "Muon": "masked", "NAdam": "masked", "RAdam": "masked", "RMSprop": "masked",
         "Rprop": "masked", "LBFGS": "refused", "SparseAdam": "refused"}
TORCH_OPTIMIZERS = sorted(n for n in dir(torch.optim)
                          if isinstance(getattr(torch.optim, n), type)
                          and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
                          and n != "Optimizer")


def test_the_table_covers_every_torch_optimizer_and_the_readme_lists_them():
    from pathlib import Path

    assert set(TORCH_OPTIMIZERS) <= set(TABLE), set(TORCH_OPTIMIZERS) - set(TABLE)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("| optimizer | how a step is skipped")[1].split("\n\n")[0]
    for name in TORCH_OPTIMIZERS:
        assert f"`{name}`" in section, name


def params_for(name, model):
    """The parameters optimizer ``name`` can take (Muon: matrices only; the rest frozen)."""
    params = list(model.parameters())
    if name == "Muon":
        for p in params:
            p.requires_grad_(p.dim() == 2)
        params = [p for p in params if p.dim() == 2]
    return params


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_every_torch_optimizer_skips_a_nan_step_exactly_or_is_refused(name):
    model = small_mlp()
    params = params_for(name, model)
    cls = getattr(torch.optim, name)
    if TABLE[name] == "refused":
        with pytest.raises(gg.ConfigError, match=r"closure|sparse gradients"):
            gg.Guard(model, cls(params, lr=0.01))
        return
    opt = cls(params, lr=0.01)
    guard = gg.Guard(model, opt)
    assert guard.stepper.strategy == TABLE[name]
    for s in range(2):
        opt.zero_grad()
        guard.step(backward(model, seed=s))
    before = snapshot(model, opt)
    opt.zero_grad()
    assert bool(guard.step(backward(model, seed=3, nan=True)).skipped)
    assert_identical(before, model, opt)


@pytest.mark.cpu_host
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_on_a_cpu_the_users_optimizer_runs_as_built_and_unskipped_steps_are_the_plain_ones(
        name):
    # On a CPU reading the skip flag costs nothing, so the guard does not switch kernels:
    # a fused kernel rounds differently, and a chaotic run would then differ from the
    # unguarded one although no decision was taken.
    a, b = small_mlp(), small_mlp()
    oa, ob = OPTIMIZERS[name](a.parameters()), OPTIMIZERS[name](b.parameters())
    guard = gg.Guard(a, oa, clip=[])
    assert guard.stepper.strategy == "host"
    assert all(g.get("fused") is None for g in oa.param_groups)
    for s in range(6):
        oa.zero_grad()
        ob.zero_grad()
        if s == 3:  # a NaN step: skipped, nothing changes
            before = snapshot(a, oa)
            assert guard.step(backward(a, nan=True)).skipped
            assert_identical(before, a, oa)
            continue
        guard.step(backward(a, seed=s))
        backward(b, seed=s)
        ob.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    # The user's own fused kernel is theirs: it takes the flag on the device.
    m = small_mlp()
    assert gg.Guard(m, torch.optim.Adam(m.parameters(), fused=True)).stepper.strategy \
        == "found_inf"
    # Asking for the accelerator strategies on a CPU still gets them.
    m2 = small_mlp()
    assert gg.Guard(m2, torch.optim.SGD(m2.parameters()), skip_strategy="found_inf") \
        .stepper.strategy == "found_inf"


def test_a_fused_optimizer_applies_the_spike_clamp_in_its_own_kernel():
    # Under "found_inf" the clamp's factor rides in as grad_scale (no separate multiply):
    # the update and the stored gradients are the clamped ones all the same.
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, on_spike="clip", on_loss_spike="none")
    assert guard.stepper.strategy == "found_inf"
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    for k in range(21):
        opt.zero_grad()
        loss = model(x).pow(2).mean() * (1000.0 if k == 20 else 1.0)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        info = guard.step(loss)
    d = info.to_dict()
    assert d["grad_spike"] and not d["skipped"] and d["clip_coef"] < 0.01
    for p, g, w in zip(model.parameters(), grads, before, strict=True):
        torch.testing.assert_close(p.grad, g * d["clip_coef"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(p.detach(), w - 0.1 * g * d["clip_coef"], rtol=1e-5,
                                   atol=1e-7)


def test_masked_torch_optimizers_move_their_step_counters_to_the_accelerator(monkeypatch, caplog):
    # On CUDA a CPU step counter cannot be put back on the device, so the guard builds
    # torch's optimizers capturable (tests/test_cuda.py runs them there); here the CPU
    # stands in for a capturable device.
    import torch.optim.optimizer as topt

    monkeypatch.setattr(topt, "_get_capturable_supported_devices", lambda: ["cpu"])
    m = small_mlp()
    opt = torch.optim.RMSprop(m.parameters(), lr=0.01)
    opt.state[next(m.parameters())]["step"] = torch.tensor(3.0)
    with caplog.at_level("INFO", logger="gradguard"):
        guard = gg.Guard(m, opt)
    assert guard.stepper.strategy == "masked"
    assert all(g["capturable"] for g in opt.param_groups)
    assert "capturable=True" in caplog.text
    # Not for optimizers without the mode, nor another package's (a subclass may keep
    # state on the CPU on purpose), nor fused kernels (they take the flag themselves),
    # nor where the flag is read on the host anyway.
    class Mine(torch.optim.RMSprop):
        pass

    Mine.__module__ = "mypackage.optim"
    m2 = small_mlp()
    opt2 = Mine(m2.parameters(), lr=0.01)
    assert gg.Guard(m2, opt2).stepper.strategy == "masked"
    assert not opt2.param_groups[0]["capturable"]
    m4 = small_mlp()
    opt4 = torch.optim.Adam(m4.parameters(), lr=0.01, fused=True)
    gg.Guard(m4, opt4, skip_strategy="masked")
    assert not opt4.param_groups[0]["capturable"]
    m3 = small_mlp()
    opt3 = torch.optim.NAdam(m3.parameters(), lr=0.01)
    gg.Guard(m3, opt3, skip_strategy="host")
    assert not opt3.param_groups[0]["capturable"]


@pytest.mark.parametrize("strategy", ["host", "masked", "found_inf"])
@pytest.mark.parametrize("how", ["unfrozen", "add_param_group", "params_subset"])
def test_a_skipped_step_leaves_unwatched_parameters_as_they_were(strategy, how):
    # The optimizer steps every parameter with a gradient, watched or not: a layer
    # unfrozen after the guard was built, a group added since, the rest of a params=
    # subset. Skipped means skipped whole (found_inf: fused SGD with momentum, whose
    # first-step flag is per group, also needs the unwatched ones' buffers).
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    opt_cls = torch.optim.SGD if strategy == "found_inf" else torch.optim.RMSprop
    kw = {"lr": 1e-2, "momentum": 0.9}
    watched = None
    if how == "add_param_group":
        opt = opt_cls(m[2].parameters(), **kw)
    else:
        opt = opt_cls(m.parameters(), **kw)
        watched = list(m[2].parameters()) if how == "params_subset" else None
    if how != "params_subset":
        m[0].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.GuardUsageWarning)
        guard = gg.Guard(m, opt, skip_strategy=strategy, params=watched, log=None)
        for i in range(12):
            if i == 3:
                m[0].requires_grad_(True)
                if how == "add_param_group":
                    opt.add_param_group({"params": list(m[0].parameters())})
            x = torch.randn(32, 10)
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(x), x.sum(1, keepdim=True))
            loss.backward()
            if i == 8:
                m[2].weight.grad[0, 0] = float("nan")  # in a watched tensor
            before = m[0].weight.detach().clone()
            state = {k: v.clone() for k, v in opt.state[m[0].weight].items()
                     if torch.is_tensor(v)} if i == 8 else {}
            info = guard.step(loss)
            if i == 8:
                assert bool(info.skipped) and torch.equal(before, m[0].weight)
                assert all(torch.equal(v, opt.state[m[0].weight][k]) for k, v in state.items())
        guard.close()
    assert all(torch.isfinite(p).all() for p in m.parameters())
