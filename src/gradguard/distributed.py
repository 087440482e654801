"""Keeping every rank's guard in agreement under DDP and FSDP2, with one all-reduce a step.

Under DDP the gradients are already averaged, so every rank measures the same norms, but
each rank has its own loss; under FSDP2 each rank holds a shard of every gradient
(``DTensor`` with ``Shard(0)``), so per-tensor norms are partial. Everything the decisions
depend on that can differ between ranks is packed into one small fp32 tensor and summed
across the group in a single ``all_reduce``:

* the per-tensor *squared* norms of the local shards (FSDP2 only): their sum is the square
  of the true unsharded norm;
* the loss (averaged over ranks, so the loss-spike detector sees the same series everywhere);
* a non-finite vote (any rank's NaN/Inf makes every rank skip).

The detectors and the LR backoff then run on identical inputs on every rank and make
identical decisions, with no further communication; host-side decisions (rollback, giving
up) read the same rows and agree too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Sync", "is_sharded", "local_tensor", "make_sync"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor with any ``Shard`` placement."""
    if _DTENSOR is None or not isinstance(t, _DTENSOR):
        return False
    return any(p.is_shard() for p in t.placements)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (same storage, so in-place edits land), else ``t``."""
    if _DTENSOR is not None and isinstance(t, _DTENSOR):
        # ``_local_tensor`` is the stored shard itself; ``to_local()`` would wrap it in a new
        # autograd view each call and lose the attributes the guard keeps on gradients.
        return t._local_tensor  # type: ignore[attr-defined]
    return t


class Sync:
    """The guard's per-step collective.

    Args:
        group: the process group (None: the default group).
        sharded: gradients are sharded (FSDP2), so squared norms are summed too.
    """

    def __init__(self, group: Any = None, sharded: bool = False) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.sharded = sharded
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.calls = 0  # collectives issued, for tests and the overhead report

    def step(self, norms: Tensor, loss: Tensor | None, nonfinite: Tensor,
             bad_data: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Agree on ``(norms, loss, nonfinite, bad data)``; one all-reduce.

        Args:
            norms: per-tensor L2 norms of this rank's gradients (its shards under FSDP2).
            loss: this rank's loss (0-dim fp32) or None.
            nonfinite: this rank's non-finite flag.
            bad_data: whether this rank's data held NaN/Inf (None: not watched).

        Returns:
            Global per-tensor norms, the mean loss over ranks, the any-rank non-finite
            flag, and the any-rank bad-data flag (one rank's NaN record reaches every
            rank's gradients through the gradient all-reduce: it explains them all).
        """
        parts = [norms.square()] if self.sharded else []
        zero = torch.zeros((), device=norms.device)
        loss_v = loss if loss is not None else zero
        data_v = bad_data.to(norms.device) if bad_data is not None else zero
        parts.append(torch.stack([loss_v.float(), nonfinite.float(), data_v.float()]))
        packed = torch.cat(parts)
        self.dist.all_reduce(packed, group=self.group)
        self.calls += 1
        tail = packed[-3:]
        if self.sharded:
            norms = packed[:-3].sqrt()
        mean_loss = tail[0] / self.world if loss is not None else None
        return norms, mean_loss, tail[1] > 0, tail[2] > 0

    def sum_squares(self, sq: Tensor) -> Tensor:
        """Sum per-tensor squared norms over shards (after a transform edited gradients)."""
        if not self.sharded:
            return sq
        sq = sq.clone()
        self.dist.all_reduce(sq, group=self.group)
        self.calls += 1
        return sq


def make_sync(setting: Any, params: list[Tensor]) -> Sync | None:
    """The ``Sync`` a guard needs: ``setting`` is None (auto), False, True or a process group."""
    if setting is False:
        return None
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized()
    if not active:
        if setting is None:
            return None
        from .errors import ConfigError

        raise ConfigError("distributed=... needs torch.distributed initialised first "
                          "(torch.distributed.init_process_group)")
    group = None if setting in (None, True) else setting
    if dist.get_world_size(group) == 1:
        return None
    return Sync(group, sharded=any(is_sharded(p) for p in params))
