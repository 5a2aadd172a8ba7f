"""The engine's contract: mid-epoch resume, step sources, non-finite losses, EMA, schedules, no-val runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import kdforge as kd
from kdforge.config import SchedConfig
from kdforge.engine.callbacks import Callback
from kdforge.engine.schedule import lr_factor
from kdforge.engine.trainer import NonFiniteLoss
from kdforge.errors import KdforgeError
from tests.conftest import digits_recipe

SUP = {"name": "supervised", "model": {"model": "cnn_tiny"}}


def _recipe(epochs: int = 2, **train: Any) -> kd.Recipe:
    r = digits_recipe(SUP, epochs=epochs)
    r["data"].update({"limit_train": 256, "batch_size": 32})
    r["train"].update({"threads": 1, **train})
    return kd.Recipe.from_dict(r)


def _trainer(recipe: kd.Recipe, run: Path | None = None, resume: bool = False, **kw: Any) -> kd.Trainer:
    kd.engine.trainer.seed_everything(recipe.seed)
    data = kd.load_data(recipe.data)
    method = kd.method.build_method(recipe.method.model_dump(),
                                    kd.DataInfo(data.num_classes, data.in_chans, data.image_size))
    return kd.Trainer(method, data, recipe, run, resume=resume, **kw)


class _Stop(Callback):
    """Simulates a kill: raises after ``at`` optimizer steps (after the engine's own step callbacks ran)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: kd.Trainer, out: dict[str, Tensor]) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


def _weights(run: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "last.safetensors"))


def _opt_state(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / "state" / "trainer.pt", weights_only=True)["optimizers"]


def _same_tree(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_interrupted_inside_an_epoch_resumes_bit_identical(tmp_path: Path) -> None:
    recipe = _recipe(epochs=2, save_every_steps=3)
    full, cut = tmp_path / "full", tmp_path / "cut"
    _trainer(recipe, full).fit()
    steps_per_epoch = math.ceil(256 / 32)
    with pytest.raises(KeyboardInterrupt):
        _trainer(recipe, cut, callbacks=[_Stop(steps_per_epoch + 4)]).fit()  # inside epoch 2, after a save at 9
    st = torch.load(cut / "checkpoints" / "state" / "trainer.pt", weights_only=True)
    assert st["batch_in_epoch"] > 0, "the interruption must fall inside an epoch"
    _trainer(recipe, cut, resume=True).fit()
    a, b = _weights(full), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _same_tree(_opt_state(full), _opt_state(cut))
    rows_a = (full / "metrics.csv").read_text().splitlines()
    rows_b = (cut / "metrics.csv").read_text().splitlines()
    col = rows_a[0].split(",").index("train_loss")
    assert [r.split(",")[col] for r in rows_a] == [r.split(",")[col] for r in rows_b]


class _Blocks:
    """A step source: batch ``step`` is drawn from a generator seeded by the step (exact on resume)."""

    steps_per_epoch = 4

    def __init__(self) -> None:
        data = kd.load_data(kd.config.DataConfig(name="digits", augment=False, val_fraction=0.0))
        self.x = torch.stack([data.train[i][0] for i in range(200)])
        self.y = torch.stack([data.train[i][1] for i in range(200)])

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self.x), (16,), generator=torch.Generator().manual_seed(step))
        return self.x[idx], self.y[idx]


