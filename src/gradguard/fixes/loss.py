"""Loss-side remedies: z-loss for drifting logits, robust losses for outlier-driven spikes.

- z-loss ``weight · (log Z)²`` with ``log Z = logsumexp(logits)`` keeps the softmax
  normaliser near 1 (Chowdhery et al. 2022, "PaLM", section 5, "z_loss" with weight 1e-4;
  Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
  instabilities", section 3.1.2, output-logit divergence).
- Huber / smooth-L1 instead of MSE: the gradient per sample is bounded by ``delta`` (in
  units of the prediction), so one corrupted target cannot produce an unbounded step
  (Huber 1964, "Robust Estimation of a Location Parameter"; Girshick 2015, "Fast R-CNN",
  eq. 3). torch has both: ``nn.HuberLoss(delta=...)`` and ``nn.SmoothL1Loss(beta=...)``;
  :func:`robust_loss` returns one of them.
- Label smoothing is built into torch: ``nn.CrossEntropyLoss(label_smoothing=0.1)``
  (Szegedy et al. 2016, "Rethinking the Inception Architecture", section 7): the targets
  stop asking for infinite logits, which is the same drift z-loss penalises.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import final

import torch
from torch import Tensor, nn

from ..errors import ConfigError, check_positive

__all__ = ["ZLossWrapped", "robust_loss", "with_z_loss", "z_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def z_loss(logits: Tensor, weight: float = 1e-4, dim: int = -1,
           mask: Tensor | None = None) -> Tensor:
    """The z-loss term ``weight · mean((log Z)²)``, ``log Z = logsumexp(logits, dim)``.

    Its gradient on the logits is ``2·weight·log Z·softmax(logits) / N``: it has the sign
    of log Z, so descending it lowers (or raises) the logits in proportion to their
    probabilities and moves log Z toward 0, where the softmax is self-normalised.
    Computed in fp32 whatever the logits' dtype (an fp16 logsumexp overflows). Reference:
    Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", section 5
    ("Loss function").

    Args:
        logits: unnormalised scores, classes along ``dim``.
        weight: the coefficient (PaLM: 1e-4).
        dim: the class dimension.
        mask: the positions that count (``logits`` without ``dim``), e.g. the tokens
            that are not padding; the mean is over them (0 when there is none).

    Returns:
        A scalar tensor to add to the loss.
    """
    if not isinstance(logits, Tensor) or not torch.is_floating_point(logits):
        raise ConfigError(f"z_loss: logits must be a floating-point tensor, got "
                          f"{getattr(logits, 'dtype', type(logits).__name__)}")
    w = check_positive("z_loss.weight", weight)
    sq = torch.logsumexp(logits.float(), dim=dim).square()
    if mask is None:
        return w * (sq.mean() if sq.numel() else sq.sum())
    return w * (sq * mask).sum() / mask.sum().clamp(min=1)


@final
class ZLossWrapped:
    """A cross-entropy-style ``loss_fn(logits, targets)`` plus :func:`z_loss` on its logits.

    Build it with :func:`with_z_loss`.
    """

    _gradguard_z_loss = True

    def __init__(self, loss_fn: LossFn, weight: float, dim: int) -> None:
        self.loss_fn = loss_fn
        self.weight = weight
        self.dim = dim
        # The positions the loss ignores (padding) do not count in the z-loss either.
        self.ignore_index = getattr(loss_fn, "ignore_index", None)
        if self.ignore_index is None:  # (functools.partial(F.cross_entropy, ignore_index=0))
            self.ignore_index = (getattr(loss_fn, "keywords", None) or {}).get(
                "ignore_index", -100)

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        mask = None
        if isinstance(targets, Tensor) and not torch.is_floating_point(targets) and \
                logits.dim() > 1:
            positions = logits.shape[:self.dim % logits.dim()] + \
                logits.shape[self.dim % logits.dim() + 1:]
            if targets.shape == positions:  # (class indices, one per position)
                mask = targets != self.ignore_index
        return self.loss_fn(logits, targets) + z_loss(logits, self.weight, self.dim, mask)

    def __repr__(self) -> str:
        name = getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)
        return f"with_z_loss({name}, weight={self.weight:g})"


def with_z_loss(loss_fn: LossFn, weight: float = 1e-4, dim: int = -1) -> ZLossWrapped:
    """Wrap a cross-entropy ``loss_fn(logits, targets)`` so it adds the z-loss of the logits.

    Reference: Chowdhery et al. 2022 (PaLM), section 5; Wortsman et al. 2023, section 3.1.2.

    Args:
        loss_fn: e.g. ``F.cross_entropy`` or ``nn.CrossEntropyLoss(label_smoothing=0.1)``.
        weight: the z-loss coefficient (PaLM: 1e-4).
        dim: the class dimension of the logits the wrapped loss is given (-1: ``(N, C)``,
            or ``(N, T, C)`` that the loss reshapes itself; pass 1 for ``(N, C, T)`` handed
            to ``F.cross_entropy`` as is). Positions whose class-index target is the loss's
            ``ignore_index`` (-100 unless the loss module says otherwise) are left out.

    Returns:
        A callable with the same signature, ``loss_fn(logits, targets) + z_loss(logits)``.

    Raises:
        ConfigError: ``loss_fn`` is not callable or already includes a z-loss term.
    """
    if not callable(loss_fn):
        raise ConfigError(f"with_z_loss: loss_fn must be callable, got {loss_fn!r}")
    if getattr(loss_fn, "_gradguard_z_loss", False):
        raise ConfigError(f"with_z_loss: {loss_fn!r} already adds a z-loss term; wrapping it "
                          "again would count it twice")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise ConfigError(f"with_z_loss: dim must be an int, got {dim!r}")
    return ZLossWrapped(loss_fn, check_positive("with_z_loss.weight", weight), int(dim))


_ROBUST = ("huber", "smooth_l1")


def robust_loss(kind: str = "huber", delta: float = 1.0,
                reduction: str = "mean") -> nn.HuberLoss | nn.SmoothL1Loss:
    """torch's Huber or smooth-L1 loss, the drop-in for MSE when outliers cause spikes.

    Quadratic for residuals below ``delta``, linear above, so each sample's gradient on its
    prediction is at most ``delta`` (Huber) or 1 (smooth L1) in magnitude: a corrupted
    target moves the model by a bounded step instead of one proportional to its error.
    Reference: Huber 1964, "Robust Estimation of a Location Parameter", Ann. Math. Statist.
    35(1), section 4; Girshick 2015, "Fast R-CNN", eq. 3 (smooth L1).

    Args:
        kind: "huber" (``nn.HuberLoss``) or "smooth_l1" (``nn.SmoothL1Loss``, which is Huber
            divided by ``delta``).
        delta: the residual where the loss turns linear, in the targets' units.
        reduction: "mean", "sum" or "none", as in torch.

    Returns:
        The torch loss module.
    """
    if kind not in _ROBUST:
        raise ConfigError(f"robust_loss: kind must be one of {_ROBUST}, got {kind!r}")
    d = check_positive("robust_loss.delta", delta)
    if reduction not in ("mean", "sum", "none"):
        raise ConfigError(f"robust_loss: reduction must be 'mean', 'sum' or 'none', got "
                          f"{reduction!r}")
    if kind == "huber":
        return nn.HuberLoss(reduction=reduction, delta=d)
    return nn.SmoothL1Loss(reduction=reduction, beta=d)
