"""Adapters for models from timm (``timm:NAME``) and torchvision (``torchvision:NAME``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.errors import KdforgeError, closest


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Replace the first Conv2d so it takes ``in_chans`` channels (mean of RGB weights if 1)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels == in_chans:
                return
            new = nn.Conv2d(in_chans, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, mod.groups, mod.bias is not None)
            with torch.no_grad():
                w = mod.weight.mean(1, keepdim=True).repeat(1, in_chans, 1, 1) * (mod.in_channels / in_chans)
                new.weight.copy_(w)
                if mod.bias is not None:
                    new.bias.copy_(mod.bias)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return


def torchvision_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False,
                      **kwargs: Any) -> nn.Module:
    """A torchvision classification model; ``pretrained`` uses its default weights (downloads)."""
    from torchvision import models as tvm

    valid = tvm.list_models(module=tvm)
    if name not in valid:
        raise KdforgeError(f"unknown torchvision model {name!r}{closest(name, valid)}")
    if pretrained:
        model = tvm.get_model(name, weights="DEFAULT", **kwargs)
        head = _head(model)
        if head is not None and head[1].out_features != num_classes:
            setattr(head[0], head[2], nn.Linear(head[1].in_features, num_classes))
    else:
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_chans != 3:
        _adapt_first_conv(model, in_chans)
    if hasattr(model, "layer1"):  # ResNet family
        model.feature_names = ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
        model.num_features = model.fc.in_features
    return model


def _head(model: nn.Module) -> tuple[nn.Module, nn.Linear, str] | None:
    """(parent, linear, attribute) of the classifier of a torchvision model, if found."""
    for attr in ("fc", "classifier", "head", "heads"):
        mod = getattr(model, attr, None)
        if isinstance(mod, nn.Linear):
            return model, mod, attr
        if isinstance(mod, nn.Sequential) and isinstance(mod[-1], nn.Linear):
            return mod, mod[-1], str(len(mod) - 1)
    return None


def timm_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False,
               **kwargs: Any) -> nn.Module:
    """A timm model through ``timm.create_model``; its stage names come from ``feature_info``."""
    try:
        import timm
    except ImportError:
        raise KdforgeError("timm models need the timm package: pip install timm") from None
    if not timm.is_model(name):
        raise KdforgeError(f"unknown timm model {name!r}{closest(name, timm.list_models())}")
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                              in_chans=in_chans, **kwargs)
    info = getattr(model, "feature_info", None)
    if info:
        model.feature_names = [f["module"] for f in info if f.get("module")]
    model.num_features = getattr(model, "num_features", None)
    return model
