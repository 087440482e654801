"""Input (and target) standardisation from a sample of the training data.

Raw-unit features (a cholesterol level in the hundreds next to a sex coded ±0.05) make the
loss surface ill-conditioned: the largest curvature grows with the feature scale, so a
learning rate fit for the small features explodes along the large ones (LeCun, Bottou, Orr
& Müller 1998, "Efficient BackProp", section 4.3). Standardising each feature to zero mean
and unit variance puts every direction on one scale.

Two ways to use it::

    std = gg.fixes.Standardizer.fit(loader)              # mean/std from up to 100 batches
    model = std.wrap(model)                              # raw data in, raw-unit outputs out
    # or, on the data side:
    x, y = std.transform((x, y))                         # train on standardised data
    pred = std.inverse_targets(model(std.transform(x_new)))
    torch.save(std.state_dict(), "std.pt")               # the statistics, for inference
    std = gg.fixes.Standardizer.from_state_dict(torch.load("std.pt"))
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable
from typing import Any, final

import torch
from torch import Tensor, nn

from ..errors import ConfigError, check_int, check_positive
from .init import FixReport

__all__ = ["Standardized", "Standardizer"]

_OUTPUTS = ("shift", "inverse", "none")


def _batches(data: Any, max_batches: int) -> list[tuple[Tensor, Tensor | None]]:
    """A sample as ``(x, y or None)`` pairs from a tensor, one batch or an iterable of them.

    A tuple of two tensors is one ``(inputs, targets)`` batch; so is a list of two with
    as many rows each, as a DataLoader yields a batch (``next(iter(loader))`` is the list
    ``[x, y]``); any other iterable holds batches, so two equal-sized batches of inputs
    alone go in as ``iter([x1, x2])`` or ``[[x1], [x2]]``."""
    if isinstance(data, Tensor):
        return [(data, None)]
    if isinstance(data, tuple | list) and len(data) == 2 and \
            all(isinstance(t, Tensor) for t in data) and (
            isinstance(data, tuple) or (data[0].dim() > 0 and data[1].dim() > 0
                                        and len(data[0]) == len(data[1]))):
        return [(data[0], data[1])]
    if not isinstance(data, Iterable):
        raise ConfigError("Standardizer.fit: pass a tensor of inputs, an (inputs, targets) "
                          f"batch or an iterable of batches, got {type(data).__name__}")
    out: list[tuple[Tensor, Tensor | None]] = []
    for b in itertools.islice(iter(data), max_batches):
        if isinstance(b, Tensor):
            out.append((b, None))
        elif isinstance(b, tuple | list) and len(b) == 1 and isinstance(b[0], Tensor):
            out.append((b[0], None))  # (a TensorDataset of inputs alone yields [x])
        elif isinstance(b, tuple | list) and len(b) >= 2 and isinstance(b[0], Tensor):
            out.append((b[0], b[1] if isinstance(b[1], Tensor) else None))
        else:
            raise ConfigError("Standardizer.fit: each batch must be a tensor, [inputs] or "
                              f"an (inputs, targets) pair of tensors, got {type(b).__name__}")
    if not out:
        raise ConfigError("Standardizer.fit: the data yielded no batch")
    return out


_AS_PAIR = ("; a list of more than two tensors is read as batches of inputs: pass one "
            "(inputs, targets) batch as (x, y)")


def _moments(xs: list[Tensor], dim: int, what: str) -> tuple[Tensor, Tensor]:
    """Per-``dim`` mean and std (population) over every other dimension, in float64."""
    rank = xs[0].dim()
    if any(x.dim() != rank for x in xs):
        ranks = sorted({x.dim() for x in xs})
        raise ConfigError(f"Standardizer.fit: {what} batches have different ranks ({ranks})"
                          f"{_AS_PAIR if what == 'inputs' else ''}")
    if not -rank <= dim < rank:
        raise ConfigError(f"Standardizer.fit: dim={dim} is not a dimension of the "
                          f"{rank}-d {what} (shape {tuple(xs[0].shape)}); use 1..{rank - 1} "
                          "or a negative index such as -1")
    d = dim % rank
    if d == 0:
        raise ConfigError("Standardizer.fit: dim must name a feature dimension, not the batch "
                          "dimension 0")
    sizes = sorted({x.shape[d] for x in xs})
    if len(sizes) > 1:
        raise ConfigError(f"Standardizer.fit: {what} batches have {sizes} features along "
                          f"dim {dim}{_AS_PAIR if what == 'inputs' else ''}")
    flat = torch.cat([x.detach().double().movedim(d, -1).reshape(-1, x.shape[d]) for x in xs])
    if not torch.isfinite(flat).all():
        raise ConfigError(f"Standardizer.fit: the sample's {what} contain NaN/Inf; fit on "
                          "clean data (a corrupted batch would set the scale)")
    shape = [1] * rank
    shape[d] = flat.shape[1]
    view = shape[1:]
    # In the data's precision, at least float32: float64 data far from zero (timestamps)
    # would lose its spread in float32 statistics.
    dt = torch.promote_types(xs[0].dtype, torch.float32)
    return (flat.mean(0).reshape(view).to(dt), flat.std(0, correction=0).reshape(view).to(dt))


@final
class Standardizer:
    """Per-feature (per-channel) mean and std of inputs and regression targets.

    Build it with :meth:`fit`. Reference: LeCun, Bottou, Orr & Müller 1998, "Efficient
    BackProp", section 4.3 (normalising the inputs).

    Attributes:
        x_mean, x_std: input statistics, shaped to broadcast over a batch without its first
            dimension (``(D,)`` for tabular data, ``(C, 1, 1)`` for images).
        y_mean, y_std: target statistics, or None when targets were not fitted.
        report: a :class:`FixReport` describing the statistics.
    """

    def __init__(self, x_mean: Tensor, x_std: Tensor, y_mean: Tensor | None = None,
                 y_std: Tensor | None = None, notes: list[str] | None = None) -> None:
        self.x_mean, self.x_std = x_mean, x_std
        self.y_mean, self.y_std = y_mean, y_std
        self.report = FixReport("Standardizer")
        n = x_mean.numel()
        self.report.changes.append(
            f"inputs: {n} feature(s) to zero mean, unit std (mean {float(x_mean.min()):.3g}…"
            f"{float(x_mean.max()):.3g}, std {float(x_std.min()):.3g}…{float(x_std.max()):.3g})")
        if y_mean is not None and y_std is not None:
            self.report.changes.append(
                f"targets: mean {float(y_mean.mean()):.4g}, std {float(y_std.mean()):.4g}")
        self.report.changes += notes or []

    @classmethod
    def fit(cls, data: Any, targets: bool = True, *, dim: int = 1, max_batches: int = 100,
            eps: float = 1e-8) -> Standardizer:
        """Measure mean and std from a sample of the training data.

        Args:
            data: a tensor of inputs, one ``(inputs, targets)`` batch as a tuple, or an
                iterable of batches (a DataLoader, an endless iterator, a list). The type
                decides: ``(x, y)`` is one batch with targets, and so is ``[x, y]`` with as
                many rows each (a DataLoader's batch); two equal-sized batches of inputs
                alone go in as ``iter([x1, x2])`` or ``[[x1], [x2]]``; each batch of an
                iterable is a tensor, ``[inputs]`` or ``(inputs, targets, …)``.
            targets: also fit floating-point targets (regression); class labels are left
                alone whatever this says.
            dim: the feature / channel dimension of the inputs (1 for ``(N, D)`` tables and
                ``(N, C, H, W)`` images; -1 for ``(N, T, D)`` sequences).
            max_batches: read at most this many batches of an iterable.
            eps: a std below ``eps`` (a constant feature) is replaced by 1; > 0.

        Returns:
            The fitted :class:`Standardizer`.

        Raises:
            ConfigError: a bad argument (``dim`` not an int or not a feature dimension of
                the inputs, ``eps`` not a positive number), a sample that is not floating
                point, holds NaN/Inf, or whose batches disagree in rank or feature count.
        """
        check_int("Standardizer.fit.max_batches", max_batches, 1)
        eps = check_positive("Standardizer.fit.eps", eps)
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise ConfigError(f"Standardizer.fit: dim must be an int (the feature dimension, "
                              f"e.g. 1 or -1), got {dim!r}")
        dim = int(dim)
        sample = _batches(data, max_batches)
        xs = [x for x, _ in sample]
        if not all(torch.is_floating_point(x) for x in xs):
            raise ConfigError(f"Standardizer.fit: inputs are {xs[0].dtype}, not floating point "
                              "(token ids or labels cannot be standardised)")
        if xs[0].dim() < 2:
            raise ConfigError("Standardizer.fit: inputs need a batch dimension and at least "
                              f"one feature dimension, got shape {tuple(xs[0].shape)}")
        notes: list[str] = []
        x_mean, x_std = _moments(xs, dim, "inputs")
        const = x_std < eps
        if bool(const.any()):
            notes.append(f"{int(const.sum())} constant input feature(s): std set to 1")
            x_std = torch.where(const, torch.ones_like(x_std), x_std)
        y_mean = y_std = None
        ys = [y for _, y in sample if y is not None]
        if targets and len(ys) != len(sample):
            notes.append("targets: the sample has none, left as they are")
        elif targets and not all(torch.is_floating_point(y) for y in ys):
            notes.append("targets: class labels, left as they are")
        elif targets:
            # One mean and std per target element: (N,) and (N, k) regression alike.
            y_mean, y_std = _moments([y.reshape(len(y), -1) for y in ys], 1, "targets")
            y_std = torch.where(y_std < eps, torch.ones_like(y_std), y_std)
            y_mean, y_std = y_mean.reshape(ys[0].shape[1:]), y_std.reshape(ys[0].shape[1:])
        return cls(x_mean, x_std, y_mean, y_std, notes)

    @property
    def has_targets(self) -> bool:
        return self.y_mean is not None

    def state_dict(self) -> dict[str, Tensor | None]:
        """The statistics (copies), for ``torch.save``: data-side standardisation needs the
        same ones at inference (:meth:`from_state_dict` reads them back)."""
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone()
        return {"x_mean": copy(self.x_mean), "x_std": copy(self.x_std),
                "y_mean": copy(self.y_mean), "y_std": copy(self.y_std)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Standardizer:
        """A :class:`Standardizer` from :meth:`state_dict`'s statistics.

        Raises:
            ConfigError: keys missing, not tensors, shapes that do not match, a std that is
                not finite and positive, or a mean that is not finite.
        """
        if not isinstance(state, dict) or not {"x_mean", "x_std"} <= state.keys():
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ConfigError("Standardizer.from_state_dict: expected the dict that "
                              f"Standardizer.state_dict() returns (x_mean, x_std, y_mean, "
                              f"y_std), got {got}")
        ts = {k: state.get(k) for k in ("x_mean", "x_std", "y_mean", "y_std")}
        for k, t in ts.items():
            if t is not None and not (isinstance(t, Tensor) and t.is_floating_point()):
                raise ConfigError(f"Standardizer.from_state_dict: {k} must be a floating-"
                                  f"point tensor, got {type(t).__name__}")
        if (ts["y_mean"] is None) != (ts["y_std"] is None):
            raise ConfigError("Standardizer.from_state_dict: y_mean and y_std come together "
                              "(both tensors, or both None)")
        for m, s in (("x_mean", "x_std"), ("y_mean", "y_std")):
            mean, std = ts[m], ts[s]
            if mean is None or std is None:
                continue
            if mean.shape != std.shape:
                raise ConfigError(f"Standardizer.from_state_dict: {m} has shape "
                                  f"{tuple(mean.shape)} but {s} {tuple(std.shape)}")
            if not bool(torch.isfinite(mean).all()):
                raise ConfigError(f"Standardizer.from_state_dict: {m} holds NaN/Inf")
            if not bool((torch.isfinite(std) & (std > 0)).all()):
                raise ConfigError(f"Standardizer.from_state_dict: {s} must be finite and "
                                  "positive (a std of 0 would divide by zero)")
        clone = {k: None if t is None else t.detach().clone() for k, t in ts.items()}
        return cls(clone["x_mean"], clone["x_std"], clone["y_mean"], clone["y_std"],
                   notes=["statistics loaded from a state dict"])

    def transform_inputs(self, x: Tensor) -> Tensor:
        """``(x − mean) / std`` per feature, in ``x``'s dtype."""
        return _standardise(x, self.x_mean, self.x_std)

    def transform_targets(self, y: Tensor) -> Tensor:
        """``(y − mean) / std`` (unchanged when targets were not fitted)."""
        if self.y_mean is None or self.y_std is None:
            return y
        return _standardise(y, self.y_mean.reshape(y.shape[1:]), self.y_std.reshape(y.shape[1:]))

    def inverse_targets(self, y: Tensor) -> Tensor:
        """Map standardised predictions back to target units: ``y · std + mean``."""
        if self.y_mean is None or self.y_std is None:
            return y
        return _affine(y, self.y_std.reshape(y.shape[1:]), self.y_mean.reshape(y.shape[1:]))

    def transform(self, batch: Tensor | tuple[Tensor, Tensor]) -> Any:
        """Standardise inputs, or an ``(inputs, targets)`` batch (targets when fitted)."""
        if isinstance(batch, Tensor):
            return self.transform_inputs(batch)
        x, y = batch
        return self.transform_inputs(x), self.transform_targets(y)

    def wrap(self, model: nn.Module, outputs: str = "shift") -> Standardized:
        """A module that standardises its inputs before ``model`` and maps outputs back.

        Args:
            model: the model to wrap (its parameters become the wrapper's).
            outputs: what to do with ``model``'s outputs when targets were fitted:
                ``"shift"`` adds the target mean (the model learns the residual in target
                units; use it when the loss is computed on raw targets); ``"inverse"``
                returns ``out · std + mean`` (for a model trained on :meth:`transform`-ed
                targets, at inference); ``"none"`` leaves them. With ``"inverse"`` and a
                loss on raw targets, the loss's gradient is ``std²`` times the standardised
                one (on linreg-raw 77² ≈ 5900×: it explodes again at the same LR).

        Returns:
            The :class:`Standardized` wrapper.

        Raises:
            ConfigError: ``model`` is already a :class:`Standardized` wrapper, or
                ``outputs="inverse"`` without fitted targets.
        """
        if outputs not in _OUTPUTS:
            raise ConfigError(f"Standardizer.wrap: outputs must be one of {_OUTPUTS}, got "
                              f"{outputs!r}")
        if isinstance(model, Standardized):
            raise ConfigError("Standardizer.wrap: the model is already standardised; wrapping "
                              "it again would standardise standardised inputs")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Standardizer.wrap: model must be an nn.Module, got "
                              f"{type(model).__name__}")
        if outputs == "inverse" and not self.has_targets:
            raise ConfigError("Standardizer.wrap: outputs='inverse' needs target statistics; "
                              "fit with floating-point targets and targets=True")
        return Standardized(model, self, outputs if self.has_targets else "none")


