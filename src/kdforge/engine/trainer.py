"""Trainer: runs a Method over data with Hugging Face Accelerate."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from kdforge.config import Recipe
from kdforge.data import DataBundle, make_loader
from kdforge.engine.checkpoint import atomic_write_text, load_state, load_weights, save_state, save_weights
from kdforge.engine.run_dir import CsvLog, prepare_run_dir
from kdforge.engine.schedule import build_optimizer, build_scheduler
from kdforge.errors import KdforgeError
from kdforge.method import Method
from kdforge.metrics import topk_correct


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class FitResult:
    """What a finished run reports; also written to ``results.json``."""

    run_dir: Path | None
    epochs: int
    best_epoch: int
    best_val_top1: float
    test_last: dict[str, float]
    test_best: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return d


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
    # Several runs in one process (demo, benchmarks) may ask for different precisions: reset the
    # per-run part of accelerate's singleton state, keeping the process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=t.grad_accum,
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           find_unused_parameters=t.find_unused_parameters)])


class Trainer:
    """Train a Method: epochs of steps, evaluation, checkpoints, logs and resume."""

    def __init__(self, method: Method, data: DataBundle, recipe: Recipe, run_dir: str | Path | None = None,
                 resume: bool = False, overwrite: bool = False, zero_grad_before_backward: bool = True) -> None:
        self.recipe = recipe
        method.total_epochs = recipe.train.epochs
        self.data = dataclasses.replace(data, train=method.wrap_train_data(data.train))
        self._threads_before = torch.get_num_threads()
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.acc = _accelerator(recipe)
        self.main = self.acc.is_main_process
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        if self.run_dir is not None and self.main:
            prepare_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
        self.acc.wait_for_everyone()
        self.zero_first = zero_grad_before_backward
        rank, world = self.acc.process_index, self.acc.num_processes
        d = recipe.data
        self.train_loader = make_loader(self.data.train, d.batch_size, True, recipe.seed, rank, world, d.num_workers)
        eval_set = data.val if data.val is not None else data.test
        self.val_loader = make_loader(eval_set, d.eval_batch_size, False, rank=rank, world=world)
        self.test_loader = make_loader(data.test, d.eval_batch_size, False, rank=rank, world=world)
        self.method = method.to(self.acc.device)
        self.method.setup(self._example_batch())
        self.steps_per_epoch = max(1, math.ceil(len(self.train_loader) / recipe.train.grad_accum))
        params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, recipe.optim)
        self.scheduler = build_scheduler(self.optimizer, recipe.sched, self.steps_per_epoch,
                                         recipe.train.epochs, recipe.optim.lr)
        self.model = self.acc.prepare_model(self.method)
        self.start_epoch, self.global_step = 0, 0
        self.best_val, self.best_epoch = -1.0, -1
        self.history: list[dict[str, float]] = []

    def _example_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.data.train
        n = min(self.recipe.data.batch_size, len(ds))
        state = torch.get_rng_state()
        batch = default_collate([ds[i] for i in range(n)])
        torch.set_rng_state(state)
        return tuple(t.to(self.acc.device) for t in batch)  # type: ignore[return-value]

    # -- state -------------------------------------------------------------------------------
    def _save(self, epoch: int, improved: bool) -> None:
        if self.run_dir is None or not self.recipe.train.save_checkpoints or not self.main:
            return
        ck = self.run_dir / "checkpoints"
        meta = self.export_metadata()
        save_weights(self.method.deployable(), ck / "last.safetensors", meta)
        if improved:
            save_weights(self.method.deployable(), ck / "best.safetensors", meta)
        trainer_state = {
            "epoch": epoch, "global_step": self.global_step, "best_val": self.best_val,
            "best_epoch": self.best_epoch, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
        }
        if self.acc.scaler is not None:
            trainer_state["scaler"] = self.acc.scaler.state_dict()
        save_state(ck / "state", self.method.resumable_state(), trainer_state)

    def export_metadata(self) -> dict[str, str]:
        """Strings stored in checkpoint headers, enough to rebuild the deployable model."""
        spec = self.recipe.method.model_extra or {}
        model_spec = spec.get("student") or spec.get("model") or {}
        return {"kdforge_model": str(model_spec.get("model", "")),
                "kdforge_model_kwargs": json.dumps(model_spec.get("kwargs", {})),
                "num_classes": str(self.data.num_classes), "in_chans": str(self.data.in_chans),
                "image_size": str(self.data.image_size), "data": self.recipe.data.name,
                "recipe": self.recipe.model_dump_json()}

    def _load(self) -> None:
        assert self.run_dir is not None
        method_state, st = load_state(self.run_dir / "checkpoints" / "state")
        missing, unexpected = self.method.load_state_dict(method_state, strict=False)
        bad = [k for k in missing if not k.startswith(self.method.frozen_prefixes)]
        if bad or unexpected:
            raise KdforgeError(f"resume state does not fit this method: missing {bad[:3]}, "
                               f"unexpected {list(unexpected)[:3]}")
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if "scaler" in st and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(st["scaler"])
        self.start_epoch = int(st["epoch"]) + 1
        self.global_step = int(st["global_step"])
        self.best_val, self.best_epoch = float(st["best_val"]), int(st["best_epoch"])

    # -- loop --------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Train for ``train.epochs`` epochs (continuing a resumed run), then test best and last."""
        r = self.recipe
        log = tb = None
        if self.run_dir is not None:
            if self.resume:
                self._load()
            if self.main:
                atomic_write_text(self.run_dir / "config.yaml", r.to_yaml())
                log = CsvLog(self.run_dir / "metrics.csv")
                log.truncate_after(self.start_epoch - 1)
                self.history = [{k: float(v) for k, v in row.items() if v != ""} for row in log.rows]
                tb = _tensorboard(self.run_dir / "tb")
        t_start = time.perf_counter()
        for epoch in range(self.start_epoch, r.train.epochs):
            row = self._train_epoch(epoch, tb)
            if (epoch + 1) % r.train.eval_every == 0 or epoch + 1 == r.train.epochs:
                val = self.evaluate(self.val_loader)
                row.update({"val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]})
            improved = row.get("val_top1", -1.0) > self.best_val
            if improved:
                self.best_val, self.best_epoch = row["val_top1"], epoch
            self.history.append(row)
            if log is not None:
                log.append(row)
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch":
                        tb.add_scalar(f"epoch/{k}", v, epoch)
            self._save(epoch, improved)
            self.acc.wait_for_everyone()
            self._print_epoch(row)
        train_time = time.perf_counter() - t_start
        result = self._finish(train_time)
        if tb is not None:
            tb.close()
        torch.set_num_threads(self._threads_before)  # train.threads applies to this run only
        return result

    def _train_epoch(self, epoch: int, tb: Any) -> dict[str, float]:
        r, acc = self.recipe, self.acc
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        # Re-seeding from (seed, epoch, rank) makes a resumed epoch draw the same augmentations.
        seed_everything(r.seed * 1_000_003 + epoch * 101 + acc.process_index)
        self.method.train()
        self.method.on_epoch_start(epoch)
        sums: dict[str, torch.Tensor] = {}
        n_batches, n_samples = 0, 0
        accum = r.train.grad_accum
        t0 = time.perf_counter()
        bar = _progress(self.main and _show_progress(r.train.progress), len(self.train_loader), epoch)
        for i, (x, y) in enumerate(self.train_loader):
            x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
            last_micro = (i + 1) % accum == 0 or i + 1 == len(self.train_loader)
            if self.zero_first and i % accum == 0:
                self.optimizer.zero_grad(set_to_none=True)
            ctx = acc.no_sync(self.model) if not last_micro else _nullcontext()
            with ctx:
                out = self.model((x, y), self.global_step)
                acc.backward(out["loss"])
            if last_micro:
                self._optimizer_step()
                if not self.zero_first:
                    self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
            for k, v in out.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v
            n_batches += 1
            n_samples += len(y)
            if self.main and (i + 1) % r.train.log_every == 0:
                loss = float(sums["loss"]) / n_batches
                if tb is not None:
                    tb.add_scalar("train/loss", float(out["loss"].detach()), self.global_step)
                    tb.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.global_step)
                if bar is not None:
                    bar.update(i + 1, loss, n_samples * acc.num_processes / (time.perf_counter() - t0))
        if bar is not None:
            bar.close()
        dt = time.perf_counter() - t0
        row = {"epoch": float(epoch), "step": float(self.global_step),
               "lr": float(self.optimizer.param_groups[0]["lr"]), "epoch_time_s": dt,
               "samples_per_s": n_samples * acc.num_processes / max(dt, 1e-9)}
        for k, v in sums.items():
            row[f"train_{k}"] = float(acc.reduce(v, "mean")) / max(n_batches, 1)
        return row

    def _optimizer_step(self) -> None:
        scaler = self.acc.scaler
        clip = self.recipe.train.grad_clip
        if scaler is not None:
            if clip:
                scaler.unscale_(self.optimizer)
                self.acc.clip_grad_norm_(self.method.parameters(), clip)
            scaler.step(self.optimizer)
            scaler.update()
        else:
            if clip:
                self.acc.clip_grad_norm_(self.method.parameters(), clip)
            self.optimizer.step()
        self.scheduler.step()

    def evaluate(self, loader: DataLoader, model: nn.Module | None = None) -> dict[str, float]:
        """Top-1/top-5 (%) and loss of the deployable model, summed across processes."""
        model = model or self.method.deployable()
        was = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.acc.device)
        with torch.no_grad(), self.acc.autocast():
            for x, y in loader:
                x, y = x.to(self.acc.device), y.to(self.acc.device)
                logits = model(x).float()
                c1, c5 = topk_correct(logits, y)
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                sums += torch.tensor([c1, c5, float(loss), len(y)], dtype=torch.float64, device=sums.device)
        model.train(was)
        sums = self.acc.reduce(sums, "sum")
        n = max(float(sums[3]), 1.0)
        return {"top1": 100 * float(sums[0]) / n, "top5": 100 * float(sums[1]) / n,
                "loss": float(sums[2]) / n}

    def _finish(self, train_time: float) -> FitResult:
        last = self.evaluate(self.test_loader)
        best = last
        ck = self.run_dir / "checkpoints" / "best.safetensors" if self.run_dir else None
        if ck is not None and ck.is_file() and self.best_epoch != self.recipe.train.epochs - 1:
            import copy

            model = copy.deepcopy(self.method.deployable())
            load_weights(model, ck)
            best = self.evaluate(self.test_loader, model)
        res = FitResult(self.run_dir, self.recipe.train.epochs, self.best_epoch, self.best_val,
                        last, best, self.history, train_time)
        if self.run_dir is not None and self.main:
            atomic_write_text(self.run_dir / "results.json", json.dumps(res.to_json(), indent=2))
            from kdforge.report.run_report import write_run_report

            write_run_report(self.run_dir)
        return res

    def _print_epoch(self, row: dict[str, float]) -> None:
        if not self.main or self.recipe.train.progress == "never":
            return
        val = f" val top1 {row['val_top1']:.2f}%" if "val_top1" in row else ""
        print(f"epoch {int(row['epoch']) + 1}/{self.recipe.train.epochs} loss {row['train_loss']:.4f}"
              f"{val} ({row['epoch_time_s']:.1f}s, {row['samples_per_s']:.0f} samples/s)",
              file=sys.stderr, flush=True)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _show_progress(mode: str) -> bool:
    return mode == "always" or (mode == "auto" and sys.stderr.isatty())


class _Bar:
    """A rich progress bar showing loss and throughput."""

    def __init__(self, total: int, epoch: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(f"epoch {epoch + 1}"), BarColumn(), TextColumn("{task.fields[info]}"),
                          TimeRemainingColumn(), transient=True)
        self.task = self.p.add_task("train", total=total, info="")
        self.p.start()

    def update(self, done: int, loss: float, throughput: float) -> None:
        self.p.update(self.task, completed=done, info=f"loss {loss:.4f} | {throughput:.0f} samples/s")

    def close(self) -> None:
        self.p.stop()


def _progress(enabled: bool, total: int, epoch: int) -> _Bar | None:
    return _Bar(total, epoch) if enabled else None


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
        return None
    return SummaryWriter(str(path))
