"""Baselines: Finetune (lower bound), Joint (upper bound), LwF, frozen-base NCM and FeTrIL."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.continual.learner import (
    LEARNERS,
    HeadMixin,
    Learner,
    PrototypeMixin,
    Prototypes,
    Stage,
    TaskInfo,
    TaskMethod,
    TrainCfg,
    frozen_copy,
    kd_loss,
)
from kdforge.continual.protocol import CILSplit


class CEStep(TaskMethod):
    """Cross-entropy over the logits of the classes seen so far; optional LwF distillation on the old ones."""

    def __init__(self, net: nn.Module, head: nn.Linear, hi: int, old: nn.Module | None = None, lo: int = 0,
                 lam: float = 1.0, tau: float = 2.0) -> None:
        super().__init__()
        self.net, self.head, self.hi, self.lo, self.lam, self.tau = net, head, hi, lo, lam, tau
        self.old = old
        if old is not None:
            self.freeze(old)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self.head(self.net(x))[:, :self.hi]
        out = {"ce": F.cross_entropy(logits, y)}
        if self.old is not None and self.lo > 0:
            with torch.no_grad():
                target = self.old(x)[:, :self.lo]
            out["kd"] = self.lam * kd_loss(logits[:, :self.lo], target, self.tau)
        out["loss"] = sum(out.values())  # type: ignore[assignment]
        return out

    def deployable(self) -> nn.Module:
        return nn.Sequential(self.net, self.head)


class _HeadLearner(HeadMixin, Learner):
    def __init__(self, backbone: nn.Module, dim: int, split: CILSplit, cfg: TrainCfg) -> None:
        super().__init__(backbone, dim, split, cfg)
        self.head = nn.Linear(dim, self.num_classes)


@LEARNERS.register("finetune")
class Finetune(_HeadLearner):
    """Fine-tune backbone and unified head on each task's data alone: the lower bound."""

    def stages(self, task: TaskInfo) -> Iterator[Stage]:
        yield Stage(CEStep(self.net, self.head, task.hi), self.cfg.epochs_for(task.t), self.cfg.lr)


@LEARNERS.register("joint")
class Joint(Finetune):
    """Train on all data of every class seen so far: the upper bound (not exemplar-free by design)."""

    cumulative = True


@LEARNERS.register("lwf")
class LwF(_HeadLearner):
    """Learning without Forgetting (Li & Hoiem 2016): CE on new data + KD (τ = 2) on the old classes' logits."""

    def __init__(self, backbone: nn.Module, dim: int, split: CILSplit, cfg: TrainCfg, lam: float = 1.0,
                 tau: float = 2.0) -> None:
        super().__init__(backbone, dim, split, cfg)
        self.lam, self.tau = lam, tau

    def stages(self, task: TaskInfo) -> Iterator[Stage]:
        old = frozen_copy(nn.Sequential(self.net, self.head)) if task.t > 0 else None
        step = CEStep(self.net, self.head, task.hi, old, task.lo, self.lam, self.tau)
        yield Stage(step, self.cfg.epochs_for(task.t), self.cfg.lr)


@LEARNERS.register("ncm")
class FrozenNCM(PrototypeMixin, _HeadLearner):
    """Train on the base task only, then freeze the backbone and classify by the nearest class mean."""

    def __init__(self, backbone: nn.Module, dim: int, split: CILSplit, cfg: TrainCfg, dist: str = "l2") -> None:
        super().__init__(backbone, dim, split, cfg)
        self.protos = Prototypes(self.num_classes, dim)
        self.dist = dist

    def stages(self, task: TaskInfo) -> Iterator[Stage]:
        if task.t == 0:
            yield Stage(CEStep(self.net, self.head, task.hi), self.cfg.epochs_for(0), self.cfg.lr)



class FeTrILStep(TaskMethod):
    """Train the linear head on real new features and pseudo-features f + μ_old − μ_y of old classes."""

    def __init__(self, net: nn.Module, head: nn.Linear, means: Tensor, lo: int, hi: int) -> None:
        super().__init__()
        self.net, self.head, self.lo, self.hi = net, head, lo, hi
        self.means = means  # a view of the learner's prototypes, read only
        self.freeze(net)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        with torch.no_grad():
            f = self.net(x)
            old = torch.randint(0, self.lo, (len(y),), device=y.device)
            pseudo = f + self.means[old] - self.means[y]
        feats, labels = torch.cat([f, pseudo]), torch.cat([y, old])
        loss = F.cross_entropy(self.head(feats)[:, :self.hi], labels)
        return {"loss": loss}

    def deployable(self) -> nn.Module:
        return nn.Sequential(self.net, self.head)


@LEARNERS.register("fetril")
class FeTrIL(_HeadLearner):
    """FeTrIL (Petit et al., WACV 2023): frozen base backbone; old classes as translated new features."""

    def __init__(self, backbone: nn.Module, dim: int, split: CILSplit, cfg: TrainCfg,
                 head_epochs: int | None = None) -> None:
        super().__init__(backbone, dim, split, cfg)
        self.protos = Prototypes(self.num_classes, dim)
        self.head_epochs = head_epochs

    def stages(self, task: TaskInfo) -> Iterator[Stage]:
        if task.t == 0:
            yield Stage(CEStep(self.net, self.head, task.hi), self.cfg.epochs_for(0), self.cfg.lr)
            return
        self.protos.update(*self.features(task.train), range(task.lo, task.hi))
        step = FeTrILStep(self.net, self.head, self.protos.means, task.lo, task.hi)
        yield Stage(step, self.head_epochs or self.cfg.epochs_for(task.t), self.cfg.lr)

    def end_task(self, task: TaskInfo) -> None:
        if task.t == 0:
            self.protos.update(*self.features(task.train), range(task.lo, task.hi))
        super().end_task(task)
