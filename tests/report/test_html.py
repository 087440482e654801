"""HTML reports, rendered in real headless Chromium.

The bench directory is produced here from real short training runs by ``_write_bench``, a
small stand-in for the ``gradguard bench`` writer that follows the same file contract
(meta.json, runs.csv, curves.jsonl, summary.csv, results.md, logs/).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gradguard as gg
from gradguard.cli import app
from gradguard.report import bench_html, run_log_html, write_bench_report, write_run_log_report
from gradguard.scenarios import get, run
from tests.conftest import backward, small_mlp

SCENARIO, LRS, SEEDS, STEPS = "linreg-raw", (1e-4, 1e-3), (0,), 60
DEFAULT_LR = 1e-3
RUN_COLUMNS = ["scenario", "remedy", "lr", "seed", "steps", "diverged", "diverged_at",
               "first_nonfinite", "gave_up", "initial_loss", "final_train_loss",
               "final_test_loss", "metric_name", "final_metric", "clipped", "skipped",
               "rollbacks", "seconds"]
SUMMARY_COLUMNS = ["scenario", "remedy", "runs", "diverged_runs", "stable_lo", "stable_hi",
                   "stable_decades", "lr_sensitivity", "default_lr_test_loss",
                   "default_lr_metric", "default_lr_diverged", "clipped", "skipped", "seconds"]
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                 "--virtual-time-budget=5000"]


def _cell(v: float | int | None) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(int(v))
    return repr(v) if isinstance(v, int) or math.isfinite(v) else str(v)  # inf / nan


def _json_list(xs: list[float]) -> list[float | None]:
    return [x if math.isfinite(x) else None for x in xs]


def _write_bench(d: Path) -> None:
    """Train 2 remedies × 2 LRs × 1 seed on linreg-raw and write a bench directory."""
    scn = get(SCENARIO)
    d.mkdir(parents=True, exist_ok=True)
    (d / "logs").mkdir()
    runs, curves = [], []
    for remedy in ("none", "gradguard"):
        for lr in LRS:
            for seed in SEEDS:
                log = d / "logs" / f"{SCENARIO}__{remedy}.jsonl"
                keep_log = remedy != "none" and lr == DEFAULT_LR and seed == 0
                guard = None if remedy == "none" else (
                    lambda m, o, s, log=log, keep=keep_log: gg.Guard(
                        m, o, scaler=s, log=log if keep else None))
                res = run(SCENARIO, lr=lr, seed=seed, steps=STEPS, guard=guard)
                runs.append({
                    "scenario": SCENARIO, "remedy": remedy, "lr": lr, "seed": seed,
                    "steps": STEPS, "diverged": res.diverged, "diverged_at": res.diverged_at,
                    "first_nonfinite": res.first_nonfinite, "gave_up": res.gave_up,
                    "initial_loss": res.losses[0], "final_train_loss": res.final_train_loss,
                    "final_test_loss": res.final_loss, "metric_name": scn.metric,
                    "final_metric": res.final_metric, "clipped": res.clipped,
                    "skipped": res.skipped, "rollbacks": res.rollbacks,
                    "seconds": res.seconds})
                curves.append({"scenario": SCENARIO, "remedy": remedy, "lr": lr, "seed": seed,
                               "losses": _json_list(res.losses),
                               "grad_norms": _json_list(res.grad_norms),
                               "clipped_norms": _json_list(res.clipped_norms)})
    with open(d / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RUN_COLUMNS)
        w.writerows([_cell(r[c]) if not isinstance(r[c], str) else r[c] for c in RUN_COLUMNS]
                     for r in runs)
    (d / "curves.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curves))
    summary = []
    for remedy in ("none", "gradguard"):
        mine = [r for r in runs if r["remedy"] == remedy]
        stable = [r["lr"] for r in mine if not r["diverged"]]
        capped = [min(r["final_test_loss"], r["initial_loss"]) for r in mine]
        default = next(r for r in mine if r["lr"] == DEFAULT_LR)
        summary.append({
            "scenario": SCENARIO, "remedy": remedy, "runs": len(mine),
            "diverged_runs": sum(r["diverged"] for r in mine),
            "stable_lo": min(stable) if stable else None,
            "stable_hi": max(stable) if stable else None,
            "stable_decades": math.log10(max(stable) / min(stable)) if stable else 0.0,
            "lr_sensitivity": float(np.mean(capped)) - min(capped),
            "default_lr_test_loss": default["final_test_loss"], "default_lr_metric": None,
            "default_lr_diverged": float(default["diverged"]),
            "clipped": sum(r["clipped"] for r in mine), "skipped": sum(r["skipped"] for r in mine),
            "seconds": sum(r["seconds"] for r in mine)})
    with open(d / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        w.writerows([_cell(s[c]) if not isinstance(s[c], str) else s[c]
                      for c in SUMMARY_COLUMNS] for s in summary)
    (d / "results.md").write_text(
        "| scenario | remedy | diverged runs |\n|---|---|---|\n"
        + "".join(f"| {s['scenario']} | {s['remedy']} | {s['diverged_runs']} |\n"
                  for s in summary))
    (d / "meta.json").write_text(json.dumps({
        "command": "test_html._write_bench", "created": datetime.now(UTC).isoformat(),
        "torch": torch.__version__, "machine": "test",
        "scenarios": {SCENARIO: {"lr": DEFAULT_LR, "grid": list(LRS), "metric": scn.metric,
                                 "summary": scn.summary}},
        "remedies": {"none": "no guard", "gradguard": "gg.Guard() with its defaults"},
        "seeds": list(SEEDS), "steps": {SCENARIO: STEPS}}))


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bench") / "results"
    _write_bench(d)
    return d


@pytest.fixture(scope="module")
def nan_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A guard log with a non-finite step (skipped) among healthy ones."""
    path = tmp_path_factory.mktemp("log") / "run.jsonl"
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gg.Guard(model, opt, log=path) as guard:
        for s in range(30):
            opt.zero_grad()
            guard.step(backward(model, seed=s, nan=s == 20))
    return path


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium not installed: apt-get install chromium (make test installs it)")


