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
state (LR scale, detector windows, controller memory, counters, which parameters have
had a gradient), the optimizer's state (momenta, moments: DDP leaves them, and a replica
with stale momenta parts from the others at its next step) and what ``guard.track``
holds (an LR scheduler), so the ranks decide alike and stay equal after the join; every
rank starts its rollback history afresh from those weights (a rank that ran out early
holds snapshots of a path the others left). Nothing is done when no rank ran out early.
Under gradient accumulation (``ddp.no_sync()``) the shadow follows DDP's: one per synced
backward, where the stepping ranks call ``guard.step``.

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


def _unwrapped(model: Any) -> Any:
    return getattr(model, "_orig_mod", model)  # (torch.compile's wrapper)


def notify(g: Guard) -> None:
    """At the start of a step inside ``Join``: tell the context this rank still steps,
    and refuse an order of participants whose collectives would not pair up."""
    cfg = getattr(g, "_join_config", None)
    if cfg is None or not cfg.enable:
        return
    # Each check raises at the same step on every rank (the same Join, the same code), so
    # no rank is left waiting in a collective.
    if cfg.is_first_joinable:
        # The first participant counts the ranks still stepping at the start of each of
        # its steps, before DDP's forward and backward collectives, which on a rank that
        # ran out come first.
        raise GuardUsageError(
            "the guard is listed first in Join: list it after the model, "
            "Join([ddp_model, guard]) (the model's collectives come first in a step)")
    model = _unwrapped(g.model)
    if g._sync is not None and _is_ddp(model) and not model._join_config.enable:
        raise GuardUsageError(
            "the guard is in a Join without its DDP model: on a rank that ran out, DDP's "
            "gradient all-reduces would go unanswered. Pass both, the model first: "
            "Join([ddp_model, guard])")
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
        model = _unwrapped(g.model)
        if _is_ddp(model) and not model.require_forward_param_sync:
            # DDP's hook, which ran first, found the stepping ranks in no_sync() (gradient
            # accumulation): no synced backward, so no guard step, in this iteration.
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
        # Torch leaves a participant's config set after its Join: a later loop outside any
        # Join must not take the guard for one still inside it.
        g._join_config = disabled_config()
        if sync is None:
            return
        dist = sync.dist
        # Which rank is the last joiner (the highest, as DDP picks it), and whether any rank
        # ran out early at all: one all-reduce.
        found = torch.tensor([float(sync.rank if is_last_joiner else -1),
                              float(shadowed > 0)], device=g.device)
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=sync.group)
        src, uneven = (int(v) for v in found.tolist())  # (once per join: a host read)
        if not uneven:
            return  # (even inputs: every guard stepped alike)
        g._host.drain()  # (the rows still in flight are judged on the rank that made them)
        src_global = src if sync.group is None else dist.get_global_rank(sync.group, src)
        store = g.store
        payload: list[Any] = [None]
        if sync.rank == src:
            # The optimizer's state (momenta, Adam's moments) and the objects the guard
            # tracks (an LR scheduler) moved on only where the run went on. On the host: a
            # CUDA tensor would unpickle onto the sender's device index.
            sent = {"state": checkpoint.save(g, drain=False),
                    "optimizer": g.optimizer.state_dict(),
                    "tracked": [obj.state_dict() for obj in g._tracked]}
            sent = snap.clone_tree(sent, to_cpu=True)
            if g.device.type == "cuda":
                torch.cuda.synchronize(g.device)  # (the copies are non-blocking)
            payload = [{**sent, "started": g._started,
                        "place": None if store is None else store.place}]
        dist.broadcast_object_list(payload, src=src_global, group=sync.group,
                                   device=g.device if g.device.type == "cuda" else None)
        got = payload[0]
        # DDP's post-hook gave every rank these weights already; a rollback the drain above
        # made on the last joiner came after it, so they are sent again (once per join).
        with torch.no_grad():
            for tensor in _model_tensors(g):
                dist.broadcast(tensor, src=src_global, group=sync.group)
        if sync.rank != src:
            checkpoint.load(g, got["state"])
            g.optimizer.load_state_dict(got["optimizer"])
            for obj, st in zip(g._tracked, got["tracked"], strict=True):
                obj.load_state_dict(st)
        if store is not None:
            store.rebase(g.steps - 1, checkpoint.trajectory(g), got["place"],
                         started=got["started"])
            # (the broadcasts wrote the weights in place: not an edit from outside)
            g._host.versions = [p._version for p in g.params]
        g.recorder.event(
            g.steps, "join_synced",
            f"every rank has run out of data: the guard's state, the optimizer's state and "
            f"the weights of rank {src} (the last to run out, at step {g.steps}) are every "
            "rank's now"
            + (f"; this rank ran out {shadowed} steps before it" if shadowed else "")
            + ("; rollback starts afresh from these weights" if store is not None else ""),
            action="info", source_rank=src, shadowed=shadowed)


def _model_tensors(g: Guard) -> list[torch.Tensor]:
    """The weights a rollback restores, as DDP syncs them at the end of a join: the
    model's parameters and buffers but those DDP is told to ignore (the guarded
    parameters where there is no model)."""
    model = _unwrapped(g.model)
    if model is None:
        return [p.data for p in g.params]
    ignore: set[str] = set()
    if _is_ddp(model):
        ignore, model = set(model.parameters_to_ignore), model.module
    return [t.data for n, t in (*model.named_parameters(), *model.named_buffers())
            if n not in ignore]


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

