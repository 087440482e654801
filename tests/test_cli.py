from typer.testing import CliRunner

from gradguard.cli import app

runner = CliRunner()


def test_version():
    res = runner.invoke(app, ["version"])
    assert res.exit_code == 0 and "gradguard" in res.output


def test_demo_shows_explosion_and_rescue():
    res = runner.invoke(app, ["demo"], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert "loss became NaN/inf at step" in res.output
    assert "trained to a finite loss" in res.output