def _chromium(browser: str, profile: Path, *args: str) -> str:
    res = subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _render(browser: str, page: Path, tmp: Path) -> tuple[str, np.ndarray]:
    """The DOM after load, and a 1280×2000 screenshot, of ``page`` in headless Chromium."""
    dom = _chromium(browser, tmp / "profile-dom", "--dump-dom", page.as_uri())
    shot = tmp / "page.png"
    _chromium(browser, tmp / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000",
              page.as_uri())
    import matplotlib.image

    return dom, matplotlib.image.imread(shot)


def _assert_rendered(dom: str, pixels: np.ndarray, headings: list[str]) -> None:
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    ok = re.search(r'data-images-ok="(\d+)"', body.group(0))
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    assert ok and total, body.group(0)
    assert int(total.group(1)) > 0 and ok.group(1) == total.group(1)
    for h in headings:
        assert f"<h2>{h}</h2>" in dom, h
    assert pixels.shape[:2] == (2000, 1280)
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.std(axis=0).max() > 0.05  # not one flat colour
    assert len(np.unique((rgb[::7] * 255).astype(np.uint8), axis=0)) > 50  # plots, not text


def test_run_log_page_renders_in_chromium(chromium, nan_log, tmp_path):
    out = write_run_log_report(nan_log, tmp_path / "run.html")
    text = out.read_text()
    assert 'src="http' not in text and "<link" not in text  # nothing fetched
    assert text.count("data:image/png;base64,") == 3  # loss, norm, heatmap
    dom, pixels = _render(chromium, out, tmp_path)
    _assert_rendered(dom, pixels, ["Summary", "Loss", "Gradient norm",
                                   "Per-layer gradient norms", "Events"])
    assert "nonfinite" in dom and "first trouble" in dom


