"""CLIP-KD losses (Yang et al., CVPR 2024): the CLIP task loss, CRD, FD, ICL, GD and AFD.

Conventions: ``v``/``s`` are L2-normalised image/text embeddings of one (global) batch whose pair k
is row k of both; a ``*_scale`` is a multiplier of cosine similarities (κ = exp(logit_scale)).
Teacher tensors are detached inside every function, so gradients reach the student side only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.gather import gather, gather_no_grad
from kdforge.losses.base import check_compat, deprecated_key
from kdforge.registry import LOSSES

MAX_SCALE = 100.0
INIT_LOGIT_SCALE = math.log(1 / 0.07)
TERMS = ("task", "crd", "fd", "gd", "icl", "afd")
#: the released CLIP-KD code's independent quirks that ``compat`` can reproduce (``official``: all of them)
CLIP_QUIRKS = ("mfd", "gd")


def clip_quirks(compat: str | list[str]) -> frozenset[str]:
    """The quirks a CLIP-KD ``compat`` value turns on: ``paper`` none, ``official`` all, or a list of them."""
    q = check_compat("clip_kd", compat, ("official", *CLIP_QUIRKS))
    return frozenset(CLIP_QUIRKS) if "official" in q else q


def _targets(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)


def clip_loss(v: Tensor, s: Tensor, scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE: ½[CE(rows of κ v sᵀ) + CE(columns)], pairs on the diagonal."""
    logits = scale * v @ s.T
    y = _targets(len(v), v.device)
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def _kl_rows(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(t) ‖ softmax(s))."""
    t_log = F.log_softmax(t_logits, dim=1)
    return (t_log.exp() * (t_log - F.log_softmax(s_logits, dim=1))).sum(1).mean()


def crd_loss(s_logits: Tensor, t_logits: Tensor) -> Tensor:
    """CLIP-KD's CRD (affinity mimicking): ½[KL_rows(z^T ‖ z) + KL_rows(z^Tᵀ ‖ zᵀ)]."""
    t = t_logits.detach()
    return 0.5 * (_kl_rows(t, s_logits) + _kl_rows(t.T, s_logits.T))


def fd_loss(v: Tensor, s: Tensor, t_v: Tensor, t_s: Tensor) -> Tensor:
    """Feature distillation: element-wise MSE(ṽ, v^T) + MSE(s̃, s^T) (mean over N·d_T)."""
    return F.mse_loss(v, t_v.detach()) + F.mse_loss(s, t_s.detach())


def icl_loss(v: Tensor, s: Tensor, t_v: Tensor, t_s: Tensor, cross_scale: Tensor | float) -> Tensor:
    """Interactive contrastive learning: student anchors against the teacher's other modality."""
    y = _targets(len(v), v.device)
    return 0.5 * (F.cross_entropy(cross_scale * v @ t_s.detach().T, y)
                  + F.cross_entropy(cross_scale * s @ t_v.detach().T, y))


def contrastive_grads(p: Tensor, k: Tensor, mult: Tensor | float) -> tuple[Tensor, Tensor]:
    """Analytic gradients of mean CE(mult·P Kᵀ, arange) w.r.t. the anchors P and the keys K."""
    n = p.shape[0]
    d = torch.softmax(mult * p @ k.T, dim=1) - torch.eye(n, dtype=p.dtype, device=p.device)
    return mult * d @ k / n, mult * d.T @ p / n


def gd_loss(v: Tensor, s: Tensor, t_v: Tensor, t_s: Tensor, scale: Tensor | float, t_scale: Tensor | float,
            compat: bool = False) -> Tensor:
    """Gradient distillation: 4 MSEs between student and teacher contrastive gradients (both directions).

    ``compat=True`` reproduces the released code, which passes κ as the temperature and so uses
    softmax(P Kᵀ/κ) (hence its weight 1e8); the default uses the CLIP logits κ·P Kᵀ.
    """
    m_s = 1 / scale if compat else scale
    m_t = 1 / t_scale if compat else t_scale
    with torch.no_grad():
        t_grads = (*contrastive_grads(t_v, t_s, m_t), *contrastive_grads(t_s, t_v, m_t))
    s_grads = (*contrastive_grads(v, s, m_s), *contrastive_grads(s, v, m_s))
    return sum((F.mse_loss(a, b) for a, b in zip(s_grads, t_grads, strict=True)), torch.zeros((), device=v.device))


def afd_loss(v: Tensor, s: Tensor, t_v: Tensor, t_s: Tensor, fuse_v: nn.Module, fuse_s: nn.Module,
             fusion_scale: Tensor | float) -> Tensor:
    """Augmented feature distillation: the CLIP loss on fused embeddings.

    f^I = normalise(U_v [ṽ ; v^T]), f^T = normalise(U_s [s̃ ; s^T]), then ½[CE(κ_f f^I f^Tᵀ) + CE(κ_f f^T f^Iᵀ)].
    """
    f_img = F.normalize(fuse_v(torch.cat([v, t_v.detach()], 1)), dim=-1)
    f_txt = F.normalize(fuse_s(torch.cat([s, t_s.detach()], 1)), dim=-1)
    return clip_loss(f_img, f_txt, fusion_scale)


