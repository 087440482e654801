"""Findings: what the doctor concludes, with evidence, ranked by likely root cause."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["CAUSES", "EVIDENCE", "SEVERITIES", "Diagnosis", "Finding"]

SEVERITIES = ("critical", "warning", "info")
# Causal precedence: a too-high LR is often the *symptom* of raw inputs or a bad init, so
# when both are flagged at the same severity the upstream cause is listed first.
# "run_log" is not a cause but evidence (what a guarded run recorded); it is listed last
# and is never the root cause.
CAUSES = ("nonfinite", "precision", "input_scale", "init", "recurrent", "architecture",
          "activations", "learning_rate", "run_log")
EVIDENCE = ("run_log",)


@dataclass
class Finding:
    """One conclusion of the doctor.

    Attributes:
        check: which check produced it (one of :data:`CAUSES`).
        severity: "critical", "warning" or "info".
        title: one line for humans.
        evidence: the numbers behind it.
        layers: the layers (or features) involved.
        fix: what to do, concretely.
        fix_code: a line of code that applies the fix, when there is one.
        score: size of the effect (log10 of a ratio, mostly), used to rank within a severity.
    """

    check: str
    severity: str
    title: str
    evidence: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    fix: str = ""
    fix_code: str = ""
    score: float = 0.0

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ConfigError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        if self.check not in CAUSES:
            raise ConfigError(f"check must be one of {CAUSES}, got {self.check!r}")

    @property
    def rank_key(self) -> tuple[int, int, float]:
        return (SEVERITIES.index(self.severity), CAUSES.index(self.check), -self.score)


def jsonable(v: Any) -> Any:
    """``v`` with NaN/Inf floats as the strings "nan"/"inf"/"-inf", at any depth: strict
    JSON for ``json.dumps`` (``--json`` output)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return v


@dataclass
class Diagnosis:
    """All findings, most likely root cause first, plus the raw measurements."""

    findings: list[Finding] = field(default_factory=list)
    measurements: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.findings.sort(key=lambda f: f.rank_key)

    @property
    def root_cause(self) -> Finding | None:
        """The top cause above "info", or None for a healthy setup (evidence never counts)."""
        return next((f for f in self.findings
                     if f.severity != "info" and f.check not in EVIDENCE), None)

    @property
    def healthy(self) -> bool:
        """True when no finding is above "info"."""
        return all(f.severity == "info" for f in self.findings)

    def by_check(self, check: str) -> list[Finding]:
        """The findings of one check."""
        return [f for f in self.findings if f.check == check]

    def __str__(self) -> str:
        """The findings as text, most likely root cause first; says so when all is well."""
        lines = []
        for i, f in enumerate(self.findings, 1):
            lines.append(f"{i}. {f.severity.upper()} {f.check}: {f.title}")
            if f.fix:
                lines.append(f"   fix: {f.fix}")
            if f.fix_code:
                lines.append(f"   {f.fix_code}")
        rc = self.root_cause
        if rc is not None:
            lines.append(f"most likely root cause: {rc.check}")
        elif not self.healthy:
            lines.append("no root cause: the warnings above are evidence, not a cause")
        else:
            lines.append("no problem found: nothing above info")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "root_cause": self.root_cause.check if self.root_cause else None,
            "findings": [asdict(f) for f in self.findings],
            "measurements": self.measurements,
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
