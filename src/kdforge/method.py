"""Method: a training objective the engine runs; Supervised is the simplest one."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from kdforge.config import ModelSpec, Strict, validate
from kdforge.engine.optim import OptimizerHandle, OptimizerSpec
from kdforge.errors import KdforgeError
from kdforge.metrics import topk_correct
from kdforge.models import create_model
from kdforge.registry import METHODS

if TYPE_CHECKING:
    from kdforge.engine.trainer import Trainer


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about the data to build its models."""

    num_classes: int
    in_chans: int
    image_size: int


@dataclass(frozen=True)
class MethodStage:
    """One stage of a multi-stage method: its name and epochs (``None``: the recipe's ``train.epochs``)."""

    name: str
    epochs: int | None = None
    #: keys of the recipe's ``train`` section this stage overrides (e.g. ``{"ema": None, "grad_clip": 1.0}``)
    train: dict[str, Any] | None = None


class Method(nn.Module):
    """A training objective: owns what it trains, holds frozen what it does not.

    Subclasses implement :meth:`training_step` (returns a dict with ``"loss"``; other keys are
    logged) and :meth:`deployable` (the model evaluated and exported). Where a method needs more,
    it overrides the hooks below; the engine (:class:`kdforge.Trainer`) does all optimization.
    """

    Config: ClassVar[type[BaseModel]]
    #: prefixes of state_dict keys that are frozen and not saved in the resumable state
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()
    #: False: the engine does no backward/step; training_step steps every optimizer through handles
    automatic_optimization: ClassVar[bool] = True
    #: extra fields a batch carries (e.g. ``("index",)``): batches then are dicts ``{"x", "y", ...}``
    batch_fields: ClassVar[tuple[str, ...]] = ()
    #: False: the method makes its own batches (:meth:`step_source`, e.g. RL rollouts); no data set is loaded
    uses_data: ClassVar[bool] = True
    #: the validation metric (a key of :meth:`evaluate`'s dict) and mode that pick the best checkpoint
    monitor: ClassVar[tuple[str, str]] = ("top1", "max")

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        #: the run's ``train.epochs``, set by the Trainer before training (for schedules inside a method)
        self.total_epochs: int | None = None
        #: the stage being trained (set by :meth:`enter_stage`; ``None`` in a one-stage run)
        self.stage: str | None = None
        self._trainer: Callable[[], Trainer | None] | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> Method:
        """Build from the recipe's ``method`` section (validated by ``cls.Config``)."""
        raise KdforgeError(f"{cls.__name__} cannot be built from a recipe")

    # -- stages ------------------------------------------------------------------------------------
    def stages(self, epochs: int) -> Sequence[MethodStage]:
        """The stages of a multi-stage method, in order (empty: one fit); ``epochs`` is the recipe's.

        :func:`kdforge.run.fit` runs each as one engine fit in its own folder of a
        :class:`~kdforge.engine.stages.StagedRun`, calling :meth:`enter_stage` before building its Trainer;
        the method carries its parameters from one stage to the next.
        """
        return ()

    def enter_stage(self, name: str | None) -> None:
        """Switch to stage ``name`` (what trains and which loss); called before the stage's Trainer is built."""
        self.stage = name

    # -- optimizers ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Sequence[OptimizerSpec]:
        """The optimizers the engine builds; default: one (the recipe's ``optim``) over all trainable parameters."""
        return [OptimizerSpec("main")]

    def attach_engine(self, trainer: Trainer | None) -> None:
        """Called by the engine once its optimizers exist (``None`` detaches)."""
        object.__setattr__(self, "_trainer", weakref.ref(trainer) if trainer is not None else None)

    def optimizer(self, name: str) -> OptimizerHandle:
        """The handle of a manual optimizer declared in :meth:`configure_optimizers` (inside the engine only)."""
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            raise KdforgeError(f"{type(self).__name__}.optimizer({name!r}): the method is not running in the engine "
                               "(train it with kdforge.Trainer)")
        return trainer.handle(name)

    # -- data ------------------------------------------------------------------------------------
    def wrap_train_data(self, dataset: Dataset) -> Dataset:
        """Let a method wrap the training set; the Trainer calls it once."""
        return dataset

    def train_sampler(self, dataset: Dataset, seed: int, rank: int, world: int) -> Sampler[int] | None:
        """A method-supplied training sampler for this process (``None``: a shuffling DistributedSampler).

        It must shard by ``rank``/``world`` and, if it shuffles per epoch, have ``set_epoch``.
        """
        return None

    def step_source(self, recipe: Any) -> Any:
        """The :class:`~kdforge.engine.trainer.StepSource` of a method with ``uses_data = False`` (else ``None``)."""
        return None

    def setup(self, batch: Any) -> None:
        """Create shape-dependent modules from one example batch, before the optimizers exist."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the engine at the start of each epoch (0-based)."""
        self.epoch = epoch

    def on_fit_end(self, trainer: Trainer) -> None:
        """Called when a fit ends, also when a finished run is resumed (its EMA, if any, is ``trainer.ema``)."""

    def forward(self, batch: Any, step: int = 0) -> dict[str, Tensor]:
        return self.training_step(batch, step)

    def training_step(self, batch: Any, step: int) -> dict[str, Tensor]:
        """Compute the loss for one batch; must return a dict holding ``"loss"``."""
        raise KdforgeError(f"{type(self).__name__} defines no training_step")

    # -- evaluation and export -----------------------------------------------------------------
    def deployable(self) -> nn.Module:
        """The model that is evaluated and exported."""
        raise KdforgeError(f"{type(self).__name__} defines no deployable model")

    def deployable_spec(self) -> dict[str, Any] | None:
        """What rebuilds the deployable model (stored in every checkpoint); ``None`` if unknown."""
        return getattr(self.deployable(), "kdforge_spec", None)

    def evaluate(self, loader: DataLoader | None, trainer: Trainer, model: nn.Module) -> dict[str, float]:
        """Validation/test metrics of ``model`` on ``loader`` (default: top-1/top-5 in % and CE loss)."""
        if loader is None:
            return {}
        return evaluate_classifier(model, loader, trainer.acc)

    def resumable_state(self) -> dict[str, Tensor]:
        """The state needed to resume training (frozen parts left out)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes)}


def evaluate_classifier(model: nn.Module, loader: DataLoader, acc: Any = None) -> dict[str, float]:
    """Top-1/top-5 (%) and mean CE loss of a classifier, summed across processes when ``acc`` is given."""
    device = acc.device if acc is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    ctx = acc.autocast() if acc is not None else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), ctx:
        for batch in loader:
            x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch[:2]
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            c1, c5 = topk_correct(logits, y)
            loss = F.cross_entropy(logits, y, reduction="sum")
            sums += torch.tensor([c1, c5, float(loss), len(y)], dtype=torch.float64, device=device)
    model.train(was)
    if acc is not None:
        sums = acc.reduce(sums, "sum")
    n = max(float(sums[3]), 1.0)
    return {"top1": 100 * float(sums[0]) / n, "top5": 100 * float(sums[1]) / n, "loss": float(sums[2]) / n}


def build_model(spec: ModelSpec, info: DataInfo) -> nn.Module:
    """Build a model from a recipe's model spec for this data; it remembers the spec that rebuilt it."""
    model = create_model(spec.model, num_classes=info.num_classes, in_chans=info.in_chans,
                         checkpoint=spec.checkpoint, image_size=info.image_size, new_head=spec.new_head,
                         **spec.kwargs)
    model.kdforge_spec = {"builder": "model", "model": spec.model, "kwargs": dict(spec.kwargs),
                          "num_classes": info.num_classes, "in_chans": info.in_chans, "image_size": info.image_size}
    return model


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
