"""Token-level distillation losses of language models, chunked over tokens.

Every term compares, at each trained token position, the teacher's next-token distribution
``p = softmax(t / T)`` with the student's ``q = softmax(s / T)`` and averages over the positions of the
loss mask, times ``T²`` (Hinton's scale; 1 at ``T = 1``). The terms work on full logits, or on the
``k + 1`` bins of a cached top-k teacher (its top-k tokens and one bucket for the rest) where a term only
needs the teacher's distribution on those bins (forward KL and skew forward KL).

:func:`chunked_token_loss` evaluates terms a chunk of positions at a time, so that the (tokens ×
vocabulary) float32 tensors of student and teacher exist for one chunk only. From the final hidden states
and the output head (:class:`HeadLogits`) it is fused: each chunk's logits are made once, and the
gradient of the loss with respect to them is taken at once and multiplied into the hidden states' and
the head's gradients (as Liger's fused linear losses do), so nothing is recomputed in the backward pass.
Forward KL and CE take their gradients in closed form from one shared log-softmax per temperature; the
other terms by autograd on the chunk's logits.
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


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a_v·b_v per row of two (n, V) tensors, as a batched matrix product (no (n, V) product tensor)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).flatten()


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
    """A per-token term over (n, V) student logits: a divergence from the teacher, or CE on targets.

    ``chunk``: token positions per chunk (default :func:`auto_chunk` of the vocabulary).
    """

    inputs = "logits"
    #: the term needs the teacher's whole distribution (refuses a top-k teacher cache)
    needs_full_teacher: ClassVar[bool] = True
    #: the term reads the next-token targets, not the teacher
    uses_targets: ClassVar[bool] = False

    def __init__(self, T: float = 1.0, chunk: int | None = None) -> None:
        super().__init__()
        if T <= 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 token, got {chunk}")
        self.T, self.chunk = float(T), None if chunk is None else int(chunk)

    @abstractmethod
    def token_values(self, s_logits: Tensor, teacher: Tensor | tuple[Tensor, Tensor] | None,
                     targets: Tensor | None = None) -> Tensor:
        """Values (n,) of (n, V) student logits against the teacher's signal or the next-token targets."""

    def values_and_grad(self, chunk: _ChunkLogits, teacher: Any, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        """Values (n,) and their gradient with respect to the chunk's logits (n, V), a buffer the caller owns.

        By autograd through :meth:`token_values`; terms with a closed-form gradient override this.
        """
        with torch.enable_grad():
            z = chunk.z.detach().requires_grad_()
            v = self.token_values(z, teacher, targets)
            (g,) = torch.autograd.grad(v.sum(), z)
        return v.detach(), g

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

    def values_and_grad(self, chunk: _ChunkLogits, teacher: Any, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        """Closed form: ∂/∂s_j = T·(q_j − p_j); over top-k bins, T·q_j·(1 − p_rest/Q_rest) for a token in the rest.

        (Q_b the student's mass on bin b; both follow from Σ_b p_b = 1.)
        """
        T2 = self.T * self.T
        log_q = chunk.log_q(self.T, own=True)
        if isinstance(teacher, tuple):
            ids, log_p = teacher
            top = log_q.gather(-1, ids)
            q = log_q.scatter_(-1, ids, NEG_INF).exp_()  # the student's probabilities outside the top-k, 0 in it
            q_rest = q.sum(-1, keepdim=True)
            rest = q_rest.log()
            lp_rest = log_p[:, -1:]
            lost = (q_rest == 0).flatten().nonzero().flatten()
            if len(lost):  # every rest probability underflowed: the rest's log-mass and shares from the logits
                lq_lost = (_up(chunk.z[lost]) / self.T).log_softmax(-1).scatter(-1, ids[lost], NEG_INF)
                rest[lost] = lq_lost.logsumexp(-1, keepdim=True)
                g_lost = lq_lost.exp() - (lq_lost - rest[lost] + lp_rest[lost]).exp()
            values = _kl(log_p, torch.cat([top, rest], -1)) * T2
            ratio = torch.where((lp_rest > NEG_INF) & (q_rest > 0), (lp_rest - rest).exp(), 0.0)
            g = q.mul_(1.0 - ratio)
            if len(lost):
                g[lost] = g_lost
            g.scatter_(-1, ids, top.exp() - log_p[:, :-1].exp())
            return values, g if self.T == 1.0 else g.mul_(self.T)
        t = _up(teacher)
        if self.T != 1.0:
            t = torch.div(t, self.T, out=chunk.scratch("t/T", t))
        log_p = torch.log_softmax(t, -1, out=chunk.scratch("log_p", t))
        p = torch.exp(log_p, out=chunk.scratch("p", t))
        # Σ p·(log p − log q) as one dot product per row, the difference made in log p's own buffer: no further
        # (n, V) tensor (a live step's only vocabulary-sized work beyond the teacher's forward is here)
        values = _row_dot(p, log_p.sub_(log_q))
        if not bool(torch.isfinite(values).all()):  # a teacher probability of exactly 0 (a -inf logit): 0·inf
            values = torch.where(p > 0, p * log_p, 0.0).sum(-1)
        g = log_q.exp_().sub_(p)
        return values * T2, g if self.T == 1.0 else g.mul_(self.T)


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

    def __init__(self, beta: float = 0.5, T: float = 1.0, chunk: int | None = None) -> None:
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

    def __init__(self, alpha: float = 0.1, T: float = 1.0, chunk: int | None = None) -> None:
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

    def values_and_grad(self, chunk: _ChunkLogits, teacher: Any, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        """Closed form: −log q(y), and ∂/∂s = q − onehot(y)."""
        assert targets is not None
        y = targets.clamp_min(0).unsqueeze(-1)
        log_q = chunk.log_q(1.0, own=True)
        values = -log_q.gather(-1, y).squeeze(-1)
        g = log_q.exp_()
        g.scatter_add_(-1, y, torch.full_like(y, -1.0, dtype=g.dtype))
        return values, g


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


#: a chunk's float32 logits take at most this many bytes when no chunk size is given
CHUNK_BYTES = 64 * 2**20


def auto_chunk(vocab: int) -> int:
    """Tokens per chunk when none is given: the largest power of two (16 to 1,024) whose float32 logits of
    ``vocab`` columns fit :data:`CHUNK_BYTES` (256 for a 49,152-token vocabulary)."""
    n = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    return max(16, min(1024, 1 << (n.bit_length() - 1)))


def chunked_logit_loss(terms: Sequence[tuple[TokenLoss, float]], s_logits: Tensor, teacher: Tensor | None,
                       mask: Tensor, targets: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """Σ_k w_k · mean over masked positions of term_k, for (N, V) student logits, a chunk of positions at a time."""
    if chunk is None and all(t.chunk is None for t, _ in terms):
        chunk = auto_chunk(s_logits.shape[-1])
    out = chunked_token_loss(terms, lambda idx: s_logits[idx], None if teacher is None else (lambda idx: teacher[idx]),
                             mask, targets, chunk)
    return out[0]


def chunked_token_loss(terms: Sequence[tuple[TokenLoss, float]], student: Callable[[Tensor], Tensor],
                       teacher: TeacherChunk | None, mask: Tensor, targets: Tensor | None = None,
                       chunk: int | None = None) -> Tensor:
    """(total, term_1, …, term_K): weighted sum and each term's mean over the positions where ``mask`` holds.

    ``student(idx)`` gives the student's logits (n, V) at flat positions ``idx`` and ``teacher(idx)``
    the teacher's (full logits, or top-k ids and bin log-probabilities). A :class:`HeadLogits` student is
    fused (each chunk's gradient taken in the forward pass, nothing recomputed); any other callable is
    called again in the backward pass (activation checkpointing). Either way only one chunk's
    vocabulary-sized tensors are alive. ``chunk``: positions per chunk (default: the terms' own, else
    :func:`auto_chunk` of the head's rows, else 1,024).
    """
    if not terms:
        raise KdforgeError("no loss terms to compute")
    given = [t.chunk for t, _ in terms if t.chunk is not None]
    if chunk is None:
        vocab = student.weight.shape[0] if isinstance(student, HeadLogits) else None
        chunk = min(given) if given else auto_chunk(vocab) if vocab is not None else 1024
    pos = mask.reshape(-1).nonzero().flatten()
    n = len(pos)
    if n == 0:
        return torch.zeros(1 + len(terms), device=mask.device)
    flat_targets = None if targets is None else targets.reshape(-1)

    def part(idx: Tensor) -> Tensor:
        with torch.no_grad():
            t = teacher(idx) if teacher is not None else None
        return _chunk_values(terms, student(idx), t, None if flat_targets is None else flat_targets[idx])

    if isinstance(student, HeadLogits) and torch.is_grad_enabled() and student.requires_grad:
        out = _FusedHeadLoss.apply(student.h, student.weight, student.bias, pos, list(terms), teacher,
                                   flat_targets, chunk)
        assert isinstance(out, Tensor)
        return out
    total = None
    for i in range(0, n, chunk):
        idx = pos[i: i + chunk]
        needs_grad = torch.is_grad_enabled()
        v = checkpoint(part, idx, use_reentrant=False) if needs_grad and n > chunk else part(idx)
        total = v if total is None else total + v
    assert total is not None
    return total / n


class HeadLogits:
    """``idx -> logits`` of flat positions from final hidden states and an output head; the fused loss reads
    its parts directly, so the logits are made once per chunk and never recomputed."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> None:
        self.h, self.weight, self.bias = hidden.reshape(-1, hidden.shape[-1]), weight, bias

    @property
    def requires_grad(self) -> bool:
        """Whether any input of the logits takes a gradient."""
        return any(t is not None and t.requires_grad for t in (self.h, self.weight, self.bias))

    def __call__(self, idx: Tensor, out: Tensor | None = None) -> Tensor:
        """The logits at ``idx`` (n, V), written into ``out`` (n, V) when given."""
        if out is None:
            return F.linear(self.h[idx], self.weight, self.bias)
        return _linear_into(out, self.h[idx], self.weight, self.bias)


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x·Wᵀ (+ b) written into ``out``; under autocast or mixed dtypes, F.linear's own result (``out`` unused)."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype or x.dtype != out.dtype:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.T, out=out)
    return torch.addmm(bias, x, weight.T, out=out)


class _Scratch:
    """Reusable (n, V) buffers of one fused loss call, by name: every chunk writes its vocabulary-sized tensors
    into the same memory. (A fresh tensor per chunk is mapped and page-faulted anew each time, which on the CPU
    costs about as much as a pass over it.)"""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, n: int, v: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An (n, v) buffer, contents undefined: the first n rows of the largest one asked for under ``name``."""
        b = self._bufs.get(name)
        if b is None or b.shape[0] < n or b.shape[1] != v or b.dtype != dtype or b.device != device:
            b = self._bufs[name] = torch.empty(n, v, dtype=dtype, device=device)
        return b[:n]

    def __call__(self, name: str, like: Tensor) -> Tensor:
        """A buffer of ``like``'s shape (n, V), dtype and device."""
        return self.get(name, like.shape[0], like.shape[1], like.dtype, like.device)


def head_logits(hidden: Tensor, head: nn.Module, vocab: int | None = None) -> HeadLogits:
    """``idx -> logits`` of flat positions from final hidden states (B, L, H) and an output head, rows cropped to
    ``vocab`` (padded embedding rows beyond the tokenizer dropped)."""
    weight = head.weight if vocab is None else head.weight[:vocab]
    bias = getattr(head, "bias", None)
    if bias is not None and vocab is not None:
        bias = bias[:vocab]
    return HeadLogits(hidden, weight, bias)


class _ChunkLogits:
    """One chunk's student logits and their log-softmax per temperature, shared by the terms that read them."""

    def __init__(self, z: Tensor, terms: Sequence[TokenLoss], scratch: _Scratch | None = None) -> None:
        self.z = z
        self.scratch = scratch or _Scratch()
        self._users: dict[float, int] = {}
        for t in terms:
            if type(t).values_and_grad is not TokenLoss.values_and_grad:  # a closed form reads log_q
                temp = 1.0 if t.uses_targets else t.T
                self._users[temp] = self._users.get(temp, 0) + 1
        self._log_q: dict[float, Tensor] = {}

    def log_q(self, T: float, own: bool = False) -> Tensor:
        """log softmax(z / T) (n, V); with ``own``, a buffer the caller may overwrite (the last user gets the shared
        one, earlier users a copy)."""
        if T not in self._log_q:
            z = _up(self.z)
            if T != 1.0:
                z = torch.div(z, T, out=self.scratch("z/T", z))
            self._log_q[T] = torch.log_softmax(z, -1, out=self.scratch(f"log_q/{T}", z))
        self._users[T] = self._users.get(T, 1) - 1
        if not own:
            return self._log_q[T]
        return self._log_q.pop(T) if self._users[T] <= 0 else self._log_q[T].clone()


#: the terms of a chunk run on blocks of rows whose float32 (rows × vocabulary) tensor takes about this many bytes
BLOCK_BYTES = 2 * 2**20


def block_rows(vocab: int) -> int:
    """Rows per block of the terms' vocabulary-sized work (:data:`BLOCK_BYTES` of float32 logits, at least 1)."""
    return max(1, BLOCK_BYTES // (4 * max(vocab, 1)))


def _block_values_and_grad(terms: Sequence[tuple[TokenLoss, float]], shared: _ChunkLogits, teacher: Any,
                           targets: Tensor | None, sums: Tensor, n: int) -> tuple[Tensor, float]:
    """Every term on one block of rows: adds their values into ``sums`` and returns (g, scale), the block's
    gradient with respect to its logits divided by ``scale`` (the scale goes into the head products, not into
    a pass over g)."""
    g_total: Tensor | None = None
    scale = 1.0
    for k, (term, w) in enumerate(terms):
        v, g = term.values_and_grad(shared, None if term.uses_targets else teacher, targets)
        v = v.sum()
        sums[0] += w * v
        sums[1 + k] += v
        if g_total is None:
            g_total, scale = g, w / n
            if scale == 0.0:
                g_total.zero_()
                scale = 1.0
        else:
            g_total.add_(g, alpha=w / n / scale)
    assert g_total is not None
    return g_total, scale


class _FusedHeadLoss(torch.autograd.Function):
    """(total, term_1, …, term_K) from hidden states and head weights, the gradient taken chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, pos: Tensor,
                terms: list[tuple[TokenLoss, float]], teacher: TeacherChunk | None, targets: Tensor | None,
                chunk: int) -> Tensor:
        n = len(pos)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        out_dtype = _up(torch.empty((), dtype=h.dtype)).dtype
        sums = torch.zeros(1 + len(terms), dtype=out_dtype, device=h.device)
        scratch, block_scratch = _Scratch(), _Scratch()
        term_list = [term for term, _ in terms]
        scale = 1.0
        for i in range(0, n, chunk):
            idx = pos[i: i + chunk]
            hc = h[idx]
            z = _linear_into(scratch.get("z", len(idx), weight.shape[0], h.dtype, h.device), hc, weight, bias)
            if isinstance(teacher, HeadLogits):
                t = teacher(idx, out=scratch.get("t", len(idx), teacher.weight.shape[0], teacher.h.dtype,
                                                   teacher.h.device))
            else:
                t = teacher(idx) if teacher is not None else None
            tg = None if targets is None else targets[idx]
            m, step = len(idx), block_rows(z.shape[1])
            # the terms run on blocks of rows small enough to stay in the processor's cache: their several
            # passes over a block's vocabulary-sized tensors read the cache, not memory; each block's gradient
            # goes into the chunk's, which the head products read
            g_total = None if step >= m else scratch.get("g", m, z.shape[1], weight.dtype, z.device)
            for j in range(0, m, step):
                rows = slice(j, j + step)
                t_rows = t[rows] if isinstance(t, Tensor) else None if t is None else (t[0][rows], t[1][rows])
                g_rows, scale = _block_values_and_grad(terms, _ChunkLogits(z[rows], term_list, block_scratch),
                                                       t_rows, None if tg is None else tg[rows], sums, n)
                if g_total is None:
                    g_total = g_rows
                else:
                    g_total[rows] = g_rows
            assert g_total is not None
            g_total = g_total.to(weight.dtype)
            with torch.autocast(h.device.type, enabled=False):  # the gradients in the parameters' own dtype
                if grad_h is not None:
                    grad_h.index_copy_(0, idx, (g_total @ weight).mul_(scale).to(grad_h.dtype))
                if grad_w is not None:
                    grad_w.addmm_(g_total.T, hc.to(grad_w.dtype), alpha=scale)
                if grad_b is not None:
                    grad_b.add_(g_total.sum(0), alpha=scale)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return sums / n

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        scale = grad_out[0]
        grads = [None if g is None else g * scale.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None)
