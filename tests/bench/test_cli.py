"""``gradguard bench`` from the command line."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
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


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
def test_ctrl_c_stops_a_bench_with_workers_at_once_and_writes_nothing(tmp_path):
    # Ctrl-C in a terminal reaches the whole process group: the workers too.
    out = tmp_path / "bench"
    (out / "logs").mkdir(parents=True)
    for name in ("runs.csv", "meta.json", "summary.csv", "report.html"):
        (out / name).write_text(f"old {name}\n")
    (out / "logs" / "mlp-init__gradguard.jsonl").write_text("old log\n")
    before = {p: p.read_text() for p in out.rglob("*") if p.is_file()}
    # 8 long runs on 2 workers: minutes if the pool waited for its queue. The first run
    # (gradguard at the default LR, seed 0) writes a guard log: then the workers run.
    # (SIGINT as a terminal's shell leaves it: a test run started in the background, with
    # `make test &`, hands its children SIGINT ignored, and the bench would not see it; and
    # SIGUSR1 prints the bench's threads if it ever hangs)
    cmd = [sys.executable, "-c", "import faulthandler, signal; signal.signal(signal.SIGINT, "
           "signal.default_int_handler); faulthandler.register(signal.SIGUSR1, "
           "all_threads=True); from gradguard.cli import main; main()",
           "bench", "-s", "mlp-init", "-r", "gradguard", "-r", "none", "--seeds", "2",
           "--steps", "5000", "--lr-grid", "1e-2,1e-1", "--jobs", "2", "--no-html", "--out",
           str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"})
    try:
        head = []
        for line in p.stdout:  # (until the bench starts its workers)
            head.append(line)
            if "worker(s)" in line:
                break
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and p.poll() is None and not any(
                q.stat().st_size for q in out.rglob("mlp-init__gradguard.jsonl")
                if q.read_text(errors="replace") != "old log\n"):
            time.sleep(0.2)
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGINT)
        try:
            rest, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGUSR1)  # (its threads' stacks: where it waits)
            time.sleep(2)
            os.killpg(p.pid, signal.SIGKILL)
            stacks, _ = p.communicate()
            pytest.fail("the bench still ran 30 s after Ctrl-C; its threads:\n"
                        + stacks[-8000:])
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    said = "".join(head) + rest
    assert p.returncode == 130, said
    assert "interrupted: " in said and "of 8 runs had finished; nothing was written" in said
    assert "Traceback" not in said
    assert {q: q.read_text() for q in out.rglob("*") if q.is_file()} == before
    assert [q.name for q in out.iterdir() if q.name.startswith(".")] == []
    for _ in range(100):  # the workers were stopped, not left running
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("processes of the bench still run after it exited")


def test_explicit_options_win_over_the_quick_preset(tmp_path):
    base = ["bench", "--quick", "-s", "linreg-raw", "-r", "none", "--steps", "5", "--jobs",
            "1", "--no-html", "--out", str(tmp_path)]
    res = runner.invoke(app, [*base, "--lr-grid", "1e-3", "--seeds", "3"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert "3 runs on 1 worker(s)" in res.output
    rows = csv.DictReader((tmp_path / "runs.csv").read_text().splitlines())
    assert {r["seed"] for r in rows} == {"0", "1", "2"}
    from gradguard.scenarios import get

    cfg_grid = len(get("linreg-raw").grid())
    res = runner.invoke(app, [*base, "--lr-points", "1"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert f"{cfg_grid} runs on 1 worker(s)" in res.output  # (the preset keeps every 2nd)


def test_no_html_rerun_removes_the_previous_report_page(tmp_path):
    (tmp_path / "report.html").write_text("<p>another bench</p>")
    res = runner.invoke(app, ["bench", "-s", "linreg-raw", "-r", "none", "--lr-grid", "1e-3",
                              "--seeds", "1", "--steps", "5", "--jobs", "1", "--no-html",
                              "--out", str(tmp_path)], env=WIDE)
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "report.html").exists()
    assert "Removed the previous bench's" in res.output


def test_python_m_gradguard_cli_knows_every_command():
    res = subprocess.run([sys.executable, "-m", "gradguard.cli", "bench", "--list"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "linreg-raw" in res.stdout
