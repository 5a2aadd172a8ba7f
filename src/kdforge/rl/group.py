"""The group math of online policy distillation: decision-attention, group targets, losses, ramp-up, monitors.

Shapes: features H [B, K, D], action outputs O [B, K, A] (PPO logits or DQN Q-values), attention α [B, K, K]
with α[b, m, :] the weights policy m gives the group on state b. Following OKDDip (the lineage of OPD-DA):
q_m = W_Q h_m, k_j = W_K h_j, α_mj = softmax_j(q_m · k_j), group target t_m = Σ_j α_mj O_j, feature target
u_m = Σ_j α_mj h_j; decision loss τ² KL(p_τ(t_m) ‖ p_τ(O_m)), feature loss ‖h_m − sg(u_m)‖² / D.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.config import Strict

AGGREGATIONS = ("attention", "mean", "leader", "dml")


class DistillConfig(Strict):
    """How the K policies teach each other (every value visible; defaults: OPD-DA as kdforge reads the paper).

    ``aggregation``: ``attention`` (decision-attention, OPD-DA), ``mean`` (uniform weights: OPD-mean, or the
    "uniform attention" ablation when the feature loss is on), ``leader`` (every policy follows the one with
    the best recent return), ``dml`` (each policy distils from every peer separately, peers detached).
    ``lambda_dec = lambda_feat = 0`` is independent training (nothing of the group is computed).
    ``ramp_up``: fraction of the run's updates over which w(t) = exp(−5(1 − t/L)²) rises to 1 (0: off).
    ``states``: distil on the union of the K policies' minibatches or on each policy's own.
    ``q_standardize``: DQN only, standardise Q across actions per state before the Boltzmann softmax.
    """

    aggregation: Literal["attention", "mean", "leader", "dml"] = "attention"
    lambda_dec: float = Field(1.0, ge=0, allow_inf_nan=False)
    lambda_feat: float = Field(0.1, ge=0, allow_inf_nan=False)
    tau: float = Field(3.0, gt=0, allow_inf_nan=False)
    include_self: bool = True
    detach_targets: bool = False
    detach_feature_target: bool = True
    attn_dim: int | None = Field(None, ge=1, le=1 << 16)
    attn_scale: bool = False
    ramp_up: float = Field(0.1, ge=0, le=1)
    states: Literal["union", "own"] = "union"
    q_standardize: bool = False

    def active(self) -> bool:
        """Whether any distillation is computed at all."""
        return self.lambda_dec != 0.0 or self.lambda_feat != 0.0


class DecisionAttention(nn.Module):
    """Cross-attention over the group: every policy gets its own weights over the members, per state."""

    def __init__(self, dim: int, attn_dim: int | None = None, include_self: bool = True, scale: bool = False) -> None:
        super().__init__()
        d = attn_dim or max(1, dim // 8)
        self.w_q = nn.Linear(dim, d, bias=False)
        self.w_k = nn.Linear(dim, d, bias=False)
        self.include_self, self.scale = include_self, scale

    def forward(self, h: Tensor) -> Tensor:
        """α [B, K, K] from features ``h`` [B, K, D]; rows are distributions (α_mm = 0 without ``include_self``)."""
        q, k = self.w_q(h), self.w_k(h)
        e = q @ k.transpose(1, 2)
        if self.scale:
            e = e / math.sqrt(q.shape[-1])
        if not self.include_self:
            eye = torch.eye(h.shape[1], dtype=torch.bool, device=h.device)
            e = e.masked_fill(eye, float("-inf"))
        return e.softmax(-1)


def uniform_weights(b: int, k: int, include_self: bool, device: torch.device | None = None) -> Tensor:
    """Uniform α [B, K, K] over all members (or over the peers only)."""
    w = torch.ones(k, k, device=device)
    if not include_self and k > 1:
        w.fill_diagonal_(0.0)
    w = w / w.sum(-1, keepdim=True)
    return w.expand(b, k, k)


def leader_weights(b: int, returns: Tensor) -> Tensor:
    """α [B, K, K] that points every policy at the policy with the best recent return."""
    k = returns.numel()
    w = torch.zeros(k, k, device=returns.device)
    w[:, int(torch.argmax(returns))] = 1.0
    return w.expand(b, k, k)


def boltzmann(q: Tensor, tau: float, standardize: bool = False) -> Tensor:
    """log softmax(Q/τ) over the last dim; ``standardize`` first makes Q zero-mean, unit-std per state."""
    if standardize:
        q = (q - q.mean(-1, keepdim=True)) / (q.std(-1, keepdim=True, unbiased=False) + 1e-6)
    return F.log_softmax(q / tau, dim=-1)


def decision_loss(out: Tensor, target: Tensor, tau: float, standardize: bool = False) -> Tensor:
    """Per-policy τ² · mean_s KL(p_τ(target) ‖ p_τ(out)); ``out``, ``target`` [B, K, A] → [K]."""
    lt, lo = boltzmann(target, tau, standardize), boltzmann(out, tau, standardize)
    kl = (lt.exp() * (lt - lo)).sum(-1)
    return tau**2 * kl.mean(0)


def feature_loss(h: Tensor, u: Tensor) -> Tensor:
    """Per-policy mean_s ‖h_m − u_m‖² / D; ``h``, ``u`` [B, K, D] → [K]."""
    return (h - u).pow(2).mean(-1).mean(0)


def ramp_up(t: float, length: float) -> float:
    """OKDDip's w(t) = exp(−5 (1 − t/L)²) for t < L, 1 after (L ≤ 0: always 1)."""
    if length <= 0 or t >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - t / length) ** 2)


