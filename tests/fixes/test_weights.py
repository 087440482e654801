"""Weight constraints, weight normalisation and pruning (gradguard.fixes.weights)."""

import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import fixes, scenarios
from tests.conftest import no_host_sync


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_max_norm_rescales_only_rows_above_the_radius():
    m = mlp()
    with torch.no_grad():
        m[0].weight[:4].mul_(20)  # four rows far outside the ball
    before = m[0].weight.detach().clone()
    norms = before.norm(dim=1)
    mn = fixes.MaxNorm(m, max_norm=2.0, now=False)
    assert mn.report.layers == ["0", "2"] and "4 above" in mn.report.changes[0]
    assert torch.equal(m[0].weight, before)  # now=False: nothing until called
    mn()
    after = m[0].weight.detach().norm(dim=1)
    assert torch.allclose(after[:4], torch.full((4,), 2.0), rtol=1e-5)
    assert torch.equal(m[0].weight[4:], before[4:])  # rows inside the ball untouched
    # the direction of a projected row is kept
    assert torch.allclose(m[0].weight[0] / after[0], before[0] / norms[0], atol=1e-6)
    snapshot = [p.detach().clone() for p in m.parameters()]
    mn()  # a projection is idempotent
    assert all(torch.equal(a, b) for a, b in zip(snapshot, m.parameters(), strict=True))


def test_max_norm_projects_at_construction_by_default_and_handles_conv():
    conv = nn.Conv2d(3, 5, 3)
    with torch.no_grad():
        conv.weight.mul_(50)
    fixes.MaxNorm(conv, 1.0)
    assert conv.weight.flatten(1).norm(dim=1).max().item() == pytest.approx(1.0, rel=1e-5)


def test_constraints_never_read_device_values():
    m = mlp()
    mn, wc = fixes.MaxNorm(m, 0.5), fixes.WeightClip(m, 0.05, bias=True)
    with no_host_sync():
        mn()
        wc()


def test_weight_clip_clamps_weights_and_optionally_biases():
    m = mlp()
    with torch.no_grad():
        m[0].bias.fill_(3.0)
    wc = fixes.WeightClip(m, 0.1)
    assert all(p.abs().max() <= 0.1 for n, p in m.named_parameters() if "weight" in n)
    assert m[0].bias.max().item() == 3.0
    fixes.WeightClip(m, 0.1, bias=True)
    assert m[0].bias.max().item() == pytest.approx(0.1)
    assert "WeightClip(limit=0.1)" in str(wc.report)


def test_bad_constraint_settings_are_config_errors():
    with pytest.raises(gg.ConfigError, match="max_norm"):
        fixes.MaxNorm(mlp(), max_norm=0)
    with pytest.raises(gg.ConfigError, match=r"MaxNorm.*no layer matches \[.nope.\]"):
        fixes.MaxNorm(mlp(), layers=["nope"])
    with pytest.raises(gg.ConfigError, match="list of patterns"):
        fixes.MaxNorm(mlp(), layers="0")
    with pytest.raises(gg.ConfigError, match="limit"):
        fixes.WeightClip(mlp(), limit=-1.0)
    with pytest.raises(gg.ConfigError, match=r"nn\.Module"):
        fixes.MaxNorm("model")


def test_guard_calls_after_step_every_step_skipped_or_not():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    calls = []
    guard = gg.Guard(m, opt, after_step=[lambda: calls.append("a"), lambda: calls.append("b")])
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    for bad in (False, True, False):
        opt.zero_grad()
        loss = nn.functional.mse_loss(m(x), y) * (float("nan") if bad else 1.0)
        loss.backward()
        guard.step(loss)
    guard.close()
    assert calls == ["a", "b"] * 3 and int(guard.skipped) == 1
    with pytest.raises(gg.ConfigError, match="after_step"):
        gg.Guard(m, opt, after_step=3)


def test_max_norm_in_the_guard_trains_the_bad_init_scenario(one_thread):
    # mlp-init (10 ReLU layers, weights 2.5× Kaiming) diverges at lr 0.01 unguarded (see
    # test_init). Rows projected to norm √2 (Kaiming's) at the start and after every step
    # train it; no clipping, only the non-finite skip the guard always does.
    def guard(model, opt, scaler):
        return gg.Guard(model, opt, scaler=scaler, clip=[], on_spike="none", on_loss_spike="none",
                        after_step=fixes.MaxNorm(model, 1.4))

    res = scenarios.run("mlp-init", steps=150, guard=guard)
    assert not res.diverged and res.skipped == 0 and res.final_metric > 0.85


