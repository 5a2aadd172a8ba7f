"""CIFAR ResNets of the KD benchmarks: resnet8 … resnet110 (16/32/64), resnet8x4 / resnet32x4 (64/128/256)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdforge.registry import MODELS


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convs, unit-weight zero-bias norms, zero linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus an identity or 1×1-conv+BN shortcut, ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Not in-place: feature taps keep references to block outputs.
        self.relu = nn.ReLU()
        #: the pre-ReLU sum, a tap point (OFD) without parameters
        self.preact = nn.Identity()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.preact(out + identity))


class CifarResNet(nn.Module):
    """3×3 conv stem, three BasicBlock stages (strides 1, 2, 2), global average pool, linear head."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must be (stem, stage1, stage2, stage3), got {tuple(widths)}")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU())
        self.layer1 = self._stage(stem, w1, n, 1)
        self.layer2 = self._stage(w1, w2, n, 2)
        self.layer3 = self._stage(w2, w3, n, 2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(w3, num_classes)
        self.num_features = w3
        self.feature_names = ["stem", "layer1", "layer2", "layer3", "pool"]
        #: each stage's output before its last ReLU, and the BN whose (γ, β) OFD reads for it (the
        #: last block's bn2, the residual ignored, as in the OFD authors' code)
        self.pre_relu_taps = {f"layer{k}": f"layer{k}.{n - 1}.preact" for k in (1, 2, 3)}
        self.bn_before_relu = {f"layer{k}.{n - 1}.preact": f"layer{k}.{n - 1}.bn2" for k in (1, 2, 3)}
        init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@MODELS.register("resnet8")
def resnet8(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-8 (1 block per stage, widths 16/32/64)."""
    return CifarResNet(8, _NARROW, num_classes, in_chans, **kwargs)


@MODELS.register("resnet14")
def resnet14(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-14 (2 blocks per stage, widths 16/32/64)."""
    return CifarResNet(14, _NARROW, num_classes, in_chans, **kwargs)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage, widths 16/32/64)."""
    return CifarResNet(20, _NARROW, num_classes, in_chans, **kwargs)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-32 (5 blocks per stage, widths 16/32/64)."""
    return CifarResNet(32, _NARROW, num_classes, in_chans, **kwargs)


@MODELS.register("resnet44")
def resnet44(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-44 (7 blocks per stage, widths 16/32/64)."""
    return CifarResNet(44, _NARROW, num_classes, in_chans, **kwargs)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage, widths 16/32/64)."""
    return CifarResNet(56, _NARROW, num_classes, in_chans, **kwargs)


@MODELS.register("resnet110")
def resnet110(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-110 (18 blocks per stage, widths 16/32/64)."""
    return CifarResNet(110, _NARROW, num_classes, in_chans, **kwargs)


@MODELS.register("resnet8x4")
def resnet8x4(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-8 ×4 wide (stem 32, stages 64/128/256)."""
    return CifarResNet(8, _WIDE, num_classes, in_chans, **kwargs)


@MODELS.register("resnet32x4")
def resnet32x4(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> CifarResNet:
    """CIFAR ResNet-32 ×4 wide (stem 32, stages 64/128/256)."""
    return CifarResNet(32, _WIDE, num_classes, in_chans, **kwargs)
