"""``gradguard bench``: reproduce explosions on real data and compare remedies side by side.

Example::

    from gradguard.bench import BenchConfig, run_bench
    res = run_bench(BenchConfig(scenarios=["linreg-raw"], remedies=["none", "gradguard"]))
    print((res.out / "results.md").read_text())
"""

from .metrics import SummaryRow, summarize
from .remedies import REMEDIES, Remedy
from .runner import (
    QUICK,
    RUN_COLUMNS,
    BenchConfig,
    BenchInterrupted,
    BenchResult,
    Job,
    run_bench,
    run_one,
)

__all__ = ["QUICK", "REMEDIES", "RUN_COLUMNS", "BenchConfig", "BenchInterrupted", "BenchResult",
           "Job", "Remedy", "SummaryRow", "run_bench", "run_one", "summarize"]
