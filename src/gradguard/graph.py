"""What an autograd graph says about the model that computed it.

The guard reads the graph of the first forward pass's outputs or of the first loss it is
given, once: autograd's node metadata outlives ``backward()`` (the saved tensors do not),
so the walk needs no device sync and no second forward pass.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["computes_attention", "leaves", "nodes"]

# Fused attention kernels' backward nodes (scaled_dot_product_attention on every backend,
# flex attention, the flash-attn package's FlashAttnFunc, xformers' fMHA): their names
# say what they are.
_FUSED_ATTENTION = re.compile(r"ScaledDotProduct|Attention|Attn|fMHA")
# Between attention scores and their softmax: reshapes, the 1/√d scale, a mask, a bias, a
# tanh soft cap.
_TO_SCORES = {"View", "UnsafeView", "ReshapeAlias", "Reshape", "Expand", "Transpose", "T",
              "Permute", "Clone", "ToCopy", "Squeeze", "Unsqueeze", "Div", "Mul", "Add",
              "Sub", "MaskedFill", "Where", "Neg", "Tanh"}
# Ops that leave a tensor a parameter as far as "is this operand a weight" goes.
_AS_WEIGHT = {"View", "UnsafeView", "ReshapeAlias", "Reshape", "Expand", "Transpose", "T",
              "Permute", "Clone", "ToCopy", "Squeeze", "Unsqueeze", "Select", "Slice",
              "Split", "SplitWithSizes", "Unbind", "Chunk"}
_PRODUCTS = {"Bmm", "Mm", "Baddbmm", "Addmm", "Matmul"}


def nodes(fn: Any) -> list[Any]:
    """Every node of the graph ``fn`` (a tensor's ``grad_fn``, or a list of them)
    reaches, each once."""
    seen: set[Any] = set()
    out: list[Any] = []
    stack = list(fn) if isinstance(fn, list) else [fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        out.append(node)
        stack.extend(nxt for nxt, _ in getattr(node, "next_functions", ()))
    return out


def leaves(graph: list[Any]) -> list[Any]:
    """The leaf tensors (those autograd accumulates a gradient into) of ``graph``."""
    return [v for node in graph if (v := getattr(node, "variable", None)) is not None]


def _kind(node: Any) -> str:
    """``SoftmaxBackward0`` → ``Softmax``; ``_SoftmaxBackward0`` too."""
    return re.sub(r"Backward\d*$", "", type(node).__name__).lstrip("_")


def _is_weight(node: Any, depth: int = 8) -> bool:
    """Whether an operand is a leaf tensor (a weight) seen through reshapes only."""
    for _ in range(depth):
        if node is None:
            return False
        if getattr(node, "variable", None) is not None:
            return True
        if _kind(node) not in _AS_WEIGHT:
            return False
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


def _scores(softmax: Any, depth: int = 8) -> bool:
    """Whether a softmax's input is a product of two computed tensors (q·kᵀ), reached
    through reshapes, a scale, a mask or an added bias: attention scores, not a layer's
    output (x·W, whose one operand is a weight) normalised into probabilities."""
    frontier = [n for n, _ in softmax.next_functions if n is not None]
    for _ in range(depth):
        nxt: list[Any] = []
        for node in frontier:
            kind = _kind(node)
            if kind in _PRODUCTS:
                ops = [n for n, _ in node.next_functions]
                if kind in ("Baddbmm", "Addmm"):
                    ops = ops[1:3]  # (the added term first)
                if len(ops) == 2 and None not in ops and not any(map(_is_weight, ops)):
                    return True
            elif kind in _TO_SCORES:
                nxt.extend(n for n, _ in node.next_functions if n is not None)
        if not nxt:
            return False
        frontier = nxt
    return False


def computes_attention(graph: list[Any]) -> bool:
    """Whether ``graph`` computes dot-product attention: a fused attention kernel, or a
    softmax over the product of two computed tensors (attention written by hand, or
    torch's own math fallback). A weight computed from parameters (a weight-normed or
    parametrized layer, a cosine classifier) counts as computed, so a softmax over such a
    layer's output reads as attention too."""
    for node in graph:
        if _FUSED_ATTENTION.search(type(node).__name__):
            return True
        if _kind(node) in ("Softmax", "SafeSoftmax") and _scores(node):
            return True
    return False
