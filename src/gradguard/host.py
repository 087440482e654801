"""The guard's host half: what happens when a step's row reaches the host.

The device half (:meth:`gradguard.Guard.step`) posts each step's row without waiting; the
rows are taken here a fixed number of steps later (:data:`gradguard.record.ROW_LAG` on a
GPU, at once on a CPU). For each row this part:

0. lets the spike detectors learn from it (they set the next steps' limits);

1. turns flags into events, naming the layer where the trouble starts
   (:class:`~gradguard.detect.LayerAttribution`) and warning of slow trends
   (:class:`~gradguard.detect.DepthTrend`, :class:`~gradguard.detect.Drift`);
2. escalates: feeds the stability controller (:mod:`gradguard.control`), sets the LR scale
   it asks for, rolls back to the last good snapshot (:mod:`gradguard.rollback`), or gives
   up with :class:`~gradguard.TrainingDivergedError`;
3. judges rollback candidates by the rows after them and takes new ones.

It reads the guard's device parts (detectors, clip state, decision) only through the
guard's trajectory, the state that is rolled back with the weights.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from . import __version__, checkpoint, graph
from . import events as ev
from . import snapshot as snap
from .control import CutPoint, counted
from .detect import DeadLayers, DepthTrend, Drift, LayerAttribution
from .distributed import is_sharded
from .errors import GuardUsageWarning
from .params import InputWatch, input_module, optimizer_params
from .respond import Action, TrainingDivergedError


def _some(names: list[str]) -> str:
    """Names for a message: ' (a, b, c and 2 more)', or '' for none."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f" ({', '.join(names[:3])}{more})" if names else ""


def _cut_point(v: list[Any]) -> CutPoint:
    """A :data:`~gradguard.control.CutPoint` as a state dict saved it (a JSON list)."""
    return float(v[0]), int(v[1]), None if v[2] is None else int(v[2]), int(v[3])


_CLIPPING = ("LR unchanged, every step clipped to the typical gradient norm from now on (the "
             "run gave back its progress: a few oversized steps, not the LR)")

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["HostSide"]


