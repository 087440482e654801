"""Guard: the drop-in for ``optimizer.step()``: stats → clip → decide → step → record.

Everything on the per-step path stays on the device; the only host reads are the ones
documented in :mod:`gradguard.stepper` (a state-creating first step) and in the
recorder's periodic flush.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .clip import ClipContext, Transform, ZScore, chain
from .errors import ConfigError, GuardUsageError
from .stats import GradStats, collect_grads, compute_stats
from .stepper import Stepper

__all__ = ["Guard", "StepInfo"]

STATE_VERSION = 1


@dataclass(frozen=True)
class StepInfo:
    """What one ``guard.step`` saw and did. Tensors stay on the device; read them lazily.

    Attributes:
        step: index of this call (0-based, counts skipped steps too).
        loss: the loss passed to ``step`` (detached), or None.
        grad_norm: global gradient norm before any transform.
        clipped_norm: global gradient norm after the transforms.
        skipped: 0-dim bool, True when the optimizer step was not applied.
        nonfinite: 0-dim bool, True when the gradients or the loss had NaN/Inf.
        norms: per-parameter-tensor gradient norms before the transforms.
    """

    step: int
    loss: Tensor | None
    grad_norm: Tensor
    clipped_norm: Tensor
    skipped: Tensor
    nonfinite: Tensor
    norms: Tensor

    @property
    def clip_coef(self) -> Tensor:
        """clipped_norm / grad_norm (1 when nothing was clipped)."""
        return torch.where(self.grad_norm > 0, self.clipped_norm / self.grad_norm, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """Host copy of the scalars (this synchronises; call it off the hot path)."""
        out: dict[str, Any] = {"step": self.step}
        for k in ("loss", "grad_norm", "clipped_norm"):
            v = getattr(self, k)
            out[k] = None if v is None else float(v.detach().float().cpu())
        out["clip_coef"] = float(self.clip_coef.cpu())
        out["skipped"] = bool(self.skipped.cpu())
        out["nonfinite"] = bool(self.nonfinite.cpu())
        return out


def _resolve_params(
    model: nn.Module | None, optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None,
) -> tuple[list[str], list[Tensor]]:
    """The parameters the guard watches, with names, in model (≈ forward) order."""
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_ids = {id(p) for p in opt_params}
    if not opt_params:
        raise ConfigError("the optimizer has no parameters; build it with model.parameters()")
    names: list[str] = []
    chosen: list[Tensor] = []
    if params is not None:
        wanted = list(params)
        missing = [i for i, p in enumerate(wanted) if id(p) not in opt_ids]
        if missing:
            raise ConfigError(
                f"params #{missing[:5]} are not in the optimizer; the guard can only skip "
                "steps of parameters the optimizer updates"
            )
        lookup = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        for i, p in enumerate(wanted):
            names.append(lookup.get(id(p), f"param{i}"))
            chosen.append(p)
        return names, chosen
    if model is not None:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        foreign = [n for n, p in trainable if id(p) not in opt_ids]
        if foreign and len(foreign) == len(trainable):
            raise ConfigError(
                "none of the model's trainable parameters are in the optimizer: build the "
                "optimizer from this model's parameters "
                "(e.g. torch.optim.AdamW(model.parameters()))"
            )
        if foreign:
            raise ConfigError(
                f"{len(foreign)} trainable parameter(s) of the model are not in the optimizer "
                f"(first: {foreign[:3]}); freeze them (requires_grad_(False)), add them to the "
                "optimizer, or pass params= to guard a subset"
            )
        seen: set[int] = set()
        for n, p in trainable:
            seen.add(id(p))
            names.append(n)
            chosen.append(p)
        for gi, g in enumerate(optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                if id(p) not in seen and p.requires_grad:
                    names.append(f"group{gi}.param{pi}")
                    chosen.append(p)
        return names, chosen
    for gi, g in enumerate(optimizer.param_groups):
        for pi, p in enumerate(g["params"]):
            names.append(f"group{gi}.param{pi}")
            chosen.append(p)
    return names, chosen


class Guard:
    """Replaces ``optimizer.step()``: measures, clips, and skips bad steps without host syncs.

    Example::

        guard = gg.Guard(model, optimizer)             # default: ZClip-style z-score clip
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            info = guard.step(loss)                    # instead of optimizer.step()

    Args:
        model: the module being trained (names parameters for reports); may be None when
            ``params`` or the optimizer's own parameters are enough.
        optimizer: the user's optimizer. torch's Adam/AdamW/SGD/Adagrad left at their
            default implementation are switched to ``fused=True`` so a skipped step needs no
            host sync (see :mod:`gradguard.stepper`; ``skip_strategy="masked"`` opts out).
        clip: a transform, a list of transforms (chained), or None for the default
            ``ZScore()``; pass ``[]`` for no clipping.
        scaler: a ``torch.amp.GradScaler``; the guard then unscales before measuring,
            steps through the scaler's inf checks and calls ``scaler.update()`` itself.
        skip_nonfinite: skip steps whose gradients or loss are NaN/Inf (default True).
        skip_strategy: "auto", "found_inf" or "masked" (see :mod:`gradguard.stepper`).
        params: guard only these parameters (default: all trainable ones).
    """

    def __init__(
        self,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer,
        clip: Transform | Sequence[Transform] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        skip_nonfinite: bool = True,
        skip_strategy: str = "auto",
        params: Iterable[Tensor] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.skip_nonfinite = bool(skip_nonfinite)
        self.names, self.params = _resolve_params(model, optimizer, params)
        self.device = self.params[0].device
        if clip is None:
            clip = ZScore()
        elif not isinstance(clip, Transform):
            clip = chain(*clip)
        self.clip: Transform = clip
        self.clip.bind(self.names, self.params, self.device)
        self.stepper = Stepper(optimizer, skip_strategy)
        self.steps = 0
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)
        self._false = torch.zeros((), dtype=torch.bool, device=self.device)

    # -- the step ----------------------------------------------------------------------
    @staticmethod
    def _check_fresh_grads(grads: Sequence[Tensor]) -> None:
        # A gradient the guard already stepped carries the version it had then; backward()
        # either makes a new tensor or bumps the version by accumulating into it.
        if all(getattr(g, "_gradguard_version", None) == g._version for g in grads):
            raise GuardUsageError(
                "guard.step() was called twice on the same gradients: call loss.backward() "
                "(and optimizer.zero_grad()) between steps"
            )

    def _unscale(self) -> None:
        """Unscale AMP gradients once, before anything measures them."""
        from torch.amp.grad_scaler import OptState

        state = self.scaler._per_optimizer_states[id(self.optimizer)]  # type: ignore[union-attr]
        if state["stage"] is OptState.READY:
            self.scaler.unscale_(self.optimizer)  # type: ignore[union-attr]

    def step(self, loss: Tensor | None = None) -> StepInfo:
        """Measure, transform and apply (or skip) this step's gradients.

        Args:
            loss: this step's loss (unscaled); lets the guard skip on a non-finite loss.

        Returns:
            A :class:`StepInfo` of device tensors.
        """
        if self.scaler is not None and self.scaler.is_enabled():
            self._unscale()
        groups = collect_grads(self.params)
        if not groups.grads:
            raise GuardUsageError(
                "no guarded parameter has a gradient: call loss.backward() before "
                "guard.step(), and check the loss depends on the model's parameters"
            )
        self._check_fresh_grads(groups.grads)
        stats: GradStats = compute_stats(groups, self.device)
        nonfinite = stats.nonfinite
        loss_d = None
        if loss is not None:
            if not isinstance(loss, Tensor):
                raise GuardUsageError(
                    f"guard.step(loss) takes the loss tensor, got {type(loss).__name__}; pass "
                    "the tensor you called backward() on (no .item())"
                )
            loss_d = loss.detach()
            nonfinite = nonfinite | ~torch.isfinite(loss_d.to(self.device)).all()
        ctx = ClipContext(groups, stats, [self.names[i] for i in groups.index], ~nonfinite,
                          self.device)
        self.clip(ctx)
        clipped = ctx.global_norm
        ctx.flush()
        skip = nonfinite if self.skip_nonfinite else self._false
        self.stepper.step(groups.params, skip)
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.update()
        self.skipped.add_(skip.long())
        for g in groups.grads:
            g._gradguard_version = g._version  # type: ignore[attr-defined]
        info = StepInfo(self.steps, loss_d, stats.global_norm, clipped, skip, nonfinite,
                        stats.norms)
        self.steps += 1
        return info

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The guard's own state (not the model's or optimizer's), versioned."""
        return {
            "format": STATE_VERSION,
            "gradguard": __version__,
            "config": self._config(),
            "steps": self.steps,
            "skipped": self.skipped.detach().clone(),
            "clip": self.clip.state_dict(),
        }

    def _config(self) -> dict[str, Any]:
        return {"clip": repr(self.clip), "n_params": len(self.params),
                "skip_nonfinite": self.skip_nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output from an identically configured guard."""
        if not isinstance(state, dict) or "format" not in state:
            raise ConfigError("not a gradguard state dict (no 'format' key)")
        if state["format"] != STATE_VERSION:
            raise ConfigError(
                f"guard state format {state['format']} (gradguard {state.get('gradguard')}) "
                f"cannot be read by format {STATE_VERSION} (gradguard {__version__})"
            )
        if state["config"] != self._config():
            raise ConfigError(
                f"guard state was saved with config {state['config']}, this guard has "
                f"{self._config()}; build the guard with the same clip settings and parameters"
            )
        self.clip.load_state_dict(state["clip"])
        self.steps = int(state["steps"])
        self.skipped.copy_(state["skipped"])
