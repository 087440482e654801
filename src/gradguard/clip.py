"""Gradient transforms: small objects with explicit state, composable with :func:`chain`.

Each transform reads and edits a :class:`ClipContext` that holds the step's gradients and
their per-tensor norms. Transforms that only rescale whole tensors (global norm, per-layer
norm, quantile, z-score, normalise) do not touch the gradients at once: they multiply a
pending per-tensor scale and update the norms analytically, so a chain of them costs one
multiply pass over the gradients, exactly like ``clip_grad_norm_``. Transforms that need
elementwise access (value, AGC, centralise) flush the pending scale first and mark the
norms stale; the next reader recomputes them.

State lives in device tensors and is updated with ``torch.where``: no transform calls
``.item()`` or branches on a device value, and no stateful transform lets a non-finite
norm into its history.

The composition follows optax's ``chain`` of gradient transformations
(``optax/_src/combine.py``), adapted to in-place PyTorch gradients.
"""

from __future__ import annotations

import abc
import fnmatch
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, final

import torch
from torch import Tensor

from .distributed import split_dims
from .errors import ConfigError, check_bool, check_int, check_positive
from .state import TensorState
from .stats import GradGroups, GradStats, finite, foreach_norms, global_from_norms

__all__ = [
    "AGC",
    "Centralize",
    "Chain",
    "ClipContext",
    "GlobalNorm",
    "Normalize",
    "PerLayerNorm",
    "Quantile",
    "SpikeClamp",
    "Transform",
    "Value",
    "ZScore",
    "as_transform",
    "chain",
]

# clip_grad_norm_'s guard against division by zero; matched so GlobalNorm is bit-compatible.
_TORCH_EPS = 1e-6


class ClipContext:
    """The gradients of one step as the transforms see them.

    Attributes:
        groups: the gradients, bucketed by device and dtype.
        names: parameter names, aligned with ``groups.grads``.
        positions: positions of those parameters in the guard's parameter list.
        finite: 0-dim bool, False when the incoming gradients or loss are non-finite;
            stateful transforms do not learn from such steps.
        device: where the small statistics tensors live.
        spike: 0-dim bool, the gradient-norm spike detector's flag for this step (None:
            no detector ran).
        typical: the norm that detector expects (its window's median; a host number,
            ``math.inf`` before it has any history).
        clip_all: clip every step to ``typical``, not only spikes (a host bool: the
            stability controller's answer to a run that gave back its progress).
        clip_ratio: clip every step to ``clip_ratio`` × ``typical`` (a host number, or
            None: the guard's answer to a recurrent model, ``Policy.clip_recurrent``).
        host_reads: reading a device flag on the host costs nothing here (the guard's
            "host" skip strategy: a CPU, where there is no device to wait for, or a user
            who chose it): a transform may branch on a flag instead of scaling every
            step by a factor that is 1 on most of them.
    """

    def __init__(self, groups: GradGroups, stats: GradStats, names: Sequence[str],
                 finite: Tensor, device: torch.device) -> None:
        self.groups = groups
        self.names = list(names)
        self.positions = stats.index
        self.finite = finite
        self.device = device
        self._norms: Tensor | None = stats.norms
        # The global norm of the current norms, kept until a transform changes them (the
        # stats pass has computed it for the incoming ones already).
        self._global: Tensor | None = stats.global_norm
        self._pending: Tensor | None = None
        self.spike: Tensor | None = None
        self.typical: float | None = None
        self.clip_all = False
        self.clip_ratio: float | None = None
        self.host_reads = False

    @property
    def norms(self) -> Tensor:
        """Current per-tensor L2 norms (after the transforms so far)."""
        if self._norms is None:
            self.flush()
            self._norms = foreach_norms(self.groups, self.groups.grads, self.device)
        return self._norms

    @property
    def global_norm(self) -> Tensor:
        """Current global L2 norm (0-dim fp32)."""
        if self._global is None:
            self._global = global_from_norms(self.norms)
        return self._global

    def scale(self, factor: Tensor) -> None:
        """Scale gradients by ``factor`` (0-dim, or one entry per tensor), lazily."""
        norms = self.norms
        self._norms = norms * factor
        self._global = None
        self._pending = factor if self._pending is None else self._pending * factor

    def grads(self) -> list[Tensor]:
        """The gradients, with every pending scale applied, for elementwise edits."""
        self.flush()
        return self.groups.grads

    def modified(self) -> None:
        """Declare that the gradients were edited in place; norms get recomputed on demand."""
        self._norms = None
        self._global = None

    def take_scale(self) -> Tensor | None:
        """The pending scale when it is one 0-dim factor for every gradient, handed over
        instead of applied (for a fused optimizer's ``grad_scale``, which divides by it:
        pass its reciprocal); otherwise flushed here, and None."""
        factor = self._pending
        if factor is None or factor.dim() != 0:
            self.flush()
            return None
        self._pending = None
        return factor

    def flush(self) -> None:
        """Apply the pending scale with one foreach multiply per bucket."""
        factor = self._pending
        if factor is None:
            return
        self._pending = None
        for dev, grads, pos in self.groups.bucket_grads():
            if factor.dim() == 0:
                torch._foreach_mul_(grads, factor.to(dev, non_blocking=True))
            else:
                part = factor if len(pos) == factor.numel() else factor[pos]
                torch._foreach_mul_(grads, list(part.to(dev, non_blocking=True).unbind(0)))


