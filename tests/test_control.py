"""The stability controller on its own: evidence classes, LR memory, probing, state."""

import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard as gg
from gradguard.control import Controller


def feed(ctrl, losses, flags=None, start=0, lrs=None):
    """Observe ``losses`` (flagged where ``flags`` says; at the user's LRs ``lrs``, if
    given) from row ``start``; the verdicts."""
    if lrs is not None:
        assert len(lrs) == len(losses)
    out = []
    for i, v in enumerate(losses):
        flagged = bool(flags[i]) if flags is not None else False
        out.append(ctrl.observe(start + i, v, flagged, flagged and not math.isfinite(v),
                                lr=None if lrs is None else float(lrs[i])))
    return out


# Derandomized: a z = 3 test has a false-alarm rate of ~1e-3 per run at the heaviest noise
# here, which a random search over seeds would find sooner or later in CI.
@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), level=st.floats(1e-4, 1e4),
       spread=st.floats(0.0, 0.8))
def test_stationary_noisy_loss_is_never_instability(seed, level, spread):
    # Heavy multiplicative batch noise (up to ×2.2 per σ) around a flat or falling level,
    # for 3000 steps: no false alarm. A real regression must double the median.
    gen = np.random.default_rng(seed)
    trend = np.geomspace(1.0, 0.3, 3000)
    losses = level * trend * np.exp(gen.normal(0, spread, 3000))
    ctrl = Controller(gg.Stability())
    assert not any(v.unstable for v in feed(ctrl, losses))
    assert ctrl.scale == 1.0


def test_tiny_noisy_losses_near_zero_are_not_a_regression():
    # Mechanism 7 of the stability issue: once a loss is ~1e-3, a batch at 5e-3 is noise.
    gen = np.random.default_rng(0)
    losses = 1e-3 * np.exp(gen.normal(0, 1.0, 2000))  # batches ×2.7 apart per σ
    ctrl = Controller(gg.Stability())
    assert not any(v.unstable for v in feed(ctrl, losses))


def test_a_gradual_blowup_is_caught_while_it_is_still_small():
    # cnn-lr at lr 1: the loss creeps from 2 to 17 over ~100 steps (mechanism 4).
    gen = np.random.default_rng(0)
    calm = 2.0 * np.exp(gen.normal(0, 0.2, 60))
    creep = np.geomspace(2.0, 17.0, 100) * np.exp(gen.normal(0, 0.2, 100))
    ctrl = Controller(gg.Stability())
    verdicts = feed(ctrl, np.concatenate([calm, creep]))
    first = next(i for i, v in enumerate(verdicts) if v.unstable)
    assert 60 < first < 60 + 60  # caught before the loss is 8× its calm level
    assert "rose above its best" in verdicts[first].unstable
    # a climbing level: far past the edge, the scale falls a decade (decrease_far)
    assert verdicts[first].scale == pytest.approx(0.1)


def test_isolated_flags_are_transient_but_a_streak_is_instability():
    ctrl = Controller(gg.Stability(bad_steps=3))
    flags = [0] * 30
    for k in (5, 9, 12, 13, 20):  # bad batches, never three in a row
        flags[k] = 1
    assert not any(v.unstable for v in feed(ctrl, [1.0] * 30, flags))
    v = feed(ctrl, [math.nan] * 3, [1, 1, 1], start=30)
    assert [x.unstable is not None for x in v] == [False, False, True]
    assert "3 steps in a row with NaN/Inf" in v[-1].unstable


def test_a_flag_streak_is_instability_only_before_a_loss_level_exists():
    early = Controller(gg.Stability(bad_steps=3))
    v = feed(early, [5.0, 9.0, 30.0], [1, 1, 1])  # exploding from step one
    assert "before any loss history" in v[-1].unstable
    # Later, a run of gradient-norm spikes with a healthy loss (an RNN's heavy tails)
    late = Controller(gg.Stability(bad_steps=3))
    feed(late, [1.0] * 30)
    assert not any(x.unstable for x in feed(late, [1.0] * 6, [1] * 6, start=30))


def test_past_the_early_phase_a_norm_spike_streak_counts_on_a_model_without_recurrence():
    # Stability.norm_streaks: the guard sets Controller.norm_streaks when it found no
    # recurrent layer; then gradient norms spiking step after step, with the loss not yet
    # moved (a blow-up under way), are instability after the early phase too.
    def late(**kw):
        ctrl = Controller(gg.Stability(**kw))
        ctrl.norm_streaks = True
        feed(ctrl, [1.0] * 30)
        return ctrl

    # With finite losses the streak is judged by what the loss does next (see the overshoot
    # tests below): half a window later it still sits where the streak began.
    ctrl = late()
    v = feed(ctrl, [1.0] * 13, [1, 1, 1] + [0] * 10, start=30)
    assert [x.unstable is not None for x in v] == [False] * 12 + [True]
    assert v[-1].unstable == "3 flagged steps in a row, 3 of them applied (gradient-norm or " \
        "loss spikes), and 10 steps later the loss has not come back (1 before the streak, " \
        "a median of 1 since)"
    # A NaN/Inf loss in the streak is not waited for.
    ctrl = late()
    v = [ctrl.observe(30 + i, x, True, not math.isfinite(x)) for i, x in
         enumerate([1.0, math.inf, 1.0])]
    assert [x.unstable is not None for x in v] == [False, False, True]
    # Skipped steps leave the weights where they were: spikes that go on through skips
    # alone (a damaged weight, a run of bad data) are not the LR's; the streak counts
    # once one of its steps was applied ("auto" applies all but a streak's first).
    ctrl = late()
    assert not any(ctrl.observe(30 + i, 1.0, True, False, skipped=True).unstable
                   for i in range(10))
    ctrl = late()
    v = [ctrl.observe(30 + i, 1.0, i < 3, False, skipped=i == 0) for i in range(13)]
    assert [x.unstable is not None for x in v] == [False] * 12 + [True]
    assert "3 flagged steps in a row, 2 of them applied" in v[-1].unstable
    # A transient decays once its clipped steps bring the run back (a transformer's
    # spike: norms 75, 59, 19, then ordinary); a blow-up keeps climbing. Only a streak
    # whose norm has not fallen below its first counts.
    ctrl = late()
    v = [ctrl.observe(30 + i, 1.0, True, False, skipped=i == 0, grad_norm=g)
         for i, g in enumerate([74.5, 58.8, 18.6])]
    assert not any(x.unstable for x in v)
    ctrl = late()
    v = [ctrl.observe(30 + i, 1.0, True, False, skipped=i == 0, grad_norm=g)
         for i, g in enumerate([3.1, 2.9, 5.5])]
    state = ctrl.state_dict()
    assert state["streak_norm"] == 3.1
    v = feed(ctrl, [1.0] * 10, start=33)
    assert v[-1].unstable is not None and "not falling (3.1 → 5.5)" in v[-1].unstable
    # the switch, and a recurrent model (norm_streaks left False): only the loss's streaks
    for ctrl in (late(norm_streaks=False), Controller(gg.Stability())):
        feed(ctrl, [1.0] * 30)
        assert not any(x.unstable for x in feed(ctrl, [1.0] * 6, [1] * 6, start=30))
    assert not any(x.unstable for x in feed(late(), [1.0] * 8, [1, 1, 0, 1, 1, 0, 1, 1],
                                            start=30))  # never three in a row


