"""Distillation losses, registered by name; one module per family."""

from kdforge.losses import response
from kdforge.losses.base import DistillLoss, build_loss
from kdforge.losses.response import CrossEntropy, KDLoss, kd_loss

__all__ = ["CrossEntropy", "DistillLoss", "KDLoss", "build_loss", "kd_loss", "response"]
