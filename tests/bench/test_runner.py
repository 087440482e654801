"""The bench end to end on real data: runs, files, determinism across worker processes."""

import csv
import json
import math
import os

import pytest

from gradguard.bench import REMEDIES, BenchConfig, Job, run_bench, run_one
from gradguard.bench.runner import RUN_COLUMNS


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    (out / "logs").mkdir()
    (out / "logs" / "mine.jsonl").write_text("a user's own file\n")  # (left alone)
    (out / "logs" / "linreg-raw__clip-norm.jsonl").write_text("")  # (a previous bench's)
    cfg = BenchConfig(scenarios=["linreg-raw"], remedies=["none", "clip-norm", "gradguard"],
                      seeds=(0,), lr_grid=[1e-5, 1e-3], steps=80, jobs=1, out=out,
                      command="test")
    return run_bench(cfg), out


def test_a_rerun_replaces_its_own_logs_only(small_bench):
    _, out = small_bench
    assert (out / "logs" / "mine.jsonl").read_text() == "a user's own file\n"
    assert not (out / "logs" / "linreg-raw__clip-norm.jsonl").exists()  # (no guard there)


def test_bench_writes_every_file_with_real_outcomes(small_bench):
    res, out = small_bench
    rows = read_csv(out / "runs.csv")
    assert list(rows[0]) == list(RUN_COLUMNS)
    assert len(rows) == 3 * 2
    cell = {(r["remedy"], float(r["lr"])): r for r in rows}
    # raw-unit SGD at 1e-3 blows up; the guard and torch's clip keep it finite
    assert cell[("none", 1e-3)]["diverged"] == "1"
    assert cell[("none", 1e-3)]["final_test_loss"] == "inf"
    assert cell[("gradguard", 1e-3)]["diverged"] == "0"
    assert int(cell[("gradguard", 1e-3)]["skipped"]) > 0
    assert int(cell[("clip-norm", 1e-3)]["clipped"]) > 0
    assert cell[("none", 1e-5)]["diverged"] == "0"
    curves = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert len(curves) == 6 and all(len(c["losses"]) == 80 for c in curves)
    bad = next(c for c in curves if c["remedy"] == "none" and c["lr"] == 1e-3)
    assert None in bad["losses"]  # NaN written as JSON null
    summary = {r["remedy"]: r for r in read_csv(out / "summary.csv")}
    assert summary["none"]["stable_hi"] == "1e-05"
    assert float(summary["gradguard"]["stable_decades"]) == pytest.approx(2.0)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"] == "test" and meta["scenarios"]["linreg-raw"]["grid"] == [1e-5, 1e-3]
    assert (out / "logs" / "linreg-raw__gradguard.jsonl").exists()
    assert not (out / "logs" / "linreg-raw__none.jsonl").exists()
    assert "| gradguard |" in (out / "results.md").read_text()
    assert res.summary and not res.skipped_remedies


