"""The 32×32 KD model zoo: parameter counts, forward shapes, feature taps and block removal."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from kdforge.models import cifar_resnet, mobilenetv2, shufflenet, vgg, wrn  # noqa: F401  (registers models)
from kdforge.registry import MODELS

# Millions of parameters with 100 classes as published for the KD benchmarks (RepDistiller / CRD tables),
# kept as strings because their rounding is part of the figure. resnet14 and resnet44 are not in those
# tables: test_cifar_resnet_param_count_from_formula checks them (and every depth) by the formula.
PUBLISHED_M = {
    "resnet8": "0.08",
    "resnet20": "0.278",
    "resnet32": "0.47",
    "resnet56": "0.861",
    "resnet110": "1.74",
    "resnet8x4": "1.23",
    "resnet32x4": "7.43",
    "wrn_16_1": "0.18",
    "wrn_16_2": "0.70",
    "wrn_40_1": "0.57",
    "wrn_40_2": "2.25",
    "vgg8": "3.96",
    "vgg13": "9.46",
    "mobilenetv2": "0.81",
    "shufflenetv1": "0.95",
    "shufflenetv2": "1.36",
}
NAMES = sorted([*PUBLISHED_M, "resnet14", "resnet44"])


def _cifar_resnet_formula(depth: int, num_classes: int, in_chans: int = 3, widths: tuple[int, ...] = (16, 16, 32, 64)
                          ) -> int:
    """He et al.'s CIFAR ResNet by hand: 3×3 stem conv + BN, (depth − 2)/6 basic blocks per stage (two bias-free
    3×3 convs, each with a BN of 2·C parameters), a 1×1 conv + BN shortcut where the width or stride changes,
    and a linear head."""
    n = (depth - 2) // 6
    stem, *stages = widths
    total = in_chans * stem * 9 + 2 * stem
    cin = stem
    for i, c in enumerate(stages):
        for b in range(n):
            total += cin * c * 9 + 2 * c + c * c * 9 + 2 * c
            if b == 0 and (cin != c or i > 0):
                total += cin * c + 2 * c
            cin = c
    return total + cin * num_classes + num_classes


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_registered() -> None:
    """Every zoo model is in the registry."""
    missing = [n for n in NAMES if n not in MODELS]
    assert not missing


# resnet14 (n = 2), 100 classes, by hand: stem 432 + 32 = 464; stage 1: 2·(2·2304 + 64) = 9,344;
# stage 2: (4608 + 9216 + 128 + 576) + (2·9216 + 128) = 33,088; stage 3: (18432 + 36864 + 256 + 2176)
# + (2·36864 + 256) = 131,712; fc 6,500 → 181,108. resnet44 (n = 7): 464 + 7·4672 + (14528 + 6·18560)
# + (57728 + 6·73984) + 6500 = 667,188. With 10 classes the fc has 650: −5,850.
@pytest.mark.parametrize(("depth", "num_classes", "expected"), [(14, 100, 181_108), (44, 100, 667_188),
                                                                 (14, 10, 175_258), (44, 10, 661_338),
                                                                 (20, 100, 278_324), (56, 100, 861_620)])
def test_cifar_resnet_param_count_from_formula(depth: int, num_classes: int, expected: int) -> None:
    """resnet14/44 counts from the architecture's formula (worked by hand above), not from the code's output."""
    assert _cifar_resnet_formula(depth, num_classes) == expected
    assert _n_params(MODELS.get(f"resnet{depth}")(num_classes=num_classes, in_chans=3)) == expected


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_param_count(name: str) -> None:
    """Parameter count within 2 % of the published one, or within its rounding (resnet8's '0.08 M')."""
    model = MODELS.get(name)(num_classes=100, in_chans=3)
    published = PUBLISHED_M[name]
    half_last_digit = 0.5 * 10 ** -len(published.partition(".")[2])
    tol = max(0.02 * float(published), half_last_digit)
    assert _n_params(model) / 1e6 == pytest.approx(float(published), abs=tol)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("in_chans", "size", "num_classes"), [(3, 32, 100), (1, 28, 10)])
def test_forward(name: str, in_chans: int, size: int, num_classes: int) -> None:
    """32×32 RGB and 28×28 grey inputs give (B, num_classes) logits."""
    model = MODELS.get(name)(num_classes=num_classes, in_chans=in_chans)
    with torch.no_grad():
        logits = model.eval()(torch.randn(2, in_chans, size, size))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_feature_names(name: str) -> None:
    """feature_names are real modules whose hooks fire in order: 4-D maps, then the (B, D) pool."""
    model = MODELS.get(name)(num_classes=100, in_chans=3)
    modules = dict(model.named_modules())
    assert model.feature_names[-1] == "pool"
    assert all(n in modules for n in model.feature_names)
    assert isinstance(modules["fc"], nn.Linear)
    assert modules["fc"].in_features == model.num_features

    fired: list[tuple[str, Tensor]] = []
    for n in model.feature_names:
        modules[n].register_forward_hook(lambda m, a, out, n=n: fired.append((n, out)))
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 32, 32))
    assert [n for n, _ in fired] == model.feature_names
    for n, out in fired[:-1]:
        assert out.dim() == 4, n
    assert fired[-1][1].shape == (2, model.num_features)


def test_feature_maps_survive_forward() -> None:
    """A tapped map is not overwritten later in the forward (no in-place ops on stage outputs)."""
    model = MODELS.get("resnet20")(num_classes=10).eval()
    kept: dict[str, Tensor] = {}
    for n in model.feature_names:
        model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: kept.__setitem__(n, out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        stem = model.stem(x)
    assert torch.equal(kept["stem"], stem)


def test_remove_block_resnet20() -> None:
    """Deleting a shape-preserving block from its stage leaves a working (trainable) network."""
    model = MODELS.get("resnet20")(num_classes=100)
    before = _n_params(model)
    removed = model.layer1[1]
    del model.layer1[1]
    assert len(model.layer1) == 2
    assert _n_params(model) == before - _n_params(removed)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    logits.sum().backward()
