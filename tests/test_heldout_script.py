"""Smoke test for benchmarks/heldout.py: every case and arm runs (in worker processes, as
the docs run it), and the table is written.

No assertions on the losses: three steps prove nothing about them; the committed
HELDOUT.md is the measurement.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "heldout.py"


def test_heldout_script_writes_a_row_per_case_and_lr(tmp_path):
    spec = importlib.util.spec_from_file_location("gradguard_bench_heldout", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        out = tmp_path / "HELDOUT.md"
        assert mod.main(["--seeds", "1", "--steps", "3", "--jobs", "2", "--out", str(out)]) == 0
        text = out.read_text()
        rows = sum(len(c[4]) for c in mod.cases().values())
        assert text.count("\n| ") - len(mod.cases()) == rows  # minus one header per case
        assert "## Tally" in text and "rnn-memory" in text
    finally:
        sys.modules.pop(spec.name, None)
