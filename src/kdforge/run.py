"""train(): a recipe in, a trained run folder out — what ``kdforge train`` calls."""

from __future__ import annotations

from pathlib import Path

from kdforge.config import Recipe
from kdforge.data import load_data
from kdforge.engine.trainer import FitResult, Trainer, seed_everything
from kdforge.method import DataInfo, build_method


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False) -> FitResult:
    """Build data and method from a recipe, train, evaluate; write the run folder if given."""
    seed_everything(recipe.seed)
    data = load_data(recipe.data)
    info = DataInfo(data.num_classes, data.in_chans, data.image_size)
    method = build_method(recipe.method.model_dump(), info)
    return Trainer(method, data, recipe, run_dir, resume=resume, overwrite=overwrite).fit()


def dry_run(recipe: Recipe, steps: int = 1) -> dict[str, float]:
    """Build everything and run ``steps`` training steps through the engine's real path, writing nothing."""
    r = recipe.model_copy(deep=True)
    r.train.progress = "never"
    seed_everything(r.seed)
    data = load_data(r.data)
    method = build_method(r.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size))
    return Trainer(method, data, r, run_dir=None).train_steps(steps)
