"""Models by name: the own 32×32 KD zoo, small digits models, and timm / torchvision adapters."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from kdforge.errors import KdforgeError, closest
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
    if sep and prefix in ("timm", "torchvision"):
        build = timm_model if prefix == "timm" else torchvision_model
        model = _one_line(name, kwargs, lambda: build(rest, num_classes, in_chans, **kwargs))
    elif sep:
        raise KdforgeError(f"unknown model source {prefix!r} in {name!r} (valid: timm:, torchvision:, "
                           "or a name from 'kdforge list models')")
    else:
        factory = MODELS.get(name)
        valid = model_kwargs(factory)
        if valid is not None:
            unknown = sorted(k for k in kwargs if k not in valid)
            if unknown:
                raise KdforgeError(f"model {name!r} has no keyword argument {unknown[0]!r}"
                                   f"{closest(unknown[0], valid)} (valid kwargs: {', '.join(sorted(valid)) or 'none'})")
        if image_size is not None and "image_size" in inspect.signature(factory).parameters:
            kwargs.setdefault("image_size", image_size)  # models with a fixed input size (MLP) need it
        model = _one_line(name, kwargs, lambda: factory(num_classes=num_classes, in_chans=in_chans, **kwargs))
    if checkpoint is not None:
        from kdforge.engine.checkpoint import load_weights

        load_weights(model, checkpoint)
    return model


def model_kwargs(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword arguments a registered factory accepts (None if it cannot be told, e.g. ``**spec`` passed on)."""
    sig = inspect.signature(factory)
    params = sig.parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    varkw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    if varkw is not None and not _forwards(factory, varkw):
        return names - {"num_classes", "in_chans", "self"}  # **kwargs swallowed, not used: not valid keys
    if varkw is not None:
        # Zoo factories pass **kwargs on to the class they return: its optional arguments are valid too.
        try:
            cls = typing.get_type_hints(factory).get("return")
        except Exception:  # unresolvable annotations: do not guess
            return None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls is not nn.Module):
            return None
        init = inspect.signature(cls.__init__).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in init):
            return None
        names |= {p.name for p in init if p.default is not p.empty and p.kind is not p.VAR_POSITIONAL}
    return names - {"num_classes", "in_chans", "self"}


def _forwards(fn: Callable[..., Any], varkw: str) -> bool:
    """Whether ``fn``'s body reads its ``**varkw`` at all (if not, extra keywords are silently dropped)."""
    import dis

    fn = inspect.unwrap(fn)
    for ins in dis.get_instructions(fn):
        arg = ins.argval
        if ins.opname.startswith(("LOAD_FAST", "LOAD_DEREF", "LOAD_CLOSURE")) and (
                arg == varkw or (isinstance(arg, tuple) and varkw in arg)):
            return True
    return False


def _one_line(name: str, kwargs: dict[str, Any], build: Callable[[], nn.Module]) -> nn.Module:
    """Run a model factory; whatever it raises about its arguments becomes one KdforgeError line."""
    try:
        return build()
    except KdforgeError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError, IndexError, ZeroDivisionError,
            AttributeError, OverflowError) as e:
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise KdforgeError(f"model {name!r} cannot be built with kwargs {kwargs}: {text}") from None


__all__ = ["MODELS", "create_model", "model_kwargs"]
