"""FeatureTaps on own, torchvision and timm models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdforge import FeatureTaps, create_model
from kdforge.errors import KdforgeError
from kdforge.taps import tap_shapes


def test_captures_outputs_in_a_with_block() -> None:
    m = create_model("resnet20", 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureTaps(m, ["layer2", "layer3.2.conv2", "pool"]) as taps:
        logits = m(x)
        assert taps["layer2"].shape == (2, 32, 16, 16)
        assert taps["layer3.2.conv2"].shape == (2, 64, 8, 8)
        assert torch.allclose(m.fc(taps["pool"]), logits)
    assert not m.layer2._forward_hooks  # hooks are gone after the block


def test_inputs_mode_and_detach() -> None:
    m = create_model("resnet8", 10, 3)
    x = torch.randn(2, 3, 32, 32)
    with FeatureTaps(m, ["fc"], mode="input") as ti, FeatureTaps(m, ["pool"], detach=True) as to:
        m(x)
        assert torch.equal(ti["fc"], to["pool"])
        assert not to["pool"].requires_grad and ti["fc"].requires_grad


def test_unknown_name_lists_near_names() -> None:
    m = create_model("resnet20", 10, 3)
    with pytest.raises(KdforgeError, match=r"no module named 'layer4' in CifarResNet; did you mean .*'layer1'"):
        FeatureTaps(m, ["layer4"])


def test_not_fired_yet_is_a_clear_error() -> None:
    taps = FeatureTaps(create_model("mlp", 10, 1), ["pool"])
    with pytest.raises(KdforgeError, match="has not fired"):
        taps["pool"]
    taps.remove()


def test_torchvision_resnet_and_stage_names() -> None:
    m = create_model("torchvision:resnet18", 10, 1)
    shapes = tap_shapes(m, m.feature_names, torch.randn(1, 1, 64, 64))
    assert [s[1] for s in shapes.values()] == [64, 64, 128, 256, 512, 512]


def test_timm_model() -> None:
    pytest.importorskip("timm")
    m = create_model("timm:resnet18", 10, 3)
    shapes = tap_shapes(m, m.feature_names, torch.randn(1, 3, 64, 64))
    assert list(shapes.values())[-1][1] == 512


def test_tuple_outputs_take_the_first_tensor() -> None:
    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
            return x * 2, None

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)[0]

    net = Net()
    with FeatureTaps(net, ["block"]) as t:
        net(torch.ones(3))
        assert torch.equal(t["block"], torch.full((3,), 2.0))
