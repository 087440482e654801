"""What a skippable step costs on CUDA for optimizers without a fused kernel (issue 14).

The guard skips a step on the device. torch's non-fused optimizers keep their step
counters on the CPU beside CUDA parameters, which a device-side ``torch.where`` cannot
put back, so the guard switches them to ``capturable=True`` (counters on the device; see
``gradguard.stepper``). This script measures what that switch costs and what the
alternative, reading the skip flag on the host once per step (``skip_strategy="host"``),
costs instead:

1. ``optimizer.step()`` alone, gradients fixed, built ``capturable=False`` and ``True``
   (median of CUDA-event timings over 60 steps after 15 warm-up steps);
2. a whole training step (zero_grad, forward, backward, step): unguarded, guarded as the
   guard builds itself (``skip_strategy="auto"``: the capturable switch), and guarded
   with ``skip_strategy="host"`` (the optimizer as built, the flag read on the host).
   Timed back to back with one synchronisation at the end, the way a training loop runs
   (the best of 3 blocks of 20 steps), so the host read's stall is in the number.

A loop with no other host work (this one) hides little behind the GPU, so a host read
costs it least; a loop that loads data or logs on the main thread between steps loses
that overlap at every host read. Needs CUDA.

Usage::

    python benchmarks/skip_cost.py --out benchmarks/skip-cost-h200.md
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import overhead as O  # (the same models as the overhead benchmark)

import gradguard as gg

Factory = Callable[..., torch.optim.Optimizer]
OPTIMIZERS: dict[str, Factory] = {
    "RMSprop": lambda p, **k: torch.optim.RMSprop(p, lr=1e-4, **k),
    "NAdam": lambda p, **k: torch.optim.NAdam(p, lr=1e-4, **k),
    "RAdam": lambda p, **k: torch.optim.RAdam(p, lr=1e-4, **k),
    "Adamax": lambda p, **k: torch.optim.Adamax(p, lr=1e-4, **k),
    "Adadelta": lambda p, **k: torch.optim.Adadelta(p, lr=1e-4, **k),
    "Rprop": lambda p, **k: torch.optim.Rprop(p, lr=1e-4, **k),
    "ASGD": lambda p, **k: torch.optim.ASGD(p, lr=1e-4, **k),
    "Adam foreach=True": lambda p, **k: torch.optim.Adam(p, lr=1e-4, foreach=True, **k),
}
# The training-step comparison: five optimizers across the range of what capturable=True
# costs them, from about nothing (RMSprop) to several times the step (RAdam).
GUARDED = ("RMSprop", "NAdam", "RAdam", "Adamax", "Adam foreach=True")


def _events(fn: Callable[[], object], reps: int = 60, warm: int = 15) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _back_to_back(fn: Callable[[], object], reps: int = 60, warm: int = 15) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    blocks = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps // 3):
            fn()
        torch.cuda.synchronize()
        blocks.append((time.perf_counter() - t) * 1e3 / (reps // 3))
    return min(blocks)


def _train(spec: O.ModelSpec, x: torch.Tensor, y: torch.Tensor, m: torch.nn.Module,
           opt: torch.optim.Optimizer, guard: gg.Guard | None) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = spec.loss(m(x), y)
        loss.backward()
        if guard is None:
            opt.step()
        else:
            guard.step(loss)

    return step


def _model(name: str) -> list[dict[str, object]]:
    spec = O.MODELS[name]
    x, y = (t.cuda() for t in spec.batch(torch.Generator().manual_seed(0)))

    def build(make: Factory, **kw: object) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = spec.build().cuda()
        return m, make(m.parameters(), **kw)

    rows: list[dict[str, object]] = []
    for opt_name, make in OPTIMIZERS.items():
        row: dict[str, object] = {"model": name, "optimizer": opt_name}
        for cap in (False, True):
            m, opt = build(make, capturable=cap)
            spec.loss(m(x), y).backward()
            row[f"step_capturable_{cap}"] = _events(opt.step)
        if opt_name in GUARDED:
            m, opt = build(make)
            row["train_unguarded"] = _back_to_back(_train(spec, x, y, m, opt, None))
            for mode, strategy in (("capturable", "auto"), ("host_read", "host")):
                m, opt = build(make)
                guard = gg.Guard(m, opt, skip_strategy=strategy)
                try:
                    row[f"train_guarded_{mode}"] = _back_to_back(
                        _train(spec, x, y, m, opt, guard))
                    # What the column measured: the default must be the masked strategy on
                    # capturable state (no host-read fallback), the other a host read.
                    got = (guard.stepper.strategy,
                           all(g.get("capturable", False) for g in opt.param_groups))
                    row[f"train_guarded_{mode}_as"] = got
                    want = ("masked", True) if strategy == "auto" else ("host", False)
                    if got != want:
                        raise RuntimeError(f"{opt_name} on {name}: the guard stepped as {got}, "
                                           f"not {want}; the column would measure another path")
                finally:
                    guard.close()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def measure(models: list[str]) -> list[dict[str, object]]:
    """Both comparisons for ``models`` (names in ``overhead.MODELS``)."""
    return [row for name in models for row in _model(name)]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The two tables."""
    env = (f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
           f"python {platform.python_version()}")
    out = ["# Skippable steps on CUDA: the capturable switch against a host read", "",
           f"Produced by `python benchmarks/skip_cost.py` ({env}).", "",
           "## `optimizer.step()` alone (median of 60, CUDA events)", "",
           "| model | optimizer | capturable=False | capturable=True | ratio |",
           "|---|---|---:|---:|---:|"]
    for r in rows:
        a, b = r["step_capturable_False"], r["step_capturable_True"]
        out.append(f"| {r['model']} | {r['optimizer']} | {a:.2f} ms | {b:.2f} ms | "
                   f"{b / a:.2f}× |")
    out += ["", "## A training step, back to back (best of 3 blocks of 20)", "",
            "| model | optimizer | unguarded | guarded (capturable switch, the default) | "
            "guarded (host read, `skip_strategy=\"host\"`) |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "train_unguarded" in r:
            out.append(f"| {r['model']} | {r['optimizer']} | {r['train_unguarded']:.1f} ms "
                       f"| {r['train_guarded_capturable']:.1f} ms "
                       f"| {r['train_guarded_host_read']:.1f} ms |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,lm,deep")
    ap.add_argument("--out", type=Path, help="write the tables here as Markdown")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs CUDA")
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in O.MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {sorted(O.MODELS)}")
    warnings.simplefilter("ignore")
    logging.disable(logging.INFO)  # (the guard's notes on its switches; warnings still show)
    rows = measure(models)
    text = markdown(rows)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
