"""Fuzzing the guard end to end: random models, optimizers, clip chains and gradients.

Gradients are set directly (no forward pass), drawn from normal values at scales from
denormal to near fp32's limit, with NaN/Inf/huge/denormal entries sprinkled in, and
sometimes a non-finite loss. For every step the guard must not raise, must keep every
parameter and optimizer-state value finite, must skip any step whose gradients or loss
are non-finite (leaving parameters and state bit-for-bit as they were), and must apply
no gradient larger than its clip chain's bound.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from gradguard.testing import state_is_finite
from tests.conftest import single_thread

SPECIALS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 3e38,
            "big": 1e19, "denormal": 1e-40, "zero": 0.0}
# bf16 keeps 8 significant bits: a scaled bf16 gradient is rounded by up to 2^-8 relative.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8 + 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: one thread is faster (module scope: hypothesis re-runs the test body).
    with single_thread():
        yield


@st.composite
def transforms(draw):
    limit = draw(st.floats(1e-3, 1e3))
    kind = draw(st.sampled_from(["global", "value", "layer", "agc", "quantile", "zscore",
                                 "zscore_max", "centralize", "normalize", "normalize_layer"]))
    return {
        "global": lambda: gg.clip.GlobalNorm(limit),
        "value": lambda: gg.clip.Value(limit),
        "layer": lambda: gg.clip.PerLayerNorm(limit),
        "agc": lambda: gg.clip.AGC(clipping=min(limit, 1.0)),
        "quantile": lambda: gg.clip.Quantile(q=draw(st.floats(0, 1)), history=3),
        "zscore": lambda: gg.clip.ZScore(warmup=2, mode=draw(st.sampled_from(
            ["reciprocal", "mean", "percentile"]))),
        "zscore_max": lambda: gg.clip.ZScore(warmup=2, max_norm=limit),
        "centralize": lambda: gg.clip.Centralize(),
        "normalize": lambda: gg.clip.Normalize(limit),
        "normalize_layer": lambda: gg.clip.Normalize(limit, per_tensor=True),
    }[kind]()


@st.composite
def setups(draw):
    depth = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 6), min_size=depth + 1, max_size=depth + 1))
    layers = []
    for i in range(depth):
        lin = nn.Linear(widths[i], widths[i + 1], bias=draw(st.booleans()))
        lin.to(draw(st.sampled_from([torch.float32, torch.bfloat16])))
        layers.append(lin)
    frozen = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    if all(frozen):
        frozen[draw(st.integers(0, depth - 1))] = False
    for lin, f in zip(layers, frozen, strict=True):
        lin.requires_grad_(not f)
    model = nn.Sequential(*layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_groups = draw(st.integers(1, min(3, len(trainable))))
    groups = [{"params": trainable[g::n_groups], "lr": draw(st.floats(1e-4, 1.0))}
              for g in range(n_groups)]
    opt_name = draw(st.sampled_from(["sgd", "momentum", "adamw", "adam_masked", "rmsprop",
                                     "adagrad"]))
    opt = {
        "sgd": lambda: torch.optim.SGD(groups),
        "momentum": lambda: torch.optim.SGD(groups, momentum=0.9, weight_decay=1e-2),
        "adamw": lambda: torch.optim.AdamW(groups),
        # foreach=False keeps torch's Adam off the fused path: the masked skip strategy
        "adam_masked": lambda: torch.optim.Adam(groups, foreach=False),
        "rmsprop": lambda: torch.optim.RMSprop(groups),
        "adagrad": lambda: torch.optim.Adagrad(groups),
    }[opt_name]()
    clip = draw(st.lists(transforms(), max_size=4))
    rollback = None
    if draw(st.integers(0, 3)) == 0:
        rollback = gg.Rollback(every=draw(st.integers(1, 3)), keep=draw(st.integers(1, 2)),
                               max_rollbacks=10**6,
                               clean_window=draw(st.integers(0, 2)))
    policy = gg.Policy(
        on_nonfinite=draw(st.sampled_from(["skip", "rollback"])) if rollback else "skip",
        on_spike=draw(st.sampled_from(["none", "auto", "clip", "skip", "backoff", "rollback"]
                                      if rollback else ["none", "auto", "clip", "skip",
                                                        "backoff"])),
        on_loss_spike=draw(st.sampled_from(["none", "auto", "skip", "backoff"])),
        rollback=rollback,
        # a floor no handful of steps can reach: "never raises" within the configured limits
        stability=gg.Stability(floor=1e-9),
        grad_spike=gg.NormSpike(warmup=2), loss_spike=gg.LossSpike(min_count=2))
    strategy = draw(st.sampled_from(["auto", "masked"]))
    return model, opt, clip, policy, strategy


@st.composite
def step_grads(draw):
    """A seed for normal values, their scale, and where to put special values."""
    return {
        "seed": draw(st.integers(0, 2**31 - 1)),
        "log10_scale": draw(st.integers(-42, 18)),
        "specials": draw(st.lists(st.sampled_from(sorted(SPECIALS)), max_size=3)),
        "missing": draw(st.booleans()),  # some parameters get no gradient this step
        "loss": draw(st.sampled_from([1.0, 1.0, 1.0, math.nan, math.inf])),
    }


def set_grads(params, spec):
    """Set every trainable parameter's grad from ``spec``; True if any value is non-finite."""
    rng = np.random.default_rng(spec["seed"])
    bad = False
    with_grad = [p for p in params if not (spec["missing"] and rng.random() < 0.3)]
    if not with_grad:
        with_grad = params[:1]
    for p in params:
        p.grad = None
    for p in with_grad:
        g = rng.standard_normal(p.shape) * 10.0 ** spec["log10_scale"]
        p.grad = torch.tensor(g, dtype=torch.float32).to(p.dtype)
    for name in spec["specials"]:
        p = with_grad[int(rng.integers(len(with_grad)))]
        p.grad.view(-1)[int(rng.integers(p.numel()))] = SPECIALS[name]
    for p in with_grad:
        bad |= not bool(torch.isfinite(p.grad).all())
    return bad


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        ((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups(), steps=st.lists(step_grads(), min_size=1, max_size=6))
def test_guard_never_raises_never_poisons_and_bounds_hold(setup, steps):
    model, opt, clip, policy, strategy = setup
    guard = gg.Guard(model, opt, clip=clip, policy=policy, skip_strategy=strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    bound = guard.clip.bound()
    for spec in steps:
        bad = set_grads(params, spec)
        loss = torch.tensor(spec["loss"])
        bad |= not math.isfinite(spec["loss"])
        before = snapshot(model, opt)
        info = guard.step(loss)
        skipped = bool(info.skipped)

        assert state_is_finite(model, opt), "a non-finite value reached parameters or state"
        if bad:
            assert skipped, "a step with NaN/Inf gradients or loss was applied"
        if info.rolled_back:
            continue  # an earlier state was restored (and the gradients cleared)
        if skipped:
            after = snapshot(model, opt)
            assert all(same(a, b) for a, b in zip(before[0], after[0], strict=True))
            assert before[1].keys() == after[1].keys()
            for k, st_before in before[1].items():
                for name, v in st_before.items():
                    w = after[1][k][name]
                    assert same(v, w) if torch.is_tensor(v) else v == w, name
        elif bound is not None:
            grads = [p.grad for p in params if p.grad is not None]
            applied = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
            tol = max(TOL[g.dtype] for g in grads)
            assert applied <= bound * (1 + tol), (applied, bound, guard.clip)
    guard.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups(), steps=st.lists(step_grads(), min_size=2, max_size=5))
def test_reported_clipped_norm_is_the_applied_norm(setup, steps):
    model, opt, clip, policy, strategy = setup
    guard = gg.Guard(model, opt, clip=clip, policy=policy, skip_strategy=strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    for spec in steps:
        bad = set_grads(params, spec)
        info = guard.step()
        if bad or bool(info.skipped):
            continue
        grads = [p.grad for p in params if p.grad is not None]
        applied = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        reported = float(info.clipped_norm)
        # Below ~1e-18 the squares of fp32 gradients underflow and measured norms lose
        # precision (in clip_grad_norm_ too); Normalize would carry that error upwards.
        if min(applied, reported, float(info.grad_norm)) > 1e-18:
            tol = 1e-3 if all(g.dtype == torch.float32 for g in grads) else 2e-2
            assert abs(applied - reported) <= tol * max(applied, reported), \
                (applied, reported, guard.clip)
    guard.close()


# -- regressions the fuzzer found --------------------------------------------------------
def two_params():
    torch.manual_seed(0)
    return nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))


