"""Held-out cases: problems the bench's scenarios do not contain, to check the defaults.

The guard's defaults were derived on the bench's seven scenarios. These three cases are
*not* among them and were not used to choose any setting; they test whether the defaults
generalise, each at learning rates from healthy to far past the stability edge:

- ``softmax-raw``: softmax regression on the breast-cancer data in raw units (features
  from 1e-3 to 4e3), SGD with momentum 0.9: a convex problem whose too-high LR does not
  overflow but oscillates.
- ``linreg-raw-wine``: least squares on the wine data in raw units (predict alcohol from
  the other 12 columns), plain SGD. Its stability limit 2/λmax (λmax of the Hessian
  2XᵀX/n, bias column included) is computed from the data; the grid is in multiples of it.
- ``rnn-memory``: a tanh RNN (64 units) reading 30 Gaussian values and asked for the
  (scaled) sum of values 20-24: plain SGD.
- ``mlp-raw-pixels``: a ReLU MLP (784-128-10) on the bench's MNIST subset with the pixels
  left in 0-255 (no scaling), SGD with momentum 0.9: unscaled inputs, the brief's cause,
  on an image task. Its first loss is already ~20 (huge logits) and a too-high LR kills
  hidden units in the first steps instead of overflowing.

For every case, LR and seed (5 seeds; the seed fixes the init, the split and the batch
order) three arms run on identical batches: ``none`` (``optimizer.step()``), ``clip 1.0``
(``clip_grad_norm_(params, 1.0)``, the usual fixed threshold) and ``gradguard``
(``gg.Guard(model, opt)``, all defaults). Reported: the median held-out loss over seeds
(diverged runs count as ``inf``, so a median is finite only when most seeds are). A
guarded run that gives up (``TrainingDivergedError``) is evaluated where it stopped.

    .venv/bin/python benchmarks/heldout.py            # writes benchmarks/HELDOUT.md
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.bench.runner import cpu_model

HERE = Path(__file__).resolve().parent
ARMS = ("none", "clip 1.0", "gradguard")


def _cancer() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _wine() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_wine

    x, _ = load_wine(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    return x[:, 1:], x[:, :1]


def _memory_task() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(4000, 30, generator=gen)
    return x, x[:, 20:25].sum(1, keepdim=True) / math.sqrt(5)


def _pixels() -> tuple[Tensor, Tensor]:
    from gradguard.scenarios import data

    x, y = data.mnist()
    return x.float().reshape(len(x), -1), y


def _pixel_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


class _RNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, 64, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(64, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x.unsqueeze(-1))
        return self.out(h[:, -1])


def wine_limit() -> float:
    """2/λmax of least squares on the raw wine features (with a bias column)."""
    x, _ = _wine()
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    return float(2 / torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())


# name -> (data, model factory, loss, optimizer factory, LR grid, note on the grid)
Case = tuple[Callable[[], tuple[Tensor, Tensor]], Callable[[], nn.Module],
             Callable[[Tensor, Tensor], Tensor],
             Callable[[nn.Module, float], torch.optim.Optimizer], list[float], str]


def cases() -> dict[str, Case]:
    lim = wine_limit()
    return {
        "softmax-raw": (_cancer, lambda: nn.Linear(30, 2), nn.functional.cross_entropy,
                        lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
                        [1e-6, 1e-5, 1e-4, 1e-3], "SGD momentum 0.9"),
        "linreg-raw-wine": (_wine, lambda: nn.Linear(12, 1), nn.functional.mse_loss,
                            lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr),
                            [0.1 * lim, 0.67 * lim, 4 * lim, 20 * lim],
                            f"0.1×, 0.67×, 4× and 20× the limit 2/λmax = {lim:.3g}"),
        "rnn-memory": (_memory_task, _RNN, nn.functional.mse_loss,
                       lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr),
                       [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "plain SGD"),
        "mlp-raw-pixels": (_pixels, _pixel_mlp, nn.functional.cross_entropy,
                           lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
                           [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1], "SGD momentum 0.9, pixels 0-255"),
    }


def run(case: Case, arm: str, lr: float, seed: int, steps: int) -> tuple[float, bool]:
    """(held-out loss, guard gave up) of one run."""
    data, make_model, loss_fn, make_opt, _, _ = case
    x, y = data()
    torch.manual_seed(seed)
    model = make_model()
    opt = make_opt(model, lr)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n = int(0.8 * len(x))
    train, test = perm[:n], perm[n:]
    guard = gg.Guard(model, opt, log=None) if arm == "gradguard" else None
    gave_up = False
    for _ in range(steps):
        idx = train[torch.randint(0, n, (32,), generator=gen)]
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        if guard is not None:
            try:
                guard.step(loss)
            except gg.TrainingDivergedError:
                gave_up = True
                break
        else:
            if arm == "clip 1.0":
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        held_out = float(loss_fn(model(x[test]), y[test]))
    return (held_out if math.isfinite(held_out) else math.inf), gave_up


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path, default=HERE / "HELDOUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lines = [
        "# Held-out cases: the defaults on problems the bench does not contain", "",
        "Produced by `python benchmarks/heldout.py` "
        f"(torch {torch.__version__}, gradguard {gg.__version__}, "
        f"{platform.machine()} {cpu_model()}, 1 thread; {args.seeds} seeds, {args.steps} steps, "
        "batch 32). Median held-out loss over seeds (`inf`: most seeds diverged); "
        "**bold**: the best arm of the row when it beats the others by more than 10 %. "
        "See the module docstring for the cases.", ""]
    wins = {a: 0 for a in ARMS}
    for name, case in cases().items():
        lines += [f"## {name} ({case[5]})", "", "| lr | " + " | ".join(ARMS) + " |",
                  "|---:|" + "---:|" * len(ARMS)]
        for lr in case[4]:
            med, gave = {}, 0
            for arm in ARMS:
                res = [run(case, arm, lr, s, args.steps) for s in range(args.seeds)]
                med[arm] = statistics.median(v for v, _ in res)
                gave += sum(g for _, g in res) if arm == "gradguard" else 0
            best = min(med, key=lambda a: med[a])
            others = [med[a] for a in ARMS if a != best]
            clear = all(med[best] * 1.1 < o for o in others)
            if clear:
                wins[best] += 1
            cells = [(f"**{med[a]:.4g}**" if a == best and clear else f"{med[a]:.4g}")
                     for a in ARMS]
            if gave:
                cells[-1] += f" ({gave} gave up)"
            lines.append(f"| {lr:.3g} | " + " | ".join(cells) + " |")
            print(name, f"{lr:.3g}", med, flush=True)
        lines.append("")
    lines += ["## Tally", "",
              "Rows where one arm is best by more than 10 %: "
              + ", ".join(f"{a} {n}" for a, n in wins.items())
              + f". Wall time {time.perf_counter() - t0:.0f} s.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
