"""CIFAR ShuffleNetV1 (groups 3) and ShuffleNetV2 (1×) of the KD benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdforge.models.cifar_resnet import init_weights
from kdforge.registry import MODELS


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` equal channel groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1×1, shuffle, dw 3×3, grouped 1×1; plus the input, or concatenated with its pooled input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int,
                 group_first: bool = True) -> None:
        super().__init__()
        self.stride = stride
        # A strided block concatenates its input, so its branch only makes the missing channels.
        branch = out_planes - in_planes if stride == 2 else out_planes
        mid = branch // 4
        # The very first block sees the 24-channel stem, too few to split into groups.
        self.groups1 = groups if group_first else 1
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.groups1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)
        self.relu = nn.ReLU()
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(self.relu(self.bn1(self.conv1(x))), self.groups1)
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """1×1 conv stem (24), three strided stages of ShuffleV1 blocks, pool, linear head."""

    def __init__(self, out_planes: Sequence[int] = (240, 480, 960), num_blocks: Sequence[int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        # Not in-place: feature taps keep references to stage outputs.
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        stages: list[nn.Sequential] = []
        in_planes = 24
        for i, (planes, blocks) in enumerate(zip(out_planes, num_blocks, strict=True)):
            layers = [ShuffleV1Block(in_planes, planes, 2, groups, group_first=i > 0)]
            layers += [ShuffleV1Block(planes, planes, 1, groups) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes
        self.feature_names = ["stem", "layer1", "layer2", "layer3", "pool"]
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


class ShuffleV2Block(nn.Module):
    """Split channels in half, 1×1-dw3×3-1×1 on one half, concatenate, shuffle (shape-preserving)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        half = planes // 2
        self.conv1 = nn.Conv2d(planes - half, planes - half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes - half)
        self.conv2 = nn.Conv2d(planes - half, planes - half, 3, 1, 1, groups=planes - half, bias=False)
        self.bn2 = nn.BatchNorm2d(planes - half)
        self.conv3 = nn.Conv2d(planes - half, planes - half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes - half)
        self.relu = nn.ReLU()
        self.half = half

    def forward(self, x: Tensor) -> Tensor:
        keep, x = x[:, : self.half], x[:, self.half :]
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([keep, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Two strided branches (dw3×3-1×1 and 1×1-dw3×3-1×1), each to half the output, concatenated, shuffled."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        mid = out_planes // 2
        self.conv1 = nn.Conv2d(in_planes, in_planes, 3, 2, 1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_planes, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """3×3 conv stem (24), three stages (a down block then shape-preserving blocks), 1×1 head, pool, fc."""

    def __init__(self, out_planes: Sequence[int] = (116, 232, 464, 1024),
                 num_blocks: Sequence[int] = (3, 7, 3), num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if len(out_planes) != 4 or len(num_blocks) != 3:
            raise ValueError("ShuffleNetV2 needs 4 widths (3 stages + head) and 3 block counts")
        # Not in-place: feature taps keep references to stage outputs.
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        stages: list[nn.Sequential] = []
        in_planes = 24
        for planes, blocks in zip(out_planes[:3], num_blocks, strict=True):
            # As in RepDistiller, num_blocks counts the blocks after each stage's down block.
            stages.append(nn.Sequential(ShuffleV2DownBlock(in_planes, planes),
                                        *[ShuffleV2Block(planes) for _ in range(blocks)]))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Sequential(nn.Conv2d(in_planes, out_planes[3], 1, bias=False),
                                  nn.BatchNorm2d(out_planes[3]), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(out_planes[3], num_classes)
        self.num_features = out_planes[3]
        self.feature_names = ["stem", "layer1", "layer2", "layer3", "pool"]
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.head(x)))


@MODELS.register("shufflenetv1")
def shufflenetv1(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> ShuffleNetV1:
    """CIFAR ShuffleNetV1, groups 3, stages 240/480/960 of 4/8/4 blocks."""
    return ShuffleNetV1(num_classes=num_classes, in_chans=in_chans, **kwargs)


@MODELS.register("shufflenetv2")
def shufflenetv2(num_classes: int = 100, in_chans: int = 3, **kwargs: object) -> ShuffleNetV2:
    """CIFAR ShuffleNetV2 1×, stages 116/232/464 (1+3/1+7/1+3 blocks), head 1024."""
    return ShuffleNetV2(num_classes=num_classes, in_chans=in_chans, **kwargs)