@final
class Standardized(nn.Module):
    """``model`` behind an input standardisation (and an output shift or inverse transform).

    Build it with :meth:`Standardizer.wrap`; the statistics are buffers, so they follow
    ``.to(device)`` and ``state_dict``.

    Attributes:
        model: the wrapped model.
        report: a :class:`FixReport` of what the wrapper does.
    """

    def __init__(self, model: nn.Module, std: Standardizer, outputs: str) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.register_buffer("x_mean", std.x_mean.clone())
        self.register_buffer("x_std", std.x_std.clone())
        has_y = std.y_mean is not None and std.y_std is not None
        self.register_buffer("y_mean", std.y_mean.clone() if has_y else None)
        self.register_buffer("y_std", std.y_std.clone() if has_y else None)
        self.report = FixReport(f"Standardizer.wrap(outputs={outputs!r})",
                                changes=list(std.report.changes), layers=["(inputs)"])
        if outputs == "shift":
            self.report.changes.append("outputs: + target mean")
            self.report.layers.append("(outputs)")
        elif outputs == "inverse":
            self.report.changes.append("outputs: × target std + target mean")
            self.report.layers.append("(outputs)")

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        z = _standardise(x, self.x_mean, self.x_std)
        like = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if like is not None:  # (the wrapped model's dtype: a bf16 model gets bf16 inputs)
            z = z.to(like.dtype)
        out = self.model(z, *args, **kwargs)
        if self.outputs == "shift":
            return _affine(out, None, self.y_mean)
        if self.outputs == "inverse":
            return _affine(out, self.y_std, self.y_mean)
        return out


def _standardise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x − mean) / std`` in torch's promoted dtype (at least the statistics' float32;
    float64 for float64 data): half-precision data far from zero would overflow or lose
    its spread."""
    dt = torch.promote_types(x.dtype, mean.dtype)
    return (x.to(dt) - mean.to(x.device, dt)) / std.to(x.device, dt)


def _affine(y: Tensor, scale: Tensor | None, shift: Tensor) -> Tensor:
    """``y · scale + shift`` in torch's promoted dtype (a half-precision output plus a
    target mean of 2e5 would overflow float16)."""
    dt = torch.promote_types(y.dtype, shift.dtype)
    out = y.to(dt)
    if scale is not None:
        out = out * scale.to(y.device, dt)
    return out + shift.to(y.device, dt)
