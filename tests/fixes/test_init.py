import dataclasses
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import fixes, scenarios


def test_auto_picks_by_following_activation():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.Tanh(),
                      nn.Linear(256, 10))
    rep = fixes.reinit(m)
    assert rep.layers == ["0", "2", "4"]
    assert "Kaiming" in rep.changes[0] and "Xavier" in rep.changes[1]
    assert m[0].weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.1)
    assert m[2].weight.std().item() == pytest.approx(5 / 3 * (2 / 512) ** 0.5, rel=0.1)
    assert torch.all(m[0].bias == 0)


def test_second_application_changes_nothing_unless_forced():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    fixes.reinit(m)
    before = [p.clone() for p in m.parameters()]
    rep = fixes.reinit(m)
    assert rep.layers == [] and [s.split(" ")[0] for s in rep.skipped] == ["0", "2"]
    assert "force=True does it again" in rep.skipped[0]  # (the reason, not just the name)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert fixes.reinit(m, force=True).layers == ["0", "2"]


def test_rnn_radius_and_residual_scaling():
    rnn = nn.RNN(4, 32)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(5)
    fixes.reinit(rnn, rnn_radius=0.9)
    assert fixes.spectral_radius(rnn.weight_hh_l0) == pytest.approx(0.9, rel=1e-4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 64)
            self.act = nn.GELU()
            self.c_proj = nn.Linear(64, 16)

    torch.manual_seed(0)
    m = nn.Sequential(*[Block() for _ in range(8)])
    rep = fixes.reinit(m, residual=["*.c_proj"])
    assert "1/sqrt(2·8)" in str(rep)
    plain = nn.Linear(64, 16)
    nn.init.xavier_normal_(plain.weight)
    ratio = m[0].c_proj.weight.std() / plain.weight.std()
    assert ratio.item() == pytest.approx(1 / 4, rel=0.15)


def test_reinit_turns_the_bad_init_scenario_from_diverging_to_training():
    scn = scenarios.get("mlp-init")
    plain = scenarios.run(scn, steps=150)
    assert plain.diverged

    def build(seed):
        s = scn.build(seed)
        fixes.reinit(s.model)
        return s

    fixed = scenarios.run(dataclasses.replace(scn, build=build), steps=150)
    assert not fixed.diverged and fixed.final_metric > 0.85


def test_bad_scheme_is_config_error():
    with pytest.raises(gg.ConfigError, match="scheme"):
        fixes.reinit(nn.Linear(2, 2), scheme="he")


def test_layers_whose_weight_cannot_be_reinitialised_in_place_are_named_not_faked():
    torch.manual_seed(0)
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), normed, nn.ReLU(), nn.Linear(8, 2))
    before = normed.weight.detach().clone()
    report = fixes.reinit(model, "auto")
    assert report.layers == ["4"]  # the one plain layer
    assert any(s.startswith("0 (lazy") for s in report.skipped)
    assert any(s.startswith("2 (its weight is computed") for s in report.skipped)
    assert torch.equal(normed.weight, before)  # untouched, and said so
    other = nn.Sequential(nn.ConvTranspose2d(3, 3, 2), nn.MultiheadAttention(8, 2),
                          nn.Embedding(10, 8))
    skipped = fixes.reinit(other, "auto").skipped
    assert [s.split(" ")[0] for s in skipped] == ["0", "1"]  # not the embedding table


def test_the_doctor_runs_on_a_model_with_a_lazy_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    with torch.no_grad():  # a bad init, so the doctor tries a re-initialised copy
        model[2].weight.mul_(30)
        model[4].weight.mul_(30)
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    d = gg.doctor.diagnose(model, (x, y), nn.functional.cross_entropy,
                           torch.optim.SGD(model.parameters(), lr=0.01), lr_iters=10,
                           trial_steps=10)
    assert d.findings is not None
    assert nn.parameter.is_lazy(model[0].weight)  # the user's model is left as it was


def test_reinit_takes_one_pattern_refuses_none_matching_and_changes_all_or_nothing(
        monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("enc", nn.Linear(4, 8))
    model.add_module("act", nn.ReLU())
    model.add_module("fc1", nn.Linear(8, 2))
    # A string is one pattern, not a list of its letters ("c" would match "enc").
    assert fixes.reinit(model, layers="fc1").layers == ["fc1"]
    assert fixes.reinit(model, layers=[]).layers == []  # (a computed list, empty: no-op)
    assert fixes.reinit(model, layers=iter(["enc"]), force=True).layers == ["enc"]
    with pytest.raises(gg.ConfigError, match=r"no layer matches \['nomatch'\]"):
        fixes.reinit(model, layers=["nomatch"])
    with pytest.raises(gg.ConfigError, match="n_blocks"):
        fixes.reinit(model, residual=["fc1"], n_blocks=-1)
    # A layer torch cannot initialise puts back the layers done before it.
    rnn_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LSTM(8, 8))
    before = {k: v.clone() for k, v in rnn_model.state_dict().items()}

    def fails(*_a, **_k):
        raise NotImplementedError("no kernel for this dtype")

    monkeypatch.setattr("gradguard.fixes.init._reinit_rnn", fails)
    with pytest.raises(gg.ConfigError, match="changed nothing: no kernel"):
        fixes.reinit(rnn_model, force=True)
    after = rnn_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(rnn_model[0], "_gradguard_init")


