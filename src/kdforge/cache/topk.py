"""Top-k teacher logits and the rule that restores a full logit vector from them.

A stored top-k keeps the ``k`` largest logits (before the temperature), their class ids and
``rest = logsumexp`` of the other ``C - k`` logits. :func:`expand_topk` gives every other class the
logit ``rest - log(C - k)``: at ``T = 1`` the teacher's probabilities of the top-k classes are exact and
the remaining mass is exact too, spread evenly over the other classes. At another ``T`` the top-k
logits are still exact; only the shape of the tail is approximated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compress_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values, int32 indices, rest) of logits (..., C): the k largest and the logsumexp of the others."""
    x = logits.float()
    c = x.shape[-1]
    values, indices = x.topk(k, dim=-1)
    if k >= c:
        rest = torch.full(x.shape[:-1], -math.inf)
    else:
        masked = x.scatter(-1, indices, -math.inf)
        rest = masked.logsumexp(-1)
    return values, indices.to(torch.int32), rest


def expand_topk(values: Tensor, indices: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    """Full float32 logits (..., C) from a top-k record: the rest's mass spread evenly over the other classes."""
    k = values.shape[-1]
    fill = rest.float() - math.log(max(num_classes - k, 1))
    out = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, indices.long(), values.float())


def bytes_per_row(k: int, value_bytes: int = 2) -> int:
    """Bytes one top-k record takes: k values, k int32 ids and one float32 rest."""
    return k * (value_bytes + 4) + 4
