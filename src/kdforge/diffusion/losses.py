"""The RDD loss terms: L_CFD, the intra-sample pixel relation (IS_P2P) and the memory-queue relation (M_P2P)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cfd_loss(v_s: Tensor, v_t: Tensor, tau: float = 0.9) -> Tensor:
    """KL(softmax(v_T/τ) ‖ softmax(v_S)) per sample, batch mean; the temperature sharpens the teacher only."""
    return F.kl_div(F.log_softmax(v_s, dim=1), F.softmax(v_t.detach() / tau, dim=1), reduction="batchmean")


def _pixels(a: Tensor) -> Tensor:
    """(B, C, H, W) → (B, HW, C), every pixel vector L2-normalised over channels."""
    return F.normalize(a.flatten(2).transpose(1, 2), dim=2)


def is_p2p_loss(a_s: Tensor, a_t: Tensor, tau: float = 1.0, pairs: Literal["all", "self"] = "all") -> Tensor:
    """Pixel-to-pixel relation KD: for sample pairs (b, d) (all ordered pairs, or b = d), anchor pixel i of b.

    r(i, j) = â_b(i)·â_d(j); softmax over the pixels j of d (τ), KL(teacher ‖ student), divided by B²·HW
    (``all``) or B·HW (``self``).
    """
    s, t = _pixels(a_s), _pixels(a_t.detach())
    if pairs == "all":
        r_s = torch.einsum("bic,djc->bdij", s, s) / tau
        r_t = torch.einsum("bic,djc->bdij", t, t) / tau
    else:
        r_s = torch.einsum("bic,bjc->bij", s, s) / tau
        r_t = torch.einsum("bic,bjc->bij", t, t) / tau
    p_t = F.softmax(r_t, dim=-1)
    kl = (p_t * (F.log_softmax(r_t, dim=-1) - F.log_softmax(r_s, dim=-1))).sum(-1)
    return kl.mean()


class ProjectionHead(nn.Sequential):
    """The student's M_P2P projection g: 1×1 conv → BatchNorm → ReLU → 1×1 conv (no biases in the convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, channels, 1, bias=False))


class PixelMemory(nn.Module):
    """The memory of teacher pixel embeddings (M rows of C) with its write pointer, both resumable buffers.

    Each step enqueues K = min(#pixels, ``per_step``) randomly chosen, L2-normalised teacher pixel vectors
    at the pointer; on overflow (p + K ≥ M) they go to the last K rows and the pointer resets (the code's
    rule). ``compat=True`` reproduces the code's flatten of (B, C, H, W) with ``view(C, -1)``, which
    scrambles channels across pixels and samples when B > 1.
    """

    def __init__(self, channels: int, size: int = 20000, per_step: int = 128, contrast: int = 4096,
                 compat: bool = False) -> None:
        super().__init__()
        self.size, self.per_step, self.compat = size, per_step, compat
        self.register_buffer("queue", F.normalize(torch.randn(size, channels), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("contrast_idx", torch.linspace(0, size - 1, min(contrast, size)).round().long())

    @torch.no_grad()
    def enqueue(self, a_t: Tensor) -> Tensor:
        """Write K teacher pixel vectors of the map ``a_t`` (B, C, H, W); returns the rows written."""
        c = a_t.shape[1]
        cols = a_t.reshape(c, -1) if self.compat else a_t.permute(1, 0, 2, 3).reshape(c, -1)
        n = cols.shape[1]
        k = min(n, self.per_step)
        pick = torch.randperm(n, device=a_t.device)[:k]
        rows = F.normalize(cols[:, pick].t(), dim=1)
        p = int(self.ptr)
        if p + k >= self.size:
            self.queue[-k:] = rows
            self.ptr.zero_()
        else:
            self.queue[p:p + k] = rows
            self.ptr.fill_((p + k) % self.size)
        return rows

    def contrast(self) -> Tensor:
        """The fixed, evenly spaced contrast rows Q[round(linspace(0, M−1, n))]."""
        return self.queue[self.contrast_idx]


def memory_p2p_loss(s_proj: Tensor, a_t: Tensor, contrast: Tensor, tau_m: float = 0.1,
                    tau_kd: float = 1.0) -> Tensor:
    """τ_kd²/(B·HW) Σ KL(softmax(ℓ_T/τ_kd) ‖ softmax(ℓ_S/τ_kd)), ℓ = normalised pixel · queue rows / τ_M."""
    s = _pixels(s_proj).reshape(-1, s_proj.shape[1])
    t = _pixels(a_t.detach()).reshape(-1, a_t.shape[1])
    q = contrast.detach()
    l_s, l_t = s @ q.t() / tau_m, t @ q.t() / tau_m
    p_t = F.softmax(l_t / tau_kd, dim=1)
    kl = (p_t * (F.log_softmax(l_t / tau_kd, dim=1) - F.log_softmax(l_s / tau_kd, dim=1))).sum(1)
    return tau_kd ** 2 * kl.mean()
