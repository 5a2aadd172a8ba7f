"""Exemplar-free class-incremental learning: the task protocol, its metrics, baselines, IR and eTag."""

from kdforge.registry import import_submodules

import_submodules("kdforge.continual")  # every learner module registers itself

from kdforge.continual.driver import CILResult, run_cil, run_recipe  # noqa: E402

__all__ = ["CILResult", "run_cil", "run_recipe"]
