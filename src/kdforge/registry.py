"""Name -> factory registries for models, datasets, methods and losses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from kdforge.errors import KdforgeError, closest

F = TypeVar("F", bound=Callable[..., Any])


# Registry kind -> the word `kdforge list` takes for it; other kinds name their entries in the message.
LISTED = {"model": "models", "dataset": "datasets", "method": "methods", "loss": "losses", "bench": "benches"}


class Registry(Generic[F]):
    """A named table of factories; ``get`` fails with the closest valid names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator that files a factory under ``name`` (default: its ``__name__``)."""

        def deco(fn: F) -> F:
            key = name or fn.__name__
            if key in self._items and self._items[key] is not fn:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        """The factory for ``name``, or a KdforgeError naming the closest valid names."""
        try:
            return self._items[name]
        except KeyError:
            listed = LISTED.get(self.kind)
            where = (f"run 'kdforge list {listed}' for all {len(self._items)}" if listed
                     else f"valid: {', '.join(self.names())}")
            raise KdforgeError(f"unknown {self.kind} {name!r}{closest(name, self._items)} ({where})") from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


MODELS: Registry[Callable[..., Any]] = Registry("model")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
METHODS: Registry[Callable[..., Any]] = Registry("method")
LOSSES: Registry[Callable[..., Any]] = Registry("loss")


def import_submodules(package: str) -> None:
    """Import every module of a package, so that their ``@REGISTRY.register`` lines run."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__, f"{package}."):
        importlib.import_module(info.name)
