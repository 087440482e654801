import math

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.detect import DeadLayers, DepthTrend, Drift, LayerAttribution

CPU = torch.device("cpu")


def feed(det, values):
    det.bind(CPU)
    return [gg.detect.judge(det, float(v)).spike for v in values]


def test_norm_spike_flags_a_sudden_jump_not_noise():
    gen = np.random.default_rng(0)
    noise = list(np.exp(gen.normal(0, 0.2, 60)))
    flags = feed(gg.NormSpike(), [*noise, 50.0, *noise[:5]])
    assert flags[60] and not any(flags[:60]) and not any(flags[61:])


def test_norm_spike_tolerates_a_gradual_rise():
    # early training: the norm rises 3x over 50 steps, smoothly
    flags = feed(gg.NormSpike(), list(np.geomspace(0.4, 1.2, 50)))
    assert not any(flags)


def test_norm_spike_catches_an_explosion_from_step_one():
    flags = feed(gg.NormSpike(), [1.0, 150.0, 2e4, 3e6])
    assert flags[1:] == [True, True, True]


def test_norm_spike_ignores_nonfinite_and_learns_level_shifts():
    det = gg.NormSpike(warmup=5)
    det.bind(CPU)
    for _ in range(20):
        gg.detect.judge(det, 1.0)
    assert not gg.detect.judge(det, math.nan, ok=False).spike and det.count == 20
    assert all(math.isfinite(v) for v in det.buf[:20])
    # a lasting 10x shift is flagged at first, then learned within a window or two
    flags = [gg.detect.judge(det, 10.0).spike for _ in range(300)]
    assert flags[0] and not any(flags[2 * det.window:])


def test_norm_spike_keeps_flagging_a_steady_exponential_blowup():
    # Mechanism 1 of the stability issue: an EMA learned a norm growing 20 %/step as
    # normal; a rolling median lags half a window behind it and keeps flagging.
    gen = np.random.default_rng(0)
    calm = list(np.exp(gen.normal(0, 0.2, 40)))
    flags = feed(gg.NormSpike(), [*calm, *np.geomspace(1.2, 1.2**60, 60)])
    assert not any(flags[:40]) and all(flags[60:])


def test_loss_spike_has_a_noise_floor_for_tiny_losses():
    # Mechanism 7: a loss near zero with a tiny spread; a batch at 5x the median is still
    # a small loss (under 5 % of the first loss above it), not an event.
    gen = np.random.default_rng(0)
    tiny = list(1e-3 * np.exp(gen.normal(0, 0.05, 100)))
    flags = feed(gg.LossSpike(), [1.4, *tiny, 5e-3, *tiny[:10], 0.6])
    assert not any(flags[1:112]) and flags[112]


def test_loss_spike_needs_both_z_and_ratio():
    gen = np.random.default_rng(1)
    base = list(2.0 + 0.05 * gen.normal(size=40))
    det = gg.LossSpike()
    flags = feed(det, [*base, 2.2, 9.0])
    assert not flags[40]  # 4σ but only 10% above the mean
    assert flags[41]


def test_attribution_names_first_deviating_layer_in_forward_order():
    names = ["head.weight", "body.weight", "stem.weight"]
    order = [2, 1, 0]  # stem runs first
    att = LayerAttribution(names, order)
    for _ in range(20):
        att.learn(np.array([1.0, 1.0, 1.0]) * np.exp(np.random.default_rng(0).normal(0, .05, 3)))
    res = att.attribute(np.array([30.0, 30.0, 1.0]))
    assert res.origin == "body.weight"
    assert {n for n, _ in res.top[:2]} == {"head.weight", "body.weight"}
    res = att.attribute(np.array([1.0, 1.0, math.nan]))
    assert res.origin == "stem.weight"


def test_attribution_of_nonfinite_gradients_follows_backpropagation():
    names = ["head.weight", "body.weight", "stem.weight"]
    att = LayerAttribution(names, [2, 1, 0])  # stem runs first
    for _ in range(20):
        att.learn(np.array([1.0, 1.0, 1.0]) * np.exp(np.random.default_rng(0).normal(0, .05, 3)))
    # A NaN that arose in the head's gradient, beside an ordinary deviation in the stem:
    # the NaN is the news, and it is the head's.
    assert att.attribute(np.array([math.nan, 1.0, 30.0])).origin == "head.weight"
    # Arose in the body: backpropagation carried it to the stem, not to the head.
    assert att.attribute(np.array([1.0, math.inf, math.nan])).origin == "body.weight"
    # Everywhere: the gradients cannot place it; the input side is named, as for a spike.
    assert att.attribute(np.array([math.nan] * 3)).origin == "stem.weight"


