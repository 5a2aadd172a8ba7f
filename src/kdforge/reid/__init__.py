"""Visible–infrared person re-identification: PDM (multi-feature generation and prototype learning)."""

from kdforge.reid import data, method  # noqa: F401 - registers the data sets and the method
from kdforge.reid.method import PDM
from kdforge.reid.model import TwoStreamNet, build_reid

__all__ = ["PDM", "TwoStreamNet", "build_reid"]
