"""The remedies the bench compares, each a named recipe applied to a scenario's run.

Peer packages are used the way their users use them (called between ``backward`` and
``optimizer.step()``), not reimplemented; the remedies that are not clippers change the
model, the optimizer, the schedule, the batch, the data or the loss.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..clip import AGC, Centralize, Normalize
from ..control import Stability
from ..errors import UnknownNameError
from ..guard import Guard
from ..respond import Policy
from ..scenarios import Scenario, Setup

__all__ = ["REMEDIES", "Remedy", "get"]

Optimizer = torch.optim.Optimizer
Clipper = Callable[[nn.Module, Optimizer], Callable[[], None]]
GuardFactory = Callable[[nn.Module, Optimizer, "torch.amp.GradScaler | None", "Path | None"],
                        Guard]
OptFactory = Callable[[Scenario, Setup, Iterable[nn.Parameter], float], Optimizer]
Schedule = Callable[[Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


@dataclass(frozen=True)
class Remedy:
    """One named configuration of a run; unset fields leave the scenario as it is.

    Attributes:
        name: CLI and table name.
        summary: one line for tables.
        kind: "baseline", "peer" (another package), "gradguard", or what a remedy that is
            not a clipper changes: "init", "schedule", "batch", "optimizer", "weights",
            "architecture", "data", "loss" or "gradient".
        fix_model: changes the freshly built model in place (before the optimizer exists).
        optimizer: builds the optimizer instead of the scenario's own.
        batch_scale: multiplies the scenario's batch size.
        accum: micro-batches accumulated per optimizer step.
        schedule: ``(optimizer, steps) -> scheduler`` stepped once per optimizer step.
        clipper: ``(model, optimizer) -> hook`` called between backward and the step.
        guard: ``(model, optimizer, scaler, log) -> Guard`` replacing ``optimizer.step()``.
        needs: a Python package the remedy imports (the bench skips it, saying so, when absent).
        fix_setup: ``(scenario, setup) -> None`` changes the freshly built setup in place
            (wraps the model, replaces the loss) when a fix needs the data or the loss.
    """

    name: str
    summary: str
    kind: str
    fix_model: Callable[[nn.Module], object] | None = None
    optimizer: OptFactory | None = None
    batch_scale: int = 1
    accum: int = 1
    schedule: Schedule | None = None
    clipper: Clipper | None = None
    guard: GuardFactory | None = None
    needs: str | None = None
    fix_setup: Callable[[Scenario, Setup], None] | None = None

    def available(self) -> bool:
        return self.needs is None or importlib.util.find_spec(self.needs) is not None


def _clip_norm(model: nn.Module, _opt: Optimizer) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)


def _clip_value(model: nn.Module, _opt: Optimizer) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda: torch.nn.utils.clip_grad_value_(params, 1.0)


def _zclip(model: nn.Module, _opt: Optimizer) -> Callable[[], None]:
    from zclip import ZClip

    z = ZClip()  # the package's defaults: alpha 0.97, z 2.5, 25 warm-up steps
    return lambda: z.step(model)


def _autoclip(model: nn.Module, _opt: Optimizer) -> Callable[[], None]:
    from autoclip.torch import QuantileClip

    c = QuantileClip(model.parameters(), quantile=0.9, history_length=1000)
    return c.step


def _guard(clip: Callable[[], object] | None = None,
           policy: Callable[[], Policy] | None = None, **kwargs: object) -> GuardFactory:
    """A guard factory; ``clip`` and ``policy`` build fresh objects per guard (state)."""

    def make(model: nn.Module, opt: Optimizer, scaler: torch.amp.GradScaler | None,
             log: Path | None) -> Guard:
        extra: dict[str, object] = {} if clip is None else {"clip": clip()}
        if policy is not None:
            extra["policy"] = policy()
        return Guard(model, opt, scaler=scaler, log=log, **extra, **kwargs)  # type: ignore[arg-type]

    return make


def _CLIP_ONLY() -> Policy:
    """NaN/Inf steps skipped, nothing else: no spike response, no LR control, no rollback,
    so a row measures its clip transform (or nothing) alone."""
    return Policy(on_spike="none", on_loss_spike="none", stability=None, rollback=None)


def _reinit(model: nn.Module) -> object:
    from ..fixes import reinit

    return reinit(model, "auto", force=True)


def _swap_optimizer(scn: Scenario, _setup: Setup, params: Iterable[nn.Parameter],
                    lr: float) -> Optimizer:
    if scn.optimizer == "adam":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def _weight_decay(scn: Scenario, setup: Setup, params: Iterable[nn.Parameter],
                  lr: float) -> Optimizer:
    opt = setup.make_optimizer(params, lr)
    # L2 for SGD at a usual ImageNet-style strength; decoupled decay at GPT-style strength.
    wd = 0.1 if scn.optimizer == "adam" else 1e-3
    for group in opt.param_groups:
        group["weight_decay"] = wd
    return opt


def _warmup_cosine(opt: Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warm = max(1, steps // 10)
    return SequentialLR(opt, [LinearLR(opt, start_factor=0.01, total_iters=warm),
                              CosineAnnealingLR(opt, T_max=max(1, steps - warm))],
                        milestones=[warm])


_LIST = [
    Remedy("none", "no remedy: the scenario as it is", "baseline"),
    Remedy("clip-norm", "torch clip_grad_norm_(max_norm=1.0)", "peer", clipper=_clip_norm),
    Remedy("clip-value", "torch clip_grad_value_(clip_value=1.0)", "peer", clipper=_clip_value),
    Remedy("zclip", "zclip package ZClip() defaults (z-score, adaptive)", "peer",
           clipper=_zclip, needs="zclip"),
    Remedy("autoclip", "autoclip package QuantileClip(quantile=0.9)", "peer",
           clipper=_autoclip, needs="autoclip"),
    Remedy("agc", "gradguard AGC(λ=0.01) alone (Brock et al. 2021), non-finite skip",
           "gradguard", guard=_guard(clip=AGC, policy=_CLIP_ONLY)),
    Remedy("skip-nonfinite", "skip steps with NaN/Inf only (optax apply_if_finite); the "
           "placebo: the guard's kernels, nothing done on a healthy step", "gradguard",
           guard=_guard(clip=list, policy=_CLIP_ONLY)),
    Remedy("gradguard", "gradguard default Guard(model, opt)", "gradguard", guard=_guard()),
    Remedy("gradguard-no-rollback", "gradguard default with rollback off: the stability "
           "controller lowers the LR in place", "gradguard", guard=_guard(rollback=False)),
    Remedy("gradguard-warmup", "gradguard default + Stability(warmup='auto'): linear warm-up "
           "over 2/(1-β2) steps for Adam-family optimizers", "gradguard",
           guard=_guard(policy=lambda: Policy(stability=Stability(warmup="auto")))),
    Remedy("reinit", "gg.fixes.reinit(model, 'auto'): Kaiming/Xavier by activation", "init",
           fix_model=_reinit),
    Remedy("warmup-cosine", "LR warm-up (10% of steps) then cosine decay", "schedule",
           schedule=_warmup_cosine),
    Remedy("accum-4", "gradient accumulation over 4 micro-batches", "batch", accum=4),
    Remedy("batch-x4", "4× larger batches", "batch", batch_scale=4),
    Remedy("weight-decay", "weight decay (SGD 1e-3, AdamW 0.1)", "optimizer",
           optimizer=_weight_decay),
    Remedy("swap-optimizer", "Adam instead of SGD (SGD+momentum instead of Adam), same LR",
           "optimizer", optimizer=_swap_optimizer),
]


# -- gradguard.fixes: model-, data- and loss-side remedies -----------------------------
# A fix that does not apply to a scenario (Huber on a classifier, standardising token ids)
# leaves it as it is: that row then measures the scenario unchanged, and says so here.


def _max_norm_guard(model: nn.Module, opt: Optimizer, scaler: torch.amp.GradScaler | None,
                    log: Path | None) -> Guard:
    from ..fixes import MaxNorm

    # No clipping and no spike response: the row measures the constraint (NaN/Inf steps
    # are still skipped, as in skip-nonfinite).
    return Guard(model, opt, clip=[], policy=_CLIP_ONLY(), scaler=scaler, log=log,
                 after_step=MaxNorm(model, 2.0))


def _standardize(_scn: Scenario, setup: Setup) -> None:
    from ..fixes import Standardizer

    x, _ = next(setup.data(setup.batch_size))
    if not torch.is_floating_point(x):
        return  # token ids (lm-char): nothing to standardise
    # 3-D inputs of the built-in scenarios are (batch, time, features) sequences.
    std = Standardizer.fit(setup.data(setup.batch_size), dim=-1 if x.dim() == 3 else 1,
                           max_batches=16)
    setup.model = std.wrap(setup.model)  # regression outputs get the target mean added


def _huber(_scn: Scenario, setup: Setup) -> None:
    from ..fixes import robust_loss

    if setup.loss_fn is torch.nn.functional.mse_loss:  # regression only
        setup.loss_fn = robust_loss("huber", delta=1.0)


def _z_loss(scn: Scenario, setup: Setup) -> None:
    from ..fixes import with_z_loss

    # classifiers: logits with classes in the last dim
    if scn.metric == "accuracy" or setup.loss_fn is torch.nn.functional.cross_entropy:
        setup.loss_fn = with_z_loss(setup.loss_fn, 1e-4)


def _weight_norm(model: nn.Module) -> object:
    from ..fixes import weight_norm

    return weight_norm(model)


def _prune_20(model: nn.Module) -> object:
    from ..fixes import prune

    return prune(model, 0.2)


def _smooth(model: nn.Module) -> object:
    from ..fixes import swap_activations

    return swap_activations(model, "smooth")  # functional activations: a no-op, reported


_LIST += [
    Remedy("standardize-inputs", "gg.fixes.Standardizer: inputs (and regression targets' "
           "mean) from 16 training batches", "data", fix_setup=_standardize),
    Remedy("max-norm", "gg.fixes.MaxNorm(model, 2.0) after every step, via Guard(after_step=), "
           "no clipping", "weights", guard=_max_norm_guard),
    Remedy("weight-norm", "gg.fixes.weight_norm(model): w = g·v/‖v‖ on every Linear/Conv",
           "weights", fix_model=_weight_norm),
    Remedy("prune-20", "gg.fixes.prune(model, 0.2): 20% smallest |w| per layer masked",
           "weights", fix_model=_prune_20),
    Remedy("smooth-activations", "gg.fixes.swap_activations(model, 'smooth'): ReLU → SiLU "
           "(activation modules only)", "architecture", fix_model=_smooth),
    Remedy("huber-loss", "nn.HuberLoss(delta=1) instead of MSE (regression scenarios only)",
           "loss", fix_setup=_huber),
    Remedy("z-loss", "gg.fixes.with_z_loss(loss_fn, 1e-4) (classification scenarios only)",
           "loss", fix_setup=_z_loss),
    Remedy("normalize", "gradient standardisation: gg.clip.Centralize() + Normalize(1.0)",
           "gradient", guard=_guard(clip=lambda: [Centralize(), Normalize(1.0)],
                                    policy=_CLIP_ONLY)),
]

REMEDIES: dict[str, Remedy] = {r.name: r for r in _LIST}


def get(name: str) -> Remedy:
    """Look a remedy up by name, with the list of names in the error."""
    if name not in REMEDIES:
        raise UnknownNameError(f"unknown remedy {name!r}; choose from {', '.join(REMEDIES)}")
    return REMEDIES[name]