def test_depth_trend_reports_vanishing_after_patience():
    names = [f"l{i}.weight" for i in range(6)]
    dt = DepthTrend(names, list(range(6)), [True] * 6, threshold=100, patience=3)
    vanishing = np.geomspace(1e-6, 1.0, 6)  # input side tiny
    msgs = [dt.update(vanishing) for _ in range(4)]
    assert msgs[:2] == [None, None] and "vanishing" in msgs[2] and msgs[3] is None
    assert dt.update(np.ones(6)) is None


def test_drift_warns_on_steady_growth():
    d = Drift(window=50, factor=4)
    msgs = [d.update(float(x)) for x in np.geomspace(1, 20, 60)]
    assert any(m and "drifting up" in m for m in msgs)
    d2 = Drift(window=50, factor=4)
    rng = np.random.default_rng(0)
    assert not any(d2.update(float(x)) for x in np.exp(rng.normal(0, 0.3, 200)))


def test_drift_is_quiet_while_the_loss_falls_as_steadily():
    # A net leaving a plateau: its gradient norm grows x20 as its loss falls. The same
    # growth with a flat noisy loss, or one that rises with it, still warns.
    rng = np.random.default_rng(0)
    norms = np.geomspace(1, 20, 60)
    falling = np.linspace(2.0, 0.5, 60) + rng.normal(0, 0.02, 60)
    learning = Drift(window=50, factor=4)
    assert not any(learning.update(float(n), float(v)) for n, v in zip(norms, falling, strict=True))
    for loss in (2.0 + rng.normal(0, 0.05, 60), np.linspace(0.5, 3.0, 60)):
        d = Drift(window=50, factor=4)
        said = [d.update(float(n), float(v)) for n, v in zip(norms, loss, strict=True)]
        assert any(m and "drifting up" in m for m in said)
    # (its window of losses survives a save and load)
    again = Drift(window=50, factor=4)
    again.load_state_dict(learning.state_dict())
    assert list(again.losses) == list(learning.losses)


@pytest.mark.parametrize("bad", [dict(window=2), dict(z_thresh=-1), dict(warmup=0),
                                 dict(warmup=100)])
def test_detector_config_validated(bad):
    with pytest.raises(gg.ConfigError):
        gg.NormSpike(**bad)


def test_norm_spike_learns_a_level_knocked_up_in_the_first_steps():
    # One overshooting first step leaves the run at a 30x higher, steady norm level: the
    # first few steps there are spikes, but the level is learned instead of flagged for ever.
    gen = np.random.default_rng(1)
    later = list(30 * np.exp(gen.normal(0, 0.1, 300)))
    flags = feed(gg.NormSpike(), [1.0, *later])
    assert flags[1]
    assert not any(flags[150:])


def test_loss_spike_catches_a_loss_blowing_up_in_the_first_steps():
    # A too-high LR: the loss goes 4.4 -> 6 -> 11.8 -> 30 in a few steps, before any window
    # exists; with under three losses only a gross jump (×6.25) counts.
    flags = feed(gg.LossSpike(), [4.4, 4.5, 4.3, 6.0, 11.8, 30.0])
    assert flags == [False, False, False, False, True, True]
    assert feed(gg.LossSpike(), [4.4, 12.0])[1] is False  # two batches, ×2.7: noise
    assert feed(gg.LossSpike(), [4.4, 40.0])[1] is True
    # early spikes enter the window: a run that settles at a higher loss stops being flagged
    flags = feed(gg.LossSpike(), [1.0, 1.0, 1.0, *([3.0] * 40)])
    assert any(flags[:13]) and not any(flags[14:])


