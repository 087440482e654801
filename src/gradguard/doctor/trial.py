"""Short training trials: the measured consequences the doctor's severities rest on.

A statistic measured at initialisation (a gradient ratio across depth, an input scale,
an LR range test) is a *suspicion*: stock architectures show large ratios by design
(attention at initialisation passes almost no gradient to its queries and keys) and
still train well. So before the doctor calls anything a warning or critical, it trains
copies for a few dozen steps: the user's setup as it is, and the same setup with the
proposed fix. A finding is critical only when the user's run fails (diverges, makes no
progress, or ends no better than a prediction that ignores the inputs) and the fix cures
it, a warning when the run trains but the fix trains it much further in the same steps,
and info otherwise.

Each trial is measured against its own untouched copy: the start is the loss before any
step (the mean over the first batches), never a loss after an update, so an early
blow-up cannot pass for a high start that the run then "recovers" from. The floor is a
constant prediction's loss on the run's last batches (the class frequencies for a
classifier: chance; the target mean for regression): a run that ends there learned
nothing from its inputs.
"""

from __future__ import annotations

import collections
import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .lr_find import Batch, clone_optimizer, cycle_batches, loss_value

__all__ = ["Trial", "Trials", "feature_dim", "group_lrs", "run_trial", "verdict"]

# A run whose loss ends this many times above where it started has diverged.
DIVERGE_FACTOR = 3.0
# A run that removes less than this fraction of its starting loss has stalled; one that
# ends within this fraction of a constant prediction's loss learned nothing from its inputs.
STALL_FRACTION = 0.05
# A fix cures a stalled run when it removes at least this much more of the loss.
HELP_FRACTION = 0.1
# A run that trains still has a problem when its fix removes this much more of it.
MUCH_FRACTION = 0.25
# The start: the untouched copy's mean loss on this many batches, before any step.
START_BATCHES = 3
# The end: the median loss of this many last steps.
END_STEPS = 10

# The first layer reads features on the last axis of a (B, T, F) input...
_FEATURES_LAST = (nn.Linear, nn.Bilinear, nn.RNNBase, nn.MultiheadAttention, nn.LayerNorm,
                  nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Transformer)
# ...or channels on axis 1 of an (N, C, L) one.
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                   nn.modules.instancenorm._InstanceNorm)


def feature_dim(model: nn.Module | None, x: Tensor) -> int:
    """The axis of ``x`` that holds its features, as the model's first layer reads them.

    Args:
        model: the model ``x`` is fed to (None: the convention for the rank alone).
        x: one batch of inputs.

    Returns:
        1 for ``(N, D)`` tables and ``(N, C, ...)`` images and signals (channels); -1 for
        ``(B, T, F)`` sequences whose first layer (Linear, RNN, attention, LayerNorm) reads
        the last axis; 1 for ``(N,)`` inputs, read as one feature.
    """
    if x.dim() != 3 or model is None:
        # (An MLP that flattens an image inside forward still sees one value per pixel
        # and channel: per-channel statistics are the images' convention.)
        return 1
    for m in model.modules():  # (registration order: the first layer, in most models)
        if isinstance(m, _CHANNELS_FIRST):
            return 1
        if isinstance(m, _FEATURES_LAST):
            return -1
    return 1


