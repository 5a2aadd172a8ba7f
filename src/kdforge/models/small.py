"""Small models for 8×8 digits and quick tests: an MLP and a compact CNN."""

from __future__ import annotations

from torch import Tensor, nn

from kdforge.registry import MODELS


class MLP(nn.Module):
    """A ReLU multilayer perceptron over flattened images."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, image_size: int = 8,
                 hidden: tuple[int, ...] = (128, 64)) -> None:
        super().__init__()
        dims = [in_chans * image_size * image_size, *hidden]
        self.flatten = nn.Flatten()
        self.body = nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:], strict=True)
                                    for m in (nn.Linear(a, b), nn.ReLU(inplace=True))])
        self.pool = nn.Identity()
        self.fc = nn.Linear(dims[-1], num_classes)
        self.num_features = dims[-1]
        self.feature_names = [f"body.{2 * i + 1}" for i in range(len(hidden))] + ["pool"]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.body(self.flatten(x))))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv stages (width w, 2w, 4w), the middle and last ones strided, then pool + fc."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn(in_chans, width)
        self.stage1 = _conv_bn(width, width)
        self.stage2 = _conv_bn(width, 2 * width, stride=2)
        self.stage3 = _conv_bn(2 * width, 4 * width, stride=2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * width, num_classes)
        self.num_features = 4 * width
        self.feature_names = ["stem", "stage1", "stage2", "stage3", "pool"]

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
    """Compact CNN (width 16: ~24 k parameters)."""
    return SmallCNN(num_classes, in_chans, width)


@MODELS.register("cnn_tiny")
def cnn_tiny(num_classes: int = 10, in_chans: int = 1, **kwargs: object) -> SmallCNN:
    """Tiny CNN (width 4: ~1.7 k parameters), a student for quick KD tests."""
    return SmallCNN(num_classes, in_chans, width=4)