def test_early_loss_check_stands_down_once_ordinary_losses_swing_past_its_margin():
    # A trained model's batches, each within the early bound, have already fallen and
    # risen 100x: a ratio test of 2.5-6.25x has nothing to judge by, so 0.3 is not an
    # early spike. The same 0.3 after steady losses is one.
    assert feed(gg.LossSpike(), [1e-3, 1e-3, 1e-5, 1e-3, 0.3])[4] is False
    assert feed(gg.LossSpike(), [1e-3, 1e-3, 1.1e-3, 1e-3, 0.3])[4] is True
    # A climb made of unflagged steps is a trend, not noise: it rises but never falls.
    det = gg.LossSpike()
    feed(det, [1.0, 2.4, 5.5, 12.0])
    assert det.rise > 6.25 and det.fall < 1


@pytest.mark.parametrize("make", [gg.NormSpike, gg.LossSpike])
def test_a_stood_down_detector_has_no_early_check_and_keeps_its_late_one(make):
    det = make()
    feed(det, [1.0, 1.0, 1.0])
    assert math.isfinite(det.limits().above)
    det.stand_down()
    assert det.limits().above == math.inf  # early phase: nothing flags
    for _ in range(70):
        gg.detect.judge(det, 1.0)
    assert math.isfinite(det.limits().above)  # the window's own test takes over
    assert gg.detect.judge(det, 1e4).spike


@pytest.mark.parametrize("make", [gg.NormSpike, gg.LossSpike])
def test_early_ratio_none_turns_the_early_check_off_and_keeps_the_late_one(make):
    # For a model known to be trained (fine-tuning): its first batches may differ by
    # decades, and only the window's own noise estimate judges them.
    det = make(early_ratio=None)
    assert feed(det, [1e-3, 1.0, 1e3, 1e-3, 5.0, 1e4, 1e-2, 1.0, 1e-3]) == [False] * 9
    for _ in range(70):
        gg.detect.judge(det, 1.0)
    assert gg.detect.judge(det, 1e4).spike
    det.load_state_dict(det.state_dict())  # its state round-trips like any other
    with pytest.raises(gg.ConfigError, match="early_ratio"):
        make(early_ratio=0.0)


@pytest.mark.parametrize(("det", "spread", "odd"), [
    (gg.NormSpike(), 0.02, 3.5),  # norms: judged divided by the factor
    (gg.LossSpike(), 0.15, 2.0),  # losses: the z-score's std widened by it
])
def test_a_smaller_batch_widens_the_thresholds_by_its_noise_factor(det, spread, odd):
    # A batch of 5 where 64 is usual: sampling noise alone can make its loss and gradient
    # norm up to sqrt(64/5) = 3.6 times further out; a real spike is far beyond that.
    gen = np.random.default_rng(0)
    steady = list(1.0 + spread * gen.standard_normal(40))
    noise = math.sqrt(64 / 5)

    def last_flag(value, factor):
        det.bind(CPU)
        for v in steady:
            gg.detect.judge(det, v)
        return gg.detect.judge(det, value, noise=factor).spike

    assert last_flag(odd, 1.0)  # judged as a full batch: a spike
    assert not last_flag(odd, noise)  # as the 5-sample batch it is: sampling noise
    assert last_flag(50.0, noise)  # a real spike in a small batch is still one


class _AboveLimit:
    """A user's own detector: a fixed bound on the gradient norm."""

    def __init__(self, limit):
        self.limit = limit

    def bind(self, device):
        pass

    def limits(self, noise=1.0):
        return gg.detect.Limits(above=self.limit, typical=self.limit)

    def observe(self, value, ok, spike, noise=1.0):
        return value / self.limit

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_detectors_return_a_typed_flag_and_satisfy_the_protocol():
    for det in (gg.NormSpike(), gg.LossSpike()):
        assert isinstance(det, gg.detect.Detector)
        det.bind(CPU)
        assert det.limits() == (math.inf, math.inf)  # no history: no test, nothing to clamp to
        out = gg.detect.judge(det, 2.0)
        assert isinstance(out, gg.detect.Flag) and not out.spike and out.z == 0.0
        assert det.limits().typical == pytest.approx(2.0)


def test_detector_state_round_trips_and_refuses_a_state_that_does_not_fit():
    gen = np.random.default_rng(0)
    for make in (gg.NormSpike, gg.LossSpike):
        det = make()
        for v in np.exp(gen.normal(0, 0.3, 100)):
            gg.detect.judge(det, float(v))
        twin = make()
        twin.load_state_dict(det.state_dict())
        for v in [*np.exp(gen.normal(0, 0.3, 50)), 40.0, 1.0]:
            assert gg.detect.judge(twin, float(v)) == gg.detect.judge(det, float(v))
        before = twin.state_dict()
        with pytest.raises(gg.ConfigError, match="window"):
            twin.load_state_dict(make(window=32).state_dict())
        with pytest.raises(gg.ConfigError, match="keys"):
            twin.load_state_dict({"buf": before["buf"]})
        after = twin.state_dict()
        assert before == after  # nothing half-loaded


