import pytest
import torch
from torch import nn

from gradguard.doctor import diagnose
from gradguard.doctor.probe import probe
from gradguard.errors import ConfigError


class Attend(nn.Module):
    """Self-attention over each sample's sequence, unbatched ((L, E), one call a sample)
    or batched, with the same weights either way."""

    def __init__(self, batch_first: bool, unbatched: bool):
        super().__init__()
        self.unbatched = unbatched
        self.embed = nn.Linear(1, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        e = self.embed(x[..., None])  # (N, L, 8)
        if self.unbatched:
            outs = [self.mha(s, s, s)[0].mean(0) for s in e]  # each (L, 8)
            return self.head(torch.stack(outs))
        if not self.mha.batch_first:
            e = e.transpose(0, 1)
        a = self.mha(e, e, e)[0]
        return self.head(a.mean(1 if self.mha.batch_first else 0))


def _logit_maxes(model, batch):
    pr = probe(model, batch, nn.CrossEntropyLoss())
    return [lp.attn_logit_max for lp in pr.layers if lp.kind == "attention"]


@pytest.mark.parametrize("batch_first", [False, True])
def test_probe_measures_attention_on_unbatched_inputs(batch_first):
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    batch = (x, (x[:, 0] > 0).long())
    model = Attend(batch_first, unbatched=True)
    per_sample = _logit_maxes(model, batch)
    assert len(per_sample) == 4 and all(v is not None and v > 0 for v in per_sample)
    # The same weights called on the whole batch at once see the same logits.
    batched = Attend(batch_first, unbatched=False)
    batched.load_state_dict(model.state_dict())
    (whole,) = _logit_maxes(batched, batch)
    assert max(per_sample) == pytest.approx(whole, rel=1e-5)


def test_a_per_sample_loss_is_a_config_error_naming_the_fix():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    y = (x[:, 0] > 0).long()
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    loss = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ConfigError, match=r"must return a scalar.*\(32,\).*reduction='mean'"):
        probe(m, (x, y), loss)
    with pytest.raises(ConfigError, match="must return a scalar"):
        diagnose(m, (x, y), loss, torch.optim.SGD(m.parameters(), 0.1), trial_steps=2,
                 lr_iters=5)
