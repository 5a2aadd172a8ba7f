"""int8 candidates: onnxruntime's own quantization of an exported ONNX model (static QDQ or dynamic).

The quantized file is gated like every candidate: it loads in a fresh onnxruntime process, its outputs there
equal the in-process quantized session's, it is smaller and faster than the original in onnxruntime, and its
accuracy is measured on the test split by running the quantized session itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.errors import KdforgeError

INT8_FILE = "model.int8.onnx"


def quantize_onnx(src: Path, dst: Path, mode: str, calib: np.ndarray | None = None, batch: int = 32) -> Path:
    """Write an int8 copy of ``src`` to ``dst``: ``static`` (QDQ, per-channel int8 weights, uint8 activations
    calibrated by min/max on ``calib``) or ``dynamic`` (int8 weights, activations quantized at run time)."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise KdforgeError("int8 candidates need onnxruntime with its quantization tools and onnx: "
                           "pip install 'kdforge[compress]' (or set candidates.int8: none)") from None
    if mode not in ("static", "dynamic"):
        raise KdforgeError(f"int8 mode {mode!r} is not one of: static, dynamic, none")
    if mode == "static" and (calib is None or len(calib) == 0):
        raise KdforgeError("static int8 quantization needs calibration inputs (candidates.int8_calib_samples > 0)")
    with tempfile.TemporaryDirectory(prefix="kdforge-int8-") as tmp, _quiet():
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # pre-processing (shape inference, fusions) is advice, not a requirement
            pre = src
        try:
            if mode == "dynamic":
                quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
            else:
                assert calib is not None

                class Reader(CalibrationDataReader):
                    def __init__(self, name: str) -> None:
                        self.it = iter([{name: calib[i:i + batch]} for i in range(0, len(calib), batch)])

                    def get_next(self) -> dict[str, np.ndarray] | None:
                        return next(self.it, None)

                import onnx

                name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
                quantize_static(str(pre), str(dst), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        except Exception as e:
            raise KdforgeError(f"onnxruntime {mode} int8 quantization of {src.name} failed: "
                               f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}"
                               ) from None
    return dst


@contextlib.contextmanager
def _quiet() -> Any:
    """The quantizer prints and logs per-node advice; a compress run shows its own one-line summary instead."""
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.getLogger().setLevel(level)


def onnx_accuracy(path: Path, ds: Any, threads: int = 1, batch: int = 512) -> float:
    """Top-1 (%) of an ONNX model over a data split, run in onnxruntime (the runtime the int8 model ships for)."""
    from kdforge.compress.gate import onnx_runner
    from kdforge.data import make_loader

    run = onnx_runner(path, threads)
    correct = total = 0
    for x, y in make_loader(ds, batch, False):
        pred = run(x.numpy().astype(np.float32)).argmax(1)
        correct += int((pred == y.numpy()).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)
