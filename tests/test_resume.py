"""A run killed in the middle and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

RECIPE = {
    "name": "resume", "seed": 3,
    "data": {"name": "digits", "batch_size": 32, "val_fraction": 0.1},
    "method": {"name": "supervised", "model": {"model": "cnn_small", "kwargs": {"width": 24}}},
    "optim": {"lr": 0.05}, "sched": {"name": "cosine", "warmup_epochs": 1},
    "train": {"epochs": 10, "progress": "never", "threads": 1},
}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdforge", *args]


def _epochs_done(run: Path) -> int:
    m = run / "metrics.csv"
    return max(0, len(m.read_text().splitlines()) - 1) if m.is_file() else 0


def test_kill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    proc = subprocess.Popen(_cmd("train", str(recipe), "-o", str(killed)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _epochs_done(killed) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _epochs_done(killed)
    assert 3 <= done_before < RECIPE["train"]["epochs"], "the run must be killed in the middle"
    assert not (killed / "results.json").exists()

    subprocess.run(_cmd("train", str(killed), "--resume"), env=env, check=True, capture_output=True)
    subprocess.run(_cmd("train", str(recipe), "-o", str(full)), env=env, check=True, capture_output=True)

    a = load_file(str(full / "checkpoints" / "last.safetensors"))
    b = load_file(str(killed / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    rows_a = (full / "metrics.csv").read_text().splitlines()
    rows_b = (killed / "metrics.csv").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == RECIPE["train"]["epochs"] + 1
    col = rows_a[0].split(",").index("val_top1")
    assert [r.split(",")[col] for r in rows_a] == [r.split(",")[col] for r in rows_b]


def test_kill_inside_the_first_epoch_resumes_bit_identical(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    r = {**RECIPE, "train": {**RECIPE["train"], "epochs": 2, "save_every_steps": 5}}
    recipe.write_text(yaml.safe_dump(r))
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    state = killed / "checkpoints" / "state" / "trainer.pt"
    proc = subprocess.Popen(_cmd("train", str(recipe), "-o", str(killed)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _epochs_done(killed) == 0, "the run must be killed inside epoch 1"
    st = torch.load(state, weights_only=True)
    assert st["epoch"] == 0 and st["batch_in_epoch"] > 0
    subprocess.run(_cmd("train", str(killed), "--resume"), env=env, check=True, capture_output=True)
    subprocess.run(_cmd("train", str(recipe), "-o", str(full)), env=env, check=True, capture_output=True)
    a = load_file(str(full / "checkpoints" / "last.safetensors"))
    b = load_file(str(killed / "checkpoints" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert not list(killed.rglob(".*.tmp*")) and not list((killed / "checkpoints").glob(".state.*"))
