"""Two CPU processes (gloo, through accelerate launch) agree with one process on the same global batch."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

# Tolerance: DDP averages two half-batch gradients where one process averages the whole batch, so
# float summation order differs; after 3 epochs of SGD the weights agree to about 1e-6.
WEIGHT_ATOL = 1e-4

RECIPE = {
    "name": "ddp", "seed": 0,
    "data": {"name": "digits", "batch_size": 32, "val_fraction": 0.1, "augment": False},
    "method": {"name": "supervised", "model": {"model": "mlp"}},
    "optim": {"lr": 0.1}, "train": {"epochs": 3, "progress": "silent", "threads": 1},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_and_one(recipe: Path, tmp_path: Path) -> None:
    """The recipe on 2 gloo processes (batch 32 each) into ddp/, and on one process (batch 64) into one/."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = str(Path(sys.executable).parent / "accelerate")
    subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                    "-m", "kdforge", "train", str(recipe), "-o", str(tmp_path / "ddp")],
                   env=env, check=True, capture_output=True, timeout=600)
    subprocess.run([sys.executable, "-m", "kdforge", "train", str(recipe), "-o", str(tmp_path / "one"),
                    "--set", "data.batch_size=64"], env=env, check=True, capture_output=True, timeout=600)


NEEDS_ACCELERATE = pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                                      reason="accelerate CLI not installed beside this Python")


@NEEDS_ACCELERATE
def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    _train_two_and_one(recipe, tmp_path)
    a = load_file(str(tmp_path / "ddp" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "one" / "checkpoints" / "last.safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < WEIGHT_ATOL, f"max weight difference {diff:.2e}"
    ra = yaml.safe_load((tmp_path / "ddp" / "results.json").read_text())
    rb = yaml.safe_load((tmp_path / "one" / "results.json").read_text())
    assert abs(ra["test_last"]["top1"] - rb["test_last"]["top1"]) <= 0.3


ADV = {
    "name": "ddp-adv", "seed": 0,
    "data": {"name": "digits", "batch_size": 32, "val_fraction": 0.1, "augment": False, "limit_train": 512},
    "method": {"name": "adversarial", "teacher": {"model": "mlp", "weights": "random"}, "student": {"model": "mlp"},
               "input": "logits", "adv_weight": 0.5, "lr_d": 1e-3},
    "optim": {"lr": 0.1}, "train": {"epochs": 2, "progress": "silent", "threads": 1},
}


@NEEDS_ACCELERATE
def test_two_process_ddp_matches_one_process_with_a_side_optimizer(tmp_path: Path) -> None:
    """The adversarial method's discriminator is a manual engine optimizer: its gradients are averaged too."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ADV))
    _train_two_and_one(recipe, tmp_path)
    for rel in ("checkpoints/last.safetensors", "checkpoints/state/method.safetensors"):
        a, b = load_file(str(tmp_path / "ddp" / rel)), load_file(str(tmp_path / "one" / rel))
        assert a.keys() == b.keys()
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert diff < WEIGHT_ATOL, f"{rel}: max difference {diff:.2e}"
    state = load_file(str(tmp_path / "one" / "checkpoints/state/method.safetensors"))
    assert any(k.startswith("disc.") for k in state), "the discriminator is part of the resumable state"
