"""Callbacks around the engine's core: the run folder, checkpoints, logs, progress, in-memory best."""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kdforge.engine.checkpoint import atomic_write_text, load_state, load_weights, save_state, save_weights
from kdforge.engine.run_dir import CsvLog, prepare_run_dir
from kdforge.engine.run_format import read_results, upgrade_rows
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
    """The run folder: config.yaml, metrics.csv, TensorBoard, checkpoints, results.json, resume (the report.md
    is written by a callback the command adds: :class:`kdforge.run.RunReport`)."""

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
            if trainer.sharding is not None:  # every rank reads its shard of the DCP folder
                method_state, st = None, trainer.sharding.load(self.ck / "state", trainer)
            else:
                method_state, st = load_state(self.ck / "state")
            before = int(st.get("total_steps", trainer.total_steps))
            trainer.load_state(method_state, st)
            if trainer.main and trainer.global_step < trainer.total_steps and trainer.global_step >= before:
                _say(trainer, f"continuing a finished run to {trainer.epochs} epochs; the lr schedule is "
                     f"re-planned for {trainer.total_steps} steps")
            elif trainer.main and not trainer.finished:
                trainer._resume_note = f"resuming from epoch {trainer.epoch + 1}, step {trainer.global_step}"
            trainer.saved_step = trainer.global_step
        trainer.acc.wait_for_everyone()
        if not trainer.main:
            return
        atomic_write_text(self.path / "config.yaml", r.to_yaml())
        self.log = CsvLog(self.path / "metrics.csv")
        self.log.rows = upgrade_rows(self.log.rows)  # a folder of an older kdforge continues in today's format
        self.log.truncate_after(trainer.epoch)  # epochs count from 1: keep the ones that finished
        trainer.history = [{k: int(float(v)) if k in ("epoch", "step") else float(v) for k, v in row.items()
                            if v != ""} for row in self.log.rows]
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
        if not trainer.recipe.train.save_checkpoints:
            return
        if trainer.sharding is not None:  # collectives: every rank gathers the weights and writes its shard
            trainer.sharding.refresh(trainer.global_step)
            self._write_weights(trainer, improved)
            trainer.sharding.save(self.ck / "state", trainer)
        elif trainer.main:
            self._write_weights(trainer, improved)
            save_state(self.ck / "state", trainer.method.resumable_state(), trainer.state())
        trainer.saved_step = trainer.global_step  # what an interrupt tells: where a resume starts again
        if trainer.main and not self._committed:
            commit = getattr(self.lease, "commit", None)
            if commit is not None:
                commit()
            self._committed = True

    def _write_weights(self, trainer: Trainer, improved: bool) -> None:
        """last (and best) deployable weights as safetensors (main process only)."""
        if not trainer.main:
            return
        meta = trainer.export_metadata()
        model = trainer.deployable()
        save_weights(model, self.ck / "last.safetensors", meta)
        if improved:
            save_weights(model, self.ck / "best.safetensors", meta)

    def best_model(self, trainer: Trainer) -> nn.Module | None:
        """The best checkpoint's weights in a copy of the deployable model."""
        path = self.ck / "best.safetensors"
        if not path.is_file():
            return None
        model = copy.deepcopy(trainer.deployable())
        load_weights(model, path)
        return model

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        self.save(trainer, improved=False)  # marks the state finished
        if not trainer.main:
            return
        atomic_write_text(self.path / "results.json", json.dumps(result.to_json(), indent=2, allow_nan=False))

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
    """The start banner, a progress bar on a terminal (a line every 30 s without one), one line per epoch.

    Also fills ``trainer.info`` (models, parameters, FLOPs, data sizes, device), which ``results.json`` keeps.
    """

    HEARTBEAT_S = 30.0

    def __init__(self) -> None:
        self.bar: Any = None
        self.t_fit = self.t_line = 0.0
        self.steps0 = 0

    def _talk(self, trainer: Trainer) -> bool:
        return trainer.main and trainer.recipe.train.progress != "silent"

    def _bar_on(self, trainer: Trainer) -> bool:
        mode = trainer.recipe.train.progress
        return trainer.main and (mode == "always" or (mode == "auto" and sys.stderr.isatty()))

    def on_fit_start(self, trainer: Trainer) -> None:
        self.t_fit = self.t_line = time.perf_counter()
        self.steps0 = trainer.global_step
        if not trainer.main or trainer.finished:
            return
        trainer.info.update(run_info(trainer))
        if self._talk(trainer):
            print("\n".join(banner(trainer)), file=sys.stderr, flush=True)

    def eta_s(self, trainer: Trainer) -> float | None:
        """Seconds left for the whole run, from the pace of the steps done since this fit started."""
        done = trainer.global_step - self.steps0
        if done <= 0:
            return None
        return (time.perf_counter() - self.t_fit) / done * (trainer.total_steps - trainer.global_step)

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.t0 = time.perf_counter()
        if self._bar_on(trainer):
            self.bar = _Bar(trainer.batches_per_epoch, trainer.epoch, trainer.epochs)
            self.bar.update(trainer.batch_in_epoch, None, None)

    def on_step_end(self, trainer: Trainer, out: dict[str, Tensor]) -> None:
        if not self._talk(trainer):
            return
        now = time.perf_counter()
        last = trainer.batch_in_epoch >= trainer.batches_per_epoch
        if self.bar is not None:
            # by time, not by step count: a short epoch moves at once, a long one costs few host syncs
            if now - self.t_line >= 0.2 or last:
                self.t_line = now
                self.bar.update(trainer.batch_in_epoch, *self._loss_rate(trainer, now))
        elif now - self.t_line >= self.HEARTBEAT_S and not last:
            self.t_line = now
            loss, rate = self._loss_rate(trainer, now)
            eta = self.eta_s(trainer)
            print(f"epoch {trainer.epoch + 1}/{trainer.epochs} batch {trainer.batch_in_epoch}/"
                  f"{trainer.batches_per_epoch} loss {loss:.4f} ({rate:,.0f} samples/s"
                  + (f", ETA {fmt_duration(eta)} (run))" if eta is not None else ")"), file=sys.stderr, flush=True)

    def _loss_rate(self, trainer: Trainer, now: float) -> tuple[float, float]:
        n = trainer._counts[0]
        loss = float(trainer._sums["loss"]) / max(n, 1) if "loss" in trainer._sums else float("nan")
        rate = trainer._counts[1] * trainer.acc.num_processes / max(now - self.t0, 1e-9)
        return loss, rate

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float], improved: bool) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self._talk(trainer):
            return
        self.t_line = time.perf_counter()
        print(epoch_line(trainer, row, improved, self.eta_s(trainer)), file=sys.stderr, flush=True)

    def on_close(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def epoch_line(trainer: Trainer, row: dict[str, float], improved: bool, eta: float | None) -> str:
    """``epoch 3/40 loss 0.8123 val top1 81.25 * lr 0.0482 4.1 s (1,234 samples/s) ETA 2 min 31 s``."""
    key = trainer.method.monitor[0]
    parts = [f"epoch {int(row['epoch'])}/{trainer.epochs}", f"loss {row.get('train_loss', float('nan')):.4f}"]
    if f"val_{key}" in row:
        parts.append(f"val {key} {row[f'val_{key}']:.2f}" + (" (best)" if improved else ""))
    if "lr" in row:
        parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['epoch_time_s']:.1f} s ({row['samples_per_s']:,.0f} samples/s)")
    if eta is not None and trainer.global_step < trainer.total_steps:
        parts.append(f"ETA {fmt_duration(eta)} (run)")
    return "  ".join(parts)


