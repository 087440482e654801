"""The doctor's training trials: where a run starts, what a constant prediction scores,
and the standardisation trial testing the fix its finding proposes."""

import math

import pytest
import torch
from torch import nn

from gradguard import doctor
from gradguard.doctor.trial import Trial, Trials, run_trial, verdict
from gradguard.scenarios import data

pytestmark = pytest.mark.usefixtures("one_thread")


def digits_batches(n: int = 8, bs: int = 64):
    x, y = data.digits()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return [(x[i * bs : (i + 1) * bs], y[i * bs : (i + 1) * bs]) for i in range(n)]


def kaiming_mlp(depth: int = 4, din: int = 64, width: int = 128, dout: int = 10):
    torch.manual_seed(0)
    layers, d = [], din
    for _ in range(depth - 1):
        lin = nn.Linear(d, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, dout))


def diabetes_batches(std_x: bool = True, bs: int = 64):
    x, y = data.diabetes()
    if std_x:
        x = (x - x.mean(0)) / x.std(0)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, 384, bs)]


def regressor(d_in: int = 10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 1))


def test_a_trial_starts_from_the_untouched_models_loss_not_after_a_blow_up():
    m = kaiming_mlp()
    batches = digits_batches()
    t = run_trial(m, torch.optim.Adam(m.parameters(), lr=0.3), batches,
                  nn.functional.cross_entropy, 20)
    with torch.no_grad():
        untouched = [float(nn.functional.cross_entropy(m(x), y)) for x, y in batches[:3]]
    assert t.losses[1] > 100 * t.losses[0]  # (the step blows the loss up...)
    assert t.start == pytest.approx(sum(untouched) / 3, rel=1e-5)  # (...but not the start)
    assert t.initial == pytest.approx(untouched, rel=1e-5)


def test_a_run_that_ends_at_chance_is_not_fine():
    # Adam at 100× its usual LR: the loss spikes to ~1e3, then the net collapses to
    # predicting the class frequencies, 2.72 → 2.25 (chance, ln 10 = 2.30).
    m = kaiming_mlp()
    t = run_trial(m, torch.optim.Adam(m.parameters(), lr=0.3), digits_batches(),
                  nn.functional.cross_entropy, 60)
    assert t.chance == pytest.approx(math.log(10), abs=0.05)
    assert t.at_chance and not t.ok
    assert "no better than a constant prediction" in t.describe()
    ok = run_trial(m, torch.optim.Adam(m.parameters(), lr=3e-3), digits_batches(),
                   nn.functional.cross_entropy, 60)
    assert ok.ok and not ok.at_chance


def test_a_regression_runs_floor_is_predicting_the_mean():
    batches = diabetes_batches()
    m = regressor()
    t = run_trial(m, torch.optim.SGD(m.parameters(), lr=1e-4), batches,
                  nn.functional.mse_loss, 20)
    ys = torch.cat([y for _, y in batches])
    # (The median over the last batches of the mean's MSE: near the targets' variance.)
    assert t.chance == pytest.approx(float(ys.var()), rel=0.25)


def trial(losses, start=None, chance=math.nan, grads=None):
    return Trial("t", list(losses), grads or [1.0] * len(losses),
                 initial=[start if start is not None else losses[0]], chance=chance)


def test_a_fix_that_only_stops_a_divergence_is_no_cure():
    user = trial([3e4, 1e6, math.nan], chance=5.9e3)
    # No divergence, but it ends above predicting the mean: no cure.
    stops = trial([3e4] + [7e3] * 59, chance=5.9e3)
    assert verdict(user, stops) == "info"
    cures = trial([3e4] + [3.9e3] * 59, chance=5.9e3)
    assert verdict(user, cures) == "critical"


def test_std_targets_trial_trains_on_standardised_targets_and_reports_raw_units():
    # Standardised inputs, targets in raw units (mean 152, std 77), SGD 0.01: the raw
    # targets make the gradient ~77× too large and the run diverges.
    batches = diabetes_batches()
    m = regressor()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    d = doctor.diagnose(m, batches, nn.MSELoss(), opt)
    rc = d.root_cause
    assert rc is not None and rc.check == "input_scale" and rc.severity == "critical", str(d)
    assert "regression targets" in rc.title
    fixed = rc.evidence["trial"]["fixed"]
    assert fixed["label"] == "targets standardised"
    # The loss is recorded in the user's units: below predicting the mean (var ≈ 5.9e3).
    assert fixed["end_loss"] < 0.9 * fixed["chance_loss"] and fixed["chance_loss"] > 1e3
    assert "inverse_targets" in rc.fix_code