class LogitScale(nn.Module):
    """A learnable similarity multiplier κ, ``exp(θ)`` clamped to ≤ 100, or the code's ``raw`` θ."""

    def __init__(self, init: float = INIT_LOGIT_SCALE, param: str = "exp", max_scale: float = MAX_SCALE) -> None:
        super().__init__()
        if param not in ("exp", "raw"):
            raise KdforgeError(f"scale_param must be 'exp' or 'raw', got {param!r}")
        self.param, self.max_log = param, math.log(max_scale)
        self.theta = nn.Parameter(torch.tensor(float(init)))

    def clamp_(self) -> None:
        """Clamp θ into [0, ln 100] in place (exp mode); the code's raw scales are left free."""
        if self.param == "exp":
            with torch.no_grad():
                self.theta.clamp_(0.0, self.max_log)

    def forward(self) -> Tensor:
        if self.param == "raw":
            return self.theta
        return self.theta.clamp(max=self.max_log).exp()


@LOSSES.register("clip_kd")
class ClipKDLoss(nn.Module):
    """The weighted CLIP-KD objective over the all-gathered global batch.

    Owns what the losses train: the projections W_v, W_s (only when d_S ≠ d_T and a projected term
    is on), the cross logit scale κ_x (ICL) and the fusion layers U_v, U_s with κ_f (AFD).
    ``compat``: ``paper``, ``official`` or ``[gd]`` (GD as the released code: κ passed as a temperature);
    ``gd_compat: true`` is its old spelling.
    """

    def __init__(self, student_dim: int, teacher_dim: int, weights: Mapping[str, float],
                 scale_param: str = "exp", gd_compat: bool | None = None, gather_batch: bool = True,
                 compat: str | list[str] = "paper") -> None:
        super().__init__()
        try:
            quirks = clip_quirks(compat)
        except ValueError as e:
            raise KdforgeError(str(e)) from None
        if gd_compat is not None:
            deprecated_key("gd_compat", "compat: [gd]")
            quirks = quirks | {"gd"} if gd_compat else quirks - {"gd"}
        gd_compat = "gd" in quirks
        bad = sorted(set(weights) - set(TERMS))
        if bad:
            raise KdforgeError(f"unknown CLIP-KD loss term {bad[0]!r} (valid: {', '.join(TERMS)})")
        self.w = {k: float(weights.get(k, 1.0 if k == "task" else 0.0)) for k in TERMS}
        self.gd_compat, self.gather_batch = gd_compat, gather_batch
        projected = any(self.w[k] > 0 for k in ("fd", "gd", "icl", "afd"))
        self.proj_v = self.proj_s = None
        if projected and student_dim != teacher_dim:
            self.proj_v, self.proj_s = nn.Linear(student_dim, teacher_dim), nn.Linear(student_dim, teacher_dim)
        self.cross_scale = LogitScale(param=scale_param) if self.w["icl"] > 0 else None
        self.fusion_scale = self.fuse_v = self.fuse_s = None
        if self.w["afd"] > 0:
            width = (teacher_dim if self.proj_v is not None else student_dim) + teacher_dim
            self.fuse_v, self.fuse_s = nn.Linear(width, student_dim), nn.Linear(width, student_dim)
            self.fusion_scale = LogitScale(param=scale_param)

    def clamp_(self) -> None:
        """Clamp the learnable scales after an optimiser step."""
        for m in (self.cross_scale, self.fusion_scale):
            if m is not None:
                m.clamp_()

    def project(self, img_raw: Tensor, txt_raw: Tensor) -> tuple[Tensor, Tensor]:
        """ṽ, s̃: projected (when d_S ≠ d_T) then normalised raw student embeddings."""
        if self.proj_v is not None:
            img_raw, txt_raw = self.proj_v(img_raw), self.proj_s(txt_raw)
        return F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1)

    def forward(self, img_raw: Tensor, txt_raw: Tensor, scale: Tensor, t_img: Tensor, t_txt: Tensor,
                t_scale: Tensor | float) -> dict[str, Tensor]:
        """Terms (unweighted) and ``loss`` (weighted sum); teacher embeddings must be normalised."""
        if self.gather_batch:
            img_raw, txt_raw = gather(img_raw), gather(txt_raw)
            t_img, t_txt = gather_no_grad(t_img), gather_no_grad(t_txt)
        t_img, t_txt = t_img.detach(), t_txt.detach()
        v, s = F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1)
        out: dict[str, Tensor] = {"task": clip_loss(v, s, scale)}
        if self.w["crd"] > 0:
            out["crd"] = crd_loss(scale * v @ s.T, t_scale * t_img @ t_txt.T)
        if any(self.w[k] > 0 for k in ("fd", "gd", "icl", "afd")):
            pv, ps = self.project(img_raw, txt_raw)
            if self.w["fd"] > 0:
                out["fd"] = fd_loss(pv, ps, t_img, t_txt)
            if self.w["gd"] > 0:
                out["gd"] = gd_loss(pv, ps, t_img, t_txt, scale, t_scale, self.gd_compat)
            if self.w["icl"] > 0:
                out["icl"] = icl_loss(pv, ps, t_img, t_txt, self.cross_scale())
            if self.w["afd"] > 0:
                out["afd"] = afd_loss(pv, ps, t_img, t_txt, self.fuse_v, self.fuse_s, self.fusion_scale())
        out["loss"] = sum((self.w[k] * out[k] for k in out), torch.zeros((), device=v.device))
        return out