def test_a_norm_spike_streak_while_the_loss_falls_off_a_plateau_is_no_instability():
    # Measured losses and norms (held-out mnist1d-silu-nadam at its healthy lr 1e-3, seed
    # 8): 20 steps at chance, then the run starts to learn and its gradient norm grows
    # tenfold; steps 21-24 are flagged (21 skipped). The streak's losses stay under those
    # before it and far under the level: the descent goes on, nothing is blowing up.
    escape = [2.312, 2.315, 2.299, 2.302, 2.315, 2.292, 2.298, 2.301, 2.304, 2.296, 2.297,
              2.293, 2.284, 2.297, 2.324, 2.311, 2.302, 2.314, 2.283, 2.241, 2.164, 2.068,
              1.87, 1.924, 2.385]
    norms = [0.225, 0.206, 0.177, 0.185, 0.16, 0.22, 0.148, 0.239, 0.152, 0.162, 0.213,
             0.247, 0.153, 0.214, 0.168, 0.204, 0.21, 0.177, 0.185, 0.297, 0.603, 1.487,
             1.065, 1.265, 1.873]
    # (held-out digits-vgg-nobn at 10x its LR, seed 0, the test above: it falls off its
    # plateau too, but the streak's losses (steps 20-25) climb back above those before it;
    # its units die two dozen steps later)
    overshoot = [2.311, 2.304, 2.307, 2.319, 2.291, 2.291, 2.302, 2.328, 2.335, 2.314, 2.287,
                 2.337, 2.335, 2.258, 2.306, 2.268, 2.274, 2.169, 2.123, 2.059, 2.201, 2.208,
                 2.42, 2.233, 2.225, 1.981]
    vgg_norms = [0.158, 0.155, 0.178, 0.302, 0.298, 0.202, 0.24, 0.342, 0.3, 0.292, 0.245,
                 0.368, 0.28, 0.279, 0.249, 0.368, 0.386, 0.415, 0.625, 1.032, 3.084, 2.904,
                 5.539, 5.608, 6.011, 3.822]

    def run(losses, grad_norms, first_flag):
        ctrl = Controller(gg.Stability())
        ctrl.norm_streaks = True
        return ctrl, [ctrl.observe(i, v, i >= first_flag, False, skipped=i == first_flag,
                                   grad_norm=g)
                      for i, (v, g) in enumerate(zip(losses, grad_norms, strict=True))]

    ctrl, v = run(escape, norms, 21)
    assert not any(x.unstable for x in v) and ctrl.scale == 1.0
    state = ctrl.state_dict()  # (the streak's losses survive a save: judged alike after it)
    back = Controller(gg.Stability())
    back.norm_streaks = True
    back.load_state_dict(state)
    assert back.streak_losses == ctrl.streak_losses and back.streak_from == ctrl.streak_from
    # (its losses are finite: it counts unless the loss comes back, judged half a window
    # after the streak; the units die first, test_a_cnn_whose_norms_spike_… below)
    ctrl, v = run(overshoot, vgg_norms, 20)
    assert not any(x.unstable for x in v)
    at, before, why, _ = ctrl.overshoot
    assert at == 22 and before == 2.123 and "3 flagged steps in a row, 2 of them applied" in why


def _overshooting(after):
    """A calm run whose norms spike on 3 steps in a row, its loss thrown up from 1.0 (the
    overshoot of an LR near its edge), then ``after`` unflagged losses: the verdicts from
    the streak on, and the controller."""
    ctrl = Controller(gg.Stability())
    ctrl.norm_streaks = True
    gen = np.random.default_rng(0)
    feed(ctrl, 1.0 + 0.05 * gen.standard_normal(30))
    v = [ctrl.observe(30 + i, x, True, False, skipped=i == 0, grad_norm=g)
         for i, (x, g) in enumerate([(1.4, 3.0), (2.1, 4.5), (1.7, 6.0)])]
    return ctrl, v + feed(ctrl, after, start=33)


def test_a_norm_streak_whose_loss_comes_back_is_an_overshoot_not_instability():
    # The catapult (Lewkowycz et al. 2020): the loss is thrown up for a few steps and comes
    # back below where it was. Half a window (10 rows) after the streak the median of the
    # losses since is under the three before it: no cut, no rollback; the verdict says why.
    ctrl, v = _overshooting([1.2, 1.0, 0.9, 0.85, 0.8, 0.8, 0.78, 0.75, 0.74, 0.72])
    assert not any(x.unstable for x in v) and ctrl.scale == 1.0 and ctrl.cuts == 0
    assert [x.recovered is not None for x in v] == [False] * 12 + [True]
    assert "the loss came back" in v[-1].recovered
    assert "not counted" in v[-1].recovered and ctrl.overshoot is None
    # Still above where it began half a window later: the streak counts, as it would have
    # at once, graded as a streak is (the run never trained well here: ×0.1).
    ctrl, v = _overshooting([1.6, 1.5, 1.4, 1.5, 1.45, 1.5, 1.4, 1.45, 1.5, 1.4])
    assert [x.unstable is not None for x in v] == [False] * 12 + [True]
    assert "10 steps later the loss has not come back" in v[-1].unstable
    assert ctrl.scale == pytest.approx(0.1) and ctrl.overshoot is None
    # the streak's rows were the run's, not independent bad batches: they do not raise
    # the bar for the next streak
    assert not any(ctrl.flag_rows)
    # A NaN loss during the wait is answered at once by the NaN streak, not waited out.
    ctrl, _ = _overshooting([1.2])
    v = feed(ctrl, [math.nan] * 3, [1, 1, 1], start=34)
    assert v[-1].unstable is not None and "NaN/Inf" in v[-1].unstable
    # At an LR the guard has cut (a relapse of a run found past its edge) the streak is
    # not waited for: it counts at once.
    ctrl = Controller(gg.Stability())
    ctrl.norm_streaks = True
    feed(ctrl, [1.0] * 30)
    ctrl.unstable(29, "an earlier instability")
    v = [ctrl.observe(30 + i, 1.1, True, False, skipped=i == 0) for i in range(3)]
    assert [x.unstable is not None for x in v] == [False, False, True]
    assert ctrl.overshoot is None and ctrl.scale == pytest.approx(0.01)


def test_a_loss_back_within_its_noise_of_where_it_was_is_an_overshoot_too():
    # Ten rows whose median sits a little above the three losses before the streak, by
    # less than the noise of two medians (z standard errors of their difference): not a
    # loss that stayed up. Measured on the no-harm suite's warm restarts (seed 1): the
    # loss went 2.2 -> 0.42 in the eight steps before the streak, so the three before it
    # were a point on a steep fall, and the ten after came back to 0.91 against 0.82.
    ctrl, _ = _overshooting([])
    before = ctrl.overshoot[1]
    _, _, sigma = ctrl.level()
    margin = 3.0 * 1.2533 * sigma * math.sqrt(1 / 10 + 1 / 3)  # z * SE, on a log scale
    assert 0.02 < margin < 0.2
    v = feed(ctrl, [before * math.exp(margin / 2)] * 10, start=33)
    assert not any(x.unstable for x in v) and ctrl.scale == 1.0 and ctrl.cuts == 0
    assert "came back to within its noise of where it was" in v[-1].recovered
    # Beyond it, the streak counts.
    ctrl, _ = _overshooting([])
    v = feed(ctrl, [before * math.exp(2 * margin)] * 10, start=33)
    assert v[-1].unstable is not None and "the loss has not come back" in v[-1].unstable


def test_a_waited_on_norm_streak_survives_a_save_and_not_a_rollback():
    ctrl, _ = _overshooting([1.2, 1.0])
    state = ctrl.state_dict()
    back = Controller(gg.Stability())
    back.norm_streaks = True
    back.load_state_dict(state)
    assert back.overshoot == ctrl.overshoot and back.overshoot[0] == 32
    later = feed(back, [1.6, 1.5, 1.4, 1.5, 1.45, 1.5, 1.4, 1.45], start=35)
    assert later[-1].unstable is not None and "has not come back" in later[-1].unstable
    # A rollback restores weights from before the streak: the wait was the streak's.
    ctrl, _ = _overshooting([1.2, 1.0])
    ctrl.load_trajectory(ctrl.trajectory())
    assert ctrl.overshoot is None


def test_a_norm_spike_streak_is_judged_against_the_runs_own_rate_of_flags():
    # A run whose norms spike on a third of the steps (heavy tails) needs k in a row with
    # p^k < 1e-3, as for bad batches; the rate survives a save and a rollback.
    ctrl = Controller(gg.Stability())
    ctrl.norm_streaks = True
    gen = np.random.default_rng(0)
    flags = gen.random(250) < 1 / 3
    for i in range(250):
        if i >= 247:
            flags[i] = False  # (no streak running into the test below)
        assert ctrl.observe(i, 1.0 + 0.05 * gen.random(), bool(flags[i]), False).unstable \
            is None or i < 30
    p = ctrl.flag_rate()
    assert 0.25 < p < 0.42 and ctrl.bad_rate() == 0.0
    need = ctrl.streak_needed(p)
    assert need == math.ceil(math.log(1e-3) / math.log(p)) > 3
    fresh = Controller(gg.Stability())
    fresh.load_state_dict(ctrl.state_dict())
    assert fresh.flag_rate() == p
    # a state saved before flag rows were kept: its bad rows (flags too) stand in
    old = {k: v for k, v in ctrl.state_dict().items() if k != "flag_rows"}
    fresh.load_state_dict(old)
    assert list(fresh.flag_rows) == list(ctrl.bad_rows)
    ctrl.load_trajectory(ctrl.trajectory())
    assert ctrl.flag_rate() == p
    # (the early phase's streaks cut the LR: a streak at a cut LR counts at once)
    assert ctrl.scale < 1
    out = [ctrl.observe(250 + i, 1.0, True, False) for i in range(need)]
    assert [v.unstable is not None for v in out] == [False] * (need - 1) + [True]
    assert f"so {need} in a row are needed" in out[-1].unstable
    # the streak found to be instability does not raise the bar for the next one: after
    # the rollback its rows count as unflagged
    ctrl.load_trajectory(ctrl.trajectory())
    assert list(ctrl.flag_rows)[-need:] == [False] * need and ctrl.flag_rate() <= p


