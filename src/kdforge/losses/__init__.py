"""Distillation losses, registered by name; one module per family (response, feature, relation, ...)."""

from kdforge.losses.base import DistillLoss, build_loss
from kdforge.losses.response import CrossEntropy, KDLoss, kd_loss
from kdforge.registry import import_submodules

import_submodules("kdforge.losses")  # every family module registers its losses

__all__ = ["CrossEntropy", "DistillLoss", "KDLoss", "build_loss", "kd_loss"]
