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
                budget={"metric": "params", "fraction": 0.5, "max_drop": 0.5},
                candidates={"families": ["width"], "int8": "static", "int8_calib_samples": 64},
                heal={"mode": "none"}, export={"formats": ["onnx", "safetensors"]},
                gate={"batch_sizes": [1, 64], "iters": 1})
    out = tmp_path / "out"
    code, line = _run(capsys, str(r), "-o", str(out))
    assert code == 1, line
    data = json.loads((out / "compress.json").read_text())
    cand, q0, q = data["candidates"]
    # the int8 copy of the candidate is a gated row of its own: it loads fresh, equals its session, is smaller
    assert q["name"] == cand["name"] + "+int8" and q["int8"] == "static"
    # the original's int8 copy keeps every parameter: outside a params budget, so never chosen, whatever its gate
    assert q0["name"] == "original+int8" and q0["params"] == data["original"]["params"]
    assert q0["budget"] == {**q0["budget"], "metric": "params", "ratio": 1.0, "fits": False}
    assert q["budget"]["ratio"] == cand["budget"]["ratio"] <= 0.5 and q["budget"]["fits"]
    assert q["gate"]["loads"]["ok"] and q["gate"]["matches"]["values"]["max_abs_diff"]["onnx"] == 0.0
    assert q["gate"]["smaller"]["ok"] and q["bytes"]["onnx"] < 0.5 * cand["bytes"]["onnx"]
    assert abs(q["top1"] - cand["top1"]) < 5  # int8 of the same weights: close to the float model's accuracy
    assert (out / "candidates" / q["name"] / "model.int8.onnx").is_file()
    # the line speaks of the most accurate candidate within the budget
    best = max((c for c in data["candidates"] if c["budget"]["fits"]), key=lambda c: c["top1"])
    failed = [k for k, v in best["gate"].items() if not v["ok"]]
    assert line.startswith(f"error: gate check '{failed[0]}' failed for every candidate (best by accuracy: "
                           f"{best['name']}:")
    assert not cand["gate"]["quality"]["ok"]
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


@torch.library.custom_op("kdforge_test::opaque_relu", mutates_args=())
def _opaque_relu(x: torch.Tensor) -> torch.Tensor:
    """A custom op with a CPU kernel and no ONNX translation: torch runs it, the ONNX exporter cannot."""
    return x.clamp_min(0)


@_opaque_relu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _OpaqueNet(torch.nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_chans, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_opaque_relu(self.conv(x)).mean((2, 3)))


@pytest.fixture()
def opaque_model(tmp_path: Path) -> Path:
    from kdforge.registry import MODELS

    MODELS.register("opaque_net_test")(_OpaqueNet)
    p = tmp_path / "opaque.safetensors"
    save_weights(_OpaqueNet(), p)
    yield p
    MODELS._items.pop("opaque_net_test")


def test_an_op_the_exporter_lacks_is_one_line_exit_2(tmp_path, capsys, opaque_model):
    r = _recipe(tmp_path, model={"model": "opaque_net_test", "checkpoint": str(opaque_model)},
                budget={"metric": "params", "fraction": 0.9}, candidates={"families": ["width"]},
                export={"formats": ["onnx", "safetensors"]})
    out = tmp_path / "out"
    code, line = _run(capsys, str(r), "-o", str(out))
    assert code == 2, line
    assert line.startswith("error: ONNX export of _OpaqueNet failed (an op the exporter or runtime lacks?)")
    assert "opaque_relu" in line  # names the op
    assert not out.exists()  # failed before any healing; nothing left behind
