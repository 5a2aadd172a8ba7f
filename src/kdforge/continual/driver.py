"""The class-incremental driver: trains a learner task by task, fills the accuracy matrix, saves and resumes."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdforge.continual.learner import LEARNERS, Learner, Stage, TaskInfo, TrainCfg, check_fit, make_backbone
from kdforge.continual.metrics import summarize
from kdforge.continual.protocol import CILSplit, batches, task_view
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


def fit_stage(stage: Stage, data: Dataset, batch_size: int, gen: torch.Generator, weight_decay: float,
              lr_step_epochs: int | None = None) -> None:
    """Train one stage's Method with Adam for its epochs (a small loop: one pass per epoch, no logging)."""
    method = stage.method
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=stage.lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, lr_step_epochs, 0.1) if lr_step_epochs else None
    step = 0
    for epoch in range(stage.epochs):
        method.on_epoch_start(epoch)
        method.train()
        for batch in batches(data, batch_size, shuffle=True, gen=gen):
            loss = method.training_step(batch, step)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if sched is not None:
            sched.step()
    method.eval()


@torch.no_grad()
def accuracy(learner: Learner, data: Dataset, batch_size: int = 512) -> float:
    """Top-1 (%) of the learner on a data set."""
    correct = total = 0
    for x, y in batches(data, batch_size, shuffle=False):
        correct += int((learner.predict(x) == y).sum())
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


def _load_bundle(data: Any, data_kwargs: dict[str, Any] | None):
    from kdforge.config import DataConfig, validate
    from kdforge.data import DataBundle, load_data

    if isinstance(data, DataBundle):
        return data
    # default: no validation split and no augmentation (the prototypes are then taken on test transforms)
    cfg = validate(DataConfig, {"name": data, "val_fraction": 0.0, "augment": False, **(data_kwargs or {})},
                   prefix="data")
    return load_data(cfg)


def run_cil(learner: str = "ir", data: Any = "digits", base: int = 2, increment: int = 2, tasks: int = 4,
            seed: int = 0, model: str = "cnn_small", model_kwargs: dict[str, Any] | None = None,
            epochs: int = 10, base_epochs: int | None = None, lr: float = 1e-3, weight_decay: float = 2e-4,
            batch_size: int = 64, lr_step_epochs: int | None = None, data_kwargs: dict[str, Any] | None = None,
            run_dir: str | Path | None = None, resume: bool = True, **learner_kwargs: Any) -> CILResult:
    """Run one learner over a seeded class-incremental split; with ``run_dir`` it saves and resumes per task.

    ``data`` is a data-set name (``digits``, ``fashion_mnist_subset``, ``cifar100``, ...) or a DataBundle.
    """
    bundle = _load_bundle(data, data_kwargs)
    split = CILSplit(bundle.num_classes, base, increment, tasks, seed)
    cfg = TrainCfg(epochs, base_epochs, lr, weight_decay, batch_size, lr_step_epochs)
    torch.manual_seed(seed)
    lrn = build_learner(learner, split, bundle.in_chans, bundle.image_size, cfg, model, model_kwargs,
                        **learner_kwargs)
    tests = [task_view(bundle.test, split, [t]) for t in range(split.num_tasks)]
    example = next(batches(tests[0], 2, shuffle=False))[0]
    check_fit(lrn.net, example)
    lrn.setup(example)
    n = split.num_tasks
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    times: list[float] = []
    config = {"learner": learner, "data": data if isinstance(data, str) else "bundle", "split": asdict(split),
              "data_kwargs": data_kwargs or {},
              "model": model, "model_kwargs": model_kwargs or {}, "train": asdict(cfg),
              "learner_kwargs": learner_kwargs}
    start = 0
    run = Path(run_dir) if run_dir is not None else None
    if run is not None and resume and (run / "progress.json").is_file():
        start, matrix, times = _restore(run, lrn, config)
    for t in range(start, n):
        t0 = time.perf_counter()
        _train_task(lrn, bundle.train, split, t, seed, cfg)
        for j in range(t + 1):
            matrix[t][j] = accuracy(lrn, tests[j])
        times.append(time.perf_counter() - t0)
        if run is not None:
            _save(run, lrn, config, t, matrix, times)
    res = CILResult(learner, asdict(split), matrix, [len(v) for v in tests], task_time_s=times)
    res.metrics = summarize(res.lower(), res.test_sizes)
    if run is not None:
        (run / "result.json").write_text(json.dumps(asdict(res), indent=2))
    return res