def fmt_duration(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 04 min``."""
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_count(n: float | None) -> str:
    """``7.8 k``, ``11.2 M``, ``1.3 G`` (``?`` when unknown)."""
    if n is None:
        return "?"
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _model_names(spec: Any) -> str | None:
    if isinstance(spec, dict) and spec.get("model"):
        return str(spec["model"])
    if isinstance(spec, list):
        names = [_model_names(s) for s in spec]
        return ", ".join(n for n in names if n) or None
    return None


def run_info(trainer: Trainer) -> dict[str, Any]:
    """What a run trains on what: models and parameter counts, FLOPs, data sizes, device, steps."""
    def count_params(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    r, m = trainer.recipe, trainer.method
    md = r.method.model_dump()
    dep = trainer.deployable()
    spec = m.deployable_spec() or {}
    dep_ids = {id(p) for p in dep.parameters()}
    trained = {id(p): p.numel() for o in trainer.optimizers.values() for p in o.params}
    every = {id(p): p.numel() for p in m.parameters()}
    info: dict[str, Any] = {
        "method": str(md.get("name")), "model": str(spec.get("model") or _model_names(md.get("student"))
                                                   or _model_names(md.get("model")) or type(dep).__name__),
        "params": count_params(dep), "flops": _flops(trainer, dep),
        "other_trained_params": sum(n for i, n in trained.items() if i not in dep_ids),
        "frozen_params": sum(n for i, n in every.items() if i not in trained and i not in dep_ids),
        "device": str(trainer.acc.device), "precision": r.train.precision, "processes": trainer.acc.num_processes,
        "threads": torch.get_num_threads(), "steps_per_epoch": trainer.steps_per_epoch,
        "total_steps": trainer.total_steps, "epochs": trainer.epochs, "batch_size": r.data.batch_size,
    }
    teacher = _model_names(md.get("teacher")) or _model_names(md.get("teachers"))
    if teacher:
        info["teacher"] = teacher
        t = getattr(m, "teacher", None) or getattr(m, "teachers", None)
        info["teacher_params"] = count_params(t) if isinstance(t, nn.Module) else info["frozen_params"]
        if isinstance(t, nn.Module):
            info.update(_teacher_weights(trainer, t))
    if isinstance(md.get("terms"), list):
        info["terms"] = [{k: v for k, v in t.items() if k in ("loss", "weight")} for t in md["terms"]
                         if isinstance(t, dict)]
    if trainer.data is not None:
        d = trainer.data
        info["data"] = {"name": r.data.name, "train": _size(d.train), "val": _size(d.val), "test": _size(d.test)}
    else:
        info["data"] = {"name": type(trainer.source).__name__, "steps_per_epoch": trainer.batches_per_epoch}
    return info


def _teacher_weights(trainer: Trainer, teacher: nn.Module) -> dict[str, Any]:
    """The teacher's weights file and its top-1 on the validation split (cached per file and data)."""
    path = getattr(teacher, "kdforge_weights", None)
    if path is None:
        return {"teacher_weights": None}
    out: dict[str, Any] = {"teacher_weights": path}
    d = trainer.data
    if d is None or d.val is None or trainer.method.monitor[0] != "top1":
        return out
    from kdforge.models.loading import teacher_val_accuracy

    key = trainer.recipe.data.model_dump(mode="json")
    for k in ("batch_size", "eval_batch_size", "num_workers"):
        key.pop(k, None)
    try:
        out["teacher_val_top1"] = teacher_val_accuracy(teacher, path, d.val, key, trainer.recipe.data.eval_batch_size)
    except Exception:  # a teacher whose outputs are not class logits: no accuracy, never a failed run
        pass
    return out


def _size(ds: Any) -> int | None:
    """Samples in a data set; None for a stream without a length (0 for no data set)."""
    if ds is None:
        return 0
    try:
        return len(ds)
    except TypeError:
        return None


def _flops(trainer: Trainer, model: nn.Module) -> int | None:
    """FLOPs of one forward pass for one training sample when that sample is an image tensor, else None."""
    if trainer.data is None or trainer.recipe.train.distributed == "fsdp" or trainer.acc.num_processes > 1:
        return None
    try:
        item = trainer.data.train[0]
        x = item.get("x") if isinstance(item, dict) else item[0] if isinstance(item, list | tuple) else item
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None
        from torch.utils.flop_counter import FlopCounterMode

        modes = [(mod, mod.training) for mod in model.modules()]
        try:
            model.eval()
            dev = next(model.parameters()).device
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                model(x.unsqueeze(0).to(dev))
            return int(fc.get_total_flops()) or None
        finally:
            for mod, was in modes:
                mod.training = was
    except Exception:  # a model whose forward wants more than one tensor: no FLOPs, never a failed run
        return None


def banner(trainer: Trainer) -> list[str]:
    """The lines printed when a fit starts."""
    i, r = trainer.info, trainer.recipe
    if getattr(trainer, "brief_banner", False):  # one stage of a multi-stage driver: one line
        d = i["data"]
        size = f"{d['train'] or 0:,} train samples" if "train" in d else f"step source {d['name']}"
        return [f"  {r.name}: {i['model']} ({fmt_count(i['params'])} params), {size}, {i['steps_per_epoch']:,} "
                f"steps per epoch x {i['epochs']} epoch{'' if i['epochs'] == 1 else 's'}, "
                f"{i['device']} {i['precision']}"
                + (f"; {trainer._resume_note}" if getattr(trainer, "_resume_note", None) else "")]
    where = f" -> {trainer.run_dir}" if trainer.run_dir is not None else ""
    lines = [f"kdforge {r.name}: method {i['method']}{where}"]
    flops = f", {fmt_count(i['flops'])}FLOPs" if i.get("flops") else ""
    role = "student" if "teacher" in i else "model"
    lines.append(f"  {role:8s} {i['model']} ({fmt_count(i['params'])} params{flops})")
    if "teacher" in i:
        lines.append(f"  teacher  {i['teacher']} ({fmt_count(i['teacher_params'])} params, frozen)")
        if "teacher_weights" in i:
            acc = i.get("teacher_val_top1")
            lines.append(f"  weights  {i['teacher_weights'] or 'random (weights: random)'}"
                         + (f", val top1 {acc:.2f} %" if acc is not None else ""))
    if i.get("terms"):
        lines.append("  loss     " + " + ".join(f"{t.get('weight', 1.0):g} x {t['loss']}" for t in i["terms"]))
    if i["other_trained_params"]:
        lines.append(f"  also trained: {fmt_count(i['other_trained_params'])} params (connectors, heads, "
                     "generators: not in the deployed model)")
    d = i["data"]
    if "train" in d:
        n = {k: "?" if d[k] is None else f"{d[k]:,}" for k in ("train", "val", "test")}
        lines.append(f"  data     {d['name']}: {n['train']} train, {n['val']} val, {n['test']} test; "
                     f"batch {i['batch_size']}")
    else:
        lines.append(f"  data     step source {d['name']}")
    procs = i["processes"]
    lines.append(f"  device   {i['device']}, {i['precision']}, {procs} process{'es' if procs > 1 else ''}, "
                 f"{i['threads']} thread{'s' if i['threads'] > 1 else ''}")
    spe, total, epochs = i["steps_per_epoch"], i["total_steps"], i["epochs"]
    if total < spe * epochs:  # train.max_steps stops the run early
        lines.append(f"  steps    {total:,} in total (train.max_steps), {spe:,} per epoch: "
                     + (f"{total / spe:.2g} of one epoch" if total < spe else f"about {total / spe:.1f} epochs"))
    else:
        lines.append(f"  steps    {spe:,} per epoch, {total:,} in total ({epochs} epoch{'s' if epochs != 1 else ''})")
    note = getattr(trainer, "_resume_note", None)
    if note:
        lines.append(f"  {note}")
    return lines


def _say(trainer: Trainer, line: str) -> None:
    if trainer.recipe.train.progress != "silent":
        print(line, file=sys.stderr, flush=True)


class _Bar:
    """A rich progress bar showing loss and throughput."""

    def __init__(self, total: int, epoch: int, epochs: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}"), TextColumn("epoch left"), TimeRemainingColumn(),
                          transient=True)
        self.task = self.p.add_task("train", total=total, info="")
        self.p.start()

    def update(self, done: int, loss: float | None, throughput: float | None) -> None:
        info = "" if loss is None else f"loss {loss:.4f} | {throughput:,.0f} samples/s"
        self.p.update(self.task, completed=done, info=info)

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
    return read_results(f)