def group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each param group, in order."""
    return [float(g["lr"]) for g in optimizer.param_groups]


@dataclass
class Trial:
    """Losses and gradient norms of one short training run on a copy.

    Attributes:
        label: what was trained ("as is", "re-initialised", "LR 0.01", ...).
        losses: training loss per step (NaN/inf kept), in the user's units.
        grad_norms: global gradient norm per step, before the optimizer step.
        initial: the untouched copy's loss on the first batches, before any step.
        chance: the loss of a constant prediction (class frequencies, target mean) on the
            last batches, NaN where the output or loss admits none.
    """

    label: str
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    initial: list[float] = field(default_factory=list)
    chance: float = math.nan

    @property
    def start(self) -> float:
        """Mean loss of the untouched copy on the first batches (the first loss when no
        such measurement was taken: the only one before any step)."""
        head = [v for v in (self.initial or self.losses[:1]) if math.isfinite(v)]
        return sum(head) / len(head) if head else math.nan

    @property
    def end(self) -> float:
        """Median of the last ten losses (inf when any of them is not finite)."""
        tail = sorted(v if math.isfinite(v) else math.inf for v in self.losses[-END_STEPS:])
        return tail[len(tail) // 2] if tail else math.inf

    @property
    def peak(self) -> float:
        """The largest loss of the run (inf when one is not finite)."""
        return max((v if math.isfinite(v) else math.inf for v in self.losses), default=math.nan)

    @property
    def diverged(self) -> bool:
        """A non-finite loss or gradient, or a loss ending far above where it started."""
        if not all(math.isfinite(v) for v in self.losses + self.grad_norms):
            return True
        return self.end > DIVERGE_FACTOR * self.start if self.start > 0 else False

    @property
    def progress(self) -> float:
        """Fraction of the starting loss removed by the end (-inf when diverged)."""
        if self.diverged or not math.isfinite(self.start):
            return -math.inf
        return (self.start - self.end) / max(abs(self.start), 1e-12)

    @property
    def at_chance(self) -> bool:
        """Ends no better than a constant prediction: nothing learned from the inputs.

        A run that blew up on the way and ends within ``STALL_FRACTION`` of it has
        collapsed to its prior (a constant predictor's loss is as noisy as the estimate
        of it); one that never did is learning slowly, as early training on a hard task
        sits just under its prior, and only counts at or above it."""
        if not math.isfinite(self.chance):
            return False
        if self.peak > DIVERGE_FACTOR * self.start:
            return self.end > self.chance - STALL_FRACTION * abs(self.chance)
        return self.end >= self.chance

    @property
    def ok(self) -> bool:
        """Trained: finite, not diverged, some progress, and below a constant prediction."""
        return not self.diverged and self.progress >= STALL_FRACTION and not self.at_chance

    @property
    def scale(self) -> float:
        """The loss that gains are measured against: a constant prediction's (what there
        is to learn), else the start."""
        if math.isfinite(self.chance) and self.chance != 0:
            return abs(self.chance)
        return max(abs(self.start), 1e-12) if math.isfinite(self.start) else math.nan

    def describe(self) -> str:
        """One phrase for a finding's title, e.g. 'loss 2.3 → 0.41 in 60 steps'."""
        n = len(self.losses)
        bad = next((i for i, v in enumerate(self.losses) if not math.isfinite(v)), None)
        if bad is not None:
            return f"loss turns non-finite at step {bad}"
        g_bad = next((i for i, v in enumerate(self.grad_norms) if not math.isfinite(v)), None)
        if g_bad is not None:
            return f"gradients turn non-finite at step {g_bad}"
        out = f"loss {self.start:.3g} → {self.end:.3g} in {n} steps"
        if self.start > 0 and self.peak > DIVERGE_FACTOR * max(self.start, self.end):
            out += f" (peaking at {self.peak:.3g})"
        if self.at_chance:
            out += f", no better than a constant prediction ({self.chance:.3g})"
        return out

    def summary(self) -> dict[str, object]:
        """The numbers, for a finding's evidence."""
        finite = [g for g in self.grad_norms if math.isfinite(g)]
        return {"label": self.label, "steps": len(self.losses), "start_loss": self.start,
                "end_loss": self.end, "chance_loss": self.chance, "at_chance": self.at_chance,
                "diverged": self.diverged, "progress": self.progress, "ok": self.ok,
                "max_grad_norm": max(finite) if finite else math.inf}


# -- where the prediction sits in a model's output ---------------------------------------

Path = tuple[Any, ...]


def _leaves(out: Any, path: Path = ()) -> Iterable[tuple[Path, Tensor]]:
    """The tensors of an output: itself, or those in a tuple/list/Mapping (HF ModelOutput)."""
    if isinstance(out, Tensor):
        yield path, out
    elif isinstance(out, Mapping):
        for k, v in out.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(out, tuple | list):
        for i, v in enumerate(out):
            yield from _leaves(v, (*path, i))


def _replace(out: Any, path: Path, new: Tensor) -> Any:
    """``out`` with the tensor at ``path`` replaced (containers shallow-copied)."""
    if not path:
        return new
    k, rest = path[0], path[1:]
    if isinstance(out, Mapping):
        dup = copy.copy(out)  # (keeps the type: an HF ModelOutput stays one)
        dup[k] = _replace(out[k], rest, new)  # type: ignore[index]
        return dup
    items = list(out)
    items[k] = _replace(out[k], rest, new)
    if isinstance(out, list):
        return items
    return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)