def test_weight_norm_keeps_the_function_and_refuses_a_second_application():
    m = mlp()
    x = torch.randn(5, 8)
    ref = m(x)
    rep = fixes.weight_norm(m)
    assert rep.layers == ["0", "2"] and "g·v/‖v‖" in rep.changes[0]
    assert torch.allclose(m(x), ref, atol=1e-6)
    names = [n for n, _ in m.named_parameters()]
    assert "0.parametrizations.weight.original0" in names  # g
    with pytest.raises(gg.ConfigError, match=r"weight_norm.*already"):
        fixes.weight_norm(m)
    with pytest.raises(gg.ConfigError, match="kind"):
        fixes.weight_norm(mlp(), kind="batch")


def test_spectral_norm_bounds_each_layer_gain_and_skips_zero_layers():
    m = mlp()
    nn.init.zeros_(m[2].weight)  # a zero readout: w/σ would be 0/0
    rep = fixes.weight_norm(m, kind="spectral")
    assert rep.layers == ["0"] and rep.skipped == ["2 (zero weights)"]
    for _ in range(20):  # power iterations run in training-mode forward passes
        m(torch.randn(4, 8))
    sigma = torch.linalg.matrix_norm(m[0].weight.detach(), ord=2).item()
    assert sigma == pytest.approx(1.0, rel=1e-2)


def test_prune_reports_counts_masks_gradients_and_refuses_twice():
    m = mlp()
    small = m[0].weight.detach().abs().flatten().sort().values[:25]
    rep = fixes.prune(m, 0.2)
    assert "26 of 128 weights removed" in rep.changes[0]  # round(0.2 · 128)
    assert rep.changes[-1] == "total: 39 of 192 weights removed"
    assert (m[0].weight == 0).sum().item() == 26
    assert torch.all(m[0].weight.detach().abs().flatten().sort().values[:25] == 0)
    assert small.max() <= m[0].weight.detach().abs().flatten().sort().values[26]
    m(torch.randn(3, 8)).sum().backward()
    assert torch.all(m[0].weight_orig.grad[m[0].weight_mask == 0] == 0)
    with pytest.raises(gg.ConfigError, match=r"prune.*already pruned"):
        fixes.prune(m, 0.2)


def test_permanent_prune_bakes_zeros_in_and_still_refuses_twice():
    m = mlp()
    fixes.prune(m, 0.5, layers=["0"], permanent=True)
    assert not hasattr(m[0], "weight_mask") and isinstance(m[0].weight, nn.Parameter)
    assert (m[0].weight == 0).sum().item() == 64
    with pytest.raises(gg.ConfigError, match="already pruned"):
        fixes.prune(m, 0.5, layers=["0"])
    with pytest.raises(gg.ConfigError, match="weight_norm before"):
        fixes.weight_norm(m)
    for bad in (0, 1, 1.5, "0.2", True):
        with pytest.raises(gg.ConfigError, match="amount"):
            fixes.prune(mlp(), bad)


def test_weight_norm_hands_an_optimizer_built_before_it_the_new_parameters():
    # Without optimizer= the layers' new g and v are in no optimizer: the layer stops
    # training (only the biases moved). With it, everything trains.
    x = torch.randn(16, 4)
    for given in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        fixes.weight_norm(model, optimizer=opt if given else None)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert (moved == set(before)) is given, moved


def test_tied_weights_and_a_bad_dim_are_refused_before_anything_changes():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    tied = nn.Sequential(emb, head)
    for fix in (lambda: fixes.weight_norm(tied), lambda: fixes.prune(tied, 0.3)):
        with pytest.raises(gg.ConfigError, match="tied weights"):
            fix()
        assert head.weight is emb.weight and not hasattr(head, "weight_mask")
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 1))
    with pytest.raises(gg.ConfigError, match="dim=2 is not a dimension of layer '2'"):
        fixes.weight_norm(cnn, dim=2)
    assert not any(hasattr(m, "parametrizations") for m in cnn)


def test_layers_torch_cannot_take_are_refused_before_any_layer_changes():
    # A hook-based (legacy) weight_norm / spectral_norm or a lazy layer last in the model:
    # the earlier layers were pruned, then a raw torch error.
    def legacy(norm, at):
        m = mlp()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (deprecated in torch)
            norm(m[at])
        return m

    for model, words in [(legacy(nn.utils.weight_norm, 2), "'2' has the hook-based "
                          "torch.nn.utils.weight_norm"),
                         (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LazyLinear(2)),
                          "'2' is a lazy layer")]:
        with pytest.raises(gg.ConfigError, match=words):
            fixes.prune(model, 0.5)
        assert not hasattr(model[0], "weight_mask")
        assert not hasattr(model[0], "_gradguard_pruned")
    spec = legacy(nn.utils.spectral_norm, 0)
    with pytest.raises(gg.ConfigError, match=r"'0' has the hook-based torch\.nn\.utils\.spectral"):
        fixes.weight_norm(spec)
    assert not hasattr(spec[2], "parametrizations")
    lazy = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LazyLinear(2))
    for fix in (fixes.weight_norm, fixes.MaxNorm, lambda m: fixes.WeightClip(m, 0.1)):
        with pytest.raises(gg.ConfigError, match=r"'2' is a lazy layer.*forward pass first"):
            fix(lazy)
    # The constraints skip a computed weight (as they skip a parametrised one), and say why.
    mn = fixes.MaxNorm(spec, 2.0)
    assert mn.names == ["2"] and mn.report.skipped[0].startswith("0 (its weight is computed")