def test_scale_falls_by_decrease_and_gives_up_below_floor():
    ctrl = Controller(gg.Stability(decrease=0.5, decrease_far=0.5, floor=0.1))
    scales = []
    for k in range(4):
        v = ctrl.unstable(k, "test")
        scales.append((v.scale, v.give_up))
    assert scales == [(0.5, False), (0.25, False), (0.125, False), (0.125, True)]


def test_probe_after_long_calm_and_relapse_doubles_the_wait():
    cfg = gg.Stability(decrease=0.25, decrease_far=0.25, probe_after=10)
    ctrl = Controller(cfg)
    ctrl.unstable(0, "test")
    assert ctrl.scale == 0.25
    v = feed(ctrl, [1.0] * 10, start=1)
    assert [x.raised for x in v].index(True) == 9 and ctrl.scale == pytest.approx(0.5)
    ctrl.unstable(12, "relapse soon after the raise")
    assert ctrl.scale == pytest.approx(0.125) and ctrl.probe_wait == 20
    v = feed(ctrl, [1.0] * 20, start=13)
    assert [x.raised for x in v].index(True) == 19  # waited twice as long
    # trouble more than a full wait after the raise (step 32) is not a relapse
    feed(ctrl, [1.0] * 19, start=33)
    ctrl.unstable(53, "much later")
    assert ctrl.probe_wait == 20


def test_no_probe_the_run_ends_too_soon_to_answer():
    # A raise that fails shows it in the loss level only over a window of rows: one due
    # with fewer steps than that left is held back, told once, and made again once the
    # run is known to go on long enough.
    cfg = gg.Stability(decrease=0.25, decrease_far=0.25, probe_after=10, window=8,
                       min_losses=4)
    ctrl = Controller(cfg)
    ctrl.ends_at = 20  # rows 0..19
    ctrl.unstable(0, "test")
    v = feed(ctrl, [1.0] * 10, start=1)  # due at row 10: 9 rows left (>= 8), raised
    assert v[-1].raised and ctrl.scale == pytest.approx(0.5)
    ctrl.unstable(11, "relapse")  # the wait doubles to 20
    ctrl.ends_at = 38
    v = feed(ctrl, [1.0] * 24, start=12)  # due at row 31 with 6 rows left (< 8)
    assert [x.held for x in v if x.held is not None] == [6] and v[19].held == 6
    assert not any(x.raised for x in v) and ctrl.scale == pytest.approx(0.125)
    ctrl.ends_at = None  # unknown again: the due probe is made at once
    v = feed(ctrl, [1.0], start=36)
    assert v[0].raised and ctrl.scale == pytest.approx(0.25)
    ctrl.unstable(37, "relapse")  # (the wait doubles to 40)
    ctrl.ends_at = 30  # a run already past the end it was said to have: the number is
    v = feed(ctrl, [1.0] * 40, start=38)  # wrong, and the probe is made as if unknown
    assert v[-1].raised and all(x.held is None for x in v)


def test_probing_never_exceeds_one():
    ctrl = Controller(gg.Stability(decrease=0.5, probe_after=2))
    ctrl.unstable(0, "x")
    feed(ctrl, [1.0] * 50, start=1)
    assert ctrl.scale == 1.0


def test_trajectory_rolls_back_memory_does_not():
    ctrl = Controller(gg.Stability())
    feed(ctrl, list(np.linspace(5, 1, 30)))
    traj = ctrl.trajectory()
    ctrl.unstable(30, "x")
    feed(ctrl, [9.0] * 5, start=31)
    ctrl.load_trajectory(traj)
    assert ctrl.best == traj["best"] and list(ctrl.losses) == traj["losses"]
    assert ctrl.scale == pytest.approx(0.3) and ctrl.instabilities == 1


def test_state_dict_round_trip_decides_identically():
    gen = np.random.default_rng(3)
    losses = np.concatenate([np.exp(gen.normal(0, 0.3, 80)),
                             np.geomspace(1, 50, 40), np.exp(gen.normal(0, 0.3, 200))])
    a = Controller(gg.Stability(probe_after=30))
    feed(a, losses[:100])
    b = Controller(gg.Stability(probe_after=30))
    b.load_state_dict(a.state_dict())
    va = feed(a, losses[100:], start=100)
    vb = feed(b, losses[100:], start=100)
    assert va == vb and a.state_dict() == b.state_dict()