def _class_dims(pred: Tensor, y: Tensor) -> list[int]:
    """The axes of ``pred`` that hold class scores for index targets ``y``: removing one
    leaves ``y``'s shape ((N, K) for (N,); (B, T, V) for (B, T); (N, K, H, W) for (N, H, W))."""
    s = list(pred.shape)
    return [d for d in range(1, pred.dim()) if s[:d] + s[d + 1:] == list(y.shape)]


def _fit(out: Any, y: Tensor) -> tuple[Path, Tensor, list[int]] | None:
    """The output tensor that predicts ``y``: its path, itself, and its class axes (empty
    for a prediction of ``y``'s values, one per sample element); None when none fits."""
    for path, t in _leaves(out):
        if not t.is_floating_point() or t.dim() == 0 or y.dim() == 0 or len(t) != len(y):
            continue
        if not y.is_floating_point():
            dims = _class_dims(t, y)
            if dims:
                return path, t, dims
        if t[0].numel() == y[0].numel():
            return path, t, []
    return None


class _ConstantPrediction:
    """The loss of predictions that ignore the inputs, fitted to the targets a run saw.

    For class-index targets the candidates are the class frequencies (as log-probability
    logits and as probabilities) and the uniform prediction: the best of them is a
    classifier's chance level. For value targets it is the target mean (and its logit,
    for 0/1 targets under a loss on logits). A run that ends no lower learned nothing from
    its inputs. Values outside [0, 1] are never fed to a loss whose inputs the model kept
    within [0, 1] (probabilities: BCELoss refuses anything else).
    """

    def __init__(self, out: Any, y: Tensor) -> None:
        fit = _fit(out, y)
        self.path: Path | None = None
        if fit is None:
            return
        self.path, pred, self.dims = fit
        self.dtype, self.device = pred.dtype, pred.device
        self.sample_shape = tuple(pred.shape[1:])
        with torch.no_grad():
            self.probabilities = bool(((pred >= 0) & (pred <= 1)).all())
        self.template = out
        if self.dims:
            self.counts = torch.zeros(pred.shape[self.dims[0]], dtype=torch.float64,
                                      device=y.device)
        else:
            self.total = torch.zeros(y[0].numel(), dtype=torch.float64, device=y.device)
            self.lo = torch.full((), math.inf, dtype=torch.float64, device=y.device)
            self.hi = torch.full((), -math.inf, dtype=torch.float64, device=y.device)
        self.n = 0

    def add(self, y: Tensor) -> None:
        """Count one batch's targets (no host sync)."""
        if self.path is None:
            return
        with torch.no_grad():
            if self.dims:
                k = len(self.counts)
                flat = y.reshape(-1)
                # (An ignore_index such as -100 is no class.)
                flat = flat[(flat >= 0) & (flat < k)]
                self.counts += torch.bincount(flat.long(), minlength=k).double()
            else:
                flat = y.detach().double().reshape(len(y), -1)
                self.total += flat.sum(0)
                self.lo = torch.minimum(self.lo, flat.min())
                self.hi = torch.maximum(self.hi, flat.max())
                self.n += len(y)

    def _candidates(self) -> list[Callable[[Tensor], Tensor]]:
        """Functions of a batch's targets returning a constant prediction for it."""
        if self.dims:
            total = float(self.counts.sum())
            if total <= 0:
                return []
            freq = (self.counts / total).to(self.device, self.dtype)
            # The prior's log: the best constant logits (cross-entropy) and the prior's
            # log-probabilities (log_softmax + nll_loss) alike; the prior itself only for a
            # model whose outputs are probabilities. (Uniform zeros or raw frequencies fed
            # as log-probabilities would be no distribution: a negative "loss".)
            vecs = [freq.clamp_min(1e-8).log()] + ([freq] if self.probabilities else [])
            return [lambda y, v=v, d=d: _along(v, d, y) for v in vecs for d in self.dims]
        if self.n == 0:
            return []
        mean = self.total / self.n
        vals = [mean]
        unit = float(self.lo) >= 0 and float(self.hi) <= 1
        if unit and not self.probabilities:  # (0/1 targets, a loss on logits)
            p = mean.clamp(1e-6, 1 - 1e-6)
            vals.append(torch.log(p / (1 - p)))
        if self.probabilities:  # (never out of the range the loss accepted)
            vals = [v for v in vals if bool(((v >= 0) & (v <= 1)).all())]
        shape = self.sample_shape
        return [lambda y, v=v: v.to(self.device, self.dtype).reshape(shape).expand(
            len(y), *shape) for v in vals]

    def loss(self, loss_fn: Callable[[Any, Tensor], Tensor], ys: Iterable[Tensor]) -> float:
        """The best candidate's median loss over ``ys`` (NaN when none applies)."""
        if self.path is None:
            return math.nan
        ys = list(ys)
        best = math.nan
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the user's own loss warns about its shapes)
            for make in self._candidates():
                try:
                    vals = sorted(loss_value(loss_fn(_replace(self.template, self.path,
                                                              make(y)), y)) for y in ys)
                except Exception:  # (a loss that does not take this form of prediction)
                    continue
                med = vals[len(vals) // 2] if vals else math.nan
                # (a negative loss is no constant prediction's: the loss is read outside
                # its domain, or has a term a constant cannot stand for)
                if math.isfinite(med) and med >= 0 and (math.isnan(best) or med < best):
                    best = med
        return best


def _along(vec: Tensor, d: int, y: Tensor) -> Tensor:
    """``vec`` (K class scores) broadcast to a prediction for index targets ``y``, axis d."""
    shape = list(y.shape)
    shape.insert(d, len(vec))
    view = [1] * len(shape)
    view[d] = len(vec)
    return vec.view(view).expand(shape)


# -- one trial -----------------------------------------------------------------------------


def run_trial(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Batch | Iterable[Batch],
    loss_fn: Callable[[Any, Tensor], Tensor],
    steps: int,
    *,
    label: str = "as is",
    lr_scale: float | None = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
    targets: Callable[[Tensor], Tensor] | None = None,
    outputs: Callable[[Any, Tensor], Any] | None = None,
) -> Trial:
    """Train a copy of ``model`` with a copy of ``optimizer`` for ``steps`` steps.

    Args:
        model, optimizer: the user's; neither is modified.
        data: one batch or an iterable of batches (cycled).
        loss_fn: ``loss_fn(model(inputs), targets)``.
        steps: optimizer steps; the run stops early at the first non-finite loss.
        label: names the trial in findings.
        lr_scale: multiply every param group's LR by this (their ratios are kept).
        prepare: applied to the copy before training (a fix); returns the module to train,
            whose parameters must be the copy's (a wrapper such as a Standardizer may add
            none of its own).
        targets: maps each batch's targets to those the copy trains on (standardised).
        outputs: ``outputs(model_output, raw_targets)`` maps the model's outputs back to
            the raw targets' units; the recorded losses are ``loss_fn`` on those, so a
            trial on transformed targets reads in the same units as the user's.

    Returns:
        The :class:`Trial`.
    """
    m = copy.deepcopy(model)
    opt = clone_optimizer(optimizer, model, m)
    if lr_scale is not None:
        for g in opt.param_groups:
            g["lr"] = g["lr"] * lr_scale
    net = prepare(m) if prepare is not None else m
    net.train()
    params = [p for p in m.parameters() if p.requires_grad]
    res = Trial(label)
    stream = cycle_batches(data)
    head = [next(stream) for _ in range(START_BATCHES)]

    def recorded(out: Any, y: Tensor) -> tuple[Any, float]:
        """The output in the raw targets' units, and the loss on it."""
        if outputs is None:
            return out, loss_value(loss_fn(out, y))
        raw = outputs(out, y)
        return raw, loss_value(loss_fn(raw, y))

    # The start: the untouched copy, train mode as in training (dropout, batch statistics),
    # with its buffers (BatchNorm's running statistics) put back afterwards.
    # (by name: a buffer the first forward creates, a lazily built cache, has no saved
    # value and keeps the one it was made with)
    saved = {n: b.detach().clone() for n, b in net.named_buffers()}
    with torch.no_grad():
        raw, value = recorded(net(head[0][0]), head[0][1])
        floor = _ConstantPrediction(raw, head[0][1])
        res.initial.append(value)
        for x, y in head[1:]:
            res.initial.append(recorded(net(x), y)[1])
        for n, b in net.named_buffers():
            if n in saved and saved[n].shape == b.shape:
                b.copy_(saved[n])
    tail: collections.deque[Tensor] = collections.deque(maxlen=END_STEPS)
    for x, y in itertools.islice(itertools.chain(head, stream), steps):
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = loss_fn(out, targets(y) if targets is not None else y)
        value = loss_value(loss)
        if outputs is not None and math.isfinite(value):
            with torch.no_grad():
                value = recorded(_detach(out), y)[1]
        res.losses.append(value)
        floor.add(y)
        tail.append(y)
        if not math.isfinite(value):
            break
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.detach().float()) for g in grads]))) if grads else 0.0
        res.grad_norms.append(norm)
        if not math.isfinite(norm):
            break
        opt.step()
    res.chance = floor.loss(loss_fn, tail)
    return res


