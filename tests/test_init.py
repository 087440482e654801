"""``import gradguard as gg`` is cheap, and every subpackage is one attribute away."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gradguard as gg


def test_import_loads_no_heavy_subpackage_or_dependency():
    heavy = ("gradguard.doctor", "gradguard.fixes", "gradguard.report", "gradguard.bench",
             "gradguard.scenarios", "gradguard.integrations", "matplotlib", "sklearn",
             "transformers", "lightning", "pandas", "typer")
    code = ("import sys, gradguard; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


SUBPACKAGES = ("doctor", "fixes", "report", "scenarios", "bench", "integrations", "testing")


def test_subpackages_load_on_first_attribute_access():
    # In a fresh interpreter: in this one, other tests have imported them already.
    code = ("import gradguard as gg; "
            "print(all(getattr(gg, n).__name__ == 'gradguard.' + n for n in "
            f"{SUBPACKAGES!r}), callable(gg.fixes.reinit), callable(gg.doctor.diagnose), "
            "callable(gg.fixes.MaxNorm), callable(gg.report.summarize), "
            f"all(n in dir(gg) for n in {SUBPACKAGES!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True"] * 6


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fixez'"):
        gg.fixez  # noqa: B018