def _train_task(lrn: Learner, train: Dataset, split: CILSplit, t: int, seed: int, cfg: TrainCfg) -> None:
    # every task draws from its own seed, so a resumed run repeats exactly what an uninterrupted one does
    torch.manual_seed(seed * 100_003 + t)
    gen = torch.Generator().manual_seed(seed * 100_003 + t)
    task = TaskInfo(t, split, task_view(train, split, range(t + 1) if lrn.cumulative else [t]))
    for stage in lrn.stages(task):
        fit_stage(stage, stage.data or task.train, cfg.batch_size, gen, cfg.weight_decay, cfg.lr_step_epochs)
    lrn.eval()
    lrn.end_task(task)


def _save(run: Path, lrn: Learner, config: dict[str, Any], t: int, matrix: list[list[float | None]],
          times: list[float]) -> None:
    from kdforge.engine.checkpoint import atomic_write_text, save_weights

    # weights first under a per-task name, then progress.json points at them: a kill at any moment
    # leaves the last complete boundary readable
    save_weights(lrn, run / f"learner-task{t}.safetensors", {"task": str(t)})
    atomic_write_text(run / "progress.json", json.dumps({"config": config, "completed_task": t, "matrix": matrix,
                                                         "task_time_s": times}, indent=1))
    for old in run.glob("learner-task*.safetensors"):
        if old.name != f"learner-task{t}.safetensors":
            old.unlink()


def _restore(run: Path, lrn: Learner, config: dict[str, Any]) -> tuple[int, list[list[float | None]], list[float]]:
    from kdforge.engine.checkpoint import load_weights, read_metadata

    prog = json.loads((run / "progress.json").read_text())
    if json.loads(json.dumps(config)) != prog["config"]:
        raise KdforgeError(f"run folder {str(run)!r} holds a different class-incremental run; "
                           "use another run_dir or resume=False")
    t = int(prog["completed_task"])
    path = run / f"learner-task{t}.safetensors"
    if not path.is_file() or int(read_metadata(path).get("task", -1)) != t:
        raise KdforgeError(f"{str(path)!r} is missing or does not match progress.json (task {t}); "
                           "use resume=False to start over")
    load_weights(lrn, path)
    return t + 1, prog["matrix"], prog["task_time_s"]


RECIPE_KEYS = ("learner", "data", "data_kwargs", "base", "increment", "tasks", "seed", "model", "model_kwargs",
               "epochs", "base_epochs", "lr", "weight_decay", "batch_size", "lr_step_epochs", "learner_kwargs")


def run_recipe(path: str | Path, run_dir: str | Path | None = None, **overrides: Any) -> CILResult:
    """Run a class-incremental YAML recipe (``recipes/continual/*.yaml``); keys are run_cil's arguments."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise KdforgeError(f"recipe {str(p)!r} not found")
    r = {**(yaml.safe_load(p.read_text()) or {}), **overrides}
    bad = sorted(set(r) - set(RECIPE_KEYS))
    if bad:
        raise KdforgeError(f"unknown key {bad[0]!r} in {str(p)!r}; valid: {', '.join(RECIPE_KEYS)}")
    kwargs = r.pop("learner_kwargs", None) or {}
    return run_cil(**r, **kwargs, run_dir=run_dir)
