"""Models by name: the own 32×32 KD zoo, small digits models, and timm / torchvision adapters."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import nn

from kdforge.errors import KdforgeError
from kdforge.models import small  # noqa: F401 - registers the small models
from kdforge.models.adapters import timm_model, torchvision_model
from kdforge.registry import MODELS

try:  # the 32×32 zoo: one family per module
    from kdforge.models import cifar_resnet, mobilenetv2, shufflenet, vgg, wrn  # noqa: F401
except ImportError:  # pragma: no cover - only while the zoo is being written
    pass


def create_model(name: str, num_classes: int, in_chans: int = 3, checkpoint: str | Path | None = None,
                 image_size: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a model by name (``resnet20``, ``timm:resnet18``, ``torchvision:resnet18``), load weights."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix == "timm":
        model = timm_model(rest, num_classes, in_chans, **kwargs)
    elif sep and prefix == "torchvision":
        model = torchvision_model(rest, num_classes, in_chans, **kwargs)
    elif sep:
        raise KdforgeError(f"unknown model source {prefix!r} in {name!r} (valid: timm:, torchvision:, "
                           "or a name from 'kdforge list models')")
    else:
        factory = MODELS.get(name)
        if image_size is not None and "image_size" in inspect.signature(factory).parameters:
            kwargs.setdefault("image_size", image_size)  # models with a fixed input size (MLP) need it
        try:
            model = factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
        except TypeError as e:
            raise KdforgeError(f"model {name!r}: {e}") from None
    if checkpoint is not None:
        from kdforge.engine.checkpoint import load_weights

        load_weights(model, checkpoint)
    return model


__all__ = ["MODELS", "create_model"]
