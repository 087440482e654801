"""Weight-side remedies: constraints applied after each step, reparametrisations, pruning.

- :class:`MaxNorm`: each output unit's incoming weight vector kept at L2 norm ≤ c
  (Srivastava et al. 2014, "Dropout", JMLR 15, section 5.1, max-norm regularisation);
- :class:`WeightClip`: every weight clamped to [−c, c] (Arjovsky, Chintala & Bottou 2017,
  "Wasserstein GAN", Algorithm 1, line 7);
- :func:`weight_norm`: torch's weight normalisation (Salimans & Kingma 2016, eq. 2) or
  spectral normalisation (Miyato et al. 2018, section 2.1), applied per layer;
- :func:`prune`: magnitude pruning with torch's ``l1_unstructured`` (Han et al. 2015,
  "Learning both Weights and Connections", section 3).

The two constraints are objects called after ``optimizer.step()`` (or handed to
``Guard(after_step=...)``); they are tensor ops only, so calling them every step costs no
host-device sync.

Every fix here leaves frozen layers (whose weight has ``requires_grad=False``: a frozen
pretrained backbone) alone by default and lists them in its report's ``skipped``;
``frozen=True`` includes them. Every fix checks all the layers it selected before it
changes any: a Lazy layer not run yet, or a hook-based ``torch.nn.utils.weight_norm`` /
``spectral_norm`` (the pre-parametrisation API), is refused with a
:class:`~gradguard.errors.ConfigError` naming the layer (the constraints skip a computed
weight instead, as they skip a parametrised one).
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Sequence
from typing import final

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils import prune as _prune

from ..errors import ConfigError, check_positive
from .init import (
    _WEIGHTED,
    FROZEN_NOTE,
    FixReport,
    _frozen,
    _hook_norm,
    _is_lazy,
    _match,
    _owners,
    _patterns,
    _refuse_unmatched,
    _tied_to,
)

__all__ = ["MaxNorm", "WeightClip", "prune", "weight_norm"]

_PRUNED = "_gradguard_pruned"


def _layers(model: nn.Module, layers: Sequence[str] | None, fix: str, frozen: bool,
            skipped: list[str]) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv layers of ``model`` selected by ``layers`` (glob patterns over the
    whole dotted name), frozen ones left out (into ``skipped``) unless ``frozen``; a lazy
    layer among them is refused."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{fix}: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(layers, str):
        raise ConfigError(f"{fix}: layers takes a list of patterns, e.g. [{layers!r}]")
    patterns = _patterns(layers, fix)
    weighted = [(n, m) for n, m in model.named_modules() if isinstance(m, _WEIGHTED)]
    found = [(n, m) for n, m in weighted if patterns is None or _match(n, patterns)]
    if patterns and weighted:
        _refuse_unmatched([n for n, _ in weighted], patterns, fix)  # (names them, with a hint)
    if not found:
        which = "" if patterns is None else f" matching {patterns}"
        raise ConfigError(f"{fix}: the model has no Linear/Conv layer{which}")
    out = []
    for name, m in found:
        if not frozen and _frozen(m):
            skipped.append(f"{name} ({FROZEN_NOTE})")
            continue
        if _is_lazy(m):
            raise ConfigError(f"{fix}: layer {name!r} is a lazy layer not initialised yet "
                              "(its weight has no shape); run one forward pass first, or "
                              "leave it out with layers=[...]; nothing was changed")
        out.append((name, m))
    return out


def _refuse_hook_norm(chosen: list[tuple[str, nn.Module]], fix: str) -> None:
    """A hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm``: the weight is
    recomputed from ``weight_g``/``weight_v`` (``weight_orig``) before each forward pass, so
    a fix on ``weight`` would be undone or would fight the hook."""
    for name, m in chosen:
        if (hook := _hook_norm(m)) is not None:
            raise ConfigError(f"{fix}: layer {name!r} has the hook-based {hook} (its weight "
                              "is recomputed before every forward pass); remove it "
                              "(torch.nn.utils.remove_weight_norm / remove_spectral_norm) or "
                              "leave the layer out with layers=[...]; nothing was changed")


def _refuse_tied(model: nn.Module, chosen: list[tuple[str, nn.Module]], fix: str) -> None:
    """A weight one layer shares with another (an output head tied to its embedding): a
    fix that changes how one of them holds it would untie them, or leave the other as it
    was."""
    owners = _owners(model)
    for name, m in chosen:
        if (other := _tied_to(owners, name, m, only_weight=True)) is not None:
            raise ConfigError(f"{fix}: layer {name!r} shares its weight with {other} "
                              "(tied weights); the fix would untie them or leave one as it "
                              "was. Leave it out with layers=[...]; nothing was changed")


def _leaf_weight(m: nn.Module) -> Tensor | None:
    """The trainable tensor behind ``m.weight``: the weight itself, or a pruned layer's
    ``weight_orig``; None for a parametrised weight (its norm is set by the parametrisation)."""
    if parametrize.is_parametrized(m, "weight"):
        return None
    w = m._parameters.get("weight_orig", m._parameters.get("weight"))
    return w if isinstance(w, nn.Parameter) else None


class _Constraint(abc.ABC):
    """Shared plumbing of the per-step weight constraints."""

    fix = ""

    def _bind(self, model: nn.Module, layers: Sequence[str] | None, bias: bool,
              frozen: bool) -> None:
        self.names: list[str] = []
        self.tensors: list[Tensor] = []
        # A frozen tensor is left alone while it is frozen and constrained once unfrozen
        # (gradual unfreezing): requires_grad is read at every call, a host attribute.
        self.frozen = bool(frozen)
        self.report = FixReport(self.fix)
        for name, m in _layers(model, layers, self.fix, True, self.report.skipped):
            w = None if _hook_norm(m) is not None else _leaf_weight(m)
            if w is None:
                self.report.skipped.append(
                    f"{name} (its weight is computed by a parametrisation, weight_norm or "
                    "spectral_norm, which sets its scale)")
                continue
            self.names.append(name)
            self.tensors.append(w)
            self.report.layers.append(name)
            note = "" if self.frozen or not _frozen(m) else (
                f"; frozen now: left alone until it is unfrozen ({FROZEN_NOTE})")
            self.report.changes.append(self._describe(name, m, w) + note)
            b = getattr(m, "bias", None)
            if bias and isinstance(b, nn.Parameter):
                self.tensors.append(b)
        if not self.tensors:
            raise ConfigError(f"{self.fix}: no selected layer can be constrained "
                              f"({'; '.join(self.report.skipped[:4])}); nothing to constrain")

    @abc.abstractmethod
    def _describe(self, name: str, m: nn.Module, w: Tensor) -> str:
        """One report line for layer ``name`` (read at construction, off the hot path)."""

    def active(self) -> list[Tensor]:
        """The constrained tensors this call acts on: the frozen ones only with
        ``frozen=True``."""
        return self.tensors if self.frozen else [w for w in self.tensors if w.requires_grad]

    @abc.abstractmethod
    def __call__(self) -> None:
        """Apply the constraint in place; device ops only."""

    def __repr__(self) -> str:
        return f"{self.fix} on {len(self.names)} layer(s)"


@final
class MaxNorm(_Constraint):
    """Max-norm constraint: rescale each output unit's weights to an L2 norm ≤ ``max_norm``.

    Call it after every ``optimizer.step()`` (or pass it as ``Guard(after_step=...)``); a
    row already inside the ball is left as it is, so calling it twice changes nothing.
    Reference: Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov 2014, "Dropout: A
    Simple Way to Prevent Neural Networks from Overfitting", JMLR 15, section 5.1.

    Args:
        model: the module whose Linear/Conv weights to constrain.
        max_norm: the radius c. Kaiming init gives rows of norm ≈ √2 and torch's default
            init ≈ 0.58 whatever the fan-in, so 2 leaves a sound init alone and cuts a too
            large one (Srivastava et al. use 3–4 with dropout; Keras's default is 2).
        layers: glob patterns of layer names; default every Linear/Conv layer.
        now: project the weights once at construction too, so the first step starts inside
            the ball. Off, a too-large init still produces one huge first step, and the
            projection after it keeps the rows' size but not their (ruined) directions.
        frozen: constrain frozen tensors (``requires_grad=False``) too; by default each
            call leaves a tensor alone while it is frozen (``now=True`` would otherwise
            shrink a frozen pretrained backbone) and constrains it once it is unfrozen
            (gradual unfreezing); the report notes the layers frozen at construction.

    Raises:
        ConfigError: a bad ``max_norm`` or pattern, a selected lazy layer not run yet, or
            no selected layer left to constrain; nothing is changed then.

    Attributes:
        report: a :class:`FixReport` naming each constrained layer and its largest row norm
            at construction.
    """

    fix = "MaxNorm"

    def __init__(self, model: nn.Module, max_norm: float = 2.0, *,
                 layers: Sequence[str] | None = None, now: bool = True,
                 frozen: bool = False) -> None:
        self.max_norm = check_positive("MaxNorm.max_norm", max_norm)
        self.fix = f"MaxNorm(max_norm={max_norm:g})"
        self._bind(model, layers, bias=False, frozen=bool(frozen))
        if now:
            self()

    def _describe(self, name: str, m: nn.Module, w: Tensor) -> str:
        rows = w.detach().flatten(1).norm(dim=1)
        over = int((rows > self.max_norm).sum())
        return (f"{name} ({type(m).__name__}): {w.shape[0]} output units, row L2 norm ≤ "
                f"{self.max_norm:g} (now max {float(rows.max()):.3g}, {over} above)")

    @torch.no_grad()
    def __call__(self) -> None:
        """Project every constrained weight onto the max-norm ball (device ops only)."""
        for w in self.active():
            # renorm_ rescales only the dim-0 slices (output units) whose norm exceeds c.
            w.renorm_(2, 0, self.max_norm)


@final
class WeightClip(_Constraint):
    """Clamp every weight element to ``[-limit, limit]`` after each optimizer step.

    Reference: Arjovsky, Chintala & Bottou 2017, "Wasserstein GAN", ICML, Algorithm 1 line 7
    (weight clipping keeps the critic Lipschitz; it bounds the weights, hence the forward
    signal and the gradients through them).

    Args:
        model: the module whose Linear/Conv weights to clamp.
        limit: the bound c, in weight units (no default: it depends on the fan-in; Kaiming
            init has std √(2/fan_in), WGAN's critics use 0.01).
        layers: glob patterns of layer names; default every Linear/Conv layer.
        bias: clamp the biases of those layers too (WGAN clamps every parameter); a frozen
            bias only with ``frozen=True``.
        now: clamp once at construction too, so the first step starts inside the box.
        frozen: clamp frozen tensors (``requires_grad=False``) too; by default each call
            leaves a tensor alone while it is frozen and clamps it once it is unfrozen.

    Raises:
        ConfigError: a bad ``limit`` or pattern, a selected lazy layer not run yet, or no
            selected layer left to clamp; nothing is changed then.

    Attributes:
        report: a :class:`FixReport` naming each clamped layer.
    """

    fix = "WeightClip"

    def __init__(self, model: nn.Module, limit: float, *,
                 layers: Sequence[str] | None = None, bias: bool = False,
                 now: bool = True, frozen: bool = False) -> None:
        self.limit = check_positive("WeightClip.limit", limit)
        self.fix = f"WeightClip(limit={limit:g})"
        self._bind(model, layers, bias=bool(bias), frozen=bool(frozen))
        if now:
            self()

    def _describe(self, name: str, m: nn.Module, w: Tensor) -> str:
        frac = float((w.detach().abs() > self.limit).float().mean())
        return (f"{name} ({type(m).__name__}): weights clamped to ±{self.limit:g} "
                f"(now {frac:.1%} outside)")

    @torch.no_grad()
    def __call__(self) -> None:
        """Clamp every constrained tensor in place (device ops only)."""
        for w in self.active():
            w.clamp_(-self.limit, self.limit)


_KINDS = ("weight", "spectral")


def weight_norm(model: nn.Module, *, layers: Sequence[str] | None = None,
                kind: str = "weight", dim: int | None = 0,
                optimizer: torch.optim.Optimizer | None = None,
                frozen: bool = False) -> FixReport:
    """Reparametrise Linear/Conv weights with torch's weight or spectral normalisation.

    ``kind="weight"``: w = g·v/‖v‖ per output unit, so the step on the scale g is decoupled
    from the step on the direction v (Salimans & Kingma 2016, "Weight Normalization", eq. 2;
    ``torch.nn.utils.parametrizations.weight_norm``). The function is unchanged at the
    moment of the call. ``kind="spectral"``: w / σ_max(w) by one power iteration per forward
    pass, so every layer is 1-Lipschitz (Miyato et al. 2018, "Spectral Normalization for
    Generative Adversarial Networks", section 2.1; ``parametrizations.spectral_norm``); this
    changes the function (each layer's gain drops to ≤ 1).

    Args:
        model: the module to change in place.
        layers: glob patterns of layer names; default every Linear/Conv layer.
        kind: "weight" or "spectral".
        dim: the output-unit dimension for ``kind="weight"`` (negative counts from the
            last, as in Python: -1 is the last dimension); ``None`` normalises the whole
            tensor with one scalar g, as torch's ``weight_norm(dim=None)``.
        optimizer: an optimizer built before the call: each reparametrised weight is
            replaced in its groups by the parameters that now hold it (its state, the
            old weight's, is dropped). An optimizer (or a guard) built before the call and
            not passed here keeps the old weight, which the layer no longer uses: the
            layer would stop training. Build them after, or pass it.
        frozen: reparametrise frozen layers (weight ``requires_grad=False``) too; by
            default they are left alone and listed in ``report.skipped``.

    Returns:
        A :class:`FixReport` naming each reparametrised layer.

    Raises:
        ConfigError: a selected layer is already parametrised or pruned (applying the fix
            twice would stack two normalisations), has the hook-based
            ``torch.nn.utils.weight_norm`` / ``spectral_norm``, is lazy and not run yet, its
            weight is tied to another layer's, or ``dim`` is not one of its weight's
            dimensions; nothing is changed then.
    """
    if kind not in _KINDS:
        raise ConfigError(f"weight_norm: kind must be one of {_KINDS}, got {kind!r}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral)):
        raise ConfigError(f"weight_norm: dim must be an int (the output-unit dimension) or "
                          f"None (the whole tensor), got {dim!r}")
    dim = None if dim is None else int(dim)
    fix = f"weight_norm(kind={kind!r})"
    report = FixReport(fix)
    chosen = _layers(model, layers, fix, bool(frozen), report.skipped)
    _refuse_hook_norm(chosen, fix)
    for name, m in chosen:
        if parametrize.is_parametrized(m, "weight"):
            raise ConfigError(f"{fix}: layer {name!r} already has a parametrised weight (is "
                              "weight_norm applied twice?); applying it again would stack "
                              "two normalisations")
        if _prune.is_pruned(m) or hasattr(m, _PRUNED):
            raise ConfigError(f"{fix}: layer {name!r} is pruned; apply weight_norm before "
                              "prune, not after")
        if kind == "weight" and dim is not None and not -m.weight.dim() <= dim < m.weight.dim():
            raise ConfigError(f"{fix}: dim={dim} is not a dimension of layer {name!r}'s "
                              f"{m.weight.dim()}-d weight; nothing was changed")
    _refuse_tied(model, chosen, fix)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"{fix}: optimizer must be a torch.optim.Optimizer, got "
                          f"{type(optimizer).__name__}")
    for name, m in chosen:
        w_param = m.weight
        w = w_param.detach()
        # (torch reads dim=-1 as "the whole tensor": a negative dim goes in as its index)
        d = None if dim is None else dim % w.dim()
        rows = w.norm().reshape(1) if kind != "weight" or d is None else \
            w.movedim(d, 0).flatten(1).norm(dim=1)
        if bool((rows == 0).any()):
            # g·v/‖v‖ (or w/σ_max) of a zero row is 0/0: the layer would output NaN.
            report.skipped.append(f"{name} (zero weights)")
            continue
        if kind == "weight":
            parametrizations.weight_norm(m, "weight", dim=d)
            over = "the whole tensor" if d is None else f"dim {d}"
            desc = (f"weight = g·v/‖v‖ over {over}, g initialised to the current norms "
                    f"({float(rows.min()):.3g}–{float(rows.max()):.3g})")
        else:
            sigma = float(torch.linalg.matrix_norm(w.flatten(1).double(), ord=2))
            parametrizations.spectral_norm(m, "weight")
            desc = f"weight / σ_max, σ_max was {sigma:.3g} (layer gain now ≤ 1)"
        if optimizer is not None:
            desc += _swap_in(optimizer, w_param, list(m.parametrizations.weight.parameters()))
        report.layers.append(name)
        report.changes.append(f"{name} ({type(m).__name__}): {desc}")
    return report


def _swap_in(optimizer: torch.optim.Optimizer, old: Tensor, new: list[nn.Parameter]) -> str:
    """Put ``new`` where ``old`` was in the optimizer's groups; drop ``old``'s state."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i:i + 1] = new
                optimizer.state.pop(old, None)
                return "; the optimizer now trains its new parameters"
    return "; the weight was not in the optimizer given"


def prune(model: nn.Module, amount: float = 0.2, *, layers: Sequence[str] | None = None,
          permanent: bool = False, frozen: bool = False) -> FixReport:
    """Magnitude pruning: zero the ``amount`` fraction of smallest-|w| weights in each layer.

    Uses ``torch.nn.utils.prune.l1_unstructured`` per layer (Han, Pool, Tran & Dally 2015,
    "Learning both Weights and Connections for Efficient Neural Networks", section 3). While
    the mask is kept, pruned weights get zero gradient and stay zero; ``permanent=True``
    calls ``prune.remove`` so the zeros are baked into a plain weight (and may regrow).

    Args:
        model: the module to change in place.
        amount: fraction of each layer's weights to remove, in (0, 1).
        layers: glob patterns of layer names; default every Linear/Conv layer.
        permanent: bake the zeros in and drop the mask.
        frozen: prune frozen layers (weight ``requires_grad=False``) too; by default they
            are left alone and listed in ``report.skipped``.

    Returns:
        A :class:`FixReport` with, per layer, how many weights were removed.

    Raises:
        ConfigError: a selected layer was already pruned (a second call would prune the
            survivors again), has a parametrised weight or the hook-based
            ``torch.nn.utils.weight_norm`` / ``spectral_norm``, is lazy and not run yet, or
            has a tied weight; all are checked first, so nothing is changed then.
    """
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0 < amount < 1:
        raise ConfigError(f"prune: amount must be a fraction in (0, 1), got {amount!r}")
    fix = f"prune(amount={amount:g}{', permanent' if permanent else ''})"
    report = FixReport(fix)
    chosen = _layers(model, layers, fix, bool(frozen), report.skipped)
    _refuse_hook_norm(chosen, fix)
    for name, m in chosen:
        if _prune.is_pruned(m) or hasattr(m, _PRUNED):
            raise ConfigError(f"{fix}: layer {name!r} is already pruned; a second prune would "
                              "remove a further fraction of the survivors")
        if parametrize.is_parametrized(m, "weight"):
            raise ConfigError(f"{fix}: layer {name!r} has a parametrised weight "
                              "(weight_norm?); prune before reparametrising")
    _refuse_tied(model, chosen, fix)
    total = removed = 0
    for name, m in chosen:
        _prune.l1_unstructured(m, "weight", amount=float(amount))
        zeros = int((m.weight_mask == 0).sum())
        n = m.weight_mask.numel()
        if permanent:
            _prune.remove(m, "weight")
        setattr(m, _PRUNED, float(amount))
        total += n
        removed += zeros
        report.layers.append(name)
        report.changes.append(f"{name} ({type(m).__name__}): {zeros} of {n} weights removed "
                              f"({zeros / n:.1%}){', mask removed' if permanent else ''}")
    report.changes.append(f"total: {removed} of {total} weights removed")
    return report
