"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if _XDIST_WORKER:
    # xdist's workers inherit COLUMNS=80, which rich reads once when the CLI's console is
    # made (at import) and then keeps: the width a test passes to CliRunner would be
    # ignored. A worker has no terminal; each CLI test says its own width.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)
# Under pytest-xdist (``make test`` runs one worker per core) each worker gets one
# intra-op thread: two workers with two threads each on two cores wait on each other.
torch.set_num_threads(1 if _XDIST_WORKER else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _accelerator_skip_strategies(request, monkeypatch):
    """CI has no accelerator: let "auto" pick the accelerator strategies (fused found_inf,
    masked) on the CPU, so the no-host-sync pipeline is what the suite tests. Tests
    marked ``cpu_host`` get what a CPU user gets (the host strategy)."""
    if "cpu_host" not in request.keywords:
        from gradguard import stepper

        monkeypatch.setattr(stepper, "HOST_ON_CPU", False)


@contextlib.contextmanager
def no_host_sync():
    """Make every device→host read raise: the hot path must not call any of these."""

    def boom(*_a, **_k):
        raise AssertionError("host sync on the guard's hot path")

    names = ("item", "__bool__", "__float__", "__int__", "tolist", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, boom)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@contextlib.contextmanager
def single_thread():
    """Run torch on one intra-op thread, as the bench runs scenarios.

    The test models are tiny: a second thread buys nothing, and on a busy 2-core machine
    it makes each step wait for a core (up to 10x slower measured).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


def small_mlp(seed: int = 0, width: int = 16, depth: int = 3, d_in: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(d, width), torch.nn.Tanh()]
        d = width
    layers.append(torch.nn.Linear(d, 1))
    return torch.nn.Sequential(*layers)


def backward(model: torch.nn.Module, scale: float = 1.0, seed: int = 0, nan: bool = False,
             d_in: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    d_in = d_in or next(model.parameters()).shape[1]
    x = torch.randn(32, d_in, generator=gen) * scale
    if nan:
        x[0, 0] = float("nan")
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss


@pytest.fixture
def mlp() -> torch.nn.Module:
    return small_mlp()


def pixel_mlp_run(lr: float, seed: int, steps: int = 200, scale: float = 1.0,
                  **guard_kw: object):
    """A guarded ReLU MLP on the bench's MNIST subset, pixels × ``scale`` (1: left in
    0-255, unscaled), SGD with momentum 0.9: at a high LR its hidden units die in the
    first tens of steps. Returns the closed guard."""
    import gradguard as gg
    from gradguard.scenarios import data

    x, y = data.mnist()
    x = x.float().reshape(len(x), -1) * scale
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    with gg.Guard(model, opt, **guard_kw) as guard:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=gen)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            guard.step(loss)
    return guard


def _script(name: str):
    """benchmarks/<name>.py as a module, for the length of one test."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gradguard_bench_{name}", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture
def noharm():
    """benchmarks/noharm.py as a module (its cases, ``run`` and ``main``)."""
    yield from _script("noharm")


@pytest.fixture
def heldout():
    """benchmarks/heldout.py as a module (its cases, ``run`` and ``main``)."""
    yield from _script("heldout")
