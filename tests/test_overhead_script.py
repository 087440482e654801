"""Smoke test for benchmarks/overhead.py: its core runs end to end on a tiny model.

No timing assertions: this only keeps the script from rotting (imports, peers' APIs, the
guard variants, the report and the target table).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("gradguard_bench_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_core_runs_on_a_tiny_model(overhead):
    report = overhead.run(["tiny"], reps=2, warmup=1, steady=False, grad_sets=2,
                          snapshot_reps=1)
    (res,) = report["results"]
    names = [r["variant"] for r in res["rows"]]
    for must in ("foreach_norm (floor)", "clip_grad_norm_ alone", "bare step",
                 "+ clip_grad_norm_", "gradguard default", "gradguard full"):
        assert must in names
    # Every peer is either measured or says why not.
    for peer in ("+ zclip", "+ autoclip", "+ lightning grad_norm", "+ cockpit GradNorm"):
        assert any(n.startswith(peer) for n in names) or any(
            k.startswith(peer) for k in res["skipped"])
    for r in res["rows"]:
        assert r["median_ms"] >= 0 and r["p25_ms"] <= r["p75_ms"]
    assert res["rows"][names.index("bare step")]["x_bare"] == pytest.approx(1.0)
    assert set(res["sync_check"]) == {"gradguard default", "gradguard full"}
    assert all(v == "ok" for v in res["sync_check"].values()), res["sync_check"]
    assert res["snapshot"]["every"] == 100
    md = overhead.markdown(report)
    assert "| gradguard default |" in md and "## Targets" in md
    assert any("1.15×" in t[0] for t in report["targets"])


def test_cli_rejects_unknown_models(overhead):
    with pytest.raises(SystemExit):
        overhead.main(["--models", "nope"])