def test_integer_inputs_still_have_their_targets_checked_and_standardised():
    torch.manual_seed(0)
    tok = torch.randint(0, 50, (384, 12))
    y = 500 + 100 * (tok.float().mean(1, keepdim=True) - 24.5) / 4

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.f, self.o = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 1)

        def forward(self, t):
            return self.o(torch.relu(self.f(self.e(t).mean(1))))

    m = Bag()
    batches = [(tok[i : i + 64], y[i : i + 64]) for i in range(0, 384, 64)]
    d = doctor.diagnose(m, batches, nn.MSELoss(), torch.optim.SGD(m.parameters(), 1e-2))
    assert d.root_cause is not None and d.root_cause.check == "input_scale", str(d)
    assert "regression targets" in d.root_cause.title
    assert d.root_cause.evidence["trial"]["fixed"]["label"].startswith("targets standardised")
    # Standardising integer ids directly is refused by the Standardizer: the trial leaves
    # them alone and standardises what can be.
    t = Trials(m, torch.optim.SGD(m.parameters(), 1e-3), batches, nn.MSELoss(), 5)
    assert t.standardized(batches[:4]).label == "targets standardised"


def test_one_dimensional_inputs_are_one_feature():
    torch.manual_seed(0)
    x = torch.randint(1990, 2021, (256,)).float()
    y = (x - 2005) / 10 + 0.1 * torch.randn(256)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, x):
            return self.f(x[:, None]).squeeze(1)

    m = M()
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    d = doctor.diagnose(m, batches, nn.MSELoss(), torch.optim.SGD(m.parameters(), 1e-3))
    assert d.root_cause is not None and d.root_cause.check == "input_scale", str(d)
    assert d.root_cause.layers == ["feature 0"]
    assert d.root_cause.evidence["trial"]["fixed"]["label"] == "inputs standardised"


def test_binary_targets_are_not_standardised_and_bce_gets_probabilities():
    # Raw tabular features, sigmoid + BCELoss on float 0/1 labels: only the inputs are
    # standardised (the labels must stay in [0, 1]), and the constant prediction the run
    # is measured against is a probability (the positive rate), never a logit.
    x, y = data.diabetes()
    yb = (y > y.median()).float()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
    batches = [(x[i : i + 64], yb[i : i + 64]) for i in range(0, 384, 64)]
    d = doctor.diagnose(m, batches, nn.BCELoss(), torch.optim.SGD(m.parameters(), lr=0.01))
    assert d.root_cause is not None and d.root_cause.check == "input_scale", str(d)
    trials = d.measurements["trials"]
    assert "inputs standardised" in trials and "targets" not in " ".join(trials)
    assert trials["as is"]["chance_loss"] == pytest.approx(math.log(2), abs=0.02)


class GRUNet(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.rnn = nn.GRU(f, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_the_feature_axis_of_3d_inputs_follows_the_first_layer():
    from gradguard.doctor.trial import feature_dim

    x = torch.randn(8, 20, 4)
    assert feature_dim(GRUNet(4), x) == -1  # (B, T, F) into an RNN: features last
    assert feature_dim(nn.Sequential(nn.Conv1d(20, 8, 3)), x) == 1  # (N, C, L): channels
    assert feature_dim(nn.Sequential(nn.Linear(4, 2)), x) == -1
    assert feature_dim(None, torch.randn(8, 3, 5, 5)) == 1
    assert feature_dim(nn.Linear(1, 1), torch.randn(8)) == 1


def test_the_standardisation_trial_standardises_the_axis_the_check_names():
    # A Conv1d net on (N, C, L) signals: channel 0 in large units, pure noise; channel 1
    # carries the label. Per-channel standardisation (axis 1) cures the run.
    torch.manual_seed(0)
    x = torch.randn(256, 2, 16)
    x[:, 0] = x[:, 0] * 300 + 1000
    y = (x[:, 1].mean(1) > 0).long()
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                      nn.Flatten(), nn.Linear(8, 2))
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    t = Trials(m, torch.optim.Adam(m.parameters(), 1e-2), batches,
               nn.functional.cross_entropy, 40)
    std = t.standardized(batches, targets=False)
    assert std.ok, std.describe()
    (f,), _ = doctor.checks.check_inputs(batches, m)
    assert f.layers[0] == "channel 0"
