"""Vision scenarios: a MobileNet-style CNN at too high a learning rate, and fp16 AMP.

Registered on import by ``gradguard.scenarios``. Each run is sized for the bench: about
1-1.5 s of one CPU core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import Scenario, Setup, register
from . import data as D
from .builtin import _classify_eval, _data, _mnist_split, _sgd


class _SeparableBlock(nn.Module):
    """Depthwise 3×3, BN, ReLU, pointwise 1×1, BN; plus a skip when the shape is kept.

    The depthwise-separable block of MobileNets (Howard et al. 2017) with the linear
    bottleneck and residual of MobileNetV2 (Sandler et al. 2018, expansion 1).
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.act = nn.ReLU()  # a module, so the bench's activation swap finds it
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.pw(self.act(self.bn1(self.dw(x)))))
        return x + y if self.skip else y


def _mobilenet(stem_stride: int) -> nn.Sequential:
    """A small MobileNetV2-style net: conv stem, four separable blocks, global pool, linear.

    BatchNorm is in, as in MobileNet, and does not hide the explosion here: BN makes each
    conv scale-invariant, but the residual stream and the classifier are not, so a too-high
    LR still blows up. Measured on the MNIST subset (best LR 0.1): LR 1 ends with a loss of
    1e3-1e15 after ~100 steps, LR 3 goes NaN by step ~30, every seed. The variants it beat:
    without the skips (MobileNet v1 blocks) BN did hide it (accuracy at chance but loss
    finite at 10-30x the best LR; NaN only from ~300x), and without BN the net trained
    worse and blew up within 2-4 steps, before any detector has a history to compare with.
    """
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _SeparableBlock(16, 32, 2), _SeparableBlock(32, 32, 1),
        _SeparableBlock(32, 64, 2), _SeparableBlock(64, 64, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    # torchvision's MobileNetV2 initialisation
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def _cnn_lr(seed: int) -> Setup:
    """A MobileNet-style CNN on MNIST, SGD+momentum (Howard et al. 2017; Sandler et al. 2018)."""
    xtr, ytr, xte, yte = _mnist_split(seed)
    xtr, xte = xtr.view(-1, 1, 28, 28), xte.view(-1, 1, 28, 28)
    return Setup(_mobilenet(stem_stride=2), _data(xtr, ytr, seed), 64, F.cross_entropy,
                 _classify_eval(xte, yte), _sgd(momentum=0.9))


register(Scenario(
    name="cnn-lr",
    summary="MobileNet-style CNN (BN, skips) on the MNIST subset, SGD+momentum, LR 30x too high",
    lr=3.0, steps=150, build=_cnn_lr, metric="accuracy",
    lr_grid=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
))


def _digits_split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y = D.digits()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    tr, te = perm[:1297], perm[1297:]
    # standardised with the training split's statistics: the raw 0-16 scale is not the point
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std).view(-1, 1, 8, 8)
    return x[tr], y[tr], x[te], y[te]


def _cnn_digits(seed: int) -> Setup:
    """The ``cnn-lr`` CNN on sklearn's 8×8 digits, SGD+momentum (Howard et al. 2017)."""
    xtr, ytr, xte, yte = _digits_split(seed)
    return Setup(_mobilenet(stem_stride=1), _data(xtr, ytr, seed), 64, F.cross_entropy,
                 _classify_eval(xte, yte), _sgd(momentum=0.9))


register(Scenario(
    name="cnn-digits",
    summary="the cnn-lr CNN on sklearn 8x8 digits, SGD+momentum, LR 30x too high",
    lr=3.0, steps=150, build=_cnn_digits, metric="accuracy",
    lr_grid=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
))


def _amp_fp16(seed: int) -> Setup:
    """An MNIST MLP in real fp16 autocast with dynamic loss scaling (Micikevicius et al. 2018).

    Not simulated: CPU autocast runs ``linear``/``matmul``/``conv`` in float16 (checked on
    torch 2.13) and ``torch.amp.GradScaler("cpu")`` scales, skips and backs off as on a GPU.
    The LR is too high in fp32 as well; fp16 changes how the failure looks, into the one
    AMP users meet: a hidden activation passes 65504 and the forward pass returns inf, the
    scaler skips every step from then on and halves its scale each time (2^16 to ~1e-8 in
    50 steps), so the weights stay finite but frozen and the loss is NaN to the end.
    """
    xtr, ytr, xte, yte = _mnist_split(seed)
    model = nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    return Setup(model, _data(xtr, ytr, seed), 64, F.cross_entropy, _classify_eval(xte, yte),
                 _sgd(momentum=0.9), amp_dtype=torch.float16)


register(Scenario(
    name="amp-fp16",
    summary="MLP on the MNIST subset in fp16 autocast + GradScaler (real, CPU), SGD+m, high LR",
    lr=1.0, steps=200, build=_amp_fp16, metric="accuracy",
    lr_grid=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
))
