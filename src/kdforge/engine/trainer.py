"""Trainer: the one engine that optimizes. A step-based core on Hugging Face Accelerate.

``fit`` runs a Method for ``train.epochs`` epochs (or ``train.max_steps`` optimizer steps) over a data
set or a step source. It builds, schedules, clips, AMP-scales, DDP-syncs, saves and resumes every
optimizer the method declares; the run folder, logs, progress and checkpoints are callbacks
(:mod:`kdforge.engine.callbacks`). A run killed at any step resumes bit-identical on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, send_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from kdforge.config import OptimConfig, Recipe, SchedConfig
from kdforge.data import DataBundle, make_loader
from kdforge.engine.optim import EngineOptimizer, OptimizerHandle, OptimizerSpec, named_of, resolve
from kdforge.engine.run_dir import RunInterrupted
from kdforge.engine.run_format import RUN_FORMAT, is_accuracy, rounded, upgrade_results
from kdforge.errors import KdforgeError
from kdforge.method import Method

STATE_FORMAT = 2  # trainer-state layout; folders of the old single-optimizer engine are refused


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG's state, to continue a run exactly where it stopped."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain tensors and numbers only, so the state loads with torch.load(weights_only=True)
    st: dict[str, Any] = {"torch": torch.get_rng_state(),
                          "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                    float(gauss)],
                          "python": list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = st["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@runtime_checkable
class StepSource(Protocol):
    """Batches that are not one pass over a data set (rollouts, generated or noise batches).

    ``batch(step)`` returns the batch of engine step ``step``; a source with state of its own also
    has ``state_dict``/``load_state_dict`` (saved in every checkpoint). Optional ``val_set`` / ``test_set``
    reach the method's ``evaluate`` where a data set's loaders would (validation picks ``best``).
    """

    steps_per_epoch: int

    def batch(self, step: int) -> Any: ...


@dataclass
class FitResult:
    """What a finished run reports; also written to ``results.json``.

    ``monitor`` names the validation metric that picks "best"; ``best_epoch`` counts from 1 (as the
    ``epoch`` column of ``history``); without a validation split ``best_epoch`` is -1, ``best_value`` and
    ``test_best`` are ``None`` (only "last" is kept). ``info``: models, parameters, FLOPs, data sizes,
    device (what the start banner printed). ``format``: see :mod:`kdforge.engine.run_format`.
    """

    run_dir: Path | None
    epochs: int
    best_epoch: int
    best_val_top1: float | None
    test_last: dict[str, float]
    test_best: dict[str, float] | None
    history: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float = 0.0
    monitor: str = "top1"
    best_value: float | None = None
    steps: int = 0
    skipped_steps: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    format: int = RUN_FORMAT

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FitResult:
        """Read back what :meth:`to_json` wrote (older formats are upgraded: epochs from 1, accuracies in %)."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in upgrade_results(d).items() if k in known}
        d["run_dir"] = Path(d["run_dir"]) if d.get("run_dir") else None
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict: non-finite numbers become ``null``."""
        d = dict(self.__dict__)
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return _finite(d)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


class NonFiniteLoss(KdforgeError):
    """A loss term became NaN or infinite."""


class TrainingInterrupted(RunInterrupted):
    """Ctrl-C during a run with a folder: the message says where, and how to resume."""


def _check_launch_env() -> None:
    """Refuse the one launch that silently trains in a single process."""
    env = os.environ
    mpi = any(k in env for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "WORLD_SIZE"))
    if env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env and not mpi:
        raise KdforgeError("'accelerate launch --cpu --num_processes N' starts one process unless MPI is set up; "
                           "for N CPU processes over gloo use 'accelerate launch --multi_gpu --num_processes N' "
                           "(works without GPUs) or 'torchrun --nproc_per_node N -m kdforge ...'")


def _accelerator(recipe: Recipe) -> Accelerator:
    _check_launch_env()
    t = recipe.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise KdforgeError("train.device is 'cuda' but no CUDA device is visible (valid here: auto, cpu)")
    if t.device == "mps" and not torch.backends.mps.is_available():
        raise KdforgeError("train.device is 'mps' but MPS is not available (valid here: auto, cpu)")
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[t.precision]
    cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available()
                               and not torch.backends.mps.is_available())
    if cpu and mp == "fp16":
        raise KdforgeError("train.precision fp16 needs a GPU; on the CPU use bf16 or fp32")
    if t.distributed == "fsdp":  # FSDP2 is applied by the engine itself (kdforge.engine.fsdp), not a plugin
        from kdforge.engine.fsdp import check

        check(t, cpu)
    # Several runs in one process (demo, benchmarks) may ask for different precisions: reset the
    # per-run part of accelerate's singleton state, keeping the process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=t.grad_accum,
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           find_unused_parameters=t.find_unused_parameters)])


class _SkipSampler(Sampler[int]):
    """The first ``skip`` indices of a sampler dropped (to resume inside an epoch without loading them)."""

    def __init__(self, base: Sampler[int], skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self):  # type: ignore[no-untyped-def]
        it = iter(self.base)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


class _Fields(Dataset):
    """A data set whose items become dicts ``{"x", "y", "index", ...}`` (for methods with ``batch_fields``)."""

    def __init__(self, base: Dataset, fields: Sequence[str]) -> None:
        self.base, self.fields = base, tuple(fields)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        d = dict(item) if isinstance(item, dict) else {"x": item[0], "y": item[1]}
        if "index" in self.fields:
            d.setdefault("index", i)  # a data set that names its own sample index (replayed views) keeps it
        return d


class Trainer:
    """Train a Method: steps, evaluation, checkpoints, logs and resume; the only place that optimizes.

    ``data``: a DataBundle (train/val/test), or ``None`` with a ``source`` (a :class:`StepSource`).
    ``callbacks``: extra :class:`~kdforge.engine.callbacks.Callback` s. ``keep_best_in_memory``: without
    a run folder, keep the best weights in memory to report the best epoch's test metric.
    """

    def __init__(self, method: Method, data: DataBundle | None, recipe: Recipe, run_dir: str | Path | None = None,
                 resume: bool = False, overwrite: bool = False, zero_grad_before_backward: bool = True,
                 source: StepSource | None = None, callbacks: Iterable[Any] = (),
                 keep_best_in_memory: bool = False) -> None:
        from kdforge.engine import callbacks as cb

        if source is None and not getattr(method, "uses_data", True):  # the method makes its own batches (RL)
            source, data = method.step_source(recipe), None
        if data is None and source is None:
            raise KdforgeError("Trainer needs data or a step source")
        self.recipe = recipe
        method.total_epochs = recipe.train.epochs
        self._threads_before = torch.get_num_threads()
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.acc = _accelerator(recipe)
        self.main = self.acc.is_main_process
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.zero_first = zero_grad_before_backward
        self.source = source
        self.method = method
        self.data: DataBundle | None = None
        self.train_loader: DataLoader | None = None
        self.val_loader: DataLoader | None = None
        self.test_loader: DataLoader | None = None
        self.callbacks: list[cb.Callback] = []
        if self.run_dir is not None:
            self.callbacks.append(cb.RunFolder(self.run_dir, resume=resume, overwrite=overwrite))
        elif keep_best_in_memory:
            self.callbacks.append(cb.BestInMemory())
        self.callbacks += [cb.Progress(), *callbacks]
        try:
            self._build(data)
        except BaseException:
            for c in self.callbacks:
                c.on_setup_failed(self)
            raise

    # -- set-up ------------------------------------------------------------------------------
    def _build(self, data: DataBundle | None) -> None:
        r, acc, method = self.recipe, self.acc, self.method
        err: str | None = None
        try:
            for c in self.callbacks:
                c.on_init(self)
        except KdforgeError as e:
            err = str(e)
        if acc.num_processes > 1:  # rank 0 prepares the folder: its failure is every rank's, no one waits
            from accelerate.utils import broadcast_object_list

            err = broadcast_object_list([err], from_process=0)[0]
        if err is not None:
            raise KdforgeError(err)
        rank, world = acc.process_index, acc.num_processes
        d = r.data
        if data is not None:
            train = method.wrap_train_data(data.train)
            if method.batch_fields:
                train = _Fields(train, method.batch_fields)
            self.data = dataclasses.replace(data, train=train)
            sampler = method.train_sampler(train, seed=r.seed, rank=rank, world=world)
            if sampler is None and hasattr(data.train, "train_sampler"):  # a data set that picks views per epoch
                sampler = data.train.train_sampler(r.seed, rank, world)
            if sampler is None:
                sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=r.seed)
            self._sampler = sampler
            self.train_loader = DataLoader(train, batch_size=d.batch_size, sampler=sampler,
                                           num_workers=d.num_workers, persistent_workers=d.num_workers > 0)
            if data.val is not None:
                self.val_loader = make_loader(data.val, d.eval_batch_size, False, rank=rank, world=world)
            self.test_loader = make_loader(data.test, d.eval_batch_size, False, rank=rank, world=world)
            self.batches_per_epoch = len(self.train_loader)
        else:
            assert self.source is not None
            # a step source may hold its own evaluation splits (RL: validation and test episodes)
            self.val_loader = getattr(self.source, "val_set", None)
            self.test_loader = getattr(self.source, "test_set", None)
            self.batches_per_epoch = int(getattr(self.source, "steps_per_epoch", 0)) or (r.train.max_steps or 1)
        self.accum = r.train.grad_accum if method.automatic_optimization else 1
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / self.accum))
        self.total_steps = r.train.max_steps or r.train.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.method = method.to(acc.device)
        self.method.setup(self._example_batch())
        self.sharding: Any = None
        if r.train.distributed == "fsdp":  # sharded in place before the optimizers see its parameters
            from kdforge.engine.fsdp import Sharding

            self.sharding = Sharding(method, r.train, acc.device)
        self.optimizers = self._build_optimizers()
        if self.sharding is not None and r.train.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            acc.scaler = ShardedGradScaler()  # found-inf agreed across ranks, gradients being shards
            for o in self.optimizers.values():
                if o.scaler is not None:
                    o.scaler = ShardedGradScaler()
        automatic = [o for o in self.optimizers.values() if not o.manual]
        if automatic and not method.automatic_optimization:
            raise KdforgeError(f"{type(method).__name__} optimizes manually: mark every OptimizerSpec manual=True")
        # manual optimizers' parameters stay out of autograd (and DDP) except inside their own update
        for o in self.optimizers.values():
            if o.manual:
                for p in o.params:
                    p.requires_grad_(False)
        self.model = acc.prepare_model(method) if automatic and self.sharding is None else method
        method.attach_engine(self)
        self.ema: Any = None  # Ema, or ShardedEma under FSDP2
        if r.train.ema is not None and self.sharding is not None:
            self.ema = self.sharding.make_ema(r.train.ema)
        elif r.train.ema is not None:
            from kdforge.engine.ema import Ema

            self.ema = Ema(method.deployable(), r.train.ema)
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.best_value: float | None = None
        self.best_epoch = -1
        self.skipped_steps = 0
        self.history: list[dict[str, float]] = []
        self.info: dict[str, Any] = {}  # filled by the Progress callback: models, sizes, device (results.json)
        self._sums: dict[str, Tensor] = {}
        self._counts = [0, 0]  # batches, samples in the current epoch
        self.finished = False

    def _example_batch(self) -> Any:
        state = rng_state()
        try:
            if self.source is not None and self.data is None:
                batch = self.source.batch(0)
            else:
                from torch.utils.data._utils.collate import default_collate

                ds = self.data.train  # type: ignore[union-attr]
                n = min(self.recipe.data.batch_size, len(ds))
                batch = default_collate([ds[i] for i in range(n)])
        finally:
            set_rng_state(state)
        return send_to_device(batch, self.acc.device)

    def _build_optimizers(self) -> dict[str, EngineOptimizer]:
        r, m = self.recipe, self.method
        specs = list(m.configure_optimizers())
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise KdforgeError(f"{type(m).__name__}: optimizer names must be unique, got {names}")
        claimed: set[int] = set()
        resolved: list[tuple[OptimizerSpec, list[tuple[str, nn.Parameter]]]] = []
        for s in specs:
            if s.params is None:
                continue
            named = named_of(s.params, m)
            if any(id(p) in claimed for _, p in named):
                raise KdforgeError(f"{type(m).__name__}: a parameter is in two optimizers ({s.name!r} and another)")
            claimed |= {id(p) for _, p in named}
            resolved.append((s, named))
        rest = [(n, p) for n, p in m.named_parameters() if p.requires_grad and id(p) not in claimed]
        for s in specs:
            if s.params is None:
                resolved.insert(0, (s, rest))
                rest = []
        if rest:
            raise KdforgeError(f"{type(m).__name__}: trainable parameters {[n for n, _ in rest][:3]} are in no "
                               "optimizer (add them to an OptimizerSpec or freeze them)")
        fp16 = r.train.precision == "fp16"
        out = {}
        for s, named in resolved:
            if not named:
                continue
            optim = resolve(s.optim, r.optim, OptimConfig, f"optimizer {s.name!r}")
            if s.lr_scale != 1.0:
                optim = optim.model_copy(update={"lr": optim.lr * s.lr_scale})
            sched = resolve(s.sched, r.sched, SchedConfig, f"schedule of {s.name!r}")
            clip = r.train.grad_clip if s.clip is None else s.clip
            out[s.name] = EngineOptimizer(s.name, named, m, optim, sched, clip, s.manual, fp16)
        return out

    # -- public views ------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The first automatic optimizer (the student's in most methods)."""
        for o in self.optimizers.values():
            if not o.manual:
                return o.opt
        return next(iter(self.optimizers.values())).opt

    def handle(self, name: str) -> OptimizerHandle:
        """The manual-optimization handle of the optimizer ``name``."""
        if name not in self.optimizers:
            raise KdforgeError(f"no optimizer {name!r} (this method declares: {', '.join(self.optimizers)})")
        if not self.optimizers[name].manual:
            raise KdforgeError(f"optimizer {name!r} is stepped by the engine; declare it manual=True to step it")
        return OptimizerHandle(self.optimizers[name], self)

    def export_metadata(self) -> dict[str, str]:
        """Strings stored in checkpoint headers, enough to rebuild the deployable model."""
        import json

        spec = self.method.deployable_spec() or {}
        info = {}
        if self.data is not None:
            info = {"num_classes": str(self.data.num_classes), "in_chans": str(self.data.in_chans),
                    "image_size": str(self.data.image_size)}
        return {"kdforge_model": str(spec.get("model", "")),
                "kdforge_model_kwargs": json.dumps(spec.get("kwargs", {})),
                "kdforge_spec": json.dumps(spec), **info,
                "data": self.recipe.data.name, "method": str(self.recipe.method.name),
                "recipe": self.recipe.model_dump_json()}

    def deployable(self) -> nn.Module:
        """The model evaluated and saved: the EMA copy when ``train.ema.evaluate``, else the method's."""
        if self.ema is not None and self.ema.cfg.evaluate:
            return self.ema.model
        if self.sharding is not None:  # the plain copy, gathered at the end of every epoch and before a save
            return self.sharding.plain
        return self.method.deployable()

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything besides the method's tensors that a resume needs."""
        st: dict[str, Any] = {
            "format": STATE_FORMAT, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step, "total_steps": self.total_steps,
            "best_value": self.best_value, "best_epoch": self.best_epoch, "skipped_steps": self.skipped_steps,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "rng": rng_state(), "sums": {k: v.detach().cpu() for k, v in self._sums.items()},
            "counts": list(self._counts), "finished": self.finished,
        }
        if self.acc.scaler is not None:
            st["scaler"] = self.acc.scaler.state_dict()
        if self.ema is not None:
            st["ema"] = self.ema.state_dict()
        if self.source is not None and hasattr(self.source, "state_dict"):
            st["source"] = self.source.state_dict()
        return st

    def load_state(self, method_state: dict[str, Tensor] | None, st: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state` (with the method's tensors; ``None``: already loaded, sharded)."""
        if st.get("format") != STATE_FORMAT:
            raise KdforgeError("this run folder was written by an older kdforge engine and cannot be resumed; "
                               "start it again with --overwrite")
        if method_state is not None:
            if "sharded" in st or self.sharding is not None:
                raise KdforgeError("resume state was saved with another train.distributed (ddp vs fsdp); resume "
                                   "with the recipe's own")
            missing, unexpected = self.method.load_state_dict(method_state, strict=False)
            bad = [k for k in missing if not k.startswith(self.method.frozen_prefixes)]
            if bad or unexpected:
                raise KdforgeError(f"resume state does not fit this method: missing {bad[:3]}, "
                                   f"unexpected {list(unexpected)[:3]}")
        if set(st["optimizers"]) != set(self.optimizers):
            raise KdforgeError(f"resume state has optimizers {sorted(st['optimizers'])}, this method declares "
                               f"{sorted(self.optimizers)}")
        for k, o in self.optimizers.items():
            o.load_state_dict(st["optimizers"][k])
        if "scaler" in st and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(st["scaler"])
        if self.ema is not None and "ema" in st:
            self.ema.load_state_dict(st["ema"])
        if self.source is not None and "source" in st:
            self.source.load_state_dict(st["source"])  # type: ignore[attr-defined]
        self.epoch, self.batch_in_epoch = int(st["epoch"]), int(st["batch_in_epoch"])
        self.global_step, self.skipped_steps = int(st["global_step"]), int(st["skipped_steps"])
        self.best_value = st["best_value"]
        self.best_epoch = int(st["best_epoch"])
        self._sums = {k: v.to(self.acc.device) for k, v in st["sums"].items()}
        self._counts = list(st["counts"])
        # inside an epoch the RNG continues where it stopped; at a boundary the epoch's own seed rules
        self._resume_rng = st["rng"] if self.batch_in_epoch else None
        self.finished = bool(st.get("finished", False)) and self.global_step >= self.total_steps

    # -- loop --------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Train to ``train.epochs`` epochs or ``train.max_steps`` steps (continuing a resumed run), then test."""
        self._resume_rng: dict[str, Any] | None = None
        try:
            for c in self.callbacks:
                c.on_fit_start(self)
            if self.finished and self.run_dir is not None and (self.run_dir / "results.json").is_file():
                from kdforge.engine.callbacks import stored_result

                if self.main and self.recipe.train.progress != "silent":
                    print(f"{str(self.run_dir)!r} is finished ({self.epoch} epochs); nothing to do "
                          "(raise train.epochs with --set to continue it)", file=sys.stderr, flush=True)
                self.method.on_fit_end(self)
                return FitResult.from_json(stored_result(self.run_dir))
            while self.global_step < self.total_steps:
                self._run_epoch()
            self.finished = True
            self.method.on_fit_end(self)
            result = self._finish(sum(h.get("epoch_time_s", 0.0) for h in self.history))
            for c in self.callbacks:
                c.on_fit_end(self, result)
            return result
        except KeyboardInterrupt as e:
            if self.run_dir is None or isinstance(e, TrainingInterrupted):
                raise
            saved = getattr(self, "saved_step", None)
            redo = self.global_step - saved if saved is not None else None
            where = ("; no checkpoint was written yet, a resume starts again" if saved is None else
                     f"; the last checkpoint is at step {saved}" + (
                         f", so {redo} step{'s are' if redo != 1 else ' is'} redone" if redo else ""))
            raise TrainingInterrupted(f"interrupted at epoch {self.epoch + 1}, step {self.global_step}{where}; "
                                      f"resume with: kdforge train {self.run_dir} --resume") from None
        finally:
            for c in self.callbacks:
                c.on_close(self)
            if self.sharding is not None:
                self.sharding.close()
            torch.set_num_threads(self._threads_before)  # train.threads applies to this run only

    def _epoch_seed(self) -> int:
        # re-seeding from (seed, epoch, rank) makes a resumed epoch draw the same augmentations
        return self.recipe.seed * 1_000_003 + self.epoch * 101 + self.acc.process_index

    def _batches(self) -> Iterable[Any]:
        """This epoch's batches from the current position (resumed epochs skip what was done)."""
        skip = self.batch_in_epoch
        if self.train_loader is None:
            assert self.source is not None
            start = self.epoch * self.batches_per_epoch
            return (self.source.batch(start + i) for i in range(skip, self.batches_per_epoch))
        if hasattr(self._sampler, "set_epoch"):
            self._sampler.set_epoch(self.epoch)
        if not skip:
            return iter(self.train_loader)
        loader = self.train_loader
        sampler = _SkipSampler(self._sampler, skip * loader.batch_size)  # type: ignore[operator]
        return iter(DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                               num_workers=loader.num_workers, collate_fn=loader.collate_fn))

    def _run_epoch(self) -> None:
        acc = self.acc
        seed_everything(self._epoch_seed())
        self.method.train()
        self.method.on_epoch_start(self.epoch)
        for c in self.callbacks:
            c.on_epoch_start(self)
        if self.batch_in_epoch == 0:
            self._sums, self._counts = {}, [0, 0]
        self._t0 = time.perf_counter()
        batches = self._batches()
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        n = self.batches_per_epoch
        for batch in batches:
            i = self.batch_in_epoch
            batch = send_to_device(batch, acc.device, non_blocking=True)
            out = self._train_batch(batch, i, n)
            self.batch_in_epoch += 1
            for k, v in out.items():
                v = v.detach().float()
                self._sums[k] = self._sums[k] + v if k in self._sums else v
            self._counts[0] += 1
            self._counts[1] += _batch_size(batch)
            if (i + 1) % self.accum == 0 or i + 1 == n:
                for c in self.callbacks:
                    c.on_step_end(self, out)
            if self.global_step >= self.total_steps:
                break
        self._end_epoch()

    def _train_batch(self, batch: Any, i: int, n: int) -> dict[str, Tensor]:
        acc = self.acc
        last_micro = (i + 1) % self.accum == 0 or i + 1 == n
        auto = [o for o in self.optimizers.values() if not o.manual]
        if self.zero_first and i % self.accum == 0:
            for o in auto:
                o.zero_grad()
        if auto and not last_micro:
            ctx = self.sharding.no_sync() if self.sharding is not None else acc.no_sync(self.model)
        else:
            ctx = nullcontext()
        with ctx:
            # a prepared model autocasts in its forward; the sharded method is not prepared by Accelerate
            with acc.autocast() if self.sharding is not None else nullcontext():
                out = self.model(batch, self.global_step)
            if "loss" not in out:
                raise KdforgeError(f"{type(self.method).__name__}.training_step must return a dict with 'loss'")
            if auto:
                acc.backward(out["loss"])
        if self.sharding is not None:
            self.sharding.release_teachers()
        bad = self._nonfinite(out)
        if last_micro:
            if bad:
                for o in auto:
                    o.zero_grad()
                self.skipped_steps += 1
            elif auto:
                self._step_automatic(auto)
            if not self.zero_first:
                for o in auto:
                    o.zero_grad()
            if self.ema is not None and not bad and self.global_step % self.ema.cfg.every == 0:
                self.ema.update(self.method.deployable())
            self.global_step += 1
        return out

    def _nonfinite(self, out: dict[str, Tensor]) -> bool:
        """Whether this batch's loss is NaN/inf on any process; stops the run (``nonfinite: stop``)."""
        loss = out["loss"].detach()
        bad = ~torch.isfinite(loss)
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad.float().reshape(1), "sum") > 0
        if not bool(bad):
            return False
        if self.recipe.train.nonfinite == "skip":
            return True
        terms = [k for k, v in out.items() if v.numel() == 1 and not bool(torch.isfinite(v.detach()))]
        named = [t for t in terms if t != "loss"] or terms or ["loss (on another process)"]
        raise NonFiniteLoss(f"non-finite loss at epoch {self.epoch + 1}, step {self.global_step}: "
                            f"{', '.join(named)}; the last good checkpoint is kept "
                            "(set train.nonfinite: skip to skip such steps)")

    def _step_automatic(self, auto: list[EngineOptimizer]) -> None:
        acc, scaler = self.acc, self.acc.scaler
        for o in auto:
            o.set_lr(self.global_step, self.steps_per_epoch, self.total_steps)
            if o.clip:
                if scaler is not None:
                    scaler.unscale_(o.opt)
                acc.clip_grad_norm_(o.params, o.clip)
            if scaler is not None:
                scaler.step(o.opt)
            else:
                o.opt.step()
            o.steps += 1
        if scaler is not None:
            scaler.update()

    def _end_epoch(self) -> None:
        r, acc = self.recipe, self.acc
        if self.batch_in_epoch < self.batches_per_epoch and self.global_step < self.total_steps:
            return
        dt = time.perf_counter() - self._t0
        nb, ns = max(self._counts[0], 1), self._counts[1]
        first = next(iter(self.optimizers.values()), None)
        row: dict[str, float] = {"epoch": self.epoch + 1, "step": self.global_step,
                                 "lr": first.lr if first is not None else 0.0, "epoch_time_s": dt,
                                 "samples_per_s": ns * acc.num_processes / max(dt, 1e-9)}
        for k, v in self._sums.items():
            row[f"train_{k}"] = float(acc.reduce(v, "mean")) / nb * (100.0 if is_accuracy(k) else 1.0)
        last_epoch = self.global_step >= self.total_steps
        improved = False
        if (self.epoch + 1) % r.train.eval_every == 0 or last_epoch:
            if self.sharding is not None:
                self.sharding.refresh(self.global_step)
            val = self.evaluate(self.val_loader)
            row.update({f"val_{k}": v for k, v in val.items()})
            key, mode = self.method.monitor
            value = val.get(key)
            if value is not None and math.isfinite(value):
                better = self.best_value is None or (value > self.best_value if mode == "max"
                                                     else value < self.best_value)
                if better:
                    self.best_value, self.best_epoch, improved = value, self.epoch, True
        row = {k: rounded(k, v) for k, v in row.items()}
        self.history.append(row)
        self.epoch += 1
        self.batch_in_epoch = 0
        self._sums, self._counts = {}, [0, 0]
        for c in self.callbacks:
            c.on_epoch_end(self, row, improved)
        acc.wait_for_everyone()

    def train_steps(self, n: int) -> dict[str, float]:
        """Run ``n`` training steps through the real path (no evaluation, no checkpoint): a dry run."""
        out: dict[str, Tensor] = {}
        seed_everything(self._epoch_seed())
        self.method.train()
        self.method.on_epoch_start(self.epoch)
        for i, batch in enumerate(self._batches()):
            if i >= n:
                break
            out = self._train_batch(send_to_device(batch, self.acc.device), i, self.batches_per_epoch)
        if self.sharding is not None:
            self.sharding.close()
        torch.set_num_threads(self._threads_before)
        return {k: float(v.detach().float().mean()) * (100.0 if is_accuracy(k) else 1.0) for k, v in out.items()}

    def evaluate(self, loader: DataLoader | None, model: nn.Module | None = None) -> dict[str, float]:
        """The method's evaluation of ``model`` (default: the deployable one) on ``loader``."""
        return self.method.evaluate(loader, self, model or self.deployable())

    def _finish(self, train_time: float) -> FitResult:
        best_cb = next((c for c in self.callbacks if hasattr(c, "best_model")), None)
        # a step-source run's test metrics are its method's own evaluation (RL: evaluation episodes)
        last = self.evaluate(self.test_loader) if self.test_loader is not None or self.data is None else {}
        best: dict[str, float] | None = None
        if self.best_epoch >= 0:
            best = last
            if self.best_epoch != self.epoch - 1 and best_cb is not None:
                model = best_cb.best_model(self)
                if model is not None and (self.test_loader is not None or self.data is None):
                    best = self.evaluate(self.test_loader, model)
        key = self.method.monitor[0]
        return FitResult(self.run_dir, self.epoch, self.best_epoch + 1 if self.best_epoch >= 0 else -1,
                         self.best_value if key == "top1" else None, last, best, self.history, train_time,
                         monitor=key, best_value=self.best_value, steps=self.global_step,
                         skipped_steps=self.skipped_steps, info=dict(self.info))


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return len(batch)
    if isinstance(batch, dict):
        v = batch.get("y", batch.get("x", next(iter(batch.values()), None)))
        return _batch_size(v) if v is not None else 0
    if isinstance(batch, list | tuple) and batch:
        return _batch_size(batch[-1] if isinstance(batch[-1], Tensor) else batch[0])
    return 0

