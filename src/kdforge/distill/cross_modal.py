"""Cross-modal KD: teacher and student see different views of the same sample (a per-model input transform).

The transforms are declared in the recipe (``teacher_view`` / ``student_view``) and attached to the
models as forward pre-hooks, so every forward — training, the set-up dry run and the engine's
evaluation on the real test set — sees the model's own modality. The student's view stays with the
deployable model in this process; a checkpoint holds plain weights, so apply the same view to the
inputs when the exported student is used elsewhere.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import Strict, validate
from kdforge.distill.offline import Distill, DistillConfig, Term
from kdforge.errors import KdforgeError
from kdforge.losses.base import build_loss
from kdforge.method import DataInfo, build_model
from kdforge.registry import METHODS


class ViewSpec(Strict):
    """One modality: ``identity``, ``lowres`` (average-pool by ``factor``, upsample back), ``blur``
    (Gaussian, ``sigma``), ``edge`` (horizontal gradient) or ``grayscale`` (channel mean)."""

    kind: Literal["identity", "lowres", "blur", "edge", "grayscale"] = "identity"
    factor: int = Field(4, ge=1)
    sigma: float = Field(1.0, gt=0)


def lowres(x: Tensor, factor: int) -> Tensor:
    """Average-pool by ``factor`` and upsample back (nearest): a low-resolution sensor."""
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    small = F.adaptive_avg_pool2d(x, (max(1, h // factor), max(1, w // factor)))
    return F.interpolate(small, size=(h, w), mode="nearest")


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Depthwise Gaussian blur with a (2⌈2σ⌉+1)-tap separable kernel, reflect padding."""
    r = max(1, math.ceil(2 * sigma))
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device).pow(2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def horizontal_gradient(x: Tensor) -> Tensor:
    """x[..., j+1] − x[..., j] (zero in the last column): an edge image."""
    return F.pad(x[..., 1:] - x[..., :-1], (0, 1))


class View(nn.Module):
    """A parameter-free input transform for one model."""

    def __init__(self, spec: ViewSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or ViewSpec()

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        if s.kind == "lowres":
            return lowres(x, s.factor)
        if s.kind == "blur":
            return gaussian_blur(x, s.sigma)
        if s.kind == "edge":
            return horizontal_gradient(x)
        if s.kind == "grayscale":
            return x.mean(1, keepdim=True).expand_as(x).contiguous()
        return x

    def extra_repr(self) -> str:
        return self.spec.kind


class ViewHook:
    """A forward pre-hook applying a View to a model's first input."""

    def __init__(self, view: View) -> None:
        self.view = view

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args or not isinstance(args[0], Tensor) or args[0].ndim != 4:
            raise KdforgeError("cross_modal: views apply to image batches (B, C, H, W)")
        return (self.view(args[0]), *args[1:])


def attach_view(model: nn.Module, view: View) -> nn.Module:
    """Make ``model`` see ``view(x)`` on every forward (a pre-hook; weights unchanged)."""
    if view.spec.kind != "identity":
        model.register_forward_pre_hook(ViewHook(view))
    return model


class CrossModalConfig(DistillConfig):
    """Recipe schema of ``method: {name: cross_modal}``: Distill plus one view per model."""

    name: str = "cross_modal"
    teacher_view: ViewSpec = Field(default_factory=ViewSpec)
    student_view: ViewSpec = Field(default_factory=lambda: ViewSpec(kind="lowres"))


@METHODS.register("cross_modal")
class CrossModal(Distill):
    """Cross-modal distillation (Gupta et al., CVPR 2016): any Distill terms between two modalities of one sample.

    Without a ``ce`` term no labels are used (supervision transfer on paired data).
    """

    Config = CrossModalConfig

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: list[Term], teacher_view: View,
                 student_view: View) -> None:
        super().__init__(attach_view(student, student_view), attach_view(teacher, teacher_view), terms)
        self.teacher_view, self.student_view = teacher_view, student_view

    def deployable_spec(self) -> dict[str, Any] | None:
        """The student's spec with its input view (the deployed model sees that view too)."""
        spec = super().deployable_spec()
        if spec is None or self.student_view.spec.kind == "identity":
            return spec
        return {**spec, "view": self.student_view.spec.model_dump()}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> CrossModal:
        c = validate(CrossModalConfig, cfg, prefix="method")
        terms = []
        for i, t in enumerate(c.terms):
            try:
                loss = build_loss(t.loss, **(t.model_extra or {}))
            except KdforgeError as e:
                raise KdforgeError(f"method.terms.{i}: {e}") from None
            terms.append(Term(loss, t.weight, t.student_tap, t.teacher_tap, name=t.loss))
        return cls(build_model(c.student, info), build_model(c.teacher, info), terms, View(c.teacher_view),
                   View(c.student_view))