def test_bench_page_renders_in_chromium(chromium, bench_dir, tmp_path):
    out = write_bench_report(bench_dir, tmp_path / "bench.html")
    text = out.read_text()
    # loss curves, norms, LR sensitivity, one heatmap from logs/
    assert text.count("data:image/png;base64,") == 4
    assert "is absent" not in text
    dom, pixels = _render(chromium, out, tmp_path)
    _assert_rendered(dom, pixels, ["Setup", "Results", "Loss curves", "Gradient norms",
                                   "LR sensitivity", "Per-layer gradient norms"])
    assert "gradguard" in dom and "lr_sensitivity" in dom and "all 4 runs" in dom


def test_bench_page_survives_missing_files_and_nonfinite_runs(bench_dir, tmp_path):
    d = tmp_path / "partial"
    d.mkdir()
    rows = list(csv.reader((bench_dir / "runs.csv").read_text().splitlines()))
    rows[1][rows[0].index("final_test_loss")] = "nan"
    rows[2][rows[0].index("final_test_loss")] = "inf"
    with open(d / "runs.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    text = bench_html(d)
    for missing in ("meta.json", "curves.jsonl", "summary.csv and results.md", "logs/"):
        assert missing in text and "absent" in text
    assert text.count("data:image/png;base64,") == 1  # LR sensitivity from runs.csv alone
    assert '<span class="bad">NaN</span>' in text
    empty = bench_html(tmp_path / "nothing-here")
    assert "data:image" not in empty and "runs.csv is absent" in empty


def test_run_log_page_of_a_log_without_steps(tmp_path):
    log = tmp_path / "torn.jsonl"
    log.write_text('{"type":"meta","format":1,"params":["w"]}\n{"type":"step","ste')
    text = run_log_html(log)
    assert "no step records" in text and "no per-layer norms" in text


def test_run_log_page_of_a_run_stepped_without_a_loss(tmp_path):
    # (its loss plot showed the loss turning NaN at step 0)
    model = small_mlp()
    log = tmp_path / "run.jsonl"
    with gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.01), log=log) as guard:
        for i in range(5):
            model.zero_grad()
            backward(model, seed=i)
            guard.step()
    text = run_log_html(log)
    assert "No loss was passed to guard.step" in text and "non-finite" not in text


