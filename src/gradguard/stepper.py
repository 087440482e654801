"""Run ``optimizer.step()`` under a device-side skip flag, without a host sync.

Three strategies, picked per optimizer and device:

``host``
    Parameters on the CPU: the flag is read on the host and ``optimizer.step()`` is
    called or not. On a CPU that read is free (there is no device to wait for), and the
    user's optimizer runs exactly as they built it, so a step the guard does not skip is
    bit-for-bit the unguarded step. (Switching to a fused kernel changes the rounding, and
    in a chaotic run — a BN network at a high LR, an RNN — that alone sends the run down
    another path.)

``found_inf``
    Optimizers that implement PyTorch's AMP contract (``_step_supports_amp_scaling``,
    i.e. the fused Adam/AdamW/SGD/Adagrad kernels) read ``optimizer.found_inf`` and leave
    parameters, moments and step counters untouched when it is non-zero. This is the
    path ``torch.amp.GradScaler`` uses; it costs nothing extra. gradguard switches
    torch's own Adam/AdamW/SGD/Adagrad to ``fused=True`` when the user left both
    ``fused`` and ``foreach`` unset and the parameters allow it.

``masked``
    Any other optimizer on an accelerator: parameters and tensor state are copied before
    the step and put back with ``torch.where(skip, saved, new)`` after it. Exact for every
    optimizer whose state is tensors; one extra read and write of parameters and state per
    step. torch's optimizers keep their step counters on the CPU beside accelerator
    parameters unless built ``capturable=True``; gradguard switches that on where torch
    supports it (CUDA, XPU, HPU, XLA; not MPS) for torch's own optimizers (the same
    update with those scalars on the device), since a CPU counter can only be put back by
    reading the flag on the host. An optimizer with such state and no capturable mode
    (Adagrad and Adafactor on CUDA, or Python numbers in a third-party optimizer's state)
    is stepped on a host read of the flag, a device sync each step, with one warning.

A step that creates optimizer state lazily (usually the first) ends with one host read
of the flag: a skipped first step must leave no state behind, and the fused SGD kernel
would otherwise leave its momentum buffer uninitialised.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .distributed import local_tensor
from .errors import ConfigError, GuardUsageError

__all__ = ["Stepper"]

log = logging.getLogger("gradguard")

# "auto" takes the host strategy when every parameter is on the CPU. The test suite sets
# this False so that the accelerator strategies, which CI has no accelerator to run, are
# exercised on the CPU (tests of the CPU behaviour set it back).
HOST_ON_CPU = True

_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
STRATEGIES = ("auto", "found_inf", "masked", "host")


def _set(st: dict[str, Any], key: str, value: Any, switches: _Switches | None) -> None:
    if switches is None:
        st[key] = value
    else:
        switches.replace(st, key, value)


def _fuse_blocker(optimizer: torch.optim.Optimizer) -> str | None:
    """Why a torch Adam/AdamW/SGD/Adagrad cannot be switched to its fused kernel (for a
    message), or None when it can."""
    name = type(optimizer).__name__
    if type(optimizer) not in _FUSABLE:
        return f"{name} does not"
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    if isinstance(optimizer, torch.optim.Adagrad):
        devices = {"cpu"}  # torch's fused Adagrad has no CUDA kernel
    for group in optimizer.param_groups:
        if group.get("fused") is not None or group.get("foreach") is not None:
            return f"{name} was built with its own fused=/foreach= choice, which the guard keeps"
        if group.get("differentiable") or group.get("capturable"):
            return f"{name} is in capturable or differentiable mode"
        for p in group["params"]:
            if p.is_complex():
                return f"{name} has complex parameters, which torch's fused kernels do not take"
            if not torch.is_floating_point(p):
                return f"{name} has parameters that are not floating point"
            if p.device.type not in devices:
                return f"{name}'s parameters are on {p.device.type}, with no fused kernel there"
            if _is_dtensor(p):  # leave sharded optimizers as the user built them
                return f"{name} has sharded (DTensor) parameters, which the guard leaves as built"
            if isinstance(optimizer, torch.optim.SGD) and p.device.type == "cpu" \
                    and not _fused_sgd_moves(p.dtype):
                return (f"torch's fused SGD kernel on a CPU leaves {p.dtype} parameters "
                        "unchanged (measured on this torch)")
    return None


@functools.cache
def _fused_sgd_moves(dtype: torch.dtype) -> bool:
    """Whether torch's fused SGD on a CPU updates parameters of ``dtype``: torch 2.13's
    vectorised loop leaves float16 and bfloat16 ones as they were (a tensor of 16 or more
    elements), so it is tried once per dtype, on a tensor long enough to take that loop
    and its scalar tail."""
    p = torch.ones(1031, dtype=dtype)
    p.grad = torch.ones(1031, dtype=dtype)
    torch.optim.SGD([p], lr=0.5, fused=True).step()
    return bool((p == 0.5).all())


def _try_fuse(optimizer: torch.optim.Optimizer, switches: _Switches | None = None) -> bool:
    """Switch a torch Adam/AdamW/SGD/Adagrad to its fused kernel when the user left it open."""
    if _fuse_blocker(optimizer) is not None:
        return False
    for group in optimizer.param_groups:
        group["fused"] = True
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st and isinstance(st.get("step"), Tensor):
                # Fused kernels keep the step counter on the parameter's device in fp32.
                _set(st, "step", st["step"].to(device=p.device, dtype=torch.float32), switches)
    optimizer._step_supports_amp_scaling = True  # type: ignore[attr-defined]
    log.info("gradguard: switched %s to fused=True so skipped steps need no host sync",
             type(optimizer).__name__)
    return True


def _capturable_devices() -> set[str]:
    try:
        from torch.optim.optimizer import _get_capturable_supported_devices
    except ImportError:  # torch < 2.4 hard-coded the list
        return {"cuda", "xla"}
    return set(_get_capturable_supported_devices())


def _try_capturable(optimizer: torch.optim.Optimizer,
                    switches: _Switches | None = None) -> bool:
    """Keep a masked torch optimizer's step counters on its parameters' device.

    torch's non-fused optimizers keep ``step`` (and NAdam's ``mu_product``) as CPU scalars
    beside accelerator parameters unless built with ``capturable=True``, and some read
    their state on the host inside the step (ASGD's ``.item()`` calls); a CPU tensor
    cannot be put back with a device-side ``torch.where``, so each masked step would read
    the skip flag on the host (a device sync). ``capturable=True`` (the CUDA-graph mode)
    is the same update with those scalars on the device. Only torch's own optimizers
    (their subclasses and third-party look-alikes may keep state on the CPU on purpose),
    and not fused ones (their kernels take the flag themselves).
    """
    if not type(optimizer).__module__.startswith("torch.optim"):
        return False
    groups = optimizer.param_groups
    if not groups or any("capturable" not in g for g in groups):
        return False  # not one of torch's capturable optimizers
    if all(g["capturable"] for g in groups):
        return False
    devices = _capturable_devices()
    for group in groups:
        if group.get("differentiable") or group.get("fused"):
            return False
        for p in group["params"]:
            if p.device.type not in devices or _is_dtensor(p):
                return False
    for group in groups:
        group["capturable"] = True
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if isinstance(v, Tensor) and v.device != p.device:
                    # As torch's own load_state_dict places state for capturable groups.
                    _set(st, k, v.to(p.device, torch.float32) if k == "step"
                         else v.to(p.device), switches)
    log.info("gradguard: switched %s to capturable=True so skipped steps need no host sync "
             "(its step can be slower that way: RAdam 5-7x on an H200; skip_strategy='host', "
             "one host read per step, was the faster guarded step there, see OVERHEAD.md)",
             type(optimizer).__name__)
    return True


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # builds without distributed support
        return False
    return isinstance(t, DTensor)


def _on_cpu(optimizer: torch.optim.Optimizer) -> bool:
    return all(p.device.type == "cpu" for g in optimizer.param_groups for p in g["params"])


class _Switches:
    """What choosing a strategy changed in the user's optimizer (the fused and capturable
    flags, state entries it replaced, the AMP-scaling marker), to put back."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.groups = [{k: g[k] for k in ("fused", "capturable") if k in g}
                       for g in optimizer.param_groups]
        self.marked = "_step_supports_amp_scaling" in vars(optimizer)
        # (state dict, key, the value it held): only the entries a switch replaced.
        self.replaced: list[tuple[dict[str, Any], str, Any]] = []

    def replace(self, st: dict[str, Any], key: str, value: Any) -> None:
        self.replaced.append((st, key, st[key]))
        st[key] = value

    def undo(self) -> None:
        opt = self.optimizer
        for group, saved in zip(opt.param_groups, self.groups, strict=False):
            for k in ("fused", "capturable"):
                if k in saved:
                    group[k] = saved[k]
                else:
                    group.pop(k, None)
        for st, key, old in reversed(self.replaced):
            st[key] = old
        if not self.marked:
            vars(opt).pop("_step_supports_amp_scaling", None)


