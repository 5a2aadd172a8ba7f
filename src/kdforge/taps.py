"""FeatureTaps: capture named intermediate features of any nn.Module with forward hooks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError, closest


def _first_tensor(value: Any) -> Any:
    """The first tensor of a tuple/list output (transformer layers return tuples)."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return value


class FeatureTaps:
    """Capture the outputs (or inputs) of named submodules on every forward.

    ``with FeatureTaps(model, ["layer2", "layer3"]) as taps: model(x); taps["layer3"]``.
    Outside a ``with`` block the hooks stay until :meth:`remove`.
    """

    def __init__(self, model: nn.Module, names: Iterable[str],
                 mode: Literal["output", "input"] = "output", detach: bool = False) -> None:
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.mode = mode
        self.detach = detach
        self.features: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = []
        for name in self.names:
            if name not in modules:
                raise KdforgeError(f"no module named {name!r} in {type(model).__name__}"
                                   f"{closest(name, [n for n in modules if n])}")
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            value = _first_tensor(args if self.mode == "input" else output)
            if self.detach and isinstance(value, Tensor):
                value = value.detach()
            self.features[name] = value

        return hook

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.features[name]
        except KeyError:
            raise KdforgeError(f"tap {name!r} has not fired: run a forward pass first "
                               f"(taps: {', '.join(self.names)})") from None

    def __contains__(self, name: object) -> bool:
        return name in self.features

    def get(self, names: Iterable[str]) -> list[Tensor]:
        """The captured tensors for ``names``, in order."""
        return [self[n] for n in names]

    def clear(self) -> None:
        """Forget captured tensors (keeps the hooks)."""
        self.features.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.no_grad()
def tap_shapes(model: nn.Module, names: list[str], example: Tensor) -> dict[str, torch.Size]:
    """Shapes of the named features for one example batch (a dry forward in eval mode)."""
    was_training = model.training
    model.eval()
    with FeatureTaps(model, names) as taps:
        model(example)
        shapes = {n: taps[n].shape for n in names}
    model.train(was_training)
    return shapes
