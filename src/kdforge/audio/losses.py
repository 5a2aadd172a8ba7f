"""The team's "MyLoss": label smoothing with a focal factor on every class term; standard focal loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ls_focal_loss(logits: Tensor, target: Tensor, epsilon: float = 0.0, gamma: float = 0.0, clamp: float = 1e-7,
                  reduction: str = "mean") -> Tensor:
    """``sum_k -y~_k (1 - p_k)^gamma log p_k`` with ``y~ = (1 - eps) onehot + eps / K`` and ``p`` clamped.

    The focal factor multiplies every class term of the smoothed target (the AcieLee code), not only the
    true class. gamma = 0: label-smoothed CE; eps = gamma = 0: CE up to the clamp.
    """
    k = logits.shape[-1]
    smooth = F.one_hot(target, k).to(logits.dtype) * (1 - epsilon) + epsilon / k
    p = logits.float().softmax(-1).clamp(clamp, 1 - clamp)
    terms = -smooth * p.log()
    if gamma:
        terms = terms * (1 - p) ** gamma
    loss = terms.sum(-1)
    return loss.mean() if reduction == "mean" else loss


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, reduction: str = "mean") -> Tensor:
    """Standard focal loss ``-(1 - p_y)^gamma log p_y`` (Lin et al.), from log-probabilities (stable)."""
    logp = logits.float().log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    loss = -((1 - logp.exp()).clamp_min(0) ** gamma) * logp
    return loss.mean() if reduction == "mean" else loss


def stage_loss(logits: Tensor, target: Tensor, kind: str, epsilon: float = 0.0, gamma: float = 0.0) -> Tensor:
    """The loss a recipe stage names: ``ce`` (torch CE), ``ls`` / ``ls_focal`` (MyLoss) or ``focal`` (standard)."""
    if kind == "ce":
        return F.cross_entropy(logits, target)
    if kind == "focal":
        return focal_loss(logits, target, gamma)
    return ls_focal_loss(logits, target, epsilon, gamma if kind == "ls_focal" else 0.0)


__all__ = ["focal_loss", "ls_focal_loss", "stage_loss", "torch"]