class Transform(TensorState, abc.ABC):
    """A gradient transform with explicit state.

    Subclasses implement :meth:`__call__`; those with state keep it in ``self.state``
    (a dict of device tensors, allocated in :meth:`bind`), which :meth:`state_dict` /
    :meth:`load_state_dict` round-trip.
    """

    def bind(self, names: Sequence[str], params: Sequence[Tensor], device: torch.device) -> None:
        """Allocate state for the guarded parameters (called once by the guard)."""
        self.state = {}

    @abc.abstractmethod
    def __call__(self, ctx: ClipContext) -> None:
        """Transform the gradients in ``ctx``."""

    def bound(self) -> float | None:
        """The global-norm bound this transform guarantees, if it has one."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_setting(v)}" for k, v in vars(self).items()
                         if not k.startswith("_") and k != "state")
        return f"{type(self).__name__}({args})"


def _setting(v: Any) -> str:
    """A setting as the guard's saved settings compare it: a function by its qualified name,
    not its repr, whose memory address differs in every process (a resumed run's guard
    would never match the saved one)."""
    if callable(v) and not isinstance(v, Transform) and hasattr(v, "__qualname__"):
        return f"<{getattr(v, '__module__', '?')}.{v.__qualname__}>"
    return repr(v)


def _norm_clip_coef(norm: Tensor, max_norm: Tensor | float) -> Tensor:
    """``clip_grad_norm_``'s coefficient: min(1, max_norm / (norm + 1e-6))."""
    return torch.clamp(max_norm / (norm + _TORCH_EPS), max=1.0)


@final
class Chain(Transform):
    """Apply transforms in order (optax ``chain``)."""

    def __init__(self, *transforms: Transform) -> None:
        for t in transforms:
            if not isinstance(t, Transform):
                raise ConfigError(f"chain() takes gradguard.clip transforms, got {t!r}")
        self.transforms = list(transforms)

    def bind(self, names: Sequence[str], params: Sequence[Tensor], device: torch.device) -> None:
        for t in self.transforms:
            t.bind(names, params, device)

    def __call__(self, ctx: ClipContext) -> None:
        for t in self.transforms:
            t(ctx)

    def bound(self) -> float | None:
        # Every transform here can only shrink norms except Normalize, which sets them.
        bound: float | None = None
        for t in self.transforms:
            b = t.bound()
            if isinstance(t, Normalize):
                bound = b
            elif b is not None:
                bound = b if bound is None else min(bound, b)
        return bound

    def state_dict(self) -> dict[str, Any]:
        return {str(i): t.state_dict() for i, t in enumerate(self.transforms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {str(i) for i in range(len(self.transforms))}:
            raise ConfigError(
                f"chain state has {len(state)} entries, this chain has {len(self.transforms)} "
                "transforms; it was saved by a different chain"
            )
        for i, t in enumerate(self.transforms):
            t.load_state_dict(state[str(i)])

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.transforms))})"