class HostSide:
    """Rows → events, escalation and rollback for one guard (see the module docstring)."""

    def __init__(self, guard: Guard) -> None:
        self.g = guard
        names, order = guard.names, list(range(len(guard.params)))
        self.order = order
        self.attribution = LayerAttribution(names, order)
        self.depth = DepthTrend(names, order, [p.dim() >= 2 for p in guard.params])
        self.drift = Drift()
        self.dead = DeadLayers(names, order)
        self.first_module: Any = None
        self.inputs: InputWatch = guard._inputs  # (armed by watch_inputs)
        # Watched from the first step where rows reach the host late (CUDA: the first NaN
        # rows are already run by then), and where the first NaN/Inf step is not a plain
        # skip (on_nonfinite "raise" or "rollback" must know whose it is); else from the
        # first NaN/Inf row, so a healthy run on a CPU pays nothing. Also a resumed run
        # whose guard was watching (load_state_dict).
        if guard.mailbox.lag or \
                guard.policy.on_nonfinite not in (Action.SKIP, Action.AUTO, Action.NONE):
            self.inputs.arm(None)  # (the batch at once; the first layer once it is known)
        self.rollbacks = 0
        # The watched parameters' autograd version counters as the guard's last step left
        # them, and the latest step before which something else wrote to them (see
        # outside_edits).
        self.versions: list[int] | None = None
        self.edited: int | None = None
        self.warned_edit = False
        self.skip_batches = 0
        self.batches_used = False
        self.skip_streak = 0
        self.data_streak = 0  # of the skip streak's rows: those whose inputs held NaN/Inf
        self.clean_streak = 0
        self.ignore_rows_before = 0
        self.applied_from = 0  # the first row after the last rollback's held ones
        # After a rollback: the restored snapshot's trajectory, the LR state and clip row
        # before the rollback's cut, the step it was taken after, and the first losses
        # computed from its weights, until they judge them, and whether it is already the
        # snapshot before the one first restored (see :meth:`restore_check`).
        self.restored: tuple[dict[str, Any], Any, int | None, int, list[float],
                             list[float] | None] | None = None
        # The steps still to hold the restored weights for while restore_check judges them,
        # and the steps held whose rows have not reached the host yet (see take_hold).
        self.hold = 0
        self.held: set[int] = set()
        self.base_lrs: dict[int, float] = {}
        # Per step in flight whose gradients some guarded tensors lacked (None): which had
        # one (the dead-units test must not read an unused tensor as a dead one).
        self.present: dict[int, np.ndarray] = {}
        # The lowest and highest base LR the rows have carried: a schedule when they differ
        # (the verdict then advises scaling the schedule, not one LR).
        self.lr_span: tuple[float, float] | None = None
        # Per step in flight: (batch noise factor, whether the loss detector judged it).
        self.judged: dict[int, tuple[float, bool]] = {}
        # The recurrent layers the first forward pass ran (Policy.clip_recurrent), and the
        # steps clipping changed while every step was clipped for them.
        self.recurrent: list[str] = []
        self.recurrent_clipped = 0
        # The restore echo (see :meth:`echo`): the first loss, pending while a rollback to
        # the initial weights waits for its first row; and what the echo measured.
        self.echo_ref: float | None = None
        self.batch_noise: float | None = None
        # The LR state before the first cut of the current early phase: what the echo
        # restores (every early cut was judged by the same noise-blind ratio tests).
        self.early_base: CutPoint | None = None
        # The signs the first losses took (see :meth:`judged_loss`): [negative, positive,
        # finite losses seen]; unjudged once they took both.
        self.signs = [False, False, 0]
        self.unjudged = False
        self.graph_checked = False  # (see check_loss_graph)
        self.attention: str | None = None  # where attention was found (warm_up_attention)
        # The positions of the watched parameters that have had a gradient, and the last
        # step's (see joined).
        self.had_grad: set[int] | None = None
        self.last_index: tuple[int, ...] = ()
        self.thawed_ids: set[int] = set()  # (parameters left out that were named thawed)
        self.warned_thaw = False  # (the warning for a thawed unwatched parameter: once)
        # The steps at which the restore check read a change of data (not the user's
        # data_changed()): a second one stands the loss checks down (see restore_check).
        self.shifts: list[int] = []
        # The LR state and clipping once the first change was answered: what the second
        # takes the run back to.
        self.shift_point: tuple[CutPoint, int | None] | None = None
        self.loss_early = False  # (set per row by learn)
        # Units that died before the run trained: instability for the next row the
        # controller judges (see dead_before_training).
        self.dead_reason: str | None = None

    def start(self) -> None:
        """At the first step: the forward order its forward pass showed, the run log's
        meta line, the rollback store's first snapshot."""
        g = self.g
        g._usage.first_step()
        attention = None
        if g._order_probe is not None:
            probe = g._order_probe
            if self.wants_attention():
                if names := probe.attention():
                    attention = f"attention layers ({ev.listed(names)})"
                elif probe.graph_attention():
                    attention = "dot-product attention in the model's graph"
            self.set_order(probe.finish(), probe.first)
            self.clip_recurrent(probe.recurrent())
            g._order_probe = None
            if g.mailbox.lag or self.inputs.armed:  # (armed before the first step)
                self.watch_inputs()
        g.recorder.start({
            "gradguard": __version__, "params": g.names,
            # (past 0 for a guard that resumed a saved state: its log continues that run)
            "first_step": g.steps, "lr_scale": g.lr.scale,
            "forward_order": [g.names[i] for i in self.order],
            "shapes": [list(p.shape) for p in g.params],
            "config": {"clip": repr(g.clip), **g.policy.describe(),
                       "optimizer": type(g.optimizer).__name__,
                       "skip_strategy": g.stepper.strategy,
                       "recurrent": self.recurrent},
        })
        if attention is not None:  # (after the meta line: a run log's events follow it)
            self.warm_up_attention(g.steps, attention)
        if g.store is not None:
            g.store.start(checkpoint.trajectory(g), g.steps)

    def watch_inputs(self) -> None:
        """Watch the data for NaN/Inf (:class:`InputWatch`). Under
        torch.distributed every rank arms it at the same step (the NaN/Inf rows are
        agreed on), and the flag is voted on with the step's all-reduce."""
        g, first = self.g, self.first_module
        self.inputs.arm(None if first is None else input_module(g.model, first))

    def clip_recurrent(self, names: list[str]) -> None:
        """Clip every step to ``min_ratio`` × the typical norm when the model has
        recurrent layers, or always (``Policy.clip_recurrent``; needs a spike clamp and
        a detector with a ratio bound). The layers are found by type, so under
        torch.distributed every rank (same model) decides alike."""
        g = self.g
        ratio = getattr(g.grad_spike, "min_ratio", None)
        mode = g.policy.clip_recurrent
        self.recurrent = names
        wanted = mode == "always" or (bool(names) and mode is True)
        if g.control is not None:
            # A model with no recurrent layer (and not declared one by "always"): streaks
            # of gradient-norm spikes are evidence of instability (Stability.norm_streaks).
            g.control.norm_streaks = not names and mode != "always"
        if wanted and g._device.clamps and ratio is not None:
            g._device.clip_ratio = float(ratio)

    def take_hold(self, k: int) -> bool:
        """Whether step ``k`` leaves the weights as a rollback restored them (a host
        bool: no sync). The first ``bad_steps`` steps after a rollback are held, so that
        every loss :meth:`restore_check` judges the restored weights by is computed with
        those weights themselves: exchangeable, under unchanged data, with the losses the
        snapshot's window saw, which a rank test then needs no margin for. A step taken
        instead would move them at the LR being judged and raise the next losses at a
        too-high LR. It costs ``bad_steps`` batches' updates per rollback."""
        if self.hold <= 0 or self.restored is None:
            # (judged already, by a NaN/Inf row, or the data changed: the rows not held
            # are applied ones)
            self.applied_from -= self.hold
            self.hold = 0
            return False
        self.hold -= 1
        self.held.add(k)
        return True

    def should_skip_batch(self) -> bool:
        """See :meth:`gradguard.Guard.should_skip_batch`."""
        self.batches_used = True
        if self.skip_batches > 0:
            self.skip_batches -= 1
            # (A loop that asks after the forward pass, as the HF callback does: that
            # batch's data flag and its samples are no step's; counted into the next
            # step, they made every later full step read as a smaller one.)
            self.inputs.take()
            self.g._samples.discard()
            return True
        return False

    def set_order(self, order: list[int], first_module: Any) -> None:
        """The forward order the first step measured (input side first)."""
        g = self.g
        self.order, self.first_module = order, first_module
        self.attribution.order = order
        old = self.depth
        self.depth = DepthTrend(g.names, order, [p.dim() >= 2 for p in g.params])
        self.depth.load_state_dict(old.state_dict())  # a resumed run keeps its streak
        self.dead.order = np.asarray(order, dtype=np.int64)  # (its only use of the order)

    # -- rows ----------------------------------------------------------------------------
    def after_step(self, step: int) -> bool:
        """Process the rows that reached the host; maybe roll back; take snapshots."""
        g = self.g
        rolled = False
        for k, values in g.mailbox.poll(upto=step - g.mailbox.lag):
            rolled = self.on_row(k, values) or rolled
        if g.stepper.groups_changed:  # (the stepper adopted them before this step)
            g.stepper.groups_changed = False
            self.new_groups(step)
        if g.store is not None and not rolled:
            # Early snapshots only once the controller can judge them (see RollbackStore.due).
            early = g.control is not None and g.control.has_level()
            g.store.maybe_take(step, lambda: checkpoint.trajectory(g), early,
                               lambda: checkpoint.save(g, drain=False))
        g.recorder.maybe_flush(step)
        return rolled

    def new_groups(self, step: int) -> None:
        """The optimizer's parameter groups changed since the guard was built
        (``add_param_group``, progressive unfreezing): a snapshot holds an optimizer state
        with the old groups, which torch refuses to load, so the snapshots go; and the new
        groups' parameters are not watched (named at once)."""
        g = self.g
        watched = {id(p) for p in g.params} | {id(p) for _, p in g._unwatched}
        new = [n for n, p in optimizer_params(g.model, g.optimizer) if id(p) not in watched]
        dropped = g.store.forget() if g.store is not None else 0
        self.restored = None
        self._unwatched(step, new, (
            f"the optimizer's parameter groups changed after the guard was built (now "
            f"{len(g.optimizer.param_groups)}): the {dropped} snapshot(s) taken before are "
            f"dropped (torch cannot load an optimizer state with other groups into it), and "
            f"{len(new)} new parameter(s){_some(new)} are not watched (no NaN/Inf test, "
            "statistics or clipping of their gradients). Build a new guard after changing "
            "the optimizer's groups"))

    def joined(self, step: int, index: tuple[int, ...]) -> None:
        """Before step ``step`` is measured: when a parameter gets a gradient for the first
        time after the first step (a layer unfrozen, a head or an expert first used), judge
        the gradients and the loss afresh, as after :meth:`gradguard.Guard.data_changed`.

        The gradient norm is a sum over the parameters that have gradients; one that joins
        adds its share, so the norms after are of another quantity, and the spike test
        reads the jump as a spike on every step (measured: gradual unfreezing of an MNIST
        MLP with the guard watching every parameter of the optimizer, the README's advice:
        a rollback and an LR cut on 10 of 10 healthy seeds, all 10 ending worse). The loss
        also moves for a reason that is not the LR: what the model can fit has changed, so
        a layer the guard left out for being frozen when it was built counts too (the
        same run in the default build: a rollback at the first layer's thaw on 6 of 10
        seeds). Only a first gradient counts, so parameters that skip steps (experts not
        routed to, ``set_to_none`` gradients) join once. Host work only: a comparison of
        the positions with the last step's, and an attribute read per parameter left out.
        """
        thawed = self.thawed(step)
        new: list[int] = []
        if index != self.last_index:
            self.last_index = index
            if self.had_grad is None:
                self.had_grad = set(index)
            else:
                new = [i for i in index if i not in self.had_grad]
                self.had_grad.update(new)
        if self.had_grad is None or not (new or thawed):
            return  # (nothing to judge afresh before the first step is measured)
        names = [self.g.names[i] for i in new] + thawed
        self._known_change(step, lambda dropped: (
            f"{len(names)} parameter(s) got a gradient for the first time{_some(names)}: the "
            "model's trainable set grew (a layer unfrozen, a head switched on), so the "
            "gradient norm and the loss level are judged afresh, as after "
            f"guard.data_changed(), and the {dropped} snapshot(s) judged before are dropped"),
            joined=names)

    def thawed(self, step: int) -> list[str]:
        """Names of the parameters the guard left out for being frozen when it was built
        (it watches the trainable ones) that have a gradient now: they were unfrozen, and
        the optimizer updates them while no statistic, clip or NaN/Inf test covers them (a
        flagged step is still skipped whole). Each is named once, in an ``unwatched``
        event; the first time also as a warning."""
        g = self.g
        if len(self.thawed_ids) == len(g._unwatched):
            return []
        now = [(n, p) for n, p in g._unwatched
               if p.grad is not None and id(p) not in self.thawed_ids]
        if not now:
            return []
        self.thawed_ids.update(id(p) for _, p in now)
        live = [n for n, _ in now]
        msg = (f"{len(live)} parameter(s) frozen when the guard was built now get gradients"
               f"{_some(live)}: the optimizer updates them, but the guard does not watch them "
               "(no NaN/Inf test, statistics or clipping of their gradients). Build the guard "
               "after unfreezing, or pass "
               "params=[p for g in optimizer.param_groups for p in g['params']]")
        self._unwatched(step, live, msg, warn=not self.warned_thaw)
        self.warned_thaw = True
        return live

    def _unwatched(self, step: int, names: list[str], msg: str, warn: bool = True) -> None:
        """An ``unwatched`` event naming ``names``, and (``warn``) the warning ``msg``."""
        self.g.recorder.event(step, "unwatched", msg, action="warn", tensors=names)
        if warn:
            # (stacklevel: the user's guard.step call, through after_step and new_groups,
            # or joined and thawed: two frames either way)
            warnings.warn(msg, GuardUsageWarning, stacklevel=5)

    def drain(self) -> None:
        """Wait for and process every row still in flight (a host sync, on purpose)."""
        for k, values in self.g.mailbox.poll(wait=True):
            self.on_row(k, values)

    def on_row(self, k: int, values: np.ndarray) -> bool:
        g = self.g
        rec = g.recorder.row(k, values, len(g.params))
        rec["lr"] = lr = self.base_lrs.pop(k, None)  # (a float, or None: not a host number)
        if lr is not None:
            lo, hi = self.lr_span or (lr, lr)
            self.lr_span = (min(lo, lr), max(hi, lr))
        self.learn(k, rec)
        rec["_held"] = k in self.held
        self.held.discard(k)
        norms = rec["_norms"]
        flagged = rec["skipped"] or rec["grad_spike"] or rec["loss_spike"] or rec["nonfinite"]
        self.clean_streak = 0 if flagged else self.clean_streak + 1
        if g._device.clip_ratio is not None and not rec["skipped"] \
                and rec["clip_coef"] < 1 - 1e-4:
            self.recurrent_clipped += 1
        self.skip_streak = self.skip_streak + 1 if rec["skipped"] else 0
        self.data_streak = self.data_streak + 1 \
            if ev.data_fault(rec) and rec["skipped"] else 0
        if rec["nonfinite"]:
            self.watch_inputs()
        if flagged:
            ev.describe_flags(g.recorder, self.attribution, rec, norms)
        else:
            self.attribution.learn(norms)
        for kind, msg in (("depth_trend", self.depth.update(norms)),
                          ("drift", self.drift.update(rec["grad_norm"], rec["loss"]))):
            if msg:
                g.recorder.event(k, kind, msg, action="warn")
        present = self.present.pop(k, None)
        if k < self.ignore_rows_before:
            return False  # a step taken before the last rollback took effect
        dead = self.dead
        if msg := dead.update(k, norms, present, lambda i: g.params[i].requires_grad):
            assert dead.last is not None
            g.recorder.event(k, "dead_units", msg, action="warn", since=dead.first,
                             tensor=dead.last[0], live=dead.last[1])
            self.dead_reason = self.dead_before_training()
        if self.echo_ref is not None:
            self.echo(k, rec["loss"])
        rolled = self.escalate(rec, bool(flagged))
        # A snapshot taken after step s is judged by rows s+1 … s+clean_window: their
        # losses are the first ones computed with its weights and their descendants.
        store = g.store
        due = k - max(1, store.cfg.clean_window) if store is not None else None
        if not rolled and store is not None and due in store.candidates:
            self.judge(store.candidates.pop(due))
        return rolled

    def learn(self, k: int, rec: dict[str, Any]) -> None:
        """The spike detectors learn from row ``k``; its z-scores go into the record."""
        g = self.g
        noise, checked = self.judged.pop(k, (1.0, False))
        if k < self.ignore_rows_before:
            # A step taken before the last rollback took effect: the detectors were
            # restored to a state from before it.
            rec["grad_z"] = rec["loss_z"] = math.nan
            return
        ok = not rec["nonfinite"]
        det = g.loss_spike
        # Whether this row's loss was judged by the first-steps ratio test (its count
        # before learning the row: the state the row's limit came from).
        self.loss_early = checked and getattr(det, "count", 0) < getattr(det, "min_count", 0)
        rec["grad_z"] = g.grad_spike.observe(rec["grad_norm"], ok, rec["grad_spike"], noise)
        rec["loss_z"] = det.observe(rec["loss"], ok, rec["loss_spike"], noise) \
            if checked else math.nan

    def echo(self, k: int, loss: float | None) -> None:
        """The restore echo: after an early-phase instability rolled the run back to its
        initial weights, the first loss computed with them again is a second batch at the
        same weights as the run's first loss. Their ratio is batch noise alone, the one
        thing the early checks cannot measure (they judge a loss by a fixed ratio to the
        few before it, which assumes batches differ by less). A ratio above the loss
        check's early margin (``early_ratio``²; a trained model's batches, from 1e-7 to
        0.3, when a guard starts on it) means the flags were that noise, not the LR: every
        cut the early rollbacks made is taken back and the early checks stand down for the
        rest of the run, which the level tests (log scale, noise from successive
        differences) then judge."""
        ref, self.echo_ref = self.echo_ref, None
        g, c = self.g, self.g.control
        margin = getattr(g.loss_spike, "early_ratio", None)
        if c is None or margin is None or loss is None or not (
                math.isfinite(loss) and loss > 0 and ref > 0):
            return
        ratio = max(loss / ref, ref / loss)
        if ratio <= margin ** 2:
            return
        self.batch_noise = ratio
        self._stand_down()
        # Every cut of the early phase was judged by the same ratio tests: all go.
        g.lr.scale = c.not_the_lr(self.early_base).scale
        self.early_base = None
        g.recorder.event(
            k, "noise", f"the loss at the same (initial) weights was {ref:.4g} and "
            f"{loss:.4g} on two batches ({ratio:.3g}×): batch noise, not the LR; LR scale "
            f"back to ×{g.lr.scale:.3g}, and the early checks wait for a loss history",
            action="recover", lr_scale=g.lr.scale, ratio=ratio)

    def early(self) -> bool:
        """The early phase: the controller has no loss level yet, or the latest row's loss
        was judged by the loss check's first-steps ratio test (too few losses for a noise
        estimate)."""
        c = self.g.control
        return (c is not None and not c.has_level()) or self.loss_early

    def _afresh(self) -> None:
        """Forget what is normal for the loss and the gradients: the controller's level and
        the spike detectors' windows judge what follows from here."""
        g = self.g
        if g.control is not None:
            g.control.rebaseline()
        g.grad_spike.bind(g.device)
        g.loss_spike.bind(g.device)
        if self.batch_noise is not None:
            self._stand_down()

    def _new_data(self) -> int:
        """Judge the loss and the gradients on new data from here: afresh, with the run's
        first loss and noise forgotten ("trained well", "no progress" and the noise are
        the new data's), and the snapshots judged on the old data dropped. Returns how many
        were dropped."""
        g, c = self.g, self.g.control
        self._afresh()
        if c is not None:
            c.forget_start()
        self.early_base = self.restored = None
        return g.store.forget() if g.store is not None else 0

    def outside_edits(self, step: int, end: bool) -> None:
        """Note writes to the watched parameters between the guard's steps (pruning, loaded
        weights, a weight constraint, Lookahead): at the start of a step, versions other
        than the last step left mean something else wrote to them in place; at its end,
        the versions the guard's own writes (the update, a restore) leave. Autograd's
        version counters are host integers: no device sync. A write through ``.data``
        bypasses them and is not seen. Only a rollback can undo such a write: a guard
        without snapshots reads nothing."""
        if self.g.store is None:
            return
        versions = [p._version for p in self.g.params]
        if end:
            self.versions = versions
        elif self.versions is not None and versions != self.versions:
            self.edited = step

    def _undid_edit(self, step: int, to_step: int) -> None:
        """Say so when a rollback restored weights from before an outside edit: it undid
        the edit (a pruned model dense again, a loaded checkpoint replaced)."""
        if self.edited is None or to_step >= self.edited:
            return
        where = "the initial weights" if to_step < 0 else f"weights from step {to_step}"
        msg = (f"the rollback restored {where}, from before the parameters were written "
               f"in place outside the optimizer (before step {self.edited}), so it undid "
               "that write: right for corrupted weights, wrong for a change to keep (pruning, "
               "loaded weights). Call guard.data_changed() right after such a change: no "
               "rollback then goes back past it")
        self.g.recorder.event(step, "edit_undone", msg, action="warn", to_step=to_step,
                              edited=self.edited)
        if not self.warned_edit:
            self.warned_edit = True
            warnings.warn(f"gradguard: {msg}", GuardUsageWarning, stacklevel=7)

    def data_changed(self) -> None:
        """The user changed the data or the loss on purpose (``Guard.data_changed``)."""
        self._known_change(self.g.steps, lambda dropped: (
            f"the data or the loss changed (told by guard.data_changed()): the loss level "
            f"and spike statistics start afresh, and the {dropped} snapshot(s) judged on the "
            "old data are dropped"))

    def _known_change(self, step: int, message: Callable[[int], str], **fields: Any) -> None:
        """Judge from ``step`` on new data, with no rollback: a change known for sure (told
        by the user, or a parameter that joined), not inferred from the loss; a
        ``data_shift`` event whose message ``message`` writes from the number of snapshots
        dropped."""
        self.drain()  # (a host sync, on purpose: the rows in flight are the old data's)
        dropped = self._new_data()
        self.g.recorder.event(step, "data_shift", message(dropped), action="info", **fields)

    def _stand_down(self) -> None:
        for det in (self.g.grad_spike, self.g.loss_spike):
            if hasattr(det, "stand_down"):
                det.stand_down()

    def judge(self, cand: snap.Snapshot) -> None:
        """Keep a snapshot when the steps before it were clean and the loss was calm."""
        store, c = self.g.store, self.g.control
        assert store is not None
        cw = store.cfg.clean_window
        calm = c is None or (c.calm_now() and c.held_since(cand.guard.get("control", {}), cw))
        # (in a run that has learned nothing yet, weights from among rows that pass no
        # gradient through some layer hold dead or dying units: no state to go back to,
        # whatever the loss says; see dead_before_training)
        if c is not None and not c.learned() and self.dead.recently():
            calm = False
        if self.clean_streak >= cw and calm:
            store.keep(cand)

    # -- escalation ----------------------------------------------------------------------
    def escalate(self, rec: dict[str, Any], flagged: bool) -> bool:
        """Feed the controller; lower the LR, roll back or give up. True: rolled back."""
        g = self.g
        p, c, k = g.policy, g.control, rec["step"]
        if rec["nonfinite"] and p.on_nonfinite == Action.RAISE:
            where = "the data (the first layer's inputs or the step's batch)" \
                if rec["bad_inputs"] else "gradients or loss"
            self.diverged(k, f"NaN/Inf in {where} (on_nonfinite='raise')")
        if self.skip_streak >= p.max_consecutive_skips:
            self.diverged(k, ev.skipped_out(self.skip_streak, self.data_streak,
                                            g.names[self.order[0]] if self.order else ""))
        if c is None or ev.data_fault(rec):
            # NaN/Inf inputs: the data's fault, skipped; it says nothing about the LR, the
            # init or the weights, so the controller never sees the row.
            return False
        store = g.store
        # The last restore held: the run got past the rows in which a snapshot holding
        # damage fails at once (the same window as discard_latest's, below).
        held = self.rollbacks > 0 and store is not None and \
            k - self.applied_from >= store.cfg.clean_window + c.cfg.bad_steps
        c.can_retry = store is not None and store.can_retry(held)
        c.progressed = held or self.rollbacks == 0
        loss = self.judged_loss(k, rec["loss"])
        if self.restored is not None and (judged := self.restore_check(k, loss)) is not None:
            return judged
        verdict = c.observe(k, None if loss is None else float(loss), flagged,
                            bool(rec["nonfinite"] or rec["loss_spike"]),
                            skipped=bool(rec["skipped"] or rec["_held"]),
                            grad_norm=float(rec["grad_norm"]), lr=rec["lr"])
        if self.early_base is not None and not self.early():
            self.early_base = None  # the early phase is over: later cuts are the level's
        may_roll = True
        if verdict.unstable is None:
            forced = p.immediate(rec["nonfinite"], rec["grad_spike"], rec["loss_spike"])
            if forced is not None:
                # ("backoff" asks for a lower LR in place: never a retry at the same LR,
                # which only a rollback could carry out.)
                verdict = c.unstable(k, forced[0], may_retry=forced[1])
                may_roll = forced[1]
        dead, self.dead_reason = self.dead_reason, None
        dead_cut = False
        if verdict.unstable is None and dead is not None:
            verdict, dead_cut = c.unstable(k, dead, may_retry=False), True
        g.lr.scale = verdict.scale
        if verdict.recovered is not None:
            g.recorder.event(k, "overshoot", verdict.recovered, action="none",
                             lr_scale=verdict.scale)
        if verdict.raised:
            g.recorder.event(k, "recover", f"calm for a while: LR scale raised to "
                             f"×{verdict.scale:.3g}", action="recover", lr_scale=verdict.scale)
        elif (left := verdict.held) is not None:
            g.recorder.event(
                k, "probe_held", f"calm for a while, but the run ends in {left} steps, fewer "
                f"than the {c.cfg.window} a raised LR's failure takes to show: the LR scale "
                f"stays ×{c.scale:.3g}", action="hold", lr_scale=c.scale, steps_left=left)
        reason = verdict.unstable
        if reason is None:
            return False
        clip = verdict.clip
        if verdict.give_up:
            lr = self.base_lrs.get(k) or g.optimizer.param_groups[0]["lr"]
            # (units that died and stay dead, as the verdict reads them)
            self.diverged(k, ev.give_up(reason, c.scale, lr, self.dead.ended())
                          + self.restore_before_giving_up(k))
        rb = p.rollback
        rolls = store is not None and bool(store.good) and may_roll
        # (the cap counts rollbacks: an LR lowered in place is none)
        if rolls and rb is not None and rb.max_rollbacks is not None \
                and self.rollbacks >= rb.max_rollbacks:
            self.diverged(k, f"{reason}, after {counted(self.rollbacks, 'rollback')} "
                             f"(max_rollbacks={rb.max_rollbacks})"
                          + self.restore_before_giving_up(k))
        if rolls:
            early = self.early()
            loss_bad = rec["loss_spike"] or (loss is not None and not math.isfinite(loss))
            # A snapshot is kept when the clean_window rows after it were clean; failing
            # that same test right after being restored (a streak that began within
            # clean_window rows), it holds the damage, not the LR: go one further back
            # at the LR the run had.
            since = k - self.applied_from  # (held rows moved nothing: not counted)
            if since < store.cfg.clean_window + c.cfg.bad_steps and self.rollbacks \
                    and loss_bad and store.discard_latest():
                verdict = c.not_the_lr()
                g.lr.scale = verdict.scale
            cut_point, clip_before = c.cut_point(), None if clip else c.clip_since
            target = self.rollback(k, reason, verdict.retry, clip,
                                   (cut_point, clip_before, None))
            if target is None and not rec["nonfinite"]:
                # (a rise or a streak of spikes judged against what the old model did; a
                # NaN/Inf streak is the changed model's own, answered in place below)
                return self._model_changed(k, reason, cut_point, clip_before)
            if target is not None:
                if dead_cut:
                    self.dead.restart()  # (back before the episode: judged afresh)
                if early and target == -1 and self.batch_noise is None:
                    self.echo_ref = c.first_loss
                    if self.early_base is None:
                        self.early_base = cut_point
                return True
        # No snapshot undid the damage: the weights are elsewhere now, and so is what is
        # normal for their loss and gradients. Judge what follows from here.
        self._afresh()
        what = _CLIPPING if clip else f"LR scale ×{verdict.scale:.3g}"
        why = " (no snapshot to roll back to)" if may_roll else " in place"
        g.recorder.event(k, "backoff", f"unstable: {reason}; {what}{why}", action="backoff",
                         lr_scale=verdict.scale, reason=reason, clip_all=clip)
        return False

    def _take_back(self, point: Any, clip_since: int | None) -> None:
        """Return the LR state to ``point`` (a :meth:`Controller.cut_point`) and the
        clipping to ``clip_since``: the cuts since were no LR problem's."""
        g, c = self.g, self.g.control
        assert c is not None
        c.not_the_lr(point)
        c.clip_since = clip_since
        g.lr.scale = c.scale

    def _model_changed(self, k: int, reason: str, point: Any, clip_before: int | None
                       ) -> bool:
        """The snapshots no longer fit the model: it was changed since the latest one was
        taken (pruned with ``torch.nn.utils.prune``, reparametrised, a layer swapped), so the
        loss level that rose compares the changed model with the old one, and says nothing
        about the LR. Take the cut back and judge the loss afresh, as for new data
        (measured: ``mlp-prune95`` in ``benchmarks/NOHARM.md``)."""
        g, c = self.g, self.g.control
        assert c is not None
        self._take_back(point, clip_before)
        self._new_data()
        g.recorder.event(
            k, "data_shift",
            f"the model changed since its last snapshot (it no longer fits), not the LR: "
            f"{reason} compares the changed model with the old one; LR scale back to "
            f"×{c.scale:.3g}, and the loss level and spike statistics start afresh",
            action="recover", lr_scale=c.scale, model_changed=True)
        return False

    def dead_before_training(self) -> str | None:
        """The reason to treat the dead units just reported as instability, or None.

        Units that die before the run learned anything (:meth:`Controller.learned`: its
        loss level was never under its first by a regression's margin) were
        killed by the first oversized steps of a too-high LR: the network is a constant
        function of its input from there on, no LR revives it, and the loss sits at chance,
        which no level test reads as a blow-up. What undoes it is going back to weights
        from before, at a lower LR; snapshots whose rows showed a dead prefix are not kept
        (see :meth:`judge`), so the latest kept one is from before (the initial weights,
        when the units died in the first steps). A run that trained first and then died
        is left to the level tests (it regresses from its best), and a bad init that
        dies while its loss falls far below its first is left alone: restored at a tenth
        of the LR it scores worse than dead at chance (measured: benchmarks/RESULTS.md,
        "Dead units"). Needs a judged loss and snapshots to go back to.
        """
        g, c, dead = self.g, self.g.control, self.dead
        if c is None or self.unjudged or c.first_loss is None or g.store is None \
                or not g.store.active or not g.store.good or dead.last is None \
                or c.learned():
            return None
        deepest, _, n = dead.last
        more = f" and {n - 1} tensor{'s' if n > 2 else ''} before it" if n > 1 else ""
        return (f"dead units before the run trained: no gradient reaches {deepest}{more} "
                f"since step {dead.first}, and the loss never fell below its first by a "
                "regression's margin (oversized early steps)")

    def judged_loss(self, k: int, loss: Any) -> Any:
        """The loss the controller judges: None once the loss is unjudged.

        The loss checks read a loss that falls as the model learns, on a log scale or from
        a natural zero. A value that takes both signs among the run's first ``window``
        finite losses, before training can have moved it far, is none: a centred surrogate
        (a policy gradient with a baseline, PPO's objective), a critic's score (a GAN),
        or a likelihood shifted by an arbitrary constant, whose level no ratio and no
        "×(1 + rise) above the best" can judge. Then the loss checks stand down for the
        run, as if no loss were passed (measured: REINFORCE on MNIST, passing its
        surrogate loss, rolled back on 9 of 10 healthy seeds; without it, identical to no
        guard on all 10). A loss that first turns negative later (a likelihood past zero)
        is judged on, on a linear scale.
        """
        if self.unjudged:
            return None
        c = self.g.control
        if loss is None or c is None or not math.isfinite(loss) \
                or self.signs[2] >= c.cfg.window:
            return loss
        self.signs[0] |= loss < 0
        self.signs[1] |= loss > 0
        self.signs[2] += 1
        if not (self.signs[0] and self.signs[1]):
            return loss
        self.stand_down_loss(
            k, f"the loss took both signs in its first {self.signs[2]} steps, so it is no "
            "loss that falls as the model learns (a policy-gradient surrogate, a critic's "
            "score, a likelihood shifted by a constant): the loss checks stand down for this "
            "run; NaN/Inf and gradient checks go on. To have a loss judged, pass guard.step "
            "a value that falls as the model learns (for RL, the negative mean reward)")
        return None

    def stand_down_loss(self, k: int, why: str, moving: bool = False, **fields: Any
                        ) -> None:
        """Judge the rest of the run as if no loss were passed (:meth:`judged_loss`):
        the loss level, the loss spike test and everything built on them stand down;
        NaN/Inf and the gradient checks go on. ``why`` is the event's message.

        Args:
            moving: the objective is known to move on its own (another model's score,
                or data that changed twice): a streak of gradient-norm flags is then the
                objective's doing too, not the LR's, so it is no longer instability
                (each flagged step is still skipped or clipped); NaN/Inf streaks are.
        """
        self.unjudged = True
        c = self.g.control
        if c is not None:
            c.rebaseline()
            c.forget_start()
            c.moving |= moving
        self.g.loss_spike.bind(self.g.device)
        self.g.recorder.event(k, "loss_unjudged", why, action="info", **fields)

    def wants_attention(self) -> bool:
        """Whether the guard looks for attention (``Stability(warmup="attention")``)."""
        stab = self.g.policy.stability
        return stab is not None and stab.warmup == "attention" and not self.attention

    def warm_up_attention(self, k: int, found: str) -> None:
        """Start ``Stability(warmup="attention")``'s warm-up on a model found to compute
        attention, once, on a fresh run: not for a resumed guard (it carries its own), an
        optimizer that has stepped before (its moments are past their oversized start),
        or a schedule of the user's that starts below its LR (their warm-up)."""
        g = self.g
        stab = g.policy.stability
        if not self.wants_attention() or stab is None or g.lr.warmup or g.lr.progress \
                or g.steps:
            return
        self.attention = found
        n = stab.warmup_steps(g.optimizer, attention=True)
        # (Adam keeps no state for a parameter before its first step)
        stepped = any(g.optimizer.state.get(p) for p in g.params)
        if n and not stepped and not g.lr.user_warms_up():
            g.lr.warmup = n
            g.recorder.event(
                k, "warmup", f"{found} under {type(g.optimizer).__name__}: the LR ramps up "
                f"linearly over the first {n} steps, 2/(1 − β1), while Adam's first updates "
                "are oversized (Stability(warmup='attention'))", action="info", steps=n,
                found=found)

    def check_loss_graph(self, k: int, loss: Any) -> None:
        """Once, at the first loss that carries its autograd graph: stand the loss checks
        down when that graph reaches trainable parameters outside the guarded model (and,
        under ``Stability(warmup="attention")``, warm up when it computes attention).

        Such a loss is partly another model's, which another optimizer moves: a GAN's
        generator loss is scored by the discriminator, an actor's by its critic. Its level
        then rises and falls with the other model's training, not with this model's
        progress or its LR, so no "rose above its best" can judge it (measured: a GAN on
        a ring of Gaussians, one guard per optimizer, judged by their losses: rollbacks on
        all 10 healthy seeds, 8 ended worse, the generator's guard gave up on one;
        benchmarks/NOHARM.md, ``gan-ring``). Walking the graph reads autograd's metadata
        only (its nodes outlive ``backward()``): no device sync, once per run. Under FSDP2
        the forward runs on unsharded copies of the parameters, which no test here can
        tell from another model's, so a sharded model is not checked."""
        self.graph_checked = True
        fn = getattr(loss, "grad_fn", None)
        g = self.g
        if fn is None:
            return
        judged = not self.unjudged and not any(is_sharded(p) for p in g.params)
        attention = self.wants_attention()
        if not (judged or attention):
            return
        nodes = graph.nodes(fn)
        if attention and graph.computes_attention(nodes):
            self.warm_up_attention(k, "dot-product attention in the loss's graph")
        if not judged:
            return
        own = {id(p) for p in g.params} | {
            id(p) for _, p in optimizer_params(None, g.optimizer)}
        if g.model is not None:  # (a guard built from the optimizer alone has none)
            own |= {id(p) for p in g.model.parameters()}
        foreign = {id(v): v for v in graph.leaves(nodes)
                   if isinstance(v, nn.Parameter) and v.requires_grad and id(v) not in own}
        if not foreign:
            return
        n = sum(p.numel() for p in foreign.values())
        self.stand_down_loss(
            k, f"the loss depends on {len(foreign)} trainable tensor(s) ({n:,} parameters) "
            "outside the guarded model, as a GAN generator's loss depends on its "
            "discriminator or an actor's on its critic: another optimizer moves what it "
            "measures, so its level is no measure of this model's progress. The loss checks "
            "stand down for this run; NaN/Inf and gradient checks go on. If those "
            "parameters are not trained (a teacher, a frozen encoder), freeze them "
            "(requires_grad_(False)) or run them under torch.no_grad(), and the loss is "
            "judged", moving=True, foreign_tensors=len(foreign), foreign_params=n)

    def restore_before_giving_up(self, step: int) -> str:
        """Put the model and optimizer back to the latest good snapshot before the guard
        raises, so that what the user saves after catching the error holds sound weights,
        not the ones that broke; returns the sentence that says so ("" with none)."""
        store = self.g.store
        if store is None or not store.good:
            return ""
        try:
            target = store.restore_latest()
        except snap.SnapshotError:
            return ""  # (snapshots of another model: the weights stay as they are)
        where = "the initial weights" if target.step < 0 else \
            f"the state after step {target.step}, the last good snapshot"
        self.g.recorder.event(step, "restored", f"model and optimizer put back to {where} "
                              "before giving up", action="rollback", to_step=target.step)
        return (f". The model and optimizer were put back to {where}, so a checkpoint "
                "saved now holds sound weights")

    def rollback(self, step: int, reason: str, retry: bool, clip: bool = False,
                 check: tuple[Any, int | None, list[float] | None] | None = None
                 ) -> int | None:
        """Restore the latest good snapshot; the controller has already set the LR.

        Args:
            check: arm :meth:`restore_check` for the restored weights with (the LR state
                before this rollback's cut, the clip row before it, and None for a
                first look, or, for the step one snapshot further back, the losses the
                first look's weights scored).

        Returns:
            The step the restored snapshot was taken after (-1: the initial weights), or
            None: the snapshots no longer fit the model (nothing was restored; they are
            dropped, and the caller reads the model as changed, see :meth:`_model_changed`).
        """
        g = self.g
        assert g.store is not None
        if check is not None and check[2] is None:
            # (a first look: the state left is what a data change sends the run back to)
            g.store.leave(g.steps - 1, checkpoint.trajectory(g))
        try:
            target = g.store.restore(retry)
        except snap.SnapshotError as e:
            dropped = g.store.forget()
            g.recorder.event(step, "rollback_off", f"{e}: the {dropped} snapshot(s) taken "
                             "before the change are dropped; new ones are taken from here",
                             action="warn")
            warnings.warn(f"gradguard: {e}; the snapshots are dropped. After changing the "
                          "model on purpose (pruning, loading weights), call "
                          "guard.data_changed()", GuardUsageWarning, stacklevel=6)
            return None
        self._undid_edit(step, target.step)
        saved = target.guard.get("control")
        self.restored = None if check is None or not saved else (
            saved, check[0], check[1], target.step, [], check[2])
        # (held only where the test can judge: a window of min_losses saved losses; the
        # early phase's restores, to the initial weights, have none)
        self.hold = 0 if self.restored is None or g.control is None or len(
            self.restored[0].get("losses", ())) < g.control.cfg.min_losses \
            else g.control.cfg.bad_steps
        if self.restored is None:
            g.store.left = None  # (nothing will judge the restore: the state left goes)
        checkpoint.load_trajectory(g, target.guard)
        if target.step == -1:
            self.dead.restart(initial=True)  # (see DeadLayers.restart)
        if self.unjudged and g.control is not None:
            g.control.rebaseline()  # (a snapshot from before may hold losses it judged)
        if self.batch_noise is not None:
            self._stand_down()  # (the restored detectors predate what the echo measured)
        g.lr.progress = target.step + 1
        self.rollbacks += 1
        skip_n = g.store.cfg.skip_batches
        self.skip_batches = skip_n
        self.skip_streak = self.clean_streak = 0
        self.ignore_rows_before = g.steps
        self.applied_from = g.steps + self.hold
        skip = ""
        if skip_n:
            skip = (f"; skipping the next {skip_n} batches" if self.batches_used else
                    f"; NOT skipping the next {skip_n} batches: iterate with "
                    "guard.batches(loader) (or ask guard.should_skip_batch()) for that")
        lr = (f"retrying at the same LR scale ×{g.lr.scale:.3g} (a sudden failure of a "
              "healthy run: a transient fault is likelier than the LR)" if retry
              else _CLIPPING if clip else f"LR scale ×{g.lr.scale:.3g}")
        g.recorder.event(
            step, "rollback", f"unstable: {reason}; rolled back to "
            + ("the initial weights" if target.step < 0 else
               f"the state after step {target.step}") + f", {lr}{skip}"
            + (f"; the next {counted(self.hold, 'step')} hold the restored weights, whose "
               "losses judge them" if self.hold else ""),
            action="rollback", to_step=target.step, reason=reason, lr_scale=g.lr.scale,
            clip_all=clip)
        return target.step

    def restore_check(self, k: int, loss: Any) -> bool | None:
        """After a rollback, judge the restored weights by the first ``bad_steps`` losses
        computed from them (:meth:`~gradguard.control.Controller.unlike_saved`).

        When they score worse than all but one loss saved with them, that snapshot holds
        damage its saved losses did not show (a dormant fault, a corrupted copy) or the
        data changed. The snapshot before it tells which: the guard goes one back, at the
        same LR, and judges it alike (once; not past ``max_rollbacks``). It holds no
        damage the newer one took on, so the newer weights scoring worse than it on the
        same new batches is damage, and so is the older weights scoring as well as the
        losses saved with them (their level then, which training since only lowered).
        When it fails its own saved window too, or both directions point the other way
        (it scores above the median saved with it, and the newer weights, trained longer,
        score no worse than it), or there is none older, the data changed, not the LR:
        the run goes back to the state the rollback left (the progress since was made
        on the new data, as no guard would have), the rollback's cut is taken back (and
        its clipping, if it began it), the loss level and the spike detectors learn the
        new data afresh, and the snapshots judged on the old data are dropped. The
        comparison of the two is paired on the same batches' distribution, free of the
        drift between a saved window and its weights: an older window, from earlier in
        training, spans higher losses that can hide a change its own test would need.

        Returns:
            None while undecided or when the weights scored as saved (the row is judged as
            usual); True when it rolled back one snapshot further; False when the data
            changed (the row is then the new data's first, not judged).
        """
        g, c = self.g, self.g.control
        assert self.restored is not None and c is not None
        saved, point, clip_before, to_step, losses, first = self.restored
        store = g.store
        if loss is None or not math.isfinite(float(loss)):
            self.restored = None  # (a NaN/Inf row: the fault path judges it)
            if store is not None:
                store.left = None
            return None
        losses.append(float(loss))
        # (a first look needs every loss above the saved ones but the highest: one that is
        # not decides, and the steps still held would be lost for nothing)
        done = first is None and float(loss) <= c.saved_bar(
            [float(v) for v in saved["losses"]])
        if len(losses) < c.cfg.bad_steps and not done:
            return None
        self.restored = None
        seen = None if done else c.unlike_saved(saved, losses)
        if seen is None and first is not None:
            seen = c.moved_with(saved, losses, first)
        if seen is None:
            if store is not None:
                store.left = None  # (the restore stands: the rollback was right)
            return None
        rb = g.policy.rollback
        capped = rb is not None and rb.max_rollbacks is not None and \
            self.rollbacks >= rb.max_rollbacks
        if first is None and not capped and store is not None and store.discard_latest() \
                and self.rollback(
                    k, f"the weights restored from step {to_step} scored a loss of "
                    f"{seen[1]:.4g} against {seen[0]:.4g} when saved (damage that snapshot "
                    "holds, or the data changed: the one before it tells)", False,
                    check=(point, clip_before, list(losses))) is not None:
            return True
        # (The one before it did not fit the model: no test tells; read it as new data.)
        then, now = seen
        ratio = f" ({now / then:.3g}×)" if then > 0 else ""
        back = self._return_to_left()
        self._take_back(point, clip_before)
        dropped = self._new_data()
        where = "" if back is None else (
            f"; the model and optimizer are back where the rollback found them (after step "
            f"{back}), as the new data had left them")
        g.recorder.event(
            k, "data_shift",
            f"the data changed, not the LR: the weights restored from step {to_step} scored "
            f"a loss of {then:.4g} when saved and {now:.4g} now{ratio}; LR scale "
            f"back to ×{c.scale:.3g}{where}, the loss level and spike statistics start "
            f"afresh on the new data, and the {dropped} snapshot(s) judged on the old data "
            "are dropped", action="recover", lr_scale=c.scale, then=then, now=now,
            to_step=to_step, returned_to=back)
        self.shifts.append(k)
        if len(self.shifts) == 1:
            self.shift_point = (c.cut_point(), c.clip_since)
        elif not self.unjudged:
            if self.shift_point is not None:
                # (every cut since the first change was judged on the moving level)
                self._take_back(*self.shift_point)
            # A one-off change (a curriculum's next stage, a new source) is answered above
            # and the loss judged afresh. A second one says the objective moves on its own:
            # a discriminator's loss, whose data is another model's output, or a critic's;
            # then every rise is the next change, each one answered by a rollback and a
            # hold, and the level says nothing about the LR (measured: a GAN's
            # discriminator guard, its generator's loss not judged, read 5-13 changes of
            # data in 2000 steps on 3 of 10 seeds and rolled back up to 26 times, 9 seeds
            # ending worse; benchmarks/RESULTS.md, "a loss whose objective moves").
            self.stand_down_loss(
                k, f"the data changed on its own a second time (steps {self.shifts[0]} and "
                f"{k}: restored weights scored worse than when saved, as the weights the run "
                "had did), so what the loss measures keeps moving, as a discriminator's or a "
                "critic's loss does: its level is no measure of this model's LR. The loss "
                f"checks stand down for this run, every LR cut since the first change is taken "
                f"back (LR scale ×{c.scale:.3g}); NaN/Inf and gradient checks go on. If the "
                "data changes on purpose, call guard.data_changed() at each change and the "
                "loss stays judged", moving=True, shifts=list(self.shifts),
                lr_scale=c.scale)
        return False

    def _return_to_left(self) -> int | None:
        """After a rollback that the data change caused: put the run back to the state
        the rollback left (the progress since the snapshot was sound, made on the new data
        as no guard would have); returns the step it was taken after (None: none kept,
        or it no longer fits the model, and the restored weights stay)."""
        g = self.g
        if g.store is None:
            return None
        try:
            left = g.store.return_to_left()
        except snap.SnapshotError:
            return None
        if left is None:
            return None
        checkpoint.load_trajectory(g, left.guard)
        g.lr.progress = left.step + 1
        return left.step

    def stopped(self, exc: BaseException) -> None:
        """An exception ended the run (the ``with`` block, or the script): one event that
        the verdict reads. The guard's own give-up has its ``diverged`` event already."""
        if isinstance(exc, TrainingDivergedError) or not self.g._started:
            # (before its first step the guard wrote no run header: an event would land
            # in the run before it in the log, and a run without a step has no verdict)
            return
        what = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        if len(what) > 300:
            what = what[:300] + " …"
        self.g.recorder.event(self.g.steps, "stopped", f"the run stopped by {what}",
                              action="info", error=type(exc).__name__)

    def diverged(self, step: int, why: str) -> None:
        g = self.g
        if g.scaler is None and g._usage.fp16_forward and not g._usage.scaler_elsewhere:
            # The warning at the first step is long gone: the likeliest cause leads.
            why = ("the model ran under fp16 autocast and the guard has no GradScaler, so "
                   "it measured gradients multiplied by the loss scale, or fp16 gradients "
                   "that underflow: pass Guard(model, optimizer, scaler=scaler) (or autocast "
                   f"to bfloat16) before suspecting the LR. What the guard saw: {why}")
        diagnosis = g.diagnosis()
        g.recorder.event(step, "diverged", f"gave up: {why}", action="raise")
        g.recorder.flush()
        raise TrainingDivergedError(
            f"gradguard gave up at step {step}: {why}. Last events: "
            + "; ".join(e["message"] for e in g.recorder.events[-4:]),
            diagnosis,
        )

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Host-side bookkeeping a resumed run needs to decide as the uninterrupted one."""
        return {"skip_streak": self.skip_streak, "clean_streak": self.clean_streak,
                "data_streak": self.data_streak, "watching": self.inputs.armed,
                "ignore_rows_before": self.ignore_rows_before,
                "applied_from": self.applied_from,
                "skip_batches": self.skip_batches, "depth": self.depth.state_dict(),
                "drift": self.drift.state_dict(), "dead": self.dead.state_dict(),
                "recurrent_clipped": self.recurrent_clipped,
                "echo_ref": self.echo_ref, "batch_noise": self.batch_noise,
                "early_base": None if self.early_base is None else list(self.early_base),
                "lr_span": None if self.lr_span is None else list(self.lr_span),
                "signs": list(self.signs), "unjudged": self.unjudged, "hold": self.hold,
                # (which parameters have had a gradient: one that gets its first is a
                # change of model, see joined; the unwatched by name, ids are per process)
                "had_grad": None if self.had_grad is None else sorted(self.had_grad),
                "last_index": list(self.last_index),
                "thawed": [n for n, p in self.g._unwatched if id(p) in self.thawed_ids],
                "shifts": list(self.shifts),
                "shift_point": None if self.shift_point is None else [
                    list(self.shift_point[0]), self.shift_point[1]],
                "restored": None if self.restored is None else [
                    self.restored[0], list(self.restored[1]), self.restored[2],
                    self.restored[3], list(self.restored[4]),
                    None if self.restored[5] is None else list(self.restored[5])]}

    def load_state_dict(self, h: dict[str, Any]) -> None:
        self.skip_streak, self.clean_streak = int(h["skip_streak"]), int(h["clean_streak"])
        self.data_streak = int(h.get("data_streak", 0))  # (absent before it existed)
        if h.get("watching", False):
            self.inputs.arm(None)  # (the first step's batch too; see __init__)
        self.ignore_rows_before = int(h.get("ignore_rows_before", 0))
        self.applied_from = int(h.get("applied_from", self.ignore_rows_before))
        self.hold = int(h.get("hold", 0))  # (absent before it existed)
        self.recurrent_clipped = int(h.get("recurrent_clipped", 0))  # (absent before it)
        self.echo_ref, self.batch_noise = h.get("echo_ref"), h.get("batch_noise")
        base = h.get("early_base")  # (absent before it existed)
        self.early_base = None if base is None else _cut_point(base)
        signs = h.get("signs", [False, False, 0])  # (absent before it existed)
        self.signs = [bool(signs[0]), bool(signs[1]), int(signs[2])]
        self.unjudged = bool(h.get("unjudged", False))
        self.shifts = [int(v) for v in h.get("shifts", [])]  # (absent before it existed)
        sp = h.get("shift_point")
        self.shift_point = None if sp is None else (
            _cut_point(sp[0]), None if sp[1] is None else int(sp[1]))
        span = h.get("lr_span")  # (absent before it existed)
        self.lr_span = None if span is None else (float(span[0]), float(span[1]))
        r = h.get("restored")  # (absent before it existed)
        self.restored = None if r is None else (
            r[0], tuple(r[1]), r[2], int(r[3]), [float(v) for v in r[4]],
            # (a bool before the first look's losses were kept: True had no losses)
            None if r[5] is None or r[5] is False else [float(v) for v in (r[5] or [])])
        if "had_grad" in h:  # (absent before it existed)
            seen = h["had_grad"]
            self.had_grad = None if seen is None else {int(i) for i in seen}
            self.last_index = tuple(int(i) for i in h["last_index"])
            thawed = set(h["thawed"])
            self.thawed_ids = {id(p) for n, p in self.g._unwatched if n in thawed}
            self.warned_thaw = self.warned_thaw or bool(thawed)
        self.skip_batches = int(h["skip_batches"])
        self.depth.load_state_dict(h["depth"])
        self.drift.load_state_dict(h["drift"])
        if "dead" in h:  # (absent before it existed)
            self.dead.load_state_dict(h["dead"])
