"""``kdforge eval RUN`` rebuilds the deployable model of every registered method and reproduces results.json.

``results.json``'s ``test_last`` is the last checkpoint's test metrics and ``test_best`` the best
checkpoint's (by validation); ``kdforge eval --which last|best`` must give the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kdforge as kd
from kdforge.cli import main
from kdforge.engine.checkpoint import save_weights
from kdforge.engine.trainer import seed_everything
from kdforge.method import DataInfo, build_method
from tests.tiny_methods import registered, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _eval(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    code = main(["eval", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", registered())
def test_kdforge_eval_reproduces_results_json(name: str, clip_teacher: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    res = kd.train(tiny_recipe(name, clip_teacher), run)
    stored = json.loads((run / "results.json").read_text())
    assert stored["test_last"] == pytest.approx(res.to_json()["test_last"])
    got = _eval(capsys, str(run), "--which", "last")
    assert got["method"] == name and got["checkpoint"] == "last"
    metrics = {k: v for k, v in got.items() if k in stored["test_last"]}
    assert metrics.keys() == stored["test_last"].keys(), (name, sorted(got))
    assert metrics == pytest.approx(stored["test_last"], rel=1e-6, abs=1e-9), name
    if stored["test_best"] is not None:  # a validation split: the best checkpoint's numbers too
        best = _eval(capsys, str(run))
        assert best["checkpoint"] == "best"
        assert {k: best[k] for k in stored["test_best"]} == pytest.approx(stored["test_best"], rel=1e-6, abs=1e-9)


def test_eval_falls_back_to_last_and_names_an_unbuildable_checkpoint(tmp_path: Path, clip_teacher: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    kd.train(tiny_recipe("supervised", clip_teacher, val=False), run)
    assert not (run / "checkpoints" / "best.safetensors").exists()  # no validation split: only "last"
    assert _eval(capsys, str(run))["checkpoint"] == "last"
    recipe = tiny_recipe("supervised", clip_teacher)
    seed_everything(0)
    method = build_method(recipe.method.model_dump(), DataInfo(10, 1, 8))
    bare = tmp_path / "bare.safetensors"
    save_weights(method.deployable(), bare, {"method": "supervised"})
    assert main(["eval", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be rebuilt" in err and "'supervised'" in err
