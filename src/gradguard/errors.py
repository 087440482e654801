"""Exceptions gradguard raises; each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["ConfigError", "GradGuardError", "GuardUsageError"]


class GradGuardError(Exception):
    """Base class of gradguard's own errors."""


class ConfigError(GradGuardError, ValueError):
    """A setting is invalid; raised at construction, never mid-run."""


class GuardUsageError(GradGuardError, RuntimeError):
    """The guard was called in a way that would silently train on wrong gradients."""
