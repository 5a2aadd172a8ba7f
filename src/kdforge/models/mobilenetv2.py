"""The CIFAR MobileNetV2 of the KD benchmarks (RepDistiller's ``mobile_half``: expansion 6, width 0.5)."""

from __future__ import annotations

from torch import Tensor, nn

from kdforge.models.cifar_resnet import init_weights
from kdforge.registry import MODELS

# (expansion t or None for the model's, channels c, blocks n, first stride s), grouped into stages by output
# resolution so that each stage output is one of RepDistiller's feature taps.
_Setting = tuple[int | None, int, int, int]
_STAGES: tuple[tuple[_Setting, ...], ...] = (
    ((1, 16, 1, 1), (None, 24, 2, 1)),
    ((None, 32, 3, 2),),
    ((None, 64, 4, 2), (None, 96, 3, 1)),
    ((None, 160, 3, 2), (None, 320, 1, 1)),
)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    # Not in-place: feature taps keep references to stem/head outputs.
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class InvertedResidual(nn.Module):
    """1×1 expand-BN-ReLU, 3×3 depthwise-BN-ReLU, 1×1 linear projection-BN; residual when shapes match."""

    def __init__(self, in_planes: int, planes: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        # The expansion conv is kept even when expansion == 1, as in RepDistiller (it counts in its 0.81 M).
        self.conv1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.use_residual = stride == 1 and in_planes == planes

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stride-2 3×3 stem, four stages of inverted residuals (16×16 … 2×2 at 32×32), 1×1 head, pool, fc."""

    def __init__(self, num_classes: int = 100, in_chans: int = 3, expansion: int = 6,
                 width_mult: float = 0.5) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.stem = _conv_bn_relu(in_chans, channels, 3, stride=2)
        stages: list[nn.Sequential] = []
        for stage in _STAGES:
            blocks: list[nn.Module] = []
            for t, c, n, s in stage:
                out, ratio = int(c * width_mult), expansion if t is None else t
                for j in range(n):
                    blocks.append(InvertedResidual(channels, out, s if j == 0 else 1, ratio))
                    channels = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.head = _conv_bn_relu(channels, last, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(last, num_classes)
        self.num_features = last
        self.feature_names = ["stem", "layer1", "layer2", "layer3", "layer4", "pool"]
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(self.head(x)))


@MODELS.register("mobilenetv2")
def mobilenetv2(num_classes: int = 100, in_chans: int = 3, **kwargs: float) -> MobileNetV2:
    """CIFAR MobileNetV2, expansion 6, width multiplier 0.5 (RepDistiller's ``mobile_half``)."""
    return MobileNetV2(num_classes, in_chans, **kwargs)
