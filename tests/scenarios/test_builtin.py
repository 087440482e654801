"""End to end on real data: the built-in scenarios blow up unguarded and the guard rescues."""

import math

import pytest

import gradguard as gg
from gradguard import scenarios


def test_corrupted_batches_ruin_the_unguarded_run_but_not_the_default_guard():
    plain = scenarios.run("mlp-corrupt")
    assert plain.first_nonfinite == min(scenarios.builtin.CORRUPT_NAN)
    assert plain.diverged and not math.isfinite(plain.final_loss)

    guarded = scenarios.run("mlp-corrupt", guard=lambda m, o, s: gg.Guard(m, o, scaler=s))
    assert not guarded.diverged
    # every corrupted batch (NaN records and wrong-unit pixels) was skipped, nothing else;
    # a wrong-unit batch the saturated model gets exactly right (loss 0, gradient 0) is
    # harmless and need not be
    bad = scenarios.builtin.CORRUPT_NAN | scenarios.builtin.CORRUPT_UNSCALED
    harmless = {k for k in bad if guarded.grad_norms[k] == 0.0}
    assert guarded.skipped == len(bad - harmless)
    assert guarded.final_metric > 0.9  # real MNIST digits, 1000 held-out images
    assert guarded.final_loss < 0.4


def test_raw_unit_regression_explodes_and_the_default_guard_backs_the_lr_off():
    plain = scenarios.run("linreg-raw")
    assert plain.diverged and plain.first_nonfinite is not None and plain.first_nonfinite < 50
    guarded = scenarios.run("linreg-raw", guard=lambda m, o, s: gg.Guard(m, o, scaler=s))
    assert not guarded.diverged and guarded.first_nonfinite is None
    assert guarded.final_loss < 4500  # target variance ~5900; least squares ~2900
    # fixed-threshold clipping (clip-by-norm) contains it too, less well
    clipped = scenarios.run(
        "linreg-raw", guard=lambda m, o, s: gg.Guard(m, o, scaler=s, clip=gg.clip.GlobalNorm(10))
    )
    assert not clipped.diverged
    # below the variance of the target (~5900): the model explains part of it
    assert clipped.final_loss < 5900


def test_unknown_scenario_lists_the_names():
    with pytest.raises(KeyError, match="linreg-raw"):
        scenarios.get("nope")
