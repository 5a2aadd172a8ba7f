"""The ``kdforge cil`` recipe: the shared ``data``, ``optim``, ``sched`` and ``train`` sections plus a ``cil`` section.

A class-incremental run is a sequence of engine fits (one per task stage). Every stage trains with the
recipe's ``optim`` (default: Adam with coupled L2, as IR and eTag use), ``sched`` (default: constant;
``{name: step, step_size: 30, gamma: 0.1}`` is the papers' StepLR) for ``train.epochs`` epochs
(``cil.base_epochs`` on the base task); the learner may set another lr or epoch count for its own
stages (eTag's generator). Sections given in part are completed from the continual defaults below,
not from the training recipe's defaults.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from kdforge.config import (
    DataConfig,
    MethodConfig,
    OptimConfig,
    Recipe,
    RecipeFile,
    SchedConfig,
    Strict,
    TrainConfig,
)
from kdforge.errors import KdforgeError

#: what a section given in part is completed with (the learners' settings before the engine)
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"name": "digits", "val_fraction": 0.0, "augment": False, "batch_size": 64},
    "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 2e-4},
    "sched": {"name": "constant"},
    "train": {"epochs": 10},
}
#: keys of the flat recipes before the engine, and where they live now
MOVED = {"learner": "cil.learner", "base": "cil.base", "increment": "cil.increment", "tasks": "cil.tasks",
         "model": "cil.model", "model_kwargs": "cil.model_kwargs", "learner_kwargs": "cil.learner_kwargs",
         "base_epochs": "cil.base_epochs", "data_kwargs": "data", "epochs": "train.epochs", "lr": "optim.lr",
         "weight_decay": "optim.weight_decay", "batch_size": "data.batch_size",
         "lr_step_epochs": "sched: {name: step, step_size: N, gamma: 0.1}"}


class CilConfig(Strict):
    """The protocol (B base classes, then T tasks of I classes), the learner and its backbone."""

    learner: str = "ir"
    base: int = Field(2, ge=1)
    increment: int = Field(2, ge=1)
    tasks: int = Field(4, ge=0)
    model: str = "cnn_small"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    base_epochs: int | None = Field(None, ge=1)
    learner_kwargs: dict[str, Any] = Field(default_factory=dict)


class CilRecipe(RecipeFile):
    """A whole class-incremental run: the engine's shared sections and the ``cil`` section."""

    name: str = "cil"
    seed: int = Field(0, ge=0, lt=2**31)
    data: DataConfig = Field(default_factory=lambda: DataConfig(**DEFAULTS["data"]))
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(**DEFAULTS["optim"]))
    sched: SchedConfig = Field(default_factory=lambda: SchedConfig(**DEFAULTS["sched"]))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**DEFAULTS["train"]))
    cil: CilConfig = Field(default_factory=CilConfig)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, base in DEFAULTS.items():
            if isinstance(data.get(key), dict):
                data[key] = {**base, **data[key]}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None) -> CilRecipe:
        """Validate a dict (after ``key=value`` overrides), or fail in one line."""
        old = next((k for k in data if k in MOVED), None) if isinstance(data, dict) else None
        if old is not None:
            raise KdforgeError(f"recipe key {old!r} moved to {MOVED[old]} (cil recipes share data/optim/sched/train "
                               "with training recipes; see recipes/continual/)")
        r = super().from_dict(data, overrides)
        if r.train.max_steps is not None:
            raise KdforgeError("train.max_steps is not used by cil runs: every stage trains train.epochs epochs "
                               "(cil.base_epochs on the base task)")
        return r


    def stage_recipe(self, stage: str, seed: int, epochs: int, lr: float) -> Recipe:
        """The engine recipe of one stage: the shared sections with the stage's epochs and lr."""
        return Recipe(name=f"{self.name}-{stage}", seed=seed, data=self.data,
                      method=MethodConfig(name="continual", learner=self.cil.learner, stage=stage),
                      optim=self.optim.model_copy(update={"lr": lr}), sched=self.sched,
                      train=self.train.model_copy(update={"epochs": epochs}))
