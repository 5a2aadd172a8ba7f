"""A run killed in the middle and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

RECIPE = {
    "name": "resume", "seed": 3,
    "data": {"name": "digits", "batch_size": 32, "val_fraction": 0.1},
    "method": {"name": "supervised", "model": {"model": "cnn_small", "kwargs": {"width": 24}}},
    "optim": {"lr": 0.05}, "sched": {"name": "cosine", "warmup_epochs": 1},
    "train": {"epochs": 10, "progress": "silent", "threads": 1},
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


def test_ctrl_c_says_where_and_how_to_resume(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"], "epochs": 30}}))
    run = tmp_path / "run"
    # a background job inherits SIGINT ignored; a user's terminal delivers it
    proc = subprocess.Popen(_cmd("train", str(recipe), "-o", str(run)), env={**os.environ, "PYTHONHASHSEED": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    state = run / "checkpoints" / "state" / "trainer.pt"
    while (_epochs_done(run) < 1 or not state.is_file()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted at epoch ")
    assert f"resume with: kdforge train {run} --resume" in lines[0]
    assert (run / "checkpoints" / "state" / "trainer.pt").is_file()
    # it says where a resume starts again: the step of the state on disk, and how many steps are redone
    import re

    import torch

    saved = torch.load(state, weights_only=True)["global_step"]
    m = re.search(r"step (\d+); the last checkpoint is at step (\d+)(?:, so (\d+) steps? (?:are|is) redone)?", lines[0])
    assert m and int(m.group(2)) == saved, lines[0]
    assert int(m.group(1)) - saved == int(m.group(3) or 0)


@pytest.mark.slow
def test_kill_loop_every_folder_resumes_or_restarts_cleanly(tmp_path: Path) -> None:
    """kill -9 at random moments of 30 short runs: each resumes to the uninterrupted end, no temp file left."""
    import random

    r = {**RECIPE, "data": {**RECIPE["data"], "limit_train": 384},
         "train": {**RECIPE["train"], "epochs": 3, "save_every_steps": 4}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(r))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(_cmd("train", str(recipe), "-o", str(tmp_path / "full")), env=env, check=True,
                   capture_output=True)
    want = load_file(str(tmp_path / "full" / "checkpoints" / "last.safetensors"))
    rng = random.Random(0)
    restarts = 0
    for i in range(30):
        run = tmp_path / f"k{i}"
        proc = subprocess.Popen(_cmd("train", str(recipe), "-o", str(run)), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = subprocess.run(_cmd("train", str(run), "--resume"), env=env, capture_output=True, text=True)
        if done.returncode == 2 and "start it again" in done.stderr:  # killed before it wrote its recipe
            restarts += 1
            done = subprocess.run(_cmd("train", str(recipe), "-o", str(run)), env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"run {i}: {done.stderr.strip()[-500:]}"
        got = load_file(str(run / "checkpoints" / "last.safetensors"))
        assert all(torch.equal(want[k], got[k]) for k in want), f"run {i} did not end bit-identical"
        leftovers = [p for p in run.rglob(".*") if p.name not in (".kdforge-run", ".lock")]
        assert not leftovers, f"run {i} left {leftovers}"
    print(f"kill loop: 30 runs, {restarts} restarted (killed before their recipe was written), the rest resumed")
