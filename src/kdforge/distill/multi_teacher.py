"""Multi-teacher KD: averaged soft targets, and AEKD's gradient-balanced (min-norm) teacher weights.

Teachers are any list of models (architectures may differ); they are frozen and kept in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import ModelSpec, Strict, validate
from kdforge.errors import KdforgeError
from kdforge.losses.response import kd_loss
from kdforge.method import DataInfo, Method, build_model
from kdforge.registry import METHODS


def soft_target(teacher_logits: list[Tensor], T: float, weights: Tensor | None = None,
                combine: str = "prob") -> Tensor:
    """Σ_m w_m·p^T(z_m) (``prob``) or p^T(Σ_m w_m·z_m) (``logit``); uniform weights by default."""
    z = torch.stack([t.detach() for t in teacher_logits])
    w = torch.full((len(z),), 1.0 / len(z), device=z.device) if weights is None else weights.to(z.device)
    if combine == "logit":
        return F.softmax((w.view(-1, 1, 1) * z).sum(0) / T, -1)
    return (w.view(-1, 1, 1) * F.softmax(z / T, -1)).sum(0)


def kd_to_probs(student_logits: Tensor, target: Tensor, T: float) -> Tensor:
    """T²·KL(target ‖ p^T(student)), batch-mean, for a probability target."""
    return F.kl_div(F.log_softmax(student_logits / T, -1), target, reduction="batchmean") * (T * T)


class _Teachers(Method):
    """Shared parts: a student and a frozen list of teachers."""

    frozen_prefixes = ("teachers.",)

    def __init__(self, student: nn.Module, teachers: list[nn.Module]) -> None:
        super().__init__()
        if not teachers:
            raise KdforgeError("multi-teacher KD needs at least one teacher")
        self.student = student
        self.teachers = nn.ModuleList(teachers).eval()
        for p in self.teachers.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> _Teachers:
        super().train(mode)
        self.teachers.eval()
        return self

    def teacher_logits(self, x: Tensor, num_classes: int) -> list[Tensor]:
        """Every teacher's logits (no grad), checked against the student's class count."""
        with torch.no_grad():
            out = [t(x) for t in self.teachers]
        for i, z in enumerate(out):
            if z.shape[-1] != num_classes:
                raise KdforgeError(f"teacher {i} gives {z.shape[-1]} classes, the student {num_classes}")
        return out

    def deployable(self) -> nn.Module:
        return self.student


class MultiTeacherConfig(Strict):
    """Recipe schema of ``method: {name: multi_teacher}``."""

    name: str = "multi_teacher"
    teachers: list[ModelSpec] = Field(min_length=1)
    student: ModelSpec
    T: float = Field(4.0, gt=0)
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    combine: Literal["prob", "logit"] = "prob"
    weights: list[float] | None = None


@METHODS.register("multi_teacher")
class MultiTeacher(_Teachers):
    """Average of the teachers' soft targets (or logits), with optional fixed weights: CE + T²·KL(avg ‖ S)."""

    Config = MultiTeacherConfig

    def __init__(self, student: nn.Module, teachers: list[nn.Module], T: float = 4.0, ce_weight: float = 0.1,
                 kd_weight: float = 0.9, combine: str = "prob", weights: list[float] | None = None) -> None:
        super().__init__(student, teachers)
        self.T, self.ce_weight, self.kd_weight, self.combine = T, ce_weight, kd_weight, combine
        if weights is not None:
            if len(weights) != len(teachers) or min(weights) < 0 or sum(weights) <= 0:
                raise KdforgeError(f"weights must be {len(teachers)} non-negative numbers with a positive sum, "
                                   f"got {weights}")
            w = torch.tensor(weights, dtype=torch.float32)
            self.register_buffer("weights", w / w.sum(), persistent=False)
        else:
            self.weights = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> MultiTeacher:
        c = validate(MultiTeacherConfig, cfg, prefix="method")
        return cls(build_model(c.student, info), [build_model(t, info) for t in c.teachers], c.T, c.ce_weight,
                   c.kd_weight, c.combine, c.weights)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        s = self.student(x)
        target = soft_target(self.teacher_logits(x, s.shape[-1]), self.T, self.weights, self.combine)
        ce, kd = F.cross_entropy(s, y), kd_to_probs(s, target, self.T)
        return {"loss": self.ce_weight * ce + self.kd_weight * kd, "loss_ce": ce.detach(), "loss_kd": kd.detach(),
                "acc": (s.argmax(-1) == y).float().mean().detach()}


