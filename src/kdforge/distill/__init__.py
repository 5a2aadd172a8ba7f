"""Distillation schemes as Methods: offline, online, self, multi-teacher, data-free, adversarial, ..."""

from kdforge.distill.offline import Distill, Term
from kdforge.registry import import_submodules

import_submodules("kdforge.distill")  # every scheme module registers its methods

__all__ = ["Distill", "Term"]
