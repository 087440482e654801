"""The built-in scenarios (see ``gradguard.scenarios``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import Scenario, Setup, register
from . import data as D
from .train import Batch, batches


def _sgd(momentum: float = 0.0):
    return lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=momentum)


def _data(x: Tensor, y: Tensor, seed: int) -> Callable[[int], Iterator[Batch]]:
    return lambda batch_size: batches(x, y, batch_size, seed)


def _linreg_raw(seed: int) -> Setup:
    """Diabetes progression from 10 clinical measurements in raw units, plain SGD."""
    x, y = D.diabetes()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    tr, te = perm[:354], perm[354:]
    model = nn.Linear(x.shape[1], 1)

    def evaluate(m: nn.Module) -> tuple[float, float | None]:
        return float(F.mse_loss(m(x[te]), y[te])), None

    return Setup(model, _data(x[tr], y[tr], seed), 32, F.mse_loss, evaluate, _sgd())


register(Scenario(
    name="linreg-raw",
    summary="linear regression of a disease score, sklearn diabetes in raw units, SGD",
    lr=1e-3, steps=400, build=_linreg_raw,
    # Plain SGD is stable below 2/λmax ≈ 2.5e-5 here (λmax of the raw-unit input covariance).
    lr_grid=(1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
))


def _mnist_split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y = D.mnist()
    x = (x / 255.0 - 0.1307) / 0.3081  # the usual MNIST standardisation
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    tr, te = perm[:4000], perm[4000:]
    return x[tr], y[tr], x[te], y[te]


def _classify_eval(xte: Tensor, yte: Tensor):
    def evaluate(m: nn.Module) -> tuple[float, float | None]:
        out = m(xte)
        acc = float((out.argmax(1) == yte).float().mean())
        return float(F.cross_entropy(out, yte)), acc

    return evaluate


# A dataloader fault every few hundred steps: a NaN-filled batch (a broken record) and a
# batch in the wrong units (pixel values 0–255 where the model expects standardised ones).
CORRUPT_NAN = frozenset({60, 230})
CORRUPT_UNSCALED = frozenset({120, 170, 300})


def _corrupt_batches(step: int, batch: Batch) -> Batch:
    x, y = batch
    if step in CORRUPT_NAN:
        return torch.full_like(x, float("nan")), y
    if step in CORRUPT_UNSCALED:
        return x * 0.3081 * 255 * 40, y
    return batch


def _mlp_corrupt(seed: int) -> Setup:
    """A healthy 4-layer MLP on MNIST; a few corrupted batches arrive mid-run."""
    xtr, ytr, xte, yte = _mnist_split(seed)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    return Setup(model, _data(xtr, ytr, seed), 64, F.cross_entropy, _classify_eval(xte, yte),
                 _sgd(momentum=0.9), corrupt=_corrupt_batches)


register(Scenario(
    name="mlp-corrupt",
    summary="MLP on the MNIST subset, SGD+momentum; NaN and unscaled batches mid-run",
    lr=0.05, steps=400, build=_mlp_corrupt, metric="accuracy",
))


def _mlp_init(seed: int) -> Setup:
    """A 10-layer ReLU MLP whose weights start 2.5× larger than Kaiming's."""
    xtr, ytr, xte, yte = _mnist_split(seed)
    layers: list[nn.Module] = []
    d = 784
    for _ in range(9):
        lin = nn.Linear(d, 256)
        nn.init.normal_(lin.weight, std=2.5 * (2.0 / d) ** 0.5)  # Kaiming std × 2.5
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        d = 256
    layers.append(nn.Linear(d, 10))
    return Setup(nn.Sequential(*layers), _data(xtr, ytr, seed), 64, F.cross_entropy,
                 _classify_eval(xte, yte), _sgd(momentum=0.9))


register(Scenario(
    name="mlp-init",
    summary="10-layer ReLU MLP on the MNIST subset, weights 2.5× Kaiming (bad init)",
    lr=0.01, steps=300, build=_mlp_init, metric="accuracy",
))