def test_a_step_source_trains_to_max_steps_and_resumes_exactly(tmp_path: Path) -> None:
    recipe = _recipe(max_steps=10, save_every_steps=1)
    src = _Blocks()
    info = kd.DataInfo(10, 1, 8)

    def trainer(run: Path, resume: bool = False, **kw: Any) -> kd.Trainer:
        torch.manual_seed(0)
        m = kd.method.build_method(recipe.method.model_dump(), info)
        return kd.Trainer(m, None, recipe, run, resume=resume, source=src, **kw)

    res = trainer(tmp_path / "full").fit()
    assert res.steps == 10 and res.best_epoch == -1 and res.test_best is None
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "cut", callbacks=[_Stop(6)]).fit()
    trainer(tmp_path / "cut", resume=True).fit()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _NanAt(Callback):
    """Makes the model's first weight NaN after ``at`` steps, so the next loss is NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: kd.Trainer, out: dict[str, Tensor]) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                next(trainer.method.parameters()).fill_(float("nan"))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    recipe = _recipe(epochs=3)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at epoch 2, step 9: loss"):
        _trainer(recipe, run, callbacks=[_NanAt(9)]).fit()
    good = _weights(run)
    assert all(torch.isfinite(v).all() for v in good.values()), "the kept checkpoint is the last good one"
    assert torch.load(run / "checkpoints" / "state" / "trainer.pt", weights_only=True)["epoch"] == 1
    assert not (run / "results.json").exists()


def test_a_nan_term_is_named_and_skip_mode_continues(tmp_path: Path) -> None:
    recipe = _recipe(epochs=1, nonfinite="skip")
    t = _trainer(recipe)
    calls = {"n": 0}
    step = t.method.training_step

    def bad_step(batch: Any, s: int) -> dict[str, Tensor]:
        out = step(batch, s)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss_kd"] = torch.tensor(float("inf"))
            out["loss"] = out["loss"] + out["loss_kd"]
        return out

    t.method.training_step = bad_step  # type: ignore[method-assign]
    res = t.fit()
    assert res.skipped_steps == 1 and math.isfinite(res.test_last["top1"])
    t2 = _trainer(_recipe(epochs=1))
    t2.method.training_step = bad_step  # type: ignore[method-assign]
    calls["n"] = 0
    with pytest.raises(NonFiniteLoss, match="loss_kd"):
        t2.fit()


def test_no_validation_split_never_selects_on_test(tmp_path: Path) -> None:
    r = digits_recipe(SUP, epochs=2)
    r["data"].update({"limit_train": 128, "val_fraction": 0.0})
    res = _trainer(kd.Recipe.from_dict(r), tmp_path / "run").fit()
    assert res.best_epoch == -1 and res.test_best is None
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test_best"] is None and saved["best_epoch"] == -1
    assert not (tmp_path / "run" / "checkpoints" / "best.safetensors").exists()
    assert "NaN" not in (tmp_path / "run" / "results.json").read_text()


def test_lr_inf_is_refused_in_one_line() -> None:
    with pytest.raises(KdforgeError, match=r"optim.lr"):
        kd.Recipe.from_dict(digits_recipe(SUP, optim={"lr": float("inf")}))


def test_ema_follows_its_formula_and_resumes(tmp_path: Path) -> None:
    recipe = _recipe(epochs=1, ema={"decay": 0.5, "evaluate": False})
    t = _trainer(recipe)
    before = {k: v.clone() for k, v in t.ema.model.state_dict().items()}
    snapshots = []

    class Snap(Callback):
        def on_step_end(self, trainer: kd.Trainer, out: dict[str, Tensor]) -> None:
            snapshots.append({k: v.clone() for k, v in trainer.method.deployable().state_dict().items()})

    t.callbacks.append(Snap())
    t.fit()
    expect = before
    for w in snapshots:
        expect = {k: (0.5 * expect[k] + 0.5 * w[k]) if w[k].dtype.is_floating_point else w[k] for k in w}
    got = t.ema.model.state_dict()
    assert all(torch.allclose(got[k].float(), expect[k].float(), atol=1e-6) for k in got)
    assert t.ema.updates == len(snapshots) == 8


def test_schedules_relative_table_and_linear() -> None:
    rel = SchedConfig(name="relative", relative=[(0, 1.0), (2, 0.7), (4, 0.5)])
    assert [lr_factor(s, rel, 10, 100, 0.1) for s in (0, 19, 20, 39, 40, 99)] == [1.0, 1.0, 0.7, 0.7, 0.5, 0.5]
    lin = SchedConfig(name="linear", warmup_epochs=1)
    assert lr_factor(0, lin, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(10, lin, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, lin, 10, 110, 0.1) == pytest.approx(0.5)


def test_a_finished_run_resumed_changes_nothing_and_more_epochs_replan(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    recipe = _recipe(epochs=1, progress="auto")
    _trainer(recipe, run).fit()
    before = (run / "results.json").read_text()
    weights = _weights(run)
    res = _trainer(recipe, run, resume=True).fit()
    assert (run / "results.json").read_text() == before and res.epochs == 1
    assert "finished" in capsys.readouterr().err
    more = _trainer(_recipe(epochs=2, progress="auto"), run, resume=True)
    res2 = more.fit()
    assert "re-planned" in capsys.readouterr().err and res2.epochs == 2
    assert not all(torch.equal(weights[k], _weights(run)[k]) for k in weights)
    # the second epoch ran with the cosine schedule of a 2-epoch run: the lr at its last step
    assert more.optimizer.param_groups[0]["lr"] == pytest.approx(
        recipe.optim.lr * lr_factor(15, recipe.sched, 8, 16, recipe.optim.lr))


def test_an_unknown_trainable_parameter_and_duplicate_optimizers_are_refused() -> None:
    recipe = _recipe(epochs=1)
    data = kd.load_data(recipe.data)
    info = kd.DataInfo(data.num_classes, data.in_chans, data.image_size)

    class TwoOpts(kd.Supervised):
        def configure_optimizers(self) -> list[kd.OptimizerSpec]:
            return [kd.OptimizerSpec("a", self.model), kd.OptimizerSpec("b", self.model)]

    with pytest.raises(KdforgeError, match="in two optimizers"):
        kd.Trainer(TwoOpts(kd.create_model("cnn_tiny", 10, 1)), data, recipe)

    class Orphan(kd.Supervised):
        def __init__(self, model: nn.Module) -> None:
            super().__init__(model)
            self.extra = nn.Linear(2, 2)

        def configure_optimizers(self) -> list[kd.OptimizerSpec]:
            return [kd.OptimizerSpec("a", self.model)]

    with pytest.raises(KdforgeError, match="in no optimizer"):
        kd.Trainer(Orphan(kd.method.build_model(kd.config.ModelSpec(model="cnn_tiny"), info)), data, recipe)


def test_no_decay_rule_builds_a_group_without_weight_decay() -> None:
    r = digits_recipe({"name": "supervised", "model": {"model": "cnn_small"}},
                      optim={"lr": 0.1, "weight_decay": 0.01, "no_decay": ["norm", "bias"]})
    t = _trainer(kd.Recipe.from_dict(r))
    groups = t.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    names = dict((id(p), n) for n, p in t.method.named_parameters())
    plain = [names[id(p)] for p in groups[1]["params"]]
    assert plain and all(n.endswith("bias") or ".bn" in n or "norm" in n or p.ndim == 1
                         for n, p in zip(plain, groups[1]["params"], strict=True))
    assert all(p.ndim > 1 for p in groups[0]["params"])


def test_copying_a_run_folder_keeps_it_resumable(tmp_path: Path) -> None:
    recipe = _recipe(epochs=2)
    with pytest.raises(KeyboardInterrupt):
        _trainer(recipe, tmp_path / "a", callbacks=[_Stop(8)]).fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for p in (tmp_path / "b").glob(".lock"):
        p.unlink()
    res = _trainer(recipe, tmp_path / "b", resume=True).fit()
    assert res.epochs == 2


def test_fsdp_is_validated_with_one_line_on_the_cpu() -> None:
    recipe = _recipe(epochs=1, distributed="fsdp", fsdp={"sharding": "no_shard", "shard_teacher": False}, device="cpu")
    with pytest.raises(KdforgeError, match=r"^train.fsdp.sharding 'no_shard' keeps a whole model on every process"):
        _trainer(recipe)
    recipe = _recipe(epochs=1, distributed="fsdp", fsdp={"cpu_offload": True}, device="cpu")
    with pytest.raises(KdforgeError, match=r"^train.fsdp.cpu_offload moves GPU shards to the CPU"):
        _trainer(recipe)
    with pytest.raises(KdforgeError, match=r"train.fsdp.sharding"):
        _recipe(epochs=1, fsdp={"sharding": "everything"})