def _detach(out: Any) -> Any:
    """``out`` with every tensor detached (containers rebuilt as :func:`_replace` does)."""
    for path, t in list(_leaves(out)):
        out = _replace(out, path, t.detach())
    return out


def verdict(user: Trial, fixed: Trial) -> str:
    """Severity of a suspected cause, from the user's trial and the trial with its fix.

    Args:
        user: the setup as it is.
        fixed: the same setup with the proposed fix.

    Returns:
        "critical" when the user's run fails (diverges, stalls, or ends no better than a
        constant prediction) and the fix trains (from a stall, much further); "warning"
        when the user's run trains but the fix reaches a much lower loss in the same steps;
        else "info". A fix that only stops a divergence, ending no better than a constant
        prediction, is no cure.
    """
    if not fixed.ok:
        return "info"
    # Both trials' losses are in the user's units; what there is to learn sets the scale.
    gain = (user.end - fixed.end) / user.scale if not user.diverged else math.inf
    if not user.ok:
        return "critical" if gain >= HELP_FRACTION else "info"
    return "warning" if gain >= MUCH_FRACTION else "info"


# -- the trials of one diagnosis ----------------------------------------------------------


def _regression_like(ys: list[Tensor]) -> bool:
    """Targets that standardising can help and cannot break: floating-point values, not
    0/1 labels or probabilities (BCE needs [0, 1]) nor ±1 labels (hinge losses)."""
    if not ys or not all(y.is_floating_point() and y.dim() >= 1 for y in ys):
        return False
    flat = torch.cat([y.detach().double().reshape(-1) for y in ys])
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return False
    if float(flat.min()) >= 0 and float(flat.max()) <= 1:
        return False
    return len(torch.unique(flat[:10_000])) > 2