def test_worker_processes_give_the_same_results(small_bench, tmp_path):
    _, out = small_bench
    cfg = BenchConfig(scenarios=["linreg-raw"], remedies=["none", "clip-norm", "gradguard"],
                      seeds=(0,), lr_grid=[1e-5, 1e-3], steps=80, jobs=2, out=tmp_path)
    run_bench(cfg)
    for a, b in zip(read_csv(out / "runs.csv"), read_csv(tmp_path / "runs.csv"), strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == \
            {k: v for k, v in b.items() if k != "seconds"}


def test_one_job_runs_single_threaded_like_a_worker(tmp_path, monkeypatch):
    # A run's numbers must not depend on --jobs: the workers are single-threaded, so the
    # in-process path is too (a CNN's kernels reduce in another order with 2 threads,
    # and a chaotic run then ends elsewhere), and the caller's setting comes back.
    import torch

    from gradguard.bench import runner

    seen = []
    real = runner.run_one
    monkeypatch.setattr(runner, "run_one",
                        lambda job: (seen.append(torch.get_num_threads()), real(job))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_bench(BenchConfig(scenarios=["linreg-raw"], remedies=["none"], seeds=(0,),
                              lr_grid=[1e-5], steps=5, jobs=1, out=tmp_path))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("remedy", [r for r in REMEDIES if r != "none"])
def test_every_remedy_trains_a_real_model(remedy):
    row, curve = run_one(Job("mlp-corrupt", remedy, 0.01, 0, 25))
    assert row["error"] == ""
    assert len(curve["losses"]) == 25 and math.isfinite(row["final_test_loss"])


def test_bad_config_is_refused_before_any_run(tmp_path):
    with pytest.raises(KeyError, match="linreg-raw"):
        run_bench(BenchConfig(scenarios=["nope"], remedies=["none"], out=tmp_path))
    with pytest.raises(KeyError, match="gradguard"):
        run_bench(BenchConfig(scenarios=["linreg-raw"], remedies=["nope"], out=tmp_path))
    with pytest.raises(ValueError, match="positive"):
        run_bench(BenchConfig(scenarios=["linreg-raw"], remedies=["none"], lr_grid=[-1.0],
                              out=tmp_path))
    assert not (tmp_path / "runs.csv").exists()


def test_resummarize_recomputes_with_a_new_tolerance(small_bench, tmp_path):
    import shutil

    from gradguard.bench.runner import resummarize

    _, out = small_bench
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    loose = {s.remedy: s for s in resummarize(copy, tol=0.99)}
    assert loose["gradguard"].stable_decades == pytest.approx(2.0)
    assert json.loads((copy / "meta.json").read_text())["tol"] == 0.99
    assert "widest stable LR range, alone or tied, on" in (copy / "results.md").read_text()
    assert (copy / "curves.jsonl").read_text() == (out / "curves.jsonl").read_text()


def test_duplicate_names_seeds_and_lrs_are_one_cell(tmp_path):
    from gradguard.bench.runner import plan_jobs

    cfg = BenchConfig(scenarios=["linreg-raw", "linreg-raw"], remedies=["none", "none"],
                      seeds=(0, 0), lr_grid=[1e-5, 1e-3, 1e-5], steps=5, jobs=1, out=tmp_path,
                      command="test")
    jobs, _ = plan_jobs(cfg)
    assert [(j.scenario, j.remedy, j.lr, j.seed) for j in jobs] == [
        ("linreg-raw", "none", 1e-5, 0), ("linreg-raw", "none", 1e-3, 0)]
    res = run_bench(cfg)
    assert len(read_csv(tmp_path / "runs.csv")) == 2
    (s,) = res.summary
    assert s.runs == 2
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["seeds"] == [0] and meta["scenarios"]["linreg-raw"]["grid"] == [1e-5, 1e-3]


def _old_bench(out):
    """A folder as a previous bench left it: its files, a guard log, its report page."""
    (out / "logs").mkdir(parents=True)
    for name in ("runs.csv", "summary.csv", "meta.json", "curves.jsonl", "results.md",
                 "report.html"):
        (out / name).write_text(f"old {name}\n")
    (out / "logs" / "linreg-raw__gradguard.jsonl").write_text("old log\n")
    (out / "logs" / "mine.jsonl").write_text("a user's own file\n")
    return {p: p.read_text() for p in out.rglob("*") if p.is_file()}


def test_an_interrupted_bench_leaves_the_folder_as_it_was(tmp_path):
    from gradguard.bench import BenchInterrupted

    old = _old_bench(tmp_path)
    cfg = BenchConfig(scenarios=["linreg-raw"], remedies=["none", "gradguard"], seeds=(0,),
                      lr_grid=[1e-5, 1e-3], steps=5, jobs=1, out=tmp_path, command="test")

    def ctrl_c(job, row, done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(BenchInterrupted) as info:
        run_bench(cfg, progress=ctrl_c)
    assert (info.value.done, info.value.total, info.value.written) == (2, 4, False)
    # Not one file of the previous bench replaced or deleted, none of this one's left.
    assert {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()} == old
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # A folder the bench made for itself goes again.
    with pytest.raises(BenchInterrupted):
        run_bench(BenchConfig(scenarios=["linreg-raw"], remedies=["none"], seeds=(0, 1),
                              lr_grid=[1e-5], steps=5, jobs=1, out=tmp_path / "new"),
                  progress=ctrl_c)
    assert not (tmp_path / "new").exists()


def test_a_finished_bench_replaces_the_previous_one_whole(tmp_path):
    _old_bench(tmp_path)
    run_bench(BenchConfig(scenarios=["linreg-raw"], remedies=["none", "gradguard"],
                          seeds=(0,), lr_grid=[1e-3], steps=5, jobs=1, out=tmp_path,
                          command="test"))
    for name in ("runs.csv", "summary.csv", "meta.json", "curves.jsonl", "results.md"):
        assert not (tmp_path / name).read_text().startswith("old"), name
    # The previous bench's page described another bench: gone (the CLI writes a new one).
    assert not (tmp_path / "report.html").exists()
    assert (tmp_path / "logs" / "linreg-raw__gradguard.jsonl").read_text() != "old log\n"
    assert (tmp_path / "logs" / "mine.jsonl").read_text() == "a user's own file\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_logs_on_another_file_system_are_moved_in(tmp_path, monkeypatch):
    # logs/ may be a link to another file system, where a rename fails (EXDEV): the
    # finished bench must still land whole, the previous one's logs replaced.
    import errno

    def cross_device(real):
        def move(src, dst, *a, **kw):
            if ".bench-partial" in str(src) and os.path.basename(os.path.dirname(dst)) == "logs":
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(src, dst, *a, **kw)
        return move

    _old_bench(tmp_path)
    monkeypatch.setattr(os, "rename", cross_device(os.rename))
    monkeypatch.setattr(os, "replace", cross_device(os.replace))
    run_bench(BenchConfig(scenarios=["linreg-raw"], remedies=["none", "gradguard"],
                          seeds=(0,), lr_grid=[1e-3], steps=5, jobs=1, out=tmp_path,
                          command="test"))
    assert (tmp_path / "logs" / "linreg-raw__gradguard.jsonl").read_text() != "old log\n"
    assert not (tmp_path / "runs.csv").read_text().startswith("old")
