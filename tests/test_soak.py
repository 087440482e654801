"""The soak benchmark (benchmarks/soak.py): a short smoke run, and the full run as a benchmark."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("soak", mod)
    spec.loader.exec_module(mod)
    return mod


def test_soak_smoke(one_thread):
    """Every fault kind, a few dozen of them, on real data: no poison, the same accuracy."""
    soak = load_soak()
    # Faults start at step 300: in its first steps a run that fails is treated as failing
    # at its LR (the reason warm-up exists) and the LR is lowered, which a short run
    # cannot recover from. The full soak (8000 steps) starts them at step 20.
    common = {"steps": 700, "seed": 0, "gap": (11, 17), "start": 300}
    clean = soak.run("clean", **common)
    res = soak.run("rollback", kinds=soak.ALL_KINDS, guard=soak.rollback_guard, **common)
    assert res.poisoned_steps == 0 and not res.gave_up
    assert res.total_injected >= 18 and len(res.injected) >= 5, res.injected
    for k in ("nan_grad", "inf_grad", "nan_loss"):  # non-finite faults: always caught
        assert res.detected.get(k, 0) == res.injected.get(k, 0), (k, res)
    ok, rel = soak.verdict(res, clean, min_faults=20)
    assert ok, (res, clean.accuracy, rel)


@pytest.mark.benchmark
def test_soak_full(tmp_path, one_thread):
    """The done criterion at full size (minutes): 0 poisoned steps, >= 500 faults, <= 2%."""
    soak = load_soak()
    assert soak.main(["--out", str(tmp_path)]) == 0, (tmp_path / "SOAK.md").read_text()