def test_orthogonal_init_works_in_half_precision():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.LSTM(8, 8)).to(torch.bfloat16)
    fixes.reinit(model, "orthogonal")
    w = model[0].weight.float()
    gain = nn.init.calculate_gain("tanh")
    assert torch.allclose(w @ w.T, gain**2 * torch.eye(8), atol=0.05)


def test_an_lstm_with_a_projection_gets_one_orthogonal_block_per_gate():
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 16, proj_size=8)
    rep = fixes.reinit(nn.Sequential(lstm), force=True)
    w = lstm.weight_hh_l0.detach()  # (4·16) × 8: four 16 × 8 gate blocks
    for g in range(4):
        block = w[g * 16:(g + 1) * 16]
        assert torch.allclose(block.T @ block, 0.95**2 * torch.eye(8), atol=1e-5)
    hr = lstm.weight_hr_l0.detach()  # 8 × 16, rows orthonormal
    assert torch.allclose(hr @ hr.T, torch.eye(8), atol=1e-5)
    assert "projection orthogonal" in rep.changes[0]


class _Functional(nn.Module):
    """Activations the registration order cannot see: functional ones, one module shared
    by two layers and registered before them, a norm and a reshape in between."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(16, 64)
        self.bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 64)
        self.fc4 = nn.Linear(64, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.fc1(x)))
        h = self.act(self.fc2(h))
        h = torch.nn.functional.leaky_relu(self.fc3(h).view(-1, 64), negative_slope=0.2)
        h = torch.tanh(self.fc4(h)) + h  # (the sum comes after the activation)
        return self.out(h)


class _Branchy(nn.Module):
    """A forward torch.fx cannot trace (it branches on the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x)) if float(x.sum()) > 0 else self.fc(x)


def test_activations_are_read_from_the_forward_pass_functional_and_shared_ones_too():
    acts = fixes.layer_activations(_Functional())
    assert {k: type(v).__name__ if v is not None else None for k, v in acts.items()} == {
        "fc1": "ReLU", "fc2": "ReLU", "fc3": "LeakyReLU", "fc4": "Tanh", "out": None}
    assert acts["fc3"].negative_slope == 0.2
    # Registration order is the fallback for a forward that cannot be traced.
    assert isinstance(fixes.layer_activations(_Branchy())["fc"], nn.Tanh)
    # The init follows: Kaiming (ReLU gain √2) behind the functional ReLUs, Xavier for tanh.
    torch.manual_seed(0)
    model = _Functional()
    report = fixes.reinit(model)
    assert "fc2 (Linear, before ReLU): Kaiming" in str(report)
    assert "fc4 (Linear, before Tanh): Xavier" in str(report)
    assert model.fc2.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)


def test_reading_the_forward_leaves_a_stateful_model_as_it_was():
    # The trace ran the user's forward on the model itself: a call counter moved, a cached
    # tensor became a tracing proxy, and the next real forward returned a proxy.
    class Stateful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 1)
            self.calls, self.memory = 0, None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            h = torch.relu(self.fc1(x))
            self.memory = h.detach().mean(0)
            return self.fc2(h)

    model = Stateful()
    assert "fc1 (Linear, before ReLU): Kaiming" in str(fixes.reinit(model))
    assert model.calls == 0 and model.memory is None
    assert set(vars(model)) == set(vars(Stateful()))
    assert isinstance(model(torch.randn(3, 4)), torch.Tensor)


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.body = nn.Linear(8, 8)
        self.act = nn.GELU()
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.body(self.emb(t))))


def test_a_weight_tied_to_the_embedding_is_left_alone_and_named():
    torch.manual_seed(0)
    lm = _TinyLM()
    before = lm.emb.weight.detach().clone()
    rep = fixes.reinit(lm)
    assert rep.layers == ["body"] and torch.equal(lm.emb.weight, before)
    assert lm.head.weight is lm.emb.weight
    assert any(s.startswith("head (its weight is tied to 'emb'") for s in rep.skipped)
    assert fixes.reinit(_TinyLM(), layers=["head"]).layers == []


def _gpt(n_layer: int) -> nn.Module:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(16, 48), nn.Linear(16, 16)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc, self.gelu, self.c_proj = nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.mlp = Attn(), MLP()

    model = nn.Module()
    model.h = nn.ModuleList([Block() for _ in range(n_layer)])
    return model


