"""A user's model in, a smaller faster model out: budget, candidates, KD heal, export, gate, report."""

from kdforge.compress.export import load_compressed
from kdforge.compress.gate import GateFailed
from kdforge.compress.pipeline import CompressResult, compress, run_compress
from kdforge.compress.recipe import CompressRecipe

__all__ = ["CompressRecipe", "CompressResult", "GateFailed", "compress", "load_compressed", "run_compress"]
