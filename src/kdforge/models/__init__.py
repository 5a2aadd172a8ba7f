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
from kdforge.models.loading import entry_point_factory, load_weights, user_factory, weights_file
from kdforge.registry import MODELS

try:  # the 32×32 zoo: one family per module
    from kdforge.models import cifar_resnet, mobilenetv2, shufflenet, vgg, wrn  # noqa: F401
except ImportError:  # pragma: no cover - only while the zoo is being written
    pass


def create_model(name: str, num_classes: int, in_chans: int = 3, checkpoint: str | Path | None = None,
                 image_size: int | None = None, new_head: bool = False, **kwargs: Any) -> nn.Module:
    """Build a model by name (``resnet20``, ``timm:resnet18``, ``torchvision:resnet18``, ``my_pkg.nets:build``).

    ``checkpoint``: a .safetensors file, a .pt/.pth state dict or a kdforge run folder; ``new_head`` keeps the
    fresh classifier where the file's has another number of classes.
    """
    prefix, sep, rest = name.partition(":")
    if sep and prefix in ("timm", "torchvision"):
        build = timm_model if prefix == "timm" else torchvision_model
        model = _one_line(name, kwargs, lambda: build(rest, num_classes, in_chans, **kwargs))
    elif sep and ("." in prefix or prefix.endswith(".py") or "/" in prefix or _importable(prefix)):
        factory = user_factory(name)
        model = _one_line(name, kwargs, lambda: _call_user(factory, num_classes, in_chans, image_size, kwargs))
    elif sep:
        raise KdforgeError(f"unknown model source {prefix!r} in {name!r} (valid: timm:, torchvision:, your own "
                           "'module:function', or a name from 'kdforge list models')")
    else:
        if name not in MODELS and (ep := entry_point_factory(name)) is not None:
            model = _one_line(name, kwargs, lambda: _call_user(ep, num_classes, in_chans, image_size, kwargs))
        else:
            model = _registered(name, num_classes, in_chans, image_size, kwargs)
    if not isinstance(model, nn.Module):
        raise KdforgeError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        path = weights_file(checkpoint)
        load_weights(model, path, new_head=new_head)
        model.kdforge_weights = str(path)
    return model


def _registered(name: str, num_classes: int, in_chans: int, image_size: int | None,
                kwargs: dict[str, Any]) -> nn.Module:
    """A model of the registry, its kwargs checked against what its factory accepts."""
    factory = MODELS.get(name)
    valid = model_kwargs(factory)
    if valid is not None:
        unknown = sorted(k for k in kwargs if k not in valid)
        if unknown:
            raise KdforgeError(f"model {name!r} has no keyword argument {unknown[0]!r}"
                               f"{closest(unknown[0], valid)} (valid kwargs: {', '.join(sorted(valid)) or 'none'})")
    if image_size is not None and "image_size" in inspect.signature(factory).parameters:
        kwargs = {**kwargs, "image_size": kwargs.get("image_size", image_size)}  # fixed-input models (MLP)
    return _one_line(name, kwargs, lambda: factory(num_classes=num_classes, in_chans=in_chans, **kwargs))


def _importable(module: str) -> bool:
    """Whether a top-level module of that name can be imported (from the current folder too)."""
    import importlib.util
    import sys

    if not module.isidentifier():
        return False
    if (Path.cwd() / f"{module}.py").is_file() or (Path.cwd() / module / "__init__.py").is_file():
        return True
    return module in sys.modules or importlib.util.find_spec(module) is not None


def _call_user(factory: Callable[..., Any], num_classes: int, in_chans: int, image_size: int | None,
               kwargs: dict[str, Any]) -> Any:
    """Call a user's factory with what it accepts of num_classes / in_chans / image_size, and the recipe kwargs."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans), ("image_size", image_size))
             if v is not None and (k in params or takes_any) and k not in kwargs}
    return factory(**extra, **kwargs)


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


__all__ = ["MODELS", "create_model", "load_weights", "model_kwargs", "weights_file"]
