"""The doctor ranks the known cause first, on models built to have that cause."""

import copy
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import doctor
from gradguard.scenarios import data
from tests.conftest import pixel_mlp_run

# Tiny models, many short trials: a second thread only waits for a core.
pytestmark = pytest.mark.usefixtures("one_thread")


def deep_mlp(act, depth=20, width=64):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight)  # N(0, 1): far too large
        layers += [lin, act()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_bad_init_is_the_root_cause(act):
    m = deep_mlp(act)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    d = doctor.diagnose(m, (x, y), nn.functional.cross_entropy,
                        torch.optim.SGD(m.parameters(), lr=0.01))
    assert d.root_cause.check == "init" and d.root_cause.severity == "critical"
    assert "reinit" in d.root_cause.fix_code
    after = d.root_cause.evidence["after_auto_reinit"]
    assert 0.1 < after["forward_std_ratio"] < 10


def digits_loader():
    x, y = data.digits()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, 1024, 64)]


def healthy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def test_lr_far_past_divergence_is_the_root_cause():
    m = healthy_model()
    d = doctor.diagnose(m, digits_loader(), nn.functional.cross_entropy,
                        torch.optim.SGD(m.parameters(), lr=50.0))
    assert d.root_cause.check == "learning_rate" and d.root_cause.severity == "critical"
    lr = d.measurements["lr_range_test"]
    assert lr["diverges_at"] < 50 and lr["suggested"] < lr["diverges_at"]


def test_raw_unit_regression_inputs_are_the_root_cause():
    x, y = data.diabetes()
    m = nn.Linear(10, 1)
    loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 320, 32)]
    d = doctor.diagnose(m, loader, nn.functional.mse_loss,
                        torch.optim.SGD(m.parameters(), lr=1e-3))
    assert d.root_cause.check == "input_scale"
    assert "feature 4" in d.root_cause.layers  # s1, total serum cholesterol: the largest


def test_vanilla_rnn_with_radius_above_one_is_the_root_cause():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(2, 64, batch_first=True)
            self.out = nn.Linear(64, 1)
            with torch.no_grad():
                w = torch.randn(64, 64)
                self.rnn.weight_hh_l0.copy_(w * 1.5 / torch.linalg.eigvals(w).abs().max())

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    m = Net()
    d = doctor.diagnose(m, (torch.randn(32, 50, 2), torch.randn(32, 1)), nn.functional.mse_loss,
                        torch.optim.SGD(m.parameters(), lr=0.01))
    assert d.root_cause.check == "recurrent"
    assert d.root_cause.evidence["spectral_radius"] == pytest.approx(1.5, rel=1e-3)


def test_healthy_model_has_nothing_above_info():
    m = healthy_model()
    d = doctor.diagnose(m, digits_loader(), nn.functional.cross_entropy,
                        torch.optim.SGD(m.parameters(), lr=0.05))
    assert d.root_cause is None
    assert all(f.severity == "info" for f in d.findings)


def test_user_model_and_optimizer_are_untouched():
    m = healthy_model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    loader = digits_loader()
    x, y = loader[0]
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    params = [p.detach().clone() for p in m.parameters()]
    grads = [p.grad.clone() for p in m.parameters()]
    state = copy.deepcopy(opt.state_dict())
    doctor.diagnose(m, loader, nn.functional.cross_entropy, opt)
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters(), strict=True))
    assert all(torch.equal(a, b.grad) for a, b in zip(grads, m.parameters(), strict=True))
    now = opt.state_dict()
    assert now["param_groups"] == state["param_groups"]
    for k, st in state["state"].items():
        for n, v in st.items():
            assert torch.equal(v, now["state"][k][n])


def test_precision_checks():
    m = healthy_model()
    loader = digits_loader()
    d = doctor.diagnose(m, loader, nn.functional.cross_entropy, amp_dtype=torch.float16)
    assert d.root_cause.check == "precision" and d.root_cause.severity == "critical"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-8)
    d = doctor.diagnose(m, loader, nn.functional.cross_entropy, amp_dtype=torch.float16,
                        scaler=scaler)
    assert any("collapsed" in f.title for f in d.by_check("precision"))


