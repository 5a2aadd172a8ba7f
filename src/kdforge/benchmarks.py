"""Registry of named benchmarks run by ``kdforge bench NAME``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kdforge.registry import Registry

BENCHES: Registry[Callable[..., Any]] = Registry("bench")
