"""``heal.teacher: cache``: compress heals from the engine's teacher cache, built once, as the live teacher would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdforge.cli import main
from kdforge.compress.heal import build_heal_cache, heal
from kdforge.compress.recipe import CompressRecipe
from kdforge.data import load_data
from kdforge.distill import Distill
from kdforge.engine.checkpoint import save_weights
from kdforge.errors import KdforgeError
from kdforge.models import create_model

SPEC = {"builder": "model", "model": "cnn_small", "kwargs": {"width": 4}}


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    """A randomly initialised cnn_small (width 4): the original the candidates heal from."""
    torch.manual_seed(0)
    p = tmp_path / "orig.safetensors"
    save_weights(create_model("cnn_small", 10, 1, width=4), p)
    return p


def _recipe(weights: Path, teacher: str, **keys: Any) -> dict[str, Any]:
    """Healing on 200 un-augmented Fashion-MNIST images, batches of 50, one epoch on one thread."""
    return {"name": "hc", "model": {"model": "cnn_small", "kwargs": {"width": 4}, "checkpoint": str(weights)},
            "data": {"name": "fashion_mnist_subset", "batch_size": 50, "val_fraction": 0.1, "limit_train": 200,
                     "augment": False},
            "heal": {"teacher": teacher}, "optim": {"name": "sgd", "lr": 0.05},
            "train": {"epochs": 1, "progress": "never", "save_checkpoints": False, "threads": 1}, **keys}


def _counted(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Images through ``model``'s forward: all of them, and those inside the engine's distill training steps
    (the hook travels with ``model``'s deep copies)."""
    seen: list[int] = []
    in_steps: list[int] = []
    inside = [False]
    step = Distill.training_step

    def counted_step(self: Distill, batch: Any, i: int) -> dict[str, torch.Tensor]:
        inside[0] = True
        try:
            return step(self, batch, i)
        finally:
            inside[0] = False

    def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        (in_steps if inside[0] else seen).append(args[0].shape[0])

    monkeypatch.setattr(Distill, "training_step", counted_step)
    model.register_forward_pre_hook(hook)
    return seen, in_steps


def test_healing_from_the_cache_equals_healing_from_the_live_teacher(weights: Path, tmp_path: Path,
                                                                     one_thread: None) -> None:
    live_r = CompressRecipe.from_dict(_recipe(weights, "live"))
    cache_r = CompressRecipe.from_dict(_recipe(weights, "cache"))
    data = load_data(live_r.data)
    teacher = create_model("cnn_small", 10, 1, weights, width=4).eval()
    torch.manual_seed(1)
    student = create_model("cnn_small", 10, 1, width=2)  # a narrower stand-in for a pruned candidate
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = build_heal_cache(teacher, SPEC, data, cache_r, tmp_path / "out")
    assert cfg is not None and build_heal_cache(teacher, SPEC, data, live_r, tmp_path / "x") is None
    live, live_info = heal(student, teacher, data, live_r)
    cached, cache_info = heal(student, teacher, data, cache_r, cache=cfg, teacher_spec=SPEC)
    assert (live_info["teacher"], cache_info["teacher"]) == ("live", "cache")
    assert live_info["steps"] == cache_info["steps"] == 4
    a, b = live.state_dict(), cached.state_dict()
    assert not all(torch.equal(before[k], a[k]) for k in a)  # healing moved the weights
    # fp32 logits of the same images in the same order (bitwise equal on our CPU); the tolerance only allows for
    # a kernel whose rounding depends on the batch grouping (the cache's 256-image batches vs 50-image steps)
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6) for k in a)
    with pytest.raises(KdforgeError, match="pass cache="):
        heal(student, teacher, data, cache_r)  # a cache recipe never silently falls back to the live teacher


def test_the_cache_is_built_once_and_the_heals_never_run_the_teacher_on_training_batches(
        weights: Path, tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    r = CompressRecipe.from_dict(_recipe(weights, "cache"))
    data = load_data(r.data)
    n = len(data.train)
    teacher = create_model("cnn_small", 10, 1, weights, width=4).eval()
    seen, in_steps = _counted(teacher, monkeypatch)
    cfg = build_heal_cache(teacher, SPEC, data, r, tmp_path / "out")
    assert sum(seen) == n and not in_steps  # the build: every training image once
    meta = json.loads((tmp_path / "out" / "teacher-cache" / "meta.json").read_text())
    assert meta["complete"] and meta["n"] == n and meta["identity"]["storage"] == {"store": "full", "k": None,
                                                                                  "dtype": "fp32"}
    student = create_model("cnn_small", 10, 1, width=2)
    for seed in (0, 1):  # two heal seeds read the same cache
        heal(student, teacher, data, r, seed=seed, cache=cfg, teacher_spec=SPEC)
    assert not in_steps
    heal(student, teacher, data, CompressRecipe.from_dict(_recipe(weights, "live")))
    assert sum(in_steps) == n  # the live fit: the teacher on each training image once (1 epoch)


def test_a_compress_run_heals_from_its_cache(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    for m in ("torch_pruning", "onnxruntime", "onnxscript"):
        pytest.importorskip(m)
    r = _recipe(weights, "cache", budget={"metric": "params", "fraction": 0.6, "max_drop": 100.0},
                candidates={"families": ["width"]}, export={"formats": ["onnx"]},
                gate={"batch_sizes": [1], "iters": 1})
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    out = tmp_path / "out"
    code = main(["compress", str(p), "-o", str(out)])
    err = capsys.readouterr().err
    data = json.loads((out / "compress.json").read_text())
    assert all(c["heal"]["teacher"] == "cache" for c in data["candidates"]) and data["candidates"], err
    assert code in (0, 1), err
    assert json.loads((out / "teacher-cache" / "meta.json").read_text())["complete"]
    assert "teacher cache `teacher-cache/`" in (out / "report.md").read_text()


def test_cache_healing_with_live_augmentation_is_one_line_exit_2(weights: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    r = _recipe(weights, "cache")
    r["data"]["augment"] = True
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    code = main(["compress", str(p), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "heal.teacher: cache" in err[0] and "data.views" in err[0] and "data.augment: false" in err[0]
    assert not (tmp_path / "out").exists()
    r["data"]["views"] = 2  # recorded views: accepted
    CompressRecipe.from_dict(r)
    with pytest.raises(KdforgeError, match=r"heal\.teacher: cache is for vision models"):
        CompressRecipe.from_dict({"llm": {"source": "tiny"}, "heal": {"teacher": "cache"}})
