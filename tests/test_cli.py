import pytest
from typer.testing import CliRunner

from gradguard.cli import app

runner = CliRunner()


def test_version():
    res = runner.invoke(app, ["version"])
    assert res.exit_code == 0 and "gradguard" in res.output
    flag = runner.invoke(app, ["--version"])
    assert flag.exit_code == 0 and flag.output == res.output


def test_bench_and_report_refuse_bad_arguments_with_a_message(tmp_path):
    wide = {"COLUMNS": "200"}
    afile = tmp_path / "afile"
    afile.write_text("")
    notlog = tmp_path / "notes.txt"
    notlog.write_text("hello\n")
    cases = [
        (["bench", "-s", "linreg-raw", "-r", "none", "--steps", "0"], "--steps must be"),
        (["bench", "-s", "linreg-raw", "-r", "none", "--jobs", "0", "--out",
          str(tmp_path / "j")], "jobs must be >= 1, got 0"),  # (was read as "every core")
        (["bench", "-s", "linreg-raw", "-r", "none", "--out", str(afile / "sub")],
         "is a file or lies under one"),
        (["bench", "-s", "linreg-raw", "-r", "none", "--lr-grid", "nan,inf", "--out",
          str(tmp_path / "b")], "got [nan, inf]"),  # (rich markup swallowed the list)
        (["bench", "-s", "linreg-raw", "-r", "none", "--lr-grid", "", "--out",
          str(tmp_path / "e")], "--lr-grid must be comma-separated numbers, got ''"),
        (["demo", "--jobs", "0", "--out", str(tmp_path / "d")], "jobs must be >= 1, got 0"),
        (["demo", "--out", str(afile / "sub")], "is a file or lies under one"),
        (["report", str(tmp_path)], "without a bench's runs.csv"),
        (["report", str(notlog)], "is not a gradguard run log"),
        (["lr-find", "linreg-raw", "--out", str(tmp_path / "lr.txt")], "must end in one of"),
        (["lr-find", "linreg-raw", "--start-lr", "1", "--end-lr", "1e-3", "--out",
          str(tmp_path / "lr.png")], "must rise from a positive start_lr"),
        (["doctor", "linreg-raw", "--run-log", str(tmp_path / "nope.jsonl")],
         "no such run log"),
        (["doctor", "linreg-raw", "--fix", "--steps", "0"], "--steps (of the --fix"),
    ]
    for args, said in cases:
        res = runner.invoke(app, args, env=wide)
        assert res.exit_code == 2, (args, res.output)
        assert said in " ".join(res.output.split()), (args, res.output)


def test_demo_runs_the_quick_bench_and_writes_the_report(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path)], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "linreg-raw at lr 0.001: unguarded, the loss became NaN/inf at step" in out
    assert "mlp-corrupt at lr 0.05: unguarded, the loss became NaN/inf at step 60" in out
    assert "with the default guard it trained to a test loss" in out
    # cnn-lr ties on range; the sentence also says which remedy the LR matters least to.
    assert "lowest LR sensitivity (mean excess loss over the grid): gradguard (" in out
    for name in ("zclip", "autoclip", "clip-norm", "skip-nonfinite"):
        assert name in out
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert (tmp_path / "results.md").exists()




@pytest.mark.parametrize("command", [[], ["doctor"], ["bench"], ["report"], ["demo"],
                                     ["lr-find"], ["version"]])
def test_help_shows_no_type_after_flags(command):
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output
    if command in (["doctor"], ["bench"]):
        assert "<int>" in res.output  # options that take a value still say which


def test_report_html_into_a_folder_is_refused_and_lr_find_makes_its_folder(tmp_path):
    import gradguard as gg

    log = tmp_path / "run.jsonl"
    import torch

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gg.Guard(model, opt, log=log) as guard:
        for _ in range(5):
            opt.zero_grad()
            loss = model(torch.randn(8, 3)).pow(2).mean()
            loss.backward()
            guard.step(loss)
    (tmp_path / "adir").mkdir()
    res = runner.invoke(app, ["report", str(log), "--html", str(tmp_path / "adir")])
    assert res.exit_code == 2 and "is a directory" in res.output
    assert not list(tmp_path.glob(".adir*"))
    # The log itself as the page: refused, the log kept (it was overwritten with HTML).
    before = log.read_bytes()
    res = runner.invoke(app, ["report", str(log), "--html", str(log)])
    assert res.exit_code == 2 and "is the run log being read" in res.output
    assert log.read_bytes() == before
    # A bench folder's page into a folder: the same refusal, no traceback, no temp file.
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "meta.json").write_text("{}")
    res = runner.invoke(app, ["report", str(bench), "--html", str(tmp_path / "adir")])
    assert res.exit_code == 2 and "is a directory" in res.output
    assert not list(tmp_path.glob(".adir*"))
    out = tmp_path / "new" / "sub" / "lr.png"
    res = runner.invoke(app, ["lr-find", "linreg-raw", "--num-iter", "20", "--out", str(out)])
    assert res.exit_code == 0 and out.exists(), res.output


def test_the_empty_log_of_a_guard_that_never_stepped_is_a_zero_step_run(tmp_path):
    empty = tmp_path / "run.jsonl"
    empty.write_text("")  # (what Guard(log=...) leaves before its first step)
    res = runner.invoke(app, ["report", str(empty)], env={"COLUMNS": "120"})
    assert res.exit_code == 0 and "steps" in res.output