def group_losses(cfg: DistillConfig, h: Tensor, out: Tensor, attention: nn.Module | None,
                 returns: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(decision loss [K], feature loss [K], α [B, K, K]) for features ``h`` [B, K, D] and outputs ``out`` [B, K, A].

    With ``detach_targets`` the targets are constants for every policy: α is computed from detached
    features (only W_Q, W_K learn from it) and the outputs it mixes are detached.
    """
    b, k, _ = h.shape
    o_t = out.detach() if cfg.detach_targets else out
    if cfg.aggregation == "attention":
        assert attention is not None
        alpha = attention(h.detach() if cfg.detach_targets else h)
    elif cfg.aggregation == "mean":
        alpha = uniform_weights(b, k, cfg.include_self, h.device)
    elif cfg.aggregation == "leader":
        assert returns is not None
        alpha = leader_weights(b, returns)
    else:  # dml: the mean over peers of KL(p_j ‖ p_m), every peer detached
        alpha = uniform_weights(b, k, False, h.device)
        lo = boltzmann(out, cfg.tau, cfg.q_standardize)
        lp = lo.detach()
        # kl[b, m, j] = KL(p_j ‖ p_m)
        kl = (lp.exp().unsqueeze(1) * (lp.unsqueeze(1) - lo.unsqueeze(2))).sum(-1)
        dec = cfg.tau**2 * (kl * alpha).sum(-1).mean(0)
        u = alpha @ h
        return dec, feature_loss(h, u.detach() if cfg.detach_feature_target else u), alpha
    target = alpha @ o_t
    dec = decision_loss(out, target, cfg.tau, cfg.q_standardize)
    u = alpha @ (h.detach() if cfg.detach_targets else h)
    feat = feature_loss(h, u.detach() if cfg.detach_feature_target else u)
    return dec, feat, alpha


def group_step(cfg: DistillConfig, h: Tensor, out: Tensor, attention: nn.Module | None,
               returns: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`group_losses` on the union of the K minibatches (``states: union``), or with policy m's losses
    taken on its own slice only (``states: own``; the rows of ``h``/``out`` are the K slices in order)."""
    if cfg.states == "union":
        return group_losses(cfg, h, out, attention, returns)
    k = h.shape[1]
    parts = [group_losses(cfg, hs, os_, attention, returns)
             for hs, os_ in zip(h.chunk(k), out.chunk(k), strict=True)]
    dec = torch.stack([p[0][m] for m, p in enumerate(parts)])
    feat = torch.stack([p[1][m] for m, p in enumerate(parts)])
    return dec, feat, torch.cat([p[2] for p in parts])


def attention_stats(alpha: Tensor) -> dict[str, Tensor]:
    """Collapse monitors of α [B, K, K]: mean self-weight, mean row entropy, ‖α − I‖_F / sqrt(B·K), row variance."""
    b, k, _ = alpha.shape
    a = alpha.detach()
    eye = torch.eye(k, device=a.device)
    ent = -(a * a.clamp_min(1e-12).log()).sum(-1).mean()
    return {"attn_self": a.diagonal(dim1=1, dim2=2).mean(), "attn_entropy": ent,
            "attn_dist_identity": (a - eye).pow(2).sum().sqrt() / math.sqrt(b * k),
            "attn_row_var": a.mean(0).var(0, unbiased=False).mean() if k > 1 else a.new_zeros(())}


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence (nats) between distributions over the last dim, averaged over the rest."""
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(-1)
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).mean()


def mean_pairwise_js(probs: Tensor) -> float:
    """Homogenisation monitor: mean JS divergence over all pairs of policies; ``probs`` [K, N, A]."""
    k = probs.shape[0]
    if k < 2:
        return 0.0
    vals = [float(js_divergence(probs[i], probs[j])) for i, j in itertools.combinations(range(k), 2)]
    return sum(vals) / len(vals)
