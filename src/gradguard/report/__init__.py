"""Reports made from recorded runs (the JSONL event log) and from bench results."""

from .html import bench_html, run_log_html, write_bench_report, write_run_log_report
from .summary import RunSummary, summarize

__all__ = ["RunSummary", "bench_html", "run_log_html", "summarize", "write_bench_report",
           "write_run_log_report"]