def project_capped_simplex(v: Sequence[float], cap: float, iters: int = 50) -> list[float]:
    """Euclidean projection onto {w : 0 ≤ w ≤ cap, Σw = 1} (bisection on the shift; plain floats, M is small)."""
    if cap * len(v) < 1 - 1e-9:
        raise KdforgeError(f"aekd: C = {cap} is too small for {len(v)} teachers (need C >= 1/{len(v)})")
    lo, hi = min(v) - 1.0, max(v)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if sum(min(max(x - mid, 0.0), cap) for x in v) > 1:
            lo = mid
        else:
            hi = mid
    theta = 0.5 * (lo + hi)
    return [min(max(x - theta, 0.0), cap) for x in v]


def min_norm_weights(grads: Tensor, cap: float = 1.0, iters: int = 100) -> Tensor:
    """argmin_w ‖Σ_m w_m g_m‖² over the capped simplex, by projected gradient from uniform weights."""
    g = grads.flatten(1).double()
    gram_t = (g[:, None, :] * g[None, :, :]).sum(-1)  # M is tiny: a broadcast beats a BLAS call here
    m = len(gram_t)
    lmax = float(torch.linalg.eigvalsh(gram_t).max())
    gram = gram_t.tolist()
    w = project_capped_simplex([1.0 / m] * m, cap)
    if lmax > 1e-30:
        for _ in range(iters):
            grad = [sum(gram[i][j] * w[j] for j in range(m)) for i in range(m)]
            new = project_capped_simplex([w[i] - grad[i] / lmax for i in range(m)], cap)
            done = max(abs(a - b) for a, b in zip(new, w, strict=True)) < 1e-7
            w = new
            if done:
                break
    return torch.tensor(w, dtype=grads.dtype, device=grads.device)


class AEKDConfig(Strict):
    """Recipe schema of ``method: {name: aekd}``."""

    name: str = "aekd"
    teachers: list[ModelSpec] = Field(min_length=1)
    student: ModelSpec
    T: float = Field(4.0, gt=0)
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    C: float = Field(0.6, gt=0, le=1)
    solver_iters: int = Field(100, ge=1)


@METHODS.register("aekd")
class AEKD(_Teachers):
    """AEKD (Du et al., NeurIPS 2020): teacher weights w* = min-norm point of the per-teacher KD gradients.

    The gradient of T²·KL_m w.r.t. the student logits is T·(p_s − p_m)/B, so w* costs no extra backward.
    """

    Config = AEKDConfig

    def __init__(self, student: nn.Module, teachers: list[nn.Module], T: float = 4.0, ce_weight: float = 1.0,
                 kd_weight: float = 1.0, C: float = 0.6, solver_iters: int = 100) -> None:
        super().__init__(student, teachers)
        if C * len(teachers) < 1 - 1e-9:
            raise KdforgeError(f"aekd: C = {C} is too small for {len(teachers)} teachers (need C >= 1/{len(teachers)})")
        self.T, self.ce_weight, self.kd_weight, self.C, self.solver_iters = T, ce_weight, kd_weight, C, solver_iters

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> AEKD:
        c = validate(AEKDConfig, cfg, prefix="method")
        return cls(build_model(c.student, info), [build_model(t, info) for t in c.teachers], c.T, c.ce_weight,
                   c.kd_weight, c.C, c.solver_iters)

    def teacher_weights(self, s: Tensor, t_logits: list[Tensor]) -> Tensor:
        """w* for this batch from the analytic logit gradients T·(p_s − p_m)/B."""
        with torch.no_grad():
            ps = F.softmax(s.detach() / self.T, -1)
            grads = torch.stack([self.T * (ps - F.softmax(t / self.T, -1)) / len(s) for t in t_logits])
            return min_norm_weights(grads, self.C, self.solver_iters)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        s = self.student(x)
        t_logits = self.teacher_logits(x, s.shape[-1])
        w = self.teacher_weights(s, t_logits)
        kds = [kd_loss(s, t, self.T) for t in t_logits]
        kd = sum(wm * lm for wm, lm in zip(w, kds, strict=True))
        ce = F.cross_entropy(s, y)
        out = {"loss": self.ce_weight * ce + self.kd_weight * kd, "loss_ce": ce.detach(), "loss_kd": kd.detach(),
               "acc": (s.argmax(-1) == y).float().mean().detach()}
        out.update({f"w_teacher{m}": wm.detach() for m, wm in enumerate(w)})
        return out  # type: ignore[return-value]
