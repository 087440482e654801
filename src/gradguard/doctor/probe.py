"""One instrumented forward/backward pass on a copy of the model.

Records, per layer in forward order: the pre-activation output std and max (weight
layers), the std of the gradient flowing back into that output, activation saturation
and dead-unit fractions, the largest attention logit of ``nn.MultiheadAttention`` layers,
and the output log-partition (log Z) of a classifier.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..fixes.init import _RELU_LIKE, _WEIGHTED
from .lr_find import loss_value

__all__ = ["LayerProbe", "ProbeResult", "probe"]


@dataclass
class LayerProbe:
    """Measurements of one module in one forward/backward pass."""

    name: str
    kind: str
    out_std: float = math.nan
    out_absmax: float = math.nan
    grad_std: float = math.nan
    saturated: float | None = None
    dead: float | None = None
    attn_logit_max: float | None = None


@dataclass
class ProbeResult:
    layers: list[LayerProbe] = field(default_factory=list)
    input_std: float = math.nan
    loss: float = math.nan
    log_z: float | None = None

    def weight_layers(self) -> list[LayerProbe]:
        return [lp for lp in self.layers if lp.kind == "weight"]

    def forward_ratio(self) -> float | None:
        """Std of the last weight layer's output over the first's (growth with depth)."""
        w = [lp for lp in self.weight_layers() if math.isfinite(lp.out_std) and lp.out_std > 0]
        if len(w) < 3:
            return None
        return w[-1].out_std / w[0].out_std

    def backward_ratio(self) -> float | None:
        """Gradient std at the first weight layer's output over the last's."""
        w = [lp for lp in self.weight_layers() if math.isfinite(lp.grad_std) and lp.grad_std > 0]
        if len(w) < 3:
            return None
        return w[0].grad_std / w[-1].grad_std


def _std(t: Tensor) -> float:
    t = t.detach().float()
    return float(t.std()) if t.numel() > 1 else float(t.abs().mean())


def _unit_dead_fraction(y: Tensor, features_last: bool = False) -> float:
    """Fraction of units that are zero for every sample (and position). A unit is a
    feature of the last axis after a Linear layer (``(N, F)``, or ``(B, T, F)`` on a
    sequence), a channel (axis 1) after a convolution (``(N, C, H, W)``)."""
    y = y.detach()
    if y.dim() < 2:
        return float((y <= 0).float().mean())
    units = y.movedim(-1, 1) if features_last else y
    alive = (units > 0).flatten(2).any(2).any(0) if units.dim() > 2 else (units > 0).any(0)
    return float(1.0 - alive.float().mean())


def _mha_logit_max(m: nn.MultiheadAttention, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> float | None:
    """The largest |attention logit| of one call, or None when it cannot be recomputed.

    Args:
        m: the attention layer.
        args, kwargs: what it was called with; query and key batched (3-D, laid out as
            ``m.batch_first`` says) or unbatched (2-D, ``(L, E)``).

    Returns:
        max |q·k| / sqrt(head dim) over heads, batch and positions.
    """
    q = args[0] if args else kwargs.get("query")
    k = args[1] if len(args) > 1 else kwargs.get("key", q)
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or \
            not m._qkv_same_embed_dim or m.in_proj_weight is None:
        return None
    if q.dim() != k.dim() or q.dim() not in (2, 3):
        return None  # (a layout torch's attention would reject anyway)
    e = m.embed_dim
    w, b = m.in_proj_weight, m.in_proj_bias
    bq = b[:e] if b is not None else None
    bk = b[e : 2 * e] if b is not None else None
    qq = nn.functional.linear(q, w[:e], bq)
    kk = nn.functional.linear(k, w[e : 2 * e], bk)
    if qq.dim() == 2:  # unbatched (L, E): a batch of one, whatever batch_first says
        qq, kk = qq.unsqueeze(0), kk.unsqueeze(0)
    elif not m.batch_first:
        qq, kk = qq.transpose(0, 1), kk.transpose(0, 1)
    h, d = m.num_heads, e // m.num_heads
    qq = qq.reshape(qq.shape[0], qq.shape[1], h, d).transpose(1, 2)
    kk = kk.reshape(kk.shape[0], kk.shape[1], h, d).transpose(1, 2)
    logits = qq @ kk.transpose(-1, -2) / math.sqrt(d)
    return float(logits.abs().max())


def probe(model: nn.Module, batch: tuple[Tensor, Tensor],
          loss_fn: Callable[[Tensor, Tensor], Tensor]) -> ProbeResult:
    """Instrumented forward + backward on a deep copy (the user's model is not touched)."""
    m = copy.deepcopy(model)
    m.train()
    res = ProbeResult()
    handles = []

    # Whether the last weight layer that ran was a Linear (its units on the last axis).
    after_linear = [False]

    def record(lp: LayerProbe) -> None:
        res.layers.append(lp)

    def fwd_weight(name: str):
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            after_linear[0] = isinstance(mod, nn.Linear)
            if not isinstance(out, Tensor):
                return
            lp = LayerProbe(name, "weight", _std(out), float(out.detach().abs().max()))
            record(lp)
            if out.requires_grad:
                out.register_hook(lambda g, lp=lp: setattr(lp, "grad_std", _std(g)))
        return hook

    def fwd_act(name: str):
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, Tensor):
                return
            lp = LayerProbe(name, type(mod).__name__, _std(out))
            y = out.detach().float()
            if isinstance(mod, nn.Tanh):
                lp.saturated = float((y.abs() > 0.99).float().mean())
            elif isinstance(mod, nn.Sigmoid):
                lp.saturated = float(((y < 0.01) | (y > 0.99)).float().mean())
            elif isinstance(mod, _RELU_LIKE):
                lp.dead = _unit_dead_fraction(y, after_linear[0])
            record(lp)
        return hook

    def fwd_mha(name: str):
        def hook(mod: nn.MultiheadAttention, args: Any, kwargs: Any, out: Any) -> None:
            lp = LayerProbe(name, "attention")
            with torch.no_grad():
                lp.attn_logit_max = _mha_logit_max(mod, args, kwargs)
            record(lp)
        return hook

    for name, mod in m.named_modules():
        if isinstance(mod, _WEIGHTED):
            handles.append(mod.register_forward_hook(fwd_weight(name)))
        elif isinstance(mod, (nn.Tanh, nn.Sigmoid, *_RELU_LIKE)):
            handles.append(mod.register_forward_hook(fwd_act(name)))
        elif isinstance(mod, nn.MultiheadAttention):
            handles.append(mod.register_forward_hook(fwd_mha(name), with_kwargs=True))
    x, y = batch
    res.input_std = _std(x) if torch.is_floating_point(x) else math.nan
    try:
        out = m(x)
        loss = loss_fn(out, y)
        res.loss = loss_value(loss)
        if isinstance(out, Tensor) and out.dim() == 2 and not torch.is_floating_point(y):
            res.log_z = float(torch.logsumexp(out.detach().float(), dim=1).abs().mean())
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return res
