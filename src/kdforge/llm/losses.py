"""Token-level distillation losses of language models, chunked over tokens.

Every term compares, at each trained token position, the teacher's next-token distribution
``p = softmax(t / T)`` with the student's ``q = softmax(s / T)`` and averages over the positions of the
loss mask, times ``T²`` (Hinton's scale; 1 at ``T = 1``). The terms work on full logits, or on the
``k + 1`` bins of a cached top-k teacher (its top-k tokens and one bucket for the rest) where a term only
needs the teacher's distribution on those bins (forward KL and skew forward KL).

:func:`chunked_token_loss` evaluates terms a chunk of positions at a time from the final hidden states
and the output head, recomputing each chunk in the backward pass, so that the (tokens × vocabulary)
float32 tensors of student and teacher exist for one chunk only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdforge.errors import KdforgeError
from kdforge.losses.base import DistillLoss
from kdforge.registry import LOSSES

NEG_INF = float("-inf")


def _up(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ_v a_v (log a_v − log b_v) over the last axis; bins where a is 0 contribute 0."""
    return torch.where(log_a > NEG_INF, log_a.exp() * (log_a - log_b), 0.0).sum(-1)


def _mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1 − w)·b) from log a and log b."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log(1.0 - w))


def forward_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ p (log p − log q) per position (p teacher, q student)."""
    return _kl(log_p, log_q)


def reverse_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """KL(q ‖ p) = Σ q (log q − log p) per position."""
    return _kl(log_q, log_p)


def generalized_jsd(log_q: Tensor, log_p: Tensor, beta: float) -> Tensor:
    """GKD's JSD(β) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = β·p + (1 − β)·q; β = 0 → KL(p ‖ q), β = 1 → KL(q ‖ p)."""
    if beta <= 0.0:
        return forward_kl(log_q, log_p)
    if beta >= 1.0:
        return reverse_kl(log_q, log_p)
    log_m = _mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def skew_forward_kl(log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
    """DistiLLM's SKL(α) = KL(p ‖ α·p + (1 − α)·q); α = 0 is forward KL."""
    return _kl(log_p, _mix(log_p, log_q, alpha))


def skew_reverse_kl(log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
    """DistiLLM's SRKL(α) = KL(q ‖ (1 − α)·p + α·q); α = 0 is reverse KL."""
    return _kl(log_q, _mix(log_q, log_p, alpha))


def total_variation(log_q: Tensor, log_p: Tensor) -> Tensor:
    """TVD = ½ Σ |p − q| per position."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


class TokenLoss(DistillLoss, ABC):
    """A per-token term over (n, V) student logits: a divergence from the teacher, or CE on targets."""

    inputs = "logits"
    #: the term needs the teacher's whole distribution (refuses a top-k teacher cache)
    needs_full_teacher: ClassVar[bool] = True
    #: the term reads the next-token targets, not the teacher
    uses_targets: ClassVar[bool] = False

    def __init__(self, T: float = 1.0, chunk: int = 1024) -> None:
        super().__init__()
        if T <= 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 token, got {chunk}")
        self.T, self.chunk = float(T), int(chunk)

    @abstractmethod
    def token_values(self, s_logits: Tensor, teacher: Tensor | tuple[Tensor, Tensor] | None,
                     targets: Tensor | None = None) -> Tensor:
        """Values (n,) of (n, V) student logits against the teacher's signal or the next-token targets."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean over the masked positions of (..., V) logits, computed ``chunk`` positions at a time."""
        v = student_logits.shape[-1]
        s = student_logits.reshape(-1, v)
        t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        m = torch.ones(len(s), dtype=torch.bool, device=s.device) if mask is None else mask.reshape(-1)
        return chunked_logit_loss([(self, 1.0)], s, t, m)


class Divergence(TokenLoss):
    """A divergence ``per_token(log_q, log_p)`` between student and teacher log-probabilities at temperature T."""

    @abstractmethod
    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        """The divergence at each position of (n, V) log-probabilities (n,)."""

    def token_values(self, s_logits: Tensor, teacher: Tensor | tuple[Tensor, Tensor] | None,
                     targets: Tensor | None = None) -> Tensor:
        """T²-scaled values (n,) of (n, V) student logits against full teacher logits or a top-k bucket."""
        log_q = (_up(s_logits) / self.T).log_softmax(-1)
        if isinstance(teacher, tuple):  # (top-k ids, log-probs over k + 1 bins, already at T)
            ids, log_p = teacher
            top = log_q.gather(-1, ids)
            rest = log_q.scatter(-1, ids, NEG_INF).logsumexp(-1, keepdim=True)
            log_q = torch.cat([top, rest], -1)
        else:
            assert teacher is not None
            log_p = (_up(teacher) / self.T).log_softmax(-1)
        return self.per_token(log_q, log_p) * (self.T * self.T)


def _terms_need_full(terms: Sequence[tuple[TokenLoss, float]]) -> list[str]:
    return [getattr(t, "registry_name", type(t).__name__) for t, _ in terms
            if t.needs_full_teacher and not t.uses_targets]


@LOSSES.register("lm_fkl")
class ForwardKL(Divergence):
    """Forward KL (teacher → student), the KD of Hinton et al. per token: T² · KL(p ‖ q)."""

    needs_full_teacher = False

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        return forward_kl(log_q, log_p)


@LOSSES.register("lm_rkl")
class ReverseKL(Divergence):
    """Reverse KL (MiniLLM's objective, mode-seeking): T² · KL(q ‖ p)."""

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        return reverse_kl(log_q, log_p)


@LOSSES.register("lm_jsd")
class GeneralizedJSD(Divergence):
    """GKD's generalized JSD (Agarwal et al. 2024): T² · [β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)], m = β·p + (1 − β)·q.

    As TRL's ``generalized_jsd_loss``: β = 0 is forward KL and β = 1 reverse KL (the limits of
    JSD(β)/β and JSD(β)/(1 − β)).
    """

    def __init__(self, beta: float = 0.5, T: float = 1.0, chunk: int = 1024) -> None:
        super().__init__(T, chunk)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)

    @property
    def needs_full_teacher(self) -> bool:  # type: ignore[override]
        return self.beta > 0.0

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        return generalized_jsd(log_q, log_p, self.beta)


class _Skewed(Divergence):
    """A DistiLLM skew divergence with its mixing weight α in [0, 1)."""

    def __init__(self, alpha: float = 0.1, T: float = 1.0, chunk: int = 1024) -> None:
        super().__init__(T, chunk)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.alpha = float(alpha)


@LOSSES.register("lm_skl")
class SkewKL(_Skewed):
    """DistiLLM's skew forward KL (Ko et al. 2024): T² · KL(p ‖ α·p + (1 − α)·q); α = 0 is forward KL."""

    needs_full_teacher = False

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        return skew_forward_kl(log_q, log_p, self.alpha)


@LOSSES.register("lm_srkl")
class SkewReverseKL(_Skewed):
    """DistiLLM's skew reverse KL: T² · KL(q ‖ (1 − α)·p + α·q); α = 0 is reverse KL."""

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        return skew_reverse_kl(log_q, log_p, self.alpha)


@LOSSES.register("lm_tvd")
class TotalVariation(Divergence):
    """Total variation distance: T² · ½ Σ_v |p_v − q_v|."""

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        return total_variation(log_q, log_p)


@LOSSES.register("lm_ce")
class TokenCE(TokenLoss):
    """Next-token cross-entropy with the data: −log q(y) at T = 1 (the SFT term to mix with a divergence)."""

    needs_full_teacher = False
    uses_targets = True

    def token_values(self, s_logits: Tensor, teacher: Any, targets: Tensor | None = None) -> Tensor:
        assert targets is not None
        return F.cross_entropy(_up(s_logits), targets.clamp_min(0), reduction="none")


TeacherChunk = Callable[[Tensor], "Tensor | tuple[Tensor, Tensor] | None"]


def _chunk_values(terms: Sequence[tuple[TokenLoss, float]], s_logits: Tensor, teacher: Any,
                  targets: Tensor | None) -> Tensor:
    """Σ_k w_k · term_k per position (n,) and each term's sum, stacked: (1 + K,)."""
    sums = []
    total = torch.zeros((), dtype=_up(s_logits).dtype, device=s_logits.device)
    for term, w in terms:
        v = term.token_values(s_logits, None if term.uses_targets else teacher, targets).sum()
        sums.append(v.detach())
        total = total + w * v
    return torch.stack([total, *[s.to(total.dtype) for s in sums]]) if sums else total.unsqueeze(0)


def chunked_logit_loss(terms: Sequence[tuple[TokenLoss, float]], s_logits: Tensor, teacher: Tensor | None,
                       mask: Tensor, targets: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """Σ_k w_k · mean over masked positions of term_k, for (N, V) student logits, a chunk of positions at a time."""
    out = chunked_token_loss(terms, lambda idx: s_logits[idx], None if teacher is None else (lambda idx: teacher[idx]),
                             mask, targets, chunk)
    return out[0]


def chunked_token_loss(terms: Sequence[tuple[TokenLoss, float]], student: Callable[[Tensor], Tensor],
                       teacher: TeacherChunk | None, mask: Tensor, targets: Tensor | None = None,
                       chunk: int | None = None) -> Tensor:
    """(total, term_1, …, term_K): weighted sum and each term's mean over the positions where ``mask`` holds.

    ``student(idx)`` gives the student's logits (n, V) at flat positions ``idx`` and ``teacher(idx)``
    the teacher's (full logits, or top-k ids and bin log-probabilities); both are called again in the
    backward pass (activation checkpointing), so only one chunk's vocabulary-sized tensors are alive.
    """
    if not terms:
        raise KdforgeError("no loss terms to compute")
    chunk = chunk or min(t.chunk for t, _ in terms)
    pos = mask.reshape(-1).nonzero().flatten()
    n = len(pos)
    if n == 0:
        return torch.zeros(1 + len(terms), device=mask.device)
    flat_targets = None if targets is None else targets.reshape(-1)

    def part(idx: Tensor) -> Tensor:
        with torch.no_grad():
            t = teacher(idx) if teacher is not None else None
        return _chunk_values(terms, student(idx), t, None if flat_targets is None else flat_targets[idx])

    total = None
    for i in range(0, n, chunk):
        idx = pos[i: i + chunk]
        needs_grad = torch.is_grad_enabled()
        v = checkpoint(part, idx, use_reentrant=False) if needs_grad and n > chunk else part(idx)
        total = v if total is None else total + v
    assert total is not None
    return total / n


def head_logits(hidden: Tensor, head: nn.Module, vocab: int | None = None) -> Callable[[Tensor], Tensor]:
    """``idx -> logits`` of flat positions from final hidden states (B, L, H) and an output head, rows cropped to
    ``vocab`` (padded embedding rows beyond the tokenizer dropped)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    weight = head.weight if vocab is None else head.weight[:vocab]
    bias = getattr(head, "bias", None)
    if bias is not None and vocab is not None:
        bias = bias[:vocab]
    return lambda idx: F.linear(h[idx], weight, bias)
