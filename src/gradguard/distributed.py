"""Keeping every rank's guard in agreement under DDP and FSDP2, with one all-reduce a step.

Under DDP the gradients are already averaged, so every rank measures the same norms, but
each rank has its own loss; under FSDP2 each rank holds a shard of every gradient
(``DTensor`` with ``Shard(0)``), so per-tensor norms are partial. Everything the decisions
depend on that can differ between ranks is packed into one small fp32 tensor and summed
across the group in a single ``all_reduce``:

* the per-tensor *squared* norms of the local shards (FSDP2 only): their sum is the square
  of the true unsharded norm. A tensor whose pieces are held by several ranks each (HSDP's
  ``Replicate`` mesh dimension, a parameter ``fully_shard`` left out and the user keeps
  in sync by hand) has its square divided by its number of copies first, so each piece
  counts once;
* the loss (averaged over the ranks that passed one, so the loss-spike detector sees the
  same series everywhere), and how many ranks passed one: some but not all is refused;
* a non-finite vote (any rank's NaN/Inf makes every rank skip);
* how many ranks stepped: a rank that ran out of data inside torch's ``Join`` adds zeros
  in their place (:mod:`gradguard.join`).

The detectors and the LR backoff then run on identical inputs on every rank and make
identical decisions, with no further communication; host-side decisions (rollback, giving
up) read the same rows and agree too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy
import torch
from torch import Tensor

from .errors import ConfigError, GuardUsageError
from .record import Mailbox

__all__ = ["Sync", "is_sharded", "local_tensor", "make_sync", "split_dims"]

# The agreed scalars after the squared norms: loss, NaN vote, bad data, ranks that passed a
# loss, ranks that stepped.
_TAIL = 5


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
    return any(_cuts(p) for p in t.placements)


def split_dims(t: Tensor) -> set[int]:
    """The dimensions of ``t`` split across ranks (a ``Shard`` on a mesh dimension of more
    than one rank); empty for a plain tensor."""
    if _DTENSOR is None or not isinstance(t, _DTENSOR):
        return set()
    mesh = t.device_mesh  # type: ignore[attr-defined]
    return {p.dim % max(t.dim(), 1) for i, p in enumerate(t.placements)
            if _cuts(p) and mesh.size(i) > 1}


def _cuts(p: Any) -> bool:
    """A placement that splits the tensor across its mesh dimension: a ``Shard``, or
    FSDP2-over-TP's ``_StridedShard`` (whose ``is_shard()`` is False in torch 2.13)."""
    return bool(p.is_shard()) or (hasattr(p, "dim") and not p.is_replicate()
                                  and not p.is_partial())


def _pieces(t: Tensor) -> int:
    """Into how many disjoint pieces ``t`` is cut across its device mesh (1: whole)."""
    if _DTENSOR is None or not isinstance(t, _DTENSOR):
        return 1
    mesh = t.device_mesh  # type: ignore[attr-defined]
    return math.prod(mesh.size(i) for i, p in enumerate(t.placements) if _cuts(p))


