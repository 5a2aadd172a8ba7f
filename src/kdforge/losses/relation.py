"""Relation-based losses: RKD, SP, CC and PKT compare how samples relate to each other in a batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.losses.base import check_compat, check_reduction, compat_source, deprecated_key
from kdforge.losses.feature import FeatureLoss
from kdforge.registry import LOSSES


# -- RKD ---------------------------------------------------------------------------------------------
def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix (B, B), squared distances clamped at eps before the root, zero diagonal."""
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _normalised_distances(e: Tensor) -> Tensor:
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def angle_tensor(e: Tensor) -> Tensor:
    """A[a, b, c] = ⟨e_ab, e_ac⟩ with e_ab the unit vector from a to b, shape (B, B, B)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return diff @ diff.transpose(1, 2)


def rkd_loss(student: Tensor, teacher: Tensor, dist_weight: float = 25.0, angle_weight: float = 50.0,
             reduction: str = "mean") -> Tensor:
    """RKD: w_d·Huber(ψ_D(s), ψ_D(t)) + w_a·Huber(ψ_A(s), ψ_A(t)) on flattened embeddings; the Huber terms
    averaged over their B² / B³ entries (``reduction: sum``: summed)."""
    s = student.flatten(1)
    with torch.no_grad():
        t = teacher.detach().flatten(1)
        t_d = _normalised_distances(t) if dist_weight else None
        t_a = angle_tensor(t) if angle_weight else None
    loss = s.new_zeros(())
    if dist_weight:
        loss = loss + dist_weight * F.smooth_l1_loss(_normalised_distances(s), t_d, reduction=reduction)
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(angle_tensor(s), t_a, reduction=reduction)
    return loss


@LOSSES.register("rkd")
class RKDLoss(FeatureLoss):
    """Relational KD (Park et al., CVPR 2019): distance- and angle-wise relations of embeddings.

    ``reduction``: the Huber terms' ``mean`` (default, the paper's) or ``sum`` (torchdistill's SmoothL1Loss key).
    """

    ndims = (2, 4)

    def __init__(self, dist_weight: float = 25.0, angle_weight: float = 50.0, reduction: str = "mean") -> None:
        super().__init__()
        self.dist_weight, self.angle_weight = dist_weight, angle_weight
        self.reduction = check_reduction("rkd", reduction, ("mean", "sum"))

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        return sum(rkd_loss(s, t, self.dist_weight, self.angle_weight, self.reduction)  # type: ignore[return-value]
                   for s, t in zip(student, teacher, strict=True))


# -- SP ----------------------------------------------------------------------------------------------
def sp_loss(student: Tensor, teacher: Tensor, p: float = 2.0, reduction: str = "batchmean") -> Tensor:
    """Similarity-preserving KD: ‖G̃_t − G̃_s‖_F² / B² with row-normalised batch Gram matrices.

    ``p`` is the norm of the row normalisation: 2 in the paper and RepDistiller, 1 in torchdistill;
    ``reduction: sum`` drops the 1/B² (torchdistill's SPKDLoss key).
    """
    b = student.shape[0]
    qs, qt = student.flatten(1), teacher.detach().flatten(1)
    gs = F.normalize(qs @ qs.t(), p=p, dim=1)
    gt = F.normalize(qt @ qt.t(), p=p, dim=1)
    total = (gt - gs).pow(2).sum()
    return total / (b * b) if reduction == "batchmean" else total


@LOSSES.register("sp")
class SPLoss(FeatureLoss):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019); student and teacher sizes may differ.

    RepDistiller's Similarity is this form (L2-normalised Gram rows); ``compat="torchdistill"`` normalises
    the rows with L1 as its SPKDLoss does (``normalize(G, 1)``: p = 1), then the same ‖·‖_F²/B².
    ``reduction``: ``batchmean`` (/B², default) or ``sum`` (torchdistill's key).
    """

    ndims = (2, 3, 4)

    def __init__(self, compat: str | list[str] = "paper", reduction: str = "batchmean") -> None:
        super().__init__()
        self.compat = compat
        self.p = 1.0 if compat_source("sp", compat, ("torchdistill", "repdistiller")) == "torchdistill" else 2.0
        self.reduction = check_reduction("sp", reduction, ("batchmean", "sum"))

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        return sum(sp_loss(s, t, self.p, self.reduction)  # type: ignore[return-value]
                   for s, t in zip(student, teacher, strict=True))


# -- CC ----------------------------------------------------------------------------------------------
def taylor_rbf(x: Tensor, gamma: float = 0.4, order: int = 2, normalise: bool = True) -> Tensor:
    """Correlation matrix k(x_i, x_j) ≈ Σ_{p≤P} e^{−2γ}(2γ)^p/p!·(x_iᵀx_j)^p for L2-normalised rows.

    ``normalise=False`` takes the rows as they are (torchdistill's CCKDLoss on raw linear outputs).
    """
    if normalise:
        x = F.normalize(x, dim=1)
    sim = x @ x.t()
    out = torch.zeros_like(sim)
    for p in range(order + 1):
        out = out + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return out


def correlation(x: Tensor, kernel: str = "gaussian", gamma: float = 0.4, order: int = 2, normalise: bool = True
                ) -> Tensor:
    """CC's correlation matrix: the Taylor-expanded Gaussian RBF (:func:`taylor_rbf`) or the bilinear kernel
    x_iᵀx_j (torchdistill's ``bilinear``); rows L2-normalised first unless ``normalise=False``."""
    if kernel == "bilinear":
        x = F.normalize(x, dim=1) if normalise else x
        return x @ x.t()
    return taylor_rbf(x, gamma, order, normalise)


def cc_loss(student: Tensor, teacher: Tensor, variant: str = "paper", gamma: float = 0.4, order: int = 2,
            kernel: str = "gaussian", reduction: str = "batchmean") -> Tensor:
    """CC on embeddings: paper ‖C_s − C_t‖²/B², or RepDistiller's mean_i Σ_d Δ_i,d·Δ_{i+1},d with Δ=|f_s−f_t|.

    ``variant="torchdistill"``: the kernel on un-normalised rows and the unsquared norm, ‖C_s − C_t‖_F / B².
    ``reduction: sum`` drops the 1/B²; ``kernel: bilinear`` correlates with x_iᵀx_j.
    """
    if variant == "repdistiller":
        delta = (student - teacher).abs()
        return (delta[:-1] * delta[1:]).sum(1).mean()
    b = student.shape[0]
    code = variant == "torchdistill"
    diff = (correlation(student, kernel, gamma, order, normalise=not code)
            - correlation(teacher, kernel, gamma, order, normalise=not code))
    total = diff.norm() if code else diff.pow(2).sum()
    return total / (b * b) if reduction == "batchmean" else total


class LinearEmbed(nn.Module):
    """Flatten and project to ``dim`` (the CC / CRD embedding head)."""

    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


@LOSSES.register("cc")
class CCLoss(FeatureLoss):
    """Correlation congruence (Peng et al., ICCV 2019) on linear embeddings of student and teacher.

    ``compat="repdistiller"`` reproduces RepDistiller's (the authors' released) form, ``"torchdistill"``
    torchdistill's CCKDLoss; ``reduction`` (``batchmean``: /B², or ``sum``) and ``kernel`` (``gaussian``
    or ``bilinear``) are its keys. ``embed_dim=0`` compares the raw features (they must then have the
    same size). ``variant`` is the old spelling of ``compat``.
    """

    ndims = (2, 4)
    has_connectors = True

    def __init__(self, compat: str | list[str] = "paper", embed_dim: int = 128, gamma: float = 0.4,
                 order: int = 2, variant: str | None = None, kernel: str = "gaussian",
                 reduction: str = "batchmean") -> None:
        super().__init__()
        if variant is not None:
            deprecated_key("cc: variant", "compat")
            compat = variant
        self.compat = compat
        self.variant = compat_source("cc", compat, ("repdistiller", "torchdistill"))
        if kernel not in ("gaussian", "bilinear"):
            raise ValueError(f"cc: kernel must be one of gaussian, bilinear, got {kernel!r}")
        self.kernel = kernel
        self.reduction = check_reduction("cc", reduction, ("batchmean", "sum"))
        if self.variant == "repdistiller" and (kernel, reduction) != ("gaussian", "batchmean"):
            raise ValueError("cc: compat repdistiller has no kernel and its own mean; leave kernel and reduction "
                             "unset")
        self.embed_dim, self.gamma, self.order = embed_dim, gamma, order
        self.embed_s = nn.ModuleList()
        self.embed_t = nn.ModuleList()

    def build(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        for s, t in zip(student, teacher, strict=True):
            ds, dt = s[0].numel(), t[0].numel()
            if self.embed_dim:
                self.embed_s.append(LinearEmbed(ds, self.embed_dim))
                self.embed_t.append(LinearEmbed(dt, self.embed_dim))
            elif ds != dt:
                raise KdforgeError(f"cc: embed_dim=0 needs features of one size, got {ds} and {dt}")
            else:
                self.embed_s.append(nn.Flatten())
                self.embed_t.append(nn.Flatten())

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        total = student[0].new_zeros(())
        for es, et, s, t in zip(self.embed_s, self.embed_t, student, teacher, strict=True):
            # the teacher-side embedding is a connector: it trains, only the teacher network is frozen
            total = total + cc_loss(es(s), et(t.detach()), self.variant, self.gamma, self.order, self.kernel,
                                    self.reduction)
        return total


# -- PKT ---------------------------------------------------------------------------------------------
def _cosine_probs(x: Tensor, eps: float, code: bool = False) -> Tensor:
    x = x.flatten(1)
    # the released code divides by (norm + eps); F.normalize divides by max(norm, eps)
    x = x / (x.norm(dim=1, keepdim=True) + eps) if code else F.normalize(x, dim=1, eps=eps)
    k = torch.nan_to_num(x @ x.t())
    k = (k + 1) / 2
    return k / k.sum(1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7, code: bool = False) -> Tensor:
    """PKT: mean_ij P^t_ij·log((P^t_ij + ε)/(P^s_ij + ε)) over cosine-kernel conditional probabilities.

    ``code=True`` normalises rows by x/(‖x‖ + ε) as the authors' code (and RepDistiller, torchdistill) do.
    """
    ps = _cosine_probs(student, eps, code)
    with torch.no_grad():
        pt = _cosine_probs(teacher.detach(), eps, code)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


@LOSSES.register("pkt")
class PKTLoss(FeatureLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) on embeddings."""

    ndims = (2, 4)

    def __init__(self, eps: float = 1e-7, compat: str = "paper") -> None:
        super().__init__()
        self.eps, self.compat = eps, compat
        self.code = bool(check_compat("pkt", compat, ("official", "repdistiller", "torchdistill")))

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        self.check(student, teacher)
        return sum(pkt_loss(s, t, self.eps, self.code)  # type: ignore[return-value]
                   for s, t in zip(student, teacher, strict=True))

