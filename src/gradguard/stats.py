"""The fused gradient pass: the only code that walks every gradient to measure it.

One ``torch._foreach_norm`` per (device, dtype) group gives every per-tensor L2 norm; the
global norm, the non-finite flag and everything downstream are derived from that short
vector, so the guard reads each gradient byte once to measure it (the same single read
``torch.nn.utils.clip_grad_norm_`` makes). Nothing here copies to the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["GradGroups", "GradStats", "collect_grads", "compute_stats", "finite",
           "foreach_norms", "local_norms", "loss_value", "not_finite"]


@dataclass(frozen=True)
class GradGroups:
    """Gradients of the guarded parameters, bucketed for foreach kernels.

    Attributes:
        index: positions (into the guard's parameter list) of the parameters that have a grad.
        grads: the grads, in ``index`` order (this rank's shard of a sharded DTensor grad).
        params: the matching parameters, as the optimizer knows them.
        buckets: ``(device, dtype) -> positions into grads`` so each bucket is one kernel.
        weights: the parameters' local tensors (shards under FSDP2), for transforms that read
            weights (AGC).
        sum_squares: sums per-tensor squared norms over shards when gradients are sharded
            (set by the guard under FSDP2), so recomputed norms are the true ones.
    """

    index: tuple[int, ...]
    grads: list[Tensor]
    params: list[Tensor]
    buckets: dict[tuple[torch.device, torch.dtype], list[int]]
    weights: list[Tensor] = field(default_factory=list)
    sum_squares: Callable[[Tensor], Tensor] | None = None

    def bucket_grads(self) -> list[tuple[torch.device, list[Tensor], list[int]]]:
        """Return ``(device, grads, positions)`` per bucket."""
        return [(dev, [self.grads[i] for i in pos], pos) for (dev, _), pos in self.buckets.items()]


def collect_grads(params: Sequence[Tensor]) -> GradGroups:
    """Gather ``.grad`` of ``params``; parameters without a grad are skipped.

    Raises:
        TypeError: a gradient is sparse (the fused norm kernels need dense grads).
    """
    from .distributed import local_tensor

    index: list[int] = []
    grads: list[Tensor] = []
    kept: list[Tensor] = []
    weights: list[Tensor] = []
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        g = local_tensor(g)
        if g.is_sparse:
            raise InputError(
                f"parameter #{i} (shape {tuple(p.shape)}) has a sparse gradient; gradguard "
                "measures and clips dense gradients only. Use dense embeddings "
                "(nn.Embedding(..., sparse=False)) or leave that parameter out of the guard "
                "(Guard(model, optimizer, params=...))."
            )
        w = local_tensor(p)
        if g.is_complex():
            # A complex tensor's L2 norm is that of its real and imaginary parts together,
            # and scaling that real view in place scales the complex gradient.
            g, w = torch.view_as_real(g), torch.view_as_real(w.detach())
        buckets.setdefault((g.device, g.dtype), []).append(len(grads))
        index.append(i)
        grads.append(g)
        kept.append(p)
        weights.append(w)
    return GradGroups(tuple(index), grads, kept, buckets, weights)


def foreach_norms(groups: GradGroups, tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """Per-tensor L2 norms (fp32, on ``device``) of ``tensors`` laid out like ``groups.grads``.

    Under sharding (``groups.sum_squares`` set) the norms are of the whole tensors.
    """
    norms = local_norms(groups, tensors, device)
    if groups.sum_squares is not None:
        norms = groups.sum_squares(norms.square()).sqrt()
    return norms


def _norms(tensors: list[Tensor], ord: float) -> list[Tensor]:
    """fp32 norms of one bucket (one dtype). fp64 is reduced in fp64 and then cast: torch
    refuses to narrow it inside the kernel (a norm past fp32's range becomes inf, which the
    guard counts as non-finite anyway)."""
    if tensors and tensors[0].dtype == torch.float64:
        return [n.float() for n in torch._foreach_norm(tensors, ord)]
    return list(torch._foreach_norm(tensors, ord, dtype=torch.float32))


def local_norms(groups: GradGroups, tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """Per-tensor L2 norms of this rank's tensors (shards under FSDP2), no communication."""
    if len(groups.buckets) == 1:
        # The common case: one device, one dtype, no scatter needed.
        return torch.stack(_norms(list(tensors), 2)).to(device, non_blocking=True)
    out = torch.empty(len(tensors), dtype=torch.float32, device=device)
    for (_dev, _dtype), pos in groups.buckets.items():
        norms = _norms([tensors[i] for i in pos], 2)
        idx = torch.tensor(pos, device=device)
        out.index_copy_(0, idx, torch.stack(norms).to(device, non_blocking=True))
    return out


@dataclass
class GradStats:
    """Gradient statistics of one step, all device tensors.

    Attributes:
        norms: per-parameter-tensor L2 norms, fp32, one per parameter *with* a grad
            (positions in ``index``).
        index: positions of those parameters in the guard's parameter list.
        global_norm: L2 norm of all gradients together (0-dim fp32).
        nonfinite: True when any gradient element is NaN/Inf (0-dim bool). A gradient whose
            squared norm overflows fp32 counts as non-finite too: no update of that size is
            usable.
    """

    norms: Tensor
    index: tuple[int, ...]
    global_norm: Tensor
    nonfinite: Tensor
    _groups: GradGroups | None = field(default=None, repr=False)
    _max_abs: Tensor | None = field(default=None, repr=False)

    @property
    def max_abs(self) -> Tensor:
        """Largest absolute gradient element (0-dim fp32); one extra read, made on first use."""
        if self._max_abs is None:
            if self._groups is None or not self._groups.grads:
                self._max_abs = torch.zeros((), device=self.norms.device)
            else:
                per = [
                    torch.stack(_norms(g, float("inf")))
                    .max()
                    .to(self.norms.device)
                    for _, g, _ in self._groups.bucket_grads()
                ]
                self._max_abs = torch.stack(per).max()
        return self._max_abs

    def full_norms(self, n: int) -> Tensor:
        """Per-tensor norms over all ``n`` guarded parameters (0 where a grad is missing)."""
        if len(self.index) == n:
            return self.norms
        out = torch.zeros(n, dtype=self.norms.dtype, device=self.norms.device)
        if self.index:
            out[list(self.index)] = self.norms
        return out


def global_from_norms(norms: Tensor) -> Tensor:
    """L2 norm of a vector of per-tensor L2 norms, as ``clip_grad_norm_`` combines them."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=norms.device)
    return torch.linalg.vector_norm(norms, 2)


# The largest gradient norm whose square fp32 holds. Above it Adam's, RMSprop's and
# Adagrad's second moments overflow to inf even though every element is finite (torch's
# norm kernels rescale, so the norm itself stays finite up to fp32's max).
MAX_NORM = math.sqrt(torch.finfo(torch.float32).max)


def finite(x: Tensor) -> Tensor:
    """``torch.isfinite(x)`` in two kernels instead of four (abs, ne, eq, mul): x − x is
    exactly 0 for every finite x and NaN for ±inf and NaN. The hot path calls it each step."""
    return (x - x) == 0


def not_finite(x: Tensor) -> Tensor:
    """``~torch.isfinite(x)`` in two kernels (NaN != 0 holds)."""
    return (x - x) != 0


def loss_value(loss: Tensor) -> Tensor:
    """A detached loss as one float32 value (the mean of a loss with a shape), on its device.

    A finite float64 loss past float32's range is huge, not non-finite: it saturates at
    float32's largest value instead of reading as ``inf`` (which would call a float64 run's
    large loss a NaN/Inf fault). Device-side; no sync.
    """
    x = loss.detach()
    wide = x.dtype == torch.float64
    if not wide:
        x = x.float()
    if x.dim():  # (a shape is host metadata: no sync)
        x = x.mean()
    if wide:
        big = torch.finfo(torch.float32).max
        x = torch.where(finite(x), x.clamp(-big, big), x)
    return x.float()


def unusable(global_norm: Tensor) -> Tensor:
    """True (0-dim bool) for a NaN/Inf norm or one whose square overflows fp32."""
    return ~(global_norm <= MAX_NORM)  # NaN compares False: flagged too


def compute_stats(groups: GradGroups, device: torch.device, norms: Tensor | None = None
                  ) -> GradStats:
    """One fused pass over ``groups`` giving per-tensor norms, global norm and non-finite flag.

    Args:
        groups: output of :func:`collect_grads`.
        device: where the (small) result tensors live; the first parameter's device.
        norms: per-tensor norms already measured (the guard's distributed path agrees on
            them across ranks first); None measures them here.
    """
    if not groups.grads:
        zero = torch.zeros((), dtype=torch.float32, device=device)
        no = torch.zeros((), dtype=torch.bool, device=device)
        return GradStats(torch.zeros(0, device=device), (), zero, no, groups)
    if norms is None:
        norms = foreach_norms(groups, groups.grads, device)
    gnorm = global_from_norms(norms)
    return GradStats(norms, groups.index, gnorm, unusable(gnorm), groups)