def test_nonfinite_losses_do_not_enter_the_level_bad_batches_do():
    ctrl = Controller(gg.Stability())
    feed(ctrl, [1.0] * 20)
    ctrl.observe(20, math.nan, True, True)
    assert max(ctrl.losses) == 1.0 and len(ctrl.losses) == 20
    ctrl.observe(21, 1e9, True, False)  # a bad batch: one outlier the median ignores
    assert ctrl._shown(ctrl.level()[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [dict(window=2), dict(min_losses=30), dict(rise=0),
                                 dict(decrease=1.0), dict(decrease_far=0), dict(floor=1.5),
                                 dict(bad_steps=0),
                                 dict(warmup="sometimes"), dict(warmup=-1)])
def test_stability_validation(bad):
    with pytest.raises(gg.ConfigError):
        gg.Stability(**bad)


def test_auto_warmup_length_follows_beta2():
    import torch

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert gg.Stability(warmup="auto").warmup_steps(
        torch.optim.AdamW(p, betas=(0.9, 0.95))) == 40
    assert gg.Stability(warmup="auto").warmup_steps(torch.optim.SGD(p, lr=0.1)) == 0
    assert gg.Stability(warmup=7).warmup_steps(torch.optim.SGD(p, lr=0.1)) == 7
    assert gg.Stability(warmup=None).warmup_steps(torch.optim.Adam(p)) == 0


def test_attention_warmup_length_follows_beta1_and_needs_attention():
    import torch

    p = [torch.nn.Parameter(torch.zeros(2))]
    att = gg.Stability(warmup="attention")
    assert att.warmup_steps(torch.optim.AdamW(p, betas=(0.9, 0.95)), attention=True) == 20
    assert att.warmup_steps(torch.optim.Adam(p, betas=(0.5, 0.99)), attention=True) == 4
    assert att.warmup_steps(torch.optim.Adam(p, betas=(0.0, 0.99)), attention=True) == 0
    assert att.warmup_steps(torch.optim.Adam(p), attention=False) == 0
    assert att.warmup_steps(torch.optim.SGD(p, lr=0.1), attention=True) == 0
    assert att.warmup_steps(torch.optim.RAdam(p), attention=True) == 0
    assert gg.Stability(warmup="auto").warmup_steps(torch.optim.RAdam(p)) == 2000
    assert gg.Stability().warmup_steps(torch.optim.Adam(p), attention=True) == 0  # (off)


def test_a_sudden_failure_is_retried_at_the_same_lr_once_a_slow_climb_is_not():
    gen = np.random.default_rng(0)
    ctrl = Controller(gg.Stability(probe_after=50))
    ctrl.can_retry = True
    calm = np.geomspace(3, 1, 60) * np.exp(gen.normal(0, 0.1, 60))
    feed(ctrl, calm)
    for k in range(60, 80):  # a corrupted step: the loss jumps and stays
        hit = ctrl.observe(k, 40.0, False, False)
        if hit.unstable:
            break
    assert hit.retry and hit.scale == 1.0 and ctrl.cuts == 0
    ctrl.can_retry = False  # the guard: this snapshot was retried from already
    v = ctrl.unstable(80, "again, from the same snapshot")
    # the LR's doing now; the run had trained well at it: near its edge, ×0.3
    assert not v.retry and v.scale == pytest.approx(0.3) and ctrl.cuts == 1
    # a slow climb (the LR) is cut at once, as is anything in the early phase
    slow = Controller(gg.Stability(probe_after=50))
    slow.can_retry = True
    feed(slow, calm)
    v = feed(slow, np.geomspace(1, 30, 120), start=60)
    assert not next(x for x in v if x.unstable).retry
    early = Controller(gg.Stability(probe_after=50))
    early.can_retry = True
    assert not feed(early, [5.0, 9.0, 30.0], [1, 1, 1])[-1].retry


def test_the_cut_is_graded_by_how_far_past_its_edge_the_run_is():
    # Near the edge: a run that trained well (loss well under its first) breaks with a
    # streak of spiking losses, before it is settled (no retry in the early phase):
    # decrease (×0.3).
    gen = np.random.default_rng(1)
    near = Controller(gg.Stability(probe_after=500))
    near.can_retry = True
    feed(near, np.geomspace(3, 1, 80) * np.exp(gen.normal(0, 0.1, 80)))
    v = [near.observe(80 + k, 40.0, True, True) for k in range(3)][-1]  # spiking losses
    assert "in a row" in v.unstable and not v.retry and v.scale == pytest.approx(0.3)
    # The same run whose level climbs instead: the LR pushes it uphill, ×0.1.
    climbing = Controller(gg.Stability(probe_after=500))
    feed(climbing, np.geomspace(3, 1, 80) * np.exp(gen.normal(0, 0.1, 80)))
    v = next(x for x in feed(climbing, np.geomspace(1, 30, 100), start=80) if x.unstable)
    assert "rose above its best" in v.unstable and v.scale == pytest.approx(0.1)
    # Far past it: NaN from the first steps, before the run ever trained: a decade.
    far = Controller(gg.Stability())
    v = feed(far, [math.nan] * 3, [1, 1, 1])[-1]
    assert v.unstable and v.scale == pytest.approx(0.1)
    # A run that never got below its first loss and then blows up: far as well.
    flat = Controller(gg.Stability(probe_after=500))
    feed(flat, 2.0 * np.exp(gen.normal(0, 0.05, 60)))
    v = [flat.observe(60 + k, 80.0, True, True) for k in range(3)][-1]
    assert "in a row" in v.unstable and v.scale == pytest.approx(0.1)


def test_at_the_floor_a_run_that_trained_and_progressed_is_rolled_back_not_given_up():
    gen = np.random.default_rng(2)
    cfg = gg.Stability(floor=0.05, probe_after=10_000)
    ctrl = Controller(cfg)
    feed(ctrl, np.geomspace(3, 1, 80) * np.exp(gen.normal(0, 0.1, 80)))  # trained well
    ctrl.scale = 0.1  # two cuts already: the next ×0.3 would be under the floor

    def burst(start):
        return [ctrl.observe(start + k, 40.0, True, True) for k in range(3)][-1]

    v = burst(80)  # progress since the last rollback (the guard's flag): roll back
    assert v.unstable and not v.give_up and v.scale == pytest.approx(0.1)
    assert ctrl.cuts == 0  # held at the floor: no cut counted
    ctrl.progressed = False  # failing again without progress: a loop, give up
    v = burst(83)
    assert v.give_up
    # a run that never trained well gives up at the floor whatever its progress
    flat = Controller(cfg)
    feed(flat, 2.0 * np.exp(gen.normal(0, 0.05, 60)))
    flat.scale = 0.1
    assert [flat.observe(60 + k, 80.0, True, True) for k in range(3)][-1].give_up


def test_a_run_that_climbs_past_its_first_loss_before_it_has_a_best_is_unstable():
    # Mechanism 6 of the stability issue: Adam at 100x its LR takes a transformer from
    # 4.4 to ~15 in two steps and sits there; the first window's level is the wrecked
    # one, so "above its best" never fires. Above the first loss (plus its noise and
    # the regression margin) does, at the first level, as a climb: a decade.
    gen = np.random.default_rng(3)
    wrecked = [4.4, 15.8, 16.3, *(12 * np.exp(gen.normal(0, 0.05, 20)))]
    v = next(x for x in feed(Controller(gg.Stability()), wrecked) if x.unstable)
    assert "above the first loss" in v.unstable and v.scale == pytest.approx(0.1)
    # The same brief early bump that comes back down is not: the level is the median.
    bump = [4.4, 15.8, 16.3, *(4.0 * np.exp(gen.normal(0, 0.05, 60)))]
    assert not any(x.unstable for x in feed(Controller(gg.Stability()), bump))
    # Nor a noisy run whose first loss happened to be a low draw (its noise is σ, not
    # σ/√n): 2.5 σ under a level that then stays flat.
    noisy = [math.exp(-2.5 * 0.5), *np.exp(gen.normal(0, 0.5, 300))]
    assert not any(x.unstable for x in feed(Controller(gg.Stability()), noisy))


def test_a_run_that_gives_back_most_of_a_small_progress_is_unstable():
    # rnn-long at its exploding LR: a tanh RNN's loss falls from chance (ln 4) to ~1.15,
    # then its hidden units saturate and it drifts back to chance for good. Chance is a
    # ceiling for this loss, so it can never rise to 1.5x its best; having given back
    # more than half its progress is the evidence. A climb: the scale falls a decade.
    gen = np.random.default_rng(0)
    noise = lambda n: np.exp(gen.normal(0, 0.02, n))  # noqa: E731
    fall = np.geomspace(math.log(4), 1.15, 40) * noise(40)
    back = np.geomspace(1.15, 1.42, 40) * noise(40)
    verdicts = feed(Controller(gg.Stability()), [math.log(4), *fall, *back])
    first = next(i for i, v in enumerate(verdicts) if v.unstable)
    assert 41 < first <= 81
    assert "gave back most of its progress" in verdicts[first].unstable
    assert verdicts[first].scale == pytest.approx(0.1)
    # The same fall that stays at its plateau is healthy, as is giving back less than half.
    flat = [math.log(4), *fall, *(1.15 * noise(400))]
    assert not any(v.unstable for v in feed(Controller(gg.Stability()), flat))
    part = [math.log(4), *fall, *(np.geomspace(1.15, 1.21, 40) * noise(40)),
            *(1.21 * noise(300))]
    assert not any(v.unstable for v in feed(Controller(gg.Stability()), part))
    # A looser setting lets it give back more before it counts.
    assert not any(v.unstable for v in feed(Controller(gg.Stability(giveback=1.0)),
                                            [math.log(4), *fall, *back]))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), drop=st.floats(0.02, 0.6),
       spread=st.floats(0.0, 0.8))
def test_a_small_progress_then_a_noisy_plateau_is_never_instability(seed, drop, spread):
    # The give-back test acts where progress is small, so it meets the noise most there:
    # a loss that falls a little and then sits at its plateau with batch noise (up to
    # x2.2 per σ) for 1000 steps is never flagged.
    gen = np.random.default_rng(seed)
    curve = np.concatenate([np.geomspace(1.0, 1.0 - drop, 100), np.full(900, 1.0 - drop)])
    losses = curve * np.exp(gen.normal(0, spread, 1000))
    assert not any(v.unstable for v in feed(Controller(gg.Stability()), losses))


def _gives_back(seed=0):
    gen = np.random.default_rng(seed)
    noise = lambda n: np.exp(gen.normal(0, 0.02, n))  # noqa: E731
    fall = np.geomspace(math.log(4), 1.15, 40) * noise(40)
    back = np.geomspace(1.15, 1.42, 40) * noise(40)
    return [math.log(4), *fall], list(back)


def first_unstable(ctrl, losses, start=0):
    """Feed rows until the first instability (the guard would roll back there)."""
    for i, v in enumerate(losses):
        verdict = ctrl.observe(start + i, v, False, False)
        if verdict.unstable:
            return verdict
    raise AssertionError("never unstable")


