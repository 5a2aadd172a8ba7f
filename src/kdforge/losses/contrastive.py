"""Contrastive representation distillation (CRD) with a memory bank of negatives held in buffers.

Two banks, chosen by ``memory``:

- ``queue`` (default; needs no sample indices): a FIFO queue (MoCo-style). Each step writes the batch's
  student and teacher embeddings (and labels) into the next ``B`` slots; the positive of sample i is the
  other network's current embedding of i (detached), and negatives are drawn from slots of other classes
  ("exact" mode).
- ``keyed``: RepDistiller's ``ContrastMemory``. One row per training sample (``bank_size`` = the number
  of training samples; the Distill method sets it from the training set), keyed by the sample index
  that the batch carries (the method then asks the engine for ``batch_fields = ("index",)``). The
  positive of sample i is ``M[i]`` and rows are momentum-updated after the loss,
  ``M[i] ← normalise(m·M[i] + (1 − m)·v_i)``; negatives are K rows of other classes (exact mode), never
  row i. A row's class is known once its sample has been visited (RepDistiller knows every label up
  front), so in the first epoch unvisited rows may be drawn as negatives. Under DDP the bank update is
  all-gathered, so every process keeps the same bank.

Bank, labels, write pointer and the normalising constants Z are registered buffers, so a resumed run
continues with the same bank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.gather import gather_no_grad
from kdforge.losses.base import check_compat
from kdforge.losses.feature import FeatureLoss
from kdforge.losses.relation import LinearEmbed
from kdforge.registry import LOSSES


def nce_loss(scores: Tensor, num_data: int, eps: float = 0.0) -> Tensor:
    """CRD's NCE on normalised scores (B, 1+K), positive first, noise P_n = 1/N.

    ``eps`` is added to each denominator P + K·P_n (the released code's 1e-7; the paper has none).
    """
    k = scores.shape[1] - 1
    kpn = k / num_data
    pos = scores[:, 0]
    neg = scores[:, 1:]
    log_pos = torch.log(pos / (pos + kpn + eps))
    log_neg = torch.log(kpn / (neg + kpn + eps))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


@LOSSES.register("crd")
class CRDLoss(FeatureLoss):
    """CRD (Tian et al., ICLR 2020): NCE between student and teacher embeddings, negatives from a memory bank."""

    ndims = (2, 4)
    has_connectors = True
    needs_targets = True

    def __init__(self, feat_dim: int = 128, bank_size: int = 16384, num_negatives: int = 16384,
                 T: float = 0.07, momentum: float = 0.5, exact: bool = True, compat: str = "paper",
                 memory: str = "queue") -> None:
        super().__init__()
        if memory not in ("queue", "keyed"):
            raise ValueError(f"memory must be 'queue' or 'keyed', got {memory!r}")
        self.memory = memory
        # RepDistiller (the authors' code) and torchdistill add 1e-7 to the NCE denominators
        self.compat = compat
        self.nce_eps = 1e-7 if check_compat("crd", compat, ("official", "repdistiller", "torchdistill")) else 0.0
        if bank_size < 2 or num_negatives < 1:
            raise ValueError(f"need bank_size >= 2 and num_negatives >= 1, got {bank_size} and {num_negatives}")
        if T <= 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"need T > 0 and momentum in [0, 1), got {T} and {momentum}")
        self.feat_dim, self.bank_size, self.num_negatives = feat_dim, bank_size, num_negatives
        self.T, self.momentum, self.exact = T, momentum, exact
        stdv = 1.0 / (feat_dim / 3) ** 0.5
        self.register_buffer("mem_s", torch.rand(bank_size, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("mem_t", torch.rand(bank_size, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("mem_y", torch.full((bank_size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self.embed_s: LinearEmbed | None = None
        self.embed_t: LinearEmbed | None = None

    @property
    def needs_indices(self) -> bool:
        """Whether ``forward`` needs the batch's sample indices (the keyed bank)."""
        return self.memory == "keyed"

    def set_num_data(self, n: int) -> None:
        """Keyed bank: one row per training sample (RepDistiller's ``n_data``); a queue keeps its size."""
        if self.memory != "keyed" or n == self.bank_size:
            return
        if n < 2:
            raise KdforgeError(f"crd: the keyed memory needs at least 2 training samples, got {n}")
        stdv = 1.0 / (self.feat_dim / 3) ** 0.5
        device = self.mem_s.device
        self.bank_size = n
        self.mem_s = torch.rand(n, self.feat_dim, device=device).mul_(2 * stdv).add_(-stdv)
        self.mem_t = torch.rand(n, self.feat_dim, device=device).mul_(2 * stdv).add_(-stdv)
        self.mem_y = torch.full((n,), -1, dtype=torch.long, device=device)

    def build(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        if len(student) != 1:
            raise KdforgeError(f"crd: takes one student and one teacher tap (the embedding), got {len(student)}")
        self.embed_s = LinearEmbed(student[0][0].numel(), self.feat_dim)
        self.embed_t = LinearEmbed(teacher[0][0].numel(), self.feat_dim)

    def sample_negatives(self, targets: Tensor | None, batch: int, exclude: Tensor | None = None) -> Tensor:
        """(B, K) bank slots per anchor; in exact mode only slots of other classes (unlabelled slots allowed)."""
        weights = torch.ones(batch, self.bank_size, device=self.mem_y.device)
        if self.exact and targets is not None:
            weights = (self.mem_y[None, :] != targets[:, None]).float()
        if exclude is not None:
            weights[torch.arange(batch, device=weights.device), exclude] = 0.0
        empty = weights.sum(1) == 0
        if empty.any():
            weights[empty] = 1.0
        return torch.multinomial(weights, self.num_negatives, replacement=True)

    def _scores(self, anchor: Tensor, positive: Tensor, bank: Tensor, neg: Tensor, z: Tensor) -> Tensor:
        # a snapshot: the bank is written in place after the loss, before backward needs it
        all_scores = anchor @ bank.clone().t() / self.T
        pos = (anchor * positive).sum(1, keepdim=True) / self.T
        out = torch.cat([pos, all_scores.gather(1, neg)], 1).exp()
        if z < 0:
            z.fill_(float(out.detach().mean() * self.bank_size))
        return out / z

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor], targets: Tensor | None = None,
                indices: Tensor | None = None) -> Tensor:
        self.check(student, teacher)
        assert self.embed_s is not None and self.embed_t is not None
        vs = F.normalize(self.embed_s(student[0]), dim=1)
        vt = F.normalize(self.embed_t(teacher[0].detach()), dim=1)
        b = vs.shape[0]
        if self.memory == "keyed":
            if indices is None:
                raise KdforgeError("crd: memory 'keyed' needs the batch's sample indices (indices=...)")
            if int(indices.max()) >= self.bank_size:
                raise KdforgeError(f"crd: sample index {int(indices.max())} >= bank_size {self.bank_size}")
            pos_t, pos_s = self.mem_t[indices], self.mem_s[indices]
        else:
            if indices is not None:
                raise KdforgeError("crd: memory 'queue' cannot use sample indices (it would ignore them); "
                                   "set memory: keyed to key the bank by sample index")
            pos_t, pos_s = vt.detach(), vs.detach()
        neg = self.sample_negatives(targets, b, exclude=indices)
        loss_s = nce_loss(self._scores(vs, pos_t, self.mem_t, neg, self.z_s), self.bank_size, self.nce_eps)
        loss_t = nce_loss(self._scores(vt, pos_s, self.mem_s, neg, self.z_t), self.bank_size, self.nce_eps)
        if self.training:
            self.update_bank(vs.detach(), vt.detach(), targets, indices)
        return loss_s + loss_t

    @torch.no_grad()
    def update_bank(self, vs: Tensor, vt: Tensor, targets: Tensor | None, indices: Tensor | None = None) -> None:
        """Write embeddings into the bank: momentum rows at ``indices``, or the next FIFO slots."""
        labels = targets if targets is not None else torch.full((len(vs),), -1, device=vs.device)
        if indices is not None:
            # every process applies every process's rows, so the banks stay identical under DDP
            indices, vs, vt, labels = (gather_no_grad(t) for t in (indices, vs, vt, labels))
            m = self.momentum
            self.mem_s[indices] = F.normalize(m * self.mem_s[indices] + (1 - m) * vs, dim=1)
            self.mem_t[indices] = F.normalize(m * self.mem_t[indices] + (1 - m) * vt, dim=1)
            self.mem_y[indices] = labels
            return
        vs, vt, labels = vs[-self.bank_size:], vt[-self.bank_size:], labels[-self.bank_size:]
        slots = (self.ptr + torch.arange(len(vs), device=vs.device)) % self.bank_size
        self.mem_s[slots] = vs
        self.mem_t[slots] = vt
        self.mem_y[slots] = labels
        self.ptr.fill_(int((self.ptr + len(vs)) % self.bank_size))
