"""The guard's LR factor on top of the user's LR."""

from __future__ import annotations

import torch

from gradguard.lr import LRFactor


def _rprop_step(factor: float, warm: int = 4):
    """``warm`` Rprop steps at the full LR, then one at ``factor``: (update, state, bounds)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = torch.optim.Rprop(model.parameters(), lr=0.01)
    f = LRFactor(opt, warmup=0, device=torch.device("cpu"))
    x = torch.randn(32, 6)
    y = x.sum(1, keepdim=True)
    for i in range(warm + 1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        f.scale = factor if i == warm else 1.0
        f.prepare(0.01)
        before = model.weight.detach().clone()
        with f.applied():
            opt.step()
    sizes = opt.state[model.weight]["step_size"].clone()
    return model.weight.detach() - before, sizes, opt.param_groups[0]["step_sizes"]


def test_a_cut_lr_reaches_rprops_adapted_step_sizes():
    # Rprop reads the LR only to start its per-element step sizes: a cut made later must
    # scale the sizes themselves for the step, and leave their own adaptation alone.
    cut, sizes_cut, bounds = _rprop_step(0.3)
    full, sizes_full, _ = _rprop_step(1.0)
    assert full.abs().min() > 0
    torch.testing.assert_close(cut, 0.3 * full)
    torch.testing.assert_close(sizes_cut, sizes_full)
    assert bounds == (1e-6, 50)  # the user's bounds put back exactly