def test_attention_logit_growth_and_log_z():
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 10)
            with torch.no_grad():
                self.mha.in_proj_weight.mul_(30)

        def forward(self, x):
            return self.head(self.mha(x, x, x)[0].mean(1)) * 100

    m = Attn()
    d = doctor.diagnose(m, (torch.randn(8, 12, 32), torch.randint(0, 10, (8,))),
                        nn.functional.cross_entropy)
    titles = " | ".join(f.title for f in d.by_check("activations"))
    assert "attention logits reach" in titles and "log-partition" in titles


def test_diagnose_run_finds_first_spike_after_lr_rise(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, end_factor=1.0,
                                              total_iters=30)  # warm-up
    with gg.Guard(m, opt, log=tmp_path / "r.jsonl") as guard:
        for s in range(60):
            x = torch.randn(32, 8) * (1000 if s == 45 else 1)
            opt.zero_grad()
            loss = m(x).pow(2).mean()
            loss.backward()
            guard.step(loss)
            sched.step()
    d = doctor.diagnose_run(str(tmp_path / "r.jsonl"))
    f = d.findings[0]
    assert f.evidence["first_step"] == 45
    assert "LR increase" in f.title and f.layers == ["0.weight"]


def test_a_run_log_counts_flagged_steps_once_and_the_datas_apart(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    with gg.Guard(m, opt, log=tmp_path / "r.jsonl") as guard:
        for s in range(60):
            x = torch.randn(32, 8) * (1000 if s == 45 else 1)  # a spike: two events
            if s in (20, 30, 31):  # NaN records (the first arms the watch on a CPU)
                x[0, 0] = float("nan")
            opt.zero_grad()
            loss = m(x).pow(2).mean()
            loss.backward()
            guard.step(loss)
    d = doctor.diagnose_run(str(tmp_path / "r.jsonl"))
    [data] = [f for f in d.findings if "NaN/Inf in the data" in f.title]
    assert data.evidence["data_steps"] == [30, 31]
    [run] = [f for f in d.findings if "first trouble" in f.title]
    assert run.evidence["count"] == 2  # steps 20 and 45, not 20, 30, 31, 45, 45
    with pytest.raises(gg.ConfigError, match="not a gradguard run log"):
        (tmp_path / "junk.jsonl").write_text("hello\n")
        doctor.diagnose_run(str(tmp_path / "junk.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")  # (a guard that never stepped)
    assert "0 steps recorded" in str(doctor.diagnose_run(str(tmp_path / "empty.jsonl")))


def spiky_run_log(path):
    """A guarded run on a healthy model with many wrong-unit batches: events in the log."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    with gg.Guard(m, opt, log=path) as guard:
        for s in range(80):
            x = torch.randn(32, 8) * (1000 if s >= 30 and s % 5 == 0 else 1)
            opt.zero_grad()
            loss = m(x).pow(2).mean()
            loss.backward()
            guard.step(loss)
    return path


def test_a_run_log_is_evidence_never_the_root_cause(tmp_path):
    log = str(spiky_run_log(tmp_path / "r.jsonl"))
    alone = doctor.diagnose_run(log)
    assert alone.findings[0].severity in ("warning", "critical")
    assert alone.root_cause is None
    m = healthy_model()
    d = doctor.diagnose(m, digits_loader(), nn.functional.cross_entropy,
                        torch.optim.SGD(m.parameters(), lr=0.05), run_log=log)
    assert d.by_check("run_log")[0].severity != "info"
    assert d.root_cause is None
    assert d.findings[-1].check == "run_log"  # listed after every cause


def test_diagnosis_prints_on_a_healthy_setup():
    m = healthy_model()
    d = doctor.diagnose(m, digits_loader(), nn.functional.cross_entropy,
                        torch.optim.SGD(m.parameters(), lr=0.05))
    assert d.root_cause is None
    assert str(d).endswith("no problem found: nothing above info")
    assert str(doctor.Diagnosis()) == "no problem found: nothing above info"


def test_a_run_whose_units_died_is_named_in_the_run_log_findings(tmp_path):
    # Pixels in 0-255 at a high LR, the controller off (monitoring): every hidden ReLU
    # dies within the first tens of steps and only the output bias still learns.
    log = tmp_path / "r.jsonl"
    pixel_mlp_run(0.01, 0, steps=80, log=log, policy=gg.Policy(stability=None))
    d = doctor.diagnose_run(str(log))
    f = d.findings[0]
    assert f.severity == "critical" and f.title.startswith("units died by step ")
    assert "no gradient has reached 2.weight" in f.title and f.layers == ["2.weight"]
    ev = f.evidence
    assert ev["first_flag"] is not None and ev["first_flag"] < ev["dead_step"]
    assert "restart from a checkpoint before it" in f.title and "no LR revives" in f.fix
    # A run without dead units says nothing of them.
    assert not any("units died" in g.title for g in doctor.diagnose_run(
        str(spiky_run_log(tmp_path / "s.jsonl"))).findings)


def test_dead_units_are_counted_on_the_axis_the_layer_before_wrote():
    from gradguard.doctor.probe import _unit_dead_fraction

    y = torch.rand(8, 16, 4) + 0.1  # (batch, time, features) after a Linear
    y[..., :3] = 0  # 3 of 4 features dead at every position
    assert _unit_dead_fraction(y, features_last=True) == pytest.approx(0.75)
    assert _unit_dead_fraction(y[:, 0], features_last=True) == pytest.approx(0.75)
    img = torch.rand(8, 4, 5, 5) + 0.1  # (N, C, H, W) after a convolution
    img[:, 1] = 0
    assert _unit_dead_fraction(img) == pytest.approx(0.25)


def test_the_doctor_sees_dead_units_of_a_sequence_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        model[0].bias[:48] = -100.0  # 75 % of the units never fire
    x, y = torch.randn(32, 16, 8), torch.randn(32, 16, 1)
    d = doctor.diagnose(model, (x, y), nn.functional.mse_loss)
    assert any("75% dead units" in f.title for f in d.findings)


def test_nan_in_a_later_batch_is_the_datas_finding():
    loader = digits_loader()
    loader[2][0][5, 10] = float("nan")  # (one missing value, in batch 2 of 16)
    m = healthy_model()
    d = doctor.diagnose(m, loader, nn.functional.cross_entropy,
                        torch.optim.SGD(m.parameters(), lr=0.05))
    rc = d.root_cause
    assert rc is not None and rc.check == "nonfinite" and rc.severity == "critical", str(d)
    assert "inputs of batch(es) 2 (1 value(s))" in rc.title
    assert rc.evidence["inputs_batches"] == [2]
    # The input statistics skip the bad row instead of turning NaN.
    _, meas = doctor.checks.check_inputs(loader[:4], m)
    assert all(math.isfinite(v) for v in meas["feature_std_range"])
    # NaN targets are found as well.
    x, y = data.diabetes()
    y = y.clone()
    y[70] = float("inf")
    reg = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]
    (g,) = doctor.checks.check_finite_data(reg)
    assert "targets of batch(es) 2" in g.title


def test_a_nan_output_in_a_dict_is_named_as_the_forward_pass():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 2)

        def forward(self, x):  # a log of negative inputs: NaN, a forward-pass bug
            return {"logits": self.f(torch.log(x))}

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    m = Net()
    d = doctor.diagnose(m, (x, y), lambda o, t: nn.functional.cross_entropy(o["logits"], t),
                        torch.optim.SGD(m.parameters(), lr=0.1))
    assert d.root_cause.check == "nonfinite"
    assert "output is NaN/Inf on finite inputs" in d.root_cause.title


def test_sequence_features_are_named_on_the_axis_the_first_layer_reads():
    # (B, T, F) into a GRU: feature 3 is in raw units; the others are standardised.
    torch.manual_seed(0)
    x = torch.randn(256, 20, 4)
    x[..., 3] = x[..., 3] * 3000 + 10000
    y = (x[..., 0].mean(1) > 0).long()

    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 16, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    (f,), meas = doctor.checks.check_inputs(batches, G())
    assert f.layers[0] == "feature 3" and meas["feature_dim"] == -1
    assert meas["feature_std_range"][0] == pytest.approx(1.0, rel=0.1)
    assert meas["feature_std_range"][1] == pytest.approx(3000, rel=0.1)
