"""train(): a recipe in, a trained run folder out — what ``kdforge train`` calls.

:func:`fit` runs a built method on built data: one engine fit, or, for a method whose
:meth:`~kdforge.method.Method.stages` lists several, one fit per stage inside a
:class:`~kdforge.engine.stages.StagedRun` (``RUN/stages/NN-name/``), resuming across stages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from kdforge.config import Recipe
from kdforge.data import DataBundle, load_data
from kdforge.engine.callbacks import Callback
from kdforge.engine.run_dir import open_run
from kdforge.engine.trainer import FitResult, Trainer, TrainingInterrupted, seed_everything
from kdforge.errors import KdforgeError
from kdforge.method import DataInfo, Method, MethodStage, build_method


class RunReport(Callback):
    """Write ``report.md`` and ``curves.png`` when a run with a folder ends (the engine itself writes no report)."""

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        if trainer.main and trainer.run_dir is not None:
            from kdforge.report.run_report import write_run_report

            write_run_report(trainer.run_dir)


def with_report(callbacks: Any = ()) -> list[Any]:
    """A command's engine callbacks plus the run report."""
    return [*callbacks, RunReport()]


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False) -> FitResult:
    """Build data and method from a recipe, train (every stage), evaluate; write the run folder if given."""
    seed_everything(recipe.seed)
    if not _uses_data(recipe):  # the method makes its own batches (RL): no data set, the method's step source
        method = build_method(recipe.method.model_dump(), None)  # type: ignore[arg-type]
        return fit(method, None, recipe, run_dir, resume=resume, overwrite=overwrite,  # type: ignore[arg-type]
                   source=method.step_source(recipe))
    data = load_data(recipe.data)
    info = DataInfo(data.num_classes, data.in_chans, data.image_size)
    method = build_method(recipe.method.model_dump(), info)
    return fit(method, data, recipe, run_dir, resume=resume, overwrite=overwrite)


def _uses_data(recipe: Recipe) -> bool:
    from kdforge.registry import METHODS

    name = recipe.method.name
    return name not in METHODS or getattr(METHODS.get(name), "uses_data", True)


def fit(method: Method, data: DataBundle, recipe: Recipe, run_dir: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, **trainer_kwargs: Any) -> FitResult:
    """Train ``method``: one :class:`Trainer` fit, or one per stage of a multi-stage method.

    A staged run folder holds ``config.yaml``, ``stages.json`` and ``stages/NN-name/`` (each a run folder);
    when the last stage ends, its ``results.json`` and checkpoints are also put at the top (``kdforge eval RUN``).
    Returns the last stage's result.
    """
    plan = list(method.stages(recipe.train.epochs))
    trainer_kwargs["callbacks"] = with_report(trainer_kwargs.get("callbacks", ()))
    if not plan:
        return Trainer(method, data, recipe, run_dir, resume=resume, overwrite=overwrite, **trainer_kwargs).fit()
    from kdforge.engine.checkpoint import atomic_write_text
    from kdforge.engine.stages import StagedRun

    root = Path(run_dir) if run_dir is not None else None
    if root is not None and resume:
        _check_staged_root(root)
    held = (open_run(root, "train", overwrite=overwrite, resume=resume, resume_cmd=f"kdforge train {root} --resume")
            if root is not None else contextlib.nullcontext())
    with held:
        staged = StagedRun(root, _identity(recipe), resume=resume)
        if root is not None:
            atomic_write_text(root / "config.yaml", recipe.to_yaml())
        result: FitResult | None = None
        for stage in plan:
            d = staged.dir(stage.name)
            method.enter_stage(stage.name)
            # a finished stage is resumed too: its fit loads the stage's final state and returns its result
            trainer = Trainer(method, data, stage_recipe(recipe, stage), d, resume=d is not None and d.is_dir(),
                              **trainer_kwargs)
            try:
                result = trainer.fit()
            except TrainingInterrupted as e:
                if root is None:
                    raise
                raise TrainingInterrupted(f"{str(e).split(';')[0]} of stage {stage.name!r}") from None
            del trainer  # drops a DDP wrapper before the next stage wraps the same modules
            if staged.done(stage.name) is None:
                staged.finish(stage.name, {"epochs": result.epochs, "test_last": result.test_last})
        assert result is not None
        if root is not None and result.run_dir is not None:
            _publish(result.run_dir, root)
        return result


def stage_recipe(recipe: Recipe, stage: MethodStage) -> Recipe:
    """The engine recipe of one stage: the recipe with the stage's epochs (and its name in the run's name)."""
    train = recipe.train.model_copy(update={"epochs": stage.epochs or recipe.train.epochs})
    if stage.train:
        from kdforge.config import TrainConfig, validate

        train = validate(TrainConfig, {**train.model_dump(), **stage.train}, prefix=f"stage {stage.name!r} train")
    return recipe.model_copy(update={"name": f"{recipe.name}-{stage.name}", "train": train})


def _identity(recipe: Recipe) -> dict[str, Any]:
    return recipe.identity()


def _check_staged_root(root: Path) -> None:
    """A staged run resumes only from a staged run folder (not from a one-stage run)."""
    if (root / "checkpoints" / "state").is_dir() and not (root / "stages").is_dir():
        raise KdforgeError(f"cannot resume {str(root)!r}: it holds a one-stage run, and this recipe trains in "
                           "stages; start it in another folder")


def _publish(stage_dir: Path, root: Path) -> None:
    """Put the last stage's results.json and checkpoints at the top of the staged run folder."""
    from kdforge.engine.checkpoint import atomic_write_text

    for name in ("best.safetensors", "last.safetensors"):
        src, dst = stage_dir / "checkpoints" / name, root / "checkpoints" / name
        dst.unlink(missing_ok=True)
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    if (stage_dir / "results.json").is_file():
        atomic_write_text(root / "results.json", (stage_dir / "results.json").read_text())


def dry_run(recipe: Recipe, steps: int = 1) -> dict[str, float]:
    """Build everything and run ``steps`` training steps of every stage through the engine's real path.

    Writes nothing; the values are the last stage's (earlier stages' keys are prefixed ``<stage>/``).
    """
    r = recipe.model_copy(deep=True)
    r.train.progress = "silent"
    seed_everything(r.seed)
    if not _uses_data(r):
        method = build_method(r.method.model_dump(), None)  # type: ignore[arg-type]
        return Trainer(method, None, r, run_dir=None, source=method.step_source(r)).train_steps(steps)
    data = load_data(r.data)
    method = build_method(r.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size))
    plan = list(method.stages(r.train.epochs))
    if not plan:
        return Trainer(method, data, r, run_dir=None).train_steps(steps)
    out: dict[str, float] = {}
    for i, stage in enumerate(plan):
        method.enter_stage(stage.name)
        res = Trainer(method, data, stage_recipe(r, stage), run_dir=None).train_steps(steps)
        out.update(res if i == len(plan) - 1 else {f"{stage.name}/{k}": v for k, v in res.items()})
    return out
