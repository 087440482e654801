"""Explicit device state shared by transforms, detectors and the decision."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .errors import ConfigError

__all__ = ["TensorState"]


class TensorState:
    """Holds ``self.state``, a dict of device tensors updated in place, and round-trips it."""

    state: dict[str, Tensor]

    def state_dict(self) -> dict[str, Any]:
        """Copy of the state (tensors cloned, safe to keep as a snapshot)."""
        return {k: v.detach().clone() for k, v in getattr(self, "state", {}).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict` of an identically configured object."""
        mine = getattr(self, "state", {})
        name = type(self).__name__
        if set(state) != set(mine):
            raise ConfigError(
                f"{name}: state has keys {sorted(state)}, expected {sorted(mine)}; "
                "it was saved by a differently configured object"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(mine[k].shape):
                raise ConfigError(
                    f"{name}: state '{k}' has shape {tuple(v.shape)}, expected "
                    f"{tuple(mine[k].shape)}; it was saved with different settings"
                )
            mine[k].copy_(v)
