"""What the CLI's doctor needs: load a run to diagnose, apply fixes, re-run briefly.

A user script is named ``path/to/file.py:make_run``; ``make_run()`` must return
``(model, data, loss_fn, optimizer)`` where ``data`` is one ``(inputs, targets)`` batch or
an iterable of such batches (a DataLoader), ``loss_fn(model(inputs), targets)`` is the
loss, and ``optimizer`` is built over ``model.parameters()`` with the LR to check.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import scenarios
from ..errors import ConfigError, InputError, MissingFileError
from ..fixes.init import reinit
from ..scenarios.train import RunResult, train
from .findings import Diagnosis
from .lr_find import Batch, clone_optimizer, cycle_batches

__all__ = ["Run", "apply_fixes", "load_run", "rerun"]


@dataclass
class Run:
    """A model, its data, loss and optimizer: what the doctor examines."""

    name: str
    model: nn.Module
    data: Batch | Iterable[Batch]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    optimizer: torch.optim.Optimizer


def load_run(target: str, seed: int = 0) -> Run:
    """A built-in scenario name, or ``file.py:function`` returning the 4-tuple above
    (``file.py`` alone: its ``make_run``)."""
    if target in scenarios.SCENARIOS:
        run = scenarios.prepare(target, seed=seed)
        setup = run.setup
        stream = setup.data(setup.batch_size)
        first = [next(stream) for _ in range(32)]
        return Run(target, setup.model, first, setup.loss_fn, run.optimizer)
    if ":" not in target and target.endswith(".py"):
        target += ":make_run"  # (the README's name for it)
    if ":" not in target:
        raise ConfigError(
            f"{target!r} is neither a built-in scenario ({', '.join(scenarios.SCENARIOS)}) nor "
            "'path/to/file.py:make_run'"
        )
    path, func = target.rsplit(":", 1)
    file = Path(path)
    if not file.exists():
        raise MissingFileError(f"no such file: {file}")
    spec = importlib.util.spec_from_file_location(f"_gradguard_user_{file.stem}", file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    # The script's folder stays importable while make_run runs too, as under `python
    # file.py`: sibling modules are often imported inside the function that uses them.
    folder = str(file.parent.resolve())
    sys.path.insert(0, folder)
    try:
        # Registered before it runs, as `import` does: @dataclass (under `from __future__
        # import annotations`), typing.get_type_hints and pickle look the module up there.
        sys.modules[spec.name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(spec.name, None)
            raise
        if not hasattr(mod, func):
            raise AttributeError(f"{file} has no function {func!r}")
        out = getattr(mod, func)()
    finally:
        if folder in sys.path:  # (make_run may have taken it off itself)
            sys.path.remove(folder)
    if not (isinstance(out, tuple) and len(out) == 4):
        raise InputError(f"{func}() must return a 4-tuple (model, data, loss_fn, optimizer); "
                        f"got {type(out).__name__}" +
                        (f" of {len(out)}" if isinstance(out, tuple | list) else ""))
    model, data, loss_fn, opt = out
    if not isinstance(model, nn.Module) or not isinstance(opt, torch.optim.Optimizer):
        raise InputError(f"{func}() must return (nn.Module, data, loss_fn, torch.optim.Optimizer)")
    return Run(target, model, data, loss_fn, opt)


def apply_fixes(run: Run, diagnosis: Diagnosis) -> tuple[Run, list[str]]:
    """The safe fixes (re-initialisation, LR) that the doctor's trials confirmed, applied
    to copies of the run's model and optimizer.

    A fix is applied only when a training trial showed it helps (``evidence["confirmed"]``):
    a finding the trials cleared, or one never tested, proposes nothing to apply.

    Args:
        run: the user's run (left untouched).
        diagnosis: what :func:`gradguard.doctor.diagnose` concluded on it.

    Returns:
        The fixed copy and one line per fix applied.
    """
    model = copy.deepcopy(run.model)
    opt = clone_optimizer(run.optimizer, run.model, model)
    done: list[str] = []
    confirmed = [f for f in diagnosis.findings
                 if f.severity != "info" and f.evidence.get("confirmed") is True]
    if any("reinit" in f.fix_code for f in confirmed):
        rep = reinit(model, "auto")
        done.append(str(rep).splitlines()[0])
    for f in confirmed:
        if f.check != "learning_rate":
            continue
        before = [float(g["lr"]) for g in opt.param_groups]
        factor, new = f.evidence.get("lr_factor"), f.evidence.get("suggested_lr")
        if factor:  # (every group scaled alike: their ratios are the user's design)
            for g in opt.param_groups:
                g["lr"] = g["lr"] * factor
        elif new:
            for g in opt.param_groups:
                g["lr"] = new
        else:
            continue
        after = [float(g["lr"]) for g in opt.param_groups]
        if len(set(before)) == 1:
            done.append(f"learning rate {before[0]:.3g} → {after[0]:.3g}")
        else:
            done.append("learning rates " + ", ".join(f"{v:.3g}" for v in before) + " → "
                        + ", ".join(f"{v:.3g}" for v in after) + f" (×{factor:.3g})")
    return Run(run.name + " (fixed)", model, run.data, run.loss_fn, opt), done


def rerun(run: Run, steps: int = 200) -> RunResult:
    """Train a copy for ``steps`` steps (no guard) and report loss and gradient norms."""
    model = copy.deepcopy(run.model)
    opt = clone_optimizer(run.optimizer, run.model, model)
    res = train(model, opt, cycle_batches(run.data), run.loss_fn, steps)
    return res


def summary(res: RunResult) -> dict[str, Any]:
    finite = [g for g in res.grad_norms if math.isfinite(g)]
    return {"final_loss": res.losses[-1], "max_grad_norm": max(finite) if finite else math.inf,
            "diverged_at": res.diverged_at, "first_nonfinite": res.first_nonfinite}
