"""CIFAR VGG with BatchNorm of the KD benchmarks: vgg8 and vgg13.

Layout as in RepDistiller: five conv groups (64, 128, 256, 512, 512), a 2×2 max-pool between the first
four, none before the last (at 32×32 it runs at 4×4), global average pool and one linear layer.

Parameter counts differ from RepDistiller's by the conv biases: RepDistiller keeps a bias on every conv,
which the following BatchNorm cancels, so ours are bias-free. That removes 1,472 parameters from vgg8
(3,963,556 here vs 3,965,028) and 2,944 from vgg13 (9,459,236 vs 9,462,180), both within the rounding
of the published 3.96 M / 9.46 M (100 classes).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdforge.models.cifar_resnet import init_weights
from kdforge.registry import MODELS

_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def _conv_group(in_chans: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        # Not in-place: feature taps keep references to group outputs.
        layers += [nn.Conv2d(in_chans, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        in_chans = w
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Five conv-BN-ReLU groups, a 2×2 max-pool after each of the first three, pool, linear head."""

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if len(cfg) != 5:
            raise ValueError(f"a VGG config has 5 conv groups, got {len(cfg)}")
        self.stem = _conv_group(in_chans, cfg[0])
        self.layer1 = _conv_group(cfg[0][-1], cfg[1])
        self.layer2 = _conv_group(cfg[1][-1], cfg[2])
        self.layer3 = _conv_group(cfg[2][-1], cfg[3])
        self.layer4 = _conv_group(cfg[3][-1], cfg[4])
        self.maxpool = nn.MaxPool2d(2, 2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cfg[4][-1], num_classes)
        self.num_features = cfg[4][-1]
        self.feature_names = ["stem", "layer1", "layer2", "layer3", "layer4", "pool"]
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.stem(x))
        x = self.maxpool(self.layer1(x))
        x = self.maxpool(self.layer2(x))
        x = self.layer4(self.layer3(x))
        return self.fc(self.pool(x))


@MODELS.register("vgg8")
def vgg8(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> VGG:
    """VGG-8 with BN: one conv per group."""
    return VGG(_CFGS["vgg8"], num_classes, in_chans, **kwargs)


@MODELS.register("vgg13")
def vgg13(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> VGG:
    """VGG-13 with BN: two convs per group."""
    return VGG(_CFGS["vgg13"], num_classes, in_chans, **kwargs)
