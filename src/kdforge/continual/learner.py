"""What every class-incremental learner shares: the Learner base, per-task Methods, the backbone, rotations."""

from __future__ import annotations

import copy
from abc import ABCMeta, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kdforge.continual.protocol import CILSplit, batches
from kdforge.errors import KdforgeError
from kdforge.method import Method
from kdforge.registry import Registry

LEARNERS: Registry[Any] = Registry("learner")


@dataclass(frozen=True)
class TrainCfg:
    """What a learner knows of the recipe: epochs per task (more on the base task) and the lr of its stages.

    The optimizer, schedule, batch size and device are the recipe's ``optim``/``sched``/``data``/``train``.
    """

    epochs: int = 10
    base_epochs: int | None = None
    lr: float = 1e-3

    def epochs_for(self, t: int) -> int:
        return self.base_epochs if t == 0 and self.base_epochs is not None else self.epochs


@dataclass
class Stage:
    """One training pass of a task: a Method the engine trains for ``epochs`` at ``lr`` on ``data``."""

    method: Method
    epochs: int
    lr: float
    data: Dataset | None = None  # None: the task's training data


@dataclass
class TaskInfo:
    """What a learner is told about task t."""

    t: int
    split: CILSplit
    train: Dataset  # the task's classes (all seen classes for a cumulative learner)
    lo: int = field(init=False)
    hi: int = field(init=False)

    def __post_init__(self) -> None:
        self.lo, self.hi = self.split.bounds(self.t)

    @property
    def n_new(self) -> int:
        return self.hi - self.lo

    @property
    def old_units(self) -> float:
        """eTag's f = B₀/n + t − 1: the number of old 'task units' (0 at the base task)."""
        return 0.0 if self.t == 0 else self.split.base / self.split.increment + self.t - 1


def make_backbone(model: str, in_chans: int, image_size: int, **kwargs: Any) -> tuple[nn.Module, int]:
    """A zoo model with its classifier removed: (embedding network, embedding size)."""
    from kdforge.models import create_model

    net = create_model(model, num_classes=2, in_chans=in_chans, image_size=image_size, **kwargs)
    if not isinstance(getattr(net, "fc", None), nn.Linear) or not hasattr(net, "num_features"):
        raise KdforgeError(f"model {model!r} has no 'fc' classifier and 'num_features'; "
                           "continual learners need an own-zoo model such as cnn_small, mlp or resnet20")
    net.fc = nn.Identity()
    return net, int(net.num_features)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no gradients (the previous model)."""
    old = copy.deepcopy(module).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


def rotate_batch(x: Tensor, y: Tensor, rotations: Sequence[int] = (0, 1, 2, 3)) -> tuple[Tensor, Tensor]:
    """Rotation label augmentation: each image as rot90(x, k), label R·y + i; sample-major, rotation-minor."""
    r = len(rotations)
    xs = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in rotations], dim=1)
    ys = r * y.unsqueeze(1) + torch.arange(r, device=y.device)
    return xs.flatten(0, 1), ys.flatten()


class TaskMethod(Method):
    """A per-task objective; ``frozen`` modules stay in eval mode, ``bn_frozen`` modules keep BN statistics."""

    def __init__(self) -> None:
        super().__init__()
        self._frozen: list[nn.Module] = []
        self._bn_frozen: list[nn.Module] = []

    def freeze(self, *modules: nn.Module) -> None:
        for m in modules:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        self._frozen += modules

    def freeze_bn(self, *modules: nn.Module) -> None:
        self._bn_frozen += modules

    def train(self, mode: bool = True) -> TaskMethod:
        super().train(mode)
        for m in self._frozen:
            m.eval()
        for m in self._bn_frozen:
            for b in m.modules():
                if isinstance(b, nn.modules.batchnorm._BatchNorm):
                    b.eval()
        return self

    #: a stage's validation is its own loss: stages keep their last weights, "best" is only reported
    monitor: ClassVar[tuple[str, str]] = ("loss", "min")

    @torch.no_grad()
    def evaluate(self, loader: DataLoader | None, trainer: Any, model: nn.Module) -> dict[str, float]:
        """Mean of every term of :meth:`training_step` in eval mode over ``loader`` (``model``'s weights)."""
        if loader is None:
            return {}
        dep = self.deployable()
        mine = [id(p) for p in dep.parameters()] == [id(p) for p in model.parameters()]
        saved = None if mine else {k: v.clone() for k, v in dep.state_dict().items()}
        if saved is not None:
            dep.load_state_dict(model.state_dict())
        was = self.training
        self.eval()
        dev = trainer.acc.device
        sums: dict[str, Tensor] = {}
        n = torch.zeros((), dtype=torch.float64, device=dev)
        try:
            with trainer.acc.autocast():
                for x, y in loader:
                    out = self.training_step((x.to(dev), y.to(dev)), trainer.global_step)
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0) + v.detach().double() * len(y)
                    n += len(y)
        finally:
            self.train(was)
            if saved is not None:
                dep.load_state_dict(saved)
        keys = sorted(sums)
        total = trainer.acc.reduce(torch.stack([sums[k] for k in keys] + [n]), "sum") if keys else n
        return {k: float(total[i] / total[-1]) for i, k in enumerate(keys)} if keys else {}


