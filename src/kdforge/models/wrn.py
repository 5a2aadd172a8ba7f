"""Pre-activation Wide ResNets of the KD benchmarks: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2."""

from __future__ import annotations

from torch import Tensor, nn

from kdforge.models.cifar_resnet import init_weights
from kdforge.registry import MODELS


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus an identity or bias-free 1×1-conv shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        # Not in-place: feature taps keep references to block outputs.
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        # As in the original WRN, a projection shortcut sees the pre-activated input.
        return out + (x if self.downsample is None else self.downsample(act))


class WideResNet(nn.Module):
    """WRN-depth-k: 3×3 stem (16), three pre-act stages of 16k/32k/64k, final BN-ReLU, pool, linear head."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.layer1 = self._stage(widths[0], widths[1], n, 1, drop_rate)
        self.layer2 = self._stage(widths[1], widths[2], n, 2, drop_rate)
        self.layer3 = self._stage(widths[2], widths[3], n, 2, drop_rate)
        # The blocks end un-normalised; this is where the last stage's usable feature map comes from.
        self.post_act = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        self.feature_names = ["stem", "layer1", "layer2", "post_act", "pool"]
        init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int, drop_rate: float) -> nn.Sequential:
        layers = [PreActBlock(in_planes, planes, stride, drop_rate)]
        layers += [PreActBlock(planes, planes, 1, drop_rate) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.post_act(x)))


@MODELS.register("wrn_16_1")
def wrn_16_1(num_classes: int = 100, in_chans: int = 3, **kwargs: float) -> WideResNet:
    """WRN-16-1 (2 blocks per stage, widths 16/32/64)."""
    return WideResNet(16, 1, num_classes, in_chans, **kwargs)


@MODELS.register("wrn_16_2")
def wrn_16_2(num_classes: int = 100, in_chans: int = 3, **kwargs: float) -> WideResNet:
    """WRN-16-2 (2 blocks per stage, widths 32/64/128)."""
    return WideResNet(16, 2, num_classes, in_chans, **kwargs)


@MODELS.register("wrn_40_1")
def wrn_40_1(num_classes: int = 100, in_chans: int = 3, **kwargs: float) -> WideResNet:
    """WRN-40-1 (6 blocks per stage, widths 16/32/64)."""
    return WideResNet(40, 1, num_classes, in_chans, **kwargs)


@MODELS.register("wrn_40_2")
def wrn_40_2(num_classes: int = 100, in_chans: int = 3, **kwargs: float) -> WideResNet:
    """WRN-40-2 (6 blocks per stage, widths 32/64/128)."""
    return WideResNet(40, 2, num_classes, in_chans, **kwargs)
