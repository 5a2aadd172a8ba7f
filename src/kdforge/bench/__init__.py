"""Named benchmarks run by ``kdforge bench NAME``; one module per benchmark registers itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kdforge.registry import Registry, import_submodules

BENCHES: Registry[Callable[..., Any]] = Registry("bench")


def load_benches() -> Registry[Callable[..., Any]]:
    """The bench registry with every bench module imported."""
    import_submodules("kdforge.bench")
    return BENCHES
