"""IR (Huang et al., arXiv 2403.16221): dataset augmentation, L2 space maintenance, 1-NN over prototypes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.continual.learner import (
    LEARNERS,
    Learner,
    PrototypeMixin,
    Prototypes,
    Stage,
    TaskInfo,
    TaskMethod,
    TrainCfg,
    frozen_copy,
    rotate_batch,
)
from kdforge.continual.protocol import CILSplit
from kdforge.errors import KdforgeError

AUGS = ("rotation", "mixup_class", "none")
REDUCTIONS = ("frobenius", "sq_mean", "l2_mean")


def space_maintenance(new: Tensor, old: Tensor, reduction: str = "sq_mean") -> Tensor:
    """L_sm = ‖φ(X) − φ_old(X)‖: 'frobenius' of the whole B×d difference (eTag), 'sq_mean' or 'l2_mean' per row."""
    d = new - old
    if reduction == "frobenius":
        return torch.linalg.vector_norm(d)  # its gradient at 0 is 0, unlike sqrt(sum(d²))
    if reduction == "sq_mean":
        return d.pow(2).sum(-1).mean()
    if reduction == "l2_mean":
        return d.norm(dim=-1).mean()
    raise KdforgeError(f"unknown sm_reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")


def pair_index(n: int) -> Tensor:
    """n×n table of virtual-class ids n + k for each unordered pair {i, j} (diagonal −1)."""
    table = torch.full((n, n), -1, dtype=torch.long)
    for k, (i, j) in enumerate(combinations(range(n), 2)):
        table[i, j] = table[j, i] = n + k
    return table


def mixup_class(x: Tensor, y: Tensor, n: int, alpha: float = 1.0, rho: float = 0.5,
                gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Class mixup (IL2A-style): mix pairs of different classes into a virtual class per pair; appends to the batch."""
    k = round(rho * len(y))
    perm = torch.randperm(len(y), generator=gen)[:k].to(y.device)
    partner = torch.randperm(len(y), generator=gen)[:k].to(y.device)
    keep = y[perm] != y[partner]
    i, j = perm[keep], partner[keep]
    lam = torch.distributions.Beta(alpha, alpha).sample((len(i),)).clamp(0.4, 0.6).to(x)
    lam = lam.view(-1, *[1] * (x.dim() - 1))
    mixed = lam * x[i] + (1 - lam) * x[j]
    return torch.cat([x, mixed]), torch.cat([y, pair_index(n).to(y.device)[y[i], y[j]]])


def n_aug(n: int, aug: str, rotations: Sequence[int]) -> int:
    """Outputs of the transient head for n real classes."""
    return {"rotation": len(rotations) * n, "mixup_class": n + n * (n - 1) // 2, "none": n}[aug]


class IRStep(TaskMethod):
    """One task of IR: CE of a throwaway head on augmented data + λ_sm·L_sm against the frozen previous net."""

    def __init__(self, net: nn.Module, dim: int, task: TaskInfo, old: nn.Module | None, lam: float, aug: str,
                 rotations: Sequence[int], reduction: str, freeze_bn: bool, mix_alpha: float, mix_rho: float) -> None:
        super().__init__()
        self.net, self.old, self.lam, self.aug, self.rotations = net, old, lam, aug, tuple(rotations)
        self.reduction, self.lo, self.n, self.mix = reduction, task.lo, task.n_new, (mix_alpha, mix_rho)
        self.head = nn.Linear(dim, n_aug(task.n_new, aug, rotations))  # transient: thrown away after the task
        if old is not None:
            self.freeze(old)
            if freeze_bn:
                self.freeze_bn(net)

    def augment(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        local = y - self.lo
        if self.aug == "rotation":
            return rotate_batch(x, local, self.rotations)
        if self.aug == "mixup_class":
            return mixup_class(x, local, self.n, *self.mix)
        return x, local

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        xa, ya = self.augment(*batch)
        e = self.net(xa)
        out = {"ce": F.cross_entropy(self.head(e), ya)}
        if self.old is not None:
            with torch.no_grad():
                e_old = self.old(xa)
            out["sm"] = self.lam * space_maintenance(e, e_old, self.reduction)
        out["loss"] = sum(out.values())  # type: ignore[assignment]
        return out

    def deployable(self) -> nn.Module:
        return self.net


@LEARNERS.register("ir")
class IR(PrototypeMixin, Learner):
    """IR: augmentation widens the feature space, L_sm keeps it, prototypes classify (no stored samples)."""

    def __init__(self, backbone: nn.Module, dim: int, split: CILSplit, cfg: TrainCfg, aug: str = "rotation",
                 rotations: Sequence[int] = (0, 1, 2, 3), lam_sm: float = 1.0, lam_schedule: str = "const",
                 sm_reduction: str = "sq_mean", freeze_bn_after_base: bool = True, dist: str = "l2",
                 proto_update: str = "none", mix_alpha: float = 1.0, mix_rho: float = 0.5) -> None:
        super().__init__(backbone, dim, split, cfg)
        if aug not in AUGS:
            raise KdforgeError(f"unknown IR aug {aug!r}; valid: {', '.join(AUGS)}")
        if sm_reduction not in REDUCTIONS:
            raise KdforgeError(f"unknown sm_reduction {sm_reduction!r}; valid: {', '.join(REDUCTIONS)}")
        if lam_schedule not in ("const", "etag"):
            raise KdforgeError(f"unknown lam_schedule {lam_schedule!r}; valid: const, etag")
        if proto_update != "none":
            raise KdforgeError(f"proto_update {proto_update!r} is not supported; valid: none "
                               "('recompute' would need old data)")
        if dist not in ("l2", "cosine"):
            raise KdforgeError(f"unknown dist {dist!r}; valid: l2, cosine")
        self.aug, self.rotations, self.lam_sm, self.lam_schedule = aug, tuple(rotations), lam_sm, lam_schedule
        self.sm_reduction, self.freeze_bn_after_base, self.dist = sm_reduction, freeze_bn_after_base, dist
        self.mix = (mix_alpha, mix_rho)
        self.protos = Prototypes(self.num_classes, dim)

    def lam(self, task: TaskInfo) -> float:
        """λ_sm of task t: constant, or eTag's f_t = B₀/n + t − 1 times ``lam_sm``."""
        return self.lam_sm * (task.old_units if self.lam_schedule == "etag" else 1.0)

    def stages(self, task: TaskInfo) -> Iterator[Stage]:
        old = frozen_copy(self.net) if task.t > 0 else None
        step = IRStep(self.net, self.dim, task, old, self.lam(task), self.aug, self.rotations, self.sm_reduction,
                      self.freeze_bn_after_base, *self.mix)
        yield Stage(step, self.cfg.epochs_for(task.t), self.cfg.lr)

