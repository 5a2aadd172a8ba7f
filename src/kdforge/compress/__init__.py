"""A user's model in, a smaller faster model out: budget, candidates, KD heal, export, gate, report."""

import sys
import types
from typing import Any

from kdforge.compress.export import load_compressed
from kdforge.compress.gate import GateFailed
from kdforge.compress.pipeline import CompressResult, compress, run_compress
from kdforge.compress.recipe import CompressRecipe


class _CallablePackage(types.ModuleType):
    """``kd.compress(recipe, out)``: the package itself calls :func:`compress`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["CompressRecipe", "CompressResult", "GateFailed", "compress", "load_compressed", "run_compress"]