def test_a_users_detector_plugs_into_the_policy():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    policy = gg.Policy(grad_spike=_AboveLimit(5.0), on_spike="clip", stability=None,
                       rollback=None)
    guard = gg.Guard(model, opt, policy=policy, log=None)
    for scale in (1.0, 100.0):
        opt.zero_grad()
        loss = model(torch.randn(8, 4) * scale).pow(2).mean()
        loss.backward()
        info = guard.step(loss)
    assert bool(info.grad_spike) and float(info.clipped_norm) == pytest.approx(5.0, rel=1e-4)
    with pytest.raises(gg.ConfigError, match="grad_spike takes a detector"):
        gg.Policy(grad_spike=lambda v, ok: v)


def test_detectors_by_registered_name():
    # The built-ins are there under their names; a user's detector joins them; a name
    # builds a fresh detector for each policy (no state shared between guards).
    p = gg.Policy(grad_spike="norm_spike", loss_spike="loss_spike")
    assert isinstance(p.grad_spike, gg.NormSpike) and isinstance(p.loss_spike, gg.LossSpike)
    gg.detect.register("above_5", lambda: _AboveLimit(5.0))
    try:
        a, b = gg.Policy(grad_spike="above_5"), gg.Policy(grad_spike="above_5")
        assert isinstance(a.grad_spike, _AboveLimit) and a.grad_spike is not b.grad_spike
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = gg.Guard(model, opt, policy=gg.Policy(grad_spike="above_5", on_spike="clip",
                                                      stability=None, rollback=None), log=None)
        opt.zero_grad()
        model(torch.randn(8, 4) * 100).pow(2).mean().backward()
        assert bool(guard.step().grad_spike)
        gg.detect.register("not_a_detector", lambda: 42)
        with pytest.raises(gg.ConfigError, match="not a detector"):
            gg.Policy(grad_spike="not_a_detector")
    finally:
        gg.detect._REGISTRY.pop("above_5", None)
        gg.detect._REGISTRY.pop("not_a_detector", None)
    with pytest.raises(gg.UnknownNameError, match=r"registered: .*norm_spike"):
        gg.Policy(grad_spike="norm-spike")
    with pytest.raises(gg.ConfigError, match="name"):
        gg.detect.register("", gg.NormSpike)


@pytest.mark.parametrize("make", [gg.NormSpike, gg.LossSpike])
def test_a_detector_state_saved_before_the_stand_down_loads(make):
    det = make()
    feed(det, [1.0, 1.2, 0.9])
    old = {k: v for k, v in det.state_dict().items() if k not in ("lo", "hi", "rise", "fall")}
    twin = make()
    twin.load_state_dict(old)
    assert (twin.rise, twin.fall) == (0.0, 0.0)
    assert gg.detect.judge(twin, 50.0) == gg.detect.judge(det, 50.0)


def _dead_layers() -> DeadLayers:
    # Forward order 0 (w1), 1 (b1), 2 (w2), 3 (b2): an MLP's two layers.
    return DeadLayers(["w1", "b1", "w2", "b2"], [0, 1, 2, 3], streak=3, recent=10)


DEAD = np.array([0.0, 0.0, 0.0, 0.2])  # every hidden unit off: only the output bias learns


def test_dead_layers_warns_once_when_the_gradient_stops_part_way():
    d = _dead_layers()
    for step in range(5):
        assert d.update(step, np.array([1.0, 0.5, 2.0, 0.3])) is None
    assert d.update(5, DEAD) is None and d.update(6, DEAD) is None  # one or two: chance
    msg = d.update(7, DEAD)
    assert msg is not None and "no gradient has reached w2 and 2 tensors before it" in msg
    assert "since step 5 (3 steps in a row) while b2 still gets one" in msg
    assert d.update(8, DEAD) is None  # said once per run
    assert d.first == 5
    for step in range(9, 20):
        d.update(step, DEAD)
    assert d.ended() == ("w2", "b2", 3, 5)