def _shares(params: Sequence[Tensor], group: Any, world: int) -> list[float] | None:
    """Each parameter's weight in the summed squared norms: 1 / the number of ranks that
    hold each of its pieces (None: 1 for all, plain FSDP2 over the whole group).

    Every rank of the group holds one piece of each parameter, so a tensor cut into k
    pieces has world / k copies of each: on a sub-mesh (a layer sharded over the
    data-parallel ranks of a TP × FSDP layout) the other sub-meshes hold the copies.
    """
    # A plain tensor is whole on every rank: world copies of one piece.
    shares = [_pieces(p) / world for p in params]
    return None if all(w == 1 for w in shares) else shares


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
        params: the guarded parameters (their layout on the mesh weighs their squared
            norms; see :func:`_shares`).
    """

    def __init__(self, group: Any = None, sharded: bool = False,
                 params: Sequence[Tensor] = ()) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.sharded = sharded
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.calls = 0  # per-step collectives issued, for tests and the overhead report
        self.params = list(params)
        self._shares = _shares(self.params, group, self.world) if sharded else None
        self._weights: dict[tuple[Any, ...], Tensor] = {}
        self._weight: Tensor | None = None  # this step's, aligned with its gradients
        self._steps = 0
        # How many ranks passed a loss, per step, until read on the host (see _losses).
        self._given: Mailbox | None = None

    def step(self, norms: Tensor, loss: Tensor | None, nonfinite: Tensor,
             bad_data: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Agree on ``(norms, loss, nonfinite, bad data)``; one all-reduce.

        Args:
            norms: per-tensor L2 norms of this rank's gradients (its shards under FSDP2),
                in the guard's parameter order, those without a gradient left out.
            loss: this rank's loss (0-dim fp32) or None.
            nonfinite: this rank's non-finite flag.
            bad_data: whether this rank's data held NaN/Inf (None: not watched).

        Returns:
            Global per-tensor norms, the mean loss over the ranks that passed one, the
            any-rank non-finite flag, and the any-rank bad-data flag (one rank's NaN record
            reaches every rank's gradients through the gradient all-reduce: it explains
            them all).

        Raises:
            GuardUsageError: some ranks passed a loss and others did not, at a step
                ``ROW_LAG`` steps back on CUDA (this one elsewhere); on every rank alike.
        """
        parts = []
        if self.sharded:
            self._weight = self._weigh(len(norms), norms.device)
            sq = norms.square()
            parts.append(sq if self._weight is None else sq * self._weight)
        zero = torch.zeros((), device=norms.device)
        loss_v = loss if loss is not None else zero
        data_v = bad_data.to(norms.device) if bad_data is not None else zero
        one = torch.ones((), device=norms.device)
        given = one if loss is not None else zero
        # (the last: 1 per rank that steps, 0 from a rank that ran out, see shadow)
        parts.append(torch.stack([loss_v.float(), nonfinite.float(), data_v.float(), given,
                                  one]))
        packed = torch.cat(parts)
        self.dist.all_reduce(packed, group=self.group)
        self.calls += 1
        tail = packed[-_TAIL:]
        if self.sharded:
            norms = packed[:-_TAIL].sqrt()
        self._losses(tail[3:])
        mean_loss = tail[0] / tail[3].clamp_min(1) if loss is not None else None
        return norms, mean_loss, tail[1] > 0, tail[2] > 0

    def shadow(self, device: torch.device) -> None:
        """What a rank that ran out of data (in torch's ``Join``) issues in place of
        :meth:`step`'s all-reduce: zeros, so it adds no loss, no vote and no stepping rank
        (see :mod:`gradguard.join`; not for sharded gradients, whose norms it would need)."""
        self.dist.all_reduce(torch.zeros(_TAIL, device=device), group=self.group)

    def _weigh(self, n: int, device: torch.device) -> Tensor | None:
        """The weights of this step's ``n`` squared norms (None: all 1)."""
        if self._shares is None:
            return None
        if n == len(self.params):
            index: tuple[int, ...] = ()  # (the common case: every parameter has a gradient)
        else:
            # The gradients collect_grads gathered: those that are not None, in order.
            index = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
        key = (index, device)
        if key not in self._weights:
            shares = self._shares if not index else [self._shares[i] for i in index]
            self._weights[key] = torch.tensor(shares, dtype=torch.float32, device=device)
        return self._weights[key]

    def _losses(self, counts: Tensor) -> None:
        """Refuse a loss passed on some ranks but not all, on every rank at the same step.

        ``counts``: how many ranks passed a loss, and how many stepped (fewer than all
        once some ran out of data in torch's ``Join``).

        A CUDA count is read ``ROW_LAG`` steps later, when the step's row reaches the
        host anyway (see :class:`~gradguard.record.Mailbox`): waiting for it now would
        stall the loop on the device every step. The lag is fixed, so every rank raises
        at the same step and none is left waiting in the next all-reduce.
        """
        if self._given is None:
            self._given = Mailbox(counts.device)
        box = self._given
        box.post(self._steps, counts)
        self._steps += 1
        for step, row in box.poll(upto=self._steps - 1 - box.lag):
            count, stepping = round(float(row[0])), round(float(row[1]))  # (host numbers)
            if 0 < count < stepping:
                ago = self._steps - 1 - step
                raise GuardUsageError(
                    f"guard.step(loss) got a loss on {count} of {stepping} ranks and none "
                    "on the others at " + (f"{ago} step(s) before this one" if ago else
                                           "this step")
                    + ": the loss is averaged over ranks, and the loss checks must run on "
                    "every rank alike. Pass the loss on every rank (each rank's own) or "
                    "on none")

    def agree(self, flags: Sequence[bool], device: torch.device) -> list[bool]:
        """Whether each of ``flags`` holds on every rank: one all-reduce and a host sync,
        for a decision taken once (not counted in :attr:`calls`, the per-step ones).

        Args:
            flags: this rank's answers.
            device: where the collective's tensor lives (the guard's device: NCCL takes
                CUDA tensors only).
        """
        t = torch.tensor([float(f) for f in flags], device=device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN, group=self.group)
        return [bool(v) for v in t.tolist()]

    def sum_squares(self, sq: Tensor) -> Tensor:
        """Sum per-tensor squared norms over shards (after a transform edited gradients).

        Args:
            sq: squared norms aligned with this step's gradients, or several such rows
                stacked and flattened (each weighed like the step's, see :meth:`step`).
        """
        if not self.sharded:
            return sq
        w = self._weight
        sq = sq.clone() if w is None else (sq.view(-1, w.numel()) * w).flatten()
        self.dist.all_reduce(sq, group=self.group)
        self.calls += 1
        return sq


def make_sync(setting: Any, params: list[Tensor]) -> Sync | None:
    """The ``Sync`` a guard needs: ``setting`` is None (auto), False, True or a process group."""
    if isinstance(setting, numpy.bool_):
        setting = bool(setting)
    if setting is False:
        return None
    import torch.distributed as dist

    if setting is not None and setting is not True and not (
            dist.is_available() and isinstance(setting, dist.ProcessGroup)):
        raise ConfigError(f"distributed= takes None (auto), True, False or a process group "
                          f"(torch.distributed.new_group(...)), got {setting!r}")

    active = dist.is_available() and dist.is_initialized()
    if not active:
        if setting is None:
            return None
        raise ConfigError("distributed=... needs torch.distributed initialised first "
                          "(torch.distributed.init_process_group)")
    group = None if setting in (None, True) else setting
    if dist.get_world_size(group) == 1:
        return None
    return Sync(group, sharded=any(is_sharded(p) for p in params), params=params)
