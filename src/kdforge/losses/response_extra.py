"""More response-based losses: DKD (decoupled KD, with warm-up) and DIST (correlation matching)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.losses.base import DistillLoss
from kdforge.registry import LOSSES


def check_logits(name: str, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> None:
    """Raise a one-line KdforgeError unless student/teacher logits are (B, C) alike (and targets (B,))."""
    if student.ndim != 2 or teacher.shape != student.shape:
        raise KdforgeError(f"{name}: student and teacher logits must both be (batch, classes), "
                           f"got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if targets is not None and (targets.ndim != 1 or targets.shape[0] != student.shape[0]):
        raise KdforgeError(f"{name}: targets must be (batch,) class indices, got {tuple(targets.shape)} "
                           f"for logits {tuple(student.shape)}")


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, T: float = 4.0) -> tuple[Tensor, Tensor]:
    """Per-sample (TCKD, NCKD) of decoupled KD at temperature T (no T² factor)."""
    zs, zt = student_logits / T, teacher_logits / T
    gt = F.one_hot(targets, zs.shape[-1]).bool()

    def binary_logs(z: Tensor) -> tuple[Tensor, Tensor]:
        lse = torch.logsumexp(z, -1)
        log_pg = z.gather(1, targets[:, None]).squeeze(1) - lse
        log_rest = torch.logsumexp(z.masked_fill(gt, float("-inf")), -1) - lse
        return log_pg, log_rest

    lpg_s, lrest_s = binary_logs(zs)
    lpg_t, lrest_t = binary_logs(zt)
    tckd = lpg_t.exp() * (lpg_t - lpg_s) + lrest_t.exp() * (lrest_t - lrest_s)
    # softmax over the non-target classes only; the target entry is zeroed, not -inf, to keep 0·log0 = 0
    lq_s = F.log_softmax(zs.masked_fill(gt, float("-inf")), -1).masked_fill(gt, 0.0)
    lq_t = F.log_softmax(zt.masked_fill(gt, float("-inf")), -1).masked_fill(gt, 0.0)
    nckd = (lq_t.exp() * (lq_t - lq_s)).sum(-1)
    return tckd, nckd


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float = 1.0,
             beta: float = 8.0, T: float = 4.0) -> Tensor:
    """DKD: T² · mean_b(α·TCKD + β·NCKD) (Zhao et al., CVPR 2022), without the warm-up factor."""
    check_logits("dkd", student_logits, teacher_logits, targets)
    tckd, nckd = dkd_parts(student_logits, teacher_logits.detach(), targets, T)
    return (alpha * tckd + beta * nckd).mean() * (T * T)


@LOSSES.register("dkd")
class DKDLoss(DistillLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): target-class and non-target-class KD, linear warm-up."""

    inputs = "logits"
    needs_targets = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: int = 20) -> None:
        super().__init__()
        if T <= 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 epochs, got {warmup}")
        self.alpha, self.beta, self.T, self.warmup = alpha, beta, T, warmup
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Remember the (0-based) epoch for the warm-up factor."""
        self.epoch = epoch

    @property
    def warmup_factor(self) -> float:
        """min((epoch + 1) / W, 1): mdistiller counts epochs from 1, so the first epoch gets 1/W."""
        return 1.0 if self.warmup == 0 else min((self.epoch + 1) / self.warmup, 1.0)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        return self.warmup_factor * dkd_loss(student_logits, teacher_logits, targets, self.alpha, self.beta, self.T)


def pearson(a: Tensor, b: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Pearson correlation along ``dim``: cosine of the mean-centred vectors."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_from_probs(ys: Tensor, yt: Tensor, beta: float = 1.0, gamma: float = 1.0,
                    T: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """DIST on probability matrices: (β·inter + γ·intra, inter, intra), each already × T²."""
    inter = (1.0 - pearson(ys, yt, dim=1)).mean() * (T * T)
    intra = (1.0 - pearson(ys, yt, dim=0)).mean() * (T * T)
    return beta * inter + gamma * intra, inter, intra


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
              T: float = 1.0) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022): inter-class (rows) + intra-class (columns) Pearson distance."""
    check_logits("dist", student_logits, teacher_logits)
    ys = F.softmax(student_logits / T, -1)
    yt = F.softmax(teacher_logits.detach() / T, -1)
    return dist_from_probs(ys, yt, beta, gamma, T)[0]


@LOSSES.register("dist")
class DISTLoss(DistillLoss):
    """DIST: 1 − Pearson correlation between softened predictions, per sample and per class."""

    inputs = "logits"

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, T: float = 1.0) -> None:
        super().__init__()
        if T <= 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        self.beta, self.gamma, self.T = beta, gamma, T

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return dist_loss(student_logits, teacher_logits, self.beta, self.gamma, self.T)