def test_cli_report_says_when_a_run_did_not_reach_its_verdict(tmp_path):
    import gradguard as gg

    runner = CliRunner()
    for closed in (True, False):
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        log = tmp_path / f"run-{closed}.jsonl"
        guard = gg.Guard(model, opt, log=str(log))
        for _ in range(5):
            opt.zero_grad()
            loss = model(torch.randn(4, 3)).pow(2).mean()
            loss.backward()
            guard.step(loss)
        if closed:
            guard.close()
        else:
            guard.recorder.flush()
            with log.open("a") as f:
                f.write('{"type":"step","ste')  # killed mid-write, before guard.close()
        res = runner.invoke(app, ["report", str(log)], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert ("no verdict: the log ends before the guard was closed" in res.output) \
            is not closed
        assert ("verdict: stable" in res.output) is closed
        guard.close()


def test_cli_report_writes_html_only_when_asked(nan_log, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(nan_log)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "skipped steps" in res.output and "HTML report" not in res.output
    assert not nan_log.with_suffix(".html").exists()
    out = tmp_path / "sub" / "r.html"
    res = runner.invoke(app, ["report", str(nan_log), "--html", str(out)],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "skipped steps" in res.output and f"HTML report: {out}" in res.output
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_cli_report_of_a_bench_dir_writes_report_html(bench_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(bench_dir)])
    assert res.exit_code == 0, res.output
    assert f"HTML report: {bench_dir / 'report.html'}" in res.output
    assert (bench_dir / "report.html").stat().st_size > 10_000
    partial = tmp_path / "partial"  # no training data to draw: a quick page
    partial.mkdir()
    shutil.copy(bench_dir / "meta.json", partial)
    out = tmp_path / "elsewhere.html"
    res = runner.invoke(app, ["report", str(partial), "--html", str(out)])
    assert res.exit_code == 0 and out.exists() and not (partial / "report.html").exists()
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "no such run log" in res.output


def test_cli_report_prints_log_text_as_text_not_markup(tmp_path):
    # A snapshot folder named "[bold]exp[/bold]": rich would print "exp", a path that
    # does not exist.
    import gradguard as gg

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log = tmp_path / "[bold]run[/bold].jsonl"
    folder = tmp_path / "[bold]exp[/bold]"
    guard = gg.Guard(model, opt, log=str(log), rollback=gg.Rollback(every=5, dir=str(folder)))
    for _ in range(20):
        opt.zero_grad()
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        guard.step(loss)
    guard.close()
    res = CliRunner().invoke(app, ["report", str(log)], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert "[bold]exp[/bold]" in res.output and "[bold]run[/bold].jsonl" in res.output


def test_cli_report_never_writes_the_page_over_the_bench_inputs(bench_dir, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(bench_dir, d)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    runner = CliRunner()
    log = next((d / "logs").glob("*.jsonl"))
    for target in ("runs.csv", "summary.csv", "meta.json", "curves.jsonl", "results.md",
                   str(log.relative_to(d)), "logs/new.jsonl", "./runs.csv"):
        res = runner.invoke(app, ["report", str(d), "--html", str(d / target)])
        assert res.exit_code == 2, (target, res.output)
        assert "is an input file of the bench directory" in " ".join(res.output.split())
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match="input file"):
        write_bench_report(d, d / "runs.csv")
    res = runner.invoke(app, ["report", str(d), "--html", str(d / "page.html")])
    assert res.exit_code == 0 and (d / "page.html").exists()


def _corrupt(bench_dir: Path, tmp_path: Path, name: str, how) -> Path:
    d = tmp_path / name
    shutil.copytree(bench_dir, d)
    (d / "report.html").unlink(missing_ok=True)
    how(d)
    return d


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_cli_report_of_a_bench_dir_with_malformed_files_warns_not_crashes(bench_dir, tmp_path):
    def first_seed_null(d: Path) -> None:
        lines = (d / "curves.jsonl").read_text().splitlines()
        rec = json.loads(lines[0])
        rec["seed"] = None
        (d / "curves.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")

    cases = {
        "sumhdr": (lambda d: (d / "summary.csv").write_text(
            (d / "summary.csv").read_text().replace("scenario", "scen", 1)),
            "summary.csv: 2 row(s) without a scenario and remedy"),
        "metalist": (lambda d: (d / "meta.json").write_text("[1, 2]"),
                     "meta.json is not a JSON object: ignored"),
        "metabad": (lambda d: (d / "meta.json").write_text(
            json.dumps({"scenarios": {SCENARIO: {"lr": "abc"}}, "seeds": "x",
                        "steps": [1]})), "has no usable default lr ('abc')"),
        "metatrunc": (lambda d: (d / "meta.json").write_text('{"scenarios": {'),
                      "meta.json is not valid JSON: ignored"),
        "seednull": (first_seed_null, "curves.jsonl: 1 record(s) without a usable"),
        "lrx": (lambda d: _append(d / "curves.jsonl", json.dumps(
            {"scenario": SCENARIO, "remedy": "none", "lr": "x", "seed": 0}) + "\n"),
            "curves.jsonl: 1 record(s) without a usable"),
        "runsbin": (lambda d: (d / "runs.csv").write_bytes(bytes(range(128, 256)) * 8),
                    "runs.csv is not UTF-8 text: ignored"),
        "runsextra": (lambda d: (d / "runs.csv").write_text(
            (d / "runs.csv").read_text().replace("\n", ",surplus,cells\n", 2)), None),
        "logbin": (lambda d: next((d / "logs").glob("*.jsonl")).write_bytes(b"\xff\xfe" * 50),
                   None),
    }
    runner = CliRunner()
    for name, (how, warned) in cases.items():
        d = _corrupt(bench_dir, tmp_path, name, how)
        res = runner.invoke(app, ["report", str(d), "--html", str(tmp_path / f"{name}.html")],
                            env={"COLUMNS": "300"})
        said = " ".join(res.output.split())
        assert res.exit_code == 0 and res.exception is None, (name, res.output)
        assert "HTML report:" in said, (name, said)
        if warned:
            assert "warning: " in said and warned in said, (name, said)
            page = (tmp_path / f"{name}.html").read_text()
            assert "Left out (unreadable)" in page, name
