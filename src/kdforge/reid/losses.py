"""PDM's losses: batch-hard triplet, CPM (center-guided pair mining), orthogonality, L_ch and DCS; the label layout.

Every function takes plain tensors. Features of a training batch are stacked in blocks of B:
``[V, I, G1V, G1I, G2V, G2I]`` (MFGM on) or ``[V, I]``; within a block, identities run in contiguous,
equal-length groups of K (the P×K sampler's layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: code quirks that ``compat`` turns on: ``pnl`` the PNL raw reshape, ``lch`` L_ch's hard-coded 288,
#: ``labels`` the code's label layout ``[l_V]*3 + [l_I]*3``, ``partlr`` the part head in the backbone's lr group
PDM_QUIRKS = ("pnl", "lch", "labels", "partlr")


def block_labels(y_v: Tensor, y_i: Tensor, blocks: int, code_layout: bool = False) -> Tensor:
    """Labels of the stacked features, per block ``[y_V, y_I, y_V, y_I, ...]``; ``code_layout``: ``[y_V]*k + [y_I]*k``.

    The code's layout is right only because its sampler makes y_V == y_I.
    """
    k = blocks // 2
    if code_layout:
        return torch.cat([y_v] * k + [y_i] * k)
    return torch.cat([y_v, y_i] * k)


def _dist(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances, with a floor inside the root so identical points have finite gradients."""
    d2 = (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)
    return d2.clamp_min(1e-12).sqrt()


def triplet_loss(x: Tensor, y: Tensor, margin: float = 0.3) -> Tensor:
    """Batch-hard triplet: mean_a [margin + max_{y_p=y_a} d(a,p) − min_{y_n≠y_a} d(a,n)]_+ (Euclidean)."""
    d = _dist(x, x)
    same = y.unsqueeze(0) == y.unsqueeze(1)
    hardest_pos = d.masked_fill(~same, float("-inf")).amax(1)
    hardest_neg = d.masked_fill(same, float("inf")).amin(1)
    return F.relu(margin + hardest_pos - hardest_neg).mean()


def identity_centres(block: Tensor, k: int) -> Tensor:
    """Per-identity means of a block of contiguous runs of ``k`` samples: [B, D] → [B/k, D]."""
    if len(block) % k:
        raise ValueError(f"a block of {len(block)} samples is not made of runs of {k} (use the P×K sampler)")
    return block.view(len(block) // k, k, -1).mean(1)


def _nearest_other(c: Tensor) -> Tensor:
    """For each centre, the distance to the nearest other centre."""
    d = _dist(c, c)
    return d.masked_fill(torch.eye(len(c), dtype=torch.bool, device=c.device), float("inf")).amin(1)


def _cpm_pair(pulled_a: Tensor, gen: Tensor, own: Tensor, neg_a: Tensor, neg_b: Tensor, m: float) -> Tensor:
    """[m + d(pulled_a, gen) − sg(d(own, gen))]_+ + ½[m + d(pulled_a, gen) − min_j d(neg_a)]_+ + ½[... neg_b]."""
    pull = (pulled_a - gen).pow(2).sum(1).clamp_min(1e-12).sqrt()
    push = (own - gen).pow(2).sum(1).clamp_min(1e-12).sqrt().detach()
    return (F.relu(m + pull - push).mean() + 0.5 * F.relu(m + pull - _nearest_other(neg_a)).mean()
            + 0.5 * F.relu(m + pull - _nearest_other(neg_b)).mean())


def cpm_loss(v: Tensor, i: Tensor, gv: Tensor, gi: Tensor, k: int, margin: float = 0.2) -> Tensor:
    """Center-guided pair mining on one stack [V, I, G·V, G·I] (each [B, D], runs of ``k`` per identity).

    A feature generated from visible must sit closer to the same person's IR centre than to its own
    visible centre and than any other identity (L_123), and symmetrically for infrared (L_124).
    """
    c1, c2, c3, c4 = (identity_centres(t, k) for t in (v, i, gv, gi))
    l123 = _cpm_pair(c2, c3, c1, c3, c1, margin)
    l124 = _cpm_pair(c1, c4, c2, c4, c2, margin)
    return 0.5 * (l123 + l124)


def ort_loss(g1: Tensor, g2: Tensor, total: int) -> Tensor:
    """Σ_n ⟨g1_n, g2_n⟩ / total: raw inner products of the two generated versions of each image (total = 6B)."""
    return (g1 * g2).sum() / total


def ch_loss(maps: Tensor, form: str = "rms", hw: int | None = None) -> Tensor:
    """Prototype heterogeneity over maps S [N, P, HW]; in [−½, 0], 0 when all of a sample's maps are equal.

    ``rms`` (the code): −½ mean_{n,i<j} sqrt(Σ_k (S_i − S_j)² / hw) with hw = HW (``hw`` overrides it:
    the code's hard-coded 288). ``cosine``: ½ mean_{n,i<j} cos(S_i, S_j) − ½.
    """
    p = maps.shape[1]
    iu = torch.triu_indices(p, p, 1, device=maps.device)
    if p < 2:
        return maps.sum() * 0
    if form == "cosine":
        s = F.normalize(maps, dim=2)
        cos = (s @ s.transpose(1, 2))[:, iu[0], iu[1]]
        return 0.5 * cos.mean() - 0.5
    if form != "rms":
        raise ValueError(f"unknown L_ch form {form!r} (valid: rms, cosine)")
    diff = maps[:, iu[0]] - maps[:, iu[1]]                          # [N, pairs, HW]
    rms = (diff.pow(2).sum(-1) / (hw or maps.shape[-1])).clamp_min(1e-12).sqrt()
    return -0.5 * rms.mean()


def dcs_loss(feats: Tensor, y: Tensor, k: int, m1: float = 0.01, m2: float = 0.7) -> Tensor:
    """Dual-center separation over features and labels (c_y: the mean of label y).

    L = mean_n [‖f_n − c_{y_n}‖ − m1]_+ + mean_{anchors n} mean_{y_j≠y_n} [m2 − ‖c_{y_n} − c_{y_j}‖]_+.
    Anchors are every ``k``-th sample (one per identity run).
    """
    labels, inv = torch.unique(y, return_inverse=True)
    cent = torch.zeros(len(labels), feats.shape[1], dtype=feats.dtype, device=feats.device)
    cent = cent.index_add(0, inv, feats) / torch.bincount(inv, minlength=len(labels)).unsqueeze(1).to(feats.dtype)
    intra = F.relu((feats - cent[inv]).pow(2).sum(1).clamp_min(1e-12).sqrt() - m1).mean()
    anchors = inv[::k]
    dc = _dist(cent, cent)                                           # [L, L]
    other = anchors.unsqueeze(1) != inv.unsqueeze(0)                 # [A, N]
    hinge = F.relu(m2 - dc[anchors][:, inv])                         # [A, N]
    per = (hinge * other).sum(1) / other.sum(1).clamp_min(1)
    return intra + per.mean()