def test_the_first_give_back_is_answered_by_clipping_and_the_next_by_the_lr():
    # Clipping first (same LR, every later step clipped to the typical norm); when the run
    # gives back its progress again despite that, the LR is cut a decade as before.
    fall, back = _gives_back()
    ctrl = Controller(gg.Stability(), can_clip=True)
    feed(ctrl, fall)
    before = ctrl.trajectory()  # a snapshot's trajectory, for the rollback below
    first = first_unstable(ctrl, back, start=len(fall))
    assert first.clip and first.scale == 1.0 and not first.retry
    assert ctrl.clip_since is not None and ctrl.cuts == 0
    since = ctrl.clip_since
    ctrl.load_trajectory(before)  # the guard rolls back
    again = first_unstable(ctrl, back, start=200)
    assert not again.clip and again.scale == pytest.approx(0.1)
    assert ctrl.clip_since == since and ctrl.cuts == 1
    # Clipping is memory: it survives a save and load.
    fresh = Controller(gg.Stability(), can_clip=True)
    fresh.load_state_dict(ctrl.state_dict())
    assert fresh.clip_since == since
    # Switched off, or without a spike clamp to clip with, the LR is cut at once; a climb
    # the give-back test did not find (1.5x the best) is the LR's too.
    for off in (Controller(gg.Stability(clip_on_giveback=False), can_clip=True),
                Controller(gg.Stability())):
        v = first_unstable(off, [*fall, *back])
        assert not v.clip and v.scale == pytest.approx(0.1) and off.clip_since is None
    gen = np.random.default_rng(1)
    up = [*np.geomspace(2.0, 0.5, 60), *np.geomspace(0.5, 4.0, 60)] * np.exp(
        gen.normal(0, 0.02, 120))
    v = first_unstable(Controller(gg.Stability(), can_clip=True), up)
    assert "rose above its best" in v.unstable and not v.clip and v.scale < 1


def test_a_state_saved_before_clipping_existed_loads_as_not_clipping():
    ctrl = Controller(gg.Stability(), can_clip=True)
    feed(ctrl, [1.0] * 30)
    s = ctrl.state_dict()
    del s["clip_since"]
    ctrl.load_state_dict(s)
    assert ctrl.clip_since is None


@functools.cache
def _rnn_long(seed, clip_recurrent=False, **stability):
    """rnn-long at its exploding LR (1e-2) under a guard: (final loss, guard). Cached: the
    two recurrent tests share the default policy's runs (each ~4 s), and no test changes
    the guard it gets."""
    from gradguard import scenarios

    made = []

    def factory(model, opt, scaler=None):
        made.append(gg.Guard(model, opt, scaler=scaler,
                             policy=gg.Policy(stability=gg.Stability(**stability),
                                              clip_recurrent=clip_recurrent)))
        return made[0]

    return scenarios.run("rnn-long", lr=1e-2, seed=seed, guard=factory).final_loss, made[0]


def _gave_back(guard):
    return any(e.get("clip_all") for e in guard.recorder.events)


def _clipped_after_a_give_back():
    """A controller whose first give-back was answered by clipping, the trajectory to roll
    back to, and the losses that give the progress back again."""
    fall, back = _gives_back()
    ctrl = Controller(gg.Stability(), can_clip=True)
    feed(ctrl, fall)
    before = ctrl.trajectory()
    assert first_unstable(ctrl, back, start=len(fall)).clip
    return ctrl, before, back


def test_a_give_back_that_recurs_at_every_cut_lr_is_not_the_lr_and_never_gives_up():
    # rnn-long at the healthy lr 3e-3, seed 1: the loss dips below chance and returns;
    # after the clip answer, the give-back recurred at ×0.1, ×0.01 and ×0.001 (at those
    # the weights barely move: the restored snapshots sit at that level) and the guard
    # gave up on a run whose unguarded twin learns. At the floor the cuts are taken back
    # and the give-back test stands down; a climb is still judged.
    ctrl, before, back = _clipped_after_a_give_back()
    scales = []
    for attempt in range(4):
        ctrl.load_trajectory(before)  # the guard rolls back
        v = first_unstable(ctrl, back, start=200 + 100 * attempt)
        assert not v.give_up and "gave back most of its progress" in v.unstable
        scales.append(v.scale)
    assert scales == pytest.approx([0.1, 0.01, 0.001, 1.0])
    assert "they are taken back and the give-back test stands down" in v.unstable
    assert ctrl.giveback_off and ctrl.cuts == 0 and ctrl.clip_since is not None
    ctrl.load_trajectory(before)
    assert not any(x.unstable for x in feed(ctrl, back * 3, start=700))  # stood down
    # Stood down, the give-back limit no longer keeps snapshots from being taken either.
    assert ctrl.progress_threshold() == math.inf and ctrl.calm_now()
    # The verdict tells it, and does not call the LR unchanged.
    from gradguard.events import verdict
    from gradguard.record import Recorder
    said = verdict(Recorder([], []), ctrl, 5, 0.003)
    assert "so those cuts were taken back (5 rollbacks in all)" in said, said
    assert "the LR ended where it began" in said and "never changed" not in said
    # Memory: it survives a save and load.
    fresh = Controller(gg.Stability(), can_clip=True)
    fresh.load_state_dict(ctrl.state_dict())
    assert fresh.giveback_off and fresh.giveback_from == ctrl.giveback_from
    # A climb past the best is still the LR's: cut a decade.
    gen = np.random.default_rng(2)
    climb = np.geomspace(1.4, 6.0, 60) * np.exp(gen.normal(0, 0.02, 60))
    v = first_unstable(fresh, climb, start=900)
    assert ("rose above" in v.unstable) and v.scale == pytest.approx(0.1)


def test_only_the_trailing_give_back_cuts_are_taken_back():
    # A NaN streak's cut between give-back cuts is the LR's and stays: the stand-down
    # undoes only the give-back cuts after it.
    ctrl, before, back = _clipped_after_a_give_back()
    ctrl.load_trajectory(before)
    assert first_unstable(ctrl, back, start=200).scale == pytest.approx(0.1)  # give-back
    ctrl.load_trajectory(before)
    nan = feed(ctrl, [math.nan] * 3, flags=[1, 1, 1], start=300)[-1]  # a NaN streak
    assert nan.unstable and nan.scale == pytest.approx(0.01) and ctrl.giveback_from is None
    for start, want in ((400, 0.001), (500, 0.01)):  # give-back cut, then the stand-down
        ctrl.load_trajectory(before)
        v = first_unstable(ctrl, back, start=start)
        assert v.scale == pytest.approx(want) and not v.give_up
    assert ctrl.giveback_off and ctrl.cuts == 2


def test_recurrent_nets_that_give_back_their_progress_learn_better_clipped_than_cut():
    # rnn-long at its exploding LR: the tanh RNN learns a little, then sinks back to
    # chance. Answered by a x0.1 cut it tends to end near chance (too slow at a tenth of
    # the LR); answered by clipping every step to the typical norm it tends to learn.
    # Which seeds do which is chaotic: it changes with the CPU's kernels (one seed learned
    # to 0.007 on one machine and stayed at chance, never clipped, on another), so the
    # claim is tested over six seeds, as the bench does (20 seeds: better on 11, worse
    # on 4; benchmarks/RESULTS.md), not on one seed's path. Without the recurrent clip,
    # which leaves the give-back little to find.
    seeds = range(6)
    clipped = [_rnn_long(s) for s in seeds]
    cut = [_rnn_long(s, clip_on_giveback=False) for s in seeds]
    assert sum(_gave_back(g) for _, g in clipped) >= 2  # the give-back answer is exercised
    assert not any(_gave_back(g) for _, g in cut)
    assert np.median([v for v, _ in clipped]) < np.median([v for v, _ in cut])


def test_recurrent_nets_learn_at_their_exploding_lr_clipped_from_the_first_step():
    # Policy.clip_recurrent (the default): the guard sees the nn.RNN and clips every step
    # to 3x the typical norm from the start, so the cliffs never throw the hidden units
    # into saturation. 20 seeds on the Intel machine: 19 learn (loss < 0.5) against 12
    # with the give-back's clipping alone, median 0.030 against 0.699 (RESULTS.md,
    # "Clipping recurrent nets from the first step"); six seeds here, chaotic paths.
    seeds = range(6)
    on = [_rnn_long(s, clip_recurrent=True) for s in seeds]
    off = [_rnn_long(s)[0] for s in seeds]
    assert all(g._device.clip_ratio == 3.0 and g._host.recurrent == ["rnn"] for _, g in on)
    assert all("recurrent layers (rnn)" in g.verdict() for _, g in on)
    learned = [sum(v < 0.5 for v in losses) for losses in ([v for v, _ in on], off)]
    assert learned[0] >= 4 and learned[0] > learned[1]
    assert np.median([v for v, _ in on]) < np.median(off)


def _spiky_history(ctrl, n, rate, seed=0):
    """n rows of a flat loss whose bad-loss flags (the detectors' word for a spiking
    batch) come independently at about a rate, with no three in a row (so the history
    itself raises nothing) and the first rows clean (the early phase judges any flag
    streak); ends on a clean row. The losses themselves stay flat, so the level test has
    nothing to say whatever the seed."""
    gen = np.random.default_rng(seed)
    bad = gen.random(n) < rate
    bad[:20] = False
    for i in range(2, n):
        bad[i] &= not (bad[i - 1] and bad[i - 2])
    bad[-1] = False
    for i in range(n):
        loss = 1.0 + 0.05 * gen.random()
        assert ctrl.observe(i, loss, bool(bad[i]), bool(bad[i])).unstable is None
    return n


