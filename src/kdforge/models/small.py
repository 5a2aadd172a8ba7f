"""Small models for 8×8 digits and quick tests: an MLP and a compact CNN."""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn

from kdforge.registry import MODELS


class MLP(nn.Module):
    """A ReLU multilayer perceptron over flattened images."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, image_size: int = 8,
                 hidden: tuple[int, ...] = (128, 64)) -> None:
        super().__init__()
        dims = [in_chans * image_size * image_size, *hidden]
        self.flatten = nn.Flatten()
        self.body = nn.Sequential(*[m for a, b in pairwise(dims)
                                    for m in (nn.Linear(a, b), nn.ReLU(inplace=True))])
        self.pool = nn.Identity()
        self.fc = nn.Linear(dims[-1], num_classes)
        self.num_features = dims[-1]
        self.feature_names = [f"body.{2 * i + 1}" for i in range(len(hidden))] + ["pool"]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.body(self.flatten(x))))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # not in-place: a tap on the BatchNorm output (a pre-ReLU tap) must keep its negative values
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """Four 3×3 conv layers (widths w, w, 2w, 4w) with two max-pools, a 2×2 average pool, then fc.

    Pooling to 2×2 rather than 1×1 keeps coarse layout, which matters on Fashion-MNIST-like data.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn(in_chans, width)
        self.stage1 = nn.Sequential(_conv_bn(width, width), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv_bn(width, 2 * width), nn.MaxPool2d(2))
        self.stage3 = _conv_bn(2 * width, 4 * width)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(16 * width, num_classes)
        self.num_features = 16 * width
        self.feature_names = ["stem", "stage1", "stage2", "stage3", "pool"]
        #: each stage's BatchNorm output, before its ReLU (stage 1 and 2: before the max-pool too)
        self.pre_relu_taps = {"stem": "stem.1", "stage1": "stage1.0.1", "stage2": "stage2.0.1", "stage3": "stage3.1"}

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.pool(x))


@MODELS.register("mlp")
def mlp(num_classes: int = 10, in_chans: int = 1, image_size: int = 8,
        hidden: tuple[int, ...] = (128, 64), **kwargs: object) -> MLP:
    """MLP for small images (digits: 8×8, one channel)."""
    return MLP(num_classes, in_chans, image_size, tuple(hidden))


@MODELS.register("cnn_small")
def cnn_small(num_classes: int = 10, in_chans: int = 1, width: int = 16, **kwargs: object) -> SmallCNN:
    """Compact CNN (width 16: ~26 k parameters)."""
    return SmallCNN(num_classes, in_chans, width)


@MODELS.register("cnn_tiny")
def cnn_tiny(num_classes: int = 10, in_chans: int = 1, **kwargs: object) -> SmallCNN:
    """Tiny CNN (width 4: ~2 k parameters), a student for quick KD tests."""
    return SmallCNN(num_classes, in_chans, width=4)
