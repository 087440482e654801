"""Sequence scenarios: vanilla RNNs on long-range synthetic tasks, and a character-level
transformer language model at a too-high learning rate.

Registered on import by ``gradguard.scenarios``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import Scenario, Setup, register
from . import data as D
from .train import Batch

__all__ = ["ADD_TOLERANCE", "addition", "lee_tokens", "temporal_order"]

# One evaluation set for every seed, drawn from its own stream (never a training seed's), so
# the success rates of different seeds are measured on the same sequences.
EVAL_SEED = 2**31 - 1
# Pascanu et al. 2013 (section 5) count an addition sequence as solved when its squared
# error is below this.
ADD_TOLERANCE = 0.04

Task = Callable[[int, int, torch.Generator], Batch]


def temporal_order(n: int, length: int, gen: torch.Generator) -> Batch:
    """``n`` temporal-order sequences: one-hot inputs (n, length, 6) and class labels (n,).

    Hochreiter & Schmidhuber 1997 (experiment 6a), in the form of Martens & Sutskever 2011
    and Pascanu et al. 2013 (section 5.1): distractors a–d everywhere, except one of the
    relevant symbols X/Y at a random position in [T/10, 2T/10) and another in
    [4T/10, 5T/10). The label is which pair appeared, in order: XX, XY, YX or YY (0–3).
    Symbols are coded 0–3 for a–d, 4 for X and 5 for Y.
    """
    x = torch.randint(0, 4, (n, length), generator=gen)
    t1 = torch.randint(length // 10, 2 * length // 10, (n,), generator=gen)
    t2 = torch.randint(4 * length // 10, 5 * length // 10, (n,), generator=gen)
    s1 = torch.randint(0, 2, (n,), generator=gen)
    s2 = torch.randint(0, 2, (n,), generator=gen)
    rows = torch.arange(n)
    x[rows, t1] = 4 + s1
    x[rows, t2] = 4 + s2
    return F.one_hot(x, 6).float(), 2 * s1 + s2


def addition(n: int, length: int, gen: torch.Generator) -> Batch:
    """``n`` addition sequences: inputs (n, length, 2) and the targets (n, 1).

    Hochreiter & Schmidhuber 1997 (experiment 4), in the form of Pascanu et al. 2013
    (section 5.1): channel 0 holds numbers drawn from U[0, 1], channel 1 marks two of them,
    one in the first tenth of the sequence and one in [T/10, T/2); the target is their sum.
    """
    values = torch.rand(n, length, generator=gen)
    i1 = torch.randint(0, max(length // 10, 1), (n,), generator=gen)
    i2 = torch.randint(max(length // 10, 1), length // 2, (n,), generator=gen)
    rows = torch.arange(n)
    marks = torch.zeros(n, length)
    marks[rows, i1] = 1.0
    marks[rows, i2] = 1.0
    return torch.stack([values, marks], -1), (values[rows, i1] + values[rows, i2])[:, None]


def _stream(task: Task, length: int, seed: int) -> Callable[[int], Iterator[Batch]]:
    """Fresh sequences for ever, reproducible from ``seed``."""

    def data(batch_size: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield task(batch_size, length, gen)

    return data


class _TanhRNN(nn.Module):
    """One tanh RNN layer read out by a linear layer from its last hidden state."""

    def __init__(self, n_in: int, hidden: int, n_out: int, radius: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(n_in, hidden, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(hidden, n_out)
        # torch's uniform init gives a spectral radius near 0.58: gradients vanish over
        # 30 steps and nothing is learned. Past radius 1 they can explode instead: a
        # radius above 1 is necessary for explosion with tanh (Pascanu et al. 2013, 2.1).
        w = torch.randn(hidden, hidden)
        w *= radius / torch.linalg.eigvals(w).abs().max()
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(w)
        # A zero readout makes the first loss the same for every seed (ln 4 for the classes,
        # E[target²] = 7/6 for the sums), and "diverged" is a ratio of the first loss.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(x)[0][:, -1])


def _sgd_momentum(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


# Temporal order: sequence length, hidden units, batch size, recurrent spectral radius
# (1.2 learned the task in 500 steps for more seeds than 1.0 did).
ORDER_T, ORDER_H, ORDER_BATCH, ORDER_RADIUS = 30, 64, 32, 1.2


def _rnn_long(seed: int) -> Setup:
    """A tanh RNN on the temporal-order task at T=30, SGD with momentum.

    Reference: Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent
    neural networks", section 5.1 (task from Hochreiter & Schmidhuber 1997). The paper
    trains on T = 50–200 for up to millions of steps; this is a CPU-sized version: T=30,
    64 units, 500 steps of 32 fresh sequences (at T=50 nothing is learned in 500 steps).
    """
    model = _TanhRNN(6, ORDER_H, 4, ORDER_RADIUS)
    xte, yte = temporal_order(512, ORDER_T, torch.Generator().manual_seed(EVAL_SEED))

    def evaluate(m: nn.Module) -> tuple[float, float | None]:
        out = m(xte)
        return float(F.cross_entropy(out, yte)), float((out.argmax(1) == yte).float().mean())

    return Setup(model, _stream(temporal_order, ORDER_T, seed), ORDER_BATCH, F.cross_entropy,
                 evaluate, _sgd_momentum)


# The first loss is chance, ln 4 (zero readout). A gradient explosion here mostly saturates
# the hidden units (|h| near 1) and leaves the net at chance for good, not at an infinite
# loss: "diverged" means "ends no better than chance", above 0.9 × ln 4 = 1.25. A net that
# has learned only the nearer symbol (success 0.5) sits near ln 2 = 0.69. Higher LRs (0.1+)
# also blow the readout up: held-out loss 2-30.
register(Scenario(
    name="rnn-long",
    summary="tanh RNN, temporal-order task (T=30), SGD+momentum (Pascanu et al. 2013)",
    lr=0.01, steps=500, build=_rnn_long, metric="success",
    lr_grid=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), optimizer="sgd", blowup=0.9,
    reference_loss=math.log(4),
))


# Addition: sequence length, hidden units, batch size, recurrent spectral radius (here 1.0
# learned more than 1.2). At T=30 no LR beat predicting the mean within 500 steps.
ADD_T, ADD_H, ADD_BATCH, ADD_RADIUS = 20, 64, 32, 1.0


def _rnn_add(seed: int) -> Setup:
    """A tanh RNN on the addition task at T=20, SGD with momentum.

    Reference: Pascanu, Mikolov & Bengio 2013, section 5.1 (task from Hochreiter &
    Schmidhuber 1997); success is the share of held-out sequences with squared error below
    0.04, as there. The paper uses T = 50–200 and millions of steps; in 500 steps a tanh
    RNN only starts on this task even at T=20: predicting the mean (1) scores MSE 1/6 and
    success 0.36, and the healthy runs here end near MSE 0.1 and success 0.45.
    """
    model = _TanhRNN(2, ADD_H, 1, ADD_RADIUS)
    xte, yte = addition(512, ADD_T, torch.Generator().manual_seed(EVAL_SEED))

    def evaluate(m: nn.Module) -> tuple[float, float | None]:
        err = (m(xte) - yte) ** 2
        return float(err.mean()), float((err < ADD_TOLERANCE).float().mean())

    return Setup(model, _stream(addition, ADD_T, seed), ADD_BATCH, F.mse_loss, evaluate,
                 _sgd_momentum)


# The default ratio (10) suits: above LR 0.03 the sums' MSE goes to inf within ~5 steps.
register(Scenario(
    name="rnn-add",
    summary="tanh RNN, addition task (T=20), SGD+momentum (Pascanu et al. 2013)",
    lr=0.1, steps=500, build=_rnn_add, metric="success",
    lr_grid=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), optimizer="sgd",
))


@lru_cache(maxsize=1)
def lee_tokens() -> tuple[Tensor, int]:
    """The Lee corpus as character ids (one id per distinct character) and the vocab size."""
    text = D.lee_text()
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    return torch.tensor([vocab[c] for c in text]), len(vocab)


class _Block(nn.Module):
    """A pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.fc_out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        # (3, b, heads, t, d / heads); no LayerNorm on q and k (Wortsman et al.'s qk-layernorm
        # is the fix for the attention-logit growth this scenario reproduces).
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class _CharLM(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, a final LayerNorm, a linear head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.Sequential(*(_Block(d, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        # GPT-2's N(0, 0.02): the first loss is then ln(vocab), the uniform prediction.
        for w in (self.tok.weight, self.pos, *(m.weight for m in self.modules()
                                               if isinstance(m, nn.Linear))):
            nn.init.normal_(w, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        return self.head(self.ln_f(self.blocks(h)))


# Model width, blocks, heads, context length, batch size (sequences), held-out share.
LM_D, LM_LAYERS, LM_HEADS, LM_CONTEXT, LM_BATCH, LM_HELD_OUT = 64, 2, 4, 64, 8, 0.1


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _windows(ids: Tensor, starts: Tensor) -> Batch:
    w = torch.stack([ids[s : s + LM_CONTEXT + 1] for s in starts.tolist()])
    return w[:, :-1], w[:, 1:]


def _lm_char(seed: int) -> Setup:
    """A 2-block pre-LN transformer on the Lee corpus's characters, AdamW without warm-up.

    Reference: Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
    training instabilities", section 3.1.1 (attention-logit growth): without qk-layernorm,
    at a high LR the attention logits grow by orders of magnitude, attention collapses to
    one position and the loss stalls at the unigram level. Measured here after 150 steps,
    the largest attention logit is ~2 at LR 1e-3, ~100 at 1e-2 and ~6000 at 0.1. Their
    models train for 10^5 steps with a warm-up and clip at norm 1; this one trains 150
    steps with neither (d=64, context 64, 8 sequences a batch).
    """
    ids, vocab = lee_tokens()
    cut = int(len(ids) * (1 - LM_HELD_OUT))
    train_ids, test_ids = ids[:cut], ids[cut:]
    model = _CharLM(vocab, LM_D, LM_LAYERS, LM_HEADS, LM_CONTEXT)
    # 64 evenly spaced held-out windows: the same text for every seed.
    xte, yte = _windows(test_ids, torch.linspace(0, len(test_ids) - LM_CONTEXT - 1, 64).long())

    def data(batch_size: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            starts = torch.randint(0, cut - LM_CONTEXT - 1, (batch_size,), generator=gen)
            yield _windows(train_ids, starts)

    def evaluate(m: nn.Module) -> tuple[float, float | None]:
        out = m(xte)
        return float(_lm_loss(out, yte)), float((out.argmax(-1) == yte).float().mean())

    def make_optimizer(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        # Wortsman et al.'s betas; no warm-up and no schedule, on purpose.
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))

    return Setup(model, data, LM_BATCH, _lm_loss, evaluate, make_optimizer)


# The first loss is ln 81 = 4.39 (uniform over the corpus's 81 characters). A blown-up run
# does not go to inf: it settles at the unigram loss (letter frequencies, context ignored:
# 3.08 nats, 0.70 × the first loss). 0.67 counts a run that fails to beat the unigram model
# by ~0.1 nat as diverged; healthy 150-step runs end at 0.58–0.62.
register(Scenario(
    name="lm-char",
    summary="pre-LN char transformer LM on the Lee corpus, AdamW, no warm-up "
            "(Wortsman et al. 2023)",
    lr=0.1, steps=150, build=_lm_char, metric="accuracy",
    lr_grid=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), optimizer="adam", blowup=0.67,
    reference_loss=math.log(81),
))
