"""int8 candidates: onnxruntime's quantizer writes a smaller file whose fresh-process outputs equal its session's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("onnxscript")

from kdforge.compress.export import export_onnx
from kdforge.compress.gate import check_loads, check_matches, onnx_runner
from kdforge.compress.quant import quantize_onnx
from kdforge.errors import KdforgeError
from kdforge.models import create_model

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model("resnet8", 10, 3).eval()
    return model, export_onnx(model, SHAPE, tmp_path_factory.mktemp("q") / "model.onnx")


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_is_smaller_and_loads_fresh_with_the_sessions_outputs(float_onnx, tmp_path, mode):
    model, path = float_onnx
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, *SHAPE)).astype(np.float32)
    q = quantize_onnx(path, tmp_path / "model.int8.onnx", mode, calib)
    # weights stored as int8 instead of fp32: well under half the bytes (scales and zero points are small)
    assert q.stat().st_size < 0.5 * path.stat().st_size
    x = torch.from_numpy(rng.standard_normal((8, *SHAPE)).astype(np.float32))
    loads, outs, facts = check_loads({"onnx": q}, x)
    assert loads.ok, loads.detail
    assert not facts["onnx"]["kdforge_imported"]
    in_process = onnx_runner(q)(x.numpy())
    assert np.array_equal(outs["onnx"], in_process)  # same file, same runtime, same thread count: bit-identical
    assert check_matches(torch.from_numpy(in_process), outs).values["max_abs_diff"]["onnx"] == 0.0
    with torch.no_grad():
        ref = model(x).numpy()
    err = np.abs(in_process - ref).max()
    assert 0 < err < 0.25 * np.abs(ref).max()  # it is quantized (not the float graph), yet close to it


def test_int8_static_without_calibration_is_one_line(float_onnx, tmp_path):
    _, path = float_onnx
    with pytest.raises(KdforgeError, match="needs calibration inputs"):
        quantize_onnx(path, tmp_path / "q.onnx", "static", None)


def test_int8_needs_the_onnx_export():
    from kdforge.compress.recipe import CompressRecipe

    with pytest.raises(KdforgeError, match=r"add onnx to export\.formats"):
        CompressRecipe.from_dict({"model": {"model": "resnet8", "checkpoint": "w.pt"},
                                  "candidates": {"int8": "static"}, "export": {"formats": ["pt2"]}})
