"""The sequence scenarios: the task generators are right, the unguarded runs blow up at the
scenario's LR and train at a low one."""

import math

import pytest
import torch

from gradguard import scenarios
from gradguard.scenarios import sequence as S

pytestmark = pytest.mark.usefixtures("one_thread")  # sized for one core, as the bench runs them


def test_temporal_order_label_names_the_two_relevant_symbols_in_order():
    x, y = S.temporal_order(256, 30, torch.Generator().manual_seed(0))
    assert x.shape == (256, 30, 6) and y.shape == (256,)
    assert torch.equal(x.sum(-1), torch.ones(256, 30))  # one symbol per step
    sym = x.argmax(-1)
    for row, label in zip(sym, y.tolist(), strict=True):
        pos = (row >= 4).nonzero().flatten().tolist()
        assert len(pos) == 2  # X/Y appear exactly twice, distractors a-d elsewhere
        assert 3 <= pos[0] < 6 and 12 <= pos[1] < 15  # [T/10, 2T/10) and [4T/10, 5T/10)
        assert label == 2 * (int(row[pos[0]]) - 4) + (int(row[pos[1]]) - 4)
    assert set(y.tolist()) == {0, 1, 2, 3}


def test_addition_target_is_the_sum_of_the_two_marked_numbers():
    x, y = S.addition(256, 20, torch.Generator().manual_seed(0))
    assert x.shape == (256, 20, 2) and y.shape == (256, 1)
    values, marks = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    for v, m, target in zip(values, marks, y[:, 0], strict=True):
        pos = m.nonzero().flatten().tolist()
        assert len(pos) == 2
        assert pos[0] < 2 and 2 <= pos[1] < 10  # first tenth, then [T/10, T/2)
        assert math.isclose(float(target), float(v[pos[0]] + v[pos[1]]), rel_tol=1e-6)


def test_batches_are_fresh_and_reproducible_per_seed():
    for name in ("rnn-long", "rnn-add", "lm-char"):
        scn = scenarios.get(name)
        a, b, c = (scn.build(s).data(4) for s in (0, 0, 1))
        first, second = next(a), next(a)
        assert torch.equal(first[0], next(b)[0])  # same seed, same stream
        assert not torch.equal(first[0], second[0])  # new sequences every step
        assert not torch.equal(first[0], next(c)[0])  # another seed, another stream
        assert scn.lr in scn.grid() and list(scn.grid()) == sorted(scn.grid())


def test_rnn_long_stays_at_chance_after_its_explosion_but_learns_at_a_low_lr():
    plain = scenarios.run("rnn-long")
    assert math.isclose(plain.losses[0], math.log(4), rel_tol=1e-5)  # zero readout: chance
    assert plain.diverged and plain.final_metric < 0.4  # four classes: chance is 0.25
    assert max(plain.grad_norms) > 20 * plain.grad_norms[0]  # the explosion
    low = scenarios.run("rnn-long", lr=3e-3)
    assert not low.diverged and low.final_metric > 0.9


def test_rnn_add_explodes_to_inf_but_learns_at_a_low_lr():
    plain = scenarios.run("rnn-add")
    assert plain.diverged and not math.isfinite(plain.final_loss)
    low = scenarios.run("rnn-add", lr=1e-2)
    # predicting the mean sum (1) scores MSE 1/6 and success 1 - 0.8² = 0.36
    assert not low.diverged and low.final_loss < 0.14 and low.final_metric > 0.38


def test_lm_char_stalls_at_the_unigram_loss_at_a_high_lr_but_learns_at_a_low_one():
    plain = scenarios.run("lm-char")
    _, vocab = S.lee_tokens()
    assert vocab == 81 and math.isclose(plain.losses[0], math.log(vocab), abs_tol=0.05)
    # the unigram model of the corpus scores 3.08 nats; the space character is 17% of it
    assert plain.diverged and plain.final_loss > 3.0 and plain.final_metric < 0.18
    low = scenarios.run("lm-char", lr=1e-3)
    assert not low.diverged and low.final_loss < 2.7 and low.final_metric > 0.25
