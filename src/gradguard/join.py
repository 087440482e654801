"""Uneven inputs under DDP: the guard as a participant in torch's ``Join`` context.

A rank that runs out of data leaves its loop while the others still step. Torch's
generic join context (``torch.distributed.algorithms.join``; the design of DDP's
``model.join()``) keeps them from hanging: each participant's join hook issues, on the
rank that ran out, the collectives the stepping ranks still make (DDP's gradient
all-reduces), with contributions that change nothing. The guard makes one all-reduce a
step (:class:`~gradguard.distributed.Sync`), so its hook shadows that one with zeros: no
loss, no NaN vote, no rank counted as stepping.

When every rank has run out, DDP's post-hook gives every rank the weights of the last
rank to run out (the "last joiner"); the guard's post-hook then does the same for its own
state (LR scale, detector windows, controller memory, counters), so the ranks decide
alike again after the join, and every rank starts its rollback history afresh from those
weights (a rank that ran out early holds snapshots of a path the others left). Nothing
is done when no rank ran out early.

Usage::

    with Join([ddp_model, guard]):   # the model first: its collectives come first
        for x, y in loader:          # a different number of batches per rank
            ...
            guard.step(loss)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint
from . import snapshot as snap
from .errors import ConfigError, GuardUsageError

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["Joinable", "disabled_config", "join_hook", "notify"]

try:
    from torch.distributed.algorithms.join import Join, Joinable, JoinHook, _JoinConfig
except ImportError:  # a torch built without distributed support
    Join = JoinHook = Joinable = _JoinConfig = None  # type: ignore[assignment,misc]


def disabled_config() -> Any:
    """The join config of a guard outside any ``Join`` (torch's own default)."""
    return None if _JoinConfig is None else _JoinConfig.construct_disabled_join_config()


def _is_ddp(model: Any) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def notify(g: Guard) -> None:
    """At the start of a step inside ``Join``: tell the context this rank still steps,
    and refuse an order of participants whose collectives would not pair up."""
    cfg = getattr(g, "_join_config", None)
    if cfg is None or not cfg.enable or g._sync is None:
        return
    model = g.model
    if _is_ddp(model):
        # Both raise at the same step on every rank (the same Join, the same code), so no
        # rank is left waiting in a collective.
        if not model._join_config.enable:
            raise GuardUsageError(
                "the guard is in a Join without its DDP model: on a rank that ran out, "
                "DDP's gradient all-reduces would go unanswered. Pass both, the model "
                "first: Join([ddp_model, guard])")
        if cfg.is_first_joinable:
            raise GuardUsageError(
                "Join([guard, ddp_model]) pairs the guard's all-reduce with DDP's on a "
                "rank that ran out: list the model first, Join([ddp_model, guard]) (its "
                "collectives come first in a step)")
    Join.notify_join_context(g)


class _GuardJoinHook(JoinHook if JoinHook is not None else object):  # type: ignore[misc]
    """Shadows the guard's per-step all-reduce on a rank that ran out, then re-aligns the
    guards at the end (see the module docstring)."""

    def __init__(self, g: Guard) -> None:
        self.g = g
        self.shadowed = 0  # steps this rank shadowed in this join
        self.agreed = False

    def main_hook(self) -> None:
        g, sync = self.g, self.g._sync
        if sync is None:
            return
        if self.shadowed == 0:
            g.recorder.event(g.steps, "joined",
                             f"rank {sync.rank} ran out of data after {g.steps} steps; it "
                             "shadows the guard's all-reduce until every rank has run out",
                             action="info", rank=sync.rank)
        store = g.store
        if not g._started and not self.agreed and store is not None and store.agrees:
            # The other ranks settle where snapshots live at their first step (one
            # all-reduce, a minimum): room here vetoes nothing.
            sync.agree([True, True], g.device)
            self.agreed = True
        sync.shadow(g.device)
        self.shadowed += 1

    def post_hook(self, is_last_joiner: bool) -> None:
        g, sync = self.g, self.g._sync
        shadowed, self.shadowed = self.shadowed, 0
        if sync is None:
            return
        dist = sync.dist
        # Which rank is the last joiner (the highest, as DDP picks it), and whether any rank
        # ran out early at all: one all-reduce.
        t = torch.tensor([float(sync.rank if is_last_joiner else -1), float(shadowed > 0)],
                         device=g.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=sync.group)
        src, uneven = int(t[0].item()), bool(t[1].item())
        if not uneven:
            return  # (even inputs: every guard stepped alike)
        g._host.drain()  # (the rows still in flight are judged on the rank that made them)
        src_global = src if sync.group is None else dist.get_global_rank(sync.group, src)
        store = g.store
        payload: list[Any] = [None]
        if sync.rank == src:
            # (on the host: a CUDA tensor would unpickle onto the sender's device index)
            state = snap.clone_tree(checkpoint.save(g, drain=False), to_cpu=True)
            if g.device.type == "cuda":
                torch.cuda.synchronize(g.device)  # (the copies are non-blocking)
            payload = [{"state": state,
                        "started": g._started,
                        "place": None if store is None else store.place}]
        dist.broadcast_object_list(payload, src=src_global, group=sync.group,
                                   device=g.device if g.device.type == "cuda" else None)
        got = payload[0]
        # DDP's post-hook gave every rank these weights already; a rollback the drain above
        # made on the last joiner came after it, so they are sent again (once per join).
        with torch.no_grad():
            for t in _model_tensors(g):
                dist.broadcast(t, src=src_global, group=sync.group)
        if sync.rank != src:
            checkpoint.load(g, got["state"])
        if store is not None:
            store.rebase(g.steps - 1, checkpoint.trajectory(g), got["place"],
                         started=got["started"])
        g.recorder.event(
            g.steps, "join_synced",
            f"every rank has run out of data: the guard's state and the weights of rank "
            f"{src} (the last to run out, at step {g.steps}) are every rank's now"
            + (f"; this rank ran out {shadowed} steps before it" if shadowed else "")
            + ("; rollback starts afresh from these weights" if store is not None else ""),
            action="info", source_rank=src, shadowed=shadowed)


def _model_tensors(g: Guard) -> list[torch.Tensor]:
    """The weights a rollback restores: the model's parameters and buffers (the guarded
    parameters where there is no model)."""
    if g.model is None:
        return [p.data for p in g.params]
    return [*(p.data for p in g.model.parameters()), *g.model.buffers()]


def join_hook(g: Guard, **kwargs: Any) -> Any:
    """The guard's ``JoinHook`` (``Joinable.join_hook``)."""
    if JoinHook is None:
        raise ConfigError("Join needs a torch built with distributed support")
    if g._sync is not None and g._sync.sharded:
        raise ConfigError(
            "Join is not supported for a sharded (FSDP2) model: its per-step norms cannot "
            "be shadowed. Give every rank the same number of steps (DistributedSampler "
            "with drop_last=True, or the same max_steps)")
    return _GuardJoinHook(g)

