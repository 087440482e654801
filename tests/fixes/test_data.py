"""Input and target standardisation (gradguard.fixes.data)."""

import dataclasses

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import fixes, scenarios


def test_fit_matches_torch_statistics_from_any_kind_of_sample():
    torch.manual_seed(0)
    x = torch.randn(300, 5) * torch.tensor([1.0, 10, 100, 1e3, 1e4]) + 50
    y = torch.randn(300, 1) * 7 + 3
    loader = [(x[i : i + 30], y[i : i + 30]) for i in range(0, 300, 30)]
    for sample in (loader, (x, y), iter(loader)):
        std = fixes.Standardizer.fit(sample)
        assert torch.allclose(std.x_mean, x.mean(0), rtol=1e-5)
        assert torch.allclose(std.x_std, x.std(0, correction=0), rtol=1e-4)
        assert std.y_mean.item() == pytest.approx(y.mean().item(), rel=1e-5)
        z = std.transform_inputs(x)
        assert torch.allclose(z.mean(0), torch.zeros(5), atol=1e-4)
        assert torch.allclose(z.std(0, correction=0), torch.ones(5), atol=1e-4)
    _, ys = std.transform((x, y))
    assert torch.allclose(std.inverse_targets(ys), y, atol=1e-4)
    only_x = fixes.Standardizer.fit(x)
    assert not only_x.has_targets and "has none" in str(only_x.report)


def test_images_are_standardised_per_channel_and_constant_features_kept():
    x = torch.randn(64, 3, 8, 8) * torch.tensor([1.0, 5, 20])[:, None, None]
    std = fixes.Standardizer.fit(x)
    assert std.x_mean.shape == (3, 1, 1)
    assert torch.allclose(std.transform(x).std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)
    tab = torch.cat([torch.randn(50, 2), torch.full((50, 1), 4.0)], 1)
    std = fixes.Standardizer.fit(tab)
    assert std.x_std[2] == 1 and "1 constant input feature" in str(std.report)
    seq = torch.randn(16, 10, 3) * 9
    assert fixes.Standardizer.fit(seq, dim=-1).x_mean.shape == (1, 3)


def test_wrap_standardises_inputs_and_maps_outputs_back():
    torch.manual_seed(0)
    x, y = torch.randn(100, 3) * 50 + 10, torch.randn(100, 1) * 20 + 100
    std = fixes.Standardizer.fit((x, y))
    inner = nn.Linear(3, 1)
    z = inner(std.transform_inputs(x))
    shifted = std.wrap(inner)
    assert torch.allclose(shifted(x), z + std.y_mean, atol=1e-5)
    inverse = std.wrap(inner, outputs="inverse")
    assert torch.allclose(inverse(x), std.inverse_targets(z), atol=1e-4)
    assert [n for n, _ in shifted.named_parameters()] == ["model.weight", "model.bias"]
    assert "x_mean" in shifted.state_dict() and "(outputs)" in shifted.report.layers
    with pytest.raises(gg.ConfigError, match="already standardised"):
        std.wrap(shifted)


def test_class_labels_are_left_alone():
    x, y = torch.randn(50, 64) * 16, torch.randint(0, 10, (50,))
    std = fixes.Standardizer.fit((x, y))
    assert not std.has_targets and "class labels" in str(std.report)
    assert std.wrap(nn.Linear(64, 10)).outputs == "none"
    with pytest.raises(gg.ConfigError, match="needs target statistics"):
        std.wrap(nn.Linear(64, 10), outputs="inverse")


def test_bad_samples_are_config_errors():
    x = torch.randn(10, 3)
    x[4, 1] = float("nan")
    with pytest.raises(gg.ConfigError, match="NaN/Inf"):
        fixes.Standardizer.fit(x)
    with pytest.raises(gg.ConfigError, match="not floating point"):
        fixes.Standardizer.fit(torch.randint(0, 5, (8, 4)))
    with pytest.raises(gg.ConfigError, match="no batch"):
        fixes.Standardizer.fit([])
    with pytest.raises(gg.ConfigError, match="batch dimension 0"):
        fixes.Standardizer.fit(torch.randn(8, 4), dim=0)
    with pytest.raises(gg.ConfigError, match="outputs"):
        fixes.Standardizer.fit(torch.randn(8, 4)).wrap(nn.Linear(4, 1), outputs="scale")


def test_standardisation_turns_linreg_raw_from_diverging_to_converging_at_the_same_lr():
    # Diabetes in raw units with plain SGD at lr 1e-3: NaN within a few steps. The same LR
    # on standardised inputs, with the target mean added to the outputs, converges to a test
    # MSE of ~3050 (least squares: ~2900; predicting the mean: ~5900).
    scn = scenarios.get("linreg-raw")
    plain = scenarios.run(scn)
    assert plain.diverged

    def build(seed, outputs="shift"):
        s = scn.build(seed)
        std = fixes.Standardizer.fit(s.data(s.batch_size), max_batches=11)  # 352 rows
        s.model = std.wrap(s.model, outputs=outputs)
        return s

    fixed = scenarios.run(dataclasses.replace(scn, build=build))
    assert not fixed.diverged and fixed.final_loss < 3500
    # Mapping outputs back with the full inverse (× target std 77) while the loss stays in
    # raw units multiplies its gradient by 77²: it explodes again at this LR.
    inverse = scenarios.run(dataclasses.replace(scn, build=lambda s: build(s, "inverse")))
    assert inverse.diverged