def test_dead_layers_restart_reports_a_new_episode_and_recently_sees_a_flicker():
    d = _dead_layers()
    d.update(0, np.ones(4))
    assert not d.recently()
    for step in (1, 2):
        d.update(step, DEAD)
    assert d.update(3, DEAD) is not None and d.first == 1
    d.restart()  # (the weights went back to before the episode)
    assert d.first is None and d.ended() is None and not d.recently()
    assert d.update(4, DEAD) is None and d.update(5, DEAD) is None
    assert d.update(6, DEAD) is not None and d.first == 4  # reported afresh
    e = _dead_layers()
    e.update(0, np.ones(4))
    e.update(1, DEAD)  # one dead row among live ones: a dying layer flickers
    for step in range(2, 10):
        e.update(step, np.ones(4))
    assert e.recently()  # (within the last `recent` rows: 10 here)
    e.update(10, np.ones(4))
    e.update(11, np.ones(4))  # (the dead row is now 11 rows back)
    assert not e.recently()
    # Back to the initial weights: tensors count as dead only once they had a gradient
    # again (a zero-initialised output layer passes none on the first step).
    e.restart(initial=True)
    for step in range(12, 16):
        assert e.update(step, DEAD) is None and not e.recently()


def test_dead_layers_streak_spans_rows_that_say_nothing_and_breaks_on_a_live_row():
    d = _dead_layers()
    d.update(0, np.ones(4))
    d.update(1, DEAD)
    d.update(2, DEAD)
    assert d.update(3, np.zeros(4)) is None  # a batch fit exactly: no gradient anywhere
    assert d.update(4, np.array([math.nan, 0, 0, 0.2])) is None  # a NaN row
    assert d.update(5, DEAD) is not None  # the third dead row: the others said nothing
    e = _dead_layers()
    e.update(0, np.ones(4))
    for step, row in enumerate([DEAD, DEAD, np.ones(4), DEAD, DEAD], 1):
        assert e.update(step, row) is None  # a live row in between starts over


def test_dead_layers_is_not_an_unused_frozen_or_never_trained_tensor():
    d = _dead_layers()
    # w1 never had a gradient (a zero-initialised branch before its gate opens): not dead.
    for step in range(10):
        assert d.update(step, np.array([0.0, 0.5, 2.0, 0.3])) is None
    # The first layer got no gradient tensor at all (dropped, an unsampled branch): its
    # norm reads 0, but it was not used, so the gradient did not stop there.
    d.update(10, np.ones(4))
    absent = np.array([False, False, True, True])
    for step in range(11, 20):
        assert d.update(step, np.array([0.0, 0.0, 1.0, 0.3]), absent) is None
    # Frozen (requires_grad False) with its gradient kept as zeros: not dead either.
    for step in range(20, 30):
        assert d.update(step, np.array([0.0, 0.0, 1.0, 0.3]),
                        trainable=lambda i: i >= 2) is None
    assert d.first is None and d.ended() is None


def test_dead_layers_needs_the_input_side_to_stop_not_a_middle_or_output_tensor():
    d = _dead_layers()
    d.update(0, np.ones(4))
    for step in range(1, 10):
        # The output side gets nothing (a head this batch does not use), or one bias
        # underflows to 0 while its weight learns: the gradient reaches the input side.
        assert d.update(step, np.array([1.0, 1.0, 0.0, 0.0])) is None
        assert d.update(step, np.array([1.0, 0.0, 1.0, 1.0])) is None
    assert d.first is None


def test_dead_layers_end_state_reads_most_recent_rows_and_round_trips():
    d = _dead_layers()
    d.update(0, np.ones(4))
    flicker = np.array([1e-9, 1e-9, 1e-9, 0.2])
    for step in range(1, 30):
        # A nearly dead layer: one unit fires on every fourth batch.
        d.update(step, flicker if step % 4 == 0 else DEAD)
    assert d.first == 1 and d.ended() == ("w2", "b2", 3, 1)
    e = _dead_layers()
    e.load_state_dict(d.state_dict())
    assert e.ended() == d.ended() and e.first == 1
    for step in range(30, 36):  # the layer learns again: 6 of the last 10 rows live
        d.update(step, np.ones(4))
    assert d.ended() is None
    other = DeadLayers(["a"], [0])
    other.load_state_dict(d.state_dict())  # saved for other parameters: starts afresh
    assert other.first is None