def run_sgd(fused, steps, dampening=0.0):
    a, b = two_params()
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9, dampening=dampening,
                          weight_decay=0.01, foreach=None if fused else False)
    guard = gg.Guard(None, opt, clip=[])
    assert guard.stepper.strategy == ("found_inf" if fused else "masked")
    for ga, gb in steps:
        a.grad = None if ga is None else torch.full((3,), ga)
        b.grad = None if gb is None else torch.full((3,), gb)
        guard.step()
    return a, b, opt


def test_fused_sgd_momentum_with_a_parameter_whose_first_grad_comes_later():
    # torch's fused SGD takes one first-step flag per group and raised on a group where
    # only some parameters had momentum buffers; the guard switches SGD to fused itself.
    steps = [(1.0, None), (2.0, None), (3.0, -1.0), (0.5, 2.0)]
    for damp in (0.0, 0.3):
        fused = run_sgd(True, steps, damp)
        plain = run_sgd(False, steps, damp)
        for p, q in zip(fused[:2], plain[:2], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_skipped_step_of_another_subset_of_the_same_size_leaves_no_state():
    # The stepper used to take "as many parameters as last time" for "the same ones" and
    # skip its check for state created by a skipped step.
    steps = [(1.0, None), (2.0, None), (None, math.nan)]
    _, b, opt = run_sgd(True, steps)
    assert opt.state.get(b, {}).get("momentum_buffer") is None
    assert torch.isfinite(b).all()
    fused = run_sgd(True, [*steps, (None, 2.0)])
    plain = run_sgd(False, [*steps, (None, 2.0)])
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused[2].state[fused[1]]["momentum_buffer"],
                               plain[2].state[plain[1]]["momentum_buffer"])
