"""Short training runs on digits: supervised and KD lower their loss and reach stated accuracies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdforge as kd
from kdforge.distill import Distill
from tests.conftest import digits_recipe


def test_kd_run_lowers_loss_and_reaches_accuracy(digits_teacher: Path, tmp_path: Path) -> None:
    method = {"name": "distill", "teacher": {"model": "cnn_small", "checkpoint": str(digits_teacher)},
              "student": {"model": "mlp"},
              "terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}]}
    res = kd.train(kd.Recipe.from_dict(digits_recipe(method, epochs=8)), tmp_path / "kd")
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert res.test_last["top1"] >= 90.0  # MLP student on 8×8 digits, 8 epochs (seed 0 gives ~93 %)
    for name in ("config.yaml", "metrics.csv", "report.md", "curves.png", "results.json",
                 "checkpoints/best.safetensors", "checkpoints/last.safetensors", "checkpoints/state/trainer.pt"):
        assert (tmp_path / "kd" / name).is_file(), name
    assert any((tmp_path / "kd" / "tb").iterdir())


def test_teacher_is_frozen_and_in_eval_mode(digits_teacher: Path) -> None:
    teacher = kd.create_model("cnn_small", 10, 1, checkpoint=digits_teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = Distill(kd.create_model("mlp", 10, 1), teacher,
                     [kd.Term(kd.build_loss("ce")), kd.Term(kd.build_loss("kd", T=4.0), 0.9)])
    method.train()
    assert not method.teacher.training and method.student.training
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    out = method.training_step((x, y), 0)
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.student.parameters())
    assert all(torch.equal(before[k], v) for k, v in method.teacher.state_dict().items())  # BN buffers too
    assert set(out) == {"loss", "loss_ce", "loss_kd", "acc"}
    assert method.deployable() is method.student
    assert not any(k.startswith("teacher.") for k in method.resumable_state())


def test_supervised_python_api(tmp_path: Path) -> None:
    recipe = kd.Recipe.from_dict(digits_recipe({"name": "supervised", "model": {"model": "mlp"}}, epochs=2),
                                 ["optim.name=adamw", "optim.lr=0.01", "sched.name=step", "sched.step_size=2",
                                  "train.epochs=3"])
    res = kd.train(recipe)
    assert res.run_dir is None and res.test_last["top1"] > 80


def test_grad_accumulation_matches_big_batch() -> None:
    """Two micro-batches of 32 with accumulation give the weights of one batch of 64 (no BN, no aug)."""
    base = digits_recipe({"name": "supervised", "model": {"model": "mlp"}}, epochs=1)
    base["data"].update(augment=False, limit_train=1280)  # whole cycles only
    big = kd.train(kd.Recipe.from_dict(base, ["data.batch_size=64"]))
    acc = kd.train(kd.Recipe.from_dict(base, ["data.batch_size=32", "train.grad_accum=2"]))
    assert abs(big.history[-1]["train_loss"] - acc.history[-1]["train_loss"]) < 1e-4
    assert big.test_last["top1"] == pytest.approx(acc.test_last["top1"], abs=0.3)


def test_bf16_autocast_runs_on_cpu() -> None:
    r = digits_recipe({"name": "supervised", "model": {"model": "cnn_small"}}, epochs=1)
    res = kd.train(kd.Recipe.from_dict(r, ["train.precision=bf16"]))
    assert res.test_last["top1"] > 20
