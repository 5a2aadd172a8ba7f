"""The one user-facing error type: the CLI prints its message on one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdforgeError(ValueError):
    """Bad input from the user: a recipe key, a name, a path or a shape."""


def closest(name: str, valid: Iterable[str], n: int = 3) -> str:
    """A short 'did you mean' phrase for ``name`` among ``valid`` (empty if nothing is close)."""
    near = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(repr(x) for x in near)}?" if near else ""