class Stepper:
    """Steps an optimizer, or leaves it exactly as it was when ``skip`` is true.

    Args:
        optimizer: the user's optimizer.
        strategy: "auto" (see the module docstring), "found_inf", "masked" or "host".
        watched: the parameters the guard watches (default: all the optimizer's). A
            skipped step leaves the others as they were too: the optimizer steps every
            parameter with a gradient, watched or not.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, strategy: str = "auto",
                 watched: Sequence[Tensor] | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"skip_strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.optimizer = optimizer
        self._switches: _Switches | None = _Switches(optimizer)
        supports = getattr(optimizer, "_step_supports_amp_scaling", False)
        if strategy == "auto":
            if supports:  # the user's own fused kernel: nothing is switched
                strategy = "found_inf"
            elif HOST_ON_CPU and _on_cpu(optimizer):
                strategy = "host"
            else:
                strategy = "found_inf" if _try_fuse(optimizer, self._switches) else "masked"
        elif strategy == "found_inf" and not supports and not _try_fuse(optimizer,
                                                                        self._switches):
            raise ConfigError(
                f"skip_strategy='found_inf' needs an optimizer that reads `found_inf` (torch's "
                f"fused Adam/AdamW/SGD/Adagrad); {_fuse_blocker(optimizer)}. Use "
                "skip_strategy='masked' or 'auto'."
            )
        if strategy == "masked":
            _try_capturable(optimizer, self._switches)
        self.strategy = strategy
        self._groups = len(optimizer.param_groups)
        # Set when groups were adopted (see _adopt_groups); the host takes it back.
        self.groups_changed = False
        self._warned_host = False
        self._saved: list[Tensor] | None = None
        self._saved_keys: list[tuple[int, str]] = []
        # The parameters (ids) of the last step that found every one of them with state,
        # and the state's size then: while both repeat, lazy creation is over. (A count
        # alone is not enough: another subset of the same size may have no state yet.)
        self._settled: tuple[tuple[int, ...], int] | None = None
        self._watched = None if watched is None else {id(p) for p in watched}
        self._others = self._unwatched()

    def _unwatched(self) -> list[Tensor]:
        """The optimizer's parameters the guard does not watch (frozen when it was built,
        outside ``params=``, or in a group added since)."""
        if self._watched is None:
            return []
        return [p for g in self.optimizer.param_groups for p in g["params"]
                if id(p) not in self._watched]

    def undo(self) -> None:
        """Put back what choosing the strategy changed in the optimizer (a guard whose
        construction failed must leave it as the user built it)."""
        if self._switches is not None:
            self._switches.undo()
            self._switches = None

    def commit(self) -> None:
        """The guard is built: forget the old values (they would keep replaced state
        tensors alive)."""
        self._switches = None

    # -- state bookkeeping -------------------------------------------------------------
    def _stateless(self, params: Sequence[Tensor]) -> list[Tensor]:
        state = self.optimizer.state
        return [p for p in params if not state.get(p)]

    def _drop_new_state(self, fresh: Sequence[Tensor], skip: Tensor) -> None:
        """After a step that created state: drop that state if the step was skipped."""
        state = self.optimizer.state
        created = [p for p in fresh if state.get(p)]
        if created and bool(skip):  # the one host read: only on state-creating steps
            for p in created:
                del state[p]

    # -- the step ----------------------------------------------------------------------
    def step(self, params: Sequence[Tensor], skip: Tensor, scale: Tensor | None = None
             ) -> None:
        """``optimizer.step()`` unless ``skip`` (0-dim bool tensor) is true.

        Args:
            params: the parameters that have gradients this step.
            skip: the decision; read on the device, never on the host (except on a
                state-creating step, see module docs).
            scale: a 0-dim factor for every gradient, not yet applied; only the
                "found_inf" strategy takes one (the fused kernel applies it).
        """
        if len(self.optimizer.param_groups) != self._groups:
            self._adopt_groups()
            self._others = self._unwatched()
        if extra := [p for p in self._others if p.grad is not None]:
            params = [*params, *extra]  # (stepped too: skipped or restored with the rest)
        key = (tuple(map(id, params)), len(self.optimizer.state))
        fresh = [] if key == self._settled else self._stateless(params)
        if self.strategy == "found_inf":
            if fresh:
                self._complete_momentum()
            self._step_found_inf(skip, scale)
        elif self.strategy == "host":
            self._step_host_decided(skip)
        else:
            self._step_masked(params, skip)
        if fresh:
            self._drop_new_state(fresh, skip)
        elif self.optimizer.state:
            self._settled = key

    def _adopt_groups(self) -> None:
        """Give parameter groups added after the guard was built (``add_param_group``)
        the kernel flag the strategy set on the others: a group added later gets the
        optimizer's defaults, and torch's non-fused kernels refuse ``found_inf``."""
        opt = self.optimizer
        groups = opt.param_groups
        flag = {"found_inf": "fused", "masked": "capturable"}.get(self.strategy)
        if flag is not None and groups[0].get(flag):
            for group in groups[self._groups:]:
                if group.get(flag):
                    continue
                if flag == "fused" and group.get("foreach"):
                    raise GuardUsageError(
                        f"a parameter group added to the {type(opt).__name__} after the "
                        "guard was built asks for foreach=True, but the guard steps this "
                        "optimizer with its fused kernel (fused=True) to skip steps without "
                        "a host sync: add the group without foreach, or build the guard "
                        "with skip_strategy='masked'")
                group[flag] = True
        self._groups = len(groups)
        self._settled = None
        self.groups_changed = True

    def _complete_momentum(self) -> None:
        """Give fused SGD a momentum buffer for parameters stepped for the first time.

        Fused SGD takes one first-step flag per param group and fails on a group where
        some parameters have buffers and some do not (a parameter whose first gradient
        comes later, e.g. a branch used only sometimes). The buffer given makes the
        kernel's ``mu * buf + (1 - dampening) * g`` equal ``g``, torch's first-step value.
        """
        opt = self.optimizer
        if not isinstance(opt, torch.optim.SGD):
            return
        for group in opt.param_groups:
            mu, damp = group["momentum"], group["dampening"]
            if mu == 0 or not group.get("fused"):
                continue
            stepped = [p for p in group["params"] if p.grad is not None]
            missing = [p for p in stepped if opt.state.get(p, {}).get("momentum_buffer") is None]
            if not missing or len(missing) == len(stepped):
                continue  # all or none have buffers: the kernel handles both
            for p in missing:
                g = p.grad.detach()
                if damp:
                    g = (-g if group["maximize"] else g) + group["weight_decay"] * p.detach()
                    buf = g * (damp / mu)
                else:
                    buf = torch.zeros_like(g)
                opt.state[p]["momentum_buffer"] = buf

    def _step_found_inf(self, skip: Tensor, scale: Tensor | None = None) -> None:
        opt = self.optimizer
        # The kernel divides every gradient by grad_scale (GradScaler's unscale), before
        # using it and in the stored .grad: a pending clip factor rides along.
        opt.grad_scale = None if scale is None else torch.reciprocal(  # type: ignore[attr-defined]
            scale.float())
        opt.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
        try:
            opt.step()
        finally:
            del opt.grad_scale  # type: ignore[attr-defined]
            del opt.found_inf  # type: ignore[attr-defined]

    def _tracked(self, params: Sequence[Tensor]) -> tuple[list[Tensor], list[tuple[int, str]]]:
        """Parameters and every tensor in their optimizer state, with keys to detect changes."""
        tensors: list[Tensor] = list(params)
        keys: list[tuple[int, str]] = [(id(p), "") for p in params]
        host: list[tuple[int, str]] = []
        for p in params:
            for k, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor):
                    tensors.append(v)
                    keys.append((id(p), k))
                elif v is not None:
                    host.append((id(p), k))
        return tensors, keys + [(-1, f"host:{k}") for _, k in host]

    def _step_masked(self, params: Sequence[Tensor], skip: Tensor) -> None:
        tensors, keys = self._tracked(params)
        # Save and restore this rank's shards: DTensor has no sharding rule for the foreach
        # copy, and the local tensors share storage with the DTensors the optimizer updates.
        tensors = [local_tensor(t) for t in tensors]
        n = len(params)
        # The state entries the device cannot put back: Python numbers, and tensors on
        # another device (keys[n:len(tensors)] name tensors[n:]; host keys come after).
        stuck = [k for (_, k), t in zip(keys[n:len(tensors)], tensors[n:], strict=True)
                 if t.device != skip.device] + [k[5:] for i, k in keys if i == -1]
        if stuck:
            # State the device cannot restore (Python numbers, or tensors on another device,
            # e.g. Adagrad's CPU step counter beside CUDA params): decide on the host.
            if skip.device.type != "cpu" and _try_capturable(self.optimizer):
                # A state loaded after the guard was built (a resume from an unguarded
                # run's checkpoint) brought capturable=False and CPU counters back.
                self._step_masked(params, skip)
                return
            if skip.device.type != "cpu" and not self._warned_host:
                self._warned_host = True
                log.warning(
                    "gradguard: %s keeps optimizer state the device cannot put back (%s: "
                    "Python numbers, or tensors on another device than %s), so every "
                    "guarded step waits for the device to read the skip flag. torch's "
                    "Adam/AdamW/SGD with fused kernels skip on the device.",
                    type(self.optimizer).__name__, ", ".join(sorted(set(stuck))),
                    skip.device)
            self._step_host_decided(skip)
            return
        if self._saved is None or keys != self._saved_keys:
            self._saved = [t.detach().clone() for t in tensors]
            self._saved_keys = keys
        else:
            torch._foreach_copy_(self._saved, [t.detach() for t in tensors])
        self.optimizer.step()
        with torch.no_grad():
            for t, s in zip(tensors, self._saved, strict=True):
                torch.where(skip, s, t, out=t)

    def _step_host_decided(self, skip: Tensor) -> None:
        # A host read: free on a CPU; on an accelerator only for state the device cannot
        # restore (see _step_masked).
        if not bool(skip):
            self.optimizer.step()

