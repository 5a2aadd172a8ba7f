"""Response-based losses: they compare the student's logits with labels or the teacher's."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdforge.losses.base import DistillLoss, check_reduction, compat_source
from kdforge.registry import LOSSES


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0, t_squared: bool = True,
            reduction: str = "batchmean") -> Tensor:
    """Hinton KD: T² · KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, mean over the batch.

    ``t_squared=False`` drops the T² factor (torchdistill's KDLoss with ``alpha`` 0 or unset);
    ``reduction`` is KLDivLoss's: ``batchmean`` (default), ``sum`` (no batch mean) or ``mean`` (over B·C).
    """
    log_p_s = F.log_softmax(student_logits / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=-1)
    if reduction == "mean":  # KLDivLoss's element mean, without torch's warning about it
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / log_p_s.numel()
    else:
        kl = F.kl_div(log_p_s, log_p_t, reduction=reduction, log_target=True)
    return kl * (T * T) if t_squared else kl


@LOSSES.register("ce")
class CrossEntropy(DistillLoss):
    """Cross-entropy with the ground-truth labels, with optional label smoothing."""

    inputs = "labels"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(student_logits, targets, label_smoothing=self.label_smoothing)


@LOSSES.register("kd")
class KDLoss(DistillLoss):
    """Hinton et al. 2015, 'Distilling the Knowledge in a Neural Network' (T² scaled).

    ``compat="torchdistill"``: no T² (torchdistill's KDLoss with ``alpha`` 0 or unset returns the bare
    KL; its ``alpha`` > 0 form, α·CE + (1 − α)·T²·KL, is the default here with weights α and 1 − α).
    RepDistiller's DistillKL is the paper form. ``reduction`` (torchdistill's key): ``batchmean``
    (default, the paper's), ``sum`` or ``mean`` (KLDivLoss's element mean over B·C).
    """

    inputs = "logits"

    def __init__(self, T: float = 4.0, compat: str | list[str] = "paper", reduction: str = "batchmean") -> None:
        super().__init__()
        if T <= 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        self.T = T
        self.compat = compat
        self.t_squared = compat_source("kd", compat, ("torchdistill", "repdistiller")) != "torchdistill"
        self.reduction = check_reduction("kd", reduction, ("batchmean", "sum", "mean"))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.T, self.t_squared, self.reduction)
