"""Callbacks around the engine's core: the run folder, checkpoints, logs, progress, in-memory best."""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from kdforge.engine.checkpoint import atomic_write_text, load_state, load_weights, save_state, save_weights
from kdforge.engine.run_dir import CsvLog, prepare_run_dir
from kdforge.errors import KdforgeError

if TYPE_CHECKING:
    from kdforge.engine.trainer import FitResult, Trainer


class Callback:
    """Hooks the engine calls; every one is optional."""

    def on_init(self, trainer: Trainer) -> None:
        """Before data, models and optimizers are built."""

    def on_setup_failed(self, trainer: Trainer) -> None:
        """Set-up raised: undo what :meth:`on_init` did."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (after a resume has been loaded by the run folder)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """At the start (or resumed middle) of an epoch."""

    def on_step_end(self, trainer: Trainer, out: dict[str, Tensor]) -> None:
        """After each optimizer step (``trainer.global_step`` already counts it)."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float], improved: bool) -> None:
        """After an epoch's evaluation; ``improved``: the monitored metric reached a new best."""

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        """After the final test evaluation."""

    def on_close(self, trainer: Trainer) -> None:
        """Always, at the very end (also after an error)."""


class RunFolder(Callback):
    """The run folder: config.yaml, metrics.csv, TensorBoard, checkpoints, results.json, report.md, resume."""

    def __init__(self, path: Path, resume: bool = False, overwrite: bool = False) -> None:
        self.path, self.resume, self.overwrite = path, resume, overwrite
        self.log: CsvLog | None = None
        self.tb: Any = None
        self.lease: Any = None
        self._committed = False

    @property
    def ck(self) -> Path:
        """The checkpoints folder."""
        return self.path / "checkpoints"

    def on_init(self, trainer: Trainer) -> None:
        if trainer.main:
            self.lease = prepare_run_dir(self.path, resume=self.resume, overwrite=self.overwrite)
            # the recipe first, so that a run killed at any later moment can be resumed from its folder
            atomic_write_text(self.path / "config.yaml", trainer.recipe.to_yaml())

    def on_setup_failed(self, trainer: Trainer) -> None:
        rollback = getattr(self.lease, "rollback", None)
        if rollback is not None:
            rollback()

    def _has_state(self) -> bool:
        return (self.ck / "state" / "trainer.pt").is_file()

    def on_fit_start(self, trainer: Trainer) -> None:
        r = trainer.recipe
        if self.resume and self._has_state():
            method_state, st = load_state(self.ck / "state")
            before = int(st.get("total_steps", trainer.total_steps))
            trainer.load_state(method_state, st)
            if trainer.main and trainer.global_step < trainer.total_steps and trainer.global_step >= before:
                _say(trainer, f"continuing a finished run to {trainer.epochs} epochs; the lr schedule is "
                     f"re-planned for {trainer.total_steps} steps")
            elif trainer.main and not trainer.finished:
                _say(trainer, f"resuming at epoch {trainer.epoch + 1}, step {trainer.global_step}")
        trainer.acc.wait_for_everyone()
        if not trainer.main:
            return
        atomic_write_text(self.path / "config.yaml", r.to_yaml())
        self.log = CsvLog(self.path / "metrics.csv")
        self.log.truncate_after(trainer.epoch - 1)
        trainer.history = [{k: float(v) for k, v in row.items() if v != ""} for row in self.log.rows]
        self.tb = _tensorboard(self.path / "tb")

    def on_step_end(self, trainer: Trainer, out: dict[str, Tensor]) -> None:
        r = trainer.recipe.train
        if self.tb is not None and trainer.global_step % r.log_every == 0:
            self.tb.add_scalar("train/loss", float(out["loss"].detach()), trainer.global_step)
            for name, o in trainer.optimizers.items():
                self.tb.add_scalar(f"train/lr_{name}", o.lr, trainer.global_step)
        every = r.save_every_steps
        if every and trainer.global_step % every == 0 and trainer.batch_in_epoch < trainer.batches_per_epoch:
            self.save(trainer, improved=False)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float], improved: bool) -> None:
        if self.log is not None:
            self.log.append(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.tb.add_scalar(f"epoch/{k}", v, int(row["epoch"]))
        self.save(trainer, improved)

    def save(self, trainer: Trainer, improved: bool) -> None:
        """Write last (and best) weights and the resumable state (main process only)."""
        if not trainer.recipe.train.save_checkpoints or not trainer.main:
            return
        meta = trainer.export_metadata()
        model = trainer.deployable()
        save_weights(model, self.ck / "last.safetensors", meta)
        if improved:
            save_weights(model, self.ck / "best.safetensors", meta)
        save_state(self.ck / "state", trainer.method.resumable_state(), trainer.state())
        if not self._committed:
            commit = getattr(self.lease, "commit", None)
            if commit is not None:
                commit()
            self._committed = True

    def best_model(self, trainer: Trainer) -> nn.Module | None:
        """The best checkpoint's weights in a copy of the deployable model."""
        path = self.ck / "best.safetensors"
        if not path.is_file():
            return None
        model = copy.deepcopy(trainer.deployable())
        load_weights(model, path)
        return model

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        if not trainer.main:
            return
        self.save(trainer, improved=False)  # marks the state finished
        atomic_write_text(self.path / "results.json", json.dumps(result.to_json(), indent=2, allow_nan=False))
        from kdforge.report.run_report import write_run_report

        write_run_report(self.path)

    def on_close(self, trainer: Trainer) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        release = getattr(self.lease, "release", None)
        if release is not None:
            release()


class BestInMemory(Callback):
    """Without a run folder: keep the best epoch's deployable weights in memory (benchmarks)."""

    def __init__(self) -> None:
        self.state: dict[str, Tensor] | None = None

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float], improved: bool) -> None:
        if improved:
            self.state = {k: v.detach().clone() for k, v in trainer.deployable().state_dict().items()}

    def best_model(self, trainer: Trainer) -> nn.Module | None:
        """A copy of the deployable model with the best weights."""
        if self.state is None:
            return None
        model = copy.deepcopy(trainer.deployable())
        model.load_state_dict(self.state)
        return model


