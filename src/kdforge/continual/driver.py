"""The class-incremental driver: each task's stages are engine fits of a staged run; it fills the accuracy matrix.

A run is a :class:`~kdforge.engine.stages.StagedRun`: with a run folder, every stage (``task<t>-<i>-<kind>``)
is a ``kdforge.Trainer`` run folder of its own (config, per-epoch metrics.csv, checkpoints, resumable
state) and every finished task records its accuracy row and the learner's state, so a run resumes
across tasks and inside a task's stage. The engine gives the stages devices, DDP, mixed precision,
validation (``data.val_fraction > 0``: each task's share of the validation split) and logs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdforge.continual.learner import LEARNERS, Learner, Stage, TaskInfo, TrainCfg, check_fit, make_backbone
from kdforge.continual.metrics import summarize
from kdforge.continual.protocol import CILSplit, batches, task_view
from kdforge.continual.recipe import CilRecipe
from kdforge.errors import KdforgeError


@dataclass
class CILResult:
    """The accuracy matrix (%, row t = after task t, None above the diagonal), its metrics and timings."""

    learner: str
    split: dict[str, int]
    matrix: list[list[float | None]]
    test_sizes: list[int]
    metrics: dict[str, float] = field(default_factory=dict)
    task_time_s: list[float] = field(default_factory=list)

    def lower(self) -> np.ndarray:
        """The matrix with zeros above the diagonal (what the metric functions take)."""
        return np.array([[0.0 if v is None else v for v in row] for row in self.matrix])


@torch.no_grad()
def accuracy(learner: Learner, data: Dataset, batch_size: int = 512) -> float:
    """Top-1 (%) of the learner on a data set (on the learner's device)."""
    dev = next(learner.parameters()).device
    correct = total = 0
    for x, y in batches(data, batch_size, shuffle=False):
        correct += int((learner.predict(x.to(dev)).cpu() == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


def build_learner(name: str, split: CILSplit, in_chans: int, image_size: int, cfg: TrainCfg, model: str,
                  model_kwargs: dict[str, Any] | None = None, **learner_kwargs: Any) -> Learner:
    """A registered learner on a fresh backbone."""
    net, dim = make_backbone(model, in_chans, image_size, **(model_kwargs or {}))
    cls = LEARNERS.get(name)
    try:
        return cls(net, dim, split, cfg, **learner_kwargs)
    except TypeError as e:
        raise KdforgeError(f"learner {name!r}: {e}") from None


def run(recipe: CilRecipe, run_dir: str | Path | None = None, resume: bool = True, bundle: Any = None,
        callbacks: Iterable[Any] = (), overwrite: bool = False, resume_cmd: str | None = None) -> CILResult:
    """Run a class-incremental recipe; with ``run_dir`` every stage is saved and a rerun resumes where it stopped.

    ``run_dir`` is a run folder of kind ``cil`` (:func:`kdforge.engine.run_dir.open_run`): any other existing
    folder is refused unless ``overwrite`` (a kdforge folder only). ``bundle``: a DataBundle to use instead of
    loading ``recipe.data``; ``callbacks``: extra engine callbacks for every stage's fit.
    """
    if run_dir is None:
        return _run(recipe, None, resume, bundle, callbacks)
    from kdforge.engine.run_dir import open_run

    with open_run(run_dir, "cil", resume="auto" if resume else False, overwrite=overwrite, legacy=_legacy_run,
                  resume_cmd=resume_cmd or f"kdforge cil RECIPE -r {run_dir}"):
        return _run(recipe, run_dir, resume, bundle, callbacks)


def _legacy_run(path: Path) -> bool:
    """A cil run folder written before run folders recorded their kind."""
    cfg = path / "config.yaml"
    return (path / "stages.json").is_file() and cfg.is_file() and "\ncil:" in "\n" + cfg.read_text(errors="replace")


def _run(recipe: CilRecipe, run_dir: str | Path | None, resume: bool, bundle: Any, callbacks: Iterable[Any]
         ) -> CILResult:
    from kdforge.data import load_data
    from kdforge.engine.checkpoint import atomic_write_text
    from kdforge.engine.stages import StagedRun

    c = recipe.cil
    if bundle is None:
        bundle = load_data(recipe.data)
    split = CILSplit(bundle.num_classes, c.base, c.increment, c.tasks, recipe.seed)
    torch.manual_seed(recipe.seed)
    lrn = build_learner(c.learner, split, bundle.in_chans, bundle.image_size,
                        TrainCfg(recipe.train.epochs, c.base_epochs, recipe.optim.lr), c.model, c.model_kwargs,
                        **c.learner_kwargs)
    tests = [task_view(bundle.test, split, [t]) for t in range(split.num_tasks)]
    example = next(batches(tests[0], 2, shuffle=False))[0]
    check_fit(lrn.net, example)
    lrn.setup(example)
    root = Path(run_dir) if run_dir is not None else None
    staged = StagedRun(root, recipe.identity(), resume=resume)
    if root is not None:
        atomic_write_text(root / "config.yaml", recipe.to_yaml())
    n = split.num_tasks
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    times: list[float] = []
    start = 0
    while start < n and (done := staged.done(f"task{start}")) is not None:
        matrix[start], times = done["row"], [*times, float(done["time_s"])]
        start += 1
    if start:
        _load_learner(lrn, staged.dir(f"task{start - 1}"))
    for t in range(start, n):
        t0 = time.perf_counter()
        spent = _train_task(lrn, recipe, bundle, split, t, tests[t], staged, callbacks)
        for j in range(t + 1):
            matrix[t][j] = accuracy(lrn, tests[j])
        times.append(spent + time.perf_counter() - t0)
        if root is not None:
            _save_learner(lrn, staged.dir(f"task{t}"), t)
        staged.finish(f"task{t}", {"row": matrix[t], "time_s": times[-1]})
    res = CILResult(c.learner, asdict(split), matrix, [len(v) for v in tests], task_time_s=times)
    res.metrics = summarize(res.lower(), res.test_sizes)
    if root is not None:
        import json

        atomic_write_text(root / "result.json", json.dumps(asdict(res), indent=2))
    return res


def _train_task(lrn: Learner, recipe: CilRecipe, bundle: Any, split: CILSplit, t: int, test: Dataset,
                staged: Any, callbacks: Iterable[Any]) -> float:
    """Train task t's stages (skipping the finished ones); seconds the finished ones took before."""
    tasks = range(t + 1) if lrn.cumulative else [t]
    task = TaskInfo(t, split, task_view(bundle.train, split, tasks))
    val = task_view(bundle.val, split, tasks) if bundle.val is not None else None
    spent = 0.0
    seed = recipe.seed * 100_003 + t
    stages = lrn.stages(task)
    i = 0
    while True:
        # each stage is built and trained from its own seed, so a resumed run repeats an uninterrupted one
        torch.manual_seed(seed * 31 + i)
        stage = next(stages, None)
        if stage is None:
            break
        name = f"task{t}-{i}-{type(stage.method).__name__.removesuffix('Step').lower()}"
        done = staged.done(name)
        if done is not None:
            _load_learner(lrn, staged.dir(name))
            spent += float(done["time_s"])
        else:
            t0 = time.perf_counter()
            result = fit_stage(stage, recipe, name, seed * 31 + i, task.train, val, test, bundle, staged.dir(name),
                               callbacks)
            lrn.to(next(stage.method.parameters()).device)
            if staged.root is not None:
                _save_learner(lrn, staged.dir(name), t)
            staged.finish(name, {"time_s": time.perf_counter() - t0, "test": result.test_last,
                                 "epochs": result.epochs})
        i += 1
    lrn.eval()
    lrn.end_task(task)
    return spent


def fit_stage(stage: Stage, recipe: CilRecipe, name: str, seed: int, train: Dataset, val: Dataset | None,
              test: Dataset, bundle: Any, run_dir: Path | None, callbacks: Iterable[Any] = ()) -> Any:
    """One stage as a ``kdforge.Trainer`` fit of its Method (the recipe's optimizer with the stage's lr and epochs).

    ``val`` is used when the stage trains on the task's data; ``test`` (the task's test classes) gives the
    stage's final test losses. Returns the FitResult.
    """
    from kdforge.data import DataBundle
    from kdforge.engine.trainer import Trainer

    own = stage.data is not None
    data = DataBundle(train=stage.data if own else train, val=None if own else val, test=test,  # type: ignore[arg-type]
                      num_classes=bundle.num_classes, in_chans=bundle.in_chans, image_size=bundle.image_size,
                      class_names=list(bundle.class_names))
    r = recipe.stage_recipe(name, seed, stage.epochs, stage.lr)
    from kdforge.run import with_report

    trainer = Trainer(stage.method, data, r, run_dir=run_dir, resume=run_dir is not None and run_dir.is_dir(),
                      callbacks=with_report(callbacks))
    result = trainer.fit()
    del trainer  # drops the DDP wrapper (and its gradient hooks) before the next stage wraps the same backbone
    stage.method.eval()
    return result


def _save_learner(lrn: Learner, d: Path | None, t: int) -> None:
    from kdforge.engine.checkpoint import save_weights

    if d is not None:
        save_weights(lrn, d / "learner.safetensors", {"task": str(t)})


def _load_learner(lrn: Learner, d: Path | None) -> None:
    from kdforge.engine.checkpoint import load_weights

    path = None if d is None else d / "learner.safetensors"
    if path is None or not path.is_file():
        raise KdforgeError(f"the learner state of a finished stage is missing ({str(path)!r}); "
                           "start the run again in a new folder")
    load_weights(lrn, path)


def run_cil(learner: str = "ir", data: Any = "digits", base: int = 2, increment: int = 2, tasks: int = 4,
            seed: int = 0, model: str = "cnn_small", model_kwargs: dict[str, Any] | None = None,
            epochs: int = 10, base_epochs: int | None = None, lr: float = 1e-3, weight_decay: float = 2e-4,
            batch_size: int = 64, lr_step_epochs: int | None = None, data_kwargs: dict[str, Any] | None = None,
            run_dir: str | Path | None = None, resume: bool = True, train: dict[str, Any] | None = None,
            **learner_kwargs: Any) -> CILResult:
    """Run one learner over a seeded class-incremental split (keyword form of a :class:`CilRecipe`).

    ``data`` is a data-set name (``digits``, ``fashion_mnist_subset``, ``cifar100``, ...) or a DataBundle;
    ``train``: keys of the recipe's ``train`` section (device, precision, progress, ...).
    """
    from kdforge.data import DataBundle

    bundle = data if isinstance(data, DataBundle) else None
    d = {"name": "bundle" if bundle is not None else data, "batch_size": batch_size, **(data_kwargs or {})}
    sched = {"name": "step", "step_size": lr_step_epochs, "gamma": 0.1} if lr_step_epochs else {"name": "constant"}
    recipe = CilRecipe.from_dict({
        "seed": seed, "data": d, "optim": {"lr": lr, "weight_decay": weight_decay}, "sched": sched,
        "train": {"epochs": epochs, **(train or {})},
        "cil": {"learner": learner, "base": base, "increment": increment, "tasks": tasks, "model": model,
                "model_kwargs": model_kwargs or {}, "base_epochs": base_epochs, "learner_kwargs": learner_kwargs}})
    return run(recipe, run_dir, resume=resume, bundle=bundle)


def run_recipe(path: str | Path, run_dir: str | Path | None = None, overrides: list[str] | None = None,
               resume: bool = True) -> CILResult:
    """Run a class-incremental YAML recipe (``recipes/continual/*.yaml``) with ``key=value`` overrides."""
    return run(CilRecipe.from_yaml(path, overrides), run_dir, resume=resume)