def test_a_streak_of_bad_batches_is_judged_against_the_runs_own_rate_of_them():
    # Mechanism 3 of the stability issue: where a third of the batches spike (label noise),
    # three in a row happen by chance every ~30 steps; k in a row with p^k < 1e-3 do not.
    ctrl = Controller(gg.Stability())
    k = _spiky_history(ctrl, 250, rate=1 / 3)
    assert 0.25 < ctrl.bad_rate() < 0.42
    need = ctrl.streak_needed()
    assert need == math.ceil(math.log(1e-3) / math.log(ctrl.bad_rate()))
    for i in range(need - 1):
        assert ctrl.observe(k + i, 50.0, True, True).unstable is None
    v = ctrl.observe(k + need - 1, 50.0, True, True)
    assert v.unstable is not None and f"{need} in a row are needed" in v.unstable


@pytest.mark.parametrize("rate", [0.0, 0.02, 0.1])
def test_at_ordinary_fault_rates_three_bad_steps_in_a_row_are_instability(rate):
    ctrl = Controller(gg.Stability())
    k = _spiky_history(ctrl, 250, rate=rate, seed=1)
    assert ctrl.streak_needed() == 3
    out = [ctrl.observe(k + i, math.nan, True, True) for i in range(3)]
    assert [v.unstable is not None for v in out] == [False, False, True]
    assert "needed" not in out[-1].unstable


def test_the_bad_batch_rate_survives_a_rollback_and_a_save():
    ctrl = Controller(gg.Stability())
    _spiky_history(ctrl, 250, rate=1 / 3)
    traj = ctrl.trajectory()
    ctrl.load_trajectory(traj)  # a rollback restores the trajectory, not the data's rate
    rate, need = ctrl.bad_rate(), ctrl.streak_needed()
    fresh = Controller(gg.Stability())
    fresh.load_state_dict(ctrl.state_dict())
    assert fresh.bad_rate() == rate and fresh.streak_needed() == need > 3
    old = {k: v for k, v in ctrl.state_dict().items() if k != "bad_rows"}
    fresh.load_state_dict(old)  # a state saved before the rate was kept
    assert fresh.bad_rate() == 0.0 and fresh.streak_needed() == 3


def test_a_streak_found_to_be_instability_does_not_raise_the_bar_for_the_next():
    ctrl = Controller(gg.Stability())
    k = _spiky_history(ctrl, 60, rate=0.0)
    for n in range(4):  # each time: a blow-up, a rollback, two clean rows
        out = [ctrl.observe(k + i, math.nan, True, True) for i in range(3)]
        assert out[-1].unstable is not None and "needed" not in out[-1].unstable, n
        ctrl.load_trajectory(ctrl.trajectory())
        k += 3
        for i in range(2):
            ctrl.observe(k + i, 1.0, False, False)
        k += 2
        assert ctrl.bad_rate() == 0.0 and ctrl.streak_needed() == 3


def test_a_streak_longer_than_the_rate_memory_reads_no_rate():
    ctrl = Controller(gg.Stability(bad_steps=30, probe_after=25))
    _spiky_history(ctrl, 40, rate=0.0)
    for i in range(29):  # flagged rows (the level stays flat: only the streak is tested)
        assert ctrl.observe(40 + i, 1.0, True, True).unstable is None
        assert ctrl.bad_rate() == 0.0
    assert ctrl.observe(69, 1.0, True, True).unstable.startswith("30 steps in a row")


def test_a_zero_loss_changes_units_but_keeps_the_best_level():
    # mlp-corrupt at lr 0.16: an injected unscaled batch scores exactly 0 (huge logits, all
    # right), the level goes linear from there, and the loss then climbs back from its best
    # 0.35 to 1.2: still a regression, judged against the best the run had reached.
    gen = np.random.default_rng(0)
    fall = np.geomspace(2.3, 0.35, 150) * np.exp(gen.normal(0, 0.2, 150))
    flat = 0.35 * np.exp(gen.normal(0, 0.2, 50))
    climb = np.geomspace(0.35, 1.2, 80) * np.exp(gen.normal(0, 0.2, 80))
    ctrl = Controller(gg.Stability())
    assert not any(v.unstable for v in feed(ctrl, np.concatenate([fall, flat])))
    assert ctrl.log_scale
    best_loss = math.exp(ctrl.best)
    verdicts = feed(ctrl, np.concatenate([[0.0], climb]), start=200)
    assert ctrl.log_scale is False
    first = next(i for i, v in enumerate(verdicts) if v.unstable)
    assert "rose above its best" in verdicts[first].unstable
    assert ctrl.best == pytest.approx(best_loss)  # the best level survived the switch


def test_a_loss_below_zero_is_judged_on_a_linear_scale_from_then_on():
    # A log-likelihood that crosses zero: no false alarm from the change of units, and a
    # real climb after it is caught.
    gen = np.random.default_rng(1)
    fall = np.linspace(3.0, -1.0, 300) + gen.normal(0, 0.1, 300)
    flat = -1.0 + gen.normal(0, 0.1, 100)
    ctrl = Controller(gg.Stability())
    assert not any(v.unstable for v in feed(ctrl, np.concatenate([fall, flat])))
    assert ctrl.log_scale is False
    climb = np.linspace(-1.0, 2.0, 60) + gen.normal(0, 0.1, 60)
    assert any(v.unstable for v in feed(ctrl, climb, start=400))


def test_unlike_saved_needs_every_held_loss_above_all_saved_but_the_highest():
    ctrl = Controller(gg.Stability())
    saved = {"losses": [0.1] * 18 + [0.5, 0.8]}
    assert ctrl.unlike_saved(saved, [1.0, 1.1, 0.9]) == (0.1, 1.0)
    # one saved outlier (0.8) is forgiven: a window's single hard batch must not hide a
    # change of data (mlp-aux-switch, noharm.py)
    assert ctrl.unlike_saved(saved, [0.6, 0.7, 0.65]) == (0.1, 0.65)
    assert ctrl.unlike_saved(saved, [1.0, 0.4, 0.9]) is None  # one is not
    assert ctrl.unlike_saved(saved, [1.0, 0.5, 0.9]) is None  # a tie is not above
    # two saved losses above them: not forgiven
    assert ctrl.unlike_saved({"losses": [0.1] * 18 + [1.5, 2.0]}, [1.0, 1.1, 0.9]) is None


def test_saved_bar_is_the_second_highest_saved_loss():
    assert Controller.saved_bar([0.3, 0.9, 0.1, 0.5]) == 0.5
    assert Controller.saved_bar([0.4, 0.4]) == 0.4
    assert Controller.saved_bar([0.2]) == 0.2
    assert Controller.saved_bar([]) == math.inf


def test_unlike_saved_false_alarms_at_the_rank_tests_rate_under_unchanged_data():
    # Exchangeable draws (the held weights on unchanged data): all 3 among the top 4 of
    # the 23 happens with probability C(4, 3) / C(23, 3) = 4 / 1771, whatever the
    # distribution.
    gen = np.random.default_rng(0)
    ctrl = Controller(gg.Stability())
    trials, hits = 40000, 0
    for _ in range(trials):
        draw = np.exp(gen.normal(0, 2.0, 23))  # (heavy spread: decades apart)
        hits += ctrl.unlike_saved({"losses": list(draw[:20])}, list(draw[20:])) is not None
    assert 2 / 1771 < hits / trials < 6 / 1771


def test_no_progress_is_not_judged_after_the_start_is_forgotten():
    # A trained model's first loss on new data is one draw from a wide spread: a lucky
    # low one must not make the verdict say "no progress, try a tenth of the LR".
    gen = np.random.default_rng(1)
    ctrl = Controller(gg.Stability())
    feed(ctrl, np.geomspace(2.3, 0.3, 200) * np.exp(gen.normal(0, 0.1, 200)))
    ctrl.rebaseline()  # (as the guard's change of data does)
    ctrl.forget_start()
    feed(ctrl, np.concatenate([[0.1], 0.5 * np.exp(gen.normal(0, 0.5, 100))]), start=200)
    assert ctrl.first_loss == pytest.approx(0.1)
    assert ctrl.stalled() is None
    fresh = Controller(gg.Stability())
    fresh.load_state_dict(ctrl.state_dict())  # (and it survives a save and load)
    assert fresh.restarted and fresh.stalled() is None
    ctrl.restarted = False  # (the same losses judged as a fresh run's: "no progress")
    assert ctrl.stalled() is not None


