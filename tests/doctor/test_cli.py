import json
import textwrap

from typer.testing import CliRunner

from gradguard.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


def test_doctor_names_init_and_fix_stops_the_explosion():
    res = runner.invoke(app, ["doctor", "mlp-init", "--json", "--fix", "--steps", "150"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["root_cause"] == "init"
    fx = out["fix"]
    assert any("reinit" in a for a in fx["applied"])
    assert fx["before"]["diverged_at"] is not None
    assert fx["after"]["diverged_at"] is None and fx["after"]["final_loss"] < 1.0


def test_doctor_names_input_scale_on_raw_regression():
    res = runner.invoke(app, ["doctor", "linreg-raw"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert "most likely root cause: input_scale" in res.output
    assert "x = (x - x_train.mean(0)) / x_train.std(0)" in res.output


def _user_script(path, lr: float):
    """A user's training script with a make_run() factory: a small MLP regression."""
    path.write_text(textwrap.dedent(f"""
        import torch
        from torch import nn

        def make_run():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
            x = torch.randn(256, 16)
            y = x.sum(1, keepdim=True)
            loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
            return model, loader, nn.functional.mse_loss, torch.optim.SGD(model.parameters(),
                                                                         lr={lr})
    """))
    return path


def test_doctor_runs_a_user_script(tmp_path):
    script = _user_script(tmp_path / "train.py", 5.0)
    res = runner.invoke(app, ["doctor", f"{script}:make_run", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["root_cause"] == "learning_rate"
    bad = runner.invoke(app, ["doctor", f"{script}:nope"], env=WIDE)
    assert bad.exit_code == 2 and "no function 'nope'" in bad.output
    bad = runner.invoke(app, ["doctor", "no-such-scenario"], env=WIDE)
    assert bad.exit_code == 2 and "built-in scenario" in bad.output


def test_lr_find_writes_a_png(tmp_path):
    out = tmp_path / "lr.png"
    res = runner.invoke(app, ["lr-find", "mlp-corrupt", "--out", str(out), "--num-iter", "60"],
                        env=WIDE)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suggested" in res.output


def test_doctor_says_when_nothing_is_wrong(tmp_path):
    script = _user_script(tmp_path / "healthy.py", 0.01)
    res = runner.invoke(app, ["doctor", f"{script}:make_run"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert "no problem found" in res.output and "root cause" not in res.output
    res = runner.invoke(app, ["doctor", f"{script}:make_run", "--fail-on", "warning"], env=WIDE)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["doctor", str(script)], env=WIDE)  # (make_run by default)
    assert res.exit_code == 0 and "no problem found" in res.output, res.output
    res = runner.invoke(app, ["doctor", f"{script}:make_run", "--trial-steps", "-1"], env=WIDE)
    assert res.exit_code == 2 and "--trial-steps must be 0 or more" in res.output


def _script(path, body: str):
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        torch.manual_seed(0)
        X, Y = torch.randn(256, 16), torch.randn(256, 1)
    """) + textwrap.dedent(body))
    return path


def test_a_loss_that_is_nan_before_any_step_is_named_not_called_healthy(tmp_path):
    script = _script(tmp_path / "nan.py", """
        class NaNNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.l = nn.Linear(16, 1)

            def forward(self, x):
                return self.l(x) * float("nan")

        def make_run():
            m = NaNNet()
            return m, (X, Y), nn.functional.mse_loss, torch.optim.SGD(m.parameters(), lr=0.1)

        def make_nan_targets():
            m = nn.Linear(16, 1)
            y = Y.clone()
            y[3] = float("nan")
            return m, (X, y), nn.functional.mse_loss, torch.optim.SGD(m.parameters(), lr=0.1)
    """)
    res = runner.invoke(app, ["doctor", f"{script}:make_run", "--trial-steps", "5"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert "CRITICAL nonfinite" in res.output and "output is NaN/Inf" in res.output
    assert "no problem found" not in res.output
    res = runner.invoke(app, ["doctor", f"{script}:make_nan_targets", "--trial-steps", "5"],
                        env=WIDE)
    assert "targets hold NaN/Inf" in res.output
    # For CI: a critical finding fails the command when asked to, as JSON too.
    for extra in ([], ["--json"]):
        res = runner.invoke(app, ["doctor", f"{script}:make_run", "--trial-steps", "5",
                                  "--fail-on", "critical", *extra], env=WIDE)
        assert res.exit_code == 1, res.output
    res = runner.invoke(app, ["doctor", f"{script}:make_run", "--fail-on", "always"], env=WIDE)
    assert res.exit_code == 2 and "--fail-on must be one of" in res.output
    res = runner.invoke(app, ["lr-find", f"{script}:make_run", "--out",
                              str(tmp_path / "lr.png")], env=WIDE)
    assert res.exit_code == 2 and "before any step" in res.output


def test_dataloader_batches_triples_dicts_and_one_pass_generators(tmp_path):
    script = _script(tmp_path / "shapes.py", """
        def _model():
            m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
            return m, torch.optim.SGD(m.parameters(), lr=0.01)

        def make_list_batch():  # next(iter(loader)) collates a list, not a tuple
            m, opt = _model()
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y),
                                                 batch_size=32)
            return m, next(iter(loader)), nn.functional.mse_loss, opt

        def make_generator():  # one pass only: the diagnosis and --fix must share it
            m, opt = _model()
            gen = ((X[i:i + 32], Y[i:i + 32]) for i in range(0, 256, 32))
            return m, gen, nn.functional.mse_loss, opt

        def make_triples():
            m, opt = _model()
            return m, [(X, Y, torch.ones(256))], nn.functional.mse_loss, opt

        def make_dicts():
            m, opt = _model()
            return m, [{"x": X, "y": Y}], nn.functional.mse_loss, opt
    """)
    quick = ["--trial-steps", "5", "--no-lr-test"]
    res = runner.invoke(app, ["doctor", f"{script}:make_list_batch", *quick], env=WIDE)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["doctor", f"{script}:make_generator", *quick, "--fix",
                              "--steps", "20"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert "20-step re-run" in res.output
    for name, said in (("make_triples", "a tuple of 3"), ("make_dicts", "a dict with keys")):
        res = runner.invoke(app, ["doctor", f"{script}:{name}", *quick], env=WIDE)
        assert res.exit_code == 2, res.output
        assert said in res.output and "(inputs, targets)" in res.output


def test_optimizers_that_cannot_be_rebuilt_are_copied_or_named(tmp_path):
    script = _script(tmp_path / "opts.py", """
        import threading

        class RequiredArgsSGD(torch.optim.Optimizer):  # no defaults for lr and beta
            def __init__(self, params, lr, beta):
                super().__init__(params, dict(lr=lr, beta=beta))

            @torch.no_grad()
            def step(self, closure=None):
                for g in self.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            p.add_(p.grad, alpha=-g["lr"])

        class LockedSGD(torch.optim.SGD):  # neither rebuildable nor deep-copyable
            def __init__(self, params, lr, lock):
                super().__init__(params, lr=lr)
                self.lock = lock

        def make_custom():
            m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
            return m, (X, Y), nn.functional.mse_loss, RequiredArgsSGD(m.parameters(), 0.01, 0.9)

        def make_locked():
            m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
            return m, (X, Y), nn.functional.mse_loss, LockedSGD(m.parameters(), 0.01,
                                                                 threading.Lock())
    """)
    png = str(tmp_path / "lr.png")
    res = runner.invoke(app, ["doctor", f"{script}:make_custom", "--trial-steps", "3",
                              "--no-lr-test", "--fix", "--steps", "3"], env=WIDE)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["lr-find", f"{script}:make_custom", "--num-iter", "10",
                              "--out", png], env=WIDE)
    assert res.exit_code == 0 and "suggested" in res.output, res.output
    for cmd in (["doctor", f"{script}:make_locked", "--trial-steps", "3", "--no-lr-test"],
                ["lr-find", f"{script}:make_locked", "--num-iter", "10", "--out", png]):
        res = runner.invoke(app, cmd, env=WIDE)
        assert res.exit_code == 2, res.output
        assert "cannot copy LockedSGD" in res.output and "Traceback" not in res.output


def test_lr_find_reads_a_one_pass_generator(tmp_path):
    script = _script(tmp_path / "gen.py", """
        def make_run():
            m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
            gen = ((X[i:i + 32], Y[i:i + 32]) for i in range(0, 256, 32))  # 8 batches
            return m, gen, nn.functional.mse_loss, torch.optim.SGD(m.parameters(), lr=0.01)
    """)
    res = runner.invoke(app, ["lr-find", f"{script}:make_run", "--num-iter", "30",
                              "--out", str(tmp_path / "lr.png")], env=WIDE)
    assert res.exit_code == 0, res.output
    assert "suggested" in res.output and (tmp_path / "lr.png").exists()


def test_a_per_sample_loss_exits_2_naming_the_fix(tmp_path):
    script = _script(tmp_path / "per_sample.py", """
        def make_run():
            m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
            return m, (X, Y), nn.MSELoss(reduction="none"), torch.optim.SGD(m.parameters(),
                                                                             lr=0.01)
    """)
    for cmd in (["doctor", f"{script}:make_run", "--trial-steps", "3"],
                ["lr-find", f"{script}:make_run", "--out", str(tmp_path / "lr.png")]):
        res = runner.invoke(app, cmd, env=WIDE)
        assert res.exit_code == 2, res.output
        assert "must return a scalar" in res.output and "reduction='mean'" in res.output


def _no_constants(name: str):
    raise AssertionError(f"not strict JSON: {name}")


def test_doctor_fix_json_is_strict_when_a_rerun_blows_up(tmp_path):
    script = _script(tmp_path / "blowup.py", """
        def make_run():
            m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
            return m, (X * 100, Y), nn.functional.mse_loss, torch.optim.SGD(m.parameters(),
                                                                             lr=10.0)
    """)
    res = runner.invoke(app, ["doctor", f"{script}:make_run", "--json", "--fix", "--steps",
                              "10", "--trial-steps", "0", "--no-lr-test"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output, parse_constant=_no_constants)
    assert out["fix"]["before"]["final_loss"] in ("nan", "inf")  # (as the findings write it)


def test_lr_find_says_when_its_suggestion_is_clamped(tmp_path):
    script = _script(tmp_path / "rising.py", """
        import itertools

        CALLS = itertools.count()

        def rising(out, y):  # the loss only rises: lowest at the first LR tested
            return nn.functional.mse_loss(out, y) + next(CALLS)

        def make_run():
            m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
            return m, (X, Y), rising, torch.optim.SGD(m.parameters(), lr=0.01)
    """)
    res = runner.invoke(app, ["lr-find", f"{script}:make_run", "--num-iter", "10",
                              "--start-lr", "1e-6", "--out", str(tmp_path / "lr.png")],
                        env=WIDE)
    assert res.exit_code == 0, res.output
    assert "suggested: 1e-06" in res.output and "clamped to start_lr" in res.output
