"""``gradguard bench`` from the command line."""

from typer.testing import CliRunner

from gradguard.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "160"}


def test_list_names_every_scenario_and_remedy():
    res = runner.invoke(app, ["bench", "--list"], env=WIDE)
    assert res.exit_code == 0, res.output
    for name in ("linreg-raw", "mlp-init", "zclip", "autoclip", "gradguard-no-rollback",
                 "warmup-cosine"):
        assert name in res.output
    # Remedies are described in user terms, not by the project's internal documents.
    assert "brief" not in res.output.lower()
    for kind in ("init", "schedule", "batch", "optimizer", "weights", "data", "loss"):
        assert f" {kind} " in res.output


def test_small_bench_prints_tables_and_writes_results(tmp_path):
    res = runner.invoke(app, ["bench", "-s", "linreg-raw", "-r", "none", "-r", "gradguard",
                              "--lr-grid", "1e-5,1e-3", "--seeds", "1", "--steps", "60",
                              "--jobs", "1", "--out", str(tmp_path), "--no-html"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert "4 runs on 1 worker(s)" in res.output
    assert "stable LRs" in res.output and "gradguard" in res.output
    assert (tmp_path / "runs.csv").exists() and (tmp_path / "results.md").exists()
    assert not (tmp_path / "report.html").exists()


def test_bad_arguments_are_named():
    res = runner.invoke(app, ["bench", "-s", "nope"], env=WIDE)
    assert res.exit_code == 2 and "unknown scenario 'nope'" in res.output
    res = runner.invoke(app, ["bench", "-r", "nope"], env=WIDE)
    assert res.exit_code == 2 and "unknown remedy 'nope'" in res.output
    res = runner.invoke(app, ["bench", "--lr-grid", "1e-3,abc"], env=WIDE)
    assert res.exit_code == 2 and "--lr-grid must be comma-separated numbers" in res.output
    res = runner.invoke(app, ["bench", "--lr-grid", "0,1e-3"], env=WIDE)
    assert res.exit_code == 2 and "positive" in res.output
    res = runner.invoke(app, ["bench", "--seeds", "0"], env=WIDE)
    assert res.exit_code == 2 and "--seeds must be at least 1" in res.output
