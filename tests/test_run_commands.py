"""Every command that writes a folder goes through the run-folder layer: issue 23's destructive cases as tests."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import yaml

from kdforge.cli import main
from kdforge.engine.run_dir import LOCK, MARKER, release_all, run_kind
from tests.conftest import digits_recipe

AUDIO = Path(__file__).resolve().parents[1] / "src" / "kdforge" / "recipes" / "audio" / "synthetic_quick.yaml"


@pytest.fixture(autouse=True)
def _unlock() -> None:
    yield
    release_all()


def _err(capsys: pytest.CaptureFixture[str], code: int, *needles: str, exit_code: int = 2) -> str:
    err = capsys.readouterr().err.strip()
    assert code == exit_code, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in err, err
    return err


def _train_run(tmp_path: Path) -> Path:
    r = digits_recipe({"name": "supervised", "model": {"model": "mlp", "kwargs": {"hidden": [8]}}}, epochs=1)
    r["data"]["limit_train"] = 64
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(r))
    run = tmp_path / "trained"
    assert main(["train", str(p), "-o", str(run)]) == 0
    return run


def _prune_recipe(tmp_path: Path, **extra: object) -> Path:
    r = {"name": "p", "model": {"model": "resnet8"},
         "data": {"name": "digits", "batch_size": 64, "limit_train": 128},
         "calibration": {"n_samples": 64, "batch_size": 64, "score_batch_size": 32, "score_batches": 1},
         "analysis": {"k_max": 2}, "heal": {"mode": "none"}, "save": False,
         "eval": {"latency_batch_sizes": [1], "latency_repeats": 1}, "train": {"progress": "never"}}
    r.update(extra)
    p = tmp_path / "prune.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != LOCK}


# -- prune ------------------------------------------------------------------------------------------------
def test_prune_overwrite_never_touches_a_users_folder_or_a_running_or_finished_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _prune_recipe(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my notes")
    _err(capsys, main(["prune", str(recipe), "-o", str(mine), "--overwrite"]), "not made by kdforge")
    assert (mine / "config.yaml").read_text() == "my notes" and not (mine / MARKER).exists()

    run = _train_run(tmp_path)
    before = _snapshot(run)
    capsys.readouterr()
    _err(capsys, main(["prune", str(recipe), "-o", str(run)]), "already exists", "'kdforge train' run", "--overwrite")
    assert _snapshot(run) == before
    fd = os.open(run / LOCK, os.O_RDWR)  # a train run writing it right now
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        _err(capsys, main(["prune", str(recipe), "-o", str(run), "--overwrite"]), "in use by another kdforge run")
    finally:
        os.close(fd)
    assert _snapshot(run) == before
    assert main(["prune", str(recipe), "-o", str(run), "--overwrite"]) == 0
    # replaced as a whole (the train run's files do not survive next to the prune run's)
    assert run_kind(run) == "prune" and not (run / "metrics.csv").exists() and (run / "results.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_failed_prune_leaves_nothing_that_blocks_the_retry(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    out = tmp_path / "p"
    bad = _prune_recipe(tmp_path, model={"model": "resnet8", "checkpoint": str(tmp_path / "missing.safetensors")})
    code = main(["prune", str(bad), "-o", str(out)])
    capsys.readouterr()
    assert code == 2 and not out.exists()
    assert main(["prune", str(_prune_recipe(tmp_path)), "-o", str(out)]) == 0


# -- cil / audio ----------------------------------------------------------------------------------------
def _cil_recipe(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"cil": {"learner": "finetune", "tasks": 1}, "data": {"name": "digits"},
                                 "train": {"epochs": 1, "progress": "never"}}))
    return p


def test_cil_and_audio_never_replace_a_users_config_or_a_train_run(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my config")
    _err(capsys, main(["cil", str(_cil_recipe(tmp_path)), "-r", str(mine)]), "not made by kdforge")
    _err(capsys, main(["cil", str(_cil_recipe(tmp_path)), "-r", str(mine), "--overwrite"]), "not made by kdforge")
    _err(capsys, main(["audio", str(AUDIO), "-r", str(mine)]), "not made by kdforge")
    assert (mine / "config.yaml").read_text() == "my config"
    run = _train_run(tmp_path)
    before = _snapshot(run)
    capsys.readouterr()
    _err(capsys, main(["audio", str(AUDIO), "-r", str(run)]), "'kdforge train' run", "--overwrite")
    _err(capsys, main(["cil", str(_cil_recipe(tmp_path)), "-r", str(run)]), "'kdforge train' run", "--overwrite")
    assert _snapshot(run) == before
    assert main(["train", str(run), "--resume"]) == 0  # the finished train run still resumes


@pytest.mark.parametrize("command", ["cil", "audio", "prune", "cache"])
def test_ctrl_c_prints_one_resume_line(tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    def stop(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "out"
    if command == "cil":
        monkeypatch.setattr("kdforge.continual.driver._run", stop)
        argv = ["cil", str(_cil_recipe(tmp_path)), "-r", str(out)]
    elif command == "audio":
        monkeypatch.setattr("kdforge.audio.recipe._run", stop)
        argv = ["audio", str(AUDIO), "-r", str(out)]
    elif command == "prune":
        monkeypatch.setattr("kdforge.prune.sglp._run_cnn", stop)
        argv = ["prune", str(_prune_recipe(tmp_path)), "-o", str(out)]
    else:
        import sys

        monkeypatch.setattr(sys.modules["kdforge.cache.build"], "teacher_outputs", stop)
        argv = ["cache", "build", str(_cache_recipe(tmp_path))]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # after the command's banner, if it has one
    assert last.startswith("interrupted") and f"; resume with: kdforge {command}" in last, err
    if command == "prune":  # stopped before anything durable: the folder is gone, the suggestion is the plain rerun
        assert not out.exists() and last.endswith(f"-o {out}")


def test_prune_interrupted_in_its_heal_resumes_to_the_uninterrupted_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    from kdforge.engine.callbacks import Callback

    recipe = _prune_recipe(tmp_path, heal={"mode": "kd"}, save=True,
                           train={"epochs": 2, "progress": "silent", "save_every_steps": 2})
    assert main(["prune", str(recipe), "-o", str(tmp_path / "full")]) == 0  # 2 steps an epoch, 4 in all

    class CtrlC(Callback):
        def on_step_end(self, trainer: object, out: object) -> None:
            if trainer.global_step == 3:  # type: ignore[attr-defined]  # after the checkpoint at step 2
                raise KeyboardInterrupt

    import kdforge.run

    real = kdforge.run.with_report
    monkeypatch.setattr(kdforge.run, "with_report", lambda cbs=(): real([*cbs, CtrlC()]))
    out = tmp_path / "cut"
    capsys.readouterr()
    assert main(["prune", str(recipe), "-o", str(out)]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("interrupted at epoch 2, step 3") and last.endswith(f"-o {out} --resume"), last
    monkeypatch.setattr(kdforge.run, "with_report", real)
    assert not (out / "results.json").exists() and (out / "analysis.json").is_file()
    cmd = last.split("resume with: kdforge ", 1)[1].split()
    assert main(cmd) == 0  # the line's own command
    want, got = (load_file(str(d / "pruned" / "model.safetensors")) for d in (tmp_path / "full", out))
    assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)
    capsys.readouterr()
    _err(capsys, main(["prune", str(recipe), "-o", str(out), "--resume", "--set", "train.epochs=3"]),
         "another recipe", "train.epochs")
    _err(capsys, main(["prune", str(recipe), "-o", str(out)]), "already exists", "--resume")


def _cache_recipe(tmp_path: Path, **cache: object) -> Path:
    from kdforge.config import ModelSpec
    from kdforge.engine.checkpoint import save_weights
    from kdforge.method import DataInfo, build_model

    teacher = tmp_path / "teacher.safetensors"
    if not teacher.is_file():
        save_weights(build_model(ModelSpec(model="mlp", kwargs={"hidden": [8]}), DataInfo(10, 1, 8)), teacher)
    r = digits_recipe({"name": "distill", "teacher": {"model": "mlp", "kwargs": {"hidden": [8]},
                                                      "checkpoint": str(teacher)},
                       "student": {"model": "mlp", "kwargs": {"hidden": [4]}},
                       "terms": [{"loss": "ce", "weight": 1.0}, {"loss": "kd", "weight": 1.0, "T": 4}],
                       "cache": {"name": "c", "dir": str(tmp_path / "caches"), "chunk": 64, **cache}}, epochs=1)
    r["data"].update(limit_train=128, val_fraction=0.0, augment=True, views=2)
    p = tmp_path / "cache.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


# -- caches -----------------------------------------------------------------------------------------------
def test_changed_chunk_size_rebuilds_instead_of_up_to_date(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    from kdforge.cache.store import read_meta

    r = _cache_recipe(tmp_path)
    assert main(["cache", "build", str(r)]) == 0
    assert "2 of 2 chunks built" in capsys.readouterr().out
    assert main(["cache", "build", str(r), "--set", "method.cache.chunk=48"]) == 0
    assert "3 of 3 chunks built" in capsys.readouterr().out  # before: "up to date", then training failed
    meta = read_meta(tmp_path / "caches" / "c")
    assert meta["n_chunks"] == 3 and sorted(p.name for p in (tmp_path / "caches" / "c" / "chunks").iterdir()) == [
        f"{i:06d}.{x}" for i in range(3) for x in ("safetensors", "sha256")]
    assert main(["train", str(r), "--set", "method.cache.chunk=48", "-o", str(tmp_path / "run")]) == 0
    teacher = meta["identity"]["teacher"]
    assert teacher["precision"] == "fp32" and teacher["code"].startswith("kdforge.models")


def test_cache_lock_clear_list_and_damaged_meta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _cache_recipe(tmp_path)
    assert main(["cache", "build", str(r)]) == 0
    c, d = tmp_path / "caches" / "c", str(tmp_path / "caches")
    fd = os.open(c / LOCK, os.O_RDWR)  # a build of this cache is running
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        capsys.readouterr()
        _err(capsys, main(["cache", "build", str(r), "--overwrite", "--set", "method.cache.dtype=fp16"]),
             "in use by another kdforge run")
        _err(capsys, main(["cache", "clear", "c", "--dir", d]), "in use by another kdforge run")
    finally:
        os.close(fd)
    assert c.is_dir()
    meta = c / "meta.json"
    good = meta.read_text()
    for damage in ("{not json", good.replace('"identity"', '"identitx"'), good.replace('"n_chunks"', '"n_chunkz"')):
        meta.write_text(damage)
        (tmp_path / "caches" / "other").mkdir(exist_ok=True)
        capsys.readouterr()
        err = _err(capsys, main(["train", str(r), "-o", str(tmp_path / "t")]), "damaged meta.json",
                   f"kdforge cache clear c --dir {d}")
        assert "Traceback" not in err
        assert main(["cache", "list", "--dir", d]) == 0
        assert "damaged" in capsys.readouterr().out
    assert main(["cache", "clear", "c", "--dir", d]) == 0  # the advice works on the damaged cache
    assert not c.exists() and (tmp_path / "caches" / "other").is_dir()


def test_cache_dir_that_is_a_file_and_full_disk_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    f = tmp_path / "file"
    f.write_text("x")
    _err(capsys, main(["cache", "build", str(_cache_recipe(tmp_path, dir=str(f)))]), "is a file")
    assert f.read_text() == "x"
    r = _cache_recipe(tmp_path)
    calls = []

    def full(*a: object, **k: object) -> None:
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(*a, **k)

    from safetensors.torch import save_file

    monkeypatch.setattr("safetensors.torch.save_file", full)
    _err(capsys, main(["cache", "build", str(r)]), "disk full while writing chunk 000001",
         "resume: kdforge cache build")
    monkeypatch.undo()
    assert main(["cache", "build", str(r)]) == 0
    assert "1 of 2 chunks built" in capsys.readouterr().out  # resumed: only the missing chunk


# -- readers and bounds -----------------------------------------------------------------------------------
def test_readers_say_what_a_folder_of_another_kind_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p"
    assert main(["prune", str(_prune_recipe(tmp_path)), "-o", str(out)]) == 0
    capsys.readouterr()
    _err(capsys, main(["eval", str(out)]), "'kdforge prune' run", f"kdforge eval {out}/pruned/model.safetensors")
    _err(capsys, main(["sample", str(out)]), "'kdforge prune' run")
    _err(capsys, main(["train", str(out), "--resume"]), "cannot resume with 'kdforge train'", "'kdforge prune' run")


def test_numeric_bounds_where_declared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdforge.audio.recipe import AudioRecipe
    from kdforge.errors import KdforgeError
    from kdforge.rl.group import DistillConfig as GroupDistillConfig

    for bad in ({"attn_dim": -3}, {"tau": 0}, {"tau": float("nan")}, {"lambda_dec": -1}, {"ramp_up": 2}):
        with pytest.raises(ValueError):
            GroupDistillConfig(**bad)
    with pytest.raises(KdforgeError, match=r"fusion\.published"):
        AudioRecipe.from_yaml(AUDIO, ["fusion.published=[]"])
    with pytest.raises(KdforgeError, match=r"fusion\.published"):
        AudioRecipe.from_yaml(AUDIO, ["fusion.published=[0.5, -1]"])
    code = main(["sample", str(tmp_path), "--seed", str(2**70)])
    assert code == 2 and "--seed" in capsys.readouterr().err
    code = main(["audio-predict", str(tmp_path), str(tmp_path / "x.wav"), "--top", "0"])
    assert code == 2 and "--top" in capsys.readouterr().err


def test_nan_audio_clip_is_refused(tmp_path: Path) -> None:
    import numpy as np
    import soundfile as sf

    from kdforge.audio.recipe import predict_file
    from kdforge.config import ModelSpec
    from kdforge.errors import KdforgeError

    wav = tmp_path / "nan.wav"
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    sf.write(wav, x, 16000, subtype="FLOAT")
    with pytest.raises(KdforgeError, match="NaN"):
        predict_file(wav, tmp_path / "none.safetensors", ModelSpec(model="audio_slowfast_lite"), 3,
                     None, ["a", "b", "c"], 5, 3)  # type: ignore[arg-type]


def test_identical_runs_write_identical_checkpoint_bytes(tmp_path: Path) -> None:
    import hashlib

    r = digits_recipe({"name": "supervised", "model": {"model": "mlp", "kwargs": {"hidden": [8]}}}, epochs=1)
    r["data"]["limit_train"] = 64
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(r))
    sums = []
    for name in ("a", "b"):
        assert main(["train", str(p), "-o", str(tmp_path / name)]) == 0
        sums.append(hashlib.sha256((tmp_path / name / "checkpoints" / "last.safetensors").read_bytes()).hexdigest())
    assert sums[0] == sums[1]  # before: the metadata map came out in another order each save


# -- sample -o ----------------------------------------------------------------------------------------------
def test_sample_onto_an_existing_grid_or_file_is_refused_and_overwrite_replaces_only_that_grid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    import torch

    from kdforge.diffusion import ddim_sample
    from kdforge.evaluate import load_deployable

    unet = {"model": "diffusion_unet", "kwargs": {"ch": 8, "mult": [1, 2], "grid": 16}}
    r = {"name": "d", "seed": 0, "data": {"name": "digits_pm1", "batch_size": 32, "limit_train": 64,
                                         "val_fraction": 0.0, "augment": False},
         "method": {"name": "diffusion", "model": unet, "rounds": [{"kind": "pd", "epochs": 1}]},
         "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
         "train": {"epochs": 1, "progress": "silent", "device": "cpu"}}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(r))
    run, out = tmp_path / "run", tmp_path / "grids"
    assert main(["train", str(tmp_path / "d.yaml"), "-o", str(run)]) == 0  # a real (tiny) distilled denoiser
    assert main(["sample", str(run), "-n", "4", "--seed", "1", "-o", str(out)]) == 0
    assert main(["sample", str(run), "-n", "4", "--seed", "2", "-o", str(out)]) == 0
    png, npz = (out / f"samples-8steps-seed1-n4.{x}" for x in ("png", "npz"))
    other = _snapshot(out)
    capsys.readouterr()
    for extra in ([], ["--steps", "8"]):  # the same grid name again, however it is spelled
        _err(capsys, main(["sample", str(run), "-n", "4", "--seed", "1", "-o", str(out), *extra]), "already exists",
             str(png), "--overwrite")
    assert _snapshot(out) == other  # nothing written
    # an earlier grid of another model under the same name: --overwrite replaces it, and only it
    np.savez_compressed(npz, x=np.zeros((4, 1, 8, 8), np.float32))
    png.write_bytes(b"an older grid")
    assert main(["sample", str(run), "-n", "4", "--seed", "1", "-o", str(out), "--overwrite"]) == 0
    model, _ = load_deployable(run)
    want = ddim_sample(model, 4, (1, 8, 8), None, 1)
    got = np.load(npz)
    assert torch.equal(torch.from_numpy(got["x"]), want) and int(got["steps"]) == 8
    assert png.read_bytes().startswith(b"\x89PNG") and png.read_bytes() == other[png.name]
    assert {k: v for k, v in _snapshot(out).items() if "seed2" in k} == {k: v for k, v in other.items() if "seed2" in k}
    assert run_kind(out) == "sample" and not [p for p in out.iterdir() if p.name.startswith(".samples")]
    # -o naming a file (a user's): refused with and without --overwrite, the file untouched
    mine = tmp_path / "notes.png"
    mine.write_bytes(b"mine")
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        _err(capsys, main(["sample", str(run), "-n", "4", "-o", str(mine), *extra]), "is a file, not a folder")
    assert mine.read_bytes() == b"mine"


# -- llm-distill -o -----------------------------------------------------------------------------------------
def test_llm_distill_folder_is_a_run_folder_that_resumes_after_ctrl_c(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from safetensors.torch import load_file

    import kdforge.run
    from kdforge.engine.callbacks import Callback

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}: {i}+{i}=", "response": f"{2 * i}."}) for i in range(20)))
    args = ["llm-distill", "tiny:4", str(data), "--drop-layers", "1,3", "--steps", "4", "--seq-len", "64",
            "--batch-size", "2"]
    full = tmp_path / "full"
    assert main([*args, "-o", str(full)]) == 0
    assert run_kind(full) == "llm-distill" and (full / "run" / "report.md").is_file()  # the command adds the report
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("my notes")
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        _err(capsys, main([*args, "-o", str(mine), *extra]), "not made by kdforge")
    assert [p.name for p in mine.iterdir()] == ["summary.json"] and (mine / "summary.json").read_text() == "my notes"
    _err(capsys, main([*args, "-o", str(full)]), "already exists", "--resume", "--overwrite")

    class CtrlC(Callback):
        def on_step_end(self, trainer: object, out: object) -> None:
            if trainer.global_step == 3:  # type: ignore[attr-defined]
                raise KeyboardInterrupt

    real = kdforge.run.with_report
    monkeypatch.setattr(kdforge.run, "with_report", lambda cbs=(): real([*cbs, CtrlC()]))
    cut = tmp_path / "cut"
    assert main([*args, "-o", str(cut)]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("interrupted") and last.endswith("--resume") and "kdforge llm-distill" in last, last
    monkeypatch.setattr(kdforge.run, "with_report", real)
    import shlex

    assert main(shlex.split(last.split("resume with: ", 1)[1])[1:]) == 0  # the line's own command
    want, got = (load_file(str(d / "student" / "model.safetensors")) for d in (full, cut))
    assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)
