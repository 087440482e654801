"""Typed records of a run log: what :func:`gradguard.read_jsonl` yields.

A JSONL run log holds three kinds of line (see :mod:`gradguard.record` for the schema):
the run's :class:`Meta`, one :class:`StepRecord` per step and an :class:`Event` per thing
the guard noticed or did. Each is a frozen dataclass with typed fields; keys a newer
gradguard writes that this one does not know land in ``extra``.

They are also read-only mappings (``rec["loss"]``, ``rec.get("lr")``, ``"norms" in rec``)
over the same fields, so code written against the plain dicts of earlier versions keeps
working. A field that is None (``lr`` or ``norms`` not logged at that step) is absent from
the mapping, as the key was absent from the line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["Event", "Meta", "StepRecord", "typed"]

_FIELDS: dict[type, dict[str, Any]] = {}  # per record class: field name -> default


class _Record(Mapping[str, Any]):
    """Mapping access to a record's fields (None fields absent) and its ``extra`` keys."""

    type: ClassVar[str]
    extra: dict[str, Any]

    @classmethod
    def _field_names(cls) -> dict[str, Any]:
        """The typed fields (not ``extra``) and their defaults, computed once per class."""
        names = _FIELDS.get(cls)
        if names is None:
            names = _FIELDS[cls] = {
                f.name: f.default if f.default_factory is MISSING else f.default_factory()
                for f in fields(cls)  # type: ignore[arg-type]
                if f.name != "extra"}
        return names

    def __getitem__(self, key: str) -> Any:
        if key == "type":
            return self.type
        if key in self._field_names():
            v = getattr(self, key)
            if v is None:
                raise KeyError(key)
            return v
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield "type"
        for k in self._field_names():
            if getattr(self, k) is not None:
                yield k
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def as_dict(self) -> dict[str, Any]:
        """The record as the plain dict its JSON line decodes to."""
        return dict(self.items())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        """Build from a decoded JSON line; a missing field, or one of the wrong type (a
        hand-edited or foreign log), takes its default."""
        names = cls._field_names()
        known = {k: _coerce(v, names[k]) for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "type"}
        return cls(**known, extra=extra)


def _coerce(v: Any, default: Any) -> Any:
    """``v`` as the type of a field's default (NaN for a non-number in a float; the
    default for a list or mapping field that holds something else)."""
    if isinstance(default, list | dict):
        return v if isinstance(v, type(default)) else type(default)()
    if isinstance(default, bool):
        return bool(v)
    if isinstance(default, float):
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan
    if isinstance(default, int):
        return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else default
    return v


@dataclass(frozen=True, eq=True)
class Meta(_Record):
    """The first line of a run: versions, parameter names and the guard's settings."""

    type: ClassVar[str] = "meta"
    format: int = 1
    time: float | None = None
    gradguard: str | None = None
    params: list[str] = field(default_factory=list)
    forward_order: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    first_step: int = 0  # past 0: the guard resumed a saved state at this step
    lr_scale: float = 1.0  # the LR scale it started with (a resumed guard's carried one)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=True)
class StepRecord(_Record):
    """One step: the loss, the gradient norm before and after the transforms, the flags,
    the LR scale the guard applied and (every ``layers_every`` steps and at flagged ones)
    the per-tensor norms, in the meta line's ``params`` order."""

    type: ClassVar[str] = "step"
    step: int = -1
    loss: float = math.nan
    grad_norm: float = math.nan
    clipped_norm: float = math.nan
    lr_scale: float = 1.0
    grad_z: float = 0.0
    loss_z: float = 0.0
    skipped: bool = False
    nonfinite: bool = False
    grad_spike: bool = False
    loss_spike: bool = False
    bad_inputs: bool = False  # the data held NaN/Inf (absent from logs before it existed)
    clip_coef: float = 1.0
    lr: float | None = None
    norms: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        """Any detector flagged the step, or the guard skipped it."""
        return self.skipped or self.nonfinite or self.grad_spike or self.loss_spike


@dataclass(frozen=True, eq=True)
class Event(_Record):
    """Something the guard noticed or did at ``step``: ``kind`` (``nonfinite``,
    ``grad_spike``, ``loss_spike``, ``backoff``, ``rollback``, ``recover``, ``snapshot``,
    ``drift``, ``depth_trend``, ``dead_units``, ``unwatched``, ``diverged``, ``verdict``,
    ...), a sentence for people, the ``action`` taken, and kind-specific fields in
    ``extra`` (``lr_scale``, ``origin_layer``, ``top_layers``, ``reason``, ``path``, ...)."""

    type: ClassVar[str] = "event"
    step: int = -1
    kind: str = ""
    message: str = ""
    action: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_TYPES: dict[str, type[_Record]] = {c.type: c for c in (Meta, StepRecord, Event)}


def typed(rec: Mapping[str, Any]) -> Any:
    """The typed record for a decoded JSON line (a line of an unknown type stays a dict)."""
    cls = _TYPES.get(str(rec.get("type")))
    return cls.from_dict(rec) if cls is not None else dict(rec)