def _features(x: Tensor, dim: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """(rows, features) view of one batch of inputs: features on axis ``dim`` (tabular
    columns, image or signal channels, the last axis of a sequence); ``(N,)`` inputs are
    one feature. Rows with a NaN/Inf are dropped (they are the data check's)."""
    x = x.detach().to(dtype)
    if x.dim() < 2:
        f = x.reshape(-1, 1)
    else:
        f = x.movedim(dim % x.dim(), -1)
        f = f.reshape(-1, f.shape[-1])
    return f[torch.isfinite(f).all(1)]


def _input_moments(xs: list[Tensor], dim: int) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std of inputs along ``dim``, shaped to broadcast over a batch
    without its first axis; ``(N,)`` inputs are one feature (scalar statistics)."""
    rank = xs[0].dim()
    flat = torch.cat([_features(x, dim, torch.float64) for x in xs])
    view: list[int] = []
    if rank > 1:
        view = [1] * (rank - 1)
        view[dim % rank - 1] = flat.shape[1]
    mean, std = flat.mean(0), flat.std(0, correction=0)
    std = torch.where(std < 1e-8, torch.ones_like(std), std)  # (a constant feature)
    dt = torch.promote_types(xs[0].dtype, torch.float32)
    return mean.reshape(view).to(dt), std.reshape(view).to(dt)


class Trials:
    """The trials of one diagnosis: each variant trained at most once, from a fixed seed.

    The seed makes a diagnosis repeatable (re-initialisation and dropout draw random
    numbers); the caller's random state is restored afterwards.

    Args:
        model, optimizer, data, loss_fn: the user's setup (left untouched).
        steps: optimizer steps per trial.
        seed: seed of every trial.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 data: Batch | Iterable[Batch], loss_fn: Callable[[Any, Tensor], Tensor],
                 steps: int, seed: int = 0) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.loss_fn = loss_fn
        self.steps = steps
        self.seed = seed
        self.user_lrs = group_lrs(optimizer)
        # The largest group LR stands for the optimizer (the range test ramps all groups
        # together, and the largest is the first to blow up).
        self.user_lr = max(self.user_lrs)
        self._cache: dict[str, Trial] = {}

    def _run(self, key: str, **kwargs: Any) -> Trial:
        if key not in self._cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self._cache[key] = run_trial(self.model, self.optimizer, self.data,
                                             self.loss_fn, self.steps, label=key, **kwargs)
        return self._cache[key]

    def done(self) -> dict[str, Trial]:
        """The trials run so far, by label."""
        return dict(self._cache)

    def user(self) -> Trial:
        """The setup as it is."""
        return self._run("as is")

    def reinit(self) -> Trial:
        """Weights re-initialised by ``gg.fixes.reinit(model, "auto")``, same LR."""
        from ..fixes.init import reinit

        def prepare(m: nn.Module) -> nn.Module:
            reinit(m, "auto")
            return m
        return self._run("re-initialised", prepare=prepare)

    def standardized(self, sample: list[Batch], *, inputs: bool = True,
                     targets: bool = True, lr_scale: float | None = None) -> Trial | None:
        """Inputs and/or regression targets standardised, as the findings propose.

        Inputs are standardised per feature (the axis :func:`feature_dim` names) behind a
        ``gg.fixes.Standardizer`` wrapper; targets are trained on standardised, and the
        outputs mapped back (``out · std + mean``) to record the loss in the user's units.
        Integer inputs (token ids) and label-like targets (0/1, ±1, probabilities) are left
        as they are.

        Args:
            sample: batches to measure the statistics on.
            inputs: standardise the inputs (when floating point).
            targets: standardise the targets (when regression-like).
            lr_scale: also multiply every group's LR by this.

        Returns:
            The trial, or None when there is nothing here to standardise.
        """
        from ..fixes.data import Standardizer

        xs, ys = [b[0] for b in sample], [b[1] for b in sample]
        do_x = inputs and all(x.is_floating_point() for x in xs) and \
            len({x.dim() for x in xs}) == 1
        do_y = targets and _regression_like(ys) and len({y[0].numel() for y in ys}) == 1
        if not (do_x or do_y):
            return None
        kwargs: dict[str, Any] = {}
        if do_x:
            mean, std = _input_moments(xs, feature_dim(self.model, xs[0]))
            kwargs["prepare"] = Standardizer(mean, std).wrap
        if do_y:
            # (one mean and std per target element, as for the inputs' features)
            y_mean, y_std = _input_moments([y.reshape(len(y), -1) for y in ys], 1)

            def fwd(y: Tensor) -> Tensor:
                mu, sd = y_mean.to(y.device), y_std.to(y.device)
                return ((y.reshape(len(y), -1) - mu) / sd).reshape(y.shape).to(y.dtype)

            def back(out: Any, y: Tensor) -> Any:
                fit = _fit(out, y)
                if fit is None:  # (nothing predicts y: the loss is left in trained units)
                    return out
                path, pred, _ = fit
                mu, sd = y_mean.to(pred.device), y_std.to(pred.device)
                flat_p = pred.reshape(len(pred), -1)
                return _replace(out, path, (flat_p * sd + mu).reshape(pred.shape).to(pred.dtype))

            kwargs["targets"], kwargs["outputs"] = fwd, back
        what = " and ".join(w for w, on in (("inputs", do_x), ("targets", do_y)) if on)
        if lr_scale is not None:
            kwargs["lr_scale"] = lr_scale
            return self._run(f"{what} standardised, {self.lr_label(lr_scale)}", **kwargs)
        return self._run(f"{what} standardised", **kwargs)

    def lr_label(self, factor: float) -> str:
        """A trial's name at the user's LR(s) times ``factor``."""
        if len(set(self.user_lrs)) == 1:
            return f"LR {self.user_lr * factor:.3g}"
        return f"LRs ×{factor:.3g}"

    def scaled_lr(self, factor: float) -> Trial:
        """The user's setup with every group's LR times ``factor``."""
        return self._run(self.lr_label(factor), lr_scale=factor)
