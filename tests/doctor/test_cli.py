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
    res = runner.invoke(app, ["doctor", f"{script}:make_run", "--trial-steps", "-1"], env=WIDE)
    assert res.exit_code == 2 and "--trial-steps must be 0 or more" in res.output