def test_patterns_match_the_whole_dotted_name_not_a_substring():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc10, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    assert fixes.weight_norm(Net(), layers=["fc1"]).layers == ["fc1"]
    assert fixes.MaxNorm(Net(), layers=["fc1"]).names == ["fc1"]
    assert fixes.MaxNorm(Net(), layers=["fc1*"]).names == ["fc1", "fc10"]  # a glob is a glob
    torch.manual_seed(0)
    twelve = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    assert fixes.prune(twelve, 0.5, layers=["1"]).layers == ["1"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    assert fixes.WeightClip(nested, 1.0, layers=["*.1"]).names == ["0.1"]
    # Alternatives for several architectures: one pattern may match nothing here...
    assert fixes.MaxNorm(Net(), layers=["fc1", "fc3"]).names == ["fc1"]
    # ...but patterns that select nothing at all are refused, with a hint.
    with pytest.raises(gg.ConfigError, match=r"layer match\w* \['fc3'\]"):
        fixes.MaxNorm(Net(), layers=["fc3"])
    with pytest.raises(gg.ConfigError, match=r"'\*\.1' selects every '1'"):
        fixes.MaxNorm(nested, layers=["1"])
    # A container's name selects every layer inside it.
    assert fixes.WeightClip(nested, 1.0, layers=["0"]).names == ["0.0", "0.1"]
    for bad in ([0], [None], 3):
        with pytest.raises(gg.ConfigError, match="glob patterns"):
            fixes.MaxNorm(mlp(), layers=bad)


def test_frozen_layers_are_left_alone_unless_asked():
    def frozen_backbone():
        m = mlp()
        with torch.no_grad():
            m[0].weight.mul_(50)  # far outside any ball
            m[0].bias.fill_(5.0)
        m[0].requires_grad_(False)
        return m

    m = frozen_backbone()
    before = m[0].weight.detach().clone()
    mn = fixes.MaxNorm(m, 1.0)  # now=True shrank the frozen backbone
    assert torch.equal(m[0].weight, before) and mn.names == ["0", "2"]
    assert "frozen now: left alone until it is unfrozen" in mn.report.changes[0]
    mn()
    assert torch.equal(m[0].weight, before)
    m[0].requires_grad_(True)  # gradual unfreezing: constrained from now on
    mn()
    assert m[0].weight.norm(dim=1).max().item() == pytest.approx(1.0, rel=1e-5)
    m = frozen_backbone()
    fixes.MaxNorm(m, 1.0, frozen=True)
    assert m[0].weight.norm(dim=1).max().item() == pytest.approx(1.0, rel=1e-5)
    m = frozen_backbone()
    fixes.WeightClip(m, 0.1, bias=True)
    assert m[0].bias.max().item() == 5.0 and m[2].bias.abs().max().item() <= 0.1
    rep = fixes.prune(m, 0.5)
    assert rep.layers == ["2"] and not hasattr(m[0], "weight_mask")
    rep = fixes.weight_norm(frozen_backbone(), kind="spectral")
    assert rep.layers == ["2"] and rep.skipped[0].startswith("0 (frozen")
    # BitFit-style: the weight frozen, the bias trained: the weight is still left alone.
    m = mlp()
    m[0].weight.requires_grad_(False)
    assert fixes.prune(m, 0.5).layers == ["2"]
    only_frozen = fixes.MaxNorm(frozen_backbone(), 1.0, layers=["0"])  # (built, idle for now)
    assert only_frozen.names == ["0"]


def test_weight_norm_takes_dim_none_and_negative_dims_as_python_counts_them():
    x = torch.randn(5, 8)
    for dim, g_shape in [(None, ()), (-1, (1, 8)), (1, (1, 8)), (-2, (16, 1))]:
        m = mlp()
        ref = m(x)
        fixes.weight_norm(m, dim=dim)
        assert m[0].parametrizations.weight.original0.shape == g_shape
        assert torch.allclose(m(x), ref, atol=1e-5)
    assert "over the whole tensor" in fixes.weight_norm(mlp(), dim=None).changes[0]
    for bad in ("0", 1.0, True):
        with pytest.raises(gg.ConfigError, match="dim must be an int"):
            fixes.weight_norm(mlp(), dim=bad)