def test_stalled_tells_a_run_at_its_starting_level_from_one_that_learned():
    gen = np.random.default_rng(0)
    flat = 2.3 * np.exp(gen.normal(0, 0.3, 300))  # bouncing at chance, noisy
    ctrl = Controller(gg.Stability())
    feed(ctrl, np.concatenate([[2.3], flat]))
    level, first = ctrl.stalled()
    assert first == 2.3 and 1.5 < level < 3.5
    falling = np.geomspace(2.3, 1.2, 300) * np.exp(gen.normal(0, 0.3, 300))
    ctrl = Controller(gg.Stability())
    feed(ctrl, np.concatenate([[2.3], falling]))
    assert ctrl.stalled() is None  # a factor of two below the first loss: progress
    assert Controller(gg.Stability()).stalled() is None  # no level yet: nothing to say


def test_rose_tells_a_stall_after_a_climb_from_one_at_a_lucky_first_loss():
    # A too-high LR that threw the loss to 2.5× its start and left the net at chance (the
    # held-out LayerNorm MLP at lr 1): no instability test fires, the run stalls, and it
    # rose beyond the noise it has now. A too-low LR whose first batch was a low draw
    # (2 σ) stalls too, but never rose: its level sits within its noise of the first loss.
    gen = np.random.default_rng(0)
    climb = 6.0 * np.exp(gen.normal(0, 0.5, 30))
    chance = 2.35 * np.exp(gen.normal(0, 0.02, 300))
    ctrl = Controller(gg.Stability())
    assert not any(v.unstable for v in feed(ctrl, np.concatenate([[2.3], climb, chance])))
    assert ctrl.stalled() is not None
    level, step = ctrl.rose()
    assert 4 < level < 9 and 7 <= step <= 30
    back = Controller(gg.Stability())  # the peak survives a save and load
    back.load_state_dict(ctrl.state_dict())
    assert back.rose() == ctrl.rose()
    old = ctrl.state_dict()
    del old["peak"]  # a state saved before it existed: nothing to say
    back.load_state_dict(old)
    assert back.rose() is None
    slow = Controller(gg.Stability())
    feed(slow, np.concatenate([[2.3 * math.exp(-0.4)], 2.3 * np.exp(gen.normal(0, 0.2, 300))]))
    assert slow.stalled() is not None and slow.rose() is None


