"""z-loss and robust regression losses (gradguard.fixes.loss)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from gradguard import fixes
from gradguard.scenarios import data


def test_z_loss_value_and_gradient_match_the_formula():
    torch.manual_seed(0)
    logits = (torch.randn(8, 5) * 3 + 4).requires_grad_()
    w = 1e-2
    z = fixes.z_loss(logits, w)
    lse = logits.detach().logsumexp(-1)
    assert z.item() == pytest.approx(w * (lse**2).mean().item(), rel=1e-6)
    z.backward()
    expected = 2 * w * lse[:, None] * logits.detach().softmax(-1) / 8
    assert torch.allclose(logits.grad, expected, atol=1e-7)


@pytest.mark.parametrize("offset", [20.0, -20.0])
def test_descending_z_loss_moves_the_log_partition_toward_zero(offset):
    torch.manual_seed(0)
    logits = (torch.randn(16, 10) + offset).requires_grad_()
    lse = [logits.detach().logsumexp(-1).abs()]
    # Each step changes log Z by −lr·2w·log Z·Σp²/N: at lr = N/(4w) that is at most half of it.
    opt = torch.optim.SGD([logits], lr=16 / 4)
    for _ in range(80):
        opt.zero_grad()
        fixes.z_loss(logits, 1.0).backward()
        opt.step()
        lse.append(logits.detach().logsumexp(-1).abs())
    assert all(torch.all(b <= a + 1e-6) for a, b in itertools.pairwise(lse))  # every row and step
    assert lse[-1].max() < 0.1 * lse[0].min()


def test_with_z_loss_adds_the_term_once_and_handles_fp16_logits():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4) * 5, torch.randint(0, 4, (6,))
    loss_fn = fixes.with_z_loss(F.cross_entropy, 1e-3)
    assert loss_fn(logits, y).item() == pytest.approx(
        (F.cross_entropy(logits, y) + fixes.z_loss(logits, 1e-3)).item(), rel=1e-6)
    smoothed = fixes.with_z_loss(nn.CrossEntropyLoss(label_smoothing=0.1))
    assert torch.isfinite(smoothed(logits, y))
    big = torch.full((2, 3), 300.0, dtype=torch.float16)  # exp overflows fp16
    assert torch.isfinite(fixes.z_loss(big))
    assert "with_z_loss(cross_entropy" in repr(loss_fn)
    with pytest.raises(gg.ConfigError, match=r"with_z_loss.*already adds a z-loss"):
        fixes.with_z_loss(loss_fn)
    with pytest.raises(gg.ConfigError, match="weight"):
        fixes.with_z_loss(F.cross_entropy, weight=-1)
    with pytest.raises(gg.ConfigError, match="floating-point"):
        fixes.z_loss(torch.ones(3, 2, dtype=torch.long))


def test_huber_bounds_the_gradient_of_a_corrupted_regression_batch():
    # Diabetes, standardised; one batch arrives with targets in the wrong units (×1000).
    # MSE's gradient grows with the corruption; Huber's per-sample gradient on the
    # prediction is at most delta, so the whole gradient is bounded by delta·mean‖(x, 1)‖.
    x, y = data.diabetes()
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    xb, yb = x[:32], y[:32]
    torch.manual_seed(0)
    model = nn.Linear(10, 1)

    def grad_norm(loss_fn, targets):
        model.zero_grad()
        loss_fn(model(xb), targets).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()

    huber = fixes.robust_loss("huber", delta=1.0)
    clean_mse, bad_mse = grad_norm(F.mse_loss, yb), grad_norm(F.mse_loss, yb * 1000)
    clean_hub, bad_hub = grad_norm(huber, yb), grad_norm(huber, yb * 1000)
    bound = torch.cat([xb, torch.ones(32, 1)], 1).norm(dim=1).mean().item()
    assert bad_mse > 300 * clean_mse  # the spike
    assert bad_hub <= bound and bad_hub < 5 * clean_hub  # bounded
    assert bad_mse > 100 * bad_hub


def test_robust_loss_returns_torch_losses_and_checks_its_arguments():
    assert isinstance(fixes.robust_loss(), nn.HuberLoss)
    sl1 = fixes.robust_loss("smooth_l1", delta=2.0)
    assert isinstance(sl1, nn.SmoothL1Loss) and sl1.beta == 2.0
    with pytest.raises(gg.ConfigError, match="kind"):
        fixes.robust_loss("l1")
    with pytest.raises(gg.ConfigError, match="delta"):
        fixes.robust_loss(delta=0)
    with pytest.raises(gg.ConfigError, match="reduction"):
        fixes.robust_loss(reduction="avg")


def test_z_loss_takes_the_class_dim_and_leaves_out_ignored_positions():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7) * 3  # (N, C, T), as F.cross_entropy takes a sequence
    y = torch.randint(0, 5, (4, 7))
    y[:, 4:] = -100  # padding
    z = fixes.with_z_loss(F.cross_entropy, 1.0, dim=1)(logits, y) - F.cross_entropy(logits, y)
    expected = torch.logsumexp(logits, 1)[:, :4].square().mean()
    assert z.item() == pytest.approx(expected.item(), rel=1e-5)
    own = fixes.with_z_loss(nn.CrossEntropyLoss(ignore_index=0), 1.0, dim=1)
    y2 = torch.randint(0, 5, (4, 7))
    z2 = own(logits, y2) - nn.CrossEntropyLoss(ignore_index=0)(logits, y2)
    expected2 = torch.logsumexp(logits, 1)[y2 != 0].square().mean()
    assert z2.item() == pytest.approx(expected2.item(), rel=1e-5)
    # An LM's (N, T, C) logits that its own loss reshapes: the default, the last dim.
    lm = logits.transpose(1, 2)

    def lm_loss(out, t):
        return F.cross_entropy(out.flatten(0, 1), t.flatten())

    z3 = fixes.with_z_loss(lm_loss, 1.0)(lm, y) - lm_loss(lm, y)
    assert z3.item() == pytest.approx(expected.item(), rel=1e-5)
