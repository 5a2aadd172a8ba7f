"""Classifiers on [−1, 1] images: the frozen feature network of CFD/RDD and the held-out metric network.

``diffusion_featnet`` is a tiny stand-in for DenseNet-201: conv(→32, 3×3) → conv(32→64, 3×3,
stride 2) → BN, giving a 64×4×4 map on 8×8 inputs (more stride-2 convs for 16×16 and 32×32, so the map
is always 4×4, HW = 16 as in the paper). ``diffusion_evalnet`` is a different network whose
penultimate features give the Fréchet distance; it is never the distillation network.
``diffusion_densenet`` is the paper's classifier: a CIFAR-stem DenseNet-201 built from timm's DenseNet
(3×3 stem convolution, no stem BN or max-pool, blocks 6-12-48-32, growth 32), whose final BN map is
1920×4×4 on 32×32 images.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.registry import MODELS


class FeatureNet(nn.Module):
    """The distillation classifier: ``features(x)`` gives the map A (final BN, before ReLU) and v = GAP(ReLU(A))."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, image_size: int = 8, width: int = 32) -> None:
        super().__init__()
        extra = int(math.log2(image_size // 8)) if image_size >= 8 else -1
        if extra < 0 or image_size != 8 * 2 ** extra:
            raise KdforgeError(f"diffusion_featnet takes 8, 16, 32 or 64 pixel images, got {image_size}")
        layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU()]
        for _ in range(extra):
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width)]
        self.body = nn.Sequential(*layers)
        self.channels = 2 * width
        self.fc = nn.Linear(self.channels, num_classes)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(A, v): the 4×4 map and its pooled vector."""
        a = self.body(x)
        return a, F.relu(a).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x)[1])


class EvalNet(nn.Module):
    """The held-out metric classifier: ``embed(x)`` gives its penultimate features."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 24, dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.AdaptiveMaxPool2d(4),
                                  nn.Flatten(), nn.Linear(32 * width, dim), nn.GELU())
        self.fc = nn.Linear(dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features (B, dim)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.embed(x))


@MODELS.register("diffusion_featnet")
def diffusion_featnet(num_classes: int = 10, in_chans: int = 1, image_size: int = 8, width: int = 32) -> FeatureNet:
    """RDD's frozen feature classifier, tiny scale (a 4×4 map of 2·width channels)."""
    return FeatureNet(in_chans, num_classes, image_size, width)


@MODELS.register("diffusion_evalnet")
def diffusion_evalnet(num_classes: int = 10, in_chans: int = 1, width: int = 24, dim: int = 128) -> EvalNet:
    """The held-out classifier whose features score generated images (Fréchet distance, IS, coverage)."""
    return EvalNet(in_chans, num_classes, width, dim)


class CifarDenseNet(nn.Module):
    """A CIFAR-stem DenseNet from timm: ``features(x)`` gives the final BN's map A (before ReLU) and GAP(ReLU(A)).

    timm's ImageNet stem (7×7 stride-2 conv, BN, 3×3 max-pool) becomes one 3×3 stride-1 convolution, as in
    the CIFAR DenseNet of RCFD/RDD's ``classifier/densenet.py``; three transitions halve 32×32 to 4×4.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, growth_rate: int = 32,
                 block_config: tuple[int, ...] = (6, 12, 48, 32)) -> None:
        super().__init__()
        try:
            from timm.models.densenet import DenseNet
        except ImportError:
            raise KdforgeError("diffusion_densenet needs timm: pip install 'kdforge[timm]'") from None
        net = DenseNet(growth_rate=growth_rate, block_config=tuple(block_config), num_classes=num_classes,
                       in_chans=in_chans)
        net.features.conv0 = nn.Conv2d(in_chans, 2 * growth_rate, 3, stride=1, padding=1, bias=False)
        net.features.norm0 = nn.Identity()
        net.features.pool0 = nn.Identity()
        net.features.norm5.act = nn.Identity()  # A is the final BN's output before its ReLU
        self.body = net.features
        self.channels = int(net.num_features)
        self.fc = nn.Linear(self.channels, num_classes)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(A, v): the final BN map and its ReLU-pooled vector."""
        a = self.body(x)
        return a, F.relu(a).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x)[1])


@MODELS.register("diffusion_densenet")
def diffusion_densenet(num_classes: int = 10, in_chans: int = 3, growth_rate: int = 32,
                       block_config: tuple[int, ...] = (6, 12, 48, 32)) -> CifarDenseNet:
    """The paper's feature classifier: CIFAR-stem DenseNet-201 (timm), 1920×4×4 map on 32×32 inputs."""
    return CifarDenseNet(num_classes, in_chans, growth_rate, tuple(block_config))