class Progress(Callback):
    """A progress bar on a terminal and one line per epoch on stderr."""

    def __init__(self) -> None:
        self.bar: Any = None

    def _on(self, trainer: Trainer) -> bool:
        mode = trainer.recipe.train.progress
        return trainer.main and (mode == "always" or (mode == "auto" and sys.stderr.isatty()))

    def on_epoch_start(self, trainer: Trainer) -> None:
        if self._on(trainer):
            self.bar = _Bar(trainer.batches_per_epoch, trainer.epoch)
            self.t0, self.done0 = time.perf_counter(), trainer.batch_in_epoch

    def on_step_end(self, trainer: Trainer, out: dict[str, Tensor]) -> None:
        if self.bar is not None and (trainer.global_step % max(1, min(trainer.recipe.train.log_every,
                                                                      trainer.steps_per_epoch // 10 or 1)) == 0):
            n = trainer._counts[0]
            loss = float(trainer._sums["loss"]) / max(n, 1)
            done = trainer.batch_in_epoch
            rate = trainer._counts[1] * trainer.acc.num_processes / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(done, loss, rate)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float], improved: bool) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not trainer.main or trainer.recipe.train.progress == "never":
            return
        key = trainer.method.monitor[0]
        val = f" val {key} {row[f'val_{key}']:.2f}" if f"val_{key}" in row else ""
        loss = row.get("train_loss", float("nan"))
        print(f"epoch {int(row['epoch']) + 1}/{trainer.epochs} loss {loss:.4f}{val} "
              f"({row['epoch_time_s']:.1f}s, {row['samples_per_s']:.0f} samples/s)", file=sys.stderr, flush=True)

    def on_close(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _say(trainer: Trainer, line: str) -> None:
    if trainer.recipe.train.progress != "never":
        print(line, file=sys.stderr, flush=True)


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


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
        return None
    return SummaryWriter(str(path))


def stored_result(path: Path) -> dict[str, Any]:
    """The results.json of a finished run folder."""
    f = path / "results.json"
    if not f.is_file():
        raise KdforgeError(f"{str(path)!r} has no results.json")
    return json.loads(f.read_text())

