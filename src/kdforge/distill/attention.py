"""Attention-based KD: AT as a ready-made scheme, and a loss on transformer attention maps.

``attn_map`` compares attention probabilities tapped from attention modules, (B, H, N, N) or
(B, N, N), averaged over heads so teacher and student may have different head counts. For timm
ViTs, tap ``blocks.<i>.attn.attn_drop`` (its output is the attention probabilities) and turn fused
attention off (``TIMM_FUSED_ATTN=0`` before import, or :func:`unfuse_attention` on the model);
fused kernels never materialise the map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import ModelSpec, Strict, validate
from kdforge.distill.offline import Distill, Term
from kdforge.errors import KdforgeError
from kdforge.losses.base import build_loss
from kdforge.losses.feature import FeatureLoss
from kdforge.method import DataInfo, build_model
from kdforge.registry import LOSSES, METHODS


def unfuse_attention(model: nn.Module) -> int:
    """Switch timm-style attention modules to the explicit softmax path; returns how many were switched."""
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
            n += 1
    return n


def head_mean(a: Tensor) -> Tensor:
    """(B, H, N, N) → (B, N, N) by averaging heads; (B, N, N) unchanged."""
    return a.mean(1) if a.ndim == 4 else a


def attention_map_loss(student: Tensor, teacher: Tensor, mode: str = "kl", from_logits: bool = False,
                       eps: float = 1e-8) -> Tensor:
    """KL(A_t ‖ A_s) per query row (mean over B·N rows) or MSE between head-averaged attention maps."""
    a_s, a_t = head_mean(student), head_mean(teacher.detach())
    if a_s.shape != a_t.shape:
        raise KdforgeError(f"attn_map: head-averaged maps differ: student {tuple(a_s.shape)} vs teacher "
                           f"{tuple(a_t.shape)} (the token counts must match)")
    if from_logits:
        a_s, a_t = a_s.softmax(-1), a_t.softmax(-1)
    if mode == "mse":
        return (a_s - a_t).pow(2).mean()
    return (a_t * (torch.log(a_t + eps) - torch.log(a_s + eps))).sum(-1).mean()


@LOSSES.register("attn_map")
class AttentionMapLoss(FeatureLoss):
    """Attention-map distillation for transformers: KL or MSE between head-averaged attention probabilities."""

    ndims = (3, 4)

    def __init__(self, mode: str = "kl", from_logits: bool = False) -> None:
        super().__init__()
        if mode not in ("kl", "mse"):
            raise ValueError(f"mode must be 'kl' or 'mse', got {mode!r}")
        self.mode, self.from_logits = mode, from_logits

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        return sum(attention_map_loss(s, t, self.mode, self.from_logits)  # type: ignore[return-value]
                   for s, t in zip(student, teacher, strict=True))


class ATConfig(Strict):
    """Recipe schema of ``method: {name: at}``; taps default to each model's stage outputs."""

    name: str = "at"
    teacher: ModelSpec
    student: ModelSpec
    student_taps: list[str] | None = None
    teacher_taps: list[str] | None = None
    beta: float = 1000.0
    p: float = Field(2.0, gt=0)
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    T: float = Field(4.0, gt=0)
    #: ``paper`` or ``torchdistill`` (its ATLoss ``mode: paper``); see the AT loss
    compat: str | list[str] = "paper"


def stage_taps(model: nn.Module) -> list[str]:
    """A zoo model's stage outputs: ``feature_names`` without the stem and the pooled vector."""
    names = list(getattr(model, "feature_names", []) or [])
    if len(names) < 3:
        raise KdforgeError(f"{type(model).__name__} lists no stage outputs (feature_names); give the taps")
    return names[1:-1]


@METHODS.register("at")
class AttentionTransfer(Distill):
    """AT as a scheme: CE (+ optional KD) + β·AT summed over paired stage outputs (deepest stages paired)."""

    Config = ATConfig

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> AttentionTransfer:
        c = validate(ATConfig, cfg, prefix="method")
        student, teacher = build_model(c.student, info), build_model(c.teacher, info)
        s_taps = c.student_taps or stage_taps(student)
        t_taps = c.teacher_taps or stage_taps(teacher)
        n = min(len(s_taps), len(t_taps))
        if c.student_taps and c.teacher_taps and len(s_taps) != len(t_taps):
            raise KdforgeError(f"at: student_taps and teacher_taps need the same length, got {len(s_taps)} "
                               f"and {len(t_taps)}")
        terms = [Term(build_loss("ce"), c.ce_weight, name="ce")]
        if c.kd_weight:
            terms.append(Term(build_loss("kd", T=c.T), c.kd_weight, name="kd"))
        terms.append(Term(build_loss("at", p=c.p, compat=c.compat), c.beta, s_taps[-n:], t_taps[-n:], name="at"))
        return cls(student, teacher, terms)
