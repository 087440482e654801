"""Exceptions gradguard raises; each message names the problem and the fix."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy

__all__ = ["ConfigError", "GradGuardError", "GuardUsageError", "GuardUsageWarning",
           "InputError", "MissingFileError", "UnknownNameError", "check_int",
           "check_positive", "config_diff"]


class GradGuardError(Exception):
    """Base class of gradguard's own errors."""


class ConfigError(GradGuardError, ValueError):
    """A setting is invalid; raised at construction, never mid-run."""


class GuardUsageError(GradGuardError, RuntimeError):
    """The guard was called in a way that would silently train on wrong gradients."""


class UnknownNameError(GradGuardError, KeyError):
    """A scenario, remedy or other registered name does not exist (the message lists them)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class InputError(GradGuardError, TypeError):
    """What the user handed over has the wrong kind (a sparse gradient, a factory that
    returns the wrong things)."""


class MissingFileError(GradGuardError, FileNotFoundError):
    """A file the user named does not exist."""


class GuardUsageWarning(UserWarning):
    """The guard suspects a mistake it cannot prove (e.g. a GradScaler it was not given)."""


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Validate a numeric knob at construction, so a bad config fails now, not at step 1000."""
    # (numbers.Real: numpy's scalars too, as a config read with numpy hands them over)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


def check_bool(name: str, value: bool) -> bool:
    """Validate an on/off knob: a string such as "False" would read as true."""
    if not isinstance(value, bool | numpy.bool_):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(name: str, value: int, lo: int) -> int:
    """Validate an integer knob (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ConfigError(f"{name} must be an int >= {lo}, got {value!r}")
    return int(value)


def config_diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """The settings that differ, one ``"key: saved → current"`` line each (dicts flattened).

    Args:
        saved: the settings a state was saved with.
        current: the settings of the object loading it.
        prefix: dotted path of ``saved`` inside the whole config.

    Returns:
        One line per differing leaf; empty when the settings are equal.
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(current), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in saved:
                out.append(f"{name}: (absent) → {current[k]!r}")
            elif k not in current:
                out.append(f"{name}: {saved[k]!r} → (absent)")
            else:
                out += config_diff(saved[k], current[k], name)
        return out
    return [] if saved == current else [f"{prefix or 'config'}: {saved!r} → {current!r}"]
