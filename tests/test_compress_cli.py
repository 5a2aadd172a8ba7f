"""``kdforge compress``: bad input is one line and exit 2; a gate failure is one line and exit 1, artifacts kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdforge.cli import main
from kdforge.engine.checkpoint import save_weights
from kdforge.models import create_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
DEMO = Path(__file__).resolve().parents[1] / "src/kdforge/recipes/demo/teacher.safetensors"


def _recipe(tmp_path: Path, **keys: object) -> Path:
    r = {"name": "t", "data": {"name": "digits", "batch_size": 64, "val_fraction": 0.1},
         "train": {"epochs": 1, "progress": "never", "save_checkpoints": False}, **keys}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["compress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture()
def resnet8_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    p = tmp_path / "resnet8.safetensors"
    save_weights(create_model("resnet8", 10, 1), p)
    return p


def test_unreachable_budget_names_the_smallest_reachable(tmp_path, capsys, resnet8_weights):
    r = _recipe(tmp_path, model={"model": "resnet8", "checkpoint": str(resnet8_weights)},
                budget={"metric": "params", "fraction": 0.01}, candidates={"families": ["uniform"]})
    code, line = _run(capsys, str(r), "-o", str(tmp_path / "out"))
    assert code == 2
    assert "unreachable: the smallest reachable is" in line and "(uniform)" in line
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_unsupported_architecture_names_the_module_types(tmp_path, capsys):
    torch.manual_seed(0)
    w = tmp_path / "cnn.safetensors"
    save_weights(create_model("cnn_small", 10, 1), w)
    r = _recipe(tmp_path, model={"model": "cnn_small", "checkpoint": str(w)},
                budget={"metric": "layers", "fraction": 0.5}, candidates={"families": ["sglp"]})
    code, line = _run(capsys, str(r), "-o", str(tmp_path / "out"))
    assert code == 2 and "module types found: Conv2d x" in line and "Linear x1" in line


def test_state_dict_that_does_not_fit_lists_the_first_keys(tmp_path, capsys):
    sd = create_model("resnet8", 10, 1).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "w.pt")
    r = _recipe(tmp_path, model={"model": "resnet8", "checkpoint": str(tmp_path / "w.pt")})
    code, line = _run(capsys, str(r), "-o", str(tmp_path / "out"))
    assert code == 2 and "(first: ['fc.bias'])" in line and "(first: ['extra.weight'])" in line


def test_model_without_weights_is_refused(tmp_path, capsys):
    code, line = _run(capsys, str(_recipe(tmp_path, model={"model": "resnet8"})), "-o", str(tmp_path / "out"))
    assert code == 2 and "model.checkpoint is required" in line


def test_gate_failure_is_one_line_exit_1_and_keeps_the_artifacts(tmp_path, capsys):
    # the shipped demo CNN, width-pruned to half its parameters and NOT healed: it must lose accuracy
    r = _recipe(tmp_path, model={"model": "cnn_small", "kwargs": {"width": 16}, "checkpoint": str(DEMO)},
                data={"name": "fashion_mnist_subset", "val_fraction": 0.1, "augment": False},
                budget={"metric": "params", "fraction": 0.5, "max_drop": 0.5}, candidates={"families": ["width"]},
                heal={"mode": "none"}, export={"formats": ["onnx", "safetensors"]},
                gate={"batch_sizes": [1, 64], "iters": 1})
    out = tmp_path / "out"
    code, line = _run(capsys, str(r), "-o", str(out))
    assert code == 1, line
    data = json.loads((out / "compress.json").read_text())
    cand = data["candidates"][0]
    failed = [k for k, v in cand["gate"].items() if not v["ok"]]
    assert line.startswith(f"error: gate check '{failed[0]}' failed for every candidate")
    assert data["chosen"] is None and not (out / "model.onnx").exists()
    assert (out / "candidates" / cand["name"] / "model.onnx").is_file() and (out / "report.md").is_file()
    drop = data["original"]["top1"] - cand["top1"]
    assert cand["gate"]["quality"]["values"]["drop"] == pytest.approx(drop) and drop > 0.5
    assert cand["params"] <= 0.5 * data["original"]["params"]
    from kdforge.evaluate import evaluate_source  # `kdforge eval` rebuilds the candidate from its safetensors plan

    again = evaluate_source(out / "candidates" / cand["name"] / "model.safetensors")
    assert again["top1"] == pytest.approx(cand["top1"], abs=1e-6)
    from kdforge.report.site import build_site  # `kdforge report -o SITE OUT` shows the compress report

    page = build_site([out], tmp_path / "site", "t").read_text()
    assert cand["name"] in page and "rejected by" in page


def test_kd_compress_is_the_python_twin(tmp_path):
    import kdforge as kd
    from kdforge.errors import KdforgeError

    assert callable(kd.compress)
    with pytest.raises(KdforgeError, match=r"model\.checkpoint is required"):
        kd.compress({"name": "x", "model": {"model": "resnet8"}}, tmp_path / "o")
