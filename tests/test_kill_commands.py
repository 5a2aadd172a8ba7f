"""kill -9 at random moments of cil, cache build, prune, audio and an RL run, then resume (or rerun): every tensor ends
equal to an unkilled run's (slow; `pytest -m slow tests/test_kill_commands.py -s` prints the counts)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

RECIPES = Path(__file__).resolve().parents[1] / "src" / "kdforge" / "recipes"
KILLS = int(os.environ.get("KDFORGE_KILLS", "4"))


def _kd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdforge", *args]


def _tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        name = f"{f.parent.name}/{f.name}"
        if f.suffix == ".npz":
            with np.load(f) as z:
                out.update({f"{name}/{k}": torch.from_numpy(z[k]) for k in z.files})
        else:
            out.update({f"{name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def _setup(kind: str, tmp: Path) -> tuple[list[str], callable, callable, callable]:
    """(the command for folder OUT, its resume command, the files to compare, the folder) of one command."""
    if kind == "cil":
        r = tmp / "cil.yaml"
        r.write_text(yaml.safe_dump({"cil": {"learner": "finetune", "tasks": 2}, "data": {"name": "digits"},
                                     "train": {"epochs": 2, "progress": "silent", "threads": 1,
                                               "save_every_steps": 5}}))
        return (lambda d: _kd("cil", str(r), "-r", str(d)), lambda d: _kd("cil", str(r), "-r", str(d)),
                lambda d: sorted(d.glob("stages/*/learner.safetensors")))  # type: ignore[return-value]
    if kind == "cache":
        r = tmp / "cache.yaml"
        data = yaml.safe_load((RECIPES / "cache" / "demo-kd.yaml").read_text())
        data["train"] = {**data.get("train", {}), "progress": "silent", "threads": 1}
        data["method"]["teacher"]["checkpoint"] = str(RECIPES / "demo" / "teacher.safetensors")

        def build(d: Path) -> list[str]:
            return _kd("cache", "build", str(r), "--set", f"method.cache.dir={d.parent}",
                       "--set", f"method.cache.name={d.name}", "--set", "method.cache.chunk=64",
                       "--set", "data.limit_train=1024")
        r.write_text(yaml.safe_dump(data))
        return build, build, lambda d: sorted((d / "chunks").glob("*.safetensors"))  # type: ignore[return-value]
    if kind == "audio":
        r = tmp / "audio.yaml"
        stage = {"epochs": 2}
        r.write_text(yaml.safe_dump({
            "name": "a", "data": {"kind": "synthetic", "most": 12, "least": 3, "val_per_class": 2, "test_most": 6,
                                  "test_least": 2, "pretrain_per_class": 4, "batch_size": 8, "eval_batch_size": 16,
                                  "frontend": {"sample_rate": 16000, "win_ms": 20, "hop_ms": 10, "n_fft": 512,
                                               "n_mels": 64}},
            "train": {"device": "cpu", "progress": "silent", "threads": 1, "save_every_steps": 3},
            "stages": [{"name": "pre", "data": "pretrain", "freeze_bn": False, "lr": 0.05, **stage},
                       {"name": "m1", "init": "stage:pre", "lr": 0.01, **stage},
                       {"name": "m2", "init": "stage:m1", "loss": "ls", "epsilon": 0.06, **stage}],
            "fusion": {"step": 0.25, "published": [0.5, 0.5]}}))
        run = lambda d: _kd("audio", str(r), "-r", str(d))  # a rerun resumes
        return run, run, lambda d: sorted(d.glob("stages/*/model.safetensors")) + sorted(d.glob("stages/*/scores.npz"))
    if kind == "rl":
        r = tmp / "rl.yaml"
        data = yaml.safe_load((RECIPES / "rl" / "cartpole-ppo-opd-da.yaml").read_text())
        data["method"].update(num_steps=32, steps_per_epoch=5, eval_episodes=2)
        data["train"] = {"max_steps": 20, "device": "cpu", "threads": 1, "progress": "silent",
                         "save_every_steps": 2}
        r.write_text(yaml.safe_dump(data))
        return (lambda d: _kd("train", str(r), "-o", str(d)), lambda d: _kd("train", str(d), "--resume"),
                lambda d: [d / "checkpoints" / "last.safetensors"])  # type: ignore[return-value]
    r = tmp / "prune.yaml"
    r.write_text(yaml.safe_dump({
        "name": "p", "model": {"model": "resnet8"}, "data": {"name": "digits", "batch_size": 64, "limit_train": 256},
        "calibration": {"n_samples": 128, "batch_size": 64, "score_batch_size": 32, "score_batches": 1},
        "analysis": {"k_max": 2}, "heal": {"mode": "kd"},
        "train": {"epochs": 2, "progress": "silent", "threads": 1, "save_every_steps": 2},
        "eval": {"latency_batch_sizes": [1], "latency_repeats": 1}}))
    # --resume reuses the stored analysis (analysis.json) and resumes the heal from its last checkpoint
    return (lambda d: _kd("prune", str(r), "-o", str(d)), lambda d: _kd("prune", str(r), "-o", str(d), "--resume"),
            lambda d: [d / "pruned" / "model.safetensors"])  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cil", "cache", "rl", "prune", "audio"])
def test_kill_loop_command_resumes_to_the_unkilled_tensors(tmp_path: Path, kind: str) -> None:
    start, resume, files = _setup(kind, tmp_path)
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(start(tmp_path / "full"), env=env, check=True, capture_output=True)
    took = time.perf_counter() - t0
    want = _tensors(files(tmp_path / "full"))
    assert want
    rng = random.Random(0)
    restarted = 0
    for i in range(KILLS):
        d = tmp_path / f"k{i}"
        proc = subprocess.Popen(start(d), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, took))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = subprocess.run(resume(d), env=env, capture_output=True, text=True)
        if done.returncode == 2 and ("start it again" in done.stderr or "does not exist" in done.stderr):
            done = subprocess.run(start(d), env=env, capture_output=True, text=True)  # killed before it began
            restarted += 1
        assert done.returncode == 0, f"{kind} run {i}: {done.stderr.strip()[-500:]}"
        got = _tensors(files(d))
        assert got.keys() == want.keys() and all(torch.equal(want[k], got[k]) for k in want), \
            f"{kind} run {i} did not end with the unkilled run's tensors"
    print(f"kill loop {kind}: {KILLS} kills at random moments within {took:.0f} s ({KILLS - restarted} resumed, "
          f"{restarted} before the folder held a run), all ended equal ({len(want)} tensors compared)")


@pytest.mark.slow
def test_audio_stage_killed_after_its_fit_before_it_was_recorded_resumes_equal(tmp_path: Path) -> None:
    """The narrowest audio window: a stage's fit finished (results.json) but stages.json does not list it yet."""
    import json
    import shutil

    start, _, files = _setup("audio", tmp_path)
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(start(full), env=env, check=True, capture_output=True)
    shutil.copytree(full, cut)
    index = json.loads((cut / "stages.json").read_text())
    for name in ("m1", "m2"):  # the state a kill leaves between m1's Trainer.fit() and StagedRun.finish("m1")
        del index["finished"][name]
    index["order"] = index["order"][:2]
    (cut / "stages.json").write_text(json.dumps(index))
    shutil.rmtree(cut / "stages" / "02-m2")
    for f in ("model.safetensors", "scores.npz"):
        (cut / "stages" / "01-m1" / f).unlink()
    (cut / "result.json").unlink()
    assert (cut / "stages" / "01-m1" / "results.json").is_file()
    subprocess.run(start(cut), env=env, check=True, capture_output=True)
    want, got = _tensors(files(full)), _tensors(files(cut))
    assert got.keys() == want.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert json.loads((cut / "result.json").read_text())["fusion"] == json.loads((full / "result.json").read_text())[
        "fusion"]
