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


@pytest.mark.parametrize("name", ["doctor", "fixes", "report", "scenarios", "bench",
                                  "integrations", "testing"])
def test_subpackages_load_on_first_attribute_access(name):
    mod = getattr(gg, name)
    assert mod.__name__ == f"gradguard.{name}"
    assert name in dir(gg)


def test_documented_names_resolve():
    assert callable(gg.fixes.reinit) and callable(gg.doctor.diagnose)
    assert callable(gg.fixes.MaxNorm) and callable(gg.report.summarize)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fixez'"):
        gg.fixez  # noqa: B018