def _digits_vgg(seed, steps=200, **stability):
    """A 4-conv CNN without normalisation on the 8×8 digits at SGD-momentum lr 0.3, far
    past its LR (the held-out ``digits-vgg-nobn``): held-out loss and the guard's events."""
    import torch
    from torch import nn

    from gradguard.scenarios import data

    x, y = data.digits()
    x = (x / 16).reshape(len(x), 1, 8, 8)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(64 * 4, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n = int(0.8 * len(x))
    guard = gg.Guard(model, opt, log=None, policy=gg.Policy(stability=gg.Stability(**stability)))
    for _ in range(steps):
        idx = perm[:n][torch.randint(0, n, (32,), generator=gen)]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        guard.step(loss)
    guard.close()
    with torch.no_grad():
        held = float(nn.functional.cross_entropy(model(x[perm[n:]]), y[perm[n:]]))
    return held, [e for e in guard.recorder.events if e["kind"] in ("rollback", "dead_units")]


@pytest.mark.parametrize("seed", [0, 3])
def test_a_cnn_whose_norms_spike_step_after_step_is_answered_and_learns(seed):
    # Its gradient norm climbs ×10 over a few steps, each flagged and applied clipped;
    # unanswered, such steps kill every ReLU (loss at chance, 2.30). The streak's losses
    # are finite, so it is waited on for 10 rows (an overshoot the run recovers from
    # brings the loss back). Which path a seed takes moves with the CPU's kernels and
    # thread count:
    # - seed 0: the loss has not come back, so the streak counts; it is rolled back at a
    #   tenth of its LR and learns;
    # - seed 3, two threads: the loss spikes three times in a row during the wait, and
    #   that streak answers first;
    # - seed 3, one thread: the loss comes back (2.26 → 1.30 by step 32: an overshoot
    #   indeed), then the LR breaks the run again, and its units die (at step 60 in a
    #   process of its own). The dead-units test rolls it back at a tenth of the LR.
    # On every path the run is answered when its units die at the latest, and it learns.
    held, events = _digits_vgg(seed)
    assert held < 0.5
    rolled = {e["step"] for e in events if e["kind"] == "rollback"}
    assert events and all(e["step"] in rolled for e in events)  # (dead units: at once)
    shot = [e for e in events if "flagged steps in a row" in e["message"]]
    assert all("applied (gradient-norm or loss spikes)" in e["message"]
               and "the loss has not come back" in e["message"] for e in shot)


def test_without_norm_streaks_the_dying_cnn_is_still_answered_by_its_dead_units():
    # Unanswered as a streak, the units die; that, before the run trained, is answered too
    # (later). Which test answers first is the run's path, and the path moves with the
    # CPU's kernels (on one AMD EPYC seed 3's loss spikes three times in a row before its
    # units die, and that streak answers it): every seed must be answered, and the seeds
    # whose units die must be answered by their dead units, at the step they are found.
    died = 0
    for seed in (0, 3):
        _, events = _digits_vgg(seed, norm_streaks=False)
        kinds = [e["kind"] for e in events]
        assert "rollback" in kinds
        if "dead_units" in kinds:
            died += 1
            i = kinds.index("dead_units")
            assert kinds[i + 1] == "rollback" and events[i + 1]["step"] == events[i]["step"]
            assert "dead units before the run trained" in events[i + 1]["message"]
    assert died


def test_trained_well_needs_the_best_level_under_the_first_loss_by_a_regressions_margin():
    flat, fell, slight = (Controller(gg.Stability()) for _ in range(3))
    assert not flat.trained_well()  # (no loss yet)
    for i in range(40):
        flat.observe(i, 2.3 + 0.01 * (i % 3), False, False)
        fell.observe(i, 2.3 * 0.9 ** i + 0.05, False, False)
        slight.observe(i, 2.4 - 0.002 * i + 0.01 * (i % 3), False, False)
    assert not flat.trained_well() and fell.trained_well()
    assert not slight.trained_well()  # (2.4 → 2.32: a net at chance, no margin)
    assert not flat.learned() and fell.learned() and not slight.learned()


def test_learned_reads_a_loss_that_falls_fast_before_any_best_exists():
    # mlp-init's bad init (seed 2 at lr 1e-4; its first 12 losses, then a falling tail):
    # the loss falls through spikes; its units die at step 17 while only the output bias
    # learns, and at step 19 the window's median is a third of the first loss. That run
    # has learned (the dead net at chance scores better than its restored weights
    # would): the dead-units rule must leave it alone.
    ctrl = Controller(gg.Stability())
    losses = [3509.4, 62318.6, 60544.3, 13032.7, 22307.8, 4566.1, 5681.7, 1512.6, 1143.3,
              2146.0, 269.9, 275.6, 250.0, 180.0, 150.0, 120.0, 100.0, 80.0, 60.0]
    for i, v in enumerate(losses):
        ctrl.observe(i, v, False, False)
    assert not math.isfinite(ctrl.best) or not ctrl.trained_well()
    assert ctrl.learned()


def _dying_bn_mlp(guarded: bool, steps: int = 150) -> tuple[float, list]:
    """A BatchNorm ReLU MLP under Nesterov SGD at lr 3 on a 4-class synthetic task (seed
    1): its hidden units die in the first tens of steps and the loss sits at chance."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, generator=gen)
    x = torch.randn(512, 16, generator=gen)
    y = (x @ w).argmax(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32),
                          nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=3.0, momentum=0.9, nesterov=True)
    guard = gg.Guard(model, opt, log=None) if guarded else None
    batches = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 512, (32,), generator=batches)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        if guard is not None:
            guard.step(loss)
        else:
            opt.step()
    events = []
    if guard is not None:
        guard.close()
        events = [e for e in guard.recorder.events if e["kind"] in ("dead_units", "rollback",
                                                                     "verdict")]
    model.eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y)), events


def test_units_that_die_before_the_run_trained_are_rolled_back_at_a_lower_lr():
    # Found on a blind held-out case (a BatchNorm CNN under Nesterov at lr 0.1): units
    # killed by the first oversized steps leave a net at chance that no test read as
    # unstable, since its loss never rose above its start for long.
    dead, _ = _dying_bn_mlp(False)
    held, events = _dying_bn_mlp(True)
    assert dead > 1.3  # (chance: ln 4 = 1.39)
    kinds = [e["kind"] for e in events]
    assert kinds[:2] == ["dead_units", "rollback"] and events[0]["step"] == events[1]["step"]
    assert "dead units before the run trained" in events[1]["message"]
    assert held < 0.5
    assert not events[-1]["message"].startswith("stopped learning")


def test_the_second_look_reads_a_change_when_both_directions_point_at_the_data():
    ctrl = Controller(gg.Stability())
    saved = {"losses": [0.3] * 10 + [2.0] * 2 + [0.2] * 8}  # (an outlier above the new ones)
    # above its saved median, and no better than the newer weights: both moved with it
    assert ctrl.moved_with(saved, [1.0, 1.1, 0.9], newer=[0.9, 1.0, 0.8]) == (0.3, 1.0)
    # the newer weights score worse than the older ones: damage in the newer snapshot
    assert ctrl.moved_with(saved, [1.0, 1.1, 0.9], newer=[1.5, 1.6, 1.4]) is None
    # the older weights score as they did when saved: damage in the newer snapshot
    assert ctrl.moved_with(saved, [0.2, 0.25, 0.3], newer=[0.1, 0.1, 0.1]) is None
    # no saved level (the initial weights): nothing to compare
    assert ctrl.moved_with({"losses": []}, [1.0, 1.1, 0.9], newer=[0.5] * 3) is None


def test_restored_weights_are_judged_by_rank_against_their_saved_window():
    ctrl = Controller(gg.Stability())
    saved = {"losses": [0.01 * (1 + i % 5) for i in range(20)], "log_scale": True}
    # every held loss above the highest saved one (0.05): the data changed
    then, now = ctrl.unlike_saved(saved, [0.06, 0.3, 0.25])
    assert then == pytest.approx(0.03) and now == pytest.approx(0.25)
    # one of them within: an outlier batch, or weights that score as they did
    assert ctrl.unlike_saved(saved, [0.2, 0.04, 0.25]) is None
    assert ctrl.unlike_saved(saved, [0.05, 0.3, 0.3]) is None
    # a NaN row, too few saved losses, or none yet: no judgement
    assert ctrl.unlike_saved(saved, [0.2, float("nan"), 0.3]) is None
    assert ctrl.unlike_saved({"losses": [0.01] * 5}, [1.0, 1.0, 1.0]) is None
    assert ctrl.unlike_saved(saved, []) is None
    # a loss that can be negative (a log-likelihood): ranks need no scale
    neg = {"losses": [-2.0 - 0.1 * (i % 3) for i in range(20)], "log_scale": False}
    assert ctrl.unlike_saved(neg, [-1.9, -0.4, -0.6]) is not None
    assert ctrl.unlike_saved(neg, [-2.0, -0.4, -0.6]) is None


def _sgdr(steps=600, period=150, peak=3e-3):
    t = np.arange(steps) % period
    return peak * (1 + np.cos(np.pi * t / period)) / 2


def _restart_losses(seed=0, steps=600):
    # The level a run settles at grows with its LR (Mandt et al. 2017): a floor that falls
    # over training, times 1 + 3·lr/peak, so each warm restart throws the level up ×4 at
    # once, back to what the run had at that LR in the cycle before, then anneals down.
    gen = np.random.default_rng(seed)
    lrs = _sgdr(steps)
    floor = np.geomspace(1.0, 0.05, steps)
    return floor * (1 + 3 * lrs / lrs.max()) * np.exp(gen.normal(0, 0.2, steps)), lrs


@pytest.mark.parametrize("seed", range(5))
def test_a_warm_restart_back_to_an_lr_the_run_trained_at_is_no_instability(seed):
    losses, lrs = _restart_losses(seed)
    ctrl = Controller(gg.Stability())
    assert not any(v.unstable for v in feed(ctrl, losses, lrs=lrs))
    assert ctrl.scale == 1.0
    # Judged against the annealed best alone (no LR told), the first restart is a climb.
    blind = Controller(gg.Stability())
    verdicts = feed(blind, losses)
    first = next(i for i, v in enumerate(verdicts) if v.unstable)
    assert 150 <= first < 200 and "rose above its best" in verdicts[first].unstable


def test_a_restart_that_then_blows_up_is_still_caught():
    losses, lrs = _restart_losses(1)
    gen = np.random.default_rng(7)
    # From the second restart the loss climbs ×100 over 60 steps instead of annealing.
    losses[300:360] = np.geomspace(losses[300], 100 * losses[300], 60) * np.exp(
        gen.normal(0, 0.2, 60))
    ctrl = Controller(gg.Stability())
    verdicts = feed(ctrl, losses[:360], lrs=lrs[:360])
    first = next(i for i, v in enumerate(verdicts) if v.unstable)
    assert 300 < first < 340
    assert "rose above its best at an LR like this one" in verdicts[first].unstable
    assert verdicts[first].scale == pytest.approx(0.1)


def test_the_best_is_the_runs_own_on_constant_and_rising_lrs():
    # A gradual blow-up under a constant LR, and one during a linear warm-up (the LR past
    # any it set a best at): judged at the same row whether or not the LR is told.
    gen = np.random.default_rng(0)
    calm = 2.0 * np.exp(gen.normal(0, 0.2, 60))
    creep = np.geomspace(2.0, 17.0, 100) * np.exp(gen.normal(0, 0.2, 100))
    losses = np.concatenate([calm, creep])
    for lrs in (np.full(160, 0.1), np.linspace(1e-3, 0.1, 160)):
        told, blind = Controller(gg.Stability()), Controller(gg.Stability())
        assert feed(told, losses, lrs=lrs) == feed(blind, losses)
        assert told.reference() == told.best


def test_only_bests_set_since_the_guards_last_scale_change_count():
    losses, lrs = _restart_losses(2)
    ctrl = Controller(gg.Stability())
    feed(ctrl, losses[:149], lrs=lrs[:149])
    ctrl.lr = lrs[148]
    assert ctrl.reference() == ctrl.best  # (a decaying LR: the latest best is in band)
    ctrl.lr = lrs[0]  # back at the peak: the best the run had there
    assert ctrl.reference() > ctrl.best + math.log(2)
    ctrl.lr = lrs[0] * 10  # an LR ten times any best's: the run's best
    assert ctrl.reference() == ctrl.best
    ctrl.unstable(149, "x")  # the guard's own cut: the old bests were at another scale
    ctrl.lr = lrs[0]
    assert ctrl.scale == pytest.approx(0.3) and ctrl.reference() == ctrl.best
    ctrl.not_the_lr()  # and back at the scale they were set at: still another epoch
    assert ctrl.scale == 1.0 and ctrl.reference() == ctrl.best


def test_bests_with_their_lrs_roll_back_and_stay_few():
    losses, lrs = _restart_losses(3)
    ctrl = Controller(gg.Stability())
    feed(ctrl, losses[:140], lrs=lrs[:140])
    traj = ctrl.trajectory()
    assert 1 < len(traj["bests"]) < 60  # (merged: LRs a quarter band apart at least)
    feed(ctrl, losses[140:400], start=140, lrs=lrs[140:400])
    ctrl.load_trajectory(traj)
    assert [list(b) for b in ctrl.bests] == traj["bests"]
    # A state saved before bests were kept with their LRs: judged by the best alone.
    old = {k: v for k, v in ctrl.state_dict().items() if k != "bests"}
    fresh = Controller(gg.Stability())
    fresh.load_state_dict(old)
    fresh.lr = lrs[0]
    assert fresh.bests == [] and fresh.reference() == fresh.best


def test_a_healthy_transformer_under_warm_restarts_is_left_alone(heldout, one_thread):
    # The held-out SGDR transformer at its healthy LR: 30 steps after the restart at step
    # 150 its loss level rose ×2 over the annealed best, and the guard used to roll back
    # and cut ×0.1 (held-out 0.265 → 0.343 at step 200 on this seed). Judged against the
    # best it had at the peak LR in the first cycle, the guard does nothing: every step is
    # the unguarded run's.
    case = heldout.cases()["digits-transformer-sgdr"]
    assert heldout.run(case, "gradguard", 3e-3, 7, 200) == \
        heldout.run(case, "none", 3e-3, 7, 200)
