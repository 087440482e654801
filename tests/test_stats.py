import math

import pytest
import torch

import gradguard as gg
from gradguard.stats import collect_grads, compute_stats, loss_value
from tests.conftest import backward, small_mlp


def test_norms_match_torch(mlp):
    backward(mlp)
    params = list(mlp.parameters())
    st = compute_stats(collect_grads(params), torch.device("cpu"))
    expect = torch.stack([p.grad.norm() for p in params])
    torch.testing.assert_close(st.norms, expect)
    total = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    torch.testing.assert_close(st.global_norm, total)
    assert not st.nonfinite
    expect_max = max(p.grad.abs().max() for p in params)
    torch.testing.assert_close(st.max_abs, expect_max)


def test_params_without_grad_are_skipped():
    m = small_mlp()
    backward(m)
    params = list(m.parameters())
    params[0].grad = None
    st = compute_stats(collect_grads(params), torch.device("cpu"))
    assert st.index == tuple(range(1, len(params)))
    full = st.full_norms(len(params))
    assert full[0] == 0 and full.shape == (len(params),)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_flag(mlp, bad):
    backward(mlp)
    next(iter(mlp.parameters())).grad[0, 0] = bad
    st = compute_stats(collect_grads(list(mlp.parameters())), torch.device("cpu"))
    assert st.nonfinite


def test_mixed_dtypes_grouped():
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16))
    c = torch.nn.Parameter(torch.randn(2, 2))
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    groups = collect_grads([a, b, c])
    assert len(groups.buckets) == 2
    st = compute_stats(groups, torch.device("cpu"))
    expect = torch.stack([a.grad.norm(), b.grad.float().norm(), c.grad.norm()])
    torch.testing.assert_close(st.norms, expect, rtol=1e-3, atol=1e-3)
    assert st.norms.dtype == torch.float32


def test_sparse_grad_is_type_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradient"):
        collect_grads(list(emb.parameters()))


def test_a_finite_gradient_whose_square_overflows_is_unusable():
    # torch's norm kernels rescale, so a 3e38 gradient has a finite norm; Adam would still
    # square it into an inf second moment. Found by tests/test_fuzz.py.
    from gradguard.stats import MAX_NORM, unusable

    assert not bool(unusable(torch.tensor(1e19)))
    assert bool(unusable(torch.tensor(2e19))) and bool(unusable(torch.tensor(float("nan"))))
    assert bool(unusable(torch.tensor(float("inf")))) and MAX_NORM > 1.8e19
    model = torch.nn.Linear(1, 1, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    guard = gg.Guard(model, opt, log=None)
    model.weight.grad = torch.tensor([[3e38]])
    info = guard.step(torch.tensor(1.0))
    assert bool(info.skipped) and bool(info.nonfinite)
    assert not opt.state.get(model.weight)  # no inf second moment left behind
    guard.close()


def test_complex_gradients_are_measured_as_torch_measures_them():
    # A complex tensor's norm is over its real and imaginary parts together (torch's own
    # vector_norm and clip_grad_norm_); the fused kernel sees the real view.
    a = torch.nn.Parameter(torch.randn(6, dtype=torch.cfloat))
    b = torch.nn.Parameter(torch.randn(3, 2))
    for p in (a, b):
        p.grad = torch.randn_like(p)
    st = compute_stats(collect_grads([a, b]), torch.device("cpu"))
    torch.testing.assert_close(st.norms, torch.stack([a.grad.norm(), b.grad.norm()]))
    total = torch.nn.utils.clip_grad_norm_([a, b], float("inf"))
    torch.testing.assert_close(st.global_norm, total)


def test_float64_gradients_are_measured():
    # torch refuses to narrow fp64 inside the norm kernel; the guard must not crash on a
    # double-precision model (alone, or beside fp32 parameters).
    a = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4))
    for p in (a, b):
        p.grad = torch.randn_like(p)
    for params in ([a], [a, b]):
        st = compute_stats(collect_grads(params), torch.device("cpu"))
        expect = torch.stack([p.grad.norm().float() for p in params])
        torch.testing.assert_close(st.norms, expect)
        torch.testing.assert_close(st.max_abs, max(p.grad.abs().max() for p in params).float())
        assert st.norms.dtype == torch.float32 and not st.nonfinite


@pytest.mark.parametrize("host", [True, False], ids=["host", "fused"])
def test_a_float64_model_trains_guarded_as_unguarded_and_skips_a_nan(host, monkeypatch):
    from gradguard import stepper

    monkeypatch.setattr(stepper, "HOST_ON_CPU", host)

    def train(guarded: bool) -> tuple[torch.Tensor, list[int]]:
        m = small_mlp().double()
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        guard = gg.Guard(m, opt, log=None) if guarded else None
        gen = torch.Generator().manual_seed(1)
        skipped = []
        for step in range(60):
            x = torch.randn(16, 8, generator=gen, dtype=torch.float64)
            opt.zero_grad()
            loss = (m(x) - x[:, :1]).pow(2).mean()
            loss.backward()
            if step == 40:
                next(m.parameters()).grad[0, 0] = math.nan
            if guard is None:
                if step != 40:  # what a skip is: no update, no optimizer state change
                    opt.step()
            elif bool(guard.step(loss).skipped):
                skipped.append(step)
        return torch.cat([p.detach().flatten() for p in m.parameters()]), skipped

    plain, _ = train(False)
    guarded, skipped = train(True)
    assert skipped == [40]
    assert guarded.dtype == torch.float64
    if host:  # the user's own optimizer.step(): the same run, bit for bit
        assert torch.equal(plain, guarded)
    else:  # torch's fused kernel rounds differently
        torch.testing.assert_close(plain, guarded)


@pytest.mark.parametrize(("value", "expect"), [
    (1e39, torch.finfo(torch.float32).max), (-1e39, -torch.finfo(torch.float32).max),
    (2.5, 2.5), (math.inf, math.inf), (-math.inf, -math.inf)])
def test_loss_value_saturates_a_finite_float64_loss(value, expect):
    got = loss_value(torch.tensor(value, dtype=torch.float64))
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(got) == expect
    assert math.isnan(float(loss_value(torch.tensor(math.nan, dtype=torch.float64))))


def test_loss_value_means_a_loss_with_a_shape_in_its_own_width():
    # The mean of two float64 values past float32's range is itself past it: still huge.
    got = loss_value(torch.tensor([1e39, 3e39], dtype=torch.float64))
    assert float(got) == torch.finfo(torch.float32).max
    half = loss_value(torch.tensor([1.0, 2.0], dtype=torch.float16))
    assert half.dtype == torch.float32 and float(half) == 1.5


def test_a_huge_float64_loss_is_not_a_nonfinite_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, log=None)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 3, dtype=torch.float64)
    loss = (model(x) ** 2).mean() * 1e40  # finite in float64, inf in float32
    loss.backward()
    for p in model.parameters():  # (gradients of a sane size: only the loss is huge)
        p.grad.div_(1e40)
    info = guard.step(loss)
    assert not info.nonfinite
    assert not info.skipped  # (the first step has no history to call it a spike by)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    guard.close()