def test_statistics_keep_the_datas_precision_and_the_wrapper_feeds_the_models_dtype():
    torch.manual_seed(0)
    stamps = 1.7e9 + 100 * torch.randn(500, 3, dtype=torch.float64)  # far from zero
    std = fixes.Standardizer.fit((stamps, torch.randn(500, 1, dtype=torch.float64)))
    assert std.transform_inputs(stamps).mean(0).abs().max() < 1e-6
    x, y = torch.randn(64, 3) * 5 + 3, torch.randn(64, 1) * 9 + 1
    std = fixes.Standardizer.fit((x, y))
    model = nn.Linear(3, 1).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    assert std.wrap(model, outputs="none")(xb).dtype == torch.bfloat16
    # Half-precision data for a float32 model, and outputs far from zero: promoted, as
    # torch would (float16 cannot hold a target mean of 2e5 plus its spread).
    assert std.wrap(nn.Linear(3, 1))(x.half()).dtype == torch.float32
    big = fixes.Standardizer.fit((x, y + 2e5))
    back = big.inverse_targets(torch.ones(4, 1, dtype=torch.float16))
    assert torch.isfinite(back).all() and back.dtype == torch.float32


def test_inputs_alone_from_a_tensor_dataset_or_as_a_list_of_batches():
    x = torch.randn(64, 3) * 4 + 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16)
    std = fixes.Standardizer.fit(loader)
    assert torch.allclose(std.x_mean, x.mean(0), atol=1e-5) and not std.has_targets
    two = fixes.Standardizer.fit([x[:40], x[40:]])  # (unequal lengths: not a pair)
    assert torch.allclose(two.x_mean, x.mean(0), atol=1e-5) and not two.has_targets
    # A sequence-first (T, N, D) batch with (N, 1) targets is still a pair.
    seq = fixes.Standardizer.fit((torch.randn(7, 16, 3), torch.randn(16, 1)))
    assert seq.has_targets


def test_statistics_round_trip_through_torch_save_and_bad_ones_are_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g) * torch.tensor([1.0, 100.0, 0.01]) + 5
    y = torch.randn(64, 2, generator=g) * 30 + 7
    std = fixes.Standardizer.fit((x, y))
    torch.save(std.state_dict(), tmp_path / "std.pt")
    back = fixes.Standardizer.from_state_dict(torch.load(tmp_path / "std.pt"))
    xs, ys = std.transform((x, y))
    xb, yb = back.transform((x, y))
    assert torch.equal(xs, xb) and torch.equal(ys, yb)
    assert torch.equal(back.inverse_targets(yb), std.inverse_targets(ys))
    # The state dict holds copies: changing it does not change the Standardizer.
    sd = std.state_dict()
    sd["x_mean"].add_(1)
    assert torch.equal(std.transform_inputs(x), xs)
    # Inputs alone (class labels): no target statistics, and they stay None.
    cls = fixes.Standardizer.fit((x, torch.arange(64) % 3))
    assert not fixes.Standardizer.from_state_dict(cls.state_dict()).has_targets
    good = std.state_dict()
    for bad, words in [
        ({"x_mean": good["x_mean"]}, "expected the dict"),
        ([1, 2], "expected the dict"),
        ({**good, "x_std": [1.0, 2.0, 3.0]}, "x_std must be a floating-point tensor"),
        ({**good, "y_std": None}, "come together"),
        ({**good, "x_std": torch.ones(4)}, "shape"),
        ({**good, "x_std": torch.tensor([1.0, 0.0, 1.0])}, "finite and positive"),
        ({**good, "x_mean": torch.tensor([1.0, float("nan"), 1.0])}, "NaN/Inf"),
    ]:
        with pytest.raises(gg.ConfigError, match=words):
            fixes.Standardizer.from_state_dict(bad)


def test_two_tensors_are_one_batch_as_a_dataloader_yields_it_other_iterables_are_batches():
    # The type decides, never the shapes: a DataLoader's batch is the list [x, y]; two
    # same-sized input batches were once read as (inputs, targets) by their shapes.
    torch.manual_seed(0)
    b1, b2 = torch.randn(16, 3) * 5 + 1, torch.randn(16, 3) * 5 + 1
    for pair in ((b1, b2), [b1, b2]):
        fit = fixes.Standardizer.fit(pair)
        assert fit.has_targets and torch.allclose(fit.x_mean, b1.mean(0), atol=1e-5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(b1, b2[:, :1]),
                                         batch_size=16)
    one = fixes.Standardizer.fit(next(iter(loader)))
    assert one.has_targets and torch.allclose(one.x_mean, b1.mean(0), atol=1e-5)
    for batches in (iter([b1, b2]), [[b1], [b2]]):
        fit = fixes.Standardizer.fit(batches)
        assert not fit.has_targets
        assert torch.allclose(fit.x_mean, torch.cat([b1, b2]).mean(0), atol=1e-5)
    seqs = fixes.Standardizer.fit([torch.randn(4, 6, 5), torch.randn(4, 7, 5),
                                   torch.randn(4, 3, 5)], dim=-1)
    assert not seqs.has_targets and seqs.x_mean.shape == (1, 5)
    with pytest.raises(gg.ConfigError, match=r"as \(x, y\)"):
        fixes.Standardizer.fit([torch.randn(8, 4), torch.randn(8, 1), torch.randn(8)])


def test_bad_fit_arguments_are_config_errors():
    x = torch.randn(10, 3)
    for kw, words in [({"eps": "1e-8"}, "eps"), ({"eps": 0}, "eps"), ({"dim": "1"}, "dim"),
                      ({"dim": 1.0}, "dim"), ({"dim": 5}, "dim=5 is not a dimension"),
                      ({"dim": -3}, "dim=-3 is not a dimension")]:
        with pytest.raises(gg.ConfigError, match=words):
            fixes.Standardizer.fit(x, **kw)
    assert fixes.Standardizer.fit(x, dim=-1).x_mean.shape == (3,)