def test_residual_scaling_counts_blocks_not_projections_as_nanogpt():
    # nanoGPT: attn.c_proj and mlp.c_proj, two per block, both × 1/sqrt(2·n_layer); the
    # old default counted projections and scaled by 1/sqrt(2·2·n_layer).
    torch.manual_seed(0)
    for n_layer in (1, 4):
        model = _gpt(n_layer)
        rep = fixes.reinit(model, residual=["*.c_proj"])
        assert f"scaled 1/sqrt(2·{n_layer})" in rep.changes[-2]
        assert rep.changes[-1].startswith(f"residual: {2 * n_layer} output projection(s) in "
                                          f"{n_layer} block(s)")
    big = _gpt(8)
    fixes.reinit(big, residual=["*.c_proj"])
    plain = nn.Linear(16, 16)
    nn.init.xavier_normal_(plain.weight)
    ratio = big.h[0].attn.c_proj.weight.std() / plain.weight.std()
    assert ratio.item() == pytest.approx(1 / 4, rel=0.15)  # 1/sqrt(2·8)
    # Blocks named, not indexed: counted after the common prefix; n_blocks overrides.
    named = nn.Module()
    named.b1, named.b2, named.b3 = _gpt(1).h[0], _gpt(1).h[0], _gpt(1).h[0]
    assert "1/sqrt(2·3)" in str(fixes.reinit(named, residual=["*.c_proj"]))
    assert "1/sqrt(2·12)" in str(fixes.reinit(named, residual=["*.c_proj"], n_blocks=12,
                                              force=True))
    # A bare name is the whole name now, so it matches nothing here: refused, with the glob.
    with pytest.raises(gg.ConfigError, match=r"'\*\.c_proj' selects every 'c_proj'"):
        fixes.reinit(_gpt(2), residual=["c_proj"])


def test_patterns_are_whole_names_and_bad_arguments_are_config_errors():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 4))
    model.add_module("fc10", nn.Linear(4, 4))
    assert fixes.reinit(model, layers=["fc1"]).layers == ["fc1"]
    for kw, words in [({"rnn_radius": "0.9"}, "rnn_radius"), ({"rnn_radius": 2.0}, "rnn_radius"),
                      ({"layers": [1]}, "glob patterns"), ({"residual": [None]}, "glob patterns"),
                      ({"layers": ["fc3"]}, r"no layer matches \['fc3'\]")]:
        with pytest.raises(gg.ConfigError, match=words):
            fixes.reinit(model, force=True, **kw)
    # Alternatives may match nothing one by one; a container selects the layers inside it.
    assert fixes.reinit(model, layers=["fc1", "fc3"], force=True).layers == ["fc1"]
    outer = nn.Sequential()
    outer.add_module("encoder", nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    outer.add_module("head", nn.Linear(4, 2))
    assert fixes.reinit(outer, layers=["encoder"]).layers == ["encoder.0", "encoder.2"]


def test_frozen_layers_are_not_reinitialised_unless_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.LSTM(8, 8))
    model[0].requires_grad_(False)
    model[2].weight_hh_l0.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = fixes.reinit(model)
    assert rep.layers == [] and all(torch.equal(v, model.state_dict()[k])
                                    for k, v in before.items())
    assert [s.split(" ")[0] for s in rep.skipped] == ["0", "2"]
    assert "frozen=True includes it" in rep.skipped[0]
    assert fixes.reinit(model, frozen=True).layers == ["0", "2"]


def test_numpy_scalars_are_numbers_and_blocks_inside_stages_are_counted():
    import numpy as np

    from gradguard.fixes.init import _count_blocks

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.RNN(4, 4))
    assert fixes.reinit(model, rnn_radius=np.float32(0.9)).layers
    x = torch.randn(16, 3)
    fit = fixes.Standardizer.fit(x, eps=np.float32(1e-8), dim=np.int64(1))
    assert fit.x_mean.shape == (3,)
    assert fixes.weight_norm(nn.Sequential(nn.Linear(3, 2)), dim=np.int64(0)).layers == ["0"]
    # ConvNeXt/Swin-style stages of blocks: a block is the path up to the last index.
    stages = [f"stages.{s}.blocks.{b}.mlp.fc2" for s, n in enumerate((3, 3, 9, 3))
              for b in range(n)]
    assert _count_blocks(stages)[0] == 18
    gpt = [f"h.{i}.{part}.c_proj" for i in range(4) for part in ("attn", "mlp")]
    assert _count_blocks(gpt)[0] == 4
    assert _count_blocks([f"blocks.{i}.mlp.2" for i in range(6)])[0] == 6
    assert _count_blocks([*gpt, "final.c_proj"])[0] == 5