class Learner(nn.Module, metaclass=ABCMeta):
    """A class-incremental learner: its state_dict is everything it carries between tasks.

    Per task it yields Stages (a Method each) that the driver trains, then ``end_task`` runs; all
    modules and buffers have fixed shapes from the start, so the state can be saved and reloaded
    at any task boundary. No input sample of an old class may ever be stored in it.
    """

    cumulative = False  # Joint trains on all seen classes

    def __init__(self, backbone: nn.Module, dim: int, split: CILSplit, cfg: TrainCfg) -> None:
        super().__init__()
        self.net, self.dim, self.split, self.cfg = backbone, dim, split, cfg
        self.num_classes = split.used_classes
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def setup(self, x: Tensor) -> None:
        """Build shape-dependent modules from one example batch (before any state is loaded)."""

    @abstractmethod
    def stages(self, task: TaskInfo) -> Iterator[Stage]:
        """The training stages of task t (lazily: a later stage may depend on an earlier one)."""

    def end_task(self, task: TaskInfo) -> None:
        """After training task t (e.g. compute prototypes)."""
        self.seen.fill_(task.hi)

    @abstractmethod
    def predict(self, x: Tensor) -> Tensor:
        """Predicted labels (in the split's order) over the classes seen so far (under ``torch.no_grad``)."""

    @torch.no_grad()
    def features(self, data: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """Eval-mode embeddings and labels of a data set on its un-augmented view (no random crop or flip).

        Class prototypes and NCM / FeTrIL class means are taken here, so they never average augmented images.
        """
        was = self.net.training
        self.net.eval()
        dev = next(self.net.parameters()).device
        fs, ys = [], []
        with without_augmentation(data):
            for x, y in batches(data, batch_size, shuffle=False):
                fs.append(self.net(x.to(dev)))
                ys.append(y.to(dev))
        self.net.train(was)
        return torch.cat(fs), torch.cat(ys)


@contextmanager
def without_augmentation(data: Dataset) -> Iterator[Dataset]:
    """Switch off the ``augment`` flag of a data set and of the sets it wraps (views, subsets), then restore it."""
    switched, seen, stack = [], set(), [data]
    while stack:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        if getattr(d, "augment", None) is True:
            d.augment = False
            switched.append(d)
        stack += [c for c in (getattr(d, "base", None), getattr(d, "dataset", None)) if isinstance(c, Dataset)]
        stack += [c for c in getattr(d, "datasets", ()) if isinstance(c, Dataset)]
    try:
        yield data
    finally:
        for d in switched:
            d.augment = True


class HeadMixin:
    """A unified linear head over all classes of the split, masked to the seen ones."""

    def masked_logits(self, x: Tensor, upto: int) -> Tensor:
        return self.head(self.net(x))[:, :upto]  # type: ignore[attr-defined]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.eval()  # type: ignore[attr-defined]
        return self.masked_logits(x, int(self.seen)).argmax(-1)  # type: ignore[attr-defined]


class PrototypeMixin:
    """Classify by the nearest class prototype; each task adds the prototypes of its new classes only."""

    protos: Prototypes
    dist: str

    def end_task(self, task: TaskInfo) -> None:
        # eval mode, un-augmented views: prototypes of the new classes only; old ones stay as they are
        self.protos.update(*self.features(task.train), range(task.lo, task.hi))  # type: ignore[attr-defined]
        super().end_task(task)  # type: ignore[misc]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.eval()  # type: ignore[attr-defined]
        return self.protos.nearest(self.net(x), int(self.seen), self.dist)  # type: ignore[attr-defined]


class Prototypes(nn.Module):
    """One mean embedding per class (the efCIL allowance), with 1-NN / nearest-class-mean prediction."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("means", torch.zeros(num_classes, dim))

    @torch.no_grad()
    def update(self, feats: Tensor, labels: Tensor, classes: range) -> None:
        for c in classes:
            sel = labels == c
            if not sel.any():
                raise KdforgeError(f"no training sample of class {c} to build its prototype")
            self.means[c] = feats[sel].mean(0)

    def nearest(self, feats: Tensor, upto: int, dist: str = "l2") -> Tensor:
        """Index of the nearest of the first ``upto`` prototypes."""
        mu = self.means[:upto]
        if dist == "cosine":
            return (F.normalize(feats, dim=-1) @ F.normalize(mu, dim=-1).T).argmax(-1)
        return torch.cdist(feats, mu).argmin(-1)


def kd_loss(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)), batch mean."""
    return F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1), reduction="batchmean",
                    log_target=True) * tau * tau


def check_fit(module: nn.Module, batch_x: Tensor) -> None:
    """Run one forward pass to catch shape errors early with the model's name."""
    try:
        with torch.no_grad():
            module.eval()(batch_x)
    except RuntimeError as e:
        raise KdforgeError(f"{type(module).__name__} does not accept inputs of shape {tuple(batch_x.shape)}: "
                           f"{str(e).splitlines()[0]}") from None
