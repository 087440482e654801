"""Exceptions gradguard raises; each message names the problem and the fix."""

from __future__ import annotations

import math

__all__ = ["ConfigError", "GradGuardError", "GuardUsageError", "check_int", "check_positive"]


class GradGuardError(Exception):
    """Base class of gradguard's own errors."""


class ConfigError(GradGuardError, ValueError):
    """A setting is invalid; raised at construction, never mid-run."""


class GuardUsageError(GradGuardError, RuntimeError):
    """The guard was called in a way that would silently train on wrong gradients."""


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Validate a numeric knob at construction, so a bad config fails now, not at step 1000."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


def check_int(name: str, value: int, lo: int) -> int:
    """Validate an integer knob (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an int >= {lo}, got {value!r}")
    return value
