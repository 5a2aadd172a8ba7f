"""Distillation schemes as Methods: offline (teacher → student), and more in sibling modules."""

from kdforge.distill.offline import Distill, Term

__all__ = ["Distill", "Term"]
