"""Smoke test for benchmarks/noharm.py: every case runs guarded and not, and the tables are
written. The committed NOHARM.md is the measurement; three steps prove nothing about it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "noharm.py"


def _load():
    spec = importlib.util.spec_from_file_location("gradguard_bench_noharm", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_noharm_script_writes_a_row_per_case(tmp_path):
    try:
        mod = _load()
        out = tmp_path / "NOHARM.md"
        assert mod.main(["--seeds", "2", "--steps", "3", "--out", str(out)]) == 0
        text = out.read_text()
        for name in [*mod.cases(), *mod.noisy_cases()]:
            assert f"| {name} |" in text
        assert "## Verdict" in text and "## Not healthy without a guard" in text
    finally:
        sys.modules.pop("gradguard_bench_noharm", None)


def test_the_harm_test_flags_a_consistent_cost_and_not_noise():
    try:
        mod = _load()
        none = [1.0, 1.1, 0.9, 1.05, 0.95]
        assert not mod.paired(none, none)["harm"]
        worse = mod.paired(none, [v + 0.5 for v in none])
        assert worse["harm"] and worse["worse"] == 5 and worse["p"] < 0.07
        assert not mod.paired(none, [v + 0.01 for v in none])["harm"]
    finally:
        sys.modules.pop("gradguard_bench_noharm", None)
