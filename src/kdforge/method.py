"""Method: a training objective the engine runs; Supervised is the simplest one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdforge.config import ModelSpec, Strict, validate
from kdforge.models import create_model
from kdforge.registry import METHODS


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about the data to build its models."""

    num_classes: int
    in_chans: int
    image_size: int


class Method(nn.Module):
    """A training objective: owns what it trains, holds frozen what it does not.

    Subclasses implement :meth:`training_step` (returns a dict with ``"loss"``; other keys are
    logged) and :meth:`deployable` (the model evaluated and exported).
    """

    Config: ClassVar[type[BaseModel]]
    #: prefixes of state_dict keys that are frozen and not saved in the resumable state
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        #: the run's ``train.epochs``, set by the Trainer before training (for schedules inside a method)
        self.total_epochs: int | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> Method:
        """Build from the recipe's ``method`` section (validated by ``cls.Config``)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a recipe")

    def wrap_train_data(self, dataset: Dataset) -> Dataset:
        """Let a method wrap the training set (e.g. to add sample indices); the Trainer calls it once."""
        return dataset

    def setup(self, batch: tuple[Tensor, Tensor]) -> None:
        """Create shape-dependent modules from one example batch, before the optimizer exists."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the engine at the start of each epoch (0-based)."""
        self.epoch = epoch

    def forward(self, batch: tuple[Tensor, Tensor], step: int = 0) -> dict[str, Tensor]:
        return self.training_step(batch, step)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        """Compute the loss for one batch; must return a dict holding ``"loss"``."""
        raise NotImplementedError

    def deployable(self) -> nn.Module:
        """The model that is evaluated and exported."""
        raise NotImplementedError

    def resumable_state(self) -> dict[str, Tensor]:
        """The state needed to resume training (frozen parts left out)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes)}


def build_model(spec: ModelSpec, info: DataInfo) -> nn.Module:
    """Build a model from a recipe's model spec for this data."""
    return create_model(spec.model, num_classes=info.num_classes, in_chans=info.in_chans,
                        checkpoint=spec.checkpoint, image_size=info.image_size, **spec.kwargs)


class SupervisedConfig(Strict):
    """Recipe schema of ``method: {name: supervised}``."""

    name: str = "supervised"
    model: ModelSpec
    label_smoothing: float = 0.0


@METHODS.register("supervised")
class Supervised(Method):
    """Train one model with cross-entropy on the labels."""

    Config = SupervisedConfig

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> Supervised:
        c = validate(SupervisedConfig, cfg, prefix="method")
        return cls(build_model(c.model, info), c.label_smoothing)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return {"loss": loss, "acc": (logits.argmax(-1) == y).float().mean().detach()}

    def deployable(self) -> nn.Module:
        return self.model


def build_method(cfg: dict[str, Any], info: DataInfo) -> Method:
    """Build the method named in a recipe's ``method`` section."""
    return METHODS.get(cfg.get("name", "supervised")).from_config(cfg, info)
