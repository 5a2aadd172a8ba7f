"""A quick start that talks: progress: never hides only the bar; the end of a run says what to do next."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from kdforge.cli import main
from tests.conftest import digits_recipe


def _recipe(tmp_path: Path, progress: str) -> Path:
    r = digits_recipe({"name": "supervised", "model": {"model": "mlp"}}, epochs=2)
    r["train"]["progress"] = progress
    p = tmp_path / f"{progress}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_never_hides_the_bar_not_the_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(_recipe(tmp_path, "never")), "-o", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert "kdforge t: method supervised" in out.err and re.search(r"^epoch 2/2 ", out.err, re.M)
    assert "━" not in out.err  # no rich bar
    # the end of the run: the result, wall time and report path, and the next commands
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("test top1 ") and lines[0].endswith(f"run folder: {tmp_path / 'a'}")
    assert re.fullmatch(rf"wall time \d+ s; report: {re.escape(str(tmp_path / 'a' / 'report.md'))}", lines[1])
    assert lines[2] == (f"next: kdforge eval {tmp_path / 'a'}   kdforge report {tmp_path} -o report   "
                        f"tensorboard --logdir {tmp_path}")
    assert main(["train", str(_recipe(tmp_path, "silent")), "-o", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err == ""


def test_recipes_suggests_a_command_that_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # outside a checkout
    for names, want in ((["demo"], "kdforge train recipes/demo/kd.yaml"),
                        (["continual/ir-fashion-quick"], "kdforge cil recipes/continual/ir-fashion-quick.yaml")):
        assert main(["recipes", *names]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert want in last, last
    assert last.startswith("1 recipe;")
    assert main(["recipes", "demo"]) == 0
    cmd = re.search(r"run one: (kdforge [^(]+) \(", capsys.readouterr().out).group(1)  # type: ignore[union-attr]
    assert main([*shlex.split(cmd)[1:], "--dry-run"]) == 0, capsys.readouterr().err


def test_eval_speaks_to_people_and_json_to_scripts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["train", str(_recipe(tmp_path, "silent")), "-o", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tmp_path / "r")]) == 0
    head, body = capsys.readouterr().out.strip().splitlines()
    assert head == f"{tmp_path / 'r'} (best checkpoint; model mlp, method supervised)"
    assert body == (f"test split of digits: top1 {res['top1']:.2f} %   top5 {res['top5']:.2f} %   "
                    f"loss {res['loss']:.4f}")


def test_banner_says_when_max_steps_cuts_an_epoch_and_etas_are_labelled(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    p = _recipe(tmp_path, "never")
    assert main(["train", str(p), "-o", str(tmp_path / "a"), "--set", "train.max_steps=2",
                 "--set", "data.batch_size=16"]) == 0
    err = capsys.readouterr().err
    # digits: 1,437 training images less a 10 % validation split, 16 per batch -> 81 steps per epoch
    assert "  steps    2 in total (train.max_steps), 81 per epoch: 0.025 of one epoch" in err, err
    assert main(["train", str(_recipe(tmp_path, "never")), "-o", str(tmp_path / "b")]) == 0
    first = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("epoch 1/2"))
    assert re.search(r"ETA \d+ s \(run\)$", first), first
