"""The doctor on stock healthy architectures (nothing above info) and on broken setups
(the known root cause, critical): severities rest on what training does, not on ratios."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard import doctor
from gradguard.doctor.entry import load_run
from gradguard.scenarios import data

pytestmark = pytest.mark.usefixtures("one_thread")


# -- data ------------------------------------------------------------------------------


def digits_loader(n: int = 1024, bs: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data.digits()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


def char_batches(t: int = 32, b: int = 16, n: int = 8):
    """Next-character prediction on real English text (the Lee corpus)."""
    text = data.lee_text()[:20_000]
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[c] for c in text])
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(ids) - t - 1, (b,), generator=gen)
        seq = torch.stack([ids[s : s + t + 1] for s in starts])
        out.append((seq[:, :-1], seq[:, 1:]))
    return out, len(vocab)


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# -- healthy architectures -------------------------------------------------------------


class Logits(nn.Module):
    """A Hugging Face model as ``model(input_ids) -> logits``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids).logits


def hf_bert():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, num_labels=3)
    model = Logits(tr.BertForSequenceClassification(cfg))
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        ids = torch.randint(0, 100, (32, 12), generator=gen)
        batches.append((ids, ids[:, 0] % 3))  # learnable: the class is in the first token
    return model, batches, nn.functional.cross_entropy, torch.optim.AdamW(model.parameters(),
                                                                          lr=1e-3)


def hf_gpt2():
    tr = pytest.importorskip("transformers")
    batches, vocab = char_batches()
    torch.manual_seed(0)
    cfg = tr.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    model = Logits(tr.GPT2LMHeadModel(cfg))
    return model, batches, lm_loss, torch.optim.AdamW(model.parameters(), lr=1e-3)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16), Block(16), Block(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x.view(-1, 1, 8, 8))).mean((2, 3)))


def resnet():
    torch.manual_seed(0)
    model = ResNet()
    return model, digits_loader(), nn.functional.cross_entropy, torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9)


class CharLSTM(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.out = nn.Linear(64, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.emb(ids))[0])


def lstm():
    batches, vocab = char_batches()
    torch.manual_seed(0)
    model = CharLSTM(vocab)
    return model, batches, lm_loss, torch.optim.Adam(model.parameters(), lr=3e-3)


def mlp_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return model, digits_loader(), nn.functional.cross_entropy, torch.optim.SGD(
        model.parameters(), lr=0.05)


def mlp_tanh_regression():
    x, y = data.diabetes()
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))
    loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 320, 32)]
    return model, loader, nn.functional.mse_loss, torch.optim.Adam(model.parameters(), lr=1e-3)


HEALTHY = {"hf-bert": hf_bert, "hf-gpt2": hf_gpt2, "resnet": resnet, "lstm": lstm,
           "mlp-relu": mlp_relu, "mlp-tanh-regression": mlp_tanh_regression}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_architectures_have_nothing_above_info(name):
    model, batches, loss_fn, opt = HEALTHY[name]()
    d = doctor.diagnose(model, batches, loss_fn, opt)
    assert d.root_cause is None, str(d)
    assert d.healthy, str(d)
    assert d.measurements["trials"]["as is"]["progress"] > 0.05  # it really trains
    assert "no problem found" in str(d)


def test_stock_bert_attention_gradient_ratio_is_noted_but_not_blamed():
    """At init, attention passes almost no gradient to queries and keys: a huge
    first-to-last gradient ratio that the model trains through."""
    model, batches, loss_fn, opt = hf_bert()
    d = doctor.diagnose(model, batches, loss_fn, opt, lr_test=False)
    (init,) = d.by_check("init")
    assert init.evidence["backward_grad_ratio"] < 1e-3
    assert init.severity == "info" and "not a problem" in init.title
    assert init.fix_code == ""  # nothing for --fix to apply


# -- broken setups ---------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "cause"), [
    ("mlp-init", "init"),  # 10 ReLU layers at 2.5× Kaiming: NaN at step 2
    ("linreg-raw", "input_scale"),  # raw diabetes units, SGD
    ("cnn-lr", "learning_rate"),  # a healthy CNN at 30× its best LR
    ("rnn-long", "recurrent"),  # tanh RNN with spectral radius 1.2
])
def test_broken_scenarios_name_their_root_cause(scenario, cause):
    run = load_run(scenario)
    d = doctor.diagnose(run.model, run.data, run.loss_fn, run.optimizer)
    assert d.root_cause is not None and d.root_cause.check == cause, str(d)
    assert d.root_cause.severity == "critical"
    trial = d.root_cause.evidence["trial"]
    assert not trial["fixed"]["diverged"] and trial["fixed"]["progress"] > 0.05


def test_a_lr_the_range_test_puts_below_divergence_is_critical_when_training_diverges():
    # The range test ramps the LR fast, so its loss diverges late: on cnn-lr it says 3.9,
    # and the scenario's LR 3 trained for real turns NaN within 30 steps.
    run = load_run("cnn-lr")
    d = doctor.diagnose(run.model, run.data, run.loss_fn, run.optimizer)
    (lr,) = d.by_check("learning_rate")
    assert d.measurements["lr_range_test"]["diverges_at"] > lr.evidence["user_lr"]
    assert lr.severity == "critical"
    assert lr.evidence["trial"]["as_is"]["diverged"]
    assert lr.evidence["suggested_lr"] < lr.evidence["user_lr"]


def test_without_an_optimizer_suspicions_are_capped_at_warning():
    run = load_run("mlp-init")
    d = doctor.diagnose(run.model, run.data, run.loss_fn)
    (init,) = d.by_check("init")
    assert init.severity == "warning" and init.evidence["confirmed"] is False
    assert "pass the optimizer" in init.fix
