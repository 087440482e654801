import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradguard.graph import computes_attention, leaves, nodes


class _HandAttention(nn.Module):
    """Single-head self-attention written by hand: scaled, masked, with a learned bias."""

    def __init__(self, d: int = 8, bias: bool = True) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.pos = nn.Parameter(torch.zeros(4, 4)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(x.shape[-1], -1)
        s = q @ k.transpose(-2, -1) / x.shape[-1] ** 0.5
        if self.pos is not None:
            s = s + self.pos
        s = s.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ v


class _Fused(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(x.shape[-1], -1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _found(model: nn.Module, x: torch.Tensor) -> bool:
    return computes_attention(nodes(model(x).sum().grad_fn))


@pytest.mark.parametrize("model", [_HandAttention(), _HandAttention(bias=False), _Fused(),
                                   nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)],
                         ids=["by-hand", "by-hand-no-bias", "sdpa", "transformer-layer"])
def test_attention_is_found_however_it_is_written(model):
    assert _found(model, torch.randn(2, 4, 8))


def test_multihead_attention_returning_its_weights_is_found():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    out, _ = mha(x, x, x, need_weights=True)  # (the unfused path: bmm, softmax)
    assert computes_attention(nodes(out.sum().grad_fn))


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.Softmax(-1)),
    nn.Sequential(nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(24, 3), nn.Softmax(-1)),
    nn.LSTM(8, 8, batch_first=True),
], ids=["mlp-softmax", "cnn-softmax", "lstm"])
def test_a_softmax_over_a_layers_output_is_not_attention(model):
    out = model(torch.randn(2, 4, 8))
    out = out[0] if isinstance(out, tuple) else out
    assert not computes_attention(nodes(torch.softmax(out, -1).sum().grad_fn))


def test_a_softmax_over_a_product_of_weights_is_not_attention():
    # (a factorised weight: both operands are parameters, none is computed from the data)
    u, v = nn.Parameter(torch.randn(4, 2)), nn.Parameter(torch.randn(2, 4))
    x = torch.randn(3, 4)
    assert not computes_attention(nodes((x @ torch.softmax(u @ v, -1)).sum().grad_fn))


def test_nodes_and_leaves_walk_the_whole_graph_once():
    lin = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    out = lin(x) + lin(x)  # (the same weights reached twice)
    graph = nodes(out.sum().grad_fn)
    assert len(graph) == len(set(graph))
    assert {id(t) for t in leaves(graph)} == {id(lin.weight), id(lin.bias)}
    out.sum().backward()  # (the metadata outlives backward)
    assert {id(t) for t in leaves(nodes(out.sum().grad_fn))} == {id(lin.weight),
                                                                  id(lin.bias)}


class FlashAttnFunc(torch.autograd.Function):
    """Stands in for the flash-attn package's kernel: only its node's name matters."""

    @staticmethod
    def forward(ctx, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad


def test_third_party_kernels_soft_caps_and_baddbmm_scores_are_attention():
    lin = nn.Linear(8, 24)
    q, k, v = lin(torch.randn(2, 4, 8)).split(8, -1)
    assert computes_attention(nodes(FlashAttnFunc.apply(q, k, v).sum().grad_fn))
    capped = torch.tanh(q @ k.transpose(1, 2) / 30) * 30  # (Gemma-style soft cap)
    assert computes_attention(nodes((torch.softmax(capped, -1) @ v).sum().grad_fn))
    mask = torch.zeros(2, 4, 4)  # (an added term without a gradient, first operand)
    scores = torch.baddbmm(mask, q, k.transpose(1, 2))
    assert computes_attention(nodes(torch.softmax(scores, -1).sum().grad_fn))
    head = torch.addmm(torch.zeros(4, 3), q[0], nn.Parameter(torch.randn(8, 3)))
    assert not computes_attention(nodes(torch.softmax(head, -1).sum().grad_fn))
