"""The kdforge command: bad input is one line on stderr with exit code 2; eval and list work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdforge.cli import main
from tests.conftest import digits_recipe


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err
    return err


def test_unknown_recipe_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _write(tmp_path / "r.yaml", {"train": {"epoch": 1}})
    _one_line_error(capsys, main(["train", str(r), "-o", str(tmp_path / "run")]), "'train.epoch'", "epochs")
    assert not (tmp_path / "run").exists()


def test_missing_recipe_and_bad_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(capsys, main(["train", str(tmp_path / "none.yaml")]), "recipe file not found")
    r = _write(tmp_path / "r.yaml", {})
    _one_line_error(capsys, main(["train", str(r), "--set", "optim.lr"]), "key=value")


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(capsys, main(["train"]), "Missing argument")
    _one_line_error(capsys, main(["frobnicate"]), "No such command")
    _one_line_error(capsys, main(["list", "modles"]), "did you mean 'models'")


def test_existing_run_folder_is_not_touched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    r = _write(tmp_path / "r.yaml", digits_recipe({"name": "supervised", "model": {"model": "mlp"}}, epochs=1))
    _one_line_error(capsys, main(["train", str(r), "-o", str(run)]), "already exists", "--overwrite")
    assert (run / "keep.txt").read_text() == "precious" and len(list(run.iterdir())) == 1
    _one_line_error(capsys, main(["train", str(r), "-o", str(run), "--resume"]), "cannot resume")
    assert (run / "keep.txt").read_text() == "precious"


def test_train_eval_list_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _write(tmp_path / "r.yaml", digits_recipe({"name": "supervised", "model": {"model": "mlp"}}, epochs=2))
    assert main(["train", str(r), "-o", str(tmp_path / "run"), "--set", "optim.lr=0.2"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 0.2
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "mlp" and res["data"] == "digits" and res["top1"] > 70
    assert main(["eval", str(tmp_path / "run" / "checkpoints" / "last.safetensors"), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "val"
    code = main(["eval", str(tmp_path / "run"), "--data", "fashion_mnist_subset"])
    _one_line_error(capsys, code, "trained on 8x8 inputs", "gives 28x28")
    assert main(["list", "losses"]) == 0
    assert "kd" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "run")]) == 0
    _one_line_error(capsys, main(["eval", str(tmp_path / "nothing")]), "no run folder or checkpoint")


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _write(tmp_path / "r.yaml", digits_recipe({"name": "supervised", "model": {"model": "mlp"}}))
    assert main(["train", str(r), "--dry-run", "-o", str(tmp_path / "run")]) == 0
    assert "is valid" in capsys.readouterr().out and not (tmp_path / "run").exists()


def test_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    _one_line_error(capsys, main(["eval", str(bad)]), "cannot read checkpoint")


def test_prune_and_bench_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(capsys, main(["prune", str(tmp_path / "none.yaml")]), str(tmp_path / "none.yaml"))
    _one_line_error(capsys, main(["bench", "kd-zooo"]), "did you mean 'kd-zoo'")
