"""Evaluation metrics."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader


def topk_correct(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top == targets.unsqueeze(-1)
    return [int(hit[:, : min(k, kmax)].any(-1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader``."""
    was = model.training
    model.eval()
    n = c1 = c5 = 0
    loss = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        a, b = topk_correct(logits, y)
        c1, c5, n = c1 + a, c5 + b, n + len(y)
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    model.train(was)
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "loss": loss / max(n, 1),
            "n": float(n)}
