"""Reports made from recorded runs (the JSONL event log)."""

from .summary import RunSummary, summarize

__all__ = ["RunSummary", "summarize"]
