"""The engine's name for :mod:`kdforge.gather` (all-gather across processes), which lives below the losses."""

from kdforge.gather import gather, gather_no_grad, world

__all__ = ["gather", "gather_no_grad", "world"]