def chain(*transforms: Transform) -> Chain:
    """Compose transforms; they run left to right on the same gradients."""
    return Chain(*transforms)


@final
class SpikeClamp(Transform):
    """Scale a step the gradient-norm spike detector flagged down to the norm it expected.

    The guard puts it last in its chain under ``on_spike`` "auto", "clip" and "backoff": a
    flagged step that is applied anyway is applied no larger than the typical norm,
    whatever the transforms before let through (ZClip's "mean" response, Kumar et al.
    2025, section 3.3); unflagged steps pass untouched. Under ``ctx.clip_all`` every step
    is clipped to that norm (Pascanu et al. 2013, §3.2, with the threshold the detector's
    window median, as AutoClip takes a percentile of past norms: Seetharaman et al. 2020).
    Under ``ctx.clip_ratio`` (a recurrent model) every step is first clipped to that
    many times the typical norm, the same rule with the threshold a multiple of it.
    """

    def __call__(self, ctx: ClipContext) -> None:
        if ctx.spike is None or ctx.typical is None:
            return
        if ctx.clip_ratio is not None and not ctx.clip_all:
            coef = _norm_clip_coef(ctx.global_norm, ctx.clip_ratio * ctx.typical)
            # (a CPU flag under host_reads, as below: most steps are under the bound)
            if not ctx.host_reads or bool(coef < 1):
                ctx.scale(coef)
        # (clip_all is a host bool: choosing the branch costs no sync)
        if ctx.clip_all:
            ctx.scale(_norm_clip_coef(ctx.global_norm, ctx.typical))
        elif ctx.host_reads:
            # A read of a CPU flag, not a sync: most steps are not spikes, and skipping
            # their ×1 saves a pass over every gradient (bit-identical: x·1 = x).
            if bool(ctx.spike):
                ctx.scale(_norm_clip_coef(ctx.global_norm, ctx.typical))
        else:
            ctx.scale(torch.where(ctx.spike, _norm_clip_coef(ctx.global_norm, ctx.typical),
                                  1.0))


@final
class GlobalNorm(Transform):
    """Rescale all gradients so their global L2 norm is at most ``max_norm``.

    Identical to ``torch.nn.utils.clip_grad_norm_`` (same coefficient, same epsilon).
    Reference: Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent
    neural networks", section 3.2.
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = check_positive("GlobalNorm.max_norm", max_norm)

    def __call__(self, ctx: ClipContext) -> None:
        ctx.scale(_norm_clip_coef(ctx.global_norm, self.max_norm))

    def bound(self) -> float | None:
        return self.max_norm


@final
class PerLayerNorm(Transform):
    """Rescale each parameter tensor's gradient to an L2 norm of at most ``max_norm``.

    Reference: Pascanu et al. 2013 (norm clipping), applied per tensor as in
    layer-wise clipping for differentially private SGD (McMahan et al. 2018, sec. 3).
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = check_positive("PerLayerNorm.max_norm", max_norm)

    def __call__(self, ctx: ClipContext) -> None:
        ctx.scale(_norm_clip_coef(ctx.norms, self.max_norm))

    def bound(self) -> float | None:
        # n tensors each at most max_norm: the global norm is at most sqrt(n) * max_norm.
        return None


@final
class Value(Transform):
    """Clamp every gradient element to ``[-limit, limit]``.

    Reference: Mikolov 2012, "Statistical language models based on neural networks",
    sec. 3.2.2 (clipping gradient values of RNN LMs); Keras ``clipvalue``.
    """

    def __init__(self, limit: float = 1.0) -> None:
        self.limit = check_positive("Value.limit", limit)

    def __call__(self, ctx: ClipContext) -> None:
        ctx.flush()
        for _, grads, _ in ctx.groups.bucket_grads():
            torch._foreach_clamp_min_(grads, -self.limit)
            torch._foreach_clamp_max_(grads, self.limit)
        ctx.modified()


def _unitwise_norm(x: Tensor, dims: int | None = None) -> Tensor:
    """L2 norm per output unit (row of a Linear, filter of a Conv); whole tensor if 0/1-D.
    ``dims``: the tensor's own dimensions, when ``x`` is a complex tensor's real view (one
    more, for the real and imaginary parts)."""
    if (x.dim() if dims is None else dims) <= 1:
        return torch.linalg.vector_norm(x.float())
    return torch.linalg.vector_norm(x.float(), dim=tuple(range(1, x.dim())), keepdim=True)


def _rows_whole(transform: str, names: Sequence[str], params: Sequence[Tensor],
                skip: set[int] | None = None) -> None:
    """Refuse a matrix sharded across ranks on a dimension other than 0 (FSDP2's
    ``shard_placement_fn``): ``transform`` acts on each output unit, a slice along dim 0,
    which such a shard cuts across ranks (each would clip or centre its part alone).

    Raises:
        ConfigError: naming the parameter, its placements and the fix.
    """
    for i, (name, p) in enumerate(zip(names, params, strict=True)):
        if p.dim() <= 1 or (skip is not None and i in skip):
            continue
        cut = sorted(split_dims(p) - {0})
        if cut:
            raise ConfigError(
                f"{transform} acts on each output unit (a slice along dim 0) of {name!r}, "
                f"shape {tuple(p.shape)}, but it is sharded across ranks on dim "
                f"{cut[0]} (placements {tuple(p.placements)}): shard it on dim 0, "
                "fully_shard's default (drop the shard_placement_fn that returns "
                f"Shard({cut[0]}) for it)" + (", or exclude it from AGC"
                                              if transform == "AGC" else ""))


def _name_matcher(exclude: Sequence[str] | Callable[[str], bool] | str) -> Callable[[str], bool]:
    if callable(exclude):
        return exclude
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"exclude patterns must be globs on parameter names, got {p!r}")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


@final
class AGC(Transform):
    """Unit-wise adaptive gradient clipping.

    Each unit's gradient G_i is rescaled to at most ``clipping * max(||W_i||, eps)``.
    Reference: Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale Image
    Recognition Without Normalization", section 3 (eq. 3); the paper excludes the final
    classifier layer, which ``exclude=["fc.*"]`` (glob on parameter names) does here.

    Args:
        clipping: λ, the largest allowed ratio of gradient norm to weight norm per unit.
        eps: floor on the weight norm, so zero-initialised units can still move.
        exclude: glob patterns (or a predicate) on parameter names to leave unclipped.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3,
                 exclude: Sequence[str] | Callable[[str], bool] | str = ()) -> None:
        self.clipping = check_positive("AGC.clipping", clipping)
        self.eps = check_positive("AGC.eps", eps)
        if exclude is None or not (callable(exclude) or isinstance(exclude, str | Sequence)):
            raise ConfigError(f"AGC.exclude takes glob patterns on parameter names (e.g. "
                              f"['fc.*']) or a predicate, got {exclude!r}")
        # One spelling of the patterns ("fc.*", ["fc.*"], ("fc.*",) alike), so that the
        # settings a resumed guard compares are equal for equal settings.
        self.exclude = exclude if callable(exclude) else (
            [exclude] if isinstance(exclude, str) else list(exclude))
        self._skip = _name_matcher(exclude)
        self._excluded: set[int] = set()

    def bind(self, names: Sequence[str], params: Sequence[Tensor], device: torch.device) -> None:
        self.state = {}
        self._excluded = {i for i, n in enumerate(names) if self._skip(n)}
        _rows_whole("AGC", names, params, self._excluded)
        if callable(self.exclude):
            return
        patterns = [self.exclude] if isinstance(self.exclude, str) else list(self.exclude)
        # A pattern that matches nothing is a typo or a wrapper prefix (DDP's "module.");
        # silently clipping the layer it meant to exclude would defeat the point.
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            shown = ", ".join(repr(n) for n in names[:6]) + (" …" if len(names) > 6 else "")
            raise ConfigError(
                f"AGC exclude pattern(s) {unmatched} match no parameter; the guarded "
                f"parameters are named like {shown} ({len(names)} in all). Fix the glob "
                "(e.g. 'fc.*' for a module attribute named fc, 'module.fc.*' under DDP)"
            )

    def __call__(self, ctx: ClipContext) -> None:
        grads = ctx.grads()
        weights = ctx.groups.weights or ctx.groups.params
        todo = [(w, g, p.dim()) for pos, w, g, p in zip(ctx.positions, weights, grads,
                                                        ctx.groups.params, strict=True)
                if pos not in self._excluded]
        whole: dict[int, tuple[Tensor, Tensor]] = {}
        if ctx.groups.sum_squares is not None:
            # Sharded (FSDP2, Shard(0)): rows of a matrix live on one rank, but a vector's
            # norm is spread over ranks; sum its squares across shards, all in one
            # collective, laid out as the norms are (weights, then gradients: one entry per
            # tensor, zero for those not summed) so each is weighed by its copies.
            vec = [i for i, (_, _, d) in enumerate(todo) if d <= 1]
            if vec:
                at = [k for k, pos in enumerate(ctx.positions) if pos not in self._excluded]
                rows = [torch.zeros(2, device=todo[vec[0]][1].device)] * len(grads)
                for i in vec:
                    w, g, _ = todo[i]
                    rows[at[i]] = torch.stack([w.detach().float().square().sum(),
                                               g.float().square().sum()])
                sq = torch.stack(rows, dim=1)  # (2, gradients)
                sq = ctx.groups.sum_squares(sq.flatten()).view(2, -1).sqrt()
                whole = {i: (sq[0, at[i]], sq[1, at[i]]) for i in vec}
        for i, (w, g, d) in enumerate(todo):
            w_norm, g_norm = whole.get(i) or (_unitwise_norm(w.detach(), d),
                                              _unitwise_norm(g, d))
            max_norm = w_norm.clamp_min(self.eps) * self.clipping
            factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(_TORCH_EPS), 1.0)
            g.mul_(factor.to(g.dtype))
        ctx.modified()


@final
class Quantile(Transform):
    """AutoClip: clip the global norm at the ``q``-quantile of the norms seen so far.

    Reference: Seetharaman, Wichern, Pardo & Le Roux 2020, "AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks", section 2. Matches the ``autoclip`` package's
    ``QuantileClip(global_threshold=True)`` (linear-interpolated quantile of the last
    ``history`` pre-clip norms; no clipping on the first step), except that non-finite
    norms never enter the history.
    """

    def __init__(self, q: float = 0.9, history: int = 1000) -> None:
        self.q = check_positive("Quantile.q", q, allow_zero=True)
        if self.q > 1.0:
            raise ConfigError(f"Quantile.q must be in [0, 1], got {q!r}")
        self.history = check_int("Quantile.history", history, 1)
        if self.history > 2**24:  # (torch.quantile refuses more elements, mid-run)
            raise ConfigError(f"Quantile.history must be at most 2**24 = {2**24} norms, got "
                              f"{history!r}")

    def bind(self, names: Sequence[str], params: Sequence[Tensor], device: torch.device) -> None:
        self.state = {
            "norms": torch.full((self.history,), math.nan, device=device),
            "count": torch.zeros((), dtype=torch.long, device=device),
        }

    def threshold(self) -> Tensor:
        """Current clipping threshold (inf until a norm has been seen)."""
        thr = torch.nanquantile(self.state["norms"], self.q)
        return torch.where(torch.isnan(thr), math.inf, thr)

    def __call__(self, ctx: ClipContext) -> None:
        s = self.state
        norm = ctx.global_norm
        ctx.scale(_norm_clip_coef(norm, self.threshold()))
        ok = ctx.finite & finite(norm)
        slot = torch.remainder(s["count"], self.history).reshape(1)
        s["norms"].index_copy_(0, slot, torch.where(ok, norm, s["norms"][slot]).reshape(1))
        s["count"].add_(ok.long())


@final
class ZScore(Transform):
    """ZClip: clip gradient-norm spikes detected by a z-score against an EMA of norms.

    Reference: Kumar, Owen, Ashkboos & others 2025, "ZClip: Adaptive Spike Mitigation for
    LLM Pre-Training", section 3. Matches the ``zclip`` 1.0.0 package step for step: the
    first ``warmup`` finite norms initialise mean and (population) variance; afterwards a
    norm with z > ``z_thresh`` is clipped to

    - ``mode="reciprocal"``: mean + z_thresh·std / (z / z_thresh), times ``clip_factor``
      (zclip's ``adaptive_scaling``),
    - ``mode="mean"``: the EMA mean,
    - ``mode="percentile"``: mean + z_thresh·std for any norm above it,

    and the EMA is updated with the clipped value. ``max_norm`` caps the threshold (and
    clips during warm-up, as zclip's ``max_grad_norm`` does). Unlike zclip, a non-finite
    norm never enters the statistics (zclip's EMA turns NaN for the rest of the run).
    """

    _MODES = ("reciprocal", "mean", "percentile")

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25,
                 mode: str = "reciprocal", max_norm: float | None = None,
                 clip_factor: float = 1.0, eps: float = 1e-6,
                 skip_update_on_spike: bool = False) -> None:
        self.alpha = check_positive("ZScore.alpha", alpha)
        if self.alpha >= 1.0:
            raise ConfigError(f"ZScore.alpha must be in (0, 1), got {alpha!r}")
        self.z_thresh = check_positive("ZScore.z_thresh", z_thresh)
        self.warmup = check_int("ZScore.warmup", warmup, 1)
        if mode not in self._MODES:
            raise ConfigError(f"ZScore.mode must be one of {self._MODES}, got {mode!r}")
        self.mode = mode
        self.max_norm = None if max_norm is None else check_positive("ZScore.max_norm", max_norm)
        self.clip_factor = check_positive("ZScore.clip_factor", clip_factor)
        self.eps = check_positive("ZScore.eps", eps)
        self.skip_update_on_spike = check_bool("ZScore.skip_update_on_spike",
                                               skip_update_on_spike)

    def bind(self, names: Sequence[str], params: Sequence[Tensor], device: torch.device) -> None:
        f32 = {"dtype": torch.float32, "device": device}
        self.state = {
            "buffer": torch.zeros(self.warmup, **f32),
            "count": torch.zeros((), dtype=torch.long, device=device),
            "mean": torch.zeros((), **f32),
            "var": torch.zeros((), **f32),
        }

    def __call__(self, ctx: ClipContext) -> None:
        s = self.state
        norm = ctx.global_norm
        ok = ctx.finite & finite(norm)
        ready = s["count"] >= self.warmup  # statistics initialised before this step

        mean, var = s["mean"], s["var"]
        std = var.sqrt()
        if self.mode == "percentile":
            limit = mean + self.z_thresh * std
            spike = norm > limit
            target = limit
        else:
            z = (norm - mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.mode == "reciprocal":
                target = (mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor
            else:
                target = mean
        spike = spike & ready
        adaptive = torch.where(spike, target, norm)
        effective = adaptive if self.max_norm is None else torch.clamp(adaptive, max=self.max_norm)
        coef = torch.where(norm > effective, effective / (norm + _TORCH_EPS), 1.0)
        if self.max_norm is not None:
            coef = torch.where(ready, coef, _norm_clip_coef(norm, self.max_norm))
        else:
            coef = torch.where(ready, coef, torch.ones_like(coef))
        ctx.scale(coef)

        # EMA update (mean first, then variance around the new mean, as zclip does).
        learn = ok & ready
        if self.skip_update_on_spike:
            learn = learn & ~spike
        new_mean = self.alpha * mean + (1 - self.alpha) * adaptive
        new_var = self.alpha * var + (1 - self.alpha) * (adaptive - new_mean) ** 2

        # Warm-up: collect finite norms; initialise on the step the buffer fills.
        collect = ok & ~ready
        slot = torch.clamp(s["count"], max=self.warmup - 1).reshape(1)
        buf = s["buffer"]
        buf.index_copy_(0, slot, torch.where(collect, norm, buf[slot]).reshape(1))
        count = s["count"] + collect.long()
        init = collect & (count >= self.warmup)
        buf_mean = buf.mean()
        buf_var = ((buf - buf_mean) ** 2).mean()

        mean.copy_(torch.where(init, buf_mean, torch.where(learn, new_mean, mean)))
        var.copy_(torch.where(init, buf_var, torch.where(learn, new_var, var)))
        s["count"].copy_(count)

    def bound(self) -> float | None:
        return self.max_norm


@final
class Centralize(Transform):
    """Gradient centralisation: remove the mean of each output unit's gradient.

    Applies to tensors with two or more dimensions (weights); biases are left alone.
    Reference: Yong, Huang, Hua & Zhang 2020, "Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks", ECCV, eq. 3.
    """

    def bind(self, names: Sequence[str], params: Sequence[Tensor], device: torch.device) -> None:
        self.state = {}
        _rows_whole("Centralize", names, params)

    def __call__(self, ctx: ClipContext) -> None:
        for p, g in zip(ctx.groups.params, ctx.grads(), strict=True):
            # (A complex gradient comes as its real view: its last dim is (re, im), kept
            # out of the mean so that the complex mean is removed.)
            own = p.dim()
            if own > 1:
                g.sub_(g.mean(dim=tuple(range(1, own)), keepdim=True))
        ctx.modified()


@final
class Normalize(Transform):
    """Rescale the gradient to a fixed L2 norm: keep its direction, drop its size.

    ``per_tensor=False`` is normalised gradient descent (Hazan, Levy & Shalev-Shwartz 2015,
    "Beyond Convexity: Stochastic Quasi-Convex Optimization"); ``per_tensor=True`` is
    block-normalised gradient (Yu, Lin, Yang & others 2017, "Block-Normalized Gradient
    Method", eq. 2).
    """

    def __init__(self, norm: float = 1.0, per_tensor: bool = False, eps: float = 1e-6) -> None:
        self.norm = check_positive("Normalize.norm", norm)
        self.per_tensor = check_bool("Normalize.per_tensor", per_tensor)
        self.eps = check_positive("Normalize.eps", eps)

    def __call__(self, ctx: ClipContext) -> None:
        current = ctx.norms if self.per_tensor else ctx.global_norm
        ctx.scale(self.norm / (current + self.eps))
        # Unlike a clip, this scales tiny gradients up, and their norms were measured
        # where fp32 squares leave the normal range (below ~1e-19 per entry): the norms
        # carried forward would be off by a percent, and a bound after this one would
        # hold only for them. Measure again what will be applied.
        ctx.modified()

    def bound(self) -> float | None:
        return None if self.per_tensor else self.norm


def as_transform(clip: Transform | Sequence[Transform] | None) -> Transform:
    """The ``Guard(clip=...)`` argument as one transform (None: the empty chain)."""
    if clip is None:
        return chain()
    if isinstance(clip, str) or not isinstance(clip, Transform | Sequence):
        raise ConfigError(f"clip takes a gradguard.clip transform or a list of them, got "
                          f"{clip!r}; e.g. clip=gg.clip.GlobalNorm(1.0)")
    return clip if isinstance(clip, Transform) else chain(*clip)


# Which guard each transform is bound to: a transform holds its guard's parameter positions
# and statistics, so one object in two guards would clip each with the other's.
_OWNERS: weakref.WeakKeyDictionary[Transform, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def claim(transform: Transform, owner: Any) -> None:
    """Bind-time check that no transform in ``transform`` serves another open guard.

    Raises:
        ConfigError: one of them is bound to another guard that is not closed.
    """
    def walk(t: Transform) -> list[Transform]:
        return [t, *(x for sub in t.transforms for x in walk(sub))] \
            if isinstance(t, Chain) else [t]

    every = walk(transform)
    for t in every:
        ref = _OWNERS.get(t)
        other = None if ref is None else ref()
        if other is not None and other is not owner and not getattr(other, "_closed", True):
            raise ConfigError(
                f"the clip transform {t!r} is already used by another open Guard: it keeps "
                "that guard's parameter positions and statistics, so each guard needs its "
                "own; build another (or pass copy.deepcopy(it)) for this one")
    for t in every:
        _OWNERS[t] = weakref.ref(owner)

